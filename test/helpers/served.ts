// The real `mfagate serve` process for the hardening tests: a config file in a dir of its own (Dovecot endpoint
// on a free loopback port with an API key, Postfix and the API on UNIX sockets, the page when asked), its JSON
// log lines read back from its output, and small clients for the Dovecot and Postfix endpoints that speak
// exactly what those servers speak.
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { type ApiClient, apiClient } from './api.js';
import { type DaemonProcess, cli, mergeSections, spawnDaemon, tempDir } from './daemon.js';
import { freePort } from './mailstack.js';

export const POLICY_KEY = 'hardening-test-key-0123456789';

export interface Served {
  dir: string;
  configFile: string;
  daemon: DaemonProcess;
  dovecotPort: number;
  /** The MFA page's port, when the config has [web] listen = ["127.0.0.1:PORT"] (see `web` below). */
  webPort: number | undefined;
  postfixSocket: string;
  apiSocket: string;
  api: ApiClient;
  /** The daemon's JSON log lines so far (stdout), parsed. */
  logs(): Record<string, unknown>[];
  /** Resolves with the first log line that satisfies `pred`, polling every 50 ms; rejects after `ms`. */
  waitForLog(pred: (l: Record<string, unknown>) => boolean, ms?: number): Promise<Record<string, unknown>>;
  /** `mfagate --config FILE ...` as a separate process, as an operator runs it. */
  cli(...args: string[]): { code: number; stdout: string; stderr: string };
  /** Stops the daemon (SIGTERM, or the given signal) and starts it again on the same config. */
  restart(signal?: NodeJS.Signals, args?: readonly string[]): Promise<void>;
  /** Stops the daemon and removes the dir. */
  close(): Promise<void>;
}

export interface ServeOptions {
  /** More TOML; sections given twice are merged, later keys win. */
  toml?: string;
  dir?: string;
  /** Give the page a loopback TCP listener (its port is `webPort`). */
  web?: boolean;
  /** Extra `serve` arguments for the first start; default ["--create-store"]. */
  args?: readonly string[];
  /** Wait for "listening" (default true); false for a start that is expected to fail. */
  ready?: boolean;
  /** The Dovecot endpoint's port (a mail stack already points at it); default a free one. */
  dovecotPort?: number;
}

export async function serve(o: ServeOptions = {}): Promise<Served> {
  const dir = o.dir ?? tempDir('mfagate-hardening-');
  fs.chmodSync(dir, 0o755);
  const configFile = path.join(dir, 'mfagate.toml');
  const dovecotPort = o.dovecotPort ?? (await freePort());
  const webPort = o.web ? await freePort() : undefined;
  const postfixSocket = path.join(dir, 'policy.sock');
  const apiSocket = path.join(dir, 'api.sock');
  const text =
    `[store]\npath = "state/mfagate.db"\n[secrets]\nkey_file = "state/secret.key"\n` +
    `[dovecot]\nlisten = ["127.0.0.1:${dovecotPort}"]\napi_key = "${POLICY_KEY}"\n` +
    `[postfix]\nlisten = ["unix:${postfixSocket}"]\n[api]\nlisten = ["unix:${apiSocket}"]\n` +
    `[web]\nlisten = [${webPort ? `"127.0.0.1:${webPort}"` : ''}]\nsecure_cookie = false\n${o.toml ?? ''}`;
  fs.writeFileSync(configFile, mergeSections(text));
  let daemon = spawnDaemon(configFile, o.args ?? ['--create-store']);
  if (o.ready !== false) await daemon.ready;
  const logs = () =>
    daemon
      .output()
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .flatMap((l) => {
        try {
          return [JSON.parse(l) as Record<string, unknown>];
        } catch {
          return [];
        }
      });
  const served: Served = {
    dir,
    configFile,
    get daemon() {
      return daemon;
    },
    dovecotPort,
    webPort,
    postfixSocket,
    apiSocket,
    api: apiClient({ socketPath: apiSocket }),
    logs,
    async waitForLog(pred, ms = 10_000) {
      const end = Date.now() + ms;
      for (;;) {
        const hit = logs().find(pred);
        if (hit) return hit;
        if (Date.now() > end) throw new Error(`no such log line within ${ms} ms; the daemon said:\n${daemon.output().slice(-4000)}`);
        await new Promise((r) => setTimeout(r, 50));
      }
    },
    cli: (...args) => cli(['--config', configFile, ...args]),
    async restart(signal = 'SIGTERM', args = []) {
      await daemon.stop(signal);
      daemon = spawnDaemon(configFile, args);
      await daemon.ready;
    },
    async close() {
      await daemon.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
  return served;
}

// ---- Dovecot's auth policy requests ------------------------------------------------------------------------

export interface PolicyAnswer {
  status: number;
  body: string;
  /** The decision, for a 200 answer to command=allow. */
  allow: boolean | undefined;
}

/** One Dovecot auth-policy request (POST /?command=...) on a fresh connection, as Dovecot 2.3 sends it. */
export function askPolicy(port: number, body: string | Record<string, unknown>, o: { command?: 'allow' | 'report' | 'passcode'; key?: string } = {}): Promise<PolicyAnswer> {
  const payload = typeof body === 'string' ? body : JSON.stringify(body);
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        host: '127.0.0.1',
        port,
        method: 'POST',
        path: `/?command=${o.command ?? 'allow'}`,
        agent: false,
        headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload), 'x-api-key': o.key ?? POLICY_KEY },
      },
      (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (c: string) => (text += c));
        res.on('end', () => {
          let allow: boolean | undefined;
          try {
            const j = JSON.parse(text) as { status?: unknown };
            if (res.statusCode === 200 && typeof j.status === 'number') allow = j.status >= 0;
          } catch {
            allow = undefined;
          }
          resolve({ status: res.statusCode ?? 0, body: text, allow });
        });
      },
    );
    req.on('error', reject);
    req.end(payload);
  });
}

/** Dovecot 2.3's recommended attributes for a login. */
export const loginBody = (login: string, remote: string, protocol = 'imap', extra: Record<string, unknown> = {}) => ({
  local: '127.0.0.1',
  login,
  mech: 'PLAIN',
  protocol,
  real_remote: remote,
  remote,
  secured: '',
  session_id: 'hardening',
  tls: false,
  ...extra,
});

// ---- Postfix policy requests ---------------------------------------------------------------------------------

/**
 * One Postfix policy request on a fresh connection: resolves with the reply ("action=...") or with undefined
 * when the daemon closed the connection without one (how a policy server refuses to judge a request).
 */
export function askPostfix(socketPath: string, attrs: string): Promise<string | undefined> {
  return new Promise((resolve, reject) => {
    const c = net.connect(socketPath);
    let text = '';
    c.setEncoding('utf8');
    c.on('connect', () => c.write(attrs));
    c.on('data', (d: string) => {
      text += d;
      if (text.endsWith('\n\n')) {
        c.destroy();
        resolve(text.trim());
      }
    });
    c.on('close', () => resolve(text === '' ? undefined : text.trim()));
    c.on('error', (e) => (text === '' ? resolve(undefined) : reject(e)));
  });
}

/** The attributes Postfix 3.7 sends at RCPT for an authenticated submission. */
export const postfixRequest = (user: string, client: string, extra = '') =>
  `request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\nclient_address=${client}\nclient_name=unknown\n` +
  `helo_name=client\nsender=${user}@mail.test\nrecipient=${user}@mail.test\ninstance=1.2.3\nsasl_method=PLAIN\n` +
  `sasl_username=${user}\n${extra}\n`;
