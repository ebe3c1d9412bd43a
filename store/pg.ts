// PostgreSQL: opening it (store/pg-client.ts), the schema's migrations, copying a SQLite store in, and
// loading a node's in-memory copy.
import { type PgSettings } from '../config/postgresql.js';
import { MIGRATIONS, SCHEMA_VERSION } from './migrations.js';
import { PgDb, type Queryable } from './pg-client.js';
import { StoreError } from './sqlite-file.js';
import { LiveCopy } from './live-copy.js';
import { passcodeFromRow } from './passcode-store.js';
import type { Store } from './store.js';

export { PgDb } from './pg-client.js';

/** Opens the database. Nothing connects until the first query. */
export function openPg(s: PgSettings, opts: { max?: number; applicationName?: string; queryTimeoutMs?: number } = {}): PgDb {
  return new PgDb(s, opts);
}

/** Makes the message of a connection failure say which database (the URL holds no password: refused). */
export function pgError(s: PgSettings, e: unknown): StoreError {
  const msg = e instanceof Error ? e.message : String(e);
  return new StoreError(`PostgreSQL at ${s.url}: ${msg}`);
}

/** Opens the database for one command, runs `fn`, and closes it; errors name the database. */
export async function withPg<T>(s: PgSettings, fn: (db: PgDb) => Promise<T>): Promise<T> {
  // A command may copy a large store: statements may take minutes, but not forever.
  const db = openPg(s, { max: 1, applicationName: 'mfagate-cli', queryTimeoutMs: 600_000 });
  try {
    return await fn(db);
  } catch (e) {
    throw pgError(s, e);
  } finally {
    await db.end();
  }
}

/** The lock `db migrate` holds, so that two nodes starting at once do not both migrate. */
const MIGRATE_LOCK = '7305626406431916082';

export async function pgSchemaVersion(db: Queryable): Promise<number> {
  const t = (await db.query("SELECT to_regclass('mfagate_schema') IS NOT NULL AS present")).rows[0];
  if (!t?.['present']) return 0;
  const r = (await db.query('SELECT version FROM mfagate_schema')).rows[0];
  return (r?.['version'] as number | undefined) ?? 0;
}

/**
 * Applies pending migrations, all in one transaction (all or none), under a lock: a second migrator waits, then
 * finds the schema up to date. Returns the versions before and after.
 */
export async function migratePg(db: PgDb): Promise<{ from: number; to: number }> {
  return db.begin(async (tx) => {
    await tx.query('SELECT pg_advisory_xact_lock($1::bigint)', [MIGRATE_LOCK]);
    await tx.query('CREATE TABLE IF NOT EXISTS mfagate_schema (version INTEGER NOT NULL)');
    const row = (await tx.query('SELECT version FROM mfagate_schema')).rows[0];
    if (!row) await tx.query('INSERT INTO mfagate_schema (version) VALUES (0)');
    const from = (row?.['version'] as number | undefined) ?? 0;
    if (from > SCHEMA_VERSION) throw new StoreError(`the database has schema version ${from}, newer than this mfagate (${SCHEMA_VERSION}): upgrade mfagate`);
    for (const m of MIGRATIONS) {
      if (m.version <= from) continue;
      await tx.query(m.postgresql);
      await tx.query('UPDATE mfagate_schema SET version = $1', [m.version]);
    }
    return { from, to: SCHEMA_VERSION };
  });
}

/** The tables a store holds, in an order that keeps references whole, with their key columns. */
const COPIED: readonly { table: string; key: readonly string[]; identity: boolean }[] = [
  { table: 'users', key: ['name'], identity: false },
  { table: 'grants', key: ['id'], identity: true },
  { table: 'logins', key: ['user', 'ip'], identity: false },
  { table: 'audit', key: ['id'], identity: true },
  { table: 'factors', key: ['user'], identity: false },
  { table: 'email_codes', key: ['id'], identity: true },
  { table: 'backup_codes', key: ['user', 'code_hash'], identity: false },
  { table: 'failures', key: ['id'], identity: true },
  { table: 'passcodes', key: ['id'], identity: true },
];

export interface CopyReport {
  table: string;
  read: number;
  /** Rows that were not in the database. */
  added: number;
  /** Rows that were there with other values (changed in the SQLite store since an earlier copy). */
  updated: number;
}

const quote = (c: string) => `"${c.replace(/"/g, '""')}"`;

/**
 * Copies a SQLite store into a PostgreSQL database at the same schema version: every row of every table but
 * the daemon's statistics and the change feed (nodes load whole at start). Rows keep their ids. A row whose key
 * is already there is made to match the store when it differs (a grant revoked, a flag changed since the last
 * copy: a second run must not leave a revoked grant working) and left alone when it does not, so a second run
 * writes nothing twice. Rows only in the database are not touched. One transaction: all or nothing.
 */
