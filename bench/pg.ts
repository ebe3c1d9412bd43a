// The shared PostgreSQL store as a node sees it (bench/pg.ts, part of `npm run bench`): a real PostgreSQL 15
// started here (bench/pg-server.ts), filled like the SQLite benchmark (100,000 users with MFA, 1,000,000
// grants of which 800,000 active), then:
//   - the time a node takes to load its in-memory copy from it, and the memory the copy holds;
//   - the cross-node revoke latency: node A revokes a grant (one UPDATE through its own connection), and the
//     time until node B's copy no longer has it (NOTIFY, then B reads the change), over a few hundred revokes.
// Written to BENCHMARKS.md between its own markers. Environment: BENCH_USERS (100,000), BENCH_REVOKES (300),
// BENCH_WRITE ("0" leaves BENCHMARKS.md alone).
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { migratePg, openPg } from '../store/pg.js';
import { PgFeed } from '../store/pg-feed.js';
import { type PgServer, startPostgres } from './pg-server.js';
import { envNumber, machine } from './proc.js';
import { int, runBench, writeSection } from './report.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const REPORT = path.join(ROOT, 'BENCHMARKS.md');
const USERS = envNumber('BENCH_USERS', 100_000);
const REVOKES = envNumber('BENCH_REVOKES', 300);
const WRITE = process.env['BENCH_WRITE'] !== '0';
const HOUR = 3_600_000;

const out = (s: string) => process.stdout.write(s + '\n');
const pct = (sorted: number[], q: number) => sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))] ?? NaN;
const rssMiB = () => process.memoryUsage().rss / 2 ** 20;

let pg: PgServer | undefined;

