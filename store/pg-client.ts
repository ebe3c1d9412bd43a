// The connection to PostgreSQL: node-postgres (pg), with the part it lacks written here: libpq's multi-host
// form with target_session_attrs=read-write. The URL's hosts are tried in order and the first one that accepts
// writes (not in recovery, not read-only) is used; a connection error drops the pool, so the next query looks
// again, and finds a promoted standby without a restart. LISTEN runs on a client of its own that reconnects.
//
// Why pg and not postgres.js (which has multi-host built in): postgres.js 3.4.9 throws an uncatchable
// TypeError from a setImmediate when a connection dies with a small write buffered ("Cannot read properties of
// null (reading 'write')", porsager/postgres#1066, #1154, #1208, unfixed in a release); our tests hit it on the
// first failover. A daemon that must survive its database must not crash on the database going away.
import fs from 'node:fs';
import pg from 'pg';
import { type PgSettings, pgUrlProblem } from '../config/postgresql.js';
import { StoreError } from './sqlite-file.js';

export type Row = Record<string, unknown>;

export interface Queryable {
  /** With `arrays`, each row is an array of its columns (no object per row: a million-row load). */
  query(text: string, params?: readonly unknown[], arrays?: boolean): Promise<{ rows: Row[]; rowCount: number }>;
}

const queryConfig = (text: string, params: readonly unknown[], arrays: boolean): pg.QueryConfig =>
  ({ text, values: params as unknown[], ...(arrays ? { rowMode: 'array' } : {}) }) as pg.QueryConfig;

interface Host {
  host: string;
  port: number;
}

