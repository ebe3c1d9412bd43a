// Both endpoints over their real sockets, in-process daemon, a real store: keep-alive, hostile input, many
// connections, and a CLI-side write taking effect on the very next request.
import net from 'node:net';
import t from 'tap';
import { Store } from '../../store/store.js';
import { type InProcess, startInProcess } from '../helpers/daemon.js';

/** A minimal keep-alive HTTP/1.1 client over one socket: the requests Dovecot makes, byte for byte. */
class RawHttp {
  private buf = Buffer.alloc(0);
  private waiting: ((r: { status: number; headers: string; body: string } | undefined) => void) | undefined;
  closed = false;
  readonly socket: net.Socket;
  constructor(port: number) {
    this.socket = net.connect(port, '127.0.0.1');
    this.socket.on('data', (d: Buffer) => {
      this.buf = Buffer.concat([this.buf, d]);
      this.tryParse();
    });
    this.socket.on('close', () => {
      this.closed = true;
      this.waiting?.(undefined);
    });
    this.socket.on('error', () => undefined);
  }
  private tryParse() {
    const end = this.buf.indexOf('\r\n\r\n');
    if (end < 0 || !this.waiting) return;
    const head = this.buf.subarray(0, end).toString();
    const len = Number(/content-length: *(\d+)/i.exec(head)?.[1] ?? '0');
    if (this.buf.length < end + 4 + len) return;
    const body = this.buf.subarray(end + 4, end + 4 + len).toString();
    this.buf = this.buf.subarray(end + 4 + len);
    const w = this.waiting;
    this.waiting = undefined;
    w({ status: Number(head.split(' ')[1]), headers: head, body });
  }
  send(raw: string | Buffer): Promise<{ status: number; headers: string; body: string } | undefined> {
    return new Promise((resolve) => {
      this.waiting = resolve;
      this.socket.write(raw);
      this.tryParse();
    });
  }
  post(target: string, body: string, headers: Record<string, string> = {}) {
    const h = Object.entries({ 'Content-Type': 'application/json', Connection: 'Keep-Alive', 'User-Agent': 'dovecot/auth-policy-client', ...headers })
      .map(([k, v]) => `${k}: ${v}\r\n`)
      .join('');
    return this.send(`POST ${target} HTTP/1.1\r\nHost: 127.0.0.1\r\n${h}Content-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`);
  }
  close() {
    this.socket.destroy();
  }
}

const body = (login: string, remote: string, extra: Record<string, unknown> = {}) =>
  JSON.stringify({ device_id: '', login, protocol: 'imap', pwhash: '0a91', remote, session_id: 'x', tls: false, ...extra });

/** One Postfix policy connection on the UNIX socket; `ask` sends a request and reads exactly one reply. */
class PolicyConn {
  private buf = '';
  private waiting: ((s: string | undefined) => void) | undefined;
  closed = false;
  readonly socket: net.Socket;
  constructor(path: string) {
    this.socket = net.connect(path);
    this.socket.setEncoding('utf8');
    this.socket.on('data', (d: string) => {
      this.buf += d;
      this.tryParse();
    });
    this.socket.on('close', () => {
      this.closed = true;
      this.waiting?.(undefined);
    });
    this.socket.on('error', () => undefined);
  }
  private tryParse() {
    const i = this.buf.indexOf('\n\n');
    if (i < 0 || !this.waiting) return;
    const reply = this.buf.slice(0, i + 2);
    this.buf = this.buf.slice(i + 2);
    const w = this.waiting;
    this.waiting = undefined;
    w(reply);
  }
  ask(attrs: Record<string, string> | string): Promise<string | undefined> {
    const text = typeof attrs === 'string' ? attrs : Object.entries(attrs).map(([k, v]) => `${k}=${v}\n`).join('') + '\n';
    return new Promise((resolve) => {
      this.waiting = resolve;
      this.socket.write(text);
      this.tryParse();
    });
  }
  get leftover() {
    return this.buf;
  }
  close() {
    this.socket.destroy();
  }
}

const rcpt = (user: string, ip: string) => ({
  request: 'smtpd_access_policy',
  protocol_state: 'RCPT',
  protocol_name: 'ESMTP',
  client_address: ip,
  client_name: 'unknown',
  sender: `${user}@mail.test`,
  recipient: 'x@example.org',
  instance: 'a.b.c',
  sasl_method: 'PLAIN',
  sasl_username: user,
});

