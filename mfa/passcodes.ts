// App passcodes: per-device passwords for mail programs that roam (phones), checked by Dovecot through the Lua
// passdb in dovecot/ (which asks POST /passcode on the Dovecot endpoint), usable from any network for the
// protocols they were made for.
//
// A passcode is 16 letters from an alphabet without look-alikes (no i, l, o), generated here and shown once as
// four groups of four; spaces, hyphens and case are ignored when it is typed. Its first five letters are a
// public selector that finds its row (so a check costs one hash, not one per passcode of the user); the whole
// passcode, bound to the user, is stored only as a scrypt hash with a salt of its own. scrypt is Node's own
// (no native dependency to keep building, unlike an argon2 binding), memory-hard, and runs in libuv's thread
// pool, so a check never blocks a decision.
//
// The cost: N = 2^12, r = 8 (4 MiB, about 11 ms of one core). Password hashing guidance asks for more (scrypt
// N = 2^17) because people choose guessable passwords; a passcode is drawn at random, and its 11 letters
// after the public selector hold 23^11, about 2^50, possibilities, so even this cost puts a search of a
// stolen store at some 300,000 core-years to try them all, and online guessing is stopped by the limits long before. A
// higher cost would buy nothing against that and would cost every phone's first login after a restart
// (BENCHMARKS.md: 16,384 took four times as long). Each row says how its hash was made (`kdf`), so a later
// cost can be introduced without invalidating the passcodes already handed out.
//
// A passcode that passed is remembered for a while as an HMAC under a key that lives only in this process, so
// a phone's repeated logins do not pay scrypt each time; whether it is revoked, expired or allowed for the
// protocol is looked up at every check.
import crypto from 'node:crypto';
import { promisify } from 'node:util';
import { type Config, PASSCODE_PROTOCOLS, type PasscodeProtocol, blockPrefixes } from '../config/config.js';
import type { Logger } from '../daemon/log.js';
import { blockOf, parseAddress } from '../policy/address.js';
import type { PasscodeSource } from '../store/live-copy.js';
import type { PasscodeRow, PasscodeUse } from '../store/passcode-store.js';
import type { Records } from '../store/records.js';
import { FailureLimiter } from './limiter.js';

export const PASSCODE_ALPHABET = 'abcdefghjkmnpqrstuvwxyz';
export const PASSCODE_LENGTH = 16;
const SELECTOR_LENGTH = 5;
/** What a typed passcode must look like, once spaces and hyphens are gone and it is lower case. */
export const PASSCODE_SHAPE = /^[a-hjkmnp-z]{16}$/;
/** The cost of new hashes, and its name in the `kdf` column. */
export const SCRYPT = { N: 1 << 12, r: 8, p: 1 };
const KDF = `scrypt:n=${SCRYPT.N},r=${SCRYPT.r},p=${SCRYPT.p}`;
const MAXMEM = 64 * 1024 * 1024;
const KEY_LENGTH = 32;
/** How long a passed passcode skips scrypt on its next checks. */
const REMEMBER_MS = 15 * 60_000;
/** How long after a passed check the login's policy request may name the passcode. */
const CHECK_VALID_MS = 2 * 60_000;
/** How long after a passcode's SMTP AUTH the Postfix policy lets that user in from that address. */
const SMTP_SESSION_MS = 10 * 60_000;
/** Devices get names like "iPhone" or "Thunderbird at home". */
const NAME = /^[^\u0000-\u001f\u007f]{1,64}$/u;

const scrypt = promisify(crypto.scrypt) as (password: string, salt: Buffer, keylen: number, options: crypto.ScryptOptions) => Promise<Buffer>;

export class PasscodeError extends Error {
  override name = 'PasscodeError';
  constructor(
    readonly code: 'bad-request' | 'too-many' | 'not-found' | 'disabled',
    message: string,
  ) {
    super(message);
  }
}

