// Helpers for the webmail API tests: an in-process daemon with an injectable clock, a JSON client for the
// UNIX socket and TCP, a tiny SMTP sink that keeps what mfagate sends, mail decoding, and an "authenticator app"
// that hands out codes for time steps not used yet.
import http from 'node:http';
import net from 'node:net';
import { PERIOD, codeAt } from '../../mfa/totp.js';
import { type InProcess, startInProcess, tempDir } from './daemon.js';

// ---- an in-process daemon --------------------------------------------------------------------------------

export type ApiDaemon = InProcess;

/** An in-process daemon (see startInProcess) for the API tests, in a dir of its own. */
export function startApiDaemon(o: { toml?: string; clock?: () => number; files?: Record<string, string>; dir?: string } = {}): Promise<ApiDaemon> {
  return startInProcess(o.toml ?? '', o.dir ?? tempDir('mfagate-api-'), { clock: o.clock, files: o.files });
}

// ---- a JSON client ---------------------------------------------------------------------------------------

export interface ApiResponse {
  status: number;
  headers: http.IncomingHttpHeaders;
  text: string;
  /** The parsed body (undefined when it is not JSON). */
  json: any; // eslint-disable-line @typescript-eslint/no-explicit-any
}

export interface ApiTarget {
  socketPath?: string;
  port?: number;
  token?: string;
}

/** One request on a fresh connection. `body`: an object is sent as JSON, a string or Buffer as is. */
export function apiRequest(
  to: ApiTarget,
  method: string,
  target: string,
  body?: unknown,
  headers: Record<string, string> = {},
): Promise<ApiResponse> {
  const payload = body === undefined ? undefined : typeof body === 'string' || Buffer.isBuffer(body) ? body : JSON.stringify(body);
  const h: Record<string, string> = { ...headers };
  if (payload !== undefined) {
    h['content-length'] = String(Buffer.byteLength(payload));
    if (!Object.keys(h).some((k) => k.toLowerCase() === 'content-type')) h['content-type'] = 'application/json';
  }
  if (to.token !== undefined) h['authorization'] = `Bearer ${to.token}`;
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        ...(to.socketPath !== undefined ? { socketPath: to.socketPath } : { host: '127.0.0.1', port: to.port }),
        method,
        path: target,
        headers: h,
        agent: false,
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8');
          let json: unknown;
          try {
            json = JSON.parse(text);
          } catch {
            json = undefined;
          }
          resolve({ status: res.statusCode ?? 0, headers: res.headers, text, json });
        });
        res.on('error', reject);
      },
    );
    req.setTimeout(20_000, () => req.destroy(new Error(`no answer to ${method} ${target} within 20 s`)));
    req.on('error', reject);
    if (payload !== undefined) req.write(payload);
    req.end();
  });
}

/** A client bound to one target: `api.post('/v1/users/alice/verify', {...})`. */
export function apiClient(to: ApiTarget) {
  return {
    get: (target: string, headers?: Record<string, string>) => apiRequest(to, 'GET', target, undefined, headers),
    post: (target: string, body?: unknown, headers?: Record<string, string>) => apiRequest(to, 'POST', target, body, headers),
    put: (target: string, body?: unknown, headers?: Record<string, string>) => apiRequest(to, 'PUT', target, body, headers),
    del: (target: string, body?: unknown, headers?: Record<string, string>) => apiRequest(to, 'DELETE', target, body, headers),
    request: (method: string, target: string, body?: unknown, headers?: Record<string, string>) => apiRequest(to, method, target, body, headers),
  };
}
export type ApiClient = ReturnType<typeof apiClient>;

// ---- an SMTP sink ----------------------------------------------------------------------------------------

export interface SunkMail {
  from: string;
  to: string[];
  raw: string;
  subject: string;
  text: string;
}

export interface SmtpSink {
  port: number;
  url: string;
  messages: SunkMail[];
  /** When true, RCPT is answered 550 (the mail server refuses the message). */
  refuse: boolean;
  /** Waits (up to 10 s) for a message to `to` that satisfies `predicate`, newest first. */
  waitFor(to: string, predicate?: (m: SunkMail) => boolean): Promise<SunkMail>;
  close(): Promise<void>;
}

