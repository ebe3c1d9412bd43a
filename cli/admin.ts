// `mfagate config check`, `db migrate` and `stats`: the installation itself.
import fs from 'node:fs';
import type { Command } from 'commander';
import { formatDuration } from '../config/duration.js';
import { formatEndpoint } from '../config/listen.js';
import { readNodeState } from '../store/node-state.js';
import { Store, StoreError, migrateFile } from '../store/store.js';
import { type PgSettings, pgUrlProblem } from '../config/postgresql.js';
import { copyToPg, migratePg, withPg } from '../store/pg.js';
import { UsageError, configOf, json, out, sqlitePath, withStore } from './common.js';
import { dbBackupCommands } from './db-backup.js';
import { formatTime } from './format.js';

export function adminCommands(program: Command): void {
  program
    .command('config')
    .description('configuration')
    .command('check')
    .description('read and check the configuration file; print what it resolves to')
    .action((_o, cmd: Command) => {
      const config = configOf(cmd);
      out(`${config.file ?? '(no file: built-in defaults)'}: OK`);
      out(`store:            ${config.store.backend === 'sqlite' ? config.store.path : `PostgreSQL ${config.store.url} (tls ${config.store.tls}${config.store.passwordFile ? `, password in ${config.store.passwordFile}` : ', no password file'})`}`);
      out(`dovecot listen:   ${config.dovecot.listen.map(formatEndpoint).join(', ')}${config.dovecot.apiKey ? ' (API key required)' : ' (no API key)'}`);
      out(`postfix listen:   ${config.postfix.listen.map(formatEndpoint).join(', ')}`);
      out(`enforcement:      ${config.enforcement.mode}; protocols ${config.enforcement.protocols.join(', ')}`);
      out(`required for all: ${config.enforcement.requiredFrom === undefined ? 'no (users who enabled MFA only)' : 'from ' + formatTime(config.enforcement.requiredFrom)}`);
      out(`grants:           ttl ${formatDuration(config.grants.ttlMs)}, IPv4 /${config.grants.ipv4Prefix}, IPv6 /${config.grants.ipv6Prefix}`);
      out(`networks:         ${config.networks.trusted.length} trusted, ${config.networks.untrusted.length} untrusted, ${config.networks.webmail.length} webmail`);
      out(`webmail API:      ${config.api.listen.map((e) => formatEndpoint(e) + (e.kind === 'unix' ? ` (mode ${config.api.socketMode.toString(8).padStart(4, '0')})` : '')).join(', ')}${config.api.tokenFile ? `; token in ${config.api.tokenFile}` : ''}`);
      const w = config.web;
      out(
        `MFA web page:     ${w.listen.length === 0 ? 'off' : `${w.listen.map(formatEndpoint).join(', ')} at ${w.basePath || '/'}; proxies ${w.trustedProxies.length ? w.trustedProxies.join(', ') : 'none'}; passwords via ${w.dovecotAuthSocket}; first factor ${w.firstRegistration}${w.secureCookie ? '' : '; cookie NOT Secure (tests only)'}`}`,
      );
      out(`secrets key:      ${config.secrets.keyFile}${fs.existsSync(config.secrets.keyFile) ? '' : ' (not there yet: created at the first start)'}`);
      out(`second factors:   app issuer "${config.totp.issuer}"; mailed codes ${config.otp.digits} digits, valid ${formatDuration(config.otp.ttlMs)}${config.otp.refusedEmailDomains.length ? `; refused domains ${config.otp.refusedEmailDomains.join(', ')}` : ''}`);
      out(`mail:             ${config.mail.smtp} from ${config.mail.from}; notices ${config.mail.notify ? 'on' : 'off'}`);
      out(`lockout:          ${config.lockout.maxFailures} wrong codes in ${formatDuration(config.lockout.windowMs)} lock the user for ${formatDuration(config.lockout.durationMs)}; ${config.lockout.ipMaxFailures} per address`);
    });
  const db = program.command('db').description('the store');
  db.command('migrate')
    .description('create the store or bring its schema up to date (the SQLite file, or the PostgreSQL database)')
    .action(async (_o, cmd: Command) => {
      const config = configOf(cmd);
      const pg = config.store;
      if (pg.backend === 'postgresql') {
        const { from, to } = await withPg(pg, migratePg);
        out(from === to ? `${pg.url}: schema version ${to}, up to date` : from === 0 ? `${pg.url}: created, schema version ${to}` : `${pg.url}: migrated from schema version ${from} to ${to}`);
        return;
      }
      const { from, to, created } = migrateFile(config.store.path);
      if (created) out(`${config.store.path}: created, schema version ${to}`);
      else out(from === to ? `${config.store.path}: schema version ${to}, up to date` : `${config.store.path}: migrated from schema version ${from} to ${to}`);
    });
  db.command('copy')
    .description('copy the SQLite store (users, factors, grants, passcodes, audit log) into a PostgreSQL database; run again, it writes only what changed')
    .requiredOption('--to <url>', 'postgresql://user@host[:port][,host2[:port]]/database (no password in it)')
    .option('--password-file <file>', "a file holding the database user's password")
    .option('--tls <mode>', 'disable | require | verify-full', 'verify-full')
    .option('--ca-file <file>', 'CA certificates for verify-full (PEM)')
    .option('--json', 'machine-readable output')
    .action(async (o: { to: string; passwordFile?: string; tls: string; caFile?: string; json?: boolean }, cmd: Command) => {
      const config = configOf(cmd);
      const problem = pgUrlProblem(o.to);
      if (problem) throw new UsageError(`--to: ${problem}`);
      if (o.tls !== 'disable' && o.tls !== 'require' && o.tls !== 'verify-full') throw new UsageError(`--tls: expected disable, require or verify-full, got ${JSON.stringify(o.tls)}`);
      if (o.caFile !== undefined && o.tls !== 'verify-full') throw new UsageError('--ca-file: only used with --tls verify-full');
      const target: PgSettings = { url: o.to, passwordFile: o.passwordFile, tls: o.tls, caFile: o.caFile };
      const started = Date.now();
      const store = Store.open(sqlitePath(config, 'db copy'), { create: false, migrate: true });
      const { migrated, tables } = await withPg(target, async (sql) => {
        const migrated = await migratePg(sql);
        return { migrated, tables: await copyToPg(store, sql) };
      }).finally(() => store.close());
      if (o.json) return json({ to: o.to, schema_version: migrated.to, tables: Object.fromEntries(tables.map((t) => [t.table, { read: t.read, added: t.added, updated: t.updated }])), ms: Date.now() - started });
      if (migrated.from !== migrated.to) out(`${o.to}: schema version ${migrated.from} -> ${migrated.to}`);
      for (const t of tables) {
        const same = t.read - t.added - t.updated;
        out(`${t.table.padEnd(13)} ${String(t.read).padStart(9)} read, ${String(t.added).padStart(9)} added, ${String(t.updated).padStart(7)} updated${same > 0 ? ` (${same} already the same)` : ''}`);
      }
      out(`copied ${store.file} to ${o.to} in ${((Date.now() - started) / 1000).toFixed(1)} s`);
    });
  dbBackupCommands(db);
  program
    .command('stats')
    .description('users, MFA enabled, active grants, and the running daemon\'s decisions since it started')
    .option('--json', 'machine-readable output')
    .action(async (o: { json?: boolean }, cmd: Command) => {
      const config = configOf(cmd);
      const now = Date.now();
      // With PostgreSQL this host's daemon keeps its figures in its state file: they are shown even while the
      // database cannot be reached (the command then exits 1).
      const pg = config.store.backend === 'postgresql';
      let storeError: string | undefined;
      const fromStore = await withStore(config, async (s) => ({ counts: await s.counts(now), daemon: pg ? undefined : await s.daemonStats() })).catch((e: unknown) => {
        if (!pg || !(e instanceof StoreError)) throw e;
        storeError = e.message;
        return undefined;
      });
      const counts = fromStore?.counts;
      const daemon = pg ? readNodeState(config.store.stateFile) : fromStore?.daemon;
      if (storeError !== undefined) process.exitCode = 1;
      if (o.json) {
        return json({
          store: { backend: config.store.backend, reachable: storeError === undefined, error: storeError ?? null },
          users: counts?.users ?? null,
          mfa_enabled: counts?.mfaEnabled ?? null,
          exempt: counts?.exempt ?? null,
          active_grants: counts?.activeGrants ?? null,
          daemon: daemon
            ? {
                pid: daemon.pid,
                running: daemon.stoppedAt === null,
                started_at: new Date(daemon.startedAt).toISOString(),
                as_of: new Date(daemon.updatedAt).toISOString(),
                decisions: { allowed: daemon.allowed, refused: daemon.refused, log_only: daemon.logOnly, bad_requests: daemon.badRequests },
                copy: daemon.copy
                  ? {
                      backend: config.store.backend,
                      current_at: new Date(daemon.copy.currentAt).toISOString(),
                      age_ms: Math.max(0, daemon.updatedAt - daemon.copy.currentAt),
                      users_with_a_flag: daemon.copy.flaggedUsers,
                      grants: daemon.copy.grants,
                      error: daemon.copy.error ?? null,
                    }
                  : null,
              }
            : null,
        });
      }
      if (counts) {
        out(`users:          ${counts.users}`);
        out(`MFA enabled:    ${counts.mfaEnabled}`);
        out(`exempt:         ${counts.exempt}`);
        out(`active grants:  ${counts.activeGrants}`);
      } else {
        out(`store:          CANNOT BE REACHED: ${storeError ?? ''}`);
      }
      if (!daemon) return out(pg ? `daemon:         never started on this host (no ${config.store.stateFile})` : 'daemon:         never started on this store');
      out(`daemon:         pid ${daemon.pid}, ${daemon.stoppedAt === null ? 'started' : 'ran from'} ${formatTime(daemon.startedAt)}${daemon.stoppedAt === null ? '' : ' to ' + formatTime(daemon.stoppedAt)}`);
      out(`decisions:      ${daemon.allowed} allowed, ${daemon.refused} refused, ${daemon.logOnly} refusals let through (log-only), ${daemon.badRequests} bad requests (as of ${formatTime(daemon.updatedAt)})`);
      const c = daemon.copy;
      if (c) {
        const held = `${c.flaggedUsers} users with MFA or exempt, ${c.grants} grants`;
        out(
          c.error === undefined
            ? `decides from:   a copy in memory of the ${config.store.backend} store (${held}), current as of ${formatTime(c.currentAt)}`
            : `decides from:   a copy in memory as it was at ${formatTime(c.currentAt)}, ${formatDuration(Math.max(0, now - c.currentAt))} ago (${held}): the store cannot be read: ${c.error}`,
        );
      }
    });
}
