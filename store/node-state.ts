// With PostgreSQL, each host's daemon keeps its own figures (what it decides from, its decision counts) in a
// small file of its host, not in the shared database: every node has its own, and `mfagate stats` on a host
// must be able to say how old that host's copy is while the database cannot be reached. With SQLite the same
// figures live in the store (daemon_stats).
import fs from 'node:fs';
import path from 'node:path';
import type { DaemonStatsRow } from './records.js';

/** Writes the state whole or not at all (a reader never sees half a file). */
export function writeNodeState(file: string, state: DaemonStatsRow): void {
  const tmp = path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.tmp`);
  fs.mkdirSync(path.dirname(file), { recursive: true, mode: 0o750 });
  fs.writeFileSync(tmp, JSON.stringify(state) + '\n', { mode: 0o640 });
  fs.renameSync(tmp, file);
}

/** The state the daemon of this host last wrote, or undefined when there is none (never started here). */
export function readNodeState(file: string): DaemonStatsRow | undefined {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
  const v = JSON.parse(text) as Partial<DaemonStatsRow>;
  const n = (x: unknown) => (typeof x === 'number' && Number.isFinite(x) ? x : 0);
  return {
    pid: n(v.pid),
    startedAt: n(v.startedAt),
    updatedAt: n(v.updatedAt),
    stoppedAt: typeof v.stoppedAt === 'number' ? v.stoppedAt : null,
    allowed: n(v.allowed),
    refused: n(v.refused),
    logOnly: n(v.logOnly),
    badRequests: n(v.badRequests),
    copy: v.copy && typeof v.copy === 'object' ? { currentAt: n(v.copy.currentAt), flaggedUsers: n(v.copy.flaggedUsers), grants: n(v.copy.grants), error: typeof v.copy.error === 'string' ? v.copy.error : undefined } : undefined,
  };
}
