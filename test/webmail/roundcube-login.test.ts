// The mfagate plugin's sign-in, against a real Roundcube (Debian's, under php -S), a real Dovecot asking the real
// `mfagate serve` about every login, and real IMAP clients. Driven with plain HTTP and a cookie jar, so every
// request an attacker could send can be sent (the browser walk is in roundcube-browser.test.ts).
//   - from a trusted address: the password opens the mailbox;
//   - from outside, for a user with MFA: a wrong password asks mfagate nothing; the right one gives the code
//     page, and until a code passes nothing of the mailbox answers (the mailbox, AJAX with a replayed request
//     token, settings, a download); a wrong code, then the right one opens the mailbox with the notice; then
//     IMAP from that address gets in and from another is refused;
//   - the waiting sign-in ends when the browser's address changes, after too many wrong codes, and after its time;
//   - "Alice@mail.test" is asked for a code as "alice" is; Dovecot sees the browser's address (x-originating-ip);
//   - mfagate stopped: nobody is signed in, and the login page says why.
import Database from 'better-sqlite3';
import t from 'tap';
import { Authenticator } from '../helpers/api.js';
import { imapLogin } from '../helpers/clients.js';
import { ROOT, tempDir } from '../helpers/daemon.js';
import { type MailStack, freePort, startMailStack } from '../helpers/mailstack.js';
import { type Answer, type Roundcube, RoundcubeClient, loginToken, startRoundcube } from '../helpers/roundcube.js';
import { POLICY_KEY, type Served, serve } from '../helpers/served.js';
import fs from 'node:fs';
import path from 'node:path';

const CAMPUS = '127.0.0.2';
const A = '127.0.0.9';
const B = '127.0.0.10';
const C = '127.0.0.11';
const USERS = { alice: 'alice-pw', bob: 'bob-pw', dave: 'dave-pw' };
const TOKEN = 'roundcube-api-token-0123456789abcdef';

let stack: MailStack;
let d: Served;
let rc: Roundcube;
let phone: Authenticator;
let apiPort = 0;

async function roundcube(config: Record<string, unknown> = {}): Promise<Roundcube> {
  return startRoundcube({
    imapPort: stack.imapPort,
    smtpPort: stack.smtpPort,
    plugins: ['mfagate'],
    pluginDirs: { mfagate: path.join(ROOT, 'webmail/roundcube/mfagate') },
    config: { mfagate_api_socket: d.apiSocket, login_rate_limit: 0, log_logins: true, ...config },
  });
}

t.before(async () => {
  const policyPort = await freePort();
  stack = await startMailStack({
    users: USERS,
    policyUrl: `http://127.0.0.1:${policyPort}/`,
    policyApiHeader: `X-API-Key: ${POLICY_KEY}`,
    policyAttributes: 'recommended',
    // Roundcube connects from 127.0.0.1 and forwards the browser's address (IMAP ID x-originating-ip), which
    // Dovecot believes from trusted networks only. %Ln: "alice@mail.test" is alice.
    dovecotExtra: 'login_trusted_networks = 127.0.0.1\nauth_username_format = %Ln',
  });
  // The API on its socket and on a loopback port with a bearer token, for a webmail that cannot use sockets.
  const dir = tempDir('mfagate-roundcube-');
  fs.writeFileSync(path.join(dir, 'token'), `${TOKEN}\n`, { mode: 0o600 });
  apiPort = await freePort();
  d = await serve({
    dir,
    dovecotPort: policyPort,
    toml:
      `[networks]\ntrusted = ["${CAMPUS}/32"]\nwebmail = ["127.0.0.1/32"]\n[users]\nstrip_realms = ["mail.test"]\n` +
      `[api]\nlisten = ["unix:${path.join(dir, 'api.sock')}", "127.0.0.1:${apiPort}"]\ntoken_file = "token"\n`,
  });
  rc = await roundcube();
  // alice has the app and MFA on (registered through the API, as Settings would).
  const begin = await d.api.post('/v1/users/alice/totp', { ip: CAMPUS });
  phone = new Authenticator(begin.json.secret as string);
  t.equal((await d.api.post('/v1/users/alice/totp/confirm', { ip: CAMPUS, code: await phone.next() })).status, 200);
  t.equal((await d.api.put('/v1/users/alice/mfa', { ip: CAMPUS })).status, 200);
});