/** What is shown of a passcode wherever they are listed (never the passcode itself). */
export interface PasscodeView {
  id: number;
  name: string;
  protocols: string[];
  created_at: string;
  created_by: string;
  expires_at: string | null;
  revoked_at: string | null;
  last_used_at: string | null;
  last_used_ip: string | null;
  last_used_protocol: string | null;
}

export type CheckResult = { ok: true; id: number; name: string } | { ok: false; reason: string; limited?: boolean };

export interface CheckRequest {
  user: string;
  passcode: string;
  ip: string;
  protocol: string;
  /** The TCP peer Dovecot saw; a webmail host's logins do not take passcodes. */
  realIp?: string | undefined;
  /** The webmail hosts ([networks] webmail): passcodes are for mail programs, not for the webmail's login. */
  isWebmail: (address: string) => boolean;
}

/** "abcd efgh jkmn pqrs" -> "abcdefghjkmnpqrs"; undefined when it is not a passcode's shape. */
export function normalisePasscode(typed: string): string | undefined {
  const s = typed.replace(/[\s-]/g, '').toLowerCase();
  return PASSCODE_SHAPE.test(s) ? s : undefined;
}

/** The passcode as it is shown: four groups of four letters. */
export function groupPasscode(p: string): string {
  return p.match(/.{1,4}/g)?.join(' ') ?? p;
}

/** The protocol a login names, as passcodes are limited: Dovecot's submission service is SMTP. */
export function passcodeProtocolOf(protocol: string): PasscodeProtocol | undefined {
  const p = protocol.toLowerCase();
  if (p === 'submission') return 'smtp';
  return (PASSCODE_PROTOCOLS as readonly string[]).includes(p) ? (p as PasscodeProtocol) : undefined;
}

const iso = (ms: number | null) => (ms === null ? null : new Date(ms).toISOString());

export function passcodeView(r: PasscodeRow): PasscodeView {
  return {
    id: r.id,
    name: r.name,
    protocols: r.protocols,
    created_at: new Date(r.createdAt).toISOString(),
    created_by: r.createdBy,
    expires_at: iso(r.expiresAt),
    revoked_at: iso(r.revokedAt),
    last_used_at: iso(r.lastUsedAt),
    last_used_ip: r.lastUsedIp,
    last_used_protocol: r.lastUsedProtocol,
  };
}

export interface PasscodeDeps {
  store: Records;
  config: () => Config;
  logger: Logger;
  clock?: () => number;
}

export class PasscodeService {
  private readonly clock: () => number;
  /** A key of this process only: for remembering passed passcodes without keeping them. */
  private readonly memoKey = crypto.randomBytes(32);
  /** Passcode id -> the HMAC of the passcode that passed, and until when it skips scrypt. */
  private readonly passed = new Map<number, { mac: Buffer; until: number }>();
  /** "user\0ip\0id" -> until when a login's policy request may name this passcode (a check just passed). */
  private readonly checks = new Map<string, number>();
  /** "user\0ip" -> the passcode of an SMTP AUTH from there, and until when Postfix's check may count on it. */
  private readonly smtp = new Map<string, { id: number; until: number }>();
  /** Last uses, written in batches (flushUses, from the daemon's report timer). */
  private uses: PasscodeUse[] = [];
  /** Wrong passcodes per user and per address block, held in memory ([lockout] numbers, counters of their own). */
  private readonly limiter: FailureLimiter;

  /** Where checks read passcodes: the daemon's in-memory copy (see readFrom). */
  private source: PasscodeSource | undefined;

  /** Checks read passcodes from `source` (the daemon's copy: a check then never waits for the store). */
  readFrom(source: PasscodeSource): void {
    this.source = source;
  }

  /** The copy checks read; a service without one (the CLI's) makes and revokes passcodes but checks none. */
  private get read(): PasscodeSource {
    if (!this.source) throw new Error('passcode checks read the daemon\'s in-memory copy, and this service has none');
    return this.source;
  }

