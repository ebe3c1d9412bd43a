// The mfagate plugin in a real browser: Debian's Chromium (playwright-core) on a real Roundcube (Debian's, under
// php -S), with a real Dovecot asking the real `mfagate serve` about every login, a real Postfix delivering the
// codes mfagate mails, and real IMAP clients. The browser reaches Roundcube through the trusted proxy address
// (127.0.0.1) and says which address it plays with X-Forwarded-For: 127.0.0.2 is the campus network, 127.0.0.9,
// 127.0.0.10 and 127.0.0.11 are homes outside.
//   campus (en):  the password opens the mailbox. In Settings: register the app from the key on the page, the
//                 external address with the code from the delivered mail, enable MFA, issue backup codes.
//   home A (en):  IMAP refused; the password, then the code page; a wrong code, then the app's code: the mailbox
//                 with the notice; IMAP from A gets in, from B it is refused.
//   home B (en):  the mailed code from the delivered message; IMAP from B gets in. In Settings: revoke A's row,
//                 after which IMAP from A is refused.
//   hanako (ja):  a Japanese user registers the app in Settings on campus and passes MFA from home; the code
//                 page and the notice are in Japanese (Roundcube keeps each user's language).
//   home C (en):  a backup code passes once; the same code is refused at the next sign-in. Turning MFA off
//                 needs a code.
// Every plugin page is checked with axe-core (WCAG 2.1 A/AA) and saved under test-artifacts/screenshots/.
import path from 'node:path';
import Database from 'better-sqlite3';
import type { Frame, Page } from 'playwright-core';
import t, { type Test } from 'tap';
import { Authenticator, codeIn, decodeMail } from '../helpers/api.js';
import { type BrowserSession, PHONE, accessibilityViolations, launchChromium, newPage, screenshot } from '../helpers/browser.js';
import { imapLogin } from '../helpers/clients.js';
import { ROOT } from '../helpers/daemon.js';
import { type MailStack, freePort, startMailStack } from '../helpers/mailstack.js';
import { type Roundcube, startRoundcube } from '../helpers/roundcube.js';
import { POLICY_KEY, type Served, serve } from '../helpers/served.js';

const CAMPUS = '127.0.0.2';
const A = '127.0.0.9';
const B = '127.0.0.10';
const C = '127.0.0.11';
const USERS = { alice: 'alice-pw', carol: 'carol-pw', hanako: 'hanako-pw' };
/** hanako's home. */
const HOME_J = '127.0.0.12';

let stack: MailStack;
let d: Served;
let rc: Roundcube;
let browser: BrowserSession;
/** The authenticator app, with the key the settings page showed. */
let phone: Authenticator;
let backupCodes: string[] = [];

t.before(async () => {
  const policyPort = await freePort();
  stack = await startMailStack({
    users: USERS,
    policyUrl: `http://127.0.0.1:${policyPort}/`,
    policyApiHeader: `X-API-Key: ${POLICY_KEY}`,
    policyAttributes: 'recommended',
    dovecotExtra: 'login_trusted_networks = 127.0.0.1',
    // mfagate mails codes through this Postfix (from loopback, without AUTH).
    postfixExtra: 'smtpd_recipient_restrictions = permit_mynetworks, permit_sasl_authenticated, reject',
  });
  d = await serve({
    dovecotPort: policyPort,
    toml:
      `[networks]\ntrusted = ["${CAMPUS}/32"]\nwebmail = ["127.0.0.1/32"]\n` +
      `[mail]\nsmtp = "smtp://127.0.0.1:${stack.smtpPort}"\nfrom = "mfagate@${stack.domain}"\n[totp]\nissuer = "Mail Test"\n`,
  });
  rc = await startRoundcube({
    imapPort: stack.imapPort,
    smtpPort: stack.smtpPort,
    plugins: ['mfagate'],
    pluginDirs: { mfagate: path.join(ROOT, 'webmail/roundcube/mfagate') },
    // No fixed language: Roundcube takes the browser's.
    config: { mfagate_api_socket: d.apiSocket, login_rate_limit: 0, language: undefined },
  });
  browser = await launchChromium();
});

t.teardown(async () => {
  await browser?.close();
  await Promise.allSettled([rc?.stop(), d?.close()]);
  await stack?.stop();
});

const imap = (from: string) => imapLogin({ port: stack.imapPort, user: 'alice', password: USERS.alice, localAddress: from });

