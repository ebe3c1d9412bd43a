// End to end: app passcodes through a real Dovecot 2.3 with Debian's dovecot-auth-lua and a real Postfix 3.7,
// configured with exactly what `mfagate setup dovecot` and `mfagate setup postfix` print (saved as conf.d files
// laid out as Debian's Dovecot has them: 05-mfagate-passcode.conf before the site's passdb in 10-auth.conf,
// 95-mfagate.conf after). Clients from distinct loopback addresses:
//   127.0.0.2  campus (trusted)   127.0.0.3  the webmail host   127.0.0.9  outside (no grant, ever)
import fs from 'node:fs';
import path from 'node:path';
import t, { type Test } from 'tap';
import { type LoginResult, imapLogin, pop3Login, smtpSubmit } from '../helpers/clients.js';
import { type DaemonProcess, ROOT, cli, spawnDaemon, tempDir } from '../helpers/daemon.js';
import { type MailStack, freePort, startMailStack } from '../helpers/mailstack.js';

const CAMPUS = '127.0.0.2';
const WEBMAIL = '127.0.0.3';
const OUTSIDE = '127.0.0.9';
const USERS = { alice: 'alice-site-pw', bob: 'bob-site-pw' };
const API_KEY = 'passcode-e2e-key-5f0c2a';
const MFA_MESSAGE = '[AUTHENTICATIONFAILED] MFA required: sign in to webmail from this network, then retry';

const dir = tempDir('mfagate-passcodes-');
fs.chmodSync(dir, 0o711);
const configFile = path.join(dir, 'mfagate.toml');
const policySocket = path.join(dir, 'policy.sock');
let daemon: DaemonProcess;
let stack: MailStack;
/** What `setup dovecot` printed, as saved into the stack's conf.d. */
const confD: Record<string, string> = {};

const mfagate = (...args: string[]) => cli(['--config', configFile, ...args]);
/** `passcodes add --json` for alice: the passcode as shown ("abcd efgh jkmn pqrs") and its id. */
function addPasscode(t: Test, ...args: string[]): { id: number; passcode: string } {
  const r = mfagate('passcodes', 'add', '--user', 'alice', '--json', ...args);
  t.equal(r.code, 0, `passcodes add ${args.join(' ')}: ${r.stderr}`);
  return JSON.parse(r.stdout) as { id: number; passcode: string };
}

const imap = (password: string, from = OUTSIDE, user = 'alice') => imapLogin({ port: stack.imapPort, user, password, localAddress: from });
const pop3 = (password: string, from = OUTSIDE, user = 'alice') => pop3Login({ port: stack.pop3Port, user, password, localAddress: from });
const submit = (password: string, from = OUTSIDE, user = 'alice') =>
  smtpSubmit({ port: stack.smtpPort, user, password, localAddress: from, from: `${user}@${stack.domain}`, to: `bob@${stack.domain}` });
const why = (r: LoginResult) => r.transcript.join('\n');
const logLines = () =>
  daemon
    .output()
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as Record<string, unknown>);

