// The Dovecot auth-client (web/dovecot-auth.ts) against a real Dovecot 2.3 started by the mail stack harness,
// and against tiny fake servers for the answers a healthy Dovecot never gives (silence, CONT, a proxy OK...).
// The real Dovecot has a dedicated auth listener "mfagate-web" (as a site would configure it) next to its
// default "auth-client", and its auth penalty is switched back on (the harness turns it off) to show that the
// penalty counts the browser's address we send as rip. Every check uses its own documentation address as rip,
// so one check's failures never delay another's.
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { type DovecotAuthRequest, type DovecotAuthResult, checkPassword, tabEscape, tabUnescape } from '../../web/dovecot-auth.js';
import { type MailStack, startMailStack } from '../helpers/mailstack.js';

const USERS = {
  alice: 'alice-pw',
  spacey: 'correct horse battery staple',
  utf8: 'pässwörd-日本語-🔑',
  slashy: 'back\\slash\\\\ and \\t not a tab',
  tabby: 'tab\there',
};

// Dovecot fails the whole start (and this file) when it is missing: the test must fail, never skip.
const stack: MailStack = await startMailStack({
  users: USERS,
  dovecotExtra: [
    'service auth {',
    '  unix_listener mfagate-web {',
    '    mode = 0600',
    '    user = nobody',
    '  }',
    '}',
    'service anvil {',
    '  unix_listener anvil-auth-penalty {',
    '    mode = 0600',
    '  }',
    '}',
  ].join('\n'),
});
t.teardown(() => stack.stop());
const SOCKET = path.join(stack.dir, 'run', 'mfagate-web');
const DEFAULT_SOCKET = path.join(stack.dir, 'run', 'auth-client');

let ipCounter = 0;
/** A fresh TEST-NET-2 address per check (198.51.100.1, .2, ...). */
const nextIp = () => `198.51.100.${++ipCounter}`;

const check = (over: Partial<DovecotAuthRequest> & Pick<DovecotAuthRequest, 'user' | 'password'>, socket = SOCKET) =>
  checkPassword(socket, { remoteIp: nextIp(), localIp: '127.0.0.1', ...over });

const authLines = () => stack.dovecotLog().split('\n').filter((l) => l.includes('client in: AUTH'));
const logTail = () => `\n--- dovecot.log (tail) ---\n${stack.dovecotLog().split('\n').slice(-30).join('\n')}`;

t.test('the right password: ok, with the canonical user name', async (t) => {
  const r = await check({ user: 'alice', password: USERS.alice });
  t.same(r, { ok: true, user: 'alice' }, `dedicated listener${r.ok ? '' : logTail()}`);
  t.same(await check({ user: 'alice', password: USERS.alice }, DEFAULT_SOCKET), { ok: true, user: 'alice' }, 'default auth-client socket');
  // auth_username_format = %Lu (Dovecot's default): the canonical name is lower-case.
  t.same(await check({ user: 'ALICE', password: USERS.alice }), { ok: true, user: 'alice' }, 'ALICE is alice');
});

t.test('wrong password, unknown user: refused, not temporary', async (t) => {
  const [wrong, unknown, otherUsers] = await Promise.all([
    check({ user: 'alice', password: 'alice-pw ' }),
    check({ user: 'mallory', password: 'whatever' }),
    check({ user: 'spacey', password: USERS.alice }),
  ]);
  for (const [name, r] of [['wrong password', wrong], ['unknown user', unknown], ["another user's password", otherUsers]] as const) {
    t.match(r, { ok: false, temporary: false, reason: 'Dovecot refused the user name and password' }, name);
    t.notOk('code' in r, `${name}: no code`);
  }
});

t.test('passwords with spaces, UTF-8 and backslashes reach Dovecot byte for byte', async (t) => {
  const results = await Promise.all(
    (['spacey', 'utf8', 'slashy'] as const).map(async (user) => [user, await check({ user, password: USERS[user] })] as const),
  );
  for (const [user, r] of results) t.same(r, { ok: true, user }, `${user}: ${JSON.stringify(USERS[user])}`);

  const near = await Promise.all([
    check({ user: 'spacey', password: 'correct horse battery  staple' }),
    check({ user: 'utf8', password: USERS.utf8.normalize('NFD') }), // same text, other bytes
    check({ user: 'slashy', password: USERS.slashy.replace(/\\\\/g, '\\') }),
  ]);
  for (const r of near) t.match(r, { ok: false, temporary: false }, 'a near miss is refused');
  t.not(USERS.utf8.normalize('NFD'), USERS.utf8, 'the NFD form differs');
});

