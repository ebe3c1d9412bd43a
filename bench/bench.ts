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
import { int, runBench, writeSection } from './report.js';
import { type Child, cpuSeconds, envNumber, machine, scratchDir, start, statusKb } from './proc.js';
import { type LoadResult, type ReplyReader, type Target, httpReader, percentileMs, postfixReader, runLoad } from './load.js';
import { GRANTS_PER_USER, dovecotRequest, fillStore, postfixRequest, requestMix } from './workload.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, '../..');
const CLI = path.join(ROOT, 'dist/cli/main.js');
const FLOOR = path.join(HERE, 'floor.js');
const REPORT = path.join(ROOT, 'BENCHMARKS.md');

const SECONDS = envNumber('BENCH_SECONDS', 10);
const WARMUP = envNumber('BENCH_WARMUP_SECONDS', 2);
const CONNECTIONS = Math.round(envNumber('BENCH_CONNECTIONS', 64));
const USERS = Math.round(envNumber('BENCH_USERS', 100_000));
const LOG_TO = process.env['BENCH_LOG'] === 'null' ? 'null' : 'file';
const WRITE = process.env['BENCH_WRITE'] !== '0';
/** Extra node flags for the daemon only, e.g. "--cpu-prof --cpu-prof-dir=DIR" to profile it. */
const DAEMON_NODE_ARGS = (process.env['BENCH_DAEMON_NODE_ARGS'] ?? '').split(/\s+/).filter((a) => a !== '');
const PACED_RATE = Math.round(envNumber('BENCH_PACED_RATE', 2000));
const PACED_WARMUP = 1;
const PACED_SECONDS = Math.max(5, SECONDS / 2);
const POOL = 65_536;
const API_KEY = 'bench-api-key-0123456789abcdef';

// ---- children and cleanup --------------------------------------------------------------------------------

/** The scratch directory (store, config, sockets): removed, and every child killed, however the run ends. */
const { dir, cleanup } = scratchDir('mfagate-bench-');

async function countLines(file: string): Promise<number> {
  let n = 0;
  for await (const chunk of fs.createReadStream(file, { highWaterMark: 1 << 20 }) as AsyncIterable<Buffer>) {
    for (let i = chunk.indexOf(10); i >= 0; i = chunk.indexOf(10, i + 1)) n++;
  }
  return n;
}

// ---- one measured run ------------------------------------------------------------------------------------------

interface Run {
  load: LoadResult;
  /** VmHWM of the server process after the run. */
  peakRssKb: number;
  serverCpu: number;
}

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

type LoadKind = 'saturated' | 'paced';

interface Row {
  endpoint: 'postfix' | 'dovecot';
  server: 'floor' | 'mfagate';
  load: LoadKind;
  run: Run;
}

const ms = (v: number) => (v < 10 ? v.toFixed(2) : v.toFixed(1));
const mib = (kb: number) => `${(kb / 1024).toFixed(0)} MiB`;
const pct = (v: number) => `${(v * 100).toFixed(0)} %`;
const loadName = (l: LoadKind) => (l === 'saturated' ? `${CONNECTIONS} conns, closed loop` : `${int(PACED_RATE)} req/s paced`);

