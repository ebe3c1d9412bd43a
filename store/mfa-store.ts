// The second-factor tables (migration 2): factors, e-mailed codes, backup codes, failures and locks.
// Statements are prepared once; the MFA service wraps multi-step changes in BEGIN IMMEDIATE transactions.
import type Database from 'better-sqlite3';

type Row = Record<string, unknown>;

export interface FactorRow {
  user: string;
  totpSecret: Buffer | null;
  totpPending: Buffer | null;
  totpPendingAt: number | null;
  totpConfirmedAt: number | null;
  totpLastStep: number | null;
  email: string | null;
  emailVerifiedAt: number | null;
  emailPending: string | null;
}

export interface EmailCodeRow {
  id: number;
  user: string;
  purpose: 'login' | 'verify';
  address: string;
  codeHash: string;
  createdAt: number;
  expiresAt: number;
}

const factorFromRow = (r: Row): FactorRow => ({
  user: r['user'] as string,
  totpSecret: (r['totp_secret'] as Buffer | null) ?? null,
  totpPending: (r['totp_pending'] as Buffer | null) ?? null,
  totpPendingAt: (r['totp_pending_at'] as number | null) ?? null,
  totpConfirmedAt: (r['totp_confirmed_at'] as number | null) ?? null,
  totpLastStep: (r['totp_last_step'] as number | null) ?? null,
  email: (r['email'] as string | null) ?? null,
  emailVerifiedAt: (r['email_verified_at'] as number | null) ?? null,
  emailPending: (r['email_pending'] as string | null) ?? null,
});

export type FactorUpdate = Partial<{
  totp_secret: Buffer | null;
  totp_pending: Buffer | null;
  totp_pending_at: number | null;
  totp_confirmed_at: number | null;
  totp_last_step: number | null;
  email: string | null;
  email_verified_at: number | null;
  email_pending: string | null;
}>;

const FACTOR_COLUMNS = ['totp_secret', 'totp_pending', 'totp_pending_at', 'totp_confirmed_at', 'totp_last_step', 'email', 'email_verified_at', 'email_pending'] as const;

export class MfaStore {
  private readonly st;

  constructor(readonly db: Database.Database) {
    this.st = {
      factors: db.prepare('SELECT * FROM factors WHERE user = ?'),
      ensureFactors: db.prepare('INSERT INTO factors (user, updated_at) VALUES (?, ?) ON CONFLICT (user) DO NOTHING'),
      // One statement for every update: unchanged columns are passed their current values.
      updateFactors: db.prepare(
        `UPDATE factors SET ${FACTOR_COLUMNS.map((c) => `${c} = @${c}`).join(', ')}, updated_at = @updated_at WHERE user = @user`,
      ),
      deleteFactors: db.prepare('DELETE FROM factors WHERE user = ?'),
      insertCode: db.prepare(
        'INSERT INTO email_codes (user, purpose, address, code_hash, ip, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)',
      ),
      voidCodes: db.prepare('UPDATE email_codes SET voided_at = ? WHERE user = ? AND purpose = ? AND used_at IS NULL AND voided_at IS NULL'),
      latestCode: db.prepare(
        `SELECT * FROM email_codes WHERE user = ? AND purpose = ? AND used_at IS NULL AND voided_at IS NULL AND expires_at > ?
         ORDER BY id DESC LIMIT 1`,
      ),
      useCode: db.prepare('UPDATE email_codes SET used_at = ? WHERE id = ? AND used_at IS NULL'),
      codesSince: db.prepare('SELECT count(*) AS n FROM email_codes WHERE user = ? AND purpose = ? AND created_at > ?'),
      lastCodeAt: db.prepare('SELECT max(created_at) AS at FROM email_codes WHERE user = ? AND purpose = ?'),
      deleteBackup: db.prepare('DELETE FROM backup_codes WHERE user = ?'),
      insertBackup: db.prepare('INSERT INTO backup_codes (user, code_hash, created_at) VALUES (?, ?, ?)'),
      backupLeft: db.prepare('SELECT count(*) AS n FROM backup_codes WHERE user = ? AND used_at IS NULL'),
      useBackup: db.prepare('UPDATE backup_codes SET used_at = ? WHERE user = ? AND code_hash = ? AND used_at IS NULL'),
      insertFailure: db.prepare('INSERT INTO failures (user, ip, block, method, at) VALUES (?, ?, ?, ?, ?)'),
      failuresOfUser: db.prepare('SELECT count(*) AS n FROM failures WHERE user = ? AND at > ?'),
      failuresOfBlock: db.prepare('SELECT count(*) AS n FROM failures WHERE block = ? AND at > ?'),
      clearFailures: db.prepare('DELETE FROM failures WHERE user = ?'),
      purgeFailures: db.prepare('DELETE FROM failures WHERE at <= ?'),
      lockedUntil: db.prepare('SELECT locked_until FROM users WHERE name = ?'),
      sealed: db.prepare(
        `SELECT EXISTS (SELECT 1 FROM factors WHERE totp_secret IS NOT NULL OR totp_pending IS NOT NULL)
             OR EXISTS (SELECT 1 FROM backup_codes) AS sealed`,
      ),
      sampleTotp: db.prepare('SELECT user, totp_secret FROM factors WHERE totp_secret IS NOT NULL LIMIT 1'),
      setLock: db.prepare('UPDATE users SET locked_until = ?, updated_at = ? WHERE name = ?'),
    };
  }

