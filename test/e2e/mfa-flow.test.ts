// End to end, the whole MFA flow: the real `mfagate serve` process, its webmail API over the real UNIX socket,
// a real Dovecot asking it about every IMAP login, and a real Postfix delivering the codes mfagate mails.
//   alice registers the authenticator app (begin -> confirm with a code computed from the returned secret),
//   enables MFA, is refused by IMAP from 127.0.0.9, passes MFA in "webmail" from 127.0.0.9, and then IMAP from
//   127.0.0.9 gets in while 127.0.0.10 is still refused. Then she registers an external address (a mailbox on
//   the same Postfix), proves it with the mailed code, and passes MFA from 127.0.0.10 with a mailed login code.
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { type LoginResult, imapLogin } from '../helpers/clients.js';
import { Authenticator, apiClient, codeIn, decodeMail } from '../helpers/api.js';
import { type DaemonProcess, spawnDaemon, tempDir } from '../helpers/daemon.js';
import { type MailStack, startStackForMfagate } from '../helpers/mailstack.js';

const A = '127.0.0.9';
const B = '127.0.0.10';
const USERS = { alice: 'alice-pw', carol: 'carol-pw' };
const MESSAGE = '[AUTHENTICATIONFAILED] MFA required: sign in to webmail from this network, then retry';

const dir = tempDir('mfagate-e2e-mfa-');
const configFile = path.join(dir, 'mfagate.toml');
const apiSocket = path.join(dir, 'api.sock');
let daemon: DaemonProcess;
let stack: MailStack;
const api = apiClient({ socketPath: apiSocket });
let phone: Authenticator;

t.before(async () => {
  const started = await startStackForMfagate(USERS, 'e2e-key');
  stack = started.stack;
  const port = started.policyPort;
  fs.writeFileSync(
    configFile,
    `[store]
path = "mfagate.db"
[dovecot]
listen = ["127.0.0.1:${port}"]
api_key = "e2e-key"
message = "${MESSAGE}"
[postfix]
listen = ["unix:policy.sock"]
[api]
listen = ["unix:${apiSocket}"]
[web]
listen = []
[totp]
issuer = "Mail Test"
[otp]
refused_email_domains = ["campus.test"]
[mail]
smtp = "smtp://127.0.0.1:${stack.smtpPort}"
from = "mfagate@${stack.domain}"
`,
  );
  daemon = spawnDaemon(configFile, ['--create-store']);
  await daemon.ready;
});

t.teardown(async () => {
  await stack?.stop();
  await daemon?.stop();
  fs.rmSync(dir, { recursive: true, force: true });
});

const imap = (from: string) => imapLogin({ port: stack.imapPort, user: 'alice', password: USERS.alice, localAddress: from });
const why = (r: LoginResult) => ({ transcript: r.transcript.join('\n'), daemon: daemon.output().slice(-3000) });

/** The newest message in carol's mailbox whose decoded subject matches. */
async function mailTo(user: 'carol', subject: RegExp, not: string[] = []): Promise<{ subject: string; text: string }> {
  const raw = await stack.waitForMessage(user, (m) => subject.test(decodeMail(m).subject) && !not.some((n) => decodeMail(m).text.includes(n)));
  return decodeMail(raw);
}

