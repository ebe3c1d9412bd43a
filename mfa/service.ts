// Second factors: registering them, checking them, and the grants only a passed factor creates.
// Protocol-free: the webmail API (daemon/api-server.ts) and the CLI call this. Every check that must not race
// (a TOTP time step used once, an e-mailed code used once) runs inside one BEGIN IMMEDIATE transaction.
import crypto from 'node:crypto';
import type { Config } from '../config/config.js';
import { blockPrefixes, policySettings } from '../config/config.js';
import { blockOf, parseAddress } from '../policy/address.js';
import { decide, mfaRequired } from '../policy/decide.js';
import { describeRule } from '../policy/rules.js';
import { isAcceptableUserName, normaliseUser } from '../policy/user.js';
import type { GrantRow, Records } from '../store/records.js';
import type { Logger } from '../daemon/log.js';
import { MailError, type Mailer } from './mailer.js';
import { addressChangedMail, grantNoticeMail, loginCodeMail, verifyAddressMail } from './messages.js';
import type { Secrets } from './secrets.js';
import { matchStep, newSecret, otpauthUri } from './totp.js';
import { PasscodeError, PasscodeService, type PasscodeView, groupPasscode } from './passcodes.js';
import QRCode from 'qrcode';

export type Method = 'totp' | 'email' | 'backup';
export const METHODS: readonly Method[] = ['totp', 'email', 'backup'];

/** The catalogue of errors the API maps to HTTP statuses. Messages are safe to show and never name a secret. */
export const MFA_ERRORS = {
  'bad-request': { status: 400, message: 'the request is malformed' },
  'factor-failed': { status: 403, message: 'the code is not right' },
  'proof-required': { status: 403, message: 'a passed second factor is required for this change' },
  'no-factor': { status: 409, message: 'no second factor is registered' },
  'not-registered': { status: 409, message: 'that factor is not registered' },
  conflict: { status: 409, message: 'the request conflicts with the current state' },
  'refused-domain': { status: 422, message: 'addresses in this domain cannot be used as an external address' },
  locked: { status: 423, message: 'too many failed attempts: try again later' },
  'rate-limited': { status: 429, message: 'too many requests: try again later' },
  'mail-failed': { status: 502, message: 'the mail could not be sent' },
  'store-unavailable': { status: 503, message: 'the store cannot be reached now: nothing was changed; try again in a few minutes' },
} as const;
export type MfaErrorCode = keyof typeof MFA_ERRORS;

export class MfaError extends Error {
  override name = 'MfaError';
  constructor(
    readonly code: MfaErrorCode,
    detail?: string,
    readonly retryAfterMs?: number,
  ) {
    super(detail ?? MFA_ERRORS[code].message);
  }
  get status(): number {
    return MFA_ERRORS[this.code].status;
  }
}

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

const BACKUP_ALPHABET = '23456789abcdefghjkmnpqrstuvwxyz';
const BACKUP_COUNT = 10;
const PENDING_TOTP_MS = 15 * 60_000;

export function maskAddress(address: string): string {
  const at = address.lastIndexOf('@');
  const local = address.slice(0, at);
  return `${local.slice(0, 1)}***${address.slice(at)}`;
}

function normaliseBackup(code: string): string {
  return code.toLowerCase().replace(/[\s-]/g, '');
}

function randomCode(digits: number): string {
  let s = '';
  for (let i = 0; i < digits; i++) s += String(crypto.randomInt(10));
  return s;
}

/** PasscodeService's errors in the API's catalogue (anything else is rethrown as it is). */
function passcodeFailure(e: unknown): never {
  if (!(e instanceof PasscodeError)) throw e;
  throw new MfaError(e.code === 'not-found' ? 'not-registered' : e.code === 'bad-request' ? 'bad-request' : 'conflict', e.message);
}

export class MfaService {
  private readonly clock: () => number;
  /** Users with a send in flight: one at a time per user, so the send limits cannot be raced. */
  private readonly sending = new Set<string>();

  /** App passcodes: made here with a passed factor, checked by the policy service. */
  readonly passcodes: PasscodeService;

  constructor(private readonly d: Deps) {
    this.clock = d.clock ?? Date.now;
    this.passcodes = d.passcodes ?? new PasscodeService({ store: d.store, config: d.config, logger: d.logger, clock: this.clock });
  }

