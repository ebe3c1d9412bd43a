// Two mail hosts, one PostgreSQL: two real `mfagate serve` processes (node A, node B), each with its own real
// Dovecot asking it (node A's stack also has the real Postfix, which asks node A too), one PostgreSQL 15 with a
// streaming standby, both hosts in the nodes' URL. Clients come from distinct loopback addresses:
//   127.0.0.9  alice's phone on the mobile network      127.0.0.10  somewhere else outside
// What must hold:
//   - a factor passed through node A's API lets a real IMAP login in on node B's Dovecot;
//   - a revoke through node B's CLI refuses on node A within 1 s;
//   - PostgreSQL stopped (-m immediate): both nodes answer from their copies (granted address in, others refused),
//     a factor passed answers 503 store-unavailable, nothing crashes; started again: new grants work on both;
//   - node A killed with -9: node B is unaffected; node A restarts with everything;
//   - the MFA page on node A while the database is down says so in words (Japanese and English);
//   - the primary lost and the standby promoted: writes go on, without restarting the nodes.
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { type LoginResult, imapLogin, smtpSubmit } from '../helpers/clients.js';
import { Authenticator, apiClient } from '../helpers/api.js';
import { type DaemonProcess, cli, spawnDaemon, tempDir } from '../helpers/daemon.js';
import { type MailStack, freePort, startMailStack } from '../helpers/mailstack.js';
import { type PgServer, startPostgres, startStandby } from '../helpers/postgres.js';
import { askPolicy, loginBody } from '../helpers/served.js';
import { WebClient, unescapeHtml } from '../helpers/web.js';

const PHONE = '127.0.0.9';
const ELSEWHERE = '127.0.0.10';
const USERS = { alice: 'alice-pw', bob: 'bob-pw' };
const KEY = 'two-nodes-key-0123456789';
const MESSAGE = '[AUTHENTICATIONFAILED] MFA required: sign in to webmail from this network, then retry';

const dir = tempDir('mfagate-two-nodes-');
// Postfix's smtpd runs as the postfix user: it must reach node A's policy socket.
fs.chmodSync(dir, 0o711);

interface Node {
  name: 'a' | 'b';
  dir: string;
  config: string;
  policyPort: number;
  webPort: number;
  apiSocket: string;
  daemon: DaemonProcess;
  stack: MailStack;
}

let primary: PgServer;
let standby: PgServer;
const nodes: Partial<Record<'a' | 'b', Node>> = {};
const node = (n: 'a' | 'b'): Node => {
  const x = nodes[n];
  if (!x) throw new Error(`node ${n} is not running`);
  return x;
};
const api = (n: 'a' | 'b') => apiClient({ socketPath: node(n).apiSocket });
const mfagate = (n: 'a' | 'b', ...args: string[]) => cli(['--config', node(n).config, ...args]);
const imap = (n: 'a' | 'b', from: string) => imapLogin({ port: node(n).stack.imapPort, user: 'alice', password: USERS.alice, localAddress: from });
const why = (r: LoginResult, n: 'a' | 'b') => ({ transcript: r.transcript.join('\n'), daemon: node(n).daemon.output().slice(-3000) });
/** Node n's decision for alice from `from`, asked as its Dovecot asks (no Dovecot in between: for timing). */
const decision = async (n: 'a' | 'b', from: string) => (await askPolicy(node(n).policyPort, loginBody('alice', from), { key: KEY })).allow;
let phone: Authenticator;
let backupCodes: string[] = [];

