// Starting mfagate for a test: in-process (for endpoint tests) or as the real CLI process (end to end).
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseConfigText } from '../../config/config.js';
import { type Daemon, startDaemon } from '../../daemon/daemon.js';
import { createLogger } from '../../daemon/log.js';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const CLI = path.join(ROOT, 'dist/cli/main.js');

export function tempDir(prefix = 'mfagate-test-'): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

export interface InProcess {
  dir: string;
  daemon: Daemon;
  logs: Record<string, unknown>[];
  configFile: string;
  dovecotPort: number;
  postfixSocket: string;
  /** The webmail API's UNIX socket. */
  apiSocket: string;
  /** The API's TCP port, when the config has a TCP API listener. */
  apiPort: number | undefined;
  stop(): Promise<void>;
}

/**
 * A daemon in this process: the Dovecot endpoint on a free loopback port, Postfix and the API on UNIX sockets
 * in a temp dir, the secrets key beside them. `toml` adds to or overrides that config; `files` are written
 * into the dir first (token files); `clock` drives decisions and second factors.
 */
export async function startInProcess(
  toml = '',
  dir = tempDir(),
  o: { clock?: () => number; files?: Record<string, string> } = {},
): Promise<InProcess> {
  for (const [name, text] of Object.entries(o.files ?? {})) fs.writeFileSync(path.join(dir, name), text, { mode: 0o600 });
  const configFile = path.join(dir, 'mfagate.toml');
  const text =
    '[store]\npath = "mfagate.db"\n[dovecot]\nlisten = ["127.0.0.1:0"]\n[postfix]\nlisten = ["unix:policy.sock"]\n' +
    `[api]\nlisten = ["unix:api.sock"]\n[web]\nlisten = []\n[secrets]\nkey_file = "secret.key"\n${toml}`;
  fs.writeFileSync(configFile, mergeSections(text));
  const config = parseConfigText(fs.readFileSync(configFile, 'utf8'), configFile);
  const logs: Record<string, unknown>[] = [];
  const logger = createLogger('debug', { write: (line) => logs.push(JSON.parse(line) as Record<string, unknown>) });
  const daemon = await startDaemon(config, logger, { createStore: true, ...(o.clock ? { clock: o.clock } : {}) });
  const d = daemon.endpoints.dovecot[0];
  const p = daemon.endpoints.postfix[0];
  const unix = daemon.endpoints.api.find((e) => e.kind === 'unix');
  const tcp = daemon.endpoints.api.find((e) => e.kind === 'tcp');
  if (d?.kind !== 'tcp' || p?.kind !== 'unix' || unix?.kind !== 'unix') throw new Error('unexpected endpoints');
  return {
    dir,
    daemon,
    logs,
    configFile,
    dovecotPort: d.port,
    postfixSocket: p.path,
    apiSocket: unix.path,
    apiPort: tcp?.kind === 'tcp' ? tcp.port : undefined,
    async stop() {
      await daemon.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** TOML forbids a table twice; merge "[x]" sections given twice so tests can override the base config. */
export function mergeSections(text: string): string {
  const sections = new Map<string, Map<string, string>>([['', new Map()]]);
  let current = sections.get('') ?? new Map<string, string>();
  for (const line of text.split('\n')) {
    const m = /^\[([a-z_.]+)\]$/.exec(line.trim());
    if (m) {
      const name = m[1] ?? '';
      current = sections.get(name) ?? new Map<string, string>();
      sections.set(name, current);
      continue;
    }
    // Later keys override earlier ones within a section.
    const k = /^\s*([A-Za-z0-9_]+)\s*=/.exec(line)?.[1];
    if (k) current.set(k, line);
  }
  const out: string[] = [];
  for (const [name, keys] of sections) {
    if (name) out.push(`[${name}]`);
    out.push(...keys.values());
  }
  return out.join('\n') + '\n';
}

/** Runs the CLI as an operator would. */
export function cli(args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv } = {}): { code: number; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [CLI, ...args], { cwd: opts.cwd ?? ROOT, env: { ...process.env, ...opts.env }, encoding: 'utf8', timeout: 30_000 });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

export interface DaemonProcess {
  child: ChildProcess;
  output(): string;
  /** Resolves once the daemon printed where it listens. */
  ready: Promise<void>;
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

/** `mfagate serve --config FILE` as a child process; `args` are added (e.g. "--create-store" for a first start). */
export function spawnDaemon(configFile: string, args: readonly string[] = []): DaemonProcess {
  const child = spawn(process.execPath, [CLI, 'serve', '--config', configFile, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let text = '';
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const ready = new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`daemon not ready after 15 s:\n${text}`)), 15_000);
    const onData = (b: Buffer) => {
      text += b.toString();
      if (text.includes('mfagate: listening')) {
        clearTimeout(timer);
        resolve();
      }
    };
    child.stdout?.on('data', onData);
    child.stderr?.on('data', onData);
    void exited.then((code) => {
      clearTimeout(timer);
      reject(new Error(`daemon exited with ${code}:\n${text}`));
    });
  });
  ready.catch(() => undefined);
  return {
    child,
    output: () => text,
    ready,
    async stop(signal = 'SIGTERM') {
      if (child.exitCode !== null || child.signalCode !== null) return child.exitCode;
      child.kill(signal);
      return exited;
    },
  };
}
