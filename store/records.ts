// The store's records, written once for both backends over an Sql (store/sql.ts): users and their flags,
// grants, Dovecot's login reports, the audit log, the daemon's statistics, and (mfa-store.ts,
// passcode-store.ts) second factors and app passcodes. Every change that must be whole runs in one write
// transaction; the decision itself never reads here (it reads the in-memory copy, store/live-copy.ts).
import type { LookupResult } from '../policy/decide.js';
import { MfaStore } from './mfa-store.js';
import { PasscodeStore } from './passcode-store.js';
import { type Row, type Sql, nullable, num } from './sql.js';
import { StoreError } from './sqlite-file.js';

export interface UserRow {
  name: string;
  mfaEnabled: boolean;
  exempt: boolean;
  createdAt: number;
  updatedAt: number;
}

export interface GrantRow {
  id: number;
  user: string;
  block: string;
  ip: string;
  createdAt: number;
  expiresAt: number;
  method: string;
  source: string;
  reason: string;
  revokedAt: number | null;
  revokedBy: string | null;
  revokeReason: string | null;
}

export interface LoginRow {
  user: string;
  ip: string;
  protocol: string;
  lastSuccessAt: number | null;
  lastFailureAt: number | null;
  lastPolicyRejectAt: number | null;
}

export interface AuditRow {
  id: number;
  at: number;
  actor: string;
  action: string;
  user: string | null;
  ip: string | null;
  grantId: number | null;
  detail: Record<string, unknown>;
}

export interface DaemonStatsRow {
  pid: number;
  startedAt: number;
  updatedAt: number;
  stoppedAt: number | null;
  allowed: number;
  refused: number;
  logOnly: number;
  badRequests: number;
  /** The daemon's in-memory copy, as of its last report; undefined from a daemon older than the copy. */
  copy: CopyState | undefined;
}

/** What a daemon decides from: its in-memory copy's size, when it last matched the store, and why not since. */
export interface CopyState {
  currentAt: number;
  flaggedUsers: number;
  grants: number;
  /** Set while the store cannot be read (the copy stays as it was at currentAt). */
  error: string | undefined;
}

export interface LoginReport {
  user: string;
  ip: string;
  protocol: string;
  success: boolean;
  policyReject: boolean;
  at: number;
}

export interface NewGrant {
  user: string;
  ip: string;
  block: string;
  ttlMs: number;
  method: string;
  source: string;
  reason: string;
  actor: string;
  now: number;
}

export interface GrantFilter {
  user?: string | undefined;
  block?: string | undefined;
  /** Include expired and revoked grants. */
  all?: boolean | undefined;
  now: number;
  limit?: number | undefined;
}

const grantFromRow = (r: Row): GrantRow => ({
  id: num(r, 'id'),
  user: r['user'] as string,
  block: r['block'] as string,
  ip: r['ip'] as string,
  createdAt: num(r, 'created_at'),
  expiresAt: num(r, 'expires_at'),
  method: r['method'] as string,
  source: r['source'] as string,
  reason: r['reason'] as string,
  revokedAt: nullable(r['revoked_at']),
  revokedBy: (r['revoked_by'] as string | null) ?? null,
  revokeReason: (r['revoke_reason'] as string | null) ?? null,
});

const userFromRow = (r: Row): UserRow => ({
  name: r['name'] as string,
  mfaEnabled: num(r, 'mfa_enabled') === 1,
  exempt: num(r, 'exempt') === 1,
  createdAt: num(r, 'created_at'),
  updatedAt: num(r, 'updated_at'),
});

/** An audit row's detail: the JSON object stored with the change (a row that is not one is shown as it is). */
export function parseDetail(text: unknown): Record<string, unknown> {
  if (typeof text !== 'string') return {};
  try {
    const v: unknown = JSON.parse(text);
    return v !== null && typeof v === 'object' && !Array.isArray(v) ? (v as Record<string, unknown>) : { value: v };
  } catch {
    return { unparsed: text };
  }
}

/** A row of the audit table as either backend gives it. */
export const auditFromRow = (r: Row): AuditRow => ({
  id: num(r, 'id'),
  at: num(r, 'at'),
  actor: r['actor'] as string,
  action: r['action'] as string,
  user: (r['user'] as string | null) ?? null,
  ip: (r['ip'] as string | null) ?? null,
  grantId: nullable(r['grant_id']),
  detail: parseDetail(r['detail']),
});

const USER_COLUMNS = 'name, mfa_enabled, exempt, created_at, updated_at';

export class Records {
  /** Second factors, codes, failures and locks. */
  readonly mfa: MfaStore;
  /** App passcodes. */
  readonly passcodes: PasscodeStore;

  constructor(readonly sql: Sql) {
    this.mfa = new MfaStore(sql);
    this.passcodes = new PasscodeStore(sql);
  }

