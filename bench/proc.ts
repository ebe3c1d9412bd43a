// Child processes of the benchmarks and what /proc says about them (Linux): start a node script and wait for
// its ready line, its CPU seconds and peak memory, and a description of the machine for the report.
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import Database from 'better-sqlite3';

const children = new Set<ChildProcess>();

/** Kills every child still running (on exit or a signal). */
export function killChildren(): void {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  children.clear();
}

/** A benchmark's scratch directory: removed, with every child killed, on exit and on SIGINT/SIGTERM/SIGHUP. */
export function scratchDir(prefix: string): { dir: string; cleanup(): void } {
  let dir: string | undefined = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  const cleanup = () => {
    killChildren();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
    dir = undefined;
  };
  process.on('exit', cleanup);
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    process.once(sig, () => {
      cleanup();
      process.exit(130);
    });
  }
  return { dir, cleanup };
}

/** A positive number from the environment, or the fallback. */
export function envNumber(name: string, fallback: number): number {
  const v = process.env[name];
  if (v === undefined || v === '') return fallback;
  const n = Number(v);
  if (!Number.isFinite(n) || n <= 0) throw new Error(`${name} must be a positive number, got ${JSON.stringify(v)}`);
  return n;
}

export interface Child {
  child: ChildProcess;
  pid: number;
  /** The first match of `ready` in the child's stdout or stderr. */
  match: RegExpExecArray;
  stop(): Promise<void>;
}

/** Starts a node script; resolves once its output matches `ready`. */
export function start(args: string[], stdout: 'pipe' | number, ready: RegExp, what: string): Promise<Child> {
  const child = spawn(process.execPath, args, { stdio: ['ignore', stdout, 'pipe'] });
  children.add(child);
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
      await exited;
      clearTimeout(timer);
    }
    children.delete(child);
  };
  return new Promise<Child>((resolve, reject) => {
    let text = '';
    const timer = setTimeout(() => {
      void stop();
      reject(new Error(`${what} not ready after 60 s:\n${text}`));
    }, 60_000);
    const onData = (b: Buffer) => {
      text += b.toString();
      const m = ready.exec(text);
      if (m && child.pid !== undefined) {
        clearTimeout(timer);
        resolve({ child, pid: child.pid, match: m, stop });
      }
    };
    child.stdout?.on('data', onData);
    child.stderr?.on('data', onData);
    void exited.then(() => {
      clearTimeout(timer);
      reject(new Error(`${what} exited early (${child.exitCode ?? child.signalCode}):\n${text}`));
    });
  });
}


export function statusKb(pid: number, field: 'VmHWM' | 'VmRSS'): number {
  const m = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) : NaN;
}

/** User + system CPU seconds of a process (clock ticks of 1/100 s, the Linux default). */
export function cpuSeconds(pid: number): number {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) / 100;
}

export function machine() {
  const cpuinfo = fs.readFileSync('/proc/cpuinfo', 'utf8');
  const model = /^model name\s*:\s*(.+)$/m.exec(cpuinfo)?.[1]?.trim() ?? os.cpus()[0]?.model ?? 'unknown';
  const db = new Database(':memory:');
  const sqlite = (db.prepare('SELECT sqlite_version() AS v').get() as { v: string }).v;
  db.close();
  return {
    model,
    cores: os.availableParallelism(),
    memGiB: os.totalmem() / 2 ** 30,
    kernel: `${os.type()} ${os.release()}`,
    node: process.version,
    sqlite,
    tmpFs: fsTypeOf(os.tmpdir()),
  };
}

/** The file system type of the mount holding `dir` (longest matching mount point in /proc/mounts). */
function fsTypeOf(dir: string): string {
  try {
    const real = fs.realpathSync(dir);
    let best = { point: '', type: 'unknown' };
    for (const line of fs.readFileSync('/proc/mounts', 'utf8').split('\n')) {
      const [, point, type] = line.split(' ');
      if (!point || !type) continue;
      const inside = real === point || real.startsWith(point.endsWith('/') ? point : point + '/');
      if (inside && point.length >= best.point.length) best = { point, type };
    }
    return best.type;
  } catch {
    return 'unknown';
  }
}

/** A TCP port free on `host` now (the kernel's pick; a parallel process may still take it before it is bound). */
export function freePort(host = '127.0.0.1'): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, host, () => {
      const a = s.address();
      const port = typeof a === 'object' && a ? a.port : 0;
      s.close(() => resolve(port));
    });
  });
}
