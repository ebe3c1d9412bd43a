// Backups of the SQLite store. `backupStore` writes a consistent copy of the live file while the daemon goes on
// writing: SQLite's online backup, done in one step, so the whole copy is read in one read transaction (one
// moment of the store: every grant with its audit entry, none half-written) and a writer never makes it start
// over. `verifyCopy` checks a copy before it is trusted (integrity, schema version, the secrets key) and never
// writes to it: it opens the file read-only, or reads it into memory when SQLite would otherwise make files
// beside it.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import Database from 'better-sqlite3';
import { SecretsError, createSecrets, readKeyFile } from '../mfa/secrets.js';
import { MIGRATIONS, SCHEMA_VERSION } from './migrations.js';
import { giveToDaemonUser } from './ownership.js';
import { STORE_FILE_MODE, StoreError, companions, openDatabase } from './sqlite-file.js';

/** The copy's file exists and was not to be replaced. */
export class BackupTargetExists extends StoreError {
  override name = 'BackupTargetExists';
}

/** What a copy holds, counted in the copy itself. */
export interface CopyCounts {
  users: number;
  grants: number;
  activeGrants: number;
  audit: number;
  /** Confirmed authenticator apps: TOTP secrets sealed with the key. */
  appRegistrations: number;
}

export interface BackupResult {
  source: string;
  file: string;
  bytes: number;
  schemaVersion: number;
  counts: CopyCounts;
  ms: number;
}

/** sqlite3_backup_step's page count for "everything in this step" (better-sqlite3 caps it here). */
const ALL_PAGES = 0x7fffffff;

const errText = (e: unknown) => {
  const code = (e as { code?: unknown }).code;
  const msg = e instanceof Error ? e.message : String(e);
  return typeof code === 'string' && code.startsWith('SQLITE_') && !msg.includes(code) ? `${msg} (${code})` : msg;
};

function exists(file: string): boolean {
  try {
    fs.lstatSync(file);
    return true;
  } catch {
    return false;
  }
}

function tableNames(db: Database.Database): Set<string> {
  return new Set((db.prepare("SELECT name FROM sqlite_schema WHERE type = 'table'").pluck().all() as string[]));
}

function countsOf(db: Database.Database, now: number): CopyCounts {
  const n = (sql: string, ...params: unknown[]) => Number(db.prepare(sql).pluck().get(...params) ?? 0);
  const tables = tableNames(db);
  return {
    users: n('SELECT count(*) FROM users'),
    grants: n('SELECT count(*) FROM grants'),
    activeGrants: n('SELECT count(*) FROM grants WHERE revoked_at IS NULL AND expires_at > ?', now),
    audit: n('SELECT count(*) FROM audit'),
    appRegistrations: tables.has('factors') ? n('SELECT count(*) FROM factors WHERE totp_secret IS NOT NULL') : 0,
  };
}

function fsyncPath(file: string, flags: string): void {
  let fd: number | undefined;
  try {
    fd = fs.openSync(file, flags);
    fs.fsyncSync(fd);
  } catch {
    /* some file systems cannot fsync a directory: the rename is still done */
  } finally {
    if (fd !== undefined) fs.closeSync(fd);
  }
}

/**
 * Copies the store at `source` (open or not, by the daemon or anyone) to `target`, mode 0600, in rollback-journal
 * mode so that the copy is one self-contained file. The copy is written beside `target` under a temporary name
 * and moved into place only when whole: an interrupted backup never leaves a half-written file at `target`, and
 * without `overwrite` an existing `target` is never replaced (checked again, atomically, at the end). The source
 * is not migrated: an older store is copied as it is.
 */
