// What the harnesses that start servers of their own (mailstack.ts, roundcube.ts) share: a scratch dir marked
// with the test process that owns it, the dirs whose owner died without cleaning up (killed by a signal or a
// timeout, where no exit hook runs), and stopping what a test forgot when its process exits.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

function readText(file: string): string {
  try {
    return fs.readFileSync(file, 'utf8');
  } catch {
    return '';
  }
}

/** A process's start time (field 22 of /proc/PID/stat): with the pid, it names one process for good. */
function procStart(pid: number): string | undefined {
  const stat = readText(`/proc/${pid}/stat`);
  return stat ? stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19] : undefined;
}

const OWNER = `${process.pid} ${procStart(process.pid) ?? ''}`;

/** Marks `dir` as this test process's. */
export function markOwned(dir: string): void {
  fs.writeFileSync(path.join(dir, 'owner'), OWNER);
}

/** Whether the process that marked `dir` still runs (a zombie does not: some inits reap only now and then). */
function ownerAlive(dir: string): boolean {
  const [pid, start] = readText(path.join(dir, 'owner')).trim().split(' ');
  const n = Number(pid);
  if (!Number.isInteger(n) || n <= 0) return false;
  const stat = readText(`/proc/${n}/stat`);
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return stat !== '' && fields[0] !== 'Z' && fields[19] === start;
}

/**
 * Calls `reap` for each dir in the temporary directory named `prefix...` whose owner is gone (or that has no
 * owner a minute after it was made: one being created now has none yet). An error in one (another process
 * reaping it too) does not stop the others.
 */
export function forEachOrphan(prefix: string, reap: (dir: string) => void): void {
  const tmp = os.tmpdir();
  let names: string[] = [];
  try {
    names = fs.readdirSync(tmp).filter((n) => n.startsWith(prefix));
  } catch {
    return;
  }
  for (const name of names) {
    const dir = path.join(tmp, name);
    try {
      const st = fs.statSync(dir);
      if (!st.isDirectory()) continue;
      if (!fs.existsSync(path.join(dir, 'owner'))) {
        if (Date.now() - st.mtimeMs < 60_000) continue;
      } else if (ownerAlive(dir)) {
        continue;
      }
      reap(dir);
    } catch {
      // another process is reaping it too
    }
  }
}

const live = new Set<{ emergencyStop(): void }>();
let exitHookInstalled = false;

/** Stops `s` when the process exits (a test that forgot to, or an uncaught error); returns the undo. */
export function stopAtExit(s: { emergencyStop(): void }): () => void {
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.on('exit', () => {
      for (const x of live) x.emergencyStop();
    });
  }
  live.add(s);
  return () => live.delete(s);
}