t.test('a password with a tab goes to Dovecot, which refuses it (Dovecot 2.3 forbids TAB, CR, LF, 0x01)', async (t) => {
  const before = stack.dovecotLog().split('\n').filter((l) => l.includes('password having illegal chars')).length;
  const r = await check({ user: 'tabby', password: USERS.tabby });
  t.match(r, { ok: false, temporary: false });
  const after = stack.dovecotLog().split('\n').filter((l) => l.includes('password having illegal chars')).length;
  t.equal(after, before + 1, 'Dovecot saw the tab in the password ("Attempted login with password having illegal chars")');
});

t.test('refused before asking Dovecot: NUL, control characters, empty, too long', async (t) => {
  const before = authLines().length;
  const cases: [string, string, string, RegExp][] = [
    ['user with a tab', 'ali\tce', USERS.alice, /control character/],
    ['user with a NUL', 'alice\0admin', USERS.alice, /control character/],
    ['user with a newline', 'alice\nAUTH', USERS.alice, /control character/],
    ['user with DEL', 'alice\x7f', USERS.alice, /control character/],
    ['empty user', '', USERS.alice, /empty user name/],
    ['password with a NUL', 'alice', 'alice-pw\0x', /NUL/],
    ['empty password', 'alice', '', /empty password/],
    ['user too long', 'a'.repeat(1025), 'x', /longer than 1024 bytes/],
    ['password too long', 'alice', 'é'.repeat(2049), /longer than 4096 bytes/],
  ];
  for (const [name, user, password, reason] of cases) {
    const r = await check({ user, password });
    t.match(r, { ok: false, temporary: false, reason }, name);
    if (!r.ok) t.match(r.reason, /^refused before asking Dovecot: /, `${name}: says so`);
  }
  t.equal(authLines().length, before, 'Dovecot was not asked');
  // Caller mistakes throw instead.
  await t.rejects(checkPassword(SOCKET, { user: 'alice', password: 'x', remoteIp: 'example.org' }), TypeError);
  await t.rejects(checkPassword(SOCKET, { user: 'alice', password: 'x', remoteIp: '1.2.3.4', localIp: '' }), TypeError);
  await t.rejects(checkPassword(SOCKET, { user: 'alice', password: 'x', remoteIp: '1.2.3.4', service: 'a\tb' }), TypeError);
  await t.rejects(checkPassword(SOCKET, { user: 'alice', password: 'x', remoteIp: '1.2.3.4', timeoutMs: 0 }), RangeError);
  await t.rejects(checkPassword('', { user: 'alice', password: 'x', remoteIp: '1.2.3.4' }), TypeError);
});

t.test("Dovecot's log shows the addresses and session we sent, never the password", async (t) => {
  const rip = '203.0.113.77';
  const r = await checkPassword(SOCKET, { user: 'utf8', password: USERS.utf8, remoteIp: rip, localIp: '127.0.0.1', session: 'web-Sess1' });
  t.same(r, { ok: true, user: 'utf8' });
  const v6 = await checkPassword(SOCKET, { user: 'alice', password: 'nope', remoteIp: '2001:db8::7', localIp: '::1' });
  t.match(v6, { ok: false, temporary: false });
  const log = stack.dovecotLog();
  const line = authLines().find((l) => l.includes(`rip=${rip}`));
  t.ok(line, `an AUTH line with rip=${rip}${line ? '' : logTail()}`);
  t.match(line, /\tservice=mfagate-web\tsecured\tsession=web-Sess1\tlip=127\.0\.0\.1\trip=203\.0\.113\.77\tresp=<hidden>/);
  t.match(log, /passwd-file\(utf8,203\.0\.113\.77,<web-Sess1>\)/, 'its passdb log lines name the browser address');
  t.match(log, /passwd-file\(alice,2001:db8::7\): Password mismatch/, 'IPv6 too');
  for (const pw of Object.values(USERS)) t.notOk(log.includes(pw), `password ${JSON.stringify(pw)} is not in the log`);
  t.notOk(log.includes(Buffer.from(`\0utf8\0${USERS.utf8}`).toString('base64')), 'nor its base64');
});

