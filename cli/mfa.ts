// The CLI's side of second factors: the MfaService built as the daemon builds it, the secrets key loaded only by
// the commands that seal or open a secret, and the per-user view `users show` and `users reset` print.
import fs from 'node:fs';
import path from 'node:path';
import type { Config } from '../config/config.js';
import { createLogger } from '../daemon/log.js';
import { createMailer } from '../mfa/mailer.js';
import { type Secrets, SecretsError, createSecrets, loadOrCreateKey } from '../mfa/secrets.js';
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
 * checked) with loadSecrets before anything changes.
 */
export function mfaService(config: Config, store: Store, loaded?: Secrets): MfaService {
  let secrets: Secrets | undefined = loaded;
  const get = (): Secrets => (secrets ??= loadSecrets(config, store));
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

/**
 * Loads the secrets key as the daemon does (creating it when missing), but refuses a key that cannot be the
 * right one: a missing key file while the store already holds sealed secrets (a new key would make every app
 * registration and backup code useless), or a key that does not open the secrets in the store (a wrong
 * [secrets] key_file). An enrolment made with the wrong key would fail at the daemon.
 */
export function loadSecrets(config: Config, store: Store): Secrets {
  const file = config.secrets.keyFile;
  const existed = fs.existsSync(file);
  if (!existed && holdsSealedSecrets(store)) {
    throw new SecretsError(
      `the key file ${file} ([secrets] key_file) does not exist, but the store holds app registrations or backup codes ` +
        'made with a key: restore the key file from the backup of the store, or correct [secrets] key_file. Refusing to create a new key.',
    );
  }
  const key = loadOrCreateKey(file);
  if (!existed) keepKeyOwner(file, config.store.path);
  const secrets = createSecrets(key);
  const sample = store.db.prepare('SELECT user, totp_secret FROM factors WHERE totp_secret IS NOT NULL LIMIT 1').get() as
    | { user: string; totp_secret: Buffer }
    | undefined;
  if (sample) {
    try {
      secrets.decrypt(sample.totp_secret, `totp:${sample.user}`);
    } catch {
      throw new SecretsError(
        `the key file ${file} ([secrets] key_file) does not open the app registrations in the store ${config.store.path}: ` +
          'is it the file the daemon uses? Refusing to enrol with it.',
      );
    }
  }
  return secrets;
}

function holdsSealedSecrets(store: Store): boolean {
  return (
    store.db
      .prepare(
        `SELECT EXISTS (SELECT 1 FROM factors WHERE totp_secret IS NOT NULL OR totp_pending IS NOT NULL)
             OR EXISTS (SELECT 1 FROM backup_codes) AS sealed`,
      )
      .get() as { sealed: number }
  ).sealed === 1;
}

/**
 * Root running the CLI creates a key file owned by root, which the daemon (its own user) could not read. Give a
 * new key file the owner of its directory, or else of the store (as the store does for its own files).
 */
function keepKeyOwner(file: string, storePath: string): void {
  if (process.getuid?.() !== 0) return;
  for (const candidate of [path.dirname(file), storePath, path.dirname(storePath)]) {
    try {
      const st = fs.statSync(candidate);
      if (st.uid === 0) continue;
      fs.chownSync(file, st.uid, st.gid);
      return;
    } catch {
      /* not there: try the next */
    }
  }
}