/** A browser "at" an address, in a language. */
function at(ip: string, lang: 'ja' | 'en', o: { phone?: boolean } = {}): Promise<Page> {
  return newPage(browser, { locale: lang, headers: { 'X-Forwarded-For': ip }, ...(o.phone ? { viewport: PHONE } : {}) });
}

/**
 * Saves the page as a screenshot and checks what the plugin renders (the code page, the settings section)
 * against WCAG 2.1 A/AA with axe-core; Roundcube's own frame around it is Roundcube's. The page lets a user zoom.
 */
async function capture(t: Test, page: Page, name: string): Promise<void> {
  await screenshot(page, name);
  const within = (await page.$('#mfagate-code')) ? ['#mfagate-code'] : ['#mfagate-settings', '#messagestack'];
  t.same(await accessibilityViolations(page, { within }), [], `${name}: no WCAG 2.1 A/AA violations found by axe-core`);
  t.notMatch((await page.getAttribute('meta[name="viewport"]', 'content')) ?? '', /maximum-scale/, `${name}: zooming is allowed`);
}

async function signIn(page: Page, user = 'alice', password = USERS.alice): Promise<void> {
  await page.goto(rc.url);
  await page.fill('#rcmloginuser', user);
  await page.fill('#rcmloginpwd', password);
  await Promise.all([page.waitForLoadState('load'), page.click('#rcmloginsubmit')]);
}

/** Opens Settings, then the mfagate section; returns its frame. */
async function mfaSettings(page: Page): Promise<Frame> {
  await page.goto(`${rc.url}?_task=settings&_action=plugin.mfagate`);
  await page.waitForSelector('#mfagate-settings');
  return page.mainFrame();
}

async function submit(frame: Frame, selector: string): Promise<void> {
  await Promise.all([frame.waitForNavigation({ waitUntil: 'load' }), frame.click(selector)]);
}

const text = async (frame: Frame | Page, selector: string) => ((await frame.textContent(selector)) ?? '').replace(/\s+/g, ' ').trim();

/** The first new message in carol's mailbox (alice's private address) with this subject, decoded. */
async function mailTo(subject: RegExp, seen: Set<string>): Promise<{ subject: string; text: string }> {
  const raw = await stack.waitForMessage('carol', (m) => !seen.has(m) && subject.test(decodeMail(m).subject));
  return decodeMail(raw);
}

t.test('campus: the password opens the mailbox; Settings register the app, the address and backup codes', async (t) => {
  const page = await at(CAMPUS, 'en');
  await signIn(page);
  await page.waitForSelector('#messagelist', { state: 'attached' });
  t.match(page.url(), /_task=mail/, 'the mailbox, no code asked');

  // The section is in Settings' menu.
  await page.goto(`${rc.url}?_task=settings`);
  await Promise.all([page.waitForURL(/_action=plugin\.mfagate/), page.click('#settings-menu li.mfagate a')]);
  const s = page.mainFrame();
  await s.waitForSelector('#mfagate-settings');
  await capture(t, page, 'rc-01-settings-empty-en');
  t.match(await text(s, '#mfagate-state'), /disabled/, 'MFA is off');
  t.equal(await s.$('#mfagate-enable'), null, 'it cannot be enabled without a factor');

  // The app: the key from the page, then its first code.
  await submit(s, '#mfagate-totp-begin button.mfagate-submit');
  await s.waitForSelector('#enrol-settings');
  t.match(await s.getAttribute('#enrol-settings img.mfagate-qr', 'src') ?? '', /^data:image\/svg\+xml;base64,/, 'an inline QR code');
  const secret = (await text(s, '#enrol-settings-key')).replace(/\s+/g, '');
  t.match(secret, /^[A-Z2-7]{16,}$/, 'and the key to type in');
  t.notMatch(page.url(), new RegExp(secret), 'the key is not in the URL');
  phone = new Authenticator(secret);
  await capture(t, page, 'rc-02-register-app-en');
  await s.fill('#enrol-settings-code', await phone.next());
  await submit(s, '#enrol-settings-form button.mfagate-submit');
  t.match(await text(s, '#mfagate-totp-state'), /^Registered$/, 'the app is registered');

  // MFA on.
  await submit(s, '#mfagate-enable button.mfagate-submit');
  t.match(await text(s, '#mfagate-state'), /enabled/, 'MFA is on');

  // The external address: carol's mailbox plays alice's private address. Adding it asks for a code now.
  const seen = new Set(stack.messages('carol'));
  await s.fill('#mfagate-email-address', `carol@${stack.domain}`);
  await submit(s, '#mfagate-email-register button.mfagate-submit');
  await s.waitForSelector('#mfagate-confirm');
  t.equal(stack.messages('carol').length, seen.size, 'nothing is mailed before the code');
  t.equal(await text(s, '#mfagate-confirm-what'), `Register carol@${stack.domain} as the external address.`, 'the page says what the code is for');
  await capture(t, page, 'rc-03-confirm-with-a-code-en');
  await s.fill('#mfagate-confirm-code', await phone.next());
  await submit(s, '#mfagate-confirm-form button.mfagate-submit');
  await s.waitForSelector('#mfagate-email-confirm');
  const confirm = await mailTo(/^Confirm your external address/, seen);
  await s.fill('#mfagate-email-confirm-code', codeIn(confirm.text));
  await submit(s, '#mfagate-email-confirm-form button.mfagate-submit');
  t.match(await text(s, '#mfagate-email-state'), new RegExp(`Registered: c\\*\\*\\*@${stack.domain}`), 'the address is registered, masked');

  // Backup codes, shown once.
  await submit(s, '#mfagate-backup-generate button.mfagate-submit');
  await s.fill('#mfagate-confirm-code', await phone.next());
  await submit(s, '#mfagate-confirm-form button.mfagate-submit');
  backupCodes = (await s.$$eval('#mfagate-backup-codes code', (els) => els.map((e) => e.textContent ?? ''))).map((c) => c.trim());
  t.equal(backupCodes.length, 10, 'ten backup codes');
  await capture(t, page, 'rc-04-backup-codes-en');
  await mfaSettings(page);
  t.equal(await page.$('#mfagate-backup-codes'), null, 'shown once: gone on the next view');
  t.match(await text(page, '#mfagate-backup-state'), /Unused codes: 10/);
  await page.context().close();
});

