// App passcodes (アプリ用パスコード) in the mfagate plugin's Settings, in a real browser: Debian's Chromium
// (playwright-core) on Debian's Roundcube (php -S), the real `mfagate serve` with [app_passcodes] enabled, and a
// real Dovecot running exactly what `mfagate setup dovecot` and `mfagate setup dovecot --part passdb` print (the
// Lua passdb before the site's passdb). The browser reaches Roundcube through the trusted proxy (127.0.0.1) with
// X-Forwarded-For: 127.0.0.2 is the campus network; IMAP clients connect from 127.0.0.9, outside, never granted.
//   alice (en):  the part in Settings; a blank name and no protocol are refused next to their fields; "iPhone"
//                for every protocol, asked a code (a wrong one is refused, nothing is made), made with the app's
//                code; the passcode is shown once (a reload, back and forward show it no more); IMAP with it from
//                outside gets in where the password does not; the list shows that last use; removed, the next
//                IMAP login with it fails. Between the POST and its page, the passcode waits in the session
//                encrypted only.
//   helpdesk:    a passcode made with `mfagate passcodes add` is listed as such, its name escaped; removing it
//                twice says it is gone.
//   hanako (ja): the part in Japanese; a passcode for IMAP and SMTP only, shown once in Japanese; POP with it is
//                refused, IMAP gets in; removed with 削除.
//   mfagate_passcodes = false (a site hiding them): no part, and a forged form with a right code makes nothing;
//                the plugin's default with mfagate's [app_passcodes] off (mfagate's default): no part either, and
//                a forged form is refused by mfagate, said at the top and logged for the admin.
//   no passcode in any file of Roundcube's tree (its logs, its database with sessions and preferences, temp).
// The plugin's pages are checked with axe-core (WCAG 2.1 A/AA); screenshots go to test-artifacts/screenshots/.
import fs from 'node:fs';
import path from 'node:path';
import Database from 'better-sqlite3';
import type { Page } from 'playwright-core';
import t, { type Test } from 'tap';
import { Authenticator } from '../helpers/api.js';
import { type BrowserSession, accessibilityViolations, launchChromium, newPage, screenshot } from '../helpers/browser.js';
import { imapLogin, pop3Login } from '../helpers/clients.js';
import { ROOT } from '../helpers/daemon.js';
import { type MailStack, startMailStack } from '../helpers/mailstack.js';
import { type Roundcube, startRoundcube } from '../helpers/roundcube.js';
import { type Served, serve } from '../helpers/served.js';

const CAMPUS = '127.0.0.2';
const OUTSIDE = '127.0.0.9';
const USERS = { alice: 'alice-pw', hanako: 'hanako-pw' } as const;
type User = keyof typeof USERS;
const PROTOCOLS = ['imap', 'pop3', 'smtp', 'sieve'] as const;
/** A passcode as the plugin shows it: four groups of four of mfagate's letters (no i, l, o). */
const SHOWN = /^[a-hjkmnp-z]{4}( [a-hjkmnp-z]{4}){3}$/;

let d: Served;
let stack: MailStack;
/** Roundcube with the plugin's defaults (mfagate_passcodes is true by default). */
let rc: Roundcube;
/** Roundcube with mfagate_passcodes = false. */
let rcOff: Roundcube;
let browser: BrowserSession;
const apps = {} as Record<User, Authenticator>;
/** Every passcode the pages showed, as shown. */
const made: string[] = [];