t.before(async () => {
  // Dovecot would refuse to start without it ("Unknown passdb driver"); say which package is missing.
  if (!fs.existsSync('/usr/lib/dovecot/modules/auth/libauthdb_lua.so')) throw new Error("Dovecot's Lua passdb is missing: apt-get install dovecot-auth-lua");
  const port = await freePort();
  fs.writeFileSync(
    configFile,
    `[store]
path = "mfagate.db"
[networks]
trusted = ["127.0.0.2/32"]
webmail = ["127.0.0.3"]
[dovecot]
listen = ["127.0.0.1:${port}"]
api_key = "${API_KEY}"
message = "${MFA_MESSAGE}"
[postfix]
listen = ["unix:${policySocket}"]
socket_mode = "0666"
[web]
listen = []
[app_passcodes]
enabled = true
`,
  );
  t.equal(mfagate('db', 'migrate').code, 0);
  t.equal(mfagate('users', 'enable', 'alice').code, 0);
  // The files as an administrator saves them: `mfagate setup dovecot > conf.d/95-mfagate.conf` and so on.
  const policy = mfagate('setup', 'dovecot');
  const passdb = mfagate('setup', 'dovecot', '--part', 'passdb');
  const postfix = mfagate('setup', 'postfix', '--part', 'main.cf');
  for (const r of [policy, passdb, postfix]) t.equal(r.code, 0, r.stderr);
  confD['95-mfagate.conf'] = policy.stdout;
  confD['05-mfagate-passcode.conf'] = passdb.stdout;
  daemon = spawnDaemon(configFile);
  await daemon.ready;
  stack = await startMailStack({
    users: USERS,
    dovecotConfD: confD,
    // main.cf as printed; the submission service's -o line of master.cf, as a main.cf setting of this smtpd.
    postfixExtra: `${postfix.stdout}\nsmtpd_recipient_restrictions = $mfagate_submission_restrictions`,
  });
});

t.teardown(async () => {
  await stack?.stop();
  await daemon?.stop();
  fs.rmSync(dir, { recursive: true, force: true });
});

t.test('the configuration the stack runs with is what setup printed', async (t) => {
  t.match(confD['95-mfagate.conf'], /passcode=%\{passdb:mfagate_passcode\}/, 'the policy request carries the passcode');
  t.match(confD['05-mfagate-passcode.conf'], `args = file=${path.join(ROOT, 'dovecot/mfagate-passcode.lua')} blocking=yes`, 'the installed script');
  const conf = fs.readFileSync(path.join(stack.dir, 'dovecot.conf'), 'utf8');
  t.match(conf, '!include conf.d/*.conf');
  t.equal(fs.readFileSync(path.join(stack.dir, 'conf.d', '05-mfagate-passcode.conf'), 'utf8'), confD['05-mfagate-passcode.conf']);
  t.match(stack.dovecotLog(), /lua|starting up/i, 'Dovecot started with it');
});

t.test('a passcode works from an address without a grant, over IMAP, POP3 and SMTP; the password does not', async (t) => {
  const { passcode } = addPasscode(t, '--name', 'iPhone');
  t.match(passcode, /^[a-z]{4} [a-z]{4} [a-z]{4} [a-z]{4}$/, 'shown in groups of four');
  const typed = passcode.replace(/ /g, '');
  const i = await imap(typed);
  t.ok(i.ok, 'IMAP with the passcode', { transcript: why(i) });
  const p = await pop3(typed);
  t.ok(p.ok, 'POP3 with the passcode', { transcript: why(p) });
  const s = await submit(typed);
  t.ok(s.authOk && s.rcptOk && s.dataOk, 'SMTP submission with the passcode (Dovecot SASL, then the Postfix policy)', { transcript: s.transcript.join('\n') });
  t.match(await stack.waitForMessage('bob', (m) => m.includes(s.subject)), s.subject, 'and the message is delivered');

  const pw = await imap(USERS.alice);
  t.equal(pw.ok, false, 'the site password from the same address: refused');
  t.match(pw.line, `NO ${MFA_MESSAGE}`, 'with the MFA message');
  const pwSmtp = await submit(USERS.alice);
  t.equal(pwSmtp.authOk, false, 'the site password over SMTP from the address a passcode just sent from: refused at AUTH');
  t.match(pwSmtp.authLine, MFA_MESSAGE);

  const decisions = logLines().filter((l) => l['event'] === 'decision' && l['user'] === 'alice' && l['result'] === 'allow');
  t.ok(decisions.some((l) => l['rule'] === 'app-passcode' && l['protocol'] === 'imap'), 'the decision log names the app-passcode rule');
  t.ok(decisions.some((l) => l['rule'] === 'app-passcode' && l['endpoint'] === 'postfix'), 'and the Postfix check of the passcode session');
  const check = mfagate('check', '--user', 'alice', '--ip', OUTSIDE);
  t.equal(check.code, 1, 'mfagate check: the password alone from there is refused');
});

