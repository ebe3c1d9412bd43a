// `mfagate config check`, `db migrate` and `stats`: the installation itself.
import fs from 'node:fs';
import type { Command } from 'commander';
import { formatDuration } from '../config/duration.js';
import { formatEndpoint } from '../config/listen.js';
import { migrateFile } from '../store/store.js';
import { configOf, json, out, withStore } from './common.js';
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
      out(`store:            ${config.store.path}`);
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
  program
    .command('db')
    .description('the store')
    .command('migrate')
    .description('create the store or bring its schema up to date')
    .action((_o, cmd: Command) => {
      const config = configOf(cmd);
      const { from, to, created } = migrateFile(config.store.path);
      if (created) out(`${config.store.path}: created, schema version ${to}`);
      else out(from === to ? `${config.store.path}: schema version ${to}, up to date` : `${config.store.path}: migrated from schema version ${from} to ${to}`);
    });
  program
    .command('stats')
    .description('users, MFA enabled, active grants, and the running daemon\'s decisions since it started')
    .option('--json', 'machine-readable output')
    .action((o: { json?: boolean }, cmd: Command) => {
      const config = configOf(cmd);
      const now = Date.now();
      const { counts, daemon } = withStore(config, (s) => ({ counts: s.counts(now), daemon: s.daemonStats() }));
      if (o.json) {
        return json({
          users: counts.users,
          mfa_enabled: counts.mfaEnabled,
          exempt: counts.exempt,
          active_grants: counts.activeGrants,
          daemon: daemon
            ? { pid: daemon.pid, running: daemon.stoppedAt === null, started_at: new Date(daemon.startedAt).toISOString(), as_of: new Date(daemon.updatedAt).toISOString(), decisions: { allowed: daemon.allowed, refused: daemon.refused, log_only: daemon.logOnly, bad_requests: daemon.badRequests } }
            : null,
        });
      }
      out(`users:          ${counts.users}`);
      out(`MFA enabled:    ${counts.mfaEnabled}`);
      out(`exempt:         ${counts.exempt}`);
      out(`active grants:  ${counts.activeGrants}`);
      if (!daemon) return out('daemon:         never started on this store');
      out(`daemon:         pid ${daemon.pid}, ${daemon.stoppedAt === null ? 'started' : 'ran from'} ${formatTime(daemon.startedAt)}${daemon.stoppedAt === null ? '' : ' to ' + formatTime(daemon.stoppedAt)}`);
      out(`decisions:      ${daemon.allowed} allowed, ${daemon.refused} refused, ${daemon.logOnly} refusals let through (log-only), ${daemon.badRequests} bad requests (as of ${formatTime(daemon.updatedAt)})`);
    });
}