  /** Runs `fn` in one write transaction (every call on these records inside it joins it). */
  tx<T>(fn: () => Promise<T>): Promise<T> {
    return this.sql.tx(fn);
  }

  // ---- users -------------------------------------------------------------------------------------------

  async getUser(name: string): Promise<UserRow | undefined> {
    const r = await this.sql.get(`SELECT ${USER_COLUMNS} FROM users WHERE name = ?`, [name]);
    return r ? userFromRow(r) : undefined;
  }

  /** Makes the user known to the store (inside the caller's transaction, if any). */
  async ensureUser(name: string, now: number): Promise<void> {
    await this.sql.run('INSERT INTO users (name, created_at, updated_at) VALUES (?, ?, ?) ON CONFLICT (name) DO NOTHING', [name, now, now]);
  }

  async listUsers(): Promise<UserRow[]> {
    return (await this.sql.all(`SELECT ${USER_COLUMNS} FROM users ORDER BY name`)).map(userFromRow);
  }

  /** What the decision would read for (user, block): the user's flags and the active grant, if any. */
  async lookup(user: string, block: string, now: number): Promise<LookupResult> {
    return this.sql.snapshot(async () => {
      const u = await this.getUser(user);
      const g = await this.activeGrant(user, block, now);
      return { user: u ? { mfaEnabled: u.mfaEnabled, exempt: u.exempt } : undefined, grant: g };
    });
  }

  /** Sets a user flag (creating the user if needed) and audits the change. Resolves to whether anything changed. */
  async setUserFlag(name: string, flag: 'mfa_enabled' | 'exempt', value: boolean, actor: string, now: number, reason = ''): Promise<boolean> {
    return this.tx(async () => {
      await this.ensureUser(name, now);
      const before = await this.getUser(name);
      const current = flag === 'mfa_enabled' ? before?.mfaEnabled : before?.exempt;
      if (current === value) return false;
      await this.sql.run(`UPDATE users SET ${flag === 'mfa_enabled' ? 'mfa_enabled' : 'exempt'} = ?, updated_at = ? WHERE name = ?`, [value ? 1 : 0, now, name]);
      const action = flag === 'mfa_enabled' ? (value ? 'user-enable' : 'user-disable') : value ? 'user-exempt' : 'user-unexempt';
      await this.audit(now, actor, action, name, null, null, reason ? { reason } : {});
      return true;
    });
  }

  // ---- grants ------------------------------------------------------------------------------------------

  async activeGrant(user: string, block: string, now: number): Promise<{ id: number; expiresAt: number } | undefined> {
    const r = await this.sql.get(
      'SELECT id, expires_at FROM grants WHERE "user" = ? AND block = ? AND revoked_at IS NULL AND expires_at > ? ORDER BY expires_at DESC LIMIT 1',
      [user, block, now],
    );
    return r ? { id: num(r, 'id'), expiresAt: num(r, 'expires_at') } : undefined;
  }

  /** Creates a grant for (user, block), or extends the active one. Creates the user if needed. */
  async addGrant(g: NewGrant): Promise<{ grant: GrantRow; extended: boolean }> {
    return this.tx(async () => {
      await this.ensureUser(g.user, g.now);
      const expiresAt = g.now + g.ttlMs;
      const existing = await this.activeGrant(g.user, g.block, g.now);
      let id: number;
      let extended = false;
      if (existing && existing.expiresAt >= expiresAt) {
        id = existing.id;
        extended = true;
      } else if (existing) {
        await this.sql.run('UPDATE grants SET expires_at = ?, ip = ? WHERE id = ?', [expiresAt, g.ip, existing.id]);
        id = existing.id;
        extended = true;
      } else {
        id = await this.sql.insert(
          'INSERT INTO grants ("user", block, ip, created_at, expires_at, method, source, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?)',
          [g.user, g.block, g.ip, g.now, expiresAt, g.method, g.source, g.reason],
        );
      }
      const grant = await this.grantById(id);
      if (!grant) throw new StoreError(`grant ${id} vanished inside its own transaction`);
      await this.audit(g.now, g.actor, extended ? 'grant-extend' : 'grant-add', g.user, g.ip, id, {
        block: g.block,
        expires_at: new Date(grant.expiresAt).toISOString(),
        method: g.method,
        source: g.source,
        ...(g.reason ? { reason: g.reason } : {}),
      });
      return { grant, extended };
    });
  }

  async grantById(id: number): Promise<GrantRow | undefined> {
    const r = await this.sql.get('SELECT * FROM grants WHERE id = ?', [id]);
    return r ? grantFromRow(r) : undefined;
  }

