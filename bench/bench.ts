// `npm run bench`: throughput and latency of both endpoints against a large store, next to the floor (a Node
// server on the same transport that answers a constant). Not a test: it prints a table and records the
// figures in BENCHMARKS.md.
//
// The daemon runs as a child process (`mfagate serve`) with its decision log written to a file, so its CPU,
// memory and logging are its own; this process fills the store beforehand and then only generates load.
//
// Two loads per server: saturated (closed loop: throughput, and latency under overload) and paced (a fixed
// request rate well below capacity: the latency a login sees normally).
//
// Environment: BENCH_SECONDS (measured seconds of the saturated runs, default 10), BENCH_WARMUP_SECONDS
// (default 2), BENCH_CONNECTIONS (default 64), BENCH_USERS (default 100000; 10 grants each), BENCH_PACED_RATE
// (requests/s of the paced runs, default 2000), BENCH_LOG ("file", the default, or "null" to send the decision
// log to /dev/null), BENCH_WRITE ("0" leaves BENCHMARKS.md alone), BENCH_DAEMON_NODE_ARGS (extra node flags
// for the daemon, e.g. "--cpu-prof --cpu-prof-dir=DIR" to profile it).
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { migratePg, openPg, copyToPg } from '../store/pg.js';
import { Store } from '../store/store.js';
import { type LoadKind, type Row, type Run, figures, loadName, markdown, mib, ms, pct, serverName, table, writeReport } from './bench-report.js';
import { type PgServer, startPostgres } from './pg-server.js';
import { int, runBench } from './report.js';
import { type Child, cpuSeconds, machine, scratchDir, start, statusKb } from './proc.js';
import { type ReplyReader, type Target, httpReader, postfixReader, runLoad } from './load.js';
import { BENCH } from './settings.js';
import { GRANTS_PER_USER, dovecotRequest, fillStore, postfixRequest, requestMix } from './workload.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, '../..');
const CLI = path.join(ROOT, 'dist/cli/main.js');
const FLOOR = path.join(HERE, 'floor.js');

const { seconds: SECONDS, warmup: WARMUP, connections: CONNECTIONS, users: USERS, logTo: LOG_TO, write: WRITE, daemonNodeArgs: DAEMON_NODE_ARGS, pacedRate: PACED_RATE, pacedWarmup: PACED_WARMUP, pacedSeconds: PACED_SECONDS } = BENCH;
const POOL = 65_536;
const API_KEY = 'bench-api-key-0123456789abcdef';

// ---- children and cleanup --------------------------------------------------------------------------------

/** The scratch directory (store, config, sockets): removed, and every child killed, however the run ends. */
const { dir, cleanup: removeScratch } = scratchDir('mfagate-bench-');
let pg: PgServer | undefined;
const cleanup = () => {
  pg?.destroy();
  pg = undefined;
  removeScratch();
};

async function countLines(file: string): Promise<number> {
  let n = 0;
  for await (const chunk of fs.createReadStream(file, { highWaterMark: 1 << 20 }) as AsyncIterable<Buffer>) {
    for (let i = chunk.indexOf(10); i >= 0; i = chunk.indexOf(10, i + 1)) n++;
  }
  return n;
}

// ---- one measured run ------------------------------------------------------------------------------------------

async function measure(server: Child, target: Target, payloads: Buffer[], reader: () => ReplyReader, rate?: number): Promise<Run> {
  let cpu0 = 0;
  let cpu1 = 0;
  const load = await runLoad({
    target,
    connections: CONNECTIONS,
    warmupMs: (rate ? PACED_WARMUP : WARMUP) * 1000,
    measureMs: (rate ? PACED_SECONDS : SECONDS) * 1000,
    payloads,
    reader,
    ...(rate ? { rate } : {}),
    onWindow: (edge) => {
      if (edge === 'start') cpu0 = cpuSeconds(server.pid);
      else cpu1 = cpuSeconds(server.pid);
    },
  });
  return { load, peakRssKb: statusKb(server.pid, 'VmHWM'), serverCpu: (cpu1 - cpu0) / load.seconds };
}

