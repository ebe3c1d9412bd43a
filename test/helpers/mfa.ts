// A second-factor service for tests: a fresh store in a temp dir, a fresh key, a fake mailer that records what it
// sends (or fails on demand), a logger that keeps every line, and a clock the test moves by hand (no sleeps).
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { type Config, loadConfig, parseConfigText } from '../../config/config.js';
import { createLogger } from '../../daemon/log.js';
import { MailError, type Mailer, type OutgoingMail } from '../../mfa/mailer.js';
import { createSecrets, type Secrets } from '../../mfa/secrets.js';
import { MfaError, type MfaErrorCode, MfaService } from '../../mfa/service.js';
import { codeAt } from '../../mfa/totp.js';
import type { LiveCopy } from '../../store/live-copy.js';
import type { Records } from '../../store/records.js';
import { Store } from '../../store/store.js';
import { tempDir } from './daemon.js';

/** 2026-11-21 13:00:07 JST: 7 s into a 30 s time step, so "now" and "one step later" are unambiguous. */
export const T0 = Date.UTC(2026, 10, 21, 4, 0, 7);
export const STEP_MS = 30_000;
export const MINUTE = 60_000;
export const IP = '203.0.113.7';

export class FakeMailer implements Mailer {
  readonly sent: OutgoingMail[] = [];
  /** When set, send() throws this (after recording nothing). */
  failWith: Error | undefined;
  /** Resolves pending sends only when the test says so (to hold a send in flight). */
  gate: Promise<void> | undefined;

  async send(mail: OutgoingMail): Promise<void> {
    if (this.gate) await this.gate;
    if (this.failWith) throw this.failWith;
    this.sent.push({ ...mail });
  }

  close(): void {}

  /** The last mail sent to `to` (throws when there is none). */
  last(to?: string): OutgoingMail {
    const list = to === undefined ? this.sent : this.sent.filter((m) => m.to === to);
    const m = list[list.length - 1];
    if (!m) throw new Error(`no mail was sent${to === undefined ? '' : ` to ${to}`}`);
    return m;
  }

  /** The code in the last mail to `to`: "OTP: 123456" (login) or "Code: 123456" (address confirmation). */
  lastCode(to?: string): string {
    return codeIn(this.last(to).text);
  }
}

export const failingMailError = () => new MailError('the mail server did not accept the message: 451 4.3.0 try later');

/** The code a mail (login or confirmation) carries, from its English part. */
export function codeIn(text: string): string {
  const m = /^\s*(?:OTP|Code): (\d+)\s*$/m.exec(text);
  if (!m?.[1]) throw new Error(`no code in the mail:\n${text}`);
  return m[1];
}

export interface Harness {
  dir: string;
  dbFile: string;
  key: Buffer;
  store: Store;
  /** `store.records`: the async records the service writes. */
  records: Records;
  /** The in-memory copy passcode checks read (as the daemon's do), kept current from the store's change feed. */
  copy: LiveCopy;
  secrets: Secrets;
  config: Config;
  mailer: FakeMailer;
  /** Every log line written, as text (JSON). */
  lines: string[];
  clock: { now: number };
  svc: MfaService;
  /** Moves the clock forward. */
  advance(ms: number): void;
  /** The TOTP code of `secret` at the clock's time plus `offsetMs`. */
  totp(secret: string, offsetMs?: number): string;
  /** Registers (begin + confirm) an authenticator app; returns its secret. Moves the clock one step on. */
  registerApp(user: string, ip?: string): Promise<string>;
  /** Registers and confirms an external address through the fake mailer. */
  registerEmail(user: string, address: string, ip?: string, proof?: unknown): Promise<void>;
  /** Bytes of the SQLite file with its WAL and shared memory, as one latin1 string (to search for leaks). */
  dbBytes(): string;
  close(): void;
}

/**
 * `toml`: extra configuration (sections such as "[lockout]\nmax_failures = 3").
 * `mailer`: a real mailer instead of the fake one (which then stays unused).
 */