  async listGrants(f: GrantFilter): Promise<GrantRow[]> {
    const where: string[] = [];
    const args: (string | number)[] = [];
    if (f.user !== undefined) {
      where.push('"user" = ?');
      args.push(f.user);
    }
    if (f.block !== undefined) {
      where.push('block = ?');
      args.push(f.block);
    }
    if (!f.all) {
      where.push('revoked_at IS NULL AND expires_at > ?');
      args.push(f.now);
    }
    args.push(f.limit ?? 1000);
    // The filters combine into at most eight statements, each prepared once.
    const sql = `SELECT * FROM grants ${where.length ? 'WHERE ' + where.join(' AND ') : ''} ORDER BY created_at DESC, id DESC LIMIT ?`;
    return (await this.sql.all(sql, args)).map(grantFromRow);
  }

  /** Revokes the active grants that match; resolves to the revoked grants. */
  async revokeGrants(
    sel: { id?: number | undefined; user?: string | undefined; block?: string | undefined },
    actor: string,
    reason: string,
    now: number,
  ): Promise<GrantRow[]> {
    return this.tx(async () => {
      let targets: GrantRow[];
      if (sel.id !== undefined) {
        const g = await this.grantById(sel.id);
        targets = g && g.revokedAt === null && g.expiresAt > now ? [g] : [];
      } else {
        targets = await this.listGrants({ user: sel.user, block: sel.block, now, limit: 1_000_000 });
      }
      for (const g of targets) {
        await this.sql.run('UPDATE grants SET revoked_at = ?, revoked_by = ?, revoke_reason = ? WHERE id = ? AND revoked_at IS NULL', [now, actor, reason, g.id]);
        await this.audit(now, actor, 'grant-revoke', g.user, g.ip, g.id, { block: g.block, ...(reason ? { reason } : {}) });
      }
      return targets.map((g) => ({ ...g, revokedAt: now, revokedBy: actor, revokeReason: reason }));
    });
  }

  /**
   * Deletes grants that expired (or were revoked) before `before`, at most `batch` of them, in one transaction.
   * Each deletion leaves an audit row with the grant's history. Resolves to how many were deleted.
   */
  async purgeGrants(before: number, now: number, batch = 500): Promise<number> {
    return this.tx(async () => {
      const rows = (await this.sql.all('SELECT * FROM grants WHERE expires_at <= ? OR revoked_at <= ? LIMIT ?', [before, before, batch])).map(grantFromRow);
      for (const g of rows) {
        await this.sql.run('DELETE FROM grants WHERE id = ?', [g.id]);
        await this.audit(now, 'daemon', 'grant-purge', g.user, g.ip, g.id, {
          block: g.block,
          created_at: new Date(g.createdAt).toISOString(),
          expires_at: new Date(g.expiresAt).toISOString(),
          method: g.method,
          source: g.source,
          revoked_at: g.revokedAt === null ? null : new Date(g.revokedAt).toISOString(),
          revoked_by: g.revokedBy,
        });
      }
      return rows.length;
    });
  }

  /** Deletes changes written before `before`, noting how far (a copy further behind than that reloads whole). */
  async purgeChanges(before: number): Promise<number> {
    return this.tx(async () => {
      const upto = (await this.sql.get('SELECT max(id) AS upto FROM changes WHERE at <= ?', [before]))?.['upto'];
      if (upto === null || upto === undefined) return 0;
      const n = Number(upto);
      await this.sql.run('UPDATE changes_purged SET upto = CASE WHEN upto > ? THEN upto ELSE ? END WHERE id = 1', [n, n]);
      return this.sql.run('DELETE FROM changes WHERE id <= ?', [n]);
    });
  }

  // ---- logins (Dovecot's reports) -----------------------------------------------------------------------

  /**
   * Records a batch of login outcomes in one transaction. A successful login makes the user known to the store;
   * failures are kept only for users the store already knows, so guessed names cannot fill it.
   */
  async recordLogins(reports: readonly LoginReport[]): Promise<void> {
    if (reports.length === 0) return;
    await this.tx(async () => {
      for (const r of reports) {
        if (r.success) await this.ensureUser(r.user, r.at);
        else if (!(await this.sql.get('SELECT 1 AS known FROM users WHERE name = ?', [r.user]))) continue;
        await this.sql.run(
          `INSERT INTO logins AS l ("user", ip, protocol, last_success_at, last_failure_at, last_policy_reject_at)
           VALUES (?, ?, ?, ?, ?, ?)
           ON CONFLICT ("user", ip) DO UPDATE SET
             protocol = excluded.protocol,
             last_success_at = coalesce(excluded.last_success_at, l.last_success_at),
             last_failure_at = coalesce(excluded.last_failure_at, l.last_failure_at),
             last_policy_reject_at = coalesce(excluded.last_policy_reject_at, l.last_policy_reject_at)`,
          [r.user, r.ip, r.protocol, r.success ? r.at : null, r.success ? null : r.at, r.policyReject ? r.at : null],
        );
      }
    });
  }