t.test("Dovecot's auth penalty counts the browser address (rip)", async (t) => {
  const attacker = nextIp();
  const failed = await checkPassword(SOCKET, { user: 'alice', password: 'guess-1', remoteIp: attacker });
  t.match(failed, { ok: false, temporary: false });
  // Dovecot now delays the next check from `attacker` (about 4 s after one failure), not from elsewhere.
  const started = Date.now();
  const timed = async (req: DovecotAuthRequest) => {
    const r = await checkPassword(SOCKET, req);
    return { r, ms: Date.now() - started };
  };
  const [penalised, other, noPenalty] = await Promise.all([
    timed({ user: 'alice', password: USERS.alice, remoteIp: attacker, timeoutMs: 1500 }),
    timed({ user: 'alice', password: USERS.alice, remoteIp: nextIp() }),
    timed({ user: 'alice', password: USERS.alice, remoteIp: attacker, penalty: false }),
  ]);
  t.match(penalised.r, { ok: false, temporary: true, reason: /within 1500 ms/ }, 'held back by the penalty past our timeout');
  t.ok(penalised.ms >= 1400, `gave up after ${penalised.ms} ms`);
  t.same(other.r, { ok: true, user: 'alice' }, 'another address is not delayed');
  t.ok(other.ms < 1000, `${other.ms} ms`);
  t.same(noPenalty.r, { ok: true, user: 'alice' }, 'penalty: false sends no-penalty');
  t.ok(noPenalty.ms < 1000, `${noPenalty.ms} ms`);
  t.ok(authLines().some((l) => l.includes(`\tno-penalty\trip=${attacker}\t`)), 'no-penalty on the wire');
});

t.test('parallel checks on fresh connections each get their own answer', async (t) => {
  const users = Object.keys(USERS).filter((u) => u !== 'tabby') as (keyof typeof USERS)[];
  const jobs = Array.from({ length: 24 }, (_, i) => {
    const user = users[i % users.length] ?? 'alice';
    const right = i % 3 !== 0;
    return { user, right, result: check({ user, password: right ? USERS[user] : `${USERS[user]}!` }) };
  });
  for (const j of jobs) {
    const r = await j.result;
    if (j.right) t.same(r, { ok: true, user: j.user }, `${j.user} right`);
    else t.match(r, { ok: false, temporary: false }, `${j.user} wrong`);
  }
});

t.test('a socket path that does not exist, or is not a socket: temporary, with the reason', async (t) => {
  const missing = path.join(stack.dir, 'run', 'no-such-socket');
  const r = await checkPassword(missing, { user: 'alice', password: 'x', remoteIp: '192.0.2.1' });
  t.same(r, { ok: false, temporary: true, reason: `cannot connect to the Dovecot auth socket ${missing}: ENOENT` });
  const file = path.join(stack.dir, 'dovecot.conf');
  t.match(await checkPassword(file, { user: 'alice', password: 'x', remoteIp: '192.0.2.1' }), {
    ok: false,
    temporary: true,
    reason: /^cannot connect to the Dovecot auth socket .*: ECONNREFUSED$/,
  });
});

// ---- fake servers ----------------------------------------------------------------------------------------------

const HANDSHAKE = 'VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\nSPID\t4242\nCUID\t7\nCOOKIE\t0123456789abcdef\nDONE\n';
const fakeDir = fs.mkdtempSync(path.join(os.tmpdir(), 'mfagate-dovecot-auth-'));
t.teardown(() => fs.rmSync(fakeDir, { recursive: true, force: true }));
let fakeCount = 0;

interface Fake {
  path: string;
  /** Lines received, per connection. */
  lines: string[];
  /** Resolves when the client closed its connection. */
  clientClosed: Promise<void>;
}

/**
 * A one-connection server: writes `greeting` on connect, then calls `onLine` for every line the client sends.
 */
async function fake(greeting: string | Buffer, onLine: (line: string, sock: net.Socket) => void = () => undefined): Promise<Fake> {
  const p = path.join(fakeDir, `fake-${++fakeCount}.sock`);
  const lines: string[] = [];
  let closed!: () => void;
  const clientClosed = new Promise<void>((resolve) => (closed = resolve));
  const server = net.createServer((sock) => {
    let buf = '';
    sock.on('error', () => undefined);
    sock.on('close', () => closed());
    sock.on('data', (b: Buffer) => {
      buf += b.toString('utf8');
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        lines.push(line);
        onLine(line, sock);
      }
    });
    if (greeting.length > 0) sock.write(greeting);
  });
  await new Promise<void>((resolve) => server.listen(p, resolve));
  t.teardown(() => new Promise<void>((resolve) => server.close(() => resolve())));
  return { path: p, lines, clientClosed };
}

