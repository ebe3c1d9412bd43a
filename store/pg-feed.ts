// A node's in-memory copy kept current from PostgreSQL: loaded whole at start, then the change feed read by
// id, woken by NOTIFY (LISTEN mfagate_changes), with a poll by id as the safety net for a notification lost
// on a broken connection. Decisions never wait for it: they read the copy (store/live-copy.ts) as it is.
// When the database cannot be reached the copy stays as it was, and that is said once, not per request; when
// it returns, the feed catches up (or loads whole, if it fell behind the purged part) without a restart.
import type { PgSettings } from '../config/postgresql.js';
import { LiveCopy, type UserState } from './live-copy.js';
import { type PasscodeRow, passcodeFromRow } from './passcode-store.js';
import { type PgDb, loadPgCopy, openPg } from './pg.js';

export interface FeedHooks {
  /** Reading the database failed, for the first time since it last worked. */
  failed?: (error: unknown, currentAt: number) => void;
  /** It works again; the copy is current. */
  recovered?: (staleMs: number) => void;
  /** The copy was loaded whole (at start, or behind the purged feed). */
  loaded?: (ms: number, size: { flaggedUsers: number; grants: number }) => void;
}

export interface FeedState {
  connected: boolean;
  /** When the copy was last known to match the database (ms). */
  currentAt: number;
  lastChange: number;
  /** The last error, while not connected. */
  error: string | undefined;
}

const BATCH = 10_000;

export class PgFeed {
  readonly copy = new LiveCopy();
  private readonly db: PgDb;
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<void> | undefined;
  private again = false;
  private connected = false;
  private failingSince = 0;
  private error: string | undefined;
  private unlisten: (() => Promise<void>) | undefined;
  private stopped = false;

  constructor(
    settings: PgSettings,
    private readonly hooks: FeedHooks = {},
    private readonly opts: { clock?: () => number; pollMs?: number } = {},
  ) {
    this.db = openPg(settings, { max: 2, applicationName: 'mfagate-feed' });
  }

  private now(): number {
    return (this.opts.clock ?? Date.now)();
  }

  /**
   * Loads the copy and starts following the feed. Rejects when the database cannot be reached now: a node with
   * no copy at all has nothing to decide from (systemd restarts it until the database is there).
   */
  async start(): Promise<void> {
    try {
      await this.load();
      const listener = await this.db.listen('mfagate_changes', () => void this.poke(), () => void this.poke());
      this.unlisten = () => listener.close();
    } catch (e) {
      await this.db.end();
      throw e;
    }
    this.connected = true;
    this.timer = setInterval(() => this.poke(), this.opts.pollMs ?? 1000);
    this.timer.unref();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
    await this.running;
    await this.unlisten?.().catch(() => undefined);
    await this.db.end();
  }

  state(): FeedState {
    return { connected: this.connected, currentAt: this.copy.currentAt, lastChange: this.copy.lastChange, error: this.connected ? undefined : this.error };
  }

  /** Reads the feed now (or once more after the read in progress). Resolves when the copy is as current as it can be. */
  poke(): Promise<void> {
    if (this.stopped) return Promise.resolve();
    if (this.running) {
      this.again = true;
      return this.running;
    }
    this.running = (async () => {
      do {
        this.again = false;
        await this.catchUp();
      } while (this.again && !this.stopped);
    })().finally(() => (this.running = undefined));
    return this.running;
  }

  private async load(): Promise<void> {
    const started = performance.now();
    const generation = this.db.generation;
    await loadPgCopy(this.db, this.copy, this.now());
    // The connection the load used (a load that had to choose a host counts as on the host it chose).
    this.loadedOn = generation === 0 ? this.db.generation : generation;
    this.hooks.loaded?.(performance.now() - started, this.copy.size());
  }

  /** The connection generation (PgDb.generation) the copy was loaded on. */
  private loadedOn = 0;

  private async catchUp(): Promise<void> {
    try {
      const p = (await this.db.query('SELECT upto FROM changes_purged WHERE id = 1')).rows[0];
      // Connected again, perhaps to another server (a promoted standby): the ids seen on the old one say
      // nothing there. It may lack the old primary's last transactions and hand out their ids again; a copy
      // that read on by id would skip those changes for good. It loads whole instead.
      if (this.db.generation !== this.loadedOn || ((p?.['upto'] as number | undefined) ?? 0) > this.copy.lastChange) {
        await this.load();
      } else {
        for (;;) {
          const n = await this.apply();
          if (n < BATCH) break;
        }
      }
      this.copy.currentAt = this.now();
      if (!this.connected) {
        this.connected = true;
        this.hooks.recovered?.(this.now() - this.failingSince);
      }
    } catch (e) {
      this.error = e instanceof Error ? e.message : String(e);
      if (this.connected) {
        this.connected = false;
        this.failingSince = this.now();
        this.hooks.failed?.(e, this.copy.currentAt);
      }
    }
  }

  /** Applies one batch of changes in one snapshot; returns how many changes it read. */
  private async apply(): Promise<number> {
    return this.db.begin(async (tx) => {
      const rows = (await tx.query('SELECT id, "user" FROM changes WHERE id > $1 ORDER BY id LIMIT $2', [this.copy.lastChange, BATCH])).rows;
      if (rows.length === 0) return 0;
      const users = [...new Set(rows.map((r) => r['user'] as string))];
      const flags = (await tx.query('SELECT name, mfa_enabled, exempt FROM users WHERE name = ANY($1)', [users])).rows;
      const grants = (await tx.query('SELECT "user", block, id, expires_at FROM grants WHERE "user" = ANY($1) AND revoked_at IS NULL', [users])).rows;
      const passcodes = (await tx.query('SELECT * FROM passcodes WHERE "user" = ANY($1)', [users])).rows.map(passcodeFromRow);
      type State = { flags: UserState['flags']; grants: { block: string; id: number; expiresAt: number }[]; passcodes: PasscodeRow[] };
      const states = new Map<string, State>(users.map((u): [string, State] => [u, { flags: undefined, grants: [], passcodes: [] }]));
      for (const p of passcodes) states.get(p.user)?.passcodes.push(p);
      for (const f of flags) {
        const st = states.get(f['name'] as string);
        if (st && (f['mfa_enabled'] === 1 || f['exempt'] === 1)) st.flags = { mfaEnabled: f['mfa_enabled'] === 1, exempt: f['exempt'] === 1 };
      }
      for (const g of grants) states.get(g['user'] as string)?.grants.push({ block: g['block'] as string, id: g['id'] as number, expiresAt: g['expires_at'] as number });
      for (const [u, st] of states) this.copy.setUser(u, st);
      this.copy.lastChange = rows[rows.length - 1]?.['id'] as number;
      return rows.length;
    }, 'ISOLATION LEVEL REPEATABLE READ READ ONLY');
  }
}