t.test('app, enable, verify from A: a real IMAP login gets in from A and is refused from B', async (t) => {
  t.ok(fs.statSync(apiSocket).isSocket(), 'the API listens on its UNIX socket');
  t.ok((await imap(A)).ok, 'before MFA is enabled: IMAP from A gets in');

  const begin = await api.post('/v1/users/alice/totp', { ip: A });
  t.equal(begin.status, 200, begin.text);
  t.match(begin.json.uri, /^otpauth:\/\/totp\/Mail%20Test:alice\?/);
  phone = new Authenticator(begin.json.secret as string);
  const confirm = await api.post('/v1/users/alice/totp/confirm', { ip: A, code: await phone.next() });
  t.equal(confirm.status, 200, confirm.text);
  const enable = await api.put('/v1/users/alice/mfa', { ip: A });
  t.same(enable.json, { mfa_enabled: true });

  const refused = await imap(A);
  t.equal(refused.ok, false, 'MFA enabled, no grant: IMAP from A refused', why(refused));
  t.match(refused.line, `NO ${MESSAGE}`, 'with the message that says what to do');
  t.match((await api.get(`/v1/users/alice/status?ip=${A}`)).json.login, { needs_mfa: true, rule: 'no-grant' }, 'the webmail can tell why');

  const v = await api.post('/v1/users/alice/verify', { ip: A, factor: { method: 'totp', code: await phone.next() } });
  t.equal(v.status, 200, v.text);
  t.match(v.json.grant, { ip: A, block: A, method: 'totp' });

  const inA = await imap(A);
  t.ok(inA.ok, 'after MFA from A: IMAP from A gets in', why(inA));
  const fromB = await imap(B);
  t.equal(fromB.ok, false, 'IMAP from B is still refused', why(fromB));
  t.match(fromB.line, MESSAGE);
  t.match((await api.get(`/v1/users/alice/status?ip=${A}`)).json, { mfa_enabled: true, factors: { totp: true }, login: { needs_mfa: false, rule: 'grant' } });
});

t.test('external address through the real Postfix: prove it, then a mailed login code opens B', async (t) => {
  const campus = await api.post('/v1/users/alice/email', { ip: B, address: 'alice@campus.test', factor: { method: 'totp', code: '000000' } });
  t.equal(campus.status, 422, 'a campus address is refused (before the proof is even looked at)');
  const reg = await api.post('/v1/users/alice/email', { ip: B, address: `carol@${stack.domain}`, factor: { method: 'totp', code: await phone.next() } });
  t.equal(reg.status, 200, reg.text);
  t.equal(reg.json.pending, `c***@${stack.domain}`);
  const verifyMail = await mailTo('carol', /^Confirm your external address/);
  const confirm = await api.post('/v1/users/alice/email/confirm', { ip: B, code: codeIn(verifyMail.text) });
  t.equal(confirm.status, 200, confirm.text);
  t.same(confirm.json, { address: `c***@${stack.domain}` });

  const send = await api.post('/v1/users/alice/email/code', { ip: B });
  t.equal(send.status, 200, send.text);
  const otp = await mailTo('carol', /^OTP notification \(OTP発行のお知らせ\)$/);
  t.match(otp.text, B, 'the mailed code names the requesting address');
  const v = await api.post('/v1/users/alice/verify', { ip: B, factor: { method: 'email', code: codeIn(otp.text) } });
  t.equal(v.status, 200, v.text);
  const inB = await imap(B);
  t.ok(inB.ok, 'after MFA from B: IMAP from B gets in', why(inB));
  const notice = await mailTo('carol', /^MFA succeeded/);
  t.match(notice.text, B, 'and the registered address is told');
});

t.test('revoking a grant through the API closes that address at once', async (t) => {
  const grants = (await api.get('/v1/users/alice/grants')).json.grants as { id: number; ip: string }[];
  t.same(grants.map((g) => g.ip).sort(), [A, B].sort());
  const g = grants.find((x) => x.ip === A);
  const rv = await api.del(`/v1/users/alice/grants/${g?.id}`, { ip: B });
  t.equal(rv.status, 200, rv.text);
  t.equal((await imap(A)).ok, false, 'IMAP from A refused again');
  t.ok((await imap(B)).ok, 'B keeps its grant');
  const lines = daemon.output().split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Record<string, unknown>);
  t.ok(lines.some((l) => l['event'] === 'api' && l['route'] === 'POST /v1/users/{user}/verify' && l['user'] === 'alice' && l['status'] === 200), 'API actions are logged');
  t.notMatch(daemon.output(), new RegExp(`${phone.secret}|e2e-key|alice-pw`), 'no secret in the log');
});
