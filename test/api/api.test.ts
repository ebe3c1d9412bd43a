// The webmail API over its real sockets (in-process daemon, real store, a real SMTP conversation with a sink):
// the UNIX socket without a token, TCP with the right, a wrong and no token; hostile input; every route; the
// flows a webmail runs (app, external address, backup codes, verify, enable/disable, grants) and the proof rule.
// The clock is injected and moved by hand, so TOTP time steps and rate limits are deterministic.
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import t from 'tap';
import { StartError } from '../../daemon/daemon.js';
import { API_ROUTES } from '../../daemon/api-server.js';
import { codeAt } from '../../mfa/totp.js';
import { type ApiClient, type ApiDaemon, type SmtpSink, Authenticator, apiClient, codeIn, startApiDaemon, startSmtpSink } from '../helpers/api.js';
import { tempDir } from '../helpers/daemon.js';
import { freePort } from '../helpers/mailstack.js';

const TOKEN = 'tok-3f9c2a7e5b1d4c8e9a0b6d2f';
const A = '203.0.113.7';
const B = '198.51.100.20';

// A fake clock a little into a 30 s step, moved forward by the tests.
let now = Math.floor(Date.now() / 30_000) * 30_000 + 5_000;
const clock = () => now;
const advance = async (ms: number) => {
  now += ms;
};
const app = (secret: string) => new Authenticator(secret, clock, advance);

let sink: SmtpSink;
let d: ApiDaemon;
let api: ApiClient;
let tcp: (token?: string) => ApiClient;
/** Every secret, code and token the tests saw: none may appear in a log line. */
const secrets = new Set<string>([TOKEN]);

t.before(async () => {
  sink = await startSmtpSink();
  d = await startApiDaemon({
    clock,
    files: { 'api.token': `${TOKEN}\n` },
    toml: `[api]
listen = ["unix:api.sock", "127.0.0.1:0"]
socket_mode = "0600"
token_file = "api.token"
[totp]
issuer = "Example Univ"
[otp]
refused_email_domains = ["example.ac.jp"]
[mail]
smtp = "${sink.url}"
from = "mfa@example.ac.jp"
[lockout]
max_failures = 3
[enforcement]
exempt_users = ["svc-backup"]
[app_passcodes]
enabled = true
max_per_user = 3
`,
  });
  api = apiClient({ socketPath: d.apiSocket });
  tcp = (token?: string) => apiClient({ port: d.apiPort ?? 0, ...(token !== undefined ? { token } : {}) });
});

t.teardown(async () => {
  await d?.stop();
  await sink?.close();
});

const u = (user: string, rest: string) => `/v1/users/${encodeURIComponent(user)}/${rest}`;

t.test('the UNIX socket: no token needed, its mode set from [api] socket_mode', async (t) => {
  t.equal(fs.statSync(d.apiSocket).mode & 0o777, 0o600, 'socket mode 0600');
  const r = await api.get(u('nobody', 'status'));
  t.equal(r.status, 200, r.text);
  t.same(r.json, { user: 'nobody', mfa_enabled: false, mfa_required: false, exempt: false, factors: { totp: false, email: null, email_pending: null, backup_codes_left: 0 }, locked_until: null, grants: [] });
  t.equal(r.headers['content-type'], 'application/json; charset=utf-8');
  t.equal(r.headers['cache-control'], 'no-store');
  t.equal((await api.get(u('nobody', 'status'), { authorization: 'Bearer wrong' })).status, 200, 'a token on the UNIX socket is ignored');
  t.same(
    d.daemon.endpoints.api.map((e) => e.kind),
    ['unix', 'tcp'],
    'daemon.endpoints.api lists both listeners',
  );
});

t.test('status of an exempt service account, from the configuration', async (t) => {
  const r = await api.get(`${u('svc-backup', 'status')}?ip=${A}`);
  t.match(r.json, { user: 'svc-backup', exempt: true, mfa_required: false, login: { ip: A, needs_mfa: false, rule: 'user-exempt' } });
});

t.test('TCP: the bearer token is required', async (t) => {
  const ok = await tcp(TOKEN).get(u('nobody', 'status'));
  t.equal(ok.status, 200, 'right token');
  for (const [label, client, headers] of [
    ['no token', tcp(), {}],
    ['wrong token', tcp('tok-wrong'), {}],
    ['a prefix of the token', tcp(TOKEN.slice(0, 10)), {}],
    ['Basic instead of Bearer', tcp(), { authorization: `Basic ${Buffer.from(`x:${TOKEN}`).toString('base64')}` }],
  ] as const) {
    const r = await client.get(u('nobody', 'status'), headers);
    t.equal(r.status, 401, label);
    t.equal(r.json?.error, 'unauthorized', label);
    t.equal(r.headers['www-authenticate'], 'Bearer', `${label}: WWW-Authenticate`);
  }
  // Authentication comes before routing: no route probing without the token.
  t.equal((await tcp().get('/v1/nothing-here')).status, 401, 'unknown route without token: 401, not 404');
  t.equal((await tcp(TOKEN).get('/v1/nothing-here')).status, 404, 'unknown route with the token: 404');
  t.equal((await tcp(TOKEN).post(u('nobody', 'totp'), { ip: A })).status, 200, 'a write over TCP with the token');
});