// ---- the benchmark -----------------------------------------------------------------------------------------------

async function main(): Promise<void> {
  if (!fs.existsSync(CLI) || !fs.existsSync(FLOOR)) throw new Error('build first: npm run build (or use npm run bench)');
  const m = machine();
  const started = Date.now();
  const out = (s: string) => process.stdout.write(s + '\n');

  out(`mfagate benchmark: ${m.model}, ${m.cores} cores, Node ${m.node}, SQLite ${m.sqlite}`);
  out(
    `${CONNECTIONS} connections per run; saturated: closed loop, ${WARMUP} s warm-up + ${SECONDS} s; ` +
      `paced: ${int(PACED_RATE)} req/s, ${PACED_WARMUP} s + ${PACED_SECONDS} s; decision log to ${LOG_TO === 'file' ? 'a file' : '/dev/null'}`,
  );

  /** One configuration per backend: the same settings, the store where that backend keeps it. */
  const configFor = (backend: 'sqlite' | 'postgresql') => {
    const file = path.join(dir, `mfagate-${backend}.toml`);
    fs.writeFileSync(
      file,
      [
        '[store]',
        ...(backend === 'sqlite' || !pg
          ? ['path = "mfagate.db"']
          : ['backend = "postgresql"', `url = "${pg.url}"`, `password_file = "${pg.passwordFile}"`, 'tls = "disable"']),
        '[networks]',
        'trusted = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "192.0.2.0/24", "198.51.100.0/24", "2001:db8:ffff::/48", "fd00::/8"]',
        'untrusted = ["10.200.0.0/16", "10.201.0.0/16"]',
        'webmail = ["192.0.2.10", "2001:db8:ffff::10"]',
        '[enforcement]',
        'mode = "enforce"',
        '[dovecot]',
        'listen = ["127.0.0.1:0"]',
        `api_key = "${API_KEY}"`,
        '[postfix]',
        'listen = ["unix:policy.sock"]',
        '[web]',
        'listen = []',
        '[log]',
        'level = "info"',
        '',
      ].join('\n'),
    );
    return file;
  };
  const storeFile = path.join(dir, 'mfagate.db');
  const postfixSocket = path.join(dir, 'policy.sock');

  out(`filling the store: ${int(USERS)} users, ${int(USERS * GRANTS_PER_USER)} grants ...`);
  const fill = fillStore(storeFile, USERS, { ipv4: 32, ipv6: 64 }, Date.now());
  const storeMiB = fs.statSync(storeFile).size / 2 ** 20;
  out(`  filled in ${(fill.ms / 1000).toFixed(1)} s (${int(fill.activeGrants)} active grants, ${storeMiB.toFixed(0)} MiB)`);

  // PostgreSQL: a server of our own on loopback, and the same store copied in as `mfagate db copy` does.
  let pgCopyMs: number | undefined;
  let pgVersion: string | undefined;
  if (BENCH.backends.includes('postgresql')) {
    out('starting PostgreSQL and copying the store into it (as mfagate db copy does) ...');
    pg = await startPostgres();
    pgVersion = pg.psql('SHOW server_version').trim();
    const db = openPg({ url: pg.url, passwordFile: pg.passwordFile, tls: 'disable', caFile: undefined }, { max: 1, queryTimeoutMs: 3_600_000 });
    const store = Store.open(storeFile, { create: false, migrate: true });
    try {
      const copyStarted = performance.now();
      await migratePg(db);
      await copyToPg(store, db, 2000);
      pgCopyMs = performance.now() - copyStarted;
      await db.query('VACUUM ANALYZE');
    } finally {
      store.close();
      await db.end();
    }
    out(`  copied in ${(pgCopyMs / 1000).toFixed(1)} s (PostgreSQL ${pgVersion})`);
  }

  const mix = requestMix(POOL, USERS);
  const expectedAllow = mix.filter((r) => r.allow).length / mix.length;
  const postfixPayloads = mix.map((r, n) => postfixRequest(r, n));

  /** How each daemon started: from spawning to listening, and the in-memory copy's load (its `started` line). */
  const starts: { endpoint: string; backend: string; readyMs: number; copy: { load_ms: number; flagged_users: number; grants: number } | undefined }[] = [];
  const startDaemon = async (tag: string, backend: 'sqlite' | 'postgresql') => {
    const logFile = path.join(dir, `decisions-${tag}-${backend}.log`);
    const fd = fs.openSync(LOG_TO === 'file' ? logFile : '/dev/null', 'w');
    const spawned = performance.now();
    try {
      const d = await start(
        [...DAEMON_NODE_ARGS, CLI, '--config', configFor(backend), 'serve'],
        fd,
        /dovecot auth policy\s+127\.0\.0\.1:(\d+)\n[\s\S]*store\s/,
        'mfagate serve',
      );
      const readyMs = performance.now() - spawned;
      let copy;
      if (LOG_TO === 'file') {
        const line = fs.readFileSync(logFile, 'utf8').split('\n').find((l) => l.includes('"event":"started"'));
        copy = line ? (JSON.parse(line) as { copy?: { load_ms: number; flagged_users: number; grants: number } }).copy : undefined;
      }
      starts.push({ endpoint: tag, backend, readyMs, copy });
      return { d, port: Number(d.match[1]), logFile };
    } finally {
      fs.closeSync(fd);
    }
  };

  const rows: Row[] = [];
  const logs: { endpoint: string; bytes: number; lines: number }[] = [];
  /** Both loads against one server process: saturated first (its peak RSS is the one reported), then paced. */
  const both = async (endpoint: Row['endpoint'], server: Row['server'], child: Child, target: Target, payloads: Buffer[], reader: () => ReplyReader) => {
    for (const load of ['saturated', 'paced'] as const) {
      const run = await measure(child, target, payloads, reader, load === 'paced' ? PACED_RATE : undefined);
      const l = run.load;
      if (l.other > 0) throw new Error(`${endpoint} ${server}: ${l.other} unexpected replies`);
      if (server !== 'floor') {
        const allow = l.allowed / (l.allowed + l.refused);
        // The mix is fixed; a different share means the store is not what the workload assumes.
        if (Math.abs(allow - expectedAllow) > 0.03) throw new Error(`${endpoint} ${server}: ${pct(allow)} allowed, expected ${pct(expectedAllow)}`);
      }
      rows.push({ endpoint, server, load, run });
      const f = figures(run);
      out(
        `  ${serverName(server).padEnd(20)} ${loadName(load).padEnd(22)} ${int(f.rps).padStart(7)} req/s  p50 ${ms(f.p50)} ms  p99 ${ms(f.p99)} ms  ` +
          `p99.9 ${ms(f.p999)} ms  peak RSS ${mib(run.peakRssKb)}  server CPU ${pct(run.serverCpu)}`,
      );
    }
  };

  // Postfix: UNIX socket, line protocol.
  out('postfix policy (UNIX socket):');
  {
    const floorSocket = path.join(dir, 'floor.sock');
    const floor = await start([FLOOR, 'postfix', floorSocket], 'pipe', /ready /, 'postfix floor');
    try {
      await both('postfix', 'floor', floor, { kind: 'unix', path: floorSocket }, postfixPayloads, postfixReader);
    } finally {
      await floor.stop();
    }
    for (const backend of BENCH.backends) {
      const { d, logFile } = await startDaemon('postfix', backend);
      try {
        await both('postfix', backend, d, { kind: 'unix', path: postfixSocket }, postfixPayloads, postfixReader);
      } finally {
        await d.stop();
      }
      if (LOG_TO === 'file') logs.push({ endpoint: `postfix (${backend})`, bytes: fs.statSync(logFile).size, lines: await countLines(logFile) });
    }
  }

  // Dovecot: HTTP/1.1 keep-alive over loopback TCP (Dovecot 2.3 cannot use a UNIX socket).
  out('dovecot auth policy (HTTP, loopback TCP):');
  {
    const floor = await start([FLOOR, 'http'], 'pipe', /ready (\d+)/, 'http floor');
    try {
      const port = Number(floor.match[1]);
      const payloads = mix.map((r, n) => dovecotRequest(r, n, `127.0.0.1:${port}`, API_KEY));
      await both('dovecot', 'floor', floor, { kind: 'tcp', host: '127.0.0.1', port }, payloads, httpReader);
    } finally {
      await floor.stop();
    }
    for (const backend of BENCH.backends) {
      const { d, port, logFile } = await startDaemon('dovecot', backend);
      try {
        const payloads = mix.map((r, n) => dovecotRequest(r, n, `127.0.0.1:${port}`, API_KEY));
        await both('dovecot', backend, d, { kind: 'tcp', host: '127.0.0.1', port }, payloads, httpReader);
      } finally {
        await d.stop();
      }
      if (LOG_TO === 'file') logs.push({ endpoint: `dovecot (${backend})`, bytes: fs.statSync(logFile).size, lines: await countLines(logFile) });
    }
  }

  // ---- summary -------------------------------------------------------------------------------------------------
  const find = (endpoint: Row['endpoint'], server: Row['server'], load: LoadKind) =>
    rows.find((r) => r.endpoint === endpoint && r.server === server && r.load === load);
  const summary: string[] = [];
  for (const endpoint of ['postfix', 'dovecot'] as const) {
    for (const backend of BENCH.backends) {
      const ours = find(endpoint, backend, 'saturated');
      const floor = find(endpoint, 'floor', 'saturated');
      const paced = find(endpoint, backend, 'paced');
      if (!ours || !floor || !paced) continue;
      const o = figures(ours.run);
      const f = figures(floor.run);
      const ratio = o.rps / f.rps;
      summary.push(
        `${endpoint}, ${serverName(backend)}: ${(ratio * 100).toFixed(0)} % of the floor's throughput (aim 50 %: ${ratio >= 0.5 ? 'met' : 'MISSED'}); ` +
          `p99 ${ms(o.p99)} ms saturated (floor ${ms(f.p99)} ms; aim 2 ms: ${o.p99 < 2 ? 'met' : 'MISSED'}), ` +
          `${ms(figures(paced.run).p99)} ms at ${int(PACED_RATE)} req/s; peak RSS ${mib(ours.run.peakRssKb)} (aim 400 MiB: ${ours.run.peakRssKb < 400 * 1024 ? 'met' : 'MISSED'})`,
      );
    }
  }
  for (const st of starts) {
    summary.push(
      `${st.endpoint} daemon on ${st.backend === 'sqlite' ? 'SQLite' : 'PostgreSQL'}: listening ${(st.readyMs / 1000).toFixed(2)} s after it was started (aim 5 s: ${st.readyMs < 5000 ? 'met' : 'MISSED'})` +
        (st.copy ? `, of which loading the in-memory copy (${int(st.copy.flagged_users)} users with a flag, ${int(st.copy.grants)} active grants) took ${(st.copy.load_ms / 1000).toFixed(2)} s` : ''),
    );
  }
  out('');
  out(table(rows).join('\n'));
  out('');
  for (const s of summary) out(s);
  out(`total ${((Date.now() - started) / 1000).toFixed(0)} s`);

  if (WRITE) {
    writeReport(markdown({ m, fill, storeMiB, pgCopyMs, pgVersion, expectedAllow, rows, logs, summary }));
    out('figures written to BENCHMARKS.md');
  }
}

runBench(main, cleanup);
