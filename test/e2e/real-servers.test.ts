// End to end: the real `mfagate serve` process, a real Dovecot 2.3 (IMAP, POP3) and a real Postfix 3.7
// (submission with SASL through that Dovecot, the policy service in smtpd_recipient_restrictions), clients
// from distinct loopback addresses:
//   127.0.0.2  campus (trusted)          127.0.0.6  eduroam (untrusted, inside the trusted range)
//   127.0.0.9  outside                   127.0.0.10 another outside address
import fs from 'node:fs';
import path from 'node:path';
import t, { type Test } from 'tap';
import { type LoginResult, imapLogin, pop3Login, smtpSubmit } from '../helpers/clients.js';
import { type DaemonProcess, cli, spawnDaemon, tempDir } from '../helpers/daemon.js';
import { type MailStack, freePort, startMailStack } from '../helpers/mailstack.js';

const CAMPUS = '127.0.0.2';
const EDUROAM = '127.0.0.6';
const OUTSIDE = '127.0.0.9';
const ELSEWHERE = '127.0.0.10';
const MESSAGE = '[AUTHENTICATIONFAILED] MFA required: sign in to webmail from this network, then retry';
const REJECT = '554 5.7.1 MFA required: sign in to webmail from this network, then retry';
const USERS = { alice: 'alice-pw', bob: 'bob-pw' };

const dir = tempDir('mfagate-e2e-');
// Postfix's smtpd runs as the postfix user: it must reach the socket (in production: a setgid directory of
// group postfix and socket_mode 0660, see docs/deployment.md).
fs.chmodSync(dir, 0o711);
const configFile = path.join(dir, 'mfagate.toml');
const policySocket = path.join(dir, 'policy.sock');
let daemon: DaemonProcess;
// Stack A: Dovecot asks mfagate (IMAP, POP3, and SMTP AUTH through Postfix) and Postfix asks it too.
let full: MailStack;
// Stack B: only Postfix asks mfagate (a site that adds the policy service to submission alone): SASL succeeds,
// the refusal comes at RCPT from the Postfix endpoint.
let postfixOnly: MailStack;

const mfagate = (...args: string[]) => cli(['--config', configFile, ...args]);

t.before(async () => {
  const port = await freePort();
  fs.writeFileSync(
    configFile,
    `[store]
path = "mfagate.db"
[networks]
trusted = ["127.0.0.0/29"]
untrusted = ["127.0.0.6"]
[dovecot]
listen = ["127.0.0.1:${port}"]
api_key = "e2e-key"
message = "${MESSAGE}"
[postfix]
listen = ["unix:${policySocket}"]
socket_mode = "0666"
reject_action = "${REJECT}"
[web]
listen = []
`,
  );
  // As a site installs it: create the store, set it up with the CLI, then start the daemon.
  t.equal(mfagate('db', 'migrate').code, 0);
  t.equal(mfagate('users', 'enable', 'alice').code, 0);
  daemon = spawnDaemon(configFile);
  await daemon.ready;
  [full, postfixOnly] = await Promise.all([
    startMailStack({
      users: USERS,
      policyUrl: `http://127.0.0.1:${port}/`,
      policyApiHeader: 'X-API-Key: e2e-key',
      policyAttributes: 'recommended',
      postfixPolicy: `unix:${policySocket}`,
    }),
    startMailStack({ users: USERS, postfixPolicy: `unix:${policySocket}` }),
  ]);
});

t.teardown(async () => {
  await Promise.allSettled([full?.stop(), postfixOnly?.stop()]);
  await daemon?.stop();
  fs.rmSync(dir, { recursive: true, force: true });
});

const imap = (user: keyof typeof USERS, from: string) => imapLogin({ port: full.imapPort, user, password: USERS[user], localAddress: from });
const pop3 = (user: keyof typeof USERS, from: string) => pop3Login({ port: full.pop3Port, user, password: USERS[user], localAddress: from });
const submit = (stack: MailStack, user: keyof typeof USERS, from: string) =>
  smtpSubmit({ port: stack.smtpPort, user, password: USERS[user], localAddress: from, from: `${user}@${stack.domain}`, to: `bob@${stack.domain}` });
const why = (r: LoginResult) => r.transcript.join('\n');

/** alice from `from`: every protocol on both stacks either gets in or is refused with our words. */
async function expectAlice(t: Test, from: string, allowed: boolean, label: string): Promise<void> {
  const i = await imap('alice', from);
  const p = await pop3('alice', from);
  const s = await submit(full, 'alice', from);
  const b = await submit(postfixOnly, 'alice', from);
  if (allowed) {
    t.ok(i.ok, `${label}: IMAP login`, { transcript: why(i) });
    t.ok(p.ok, `${label}: POP3 login`, { transcript: why(p) });
    t.ok(s.authOk && s.rcptOk && s.dataOk, `${label}: SMTP submission (Dovecot policy, then Postfix policy)`, { transcript: s.transcript.join('\n') });
    t.ok(b.authOk && b.rcptOk && b.dataOk, `${label}: SMTP submission (Postfix policy only)`, { transcript: b.transcript.join('\n') });
  } else {
    t.equal(i.ok, false, `${label}: IMAP refused`);
    t.match(i.line, `NO [AUTHENTICATIONFAILED] MFA required: sign in to webmail from this network, then retry`, `${label}: IMAP says what to do`);
    t.equal(p.ok, false, `${label}: POP3 refused`);
    t.equal(p.line, `-ERR ${MESSAGE}`, `${label}: POP3 says what to do`);
    t.equal(s.authOk, false, `${label}: SMTP AUTH refused`);
    t.match(s.authLine, `535 5.7.8 Error: authentication failed: ${MESSAGE}`, `${label}: SMTP says what to do`);
    t.equal(b.authOk, true, `${label}: Postfix-only stack: the password is accepted`);
    t.equal(b.rcptOk, false, `${label}: Postfix-only stack: RCPT refused by the policy service`);
    t.match(b.rcptLine, /^554 5\.7\.1 .*MFA required: sign in to webmail from this network, then retry/, `${label}: with the reject action`);
  }
}

