// App passcodes on the MFA page in a real browser, end to end: Debian's Chromium against the real `mfagate
// serve`, which checks the page's passwords through a real Dovecot whose passdb chain starts with mfagate's
// Lua passdb (the files `mfagate setup dovecot` prints, in conf.d). A student at home (127.0.0.9, no grant)
// makes a passcode named "iPhone" on a phone-sized page, types it into a mail program (a real IMAP login from
// that address, and from another), sees its last use, removes it, and the next login fails.
import fs from 'node:fs';
import path from 'node:path';
import type { Page } from 'playwright-core';
import t, { type Test } from 'tap';
import { Authenticator } from '../helpers/api.js';
import { type BrowserSession, PHONE, accessibilityViolations, launchChromium, newPage, screenshot } from '../helpers/browser.js';
import { imapLogin } from '../helpers/clients.js';
import { type DaemonProcess, cli, spawnDaemon, tempDir } from '../helpers/daemon.js';
import { type MailStack, freePort, startMailStack } from '../helpers/mailstack.js';

const HOME = '127.0.0.9';
const MOBILE = '127.0.0.12';
const USERS = { alice: 'alice-pw' };

const dir = tempDir('mfagate-web-passcodes-');
const configFile = path.join(dir, 'mfagate.toml');
let daemon: DaemonProcess;
let stack: MailStack;
let browser: BrowserSession;
let base = '';

function config(policyPort: number, webPort: number, authSocket: string): string {
  return `[store]
path = "mfagate.db"
[networks]
trusted = ["127.0.0.2/32"]
[dovecot]
listen = ["127.0.0.1:${policyPort}"]
api_key = "web-passcode-key"
[postfix]
listen = ["unix:policy.sock"]
[api]
listen = ["unix:api.sock"]
[web]
listen = ["127.0.0.1:${webPort}"]
base_path = "/mfa"
trusted_proxies = ["127.0.0.1"]
dovecot_auth_socket = "${authSocket}"
secure_cookie = false
[app_passcodes]
enabled = true
`;
}

t.before(async () => {
  if (!fs.existsSync('/usr/lib/dovecot/modules/auth/libauthdb_lua.so')) throw new Error("Dovecot's Lua passdb is missing: apt-get install dovecot-auth-lua");
  const [policyPort, webPort] = [await freePort(), await freePort()];
  // The Dovecot files come from the configuration (the web page's socket is not in them): print them first.
  fs.writeFileSync(configFile, config(policyPort, webPort, '/nonexistent'));
  const policy = cli(['--config', configFile, 'setup', 'dovecot']);
  const passdb = cli(['--config', configFile, 'setup', 'dovecot', '--part', 'passdb']);
  if (policy.code !== 0 || passdb.code !== 0) throw new Error(`setup dovecot failed: ${policy.stderr}${passdb.stderr}`);
  stack = await startMailStack({ users: USERS, dovecotConfD: { '05-mfagate-passcode.conf': passdb.stdout, '95-mfagate.conf': policy.stdout } });
  fs.writeFileSync(configFile, config(policyPort, webPort, path.join(stack.dir, 'run/auth-client')));
  daemon = spawnDaemon(configFile, ['--create-store']);
  await daemon.ready;
  base = `http://127.0.0.1:${webPort}/mfa`;
  browser = await launchChromium();
});

t.teardown(async () => {
  await browser?.close();
  await stack?.stop();
  await daemon?.stop();
  fs.rmSync(dir, { recursive: true, force: true });
});

const imap = (password: string, from = HOME) => imapLogin({ port: stack.imapPort, user: 'alice', password, localAddress: from });
const text = async (page: Page, selector: string) => ((await page.textContent(selector)) ?? '').replace(/\s+/g, ' ').trim();

async function submit(page: Page, selector: string): Promise<void> {
  await Promise.all([page.waitForLoadState('load'), page.click(selector)]);
}

async function capture(t: Test, page: Page, name: string): Promise<void> {
  await screenshot(page, name);
  t.same(await accessibilityViolations(page), [], `${name}: no WCAG 2.1 A/AA violations found by axe-core`);
}