t.teardown(async () => {
  await Promise.allSettled([rc?.stop(), d?.close()]);
  await stack?.stop();
});

/** A browser at `ip`: it reaches Roundcube through the trusted proxy (127.0.0.1) with X-Forwarded-For. */
class Browser extends RoundcubeClient {
  constructor(
    readonly ip: string,
    readonly server: Roundcube = rc,
  ) {
    super(server.url);
  }

  get(target: string, headers: Record<string, string> = {}): Promise<Answer> {
    return this.request('GET', target, { headers: { 'X-Forwarded-For': this.ip, ...headers } });
  }

  post(target: string, form: Record<string, string>, headers: Record<string, string> = {}): Promise<Answer> {
    return this.request('POST', target, { form, headers: { 'X-Forwarded-For': this.ip, ...headers } });
  }

  /** The login form, then the password: returns the POST's answer. */
  async logIn(user: string, pass: string): Promise<Answer> {
    const page = await this.get('/');
    return this.post('/?_task=login', { _task: 'login', _action: 'login', _token: loginToken(page.body), _user: user, _pass: pass, _timezone: 'UTC' });
  }

  /** Follows one redirect. */
  follow(r: Answer): Promise<Answer> {
    return this.get(new URL(r.headers.location ?? '/', this.server.url).href);
  }
}

const isMailbox = (r: Answer) => /<body class="task-mail/.test(r.body) && /id="messagelist"/.test(r.body);
const isCodePage = (r: Answer) => /id="mfagate-code"/.test(r.body);
const isLoginPage = (r: Answer) => /name="_pass"/.test(r.body);
const apiCalls = () => d.logs().filter((l) => l['event'] === 'api').length;
/** The code page's form for a factor, filled: its own hidden fields and request token, and the code. */
function codeForm(page: Answer, formId: string, code: string): Record<string, string> {
  const form = new RegExp(`<form id="${formId}"[^>]*>([\\s\\S]*?)</form>`).exec(page.body)?.[1];
  if (!form) throw new Error(`no form ${formId} on the page:\n${page.body.slice(0, 3000)}`);
  const fields: Record<string, string> = {};
  for (const m of form.matchAll(/<input type="hidden" name="([^"]+)" value="([^"]*)"/g)) fields[m[1] ?? ''] = m[2] ?? '';
  return { ...fields, _code: code };
}
const imap = (from: string, user = 'alice') => imapLogin({ port: stack.imapPort, user, password: USERS[user as keyof typeof USERS], localAddress: from });

t.test('from a trusted address the password opens the mailbox', async (t) => {
  const b = new Browser(CAMPUS);
  const r = await b.logIn('alice', USERS.alice);
  t.equal(r.status, 302);
  t.match(r.headers.location ?? '', /_task=mail/, 'straight to the mailbox');
  t.ok(isMailbox(await b.follow(r)), 'the mailbox, no code asked');
  const line = await d.waitForLog((l) => l['event'] === 'api' && l['route'] === 'GET /v1/users/{user}/status' && l['ip'] === CAMPUS);
  t.equal(line['user'], 'alice');
});