t.test('a user without MFA gets in from outside, on every protocol', async (t) => {
  t.ok((await imap('bob', OUTSIDE)).ok, 'IMAP');
  t.ok((await pop3('bob', OUTSIDE)).ok, 'POP3');
  const s = await submit(full, 'bob', OUTSIDE);
  t.ok(s.authOk && s.rcptOk && s.dataOk, 'SMTP', { transcript: s.transcript.join('\n') });
  const delivered = await full.waitForMessage('bob', (m) => m.includes(s.subject));
  t.match(delivered, s.subject, 'and the message is delivered');
  t.equal((await imapLogin({ port: full.imapPort, user: 'bob', password: 'wrong', localAddress: OUTSIDE })).ok, false, 'a wrong password is still wrong');
});

t.test('a user with MFA: refused from outside, in from campus, refused from eduroam inside campus', async (t) => {
  await expectAlice(t, OUTSIDE, false, 'outside');
  await expectAlice(t, CAMPUS, true, 'campus');
  await expectAlice(t, EDUROAM, false, 'eduroam');
  const c = mfagate('check', '--user', 'alice', '--ip', EDUROAM);
  t.equal(c.code, 1);
  t.match(c.stdout, /untrusted range/, 'the helpdesk sees why');
});

t.test('grants add opens exactly that address; revoke closes it at once', async (t) => {
  const add = mfagate('grants', 'add', '--user', 'alice', '--ip', OUTSIDE, '--reason', 'e2e');
  t.equal(add.code, 0, add.stderr);
  await expectAlice(t, OUTSIDE, true, 'granted address');
  await expectAlice(t, ELSEWHERE, false, 'another address');
  const rv = mfagate('grants', 'revoke', '--user', 'alice', '--ip', OUTSIDE, '--reason', 'e2e done');
  t.match(rv.stdout, /revoked 1 grant/);
  await expectAlice(t, OUTSIDE, false, 'right after the revoke');
});

t.test('a grant ends with its TTL', async (t) => {
  const add = mfagate('grants', 'add', '--user', 'alice', '--ip', OUTSIDE, '--ttl', '3s', '--json');
  t.equal(add.code, 0, add.stderr);
  const expires = Date.parse((JSON.parse(add.stdout) as { expires_at: string }).expires_at);
  t.ok((await imap('alice', OUTSIDE)).ok, 'in while the grant holds');
  // Wait for the grant's own expiry instant (not a guess): the TTL is what is under test.
  await new Promise((r) => setTimeout(r, Math.max(0, expires - Date.now()) + 50));
  await expectAlice(t, OUTSIDE, false, 'after the TTL');
});

t.test('grants survive kill -9 of the daemon', async (t) => {
  t.equal(mfagate('grants', 'add', '--user', 'alice', '--ip', ELSEWHERE).code, 0);
  t.ok((await imap('alice', ELSEWHERE)).ok, 'in before the kill');
  await daemon.stop('SIGKILL');
  // Fail closed (auth_policy_reject_on_fail = yes): without mfagate nobody gets in, not even from campus.
  t.equal((await imap('bob', CAMPUS)).ok, false, 'no policy server: Dovecot refuses (fail closed)');
  daemon = spawnDaemon(configFile);
  await daemon.ready;
  await expectAlice(t, ELSEWHERE, true, 'after kill -9 and a restart');
  await expectAlice(t, OUTSIDE, false, 'and still only there');
});

t.test('the operator can see what happened', async (t) => {
  // Dovecot reports each attempt; the daemon stores them within a second.
  let show = '';
  for (const deadline = Date.now() + 5000; Date.now() < deadline; await new Promise((r) => setTimeout(r, 100))) {
    show = mfagate('users', 'show', 'alice').stdout;
    if (show.includes(OUTSIDE)) break;
  }
  t.match(show, new RegExp(`${OUTSIDE.replace(/\./g, '\\.')}\\s+(imap|pop3|smtp)`), 'last logins per address, from Dovecot\'s reports');
  t.match(show, /grant-revoke/, 'the audit trail');
  const stats = JSON.parse(mfagate('stats', '--json').stdout) as { daemon: { running: boolean } | null };
  t.equal(stats.daemon?.running, true);
  const lines = daemon.output().split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Record<string, unknown>);
  const refusal = lines.find((l) => l['event'] === 'decision' && l['result'] === 'refuse');
  t.match(refusal, { user: 'alice', ip: OUTSIDE, rule: 'no-grant' }, 'one structured line per decision');
  t.notMatch(daemon.output(), /e2e-key|alice-pw/, 'no secret in the log');
});