t.test('make "iPhone" at home, use it from two networks, remove it', async (t) => {
  const page = await newPage(browser, { locale: 'ja', headers: { 'X-Forwarded-For': HOME }, viewport: PHONE });
  await page.goto(`${base}/`);
  await page.fill('#signin-user', 'alice');
  await page.fill('#signin-password', USERS.alice);
  await submit(page, '#signin button[type=submit]');
  t.ok(await page.isVisible('#network-status'), 'signed in with the site password: Dovecot passed it on from the passcode passdb to its own');

  // The app, registered from home (first_registration allows it by default), is the factor a passcode needs.
  await page.goto(`${base}/settings`);
  t.equal(await text(page, '#h-passcodes'), 'アプリ用パスコード');
  t.ok(await page.isVisible('text=先に OTPアプリ認証か外部メール認証を登録してください'), 'a factor first');
  await submit(page, '#app-begin button[type=submit]');
  const app = new Authenticator((await text(page, '#totp-key')).replace(/\s/g, ''));
  await page.fill('#app-confirm-code', await app.next());
  await submit(page, '#app-confirm button[type=submit]');
  await submit(page, '#enable button[type=submit]');
  t.match(await text(page, '#mfa-state'), '多要素認証は有効です');

  await page.click('summary:has-text("新しいアプリ用パスコードを作る")');
  await page.fill('#passcode-add-name', 'iPhone');
  t.ok(await page.isChecked('input[name=protocol][value=imap]'), 'IMAP ticked');
  await page.selectOption('#passcode-add-method', 'totp');
  await page.fill('#passcode-add-code', await app.next());
  await capture(t, page, 'passcode-01-create-ja-phone');
  await submit(page, '#passcode-add button[type=submit]');

  t.equal(new URL(page.url()).pathname, '/mfa/settings/passcode', 'no passcode in the URL');
  t.equal(await text(page, 'h1'), 'アプリ用パスコード');
  const passcode = await text(page, '#passcode');
  t.match(passcode, /^[a-z]{4} [a-z]{4} [a-z]{4} [a-z]{4}$/, 'shown in four groups of four');
  t.ok(await page.isVisible('text=iPhone / iPad (メール)'), 'how to type it into iPhone Mail');
  await capture(t, page, 'passcode-02-shown-once-ja-phone');
  await page.reload();
  t.equal(new URL(page.url()).pathname, '/mfa/settings', 'reloading: back at Settings');
  t.notOk((await page.content()).includes(passcode), 'and it is not shown again');

  t.notOk((await imap(USERS.alice)).ok, 'the site password from home: still refused (no grant)');
  const i = await imap(passcode);
  t.ok(i.ok, 'the passcode as shown, with its spaces, from home', { transcript: i.transcript.join('\n') });
  t.ok((await imap(passcode.replace(/ /g, ''), MOBILE)).ok, 'and from another network (mobile data)');

  let row = '';
  for (const deadline = Date.now() + 5000; Date.now() < deadline; await new Promise((r) => setTimeout(r, 200))) {
    await page.goto(`${base}/settings`);
    row = await text(page, 'tr[data-passcode]');
    if (row.includes(MOBILE)) break;
  }
  t.match(row, /iPhone/, 'listed');
  t.match(row, `${MOBILE}, imap`, 'with its last use');
  await capture(t, page, 'passcode-03-listed-ja-phone');

  await submit(page, 'tr[data-passcode] button[type=submit]');
  t.match(await text(page, '.notice.ok'), 'アプリ用パスコード「iPhone」を削除しました');
  t.notOk(await page.isVisible('tr[data-passcode]'), 'gone from the list');
  t.notOk((await imap(passcode)).ok, 'the next login with it fails');
  t.notOk(daemon.output().includes(passcode.replace(/ /g, '')), 'the passcode is not in the daemon log');
  t.notOk(stack.dovecotLog().includes(passcode.replace(/ /g, '')), "nor in Dovecot's");
});
