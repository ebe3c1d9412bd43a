// The CLI's side of second factors: the MfaService built as the daemon builds it, the secrets key loaded only by
// the commands that seal or open a secret, and the per-user view `users show` and `users reset` print.
import type { Config } from '../config/config.js';
import { createLogger } from '../daemon/log.js';
import { createMailer } from '../mfa/mailer.js';
import type { Secrets } from '../mfa/secrets.js';
import { MfaService, maskAddress } from '../mfa/service.js';
import type { Records } from '../store/records.js';

/** What the store holds about one user's second factors and lock, as `users show` and `users reset` print it. */
export interface FactorsView {
  totp: boolean;
  totp_since: string | null;
  /** An app enrolment begun in webmail and not (yet) confirmed with a first code. */
  totp_pending_since: string | null;
  email: string | null;
  email_since: string | null;
  email_pending: string | null;
  backup_codes_left: number;
}

export interface LockView {
  locked_until: string | null;
  /** Failed codes within [lockout] window. */
  recent_failures: number;
}

const iso = (ms: number | null | undefined): string | null => (ms === null || ms === undefined ? null : new Date(ms).toISOString());

export async function factorsOf(store: Records, user: string): Promise<FactorsView> {
  const f = await store.mfa.factors(user);
  return {
    totp: f?.totpSecret != null,
    totp_since: f?.totpSecret != null ? iso(f.totpConfirmedAt) : null,
    totp_pending_since: f?.totpPending != null ? iso(f.totpPendingAt) : null,
    email: f?.email ? maskAddress(f.email) : null,
    email_since: f?.email ? iso(f.emailVerifiedAt) : null,
    email_pending: f?.emailPending ? maskAddress(f.emailPending) : null,
    backup_codes_left: await store.mfa.backupCodesLeft(user),
  };
}

export async function lockOf(store: Records, config: Config, user: string, now: number): Promise<LockView> {
  const until = await store.mfa.lockedUntil(user);
  return {
    locked_until: until !== undefined && until > now ? iso(until) : null,
    recent_failures: await store.mfa.failuresOfUser(user, now - config.lockout.windowMs),
  };
}

export function hasFactor(f: FactorsView): boolean {
  return f.totp || f.email !== null;
}

/**
 * The service over an open store, as the daemon builds it. Only the commands that seal or open a secret
 * (`totp enroll`) pass the key, loaded and checked with openSecrets before anything changes: `users reset` and
 * `users unlock` work without the key file, and a service without it refuses to seal or open anything.
 */
export function mfaService(config: Config, store: Records, loaded?: Secrets): MfaService {
  const get = (): Secrets => {
    if (!loaded) throw new Error('this command does not load the secrets key');
    return loaded;
  };
  return new MfaService({
    store,
    config: () => config,
    secrets: {
      encrypt: (plain, context) => get().encrypt(plain, context),
      decrypt: (sealed, context) => get().decrypt(sealed, context),
      hashCode: (user, code) => get().hashCode(user, code),
      sameHash: (a, b) => get().sameHash(a, b),
    },
    mailer: () => createMailer(config.mail.smtp, config.mail.from),
    // The service logs only what the daemon would (a lock, a failed notice): to stderr, warnings and worse.
    logger: createLogger('warn', { write: (line) => process.stderr.write(line) }),
  });
}
