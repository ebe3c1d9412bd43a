// Proves the end-to-end harness (test/helpers/mailstack.ts, clients.ts) against a real Dovecot and Postfix, with
// tiny policy servers written here: an HTTP one for Dovecot's auth policy that refuses "bob", and a Postfix policy
// server that refuses sasl_username=carol. Clients connect from 127.0.0.9 to servers on 127.0.0.1.
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { imapLogin, pop3Login, smtpSubmit } from './helpers/clients.js';
import { type MailStack, startMailStack } from './helpers/mailstack.js';

const FROM = '127.0.0.9';
const USERS = { alice: 'alice-pw', bob: 'bob-pw', carol: 'carol-pw' };
const MFA_MSG = '[AUTHENTICATIONFAILED] MFA required: test';

// --- Dovecot auth policy (HTTP) -------------------------------------------------------------------------------

interface PolicyCall {
  url: string;
  headers: http.IncomingHttpHeaders;
  body: Record<string, unknown>;
}
const dovecotCalls: PolicyCall[] = [];
const httpPolicy = http.createServer((req, res) => {
  let text = '';
  req.setEncoding('utf8');
  req.on('data', (c: string) => (text += c));
  req.on('end', () => {
    let body: Record<string, unknown> = {};
    try {
      body = JSON.parse(text) as Record<string, unknown>;
    } catch {
      // recorded as {}
    }
    dovecotCalls.push({ url: req.url ?? '', headers: req.headers, body });
    const reject = body.login === 'bob' && (req.url ?? '').includes('command=allow');
    res.writeHead(200, { 'Content-Type': 'application/json' });
    res.end(JSON.stringify(reject ? { status: -1, msg: MFA_MSG } : { status: 0, msg: '' }));
  });
});
await new Promise<void>((resolve) => httpPolicy.listen(0, '127.0.0.1', resolve));
const httpAddr = httpPolicy.address() as net.AddressInfo;
t.teardown(() => new Promise<void>((resolve) => httpPolicy.close(() => resolve())));
t.teardown(() => httpPolicy.closeAllConnections());

// --- Postfix policy delegation (one reply per request, many requests per connection) -------------------------

const postfixCalls: Record<string, string>[] = [];
function postfixPolicyServer(): net.Server {
  return net.createServer((sock) => {
    let buf = '';
    sock.setEncoding('utf8');
    sock.on('error', () => undefined);
    sock.on('data', (chunk: string) => {
      buf += chunk;
      let end: number;
      while ((end = buf.indexOf('\n\n')) >= 0) {
        const block = buf.slice(0, end);
        buf = buf.slice(end + 2);
        const attrs: Record<string, string> = {};
        for (const line of block.split('\n')) {
          const eq = line.indexOf('=');
          if (eq > 0) attrs[line.slice(0, eq)] ??= line.slice(eq + 1);
        }
        postfixCalls.push(attrs);
        sock.write(attrs.sasl_username === 'carol' ? 'action=554 5.7.1 refused by test\n\n' : 'action=DUNNO\n\n');
      }
    });
  });
}
const sockDir = fs.mkdtempSync(path.join(os.tmpdir(), 'mfagate-harness-'));
fs.chmodSync(sockDir, 0o755); // smtpd runs as user postfix: it must reach and write the socket
const sockPath = path.join(sockDir, 'policy.sock');
const unixPolicy = postfixPolicyServer();
await new Promise<void>((resolve) => unixPolicy.listen({ path: sockPath, readableAll: true, writableAll: true }, resolve));
const inetPolicy = postfixPolicyServer();
await new Promise<void>((resolve) => inetPolicy.listen(0, '127.0.0.1', resolve));
const inetPort = (inetPolicy.address() as net.AddressInfo).port;
t.teardown(() => {
  unixPolicy.close();
  inetPolicy.close();
  fs.rmSync(sockDir, { recursive: true, force: true });
});

// --- Two stacks side by side: recommended attributes + unix policy socket; default attributes + inet policy -----

const started = await Promise.allSettled([
  startMailStack({
    users: USERS,
    policyUrl: `http://127.0.0.1:${httpAddr.port}/rec/`,
    policyApiHeader: 'X-API-Key: harness-secret',
    policyAttributes: 'recommended',
    postfixPolicy: `unix:${sockPath}`,
  }),
  startMailStack({
    users: USERS,
    policyUrl: `http://127.0.0.1:${httpAddr.port}/def/`,
    policyAttributes: 'default',
    postfixPolicy: `inet:127.0.0.1:${inetPort}`,
  }),
]);
for (const s of started) if (s.status === 'fulfilled') t.teardown(() => s.value.stop());
const failed = started.find((s): s is PromiseRejectedResult => s.status === 'rejected');
if (failed) throw failed.reason;
const [rec, def] = started.map((s) => (s as PromiseFulfilledResult<MailStack>).value) as [MailStack, MailStack];