export async function backupStore(source: string, target: string, o: { overwrite: boolean; now?: number }): Promise<BackupResult> {
  const started = Date.now();
  const file = path.resolve(target);
  const dir = path.dirname(file);
  const existsMessage = `${file} exists: give another file name, or --force to replace it`;
  if (!o.overwrite && exists(file)) throw new BackupTargetExists(existsMessage);
  // SQLite would take a journal or WAL file left beside the name for the copy's own, and apply it.
  for (const f of [`${file}-journal`, `${file}-wal`]) {
    if (exists(f)) throw new StoreError(`${f} is beside ${file}: SQLite would apply it to the copy. Remove it, or give another file name`);
  }
  if (!exists(dir)) throw new StoreError(`cannot write ${file}: there is no directory ${dir}`);
  const src = openDatabase(source, false);
  const tmp = path.join(dir, `.${path.basename(file)}.partial-${process.pid}-${crypto.randomBytes(4).toString('hex')}`);
  let tmpMade = false;
  try {
    const version = src.pragma('user_version', { simple: true }) as number;
    if (version > SCHEMA_VERSION) throw new StoreError(`${source} has schema version ${version}, newer than this mfagate (${SCHEMA_VERSION}): back it up with the mfagate that uses it`);
    if (version === 0) throw new StoreError(`${source} holds no mfagate schema: there is nothing to back up`);
    // Run by root, SQLite may have just created the store's -wal and -shm: they stay the daemon's.
    giveToDaemonUser([source, ...companions(source)], [source, path.dirname(source)]);
    try {
      fs.closeSync(fs.openSync(tmp, 'wx', STORE_FILE_MODE));
      tmpMade = true;
      fs.chmodSync(tmp, STORE_FILE_MODE);
    } catch (e) {
      throw new StoreError(`cannot write in ${dir}: ${errText(e)}`);
    }
    try {
      // The first step only measures the store; the second copies every page, in one read transaction.
      await src.backup(tmp, { progress: () => ALL_PAGES });
    } catch (e) {
      throw new StoreError(`cannot write the copy ${file}: ${errText(e)}`);
    }
    let schemaVersion: number;
    let counts: CopyCounts;
    const copy = new Database(tmp, { fileMustExist: true });
    try {
      // The backup gives the copy the store's WAL mode: a copy must be one file, readable without a -wal or -shm.
      copy.pragma('journal_mode = DELETE');
      schemaVersion = copy.pragma('user_version', { simple: true }) as number;
      counts = countsOf(copy, o.now ?? Date.now());
    } finally {
      copy.close();
    }
    fsyncPath(tmp, 'r+');
    if (o.overwrite) {
      if (fs.lstatSync(file, { throwIfNoEntry: false })?.isDirectory()) throw new StoreError(`${file} is a directory`);
      fs.renameSync(tmp, file);
    } else {
      try {
        // link() fails if the name exists, however late another process made it: never replaced unasked.
        fs.linkSync(tmp, file);
        fs.unlinkSync(tmp);
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        if (code === 'EEXIST') throw new BackupTargetExists(existsMessage);
        // A file system without hard links: the check above, then a rename.
        if (code !== 'EPERM' && code !== 'ENOTSUP' && code !== 'EOPNOTSUPP' && code !== 'ENOSYS') throw e;
        if (exists(file)) throw new BackupTargetExists(existsMessage);
        fs.renameSync(tmp, file);
      }
    }
    tmpMade = false;
    fsyncPath(dir, 'r');
    return { source, file, bytes: fs.statSync(file).size, schemaVersion, counts, ms: Date.now() - started };
  } finally {
    src.close();
    if (tmpMade) for (const f of [tmp, `${tmp}-journal`, `${tmp}-wal`, `${tmp}-shm`]) fs.rmSync(f, { force: true });
  }
}

// ---- checking a copy ---------------------------------------------------------------------------------------

export type SecretsCheck =
  /** The key opens a sealed TOTP secret of the copy. */
  | 'opens'
  /** It does not: another key. */
  | 'does-not-open'
  /** The key file is missing or unusable. */
  | 'key-missing'
  | 'key-unusable'
  /** The copy holds nothing sealed: no key is needed, and none can be checked. */
  | 'no-sealed-secrets'
  /** Only backup codes (keyed hashes): no key can be checked against them. */
  | 'not-checkable'
  /** The copy could not be read far enough. */
  | 'not-checked';

export interface VerifyReport {
  file: string;
  bytes: number;
  /** The mode bits of the file. */
  mode: number;
  /** In WAL mode (not made by `db backup`: sqlite3 .backup, a file copy): read into memory to be checked. */
  walMode: boolean;
  /** undefined: not checked (not a database). */
  integrity: 'ok' | 'failed' | undefined;
  integrityErrors: string[];
  schemaVersion: number | undefined;
  schema: 'current' | 'older' | 'newer' | 'none' | undefined;
  counts: CopyCounts | undefined;
  secrets: { keyFile: string; result: SecretsCheck };
  notes: string[];
  problems: string[];
}

const expectedObjects = new Map<number, Set<string>>();

/** The tables, indexes and triggers schema version `v` has: the migrations up to it, applied in memory. */
function objectsOfVersion(v: number): Set<string> {
  let names = expectedObjects.get(v);
  if (!names) {
    const mem = new Database(':memory:');
    try {
      for (const m of MIGRATIONS) if (m.version <= v) mem.exec(m.sql);
      names = new Set(mem.prepare("SELECT type || ' ' || name FROM sqlite_schema WHERE name NOT LIKE 'sqlite_%'").pluck().all() as string[]);
    } finally {
      mem.close();
    }
    expectedObjects.set(v, names);
  }
  return names;
}

