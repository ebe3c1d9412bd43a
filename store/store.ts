// The grant store: one SQLite file shared by the daemon and the CLI.
// WAL, statements prepared once, every writing transaction BEGIN IMMEDIATE, schema migrations on open.
import fs from 'node:fs';
import path from 'node:path';
import type Database from 'better-sqlite3';
import type { Facts, GrantFacts, LookupResult } from '../policy/decide.js';
import { LiveCopy, type UserState } from './live-copy.js';
import { MfaStore } from './mfa-store.js';
import { PasscodeStore } from './passcode-store.js';
import { giveToDaemonUser } from './ownership.js';
import { MIGRATIONS, SCHEMA_VERSION } from './migrations.js';
import { type FileState, OpenedFile, StoreError, companions, openDatabase } from './sqlite-file.js';

export { type FileState, STORE_FILE_MODE, StoreError, missingStoreMessage } from './sqlite-file.js';

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


type Row = Record<string, unknown>;

const grantFromRow = (r: Row): GrantRow => ({
  id: r['id'] as number,
  user: r['user'] as string,
  block: r['block'] as string,
  ip: r['ip'] as string,
  createdAt: r['created_at'] as number,
  expiresAt: r['expires_at'] as number,
  method: r['method'] as string,
  source: r['source'] as string,
  reason: r['reason'] as string,
  revokedAt: (r['revoked_at'] as number | null) ?? null,
  revokedBy: (r['revoked_by'] as string | null) ?? null,
  revokeReason: (r['revoke_reason'] as string | null) ?? null,
});

const userFromRow = (r: Row): UserRow => ({
  name: r['name'] as string,
  mfaEnabled: r['mfa_enabled'] === 1,
  exempt: r['exempt'] === 1,
  createdAt: r['created_at'] as number,
  updatedAt: r['updated_at'] as number,
});

/** Told when reading the change feed starts failing (once, not per decision) and when it works again. */
export interface FeedWatcher {
  failed?: (error: unknown, currentAt: number) => void;
  recovered?: (currentAt: number) => void;
}

export interface OpenOptions {
  /**
   * Create the file (mode 0600) and its directory (0750) if missing: only `mfagate db migrate`, the daemon on
   * its built-in defaults or with --create-store, and tests. Everywhere else a missing store is an error: an
   * empty store where one should exist would let every user who enabled MFA in without it.
   */
  create?: boolean;
  /** Apply pending migrations. Without it, an outdated file is an error. */
  migrate?: boolean;
}

export class Store implements Facts {
  private conn!: { db: Database.Database; st: Statements; mfa: MfaStore; passcodes: PasscodeStore };
  /** Which file the path named when it was opened. */
  private opened!: OpenedFile;
  /** listGrants' statements by their SQL text. */
  private listStatements = new Map<string, Database.Statement>();

  static open(file: string, opts: OpenOptions = {}): Store {
    const db = openDatabase(file, opts.create ?? false);
    try {
      const version = db.pragma('user_version', { simple: true }) as number;
      if (version > SCHEMA_VERSION) {
        throw new StoreError(`${file} has schema version ${version}, newer than this mfagate (${SCHEMA_VERSION}): upgrade mfagate`);
      }
      // When root runs the CLI on the daemon's store, SQLite may create the store or its -wal and -shm files
      // owned by root, and the daemon could no longer write.
      giveToDaemonUser([file, ...companions(file)], [file, path.dirname(file)]);
      if (version < SCHEMA_VERSION) {
        if (opts.migrate === false) {
          throw new StoreError(`${file} has schema version ${version}, expected ${SCHEMA_VERSION}: run "mfagate db migrate"`);
        }
        migrate(db);
      }
      return new Store(db, file);
    } catch (e) {
      db.close();
      throw e;
    }
  }

  private constructor(
    db: Database.Database,
    /** The store's file, for messages. */
    readonly file: string,
  ) {
    this.attach(db);
  }

  /** The open database (the handle changes when restoreFile reopens the store: never keep it). */
  get db(): Database.Database {
    return this.conn.db;
  }

  /** Second factors, codes, failures and locks. */
  get mfa(): MfaStore {
    return this.conn.mfa;
  }

  /** App passcodes. */
  get passcodes(): PasscodeStore {
    return this.conn.passcodes;
  }

  private get st(): Statements {
    return this.conn.st;
  }

  private attach(db: Database.Database): void {
    this.conn = { db, st: prepareStatements(db), mfa: new MfaStore(db), passcodes: new PasscodeStore(db) };
    this.listStatements = new Map();
    this.opened = new OpenedFile(this.file);
  }

