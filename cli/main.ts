#!/usr/bin/env node
// The mfagate command: the daemon (`serve`) and the operators' tools, all over the same store and config.
import fs from 'node:fs';
import os from 'node:os';
import { Command, CommanderError } from 'commander';
import QRCode from 'qrcode';
import { type Config, ConfigError, blockPrefixes, loadConfig, locateConfig, policySettings } from '../config/config.js';
import { formatDuration, parseDuration, DURATION_EXPECTED } from '../config/duration.js';
import { formatEndpoint } from '../config/listen.js';
import { type Daemon, StartError, startDaemon } from '../daemon/daemon.js';
import { createLogger, errorText } from '../daemon/log.js';
import { DIGITS, PERIOD } from '../mfa/totp.js';
import { blockOf, parseAddress } from '../policy/address.js';
import { decide, mfaRequired } from '../policy/decide.js';
import { describeRule } from '../policy/rules.js';
import { isAcceptableUserName, normaliseUser } from '../policy/user.js';
import { type GrantRow, Store, migrateFile } from '../store/store.js';
import { formatTime, groupKey, table } from './format.js';
import { openSecrets } from '../mfa/secrets.js';
import { type FactorsView, factorsOf, hasFactor, lockOf, mfaService } from './mfa.js';

/** An error the operator caused: printed without a stack, exit code as given. */
class UsageError extends Error {
  constructor(message: string, readonly exitCode = 2) {
    super(message);
  }
}

interface GlobalOpts {
  config?: string;
}

// `mfagate ... | head` closes the pipe early: that is not an error worth a stack trace.
process.stdout.on('error', (e: NodeJS.ErrnoException) => {
  if (e.code === 'EPIPE') process.exit(process.exitCode ?? 0);
  throw e;
});

/** Set by `check`, whose exit status 1 means "refused": its failures must not look like a refusal. */
let deciding = false;
/** Set by `serve`: a start that failed exits at once, whatever handles are still open. */
let serving = false;

function out(text: string): void {
  process.stdout.write(text.endsWith('\n') ? text : text + '\n');
}

function json(value: unknown): void {
  out(JSON.stringify(value, null, 2));
}

function actor(): string {
  const who = process.env['SUDO_USER'] || process.env['USER'] || safeUserName();
  return `cli:${who}`;
}

function safeUserName(): string {
  try {
    return os.userInfo().username;
  } catch {
    return String(process.getuid?.() ?? 'unknown');
  }
}

function configOf(cmd: Command): Config {
  const opts = cmd.optsWithGlobals<GlobalOpts>();
  return loadConfig(locateConfig(opts.config));
}

function withStore<T>(config: Config, fn: (store: Store) => T): T {
  // Never creates one: a command run against a wrong [store] path, or while the file system is not mounted,
  // must say so instead of working on a new empty store the daemon does not use.
  const store = Store.open(config.store.path, { create: false, migrate: true });
  try {
    return fn(store);
  } finally {
    store.close();
  }
}

function userArg(config: Config, raw: string): string {
  const user = normaliseUser(raw, config.users);
  if (!isAcceptableUserName(user)) throw new UsageError(`not a user name: ${JSON.stringify(raw)}`);
  return user;
}

function ipArg(raw: string): ReturnType<typeof parseAddress> & object {
  const a = parseAddress(raw);
  if (!a) throw new UsageError(`not an IP address: ${JSON.stringify(raw)} (expected e.g. 203.0.113.7 or 2001:db8::1)`);
  return a;
}

function ttlArg(raw: string): number {
  const ms = parseDuration(raw);
  if (ms === undefined) throw new UsageError(`--ttl: expected ${DURATION_EXPECTED}, got ${JSON.stringify(raw)}`);
  return ms;
}

function idArg(raw: string): number {
  if (!/^\d{1,15}$/.test(raw)) throw new UsageError(`--id: expected a grant number, got ${JSON.stringify(raw)}`);
  return Number(raw);
}