async function startNode(name: 'a' | 'b', url: string, policyPort: number, webPort: number): Promise<Node> {
  const nodeDir = path.join(dir, name);
  fs.mkdirSync(nodeDir, { recursive: true, mode: 0o711 });
  const config = path.join(nodeDir, 'mfagate.toml');
  const apiSocket = path.join(nodeDir, 'api.sock');
  // The host's mail servers first (they ask the daemon about to start on policyPort); node A's Postfix too.
  const stack = await startMailStack({
    users: USERS,
    policyUrl: `http://127.0.0.1:${policyPort}/`,
    policyApiHeader: `X-API-Key: ${KEY}`,
    policyAttributes: 'recommended',
    ...(name === 'a' ? { postfixPolicy: `unix:${path.join(nodeDir, 'policy.sock')}` } : {}),
  });
  fs.writeFileSync(
    config,
    `[store]
backend = "postgresql"
url = "${url}"
password_file = "${primary.passwordFile}"
tls = "disable"
state_file = "${path.join(nodeDir, 'node-state.json')}"
[secrets]
key_file = "${path.join(nodeDir, 'secrets.key')}"
[dovecot]
listen = ["127.0.0.1:${policyPort}"]
api_key = "${KEY}"
message = "${MESSAGE}"
[postfix]
listen = ["unix:${path.join(nodeDir, 'policy.sock')}"]
socket_mode = "0666"
[api]
listen = ["unix:${apiSocket}"]
[web]
listen = ["127.0.0.1:${webPort}"]
dovecot_auth_socket = "${path.join(stack.dir, 'run/auth-client')}"
secure_cookie = false
[log]
level = "info"
`,
  );
  if (name === 'a') {
    // As a site installs it: the schema first (a node refuses a database without one: a wrong URL must not
    // give an empty store).
    const refused = spawnDaemon(config);
    await t.rejects(refused.ready, /holds no mfagate schema: check \[store\] url/, 'a node on a database without the schema does not start');
    const migrated = cli(['--config', config, 'db', 'migrate']);
    if (migrated.code !== 0) throw new Error(`db migrate: ${migrated.stderr}`);
  }
  const daemon = spawnDaemon(config);
  await daemon.ready;
  const n: Node = { name, dir: nodeDir, config, policyPort, webPort, apiSocket, daemon, stack };
  nodes[name] = n;
  return n;
}

/** Polls `probe` every 20 ms until it returns true; resolves to the time it took (ms), or fails after `limitMs`. */
async function timeUntil(probe: () => Promise<boolean>, limitMs: number): Promise<number> {
  const started = performance.now();
  for (;;) {
    if (await probe()) return performance.now() - started;
    if (performance.now() - started > limitMs) return Infinity;
    await new Promise((r) => setTimeout(r, 20));
  }
}

t.before(async () => {
  primary = await startPostgres();
  standby = await startStandby(primary);
  // Both hosts in the URL: the one that accepts writes is used (the standby refuses them until promoted).
  const url = `postgresql://mfagate@127.0.0.1:${primary.port},127.0.0.1:${standby.port}/mfagate`;
  await startNode('a', url, await freePort(), await freePort());
  // Every node seals and opens the same TOTP secrets: the key file is copied to each host, as a secret.
  fs.mkdirSync(path.join(dir, 'b'), { mode: 0o711 });
  fs.copyFileSync(path.join(node('a').dir, 'secrets.key'), path.join(dir, 'b', 'secrets.key'));
  await startNode('b', url, await freePort(), await freePort());
});

t.teardown(async () => {
  await Promise.allSettled([nodes.a?.stack.stop(), nodes.b?.stack.stop()]);
  await Promise.allSettled([nodes.a?.daemon.stop(), nodes.b?.daemon.stop()]);
  standby?.destroy();
  primary?.destroy();
  fs.rmSync(dir, { recursive: true, force: true });
});