/** A server that answers our AUTH with `reply` (a line without the trailing LF). */
const answering = (reply: string) =>
  fake(HANDSHAKE, (line, sock) => {
    if (line.startsWith('AUTH\t')) sock.write(`${reply}\n`);
  });

const ask = (p: string, over: Partial<DovecotAuthRequest> = {}) =>
  checkPassword(p, { user: 'alice', password: 'pw', remoteIp: '192.0.2.10', timeoutMs: 3000, ...over });

t.test('a server that never answers: the timeout closes the connection', async (t) => {
  const silent = await fake('');
  const started = Date.now();
  const r = await ask(silent.path, { timeoutMs: 200 });
  const ms = Date.now() - started;
  t.same(r, { ok: false, temporary: true, reason: `no answer from the Dovecot auth socket ${silent.path} within 200 ms` });
  t.ok(ms >= 190 && ms < 2000, `${ms} ms`);
  await silent.clientClosed;
  t.same(silent.lines, [`VERSION\t1\t2`, `CPID\t${process.pid}`], 'our handshake');

  const mute = await fake(HANDSHAKE);
  t.match(await ask(mute.path, { timeoutMs: 300 }), { ok: false, temporary: true, reason: /within 300 ms/ }, 'silent after our AUTH');
  await mute.clientClosed;
  t.equal(mute.lines.length, 4, 'VERSION, CPID, AUTH, CANCEL');
  t.equal(mute.lines[3], 'CANCEL\t1', 'the abandoned request is cancelled before closing');
});

t.test('the AUTH line on the wire', async (t) => {
  const user = 'ユーザー@example.ac.jp';
  const password = 'p\tw d\\é\x01\r\n!';
  const server = await answering('FAIL\t1\tuser=x');
  await ask(server.path, { user, password, remoteIp: '2001:db8::1', localIp: '192.0.2.254', session: 'a\tb\\c' });
  const auth = server.lines[2] ?? '';
  const fields = auth.split('\t');
  t.same(fields.slice(0, -1), [
    'AUTH',
    '1',
    'PLAIN',
    'service=mfagate-web',
    'secured',
    'session=a\x01tb\\c',
    'lip=192.0.2.254',
    'rip=2001:db8::1',
  ]);
  const resp = fields.at(-1) ?? '';
  t.match(resp, /^resp=[A-Za-z0-9+/]+=*$/, 'resp= is last, plain base64');
  t.equal(Buffer.from(resp.slice(5), 'base64').toString('utf8'), `\0${user}\0${password}`, 'SASL PLAIN: NUL user NUL password');

  const other = await answering('FAIL\t1');
  await ask(other.path, { secured: false, penalty: false, service: 'imap' });
  t.match(other.lines[2], /^AUTH\t1\tPLAIN\tservice=imap\tno-penalty\trip=192\.0\.2\.10\tresp=/, 'not secured, no-penalty, another service');
});

