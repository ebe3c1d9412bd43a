// Second factors: registering them, checking them, and the grants only a passed factor creates.
// Protocol-free: the webmail API (daemon/api-server.ts), the MFA page and the CLI call this. Every check that must
// not race (a TOTP time step used once, an e-mailed code used once) runs inside one write transaction
// (mfa/factor-core.ts); the external address is mfa/email-factor.ts.
import type { Config } from '../config/config.js';
import { blockPrefixes, policySettings } from '../config/config.js';
import { blockOf, parseAddress } from '../policy/address.js';
import { decide, mfaRequired } from '../policy/decide.js';
import { describeRule } from '../policy/rules.js';
import type { GrantRow } from '../store/records.js';
import crypto from 'node:crypto';
import { EmailFactor } from './email-factor.js';
import { MfaError } from './errors.js';
import { type Deps, FactorCore, type GrantView, maskAddress, normaliseBackup } from './factor-core.js';
import { grantNoticeMail } from './messages.js';
import { matchStep, newSecret, otpauthUri } from './totp.js';
import { PasscodeError, PasscodeService, type PasscodeView, groupPasscode } from './passcodes.js';
import QRCode from 'qrcode';

export { MFA_ERRORS, MfaError, type MfaErrorCode } from './errors.js';
export { type Deps, type GrantView, METHODS, type Method, type Proof, maskAddress } from './factor-core.js';

const BACKUP_ALPHABET = '23456789abcdefghjkmnpqrstuvwxyz';
const BACKUP_COUNT = 10;
const PENDING_TOTP_MS = 15 * 60_000;

/** PasscodeService's errors in the API's catalogue (anything else is rethrown as it is). */
function passcodeFailure(e: unknown): never {
  if (!(e instanceof PasscodeError)) throw e;
  throw new MfaError(e.code === 'not-found' ? 'not-registered' : e.code === 'bad-request' ? 'bad-request' : 'conflict', e.message);
}

export class MfaService {
  private readonly core: FactorCore;
  private readonly email: EmailFactor;
  private readonly d: Deps;
  private readonly clock: () => number;

  /** App passcodes: made here with a passed factor, checked by the policy service. */
  readonly passcodes: PasscodeService;

  constructor(d: Deps) {
    this.d = d;
    this.core = new FactorCore(d);
    this.email = new EmailFactor(this.core);
    this.clock = this.core.clock;
    this.passcodes = d.passcodes ?? new PasscodeService({ store: d.store, config: d.config, logger: d.logger, clock: this.clock });
  }

  private get config(): Config {
    return this.d.config();
  }

  private get mfa() {
    return this.d.store.mfa;
  }

  // ---- input (checked for the API and the page) ---------------------------------------------------------

  user(raw: unknown): string {
    return this.core.user(raw);
  }

  ip(raw: unknown): string {
    return this.core.ip(raw);
  }

  /** The address block an address limit counts under (see FactorCore.limitBlock). */
  limitBlock(ip: string): string {
    return this.core.limitBlock(ip);
  }

  grantView(g: GrantRow): GrantView {
    return this.core.grantView(g);
  }

  // ---- status ----------------------------------------------------------------------------------------------

