// Opening the store a configuration names, whichever backend: what the daemon and the CLI hold in common (the
// records, and where they are, for messages). What only one backend has (SQLite's file, PostgreSQL's feed) stays
// with its own module; `sqlite` is set for the one, `pg` for the other.
import type { Config } from '../config/config.js';
import type { PgSettings } from '../config/postgresql.js';
import { SCHEMA_VERSION } from './migrations.js';
import { type PgDb, migratePg, openPg, pgError, pgSchemaVersion } from './pg.js';
import { PgSql } from './pg-sql.js';
import { Records } from './records.js';
import { type OpenOptions, Store, StoreError } from './store.js';

export interface OpenedStore {
  readonly backend: 'sqlite' | 'postgresql';
  readonly records: Records;
  /** The store, for messages: the SQLite file, or the database's URL (which never holds a password). */
  readonly where: string;
  /** The SQLite file, when the backend is SQLite. */
  readonly file: string | undefined;
  readonly sqlite: Store | undefined;
  readonly pg: { db: PgDb; sql: PgSql; settings: PgSettings } | undefined;
  close(): Promise<void>;
}

export function sqliteStore(store: Store): OpenedStore {
  return {
    backend: 'sqlite',
    records: store.records,
    where: store.file,
    file: store.file,
    sqlite: store,
    pg: undefined,
    close: async () => store.close(),
  };
}

/**
 * Opens PostgreSQL and checks its schema: an older one is migrated when `migrate` (at most one node migrates at a
 * time), else it is an error that says what to do. A database without the schema gets one only with `create`
 * (`db migrate`, `serve --create-store`): a URL naming the wrong database must not give an empty store, which
 * would let in every user who enabled MFA.
 */
export async function openPgStore(
  settings: PgSettings,
  opts: { migrate?: boolean; create?: boolean; applicationName?: string; max?: number; queryTimeoutMs?: number } = {},
): Promise<OpenedStore> {
  const db = openPg(settings, { applicationName: opts.applicationName ?? 'mfagate', ...(opts.max !== undefined ? { max: opts.max } : {}), ...(opts.queryTimeoutMs !== undefined ? { queryTimeoutMs: opts.queryTimeoutMs } : {}) });
  try {
    let version = await pgSchemaVersion(db);
    if (version < SCHEMA_VERSION && opts.migrate && (version > 0 || opts.create)) version = (await migratePg(db)).to;
    if (version > SCHEMA_VERSION) throw new StoreError(`the database has schema version ${version}, newer than this mfagate (${SCHEMA_VERSION}): upgrade mfagate`);
    if (version === 0) throw new StoreError(`the database holds no mfagate schema: check [store] url; for a new installation, create it with "mfagate db migrate"`);
    if (version < SCHEMA_VERSION) throw new StoreError(`the database has schema version ${version}, expected ${SCHEMA_VERSION}: run "mfagate db migrate"`);
  } catch (e) {
    await db.end();
    throw e instanceof StoreError ? new StoreError(`PostgreSQL at ${settings.url}: ${e.message}`) : pgError(settings, e);
  }
  const sql = new PgSql(db);
  return {
    backend: 'postgresql',
    records: new Records(sql),
    where: `PostgreSQL at ${settings.url}`,
    file: undefined,
    sqlite: undefined,
    pg: { db, sql, settings },
    close: () => db.end(),
  };
}

/** The store of a configuration. */
export async function openStore(config: Config, opts: OpenOptions & { applicationName?: string } = {}): Promise<OpenedStore> {
  if (config.store.backend === 'postgresql') return openPgStore(config.store, { migrate: opts.migrate ?? false, ...(opts.applicationName ? { applicationName: opts.applicationName } : {}) });
  return sqliteStore(Store.open(config.store.path, opts));
}