t.test("Dovecot's answers", async (t) => {
  const cases: [string, string, DovecotAuthResult | Record<string, unknown>][] = [
    ['OK with a tab-escaped user', 'OK\t1\tuser=al\x01tice\x011\toriginal_user=AL\x01tICE', { ok: true, user: 'al\tice\x01' }],
    ['FAIL code=temp_fail', 'FAIL\t1\tuser=alice\tcode=temp_fail\treason=LDAP\x01tdown', { ok: false, temporary: true, reason: 'LDAP\tdown', code: 'temp_fail' }],
    ['FAIL temp (older Dovecot)', 'FAIL\t1\ttemp', { ok: false, temporary: true, reason: 'temporary authentication failure in Dovecot' }],
    ['FAIL pass_expired', 'FAIL\t1\tuser=alice\tcode=pass_expired', { ok: false, temporary: false, code: 'pass_expired' }],
    ['OK but nologin', 'OK\t1\tuser=alice\tnologin\treason=Moved to the new server', { ok: false, temporary: false, reason: 'Moved to the new server', code: 'nologin' }],
    ['OK with a proxy destination', 'OK\t1\tuser=alice\tproxy\thost=192.0.2.3\tnopassword', { ok: false, temporary: true, code: 'proxy', reason: /proxy destination/ }],
    ['OK anonymous', 'OK\t1\tuser=anonymous\tanonymous', { ok: false, temporary: false, code: 'anonymous' }],
    ['OK without a user', 'OK\t1\tfoo=bar', { ok: false, temporary: true, reason: /without a user name/ }],
    ['CONT', 'CONT\t1\t', { ok: false, temporary: true, reason: /CONT/ }],
    ['an answer for another request', 'OK\t2\tuser=alice', { ok: false, temporary: true, reason: /for request "2"/ }],
    ['an unknown command', 'HELLO\t1', { ok: false, temporary: true, reason: /unknown command "HELLO"/ }],
  ];
  for (const [name, reply, want] of cases) {
    const server = await answering(reply);
    t.match(await ask(server.path), want, name);
    await server.clientClosed;
    if (reply.startsWith('CONT')) t.equal(server.lines.at(-1), 'CANCEL\t1', 'CONT: the request is cancelled before closing');
  }
});

t.test('broken handshakes and oversized lines', async (t) => {
  const v2 = await fake('VERSION\t2\t0\nDONE\n');
  t.match(await ask(v2.path), { ok: false, temporary: true, reason: /expected "VERSION\\t1\\t\.\.\.", got "VERSION\\t2\\t0"/ });

  const noPlain = await fake('VERSION\t1\t2\nMECH\tLOGIN\tplaintext\nMECH\tSCRAM-SHA-256\nCOOKIE\tx\nDONE\n');
  t.match(await ask(noPlain.path), { ok: false, temporary: true, reason: /does not offer the PLAIN mechanism/ });
  await noPlain.clientClosed;
  t.equal(noPlain.lines.length, 2, 'no AUTH sent');

  const huge = await fake(`VERSION\t1\t2\nMECH\t${'A'.repeat(20_000)}`);
  t.match(await ask(huge.path), { ok: false, temporary: true, reason: /longer than 16384 bytes/ });

  const hugeLine = await fake(`VERSION\t1\t2\nCOOKIE\t${'b'.repeat(17_000)}\nDONE\n`);
  t.match(await ask(hugeLine.path), { ok: false, temporary: true, reason: /longer than 16384 bytes/ }, 'one chunk');

  const endless = await fake(`VERSION\t1\t2\n${'MECH\tX\n'.repeat(300)}DONE\n`);
  t.match(await ask(endless.path), { ok: false, temporary: true, reason: /more than 256 handshake lines/ });

  const closer = await fake(HANDSHAKE, (line, sock) => {
    if (line.startsWith('AUTH\t')) sock.end();
  });
  t.match(await ask(closer.path), { ok: false, temporary: true, reason: /closed the auth connection .* before answering/ });
});

t.test('answers split into single bytes, UTF-8 included', async (t) => {
  const reply = Buffer.from('OK\t1\tuser=ユーザー\n', 'utf8');
  const server = await fake(HANDSHAKE, (line, sock) => {
    if (!line.startsWith('AUTH\t')) return;
    let i = 0;
    const tick = () => {
      if (i >= reply.length || sock.destroyed) return;
      sock.write(reply.subarray(i, ++i));
      setTimeout(tick, 1);
    };
    tick();
  });
  t.same(await ask(server.path), { ok: true, user: 'ユーザー' });
});

t.test('tab-escaping round trips', async (t) => {
  const s = 'a\tb\nc\rd\x01e\0f\\g';
  t.equal(tabEscape(s), 'a\x01tb\x01nc\x01rd\x011e\x010f\\g');
  t.equal(tabUnescape(tabEscape(s)), s);
  t.equal(tabUnescape('x\x01qy\x01'), 'xqy', 'an unknown escape writes the character; a trailing \\001 vanishes');
  t.equal(tabEscape('plain text \\ é'), 'plain text \\ é', 'backslash and non-ASCII are not escaped');
});

t.test('Dovecot logged no errors', async (t) => {
  const bad = stack.dovecotLog().split('\n').filter((l) => /Panic|Fatal|Error|BUG/.test(l));
  t.same(bad, [], 'no Panic/Fatal/Error/BUG lines');
});
