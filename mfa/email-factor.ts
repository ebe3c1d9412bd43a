// The external e-mail address as a second factor: registering it (a code sent there proves it), login codes
// sent to it, and the send limits (one a minute, five an hour, one in flight per user).
import { MailError } from './mailer.js';
import { MfaError } from './errors.js';
import { type FactorCore, maskAddress, randomCode } from './factor-core.js';
import { addressChangedMail, loginCodeMail, verifyAddressMail } from './messages.js';

export class EmailFactor {
  /** Users with a send in flight: one at a time per user, so the send limits cannot be raced. */
  private readonly sending = new Set<string>();

  constructor(private readonly core: FactorCore) {}

  private checkAddress(raw: unknown): string {
    if (typeof raw !== 'string' || !/^[^\s@<>",;]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}$/.test(raw.trim()) || raw.length > 254) {
      throw new MfaError('bad-request', 'address: expected a mail address such as "alice@example.com"');
    }
    const address = raw.trim();
    const domain = address.slice(address.lastIndexOf('@') + 1).toLowerCase();
    const refused = this.core.config.otp.refusedEmailDomains;
    if (refused.some((d) => domain === d || domain.endsWith(`.${d}`))) throw new MfaError('refused-domain', `addresses in ${domain} cannot be used: use a private address outside the university`);
    return address;
  }

  /** Registers (or changes) the external address: sends a code there; it counts once confirmed. */
  async register(user: string, ip: string, rawAddress: unknown, rawProof: unknown): Promise<{ pending: string; expires_at: string }> {
    const address = this.checkAddress(rawAddress);
    const now = this.core.clock();
    const f = await this.core.mfa.factors(user);
    if (f?.email && f.email.toLowerCase() === address.toLowerCase()) throw new MfaError('conflict', 'that address is already registered');
    return this.oneSendAtATime(user, async () => {
      // Confirmation mails have the same send limits as login codes (counted apart), checked before the proof is used.
      await this.checkSendLimits(user, 'verify', now);
      await this.core.requireProofIfRegistered(user, ip, rawProof, now);
      const code = randomCode(this.core.config.otp.digits);
      const expiresAt = now + this.core.config.otp.ttlMs;
      const mail = verifyAddressMail({ user, code, expiresAt, ip, at: now, minutes: Math.round(this.core.config.otp.ttlMs / 60_000) });
      await this.sendOrFail({ to: address, ...mail });
      await this.core.d.store.tx(async () => {
        await this.core.d.store.ensureUser(user, now);
        await this.core.mfa.updateFactors(user, { email_pending: address }, now);
        await this.core.mfa.addCode(user, 'verify', address, this.core.d.secrets.hashCode(user, code), ip, now, expiresAt);
        await this.core.audit('email-register', user, ip, { address: maskAddress(address) });
      });
      return { pending: maskAddress(address), expires_at: new Date(expiresAt).toISOString() };
    });
  }

  async confirm(user: string, ip: string, code: unknown): Promise<{ address: string }> {
    if (typeof code !== 'string') throw new MfaError('bad-request', 'code: expected the code sent to the address');
    const now = this.core.clock();
    let old: string | null = null;
    let address = '';
    const err = await this.core.attempt(user, ip, 'email-verify', () => this.core.d.store.tx(async (): Promise<MfaError | undefined> => {
      await this.core.checkLimits(user, ip, now);
      const f = await this.core.mfa.factors(user);
      const c = await this.core.mfa.latestCode(user, 'verify', now);
      if (!f?.emailPending || !c || c.address !== f.emailPending) throw new MfaError('conflict', 'no address is waiting for confirmation (or its code expired): register it again');
      if (!this.core.d.secrets.sameHash(c.codeHash, this.core.d.secrets.hashCode(user, code.trim())) || !(await this.core.mfa.useCode(c.id, now))) {
        return await this.core.fail(user, ip, 'email-verify', now);
      }
      old = f.email;
      address = f.emailPending;
      await this.core.mfa.updateFactors(user, { email: address, email_verified_at: now, email_pending: null }, now);
      // Codes sent to the old address are void.
      await this.core.mfa.voidCodes(user, 'login', now);
      await this.core.mfa.clearFailures(user);
      await this.core.audit(old ? 'email-change' : 'email-verified', user, ip, { address: maskAddress(address) });
      return undefined;
    }));
    if (err) throw err;
    if (old !== null && old !== address) {
      const mail = addressChangedMail({ user, newAddress: maskAddress(address), ip, at: now });
      this.core.d.mailer().send({ to: old, ...mail }).catch((e: unknown) => {
        this.core.d.logger.log('warn', 'notice-not-sent', { user, error: e instanceof Error ? e.message : String(e) });
      });
    }
    return { address: maskAddress(address) };
  }

  async remove(user: string, ip: string, rawProof: unknown): Promise<void> {
    const now = this.core.clock();
    const f = await this.core.mfa.factors(user);
    if (!f?.email && !f?.emailPending) throw new MfaError('not-registered');
    await this.core.guardLastFactor(user, f.email !== null && f.totpSecret === null);
    await this.core.changeWithProof(user, ip, rawProof, now, async () => {
      await this.core.mfa.updateFactors(user, { email: null, email_verified_at: null, email_pending: null }, now);
      await this.core.mfa.voidCodes(user, 'login', now);
      await this.core.mfa.voidCodes(user, 'verify', now);
      await this.core.audit('email-remove', user, ip);
    });
  }

  /** Sends a login code to the registered address: one a minute, five an hour, the newest voids the older. */
  async sendLoginCode(user: string, ip: string): Promise<{ sent_to: string; expires_at: string }> {
    const now = this.core.clock();
    const f = await this.core.mfa.factors(user);
    const to = f?.email;
    if (!to) throw new MfaError('not-registered', 'no external address is registered');
    return this.oneSendAtATime(user, async () => {
      await this.core.checkLimits(user, ip, now);
      await this.checkSendLimits(user, 'login', now);
      const code = randomCode(this.core.config.otp.digits);
      const expiresAt = now + this.core.config.otp.ttlMs;
      const mail = loginCodeMail({ user, code, expiresAt, ip, at: now, minutes: Math.round(this.core.config.otp.ttlMs / 60_000) });
      await this.sendOrFail({ to, ...mail });
      await this.core.d.store.tx(async () => {
        await this.core.mfa.addCode(user, 'login', to, this.core.d.secrets.hashCode(user, code), ip, now, expiresAt);
        await this.core.audit('email-code-sent', user, ip, { to: maskAddress(to) });
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
    const last = await this.core.mfa.lastLoginCodeAt(user, purpose);
    if (last !== undefined && last > now - 60_000) throw new MfaError('rate-limited', 'a code was sent less than a minute ago: check your mailbox, or wait a minute', last + 60_000 - now);
    if ((await this.core.mfa.loginCodesSince(user, now - 3600_000, purpose)) >= 5) throw new MfaError('rate-limited', 'five codes were sent in the last hour: wait, or use another factor', 3600_000);
  }

  private async sendOrFail(mail: { to: string; subject: string; text: string }): Promise<void> {
    try {
      await this.core.d.mailer().send(mail);
    } catch (e) {
      // The server's reply may quote the recipient: mask addresses in the log line.
      const text = (e instanceof Error ? e.message : String(e)).replace(/[^\s<>"',;:]+@[^\s<>"',;:]+/g, (a) => maskAddress(a));
      this.core.d.logger.log('error', 'mail-failed', { error: text });
      throw new MfaError('mail-failed', e instanceof MailError ? 'the mail server did not accept the message: try again later' : undefined);
    }
  }
}
