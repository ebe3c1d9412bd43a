// The endpoint benchmark's knobs (environment), shared by the run (bench/bench.ts) and its report
// (bench/bench-report.ts).
import { envNumber } from './proc.js';

const seconds = envNumber('BENCH_SECONDS', 10);
const backends = (process.env['BENCH_BACKENDS'] ?? 'sqlite,postgresql').split(',').map((b) => b.trim()).filter((b) => b !== '');
for (const b of backends) if (b !== 'sqlite' && b !== 'postgresql') throw new Error(`BENCH_BACKENDS: expected sqlite and/or postgresql, got ${JSON.stringify(b)}`);

export const BENCH = {
  seconds,
  warmup: envNumber('BENCH_WARMUP_SECONDS', 2),
  connections: Math.round(envNumber('BENCH_CONNECTIONS', 64)),
  users: Math.round(envNumber('BENCH_USERS', 100_000)),
  logTo: process.env['BENCH_LOG'] === 'null' ? ('null' as const) : ('file' as const),
  write: process.env['BENCH_WRITE'] !== '0',
  /** Extra node flags for the daemon only, e.g. "--cpu-prof --cpu-prof-dir=DIR" to profile it. */
  daemonNodeArgs: (process.env['BENCH_DAEMON_NODE_ARGS'] ?? '').split(/\s+/).filter((a) => a !== ''),
  pacedRate: Math.round(envNumber('BENCH_PACED_RATE', 2000)),
  pacedWarmup: 1,
  pacedSeconds: Math.max(5, seconds / 2),
  /** The stores the daemon is measured on, in order. */
  backends: backends as ('sqlite' | 'postgresql')[],
};