const SQLITE_MAGIC = 'SQLite format 3\0';

/**
 * Checks a copy of the store: SQLite's integrity check, the schema version (this mfagate's, older, or newer),
 * the tables of that version, and whether `keyFile` opens a sealed TOTP secret in it. Never writes to the file
 * or beside it. Throws StoreError only when there is no file to check; everything else is in the report.
 */
export function verifyCopy(target: string, keyFile: string, now = Date.now()): VerifyReport {
  const file = path.resolve(target);
  let st: fs.Stats;
  try {
    st = fs.statSync(file);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') throw new StoreError(`no file at ${file}`);
    throw new StoreError(`cannot read ${file}: ${errText(e)}`);
  }
  if (!st.isFile()) throw new StoreError(`${file} is not a file`);
  const r: VerifyReport = {
    file,
    bytes: st.size,
    mode: st.mode & 0o777,
    walMode: false,
    integrity: undefined,
    integrityErrors: [],
    schemaVersion: undefined,
    schema: undefined,
    counts: undefined,
    secrets: { keyFile, result: 'not-checked' },
    notes: [],
    problems: [],
  };
  const header = Buffer.alloc(100);
  let got = 0;
  try {
    const fd = fs.openSync(file, 'r');
    try {
      got = fs.readSync(fd, header, 0, 100, 0);
    } finally {
      fs.closeSync(fd);
    }
  } catch (e) {
    throw new StoreError(`cannot read ${file}: ${errText(e)}`);
  }
  if (got < 100 || header.toString('latin1', 0, 16) !== SQLITE_MAGIC) {
    r.problems.push(`file: not a SQLite database${got === 0 ? ' (empty)' : ''}`);
    return r;
  }
  if ((r.mode & 0o077) !== 0) r.notes.push(`the copy can be read by others (mode ${r.mode.toString(8).padStart(4, '0')}): it holds sealed secrets and hashes; chmod 600 it`);
  r.walMode = header[18] === 2 || header[19] === 2;
  const [wal] = companions(file);
  const journal = `${file}-journal`;
  if ((fs.statSync(wal, { throwIfNoEntry: false })?.size ?? 0) > 0) {
    r.problems.push(`file: ${wal} is beside it, holding changes that are not in ${file}: the copy alone is not whole (a file copy of a running store?); make copies with "mfagate db backup"`);
  }
  const hotJournal = (fs.statSync(journal, { throwIfNoEntry: false })?.size ?? 0) > 0;
  if (hotJournal) r.problems.push(`file: ${journal} is beside it: a write to the copy was interrupted, and the copy alone may be half-written`);

  let db: Database.Database;
  try {
    if (r.walMode || hotJournal) {
      // Read-only SQLite would still make a -wal and -shm beside a WAL-mode file (or want to roll the journal
      // back): check the bytes in memory instead, as a rollback-mode database.
      const bytes = fs.readFileSync(file);
      bytes[18] = 1;
      bytes[19] = 1;
      db = new Database(bytes, { readonly: true });
      if (r.walMode) r.notes.push('the copy is in WAL mode (not written by "mfagate db backup"): it was read into memory to be checked');
    } else {
      db = new Database(file, { readonly: true, fileMustExist: true });
    }
  } catch (e) {
    r.problems.push(`file: cannot be opened as a SQLite database: ${errText(e)}`);
    return r;
  }
  try {
    checkCopy(db, r, now);
  } finally {
    db.close();
  }
  return r;
}