async function main(): Promise<void> {
  const m = machine();
  out(`mfagate PostgreSQL benchmark: ${m.model}, ${m.cores} cores, Node ${process.version}`);
  pg = await startPostgres();
  const settings = { url: pg.url, passwordFile: pg.passwordFile, tls: 'disable' as const, caFile: undefined };
  const db = openPg(settings, { max: 2, queryTimeoutMs: 600_000 });
  await migratePg(db);
  const now = Date.now();
  out(`filling: ${int(USERS)} users, ${int(USERS * 10)} grants ...`);
  const fillStarted = performance.now();
  // As bench/workload.ts: 10 grants a user, 7 active IPv4, 1 active IPv6 /64, 1 expired, 1 revoked. The change
  // feed's triggers are off for the fill (a million one-row changes would only fill the feed).
  await db.query('ALTER TABLE grants DISABLE TRIGGER USER');
  await db.query('ALTER TABLE users DISABLE TRIGGER USER');
  await db.query(`INSERT INTO users (name, mfa_enabled, created_at, updated_at) SELECT 'user' || i, 1, $1::bigint, $1::bigint FROM generate_series(1, $2::int) i`, [now, USERS]);
  await db.query(
    `INSERT INTO grants ("user", block, ip, created_at, expires_at, method, source, revoked_at)
     SELECT 'user' || i,
            CASE WHEN k = 7 THEN '2001:db8:' || to_hex(i) || '::/64' ELSE (10 + k) || '.' || (i / 65536) || '.' || (i / 256 % 256) || '.' || (i % 256) END,
            CASE WHEN k = 7 THEN '2001:db8:' || to_hex(i) || '::1' ELSE (10 + k) || '.' || (i / 65536) || '.' || (i / 256 % 256) || '.' || (i % 256) END,
            $1::bigint, CASE WHEN k = 8 THEN $1::bigint - 3 * 86400000 ELSE $1::bigint + 14 * ${HOUR} END, 'totp', 'api',
            CASE WHEN k = 9 THEN $1::bigint ELSE NULL END
     FROM generate_series(1, $2::int) i, generate_series(0, 9) k`,
    [now, USERS],
  );
  await db.query('ALTER TABLE grants ENABLE TRIGGER USER');
  await db.query('ALTER TABLE users ENABLE TRIGGER USER');
  await db.query('VACUUM ANALYZE');
  const fillMs = performance.now() - fillStarted;
  out(`  filled in ${(fillMs / 1000).toFixed(1)} s`);

  // Node B: its copy, loaded whole.
  global.gc?.();
  const rssBefore = rssMiB();
  const heapBefore = process.memoryUsage().heapUsed / 2 ** 20;
  let loadMs = 0;
  const b = new PgFeed(settings, { loaded: (ms) => (loadMs = ms) });
  const startStarted = performance.now();
  const peakTimer = setInterval(() => (peak = Math.max(peak, rssMiB())), 20);
  let peak = rssBefore;
  await b.start();
  const startMs = performance.now() - startStarted;
  clearInterval(peakTimer);
  const peakCopy = Math.max(peak, rssMiB()) - rssBefore;
  global.gc?.();
  const rssCopy = rssMiB() - rssBefore;
  const heapCopy = process.memoryUsage().heapUsed / 2 ** 20 - heapBefore;
  const size = b.copy.size();
  out(`  node B loaded its copy (${int(size.flaggedUsers)} users, ${int(size.grants)} grants) in ${(loadMs / 1000).toFixed(2)} s; started in ${(startMs / 1000).toFixed(2)} s; heap +${heapCopy.toFixed(0)} MiB, RSS +${rssCopy.toFixed(0)} MiB`);

  // Node A revokes; node B's copy is watched until the grant is gone.
  const latencies: number[] = [];
  for (let n = 0; n < REVOKES; n++) {
    const user = `user${1 + ((n * 7919) % USERS)}`;
    const r = (await db.query('SELECT id, block FROM grants WHERE "user" = $1 AND revoked_at IS NULL AND expires_at > $2 LIMIT 1', [user, Date.now()])).rows[0];
    if (!r) continue;
    const block = r['block'] as string;
    if (!b.copy.lookup(user, block, Date.now()).grant) throw new Error(`node B does not hold ${user} ${block}`);
    const sent = performance.now();
    await db.query("UPDATE grants SET revoked_at = $1, revoked_by = 'bench' WHERE id = $2", [Date.now(), r['id']]);
    while (b.copy.lookup(user, block, Date.now()).grant) await new Promise((res) => setImmediate(res));
    latencies.push(performance.now() - sent);
    await new Promise((res) => setTimeout(res, 5));
  }
  latencies.sort((x, y) => x - y);
  const p50 = pct(latencies, 0.5);
  const p99 = pct(latencies, 0.99);
  const max = latencies[latencies.length - 1] ?? NaN;
  out(`  cross-node revoke, ${latencies.length} revokes: p50 ${p50.toFixed(1)} ms, p99 ${p99.toFixed(1)} ms, max ${max.toFixed(1)} ms`);
  await b.stop();
  await db.end();

  if (WRITE) {
    const stamp = new Date().toISOString().slice(0, 16).replace('T', ' ');
    writeSection(
      REPORT,
      '<!-- bench:pg:start -->',
      '<!-- bench:pg:end -->',
      [
        '<!-- bench:pg:start -->',
        `## The shared PostgreSQL store: latest run ${stamp} UTC`,
        '',
        `\`npm run bench\` also starts a PostgreSQL ${pg.psql('SHOW server_version').trim()} of its own (bench/pg.ts) on loopback, fills it like the SQLite store (${int(USERS)} users with MFA, ${int(USERS * 10)} grants, 80 % active; ${(fillMs / 1000).toFixed(0)} s), and measures what a node does with it (store/pg-feed.ts). ${m.model}, ${m.cores} cores, Node ${process.version}. The endpoints served from PostgreSQL are in the first table of this file (\`mfagate serve\` with \`backend = "postgresql"\`).`,
        '',
        '| what | figure |',
        '|---|--:|',
        `| a node loads its in-memory copy (${int(size.flaggedUsers)} users with a flag, ${int(size.grants)} active grants) | ${(loadMs / 1000).toFixed(2)} s (aim for the whole start: under 5 s) |`,
        `| memory the copy holds: V8 heap after a full GC, less before | ${heapCopy.toFixed(0)} MiB |`,
        `| the process's RSS after loading, less before (V8 keeps what the load's rows took; peak +${peakCopy.toFixed(0)} MiB) | ${rssCopy.toFixed(0)} MiB |`,
        `| cross-node revoke: UPDATE on node A's connection until node B's copy refuses, p50 | ${p50.toFixed(1)} ms |`,
        `| the same, p99 (${latencies.length} revokes, one at a time) | ${p99.toFixed(1)} ms |`,
        `| the same, slowest | ${max.toFixed(1)} ms (the bound: 1 s) |`,
        '',
        '- B learns of a change by NOTIFY (sent at A\'s commit), then reads the changed users in one snapshot; a poll by id once a second is the safety net for a lost notification.',
        '<!-- bench:pg:end -->',
      ].join('\n'),
    );
    out('figures written to BENCHMARKS.md');
  }
}

runBench(main, () => pg?.destroy());