t.test('from outside: no API call for a wrong password; the right one gives the code page and nothing else', async (t) => {
  t.equal((await imap(A)).ok, false, 'before: IMAP from A is refused');
  const b = new Browser(A);
  const before = apiCalls();
  const wrong = await b.logIn('alice', 'wrong-pw');
  t.equal(wrong.status, 401, 'a wrong password is refused by Roundcube');
  t.ok(isLoginPage(wrong));
  await new Promise((r) => setTimeout(r, 300));
  t.equal(apiCalls(), before, 'and mfagate was never asked (no mail sent, no factor failure counted)');

  const right = await b.logIn('alice', USERS.alice);
  t.equal(right.status, 302);
  t.match(right.headers.location ?? '', /_task=login&_action=plugin\.mfagate/, 'to the code page');
  const page = await b.follow(right);
  t.ok(isCodePage(page), 'the code page');
  t.match(page.body, new RegExp(`this network \\(${A.replace(/\./g, '\\.')}\\)`), 'naming the address');
  t.match(page.body, /<input[^>]+id="mfagate-totp-code"[^>]+autocomplete="one-time-code"[^>]+inputmode="numeric"/, 'a code field for phones');
  t.match(page.body, /<label for="mfagate-totp-code">/, 'with a label');
  const token = /"request_token":"([^"]+)"/.exec(page.body)?.[1] ?? '';
  t.ok(token, 'the page has a request token');

  // Everything the session could do, tried while the code is pending: none of it is the mailbox.
  for (const target of ['/?_task=mail', '/?_task=mail&_mbox=INBOX', '/?_task=settings', '/?_task=mail&_action=compose', '/?_task=addressbook']) {
    const r = await b.get(target);
    t.notOk(isMailbox(r), `${target}: not the mailbox`);
    t.ok(isCodePage(r) || isLoginPage(r), `${target}: the code page or the login page`);
  }
  const ajax = await b.get('/?_task=mail&_action=list&_mbox=INBOX&_remote=1', { 'X-Roundcube-Request': token });
  t.notMatch(ajax.body, /add_message_row|"set_message_count"|messagelist/, 'AJAX with the replayed request token: no mail');
  t.match(ajax.body, /session_error/, 'but a session error');
  const refresh = await b.post('/?_task=mail&_action=refresh', { _remote: '1', _token: token }, { 'X-Roundcube-Request': token });
  t.match(refresh.body, /session_error/, 'a posted AJAX action: a session error');
  const download = await b.get('/?_task=mail&_action=get&_uid=1&_mbox=INBOX&_part=1');
  t.notOk(isMailbox(download) || /Content-Disposition/i.test(JSON.stringify(download.headers)), 'no download');

  const bad = await b.post('/?_task=login&_action=plugin.mfagate', codeForm(page, 'mfagate-verify-totp', '000000'));
  t.equal(bad.status, 200);
  t.ok(isCodePage(bad), 'a wrong code: the code page again');
  t.match(bad.body, /<div id="mfagate-totp-code-error" class="mfagate-error" role="alert">The OTP is not right/, 'with the error next to the field');
  t.match(bad.body, /<input[^>]+id="mfagate-totp-code"[^>]+aria-invalid="true"[^>]+aria-describedby="mfagate-totp-code-error"|aria-describedby="mfagate-totp-code-error"[^>]*aria-invalid="true"/, 'which points at it');

  const good = await b.post('/?_task=login&_action=plugin.mfagate', codeForm(bad, 'mfagate-verify-totp', await phone.next()));
  t.equal(good.status, 302, good.body.slice(0, 1000));
  t.match(good.headers.location ?? '', /_task=mail/, 'to the mailbox');
  const mailbox = await b.follow(good);
  t.ok(isMailbox(mailbox), 'the mailbox');
  t.match(mailbox.body, new RegExp(`Multi-factor authentication passed\\. Mail programs on this network \\(${A.replace(/\./g, '\\.')}\\) can be used until \\d{4}-\\d\\d-\\d\\d \\d\\d:\\d\\d \\(JST\\)`), 'with the notice');
  t.notMatch(mailbox.body, /mfagate-code/, 'and no code page');

  t.ok((await imap(A)).ok, 'IMAP from A gets in now');
  t.equal((await imap(B)).ok, false, 'from B it is still refused');
  const passed = await d.waitForLog((l) => l['event'] === 'mfa-passed' && l['ip'] === A);
  t.equal(passed['method'], 'totp');
});

t.test("Dovecot sees the browser's address; the webmail's own IMAP login is let in by the webmail rule", async (t) => {
  t.match(stack.dovecotLog(), new RegExp(`imap-login: Info: Login: user=<alice>, method=PLAIN, rip=${A.replace(/\./g, '\\.')}, lip=127\\.0\\.0\\.1`), 'rip is the browser');
  const line = await d.waitForLog((l) => l['event'] === 'decision' && l['ip'] === A && l['real_ip'] === '127.0.0.1');
  t.match(line, { user: 'alice', result: 'allow', rule: 'webmail-host' });
});