let d: InProcess;
let store: Store;
t.before(async () => {
  d = await startInProcess(`
[networks]
trusted = ["127.0.0.2"]
webmail = ["192.0.2.10"]
[dovecot]
api_key = "s3cret"
max_body_bytes = 2048
[postfix]
reject_action = "554 5.7.1 MFA required: sign in to webmail from this network"
`);
  store = Store.open(`${d.dir}/mfagate.db`);
  await store.records.setUserFlag('alice', 'mfa_enabled', true, 'test', Date.now());
});
t.teardown(async () => {
  store.close();
  await d.stop();
});

const KEY = { 'X-API-Key': 's3cret' };

t.test('Dovecot: allow, refuse with the message, keep-alive on one connection', async (t) => {
  const c = new RawHttp(d.dovecotPort);
  t.teardown(() => c.close());
  const bob = await c.post('/?command=allow', body('bob', '203.0.113.9'), KEY);
  t.equal(bob?.status, 200);
  t.same(JSON.parse(bob?.body ?? ''), { status: 0 }, 'a user without MFA gets in');
  const alice = await c.post('/?command=allow', body('alice', '203.0.113.9'), KEY);
  t.same(JSON.parse(alice?.body ?? ''), { status: -1, msg: d.daemon.service.config.dovecot.message }, 'refused with the configured message');
  const campus = await c.post('/?command=allow', body('Alice', '127.0.0.2'), KEY);
  t.same(JSON.parse(campus?.body ?? ''), { status: 0 }, 'trusted address');
  t.equal(c.closed, false, 'the connection stays open');
  const line = d.logs.find((l) => l['event'] === 'decision' && l['user'] === 'alice' && l['result'] === 'refuse');
  t.match(line, { endpoint: 'dovecot', ip: '203.0.113.9', protocol: 'imap', rule: 'no-grant' }, 'one structured line per decision');
  t.notMatch(JSON.stringify(d.logs), /s3cret/, 'the API key never reaches the log');
});

t.test('Dovecot: absolute-form target (2.4 through a proxy socket) and the configured header', async (t) => {
  const c = new RawHttp(d.dovecotPort);
  t.teardown(() => c.close());
  const r = await c.post('http://mfagate.invalid/?command=allow', body('alice', '203.0.113.9'), KEY);
  t.equal(r?.status, 200);
  t.equal((JSON.parse(r?.body ?? '{}') as { status: number }).status, -1);
});

t.test('Dovecot: a CLI revoke takes effect on the very next request', async (t) => {
  const c = new RawHttp(d.dovecotPort);
  t.teardown(() => c.close());
  const now = Date.now();
  const { grant } = await store.records.addGrant({ user: 'alice', ip: '198.51.100.4', block: '198.51.100.4', ttlMs: 3600_000, method: 'helpdesk', source: 'cli', reason: '', actor: 'test', now });
  t.same(JSON.parse((await c.post('/?command=allow', body('alice', '198.51.100.4'), KEY))?.body ?? ''), { status: 0 });
  await store.records.revokeGrants({ id: grant.id }, 'test', 'test', Date.now());
  t.equal((JSON.parse((await c.post('/?command=allow', body('alice', '198.51.100.4'), KEY))?.body ?? '{}') as { status: number }).status, -1);
});

t.test('Dovecot: report is recorded per user and address', async (t) => {
  const c = new RawHttp(d.dovecotPort);
  t.teardown(() => c.close());
  const r = await c.post('/?command=report', body('alice', '203.0.113.9', { success: false, policy_reject: true }), KEY);
  t.equal(r?.status, 200);
  const ok = await c.post('/?command=report', body('newbie', '203.0.113.10', { success: true, policy_reject: false }), KEY);
  t.equal(ok?.status, 200);
  const ghost = await c.post('/?command=report', body('ghost', '203.0.113.11', { success: false, policy_reject: false }), KEY);
  t.equal(ghost?.status, 200);
  await d.daemon.service.flushReports();
  const [login] = await store.records.loginsOf('alice');
  t.match(login, { ip: '203.0.113.9', protocol: 'imap', lastSuccessAt: null });
  t.ok(login?.lastPolicyRejectAt, 'policy reject recorded');
  t.ok(await store.records.getUser('newbie'), 'a successful login makes the user known');
  t.notOk(await store.records.getUser('ghost'), 'a failed login for an unknown name does not create a user');
});

