// `mfagate grants`: list, add and revoke per-address grants.
import type { Command } from 'commander';
import { blockPrefixes } from '../config/config.js';
import { formatDuration } from '../config/duration.js';
import { blockOf } from '../policy/address.js';
import type { GrantRow } from '../store/store.js';
import { UsageError, actor, configOf, idArg, ipArg, json, out, ttlArg, userArg, withStore } from './common.js';
import { formatTime, table } from './format.js';

export function grantState(g: GrantRow, now: number): string {
  if (g.revokedAt !== null) return 'revoked';
  return g.expiresAt > now ? 'active' : 'expired';
}

export function grantJson(g: GrantRow, now: number) {
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

export function grantsTable(grants: GrantRow[], now: number): string {
  return table(
    ['ID', 'USER', 'BLOCK', 'STATE', 'CREATED', 'EXPIRES', 'METHOD', 'SOURCE'],
    grants.map((g) => [String(g.id), g.user, g.block, grantState(g, now), formatTime(g.createdAt), formatTime(g.expiresAt), g.method, g.source]),
  );
}

export function grantsCommands(program: Command): void {
  const grants = program.command('grants').description('inspect, add and revoke MFA grants');
  grants
    .command('list')
    .description('list grants (active ones unless --all)')
    .option('--user <user>', 'only this user')
    .option('--ip <ip>', 'only grants covering this address')
    .option('--all', 'include expired and revoked grants')
    .option('--json', 'machine-readable output')
    .action(async (o: { user?: string; ip?: string; all?: boolean; json?: boolean }, cmd: Command) => {
      const config = configOf(cmd);
      const user = o.user !== undefined ? userArg(config, o.user) : undefined;
      const block = o.ip !== undefined ? blockOf(ipArg(o.ip), blockPrefixes(config)) : undefined;
      const now = Date.now();
      const rows = await withStore(config, (s) => s.listGrants({ user, block, all: o.all === true, now }));
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
    .action(async (o: { user: string; ip: string; ttl?: string; reason: string; json?: boolean }, cmd: Command) => {
      const config = configOf(cmd);
      const user = userArg(config, o.user);
      const addr = ipArg(o.ip);
      const ttlMs = o.ttl !== undefined ? ttlArg(o.ttl) : config.grants.ttlMs;
      const now = Date.now();
      const { grant, extended } = await withStore(config, (s) =>
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
    .action(async (o: { id?: string; user?: string; ip?: string; reason: string; json?: boolean }, cmd: Command) => {
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
      const revoked = await withStore(config, (s) => s.revokeGrants({ id, user, block }, actor(), o.reason, now));
      if (o.json) return json(revoked.map((g) => grantJson(g, now)));
      if (revoked.length === 0) return out('no active grant matched: nothing revoked');
      out(`revoked ${revoked.length} grant${revoked.length === 1 ? '' : 's'}:`);
      out(grantsTable(revoked, now));
    });
}
