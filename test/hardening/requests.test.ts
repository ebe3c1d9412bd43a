// Odd requests against the real daemon, and a real Dovecot whose auth_policy_request_attributes leave out the
// protocol. Each of these was let through before (issue 8, items 8 and 9):
//   - the IPv4-compatible form ::a.b.c.d was taken as the IPv4 address a.b.c.d (only ::ffff:0:0/96 maps), and an
//     IPv4 part inside IPv6 text was read leniently (::ffff:010.0.0.1 as 10.0.0.1), on every endpoint;
//   - a missing, empty or odd protocol was allowed as "protocol-not-enforced", a non-string remote fell back to
//     rip and a non-string login to user, and a repeated attribute was resolved by its order (Dovecot and Postfix).
// Now every one of them is refused: a 400 to Dovecot (which, with auth_policy_reject_on_fail = yes, refuses the
// login), no reply to Postfix (which then applies its default_action), a 400 from the API and the page.
import t from 'tap';
import { imapLogin } from '../helpers/clients.js';
import { tempDir } from '../helpers/daemon.js';
import { freePort, startMailStack } from '../helpers/mailstack.js';
import { type Served, POLICY_KEY, askPolicy, askPostfix, loginBody, postfixRequest, serve } from '../helpers/served.js';
import { WebClient } from '../helpers/web.js';

const OUTSIDE = '198.51.100.7';

let d: Served;
t.before(async () => {
  d = await serve({ web: true, toml: '[networks]\ntrusted = ["10.0.0.0/8"]\n[web]\ntrusted_proxies = ["127.0.0.1"]\n' });
  t.equal(d.cli('users', 'enable', 'alice').code, 0);
  t.equal(d.cli('grants', 'add', '--user', 'alice', '--ip', OUTSIDE).code, 0);
});
t.teardown(() => d?.close());

const decisions = () => d.logs().filter((l) => l['event'] === 'decision');

t.test('addresses: ::a.b.c.d is not a.b.c.d, and an embedded IPv4 part is strict, on every endpoint', async (t) => {
  // The grant is for 198.51.100.7; the compatible form spells another (IPv6) address.
  const control = await askPolicy(d.dovecotPort, loginBody('alice', OUTSIDE));
  t.equal(control.allow, true, 'control: the grant lets alice in from 198.51.100.7');
  const compat = await askPolicy(d.dovecotPort, loginBody('alice', `::${OUTSIDE}`));
  t.equal(compat.status, 200);
  t.equal(compat.allow, false, '::198.51.100.7 is not covered by the grant for 198.51.100.7');
  const line = await d.waitForLog((l) => l['event'] === 'decision' && l['ip'] === '::c633:6407');
  t.match(line, { user: 'alice', result: 'refuse', rule: 'no-grant', block: '::/64' }, 'decided as the IPv6 address it is');
  t.equal((await askPolicy(d.dovecotPort, loginBody('alice', '::ffff:198.51.100.7'))).allow, true, 'the mapped form ::ffff:a.b.c.d is a.b.c.d');

  for (const remote of ['::ffff:010.0.0.1', '::ffff:198.51.100.07', '::ffff:0xc6.51.100.7', '010.0.0.1', ' 198.51.100.7']) {
    const r = await askPolicy(d.dovecotPort, loginBody('alice', remote));
    t.equal(r.status, 400, `Dovecot: remote ${JSON.stringify(remote)} is refused (400), not read as something else`);
  }
  t.ok(await d.waitForLog((l) => l['event'] === 'bad-request' && l['error'] === 'remote address is not an IP address'), 'and logged');

  // 10.0.0.0/8 is trusted: a lenient reading of ::ffff:010.0.0.1 would let alice in from "campus".
  t.equal(await askPostfix(d.postfixSocket, postfixRequest('alice', '::ffff:010.0.0.1')), undefined, 'Postfix: no reply, the connection is closed');
  t.equal(await askPostfix(d.postfixSocket, postfixRequest('alice', '10.0.0.1')), 'action=DUNNO', 'control: campus is let through');

  const status = await d.api.get('/v1/users/alice/status?ip=::ffff:0xcb.0.113.7');
  t.equal(status.status, 400, 'API: a lenient address in ?ip is a bad request');
  t.match(status.json, { error: 'bad-request', message: /ip: expected the client IP address/ });
  const verify = await d.api.post('/v1/users/alice/verify', { ip: '::ffff:010.0.0.1', factor: { method: 'backup', code: 'x' } });
  t.equal(verify.status, 400, 'API: and in a body');

  if (d.webPort === undefined) throw new Error('the page has no port');
  const viaProxy = (xff: string) => new WebClient(d.webPort ?? 0, { headers: { 'X-Forwarded-For': xff } }).get('/');
  t.equal((await viaProxy('203.0.113.9')).status, 200, 'the page: a plain forwarded address is fine');
  for (const xff of ['::ffff:010.0.0.1', '::ffff:203.0.113.07', '203.0.113.09']) {
    t.equal((await viaProxy(xff)).status, 400, `the page: X-Forwarded-For ${xff} from the trusted proxy is refused`);
  }
});