function checkCopy(db: Database.Database, r: VerifyReport, now: number): void {
  try {
    const rows = db.pragma('integrity_check') as { integrity_check: string }[];
    if (rows.length === 1 && rows[0]?.integrity_check === 'ok') r.integrity = 'ok';
    else {
      r.integrity = 'failed';
      // SQLite heads its findings with "*** in database main ***" and may put several on one row.
      r.integrityErrors = rows.flatMap((x) => x.integrity_check.split('\n')).map((x) => x.trim()).filter((x) => x !== '' && !/^\*\*\* in database \w+ \*\*\*$/.test(x));
      if (r.integrityErrors.length === 0) r.integrityErrors = ['failed'];
    }
  } catch (e) {
    r.integrity = 'failed';
    r.integrityErrors = [errText(e)];
  }
  if (r.integrity === 'failed') {
    const n = r.integrityErrors.length;
    r.problems.push(`integrity: ${r.integrityErrors[0] ?? 'failed'}${n > 1 ? ` (and ${n - 1} more)` : ''}`);
  }

  let version: number;
  try {
    version = db.pragma('user_version', { simple: true }) as number;
  } catch (e) {
    r.problems.push(`schema: cannot be read: ${errText(e)}`);
    return;
  }
  r.schemaVersion = version;
  if (version === 0) {
    r.schema = 'none';
    r.problems.push('schema: the file holds no mfagate schema (version 0)');
    return;
  }
  if (version > SCHEMA_VERSION) {
    r.schema = 'newer';
    r.problems.push(`schema: version ${version} is newer than this mfagate's (${SCHEMA_VERSION}): restore it only with the mfagate that wrote it, or a newer one`);
    return;
  }
  r.schema = version === SCHEMA_VERSION ? 'current' : 'older';
  if (version < SCHEMA_VERSION) r.notes.push(`schema version ${version} is older than this mfagate's (${SCHEMA_VERSION}): after a restore, "mfagate db migrate" (or the daemon, when it starts) brings it up to date`);

  let present: Set<string>;
  try {
    present = new Set(db.prepare("SELECT type || ' ' || name FROM sqlite_schema WHERE name NOT LIKE 'sqlite_%'").pluck().all() as string[]);
  } catch (e) {
    r.problems.push(`schema: cannot be read: ${errText(e)}`);
    return;
  }
  const missing = [...objectsOfVersion(version)].filter((x) => !present.has(x));
  if (missing.length > 0) {
    r.problems.push(`schema: missing from schema version ${version}: ${missing.slice(0, 10).join(', ')}${missing.length > 10 ? ` (and ${missing.length - 10} more)` : ''}`);
    return;
  }

  try {
    r.counts = countsOf(db, now);
  } catch (e) {
    r.problems.push(`contents: cannot be read: ${errText(e)}`);
    return;
  }
  checkSecrets(db, r);
}

function checkSecrets(db: Database.Database, r: VerifyReport): void {
  const keyFile = r.secrets.keyFile;
  if (!tableNames(db).has('factors')) {
    r.secrets.result = 'no-sealed-secrets';
    return;
  }
  let sample: { user: string; sealed: Buffer; context: string } | undefined;
  let backupCodes: number;
  try {
    const confirmed = db.prepare('SELECT user, totp_secret FROM factors WHERE totp_secret IS NOT NULL LIMIT 1').get() as { user: string; totp_secret: Buffer } | undefined;
    const pending = confirmed ? undefined : (db.prepare('SELECT user, totp_pending FROM factors WHERE totp_pending IS NOT NULL LIMIT 1').get() as { user: string; totp_pending: Buffer } | undefined);
    sample = confirmed ? { user: confirmed.user, sealed: confirmed.totp_secret, context: `totp:${confirmed.user}` } : pending ? { user: pending.user, sealed: pending.totp_pending, context: `totp-pending:${pending.user}` } : undefined;
    backupCodes = Number(db.prepare('SELECT count(*) FROM backup_codes').pluck().get() ?? 0);
  } catch (e) {
    r.problems.push(`contents: the second factors cannot be read: ${errText(e)}`);
    return;
  }
  const sealed = sample !== undefined || backupCodes > 0;
  if (!exists(keyFile)) {
    if (sealed) {
      r.secrets.result = 'key-missing';
      r.problems.push(`secrets key: ${keyFile} does not exist, and the copy holds ${sample ? 'app registrations' : 'backup codes'} made with a key: without that key they cannot be used`);
    } else {
      r.secrets.result = 'no-sealed-secrets';
      r.notes.push(`there is no key file ${keyFile}, and the copy holds no sealed secrets: none is needed`);
    }
    return;
  }
  let key: Buffer;
  try {
    key = readKeyFile(keyFile);
  } catch (e) {
    r.secrets.result = 'key-unusable';
    r.problems.push(`secrets key: ${e instanceof SecretsError ? e.message : errText(e)}`);
    return;
  }
  if (!sample) {
    r.secrets.result = backupCodes > 0 ? 'not-checkable' : 'no-sealed-secrets';
    if (backupCodes > 0) r.notes.push('the copy holds backup codes but no app registration: backup codes are keyed hashes, which no key can be checked against');
    return;
  }
  try {
    createSecrets(key).decrypt(sample.sealed, sample.context);
    r.secrets.result = 'opens';
  } catch {
    r.secrets.result = 'does-not-open';
    r.problems.push(`secrets key: ${keyFile} does not open the app registrations in the copy: is it the key the store was written with?`);
  }
}