  constructor(private readonly d: PasscodeDeps) {
    this.clock = d.clock ?? Date.now;
    this.limiter = new FailureLimiter(() => this.d.config().lockout, this.clock);
  }

  private get config(): Config {
    return this.d.config();
  }

  // ---- making, listing, revoking -------------------------------------------------------------------------

  /** Checks a device name and a protocol list from outside (API, page, CLI). */
  parseRequest(rawName: unknown, rawProtocols: unknown): { name: string; protocols: PasscodeProtocol[] } {
    if (typeof rawName !== 'string' || !NAME.test(rawName.trim())) {
      throw new PasscodeError('bad-request', 'name: expected the device, e.g. "iPhone" (1 to 64 characters)');
    }
    let protocols = this.config.appPasscodes.protocols;
    if (rawProtocols !== undefined && rawProtocols !== null) {
      if (!Array.isArray(rawProtocols) || rawProtocols.length === 0 || !rawProtocols.every((p) => typeof p === 'string' && (PASSCODE_PROTOCOLS as readonly string[]).includes(p))) {
        throw new PasscodeError('bad-request', `protocols: expected a list of ${PASSCODE_PROTOCOLS.map((p) => `"${p}"`).join(', ')}`);
      }
      protocols = [...new Set(rawProtocols as PasscodeProtocol[])];
    }
    return { name: rawName.trim(), protocols };
  }

  /**
   * Makes a passcode: the plain text (to show once) and what to store. The hash is computed here (async, in the
   * thread pool); `insert` is then called inside the caller's transaction, after its proof.
   */
  async prepare(user: string, name: string, protocols: readonly string[], ttlMs: number | undefined, createdBy: string): Promise<{ passcode: string; insert: () => Promise<PasscodeView> }> {
    const config = this.config;
    if (!config.appPasscodes.enabled) throw new PasscodeError('disabled', 'app passcodes are not enabled ([app_passcodes] enabled)');
    let passcode = '';
    for (let tries = 0; ; tries++) {
      passcode = Array.from({ length: PASSCODE_LENGTH }, () => PASSCODE_ALPHABET[crypto.randomInt(PASSCODE_ALPHABET.length)]).join('');
      if (!(await this.d.store.passcodes.selectorTaken(passcode.slice(0, SELECTOR_LENGTH)))) break;
      if (tries > 50) throw new Error('no free passcode selector after 50 tries');
    }
    const salt = crypto.randomBytes(16);
    const hash = await this.hash(user, passcode, salt, KDF);
    if (!hash) throw new Error(`unusable kdf ${KDF}`);
    const ttl = ttlMs ?? config.appPasscodes.ttlMs;
    return {
      passcode,
      insert: async () => {
        const now = this.clock();
        const store = this.d.store.passcodes;
        if ((await store.listOf(user, now)).length >= config.appPasscodes.maxPerUser) {
          throw new PasscodeError('too-many', `at most ${config.appPasscodes.maxPerUser} app passcodes per user: revoke one first`);
        }
        // A selector taken while the hash was computed: the insert fails on the unique index, and the
        // caller's transaction with it (nothing is half made).
        const id = await store.insert({ user, name, selector: passcode.slice(0, SELECTOR_LENGTH), salt, hash, kdf: KDF, protocols, createdBy, expiresAt: ttl === undefined ? null : now + ttl, now });
        await this.d.store.audit(now, createdBy, 'passcode-add', user, null, null, { id, name, protocols: protocols.join(','), ...(ttl === undefined ? {} : { expires_at: new Date(now + ttl).toISOString() }) });
        const row = await store.byId(id);
        if (!row) throw new Error(`passcode ${id} vanished inside its own transaction`);
        return passcodeView(row);
      },
    };
  }

  async list(user: string, all = false): Promise<PasscodeView[]> {
    return (await this.d.store.passcodes.listOf(user, this.clock(), all)).map(passcodeView);
  }