const callsFor = (prefix: string) => dovecotCalls.filter((c) => c.url.startsWith(prefix));
const logs = (s: MailStack) => `\n--- dovecot ---\n${s.dovecotLog().slice(-3000)}\n--- postfix ---\n${s.postfixLog().slice(-3000)}`;

t.test('recommended attributes: IMAP and POP3 through the auth policy', async (t) => {
  const login = { port: rec.imapPort, localAddress: FROM };
  const ok = await imapLogin({ ...login, user: 'alice', password: USERS.alice });
  t.ok(ok.ok, `alice IMAP: ${ok.line}${ok.ok ? '' : logs(rec)}`);
  t.match(ok.line, /^a1 OK/);

  const bob = await imapLogin({ ...login, user: 'bob', password: USERS.bob });
  t.notOk(bob.ok);
  t.equal(bob.line, `a1 NO ${MFA_MSG}`);

  const wrong = await imapLogin({ ...login, user: 'alice', password: 'not-it' });
  t.notOk(wrong.ok, 'a wrong password still fails');
  t.match(wrong.line, /^a1 NO \[AUTHENTICATIONFAILED\]/);

  const pop = { port: rec.pop3Port, localAddress: FROM };
  const pok = await pop3Login({ ...pop, user: 'alice', password: USERS.alice });
  t.ok(pok.ok, `alice POP3: ${pok.line}`);
  const pbob = await pop3Login({ ...pop, user: 'bob', password: USERS.bob });
  t.notOk(pbob.ok);
  t.equal(pbob.line, `-ERR ${MFA_MSG}`);

  const calls = callsFor('/rec/');
  const allow = calls.filter((c) => c.url === '/rec/?command=allow');
  const report = calls.filter((c) => c.url === '/rec/?command=report');
  t.ok(allow.length >= 4 && report.length >= 4, `allow and report calls (${calls.map((c) => c.url).join(' ')})`);
  t.ok(allow.every((c) => c.body.remote === FROM && c.body.real_remote === FROM), 'remote and real_remote are the client address');
  t.ok(allow.every((c) => c.headers['x-api-key'] === 'harness-secret'), 'API header sent');
  t.same(new Set(allow.map((c) => c.body.protocol)), new Set(['imap', 'pop3']));
  t.match(allow.find((c) => c.body.login === 'alice')?.body, { mech: 'PLAIN', local: '127.0.0.1', login: 'alice' });
  // check_before_auth = no: a wrong password is only reported, never asked about.
  t.notOk(
    allow.some((c) => c.body.login === 'alice' && calls.some((r) => r.url.endsWith('report') && r.body.session_id === c.body.session_id && r.body.success === false)),
    'no allow call for the wrong password',
  );
  t.ok(report.some((c) => c.body.login === 'alice' && c.body.success === false), 'the wrong password is reported');
});

t.test('recommended attributes: SMTP AUTH, Postfix policy, delivery to Maildir', async (t) => {
  const smtp = { port: rec.smtpPort, localAddress: FROM };
  const bob = await smtpSubmit({ ...smtp, user: 'bob', password: USERS.bob, from: 'bob@mail.test', to: 'alice@mail.test' });
  t.notOk(bob.authOk);
  t.match(bob.authLine, /^535 /);
  t.ok(bob.authLine.includes(`MFA required: test`), bob.authLine);
  t.equal(bob.rcptOk, undefined, 'no RCPT after failed AUTH');

  const carol = await smtpSubmit({ ...smtp, user: 'carol', password: USERS.carol, from: 'carol@mail.test', to: 'alice@mail.test' });
  t.ok(carol.authOk, carol.authLine);
  t.equal(carol.rcptOk, false);
  t.match(carol.rcptLine, /^554 5\.7\.1 .*refused by test/);
  t.equal(carol.dataOk, undefined);

  const alice = await smtpSubmit({ ...smtp, user: 'alice', password: USERS.alice, from: 'alice@mail.test', to: 'alice@mail.test', body: 'first line\n.starts with a dot\n' });
  t.ok(alice.authOk, alice.authLine);
  t.ok(alice.rcptOk, alice.rcptLine ?? '');
  t.ok(alice.dataOk, alice.dataLine ?? '');
  const msg = await rec.waitForMessage('alice', (m) => m.includes(`Subject: ${alice.subject}`));
  t.match(msg, /\n\.starts with a dot/, 'dot-stuffing undone by the server');
  t.ok(fs.existsSync(path.join(rec.maildir('alice'), 'new')), 'Maildir layout');

  const pf = postfixCalls.filter((c) => c.server_port === String(rec.smtpPort));
  t.ok(pf.length >= 2, 'the Postfix policy was asked');
  t.ok(pf.every((c) => c.client_address === FROM && c.request === 'smtpd_access_policy'), 'client_address is the client');
  t.same(new Set(pf.map((c) => c.sasl_username)), new Set(['carol', 'alice']));
  const smtpAllow = callsFor('/rec/').filter((c) => c.body.protocol === 'smtp' && c.url.endsWith('allow'));
  t.ok(smtpAllow.length >= 2 && smtpAllow.every((c) => c.body.remote === FROM), 'SMTP AUTH reached the Dovecot policy with the client address');
});

