// Nodes' in-memory copies following a real PostgreSQL 15 (store/pg-feed.ts): two "nodes" (two feeds, each
// with its own connections) on one database:
//   - a change written by one node's connection reaches the other node's copy within 1 s (NOTIFY), and also
//     with notifications lost (the poll by id);
//   - PostgreSQL stopped with `pg_ctl stop -m immediate`: the copies keep answering as they were, say so
//     once, and writes fail at once with an error; started again, the copies catch up without a restart;
//   - a copy behind the purged feed loads whole;
//   - a streaming standby promoted: with both hosts in the URL, writes and the feed go on against it.
import t from 'tap';
import { openPgStore } from '../../store/open.js';
import { migratePg, openPg, type PgDb } from '../../store/pg.js';
import { PgFeed } from '../../store/pg-feed.js';
import { type PgServer, startPostgres, startStandby } from '../helpers/postgres.js';

const HOUR = 3_600_000;
let pg: PgServer;
const settings = () => ({ url: pg.url, passwordFile: pg.passwordFile, tls: 'disable' as const, caFile: undefined });
const cleanups: (() => unknown)[] = [];
t.before(async () => {
  pg = await startPostgres();
  const sql = openPg(settings());
  await migratePg(sql);
  await sql.end();
});
t.teardown(async () => {
  for (const c of cleanups.reverse()) await c();
  pg?.destroy();
});