t.test('the waiting sign-in is bound to the address, ends after too many wrong codes, and after its time', async (t) => {
  // The address changes between the password and the code.
  const b = new Browser(B);
  const page = await b.follow(await b.logIn('alice', USERS.alice));
  t.ok(isCodePage(page));
  const moved = new Browser(C);
  for (const [k, v] of b.cookies) moved.cookies.set(k, v);
  const r = await moved.post('/?_task=login&_action=plugin.mfagate', codeForm(page, 'mfagate-verify-totp', phone.peek()));
  t.ok(isLoginPage(r), 'a code from another address: the login page');
  t.match(r.body, /Your network changed while entering the OTP/, 'saying why');
  t.equal((await imap(C)).ok, false, 'and no grant for C');
  t.notOk(isCodePage(await b.get('/?_task=login&_action=plugin.mfagate')), 'the waiting sign-in is gone for B too');

  // Too many wrong codes.
  const short = await roundcube({ mfagate_max_failures: 2 });
  t.teardown(() => short.stop());
  const c = new Browser(B, short);
  let p = await c.follow(await c.logIn('alice', USERS.alice));
  p = await c.post('/?_task=login&_action=plugin.mfagate', codeForm(p, 'mfagate-verify-totp', '111111'));
  t.ok(isCodePage(p), 'one wrong code: again');
  p = await c.post('/?_task=login&_action=plugin.mfagate', codeForm(p, 'mfagate-verify-totp', '222222'));
  t.ok(isLoginPage(p), 'the second: the login page');
  t.match(p.body, /Too many wrong OTPs\. Sign in again\./);

  // Its time.
  const brief = await roundcube({ mfagate_pending_ttl: 1 });
  t.teardown(() => brief.stop());
  const e = new Browser(B, brief);
  const q = await e.follow(await e.logIn('alice', USERS.alice));
  t.ok(isCodePage(q));
  await new Promise((r) => setTimeout(r, 2100));
  const late = await e.post('/?_task=login&_action=plugin.mfagate', codeForm(q, 'mfagate-verify-totp', phone.peek()));
  t.ok(isLoginPage(late), 'a code after the time: the login page');
  t.match(late.body, /The time for entering the OTP ran out/);
  t.equal((await imap(B)).ok, false, 'and no grant for B');
});

t.test('"Alice@mail.test" is asked for a code as "alice" is; a user without MFA is not', async (t) => {
  const b = new Browser(B);
  const r = await b.logIn('Alice@mail.test', USERS.alice);
  t.match(r.headers.location ?? '', /_action=plugin\.mfagate/, 'the code page for Alice@mail.test');
  const bob = new Browser(B);
  const m = await bob.logIn('bob', USERS.bob);
  t.match(m.headers.location ?? '', /_task=mail/, 'bob (no MFA) goes straight to his mailbox');
});

t.test('a lock in mfagate (423) says when to try again', async (t) => {
  // dave has the app and MFA on; five wrong codes elsewhere lock him ([lockout], counted by mfagate).
  const begin = await d.api.post('/v1/users/dave/totp', { ip: CAMPUS });
  const app = new Authenticator(begin.json.secret as string);
  t.equal((await d.api.post('/v1/users/dave/totp/confirm', { ip: CAMPUS, code: await app.next() })).status, 200);
  t.equal((await d.api.put('/v1/users/dave/mfa', { ip: CAMPUS })).status, 200);
  for (let i = 0; i < 5; i++) await d.api.post('/v1/users/dave/verify', { ip: '198.51.100.20', factor: { method: 'totp', code: '000000' } });
  const b = new Browser(B);
  const page = await b.follow(await b.logIn('dave', USERS.dave));
  const r = await b.post('/?_task=login&_action=plugin.mfagate', codeForm(page, 'mfagate-verify-totp', app.peek()));
  t.ok(isCodePage(r), 'the code page');
  t.match(r.body, /<div id="mfagate-totp-code-error" class="mfagate-error" role="alert">Too many failed attempts: MFA is locked for a while\. Try again in 15 min\./, 'the lock and how long it lasts, next to the field');
});

