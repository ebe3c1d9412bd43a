// The daemon's store, whichever backend: the records it writes (store/records.ts) and the in-memory copy its
// decisions read (store/live-copy.ts), kept current as that backend allows. SQLite: the copy reads the change
// feed's newest id before each decision (one statement), so a change by any process is seen by the very next
// one. PostgreSQL: the copy follows the feed (store/pg-feed.ts: LISTEN/NOTIFY, a poll by id as the safety
// net), and the daemon's own writes wait until the copy has them, so its next decision sees them too.
import type { Config } from '../config/config.js';
import type { LiveCopy } from '../store/live-copy.js';
import { writeNodeState } from '../store/node-state.js';
import type { CopyState } from '../store/records.js';
import { type OpenedStore, openPgStore, sqliteStore } from '../store/open.js';
import { PgFeed } from '../store/pg-feed.js';
import { Store } from '../store/store.js';

export interface CopyHooks {
  /** The copy can no longer be brought up to date (said once). */
  failed(error: unknown, currentAt: number): void;
  /** It can again; the copy is current. */
  recovered(currentAt: number): void;
}

export interface Counts {
  allowed: number;
  refused: number;
  logOnly: number;
  badRequests: number;
}

export interface DaemonStore {
  readonly opened: OpenedStore;
  readonly copy: LiveCopy;
  /** How long loading the copy took at start (ms). */
  readonly loadMs: number;
  /** The daemon's figures, for `mfagate stats`: in the store (SQLite), or in this host's state file (PostgreSQL). */
  started(pid: number, now: number): Promise<void>;
  report(pid: number, now: number, counts: Counts, stoppedAt: number | null, copy: CopyState): Promise<void>;
  /** Stops following the feed and closes the store. */
  close(): Promise<void>;
}

export async function openDaemonStore(config: Config, create: boolean, clock: () => number, hooks: CopyHooks): Promise<DaemonStore> {
  if (config.store.backend === 'sqlite') {
    const store = Store.open(config.store.path, { create, migrate: true });
    // A lock held by the CLI is waited for between turns of the event loop, never in a blocking wait.
    store.setBusyTimeout(20);
    const started = performance.now();
    try {
      const copy = store.liveCopy(clock, hooks);
      const records = store.records;
      return {
        opened: sqliteStore(store),
        copy,
        loadMs: Math.round(performance.now() - started),
        started: (pid, now) => records.daemonStarted(pid, now),
        report: (pid, now, counts, stoppedAt, copyState) => records.writeDaemonStats(pid, now, counts, stoppedAt, copyState),
        close: async () => store.close(),
      };
    } catch (e) {
      store.close();
      throw e;
    }
  }
  // Every node migrates an older schema at start, as with SQLite; two starting at once take turns (migratePg
  // holds a lock). A database with no schema at all is refused unless told to create one.
  const opened = await openPgStore(config.store, { migrate: true, create, applicationName: 'mfagate' });
  const started = performance.now();
  const feed: PgFeed = new PgFeed(config.store, { failed: hooks.failed, recovered: () => hooks.recovered(feed.copy.currentAt) }, { clock });
  try {
    await feed.start();
  } catch (e) {
    await opened.close();
    throw e;
  }
  const loadMs = Math.round(performance.now() - started);
  // What this node wrote is in its copy before the write's caller hears it is done.
  if (opened.pg) opened.pg.sql.afterWrite = () => feed.poke();
  const stateFile = config.store.stateFile;
  let startedAt = 0;
  return {
    opened,
    copy: feed.copy,
    loadMs,
    started: async (pid, now) => {
      startedAt = now;
      writeNodeState(stateFile, { pid, startedAt, updatedAt: now, stoppedAt: null, allowed: 0, refused: 0, logOnly: 0, badRequests: 0, copy: undefined });
    },
    report: async (pid, now, counts, stoppedAt, copyState) => writeNodeState(stateFile, { pid, startedAt, updatedAt: now, stoppedAt, ...counts, copy: copyState }),
    close: async () => {
      await feed.stop();
      await opened.close();
    },
  };
}