t.test('default attributes: IMAP through the auth policy; inet Postfix policy', async (t) => {
  const login = { port: def.imapPort, localAddress: FROM };
  const ok = await imapLogin({ ...login, user: 'alice', password: USERS.alice });
  t.ok(ok.ok, `alice IMAP: ${ok.line}${ok.ok ? '' : logs(def)}`);
  const bob = await imapLogin({ ...login, user: 'bob', password: USERS.bob });
  t.equal(bob.line, `a1 NO ${MFA_MSG}`);
  const pbob = await pop3Login({ port: def.pop3Port, localAddress: FROM, user: 'bob', password: USERS.bob });
  t.equal(pbob.line, `-ERR ${MFA_MSG}`);

  const allow = callsFor('/def/').filter((c) => c.url === '/def/?command=allow');
  t.ok(allow.length >= 2);
  t.ok(allow.every((c) => c.body.remote === FROM), 'remote is the client address');
  t.ok(allow.every((c) => 'pwhash' in c.body && 'device_id' in c.body && !('real_remote' in c.body)), 'default attribute set');
  t.ok(allow.every((c) => c.headers['x-api-key'] === undefined), 'no API header configured');

  const carol = await smtpSubmit({ port: def.smtpPort, localAddress: FROM, user: 'carol', password: USERS.carol, from: 'carol@mail.test', to: 'alice@mail.test' });
  t.ok(carol.authOk, carol.authLine);
  t.match(carol.rcptLine, /^554 5\.7\.1 .*refused by test/);
  t.ok(postfixCalls.some((c) => c.server_port === String(def.smtpPort) && c.client_address === FROM));
});

t.test('a stack without policies: plain logins, unauthenticated mail is rejected', async (t) => {
  // Reuses nothing: proves a third stack can run beside the others and stop cleanly.
  const users = { dave: 'dave pw "quoted" \\ back', erin: 'pässwörd ✓' };
  const plain = await startMailStack({ users });
  t.teardown(() => plain.stop());
  const ok = await imapLogin({ port: plain.imapPort, user: 'dave', password: users.dave, localAddress: '127.0.0.2' });
  t.ok(ok.ok, `IMAP login with quotes and backslash in the password: ${ok.line}`);
  const utf = await imapLogin({ port: plain.imapPort, user: 'erin', password: users.erin, localAddress: '127.0.0.2' });
  t.ok(utf.ok, `IMAP login with a UTF-8 password (literal): ${utf.line}`);
  t.ok(utf.transcript.some((l) => /^S: \+/.test(l)), 'the literal was sent after a continuation');
  const utfPop = await pop3Login({ port: plain.pop3Port, user: 'erin', password: users.erin, localAddress: '127.0.0.2' });
  t.ok(utfPop.ok, `POP3 login with a UTF-8 password: ${utfPop.line}`);
  const bad = await imapLogin({ port: plain.imapPort, user: 'erin', password: 'pässwörd', localAddress: '127.0.0.2' });
  t.notOk(bad.ok, 'a different UTF-8 password fails');
  const anon = await smtpSubmit({ port: plain.smtpPort, localAddress: '127.0.0.2', from: 'x@example.org', to: 'dave@mail.test' });
  t.equal(anon.authOk, false);
  t.match(anon.rcptLine, /^554 /, 'permit_sasl_authenticated, reject');
  await plain.stop();
  t.notOk(fs.existsSync(plain.dir), 'stop() removes the dir');
});