t.test('spaces, hyphens and case do not matter', async (t) => {
  const { passcode } = addPasscode(t, '--name', 'Android');
  for (const typed of [passcode, passcode.toUpperCase().replace(/ /g, '-'), passcode.replace(/ /g, '').replace(/^(.)/, (c) => c.toUpperCase())]) {
    const r = await imap(typed);
    t.ok(r.ok, `IMAP with ${JSON.stringify(typed.replace(/[a-z]/gi, 'x'))}`, { transcript: why(r) });
  }
});

t.test('a passcode limited to smtp is refused for IMAP, and works for SMTP', async (t) => {
  const { passcode } = addPasscode(t, '--name', 'Printer', '--protocols', 'smtp');
  const i = await imap(passcode);
  t.equal(i.ok, false, 'IMAP refused');
  t.notMatch(i.line, /MFA required/, 'as a wrong password (it is not the site password either)');
  const s = await submit(passcode);
  t.ok(s.authOk && s.rcptOk, 'SMTP accepted', { transcript: s.transcript.join('\n') });
});

t.test('revoked, expired and mistyped passcodes fail at the next login', async (t) => {
  const revoked = addPasscode(t, '--name', 'Old phone');
  t.ok((await imap(revoked.passcode)).ok, 'works before the revoke (and is remembered by the daemon)');
  const rv = mfagate('passcodes', 'revoke', '--user', 'alice', '--id', String(revoked.id));
  t.equal(rv.code, 0, rv.stderr);
  t.equal((await imap(revoked.passcode)).ok, false, 'revoked: refused at the very next login');
  t.equal((await submit(revoked.passcode)).authOk, false, 'and over SMTP');

  const expiring = addPasscode(t, '--name', 'Loaner', '--ttl', '2s');
  const view = JSON.parse(mfagate('passcodes', 'list', '--user', 'alice', '--json').stdout) as { id: number; expires_at: string | null }[];
  const expiresAt = Date.parse(view.find((p) => p.id === expiring.id)?.expires_at ?? '');
  t.ok((await imap(expiring.passcode)).ok, 'works before it expires');
  await new Promise((r) => setTimeout(r, Math.max(0, expiresAt - Date.now()) + 50));
  t.equal((await imap(expiring.passcode)).ok, false, 'expired: refused');

  const good = addPasscode(t, '--name', 'Tablet');
  const letters = good.passcode.replace(/ /g, '');
  const last = letters.at(-1) === 'a' ? 'b' : 'a';
  t.equal((await imap(letters.slice(0, -1) + last)).ok, false, 'one letter wrong: refused');
  t.equal((await imap(letters.slice(0, -1))).ok, false, 'one letter short: refused');
  t.ok((await imap(letters)).ok, 'the right one still works (a few mistakes do not lock it)');
  t.ok((await imap(USERS.alice, CAMPUS)).ok, 'nor the site password');
});

t.test('a passcode does not sign in to the webmail, and the site password still works from campus', async (t) => {
  const { passcode } = addPasscode(t, '--name', 'Laptop');
  const w = await imap(passcode, WEBMAIL);
  t.equal(w.ok, false, 'typed into the webmail (its IMAP login comes from the webmail host): refused');
  t.ok((await imap(USERS.alice, WEBMAIL)).ok, 'the webmail logs in with the site password (its own MFA is the plugin)');
  t.ok((await imap(USERS.alice, CAMPUS)).ok, 'IMAP with the site password from campus');
  t.ok((await pop3(USERS.alice, CAMPUS)).ok, 'POP3 from campus');
  const s = await submit(USERS.alice, CAMPUS);
  t.ok(s.authOk && s.rcptOk && s.dataOk, 'SMTP from campus', { transcript: s.transcript.join('\n') });
});