  async loginsOf(user: string, limit = 20): Promise<LoginRow[]> {
    const rows = await this.sql.all(
      `SELECT * FROM logins WHERE "user" = ?
       ORDER BY CASE WHEN coalesce(last_success_at, 0) > coalesce(last_failure_at, 0) THEN coalesce(last_success_at, 0) ELSE coalesce(last_failure_at, 0) END DESC
       LIMIT ?`,
      [user, limit],
    );
    return rows.map((r) => ({
      user: r['user'] as string,
      ip: r['ip'] as string,
      protocol: r['protocol'] as string,
      lastSuccessAt: nullable(r['last_success_at']),
      lastFailureAt: nullable(r['last_failure_at']),
      lastPolicyRejectAt: nullable(r['last_policy_reject_at']),
    }));
  }

  // ---- audit -------------------------------------------------------------------------------------------

  async audit(at: number, actor: string, action: string, user: string | null, ip: string | null, grantId: number | null, detail: Record<string, unknown>): Promise<void> {
    await this.sql.run('INSERT INTO audit (at, actor, action, "user", ip, grant_id, detail) VALUES (?, ?, ?, ?, ?, ?, ?)', [
      at,
      actor,
      action,
      user,
      ip,
      grantId,
      JSON.stringify(detail),
    ]);
  }

  async auditOf(user: string, limit = 20): Promise<AuditRow[]> {
    const rows = await this.sql.all('SELECT * FROM audit WHERE "user" = ? ORDER BY id DESC LIMIT ?', [user, limit]);
    return rows.map(auditFromRow);
  }

  // ---- statistics --------------------------------------------------------------------------------------

  async counts(now: number): Promise<{ users: number; mfaEnabled: number; exempt: number; activeGrants: number }> {
    const r = await this.sql.get(
      `SELECT (SELECT count(*) FROM users) AS users,
              (SELECT count(*) FROM users WHERE mfa_enabled = 1) AS enabled,
              (SELECT count(*) FROM users WHERE exempt = 1) AS exempt,
              (SELECT count(*) FROM grants WHERE revoked_at IS NULL AND expires_at > ?) AS active_grants`,
      [now],
    );
    return { users: num(r, 'users'), mfaEnabled: num(r, 'enabled'), exempt: num(r, 'exempt'), activeGrants: num(r, 'active_grants') };
  }

  async daemonStarted(pid: number, now: number): Promise<void> {
    await this.tx(async () => {
      await this.sql.run(
        `INSERT INTO daemon_stats (id, pid, started_at, updated_at) VALUES (1, ?, ?, ?)
         ON CONFLICT (id) DO UPDATE SET pid = excluded.pid, started_at = excluded.started_at, updated_at = excluded.updated_at,
           stopped_at = NULL, allowed = 0, refused = 0, log_only = 0, bad_requests = 0,
           copy_current_at = NULL, copy_users = NULL, copy_grants = NULL, copy_error = NULL`,
        [pid, now, now],
      );
    });
  }

  async writeDaemonStats(
    pid: number,
    now: number,
    c: { allowed: number; refused: number; logOnly: number; badRequests: number },
    stoppedAt: number | null = null,
    copy?: CopyState,
  ): Promise<void> {
    await this.sql.run(
      `UPDATE daemon_stats SET updated_at = ?, allowed = ?, refused = ?, log_only = ?, bad_requests = ?, stopped_at = ?,
         copy_current_at = ?, copy_users = ?, copy_grants = ?, copy_error = ? WHERE id = 1 AND pid = ?`,
      [now, c.allowed, c.refused, c.logOnly, c.badRequests, stoppedAt, copy?.currentAt ?? null, copy?.flaggedUsers ?? null, copy?.grants ?? null, copy?.error ?? null, pid],
    );
  }

  async daemonStats(): Promise<DaemonStatsRow | undefined> {
    const r = await this.sql.get('SELECT * FROM daemon_stats WHERE id = 1');
    if (!r) return undefined;
    return {
      pid: num(r, 'pid'),
      startedAt: num(r, 'started_at'),
      updatedAt: num(r, 'updated_at'),
      stoppedAt: nullable(r['stopped_at']),
      allowed: num(r, 'allowed'),
      refused: num(r, 'refused'),
      logOnly: num(r, 'log_only'),
      badRequests: num(r, 'bad_requests'),
      copy:
        r['copy_current_at'] === null || r['copy_current_at'] === undefined
          ? undefined
          : {
              currentAt: num(r, 'copy_current_at'),
              flaggedUsers: num(r, 'copy_users'),
              grants: num(r, 'copy_grants'),
              error: (r['copy_error'] as string | null) ?? undefined,
            },
    };
  }
}