t.test("Dovecot: a webmail's login for a browser is recorded under the webmail host, not the browser's address", async (t) => {
  const c = new RawHttp(d.dovecotPort);
  t.teardown(() => c.close());
  const viaWebmail = await c.post('/?command=report', body('carol', '203.0.113.50', { real_remote: '192.0.2.10', success: true, policy_reject: false }), KEY);
  t.equal(viaWebmail?.status, 200);
  const direct = await c.post('/?command=report', body('carol', '203.0.113.51', { real_remote: '203.0.113.51', success: true, policy_reject: false }), KEY);
  t.equal(direct?.status, 200);
  const proxied = await c.post('/?command=report', body('carol', '203.0.113.52', { real_remote: '198.51.100.99', success: true, policy_reject: false }), KEY);
  t.equal(proxied?.status, 200);
  await d.daemon.service.flushReports();
  const ips = (await store.records.loginsOf('carol')).map((l) => l.ip).sort();
  t.same(ips, ['192.0.2.10', '203.0.113.51', '203.0.113.52'], 'the webmail host for its login; the address itself for a mail program (and behind a proxy that is not the webmail)');
});

t.test('Dovecot: bad input gets a clear status, never a crash', async (t) => {
  const c = new RawHttp(d.dovecotPort);
  t.teardown(() => c.close());
  t.equal((await c.post('/?command=allow', body('alice', '203.0.113.9'), { 'X-API-Key': 'wrong' }))?.status, 401, 'wrong key');
  t.equal((await c.post('/?command=allow', body('alice', '203.0.113.9')))?.status, 401, 'no key');
  t.equal((await c.post('/?command=allow', '{"login":', KEY))?.status, 400, 'malformed JSON');
  t.equal((await c.post('/?command=allow', '{"login":"alice"}', KEY))?.status, 400, 'missing remote');
  t.equal((await c.post('/?command=allow', '{"remote":"1.2.3.4"}', KEY))?.status, 400, 'missing login');
  t.equal((await c.post('/?command=allow', body('alice', 'not-an-ip'), KEY))?.status, 400, 'remote not an address');
  t.equal((await c.post('/?command=frobnicate', body('alice', '1.2.3.4'), KEY))?.status, 400, 'unknown command');
  t.equal((await c.post('/?command=allow', body('a\u0001b', '1.2.3.4'), KEY))?.status, 400, 'control characters in the login');
  t.equal((await c.post('/admin', body('alice', '1.2.3.4'), KEY))?.status, 404, 'unknown path');
  t.equal((await c.send('GET /?command=allow HTTP/1.1\r\nHost: x\r\n\r\n'))?.status, 405, 'GET');
  t.equal(c.closed, false, 'the connection survived all of that');
  const ok = await c.post('/?command=allow', body('bob', '1.2.3.4'), KEY);
  t.same(JSON.parse(ok?.body ?? ''), { status: 0 }, 'and still answers');
  t.ok(d.logs.some((l) => l['event'] === 'bad-request' && l['status'] === 400), 'a log line for bad requests');

  const big = new RawHttp(d.dovecotPort);
  const r = await big.post('/?command=allow', JSON.stringify({ login: 'alice', remote: '1.2.3.4', pad: 'x'.repeat(5000) }), KEY);
  t.equal(r?.status, 413, 'oversized body refused');
  big.close();
  const chunked = new RawHttp(d.dovecotPort);
  const huge = 'x'.repeat(4000);
  const cr = await chunked.send(`POST /?command=allow HTTP/1.1\r\nHost: x\r\nX-API-Key: s3cret\r\nTransfer-Encoding: chunked\r\n\r\n${huge.length.toString(16)}\r\n${huge}\r\n0\r\n\r\n`);
  t.equal(cr?.status, 413, 'oversized chunked body refused');
  chunked.close();
  const garbage = new RawHttp(d.dovecotPort);
  const g = await garbage.send('\x00\x01\x02 not http at all\r\n\r\n');
  t.equal(g?.status ?? 400, 400, 'garbage gets 400 or a closed connection');
  garbage.close();
  const after = new RawHttp(d.dovecotPort);
  t.same(JSON.parse((await after.post('/?command=allow', body('bob', '1.2.3.4'), KEY))?.body ?? ''), { status: 0 }, 'the daemon is fine');
  after.close();
});

