// The seam between the store's records (users, grants, factors, passcodes, logins, audit) and the database that
// holds them. The records are written once, in SQL both SQLite and PostgreSQL accept ("user" quoted, `?`
// placeholders, RETURNING id, no dialect functions); an Sql runs it on one or the other.
//
// A write transaction is one at a time, as SQLite's BEGIN IMMEDIATE is: on PostgreSQL it takes the change feed's
// lock first (see migration 5), so writers queue in one order and never deadlock on the feed's trigger. Inside
// a transaction every call on the same Sql runs in it, even one made through a function that does not know it
// is inside one (AsyncLocalStorage): a forgotten handle cannot deadlock against the open transaction or escape it.
export type Row = Record<string, unknown>;

export type SqlParam = string | number | bigint | Buffer | null;

export interface Sql {
  readonly dialect: 'sqlite' | 'postgresql';
  get(text: string, params?: readonly SqlParam[]): Promise<Row | undefined>;
  all(text: string, params?: readonly SqlParam[]): Promise<Row[]>;
  /** A statement that writes; resolves to how many rows it changed. */
  run(text: string, params?: readonly SqlParam[]): Promise<number>;
  /** An INSERT into a table with an id column; resolves to the new row's id. */
  insert(text: string, params?: readonly SqlParam[]): Promise<number>;
  /**
   * Runs `fn` in one write transaction: committed when it resolves, rolled back when it throws. Nested calls
   * join the open transaction.
   */
  tx<T>(fn: () => Promise<T>): Promise<T>;
  /** Runs `fn` in one read snapshot (several reads that must agree). */
  snapshot<T>(fn: () => Promise<T>): Promise<T>;
}

/** A number column (SQLite integers and PostgreSQL BIGINT both come back as numbers). */
export const num = (r: Row | undefined, column: string): number => Number(r?.[column] ?? 0);

/** A nullable number column. */
export const nullable = (v: unknown): number | null => (v === null || v === undefined ? null : Number(v));