  async status(user: string, ip?: string) {
    const now = this.clock();
    const u = await this.d.store.getUser(user);
    const f = await this.mfa.factors(user);
    const config = this.config;
    const settings = policySettings(config);
    const lockedUntil = await this.mfa.lockedUntil(user);
    const grants = (await this.d.store.listGrants({ user, now })).map((g) => this.core.grantView(g));
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

  // ---- lockout -------------------------------------------------------------------------------------------

  /** Ends a lock (and forgets the failed attempts); true when the user was locked. */
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

  // ---- verify: the factor that creates a grant -------------------------------------------------------------

  async verify(user: string, ip: string, rawProof: unknown): Promise<GrantView> {
    const proof = this.core.parseProof(rawProof);
    if (!proof) throw new MfaError('bad-request', 'factor: expected {"method": "totp"|"email"|"backup", "code": "..."}');
    const address = parseAddress(ip);
    if (!address) throw new MfaError('bad-request', 'ip: not an IP address');
    const now = this.clock();
    const config = this.config;
    const grant = await this.core.consumeThen(user, ip, proof, now, async () => {
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
      await this.core.audit('factor-pass', user, ip, { method: proof.method }, grant.id);
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
    return this.core.grantView(grant);
  }

  // ---- authenticator app -----------------------------------------------------------------------------------

  async totpBegin(user: string, ip: string, rawProof: unknown): Promise<{ secret: string; uri: string; qr_svg: string }> {
    const now = this.clock();
    const secret = newSecret();
    const uri = otpauthUri(this.config.totp.issuer, user, secret);
    await this.core.changeWithProof(user, ip, rawProof, now, async () => {
      await this.d.store.ensureUser(user, now);
      await this.mfa.updateFactors(user, { totp_pending: this.d.secrets.encrypt(Buffer.from(secret), `totp-pending:${user}`), totp_pending_at: now }, now);
      await this.core.audit('totp-begin', user, ip);
    });
    const qr_svg = await QRCode.toString(uri, { type: 'svg', errorCorrectionLevel: 'M', margin: 2 });
    return { secret, uri, qr_svg };
  }

  async totpConfirm(user: string, ip: string, code: unknown): Promise<{ registered: true }> {
    if (typeof code !== 'string') throw new MfaError('bad-request', 'code: expected the 6-digit code from the app');
    const now = this.clock();
    const err = await this.core.attempt(user, ip, 'totp', () => this.d.store.tx(async (): Promise<MfaError | undefined> => {
      await this.core.checkLimits(user, ip, now);
      const f = await this.mfa.factors(user);
      if (!f?.totpPending || f.totpPendingAt === null || f.totpPendingAt + PENDING_TOTP_MS <= now) {
        throw new MfaError('conflict', 'no app enrolment in progress (or it is older than 15 minutes): begin again');
      }
      const secret = this.d.secrets.decrypt(f.totpPending, `totp-pending:${user}`).toString('utf8');
      const step = matchStep(secret, code.trim(), now);
      if (step === undefined) return await this.core.fail(user, ip, 'totp', now);
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
      await this.core.audit('totp-register', user, ip);
      return undefined;
    }));
    if (err) throw err;
    return { registered: true };
  }

  async totpRemove(user: string, ip: string, rawProof: unknown): Promise<void> {
    const now = this.clock();
    const f = await this.mfa.factors(user);
    if (!f?.totpSecret) throw new MfaError('not-registered');
    await this.core.guardLastFactor(user, f.email === null);
    await this.core.changeWithProof(user, ip, rawProof, now, async () => {
      await this.mfa.updateFactors(user, { totp_secret: null, totp_confirmed_at: null, totp_last_step: null, totp_pending: null, totp_pending_at: null }, now);
      await this.core.audit('totp-remove', user, ip);
    });
  }

  // ---- external e-mail address (mfa/email-factor.ts) -----------------------------------------------------

  /** Registers (or changes) the external address: sends a code there; it counts once confirmed. */
  emailRegister(user: string, ip: string, rawAddress: unknown, rawProof: unknown): Promise<{ pending: string; expires_at: string }> {
    return this.email.register(user, ip, rawAddress, rawProof);
  }

  emailConfirm(user: string, ip: string, code: unknown): Promise<{ address: string }> {
    return this.email.confirm(user, ip, code);
  }

  emailRemove(user: string, ip: string, rawProof: unknown): Promise<void> {
    return this.email.remove(user, ip, rawProof);
  }

  /** Sends a login code to the registered address: one a minute, five an hour, the newest voids the older. */
  sendLoginCode(user: string, ip: string): Promise<{ sent_to: string; expires_at: string }> {
    return this.email.sendLoginCode(user, ip);
  }

  // ---- backup codes ----------------------------------------------------------------------------------------

  async backupGenerate(user: string, ip: string, rawProof: unknown): Promise<{ codes: string[] }> {
    const now = this.clock();
    if (!(await this.core.hasFactor(user))) throw new MfaError('no-factor', 'register the app or an external address first');
    const codes = Array.from({ length: BACKUP_COUNT }, () => {
      let s = '';
      for (let i = 0; i < 10; i++) s += BACKUP_ALPHABET[crypto.randomInt(BACKUP_ALPHABET.length)];
      return `${s.slice(0, 5)}-${s.slice(5)}`;
    });
    await this.core.changeWithProof(user, ip, rawProof, now, async () => {
      await this.mfa.replaceBackupCodes(user, codes.map((c) => this.d.secrets.hashCode(user, normaliseBackup(c))), now);
      await this.core.audit('backup-generate', user, ip, { count: codes.length });
    });
    return { codes };
  }

  // ---- enable / disable, own grants ------------------------------------------------------------------------

  async enable(user: string, ip: string): Promise<{ mfa_enabled: true }> {
    if (!(await this.core.hasFactor(user))) throw new MfaError('no-factor', 'register the app or an external address before enabling MFA');
    await this.d.store.setUserFlag(user, 'mfa_enabled', true, 'api', this.clock(), `from ${ip}`);
    return { mfa_enabled: true };
  }

  async disable(user: string, ip: string, rawProof: unknown): Promise<{ mfa_enabled: false }> {
    const proof = this.core.parseProof(rawProof);
    if (!proof) throw new MfaError('proof-required');
    const now = this.clock();
    await this.core.consumeThen(user, ip, proof, now, async () => {
      await this.core.audit('factor-pass', user, ip, { method: proof.method, for: 'change' });
      await this.d.store.setUserFlag(user, 'mfa_enabled', false, 'api', now, `from ${ip}`);
    });
    return { mfa_enabled: false };
  }

  async grants(user: string): Promise<GrantView[]> {
    return (await this.d.store.listGrants({ user, now: this.clock() })).map((g) => this.core.grantView(g));
  }

  async revokeGrant(user: string, ip: string, id: number): Promise<GrantView> {
    const g = await this.d.store.grantById(id);
    if (!g || g.user !== user) throw new MfaError('not-registered', 'no such grant for this user');
    const [revoked] = await this.d.store.revokeGrants({ id }, 'api', `revoked by the user from ${ip}`, this.clock());
    if (!revoked) throw new MfaError('conflict', 'the grant is no longer active');
    return this.core.grantView(revoked);
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
    if (!(await this.core.hasFactor(user))) throw new MfaError('no-factor', 'register the app or an external address (and pass MFA) before making app passcodes');
    const proof = this.core.parseProof(rawProof);
    if (!proof) throw new MfaError('proof-required');
    const made = await this.passcodes.prepare(user, name, protocols, undefined, 'api').catch(passcodeFailure);
    const now = this.clock();
    const view = await this.core.consumeThen(user, ip, proof, now, async () => {
      await this.core.audit('factor-pass', user, ip, { method: proof.method, for: 'passcode' });
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
