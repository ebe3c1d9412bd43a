// The app passcodes table (migration 4), on either backend (store/sql.ts). PasscodeService (mfa/passcodes.ts)
// decides, hashes and limits.
import { type Row, type Sql, nullable, num } from './sql.js';

export interface PasscodeRow {
  id: number;
  user: string;
  name: string;
  selector: string;
  salt: Buffer;
  hash: Buffer;
  /** How `hash` was made ("scrypt:n=4096,r=8,p=1"). */
  kdf: string;
  protocols: string[];
  createdAt: number;
  createdBy: string;
  expiresAt: number | null;
  revokedAt: number | null;
  revokedBy: string | null;
  lastUsedAt: number | null;
  lastUsedIp: string | null;
  lastUsedProtocol: string | null;
}

export interface NewPasscode {
  user: string;
  name: string;
  selector: string;
  salt: Buffer;
  hash: Buffer;
  kdf: string;
  protocols: readonly string[];
  createdBy: string;
  expiresAt: number | null;
  now: number;
}

export interface PasscodeUse {
  id: number;
  at: number;
  ip: string;
  protocol: string;
}

/** A row of the passcodes table as SQLite or PostgreSQL gives it (the same columns and values). */
export const passcodeFromRow = (r: Row): PasscodeRow => ({
  id: num(r, 'id'),
  user: r['user'] as string,
  name: r['name'] as string,
  selector: r['selector'] as string,
  salt: r['salt'] as Buffer,
  hash: r['hash'] as Buffer,
  kdf: r['kdf'] as string,
  protocols: (r['protocols'] as string).split(',').filter((p) => p !== ''),
  createdAt: num(r, 'created_at'),
  createdBy: r['created_by'] as string,
  expiresAt: nullable(r['expires_at']),
  revokedAt: nullable(r['revoked_at']),
  revokedBy: (r['revoked_by'] as string | null) ?? null,
  lastUsedAt: nullable(r['last_used_at']),
  lastUsedIp: (r['last_used_ip'] as string | null) ?? null,
  lastUsedProtocol: (r['last_used_protocol'] as string | null) ?? null,
});

export class PasscodeStore {
  constructor(readonly sql: Sql) {}

  async insert(p: NewPasscode): Promise<number> {
    return this.sql.insert(
      `INSERT INTO passcodes ("user", name, selector, salt, hash, kdf, protocols, created_at, created_by, expires_at)
       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
      [p.user, p.name, p.selector, p.salt, p.hash, p.kdf, p.protocols.join(','), p.now, p.createdBy, p.expiresAt],
    );
  }

  async selectorTaken(selector: string): Promise<boolean> {
    return (await this.sql.get('SELECT 1 AS taken FROM passcodes WHERE selector = ?', [selector])) !== undefined;
  }

  async bySelector(selector: string): Promise<PasscodeRow | undefined> {
    const r = await this.sql.get('SELECT * FROM passcodes WHERE selector = ?', [selector]);
    return r ? passcodeFromRow(r) : undefined;
  }

  async byId(id: number): Promise<PasscodeRow | undefined> {
    const r = await this.sql.get('SELECT * FROM passcodes WHERE id = ?', [id]);
    return r ? passcodeFromRow(r) : undefined;
  }

  /** The user's passcodes that work now (not revoked, not expired), oldest first; with `all`, every one kept. */
  async listOf(user: string, now: number, all = false): Promise<PasscodeRow[]> {
    const rows = all
      ? await this.sql.all('SELECT * FROM passcodes WHERE "user" = ? ORDER BY created_at, id', [user])
      : await this.sql.all('SELECT * FROM passcodes WHERE "user" = ? AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?) ORDER BY created_at, id', [user, now]);
    return rows.map(passcodeFromRow);
  }

  /** Every working passcode of every user (the CLI's listing), at most `limit`. */
  async everyActive(now: number, limit = 10_000): Promise<PasscodeRow[]> {
    const rows = await this.sql.all(
      'SELECT * FROM passcodes WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?) ORDER BY "user", created_at, id LIMIT ?',
      [now, limit],
    );
    return rows.map(passcodeFromRow);
  }

  /** Revokes one passcode; false when it was already revoked (or does not exist). */
  async revoke(id: number, by: string, now: number): Promise<boolean> {
    return (await this.sql.run('UPDATE passcodes SET revoked_at = ?, revoked_by = ? WHERE id = ? AND revoked_at IS NULL', [now, by, id])) === 1;
  }

  /** Records the last use of passcodes (a batch, in one transaction); a later use already recorded wins. */
  async recordUses(uses: readonly PasscodeUse[]): Promise<void> {
    if (uses.length === 0) return;
    await this.sql.tx(async () => {
      for (const u of uses) {
        await this.sql.run(
          'UPDATE passcodes SET last_used_at = ?, last_used_ip = ?, last_used_protocol = ? WHERE id = ? AND (last_used_at IS NULL OR last_used_at <= ?)',
          [u.at, u.ip, u.protocol, u.id, u.at],
        );
      }
    });
  }

  /** Deletes passcodes revoked or expired before `before` (at most `batch`, in one transaction); resolves to how many. */
  async purge(before: number, batch = 500): Promise<number> {
    return this.sql.tx(async () => {
      const ids = (await this.sql.all('SELECT id FROM passcodes WHERE revoked_at <= ? OR expires_at <= ? LIMIT ?', [before, before, batch])).map((r) => num(r, 'id'));
      for (const id of ids) await this.sql.run('DELETE FROM passcodes WHERE id = ?', [id]);
      return ids.length;
    });
  }
}
