// Sql (store/sql.ts) on a better-sqlite3 connection. better-sqlite3 is synchronous; the records above it are
// not, so a write transaction may span several turns of the event loop. A lock makes it one at a time, and
// statements from outside it wait until it ends: on one connection they would otherwise run inside it (and be
// rolled back with it, or see what it has not committed).
import { AsyncLocalStorage } from 'node:async_hooks';
import type Database from 'better-sqlite3';
import type { Row, Sql, SqlParam } from './sql.js';
import { sqliteUnavailable } from './sqlite-file.js';

interface Tx {
  active: boolean;
}

/** How long a write waits for another process's write lock (the CLI's) before the store counts as unavailable. */
const BUSY_WAIT_MS = 5000;

const isBusy = (e: unknown) => typeof (e as { code?: unknown }).code === 'string' && /^SQLITE_BUSY/.test((e as { code: string }).code);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A write found the lock taken by another process: the caller tries again after a pause. */
class BusyRetry extends Error {}

export class SqliteSql implements Sql {
  readonly dialect = 'sqlite' as const;
  private readonly inside = new AsyncLocalStorage<Tx>();
  /** Resolves when the open transaction ends; undefined when none is open. */
  private locked: Promise<void> | undefined;
  private statements = new Map<string, Database.Statement>();
  private preparedFor: Database.Database | undefined;

  /** `db` gives the open connection (it changes when the store's file is restored: never keep it). */
  constructor(private readonly db: () => Database.Database) {}

  /** Runs a statement; an error that says the store cannot be used now becomes StoreUnavailableError. */
  private exec<T>(fn: () => T): T {
    try {
      return fn();
    } catch (e) {
      throw sqliteUnavailable(e) ?? e;
    }
  }

  private statement(text: string): Database.Statement {
    const db = this.db();
    if (db !== this.preparedFor) {
      this.statements = new Map();
      this.preparedFor = db;
    }
    let st = this.statements.get(text);
    if (!st) {
      st = db.prepare(text);
      this.statements.set(text, st);
    }
    return st;
  }

  private inTx(): boolean {
    return this.inside.getStore()?.active === true;
  }

  /**
   * Runs `fn` once no other caller's transaction is open. The check and `fn` run in the same turn of the event
   * loop: with an await between them (an async helper that only waits), a transaction woken at the same time
   * could begin in between, and `fn` would run inside it.
   */
  private async whenFree<T>(fn: () => T): Promise<T> {
    if (!this.inTx()) while (this.locked) await this.locked;
    return this.exec(fn);
  }

  async get(text: string, params: readonly SqlParam[] = []): Promise<Row | undefined> {
    return this.whenFree(() => this.statement(text).get(...params) as Row | undefined);
  }

  async all(text: string, params: readonly SqlParam[] = []): Promise<Row[]> {
    return this.whenFree(() => this.statement(text).all(...params) as Row[]);
  }

  async run(text: string, params: readonly SqlParam[] = []): Promise<number> {
    return this.write(() => this.statement(text).run(...params).changes);
  }

  async insert(text: string, params: readonly SqlParam[] = []): Promise<number> {
    return this.write(() => Number(this.statement(text).run(...params).lastInsertRowid));
  }

  /**
   * A write outside a transaction: while another process holds the write lock it is tried again, for up to
   * BUSY_WAIT_MS, between turns of the event loop (the connection's own busy wait is kept short by the daemon:
   * a wait there would stop every decision with it).
   */
  private async write<T>(fn: () => T): Promise<T> {
    if (this.inTx()) return this.whenFree(fn);
    const deadline = Date.now() + BUSY_WAIT_MS;
    for (let pause = 5; ; pause = Math.min(pause * 2, 100)) {
      try {
        return await this.whenFree(() => {
          try {
            return fn();
          } catch (e) {
            if (isBusy(e) && Date.now() < deadline) throw new BusyRetry();
            throw e;
          }
        });
      } catch (e) {
        if (!(e instanceof BusyRetry)) throw e;
      }
      await sleep(pause);
    }
  }

  async tx<T>(fn: () => Promise<T>): Promise<T> {
    return this.begin('BEGIN IMMEDIATE', fn);
  }

  async snapshot<T>(fn: () => Promise<T>): Promise<T> {
    return this.begin('BEGIN DEFERRED', fn);
  }

  private async begin<T>(begin: string, fn: () => Promise<T>): Promise<T> {
    if (this.inTx()) return fn();
    // Taken in the same turn as the check that it is free (see whenFree): two writers woken by one release
    // must not both begin.
    while (this.locked) await this.locked;
    let release!: () => void;
    this.locked = new Promise((resolve) => (release = resolve));
    const tx: Tx = { active: true };
    try {
      const db = this.db();
      // Another process's write lock: waited for between turns of the event loop (see write).
      for (let pause = 5, deadline = Date.now() + BUSY_WAIT_MS; ; pause = Math.min(pause * 2, 100)) {
        try {
          db.exec(begin);
          break;
        } catch (e) {
          if (!isBusy(e) || Date.now() >= deadline) throw sqliteUnavailable(e) ?? e;
        }
        await sleep(pause);
      }
      try {
        const value = await this.inside.run(tx, fn);
        this.exec(() => db.exec('COMMIT'));
        return value;
      } catch (e) {
        if (db.inTransaction) db.exec('ROLLBACK');
        throw e;
      }
    } finally {
      tx.active = false;
      this.locked = undefined;
      release();
    }
  }
}