  private get config(): Config {
    return this.d.config();
  }

  private get mfa() {
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

  private async audit(action: string, user: string, ip: string | null, detail: Record<string, unknown> = {}, grantId: number | null = null): Promise<void> {
    await this.d.store.audit(this.clock(), 'api', action, user, ip, grantId, detail);
  }

  // ---- status ----------------------------------------------------------------------------------------------

  async status(user: string, ip?: string) {
    const now = this.clock();
    const u = await this.d.store.getUser(user);
    const f = await this.mfa.factors(user);
    const config = this.config;
    const settings = policySettings(config);
    const lockedUntil = await this.mfa.lockedUntil(user);
    const grants = (await this.d.store.listGrants({ user, now })).map((g) => this.grantView(g));
    let login: { ip: string; needs_mfa: boolean; rule: string; explanation: string } | undefined;
    if (ip !== undefined) {
      const address = parseAddress(ip);
      if (address) {
        // The facts read now from the store, for the one (user, block) the decision will ask about.
        const facts = await this.d.store.lookup(user, blockOf(address, settings.prefixes), now);
        const decision = decide(settings, { user, address, protocol: 'imap', now }, { lookup: () => facts });
        login = { ip, needs_mfa: decision.verdict === 'refuse', rule: decision.rule, explanation: describeRule(decision.rule) };
      }
    }
    // Exempt by the store's flag or by [enforcement] exempt_users, as the decision counts it.
    const exempt = (u?.exempt ?? false) || settings.exemptUsers.has(user);
    const facts = u ? { mfaEnabled: u.mfaEnabled, exempt: u.exempt } : undefined;
    return {
      user,
      mfa_enabled: u?.mfaEnabled ?? false,
      mfa_required: mfaRequired(settings, user, facts, now),
      exempt,
      factors: {
        totp: f?.totpSecret != null,
        email: f?.email ? maskAddress(f.email) : null,
        email_pending: f?.emailPending ? maskAddress(f.emailPending) : null,
        backup_codes_left: await this.mfa.backupCodesLeft(user),
      },
      locked_until: lockedUntil !== undefined && lockedUntil > now ? new Date(lockedUntil).toISOString() : null,
      grants,
      ...(login ? { login } : {}),
    };
  }

  grantView(g: GrantRow): GrantView {
    return { id: g.id, block: g.block, ip: g.ip, created_at: new Date(g.createdAt).toISOString(), expires_at: new Date(g.expiresAt).toISOString(), method: g.method };
  }

  private async hasFactor(user: string): Promise<boolean> {
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
  private async checkLimits(user: string, ip: string, now: number): Promise<void> {
    const until = await this.mfa.lockedUntil(user);
    if (until !== undefined && until > now) throw new MfaError('locked', undefined, until - now);
    const { windowMs, ipMaxFailures } = this.config.lockout;
    if ((await this.mfa.failuresOfBlock(this.limitBlock(ip), now - windowMs)) >= ipMaxFailures) throw new MfaError('rate-limited', 'too many failed attempts from this address: try again later', windowMs);
  }

  /** Records a failure (inside the caller's transaction) and locks the user when the limit is reached. */
  private async fail(user: string, ip: string, method: string, now: number): Promise<MfaError> {
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
  private async attempt<T>(user: string, ip: string, method: string, check: () => Promise<T>): Promise<T> {
    try {
      return await check();
    } catch (e) {
      if (e instanceof MfaError && (e.code === 'locked' || e.code === 'rate-limited')) await this.audit('factor-refused', user, ip, { method, result: e.code });
      throw e;
    }
  }

  async unlock(user: string, actor: string): Promise<boolean> {
    const now = this.clock();
    return this.d.store.tx(async () => {
        const was = await this.mfa.lockedUntil(user);
        await this.mfa.clearFailures(user);
        if (was === undefined) return false;
        await this.mfa.setLock(user, null, now);
        await this.d.store.audit(now, actor, 'user-unlock', user, null, null, {});
        return was > now;
      });
  }

  // ---- checking a factor -----------------------------------------------------------------------------------

  /**
   * Checks a code, consumes it, and runs `then`, all in one immediate transaction: two racing requests with the
   * same code cannot both pass, and what a passed factor buys (a grant, a change) commits together with the
   * code being used up, or neither does, so a crash in between cannot spend a code for nothing. Throws
   * factor-failed (and counts the failure) when the code is wrong.
   */
  private async consumeThen<T>(user: string, ip: string, proof: Proof, now: number, then: () => Promise<T>): Promise<T> {
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

  private async tryConsume(user: string, proof: Proof, now: number): Promise<boolean> {
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

  private parseProof(raw: unknown): Proof | undefined {
    if (raw === undefined || raw === null) return undefined;
    if (typeof raw !== 'object') throw new MfaError('bad-request', 'factor: expected {"method": "totp"|"email"|"backup", "code": "..."}');
    const o = raw as Record<string, unknown>;
    if (!METHODS.includes(o['method'] as Method) || typeof o['code'] !== 'string') {
      throw new MfaError('bad-request', 'factor: expected {"method": "totp"|"email"|"backup", "code": "..."}');
    }
    return { method: o['method'] as Method, code: o['code'] };
  }

  /** Once a user has a factor, changing factors needs a passed one (first registration trusts the password). */
  private async requireProofIfRegistered(user: string, ip: string, rawProof: unknown, now: number): Promise<void> {
    await this.changeWithProof(user, ip, rawProof, now, async () => undefined);
  }

  /**
   * A change that needs the proof once a factor is registered: the code is used up and the change made in one
   * transaction (without a factor, the change alone runs in one).
   */
  private async changeWithProof<T>(user: string, ip: string, rawProof: unknown, now: number, change: () => Promise<T>): Promise<T> {
    if (!(await this.hasFactor(user))) return this.d.store.tx(change);
    const proof = this.parseProof(rawProof);
    if (!proof) throw new MfaError('proof-required');
    return this.consumeThen(user, ip, proof, now, async () => {
      await this.audit('factor-pass', user, ip, { method: proof.method, for: 'change' });
      return change();
    });
  }

  // ---- verify: the factor that creates a grant -------------------------------------------------------------

  async verify(user: string, ip: string, rawProof: unknown): Promise<GrantView> {
    const proof = this.parseProof(rawProof);
    if (!proof) throw new MfaError('bad-request', 'factor: expected {"method": "totp"|"email"|"backup", "code": "..."}');
    const address = parseAddress(ip);
    if (!address) throw new MfaError('bad-request', 'ip: not an IP address');
    const now = this.clock();
    const config = this.config;
    const grant = await this.consumeThen(user, ip, proof, now, async () => {
      const { grant } = await this.d.store.addGrant({
        user,
        ip,
        block: blockOf(address, blockPrefixes(config)),
        ttlMs: config.grants.ttlMs,
        method: proof.method,
        source: 'api',
        reason: '',
        actor: 'api',
        now,
      });
      await this.audit('factor-pass', user, ip, { method: proof.method }, grant.id);
      return grant;
    });
    this.d.logger.log('info', 'mfa-passed', { user, ip, method: proof.method, grant: grant.id, block: grant.block });
    const f = await this.mfa.factors(user);
    if (config.mail.notify && f?.email) {
      const mail = grantNoticeMail({ user, ip, at: now, expiresAt: grant.expiresAt, method: proof.method });
      this.d.mailer().send({ to: f.email, ...mail }).catch((e: unknown) => {
        this.d.logger.log('warn', 'notice-not-sent', { user, error: e instanceof Error ? e.message : String(e) });
      });
    }
    return this.grantView(grant);
  }

  // ---- authenticator app -----------------------------------------------------------------------------------

  async totpBegin(user: string, ip: string, rawProof: unknown): Promise<{ secret: string; uri: string; qr_svg: string }> {
    const now = this.clock();
    const secret = newSecret();
    const uri = otpauthUri(this.config.totp.issuer, user, secret);
    await this.changeWithProof(user, ip, rawProof, now, async () => {
      await this.d.store.ensureUser(user, now);
      await this.mfa.updateFactors(user, { totp_pending: this.d.secrets.encrypt(Buffer.from(secret), `totp-pending:${user}`), totp_pending_at: now }, now);
      await this.audit('totp-begin', user, ip);
    });
    const qr_svg = await QRCode.toString(uri, { type: 'svg', errorCorrectionLevel: 'M', margin: 2 });
    return { secret, uri, qr_svg };
  }

  async totpConfirm(user: string, ip: string, code: unknown): Promise<{ registered: true }> {
    if (typeof code !== 'string') throw new MfaError('bad-request', 'code: expected the 6-digit code from the app');
    const now = this.clock();
    const err = await this.attempt(user, ip, 'totp', () => this.d.store.tx(async (): Promise<MfaError | undefined> => {
        await this.checkLimits(user, ip, now);
        const f = await this.mfa.factors(user);
        if (!f?.totpPending || f.totpPendingAt === null || f.totpPendingAt + PENDING_TOTP_MS <= now) {
          throw new MfaError('conflict', 'no app enrolment in progress (or it is older than 15 minutes): begin again');
        }
        const secret = this.d.secrets.decrypt(f.totpPending, `totp-pending:${user}`).toString('utf8');
        const step = matchStep(secret, code.trim(), now);
        if (step === undefined) return await this.fail(user, ip, 'totp', now);
        await this.mfa.updateFactors(
          user,
          {
            totp_secret: this.d.secrets.encrypt(Buffer.from(secret), `totp:${user}`),
            totp_pending: null,
            totp_pending_at: null,
            totp_confirmed_at: now,
            totp_last_step: step,
          },
          now,
        );
        await this.mfa.clearFailures(user);
        await this.audit('totp-register', user, ip);
        return undefined;
      }));
    if (err) throw err;
    return { registered: true };
  }

  async totpRemove(user: string, ip: string, rawProof: unknown): Promise<void> {
    const now = this.clock();
    const f = await this.mfa.factors(user);
    if (!f?.totpSecret) throw new MfaError('not-registered');
    await this.guardLastFactor(user, f.email === null);
    await this.changeWithProof(user, ip, rawProof, now, async () => {
      await this.mfa.updateFactors(user, { totp_secret: null, totp_confirmed_at: null, totp_last_step: null, totp_pending: null, totp_pending_at: null }, now);
      await this.audit('totp-remove', user, ip);
    });
  }

  private async guardLastFactor(user: string, isLast: boolean): Promise<void> {
    if (isLast && (await this.d.store.getUser(user))?.mfaEnabled) {
      throw new MfaError('conflict', 'this is the last registered factor and MFA is enabled: disable MFA first, or register another factor');
    }
  }

  // ---- external e-mail address -----------------------------------------------------------------------------

  private checkAddress(raw: unknown): string {
    if (typeof raw !== 'string' || !/^[^\s@<>",;]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}$/.test(raw.trim()) || raw.length > 254) {
      throw new MfaError('bad-request', 'address: expected a mail address such as "alice@example.com"');
    }
    const address = raw.trim();
    const domain = address.slice(address.lastIndexOf('@') + 1).toLowerCase();
    const refused = this.config.otp.refusedEmailDomains;
    if (refused.some((d) => domain === d || domain.endsWith(`.${d}`))) throw new MfaError('refused-domain', `addresses in ${domain} cannot be used: use a private address outside the university`);
    return address;
  }

  /** Registers (or changes) the external address: sends a code there; it counts once confirmed. */
  async emailRegister(user: string, ip: string, rawAddress: unknown, rawProof: unknown): Promise<{ pending: string; expires_at: string }> {
    const address = this.checkAddress(rawAddress);
    const now = this.clock();
    const f = await this.mfa.factors(user);
    if (f?.email && f.email.toLowerCase() === address.toLowerCase()) throw new MfaError('conflict', 'that address is already registered');
    return this.oneSendAtATime(user, async () => {
      // Confirmation mails have the same send limits as login codes (counted apart), checked before the proof is used.
      await this.checkSendLimits(user, 'verify', now);
      await this.requireProofIfRegistered(user, ip, rawProof, now);
      const code = randomCode(this.config.otp.digits);
      const expiresAt = now + this.config.otp.ttlMs;
      const mail = verifyAddressMail({ user, code, expiresAt, ip, at: now, minutes: Math.round(this.config.otp.ttlMs / 60_000) });
      await this.sendOrFail({ to: address, ...mail });
      await this.d.store.tx(async () => {
          await this.d.store.ensureUser(user, now);
          await this.mfa.updateFactors(user, { email_pending: address }, now);
          await this.mfa.addCode(user, 'verify', address, this.d.secrets.hashCode(user, code), ip, now, expiresAt);
          await this.audit('email-register', user, ip, { address: maskAddress(address) });
        });
      return { pending: maskAddress(address), expires_at: new Date(expiresAt).toISOString() };
    });
  }

  async emailConfirm(user: string, ip: string, code: unknown): Promise<{ address: string }> {
    if (typeof code !== 'string') throw new MfaError('bad-request', 'code: expected the code sent to the address');
    const now = this.clock();
    let old: string | null = null;
    let address = '';
    const err = await this.attempt(user, ip, 'email-verify', () => this.d.store.tx(async (): Promise<MfaError | undefined> => {
        await this.checkLimits(user, ip, now);
        const f = await this.mfa.factors(user);
        const c = await this.mfa.latestCode(user, 'verify', now);
        if (!f?.emailPending || !c || c.address !== f.emailPending) throw new MfaError('conflict', 'no address is waiting for confirmation (or its code expired): register it again');
        if (!this.d.secrets.sameHash(c.codeHash, this.d.secrets.hashCode(user, code.trim())) || !(await this.mfa.useCode(c.id, now))) {
          return await this.fail(user, ip, 'email-verify', now);
        }
        old = f.email;
        address = f.emailPending;
        await this.mfa.updateFactors(user, { email: address, email_verified_at: now, email_pending: null }, now);
        // Codes sent to the old address are void.
        await this.mfa.voidCodes(user, 'login', now);
        await this.mfa.clearFailures(user);
        await this.audit(old ? 'email-change' : 'email-verified', user, ip, { address: maskAddress(address) });
        return undefined;
      }));
    if (err) throw err;
    if (old !== null && old !== address) {
      const mail = addressChangedMail({ user, newAddress: maskAddress(address), ip, at: now });
      this.d.mailer().send({ to: old, ...mail }).catch((e: unknown) => {
        this.d.logger.log('warn', 'notice-not-sent', { user, error: e instanceof Error ? e.message : String(e) });
      });
    }
    return { address: maskAddress(address) };
  }

  async emailRemove(user: string, ip: string, rawProof: unknown): Promise<void> {
    const now = this.clock();
    const f = await this.mfa.factors(user);
    if (!f?.email && !f?.emailPending) throw new MfaError('not-registered');
    await this.guardLastFactor(user, f.email !== null && f.totpSecret === null);
    await this.changeWithProof(user, ip, rawProof, now, async () => {
      await this.mfa.updateFactors(user, { email: null, email_verified_at: null, email_pending: null }, now);
      await this.mfa.voidCodes(user, 'login', now);
      await this.mfa.voidCodes(user, 'verify', now);
      await this.audit('email-remove', user, ip);
    });
  }

  /** Sends a login code to the registered address: one a minute, five an hour, the newest voids the older. */
  async sendLoginCode(user: string, ip: string): Promise<{ sent_to: string; expires_at: string }> {
    const now = this.clock();
    const f = await this.mfa.factors(user);
    const to = f?.email;
    if (!to) throw new MfaError('not-registered', 'no external address is registered');
    return this.oneSendAtATime(user, async () => {
      await this.checkLimits(user, ip, now);
      await this.checkSendLimits(user, 'login', now);
      const code = randomCode(this.config.otp.digits);
      const expiresAt = now + this.config.otp.ttlMs;
      const mail = loginCodeMail({ user, code, expiresAt, ip, at: now, minutes: Math.round(this.config.otp.ttlMs / 60_000) });
      await this.sendOrFail({ to, ...mail });
      await this.d.store.tx(async () => {
          await this.mfa.addCode(user, 'login', to, this.d.secrets.hashCode(user, code), ip, now, expiresAt);
          await this.audit('email-code-sent', user, ip, { to: maskAddress(to) });
        });
      return { sent_to: maskAddress(to), expires_at: new Date(expiresAt).toISOString() };
    });
  }

  /** One send in flight per user: a second request while one is checked or sent is refused, not raced. */
  private async oneSendAtATime<T>(user: string, fn: () => Promise<T>): Promise<T> {
    if (this.sending.has(user)) throw new MfaError('rate-limited', 'a code is being sent');
    this.sending.add(user);
    try {
      return await fn();
    } finally {
      this.sending.delete(user);
    }
  }

  /** One mail a minute and five an hour per user (login codes and confirmation codes counted apart). */
  private async checkSendLimits(user: string, purpose: 'login' | 'verify', now: number): Promise<void> {
    const last = await this.mfa.lastLoginCodeAt(user, purpose);
    if (last !== undefined && last > now - 60_000) throw new MfaError('rate-limited', 'a code was sent less than a minute ago: check your mailbox, or wait a minute', last + 60_000 - now);
    if ((await this.mfa.loginCodesSince(user, now - 3600_000, purpose)) >= 5) throw new MfaError('rate-limited', 'five codes were sent in the last hour: wait, or use another factor', 3600_000);
  }

  private async sendOrFail(mail: { to: string; subject: string; text: string }): Promise<void> {
    try {
      await this.d.mailer().send(mail);
    } catch (e) {
      // The server's reply may quote the recipient: mask addresses in the log line.
      const text = (e instanceof Error ? e.message : String(e)).replace(/[^\s<>"',;:]+@[^\s<>"',;:]+/g, (a) => maskAddress(a));
      this.d.logger.log('error', 'mail-failed', { error: text });
      throw new MfaError('mail-failed', e instanceof MailError ? 'the mail server did not accept the message: try again later' : undefined);
    }
  }

  // ---- backup codes ----------------------------------------------------------------------------------------

  async backupGenerate(user: string, ip: string, rawProof: unknown): Promise<{ codes: string[] }> {
    const now = this.clock();
    if (!(await this.hasFactor(user))) throw new MfaError('no-factor', 'register the app or an external address first');
    const codes = Array.from({ length: BACKUP_COUNT }, () => {
      let s = '';
      for (let i = 0; i < 10; i++) s += BACKUP_ALPHABET[crypto.randomInt(BACKUP_ALPHABET.length)];
      return `${s.slice(0, 5)}-${s.slice(5)}`;
    });
    await this.changeWithProof(user, ip, rawProof, now, async () => {
      await this.mfa.replaceBackupCodes(user, codes.map((c) => this.d.secrets.hashCode(user, normaliseBackup(c))), now);
      await this.audit('backup-generate', user, ip, { count: codes.length });
    });
    return { codes };
  }

  // ---- enable / disable, own grants ------------------------------------------------------------------------

  async enable(user: string, ip: string): Promise<{ mfa_enabled: true }> {
    if (!(await this.hasFactor(user))) throw new MfaError('no-factor', 'register the app or an external address before enabling MFA');
    await this.d.store.setUserFlag(user, 'mfa_enabled', true, 'api', this.clock(), `from ${ip}`);
    return { mfa_enabled: true };
  }

  async disable(user: string, ip: string, rawProof: unknown): Promise<{ mfa_enabled: false }> {
    const proof = this.parseProof(rawProof);
    if (!proof) throw new MfaError('proof-required');
    const now = this.clock();
    await this.consumeThen(user, ip, proof, now, async () => {
      await this.audit('factor-pass', user, ip, { method: proof.method, for: 'change' });
      await this.d.store.setUserFlag(user, 'mfa_enabled', false, 'api', now, `from ${ip}`);
    });
    return { mfa_enabled: false };
  }

  async grants(user: string): Promise<GrantView[]> {
    return (await this.d.store.listGrants({ user, now: this.clock() })).map((g) => this.grantView(g));
  }

  async revokeGrant(user: string, ip: string, id: number): Promise<GrantView> {
    const g = await this.d.store.grantById(id);
    if (!g || g.user !== user) throw new MfaError('not-registered', 'no such grant for this user');
    const [revoked] = await this.d.store.revokeGrants({ id }, 'api', `revoked by the user from ${ip}`, this.clock());
    if (!revoked) throw new MfaError('conflict', 'the grant is no longer active');
    return this.grantView(revoked);
  }

  // ---- app passcodes --------------------------------------------------------------------------------------

  /**
   * A new app passcode for a device: only with a passed factor (a user without MFA factors has no passcodes).
   * The passcode is in this answer only, grouped for reading ("abcd efgh jkmn pqrs").
   */
  async passcodeCreate(user: string, ip: string, rawProof: unknown, rawName: unknown, rawProtocols: unknown): Promise<{ passcode: PasscodeView; code: string }> {
    // Said before anything else, so that a webmail can tell without spending a code.
    if (!this.config.appPasscodes.enabled) throw new MfaError('conflict', 'app passcodes are not enabled ([app_passcodes] enabled)');
    const { name, protocols } = await this.passcodeCall(() => this.passcodes.parseRequest(rawName, rawProtocols));
    if (!(await this.hasFactor(user))) throw new MfaError('no-factor', 'register the app or an external address (and pass MFA) before making app passcodes');
    const proof = this.parseProof(rawProof);
    if (!proof) throw new MfaError('proof-required');
    const made = await this.passcodes.prepare(user, name, protocols, undefined, 'api').catch(passcodeFailure);
    const now = this.clock();
    const view = await this.consumeThen(user, ip, proof, now, async () => {
      await this.audit('factor-pass', user, ip, { method: proof.method, for: 'passcode' });
      return this.passcodeCall(made.insert);
    });
    this.d.logger.log('info', 'passcode-added', { user, ip, passcode: view.id, name: view.name, protocols: view.protocols.join(',') });
    return { passcode: view, code: groupPasscode(made.passcode) };
  }

  async passcodeList(user: string): Promise<PasscodeView[]> {
    return this.passcodes.list(user);
  }

  /** What a webmail needs to offer passcodes: whether they can be made, how many, for what by default. */
  passcodeSettings(): { enabled: boolean; max_per_user: number; protocols: string[] } {
    const c = this.config.appPasscodes;
    return { enabled: c.enabled, max_per_user: c.maxPerUser, protocols: [...c.protocols] };
  }

  async passcodeRevoke(user: string, ip: string, id: number): Promise<PasscodeView> {
    return this.passcodeCall(() => this.passcodes.revoke(user, id, 'api', `revoked by the user from ${ip}`));
  }

  private async passcodeCall<T>(fn: () => T | Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (e) {
      return passcodeFailure(e);
    }
  }

  // ---- helpdesk --------------------------------------------------------------------------------------------

  /** After a lost phone: removes every factor and backup code, revokes every grant; MFA stays required. */
  async reset(user: string, actor: string, reason: string): Promise<{ grantsRevoked: number; passcodesRevoked: number }> {
    const now = this.clock();
    return this.d.store.tx(async () => {
        if (!(await this.d.store.getUser(user))) throw new MfaError('not-registered', `unknown user "${user}"`);
        await this.mfa.deleteFactors(user);
        await this.mfa.deleteBackupCodes(user);
        await this.mfa.voidCodes(user, 'login', now);
        await this.mfa.voidCodes(user, 'verify', now);
        await this.mfa.clearFailures(user);
        await this.mfa.setLock(user, null, now);
        const revoked = await this.d.store.revokeGrants({ user }, actor, reason || 'factors reset', now);
        // A lost phone (or a changed password) must end every device too.
        const passcodes = await this.passcodes.revokeAll(user, actor, reason || 'factors reset');
        await this.d.store.audit(now, actor, 'user-reset', user, null, null, { reason, grants_revoked: revoked.length, passcodes_revoked: passcodes.length });
        return { grantsRevoked: revoked.length, passcodesRevoked: passcodes.length };
      });
  }

  /** Helpdesk enrolment at the desk: a new confirmed secret, returned once to show as a QR code. */
  async enrollAtDesk(user: string, actor: string): Promise<{ secret: string; uri: string }> {
    const now = this.clock();
    const secret = newSecret();
    await this.d.store.tx(async () => {
        await this.d.store.ensureUser(user, now);
        await this.mfa.updateFactors(user, { totp_secret: this.d.secrets.encrypt(Buffer.from(secret), `totp:${user}`), totp_confirmed_at: now, totp_last_step: null, totp_pending: null, totp_pending_at: null }, now);
        await this.d.store.audit(now, actor, 'totp-register', user, null, null, { at: 'helpdesk desk' });
      });
    return { secret, uri: otpauthUri(this.config.totp.issuer, user, secret) };
  }
}