t.before(async () => {
  // Dovecot would refuse to start without it ("Unknown passdb driver"); say which package is missing.
  if (!fs.existsSync('/usr/lib/dovecot/modules/auth/libauthdb_lua.so')) throw new Error("Dovecot's Lua passdb is missing: apt-get install dovecot-auth-lua");
  d = await serve({
    toml: `[networks]\ntrusted = ["${CAMPUS}/32"]\nwebmail = ["127.0.0.1/32"]\n[app_passcodes]\nenabled = true\n`,
  });
  // The files as an administrator saves them: `mfagate setup dovecot > conf.d/95-mfagate.conf`, and the Lua passdb.
  const policy = d.cli('setup', 'dovecot');
  const passdb = d.cli('setup', 'dovecot', '--part', 'passdb');
  for (const r of [policy, passdb]) t.equal(r.code, 0, r.stderr);
  stack = await startMailStack({
    users: USERS,
    dovecotConfD: { '95-mfagate.conf': policy.stdout, '05-mfagate-passcode.conf': passdb.stdout },
    // Roundcube forwards the browser's address (IMAP ID x-originating-ip); Dovecot believes it from here only.
    dovecotExtra: 'login_trusted_networks = 127.0.0.1',
  });
  const roundcube = (extra: Record<string, unknown>) =>
    startRoundcube({
      imapPort: stack.imapPort,
      plugins: ['mfagate'],
      pluginDirs: { mfagate: path.join(ROOT, 'webmail/roundcube/mfagate') },
      // No fixed language: Roundcube takes the browser's at a user's first sign-in.
      config: { mfagate_api_socket: d.apiSocket, login_rate_limit: 0, language: undefined, ...extra },
    });
  [rc, rcOff] = await Promise.all([roundcube({}), roundcube({ mfagate_passcodes: false })]);
  browser = await launchChromium();
  // Both users have the authenticator app and MFA on (registered through the API, as Settings would).
  for (const user of Object.keys(USERS) as User[]) {
    const begin = await d.api.post(`/v1/users/${user}/totp`, { ip: CAMPUS });
    apps[user] = new Authenticator(begin.json.secret as string);
    t.equal((await d.api.post(`/v1/users/${user}/totp/confirm`, { ip: CAMPUS, code: await apps[user].next() })).status, 200);
    t.equal((await d.api.put(`/v1/users/${user}/mfa`, { ip: CAMPUS })).status, 200);
  }
});

t.teardown(async () => {
  await browser?.close();
  await Promise.allSettled([rc?.stop(), rcOff?.stop(), d?.close()]);
  await stack?.stop();
});

const imap = (password: string, user: User = 'alice') => imapLogin({ port: stack.imapPort, user, password, localAddress: OUTSIDE });
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const text = async (page: Page, selector: string) => ((await page.textContent(selector)) ?? '').replace(/\s+/g, ' ').trim();
/** The texts of the cells of a table row (or of a table's header row). */
const cells = (page: Page, row: string) => page.$$eval(`${row} > th, ${row} > td`, (cs) => cs.map((c) => (c.textContent ?? '').replace(/\s+/g, ' ').trim()));
const TIME = /^\d{4}-\d\d-\d\d \d\d:\d\d \(JST\)/;

interface PasscodeView {
  id: number;
  name: string;
  protocols: string[];
  created_by: string;
  last_used_at: string | null;
  last_used_ip: string | null;
  last_used_protocol: string | null;
}
/** The user's working passcodes, as mfagate lists them. */
async function listed(user: User): Promise<PasscodeView[]> {
  const r = await d.api.get(`/v1/users/${user}/passcodes`);
  if (r.status !== 200) throw new Error(`GET passcodes answered ${r.status}: ${r.text}`);
  return r.json.passcodes as PasscodeView[];
}

function at(lang: 'en' | 'ja'): Promise<Page> {
  return newPage(browser, { locale: lang, headers: { 'X-Forwarded-For': CAMPUS } });
}

async function signIn(page: Page, user: User, server = rc): Promise<void> {
  await page.goto(server.url);
  await page.fill('#rcmloginuser', user);
  await page.fill('#rcmloginpwd', USERS[user]);
  await Promise.all([page.waitForLoadState('load'), page.click('#rcmloginsubmit')]);
  await page.waitForSelector('#messagelist', { state: 'attached' });
}

async function mfaSettings(page: Page, server = rc): Promise<void> {
  await page.goto(`${server.url}?_task=settings&_action=plugin.mfagate`);
  await page.waitForSelector('#mfagate-settings');
}

async function submit(page: Page, selector: string): Promise<void> {
  await Promise.all([page.waitForNavigation({ waitUntil: 'load' }), page.click(selector)]);
}

/**
 * Saves the page as a screenshot (with `part` scrolled into view: Elastic scrolls the settings inside the page)
 * and checks what the plugin renders against WCAG 2.1 A/AA with axe-core; Roundcube's frame is Roundcube's.
 */
async function capture(t: Test, page: Page, name: string, part = '#mfagate-passcodes'): Promise<void> {
  await page.locator(part).scrollIntoViewIfNeeded();
  await screenshot(page, name);
  t.same(await accessibilityViolations(page, { within: ['#mfagate-settings', '#messagestack'] }), [], `${name}: no WCAG 2.1 A/AA violations found by axe-core`);
}