t.test('only what looks like a passcode reaches mfagate', async (t) => {
  const asked = () => logLines().filter((l) => l['event'] === 'passcode-check' && l['user'] === 'bob').length;
  t.equal(asked(), 0, 'bob has not been asked about');
  for (const password of [USERS.bob, 'a-password-of-sixteen', 'abcdefghjkmnpqr', 'abcdefghjkmnpqrst', 'abcdefghjkmnpqrl']) {
    await imap(password, CAMPUS, 'bob');
  }
  t.ok((await imap(USERS.bob, CAMPUS, 'bob')).ok, 'the site password works');
  t.equal(asked(), 0, 'no site password or other shape was sent to mfagate (15, 17 letters, an "l")');
  t.equal((await imap('abcd efgh jkmn pqrs', CAMPUS, 'bob')).ok, false, 'a passcode-shaped wrong password');
  for (const deadline = Date.now() + 5000; asked() === 0 && Date.now() < deadline; ) await new Promise((r) => setTimeout(r, 50));
  t.equal(asked(), 1, 'is asked about, once: the log would have shown the others');
});

t.test('the passcode is in no log and not in the store in plain text; the last use is shown', async (t) => {
  const { id, passcode } = addPasscode(t, '--name', 'Watch');
  const letters = passcode.replace(/ /g, '');
  t.ok((await imap(passcode)).ok);
  t.ok((await submit(letters)).authOk);
  // The daemon writes last uses every second or so.
  let listed: { id: number; last_used_at: string | null; last_used_ip: string | null; last_used_protocol: string | null }[] = [];
  for (const deadline = Date.now() + 5000; Date.now() < deadline; await new Promise((r) => setTimeout(r, 100))) {
    listed = JSON.parse(mfagate('passcodes', 'list', '--user', 'alice', '--json').stdout) as typeof listed;
    if (listed.find((p) => p.id === id)?.last_used_at) break;
  }
  t.match(listed.find((p) => p.id === id), { last_used_ip: OUTSIDE, last_used_protocol: /^(imap|smtp)$/ }, 'last use: time, address, protocol');
  t.match(mfagate('users', 'show', 'alice').stdout, new RegExp(`${id}\\s+Watch\\s+imap,pop3,smtp,sieve\\s+working`), 'users show lists it');
  const texts = {
    'the daemon log': daemon.output(),
    'dovecot.log': stack.dovecotLog(),
    'the Postfix log': stack.postfixLog(),
  };
  for (const [what, text] of Object.entries(texts)) {
    t.notOk(text.includes(letters) || text.includes(passcode) || text.includes(letters.toUpperCase()), `not in ${what}`);
  }
  t.notMatch(daemon.output(), new RegExp(`${API_KEY}|${USERS.alice}`), 'nor the API key or a password in the daemon log');
  for (const f of fs.readdirSync(dir).filter((f) => f.startsWith('mfagate.db'))) {
    const bytes = fs.readFileSync(path.join(dir, f));
    t.equal(bytes.indexOf(letters), -1, `not in ${f}`);
  }
});

t.test('users revoke-all and users reset end every passcode', async (t) => {
  const a = addPasscode(t, '--name', 'Phone A');
  t.ok((await imap(a.passcode)).ok);
  const r = mfagate('users', 'revoke-all', 'alice', '--reason', 'password changed', '--json');
  t.equal(r.code, 0, r.stderr);
  t.ok((JSON.parse(r.stdout) as { passcodes: unknown[] }).passcodes.length >= 1, 'revoke-all names the passcodes it ended');
  t.equal((await imap(a.passcode)).ok, false, 'after revoke-all: refused');
  const b = addPasscode(t, '--name', 'Phone B');
  t.ok((await imap(b.passcode)).ok);
  t.equal(mfagate('users', 'reset', 'alice', '--reason', 'ticket 1').code, 0);
  t.equal((await imap(b.passcode)).ok, false, 'after reset: refused');
  t.same(JSON.parse(mfagate('passcodes', 'list', '--user', 'alice', '--json').stdout), [], 'none left working');
});