t.test('home A: the code page after the password; a wrong code, then the right one; IMAP follows', async (t) => {
  t.equal((await imap(A)).ok, false, 'IMAP from A is refused before');
  const page = await at(A, 'en', { phone: true });
  await signIn(page);
  await page.waitForSelector('#mfagate-code');
  t.match(await text(page, '#mfagate-need'), new RegExp(`this network \\(${A.replace(/\./g, '\\.')}\\)`), 'the code page names the address');
  await capture(t, page, 'rc-05-code-page-en-phone');

  // While the code is pending, the mailbox is not there.
  await page.goto(`${rc.url}?_task=mail`);
  t.equal(await page.$('#messagelist'), null, '?_task=mail: no mailbox');
  await page.waitForSelector('#mfagate-code');

  await page.fill('#mfagate-totp-code', '000000');
  await Promise.all([page.waitForLoadState('load'), page.click('#mfagate-verify-totp button.mfagate-submit')]);
  t.match(await text(page, '#mfagate-totp-code-error'), /The OTP is not right/, 'a wrong code: the error next to the field');
  await capture(t, page, 'rc-06-wrong-code-en-phone');

  await page.fill('#mfagate-totp-code', await phone.next());
  await Promise.all([page.waitForURL(/_task=mail/), page.click('#mfagate-verify-totp button.mfagate-submit')]);
  await page.waitForSelector('#messagestack .confirmation, #messagestack div');
  t.match(await text(page, '#messagestack'), new RegExp(`Multi-factor authentication passed\\. Mail programs on this network \\(${A.replace(/\./g, '\\.')}\\) can be used until`), 'the mailbox, with the notice');
  await screenshot(page, 'rc-07-passed-en-phone');
  t.ok((await imap(A)).ok, 'IMAP from A gets in');
  t.equal((await imap(B)).ok, false, 'IMAP from B is still refused');
  await page.context().close();
});