  /** Revokes the user's passcode `id` (in the caller's transaction if any); throws not-found. */
  async revoke(user: string, id: number, actor: string, reason = ''): Promise<PasscodeView> {
    const now = this.clock();
    const view = await this.d.store.tx(async () => {
      const row = await this.d.store.passcodes.byId(id);
      if (!row || row.user !== user || row.revokedAt !== null) throw new PasscodeError('not-found', 'no such app passcode of this user (or it is revoked already)');
      await this.d.store.passcodes.revoke(id, actor, now);
      await this.d.store.audit(now, actor, 'passcode-revoke', user, null, null, { id, name: row.name, ...(reason ? { reason } : {}) });
      return passcodeView({ ...row, revokedAt: now, revokedBy: actor });
    });
    this.forget(id);
    return view;
  }

  /** Revokes every working passcode of the user; returns them. */
  async revokeAll(user: string, actor: string, reason = ''): Promise<PasscodeView[]> {
    return this.d.store.tx(async () => {
      const views: PasscodeView[] = [];
      for (const r of await this.d.store.passcodes.listOf(user, this.clock())) views.push(await this.revoke(user, r.id, actor, reason));
      return views;
    });
  }

  private forget(id: number): void {
    this.passed.delete(id);
    for (const [k, v] of this.smtp) if (v.id === id) this.smtp.delete(k);
    for (const k of this.checks.keys()) if (k.endsWith(`\0${id}`)) this.checks.delete(k);
  }

  // ---- checking (Dovecot's Lua passdb asks) ----------------------------------------------------------------

  /** The hash `kdf` names ("scrypt:n=4096,r=8,p=1"); a row naming anything else cannot match. */
  private async hash(user: string, passcode: string, salt: Buffer, kdf: string): Promise<Buffer | undefined> {
    const m = /^scrypt:n=(\d+),r=(\d+),p=(\d+)$/.exec(kdf);
    if (!m) return undefined;
    const [N, r, p] = [Number(m[1]), Number(m[2]), Number(m[3])];
    if (N > 1 << 20 || r > 32 || p > 4) return undefined;
    return scrypt(`${user}\0${passcode}`, salt, KEY_LENGTH, { N, r, p, maxmem: MAXMEM });
  }

  private memo(user: string, passcode: string): Buffer {
    return crypto.createHmac('sha256', this.memoKey).update(`${user}\0${passcode}`).digest();
  }

  private block(ip: string): string {
    const a = parseAddress(ip);
    return a ? blockOf(a, blockPrefixes(this.config)) : ip;
  }

