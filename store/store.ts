// The SQLite backend: one file shared by the daemon and the CLI. WAL, every writing transaction BEGIN
// IMMEDIATE, schema migrations on open. Its records (store/records.ts) are the same as PostgreSQL's; what is
// SQLite's own is here: the file (mended when deleted or replaced under the daemon) and the daemon's
// in-memory copy, brought up to date synchronously before each decision.
import fs from 'node:fs';
import path from 'node:path';
import type Database from 'better-sqlite3';
import type { Facts, GrantFacts, LookupResult } from '../policy/decide.js';
import { LiveCopy, type UserState } from './live-copy.js';
import { passcodeFromRow } from './passcode-store.js';
import { Records } from './records.js';
import { SqliteSql } from './sqlite-sql.js';
import { giveToDaemonUser } from './ownership.js';
import { MIGRATIONS, SCHEMA_VERSION } from './migrations.js';
import { type FileState, OpenedFile, StoreError, companions, openDatabase } from './sqlite-file.js';

export { type FileState, STORE_FILE_MODE, StoreError, missingStoreMessage } from './sqlite-file.js';
export type { AuditRow, CopyState, DaemonStatsRow, GrantFilter, GrantRow, LoginReport, LoginRow, NewGrant, UserRow } from './records.js';

type Row = Record<string, unknown>;

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
  private conn!: { db: Database.Database; st: Statements };
  /** Which file the path named when it was opened. */
  private opened!: OpenedFile;
  /** The records on this file (users, grants, factors, passcodes, logins, audit), as on PostgreSQL. */
  readonly records: Records;

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
    this.records = new Records(new SqliteSql(() => this.conn.db));
  }

  /** The open database (the handle changes when restoreFile reopens the store: never keep it). */
  get db(): Database.Database {
    return this.conn.db;
  }

  private get st(): Statements {
    return this.conn.st;
  }

  /** The connection's own wait for another process's lock (ms); see setBusyTimeout. */
  private busyTimeoutMs = 5000;

  /**
   * How long a statement of this connection waits, blocking, for another process's lock. The daemon keeps it
   * short: its async writes wait between turns of the event loop instead (store/sqlite-sql.ts), so a CLI
   * holding the write lock never stops decisions. The CLI keeps the default (5 s).
   */
  setBusyTimeout(ms: number): void {
    this.busyTimeoutMs = ms;
    this.conn.db.pragma(`busy_timeout = ${Math.max(0, Math.round(ms))}`);
  }

  private attach(db: Database.Database): void {
    if (this.busyTimeoutMs !== 5000) db.pragma(`busy_timeout = ${this.busyTimeoutMs}`);
    this.conn = { db, st: prepareStatements(db) };
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
    return { flags, grants, passcodes: (this.st.userPasscodes.all(user) as Row[]).map(passcodeFromRow) };
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
        // While a write transaction of this process is open the connection would read what it has not
        // committed: the copy stays as it is for this decision (the transaction's commit is seen by the next).
        if (this.db.inTransaction) return;
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
        copy.replaceAll(users, this.st.activeGrants.iterate(now) as IterableIterator<unknown[]>, (this.st.allPasscodes.all() as Row[]).map(passcodeFromRow), latest, now);
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

}

function prepareStatements(db: Database.Database) {
  return {
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
    latestChange: db.prepare("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").pluck(),
    changesSince: db.prepare('SELECT id, user FROM changes WHERE id > ? ORDER BY id LIMIT ?'),
    userFlags: db.prepare('SELECT mfa_enabled, exempt FROM users WHERE name = ?'),
    userGrants: db.prepare('SELECT block, id, expires_at FROM grants WHERE user = ? AND revoked_at IS NULL'),
    userPasscodes: db.prepare('SELECT * FROM passcodes WHERE user = ? ORDER BY created_at, id'),
    allPasscodes: db.prepare('SELECT * FROM passcodes'),
    flaggedUsers: db.prepare('SELECT name, mfa_enabled, exempt FROM users WHERE mfa_enabled = 1 OR exempt = 1').raw(),
    // The partial index of active grants holds every column asked for (id is its rowid), in user order: one
    // sequential read. Left to itself SQLite takes the expiry index and visits each row, three times slower.
    activeGrants: db.prepare('SELECT user, block, id, expires_at FROM grants INDEXED BY grants_active WHERE revoked_at IS NULL AND expires_at > ?').raw(),
    purgedUpto: db.prepare('SELECT upto FROM changes_purged WHERE id = 1').pluck(),
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
