// `mfagate db backup FILE` and `db verify FILE`: a consistent copy of the live SQLite store, written while the
// daemon runs, and the checks of a copy before it is trusted (see store/backup.ts).
import fs from 'node:fs';
import path from 'node:path';
import type { Command } from 'commander';
import { BackupTargetExists, type CopyCounts, type VerifyReport, backupStore, verifyCopy } from '../store/backup.js';
import { SCHEMA_VERSION } from '../store/migrations.js';
import { companions } from '../store/sqlite-file.js';
import { UsageError, configOf, json, out, plural } from './common.js';

/** A file name from the command line, resolved against the working directory. */
function fileArg(raw: string, what: string): string {
  if (raw.trim() === '' || raw.includes('\0')) throw new UsageError(`${what}: expected a file name, got ${JSON.stringify(raw)}`);
  return path.resolve(raw);
}

function sameFile(a: string, b: string): boolean {
  if (a === b) return true;
  const sa = fs.statSync(a, { throwIfNoEntry: false });
  const sb = fs.statSync(b, { throwIfNoEntry: false });
  return sa !== undefined && sb !== undefined && sa.dev === sb.dev && sa.ino === sb.ino;
}

function size(bytes: number): string {
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  if (bytes < 1024) return `${bytes} bytes`;
  let v = bytes / 1024;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(1)} ${units[i] ?? ''} (${bytes} bytes)`;
}

const mode = (m: number) => m.toString(8).padStart(4, '0');

const holds = (c: CopyCounts) =>
  `${plural(c.users, 'user')}, ${plural(c.grants, 'grant')} (${c.activeGrants} active), ${plural(c.appRegistrations, 'app registration')}, ${plural(c.audit, 'audit entry', 'audit entries')}`;

const countsJson = (c: CopyCounts | undefined) =>
  c === undefined ? null : { users: c.users, grants: c.grants, active_grants: c.activeGrants, app_registrations: c.appRegistrations, audit: c.audit };

export function dbBackupCommands(db: Command): void {
  db.command('backup')
    .description('write a consistent copy of the SQLite store to FILE (mode 0600) while the daemon runs; the secrets key is not in it')
    .argument('<file>', 'where to write the copy (a new file)')
    .option('--force', 'replace FILE if it exists')
    .option('--json', 'machine-readable output')
    .action(async (raw: string, o: { force?: boolean; json?: boolean }, cmd: Command) => {
      const config = configOf(cmd);
      if (config.store.backend !== 'sqlite') {
        throw new UsageError(
          `db backup copies a SQLite store, and [store] backend is "${config.store.backend}": back the database up with pg_dump ` +
            `(pg_dump -Fc; see docs/scaling.md, "Backups"), and the secrets key file ${config.secrets.keyFile} ([secrets] key_file) apart from it`,
        );
      }
      const file = fileArg(raw, 'FILE');
      const store = config.store.path;
      if ([store, ...companions(store), `${store}-journal`].some((f) => sameFile(file, f))) {
        throw new UsageError(`${file} is the store itself ([store] path): give the copy another file name`);
      }
      if (fs.statSync(file, { throwIfNoEntry: false })?.isDirectory()) {
        throw new UsageError(`${file} is a directory: give the file to write, e.g. ${path.join(file, 'mfagate-YYYY-MM-DD.db')}`);
      }
      const r = await backupStore(store, file, { overwrite: o.force === true }).catch((e: unknown) => {
        // An existing copy is the state of the disk, not a mistyped command: exit 1, nothing written.
        throw e instanceof BackupTargetExists ? new UsageError(e.message, 1) : e;
      });
      const fileMode = fs.statSync(r.file).mode & 0o777;
      if (o.json) return json({ source: r.source, file: r.file, bytes: r.bytes, mode: mode(fileMode), schema_version: r.schemaVersion, counts: countsJson(r.counts), ms: r.ms });
      out(`${r.source} -> ${r.file}`);
      out(`size:            ${size(r.bytes)}, mode ${mode(fileMode)}`);
      out(`schema version:  ${r.schemaVersion}${r.schemaVersion < SCHEMA_VERSION ? ` (older than this mfagate's ${SCHEMA_VERSION}: the daemon has not been restarted since an upgrade)` : ''}`);
      out(`holds:           ${holds(r.counts)}`);
      out(`took:            ${(r.ms / 1000).toFixed(1)} s`);
      out(`not in it:       the secrets key ${config.secrets.keyFile}: keep a copy of it apart from the store's backups`);
    });

  db.command('verify')
    .description('check a copy of the store: integrity, schema version, and that the secrets key opens it; never writes to it')
    .argument('<file>', 'the copy to check')
    .option('--key-file <file>', 'the secrets key to check it with (default: [secrets] key_file)')
    .option('--json', 'machine-readable output')
    .action((raw: string, o: { keyFile?: string; json?: boolean }, cmd: Command) => {
      const config = configOf(cmd);
      const file = fileArg(raw, 'FILE');
      const keyFile = o.keyFile === undefined ? config.secrets.keyFile : fileArg(o.keyFile, '--key-file');
      const r = verifyCopy(file, keyFile);
      if (config.store.backend === 'postgresql' && r.problems.some((p) => p.startsWith('file: not a SQLite database'))) {
        r.notes.push('[store] backend is "postgresql": its backups are pg_dump files, which pg_restore --list reads');
      }
      if (r.problems.length > 0) process.exitCode = 1;
      if (o.json) {
        return json({
          file: r.file,
          ok: r.problems.length === 0,
          bytes: r.bytes,
          mode: mode(r.mode),
          wal_mode: r.walMode,
          integrity: r.integrity ?? null,
          integrity_errors: r.integrityErrors,
          schema_version: r.schemaVersion ?? null,
          schema: r.schema ?? null,
          this_schema_version: SCHEMA_VERSION,
          counts: countsJson(r.counts),
          secrets: { key_file: r.secrets.keyFile, result: r.secrets.result },
          problems: r.problems,
          notes: r.notes,
        });
      }
      printReport(r);
      if (r.problems.length > 0) process.stderr.write(`mfagate: ${r.file} is not a good copy: ${plural(r.problems.length, 'problem')} (listed above)\n`);
    });
}

