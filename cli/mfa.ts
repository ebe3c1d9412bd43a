// The CLI's side of second factors: the MfaService built as the daemon builds it, the secrets key loaded only by
// the commands that seal or open a secret, and the per-user view `users show` and `users reset` print.
import type { Config } from '../config/config.js';
import { createLogger } from '../daemon/log.js';
import { createMailer } from '../mfa/mailer.js';
import { type Secrets, openSecrets } from '../mfa/secrets.js';
import { MfaService, maskAddress } from '../mfa/service.js';
import type { Store } from '../store/store.js';

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

export function factorsOf(store: Store, user: string): FactorsView {
  const f = store.mfa.factors(user);
  return {
    totp: f?.totpSecret != null,
    totp_since: f?.totpSecret != null ? iso(f.totpConfirmedAt) : null,
    totp_pending_since: f?.totpPending != null ? iso(f.totpPendingAt) : null,
    email: f?.email ? maskAddress(f.email) : null,
    email_since: f?.email ? iso(f.emailVerifiedAt) : null,
    email_pending: f?.emailPending ? maskAddress(f.emailPending) : null,
    backup_codes_left: store.mfa.backupCodesLeft(user),
  };
}

export function lockOf(store: Store, config: Config, user: string, now: number): LockView {
  const until = store.mfa.lockedUntil(user);
  return {
    locked_until: until !== undefined && until > now ? iso(until) : null,
    recent_failures: store.mfa.failuresOfUser(user, now - config.lockout.windowMs),
  };
}

export function hasFactor(f: FactorsView): boolean {
  return f.totp || f.email !== null;
}

/**
 * The service over an open store, as the daemon builds it. Without `loaded`, the secrets key is read on first
 * use only: `users reset` and `users unlock` never touch it. `totp enroll` passes the key it loaded (and
 * checked) with openSecrets before anything changes.
 */
export function mfaService(config: Config, store: Store, loaded?: Secrets): MfaService {
  let secrets: Secrets | undefined = loaded;
  const get = (): Secrets => (secrets ??= openSecrets(config.secrets.keyFile, store));
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