/**
 * Posts a form of the section's own making (what a forged or stale page would send), with the page's request
 * token, and waits for the answer.
 */
async function postForm(page: Page, fields: [string, string][]): Promise<void> {
  const script = `(() => {
    const f = document.createElement('form');
    f.method = 'post';
    f.action = './?_task=settings&_action=plugin.mfagate';
    for (const [name, value] of ${JSON.stringify(fields)}.concat([['_token', rcmail.env.request_token]])) {
      const i = document.createElement('input');
      i.type = 'hidden';
      i.name = name;
      i.value = value;
      f.append(i);
    }
    document.body.append(f);
    f.submit();
  })()`;
  await Promise.all([page.waitForNavigation({ waitUntil: 'load' }), page.evaluate(script)]);
}

/** The page's HTML, once a navigation in flight (to Chrome's own error page, say) has ended. */
async function settled(page: Page): Promise<string> {
  for (let i = 0; ; i++) {
    try {
      await page.waitForLoadState('load');
      return await page.content();
    } catch (e) {
      if (i >= 40) throw e;
      await sleep(50);
    }
  }
}

/** The page's HTML holds none of the passcode's letters, grouped or not. */
function holdsNot(t: Test, html: string, passcode: string, what: string): void {
  const letters = passcode.replace(/ /g, '');
  t.notOk(html.includes(passcode) || html.includes(letters), `${what}: the passcode is not on the page`);
}

