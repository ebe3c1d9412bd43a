// `mfagate passcodes`: app passcodes made, listed and revoked at the helpdesk (a user makes their own in webmail).
import type { Command } from 'commander';
import { PASSCODE_PROTOCOLS } from '../config/config.js';
import { formatDuration } from '../config/duration.js';
import { PasscodeError, type PasscodeView, groupPasscode, passcodeView } from '../mfa/passcodes.js';
import { UsageError, actor, configOf, idArg, json, out, plural, ttlArg, userArg, withStore } from './common.js';
import { formatTime, table } from './format.js';
import { mfaService } from './mfa.js';

const time = (iso: string | null): string => formatTime(iso === null ? null : Date.parse(iso));

function lastUse(p: PasscodeView): string {
  return p.last_used_at === null ? 'never' : `${time(p.last_used_at)} ${p.last_used_ip ?? ''} ${p.last_used_protocol ?? ''}`.trim();
}

function state(p: PasscodeView, now: number): string {
  if (p.revoked_at !== null) return 'revoked';
  return p.expires_at !== null && Date.parse(p.expires_at) <= now ? 'expired' : 'working';
}

/** The table `passcodes list` and `users show` print; `withUser` adds the user column. */
export function passcodesTable(rows: readonly (PasscodeView & { user?: string })[], withUser = false, now = Date.now()): string {
  return table(
    [...(withUser ? ['USER'] : []), 'ID', 'NAME', 'PROTOCOLS', 'STATE', 'CREATED', 'EXPIRES', 'LAST USE'],
    rows.map((p) => [...(withUser ? [p.user ?? ''] : []), String(p.id), p.name, p.protocols.join(','), state(p, now), time(p.created_at), p.expires_at === null ? 'never' : time(p.expires_at), lastUse(p)]),
  );
}

/** "imap,smtp" -> ["imap", "smtp"]; anything else is a usage error naming what is allowed. */
function protocolsArg(raw: string): string[] {
  const list = raw.split(',').map((p) => p.trim().toLowerCase()).filter((p) => p !== '');
  const bad = list.filter((p) => !(PASSCODE_PROTOCOLS as readonly string[]).includes(p));
  if (list.length === 0 || bad.length > 0) {
    throw new UsageError(`--protocols: expected a comma-separated list of ${PASSCODE_PROTOCOLS.join(', ')}, got ${JSON.stringify(raw)}`);
  }
  return list;
}

/** A PasscodeError is the operator's to fix (too many, disabled, unknown id): a message and exit 1. */
function usage(e: unknown): never {
  if (e instanceof PasscodeError) throw new UsageError(e.message, e.code === 'bad-request' ? 2 : 1);
  throw e;
}

export function passcodesCommands(program: Command): void {
  const passcodes = program.command('passcodes').description('app passcodes: per-device passwords for mail programs on phones, usable from any network');
  passcodes
    .command('add')
    .description('make an app passcode for a device of a user (helpdesk): printed once, never stored in plain text')
    .requiredOption('--user <user>', 'the user')
    .requiredOption('--name <name>', 'the device, e.g. "iPhone"')
    .option('--protocols <list>', `what it may be used for, comma-separated: ${PASSCODE_PROTOCOLS.join(', ')} (default: [app_passcodes] protocols)`)
    .option('--ttl <duration>', 'how long it works (default: [app_passcodes] ttl, or until revoked)')
    .option('--json', 'machine-readable output (the passcode is in it: keep it out of files and tickets)')
    .action(async (o: { user: string; name: string; protocols?: string; ttl?: string; json?: boolean }, cmd: Command) => {
      const config = configOf(cmd);
      const user = userArg(config, o.user);
      const protocols = o.protocols !== undefined ? protocolsArg(o.protocols) : undefined;
      const ttlMs = o.ttl !== undefined ? ttlArg(o.ttl) : undefined;
      const who = actor();
      // The hash is computed (in the thread pool) before the row is written, in one transaction with the user.
      const made = await withStore(config, async (s) => {
        const service = mfaService(config, s).passcodes;
        const { name, protocols: list } = service.parseRequest(o.name, protocols);
        const prepared = await service.prepare(user, name, list, ttlMs, who);
        const view = await s.tx(async () => {
          await s.ensureUser(user, Date.now());
          return prepared.insert();
        });
        return { view, passcode: groupPasscode(prepared.passcode) };
      }).catch(usage);
      if (o.json) return json({ user, ...made.view, passcode: made.passcode });
      const v = made.view;
      out(`${user}: app passcode ${v.id} "${v.name}" made, for ${v.protocols.join(', ')}${v.expires_at ? `, until ${time(v.expires_at)} (${formatDuration(Date.parse(v.expires_at) - Date.now())})` : ', until revoked'}`);
      out('');
      out(`    ${made.passcode}`);
      out('');
      out('It is shown only now. The user types it into the mail program instead of the password (spaces do not matter).');
      out(`It works from any network; end it with: mfagate passcodes revoke --user ${user} --id ${v.id}`);
    });
  passcodes
    .command('list')
    .description('working app passcodes (of one user, or of everybody), with their last use')
    .option('--user <user>', 'only this user')
    .option('--all', 'with --user: include revoked and expired ones')
    .option('--json', 'machine-readable output')
    .action(async (o: { user?: string; all?: boolean; json?: boolean }, cmd: Command) => {
      const config = configOf(cmd);
      const user = o.user !== undefined ? userArg(config, o.user) : undefined;
      if (o.all && user === undefined) throw new UsageError('passcodes list: --all needs --user');
      const now = Date.now();
      const rows = await withStore(config, async (s) =>
        user !== undefined
          ? (await mfaService(config, s).passcodes.list(user, o.all === true)).map((p) => ({ user, ...p }))
          : (await s.passcodes.everyActive(now)).map((r) => ({ user: r.user, ...passcodeView(r) })),
      );
      if (o.json) return json(rows);
      if (rows.length === 0) return out(user !== undefined ? `${user}: no ${o.all ? '' : 'working '}app passcodes` : 'no working app passcodes');
      out(passcodesTable(rows, user === undefined));
    });
  passcodes
    .command('revoke')
    .description("end an app passcode (--id) or all of a user's (--all): the device's next login fails")
    .requiredOption('--user <user>', 'the user')
    .option('--id <id>', 'the passcode number (see passcodes list)')
    .option('--all', 'every working passcode of the user')
    .option('--reason <text>', 'why, for the audit log', '')
    .option('--json', 'machine-readable output')
    .action(async (o: { user: string; id?: string; all?: boolean; reason: string; json?: boolean }, cmd: Command) => {
      const config = configOf(cmd);
      const user = userArg(config, o.user);
      if ((o.id === undefined) === (o.all !== true)) throw new UsageError('passcodes revoke: give --id ID or --all');
      const id = o.id !== undefined ? idArg(o.id, 'a passcode number') : undefined;
      const revoked = await withStore(config, async (s) => {
        const service = mfaService(config, s).passcodes;
        return (id !== undefined ? service.revoke(user, id, actor(), o.reason).then((p) => [p]) : service.revokeAll(user, actor(), o.reason)).catch(usage);
      });
      if (o.json) return json(revoked.map((p) => ({ user, ...p })));
      if (revoked.length === 0) return out(`${user}: no working app passcode: nothing revoked`);
      out(`${user}: revoked ${plural(revoked.length, 'app passcode')}: ${revoked.map((p) => `${p.id} "${p.name}"`).join(', ')}`);
    });
}
