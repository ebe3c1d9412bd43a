// The store's file on disk: opening it with the daemon's pragmas and modes, and noticing, and mending, when
// its path no longer names the file that is open (deleted, or another file moved over it).
import fs from 'node:fs';
import path from 'node:path';
import Database from 'better-sqlite3';

export class StoreError extends Error {
  override name = 'StoreError';
}

/**
 * The store cannot be reached or written now (the database down or unreachable, the disk full, the file locked
 * too long): nothing was changed, and trying again later may work. The API answers 503 store-unavailable.
 */
export class StoreUnavailableError extends StoreError {
  override name = 'StoreUnavailableError';
}

/** SQLite's result codes that say the store cannot be used now, as opposed to a statement that is wrong. */
const UNAVAILABLE_SQLITE = /^SQLITE_(BUSY|LOCKED|IOERR|READONLY|FULL|CANTOPEN|CORRUPT|NOTADB|PROTOCOL)/;

export function sqliteUnavailable(e: unknown): StoreUnavailableError | undefined {
  const code = (e as { code?: unknown }).code;
  if (typeof code !== 'string' || !UNAVAILABLE_SQLITE.test(code)) return undefined;
  return new StoreUnavailableError(`the store cannot be used now (${code}: ${(e as Error).message})`, { cause: e });
}

/** Mode of the store and its -wal and -shm files: the daemon's user only, like the secrets key. */
export const STORE_FILE_MODE = 0o600;

/** The identity of a file on disk. */
interface FileId {
  dev: number;
  ino: number;
}

function fileId(file: string): FileId | undefined {
  try {
    const st = fs.statSync(file);
    return { dev: st.dev, ino: st.ino };
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') return undefined;
    throw e;
  }
}

const sameFile = (a: FileId | undefined, b: FileId | undefined) => a !== undefined && b !== undefined && a.dev === b.dev && a.ino === b.ino;

/** What the store's path holds, compared with the file a Store has open. */
export type FileState = 'ok' | 'missing' | 'replaced';

/** The message for a store that is not there, naming what to do. */
export function missingStoreMessage(file: string): string {
  return (
    `no store at ${file}. mfagate does not create an empty store where one should exist: users who enabled MFA ` +
    `would get in without it. Check [store] path and that the file system holding it is mounted; ` +
    `for a new installation, create it with "mfagate db migrate"`
  );
}

/** The files SQLite keeps beside a store in WAL mode. */
export const companions = (file: string): [string, string] => [`${file}-wal`, `${file}-shm`];

/**
 * Tightens the mode of the store and its companions (older versions left them 0644), then opens the file with
 * the daemon's pragmas. SQLite gives new -wal and -shm files the mode of the database file.
 */
export function openDatabase(file: string, create: boolean): Database.Database {
  if (create && !fs.existsSync(file)) {
    fs.mkdirSync(path.dirname(file), { recursive: true, mode: 0o750 });
    try {
      fs.closeSync(fs.openSync(file, 'wx', STORE_FILE_MODE));
    } catch (e) {
      // Another process created it first: open theirs.
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
    }
  }
  if (!fs.existsSync(file)) throw new StoreError(missingStoreMessage(file));
  for (const f of [file, ...companions(file)]) {
    try {
      const st = fs.statSync(f);
      if ((st.mode & 0o077) !== 0) fs.chmodSync(f, st.mode & 0o700);
    } catch {
      /* not there, or not ours to change (a read-only file system): opening says what is wrong */
    }
  }
  let db: Database.Database | undefined;
  try {
    db = new Database(file, { fileMustExist: true });
    db.pragma('journal_mode = WAL');
    db.pragma('synchronous = FULL');
    db.pragma('busy_timeout = 5000');
    db.pragma('foreign_keys = ON');
    // Policy lookups touch random users across the whole file: keep the hot part in memory.
    db.pragma('cache_size = -65536');
  } catch (e) {
    db?.close();
    // SQLite's messages ("unable to open database file") do not say which file.
    throw new StoreError(`cannot open the store ${file}: ${e instanceof Error ? e.message : String(e)}`);
  }
  return db;
}

/** Which file a path named when a store was opened there, with its -wal and -shm (SQLite deletes those by name). */
export class OpenedFile {
  private readonly main: FileId | undefined;
  private readonly wal: FileId | undefined;
  private readonly shm: FileId | undefined;

  constructor(readonly file: string) {
    const [wal, shm] = companions(file);
    this.main = fileId(file);
    this.wal = fileId(wal);
    this.shm = fileId(shm);
  }

  /**
   * Whether the path still names the file that is open: "missing" when it was deleted (or its file system is
   * gone), "replaced" when another file took its place. Either way every other process (the CLI) would no
   * longer see what the opener sees. Throws when the path cannot be looked at (EACCES and the like).
   */
  state(): FileState {
    const now = fileId(this.file);
    if (now === undefined) return 'missing';
    return sameFile(now, this.main) ? 'ok' : 'replaced';
  }

  /**
   * Writes `db` (open on this file) back to the path and opens it there; `db` is closed. A consistent copy
   * (VACUUM INTO) is written beside the path and renamed into place. A file that took the store's place is
   * moved aside first (to `<path>.replaced-<time>`, with its own -wal and -shm), never deleted. Synchronous:
   * no decision runs while the store changes hands.
   */
  restore(db: Database.Database, now: number): { db: Database.Database; movedAside: string | undefined } {
    const state = this.state();
    fs.mkdirSync(path.dirname(this.file), { recursive: true, mode: 0o750 });
    let movedAside: string | undefined;
    if (state === 'replaced') {
      movedAside = `${this.file}.replaced-${new Date(now).toISOString().replace(/[:.]/g, '-')}`;
      fs.renameSync(this.file, movedAside);
      // The -wal and -shm at the path belong to the replacing file unless they are the ones opened with ours.
      const [wal, shm] = companions(this.file);
      for (const [f, mine] of [[wal, this.wal], [shm, this.shm]] as const) {
        const id = fileId(f);
        if (id !== undefined && !sameFile(id, mine)) fs.renameSync(f, `${movedAside}${f.slice(this.file.length)}`);
      }
    }
    const tmp = `${this.file}.restoring-${process.pid}`;
    fs.rmSync(tmp, { force: true });
    fs.closeSync(fs.openSync(tmp, 'wx', STORE_FILE_MODE));
    try {
      db.prepare('VACUUM INTO ?').run(tmp);
    } catch (e) {
      fs.rmSync(tmp, { force: true });
      throw e;
    }
    // Closing checkpoints into the old (unlinked) file and removes the -wal and -shm it opened, by name.
    db.close();
    fs.renameSync(tmp, this.file);
    return { db: openDatabase(this.file, false), movedAside };
  }
}