t.test('Postfix: many requests on one connection, exactly one reply each', async (t) => {
  const c = new PolicyConn(d.postfixSocket);
  t.teardown(() => c.close());
  t.equal(await c.ask(rcpt('bob', '203.0.113.9')), 'action=DUNNO\n\n', 'no MFA: DUNNO');
  t.equal(await c.ask(rcpt('alice', '203.0.113.9')), 'action=554 5.7.1 MFA required: sign in to webmail from this network\n\n');
  t.equal(await c.ask(rcpt('alice', '127.0.0.2')), 'action=DUNNO\n\n', 'trusted');
  t.equal(await c.ask({ ...rcpt('alice', '203.0.113.9'), sasl_username: '' }), 'action=DUNNO\n\n', 'unauthenticated mail is not ours');
  const { sasl_username: _, ...noSasl } = rcpt('alice', '203.0.113.9');
  t.equal(await c.ask(noSasl), 'action=DUNNO\n\n', 'no sasl_username at all');
  // Two requests in one write: two replies, in order.
  const two = Object.entries(rcpt('bob', '1.2.3.4')).map(([k, v]) => `${k}=${v}\n`).join('') + '\n';
  const three = Object.entries(rcpt('alice', '1.2.3.4')).map(([k, v]) => `${k}=${v}\n`).join('') + '\n';
  const first = await c.ask(two + three);
  t.equal(first, 'action=DUNNO\n\n');
  await new Promise((r) => setTimeout(r, 50));
  t.match(c.leftover, /^action=554 5\.7\.1 .*\n\n$/, 'the second reply follows, and nothing else');
  t.equal(c.closed, false);
});

t.test('Postfix: hostile input closes only that connection', async (t) => {
  const good = new PolicyConn(d.postfixSocket);
  t.teardown(() => good.close());
  t.equal(await good.ask(rcpt('bob', '1.2.3.4')), 'action=DUNNO\n\n');
  const long = new PolicyConn(d.postfixSocket);
  t.equal(await long.ask(`sender=${'x'.repeat(20000)}\n\n`), undefined, 'over-long line: closed, no reply');
  const flood = new PolicyConn(d.postfixSocket);
  t.equal(await flood.ask(Array.from({ length: 500 }, (_, i) => `x${i}=y\n`).join('')), undefined, 'attribute flood: closed');
  const junk = new PolicyConn(d.postfixSocket);
  t.equal(await junk.ask('hello there\n\n'), undefined, 'not an attribute: closed');
  const badIp = new PolicyConn(d.postfixSocket);
  t.equal(await badIp.ask(rcpt('alice', 'unknown')), undefined, 'an unusable client_address: no reply, closed (Postfix retries, then default_action)');
  t.equal(await good.ask(rcpt('alice', '1.2.3.4')), 'action=554 5.7.1 MFA required: sign in to webmail from this network\n\n', 'the other connection carries on');
  t.ok(d.logs.some((l) => l['event'] === 'bad-request' && l['endpoint'] === 'postfix' && /longer than/.test(String(l['error']))));
});

t.test('Postfix: hundreds of concurrent connections', async (t) => {
  const conns = Array.from({ length: 300 }, () => new PolicyConn(d.postfixSocket));
  t.teardown(() => conns.forEach((c) => c.close()));
  const replies = await Promise.all(conns.map((c, i) => c.ask(rcpt(i % 2 ? 'alice' : 'bob', `203.0.113.${i % 250}`))));
  t.equal(replies.filter((r) => r === 'action=DUNNO\n\n').length, 150);
  t.equal(replies.filter((r) => r?.startsWith('action=554 ')).length, 150);
  const again = await Promise.all(conns.map((c) => c.ask(rcpt('bob', '1.2.3.4'))));
  t.ok(again.every((r) => r === 'action=DUNNO\n\n'), 'each connection serves a second request');
});

t.test('SIGHUP-style reload: new settings apply, a bad file keeps the running config', async (t) => {
  const fs = await import('node:fs');
  const original = fs.readFileSync(d.configFile, 'utf8');
  t.teardown(() => fs.writeFileSync(d.configFile, original));
  fs.writeFileSync(d.configFile, original.replace('[networks]\n', '[networks]\nuntrusted = []\n').replace('trusted = ["127.0.0.2"]', 'trusted = ["203.0.113.0/24"]'));
  d.daemon.reload();
  const c = new PolicyConn(d.postfixSocket);
  t.teardown(() => c.close());
  t.equal(await c.ask(rcpt('alice', '203.0.113.9')), 'action=DUNNO\n\n', 'the new trusted range applies');
  fs.writeFileSync(d.configFile, original + '\n[grants]\nttl = "forever"\n');
  d.daemon.reload();
  t.equal(await c.ask(rcpt('alice', '203.0.113.9')), 'action=DUNNO\n\n', 'the running config is kept');
  const failed = d.logs.find((l) => l['event'] === 'reload-failed');
  t.match(failed?.['error'], /grants\.ttl: expected a duration/);
  fs.writeFileSync(d.configFile, original.replace('listen = ["unix:policy.sock"]', 'listen = ["unix:other.sock"]'));
  d.daemon.reload();
  t.match(d.logs.filter((l) => l['event'] === 'reloaded').pop(), { restart_needed_for: ['postfix.listen'] }, 'listener changes need a restart, and the log says so');
});