  factors(user: string): FactorRow | undefined {
    const r = this.st.factors.get(user) as Row | undefined;
    return r ? factorFromRow(r) : undefined;
  }

  updateFactors(user: string, change: FactorUpdate, now: number): FactorRow {
    this.st.ensureFactors.run(user, now);
    const current = this.st.factors.get(user) as Row;
    const params: Record<string, unknown> = { user, updated_at: now };
    for (const c of FACTOR_COLUMNS) params[c] = c in change ? change[c] : current[c];
    this.st.updateFactors.run(params);
    return factorFromRow(this.st.factors.get(user) as Row);
  }

  deleteFactors(user: string): void {
    this.st.deleteFactors.run(user);
  }

  addCode(user: string, purpose: 'login' | 'verify', address: string, codeHash: string, ip: string | null, now: number, expiresAt: number): void {
    // A newer code voids the older ones of the same purpose.
    this.st.voidCodes.run(now, user, purpose);
    this.st.insertCode.run(user, purpose, address, codeHash, ip, now, expiresAt);
  }

  voidCodes(user: string, purpose: 'login' | 'verify', now: number): void {
    this.st.voidCodes.run(now, user, purpose);
  }

  latestCode(user: string, purpose: 'login' | 'verify', now: number): EmailCodeRow | undefined {
    const r = this.st.latestCode.get(user, purpose, now) as Row | undefined;
    if (!r) return undefined;
    return {
      id: r['id'] as number,
      user: r['user'] as string,
      purpose: r['purpose'] as 'login' | 'verify',
      address: r['address'] as string,
      codeHash: r['code_hash'] as string,
      createdAt: r['created_at'] as number,
      expiresAt: r['expires_at'] as number,
    };
  }

  useCode(id: number, now: number): boolean {
    return this.st.useCode.run(now, id).changes === 1;
  }

  /** Codes sent since `since` (login codes unless another purpose is named): the send limits. */
  loginCodesSince(user: string, since: number, purpose: 'login' | 'verify' = 'login'): number {
    return (this.st.codesSince.get(user, purpose, since) as { n: number }).n;
  }

  lastLoginCodeAt(user: string, purpose: 'login' | 'verify' = 'login'): number | undefined {
    return ((this.st.lastCodeAt.get(user, purpose) as { at: number | null }).at ?? undefined) as number | undefined;
  }

  replaceBackupCodes(user: string, hashes: string[], now: number): void {
    this.st.deleteBackup.run(user);
    for (const h of hashes) this.st.insertBackup.run(user, h, now);
  }

  deleteBackupCodes(user: string): void {
    this.st.deleteBackup.run(user);
  }

  backupCodesLeft(user: string): number {
    return (this.st.backupLeft.get(user) as { n: number }).n;
  }

  useBackupCode(user: string, hash: string, now: number): boolean {
    return this.st.useBackup.run(now, user, hash).changes === 1;
  }

  /** A failed attempt from `ip`, counted for the address limit under its `block` (see policy/address.ts blockOf). */
  addFailure(user: string, ip: string, block: string, method: string, now: number): void {
    this.st.insertFailure.run(user, ip, block, method, now);
  }

  failuresOfUser(user: string, since: number): number {
    return (this.st.failuresOfUser.get(user, since) as { n: number }).n;
  }

  failuresOfBlock(block: string, since: number): number {
    return (this.st.failuresOfBlock.get(block, since) as { n: number }).n;
  }

  clearFailures(user: string): void {
    this.st.clearFailures.run(user);
  }

  purgeFailures(before: number): void {
    this.st.purgeFailures.run(before);
  }

  /** Whether anything in the store was sealed or hashed with the secrets key (a new key would void it). */
  holdsSealedSecrets(): boolean {
    return (this.st.sealed.get() as { sealed: number }).sealed === 1;
  }

  /** One sealed TOTP secret, to check that a key file is the one the store was written with. */
  sampleTotpSecret(): { user: string; sealed: Buffer } | undefined {
    const r = this.st.sampleTotp.get() as { user: string; totp_secret: Buffer } | undefined;
    return r ? { user: r.user, sealed: r.totp_secret } : undefined;
  }

  lockedUntil(user: string): number | undefined {
    const r = this.st.lockedUntil.get(user) as { locked_until: number | null } | undefined;
    return r?.locked_until ?? undefined;
  }

  setLock(user: string, until: number | null, now: number): void {
    this.st.setLock.run(until, now, user);
  }
}