t.test('TCP: a reload picks up a rotated token; a broken token file keeps the running one', async (t) => {
  const next = 'tok-rotated-0123456789abcdef';
  fs.writeFileSync(path.join(d.dir, 'api.token'), `${next}\n`);
  d.daemon.reload();
  t.equal((await tcp(TOKEN).get(u('nobody', 'status'))).status, 401, 'old token refused after reload');
  t.equal((await tcp(next).get(u('nobody', 'status'))).status, 200, 'new token accepted');
  fs.writeFileSync(path.join(d.dir, 'api.token'), '');
  d.daemon.reload();
  t.ok(d.logs.some((l) => l['event'] === 'reload-failed' && String(l['error']).includes('is empty')), 'an empty token file is logged');
  t.equal((await tcp(next).get(u('nobody', 'status'))).status, 200, 'and the running token stays');
  fs.writeFileSync(path.join(d.dir, 'api.token'), `${TOKEN}\n`);
  d.daemon.reload();
  t.equal((await tcp(TOKEN).get(u('nobody', 'status'))).status, 200, 'back to the first token');
  secrets.add(next);
});

t.test('bad input: clear 4xx answers, never a crash', async (t) => {
  const expectError = async (r: Promise<{ status: number; json: any; headers: Record<string, unknown> }>, status: number, error: string, message: RegExp | string, label: string) => {
    const res = await r;
    t.equal(res.status, status, `${label}: status`);
    t.equal(res.json?.error, error, `${label}: error code`);
    t.match(res.json?.message, message, `${label}: message`);
    return res;
  };
  await expectError(api.get('/v1/users/alice'), 404, 'not-found', /no such route/, 'unknown route');
  await expectError(api.get('/v2/users/alice/status'), 404, 'not-found', /no such route/, 'unknown version');
  await expectError(api.get(u('alice', 'status/')), 404, 'not-found', /no such route/, 'trailing slash');
  await expectError(api.get('/v1/users//status'), 404, 'not-found', /no such route/, 'empty user');
  const m = await expectError(api.request('PATCH', u('alice', 'mfa'), { ip: A }), 405, 'method-not-allowed', /takes PUT, DELETE/, 'wrong method');
  t.equal(m.headers['allow'], 'PUT, DELETE', 'Allow lists the methods');
  await expectError(api.get(u('alice', 'verify')), 405, 'method-not-allowed', /takes POST/, 'GET on a POST route');
  await expectError(api.post(u('alice', 'verify'), 'x'.repeat(20_000)), 413, 'too-large', /larger than 16384 bytes/, 'body over the limit');
  await expectError(api.post(u('alice', 'verify'), '{"ip": "203.0.113.7", "factor": {"method": "totp", "code": "123456"'), 400, 'bad-request', /not valid JSON; expected a JSON object with "ip", "factor"/, 'truncated JSON');
  await expectError(api.post(u('alice', 'verify'), '[1,2]'), 400, 'bad-request', /expected a JSON object/, 'an array');
  await expectError(api.post(u('alice', 'verify'), ''), 400, 'bad-request', /body is empty/, 'no body');
  await expectError(api.post(u('alice', 'email/code'), {}), 400, 'bad-request', /missing field "ip"/, 'missing ip');
  await expectError(api.post(u('alice', 'email/code'), { ip: 'not-an-ip' }), 400, 'bad-request', /ip: expected the client IP address/, 'bad ip');
  await expectError(api.post(u('alice', 'email/code'), { ip: 7 }), 400, 'bad-request', /ip: expected the client IP address/, 'ip not a string');
  await expectError(api.post(u('alice', 'email/code'), { ip: A, extra: 1 }), 400, 'bad-request', /unknown field "extra"; expected a JSON object with "ip"/, 'unknown field');
  await expectError(api.post(u('alice', 'verify'), { ip: A }), 400, 'bad-request', /missing field "factor"/, 'verify without factor');
  await expectError(api.post(u('alice', 'verify'), { ip: A, factor: 'abc' }), 400, 'bad-request', /factor: expected \{"method"/, 'factor not an object');
  await expectError(api.post(u('alice', 'verify'), { ip: A, factor: { method: 'sms', code: '1' } }), 400, 'bad-request', /"totp"\|"email"\|"backup"/, 'unknown method');
  await expectError(api.post(u('alice', 'totp/confirm'), { ip: A, code: 123456 }), 400, 'bad-request', /code: expected the 6-digit code/, 'code not a string');
  await expectError(api.post(u('alice', 'email'), { ip: A, address: 'not an address' }), 400, 'bad-request', /address: expected a mail address/, 'bad address');
  await expectError(api.post(u('alice', 'email/code'), 'ip=1.2.3.4', { 'content-type': 'application/x-www-form-urlencoded' }), 415, 'unsupported-media-type', /application\/json/, 'form body');
  await expectError(api.get(`${u('alice', 'status')}?ip=nope`), 400, 'bad-request', /ip: expected/, 'bad ip in the query');
  await expectError(api.get(`${u('alice', 'status')}?user=bob`), 400, 'bad-request', /unknown query parameter "user"; expected "ip"/, 'unknown query parameter');
  await expectError(api.get(`${u('alice', 'status')}?ip=${A}&ip=${B}`), 400, 'bad-request', /more than once/, 'repeated query parameter');
  await expectError(api.del(u('alice', 'grants/abc'), { ip: A }), 400, 'bad-request', /id: expected a grant number/, 'grant id not a number');
  await expectError(api.del(u('alice', 'grants/0'), { ip: A }), 400, 'bad-request', /id: expected a grant number/, 'grant id 0');
  await expectError(api.get('/v1/users/al%ZZice/status'), 400, 'bad-request', /malformed %-escape/, 'malformed escape');
  await expectError(api.get('/v1/users/al%00ice/status'), 400, 'bad-request', /user: not an acceptable user name/, 'NUL in the user');
  await expectError(api.get(`/v1/users/${'x'.repeat(300)}/status`), 400, 'bad-request', /user: not an acceptable user name/, 'user name too long');

  // Malformed HTTP on a raw connection.
  const raw = await new Promise<string>((resolve) => {
    const s = net.connect(d.apiSocket);
    let got = '';
    s.on('data', (b: Buffer) => (got += b.toString()));
    s.on('close', () => resolve(got));
    s.on('error', () => resolve(got));
    s.write('NOT HTTP AT ALL\r\n\r\n');
  });
  t.match(raw, /^HTTP\/1\.1 400 /, 'malformed HTTP: 400');

  const after = await api.get(u('alice', 'status'));
  t.equal(after.status, 200, 'the daemon still answers');
  t.ok(d.logs.some((l) => l['event'] === 'api' && l['status'] === 413), 'the 413 is logged');
});

t.test('an unexpected error is a 500 without details to the client, with a log line', async (t) => {
  const mfa = d.daemon.mfa;
  const original = mfa.status.bind(mfa);
  mfa.status = () => {
    throw new Error('database exploded at /secret/place');
  };
  t.teardown(() => {
    mfa.status = original;
  });
  const r = await api.get(u('alice', 'status'));
  t.equal(r.status, 500);
  t.same(r.json, { error: 'internal', message: 'internal error: the daemon log has the details' });
  t.notMatch(r.text, /exploded|secret|at /, 'no error text or stack to the client');
  const line = d.logs.findLast((l) => l['event'] === 'api');
  t.match(line, { level: 'error', route: 'GET /v1/users/{user}/status', user: 'alice', status: 500, error: 'internal', detail: 'database exploded at /secret/place' });
  mfa.status = original;
  t.equal((await api.get(u('alice', 'status'))).status, 200, 'and the next request is fine');
});

t.test('the app: begin, confirm, enable, verify from A, grants, revoke, disable, remove', async (t) => {
  const user = 'alice';
  // Enabling needs a registered factor.
  const early = await api.put(u(user, 'mfa'), { ip: A });
  t.equal(early.status, 409);
  t.equal(early.json.error, 'no-factor');

  const begin = await api.post(u(user, 'totp'), { ip: A });
  t.equal(begin.status, 200, begin.text);
  const { secret, uri, qr_svg } = begin.json as { secret: string; uri: string; qr_svg: string };
  secrets.add(secret);
  t.match(secret, /^[A-Z2-7]{32}$/, 'a base32 secret of 160 bits');
  t.match(uri, /^otpauth:\/\/totp\/Example%20Univ:alice\?/, 'otpauth URI with the issuer as label prefix');
  t.match(uri, /[?&]issuer=Example(%20|\+)Univ(&|$)/, 'and as issuer parameter');
  t.match(uri, new RegExp(`[?&]secret=${secret}(&|$)`));
  t.match(qr_svg, /^<svg[^>]*xmlns="http:\/\/www\.w3\.org\/2000\/svg"/, 'the QR code as SVG');
  t.equal((await api.get(u(user, 'status'))).json.factors.totp, false, 'not registered before the confirmation');

  // A wrong code does not confirm.
  const wrong = await api.post(u(user, 'totp/confirm'), { ip: A, code: codeAt(secret, now - 10 * 60_000) });
  t.equal(wrong.status, 403);
  t.same(wrong.json, { error: 'factor-failed', message: 'the code is not right' }, 'only that it failed');
  const phone = app(secret);
  const confirm = await api.post(u(user, 'totp/confirm'), { ip: A, code: await phone.next() });
  t.equal(confirm.status, 200, confirm.text);
  t.same(confirm.json, { registered: true });
  const confirmAgain = await api.post(u(user, 'totp/confirm'), { ip: A, code: await phone.next() });
  t.equal(confirmAgain.status, 409, 'nothing left to confirm');

  // Enable.
  const enable = await api.put(u(user, 'mfa'), { ip: A });
  t.equal(enable.status, 200, enable.text);
  t.same(enable.json, { mfa_enabled: true });
  let st = (await api.get(`${u(user, 'status')}?ip=${A}`)).json;
  t.match(st, { user, mfa_enabled: true, mfa_required: true, factors: { totp: true }, login: { ip: A, needs_mfa: true, rule: 'no-grant' } });
  t.type(st.login.explanation, 'string');

  // Verify from A: a grant for A's block, and the Dovecot endpoint lets mail programs in from A only.
  const code = await phone.next();
  const v = await api.post(u(user, 'verify'), { ip: A, factor: { method: 'totp', code } });
  t.equal(v.status, 200, v.text);
  t.match(v.json, { grant: { id: Number, block: A, ip: A, method: 'totp' } });
  t.equal(Date.parse(v.json.grant.expires_at) - Date.parse(v.json.grant.created_at), 14 * 3600_000, '14 hours');
  t.equal(Date.parse(v.json.grant.created_at), now, 'at the injected clock');
  const replay = await api.post(u(user, 'verify'), { ip: A, factor: { method: 'totp', code } });
  t.equal(replay.status, 403, 'the same code twice: refused');
  t.equal(replay.json.error, 'factor-failed');
  st = (await api.get(`${u(user, 'status')}?ip=${A}`)).json;
  t.match(st.login, { needs_mfa: false, rule: 'grant' });
  t.equal(st.grants.length, 1);
  t.match((await api.get(`${u(user, 'status')}?ip=${B}`)).json.login, { ip: B, needs_mfa: true, rule: 'no-grant' });
  t.equal(await dovecotSays(user, A), 'allow', 'Dovecot endpoint: allowed from A');
  t.equal(await dovecotSays(user, B), 'refuse', 'Dovecot endpoint: refused from B');

  // A second grant from B, then the user's own list and revoke.
  const vb = await api.post(u(user, 'verify'), { ip: B, factor: { method: 'totp', code: await phone.next() } });
  t.equal(vb.status, 200, vb.text);
  const list = await api.get(u(user, 'grants'));
  t.equal(list.status, 200);
  t.same(
    list.json.grants.map((g: { ip: string }) => g.ip).sort(),
    [A, B].sort(),
  );
  const rv = await api.del(u(user, `grants/${vb.json.grant.id}`), { ip: A });
  t.equal(rv.status, 200, rv.text);
  t.match(rv.json, { grant: { id: vb.json.grant.id, ip: B } });
  t.equal(await dovecotSays(user, B), 'refuse', 'revoked: refused from B at once');
  t.same((await api.get(u(user, 'grants'))).json.grants.map((g: { ip: string }) => g.ip), [A]);
  const rvAgain = await api.del(u(user, `grants/${vb.json.grant.id}`), { ip: A });
  t.equal(rvAgain.status, 409, 'revoking twice: conflict');
  t.equal(rvAgain.json.error, 'conflict');
  const other = await api.del(u('mallory', `grants/${v.json.grant.id}`), { ip: A });
  t.equal(other.status, 409, "another user's grant cannot be revoked");
  t.equal(other.json.error, 'not-registered');
  t.equal(await dovecotSays(user, A), 'allow', "and alice's grant stands");

  // The proof rule: replacing the app needs a passed factor.
  await advance(30_000);
  const noProof = await api.post(u(user, 'totp'), { ip: A });
  t.equal(noProof.status, 403);
  t.equal(noProof.json.error, 'proof-required');
  const badProof = await api.post(u(user, 'totp'), { ip: A, factor: { method: 'totp', code: '000000' === codeAt(secret, now) ? '111111' : '000000' } });
  t.equal(badProof.status, 403);
  t.equal(badProof.json.error, 'factor-failed');
  const rebegin = await api.post(u(user, 'totp'), { ip: A, factor: { method: 'totp', code: await phone.next() } });
  t.equal(rebegin.status, 200, 'a new enrolment with a proof');
  secrets.add(rebegin.json.secret);
  const phone2 = app(rebegin.json.secret);
  t.equal((await api.post(u(user, 'totp/confirm'), { ip: A, code: await phone2.next() })).status, 200, 'the new phone is confirmed');
  const oldPhone = await api.post(u(user, 'verify'), { ip: A, factor: { method: 'totp', code: await phone.next() } });
  t.equal(oldPhone.status, 403, 'the old phone no longer works');

  // Removing the last factor while MFA is enabled is refused; disabling needs a passed factor.
  await advance(30_000);
  const last = await api.del(u(user, 'totp'), { ip: A, factor: { method: 'totp', code: await phone2.next() } });
  t.equal(last.status, 409);
  t.match(last.json.message, /last registered factor/);
  const disableNoProof = await api.del(u(user, 'mfa'), { ip: A });
  t.equal(disableNoProof.status, 403);
  t.equal(disableNoProof.json.error, 'proof-required');
  const disable = await api.del(u(user, 'mfa'), { ip: A, factor: { method: 'totp', code: await phone2.next() } });
  t.equal(disable.status, 200, disable.text);
  t.same(disable.json, { mfa_enabled: false });
  t.match((await api.get(`${u(user, 'status')}?ip=${B}`)).json, { mfa_enabled: false, mfa_required: false, login: { needs_mfa: false, rule: 'mfa-not-required' } });
  const removeNoProof = await api.del(u(user, 'totp'), { ip: A });
  t.equal(removeNoProof.status, 403, 'removing the app needs a proof too');
  await advance(30_000);
  const remove = await api.del(u(user, 'totp'), { ip: A, factor: { method: 'totp', code: await phone2.next() } });
  t.equal(remove.status, 200, remove.text);
  t.same(remove.json, { removed: true });
  t.equal((await api.get(u(user, 'status'))).json.factors.totp, false);
  t.equal((await api.del(u(user, 'totp'), { ip: A })).json.error, 'not-registered', 'removing it again');
});

t.test('the external address: campus domains refused, prove with a mailed code, login codes, change with notice, remove', async (t) => {
  const user = 'bob';
  for (const address of ['bob@example.ac.jp', 'bob@st.example.ac.jp', 'Bob@EXAMPLE.AC.JP']) {
    const r = await api.post(u(user, 'email'), { ip: A, address });
    t.equal(r.status, 422, `${address} refused`);
    t.equal(r.json.error, 'refused-domain');
  }
  t.equal(sink.messages.length, 0, 'nothing was sent for a refused address');

  const reg = await api.post(u(user, 'email'), { ip: A, address: 'bob.private@gmail.com' });
  t.equal(reg.status, 200, reg.text);
  t.equal(reg.json.pending, 'b***@gmail.com', 'masked');
  t.equal(Date.parse(reg.json.expires_at), now + 10 * 60_000, 'the code lives [otp] ttl');
  const verifyMail = await sink.waitFor('bob.private@gmail.com');
  t.equal(verifyMail.from, 'mfa@example.ac.jp', 'from [mail] from');
  t.match(verifyMail.subject, /Confirm your external address/);
  const verifyCode = codeIn(verifyMail.text);
  secrets.add(verifyCode);
  t.match(verifyCode, /^\d{6}$/, '[otp] digits');
  t.match((await api.get(u(user, 'status'))).json.factors, { email: null, email_pending: 'b***@gmail.com' });

  const badConfirm = await api.post(u(user, 'email/confirm'), { ip: A, code: verifyCode === '000000' ? '111111' : '000000' });
  t.equal(badConfirm.status, 403);
  t.equal(badConfirm.json.error, 'factor-failed');
  const confirm = await api.post(u(user, 'email/confirm'), { ip: A, code: ` ${verifyCode} ` });
  t.equal(confirm.status, 200, confirm.text);
  t.same(confirm.json, { address: 'b***@gmail.com' });
  t.match((await api.get(u(user, 'status'))).json.factors, { email: 'b***@gmail.com', email_pending: null });
  t.equal((await api.post(u(user, 'email/confirm'), { ip: A, code: verifyCode })).status, 409, 'a used confirmation code: nothing to confirm');

  // A login code, then verify with it.
  const send = await api.post(u(user, 'email/code'), { ip: A });
  t.equal(send.status, 200, send.text);
  t.same(send.json, { sent_to: 'b***@gmail.com', expires_at: new Date(now + 10 * 60_000).toISOString() });
  const otpMail = await sink.waitFor('bob.private@gmail.com', (m) => m.subject === 'OTP notification (OTP発行のお知らせ)');
  const loginCode = codeIn(otpMail.text);
  secrets.add(loginCode);
  t.match(otpMail.text, A, 'the mail names the requesting address');
  const again = await api.post(u(user, 'email/code'), { ip: A });
  t.equal(again.status, 429, 'one code a minute');
  t.equal(again.headers['retry-after'], '60');
  t.match(again.json, { error: 'rate-limited', retry_after: 60 });
  const v = await api.post(u(user, 'verify'), { ip: B, factor: { method: 'email', code: loginCode } });
  t.equal(v.status, 200, v.text);
  t.match(v.json.grant, { ip: B, method: 'email' });
  const notice = await sink.waitFor('bob.private@gmail.com', (m) => m.subject.startsWith('MFA succeeded'));
  t.match(notice.text, B, 'the grant notice names the address');
  t.equal((await api.post(u(user, 'verify'), { ip: B, factor: { method: 'email', code: loginCode } })).status, 403, 'a login code works once');

  // Changing the address needs a passed factor; the old address is told.
  const tooSoon = await api.post(u(user, 'email'), { ip: A, address: 'bob.new@example.com' });
  t.equal(tooSoon.status, 429, 'a second confirmation mail within the minute: rate-limited');
  t.ok(Number(tooSoon.headers['retry-after']) > 0, 'with Retry-After');
  await advance(61_000);
  const noProof = await api.post(u(user, 'email'), { ip: A, address: 'bob.new@example.com' });
  t.equal(noProof.status, 403);
  t.equal(noProof.json.error, 'proof-required');
  const same = await api.post(u(user, 'email'), { ip: A, address: 'BOB.PRIVATE@gmail.com' });
  t.equal(same.status, 409, 'the registered address again: conflict');
  await advance(61_000);
  t.equal((await api.post(u(user, 'email/code'), { ip: A })).status, 200, 'after a minute: another login code');
  const proofCode = codeIn((await sink.waitFor('bob.private@gmail.com', (m) => m.subject === 'OTP notification (OTP発行のお知らせ)' && !m.text.includes(loginCode))).text);
  secrets.add(proofCode);
  const change = await api.post(u(user, 'email'), { ip: A, address: 'bob.new@example.com', factor: { method: 'email', code: proofCode } });
  t.equal(change.status, 200, change.text);
  t.equal(change.json.pending, 'b***@example.com');
  const changeCode = codeIn((await sink.waitFor('bob.new@example.com')).text);
  secrets.add(changeCode);
  t.equal((await api.post(u(user, 'email/confirm'), { ip: A, code: changeCode })).status, 200);
  const told = await sink.waitFor('bob.private@gmail.com', (m) => m.subject.startsWith('Your external address was changed'));
  t.match(told.text, 'b***@example.com', 'the old address is told, with the new one masked');
  t.equal((await api.get(u(user, 'status'))).json.factors.email, 'b***@example.com');

  // A mail server that refuses: 502, nothing stored.
  await advance(61_000);
  sink.refuse = true;
  const failed = await api.post(u(user, 'email/code'), { ip: A });
  sink.refuse = false;
  t.equal(failed.status, 502, failed.text);
  t.equal(failed.json.error, 'mail-failed');
  t.notMatch(failed.text, /example\.com|550/, 'the answer does not echo the mail server');

  // Remove: needs a proof (the user has a factor).
  t.equal((await api.del(u(user, 'email'), { ip: A })).json.error, 'proof-required');
  t.equal((await api.post(u(user, 'email/code'), { ip: A })).status, 200);
  const removeCode = codeIn((await sink.waitFor('bob.new@example.com', (m) => m.subject === 'OTP notification (OTP発行のお知らせ)')).text);
  secrets.add(removeCode);
  const rm = await api.del(u(user, 'email'), { ip: A, factor: { method: 'email', code: removeCode } });
  t.equal(rm.status, 200, rm.text);
  t.same(rm.json, { removed: true });
  t.match((await api.get(u(user, 'status'))).json.factors, { email: null, email_pending: null });
  const noAddress = await api.post(u(user, 'email/code'), { ip: A });
  t.equal(noAddress.status, 409, 'no address: no login code');
  t.equal(noAddress.json.error, 'not-registered');
});

t.test('backup codes: need a factor, shown once, each works once, regenerate voids the old ones', async (t) => {
  const user = 'carol';
  const none = await api.post(u(user, 'backup-codes'), { ip: A });
  t.equal(none.status, 409);
  t.equal(none.json.error, 'no-factor');
  const begin = await api.post(u(user, 'totp'), { ip: A });
  secrets.add(begin.json.secret);
  const phone = app(begin.json.secret);
  t.equal((await api.post(u(user, 'totp/confirm'), { ip: A, code: await phone.next() })).status, 200);
  t.equal((await api.post(u(user, 'backup-codes'), { ip: A })).json.error, 'proof-required', 'generating needs a passed factor');
  const gen = await api.post(u(user, 'backup-codes'), { ip: A, factor: { method: 'totp', code: await phone.next() } });
  t.equal(gen.status, 200, gen.text);
  const codes = gen.json.codes as string[];
  codes.forEach((c) => secrets.add(c));
  t.equal(codes.length, 10);
  t.equal(new Set(codes).size, 10, 'all different');
  for (const c of codes) t.match(c, /^[2-9a-z]{5}-[2-9a-z]{5}$/);
  t.equal((await api.get(u(user, 'status'))).json.factors.backup_codes_left, 10);

  const first = codes[0] ?? '';
  const v = await api.post(u(user, 'verify'), { ip: A, factor: { method: 'backup', code: first.toUpperCase().replace('-', ' ') } });
  t.equal(v.status, 200, 'a backup code, typed in capitals with a space');
  t.equal(v.json.grant.method, 'backup');
  t.equal((await api.post(u(user, 'verify'), { ip: B, factor: { method: 'backup', code: first } })).status, 403, 'used once only');
  t.equal((await api.get(u(user, 'status'))).json.factors.backup_codes_left, 9);

  const regen = await api.post(u(user, 'backup-codes'), { ip: A, factor: { method: 'backup', code: codes[1] } });
  t.equal(regen.status, 200, 'regenerated with a backup code as the proof');
  (regen.json.codes as string[]).forEach((c) => secrets.add(c));
  t.equal((await api.get(u(user, 'status'))).json.factors.backup_codes_left, 10);
  t.equal((await api.post(u(user, 'verify'), { ip: B, factor: { method: 'backup', code: codes[2] } })).status, 403, 'an old code no longer works');
  t.equal((await api.post(u(user, 'verify'), { ip: B, factor: { method: 'backup', code: regen.json.codes[0] } })).status, 200, 'a new one does');
});

t.test('lockout: repeated failures lock the user (423 with Retry-After); the status shows it', async (t) => {
  const user = 'dave';
  const begin = await api.post(u(user, 'totp'), { ip: A });
  secrets.add(begin.json.secret);
  const phone = app(begin.json.secret);
  t.equal((await api.post(u(user, 'totp/confirm'), { ip: A, code: await phone.next() })).status, 200);
  const wrong = { ip: B, factor: { method: 'totp', code: 'abcdef' } };
  for (let i = 1; i <= 3; i++) {
    const r = await api.post(u(user, 'verify'), wrong);
    t.equal(r.status, 403, `failure ${i}: 403`);
  }
  const locked = await api.post(u(user, 'verify'), { ip: B, factor: { method: 'totp', code: await phone.next() } });
  t.equal(locked.status, 423, 'locked, even with the right code');
  t.equal(locked.json.error, 'locked');
  t.equal(locked.headers['retry-after'], String(15 * 60));
  t.equal(locked.json.retry_after, 15 * 60);
  t.equal((await api.get(u(user, 'status'))).json.locked_until, new Date(now + 15 * 60_000).toISOString());
  await advance(15 * 60_000 + 1000);
  t.equal((await api.post(u(user, 'verify'), { ip: B, factor: { method: 'totp', code: await phone.next() } })).status, 200, 'after the lock: in');
  t.equal((await api.get(u(user, 'status'))).json.locked_until, null);
});

t.test('app passcodes: only with a passed factor, shown once, listed with their last use, revoked', async (t) => {
  const user = 'paula';
  t.match((await api.post(u(user, 'passcodes'), { ip: A, name: 'iPhone', factor: { method: 'totp', code: '123456' } })).json, { error: 'no-factor' }, 'no factor, no passcode');
  const begin = await api.post(u(user, 'totp'), { ip: A });
  const phone = new Authenticator(begin.json.secret as string, clock, advance);
  t.equal((await api.post(u(user, 'totp/confirm'), { ip: A, code: await phone.next() })).status, 200);

  const noProof = await api.post(u(user, 'passcodes'), { ip: A, name: 'iPhone' });
  t.equal(noProof.status, 400, 'factor is a required field');
  const wrong = await api.post(u(user, 'passcodes'), { ip: A, name: 'iPhone', factor: { method: 'totp', code: '000000' } });
  t.match(wrong, { status: 403, json: { error: 'factor-failed' } }, 'a wrong code: no passcode');
  for (const [body, what] of [
    [{ ip: A, name: '', factor: { method: 'totp', code: '1' } }, 'an empty name'],
    [{ ip: A, name: 'x'.repeat(65), factor: { method: 'totp', code: '1' } }, 'a long name'],
    [{ ip: A, name: 'phone', protocols: ['imap', 'ftp'], factor: { method: 'totp', code: '1' } }, 'an unknown protocol'],
    [{ ip: A, name: 'phone', protocols: [], factor: { method: 'totp', code: '1' } }, 'no protocol'],
  ] as const) {
    t.match(await api.post(u(user, 'passcodes'), body), { status: 400, json: { error: 'bad-request' } }, what);
  }

  const made = await api.post(u(user, 'passcodes'), { ip: A, name: 'iPhone', protocols: ['imap', 'smtp'], factor: { method: 'totp', code: await phone.next() } });
  t.equal(made.status, 200, made.text);
  t.match(made.json.code, /^[a-hjkmnp-z]{4}( [a-hjkmnp-z]{4}){3}$/, 'four groups of four letters, no look-alikes');
  secrets.add(made.json.code as string);
  secrets.add((made.json.code as string).replace(/ /g, ''));
  t.match(made.json.passcode, { id: Number, name: 'iPhone', protocols: ['imap', 'smtp'], created_by: 'api', expires_at: null, last_used_at: null });

  const list = await api.get(u(user, 'passcodes'));
  t.equal(list.status, 200);
  t.same(list.json.passcodes.map((p: { name: string }) => p.name), ['iPhone']);
  t.same(list.json.app_passcodes, { enabled: true, max_per_user: 3, protocols: ['imap', 'pop3', 'smtp', 'sieve'] }, "and the site's settings, for the webmail");
  t.notMatch(list.text, new RegExp((made.json.code as string).slice(5, 14)), 'the list never shows the passcode');
  const row = await d.daemon.service.store.passcodes.byId(made.json.passcode.id as number);
  t.ok(row && !row.hash.toString('latin1').includes((made.json.code as string).replace(/ /g, '')), 'the store keeps only a hash');

  // At most [app_passcodes] max_per_user (3 here).
  for (const name of ['Android', 'iPad']) t.equal((await api.post(u(user, 'passcodes'), { ip: A, name, factor: { method: 'totp', code: await phone.next() } })).status, 200);
  t.match(await api.post(u(user, 'passcodes'), { ip: A, name: 'fourth', factor: { method: 'totp', code: await phone.next() } }), { status: 409, json: { error: 'conflict', message: /at most 3/ } }, 'the fourth is refused');

  const id = made.json.passcode.id as number;
  const revoked = await api.del(u(user, `passcodes/${id}`), { ip: A });
  t.equal(revoked.status, 200);
  t.type(revoked.json.passcode.revoked_at, 'string');
  t.match(await api.del(u(user, `passcodes/${id}`), { ip: A }), { status: 409, json: { error: 'not-registered' } }, 'revoked twice: gone');
  const left = (await api.get(u(user, 'passcodes'))).json.passcodes as { id: number }[];
  t.equal(left.length, 2, 'two left');
  t.match(await api.del(u('someone-else', `passcodes/${left[0]?.id}`), { ip: A }), { status: 409, json: { error: 'not-registered' } }, "another user's passcode cannot be revoked");
  t.equal((await api.get(u(user, 'passcodes'))).json.passcodes.length, 2, 'still two');
});

t.test('user names are normalised like logins; one log line per action, never a secret', async (t) => {
  const r = await api.get(`/v1/users/${encodeURIComponent('ALICE')}/grants`);
  t.equal(r.status, 200);
  t.same(
    r.json.grants.map((g: { ip: string }) => g.ip),
    [A],
    'ALICE is alice',
  );
  const apiLines = d.logs.filter((l) => l['event'] === 'api');
  t.ok(apiLines.length > 50, 'api lines were logged');
  for (const l of apiLines) {
    t.type(l['route'], 'string');
    t.type(l['status'], 'number');
  }
  t.match(apiLines.find((l) => l['route'] === 'POST /v1/users/{user}/verify' && l['status'] === 200), { user: String, ip: String });
  const text = d.logs.map((l) => JSON.stringify(l)).join('\n');
  for (const s of secrets) t.notOk(text.includes(s), `the log never holds ${s.length > 12 ? 'a secret or token' : 'a code'}`);
  t.notMatch(text, /<svg|otpauth:/, 'nor a QR code or URI');
  // Every route was answered 200 at least once in this file.
  for (const route of API_ROUTES) {
    t.ok(
      apiLines.some((l) => l['route'] === `${route.method} ${route.path}` && l['status'] === 200),
      `${route.method} ${route.path} exercised`,
    );
  }
});

t.test('start errors: a TCP API listener without a usable token file; nothing stays bound', async (t) => {
  for (const [label, files, expect] of [
    ['missing token file', {}, /api\.token_file: cannot read .*api\.token: no such file/],
    ['empty token file', { 'api.token': '\n' }, /api\.token_file: .*api\.token is empty/],
    ['two words', { 'api.token': 'two words\n' }, /api\.token_file: .*one word of printable ASCII/],
  ] as const) {
    const dir = tempDir('mfagate-api-start-');
    const port = await freePort();
    const apiPort = await freePort();
    const err = await startApiDaemon({
      dir,
      files,
      toml: `[dovecot]\nlisten = ["127.0.0.1:${port}"]\n[api]\nlisten = ["unix:api.sock", "127.0.0.1:${apiPort}"]\ntoken_file = "api.token"\n`,
    }).then(
      () => undefined,
      (e: unknown) => e,
    );
    t.ok(err instanceof StartError, `${label}: a StartError`);
    t.match((err as Error).message, expect, `${label}: says what to fix`);
    t.notOk(fs.existsSync(path.join(dir, 'api.sock')), `${label}: no API socket left`);
    t.notOk(fs.existsSync(path.join(dir, 'policy.sock')), `${label}: no Postfix socket left`);
    for (const p of [port, apiPort]) {
      await t.resolves(
        new Promise<void>((resolve, reject) => {
          const s = net.createServer();
          s.once('error', reject);
          s.listen(p, '127.0.0.1', () => s.close(() => resolve()));
        }),
        `${label}: port ${p} is free`,
      );
    }
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

t.test('start errors: the API port is taken; the listeners bound before it are closed again', async (t) => {
  const dir = tempDir('mfagate-api-start-');
  const port = await freePort();
  const blocker = net.createServer();
  await new Promise<void>((resolve) => blocker.listen(0, '127.0.0.1', resolve));
  const taken = (blocker.address() as net.AddressInfo).port;
  t.teardown(() => new Promise<void>((resolve) => blocker.close(() => resolve())));
  const err = await startApiDaemon({
    dir,
    files: { 'api.token': `${TOKEN}\n` },
    toml: `[dovecot]\nlisten = ["127.0.0.1:${port}"]\n[api]\nlisten = ["unix:api.sock", "127.0.0.1:${taken}"]\ntoken_file = "api.token"\n`,
  }).then(
    () => undefined,
    (e: unknown) => e,
  );
  t.match((err as Error).message, new RegExp(`cannot listen on 127\\.0\\.0\\.1:${taken}`));
  t.notOk(fs.existsSync(path.join(dir, 'api.sock')), 'the API socket bound before it is gone');
  t.notOk(fs.existsSync(path.join(dir, 'policy.sock')), 'the Postfix socket is gone');
  await t.resolves(
    new Promise<void>((resolve, reject) => {
      const s = net.createServer();
      s.once('error', reject);
      s.listen(port, '127.0.0.1', () => s.close(() => resolve()));
    }),
    'the Dovecot port is free again',
  );
  fs.rmSync(dir, { recursive: true, force: true });
});

/** What the Dovecot endpoint of the same daemon answers for an IMAP login. */
async function dovecotSays(user: string, ip: string): Promise<'allow' | 'refuse'> {
  const res = await fetch(`http://127.0.0.1:${d.dovecotPort}/?command=allow`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ login: user, remote: ip, protocol: 'imap' }),
  });
  const body = (await res.json()) as { status: number };
  return body.status === 0 ? 'allow' : 'refuse';
}