t.test('home B: a mailed code from the delivered message; then revoke A in Settings', async (t) => {
  const page = await at(B, 'en');
  await signIn(page);
  await page.waitForSelector('#mfagate-code');
  const seen = new Set(stack.messages('carol'));
  await Promise.all([page.waitForLoadState('load'), page.click('#mfagate-send button.mfagate-submit')]);
  await page.waitForSelector('#mfagate-email-code');
  t.match(await text(page, '#mfagate-email-sent'), new RegExp(`An OTP was sent to c\\*\\*\\*@${stack.domain}`), 'the page says where the code went');
  await capture(t, page, 'rc-08-code-page-mailed-en');
  const otp = await mailTo(/^OTP notification \(OTP発行のお知らせ\)$/, seen);
  await page.fill('#mfagate-email-code', codeIn(otp.text));
  await Promise.all([page.waitForURL(/_task=mail/), page.click('#mfagate-verify-email button.mfagate-submit')]);
  await page.waitForSelector('#messagelist', { state: 'attached' });
  t.match(await text(page, '#messagestack'), /Mail programs on this network \(127\.0\.0\.10\) can be used until/, 'the notice');
  t.ok((await imap(B)).ok, 'IMAP from B gets in');

  const s = await mfaSettings(page);
  const rows = await s.$$eval('#mfagate-status tbody tr', (trs) => trs.map((tr) => (tr.textContent ?? '').replace(/\s+/g, ' ')));
  t.equal(rows.length, 2, 'two rows in the status table (A and B)');
  t.ok(rows.some((r) => r.includes(`${B} (this network)`)), 'this network is marked');
  await capture(t, page, 'rc-09-status-table-en');
  await submit(s, `#mfagate-status tbody tr:has(td:text-is("${A}")) button.mfagate-submit`);
  t.match(await text(page, '#messagestack'), new RegExp(`MFA for ${A.replace(/\./g, '\\.')} was revoked`), 'revoked');
  t.equal(await s.$(`#mfagate-status tbody tr:has(td:text-is("${A}"))`), null, 'the row is gone');
  t.equal((await imap(A)).ok, false, 'IMAP from A is refused again');
  t.ok((await imap(B)).ok, 'B keeps its grant');
  await page.context().close();
});

t.test('Japanese: hanako registers the app in 個人環境の設定, then passes MFA from home', async (t) => {
  const page = await at(CAMPUS, 'ja');
  await signIn(page, 'hanako', USERS.hanako);
  await page.waitForSelector('#messagelist', { state: 'attached' });
  const s = await mfaSettings(page);
  t.match(await text(s, '#mfagate-state'), /^多要素認証は無効です。$/, 'the section in Japanese');
  await submit(s, '#mfagate-totp-begin button.mfagate-submit');
  await s.waitForSelector('#enrol-settings');
  const app = new Authenticator((await text(s, '#enrol-settings-key')).replace(/\s+/g, ''));
  await capture(t, page, 'rc-10-register-app-ja');
  await s.fill('#enrol-settings-code', await app.next());
  await submit(s, '#enrol-settings-form button.mfagate-submit');
  t.match(await text(s, '#mfagate-totp-state'), /^登録済み$/);
  await submit(s, '#mfagate-enable button.mfagate-submit');
  t.match(await text(s, '#mfagate-state'), /多要素認証は有効です/);
  await page.context().close();

  const home = await at(HOME_J, 'ja', { phone: true });
  await signIn(home, 'hanako', USERS.hanako);
  await home.waitForSelector('#mfagate-code');
  t.match(await text(home, '#mfagate-need'), new RegExp(`このネットワーク \\(${HOME_J.replace(/\./g, '\\.')}\\) からメールを使うには多要素認証が必要です`), 'the code page in Japanese');
  await capture(t, home, 'rc-11-code-page-ja-phone');
  await home.fill('#mfagate-totp-code', await app.next());
  await Promise.all([home.waitForURL(/_task=mail/), home.click('#mfagate-verify-totp button.mfagate-submit')]);
  await home.waitForSelector('#messagelist', { state: 'attached' });
  t.match(await text(home, '#messagestack'), new RegExp(`多要素認証に成功しました。このネットワーク \\(${HOME_J.replace(/\./g, '\\.')}\\) からのメールソフトの利用は \\d{4}-\\d\\d-\\d\\d \\d\\d:\\d\\d \\(JST\\) まで有効です。`), 'the notice in Japanese');
  await screenshot(home, 'rc-12-passed-ja-phone');
  const hanako = await imapLogin({ port: stack.imapPort, user: 'hanako', password: USERS.hanako, localAddress: HOME_J });
  t.ok(hanako.ok, 'her mail program from home gets in');
  await home.context().close();
});