t.test('a factor passed through node A lets a real IMAP login in on node B', async (t) => {
  t.ok((await imap('b', PHONE)).ok, 'before MFA is enabled: IMAP on B from the phone gets in');
  const begin = await api('a').post('/v1/users/alice/totp', { ip: PHONE });
  t.equal(begin.status, 200, begin.text);
  phone = new Authenticator(begin.json.secret as string);
  t.equal((await api('a').post('/v1/users/alice/totp/confirm', { ip: PHONE, code: await phone.next() })).status, 200, 'the app registered through A');
  const backup = await api('a').post('/v1/users/alice/backup-codes', { ip: PHONE, factor: { method: 'totp', code: await phone.next() } });
  t.equal(backup.status, 200, backup.text);
  backupCodes = backup.json.codes as string[];
  t.equal((await api('a').put('/v1/users/alice/mfa', { ip: PHONE })).status, 200, 'MFA enabled through A');

  const seenEnabled = await timeUntil(async () => (await decision('b', PHONE)) === false, 1000);
  t.ok(seenEnabled < 1000, `MFA enabled through A: node B refuses the phone ${Math.round(seenEnabled)} ms later`);
  const refused = await imap('b', PHONE);
  t.equal(refused.ok, false, 'a real IMAP login on B from the phone is refused', why(refused, 'b'));
  t.match(refused.line, MESSAGE, 'with the words that say what to do');

  const verified = await api('a').post('/v1/users/alice/verify', { ip: PHONE, factor: { method: 'totp', code: await phone.next() } });
  t.equal(verified.status, 200, verified.text);
  const seenByB = await timeUntil(async () => (await decision('b', PHONE)) === true, 1000);
  t.ok(seenByB < 1000, `node B allows the phone ${Math.round(seenByB)} ms after the grant was made through A`);
  const inOnB = await imap('b', PHONE);
  t.ok(inOnB.ok, 'a real IMAP login on B from the phone gets in', why(inOnB, 'b'));
  t.ok((await imap('a', PHONE)).ok, 'and on A');
  t.equal((await imap('b', ELSEWHERE)).ok, false, 'another address is still refused on B');

  // Node A's Postfix asks node A: SMTP AUTH (Dovecot's policy) and RCPT (Postfix's) both let the phone through.
  const sent = await smtpSubmit({ port: node('a').stack.smtpPort, user: 'alice', password: USERS.alice, localAddress: PHONE, from: `alice@${node('a').stack.domain}`, to: `bob@${node('a').stack.domain}` });
  t.ok(sent.authOk && sent.rcptOk && sent.dataOk, 'a real SMTP submission through A\'s Postfix from the phone', { transcript: sent.transcript.join('\n') });
  const refusedSmtp = await smtpSubmit({ port: node('a').stack.smtpPort, user: 'alice', password: USERS.alice, localAddress: ELSEWHERE, from: `alice@${node('a').stack.domain}`, to: `bob@${node('a').stack.domain}` });
  t.equal(refusedSmtp.authOk, false, 'and refused from elsewhere');
});

t.test('a revoke through node B\'s CLI refuses on node A within 1 s', async (t) => {
  t.equal(await decision('a', PHONE), true, 'A allows the phone before the revoke');
  const started = performance.now();
  const r = mfagate('b', 'grants', 'revoke', '--user', 'alice', '--reason', 'phone lost');
  t.equal(r.code, 0, r.stderr);
  t.match(r.stdout, /revoked 1 grant/, 'B\'s CLI revoked the grant');
  const cliMs = performance.now() - started;
  const refusedAfter = await timeUntil(async () => (await decision('a', PHONE)) === false, 1000);
  t.ok(refusedAfter < 1000, `node A refuses ${Math.round(refusedAfter)} ms after the CLI returned (the CLI took ${Math.round(cliMs)} ms)`);
  const onA = await imap('a', PHONE);
  t.equal(onA.ok, false, 'a real IMAP login on A from the phone is refused', why(onA, 'a'));
  t.equal((await imap('b', PHONE)).ok, false, 'and on B');
});

