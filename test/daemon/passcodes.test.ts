// The daemon's side of app passcodes over its real endpoints (the `mfagate serve` process): POST
// /?command=passcode as the Lua passdb asks it, and what a policy request's `passcode` attribute is worth:
// nothing by itself, a login from any address just after a check of that passcode from that address, and,
// for SMTP, a Postfix check of the same user and address for a while; never a password-only session of
// another user, another address or after a revoke. Every decision names the rule; no passcode is logged.
import t from 'tap';
import { POLICY_KEY, type Served, askPolicy, askPostfix, loginBody, postfixRequest, serve } from '../helpers/served.js';

const OUTSIDE = '203.0.113.50';
const ELSEWHERE = '198.51.100.77';
let s: Served;
let alice = { id: 0, passcode: '' };
let smtpOnly = { id: 0, passcode: '' };

t.before(async () => {
  s = await serve({ toml: '[app_passcodes]\nenabled = true\n' });
  t.equal(s.cli('users', 'enable', 'alice').code, 0);
  t.equal(s.cli('users', 'enable', 'bob').code, 0);
  const made = (args: string[]) => {
    const r = s.cli('passcodes', 'add', '--json', ...args);
    if (r.code !== 0) throw new Error(r.stderr);
    return JSON.parse(r.stdout) as { id: number; passcode: string };
  };
  alice = made(['--user', 'alice', '--name', 'iPhone', '--protocols', 'imap,smtp']);
  smtpOnly = made(['--user', 'bob', '--name', 'Printer', '--protocols', 'smtp']);
});
t.teardown(() => s?.close());

const passcodeCheck = (login: string, passcode: string, remote = OUTSIDE, protocol = 'imap', key = POLICY_KEY) =>
  askPolicy(s.dovecotPort, { login, passcode, remote, real_remote: remote, protocol }, { command: 'passcode', key });

t.test('POST /?command=passcode: the key, the body, the answer', async (t) => {
  t.equal((await passcodeCheck('alice', alice.passcode, OUTSIDE, 'imap', 'wrong-key')).status, 401, 'without the API key: 401');
  const missing = await askPolicy(s.dovecotPort, { login: 'alice', remote: OUTSIDE, protocol: 'imap' }, { command: 'passcode' });
  t.same({ status: missing.status, body: JSON.parse(missing.body) }, { status: 400, body: { error: 'missing "passcode"' } });
  const twice = await askPolicy(s.dovecotPort, `{"login":"alice","passcode":"a","passcode":"b","remote":"${OUTSIDE}","protocol":"imap"}`, { command: 'passcode' });
  t.equal(twice.status, 400, 'a repeated attribute: not judged');
  const ok = await passcodeCheck('alice', alice.passcode);
  t.same({ status: ok.status, body: JSON.parse(ok.body) }, { status: 200, body: { result: 'ok', passcode: String(alice.id) } }, 'right: ok with the id');
  const wrong = await passcodeCheck('alice', alice.passcode.replace(/.$/, (c) => (c === 'a' ? 'b' : 'a')));
  t.same({ status: wrong.status, body: JSON.parse(wrong.body) }, { status: 200, body: { result: 'fail' } }, 'wrong: fail, nothing more');
  t.same(JSON.parse((await passcodeCheck('alice', 'not a passcode at all')).body), { result: 'fail' });
  const line = await s.waitForLog((l) => l['event'] === 'passcode-check' && l['result'] === 'ok');
  t.match(line, { user: 'alice', ip: OUTSIDE, protocol: 'imap', passcode: alice.id, name: 'iPhone' }, 'one log line per check');
});

t.test('the attribute alone is not believed; after a check, from that address only', async (t) => {
  const before = await askPolicy(s.dovecotPort, loginBody('bob', OUTSIDE, 'smtp', { passcode: String(smtpOnly.id) }));
  t.equal(before.allow, false, "a passdb field naming bob's passcode, with no check of it: refused");
  t.ok((await passcodeCheck('alice', alice.passcode)).body.includes('"ok"'));
  const allowed = await askPolicy(s.dovecotPort, loginBody('alice', OUTSIDE, 'imap', { passcode: String(alice.id) }));
  t.equal(allowed.allow, true, 'just checked: allowed from an address without a grant');
  t.equal((await askPolicy(s.dovecotPort, loginBody('alice', ELSEWHERE, 'imap', { passcode: String(alice.id) }))).allow, false, 'the same id from another address: refused');
  t.equal((await askPolicy(s.dovecotPort, loginBody('alice', OUTSIDE, 'pop3', { passcode: String(alice.id) }))).allow, false, 'for pop3 (not one of its protocols): refused');
  t.equal((await askPolicy(s.dovecotPort, loginBody('alice', OUTSIDE, 'imap'))).allow, false, 'without the attribute (the password): refused');
  t.equal((await askPolicy(s.dovecotPort, loginBody('alice', OUTSIDE, 'imap', { passcode: 'x1' }))).status, 400, 'an attribute that is not an id: not judged');
  t.equal((await askPolicy(s.dovecotPort, loginBody('alice', OUTSIDE, 'imap', { passcode: '' }))).allow, false, 'an empty one (a login through the site passdb): as without');
  const decision = await s.waitForLog((l) => l['event'] === 'decision' && l['rule'] === 'app-passcode');
  t.match(decision, { user: 'alice', ip: OUTSIDE, protocol: 'imap', result: 'allow', passcode: alice.id });
  const check = s.cli('check', '--user', 'alice', '--ip', OUTSIDE);
  t.equal(check.code, 1, 'mfagate check (the password alone) from there: refused');
});

t.test("SMTP: Postfix lets the passcode's session through, and nothing else", async (t) => {
  const pf = (user: string, ip: string) => askPostfix(s.postfixSocket, postfixRequest(user, ip));
  t.match(await pf('bob', OUTSIDE), /^action=554 /, 'bob from outside, before: refused');
  t.ok((await passcodeCheck('bob', smtpOnly.passcode, OUTSIDE, 'smtp')).body.includes('"ok"'));
  t.equal((await askPolicy(s.dovecotPort, loginBody('bob', OUTSIDE, 'smtp', { passcode: String(smtpOnly.id) }))).allow, true, "Dovecot's check of the SMTP AUTH");
  t.equal(await pf('bob', OUTSIDE), 'action=DUNNO', "then Postfix's check of that session: let through");
  t.match(await pf('bob', ELSEWHERE), /^action=554 /, 'bob from another address: refused');
  t.match(await pf('alice', OUTSIDE), /^action=554 /, 'another user from the same address (a shared NAT): refused');
  const postfixLine = await s.waitForLog((l) => l['event'] === 'decision' && l['endpoint'] === 'postfix' && l['rule'] === 'app-passcode');
  t.match(postfixLine, { user: 'bob', ip: OUTSIDE, passcode: smtpOnly.id });
  t.equal(s.cli('passcodes', 'revoke', '--user', 'bob', '--id', String(smtpOnly.id)).code, 0);
  t.match(await pf('bob', OUTSIDE), /^action=554 /, 'revoked (by the CLI, in another process): the session ends at once');
});

t.test('no passcode in the log', async (t) => {
  const out = s.logs().map((l) => JSON.stringify(l)).join('\n');
  for (const p of [alice.passcode, smtpOnly.passcode]) t.notOk(out.includes(p.replace(/ /g, '')) || out.includes(p), 'not logged');
});
