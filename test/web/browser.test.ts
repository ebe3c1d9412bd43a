// The MFA web page in a real browser, end to end: Debian's Chromium (driven by playwright-core) against the real
// `mfagate serve` process, which checks passwords through a real Dovecot's auth socket, mails codes through a
// real Postfix, and answers that Dovecot's policy questions for real IMAP logins.
//
// The browser always connects from 127.0.0.1, which the config names as the trusted reverse proxy; each browser
// context sends X-Forwarded-For with the address it plays: 127.0.0.2 is the campus network, 127.0.0.9 and
// 127.0.0.10 are two homes outside. IMAP logins come from those very addresses.
//   campus (ja):  wrong password, right password, "MFA not needed here", register the app from the key the page
//                 shows, enable MFA, sign out.
//   home A (en):  IMAP refused; sign in, wrong code then right code; IMAP from A gets in, from B is refused;
//                 register the external address with the code from the delivered mail; backup codes.
//   home B (ja):  sign in, send an OTP by mail, enter the delivered code; IMAP from B gets in; revoke A's row in
//                 the status table, after which IMAP from A is refused; switch the language, which persists.
//   elsewhere:    disable MFA with a backup code (a used one is refused), and IMAP works from anywhere again.
// Every page is saved as a screenshot under test-artifacts/screenshots/.
import fs from 'node:fs';
import path from 'node:path';
import type { Page } from 'playwright-core';
import t, { type Test } from 'tap';
import { Authenticator, codeIn, decodeMail } from '../helpers/api.js';
import { type BrowserSession, PHONE, accessibilityViolations, launchChromium, newPage, screenshot } from '../helpers/browser.js';
import { imapLogin } from '../helpers/clients.js';
import { type DaemonProcess, spawnDaemon, tempDir } from '../helpers/daemon.js';
import { type MailStack, freePort, startStackForMfagate } from '../helpers/mailstack.js';

const CAMPUS = '127.0.0.2';
const A = '127.0.0.9';
const B = '127.0.0.10';
const C = '127.0.0.11';
const USERS = { alice: 'alice-pw', carol: 'carol-pw' };

const dir = tempDir('mfagate-web-e2e-');
const configFile = path.join(dir, 'mfagate.toml');
let daemon: DaemonProcess;
let stack: MailStack;
let browser: BrowserSession;
let base = '';
let phone: Authenticator;
/** The backup codes the page issued (codes[0] is used to pass MFA, codes[1] to disable it). */
let codes: string[] = [];