t.test('Dovecot: a request without a usable protocol, login or address is a 400, never allowed', async (t) => {
  const cases: [string, string | Record<string, unknown>, RegExp][] = [
    ['no protocol', { login: 'alice', remote: '203.0.113.50' }, /missing "protocol"/],
    ['an empty protocol', { login: 'alice', remote: '203.0.113.50', protocol: '' }, /missing "protocol"/],
    ['"imap " with a space', { login: 'alice', remote: '203.0.113.50', protocol: 'imap ' }, /not a protocol name/],
    ['a protocol that is not a string', { login: 'alice', remote: '203.0.113.50', protocol: ['imap'] }, /"protocol" is not a string/],
    ['a non-string remote with rip beside it', { login: 'alice', remote: 5, rip: OUTSIDE, protocol: 'imap' }, /"remote" is not a string/],
    ['a non-string login with user beside it', { login: { x: 1 }, user: 'bob', remote: '203.0.113.50', protocol: 'imap' }, /"login" is not a string/],
    ['login and user both', { login: 'alice', user: 'bob', remote: '203.0.113.50', protocol: 'imap' }, /"login" and "user" both given/],
    ['a repeated key', '{"login":"bob","login":"alice","remote":"203.0.113.50","protocol":"imap"}', /attribute "login" given twice/],
    ['a real_remote that is no address', { login: 'alice', remote: '203.0.113.50', real_remote: 'webmail', protocol: 'imap' }, /real_remote address is not an IP address/],
  ];
  for (const [what, body, error] of cases) {
    const r = await askPolicy(d.dovecotPort, body);
    t.equal(r.status, 400, `${what}: 400`);
    t.match((JSON.parse(r.body) as { error?: string }).error, error, `${what}: the answer says why`);
  }
  t.notOk(decisions().some((l) => l['rule'] === 'protocol-not-enforced'), 'no request was let through as an unenforced protocol');
  // What a well-formed request for a protocol outside the list still gets.
  const other = await askPolicy(d.dovecotPort, loginBody('alice', '203.0.113.50', 'x-other'));
  t.equal(other.allow, true, 'a named protocol outside the enforced list is allowed, as configured');
  const report = await askPolicy(d.dovecotPort, { login: 'alice', remote: '203.0.113.50', protocol: 'imap' }, { command: 'report' });
  t.equal(report.status, 400, 'a report without "success" is refused too');
});

t.test('Postfix: a repeated attribute is refused (no reply), not resolved by its order', async (t) => {
  const twice = postfixRequest('bob', '203.0.113.50', 'sasl_username=alice\n');
  t.equal(await askPostfix(d.postfixSocket, twice), undefined, 'two sasl_username lines: the connection is closed without a reply');
  const client = postfixRequest('alice', '203.0.113.50', 'client_address=10.0.0.1\n');
  t.equal(await askPostfix(d.postfixSocket, client), undefined, 'two client_address lines: the same');
  t.ok(await d.waitForLog((l) => l['event'] === 'bad-request' && l['endpoint'] === 'postfix' && /"sasl_username" given twice/.test(String(l['error']))), 'logged with the reason');
  t.match(await askPostfix(d.postfixSocket, postfixRequest('alice', '203.0.113.50')), /^action=554 5\.7\.1 MFA required/, 'control: alice from outside is refused');
});

t.test('a real Dovecot whose attributes leave out the protocol: logins are refused, not let through', async (t) => {
  // A site that copied the attribute line without protocol=%s. Before, every request then looked like a
  // protocol outside the enforced list, and MFA was off for everyone without a word.
  const port = await freePort();
  const dir = tempDir('mfagate-hardening-noproto-');
  const m = await serve({ dir, dovecotPort: port });
  t.teardown(() => m.close());
  t.equal(m.cli('users', 'enable', 'alice').code, 0);
  const stack = await startMailStack({
    users: { alice: 'alice-pw' },
    policyUrl: `http://127.0.0.1:${port}/`,
    policyApiHeader: `X-API-Key: ${POLICY_KEY}`,
    policyAttributes: 'recommended',
    dovecotExtra: 'auth_policy_request_attributes = login=%{requested_username} remote=%{rip} real_remote=%{real_rip}',
  });
  t.teardown(() => stack.stop());
  const r = await imapLogin({ port: stack.imapPort, user: 'alice', password: 'alice-pw', localAddress: '127.0.0.9' });
  t.equal(r.ok, false, 'the IMAP login from outside is refused', { transcript: r.transcript.join('\n') });
  await m.waitForLog((l) => l['event'] === 'bad-request' && l['error'] === 'missing "protocol"');
  t.notOk(m.logs().some((l) => l['event'] === 'decision' && l['user'] === 'alice' && l['result'] === 'allow'), 'nothing was allowed for alice');
  t.match(stack.dovecotLog(), /Error: policy\(alice,127\.0\.0\.9,[^)]*\): Policy server HTTP error: 400/, "Dovecot's log tells the admin the policy server refused the request");
});