  /** Whether the path still names the file that is open (see OpenedFile.state). */
  fileState(): FileState {
    return this.opened.state();
  }

  /**
   * Puts the open store back at its path after it was deleted or replaced, and reopens it there (see
   * OpenedFile.restore). Returns where a replacing file went, if there was one.
   */
  restoreFile(now: number): { movedAside: string | undefined } {
    if (this.opened.state() === 'ok') return { movedAside: undefined };
    const { db, movedAside } = this.opened.restore(this.conn.db, now);
    this.attach(db);
    return { movedAside };
  }

  close(): void {
    if (this.db.open) this.db.close();
  }

  get schemaVersion(): number {
    return this.db.pragma('user_version', { simple: true }) as number;
  }

  // ---- Facts (the decision's view) --------------------------------------------------------------------

  lookup(user: string, block: string, now: number): LookupResult {
    const r = this.st.lookup.get(user, block, now) as Row;
    return {
      user: r['mfa_enabled'] === null ? undefined : { mfaEnabled: r['mfa_enabled'] === 1, exempt: r['exempt'] === 1 },
      grant: r['grant_id'] === null ? undefined : { id: r['grant_id'] as number, expiresAt: r['expires_at'] as number },
    };
  }

  activeGrant(user: string, block: string, now: number): GrantFacts | undefined {
    const r = this.st.activeGrant.get(user, block, now) as Row | undefined;
    return r ? { id: r['id'] as number, expiresAt: r['expires_at'] as number } : undefined;
  }

  // ---- the change feed and the daemon's in-memory copy ----------------------------------------------------

  /** The id of the newest change ever written (0 for none), purged or not. */
  latestChange(): number {
    return (this.st.latestChange.get() as number | undefined) ?? 0;
  }

  /** Changes after `id`, oldest first, at most `limit`: each names a user whose decisions may have changed. */
  changesSince(id: number, limit = 10_000): { id: number; user: string }[] {
    return this.st.changesSince.all(id, limit) as { id: number; user: string }[];
  }

  /** What decisions need of one user now (grants not revoked; the copy checks expiry when it decides). */
  userState(user: string): UserState {
    const u = this.st.userFlags.get(user) as { mfa_enabled: number; exempt: number } | undefined;
    const flags = u && (u.mfa_enabled === 1 || u.exempt === 1) ? { mfaEnabled: u.mfa_enabled === 1, exempt: u.exempt === 1 } : undefined;
    const grants = (this.st.userGrants.all(user) as Row[]).map((r) => ({ block: r['block'] as string, id: r['id'] as number, expiresAt: r['expires_at'] as number }));
    return { flags, grants, passcodes: this.passcodes.listOf(user, 0, true) };
  }

  /** Deletes changes written before `before`, noting how far (a copy further behind than that reloads whole). */
  purgeChanges(before: number): number {
    return this.db
      .transaction(() => {
        const upto = this.st.purgeableChanges.get(before) as number | null;
        if (upto === null) return 0;
        this.st.notePurged.run(upto);
        return this.st.purgeChanges.run(upto).changes;
      })
      .immediate();
  }

  /**
   * An in-memory copy of what decisions need, loaded now and brought up to date before each lookup: one
   * statement reads the newest change id, and only when it moved are the changed users read again. Changes made
   * by this process and by any other (the CLI) are seen by the very next decision.
   */
  liveCopy(clock: () => number = Date.now, feed: FeedWatcher = {}): LiveCopy {
    let failing = false;
    const copy: LiveCopy = new LiveCopy(() => {
      // A store that cannot be read (an I/O error, a file gone bad) leaves decisions to the copy as it was.
      try {
        if (this.latestChange() !== copy.lastChange) this.catchUp(copy, clock());
        else copy.currentAt = clock();
      } catch (e) {
        if (!failing) feed.failed?.(e, copy.currentAt);
        failing = true;
        return;
      }
      if (failing) feed.recovered?.(copy.currentAt);
      failing = false;
    });
    this.reloadCopy(copy, clock());
    return copy;
  }

  /** Loads the whole copy again (at start, and when the feed has a gap the copy cannot bridge). */
  reloadCopy(copy: LiveCopy, now: number): void {
    // One read transaction: the copy and the change id it is current to come from one snapshot.
    this.db
      .transaction(() => {
        const latest = this.latestChange();
        const users = this.st.flaggedUsers.iterate() as IterableIterator<unknown[]>;
        copy.replaceAll(users, this.st.activeGrants.iterate(now) as IterableIterator<unknown[]>, this.passcodes.everyRow(), latest, now);
      })
      .deferred();
  }

