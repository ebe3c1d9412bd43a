// What every second factor shares (mfa/service.ts, mfa/email-factor.ts): the input checks, the audit, the
// lockout and address limits, and checking and consuming a code inside one write transaction, so that two
// racing requests with the same code cannot both pass, and what a passed factor buys commits with the code
// being used up, or neither does.
import crypto from 'node:crypto';
import type { Config } from '../config/config.js';
import { blockPrefixes } from '../config/config.js';
import { blockOf, parseAddress } from '../policy/address.js';
import { isAcceptableUserName, normaliseUser } from '../policy/user.js';
import type { GrantRow, Records } from '../store/records.js';
import type { Logger } from '../daemon/log.js';
import { MfaError } from './errors.js';
import type { Mailer } from './mailer.js';
import type { PasscodeService } from './passcodes.js';
import type { Secrets } from './secrets.js';
import { matchStep } from './totp.js';

export type Method = 'totp' | 'email' | 'backup';
export const METHODS: readonly Method[] = ['totp', 'email', 'backup'];

export interface Proof {
  method: Method;
  code: string;
}

export interface GrantView {
  id: number;
  block: string;
  ip: string;
  created_at: string;
  expires_at: string;
  method: string;
}

export interface Deps {
  store: Records;
  config: () => Config;
  secrets: Secrets;
  mailer: () => Mailer;
  logger: Logger;
  clock?: () => number;
  /** App passcodes (the daemon shares its PolicyService's); a service of its own when not given. */
  passcodes?: PasscodeService;
}

export function maskAddress(address: string): string {
  const at = address.lastIndexOf('@');
  const local = address.slice(0, at);
  return `${local.slice(0, 1)}***${address.slice(at)}`;
}

export function normaliseBackup(code: string): string {
  return code.toLowerCase().replace(/[\s-]/g, '');
}

export function randomCode(digits: number): string {
  let s = '';
  for (let i = 0; i < digits; i++) s += String(crypto.randomInt(10));
  return s;
}

export class FactorCore {
  readonly clock: () => number;

  constructor(readonly d: Deps) {
    this.clock = d.clock ?? Date.now;
  }

  get config(): Config {
    return this.d.config();
  }

  get mfa() {
    return this.d.store.mfa;
  }

  // ---- input -----------------------------------------------------------------------------------------------

  user(raw: unknown): string {
    if (typeof raw !== 'string') throw new MfaError('bad-request', 'user: expected a user name');
    const u = normaliseUser(raw, this.config.users);
    if (!isAcceptableUserName(u)) throw new MfaError('bad-request', 'user: not an acceptable user name');
    return u;
  }

  ip(raw: unknown): string {
    const a = typeof raw === 'string' ? parseAddress(raw) : undefined;
    if (!a) throw new MfaError('bad-request', 'ip: expected the client IP address, e.g. "203.0.113.7"');
    return a.toString();
  }

  async audit(action: string, user: string, ip: string | null, detail: Record<string, unknown> = {}, grantId: number | null = null): Promise<void> {
    await this.d.store.audit(this.clock(), 'api', action, user, ip, grantId, detail);
  }

  grantView(g: GrantRow): GrantView {
    return { id: g.id, block: g.block, ip: g.ip, created_at: new Date(g.createdAt).toISOString(), expires_at: new Date(g.expiresAt).toISOString(), method: g.method };
  }

  async hasFactor(user: string): Promise<boolean> {
    const f = await this.mfa.factors(user);
    return f?.totpSecret != null || f?.email != null;
  }

  // ---- lockout ---------------------------------------------------------------------------------------------

  /**
   * The address block an address limit counts under: the IPv4 address, the IPv6 /64 ([grants] prefixes), as
   * grants are held. Counting exact IPv6 addresses would give anyone with one /64 unlimited tries.
   */
  limitBlock(ip: string): string {
    const a = parseAddress(ip);
    return a ? blockOf(a, blockPrefixes(this.config)) : ip;
  }

  /** Refuses when the user is locked or the client's address block has failed too often across users. */
  async checkLimits(user: string, ip: string, now: number): Promise<void> {
    const until = await this.mfa.lockedUntil(user);
    if (until !== undefined && until > now) throw new MfaError('locked', undefined, until - now);
    const { windowMs, ipMaxFailures } = this.config.lockout;
    if ((await this.mfa.failuresOfBlock(this.limitBlock(ip), now - windowMs)) >= ipMaxFailures) throw new MfaError('rate-limited', 'too many failed attempts from this address: try again later', windowMs);
  }