  /**
   * Whether `passcode` is a working passcode of `user` for `protocol`. A failure (wrong, revoked, expired, not
   * for this protocol) is counted per user and per address block; over the [lockout] limits every check fails
   * at once for a while, without touching the site password or the second factors.
   */
  async check(r: CheckRequest): Promise<CheckResult> {
    const config = this.config;
    if (!config.appPasscodes.enabled) return { ok: false, reason: 'app passcodes are not enabled' };
    const protocol = passcodeProtocolOf(r.protocol);
    if (!protocol) return { ok: false, reason: `not a protocol passcodes are for: ${r.protocol}` };
    if (r.realIp !== undefined && r.isWebmail(r.realIp)) return { ok: false, reason: 'a passcode does not sign in to the webmail' };
    const passcode = normalisePasscode(r.passcode);
    if (!passcode) return { ok: false, reason: 'not the shape of a passcode' };
    const block = this.block(r.ip);
    const limit = this.limiter.check([r.user], block);
    if (!limit.ok) return { ok: false, reason: `too many wrong passcodes (${limit.scope === 'ip' ? 'from this address' : 'for this user'})`, limited: true };

    const attempt = this.limiter.begin([r.user], block);
    const now = this.clock();
    const row = this.read.bySelector(passcode.slice(0, SELECTOR_LENGTH));
    const fail = (reason: string): CheckResult => {
      attempt.failed(undefined);
      return { ok: false, reason };
    };
    if (!row || row.user !== r.user) return fail('no such passcode for this user');
    const remembered = this.passed.get(row.id);
    const mac = this.memo(r.user, passcode);
    let right = remembered !== undefined && remembered.until > now && crypto.timingSafeEqual(remembered.mac, mac);
    if (!right) {
      const hash = await this.hash(r.user, passcode, row.salt, row.kdf);
      right = hash !== undefined && hash.length === row.hash.length && crypto.timingSafeEqual(hash, row.hash);
      if (right) this.passed.set(row.id, { mac, until: now + REMEMBER_MS });
    }
    if (!right) return fail('wrong passcode');
    // Looked up again after the hash: a revoke while it ran counts.
    const current = this.read.byId(row.id);
    if (!current || current.revokedAt !== null) return fail('revoked passcode');
    if (current.expiresAt !== null && current.expiresAt <= now) return fail('expired passcode');
    if (!current.protocols.includes(protocol)) return fail(`passcode not for ${protocol}`);
    attempt.succeeded(r.user);
    this.checks.set(`${r.user}\0${r.ip}\0${row.id}`, now + CHECK_VALID_MS);
    this.uses.push({ id: row.id, at: now, ip: r.ip, protocol });
    return { ok: true, id: row.id, name: row.name };
  }

  /**
   * Whether a login's policy request may count as made with passcode `id`: a check of it passed for this user
   * and address within the last two minutes, and it still works for the protocol. The passdb field alone is not
   * believed (a site passdb could, by accident, return a field of that name).
   */
  loginAllowed(user: string, ip: string, id: number, protocol: string): boolean {
    const now = this.clock();
    const until = this.checks.get(`${user}\0${ip}\0${id}`);
    if (until === undefined || until <= now) return false;
    return this.works(user, id, protocol, now);
  }

  private works(user: string, id: number, protocol: string, now: number): boolean {
    const p = passcodeProtocolOf(protocol);
    const row = this.read.byId(id);
    return p !== undefined && row !== undefined && row.user === user && row.revokedAt === null && (row.expiresAt === null || row.expiresAt > now) && row.protocols.includes(p);
  }

  /**
   * SMTP AUTH through Dovecot was allowed for a passcode: Postfix's policy check of that session (which knows
   * only the SASL user and the client address) may let it through for ten minutes. A password-only session
   * from the same address cannot use this: Dovecot's own policy check refuses its AUTH before Postfix asks.
   */
  noteSmtpSession(user: string, ip: string, id: number): void {
    this.smtp.set(`${user}\0${ip}`, { id, until: this.clock() + SMTP_SESSION_MS });
  }

  /** The passcode of a recent SMTP AUTH by `user` from `ip`, if it still works for SMTP. */
  smtpSession(user: string, ip: string): number | undefined {
    const now = this.clock();
    const s = this.smtp.get(`${user}\0${ip}`);
    if (!s || s.until <= now) return undefined;
    return this.works(user, s.id, 'smtp', now) ? s.id : undefined;
  }

  /** Writes the batched last uses (one transaction). */
  async flushUses(): Promise<void> {
    if (this.uses.length === 0) return;
    const batch = this.uses;
    this.uses = [];
    try {
      await this.d.store.passcodes.recordUses(batch);
    } catch (e) {
      this.d.logger.log('error', 'passcode-use-not-stored', { error: e instanceof Error ? e.message : String(e), dropped: batch.length });
    }
  }

  /** Forgets expired memories (run from a timer). */
  sweep(): void {
    const now = this.clock();
    for (const [k, v] of this.passed) if (v.until <= now) this.passed.delete(k);
    for (const [k, v] of this.checks) if (v <= now) this.checks.delete(k);
    for (const [k, v] of this.smtp) if (v.until <= now) this.smtp.delete(k);
    this.limiter.sweep();
  }
}
