// The endpoint benchmark's figures: the table it prints and its section of BENCHMARKS.md.
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { LoadResult } from './load.js';
import { percentileMs } from './load.js';
import type { machine } from './proc.js';
import { int, writeSection } from './report.js';
import { BENCH } from './settings.js';
import type { fillStore } from './workload.js';

const REPORT = path.join(path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..'), 'BENCHMARKS.md');

export interface Run {
  load: LoadResult;
  /** VmHWM of the server process after the run. */
  peakRssKb: number;
  serverCpu: number;
}

export type LoadKind = 'saturated' | 'paced';

export interface Row {
  endpoint: 'postfix' | 'dovecot';
  /** The floor, or mfagate on one backend. */
  server: 'floor' | 'sqlite' | 'postgresql';
  load: LoadKind;
  run: Run;
}

export const ms = (v: number) => (v < 10 ? v.toFixed(2) : v.toFixed(1));
export const mib = (kb: number) => `${(kb / 1024).toFixed(0)} MiB`;
export const pct = (v: number) => `${(v * 100).toFixed(0)} %`;
export const loadName = (l: LoadKind) => (l === 'saturated' ? `${BENCH.connections} conns, closed loop` : `${int(BENCH.pacedRate)} req/s paced`);
export const serverName = (s: Row['server']) => (s === 'floor' ? 'floor' : `mfagate, ${s === 'sqlite' ? 'SQLite' : 'PostgreSQL'}`);

export function figures(r: Run) {
  const l = r.load;
  return {
    rps: l.requests / l.seconds,
    p50: percentileMs(l.latencies, 0.5),
    p99: percentileMs(l.latencies, 0.99),
    p999: percentileMs(l.latencies, 0.999),
    max: percentileMs(l.latencies, 1),
  };
}

export function table(rows: Row[]): string[] {
  const head = ['endpoint', 'server', 'load', 'req/s', 'p50 ms', 'p99 ms', 'p99.9 ms', 'max ms', 'peak RSS', 'server CPU', 'client CPU'];
  const body = rows.map((r) => {
    const f = figures(r.run);
    return [r.endpoint, serverName(r.server), loadName(r.load), int(f.rps), ms(f.p50), ms(f.p99), ms(f.p999), ms(f.max), mib(r.run.peakRssKb), pct(r.run.serverCpu), pct(r.run.load.clientCpu)];
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
- Runs every load against the floor, then against \`mfagate serve\` on each backend (\`BENCH_BACKENDS\`, default
  \`sqlite,postgresql\`): the SQLite file, then a PostgreSQL 15 started by the benchmark on loopback, into which
  the same store is copied the way \`mfagate db copy\` does. Decisions read the in-memory copy on both.
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
\`BENCH_BENCH.connections\`, \`BENCH_USERS\`, \`BENCH_BENCH.pacedRate\`, \`BENCH_LOG=null\`, \`BENCH_WRITE=0\` (leave this
file alone), \`BENCH_DAEMON_NODE_ARGS\` (extra node flags for the daemon, e.g. \`--cpu-prof\`).

The section below is rewritten by each run.

`;

export function markdown(a: {
  m: ReturnType<typeof machine>;
  fill: ReturnType<typeof fillStore>;
  storeMiB: number;
  /** Moving the filled SQLite store into PostgreSQL (copyToPg, as `mfagate db copy` does), when measured. */
  pgCopyMs: number | undefined;
  pgVersion: string | undefined;
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
    ...(a.pgCopyMs !== undefined
      ? [`- PostgreSQL ${a.pgVersion ?? ''} on loopback (started by the benchmark, Debian's defaults): the same store copied in as \`mfagate db copy\` does, in ${(a.pgCopyMs / 1000).toFixed(0)} s`]
      : []),
    `- Load: ${BENCH.connections} connections; saturated (closed loop) ${BENCH.warmup} s warm-up + ${BENCH.seconds} s measured, ` +
      `paced ${int(BENCH.pacedRate)} req/s ${BENCH.pacedWarmup} s + ${BENCH.pacedSeconds} s; ${(a.expectedAllow * 100).toFixed(0)} % of requests allowed by a grant`,
    `- Decision log: ${
      BENCH.logTo === 'file'
        ? 'written to a file (' + a.logs.map((l) => `${l.endpoint} ${int(l.lines)} lines, ${(l.bytes / 2 ** 20).toFixed(0)} MiB`).join('; ') + ')'
        : 'sent to /dev/null'
    }`,
    '',
    '| endpoint | server | load | req/s | p50 ms | p99 ms | p99.9 ms | max ms | peak RSS | server CPU | load generator CPU |',
    '|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|',
    ...a.rows.map((r) => {
      const f = figures(r.run);
      const rss = r.load === 'saturated' ? mib(r.run.peakRssKb) : '';
      return `| ${r.endpoint} | ${serverName(r.server)} | ${loadName(r.load)} | ${int(f.rps)} | ${ms(f.p50)} | ${ms(f.p99)} | ${ms(f.p999)} | ${ms(f.max)} | ${rss} | ${pct(r.run.serverCpu)} | ${pct(r.run.load.clientCpu)} |`;
    }),
    '',
    ...a.summary.map((s) => `- ${s}`),
    END,
  ];
  return lines.join('\n');
}

export function writeReport(section: string): void {
  writeSection(REPORT, START, END, section, INTRO);
}