  /** Records a failure (inside the caller's transaction) and locks the user when the limit is reached. */
  async fail(user: string, ip: string, method: string, now: number): Promise<MfaError> {
    const { maxFailures, windowMs, durationMs } = this.config.lockout;
    await this.mfa.addFailure(user, ip, this.limitBlock(ip), method, now);
    await this.audit('factor-fail', user, ip, { method });
    if ((await this.mfa.failuresOfUser(user, now - windowMs)) >= maxFailures) {
      await this.d.store.ensureUser(user, now);
      await this.mfa.setLock(user, now + durationMs, now);
      await this.audit('user-locked', user, ip, { until: new Date(now + durationMs).toISOString() });
      this.d.logger.log('warn', 'user-locked', { user, ip, until: new Date(now + durationMs).toISOString() });
    }
    return new MfaError('factor-failed');
  }

  /** Runs a check; an attempt refused by a lock or the address limit is audited too (after its rollback). */
  async attempt<T>(user: string, ip: string, method: string, check: () => Promise<T>): Promise<T> {
    try {
      return await check();
    } catch (e) {
      if (e instanceof MfaError && (e.code === 'locked' || e.code === 'rate-limited')) await this.audit('factor-refused', user, ip, { method, result: e.code });
      throw e;
    }
  }

  // ---- checking a factor -----------------------------------------------------------------------------------

  /**
   * Checks a code, consumes it, and runs `then`, all in one write transaction: two racing requests with the
   * same code cannot both pass, and what a passed factor buys (a grant, a change) commits together with the
   * code being used up, or neither does, so a crash in between cannot spend a code for nothing. Throws
   * factor-failed (and counts the failure) when the code is wrong.
   */
  async consumeThen<T>(user: string, ip: string, proof: Proof, now: number, then: () => Promise<T>): Promise<T> {
    const run = () => this.d.store.tx(async (): Promise<{ err: MfaError } | { value: T }> => {
      await this.checkLimits(user, ip, now);
      const ok = await this.tryConsume(user, proof, now);
      if (!ok) return { err: await this.fail(user, ip, proof.method, now) };
      await this.mfa.clearFailures(user);
      return { value: await then() };
    });
    // The failure is recorded in the committed transaction; only then is it thrown.
    const r = await this.attempt(user, ip, proof.method, run);
    if ('err' in r) throw r.err;
    return r.value;
  }

  async tryConsume(user: string, proof: Proof, now: number): Promise<boolean> {
    const code = typeof proof.code === 'string' ? proof.code.trim() : '';
    if (code === '' || code.length > 64) return false;
    const f = await this.mfa.factors(user);
    switch (proof.method) {
      case 'totp': {
        if (!f?.totpSecret) return false;
        const secret = this.d.secrets.decrypt(f.totpSecret, `totp:${user}`).toString('utf8');
        const step = matchStep(secret, code, now);
        if (step === undefined || (f.totpLastStep !== null && step <= f.totpLastStep)) return false;
        await this.mfa.updateFactors(user, { totp_last_step: step }, now);
        return true;
      }
      case 'email': {
        if (!f?.email) return false;
        const c = await this.mfa.latestCode(user, 'login', now);
        if (!c || c.address !== f.email) return false;
        if (!this.d.secrets.sameHash(c.codeHash, this.d.secrets.hashCode(user, code))) return false;
        return await this.mfa.useCode(c.id, now);
      }
      case 'backup':
        return await this.mfa.useBackupCode(user, this.d.secrets.hashCode(user, normaliseBackup(code)), now);
      default:
        return false;
    }
  }

  parseProof(raw: unknown): Proof | undefined {
    if (raw === undefined || raw === null) return undefined;
    if (typeof raw !== 'object') throw new MfaError('bad-request', 'factor: expected {"method": "totp"|"email"|"backup", "code": "..."}');
    const o = raw as Record<string, unknown>;
    if (!METHODS.includes(o['method'] as Method) || typeof o['code'] !== 'string') {
      throw new MfaError('bad-request', 'factor: expected {"method": "totp"|"email"|"backup", "code": "..."}');
    }
    return { method: o['method'] as Method, code: o['code'] };
  }

  /** Once a user has a factor, changing factors needs a passed one (first registration trusts the password). */
  async requireProofIfRegistered(user: string, ip: string, rawProof: unknown, now: number): Promise<void> {
    await this.changeWithProof(user, ip, rawProof, now, async () => undefined);
  }

  /**
   * A change that needs the proof once a factor is registered: the code is used up and the change made in one
   * transaction (without a factor, the change alone runs in one).
   */
  async changeWithProof<T>(user: string, ip: string, rawProof: unknown, now: number, change: () => Promise<T>): Promise<T> {
    if (!(await this.hasFactor(user))) return this.d.store.tx(change);
    const proof = this.parseProof(rawProof);
    if (!proof) throw new MfaError('proof-required');
    return this.consumeThen(user, ip, proof, now, async () => {
      await this.audit('factor-pass', user, ip, { method: proof.method, for: 'change' });
      return change();
    });
  }

  async guardLastFactor(user: string, isLast: boolean): Promise<void> {
    if (isLast && (await this.d.store.getUser(user))?.mfaEnabled) {
      throw new MfaError('conflict', 'this is the last registered factor and MFA is enabled: disable MFA first, or register another factor');
    }
  }
}