function figures(r: Run) {
  const l = r.load;
  return {
    rps: l.requests / l.seconds,
    p50: percentileMs(l.latencies, 0.5),
    p99: percentileMs(l.latencies, 0.99),
    p999: percentileMs(l.latencies, 0.999),
    max: percentileMs(l.latencies, 1),
  };
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

  const configFile = path.join(dir, 'mfagate.toml');
  fs.writeFileSync(
    configFile,
    [
      '[store]',
      'path = "mfagate.db"',
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
  const storeFile = path.join(dir, 'mfagate.db');
  const postfixSocket = path.join(dir, 'policy.sock');

  out(`filling the store: ${int(USERS)} users, ${int(USERS * GRANTS_PER_USER)} grants ...`);
  const fill = fillStore(storeFile, USERS, { ipv4: 32, ipv6: 64 }, Date.now());
  const storeMiB = fs.statSync(storeFile).size / 2 ** 20;
  out(`  filled in ${(fill.ms / 1000).toFixed(1)} s (${int(fill.activeGrants)} active grants, ${storeMiB.toFixed(0)} MiB)`);

  const mix = requestMix(POOL, USERS);
  const expectedAllow = mix.filter((r) => r.allow).length / mix.length;
  const postfixPayloads = mix.map((r, n) => postfixRequest(r, n));

  /** How each daemon started: from spawning to listening, and the in-memory copy's load (its `started` line). */
  const starts: { endpoint: string; readyMs: number; copy: { load_ms: number; flagged_users: number; grants: number } | undefined }[] = [];
  const startDaemon = async (tag: string) => {
    const logFile = path.join(dir, `decisions-${tag}.log`);
    const fd = fs.openSync(LOG_TO === 'file' ? logFile : '/dev/null', 'w');
    const spawned = performance.now();
    try {
      const d = await start(
        [...DAEMON_NODE_ARGS, CLI, '--config', configFile, 'serve'],
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
      starts.push({ endpoint: tag, readyMs, copy });
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
      if (server === 'mfagate') {
        const allow = l.allowed / (l.allowed + l.refused);
        // The mix is fixed; a different share means the store is not what the workload assumes.
        if (Math.abs(allow - expectedAllow) > 0.03) throw new Error(`${endpoint}: ${pct(allow)} allowed, expected ${pct(expectedAllow)}`);
      }
      rows.push({ endpoint, server, load, run });
      const f = figures(run);
      out(
        `  ${server.padEnd(8)} ${loadName(load).padEnd(22)} ${int(f.rps).padStart(7)} req/s  p50 ${ms(f.p50)} ms  p99 ${ms(f.p99)} ms  ` +
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
    const { d, logFile } = await startDaemon('postfix');
    try {
      await both('postfix', 'mfagate', d, { kind: 'unix', path: postfixSocket }, postfixPayloads, postfixReader);
    } finally {
      await d.stop();
    }
    if (LOG_TO === 'file') logs.push({ endpoint: 'postfix', bytes: fs.statSync(logFile).size, lines: await countLines(logFile) });
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
    const { d, port, logFile } = await startDaemon('dovecot');
    try {
      const payloads = mix.map((r, n) => dovecotRequest(r, n, `127.0.0.1:${port}`, API_KEY));
      await both('dovecot', 'mfagate', d, { kind: 'tcp', host: '127.0.0.1', port }, payloads, httpReader);
    } finally {
      await d.stop();
    }
    if (LOG_TO === 'file') logs.push({ endpoint: 'dovecot', bytes: fs.statSync(logFile).size, lines: await countLines(logFile) });
  }

  // ---- summary -------------------------------------------------------------------------------------------------
  const find = (endpoint: Row['endpoint'], server: Row['server'], load: LoadKind) =>
    rows.find((r) => r.endpoint === endpoint && r.server === server && r.load === load);
  const summary: string[] = [];
  for (const endpoint of ['postfix', 'dovecot'] as const) {
    const ours = find(endpoint, 'mfagate', 'saturated');
    const floor = find(endpoint, 'floor', 'saturated');
    const paced = find(endpoint, 'mfagate', 'paced');
    if (!ours || !floor || !paced) continue;
    const o = figures(ours.run);
    const f = figures(floor.run);
    const ratio = o.rps / f.rps;
    summary.push(
      `${endpoint}: ${(ratio * 100).toFixed(0)} % of the floor's throughput (aim 50 %: ${ratio >= 0.5 ? 'met' : 'MISSED'}); ` +
        `p99 ${ms(o.p99)} ms saturated (floor ${ms(f.p99)} ms; aim 2 ms: ${o.p99 < 2 ? 'met' : 'MISSED'}), ` +
        `${ms(figures(paced.run).p99)} ms at ${int(PACED_RATE)} req/s`,
    );
  }
  for (const st of starts) {
    summary.push(
      `${st.endpoint} daemon: listening ${(st.readyMs / 1000).toFixed(2)} s after it was started (aim 5 s: ${st.readyMs < 5000 ? 'met' : 'MISSED'})` +
        (st.copy ? `, of which loading the in-memory copy (${int(st.copy.flagged_users)} users with a flag, ${int(st.copy.grants)} active grants) took ${(st.copy.load_ms / 1000).toFixed(2)} s` : ''),
    );
  }
  out('');
  out(table(rows).join('\n'));
  out('');
  for (const s of summary) out(s);
  out(`total ${((Date.now() - started) / 1000).toFixed(0)} s`);

  if (WRITE) {
    writeReport(markdown({ m, fill, storeMiB, expectedAllow, rows, logs, summary }));
    out('figures written to BENCHMARKS.md');
  }
}

function table(rows: Row[]): string[] {
  const head = ['endpoint', 'server', 'load', 'req/s', 'p50 ms', 'p99 ms', 'p99.9 ms', 'max ms', 'peak RSS', 'server CPU', 'client CPU'];
  const body = rows.map((r) => {
    const f = figures(r.run);
    return [r.endpoint, r.server, loadName(r.load), int(f.rps), ms(f.p50), ms(f.p99), ms(f.p999), ms(f.max), mib(r.run.peakRssKb), pct(r.run.serverCpu), pct(r.run.load.clientCpu)];
  });
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((b) => (b[i] ?? '').length)));
  const line = (cells: string[]) => cells.map((c, i) => (i < 3 ? c.padEnd(widths[i] ?? 0) : c.padStart(widths[i] ?? 0))).join('  ');
  return [line(head), ...body.map(line)];
}

// ---- BENCHMARKS.md -------------------------------------------------------------------------------------------

const START = '<!-- bench:results:start -->';
const END = '<!-- bench:results:end -->';

const INTRO = `# Benchmarks

\`npm run bench\` builds, then measures both policy endpoints of \`mfagate serve\` under load next to a *floor*:
a Node server on the same transport that answers a constant and looks at nothing but where a request ends
(the most Node can do on this machine). It is a benchmark, not a test: nothing fails when an aim is missed;
the figures say so. Aims: at least half the floor's throughput, and p99 under 2 ms.
Then it measures the MFA web page (bench/web.ts) and app passcode checks (bench/passcodes.ts), each in a section of its own at the end of this file.

What it does:

- Fills a temporary store (the daemon's own schema, created by the store code) with 100,000 users, all
  MFA-enabled, and 1,000,000 grants, 10 per user: 7 active IPv4 grants, 1 active IPv6 grant (a /64 block),
  1 expired some days ago, 1 revoked. The file is synced to disk before any measurement and, like a real
  store, has no ANALYZE statistics (with full statistics, sqlite_stat4, SQLite re-plans the grant lookup on
  every call, and that query gets about three times slower).
- Starts \`mfagate serve\` as a child process with a config that has a few trusted, untrusted and webmail
  ranges and a Dovecot API key. Its decision log (one JSON line per decision: logging is part of the real
  cost) is written to a file on the same disk as the store, unless \`BENCH_LOG=null\` sends it to \`/dev/null\`.
- Every request comes from an address outside the trusted ranges, so every decision reads the user and
  looks up a grant: about 50 % find an active grant (45 % IPv4, 5 % another address in an IPv6 grant's /64),
  50 % are refused (expired, revoked, or an address only other users hold grants for). Users are drawn
  uniformly over all 100,000. The load generator checks that the share of allowed replies is the expected one.
  - Postfix: UNIX socket, the full attribute set Postfix 3.7 sends, one request per RCPT.
  - Dovecot: HTTP/1.1 keep-alive on loopback TCP, \`POST /?command=allow\` with Dovecot 2.3's default
    attributes and the X-API-Key header, from a bare-bones client on raw sockets (not http.Agent).
- Two loads per server, 64 connections each: *saturated*, a closed loop (every connection sends its next
  request as soon as the reply arrives; 2 s warm-up, 10 s measured), which gives the throughput; and *paced*,
  2,000 requests/s in all (1 s warm-up, 5 s measured), which gives the latency a login sees when the
  daemon is not overloaded.
- Each server is a fresh process per endpoint; peak RSS is its VmHWM after the saturated run. The CPU
  columns are the share of one core used during the measured window by the server and by the load generator
  (the bench process itself); the two share the machine's cores.
- In a closed loop, mean latency = connections / throughput (Little's law): with 64 connections, a p99 under
  2 ms needs well over 32,000 replies/s, so the saturated p99 mostly measures queueing.

Knobs (environment): \`BENCH_SECONDS\` (saturated seconds, default 10), \`BENCH_WARMUP_SECONDS\`,
\`BENCH_CONNECTIONS\`, \`BENCH_USERS\`, \`BENCH_PACED_RATE\`, \`BENCH_LOG=null\`, \`BENCH_WRITE=0\` (leave this
file alone), \`BENCH_DAEMON_NODE_ARGS\` (extra node flags for the daemon, e.g. \`--cpu-prof\`).

The section below is rewritten by each run.

`;

function markdown(a: {
  m: ReturnType<typeof machine>;
  fill: ReturnType<typeof fillStore>;
  storeMiB: number;
  expectedAllow: number;
  rows: Row[];
  logs: { endpoint: string; bytes: number; lines: number }[];
  summary: string[];
}): string {
  const date = new Date().toISOString().slice(0, 16).replace('T', ' ') + ' UTC';
  const lines = [
    START,
    `## Latest run: ${date}`,
    '',
    `- Machine: ${a.m.model}, ${a.m.cores} cores, ${a.m.memGiB.toFixed(0)} GiB RAM, ${a.m.kernel}`,
    `- Node ${a.m.node}, SQLite ${a.m.sqlite} (better-sqlite3); store and decision log on ${a.m.tmpFs}`,
    `- Store: ${int(a.fill.users)} users, ${int(a.fill.grants)} grants (${int(a.fill.activeGrants)} active), ` +
      `${a.storeMiB.toFixed(0)} MiB, filled in ${(a.fill.ms / 1000).toFixed(1)} s`,
    `- Load: ${CONNECTIONS} connections; saturated (closed loop) ${WARMUP} s warm-up + ${SECONDS} s measured, ` +
      `paced ${int(PACED_RATE)} req/s ${PACED_WARMUP} s + ${PACED_SECONDS} s; ${(a.expectedAllow * 100).toFixed(0)} % of requests allowed by a grant`,
    `- Decision log: ${
      LOG_TO === 'file'
        ? 'written to a file (' + a.logs.map((l) => `${l.endpoint} ${int(l.lines)} lines, ${(l.bytes / 2 ** 20).toFixed(0)} MiB`).join('; ') + ')'
        : 'sent to /dev/null'
    }`,
    '',
    '| endpoint | server | load | req/s | p50 ms | p99 ms | p99.9 ms | max ms | peak RSS | server CPU | load generator CPU |',
    '|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|',
    ...a.rows.map((r) => {
      const f = figures(r.run);
      const rss = r.load === 'saturated' ? mib(r.run.peakRssKb) : '';
      return `| ${r.endpoint} | ${r.server} | ${loadName(r.load)} | ${int(f.rps)} | ${ms(f.p50)} | ${ms(f.p99)} | ${ms(f.p999)} | ${ms(f.max)} | ${rss} | ${pct(r.run.serverCpu)} | ${pct(r.run.load.clientCpu)} |`;
    }),
    '',
    ...a.summary.map((s) => `- ${s}`),
    END,
  ];
  return lines.join('\n');
}

function writeReport(section: string): void {
  writeSection(REPORT, START, END, section, INTRO);
}

runBench(main, cleanup);