export function mfaHarness(opts: { toml?: string; now?: number; key?: Buffer; dir?: string; mailer?: Mailer } = {}): Harness {
  const dir = opts.dir ?? tempDir('mfagate-mfa-');
  const config = opts.toml ? parseConfigText(opts.toml, path.join(dir, 'mfagate.toml')) : loadConfig(undefined, dir);
  const dbFile = path.join(dir, 'mfagate.db');
  const store = Store.open(dbFile, { create: true });
  const key = opts.key ?? crypto.randomBytes(32);
  const secrets = createSecrets(key);
  const mailer = new FakeMailer();
  const lines: string[] = [];
  const logger = createLogger('debug', { write: (l) => lines.push(l) });
  const clock = { now: opts.now ?? T0 };
  const sender: Mailer = opts.mailer ?? mailer;
  const svc = new MfaService({ store: store.records, config: () => config, secrets, mailer: () => sender, logger, clock: () => clock.now });
  // Passcode checks read the in-memory copy, as in the daemon.
  const copy = store.liveCopy(() => clock.now);
  svc.passcodes.readFrom(copy);
  const h: Harness = {
    dir,
    dbFile,
    key,
    store,
    records: store.records,
    copy,
    secrets,
    config,
    mailer,
    lines,
    clock,
    svc,
    advance(ms) {
      clock.now += ms;
    },
    totp(secret, offsetMs = 0) {
      return codeAt(secret, clock.now + offsetMs);
    },
    async registerApp(user, ip = IP) {
      const { secret } = await svc.totpBegin(user, ip, undefined);
      await svc.totpConfirm(user, ip, codeAt(secret, clock.now));
      clock.now += STEP_MS;
      return secret;
    },
    async registerEmail(user, address, ip = IP, proof) {
      await svc.emailRegister(user, ip, address, proof);
      await svc.emailConfirm(user, ip, mailer.lastCode(address));
    },
    dbBytes() {
      return ['', '-wal', '-shm']
        .map((s) => {
          try {
            return fs.readFileSync(dbFile + s).toString('latin1');
          } catch {
            return '';
          }
        })
        .join('\n');
    },
    close() {
      store.close();
      if (!opts.dir) fs.rmSync(dir, { recursive: true, force: true });
    },
  };
  return h;
}

/** Runs `fn` and returns the MfaError code it throws (or rejects with); fails loudly when it does not. */
export async function errorCode(fn: () => unknown): Promise<MfaErrorCode> {
  try {
    await fn();
  } catch (e) {
    if (e instanceof MfaError) return e.code;
    throw e;
  }
  throw new Error('expected an MfaError, but the call succeeded');
}

/** Lets fire-and-forget sends (notices) run. */
export const settle = () => new Promise<void>((r) => setImmediate(r));

// ---- reading a delivered message (RFC 5322 + MIME, as nodemailer writes it) ------------------------------------

export interface ParsedMail {
  /** Header names in lower case, values unfolded and with RFC 2047 encoded-words decoded. */
  headers: Map<string, string>;
  /** The body, transfer-decoded (base64 or quoted-printable) and charset-decoded (UTF-8). */
  text: string;
}

function decodeWords(value: string): string {
  // Adjacent encoded-words are joined without the whitespace between them (RFC 2047 section 6.2).
  return value
    .replace(/(=\?[^?]+\?[BbQq]\?[^?]*\?=)\s+(?==\?)/g, '$1')
    .replace(/=\?([^?]+)\?([BbQq])\?([^?]*)\?=/g, (_m, charset: string, enc: string, data: string) => {
      const bytes =
        enc.toUpperCase() === 'B'
          ? Buffer.from(data, 'base64')
          : Buffer.from(data.replace(/_/g, ' ').replace(/=([0-9A-Fa-f]{2})/g, (_x, h: string) => String.fromCharCode(parseInt(h, 16))), 'latin1');
      return new TextDecoder(charset).decode(bytes);
    });
}

function decodeQuotedPrintable(body: string): Buffer {
  const soft = body.replace(/=\r?\n/g, '');
  const bytes: number[] = [];
  for (let i = 0; i < soft.length; i++) {
    const c = soft[i] ?? '';
    const hex = soft.slice(i + 1, i + 3);
    if (c === '=' && /^[0-9A-Fa-f]{2}$/.test(hex)) {
      bytes.push(parseInt(hex, 16));
      i += 2;
    } else bytes.push(...Buffer.from(c, 'latin1'));
  }
  return Buffer.from(bytes);
}

/** Parses a single-part text message (what the mailer sends): headers decoded, body decoded. */
export function parseMail(raw: string): ParsedMail {
  const split = raw.search(/\r?\n\r?\n/);
  const head = split < 0 ? raw : raw.slice(0, split);
  const body = split < 0 ? '' : raw.slice(split).replace(/^\r?\n\r?\n/, '');
  const headers = new Map<string, string>();
  for (const line of head.replace(/\r?\n[ \t]+/g, ' ').split(/\r?\n/)) {
    const i = line.indexOf(':');
    if (i <= 0) continue;
    const name = line.slice(0, i).trim().toLowerCase();
    // The first occurrence wins (the mailer's own headers come after any the MTA prepends only for trace fields).
    if (!headers.has(name)) headers.set(name, decodeWords(line.slice(i + 1).trim()));
  }
  const cte = (headers.get('content-transfer-encoding') ?? '7bit').toLowerCase();
  const charset = /charset="?([^";\s]+)"?/i.exec(headers.get('content-type') ?? '')?.[1] ?? 'utf-8';
  // (7bit/8bit bodies are already text: the caller read the file as UTF-8.)
  if (cte !== 'base64' && cte !== 'quoted-printable') return { headers, text: body };
  const bytes = cte === 'base64' ? Buffer.from(body.replace(/\s+/g, ''), 'base64') : decodeQuotedPrintable(body);
  return { headers, text: new TextDecoder(charset).decode(bytes) };
}
