// The limits on guessing, against the real daemon and a real Dovecot that drops the domain and lower-cases
// names (auth_username_format = %Ln), as many sites do (issue 8, item 2):
//   - sign-in failures were counted under mfagate's normalised name only, so "alice@a.example",
//     "alice@b.example", ... (or, without [users] lowercase, "BOB", "Bob", ...) were each a fresh counter for the
//     one user Dovecot signs in; they now count under every name the attempt may be, and under the user Dovecot
//     resolved, so the right password after the limit is refused;
//   - every per-address limit counted exact addresses, so one IPv6 /64 gave unlimited tries; they now count per
//     [grants] ipv6_prefix block: the page's sign-in, factor failures through the API, and mailed codes.
import path from 'node:path';
import t from 'tap';
import { Authenticator, codeIn, decodeMail } from '../helpers/api.js';
import { type MailStack, startMailStack } from '../helpers/mailstack.js';
import { type Served, serve } from '../helpers/served.js';
import { WebClient, hasId, textOf } from '../helpers/web.js';

const USERS = { alice: 'alice-pw', bob: 'bob-pw', carol: 'carol-pw', erin: 'erin-pw' };
let stack: MailStack;
let d: Served;

t.before(async () => {
  stack = await startMailStack({
    users: USERS,
    dovecotExtra: 'auth_username_format = %Ln',
    // mfagate mails codes through this Postfix (from loopback, without AUTH).
    postfixExtra: 'smtpd_recipient_restrictions = permit_mynetworks, permit_sasl_authenticated, reject',
  });
  d = await serve({
    web: true,
    toml:
      `[web]\ndovecot_auth_socket = "${path.join(stack.dir, 'run/auth-client')}"\ntrusted_proxies = ["127.0.0.1"]\n` +
      `[users]\nlowercase = false\n[lockout]\nmax_failures = 3\nip_max_failures = 5\n` +
      `[mail]\nsmtp = "smtp://127.0.0.1:${stack.smtpPort}"\nfrom = "mfagate@${stack.domain}"\nnotify = false\n`,
  });
});
t.teardown(async () => {
  await d?.close();
  await stack?.stop();
});

const at = (ip: string) => new WebClient(d.webPort ?? 0, { headers: { 'X-Forwarded-For': ip } });
let n = 0;
/** A fresh browser from a fresh IPv4 address (so the per-address limit stays out of the per-ID tests). */
const fresh = () => at(`192.0.2.${++n}`);

async function signIn(c: WebClient, user: string, password: string) {
  const r = await c.signIn(user, password);
  return { status: r.status, error: textOf(r.body, 'signin-password-error'), signedIn: r.status === 303 && hasId((await c.get('/')).body, 'network-status') };
}

t.test('sign-in: other domains of the same user share its failures', async (t) => {
  for (const name of ['alice@a.example', 'alice@b.example', 'ALICE@c.example']) {
    t.match(await signIn(fresh(), name, 'wrong'), { status: 401, signedIn: false }, `${name}: wrong password`);
  }
  const right = await signIn(fresh(), 'alice@d.example', USERS.alice);
  t.match(right, { status: 429, signedIn: false }, 'the right password under a fourth domain is refused: the limit holds');
  t.match(right.error, /^Too many failed sign-ins/, 'and the page says why');
  t.match(await signIn(fresh(), 'alice', USERS.alice), { status: 429, signedIn: false }, 'plain "alice" too');
  t.notOk(d.logs().some((l) => l['event'] === 'web-signin' && l['result'] === 'ok'), 'nobody was signed in');
});

t.test('sign-in: names that only Dovecot makes one (case, with [users] lowercase = false) share the failures', async (t) => {
  for (const name of ['BOB', 'Bob', 'bOB']) t.match(await signIn(fresh(), name, 'wrong'), { status: 401 }, `${name}: wrong password`);
  const right = await signIn(fresh(), 'boB', USERS.bob);
  t.match(right, { status: 429, signedIn: false }, 'the right password is refused: Dovecot said each failure was "bob"');
  const line = await d.waitForLog((l) => l['event'] === 'web-signin' && l['result'] === 'limited' && l['user'] === 'bob');
  t.match(line, { scope: 'user' }, 'logged under the user Dovecot resolved');
});

t.test('sign-in: the per-address limit counts one IPv6 /64 as one address', async (t) => {
  for (let i = 1; i <= 5; i++) t.match(await signIn(at(`2001:db8:1:2::${i}`), `nobody${i}`, 'wrong'), { status: 401 }, `a guess from 2001:db8:1:2::${i}`);
  const same64 = await signIn(at('2001:db8:1:2:ffff:ffff:ffff:ffff'), 'carol', USERS.carol);
  t.match(same64, { status: 429, signedIn: false }, 'another address in the same /64 is limited too');
  t.match(await signIn(at('2001:db8:1:3::1'), 'carol', USERS.carol), { status: 303, signedIn: true }, 'the next /64 is not');
});

t.test('factor failures and mailed codes: the per-address limit counts one IPv6 /64 as one address', async (t) => {
  // erin registers the app and an external address (a mailbox on the test Postfix) from campus.
  const campus = '192.0.2.200';
  const begin = await d.api.post('/v1/users/erin/totp', { ip: campus });
  t.equal(begin.status, 200, begin.text);
  const phone = new Authenticator(begin.json.secret as string);
  t.equal((await d.api.post('/v1/users/erin/totp/confirm', { ip: campus, code: await phone.next() })).status, 200);
  const reg = await d.api.post('/v1/users/erin/email', { ip: campus, address: `carol@${stack.domain}`, factor: { method: 'totp', code: await phone.next() } });
  t.equal(reg.status, 200, reg.text);
  const mail = decodeMail(await stack.waitForMessage('carol', (m) => /^Confirm your external address/.test(decodeMail(m).subject)));
  t.equal((await d.api.post('/v1/users/erin/email/confirm', { ip: campus, code: codeIn(mail.text) })).status, 200);

  // Five wrong codes from five addresses of one /64 (for names that have no factor: each is a failure).
  for (let i = 1; i <= 5; i++) {
    const r = await d.api.post(`/v1/users/ghost${i}/verify`, { ip: `2001:db8:5:6::${i}`, factor: { method: 'totp', code: '123456' } });
    t.equal(r.status, 403, `a wrong code from 2001:db8:5:6::${i}`);
  }
  const code = await phone.next();
  const v = await d.api.post('/v1/users/erin/verify', { ip: '2001:db8:5:6::99', factor: { method: 'totp', code } });
  t.equal(v.status, 429, "erin's right code from the same /64 is refused");
  t.match(v.json, { error: 'rate-limited', message: /too many failed attempts from this address/ });
  const send = await d.api.post('/v1/users/erin/email/code', { ip: '2001:db8:5:6::98' });
  t.equal(send.status, 429, 'and no code is mailed to an address block that is guessing');
  t.match(send.json, { error: 'rate-limited', message: /too many failed attempts from this address/ });

  t.equal((await d.api.post('/v1/users/erin/email/code', { ip: '2001:db8:5:7::1' })).status, 200, 'the next /64 may ask for a mailed code');
  const other = await d.api.post('/v1/users/erin/verify', { ip: '2001:db8:5:7::1', factor: { method: 'totp', code } });
  t.equal(other.status, 200, 'and pass MFA (with the code the refused attempt did not use up)');
  t.equal(other.json.grant.block, '2001:db8:5:7::/64');
});