t.test('alice: make a passcode for her iPhone, see it once, use it from outside, see its last use, remove it', async (t) => {
  const page = await at('en');
  await signIn(page, 'alice');
  const pw = await imap(USERS.alice);
  t.equal(pw.ok, false, 'before: the password from outside is refused (MFA on, no grant there)');
  t.match(pw.line, /MFA required/);

  await mfaSettings(page);
  t.equal(await text(page, '#mfagate-passcodes-title'), 'App passcodes', 'the part is in the MFA section');
  t.equal(await text(page, '#mfagate-no-passcodes'), 'You have no app passcodes yet.');
  t.equal(await page.getByLabel('Device name').getAttribute('maxlength'), '64', 'the name field is labelled, up to 64 characters');
  t.equal(await page.getByLabel('Device name').getAttribute('aria-describedby'), 'mfagate-passcode-name-hint', 'with its hint');
  t.equal(await text(page, '#mfagate-passcode-protocols legend'), 'It may be used for');
  for (const [p, label] of [['imap', 'IMAP (receiving)'], ['pop3', 'POP (receiving)'], ['smtp', 'SMTP (sending)'], ['sieve', 'Sieve (mail filters)']] as const) {
    t.ok(await page.getByLabel(label, { exact: true }).isChecked(), `"${label}" is labelled and ticked at first`);
    t.equal(await page.getByLabel(label, { exact: true }).getAttribute('value'), p);
  }
  await capture(t, page, 'rc-passcodes-01-empty-en');

  // A name of spaces passes the browser's `required`: refused by the plugin, next to the field, no code asked.
  await page.fill('#mfagate-passcode-name', '   ');
  await submit(page, '#mfagate-passcode-create button.mfagate-submit');
  t.equal(await text(page, '#mfagate-passcode-name-error'), 'Enter a name for the device (up to 64 characters).', 'a blank name: the error next to the field');
  t.equal(await page.getAttribute('#mfagate-passcode-name', 'aria-invalid'), 'true');
  t.equal(await page.getAttribute('#mfagate-passcode-name', 'aria-describedby'), 'mfagate-passcode-name-hint mfagate-passcode-name-error', 'the field names its error');
  t.equal(await page.locator('#mfagate-confirm').count(), 0, 'no code is asked for it');

  // No protocol ticked: refused next to the group; the name and the boxes stay as they were.
  await page.fill('#mfagate-passcode-name', 'iPhone');
  for (const p of PROTOCOLS) await page.uncheck(`#mfagate-passcode-${p}`);
  await submit(page, '#mfagate-passcode-create button.mfagate-submit');
  t.equal(await text(page, '#mfagate-passcode-protocols-error'), 'Choose at least one use.', 'no protocol: the error next to the group');
  t.equal(await page.getAttribute('#mfagate-passcode-protocols', 'aria-describedby'), 'mfagate-passcode-protocols-error');
  t.equal(await page.inputValue('#mfagate-passcode-name'), 'iPhone', 'the name is kept');
  for (const p of PROTOCOLS) t.notOk(await page.isChecked(`#mfagate-passcode-${p}`), `${p} stays unticked`);
  await capture(t, page, 'rc-passcodes-02-errors-en');
  t.same(await listed('alice'), [], 'nothing is made');

  // All four: the code is asked for, with what it is for; a wrong one is refused and makes nothing.
  for (const p of PROTOCOLS) await page.check(`#mfagate-passcode-${p}`);
  await submit(page, '#mfagate-passcode-create button.mfagate-submit');
  await page.waitForSelector('#mfagate-confirm');
  t.equal(
    await text(page, '#mfagate-confirm-what'),
    'Make an app passcode for "iPhone" (IMAP (receiving), POP (receiving), SMTP (sending), Sieve (mail filters)).',
    'the confirmation says what the code is for',
  );
  await capture(t, page, 'rc-passcodes-03-confirm-en', '#mfagate-confirm');
  await page.fill('#mfagate-confirm-code', '000000');
  await submit(page, '#mfagate-confirm-form button.mfagate-submit');
  t.equal(await text(page, '#mfagate-confirm-code-error'), 'The OTP is not right. Enter it again.', 'a wrong code: refused next to the field');
  t.same(await listed('alice'), [], 'and nothing is made');

  // The POST that makes it is redirected to the page that shows it. The POST is sent here (not following the
  // redirect), the sessions are read, then the browser gets the answer: the passcode waits in one, encrypted,
  // for that page only.
  let waiting: string | undefined;
  const shownPage = (url: URL) => url.search === '?_task=settings&_action=plugin.mfagate';
  await page.route(shownPage, async (route) => {
    if (route.request().method() !== 'POST') return route.continue();
    const response = await route.fetch({ maxRedirects: 0 });
    waiting = `${response.status()} ${response.headers()['location'] ?? ''}\n${sessionsOf(rc)}`;
    await route.fulfill({ response });
  });
  await page.fill('#mfagate-confirm-code', await apps.alice.next());
  await submit(page, '#mfagate-confirm-form button.mfagate-submit');
  await page.unroute(shownPage);
  await page.waitForSelector('#mfagate-passcode-shown');
  const passcode = await text(page, '#mfagate-passcode-value');
  made.push(passcode);
  t.match(passcode, SHOWN, 'the passcode, in four groups of four letters');
  const letters = passcode.replace(/ /g, '');
  t.match(waiting, /^302 [^\n]*\?_task=settings&_action=plugin\.mfagate\n/, 'the POST was redirected to the section');
  t.match(waiting, /mfagate_passcode_shown\|a:\d+:\{s:4:"code";s:\d+:"[A-Za-z0-9+\/=]+"/, 'between the POST and its page, the passcode waited in the session');
  t.notOk([passcode, letters, letters.toUpperCase()].some((f) => waiting?.includes(f)), 'encrypted');
  t.notOk(page.url().includes(letters) || page.url().includes(passcode.replace(/ /g, '+')), 'not in the URL');
  t.match(page.url(), /\?_task=settings&_action=plugin\.mfagate$/, 'a plain GET of the section (the POST was redirected)');
  t.equal(await text(page, '#mfagate-passcode-shown-title'), 'The new app passcode for "iPhone"');
  const shown = await text(page, '#mfagate-passcode-shown');
  for (const words of [
    'It is shown only now',
    'Spaces do not matter',
    'It works from any network',
    'Make one passcode per device. If the device is lost or given away, remove its passcode',
    'Settings → Apps → Mail → Mail Accounts',
    'Outgoing Mail Server (SMTP)',
    'Android (Gmail or Outlook app)',
    'incoming server and of the outgoing (SMTP) server',
    'Settings → Privacy & Security → Saved Passwords',
  ]) {
    t.ok(shown.includes(words), `the page says: ${words}`);
  }
  t.equal(await text(page, '#mfagate-passcode-shown-for'), 'For: IMAP (receiving), POP (receiving), SMTP (sending), Sieve (mail filters)');
  const list = await listed('alice');
  t.match(list, [{ name: 'iPhone', protocols: ['imap', 'pop3', 'smtp', 'sieve'], created_by: 'api', last_used_at: null }], 'mfagate made it');
  t.equal(list.length, 1);
  const id = list[0]?.id ?? 0;
  await capture(t, page, 'rc-passcode-shown-en', '#mfagate-passcode-shown');

  // Shown once: a reload is a plain GET that does not show it, nor does going back and forward.
  await page.reload({ waitUntil: 'load' });
  await page.waitForSelector('#mfagate-settings');
  t.equal(await page.locator('#mfagate-passcode-shown').count(), 0, 'reloaded: the passcode is not shown again');
  holdsNot(t, await page.content(), passcode, 'reloaded');
  t.match(
    await cells(page, `#mfagate-passcodes-list tr[data-passcode="${id}"]`),
    ['iPhone', 'IMAP (receiving), POP (receiving), SMTP (sending), Sieve (mail filters)', TIME, 'Never', 'None (until removed)', 'Remove'],
    'it is listed: name, uses, created, never used, no expiry, its button',
  );
  // Back is the POST that asked the code: Chrome does not send it again by itself ("Confirm Form
  // Resubmission", net::ERR_CACHE_MISS, as Roundcube's pages are no-store).
  await page.goBack({ waitUntil: 'load' }).catch(() => null);
  holdsNot(t, await settled(page), passcode, 'back');
  const forward = await page.goForward({ waitUntil: 'load' });
  t.equal(forward?.status(), 200, 'forward again: the section is loaded anew');
  t.equal(await page.locator('#mfagate-passcode-shown').count(), 0, 'and does not show it');
  holdsNot(t, await settled(page), passcode, 'forward again');
  t.equal((await listed('alice')).length, 1, 'and no second passcode was made by any of that');

  // The phone's mail app, outside, with the passcode as shown (spaces and all).
  const login = await imap(passcode);
  t.ok(login.ok, 'IMAP from outside with the passcode gets in', { transcript: login.transcript.join('\n') });
  t.equal((await imap(USERS.alice)).ok, false, 'the password from there is still refused');

  // mfagate writes last uses about every second: the section shows it once written.
  let used = '';
  for (const deadline = Date.now() + 10_000; ; await sleep(250)) {
    await mfaSettings(page);
    used = await text(page, `#mfagate-passcodes-list tr[data-passcode="${id}"] .mfagate-passcode-used`);
    if (used !== 'Never' || Date.now() > deadline) break;
  }
  t.match(used, /^\d{4}-\d\d-\d\d \d\d:\d\d \(JST\) \(127\.0\.0\.9, IMAP\)$/, 'the last use: when, from where, and what');
  await capture(t, page, 'rc-passcodes-listed-en');

  // Removing it asks no code (it only takes access away); the next login with it fails.
  await submit(page, `#mfagate-passcode-revoke-${id} button`);
  t.equal(await page.getByRole('button', { name: 'Remove the app passcode "iPhone"' }).count(), 0, 'the row and its button are gone');
  await page.waitForSelector('#messagestack div', { timeout: 10_000 });
  t.match(await text(page, '#messagestack'), /The app passcode "iPhone" is removed\. That device's mail program can no longer log in with it\./, 'the page says so');
  t.equal(await text(page, '#mfagate-no-passcodes'), 'You have no app passcodes yet.');
  t.same(await listed('alice'), [], 'mfagate has no working passcode of alice');
  const after = await imap(passcode);
  t.equal(after.ok, false, 'the next IMAP login with it fails');
  t.notMatch(after.line, /MFA required/, 'as a wrong password');
  await page.context().close();
});

t.test('a passcode the helpdesk made: listed as such, its name escaped, removed by its button\'s name', async (t) => {
  const NAME = 'Thunderbird <home> & "work"';
  const r = d.cli('passcodes', 'add', '--user', 'alice', '--name', NAME, '--protocols', 'imap,smtp', '--json');
  t.equal(r.code, 0, r.stderr);
  const page = await at('en');
  await signIn(page, 'alice');
  await mfaSettings(page);
  t.match(
    await cells(page, '#mfagate-passcodes-list tbody tr'),
    [NAME, 'IMAP (receiving), SMTP (sending)', /\(JST\) \(by the helpdesk\)$/, 'Never', 'None (until removed)', 'Remove'],
    'listed with its uses and who made it, the name as text',
  );
  t.equal(await page.locator('#mfagate-passcodes-list home').count(), 0, 'not as markup');
  const remove = page.getByRole('button', { name: `Remove the app passcode "${NAME}"` });
  t.equal(await remove.count(), 1, 'one button with that accessible name');
  t.same(await cells(page, '#mfagate-passcodes-list thead tr'), ['Device', 'For', 'Created', 'Last used', 'Expires (有効期限)', 'Action'], 'the columns');
  await Promise.all([page.waitForNavigation({ waitUntil: 'load' }), remove.click()]);
  await page.waitForSelector('#messagestack div', { timeout: 10_000 });
  t.match(await text(page, '#messagestack'), `The app passcode "${NAME}" is removed.`, 'the message names it, as text');
  t.same(await listed('alice'), [], 'removed');
  // Removing it again (a second tab, an old page): said so, nothing else happens.
  const id = (JSON.parse(r.stdout) as { id: number }).id;
  await postForm(page, [
    ['_mfagate_op', 'passcode-revoke'],
    ['_passcode', String(id)],
  ]);
  await page.waitForSelector('#messagestack div', { timeout: 10_000 });
  t.match(await text(page, '#messagestack'), /That app passcode is already removed/, 'a second removal: said so');
  await page.context().close();
});

t.test('hanako (ja): the part in Japanese; a passcode for IMAP and SMTP only', async (t) => {
  const page = await at('ja');
  await signIn(page, 'hanako');
  await mfaSettings(page);
  t.equal(await text(page, '#mfagate-passcodes-title'), 'アプリ用パスコード');
  t.equal(await text(page, '#mfagate-no-passcodes'), 'アプリ用パスコードはまだありません。');
  t.equal(await text(page, '#mfagate-passcode-create-title'), '新しいアプリ用パスコードを作る');
  t.equal(await page.getByLabel('端末の名前').getAttribute('name'), '_name', 'the name field, labelled 端末の名前');
  t.equal(await text(page, '#mfagate-passcode-name-hint'), '例: iPhone、自宅の Thunderbird (64 文字まで)');
  t.equal(await text(page, '#mfagate-passcode-protocols legend'), '使える用途');
  for (const [p, label] of [['imap', 'IMAP (受信)'], ['pop3', 'POP (受信)'], ['smtp', 'SMTP (送信)'], ['sieve', 'Sieve (メールの振り分け設定)']] as const) {
    t.equal(await page.getByLabel(label, { exact: true }).getAttribute('value'), p, `"${label}"`);
  }
  t.equal(await text(page, '#mfagate-passcode-create button.mfagate-submit'), 'アプリ用パスコードを作る');

  await page.fill('#mfagate-passcode-name', 'Android');
  await page.uncheck('#mfagate-passcode-pop3');
  await page.uncheck('#mfagate-passcode-sieve');
  await submit(page, '#mfagate-passcode-create button.mfagate-submit');
  t.equal(await text(page, '#mfagate-confirm-what'), '「Android」用のアプリ用パスコード (IMAP (受信)、SMTP (送信)) を作ります。', 'the confirmation in Japanese');
  await page.fill('#mfagate-confirm-code', await apps.hanako.next());
  await submit(page, '#mfagate-confirm-form button.mfagate-submit');
  await page.waitForSelector('#mfagate-passcode-shown');
  const passcode = await text(page, '#mfagate-passcode-value');
  made.push(passcode);
  t.match(passcode, SHOWN);
  t.equal(await text(page, '#mfagate-passcode-shown-title'), '「Android」用の新しいアプリ用パスコード');
  t.equal(await text(page, '#mfagate-passcode-shown-for'), '用途: IMAP (受信)、SMTP (送信)');
  const shown = await text(page, '#mfagate-passcode-shown');
  for (const words of [
    'このパスコードはいまだけ表示されます',
    'スペースは入れても入れなくてもかまいません',
    'どのネットワークからでも多要素認証なしで使えます',
    'パスコードは端末ごとに 1 つ作ってください',
    '個人環境の設定 → 多要素認証 → アプリ用パスコード ですぐに削除してください',
    '設定 → アプリ → メール → メールアカウント',
    'Android (Gmail / Outlook アプリ)',
    '設定 → プライバシーとセキュリティ → 保存されたパスワード',
  ]) {
    t.ok(shown.includes(words), `the page says: ${words}`);
  }
  await capture(t, page, 'rc-passcode-shown-ja', '#mfagate-passcode-shown');
  t.match(await listed('hanako'), [{ name: 'Android', protocols: ['imap', 'smtp'] }], 'made for IMAP and SMTP only');

  // What it was made for is what Dovecot lets it do.
  t.equal((await pop3Login({ port: stack.pop3Port, user: 'hanako', password: passcode, localAddress: OUTSIDE })).ok, false, 'POP with it: refused');
  t.ok((await imap(passcode, 'hanako')).ok, 'IMAP with it: in');

  await mfaSettings(page);
  const id = (await listed('hanako'))[0]?.id ?? 0;
  t.same(await cells(page, '#mfagate-passcodes-list thead tr'), ['端末の名前', '用途', '作成日時', '最後の利用', '有効期限', '操作'], 'the columns in Japanese');
  t.match(
    await cells(page, `#mfagate-passcodes-list tr[data-passcode="${id}"]`),
    ['Android', 'IMAP (受信)、SMTP (送信)', TIME, /^(なし|\d{4}-\d\d-\d\d \d\d:\d\d \(JST\) \(127\.0\.0\.9、IMAP\))$/, 'なし (削除するまで)', '削除'],
    'the row in Japanese',
  );
  const remove = page.getByRole('button', { name: 'アプリ用パスコード「Android」を削除する' });
  t.equal(await remove.count(), 1, 'the 削除 button names the passcode');
  await capture(t, page, 'rc-passcodes-listed-ja');
  await Promise.all([page.waitForNavigation({ waitUntil: 'load' }), remove.click()]);
  await page.waitForSelector('#messagestack div', { timeout: 10_000 });
  t.match(await text(page, '#messagestack'), /アプリ用パスコード「Android」を削除しました。/);
  t.same(await listed('hanako'), []);
  t.equal((await imap(passcode, 'hanako')).ok, false, 'removed: IMAP with it fails');
  await page.context().close();
});

t.test('mfagate_passcodes = false: no part, and a forged form makes nothing', async (t) => {
  const page = await at('en');
  await signIn(page, 'alice', rcOff);
  await mfaSettings(page, rcOff);
  t.equal(await page.locator('#mfagate-totp-state').count(), 1, 'the MFA section is there');
  t.equal(await page.locator('#mfagate-passcodes').count(), 0, 'but not the app passcodes part');
  t.notOk((await page.content()).includes('App passcodes'), 'nor a word of it');
  // The form posted anyway, with a right code: the plugin does not send it on.
  await postForm(page, [
    ['_mfagate_op', 'passcode-create'],
    ['_name', 'Forged'],
    ['_protocols[]', 'imap'],
    ['_method', 'totp'],
    ['_code', apps.alice.peek()],
  ]);
  await page.waitForSelector('#messagestack div', { timeout: 10_000 });
  t.match(await text(page, '#messagestack'), /Check what you entered/, 'refused');
  t.equal(await page.locator('#mfagate-passcode-shown').count(), 0, 'no passcode shown');
  t.same(await listed('alice'), [], 'and none made');
  await page.context().close();
});

t.test("the plugin's default, with mfagate's [app_passcodes] off: no part; a forged form is refused by mfagate", async (t) => {
  // A second mfagate (passcodes off, its default) behind a third Roundcube; Dovecot still asks the first.
  const off = await serve({ toml: `[networks]\ntrusted = ["${CAMPUS}/32"]\nwebmail = ["127.0.0.1/32"]\n` });
  t.teardown(() => off.close());
  const server = await startRoundcube({
    imapPort: stack.imapPort,
    plugins: ['mfagate'],
    pluginDirs: { mfagate: path.join(ROOT, 'webmail/roundcube/mfagate') },
    config: { mfagate_api_socket: off.apiSocket, login_rate_limit: 0 },
  });
  t.teardown(() => server.stop());
  const begin = await off.api.post('/v1/users/alice/totp', { ip: CAMPUS });
  const app = new Authenticator(begin.json.secret as string);
  t.equal((await off.api.post('/v1/users/alice/totp/confirm', { ip: CAMPUS, code: await app.next() })).status, 200);

  const page = await at('en');
  await signIn(page, 'alice', server);
  await mfaSettings(page, server);
  t.equal(await page.locator('#mfagate-totp-state').count(), 1, 'the MFA section is there');
  t.equal(await page.locator('#mfagate-passcodes').count(), 0, 'but not the app passcodes part: mfagate says they are off');
  await postForm(page, [
    ['_mfagate_op', 'passcode-create'],
    ['_name', 'iPad'],
    ['_protocols[]', 'imap'],
    ['_method', 'totp'],
    ['_code', await app.next()],
  ]);
  await page.waitForSelector('#messagestack div', { timeout: 10_000 });
  t.match(await text(page, '#messagestack'), 'App passcodes cannot be made on this mail system now. Contact the helpdesk.', 'a form posted anyway: said at the top');
  t.equal(await page.locator('#mfagate-passcode-shown').count(), 0, 'nothing shown');
  const after = await off.api.get('/v1/users/alice/passcodes');
  t.same(after.json.passcodes, [], 'nothing made');
  t.equal(after.json.app_passcodes.enabled, false);
  t.match(server.logs(), /passcodes-off user="alice" ip="127\.0\.0\.2" reason="mfagate answered that app passcodes are not enabled/, 'and the plugin logs it for the admin');
  await page.context().close();
});

/** Roundcube's sessions, as stored and decoded (it keeps their data base64-encoded). */
function sessionsOf(server: Roundcube): string {
  const db = new Database(path.join(server.dir, 'roundcube.db'), { readonly: true, fileMustExist: true });
  try {
    return (db.prepare('SELECT vars FROM session').all() as { vars: string }[]).map((r) => `${r.vars}\n${Buffer.from(r.vars, 'base64').toString('utf8')}`).join('\n');
  } finally {
    db.close();
  }
}

/** The regular files under `dir`, not following links (the tree links Roundcube's code from the system). */
function filesIn(dir: string): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) return filesIn(p);
    return e.isFile() ? [p] : [];
  });
}

