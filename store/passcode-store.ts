// The app passcodes table (migration 4). Statements are prepared once; PasscodeService (mfa/passcodes.ts)
// decides, hashes and limits.
import type Database from 'better-sqlite3';

type Row = Record<string, unknown>;

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
  id: r['id'] as number,
  user: r['user'] as string,
  name: r['name'] as string,
  selector: r['selector'] as string,
  salt: r['salt'] as Buffer,
  hash: r['hash'] as Buffer,
  kdf: r['kdf'] as string,
  protocols: (r['protocols'] as string).split(',').filter((p) => p !== ''),
  createdAt: r['created_at'] as number,
  createdBy: r['created_by'] as string,
  expiresAt: (r['expires_at'] as number | null) ?? null,
  revokedAt: (r['revoked_at'] as number | null) ?? null,
  revokedBy: (r['revoked_by'] as string | null) ?? null,
  lastUsedAt: (r['last_used_at'] as number | null) ?? null,
  lastUsedIp: (r['last_used_ip'] as string | null) ?? null,
  lastUsedProtocol: (r['last_used_protocol'] as string | null) ?? null,
});

export class PasscodeStore {
  private readonly st;

  constructor(readonly db: Database.Database) {
    this.st = {
      insert: db.prepare(
        `INSERT INTO passcodes (user, name, selector, salt, hash, kdf, protocols, created_at, created_by, expires_at)
         VALUES (@user, @name, @selector, @salt, @hash, @kdf, @protocols, @created_at, @created_by, @expires_at)`,
      ),
      bySelector: db.prepare('SELECT * FROM passcodes WHERE selector = ?'),
      byId: db.prepare('SELECT * FROM passcodes WHERE id = ?'),
      selectorTaken: db.prepare('SELECT 1 FROM passcodes WHERE selector = ?'),
      active: db.prepare('SELECT * FROM passcodes WHERE user = ? AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?) ORDER BY created_at, id'),
      all: db.prepare('SELECT * FROM passcodes WHERE user = ? ORDER BY created_at, id'),
      every: db.prepare('SELECT * FROM passcodes'),
      everyActive: db.prepare('SELECT * FROM passcodes WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?) ORDER BY user, created_at, id LIMIT ?'),
      revoke: db.prepare('UPDATE passcodes SET revoked_at = ?, revoked_by = ? WHERE id = ? AND revoked_at IS NULL'),
      use: db.prepare('UPDATE passcodes SET last_used_at = ?, last_used_ip = ?, last_used_protocol = ? WHERE id = ? AND (last_used_at IS NULL OR last_used_at <= ?)'),
      purgeable: db.prepare('SELECT id FROM passcodes WHERE revoked_at <= ? OR expires_at <= ? LIMIT ?'),
      delete: db.prepare('DELETE FROM passcodes WHERE id = ?'),
    };
  }

  insert(p: NewPasscode): number {
    const info = this.st.insert.run({
      user: p.user,
      name: p.name,
      selector: p.selector,
      salt: p.salt,
      hash: p.hash,
      kdf: p.kdf,
      protocols: p.protocols.join(','),
      created_at: p.now,
      created_by: p.createdBy,
      expires_at: p.expiresAt,
    });
    return Number(info.lastInsertRowid);
  }

  selectorTaken(selector: string): boolean {
    return this.st.selectorTaken.get(selector) !== undefined;
  }

  bySelector(selector: string): PasscodeRow | undefined {
    const r = this.st.bySelector.get(selector) as Row | undefined;
    return r ? passcodeFromRow(r) : undefined;
  }

  byId(id: number): PasscodeRow | undefined {
    const r = this.st.byId.get(id) as Row | undefined;
    return r ? passcodeFromRow(r) : undefined;
  }

  /** The user's passcodes that work now (not revoked, not expired), oldest first; with `all`, every one kept. */
  listOf(user: string, now: number, all = false): PasscodeRow[] {
    return ((all ? this.st.all.all(user) : this.st.active.all(user, now)) as Row[]).map(passcodeFromRow);
  }

  /** Every row of the table, revoked and expired ones too (the daemon's copy). */
  everyRow(): PasscodeRow[] {
    return (this.st.every.all() as Row[]).map(passcodeFromRow);
  }

  /** Every working passcode of every user (the CLI's listing), at most `limit`. */
  everyActive(now: number, limit = 10_000): PasscodeRow[] {
    return (this.st.everyActive.all(now, limit) as Row[]).map(passcodeFromRow);
  }

  /** Revokes one passcode; false when it was already revoked (or does not exist). */
  revoke(id: number, by: string, now: number): boolean {
    return this.st.revoke.run(now, by, id).changes === 1;
  }

  /** Records the last use of passcodes (a batch, in the caller's transaction); a later use already recorded wins. */
  recordUses(uses: readonly PasscodeUse[]): void {
    for (const u of uses) this.st.use.run(u.at, u.ip, u.protocol, u.id, u.at);
  }

  /** Deletes passcodes revoked or expired before `before` (at most `batch`); returns how many. */
  purge(before: number, batch = 500): number {
    const ids = (this.st.purgeable.all(before, before, batch) as { id: number }[]).map((r) => r.id);
    for (const id of ids) this.st.delete.run(id);
    return ids.length;
  }
}