t.before(async () => {
  const webPort = await freePort();
  const started = await startStackForMfagate(USERS, 'web-e2e-key');
  stack = started.stack;
  const policyPort = started.policyPort;
  fs.writeFileSync(
    configFile,
    `[store]
path = "mfagate.db"
[networks]
trusted = ["${CAMPUS}/32"]
[dovecot]
listen = ["127.0.0.1:${policyPort}"]
api_key = "web-e2e-key"
[postfix]
listen = ["unix:policy.sock"]
[api]
listen = ["unix:api.sock"]
[web]
listen = ["127.0.0.1:${webPort}"]
base_path = "/mfa"
trusted_proxies = ["127.0.0.1"]
dovecot_auth_socket = "${path.join(stack.dir, 'run/auth-client')}"
secure_cookie = false
[totp]
issuer = "Mail Test"
[mail]
smtp = "smtp://127.0.0.1:${stack.smtpPort}"
from = "mfagate@${stack.domain}"
`,
  );
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

const imap = (from: string) => imapLogin({ port: stack.imapPort, user: 'alice', password: USERS.alice, localAddress: from });

/** A browser "at" an address: a fresh context whose requests the trusted proxy forwards for `ip`. */
function at(ip: string, lang: 'ja' | 'en', o: { phone?: boolean } = {}): Promise<Page> {
  return newPage(browser, { locale: lang, headers: { 'X-Forwarded-For': ip }, ...(o.phone ? { viewport: PHONE } : {}) });
}

const text = async (page: Page, selector: string) => ((await page.textContent(selector)) ?? '').replace(/\s+/g, ' ').trim();

/** Saves the page as a screenshot and checks it against WCAG 2.1 A/AA with axe-core. */
async function capture(t: Test, page: Page, name: string): Promise<void> {
  await screenshot(page, name);
  t.same(await accessibilityViolations(page), [], `${name}: no WCAG 2.1 A/AA violations found by axe-core`);
}

async function submit(page: Page, formSelector: string): Promise<void> {
  await Promise.all([page.waitForLoadState('load'), page.click(`${formSelector} button[type=submit]`)]);
}

async function signIn(page: Page, password = USERS.alice): Promise<void> {
  await page.goto(`${base}/`);
  await page.fill('#signin-user', 'alice');
  await page.fill('#signin-password', password);
  await submit(page, '#signin');
}

/** What carol's mailbox (alice's "private" address) holds now: the mails a later mailTo() does not count. */
const mailbox = () => new Set(stack.messages('carol'));

/** The first new message in carol's mailbox with this subject, decoded. */
async function mailTo(subject: RegExp, seen: Set<string>): Promise<{ subject: string; text: string }> {
  const raw = await stack.waitForMessage('carol', (m) => !seen.has(m) && subject.test(decodeMail(m).subject));
  return decodeMail(raw);
}

t.test('campus: sign in (wrong, then right password), register the app, enable MFA, sign out', async (t) => {
  const page = await at(CAMPUS, 'ja', { phone: true });
  await page.goto(`${base}/`);
  t.equal(await page.getAttribute('html', 'lang'), 'ja', 'Accept-Language ja: the page is in Japanese');
  t.equal(await text(page, 'h1'), 'サインイン');
  t.equal(await page.getAttribute('#signin-user', 'autocomplete'), 'username');
  t.equal(await page.textContent('label[for=signin-password]'), 'パスワード', 'the password field has its label');
  await capture(t, page, '01-signin-ja-phone');

  await signIn(page, 'not-the-password');
  t.match(await text(page, '#signin-password-error'), 'ID またはパスワードが正しくありません', 'a wrong password is refused by Dovecot, next to the field');
  t.equal(await page.getAttribute('#signin-password', 'aria-invalid'), 'true');
  t.equal(await page.inputValue('#signin-user'), 'alice', 'the ID is kept');
  t.equal(await page.inputValue('#signin-password'), '', 'the password is not sent back');
  await capture(t, page, '02-signin-wrong-password-ja-phone');

  await signIn(page);
  t.match(await text(page, '#network-status'), `このネットワーク (${CAMPUS}) は学内ネットワークまたは VPN です`, 'campus: MFA is not needed here');
  const cookies = await page.context().cookies();
  const session = cookies.find((c) => c.name === 'mfagate_session');
  t.ok(session?.httpOnly, 'the session cookie is HttpOnly');
  t.equal(session?.sameSite, 'Strict');
  t.equal(session?.path, '/mfa');
  await capture(t, page, '03-home-campus-ja-phone');

  await page.click('text=個人環境の設定');
  t.equal(await text(page, 'h1'), '個人環境の設定');
  t.equal(await text(page, '#app-state'), '未登録');
  t.match(await text(page, '#mfa-state'), '多要素認証は無効です');
  await submit(page, '#app-begin');
  t.equal(new URL(page.url()).pathname, '/mfa/settings/app', 'no secret in the URL');
  t.ok(await page.isVisible('.qr svg'), 'the QR code is drawn inline as SVG');
  const key = (await text(page, '#totp-key')).replace(/\s/g, '');
  t.match(key, /^[A-Z2-7]{16,}$/, 'the manual key is shown');
  t.equal(await page.getAttribute('#app-confirm-code', 'autocomplete'), 'one-time-code');
  t.equal(await page.getAttribute('#app-confirm-code', 'inputmode'), 'numeric');
  await capture(t, page, '04-register-app-ja-phone');

  phone = new Authenticator(key);
  await page.fill('#app-confirm-code', await phone.next());
  await submit(page, '#app-confirm');
  t.match(await text(page, '.notice.ok'), 'OTPアプリ認証を登録しました');
  t.equal(await text(page, '#app-state'), '登録済み');
  await submit(page, '#enable');
  t.match(await text(page, '#mfa-state'), '多要素認証は有効です');
  await capture(t, page, '05-settings-enabled-ja-phone');

  await submit(page, '#signout');
  t.equal(await text(page, 'h1'), 'サインイン', 'signed out: back at the sign-in page');
  t.match(await text(page, '.notice'), 'サインアウトしました');
  await page.goto(`${base}/settings`);
  t.equal(await text(page, 'h1'), 'サインイン', 'the settings need a new sign-in');
});

t.test('home A: IMAP is refused, MFA passed in the browser, then IMAP from A gets in and from B does not', async (t) => {
  t.notOk((await imap(A)).ok, 'before MFA: IMAP from A is refused');
  const page = await at(A, 'en', { phone: true });
  await signIn(page);
  t.equal(await page.getAttribute('html', 'lang'), 'en', 'Accept-Language en: the page is in English');
  t.match(await text(page, '#network-status'), `To use mail programs on this network (${A}), pass multi-factor authentication`);
  t.equal(await page.getAttribute('#verify-totp-code', 'autocomplete'), 'one-time-code');
  t.equal(await page.getAttribute('#verify-totp-code', 'inputmode'), 'numeric');
  await capture(t, page, '06-home-needs-mfa-en-phone');

  await page.fill('#verify-totp-code', '000000');
  await submit(page, '#verify-totp');
  t.match(await text(page, '#verify-totp-code-error'), 'The OTP is not right', 'a wrong code: the error is next to the field');
  await capture(t, page, '07-home-wrong-code-en-phone');

  await page.fill('#verify-totp-code', await phone.next());
  await submit(page, '#verify-totp');
  t.match(await text(page, '.notice.ok'), 'Multi-factor authentication passed');
  t.match(await text(page, '#network-status'), new RegExp(`Mail programs on this network \\(${A.replace(/\./g, '\\.')}\\) can be used until \\d{4}-\\d\\d-\\d\\d \\d\\d:\\d\\d \\(JST\\)`));
  await capture(t, page, '08-home-passed-en-phone');

  t.ok((await imap(A)).ok, 'after MFA in the browser: IMAP from A gets in');
  t.notOk((await imap(B)).ok, 'IMAP from B (no MFA there) is still refused');
});

t.test('home A: register the external address with the delivered code, then backup codes', async (t) => {
  const page = await at(A, 'en');
  await signIn(page);
  await page.goto(`${base}/settings`);
  const before = mailbox();
  await page.fill('#email-register-address', `carol@${stack.domain}`);
  // A factor is registered: the change needs its code.
  await page.selectOption('#email-register-method', 'totp');
  await page.fill('#email-register-code', await phone.next());
  await submit(page, '#email-register');
  t.equal(new URL(page.url()).pathname, '/mfa/settings/email');
  const mail = await mailTo(/外部メールアドレスの確認/, before);
  await capture(t, page, '09-confirm-address-en');
  await page.fill('#email-confirm-code', codeIn(mail.text));
  await submit(page, '#email-confirm');
  t.match(await text(page, '.notice.ok'), 'The external e-mail address is registered');
  t.match(await text(page, '#email-state'), /Registered: c\*+@mail\.test/, 'the address is shown masked');

  // Backup codes, proved by the app (the next code may be half a minute away: each time step works once).
  await page.selectOption('#backup-method', 'totp');
  await page.fill('#backup-code', await phone.next());
  await submit(page, '#backup');
  t.equal(new URL(page.url()).pathname, '/mfa/settings/backup');
  codes = (await page.locator('#backup-codes li').allTextContents()).map((s) => s.trim());
  t.equal(codes.length, 10, 'ten backup codes');
  t.match(codes[0] ?? '', /^[a-z2-9]{5}-[a-z2-9]{5}$/);
  await capture(t, page, '10-backup-codes-en');
  await page.goto(`${base}/settings/backup`);
  t.equal(new URL(page.url()).pathname, '/mfa/settings', 'the codes are shown once');
  t.match(await text(page, '#backup-state'), 'Unused codes: 10');
  await capture(t, page, '11-settings-en');

  // The last resort: a backup code passes MFA from yet another address.
  const other = await at(C, 'en');
  await signIn(other);
  await other.click('summary');
  await other.fill('#verify-backup-code', codes[0] ?? '');
  await submit(other, '#verify-backup');
  t.match(await text(other, '#network-status'), `Mail programs on this network (${C}) can be used until`);
});

t.test('home B: an OTP by mail, IMAP from B gets in; revoking A in the status table closes A; language persists', async (t) => {
  const page = await at(B, 'ja', { phone: true });
  await signIn(page);
  t.match(await text(page, '#network-status'), `このネットワーク (${B}) からメールソフトを使うには多要素認証が必要です`);
  const before = mailbox();
  await submit(page, '#send-code');
  t.ok(await page.isVisible('#verify-email-code'), 'the code field is there');
  t.match(await page.content(), 'OTP を送信しました', 'the page says the OTP was sent');
  const mail = await mailTo(/OTP/, before);
  t.match(mail.text, `要求元 IP アドレス: ${B}`, 'the mail names the address that asked');
  await page.fill('#verify-email-code', codeIn(mail.text));
  await submit(page, '#verify-email');
  t.match(await text(page, '#network-status'), new RegExp(`このネットワーク \\(${B.replace(/\./g, '\\.')}\\) からのメールソフトの利用は \\d{4}-\\d\\d-\\d\\d \\d\\d:\\d\\d \\(JST\\) まで有効です`));
  await capture(t, page, '12-home-passed-by-mail-ja-phone');
  t.ok((await imap(B)).ok, 'IMAP from B now gets in');
  t.ok((await imap(A)).ok, 'A still gets in');

  await page.goto(`${base}/settings`);
  const rowA = page.locator(`tr:has(td:text-is("${A}"))`);
  t.equal(await rowA.count(), 1, 'A has a row in the status table');
  t.match(await text(page, `tr:has(td:has-text("${B}"))`), 'このネットワーク', 'the row of this network is marked');
  await capture(t, page, '13-status-table-ja-phone');
  await Promise.all([page.waitForLoadState('load'), rowA.locator('button').click()]);
  t.match(await text(page, '.notice.ok'), `${A} の認証を取り消しました`);
  t.equal(await page.locator(`tr:has(td:text-is("${A}"))`).count(), 0, 'the row is gone');
  t.notOk((await imap(A)).ok, 'after the revoke: IMAP from A is refused');
  t.ok((await imap(B)).ok, 'B is untouched');

  await page.click('a[hreflang=en]');
  t.equal(await page.getAttribute('html', 'lang'), 'en', 'the switch turns the page to English');
  t.equal(await text(page, 'h1'), 'Settings');
  await page.goto(`${base}/`);
  t.equal(await page.getAttribute('html', 'lang'), 'en', 'the choice persists over the browser\'s Accept-Language (ja)');
  await capture(t, page, '14-home-en-after-switch-phone');
  await page.click('a[hreflang=ja]');
  t.equal(await page.getAttribute('html', 'lang'), 'ja', 'and back to Japanese');
});

t.test('disable MFA with a backup code: mail programs work from any address again', async (t) => {
  const D = '127.0.0.12';
  t.notOk((await imap(D)).ok, 'MFA enabled: IMAP from a new address is refused');
  const page = await at(D, 'en');
  await signIn(page);
  await page.goto(`${base}/settings`);
  await page.click('summary:has-text("Disable multi-factor authentication")');
  await page.selectOption('#disable-method', 'backup');
  await page.fill('#disable-code', codes[0] ?? '');
  await submit(page, '#disable');
  t.match(await text(page, '#disable-code-error'), 'The OTP is not right', 'a used backup code does not work twice');
  await page.selectOption('#disable-method', 'backup');
  await page.fill('#disable-code', codes[1] ?? '');
  await submit(page, '#disable');
  t.match(await text(page, '.notice.ok'), 'Multi-factor authentication is disabled');
  t.match(await text(page, '#mfa-state'), 'Multi-factor authentication is disabled');
  await capture(t, page, '15-settings-disabled-en');
  t.ok((await imap(D)).ok, 'MFA disabled: IMAP from the new address gets in');
});