t.test('PostgreSQL stopped: both nodes decide from their copies, a factor passed gets 503, nothing crashes', async (t) => {
  // A grant to hold through the outage (a backup code: no wait for the next TOTP step).
  const code = backupCodes.shift() ?? '';
  t.equal((await api('a').post('/v1/users/alice/verify', { ip: PHONE, factor: { method: 'backup', code } })).status, 200, 'a grant for the phone, with a backup code');
  t.ok((await timeUntil(async () => (await decision('b', PHONE)) === true, 1000)) < 1000, 'B has the new grant');

  // alice has node A's MFA page open on a laptop elsewhere (signed in with her password through A's Dovecot).
  const laptop = new WebClient(node('a').webPort, { localAddress: ELSEWHERE });
  t.equal((await laptop.signIn('alice', USERS.alice)).status, 303, 'signed in to node A\'s MFA page');
  t.equal((await laptop.get('/')).status, 200, 'its home page');

  primary.stop('immediate');
  for (const n of ['a', 'b'] as const) {
    const inn = await imap(n, PHONE);
    t.ok(inn.ok, `node ${n.toUpperCase()}: the granted phone still gets in (IMAP)`, why(inn, n));
    const out = await imap(n, ELSEWHERE);
    t.equal(out.ok, false, `node ${n.toUpperCase()}: another address is still refused`);
  }
  const failed = await api('a').post('/v1/users/alice/verify', { ip: ELSEWHERE, factor: { method: 'backup', code: backupCodes[0] ?? '' } });
  t.equal(failed.status, 503, failed.text);
  t.equal(failed.json.error, 'store-unavailable', 'a factor passed while the database is down: 503 store-unavailable');
  t.match(failed.json.message, /nothing was changed/, 'saying nothing was changed');
  const list = await api('b').get('/v1/users/alice/grants');
  t.equal(list.status, 503, 'reading through the API says the same');
  const page = await laptop.post('/verify', { method: 'backup', code: backupCodes[0] ?? '' });
  t.equal(page.status, 503, 'the MFA page: passing a factor answers 503');
  t.match(unescapeHtml(page.body), 'This cannot be saved right now: the database cannot be reached. Nothing was changed', 'and says in words that nothing was saved');
  const jaHome = await (async () => {
    const c = new WebClient(node('a').webPort, { localAddress: ELSEWHERE, lang: 'ja' });
    for (const [k, v] of laptop.jar) c.jar.set(k, v);
    return c.get('/');
  })();
  t.equal(jaHome.status, 503, 'the home page with the database down: 503');
  t.match(unescapeHtml(jaHome.body), '現在、データベースに接続できないため保存できません。変更は行われていません。', 'in Japanese for a Japanese browser');
  const grants = mfagate('b', 'grants', 'list');
  t.equal(grants.code, 1, 'a CLI command that needs the database fails');
  t.match(grants.stderr, /PostgreSQL at postgresql:\/\/mfagate@127\.0\.0\.1/, 'and says which database it could not reach');
  t.equal(node('a').daemon.child.exitCode, null, 'node A runs');
  t.equal(node('b').daemon.child.exitCode, null, 'node B runs');
  for (const n of ['a', 'b'] as const) {
    const stale = await timeUntil(async () => node(n).daemon.output().includes('"copy-stale"'), 5000);
    t.ok(stale < Infinity, `node ${n.toUpperCase()} says once that its copy is stale`);
  }
  // `mfagate stats` on a host reads that host's daemon's state file: it says how old the copy is, database or not.
  let stats = mfagate('b', 'stats');
  await timeUntil(async () => (stats = mfagate('b', 'stats')).stdout.includes('the store cannot be read'), 8000);
  t.equal(stats.code, 1, 'stats exits 1 while the database cannot be reached');
  t.match(stats.stdout, /store: +CANNOT BE REACHED: PostgreSQL at postgresql:\/\/mfagate@127\.0\.0\.1/, 'stats says the database cannot be reached');
  t.match(stats.stdout, /decides from: +a copy in memory as it was at .*, \S+ ago \(1 users with MFA or exempt, \d+ grants\): the store cannot be read/, 'and how old node B\'s copy is');

  primary.start();
  for (const n of ['a', 'b'] as const) {
    const back = await timeUntil(async () => node(n).daemon.output().includes('"copy-current"'), 15_000);
    t.ok(back < Infinity, `node ${n.toUpperCase()} catches up without a restart`);
  }
  const staleLines = (n: 'a' | 'b') => node(n).daemon.output().split('\n').filter((l) => l.includes('"copy-stale"')).length;
  t.equal(staleLines('a'), 1, 'one copy-stale line on A for the whole outage, not one per request');
  t.equal(staleLines('b'), 1, 'and one on B');
  const again = await api('a').post('/v1/users/alice/verify', { ip: ELSEWHERE, factor: { method: 'backup', code: backupCodes.shift() ?? '' } });
  t.equal(again.status, 200, `the database back: a factor passed through A makes a grant again ${again.text}`);
  for (const n of ['a', 'b'] as const) {
    t.ok((await timeUntil(async () => (await decision(n, ELSEWHERE)) === true, 1000)) < 1000, `the new grant is seen by node ${n.toUpperCase()}`);
  }
  t.ok((await imap('b', ELSEWHERE)).ok, 'a real IMAP login on B from the new address');
});

