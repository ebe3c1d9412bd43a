// PostgreSQL: the connection (postgres.js), the schema's migrations, and copying a SQLite store in.
//
// postgres.js rather than node-postgres: it speaks libpq's multi-host form with target_session_attrs (the
// failover to a promoted standby the store needs) and LISTEN with reconnection, in plain JavaScript with its
// own types and no dependencies; node-postgres has neither multi-host nor target_session_attrs.
import fs from 'node:fs';
import postgres from 'postgres';
import { type PgSettings, pgUrlProblem } from '../config/postgresql.js';
import { MIGRATIONS, SCHEMA_VERSION } from './migrations.js';
import { StoreError } from './sqlite-file.js';
import type { LiveCopy } from './live-copy.js';
import type { Store } from './store.js';

export type Sql = postgres.Sql<Record<string, never>>;

/** A short form of the URL for messages (it holds no password: pgUrlProblem refused those). */
export const describePg = (s: PgSettings) => s.url;

function readPassword(file: string): string {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw new StoreError(`cannot read the database password file ${file}: ${(e as Error).message}`);
  }
  const line = text.split(/\r?\n/)[0] ?? '';
  if (line === '') throw new StoreError(`the database password file ${file} is empty`);
  return line;
}

/** Opens a pool. Nothing connects until the first query. */
export function openPg(s: PgSettings, opts: { max?: number; applicationName?: string } = {}): Sql {
  const problem = pgUrlProblem(s.url);
  if (problem) throw new StoreError(`[store] url: ${problem}`);
  const ssl =
    s.tls === 'disable' ? false : s.tls === 'require' ? { rejectUnauthorized: false } : { rejectUnauthorized: true, ...(s.caFile ? { ca: fs.readFileSync(s.caFile, 'utf8') } : {}) };
  return postgres(s.url, {
    ...(s.passwordFile !== undefined ? { password: readPassword(s.passwordFile) } : {}),
    ssl,
    max: opts.max ?? 4,
    // A promoted standby takes over: connections go to whichever listed host accepts writes.
    target_session_attrs: 'read-write',
    connect_timeout: 5,
    idle_timeout: 60,
    onnotice: () => undefined,
    connection: { application_name: opts.applicationName ?? 'mfagate' },
    // Times are ms since the epoch in BIGINT: numbers, as SQLite gives them (exact up to 2^53).
    types: { bigint: { to: 20, from: [20], serialize: (v: number) => String(v), parse: (v: string) => Number(v) } } as unknown as Record<string, never>,
  }) as unknown as Sql;
}

/** Makes the message of a connection failure say which database and what to check. */
export function pgError(s: PgSettings, e: unknown): StoreError {
  if (e instanceof StoreError) return e;
  const msg = e instanceof Error ? e.message : String(e);
  return new StoreError(`PostgreSQL at ${describePg(s)}: ${msg}`);
}

/** Opens a pool for one command, runs `fn`, and closes the pool; errors name the database. */
export async function withPg<T>(s: PgSettings, fn: (sql: Sql) => Promise<T>): Promise<T> {
  const sql = openPg(s, { max: 1, applicationName: 'mfagate-cli' });
  try {
    return await fn(sql);
  } catch (e) {
    throw pgError(s, e);
  } finally {
    await sql.end({ timeout: 5 });
  }
}

/** The lock `db migrate` holds, so that two nodes starting at once do not both migrate. */
const MIGRATE_LOCK = 7305626406431916082n;

export async function pgSchemaVersion(sql: Sql): Promise<number> {
  const [t] = await sql`SELECT to_regclass('mfagate_schema') IS NOT NULL AS present`;
  if (!t?.['present']) return 0;
  const [r] = await sql`SELECT version FROM mfagate_schema`;
  return (r?.['version'] as number | undefined) ?? 0;
}

/** Applies pending migrations, each in its own transaction; returns the versions before and after. */
export async function migratePg(sql: Sql): Promise<{ from: number; to: number }> {
  return sql.begin(async (tx) => {
    await tx`SELECT pg_advisory_xact_lock(${MIGRATE_LOCK.toString()}::bigint)`;
    await tx`CREATE TABLE IF NOT EXISTS mfagate_schema (version INTEGER NOT NULL)`;
    const [row] = await tx`SELECT version FROM mfagate_schema`;
    if (!row) await tx`INSERT INTO mfagate_schema (version) VALUES (0)`;
    const from = (row?.['version'] as number | undefined) ?? 0;
    if (from > SCHEMA_VERSION) throw new StoreError(`the database has schema version ${from}, newer than this mfagate (${SCHEMA_VERSION}): upgrade mfagate`);
    for (const m of MIGRATIONS) {
      if (m.version <= from) continue;
      await tx.unsafe(m.postgresql);
      await tx`UPDATE mfagate_schema SET version = ${m.version}`;
    }
    return { from, to: SCHEMA_VERSION };
  }) as Promise<{ from: number; to: number }>;
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
export async function copyToPg(store: Store, sql: Sql, batch = 1000): Promise<CopyReport[]> {
  const version = await pgSchemaVersion(sql);
  if (version !== store.schemaVersion) {
    throw new StoreError(`the database is at schema version ${version}, the store at ${store.schemaVersion}: run "mfagate db migrate" on both first`);
  }
  return sql.begin(async (tx) => {
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
        const result = await tx.unsafe(
          `INSERT INTO ${quote(table)} AS t (${cols}) ${identity ? 'OVERRIDING SYSTEM VALUE ' : ''}VALUES ${tuples.join(', ')} ` +
            `ON CONFLICT (${conflict}) DO UPDATE SET ${update} WHERE ${differs} RETURNING (t.xmax = 0) AS inserted`,
          params as never[],
        );
        for (const r of result) {
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
        // New rows made in PostgreSQL must not take ids the copy brought.
        await tx.unsafe(`SELECT setval(pg_get_serial_sequence('${table}', 'id'), greatest((SELECT max(id) FROM ${quote(table)}), 1))`);
      }
      reports.push({ table, read, added, updated });
    }
    return reports;
  }) as Promise<CopyReport[]>;
}

/**
 * Loads a node's in-memory copy (store/live-copy.ts) from PostgreSQL in one snapshot: users with a flag, active
 * grants, and the change id the copy is current to.
 */
export async function loadPgCopy(sql: Sql, copy: LiveCopy, now: number): Promise<void> {
  await sql.begin('ISOLATION LEVEL REPEATABLE READ READ ONLY', async (tx) => {
    const [latest] = await tx`SELECT coalesce(max(id), 0) AS id FROM changes`;
    const users = await tx`SELECT name, mfa_enabled, exempt FROM users WHERE mfa_enabled = 1 OR exempt = 1`.values();
    const grants = await tx`SELECT "user", block, id, expires_at FROM grants WHERE revoked_at IS NULL AND expires_at > ${now} ORDER BY "user"`.values();
    copy.replaceAll(users, grants, (latest?.['id'] as number | undefined) ?? 0, now);
  });
}