function grantState(g: GrantRow, now: number): string {
  if (g.revokedAt !== null) return 'revoked';
  return g.expiresAt > now ? 'active' : 'expired';
}

function grantJson(g: GrantRow, now: number) {
  return {
    id: g.id,
    user: g.user,
    block: g.block,
    ip: g.ip,
    state: grantState(g, now),
    created_at: new Date(g.createdAt).toISOString(),
    expires_at: new Date(g.expiresAt).toISOString(),
    method: g.method,
    source: g.source,
    reason: g.reason,
    revoked_at: g.revokedAt === null ? null : new Date(g.revokedAt).toISOString(),
    revoked_by: g.revokedBy,
    revoke_reason: g.revokeReason,
  };
}

function grantsTable(grants: GrantRow[], now: number): string {
  return table(
    ['ID', 'USER', 'BLOCK', 'STATE', 'CREATED', 'EXPIRES', 'METHOD', 'SOURCE'],
    grants.map((g) => [String(g.id), g.user, g.block, grantState(g, now), formatTime(g.createdAt), formatTime(g.expiresAt), g.method, g.source]),
  );
}

/** As the decision sees it: exempt in the store or in [enforcement] exempt_users, else enabled or site-wide. */
function requiredNow(config: Config, name: string, mfaEnabled: boolean, exempt: boolean, now: number): boolean {
  const settings = { exemptUsers: new Set(config.enforcement.exemptUsers), requiredFrom: config.enforcement.requiredFrom };
  return mfaRequired(settings, name, { mfaEnabled, exempt }, now);
}

/** The store's record of a user, or exit 1: the helpdesk commands act on users the store knows. */
function knownUser(s: Store, name: string) {
  const u = s.getUser(name);
  if (!u) throw new UsageError(`unknown user "${name}": the store has never seen it (no login, grant or setting yet)`, 1);
  return u;
}

function exemptLabel(config: Config, u: { name: string; exempt: boolean; mfaEnabled: boolean }): string {
  if (u.exempt) return ' (exempt)';
  if (config.enforcement.exemptUsers.includes(u.name)) return ' (exempt in the configuration)';
  return u.mfaEnabled ? '' : ' (not enabled)';
}

function plural(n: number, one: string, many = `${one}s`): string {
  return `${n} ${n === 1 ? one : many}`;
}

/** "authenticator app (registered ...), external address a***@example.com, 7 backup codes", or undefined. */
function describeFactors(f: FactorsView): string | undefined {
  const parts: string[] = [];
  if (f.totp) parts.push(`authenticator app${f.totp_since ? ` (registered ${formatTime(Date.parse(f.totp_since))})` : ''}`);
  if (f.totp_pending_since) parts.push('an unconfirmed app enrolment');
  if (f.email) parts.push(`external address ${f.email}`);
  if (f.email_pending) parts.push(`unconfirmed address ${f.email_pending}`);
  if (f.backup_codes_left > 0) parts.push(plural(f.backup_codes_left, 'backup code'));
  return parts.length ? parts.join(', ') : undefined;
}

