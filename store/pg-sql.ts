// Sql (store/sql.ts) on PostgreSQL (store/pg-client.ts). Statements are written with `?` placeholders and
// numbered here. A write transaction takes the change feed's lock before anything else (the feed's trigger
// takes it too, at the first change: taken first, writers queue in one order and cannot deadlock holding rows
// the other waits for). After a write commits, `afterWrite` runs (the daemon waits there until its own copy
// has the change: the very next decision sees it).
import { AsyncLocalStorage } from 'node:async_hooks';
import { type PgDb, type Queryable, isConnectionError } from './pg-client.js';
import { StoreError, StoreUnavailableError } from './sqlite-file.js';
import type { Row, Sql, SqlParam } from './sql.js';

/** The change feed's lock (migration 5's mfagate_change()). */
export const FEED_LOCK = '7305626406431916081';

interface Tx {
  q: Queryable;
  active: boolean;
}

const numbered = new Map<string, string>();

/** `?` placeholders as $1, $2, … (the store's SQL has no `?` inside literals). */
export function pgText(text: string): string {
  let t = numbered.get(text);
  if (t === undefined) {
    let n = 0;
    t = text.replace(/\?/g, () => `$${++n}`);
    numbered.set(text, t);
  }
  return t;
}

/**
 * A failure to reach the database (refused, reset, timed out, no host accepts writes) as StoreUnavailableError;
 * an error of the statement itself stays as it is.
 */
function unavailable(e: unknown): unknown {
  if (e instanceof StoreUnavailableError) return e;
  const message = e instanceof Error ? e.message : String(e);
  if (e instanceof StoreError || isConnectionError(e)) return new StoreUnavailableError(`the database cannot be reached: ${message}`);
  return e;
}

export class PgSql implements Sql {
  readonly dialect = 'postgresql' as const;
  private readonly inside = new AsyncLocalStorage<Tx>();
  /** Runs after a write committed (the daemon: bring its own copy up to date). */
  afterWrite: (() => Promise<void>) | undefined;

  constructor(readonly db: PgDb) {}

  private current(): Tx | undefined {
    const t = this.inside.getStore();
    return t?.active ? t : undefined;
  }

  async get(text: string, params: readonly SqlParam[] = []): Promise<Row | undefined> {
    return (await this.all(text, params))[0];
  }

  async all(text: string, params: readonly SqlParam[] = []): Promise<Row[]> {
    try {
      return (await (this.current()?.q ?? this.db).query(pgText(text), params)).rows;
    } catch (e) {
      throw unavailable(e);
    }
  }

  async run(text: string, params: readonly SqlParam[] = []): Promise<number> {
    return (await this.write(pgText(text), params)).rowCount;
  }

  async insert(text: string, params: readonly SqlParam[] = []): Promise<number> {
    return Number((await this.write(`${pgText(text)} RETURNING id`, params)).rows[0]?.['id']);
  }

  private async write(text: string, params: readonly SqlParam[]): Promise<{ rows: Row[]; rowCount: number }> {
    const t = this.current();
    let r: { rows: Row[]; rowCount: number };
    try {
      if (t) return await t.q.query(text, params);
      r = await this.db.query(text, params);
    } catch (e) {
      throw unavailable(e);
    }
    await this.afterWrite?.();
    return r;
  }

  async tx<T>(fn: () => Promise<T>): Promise<T> {
    if (this.current()) return fn();
    const value = await this.begin(async (q) => {
      await q.query('SELECT pg_advisory_xact_lock($1::bigint)', [FEED_LOCK]).catch((e: unknown) => {
        throw unavailable(e);
      });
      return this.within({ q, active: true }, fn);
    });
    await this.afterWrite?.();
    return value;
  }

  async snapshot<T>(fn: () => Promise<T>): Promise<T> {
    if (this.current()) return fn();
    return this.begin((q) => this.within({ q, active: true }, fn), 'ISOLATION LEVEL REPEATABLE READ READ ONLY');
  }

  /** A transaction whose own errors (the caller's: a wrong code) pass as they are; the database's are sorted. */
  private async begin<T>(fn: (q: Queryable) => Promise<T>, mode?: string): Promise<T> {
    const own = new Set<unknown>();
    try {
      return await this.db.begin(async (q) => {
        try {
          return await fn(q);
        } catch (e) {
          own.add(e);
          throw e;
        }
      }, mode);
    } catch (e) {
      throw own.has(e) ? e : unavailable(e);
    }
  }

  private async within<T>(tx: Tx, fn: () => Promise<T>): Promise<T> {
    try {
      return await this.inside.run(tx, fn);
    } finally {
      tx.active = false;
    }
  }
}