t.test('the API over loopback TCP with the bearer token file', async (t) => {
  const tokenFile = path.join(d.dir, 'token');
  const tcp = await roundcube({ mfagate_api_url: `http://127.0.0.1:${apiPort}`, mfagate_api_token_file: tokenFile, mfagate_api_socket: path.join(d.dir, 'not-used.sock') });
  t.teardown(() => tcp.stop());
  const b = new Browser(C, tcp);
  const r = await b.logIn('alice', USERS.alice);
  t.match(r.headers.location ?? '', /_action=plugin\.mfagate/, 'the code page: mfagate answered over TCP');
  const line = await d.waitForLog((l) => l['event'] === 'api' && l['ip'] === C && l['status'] === 200);
  t.equal(line['user'], 'alice');

  const wrongToken = path.join(d.dir, 'wrong-token');
  fs.writeFileSync(wrongToken, 'not-the-token-at-all\n');
  const bad = await roundcube({ mfagate_api_url: `http://127.0.0.1:${apiPort}`, mfagate_api_token_file: wrongToken });
  t.teardown(() => bad.stop());
  const e = new Browser(CAMPUS, bad);
  const refused = await e.logIn('bob', USERS.bob);
  t.ok(isLoginPage(refused), 'a wrong token: nobody is signed in');
  t.match(refused.body, /Multi-factor authentication cannot be checked right now/, 'saying why');
});

t.test('the store cannot be written: the code page says so in words, and nothing was changed', async (t) => {
  // Another process holds the store's write lock longer than the daemon waits for it (5 s). The plugin waits
  // longer than that here, so that it hears mfagate's answer rather than giving up first.
  const patient = await roundcube({ mfagate_api_timeout: 15 });
  t.teardown(() => patient.stop());
  const b = new Browser(C, patient);
  const page = await b.follow(await b.logIn('alice', USERS.alice));
  t.ok(isCodePage(page), 'the code page');
  const holder = new Database(path.join(d.dir, 'state/mfagate.db'));
  holder.exec('BEGIN EXCLUSIVE');
  let answer: Answer;
  let meanwhile: { ok: boolean; ms: number };
  try {
    const code = await phone.next();
    [answer, meanwhile] = await Promise.all([
      b.post('/?_task=login&_action=plugin.mfagate', codeForm(page, 'mfagate-verify-totp', code)),
      // While the daemon waits for the lock, it goes on deciding: a login from campus is answered at once.
      (async () => {
        await new Promise((r) => setTimeout(r, 1000));
        const started = performance.now();
        const r = await imapLogin({ port: stack.imapPort, user: 'bob', password: USERS.bob, localAddress: CAMPUS });
        return { ok: r.ok, ms: performance.now() - started };
      })(),
    ]);
  } finally {
    holder.exec('ROLLBACK');
    holder.close();
  }
  t.ok(meanwhile.ok, `while mfagate waited for the store, a login from campus got in (${Math.round(meanwhile.ms)} ms)`);
  t.ok(meanwhile.ms < 2000, 'without waiting for the store (Dovecot gives the policy 2 s)');
  t.ok(isCodePage(answer), 'the code page again, not the mailbox');
  t.match(answer.body, /Nothing can be saved right now: the MFA service cannot reach its database\. Nothing was changed/, 'saying nothing could be saved, and nothing changed');
  const said = await d.waitForLog((l) => l['event'] === 'api' && l['error'] === 'store-unavailable');
  t.equal(said['status'], 503, 'mfagate answered 503 store-unavailable');
  t.equal((await imap(C)).ok, false, 'IMAP from that address is still refused: no grant was made');
});

t.test('mfagate unreachable or stopped: nobody is signed in, and the login page says why', async (t) => {
  // The API cannot be reached (a wrong socket, the daemon not started yet) while Dovecot still takes logins.
  const lost = await roundcube({ mfagate_api_socket: path.join(d.dir, 'no-such.sock') });
  t.teardown(() => lost.stop());
  const b = new Browser(CAMPUS, lost);
  const r = await b.logIn('bob', USERS.bob);
  t.equal(r.status, 200, 'no redirect to the mailbox');
  t.ok(isLoginPage(r), 'the login page');
  t.match(r.body, /Multi-factor authentication cannot be checked right now, so the webmail cannot be opened/, 'with the reason');
  t.notOk(isMailbox(await b.get('/?_task=mail')), 'and no mailbox afterwards');
  t.match(lost.logs(), /login-refused user="bob".*mfagate unavailable/, "Roundcube's mfagate log says so");

  // The daemon stopped: Dovecot (auth_policy_reject_on_fail = yes) already refuses the password.
  await d.daemon.stop();
  const c = new Browser(CAMPUS);
  const s = await c.logIn('bob', USERS.bob);
  t.equal(s.status, 401, 'the login fails');
  t.notOk(isMailbox(await c.get('/?_task=mail')), 'no mailbox');
  await d.restart();
});