t.test('node A killed with -9: node B is unaffected; node A restarts with everything', async (t) => {
  const a = node('a');
  await a.daemon.stop('SIGKILL');
  t.ok((await imap('b', PHONE)).ok, 'B lets the granted phone in');
  t.equal((await imap('b', '127.0.0.11')).ok, false, 'and refuses an address without a grant');
  const revoked = await api('b').get('/v1/users/alice/grants');
  t.equal(revoked.status, 200, 'B\'s API works');
  t.equal((revoked.json.grants as unknown[]).length, 2, 'with both grants');

  a.daemon = spawnDaemon(a.config);
  await a.daemon.ready;
  t.match(a.daemon.output(), /"copy":\{"load_ms":\d+,"flagged_users":1,"grants":2\}/, 'node A loaded its copy whole at start');
  t.equal(await decision('a', PHONE), true, 'A allows the phone again');
  t.equal(await decision('a', ELSEWHERE), true, 'and the other granted address');
  t.equal(await decision('a', '127.0.0.11'), false, 'and refuses the rest');
  const inn = await imap('a', PHONE);
  t.ok(inn.ok, 'a real IMAP login on A', why(inn, 'a'));
});

t.test('the primary lost, the standby promoted: writes go on without restarting the nodes', async (t) => {
  primary.stop('immediate');
  standby.promote();
  const code = backupCodes.shift() ?? '';
  let status = 0;
  const took = await timeUntil(async () => {
    const r = await api('b').post('/v1/users/alice/verify', { ip: '127.0.0.11', factor: { method: 'backup', code } });
    status = r.status;
    return r.status === 200;
  }, 20_000);
  t.equal(status, 200, `a factor passed through B is stored on the new primary (${Math.round(took)} ms after the promotion)`);
  t.equal(await decision('b', '127.0.0.11'), true, 'node B, which made the grant, allows that address at once');
  t.ok((await timeUntil(async () => (await decision('a', '127.0.0.11')) === true, 1000)) < 1000, 'node A within 1 s');
  t.match(node('b').daemon.output(), /"copy-current"/, 'the nodes followed the new primary without a restart');
  t.ok((await imap('a', '127.0.0.11')).ok, 'a real IMAP login on A from that address');
  const revoke = mfagate('a', 'grants', 'revoke', '--user', 'alice', '--ip', '127.0.0.11');
  t.equal(revoke.code, 0, `the CLI writes to the new primary too: ${revoke.stderr}`);
  t.ok((await timeUntil(async () => (await decision('b', '127.0.0.11')) === false, 1000)) < 1000, 'and B refuses that address within 1 s');
});