/** Just enough SMTP for nodemailer: EHLO, MAIL, RCPT, DATA, RSET, NOOP, QUIT. */
export async function startSmtpSink(): Promise<SmtpSink> {
  const sockets = new Set<net.Socket>();
  const sink: SmtpSink = {
    port: 0,
    url: '',
    messages: [],
    refuse: false,
    async waitFor(to, predicate = () => true) {
      const deadline = Date.now() + 10_000;
      for (;;) {
        const m = [...sink.messages].reverse().find((x) => x.to.includes(to.toLowerCase()) && predicate(x));
        if (m) return m;
        if (Date.now() > deadline) throw new Error(`no mail to ${to} within 10 s; got: ${sink.messages.map((x) => `${x.to.join(',')}: ${x.subject}`).join(' | ')}`);
        await new Promise((r) => setTimeout(r, 25));
      }
    },
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
  const server = net.createServer((sock) => {
    sockets.add(sock);
    sock.on('close', () => sockets.delete(sock));
    sock.on('error', () => undefined);
    sock.setEncoding('utf8');
    let buf = '';
    let inData = false;
    let from = '';
    let to: string[] = [];
    let data: string[] = [];
    const say = (line: string) => sock.write(`${line}\r\n`);
    say('220 sink.test ESMTP test sink');
    sock.on('data', (chunk: string) => {
      buf += chunk;
      for (let i = buf.indexOf('\r\n'); i >= 0; i = buf.indexOf('\r\n')) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 2);
        if (inData) {
          if (line === '.') {
            inData = false;
            const raw = data.join('\r\n');
            sink.messages.push({ from, to, raw, ...decodeMail(raw) });
            say('250 2.0.0 queued');
            from = '';
            to = [];
            data = [];
          } else data.push(line.startsWith('..') ? line.slice(1) : line);
          continue;
        }
        const verb = line.slice(0, 4).toUpperCase();
        if (verb === 'EHLO') say('250-sink.test\r\n250 8BITMIME');
        else if (verb === 'HELO') say('250 sink.test');
        else if (verb === 'MAIL') {
          from = /<([^>]*)>/.exec(line)?.[1] ?? '';
          say('250 2.1.0 ok');
        } else if (verb === 'RCPT') {
          if (sink.refuse) say('550 5.1.1 mailbox unavailable (test sink told to refuse)');
          else {
            to.push((/<([^>]*)>/.exec(line)?.[1] ?? '').toLowerCase());
            say('250 2.1.5 ok');
          }
        } else if (verb === 'DATA') {
          inData = true;
          say('354 go ahead');
        } else if (verb === 'RSET') {
          from = '';
          to = [];
          say('250 ok');
        } else if (verb === 'NOOP') say('250 ok');
        else if (verb === 'QUIT') {
          say('221 bye');
          sock.end();
        } else say('502 5.5.2 not implemented');
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const a = server.address();
  sink.port = typeof a === 'object' && a ? a.port : 0;
  sink.url = `smtp://127.0.0.1:${sink.port}`;
  return sink;
}

/** Subject and plain text of a single-part message (base64 or 7bit/8bit/quoted-printable bodies). */
export function decodeMail(raw: string): { subject: string; text: string } {
  const normal = raw.replace(/\r\n/g, '\n');
  const split = normal.indexOf('\n\n');
  const head = (split < 0 ? normal : normal.slice(0, split)).replace(/\n[ \t]+/g, ' ');
  const body = split < 0 ? '' : normal.slice(split + 2);
  const header = (name: string) => new RegExp(`^${name}:[ \\t]*(.*)$`, 'im').exec(head)?.[1] ?? '';
  const subject = header('Subject').replace(/=\?([^?]+)\?([BbQq])\?([^?]*)\?=\s*/g, (_m, _cs: string, enc: string, t: string) =>
    enc.toUpperCase() === 'B'
      ? Buffer.from(t, 'base64').toString('utf8')
      : Buffer.from(t.replace(/_/g, ' ').replace(/=([0-9A-F]{2})/gi, (_x, h: string) => String.fromCharCode(parseInt(h, 16))), 'latin1').toString('utf8'),
  );
  const cte = header('Content-Transfer-Encoding').toLowerCase();
  let text = body;
  if (cte === 'base64') text = Buffer.from(body.replace(/\s+/g, ''), 'base64').toString('utf8');
  else if (cte === 'quoted-printable') {
    text = Buffer.from(body.replace(/=\n/g, '').replace(/=([0-9A-F]{2})/gi, (_x, h: string) => String.fromCharCode(parseInt(h, 16))), 'latin1').toString('utf8');
  }
  return { subject: subject.trim(), text };
}

/** The one-time code in a mail from mfagate ("OTP: 123456" or "Code: 123456"). */
export function codeIn(text: string): string {
  const m = /(?:OTP|Code): (\d{6,10})/.exec(text);
  if (!m?.[1]) throw new Error(`no code in the mail:\n${text}`);
  return m[1];
}

// ---- an authenticator app --------------------------------------------------------------------------------

/**
 * Codes for a TOTP secret, each for a time step after the last one handed out, within the ±1 step the service
 * accepts: up to three codes in a row without waiting. Near the end of a step it waits for the next one, so a
 * code is never sent just as it goes out of the window. `wait` is a real sleep unless a fake clock is used.
 */
export class Authenticator {
  private last = -Infinity;
  constructor(
    readonly secret: string,
    private readonly clock: () => number = Date.now,
    private readonly wait: (ms: number) => Promise<void> = (ms) => new Promise((r) => setTimeout(r, ms)),
  ) {}

  /** Marks a step as used (a code accepted by other means). */
  used(step: number): void {
    this.last = Math.max(this.last, step);
  }

  /** The code of the current step, without using it up (for a request that is refused before the code counts). */
  peek(): string {
    return codeAt(this.secret, this.clock());
  }

  async next(): Promise<string> {
    const periodMs = PERIOD * 1000;
    for (;;) {
      const now = this.clock();
      const current = Math.floor(now / periodMs);
      const left = (current + 1) * periodMs - now;
      const step = Math.max(this.last + 1, current - 1);
      if (left < 2000 || step > current + 1) {
        await this.wait(left + 50);
        continue;
      }
      this.last = step;
      return codeAt(this.secret, step * periodMs);
    }
  }
}