/** Parses the hosts, user and database of a URL that pgUrlProblem accepted. */
function parseUrl(url: string): { hosts: Host[]; user: string | undefined; database: string } {
  const m = /^postgres(?:ql)?:\/\/(?:([^@/]*)@)?([^/?#]*)\/([^?#]*)$/.exec(url);
  if (!m) throw new StoreError(`[store] url: ${pgUrlProblem(url) ?? 'cannot parse it'}`);
  const hosts = (m[2] ?? '').split(',').map((h) => {
    const v6 = /^\[([^\]]+)\](?::(\d+))?$/.exec(h);
    if (v6) return { host: v6[1] as string, port: Number(v6[2] ?? 5432) };
    const [host, port] = h.split(':');
    return { host: host as string, port: Number(port ?? 5432) };
  });
  return { hosts, user: m[1] ? decodeURIComponent(m[1]) : undefined, database: decodeURIComponent(m[3] ?? '') };
}

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

/** Times are ms since the epoch in BIGINT: numbers, as SQLite gives them (exact up to 2^53). */
const types = {
  getTypeParser: ((oid: number, format?: 'text' | 'binary') =>
    oid === 20 ? (v: string) => Number(v) : pg.types.getTypeParser(oid, format as 'text')) as typeof pg.types.getTypeParser,
};

/**
 * Whether an error means this connection or host is no good (refused, reset, shut down, read-only now: a
 * demoted primary), as opposed to an error of the statement itself.
 */
export function isConnectionError(e: unknown): boolean {
  const code = (e as { code?: unknown }).code;
  if (typeof code !== 'string' || !/^[0-9A-Z]{5}$/.test(code)) return true;
  return /^08|^57P0[123]|^25006|^53300/.test(code);
}

/** Clients that carry a permanent listener for late errors. */
const guarded = new WeakSet<pg.PoolClient>();

export class PgDb implements Queryable {
  private readonly hosts: Host[];
  private readonly config: pg.PoolConfig;
  private pool: pg.Pool | undefined;
  private choosing: Promise<pg.Pool> | undefined;
  private ended = false;
  private readonly listeners = new Set<{ close(): Promise<void> }>();

  constructor(
    readonly settings: PgSettings,
    opts: { max?: number; applicationName?: string; queryTimeoutMs?: number } = {},
  ) {
    const problem = pgUrlProblem(settings.url);
    if (problem) throw new StoreError(`[store] url: ${problem}`);
    const { hosts, user, database } = parseUrl(settings.url);
    this.hosts = hosts;
    const ssl =
      settings.tls === 'disable'
        ? false
        : settings.tls === 'require'
          ? { rejectUnauthorized: false }
          : { rejectUnauthorized: true, ...(settings.caFile ? { ca: fs.readFileSync(settings.caFile, 'utf8') } : {}) };
    this.config = {
      ...(user !== undefined ? { user } : {}),
      database,
      ...(settings.passwordFile !== undefined ? { password: readPassword(settings.passwordFile) } : {}),
      ssl,
      max: opts.max ?? 4,
      connectionTimeoutMillis: 5000,
      idleTimeoutMillis: 60_000,
      // A statement that hangs (a network that drops packets) fails instead of holding a write forever.
      query_timeout: opts.queryTimeoutMs ?? 15_000,
      application_name: opts.applicationName ?? 'mfagate',
      types,
    };
  }

  /** A connected client on a host that accepts writes, trying the URL's hosts in order. */
  private async connectWritable(): Promise<{ host: Host; client: pg.Client }> {
    const problems: string[] = [];
    for (const host of this.hosts) {
      const client = new pg.Client({ ...this.config, ...host });
      client.on('error', () => undefined);
      try {
        await client.connect();
        const r = await client.query("SELECT pg_is_in_recovery() AS standby, current_setting('transaction_read_only') AS ro");
        const row = r.rows[0] as { standby: boolean; ro: string } | undefined;
        if (row && !row.standby && row.ro === 'off') return { host, client };
        problems.push(`${host.host}:${host.port}: read-only (a standby)`);
      } catch (e) {
        problems.push(`${host.host}:${host.port}: ${(e as Error).message}`);
      }
      await client.end().catch(() => undefined);
    }
    throw new StoreError(`no host accepts writes (${problems.join('; ')})`);
  }

  /**
   * How many times a host was chosen (a new pool). When it moves, the server may be another one (a promoted
   * standby that lacks the last transactions of the old primary, and hands out ids again): a reader that
   * follows the change feed must load whole rather than trust the ids it has seen.
   */
  generation = 0;

  private async writablePool(): Promise<pg.Pool> {
    if (this.ended) throw new StoreError('the database connection is closed');
    if (this.pool) return this.pool;
    this.choosing ??= (async () => {
      const { host, client } = await this.connectWritable();
      await client.end().catch(() => undefined);
      this.generation++;
      const pool = new pg.Pool({ ...this.config, ...host });
      // An idle client whose server went away: forget the pool; the next query chooses again.
      pool.on('error', () => this.drop(pool));
      this.pool = pool;
      return pool;
    })().finally(() => (this.choosing = undefined));
    return this.choosing;
  }

  private drop(pool: pg.Pool): void {
    if (this.pool !== pool) return;
    this.pool = undefined;
    pool.end().catch(() => undefined);
  }

  async query(text: string, params: readonly unknown[] = [], arrays = false): Promise<{ rows: Row[]; rowCount: number }> {
    const pool = await this.writablePool();
    try {
      const r = await pool.query(queryConfig(text, params, arrays));
      return { rows: r.rows as Row[], rowCount: r.rowCount ?? 0 };
    } catch (e) {
      if (isConnectionError(e)) this.drop(pool);
      throw e;
    }
  }

  /** Runs `fn` in one transaction on one connection: committed when it resolves, rolled back when it throws. */
  async begin<T>(fn: (tx: Queryable) => Promise<T>, mode = ''): Promise<T> {
    const pool = await this.writablePool();
    let client: pg.PoolClient;
    try {
      client = await pool.connect();
    } catch (e) {
      if (isConnectionError(e)) this.drop(pool);
      throw e;
    }
    let broken = false;
    // While it is checked out, an error between statements (the server gone) is emitted on the client itself:
    // without a listener it would end the process.
    const onError = () => (broken = true);
    if (!guarded.has(client)) {
      // And after it is given back and destroyed, a late error must find a listener too.
      client.on('error', () => undefined);
      guarded.add(client);
    }
    client.on('error', onError);
    const tx: Queryable = {
      query: async (text, params = [], arrays = false) => {
        try {
          const r = await client.query(queryConfig(text, params, arrays));
          return { rows: r.rows as Row[], rowCount: r.rowCount ?? 0 };
        } catch (e) {
          if (isConnectionError(e)) broken = true;
          throw e;
        }
      },
    };
    try {
      await tx.query(`BEGIN ${mode}`);
      const result = await fn(tx);
      await tx.query('COMMIT');
      return result;
    } catch (e) {
      if (!broken) await client.query('ROLLBACK').catch(() => (broken = true));
      if (broken) this.drop(pool);
      throw e;
    } finally {
      client.off('error', onError);
      client.release(broken);
    }
  }

  /**
   * LISTEN on a client of its own, on the host that accepts writes (NOTIFY is not relayed to standbys). When
   * it breaks it reconnects every `retryMs`, choosing the host again; `onConnect` runs at each (re)connection,
   * so that the caller reads what it may have missed.
   */
  async listen(channel: string, onNotify: () => void, onConnect: () => void, retryMs = 1000): Promise<{ close(): Promise<void> }> {
    if (!/^[a-z_][a-z0-9_]*$/.test(channel)) throw new Error(`bad channel name ${channel}`);
    let closed = false;
    let client: pg.Client | undefined;
    let timer: NodeJS.Timeout | undefined;
    const connect = async (): Promise<void> => {
      const c = (await this.connectWritable()).client;
      c.on('notification', (n) => n.channel === channel && onNotify());
      const lost = () => {
        if (client !== c) return;
        client = undefined;
        c.end().catch(() => undefined);
        if (!closed) timer = setTimeout(retry, retryMs).unref();
      };
      c.on('error', lost);
      c.on('end', lost);
      await c.query(`LISTEN ${channel}`);
      if (closed) {
        await c.end().catch(() => undefined);
        return;
      }
      client = c;
      onConnect();
    };
    const retry = () => {
      timer = undefined;
      if (closed) return;
      connect().catch(() => {
        if (!closed) timer = setTimeout(retry, retryMs).unref();
      });
    };
    await connect();
    const handle = {
      close: async () => {
        closed = true;
        if (timer) clearTimeout(timer);
        const c = client;
        client = undefined;
        await c?.end().catch(() => undefined);
        this.listeners.delete(handle);
      },
    };
    this.listeners.add(handle);
    return handle;
  }

  async end(): Promise<void> {
    this.ended = true;
    await Promise.all([...this.listeners].map((l) => l.close()));
    const pool = this.pool;
    this.pool = undefined;
    await this.choosing?.catch(() => undefined);
    await (pool ?? this.pool)?.end().catch(() => undefined);
  }
}