t.test('home C: a backup code passes once; turning MFA off needs a code', async (t) => {
  const page = await at(C, 'en');
  await signIn(page);
  await page.waitForSelector('#mfagate-code');
  await page.click('#mfagate-backup summary');
  await page.fill('#mfagate-backup-code', backupCodes[0] ?? '');
  await Promise.all([page.waitForURL(/_task=mail/), page.click('#mfagate-verify-backup button.mfagate-submit')]);
  await page.waitForSelector('#messagelist', { state: 'attached' });
  t.ok((await imap(C)).ok, 'IMAP from C gets in');

  // Disabling asks for a code; a wrong one is refused next to the field; with the app's code it is done.
  const s = await mfaSettings(page);
  await submit(s, '#mfagate-disable button.mfagate-submit');
  await s.waitForSelector('#mfagate-confirm');
  t.match(await text(s, '#mfagate-state'), /enabled/, 'asked for a code: MFA is still on');
  await s.fill('#mfagate-confirm-code', '000000');
  await submit(s, '#mfagate-confirm-form button.mfagate-submit');
  t.match(await text(s, '#mfagate-confirm-code-error'), /The OTP is not right/, 'a wrong code: refused, next to the field');
  t.match(await text(s, '#mfagate-state'), /enabled/, 'MFA is still on');
  // A backup code is a proof too (and saves waiting for the app's next step).
  await s.selectOption('#mfagate-confirm-method', 'backup');
  await s.fill('#mfagate-confirm-code', backupCodes[1] ?? '');
  await submit(s, '#mfagate-confirm-form button.mfagate-submit');
  t.match(await text(s, '#mfagate-state'), /disabled/, 'with a code: MFA is off');

  // Removing the external address asks for a code too.
  await submit(s, '#mfagate-email-remove button.mfagate-submit');
  t.equal(await text(s, '#mfagate-confirm-what'), 'Remove the external address.');
  await s.selectOption('#mfagate-confirm-method', 'backup');
  await s.fill('#mfagate-confirm-code', backupCodes[2] ?? '');
  await submit(s, '#mfagate-confirm-form button.mfagate-submit');
  t.match(await text(s, '#mfagate-email-state'), /^Not registered$/, 'the address is removed');
  await page.context().close();

  // Back on, and the used backup code is refused at the next sign-in.
  const again = await mfaSettingsAt(CAMPUS);
  await submit(again.mainFrame(), '#mfagate-enable button.mfagate-submit');
  await again.context().close();
  const next = await at('127.0.0.13', 'en');
  await signIn(next);
  await next.waitForSelector('#mfagate-code');
  await next.click('#mfagate-backup summary');
  await next.fill('#mfagate-backup-code', backupCodes[0] ?? '');
  await Promise.all([next.waitForLoadState('load'), next.click('#mfagate-verify-backup button.mfagate-submit')]);
  t.match(await text(next, '#mfagate-backup-code-error'), /The OTP is not right/, 'the used backup code is refused');
  t.equal(await next.$('#messagelist'), null, 'no mailbox');
  await next.context().close();
});

/** Signed in from `ip` (which must need no code), on the mfagate section of Settings. */
async function mfaSettingsAt(ip: string): Promise<Page> {
  const page = await at(ip, 'en');
  await signIn(page);
  await page.waitForSelector('#messagelist', { state: 'attached' });
  await mfaSettings(page);
  return page;
}

t.test('no code, key or backup code in Roundcube\'s logs, its preferences or its sessions', async (t) => {
  const secrets = [...backupCodes, phone.secret];
  const db = new Database(path.join(rc.dir, 'roundcube.db'), { readonly: true, fileMustExist: true });
  t.teardown(() => db.close());
  const prefs = (db.prepare('SELECT preferences FROM users').all() as { preferences: string | null }[]).map((r) => r.preferences ?? '').join('\n');
  // Roundcube keeps session data base64-encoded; look at it both ways.
  const sessions = (db.prepare('SELECT vars FROM session').all() as { vars: string }[]).map((r) => `${r.vars}\n${Buffer.from(r.vars, 'base64').toString('utf8')}`).join('\n');
  t.match(sessions, /username\|s:\d+:"(alice|hanako)"/, 'the sessions were read (decoded)');
  const logs = rc.logs();
  t.ok(logs.includes('code-asked'), "the plugin's log is there");
  for (const secret of secrets) {
    t.notOk(prefs.includes(secret), `not in the preferences: ${secret.slice(0, 3)}...`);
    t.notOk(sessions.includes(secret), `not in the sessions: ${secret.slice(0, 3)}...`);
    t.notOk(logs.includes(secret), `not in the logs: ${secret.slice(0, 3)}...`);
  }
});