  /** Applies the changes after the copy's last one; reloads whole when some of them were purged unseen. */
  catchUp(copy: LiveCopy, now: number): void {
    if ((this.st.purgedUpto.get() as number) > copy.lastChange) {
      this.reloadCopy(copy, now);
      return;
    }
    for (;;) {
      const rows = this.changesSince(copy.lastChange);
      if (rows.length === 0) {
        copy.lastChange = this.latestChange();
        copy.currentAt = now;
        return;
      }
      const users = new Set(rows.map((r) => r.user));
      for (const u of users) copy.setUser(u, this.userState(u));
      copy.lastChange = rows[rows.length - 1]?.id ?? copy.lastChange;
      copy.currentAt = now;
      if (rows.length < 10_000) return;
    }
  }

  // ---- users -------------------------------------------------------------------------------------------

  getUser(name: string): UserRow | undefined {
    const r = this.st.user.get(name) as Row | undefined;
    return r ? userFromRow(r) : undefined;
  }

  /** Makes the user known to the store (inside the caller's transaction, if any). */
  ensureUser(name: string, now: number): void {
    this.st.ensureUser.run(name, now, now);
  }

  listUsers(): UserRow[] {
    return (this.st.listUsers.all() as Row[]).map(userFromRow);
  }

  /** Sets a user flag (creating the user if needed) and audits the change. Returns whether anything changed. */
  setUserFlag(name: string, flag: 'mfa_enabled' | 'exempt', value: boolean, actor: string, now: number, reason = ''): boolean {
    return this.db
      .transaction(() => {
        this.st.ensureUser.run(name, now, now);
        const before = this.getUser(name);
        const current = flag === 'mfa_enabled' ? before?.mfaEnabled : before?.exempt;
        if (current === value) return false;
        (flag === 'mfa_enabled' ? this.st.setEnabled : this.st.setExempt).run(value ? 1 : 0, now, name);
        const action = flag === 'mfa_enabled' ? (value ? 'user-enable' : 'user-disable') : value ? 'user-exempt' : 'user-unexempt';
        this.audit(now, actor, action, name, null, null, reason ? { reason } : {});
        return true;
      })
      .immediate();
  }

  // ---- grants ------------------------------------------------------------------------------------------

  /** Creates a grant for (user, block), or extends the active one. Creates the user if needed. */
  addGrant(g: NewGrant): { grant: GrantRow; extended: boolean } {
    return this.db
      .transaction(() => {
        this.st.ensureUser.run(g.user, g.now, g.now);
        const expiresAt = g.now + g.ttlMs;
        const existing = this.activeGrant(g.user, g.block, g.now);
        let id: number;
        let extended = false;
        if (existing && existing.expiresAt >= expiresAt) {
          id = existing.id;
          extended = true;
        } else if (existing) {
          this.st.extendGrant.run(expiresAt, g.ip, existing.id);
          id = existing.id;
          extended = true;
        } else {
          const info = this.st.insertGrant.run({
            user: g.user,
            block: g.block,
            ip: g.ip,
            created_at: g.now,
            expires_at: expiresAt,
            method: g.method,
            source: g.source,
            reason: g.reason,
          });
          id = Number(info.lastInsertRowid);
        }
        const grant = this.grantById(id);
        if (!grant) throw new StoreError(`grant ${id} vanished inside its own transaction`);
        this.audit(g.now, g.actor, extended ? 'grant-extend' : 'grant-add', g.user, g.ip, id, {
          block: g.block,
          expires_at: new Date(grant.expiresAt).toISOString(),
          method: g.method,
          source: g.source,
          ...(g.reason ? { reason: g.reason } : {}),
        });
        return { grant, extended };
      })
      .immediate();
  }

  grantById(id: number): GrantRow | undefined {
    const r = this.st.grantById.get(id) as Row | undefined;
    return r ? grantFromRow(r) : undefined;
  }