export async function copyToPg(store: Store, db: PgDb, batch = 1000): Promise<CopyReport[]> {
  const version = await pgSchemaVersion(db);
  if (version !== store.schemaVersion) {
    throw new StoreError(`the database is at schema version ${version}, the store at ${store.schemaVersion}: run "mfagate db migrate" on both first`);
  }
  // One read snapshot of the store for all tables, so a daemon still writing it cannot make the copy
  // inconsistent between them (WAL: the writer goes on meanwhile).
  store.db.exec('BEGIN DEFERRED');
  try {
    return await copyTables(store, db, batch);
  } finally {
    store.db.exec('COMMIT');
  }
}

async function copyTables(store: Store, db: PgDb, batch: number): Promise<CopyReport[]> {
  return db.begin(async (tx) => {
    const reports: CopyReport[] = [];
    for (const { table, key, identity } of COPIED) {
      const columns = (store.db.prepare(`SELECT name FROM pragma_table_info(?) ORDER BY cid`).pluck().all(table) as string[]);
      const cols = columns.map(quote).join(', ');
      const conflict = key.map(quote).join(', ');
      const others = columns.filter((c) => !key.includes(c));
      const update = others.map((c) => `${quote(c)} = EXCLUDED.${quote(c)}`).join(', ');
      const differs = `(${others.map((c) => `t.${quote(c)}`).join(', ')}) IS DISTINCT FROM (${others.map((c) => `EXCLUDED.${quote(c)}`).join(', ')})`;
      let read = 0;
      let added = 0;
      let updated = 0;
      let rows: Record<string, unknown>[] = [];
      const flush = async () => {
        if (rows.length === 0) return;
        // One statement a batch: a VALUES list of parameters.
        const params: unknown[] = [];
        const tuples = rows.map((r) => `(${columns.map((c) => {
          params.push(r[c] ?? null);
          return `$${params.length}`;
        }).join(', ')})`);
        // Returned: the rows inserted (xmax 0) and the rows updated; a row that already matched is neither.
        const result = await tx.query(
          `INSERT INTO ${quote(table)} AS t (${cols}) ${identity ? 'OVERRIDING SYSTEM VALUE ' : ''}VALUES ${tuples.join(', ')} ` +
            `ON CONFLICT (${conflict}) DO UPDATE SET ${update} WHERE ${differs} RETURNING (t.xmax = 0) AS inserted`,
          params,
        );
        for (const r of result.rows) {
          if (r['inserted']) added++;
          else updated++;
        }
        rows = [];
      };
      for (const r of store.db.prepare(`SELECT * FROM ${quote(table)} ORDER BY ${conflict}`).iterate() as IterableIterator<Record<string, unknown>>) {
        rows.push(r);
        read++;
        if (rows.length >= batch) await flush();
      }
      await flush();
      if (identity) {
        // New rows made in PostgreSQL must not take ids the copy brought, nor ids SQLite gave rows since purged
        // (the audit log names them).
        const used = Number((store.db.prepare('SELECT seq FROM sqlite_sequence WHERE name = ?').pluck().get(table) as number | undefined) ?? 0);
        await tx.query(`SELECT setval(pg_get_serial_sequence('${table}', 'id'), greatest((SELECT max(id) FROM ${quote(table)}), $1::bigint, 1))`, [used]);
      }
      reports.push({ table, read, added, updated });
    }
    return reports;
  });
}

/** Rows fetched at a time while a node loads its copy: the load never holds more raw rows than this. */
const LOAD_BATCH = 20_000;

/**
 * Loads a node's in-memory copy (store/live-copy.ts) from PostgreSQL in one snapshot: users with a flag, active
 * grants, passcodes, and the change id the copy is current to. The grants come through a cursor, a batch at a
 * time, into a copy of their own that replaces `copy` at the end: a million grants never sit in memory as raw
 * rows all at once (V8 would keep the memory they took), and decisions read the old copy until the new one is whole.
 */
export async function loadPgCopy(db: PgDb, copy: LiveCopy, now: number): Promise<void> {
  const fresh = new LiveCopy();
  await db.begin(async (tx) => {
    const latest = (await tx.query('SELECT coalesce(max(id), 0) AS id FROM changes')).rows[0];
    fresh.addUserRows((await tx.query('SELECT name, mfa_enabled, exempt FROM users WHERE mfa_enabled = 1 OR exempt = 1', [], true)).rows as unknown as unknown[][]);
    await tx.query('DECLARE mfagate_load NO SCROLL CURSOR FOR SELECT "user", block, id, expires_at FROM grants WHERE revoked_at IS NULL AND expires_at > $1', [now]);
    for (;;) {
      const rows = (await tx.query(`FETCH FORWARD ${LOAD_BATCH} FROM mfagate_load`, [], true)).rows as unknown as unknown[][];
      fresh.addGrantRows(rows);
      if (rows.length < LOAD_BATCH) break;
    }
    for (const p of (await tx.query('SELECT * FROM passcodes')).rows) fresh.addPasscode(passcodeFromRow(p));
    fresh.lastChange = (latest?.['id'] as number | undefined) ?? 0;
    fresh.currentAt = now;
  }, 'ISOLATION LEVEL REPEATABLE READ READ ONLY');
  copy.adopt(fresh);
}