async function until(what: string, cond: () => boolean, ms = 1000): Promise<number> {
  const started = performance.now();
  while (!cond()) {
    if (performance.now() - started > ms) throw new Error(`not within ${ms} ms: ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
  return performance.now() - started;
}

/** Writes as a node's API would: a user with MFA, a grant, a revoke. */
function writer(sql: PgDb) {
  return {
    enable: (user: string) => sql.query('INSERT INTO users (name, mfa_enabled, created_at, updated_at) VALUES ($1, 1, 1, 1) ON CONFLICT (name) DO UPDATE SET mfa_enabled = 1', [user]),
    grant: async (user: string, block: string) => {
      const g = (await sql.query(`INSERT INTO grants ("user", block, ip, created_at, expires_at, method, source) VALUES ($1, $2, $2, $3, $4, 'totp', 'api') RETURNING id`, [user, block, Date.now(), Date.now() + HOUR])).rows[0];
      return g?.['id'] as number;
    },
    revoke: (id: number) => sql.query("UPDATE grants SET revoked_at = $1, revoked_by = 'cli:helpdesk' WHERE id = $2", [Date.now(), id]),
  };
}

t.test('a change made through one node reaches the other node\'s copy within 1 s; a lost notification is polled', async (t) => {
  const said: string[] = [];
  const a = new PgFeed(settings());
  const b = new PgFeed(settings(), { failed: () => said.push('failed'), recovered: () => said.push('recovered') });
  await a.start();
  await b.start();
  cleanups.push(() => a.stop(), () => b.stop());
  const sqlA = openPg(settings());
  cleanups.push(() => sqlA.end());
  const w = writer(sqlA);
  await w.enable('alice');
  const id = await w.grant('alice', '203.0.113.7');
  await until('B sees the grant made through A', () => b.copy.lookup('alice', '203.0.113.7', Date.now()).grant?.id === id);
  t.same(b.copy.lookup('alice', '203.0.113.7', Date.now()).user, { mfaEnabled: true, exempt: false });
  const latencies: number[] = [];
  for (let i = 0; i < 20; i++) {
    const g = await w.grant('alice', `198.51.100.${i}`);
    await until('the grant', () => b.copy.lookup('alice', `198.51.100.${i}`, Date.now()).grant !== undefined);
    const sent = performance.now();
    await w.revoke(g);
    await until(`revoke ${i} on B`, () => b.copy.lookup('alice', `198.51.100.${i}`, Date.now()).grant === undefined);
    latencies.push(performance.now() - sent);
  }
  latencies.sort((x, y) => x - y);
  t.pass(`20 revokes through A refused on B within 1 s (median ${latencies[10]?.toFixed(1)} ms, slowest ${latencies[19]?.toFixed(1)} ms)`);
  t.equal(a.copy.lookup('alice', '198.51.100.3', Date.now()).grant, undefined, 'and on A');
  // An app passcode made through A: B's passcode checks find it, and its revoke.
  const p = (
    await sqlA.query(
      `INSERT INTO passcodes ("user", name, selector, salt, hash, kdf, protocols, created_at, created_by) VALUES ('alice', 'phone', 'qwert', $1, $2, 'scrypt:n=4096,r=8,p=1', 'imap,smtp', $3, 'web') RETURNING id`,
      [Buffer.alloc(16, 1), Buffer.alloc(32, 2), Date.now()],
    )
  ).rows[0]?.['id'] as number;
  await until('B knows the passcode', () => b.copy.bySelector('qwert')?.id === p);
  t.match(b.copy.byId(p), { user: 'alice', protocols: ['imap', 'smtp'], salt: Buffer.alloc(16, 1), revokedAt: null });
  await sqlA.query("UPDATE passcodes SET revoked_at = $1, revoked_by = 'cli:helpdesk' WHERE id = $2", [Date.now(), p]);
  await until('B knows it is revoked', () => b.copy.byId(p)?.revokedAt !== null);

  // Without notifications (a feed that never listens): the poll by id alone brings the change, within its period.
  const deaf = new PgFeed(settings(), {}, { pollMs: 200 });
  await deaf.start();
  cleanups.push(() => deaf.stop());
  (deaf as unknown as { unlisten: () => Promise<void> }).unlisten();
  await new Promise((r) => setTimeout(r, 100));
  const late = await w.grant('alice', '192.0.2.1');
  await until('the polled feed sees it', () => deaf.copy.lookup('alice', '192.0.2.1', Date.now()).grant?.id === late);
  t.same(said, [], 'nothing failed');
});

t.test('PostgreSQL stopped: copies answer as they were and say so once; writes fail at once; started again, they catch up', async (t) => {
  const said: string[] = [];
  const feed = new PgFeed(settings(), { failed: (e) => said.push(`failed ${String(e).slice(0, 60)}`), recovered: () => said.push('recovered') }, { pollMs: 100 });
  await feed.start();
  cleanups.push(() => feed.stop());
  const sql = openPg(settings());
  cleanups.push(() => sql.end());
  const w = writer(sql);
  await w.enable('bob');
  const kept = await w.grant('bob', '203.0.113.9');
  await until('the grant', () => feed.copy.lookup('bob', '203.0.113.9', Date.now()).grant?.id === kept);

  pg.stop('immediate');
  await until('the feed notices', () => !feed.state().connected, 5000);
  let right = 0;
  for (let i = 0; i < 20; i++) {
    if (feed.copy.lookup('bob', '203.0.113.9', Date.now()).grant?.id === kept && feed.copy.lookup('bob', '203.0.113.10', Date.now()).grant === undefined) right++;
    await new Promise((r) => setTimeout(r, 20));
  }
  t.equal(right, 20, 'for 400 ms of lookups, the granted address still gets in and another is still refused');
  t.equal(said.length, 1, 'said once, not per poll or lookup');
  t.match(said[0], /^failed /);
  t.match(feed.state(), { connected: false, error: /\S/ }, 'the state says the database is unreachable, and why');
  const started = performance.now();
  await t.rejects(w.grant('bob', '203.0.113.11'), 'a write fails');
  t.ok(performance.now() - started < 10_000, 'with an error, not a hang');

  pg.start();
  await until('the feed is back', () => feed.state().connected, 15_000);
  t.same(said.slice(1), ['recovered']);
  const fresh = await w.grant('bob', '203.0.113.12');
  await until('a grant made after the restart', () => feed.copy.lookup('bob', '203.0.113.12', Date.now()).grant?.id === fresh, 2000);
  t.pass('new grants reach the copy, no restart of the node');
});

t.test('a copy behind the purged feed loads whole', async (t) => {
  let loads = 0;
  const feed = new PgFeed(settings(), { loaded: () => loads++ }, { pollMs: 60_000 });
  await feed.start();
  cleanups.push(() => feed.stop());
  (feed as unknown as { unlisten: () => Promise<void> }).unlisten();
  const store = await openPgStore(settings());
  cleanups.push(() => store.close());
  const sql = store.pg?.db;
  if (!sql) throw new Error('openPgStore gave no database');
  const w = writer(sql);
  await w.enable('carol');
  const g = await w.grant('carol', '203.0.113.20');
  t.ok((await store.records.purgeChanges(Date.now() + 1000)) >= 2, 'the feed was purged past this copy');
  await feed.poke();
  t.equal(loads, 2, 'loaded at start, and again');
  t.equal(feed.copy.lookup('carol', '203.0.113.20', Date.now()).grant?.id, g, 'with the grant it never read as a change');
});

t.test('a streaming standby promoted: writes and the feed go on against it, with both hosts in the URL', async (t) => {
  const standby = await startStandby(pg);
  cleanups.push(() => standby.destroy());
  const both = { ...settings(), url: `postgresql://mfagate@127.0.0.1:${pg.port},127.0.0.1:${standby.port}/mfagate` };
  const feed = new PgFeed(both, {}, { pollMs: 200 });
  await feed.start();
  cleanups.push(() => feed.stop());
  const sql = openPg(both);
  cleanups.push(() => sql.end());
  const w = writer(sql);
  await w.enable('dave');
  const before = await w.grant('dave', '203.0.113.30');
  await until('the grant', () => feed.copy.lookup('dave', '203.0.113.30', Date.now()).grant?.id === before);
  // The standby has it too, and refuses writes while it is one.
  await until('replicated', () => standby.psql(`SELECT count(*) FROM grants WHERE id = ${before}`, 'mfagate').trim() === '1', 10_000);
  t.match(standby.psql('SELECT pg_is_in_recovery()', 'mfagate').trim(), 't', 'a standby');

  pg.stop('immediate');
  standby.promote();
  t.match(standby.psql('SELECT pg_is_in_recovery()', 'mfagate').trim(), 'f', 'promoted');
  // The pool's connections to the old primary are dead; new ones go to the host that accepts writes.
  let after: number | undefined;
  const deadline = Date.now() + 30_000;
  while (after === undefined && Date.now() < deadline) {
    after = await w.grant('dave', '203.0.113.31').catch(() => undefined);
    if (after === undefined) await new Promise((r) => setTimeout(r, 200));
  }
  t.ok(after, 'a write succeeds on the new primary, the same pool, no restart');
  await until('the feed follows the new primary', () => feed.copy.lookup('dave', '203.0.113.31', Date.now()).grant?.id === after, 20_000);
  t.equal(feed.copy.lookup('dave', '203.0.113.30', Date.now()).grant?.id, before, 'and keeps what it had');
});