  listGrants(f: GrantFilter): GrantRow[] {
    const where: string[] = [];
    const args: (string | number)[] = [];
    if (f.user !== undefined) {
      where.push('user = ?');
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
    const sql = `SELECT * FROM grants ${where.length ? 'WHERE ' + where.join(' AND ') : ''} ORDER BY created_at DESC, id DESC LIMIT ?`;
    args.push(f.limit ?? 1000);
    // The filters combine into at most eight statements; each is prepared once (the status the API and the
    // MFA page show lists a user's grants on every page view).
    let st = this.listStatements.get(sql);
    if (!st) {
      st = this.db.prepare(sql);
      this.listStatements.set(sql, st);
    }
    return (st.all(...args) as Row[]).map(grantFromRow);
  }

  /** Revokes the active grants that match; returns the revoked grants. */
  revokeGrants(
    sel: { id?: number | undefined; user?: string | undefined; block?: string | undefined },
    actor: string,
    reason: string,
    now: number,
  ): GrantRow[] {
    return this.db
      .transaction(() => {
        let targets: GrantRow[];
        if (sel.id !== undefined) {
          const g = this.grantById(sel.id);
          targets = g && g.revokedAt === null && g.expiresAt > now ? [g] : [];
        } else {
          targets = this.listGrants({ user: sel.user, block: sel.block, now, limit: 1_000_000 });
        }
        for (const g of targets) {
          this.st.revoke.run(now, actor, reason, g.id);
          this.audit(now, actor, 'grant-revoke', g.user, g.ip, g.id, { block: g.block, ...(reason ? { reason } : {}) });
        }
        return targets.map((g) => ({ ...g, revokedAt: now, revokedBy: actor, revokeReason: reason }));
      })
      .immediate();
  }

  /**
   * Deletes grants that expired (or were revoked) before `before`, at most `batch` of them, in one transaction.
   * Each deletion leaves an audit row with the grant's history. Returns how many were deleted.
   */
  purgeGrants(before: number, now: number, batch = 500): number {
    return this.db
      .transaction(() => {
        const rows = (this.st.purgeable.all(before, before, batch) as Row[]).map(grantFromRow);
        for (const g of rows) {
          this.st.deleteGrant.run(g.id);
          this.audit(now, 'daemon', 'grant-purge', g.user, g.ip, g.id, {
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
      })
      .immediate();
  }

  // ---- logins (Dovecot's reports) -----------------------------------------------------------------------

  /**
   * Records a batch of login outcomes in one transaction. A successful login makes the user known to the store;
   * failures are kept only for users the store already knows, so guessed names cannot fill it.
   */
  recordLogins(reports: readonly LoginReport[]): void {
    if (reports.length === 0) return;
    this.db
      .transaction(() => {
        for (const r of reports) {
          if (r.success) this.st.ensureUser.run(r.user, r.at, r.at);
          else if (!this.st.userExists.get(r.user)) continue;
          this.st.loginUpsert.run({
            user: r.user,
            ip: r.ip,
            protocol: r.protocol,
            success: r.success ? r.at : null,
            failure: r.success ? null : r.at,
            reject: r.policyReject ? r.at : null,
          });
        }
      })
      .immediate();
  }

  loginsOf(user: string, limit = 20): LoginRow[] {
    return (this.st.loginsOf.all(user, limit) as Row[]).map((r) => ({
      user: r['user'] as string,
      ip: r['ip'] as string,
      protocol: r['protocol'] as string,
      lastSuccessAt: (r['last_success_at'] as number | null) ?? null,
      lastFailureAt: (r['last_failure_at'] as number | null) ?? null,
      lastPolicyRejectAt: (r['last_policy_reject_at'] as number | null) ?? null,
    }));
  }

  // ---- audit -------------------------------------------------------------------------------------------

  audit(at: number, actor: string, action: string, user: string | null, ip: string | null, grantId: number | null, detail: Record<string, unknown>): void {
    this.st.audit.run(at, actor, action, user, ip, grantId, JSON.stringify(detail));
  }

  auditOf(user: string, limit = 20): AuditRow[] {
    return (this.st.auditOf.all(user, limit) as Row[]).map((r) => ({
      id: r['id'] as number,
      at: r['at'] as number,
      actor: r['actor'] as string,
      action: r['action'] as string,
      user: (r['user'] as string | null) ?? null,
      ip: (r['ip'] as string | null) ?? null,
      grantId: (r['grant_id'] as number | null) ?? null,
      detail: JSON.parse(r['detail'] as string) as Record<string, unknown>,
    }));
  }

  // ---- statistics --------------------------------------------------------------------------------------

  counts(now: number): { users: number; mfaEnabled: number; exempt: number; activeGrants: number } {
    const r = this.st.counts.get(now) as Row;
    return {
      users: r['users'] as number,
      mfaEnabled: r['enabled'] as number,
      exempt: r['exempt'] as number,
      activeGrants: r['active_grants'] as number,
    };
  }

  daemonStarted(pid: number, now: number): void {
    this.db.transaction(() => this.st.statsStart.run(pid, now, now)).immediate();
  }

  writeDaemonStats(
    pid: number,
    now: number,
    c: { allowed: number; refused: number; logOnly: number; badRequests: number },
    stoppedAt: number | null = null,
    copy?: CopyState,
  ): void {
    this.db
      .transaction(() =>
        this.st.statsWrite.run(now, c.allowed, c.refused, c.logOnly, c.badRequests, stoppedAt, copy?.currentAt ?? null, copy?.flaggedUsers ?? null, copy?.grants ?? null, copy?.error ?? null, pid),
      )
      .immediate();
  }

  daemonStats(): DaemonStatsRow | undefined {
    const r = this.st.statsRead.get() as Row | undefined;
    if (!r) return undefined;
    return {
      pid: r['pid'] as number,
      startedAt: r['started_at'] as number,
      updatedAt: r['updated_at'] as number,
      stoppedAt: (r['stopped_at'] as number | null) ?? null,
      allowed: r['allowed'] as number,
      refused: r['refused'] as number,
      logOnly: r['log_only'] as number,
      badRequests: r['bad_requests'] as number,
      copy:
        r['copy_current_at'] === null
          ? undefined
          : {
              currentAt: r['copy_current_at'] as number,
              flaggedUsers: r['copy_users'] as number,
              grants: r['copy_grants'] as number,
              error: (r['copy_error'] as string | null) ?? undefined,
            },
    };
  }
}

function prepareStatements(db: Database.Database) {
  return {
    user: db.prepare('SELECT name, mfa_enabled, exempt, created_at, updated_at FROM users WHERE name = ?'),
    activeGrant: db.prepare(
      'SELECT id, expires_at FROM grants WHERE user = ? AND block = ? AND revoked_at IS NULL AND expires_at > ? ORDER BY expires_at DESC LIMIT 1',
    ),
    // The decision's one question, in one statement (one snapshot, one lock round trip).
    lookup: db.prepare(
      `SELECT u.mfa_enabled, u.exempt, g.id AS grant_id, g.expires_at
       FROM (SELECT ? AS name, ? AS block, ? AS now) q
       LEFT JOIN users u ON u.name = q.name
       LEFT JOIN grants g ON g.id = (
         SELECT id FROM grants
         WHERE user = q.name AND block = q.block AND revoked_at IS NULL AND expires_at > q.now
         ORDER BY expires_at DESC LIMIT 1)`,
    ),
    ensureUser: db.prepare('INSERT INTO users (name, created_at, updated_at) VALUES (?, ?, ?) ON CONFLICT (name) DO NOTHING'),
    setEnabled: db.prepare('UPDATE users SET mfa_enabled = ?, updated_at = ? WHERE name = ?'),
    setExempt: db.prepare('UPDATE users SET exempt = ?, updated_at = ? WHERE name = ?'),
    listUsers: db.prepare('SELECT name, mfa_enabled, exempt, created_at, updated_at FROM users ORDER BY name'),
    insertGrant: db.prepare(
      `INSERT INTO grants (user, block, ip, created_at, expires_at, method, source, reason)
       VALUES (@user, @block, @ip, @created_at, @expires_at, @method, @source, @reason)`,
    ),
    extendGrant: db.prepare('UPDATE grants SET expires_at = ?, ip = ? WHERE id = ?'),
    grantById: db.prepare('SELECT * FROM grants WHERE id = ?'),
    revoke: db.prepare('UPDATE grants SET revoked_at = ?, revoked_by = ?, revoke_reason = ? WHERE id = ? AND revoked_at IS NULL'),
    audit: db.prepare(
      'INSERT INTO audit (at, actor, action, user, ip, grant_id, detail) VALUES (?, ?, ?, ?, ?, ?, ?)',
    ),
    loginUpsert: db.prepare(
      `INSERT INTO logins (user, ip, protocol, last_success_at, last_failure_at, last_policy_reject_at)
       VALUES (@user, @ip, @protocol, @success, @failure, @reject)
       ON CONFLICT (user, ip) DO UPDATE SET
         protocol = excluded.protocol,
         last_success_at = coalesce(excluded.last_success_at, last_success_at),
         last_failure_at = coalesce(excluded.last_failure_at, last_failure_at),
         last_policy_reject_at = coalesce(excluded.last_policy_reject_at, last_policy_reject_at)`,
    ),
    userExists: db.prepare('SELECT 1 FROM users WHERE name = ?'),
    loginsOf: db.prepare('SELECT * FROM logins WHERE user = ? ORDER BY max(coalesce(last_success_at, 0), coalesce(last_failure_at, 0)) DESC LIMIT ?'),
    auditOf: db.prepare('SELECT * FROM audit WHERE user = ? ORDER BY id DESC LIMIT ?'),
    purgeable: db.prepare('SELECT * FROM grants WHERE expires_at <= ? OR revoked_at <= ? LIMIT ?'),
    deleteGrant: db.prepare('DELETE FROM grants WHERE id = ?'),
    counts: db.prepare(
      `SELECT (SELECT count(*) FROM users) AS users,
              (SELECT count(*) FROM users WHERE mfa_enabled = 1) AS enabled,
              (SELECT count(*) FROM users WHERE exempt = 1) AS exempt,
              (SELECT count(*) FROM grants WHERE revoked_at IS NULL AND expires_at > ?) AS active_grants`,
    ),
    latestChange: db.prepare("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").pluck(),
    changesSince: db.prepare('SELECT id, user FROM changes WHERE id > ? ORDER BY id LIMIT ?'),
    userFlags: db.prepare('SELECT mfa_enabled, exempt FROM users WHERE name = ?'),
    userGrants: db.prepare('SELECT block, id, expires_at FROM grants WHERE user = ? AND revoked_at IS NULL'),
    flaggedUsers: db.prepare('SELECT name, mfa_enabled, exempt FROM users WHERE mfa_enabled = 1 OR exempt = 1').raw(),
    // The partial index of active grants holds every column asked for (id is its rowid), in user order: one
    // sequential read. Left to itself SQLite takes the expiry index and visits each row, three times slower.
    activeGrants: db.prepare('SELECT user, block, id, expires_at FROM grants INDEXED BY grants_active WHERE revoked_at IS NULL AND expires_at > ?').raw(),
    purgeableChanges: db.prepare('SELECT max(id) FROM changes WHERE at <= ?').pluck(),
    notePurged: db.prepare('UPDATE changes_purged SET upto = max(upto, ?) WHERE id = 1'),
    purgedUpto: db.prepare('SELECT upto FROM changes_purged WHERE id = 1').pluck(),
    purgeChanges: db.prepare('DELETE FROM changes WHERE id <= ?'),
    statsRead: db.prepare('SELECT * FROM daemon_stats WHERE id = 1'),
    statsStart: db.prepare(
      `INSERT INTO daemon_stats (id, pid, started_at, updated_at) VALUES (1, ?, ?, ?)
       ON CONFLICT (id) DO UPDATE SET pid = excluded.pid, started_at = excluded.started_at, updated_at = excluded.updated_at,
         stopped_at = NULL, allowed = 0, refused = 0, log_only = 0, bad_requests = 0,
         copy_current_at = NULL, copy_users = NULL, copy_grants = NULL, copy_error = NULL`,
    ),
    statsWrite: db.prepare(
      `UPDATE daemon_stats SET updated_at = ?, allowed = ?, refused = ?, log_only = ?, bad_requests = ?, stopped_at = ?,
         copy_current_at = ?, copy_users = ?, copy_grants = ?, copy_error = ? WHERE id = 1 AND pid = ?`,
    ),
  };
}

type Statements = ReturnType<typeof prepareStatements>;

function migrate(db: Database.Database): void {
  db.transaction(() => {
    const version = db.pragma('user_version', { simple: true }) as number;
    for (const m of MIGRATIONS) {
      if (m.version <= version) continue;
      db.exec(m.sql);
      db.pragma(`user_version = ${m.version}`);
    }
  }).immediate();
}

/** Creates the store if it is missing and applies pending migrations; returns the versions before and after. */
export function migrateFile(file: string): { from: number; to: number; created: boolean } {
  const created = !fs.existsSync(file);
  const db = openDatabase(file, true);
  try {
    const from = db.pragma('user_version', { simple: true }) as number;
    if (from > SCHEMA_VERSION) throw new StoreError(`${file} has schema version ${from}, newer than this mfagate (${SCHEMA_VERSION})`);
    giveToDaemonUser([file, ...companions(file)], [file, path.dirname(file)]);
    migrate(db);
    return { from, to: db.pragma('user_version', { simple: true }) as number, created };
  } finally {
    db.close();
  }
}