export function buildProgram(): Command {
  const program = new Command();
  program
    .name('mfagate')
    .description('Per-IP MFA grants for Dovecot and Postfix: the daemon and the operators\' tools')
    .option('-c, --config <file>', 'configuration file (default: $MFAGATE_CONFIG, then ./mfagate.toml, then built-in defaults)')
    .showHelpAfterError()
    .exitOverride()
    .configureOutput({ writeErr: (s) => process.stderr.write(s) });

  // ---- serve --------------------------------------------------------------------------------------------
  program
    .command('serve')
    .description('run the daemon: the Dovecot and Postfix policy endpoints and the webmail API')
    .option('--create-store', 'create the store if it does not exist (a new installation; "mfagate db migrate" does the same)')
    .action(async (o: { createStore?: boolean }, cmd: Command) => {
      serving = true;
      // A reload asked for while starting is done once started, instead of SIGHUP's default (ending the process).
      let reloadAsked = false;
      const early = () => (reloadAsked = true);
      process.on('SIGHUP', early);
      const config = configOf(cmd);
      const logger = createLogger(config.log.level);
      let daemon: Daemon;
      try {
        daemon = await startDaemon(config, logger, { createStore: o.createStore === true });
      } finally {
        logger.flush();
      }
      process.stderr.write(
        `mfagate: listening\n` +
          daemon.endpoints.dovecot.map((e) => `  dovecot auth policy  ${formatEndpoint(e)}\n`).join('') +
          daemon.endpoints.postfix.map((e) => `  postfix policy       ${formatEndpoint(e)}\n`).join('') +
          daemon.endpoints.api.map((e) => `  webmail API          ${formatEndpoint(e)}\n`).join('') +
          daemon.endpoints.web.map((e) => `  MFA web page         ${e.kind === 'tcp' ? `http://${formatEndpoint(e)}${config.web.basePath}/` : formatEndpoint(e)}\n`).join('') +
          `  store                ${config.store.path}\n`,
      );
      process.on('SIGHUP', () => daemon.reload());
      process.off('SIGHUP', early);
      if (reloadAsked) daemon.reload();
      const stop = (signal: string) => {
        logger.log('info', 'stopping', { signal });
        daemon.stop().then(
          () => process.exit(0),
          (e: unknown) => {
            logger.log('error', 'stop-failed', { error: errorText(e) });
            logger.flush();
            process.exit(1);
          },
        );
      };
      process.once('SIGTERM', () => stop('SIGTERM'));
      process.once('SIGINT', () => stop('SIGINT'));
      await new Promise(() => undefined);
    });

  // ---- grants -------------------------------------------------------------------------------------------
  const grants = program.command('grants').description('inspect, add and revoke MFA grants');
  grants
    .command('list')
    .description('list grants (active ones unless --all)')
    .option('--user <user>', 'only this user')
    .option('--ip <ip>', 'only grants covering this address')
    .option('--all', 'include expired and revoked grants')
    .option('--json', 'machine-readable output')
    .action((o: { user?: string; ip?: string; all?: boolean; json?: boolean }, cmd: Command) => {
      const config = configOf(cmd);
      const user = o.user !== undefined ? userArg(config, o.user) : undefined;
      const block = o.ip !== undefined ? blockOf(ipArg(o.ip), blockPrefixes(config)) : undefined;
      const now = Date.now();
      const rows = withStore(config, (s) => s.listGrants({ user, block, all: o.all === true, now }));
      if (o.json) return json(rows.map((g) => grantJson(g, now)));
      if (rows.length === 0) return out(o.all ? 'no grants' : 'no active grants');
      out(grantsTable(rows, now));
    });
  grants
    .command('add')
    .description('grant a user MFA-free mail logins from an address block (helpdesk)')
    .requiredOption('--user <user>', 'the user')
    .requiredOption('--ip <ip>', 'the client address; the grant covers its block (IPv4 address, IPv6 /64 by default)')
    .option('--ttl <duration>', 'how long (default: [grants] ttl)')
    .option('--reason <text>', 'why, for the audit log', '')
    .option('--json', 'machine-readable output')
    .action((o: { user: string; ip: string; ttl?: string; reason: string; json?: boolean }, cmd: Command) => {
      const config = configOf(cmd);
      const user = userArg(config, o.user);
      const addr = ipArg(o.ip);
      const ttlMs = o.ttl !== undefined ? ttlArg(o.ttl) : config.grants.ttlMs;
      const now = Date.now();
      const { grant, extended } = withStore(config, (s) =>
        s.addGrant({
          user,
          ip: addr.toString(),
          block: blockOf(addr, blockPrefixes(config)),
          ttlMs,
          method: 'helpdesk',
          source: 'cli',
          reason: o.reason,
          actor: actor(),
          now,
        }),
      );
      if (o.json) return json({ ...grantJson(grant, now), extended });
      out(`${extended ? 'extended' : 'added'} grant ${grant.id}: ${grant.user} from ${grant.block} until ${formatTime(grant.expiresAt)} (${formatDuration(grant.expiresAt - now)})`);
    });
  grants
    .command('revoke')
    .description('revoke active grants: one by --id, or all of --user (optionally only --ip), or all for --ip')
    .option('--id <id>', 'the grant number (see grants list)')
    .option('--user <user>', 'the user')
    .option('--ip <ip>', 'the address (its block)')
    .option('--reason <text>', 'why, for the audit log', '')
    .option('--json', 'machine-readable output')
    .action((o: { id?: string; user?: string; ip?: string; reason: string; json?: boolean }, cmd: Command) => {
      const config = configOf(cmd);
      if (o.id === undefined && o.user === undefined && o.ip === undefined) {
        throw new UsageError('grants revoke: give --id ID, or --user U [--ip IP], or --ip IP');
      }
      if (o.id !== undefined && (o.user !== undefined || o.ip !== undefined)) {
        throw new UsageError('grants revoke: --id cannot be combined with --user or --ip');
      }
      const id = o.id !== undefined ? idArg(o.id) : undefined;
      const user = o.user !== undefined ? userArg(config, o.user) : undefined;
      const block = o.ip !== undefined ? blockOf(ipArg(o.ip), blockPrefixes(config)) : undefined;
      const now = Date.now();
      const revoked = withStore(config, (s) => s.revokeGrants({ id, user, block }, actor(), o.reason, now));
      if (o.json) return json(revoked.map((g) => grantJson(g, now)));
      if (revoked.length === 0) return out('no active grant matched: nothing revoked');
      out(`revoked ${revoked.length} grant${revoked.length === 1 ? '' : 's'}:`);
      out(grantsTable(revoked, now));
    });

  // ---- users --------------------------------------------------------------------------------------------
  const users = program.command('users').description('users the store knows: MFA on/off, exemptions, history');
  users
    .command('list')
    .description('list users')
    .option('--json', 'machine-readable output')
    .action((o: { json?: boolean }, cmd: Command) => {
      const config = configOf(cmd);
      const now = Date.now();
      const rows = withStore(config, (s) => s.listUsers());
      const view = rows.map((u) => ({
        user: u.name,
        mfa_enabled: u.mfaEnabled,
        exempt: u.exempt,
        exempt_in_config: config.enforcement.exemptUsers.includes(u.name),
        mfa_required: requiredNow(config, u.name, u.mfaEnabled, u.exempt, now),
        since: new Date(u.createdAt).toISOString(),
      }));
      if (o.json) return json(view);
      if (view.length === 0) return out('no users yet');
      out(
        table(
          ['USER', 'MFA', 'REQUIRED', 'EXEMPT', 'SINCE'],
          rows.map((u, i) => [u.name, u.mfaEnabled ? 'enabled' : 'off', view[i]?.mfa_required ? 'yes' : 'no', u.exempt ? 'yes' : view[i]?.exempt_in_config ? 'config' : 'no', formatTime(u.createdAt)]),
        ),
      );
    });
  users
    .command('show')
    .description('one user: MFA state, second factors, lock, active grants, last logins, recent changes')
    .argument('<user>')
    .option('--json', 'machine-readable output')
    .action((raw: string, o: { json?: boolean }, cmd: Command) => {
      const config = configOf(cmd);
      const name = userArg(config, raw);
      const now = Date.now();
      const data = withStore(config, (s) => {
        const u = knownUser(s, name);
        return {
          u,
          factors: factorsOf(s, name),
          lock: lockOf(s, config, name, now),
          grants: s.listGrants({ user: name, now }),
          logins: s.loginsOf(name),
          audit: s.auditOf(name, 10),
        };
      });
      const { u, factors: f, lock } = data;
      const exemptInConfig = config.enforcement.exemptUsers.includes(u.name);
      const required = requiredNow(config, u.name, u.mfaEnabled, u.exempt, now);
      if (o.json) {
        return json({
          user: u.name,
          mfa_enabled: u.mfaEnabled,
          exempt: u.exempt,
          exempt_in_config: exemptInConfig,
          mfa_required: required,
          factors: f,
          locked_until: lock.locked_until,
          recent_failures: lock.recent_failures,
          grants: data.grants.map((g) => grantJson(g, now)),
          logins: data.logins.map((l) => ({
            ip: l.ip,
            protocol: l.protocol,
            last_success_at: l.lastSuccessAt === null ? null : new Date(l.lastSuccessAt).toISOString(),
            last_failure_at: l.lastFailureAt === null ? null : new Date(l.lastFailureAt).toISOString(),
            last_policy_reject_at: l.lastPolicyRejectAt === null ? null : new Date(l.lastPolicyRejectAt).toISOString(),
          })),
          audit: data.audit.map((a) => ({ at: new Date(a.at).toISOString(), actor: a.actor, action: a.action, ip: a.ip, grant: a.grantId, detail: a.detail })),
        });
      }
      const time = (iso: string | null) => formatTime(iso === null ? null : Date.parse(iso));
      const exemptNote = u.exempt ? ' (exempt)' : exemptInConfig ? ' (exempt in the configuration)' : '';
      out(`user:          ${u.name}`);
      out(`MFA:           ${u.mfaEnabled ? 'enabled by the user' : 'not enabled'}${exemptNote}`);
      out(`MFA required:  ${required ? 'yes' : 'no'}${exemptNote || (!u.mfaEnabled && required ? ' (site-wide required_from has passed)' : '')}`);
      out(`known since:   ${formatTime(u.createdAt)}`);
      out(
        `authenticator: ${f.totp ? `registered ${time(f.totp_since)}` : 'none'}` +
          (f.totp_pending_since ? `; an enrolment begun ${time(f.totp_pending_since)} is not confirmed` : ''),
      );
      out(`external mail: ${f.email ? `${f.email}, confirmed ${time(f.email_since)}` : 'none'}`);
      if (f.email_pending) out(`pending mail:  ${f.email_pending}, waiting for the code sent there`);
      out(`backup codes:  ${f.backup_codes_left > 0 ? `${f.backup_codes_left} left` : 'none'}`);
      const window = formatDuration(config.lockout.windowMs);
      if (lock.locked_until) {
        out(`lock:          LOCKED until ${time(lock.locked_until)} (${plural(lock.recent_failures, 'failed code')} in the last ${window}); "mfagate users unlock ${u.name}" ends it`);
      } else {
        out(`lock:          not locked${lock.recent_failures ? ` (${plural(lock.recent_failures, 'failed code')} in the last ${window}; locks at ${config.lockout.maxFailures})` : ''}`);
      }
      if (required && !hasFactor(f)) {
        out(`note: MFA is required but no second factor is registered: the user registers one in webmail (the password is enough for the first), or at the desk with "mfagate totp enroll ${u.name}"`);
      }
      out('');
      out(data.grants.length ? 'active grants:\n' + grantsTable(data.grants, now) : 'active grants: none');
      out(
        data.logins.length
          ? 'last logins:\n' +
              table(['IP', 'PROTOCOL', 'LAST SUCCESS', 'LAST FAILURE', 'LAST REFUSED BY MFA'], data.logins.map((l) => [l.ip, l.protocol, formatTime(l.lastSuccessAt), formatTime(l.lastFailureAt), formatTime(l.lastPolicyRejectAt)]))
          : 'last logins: none recorded',
      );
      if (data.audit.length) {
        out('recent changes:\n' + table(['WHEN', 'ACTOR', 'ACTION', 'IP', 'DETAIL'], data.audit.map((a) => [formatTime(a.at), a.actor, a.action, a.ip ?? '-', JSON.stringify(a.detail)])));
      }
    });
  users
    .command('reset')
    .description('after a lost phone: remove every second factor and backup code, revoke every grant; MFA stays required')
    .argument('<user>')
    .requiredOption('--reason <text>', 'why (a ticket number), for the audit log: required')
    .option('--json', 'machine-readable output')
    .action((raw: string, o: { reason: string; json?: boolean }, cmd: Command) => {
      const config = configOf(cmd);
      const name = userArg(config, raw);
      const reason = o.reason.trim();
      if (reason === '') throw new UsageError('users reset: --reason must say why (e.g. a ticket number): it goes into the audit log');
      const now = Date.now();
      const r = withStore(config, (s) => {
        const u = knownUser(s, name);
        const before = factorsOf(s, name);
        const lock = lockOf(s, config, name, now);
        const { grantsRevoked } = mfaService(config, s).reset(name, actor(), reason);
        return { u, before, lock, grantsRevoked };
      });
      const required = requiredNow(config, r.u.name, r.u.mfaEnabled, r.u.exempt, now);
      if (o.json) {
        return json({
          user: name,
          reason,
          removed: {
            totp: r.before.totp,
            totp_pending: r.before.totp_pending_since !== null,
            email: r.before.email,
            email_pending: r.before.email_pending,
            backup_codes: r.before.backup_codes_left,
          },
          grants_revoked: r.grantsRevoked,
          was_locked_until: r.lock.locked_until,
          mfa_enabled: r.u.mfaEnabled,
          mfa_required: required,
        });
      }
      out(`${name}: second factors reset (reason: ${reason})`);
      out(`removed:  ${describeFactors(r.before) ?? 'nothing (no factor or backup code was registered)'}`);
      out(`revoked:  ${r.grantsRevoked ? plural(r.grantsRevoked, 'grant') : 'no active grant'}`);
      if (r.lock.locked_until) out(`unlocked: was locked until ${formatTime(Date.parse(r.lock.locked_until))}`);
      if (required) {
        out(`MFA stays required: mail programs from outside are refused until ${name} has a new factor and passes MFA.`);
        out(`next:     ${name} registers a factor in webmail (the password is enough for the first), or enrol one now: mfagate totp enroll ${name}`);
      } else {
        out(`MFA is not required for ${name} now${exemptLabel(config, r.u)}: the user may register a new factor in webmail at any time.`);
      }
    });
  users
    .command('revoke-all')
    .description("revoke every active grant of a user (after a password change): the next mail login from outside needs MFA")
    .argument('<user>')
    .option('--reason <text>', 'why, for the audit log', '')
    .option('--json', 'machine-readable output')
    .action((raw: string, o: { reason: string; json?: boolean }, cmd: Command) => {
      const config = configOf(cmd);
      const name = userArg(config, raw);
      const now = Date.now();
      const revoked = withStore(config, (s) => {
        knownUser(s, name);
        return s.revokeGrants({ user: name }, actor(), o.reason, now);
      });
      if (o.json) return json(revoked.map((g) => grantJson(g, now)));
      if (revoked.length === 0) return out(`${name}: no active grant: nothing revoked`);
      out(`${name}: revoked ${plural(revoked.length, 'grant')}:`);
      out(grantsTable(revoked, now));
    });
  users
    .command('unlock')
    .description('end a lock after too many wrong codes, and forget the failed attempts')
    .argument('<user>')
    .option('--json', 'machine-readable output')
    .action((raw: string, o: { json?: boolean }, cmd: Command) => {
      const config = configOf(cmd);
      const name = userArg(config, raw);
      const now = Date.now();
      const r = withStore(config, (s) => {
        knownUser(s, name);
        const lock = lockOf(s, config, name, now);
        const wasLocked = mfaService(config, s).unlock(name, actor());
        return { lock, wasLocked };
      });
      if (o.json) return json({ user: name, was_locked: r.wasLocked, was_locked_until: r.lock.locked_until, failures_cleared: r.lock.recent_failures });
      const cleared = r.lock.recent_failures ? `${plural(r.lock.recent_failures, 'failed code')} forgotten` : '';
      if (r.wasLocked && r.lock.locked_until) out(`${name}: unlocked (was locked until ${formatTime(Date.parse(r.lock.locked_until))}${cleared ? '; ' + cleared : ''})`);
      else out(`${name}: was not locked${cleared ? ` (${cleared})` : ''}`);
    });
  const flagCommand = (name: string, description: string, flag: 'mfa_enabled' | 'exempt', value: boolean, mustExist: boolean) =>
    users
      .command(name)
      .description(description)
      .argument('<user>')
      .option('--reason <text>', 'why, for the audit log', '')
      .action((raw: string, o: { reason: string }, cmd: Command) => {
        const config = configOf(cmd);
        const user = userArg(config, raw);
        const changed = withStore(config, (s) => {
          if (mustExist && !s.getUser(user)) throw new UsageError(`unknown user "${user}": the store has never seen it`, 1);
          return s.setUserFlag(user, flag, value, actor(), Date.now(), o.reason);
        });
        out(`${user}: ${changed ? '' : 'already '}${name === 'enable' ? 'MFA enabled' : name === 'disable' ? 'MFA disabled' : name === 'exempt' ? 'exempt from MFA' : 'no longer exempt'}`);
      });
  flagCommand('enable', 'require MFA for this user', 'mfa_enabled', true, false);
  flagCommand('disable', 'stop requiring MFA for this user (site-wide required_from still applies)', 'mfa_enabled', false, true);
  flagCommand('exempt', 'never require MFA for this user (service accounts)', 'exempt', true, false);
  flagCommand('unexempt', 'remove the exemption', 'exempt', false, true);

  // ---- totp ---------------------------------------------------------------------------------------------
  const totp = program.command('totp').description('authenticator apps (TOTP)');
  totp
    .command('enroll')
    .description("register an authenticator app at the helpdesk desk: prints a QR code to scan (replaces the user's app)")
    .argument('<user>')
    .option('--json', 'machine-readable output (the key and the otpauth:// URI, no QR code)')
    .action(async (raw: string, o: { json?: boolean }, cmd: Command) => {
      const config = configOf(cmd);
      const name = userArg(config, raw);
      const r = withStore(config, (s) => {
        const secrets = openSecrets(config.secrets.keyFile, s);
        const before = factorsOf(s, name);
        const { secret, uri } = mfaService(config, s, secrets).enrollAtDesk(name, actor());
        return { before, secret, uri, at: Date.now() };
      });
      const replaced = r.before.totp;
      if (replaced) {
        process.stderr.write(
          `mfagate: warning: this replaced the authenticator app ${name} registered ${formatTime(r.before.totp_since === null ? null : Date.parse(r.before.totp_since))}: its codes no longer work\n`,
        );
      }
      if (o.json) {
        return json({
          user: name,
          issuer: config.totp.issuer,
          secret: r.secret,
          uri: r.uri,
          digits: DIGITS,
          period: PERIOD,
          registered_at: new Date(r.at).toISOString(),
          replaced,
          replaced_registered_at: replaced ? r.before.totp_since : null,
        });
      }
      const qr = await QRCode.toString(r.uri, { type: 'terminal', small: true });
      out(`${name}: authenticator app registered${replaced ? ' (the previous app no longer works)' : ''}`);
      out('Scan this with the authenticator app (Google Authenticator, Microsoft Authenticator, Authy, ...):');
      out('');
      out(qr);
      out(`Or add the account by hand: issuer ${config.totp.issuer}, account ${name}, time-based, ${DIGITS} digits, every ${PERIOD} s,`);
      out(`key: ${groupKey(r.secret)}`);
      out(`URI: ${r.uri}`);
      out('');
      out('The key is shown only now. Keep it out of tickets and mail, and clear the screen afterwards.');
      out(`Check it: ${name} signs in to webmail and passes MFA with a code from the app.`);
    });

  // ---- check --------------------------------------------------------------------------------------------
  program
    .command('check')
    .description('what would happen to a login now: the decision and the rule that made it (exit 0 allowed, 1 refused, 2 error)')
    .requiredOption('--user <user>', 'the login name, as the mail program sends it')
    .requiredOption('--ip <ip>', 'the client address')
    .option('--protocol <name>', 'imap, pop3, smtp, submission, sieve, ...', 'imap')
    .option('--real-ip <ip>', 'the TCP peer Dovecot saw, when a webmail host or proxy forwarded the login')
    .option('--json', 'machine-readable output')
    .action((o: { user: string; ip: string; protocol: string; realIp?: string; json?: boolean }, cmd: Command) => {
      deciding = true;
      const config = configOf(cmd);
      const user = userArg(config, o.user);
      const address = ipArg(o.ip);
      const realAddress = o.realIp !== undefined ? ipArg(o.realIp) : undefined;
      if (!/^[a-z0-9_-]+$/i.test(o.protocol)) throw new UsageError(`--protocol: not a protocol name: ${JSON.stringify(o.protocol)}`);
      const now = Date.now();
      const d = withStore(config, (s) => decide(policySettings(config), { user, address, realAddress, protocol: o.protocol.toLowerCase(), now }, s));
      if (o.json) {
        json({ user, ip: address.toString(), block: d.block, protocol: o.protocol.toLowerCase(), result: d.allow ? 'allow' : 'refuse', verdict: d.verdict, rule: d.rule, explanation: describeRule(d.rule), log_only: d.logOnly, untrusted_range: d.untrustedRange, grant: d.grant ? { id: d.grant.id, expires_at: new Date(d.grant.expiresAt).toISOString() } : null });
      } else {
        out(`${d.allow ? 'ALLOW' : 'REFUSE'}  ${user} from ${address.toString()} (${o.protocol.toLowerCase()})`);
        out(`rule: ${d.rule}: ${describeRule(d.rule)}`);
        if (d.untrustedRange) out('note: the address is in an untrusted range ([networks] untrusted), so MFA applies even though it may be on campus');
        if (d.grant) out(`grant: ${d.grant.id}, block ${d.block}, expires ${formatTime(d.grant.expiresAt)}`);
        if (d.logOnly) out('note: enforcement mode is log-only, so this refusal is only logged and the login is let through');
        if (!d.allow) out(`the mail program is told: ${config.dovecot.messages[o.protocol.toLowerCase()] ?? config.dovecot.message}`);
      }
      process.exitCode = d.allow ? 0 : 1;
    });

  // ---- config, db, stats --------------------------------------------------------------------------------
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

  return program;
}

export async function main(argv: string[]): Promise<number> {
  const program = buildProgram();
  try {
    await program.parseAsync(argv);
    return typeof process.exitCode === 'number' ? process.exitCode : 0;
  } catch (e) {
    if (e instanceof CommanderError) {
      // Help and version are not errors; everything else commander reports is a usage error.
      return e.code === 'commander.helpDisplayed' || e.code === 'commander.help' || e.code === 'commander.version' ? 0 : 2;
    }
    if (e instanceof ConfigError) {
      process.stderr.write(`mfagate: configuration error in ${e.message}\n`);
      return 2;
    }
    if (e instanceof StartError) {
      // A file the configuration names is missing or unusable (the API token): fix the configuration.
      process.stderr.write(`mfagate: cannot start: ${e.message}\n`);
      return 2;
    }
    if (serving) {
      // The store, the key, a port: the daemon did not start, and says why.
      process.stderr.write(`mfagate: cannot start: ${errorText(e)}\n`);
      return 1;
    }
    if (e instanceof UsageError) {
      process.stderr.write(`mfagate: ${e.message}\n`);
      return deciding ? 2 : e.exitCode;
    }
    // A store or system error: 1, except for `check`, where 1 means "refused".
    process.stderr.write(`mfagate: ${errorText(e)}\n`);
    return deciding ? 2 : 1;
  }
}

main(process.argv).then((code) => {
  if (code !== 0 || process.exitCode === undefined) process.exitCode = code;
  // A daemon that did not start must not linger (systemd would show it running): exit now.
  if (serving && code !== 0) process.exit(code);
});
