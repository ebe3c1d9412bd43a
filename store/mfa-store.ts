// The second-factor tables (migration 2): factors, e-mailed codes, backup codes, failures and locks, on either
// backend (store/sql.ts). The MFA service wraps multi-step changes in one write transaction.
import { type Row, type Sql, nullable, num } from './sql.js';

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
  totpPendingAt: nullable(r['totp_pending_at']),
  totpConfirmedAt: nullable(r['totp_confirmed_at']),
  totpLastStep: nullable(r['totp_last_step']),
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
  constructor(readonly sql: Sql) {}

  async factors(user: string): Promise<FactorRow | undefined> {
    const r = await this.sql.get('SELECT * FROM factors WHERE "user" = ?', [user]);
    return r ? factorFromRow(r) : undefined;
  }

  async updateFactors(user: string, change: FactorUpdate, now: number): Promise<FactorRow> {
    return this.sql.tx(async () => {
      await this.sql.run('INSERT INTO factors ("user", updated_at) VALUES (?, ?) ON CONFLICT ("user") DO NOTHING', [user, now]);
      const current = (await this.sql.get('SELECT * FROM factors WHERE "user" = ?', [user])) as Row;
      // One statement for every update: unchanged columns are given their current values.
      const values = FACTOR_COLUMNS.map((c) => (c in change ? change[c] : current[c]) as Buffer | string | number | null);
      await this.sql.run(`UPDATE factors SET ${FACTOR_COLUMNS.map((c) => `${c} = ?`).join(', ')}, updated_at = ? WHERE "user" = ?`, [...values, now, user]);
      return factorFromRow((await this.sql.get('SELECT * FROM factors WHERE "user" = ?', [user])) as Row);
    });
  }

  async deleteFactors(user: string): Promise<void> {
    await this.sql.run('DELETE FROM factors WHERE "user" = ?', [user]);
  }

  async addCode(user: string, purpose: 'login' | 'verify', address: string, codeHash: string, ip: string | null, now: number, expiresAt: number): Promise<void> {
    await this.sql.tx(async () => {
      // A newer code voids the older ones of the same purpose.
      await this.voidCodes(user, purpose, now);
      await this.sql.run(
        'INSERT INTO email_codes ("user", purpose, address, code_hash, ip, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)',
        [user, purpose, address, codeHash, ip, now, expiresAt],
      );
    });
  }

  async voidCodes(user: string, purpose: 'login' | 'verify', now: number): Promise<void> {
    await this.sql.run('UPDATE email_codes SET voided_at = ? WHERE "user" = ? AND purpose = ? AND used_at IS NULL AND voided_at IS NULL', [now, user, purpose]);
  }

  async latestCode(user: string, purpose: 'login' | 'verify', now: number): Promise<EmailCodeRow | undefined> {
    const r = await this.sql.get(
      `SELECT * FROM email_codes WHERE "user" = ? AND purpose = ? AND used_at IS NULL AND voided_at IS NULL AND expires_at > ?
       ORDER BY id DESC LIMIT 1`,
      [user, purpose, now],
    );
    if (!r) return undefined;
    return {
      id: num(r, 'id'),
      user: r['user'] as string,
      purpose: r['purpose'] as 'login' | 'verify',
      address: r['address'] as string,
      codeHash: r['code_hash'] as string,
      createdAt: num(r, 'created_at'),
      expiresAt: num(r, 'expires_at'),
    };
  }

  async useCode(id: number, now: number): Promise<boolean> {
    return (await this.sql.run('UPDATE email_codes SET used_at = ? WHERE id = ? AND used_at IS NULL', [now, id])) === 1;
  }

  /** Codes sent since `since` (login codes unless another purpose is named): the send limits. */
  async loginCodesSince(user: string, since: number, purpose: 'login' | 'verify' = 'login'): Promise<number> {
    return num(await this.sql.get('SELECT count(*) AS n FROM email_codes WHERE "user" = ? AND purpose = ? AND created_at > ?', [user, purpose, since]), 'n');
  }

  async lastLoginCodeAt(user: string, purpose: 'login' | 'verify' = 'login'): Promise<number | undefined> {
    const at = (await this.sql.get('SELECT max(created_at) AS at FROM email_codes WHERE "user" = ? AND purpose = ?', [user, purpose]))?.['at'];
    return at === null || at === undefined ? undefined : Number(at);
  }

  async replaceBackupCodes(user: string, hashes: string[], now: number): Promise<void> {
    await this.sql.tx(async () => {
      await this.deleteBackupCodes(user);
      for (const h of hashes) await this.sql.run('INSERT INTO backup_codes ("user", code_hash, created_at) VALUES (?, ?, ?)', [user, h, now]);
    });
  }

  async deleteBackupCodes(user: string): Promise<void> {
    await this.sql.run('DELETE FROM backup_codes WHERE "user" = ?', [user]);
  }

  async backupCodesLeft(user: string): Promise<number> {
    return num(await this.sql.get('SELECT count(*) AS n FROM backup_codes WHERE "user" = ? AND used_at IS NULL', [user]), 'n');
  }

  async useBackupCode(user: string, hash: string, now: number): Promise<boolean> {
    return (await this.sql.run('UPDATE backup_codes SET used_at = ? WHERE "user" = ? AND code_hash = ? AND used_at IS NULL', [now, user, hash])) === 1;
  }

  /** A failed attempt from `ip`, counted for the address limit under its `block` (see policy/address.ts blockOf). */
  async addFailure(user: string, ip: string, block: string, method: string, now: number): Promise<void> {
    await this.sql.run('INSERT INTO failures ("user", ip, block, method, at) VALUES (?, ?, ?, ?, ?)', [user, ip, block, method, now]);
  }

  async failuresOfUser(user: string, since: number): Promise<number> {
    return num(await this.sql.get('SELECT count(*) AS n FROM failures WHERE "user" = ? AND at > ?', [user, since]), 'n');
  }

  async failuresOfBlock(block: string, since: number): Promise<number> {
    return num(await this.sql.get('SELECT count(*) AS n FROM failures WHERE block = ? AND at > ?', [block, since]), 'n');
  }

  async clearFailures(user: string): Promise<void> {
    await this.sql.run('DELETE FROM failures WHERE "user" = ?', [user]);
  }

  async purgeFailures(before: number): Promise<void> {
    await this.sql.run('DELETE FROM failures WHERE at <= ?', [before]);
  }

  /** Whether anything in the store was sealed or hashed with the secrets key (a new key would void it). */
  async holdsSealedSecrets(): Promise<boolean> {
    const r = await this.sql.get(
      `SELECT CASE WHEN EXISTS (SELECT 1 FROM factors WHERE totp_secret IS NOT NULL OR totp_pending IS NOT NULL)
                     OR EXISTS (SELECT 1 FROM backup_codes) THEN 1 ELSE 0 END AS sealed`,
    );
    return num(r, 'sealed') === 1;
  }

  /** One sealed TOTP secret, to check that a key file is the one the store was written with. */
  async sampleTotpSecret(): Promise<{ user: string; sealed: Buffer } | undefined> {
    const r = await this.sql.get('SELECT "user", totp_secret FROM factors WHERE totp_secret IS NOT NULL LIMIT 1');
    return r ? { user: r['user'] as string, sealed: r['totp_secret'] as Buffer } : undefined;
  }

  async lockedUntil(user: string): Promise<number | undefined> {
    const at = (await this.sql.get('SELECT locked_until FROM users WHERE name = ?', [user]))?.['locked_until'];
    return at === null || at === undefined ? undefined : Number(at);
  }

  async setLock(user: string, until: number | null, now: number): Promise<void> {
    await this.sql.run('UPDATE users SET locked_until = ?, updated_at = ? WHERE name = ?', [until, now, user]);
  }
}
