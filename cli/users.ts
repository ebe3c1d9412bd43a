// `mfagate users`: the helpdesk's view of a user, and what it changes (reset, revoke-all, unlock, flags).
import type { Command } from 'commander';
import { formatDuration } from '../config/duration.js';
import { UsageError, actor, configOf, exemptLabel, knownUser, out, json, plural, requiredNow, userArg, withStore } from './common.js';
import { formatTime, table } from './format.js';
import { grantJson, grantsTable } from './grants.js';
import { passcodesTable } from './passcodes.js';
import { type FactorsView, factorsOf, hasFactor, lockOf, mfaService } from './mfa.js';

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

export function usersCommands(program: Command): void {
  const users = program.command('users').description('users the store knows: MFA on/off, exemptions, history');
  users
    .command('list')
    .description('list users')
    .option('--json', 'machine-readable output')
    .action(async (o: { json?: boolean }, cmd: Command) => {
      const config = configOf(cmd);
      const now = Date.now();
      const rows = await withStore(config, (s) => s.listUsers());
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
    .action(async (raw: string, o: { json?: boolean }, cmd: Command) => {
      const config = configOf(cmd);
      const name = userArg(config, raw);
      const now = Date.now();
      const data = await withStore(config, async (s) => {
        const u = await knownUser(s, name);
        return {
          u,
          factors: await factorsOf(s, name),
          lock: await lockOf(s, config, name, now),
          grants: await s.listGrants({ user: name, now }),
          passcodes: await mfaService(config, s).passcodes.list(name),
          logins: await s.loginsOf(name),
          audit: await s.auditOf(name, 10),
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
          passcodes: data.passcodes,
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
      out(data.passcodes.length ? 'app passcodes:\n' + passcodesTable(data.passcodes) : 'app passcodes: none');
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
    .action(async (raw: string, o: { reason: string; json?: boolean }, cmd: Command) => {
      const config = configOf(cmd);
      const name = userArg(config, raw);
      const reason = o.reason.trim();
      if (reason === '') throw new UsageError('users reset: --reason must say why (e.g. a ticket number): it goes into the audit log');
      const now = Date.now();
      const r = await withStore(config, async (s) => {
        const u = await knownUser(s, name);
        const before = await factorsOf(s, name);
        const lock = await lockOf(s, config, name, now);
        const { grantsRevoked, passcodesRevoked } = await mfaService(config, s).reset(name, actor(), reason);
        return { u, before, lock, grantsRevoked, passcodesRevoked };
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
          passcodes_revoked: r.passcodesRevoked,
          was_locked_until: r.lock.locked_until,
          mfa_enabled: r.u.mfaEnabled,
          mfa_required: required,
        });
      }
      out(`${name}: second factors reset (reason: ${reason})`);
      out(`removed:  ${describeFactors(r.before) ?? 'nothing (no factor or backup code was registered)'}`);
      out(`revoked:  ${r.grantsRevoked ? plural(r.grantsRevoked, 'grant') : 'no active grant'}; ${r.passcodesRevoked ? plural(r.passcodesRevoked, 'app passcode') : 'no app passcode'}`);
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
    .description("revoke every active grant and app passcode of a user (after a password change): the next mail login from outside needs MFA")
    .argument('<user>')
    .option('--reason <text>', 'why, for the audit log', '')
    .option('--json', 'machine-readable output')
    .action(async (raw: string, o: { reason: string; json?: boolean }, cmd: Command) => {
      const config = configOf(cmd);
      const name = userArg(config, raw);
      const now = Date.now();
      // A changed password must end every device: the grants and the app passcodes go in one transaction.
      const { grants: revoked, passcodes } = await withStore(config, async (s) => {
        await knownUser(s, name);
        const service = mfaService(config, s).passcodes;
        return s.tx(async () => ({
          grants: await s.revokeGrants({ user: name }, actor(), o.reason, now),
          passcodes: await service.revokeAll(name, actor(), o.reason || 'all grants revoked'),
        }));
      });
      if (o.json) return json({ user: name, grants: revoked.map((g) => grantJson(g, now)), passcodes });
      if (revoked.length === 0 && passcodes.length === 0) return out(`${name}: no active grant or app passcode: nothing revoked`);
      if (revoked.length > 0) {
        out(`${name}: revoked ${plural(revoked.length, 'grant')}:`);
        out(grantsTable(revoked, now));
      }
      if (passcodes.length > 0) {
        out(`${name}: revoked ${plural(passcodes.length, 'app passcode')}:`);
        out(passcodesTable(passcodes));
      }
    });
  users
    .command('unlock')
    .description('end a lock after too many wrong codes, and forget the failed attempts')
    .argument('<user>')
    .option('--json', 'machine-readable output')
    .action(async (raw: string, o: { json?: boolean }, cmd: Command) => {
      const config = configOf(cmd);
      const name = userArg(config, raw);
      const now = Date.now();
      const r = await withStore(config, async (s) => {
        await knownUser(s, name);
        const lock = await lockOf(s, config, name, now);
        const wasLocked = await mfaService(config, s).unlock(name, actor());
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
      .action(async (raw: string, o: { reason: string }, cmd: Command) => {
        const config = configOf(cmd);
        const user = userArg(config, raw);
        const changed = await withStore(config, async (s) => {
          if (mustExist && !(await s.getUser(user))) throw new UsageError(`unknown user "${user}": the store has never seen it`, 1);
          return s.setUserFlag(user, flag, value, actor(), Date.now(), o.reason);
        });
        out(`${user}: ${changed ? '' : 'already '}${name === 'enable' ? 'MFA enabled' : name === 'disable' ? 'MFA disabled' : name === 'exempt' ? 'exempt from MFA' : 'no longer exempt'}`);
      });
  flagCommand('enable', 'require MFA for this user', 'mfa_enabled', true, false);
  flagCommand('disable', 'stop requiring MFA for this user (site-wide required_from still applies)', 'mfa_enabled', false, true);
  flagCommand('exempt', 'never require MFA for this user (service accounts)', 'exempt', true, false);
  flagCommand('unexempt', 'remove the exemption', 'exempt', false, true);
}