function printReport(r: VerifyReport): void {
  out(`${r.file}: ${r.problems.length === 0 ? 'OK' : plural(r.problems.length, 'PROBLEM')}`);
  out(`size:            ${size(r.bytes)}, mode ${mode(r.mode)}${r.walMode ? ', WAL mode' : ''}`);
  out(`integrity:       ${r.integrity === 'ok' ? 'ok' : r.integrity === 'failed' ? 'FAILED' : 'not checked'}`);
  const v = r.schemaVersion;
  out(
    `schema version:  ${
      v === undefined
        ? 'not read'
        : r.schema === 'none'
          ? 'none (no mfagate schema)'
          : r.schema === 'newer'
            ? `${v} (NEWER than this mfagate's ${SCHEMA_VERSION})`
            : r.schema === 'older'
              ? `${v} (older than this mfagate's ${SCHEMA_VERSION})`
              : `${v} (this mfagate's)`
    }`,
  );
  out(`holds:           ${r.counts ? holds(r.counts) : 'not read'}`);
  const k = r.secrets.keyFile;
  const secrets: Record<typeof r.secrets.result, string> = {
    opens: `${k} opens the app registrations in it`,
    'does-not-open': `${k} does NOT open the app registrations in it`,
    'key-missing': `${k} does not exist`,
    'key-unusable': `${k} cannot be used`,
    'no-sealed-secrets': 'nothing to check: the copy holds no sealed secrets (no app registration or backup code)',
    'not-checkable': 'cannot be checked: the copy holds backup codes only (keyed hashes)',
    'not-checked': 'not checked',
  };
  out(`secrets key:     ${secrets[r.secrets.result]}`);
  for (const p of r.problems) out(`problem:         ${p}`);
  for (const n of r.notes) out(`note:            ${n}`);
}