t.test("no passcode in Roundcube's logs, sessions, preferences or any file of its tree", async (t) => {
  t.equal(made.length, 2, 'two passcodes were shown');
  const db = new Database(path.join(rc.dir, 'roundcube.db'), { readonly: true, fileMustExist: true });
  t.teardown(() => db.close());
  const prefs = (db.prepare('SELECT preferences FROM users').all() as { preferences: string | null }[]).map((r) => r.preferences ?? '').join('\n');
  const sessions = sessionsOf(rc);
  t.match(sessions, /username\|s:\d+:"(alice|hanako)"/, 'the sessions were read (decoded)');
  t.notMatch(sessions, /mfagate_passcode_shown/, 'no passcode waits in a session to be shown');
  const logs = rc.logs();
  t.match(logs, /passcode-added user="alice" ip="127\.0\.0\.2" passcode="\d+" name="iPhone" protocols="imap,pop3,smtp,sieve"/, "the plugin's log has the passcode made");
  t.match(logs, /passcode-revoked user="hanako"/, 'and the one removed');
  const files = filesIn(rc.dir);
  t.ok(files.some((f) => f.endsWith('roundcube.db')) && files.some((f) => f.endsWith('mfagate.log')), `the tree's files are read (${files.length}), the database and the plugin's log among them`);
  for (const passcode of made) {
    const forms = [passcode, passcode.replace(/ /g, ''), passcode.replace(/ /g, '').toUpperCase()];
    const hit = (s: string) => forms.some((f) => s.includes(f));
    const what = `${passcode.slice(0, 2)}...`;
    t.notOk(hit(prefs), `${what}: not in the preferences`);
    t.notOk(hit(sessions), `${what}: not in the sessions`);
    t.notOk(hit(logs), `${what}: not in Roundcube's logs`);
    t.notOk(hit(rcOff.logs()), `${what}: nor in the other Roundcube's`);
    const inFiles = files.filter((f) => hit(fs.readFileSync(f, 'latin1')));
    t.same(inFiles, [], `${what}: in no file of Roundcube's tree`);
    t.notOk(hit(d.daemon.output()), `${what}: not in mfagate's log`);
  }
});
