// `mfagate audit`: every change the store's audit log holds, filtered by user, address, action and time: the
// security team's "who revoked what, when" (`mfagate audit --action grant-revoke --since 30d`).
import type { Command } from 'commander';
import { blockPrefixes } from '../config/config.js';
import { parseDuration } from '../config/duration.js';
import { type Address, parseAddress, parseCidr } from '../policy/address.js';
import { AUDIT_ACTIONS, type AddressRange, type AuditEntry, KNOWN_ACTIONS, queryAudit } from '../store/audit-query.js';
import { UsageError, configOf, json, out, userArg, withStore } from './common.js';
import { formatTime, table } from './format.js';

export const DEFAULT_LIMIT = 100;
export const MAX_LIMIT = 100_000;

/** The known actions, by group, for the message that refuses an unknown one. */
function knownList(): string {
  const width = Math.max(...Object.keys(AUDIT_ACTIONS).map((g) => g.length)) + 1;
  return Object.entries(AUDIT_ACTIONS)
    .map(([group, names]) => `  ${`${group}:`.padEnd(width)} ${names.join(', ')}`)
    .join('\n');
}

/** "grant-revoke,passcode-revoke", "grant" (a group: every grant-* action), repeated --action: exact names. */
export function actionsArg(raws: readonly string[]): string[] {
  const names = new Set<string>();
  for (const raw of raws) {
    const items = raw.split(',').map((s) => s.trim().toLowerCase());
    if (items.some((s) => s === '')) throw new UsageError(`--action: expected an action or group (or a comma-separated list of them), got ${JSON.stringify(raw)}\nknown actions, by group:\n${knownList()}`);
    for (const item of items) {
      const group = (AUDIT_ACTIONS as Record<string, readonly string[]>)[item];
      if (group) group.forEach((n) => names.add(n));
      else if (KNOWN_ACTIONS.includes(item)) names.add(item);
      else throw new UsageError(`--action: unknown action ${JSON.stringify(item)}; known actions, by group (a group name selects all of its actions):\n${knownList()}`);
    }
  }
  return KNOWN_ACTIONS.filter((n) => names.has(n));
}

const INSTANT = /^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?(?:([Zz])|([+-])(\d{2}):(\d{2}))$/;

/** An RFC 3339 instant ("2026-11-21T09:00:00+09:00", "...Z"), checked field by field; undefined when it is not one. */
export function parseInstant(text: string): number | undefined {
  const m = INSTANT.exec(text);
  if (!m) return undefined;
  const [y, mo, d, h, mi, s] = m.slice(1, 7).map(Number) as [number, number, number, number, number, number];
  const daysInMonth = new Date(Date.UTC(y, mo, 0)).getUTCDate();
  if (mo < 1 || mo > 12 || d < 1 || d > daysInMonth || h > 23 || mi > 59 || s > 59) return undefined;
  let offsetMin = 0;
  if (!m[8]) {
    const oh = Number(m[10]);
    const om = Number(m[11]);
    if (oh > 23 || om > 59) return undefined;
    offsetMin = (m[9] === '-' ? -1 : 1) * (oh * 60 + om);
  }
  const ms = m[7] ? Math.floor(Number(`0${m[7]}`) * 1000) : 0;
  const utc = Date.UTC(y, mo - 1, d, h, mi, s, ms);
  if (y < 1970 || !Number.isSafeInteger(utc)) return undefined;
  return utc - offsetMin * 60_000;
}

/** --since / --until: a duration ("7d": that long ago) or an RFC 3339 instant. */
export function timeArg(option: string, raw: string, now: number): number {
  const ms = parseDuration(raw);
  if (ms !== undefined) return now - ms;
  const at = parseInstant(raw.trim());
  if (at !== undefined) return at;
  throw new UsageError(`${option}: expected a duration ago such as "7d", "12h" or "1h30m", or an RFC 3339 instant such as "2026-11-21T09:00:00+09:00" or "2026-11-21T00:00:00Z", got ${JSON.stringify(raw)}`);
}

export function limitArg(raw: string): number {
  const n = /^\d{1,7}$/.test(raw.trim()) ? Number(raw.trim()) : NaN;
  if (!(n >= 1 && n <= MAX_LIMIT)) throw new UsageError(`--limit: expected a number of entries from 1 to ${MAX_LIMIT}, got ${JSON.stringify(raw)}`);
  return n;
}

/** --ip: an address (its block, as grants are held: [grants] ipv4_prefix, ipv6_prefix) or a range "2001:db8:1:2::/64". */
export function ipRangeArg(raw: string, prefixes: { ipv4: number; ipv6: number }): AddressRange {
  const bad = () => new UsageError(`--ip: not an IP address or address block: ${JSON.stringify(raw)} (expected e.g. 203.0.113.7, 2001:db8::1 or 2001:db8:1:2::/64)`);
  let address: Address | undefined;
  let bits: number;
  if (raw.includes('/')) {
    const r = parseCidr(raw);
    if (!r) throw bad();
    [address, bits] = r;
  } else {
    address = parseAddress(raw);
    if (!address) throw bad();
    bits = address.kind() === 'ipv4' ? prefixes.ipv4 : prefixes.ipv6;
  }
  return { address, bits };
}

export function auditJson(e: AuditEntry) {
  return { at: new Date(e.at).toISOString(), actor: e.actor, action: e.action, user: e.user, ip: e.ip, grant: e.grantId, detail: e.detail };
}

export function auditTable(entries: readonly AuditEntry[]): string {
  return table(
    ['WHEN', 'ACTOR', 'ACTION', 'USER', 'IP', 'GRANT', 'DETAIL'],
    entries.map((e) => [formatTime(e.at), e.actor ?? '-', e.action, e.user ?? '-', e.ip ?? '-', e.grantId === null ? '-' : String(e.grantId), JSON.stringify(e.detail)]),
  );
}

interface AuditOpts {
  user?: string;
  ip?: string;
  action?: string[];
  since?: string;
  until?: string;
  limit?: string;
  oldestFirst?: boolean;
  json?: boolean;
}

export function auditCommand(program: Command): void {
  program
    .command('audit')
    .description('the audit log: who changed what, when (grants made, extended, revoked, expired, purged; factors; MFA on/off; locks; resets; passcodes)')
    .option('--user <user>', 'only this user')
    .option('--ip <ip>', "only this address's block (IPv4 address, IPv6 /64), or a range such as 2001:db8:1:2::/64")
    .option('--action <actions>', 'only these actions or groups, comma-separated (e.g. grant-revoke, or grant for every grant-* action)', (v: string, prev: string[] = []) => [...prev, v])
    .option('--since <when>', 'from then on: a duration ago ("7d") or an RFC 3339 instant')
    .option('--until <when>', 'before then: a duration ago ("1d") or an RFC 3339 instant')
    .option('--limit <n>', `at most this many entries (default ${DEFAULT_LIMIT}, at most ${MAX_LIMIT})`)
    .option('--oldest-first', 'oldest first (default: newest first)')
    .option('--json', 'machine-readable output')
    .action(async (o: AuditOpts, cmd: Command) => {
      const config = configOf(cmd);
      const now = Date.now();
      const user = o.user !== undefined ? userArg(config, o.user) : undefined;
      const ip = o.ip !== undefined ? ipRangeArg(o.ip, blockPrefixes(config)) : undefined;
      const actions = o.action !== undefined ? actionsArg(o.action) : undefined;
      const since = o.since !== undefined ? timeArg('--since', o.since, now) : undefined;
      const until = o.until !== undefined ? timeArg('--until', o.until, now) : undefined;
      if (since !== undefined && until !== undefined && since >= until) {
        throw new UsageError(`--since (${formatTime(since)}) must be before --until (${formatTime(until)})`);
      }
      const limit = o.limit !== undefined ? limitArg(o.limit) : DEFAULT_LIMIT;
      const oldestFirst = o.oldestFirst === true;
      const { entries, more } = await withStore(config, (s) => queryAudit(s.sql, { user, ip, actions, since, until, limit, oldestFirst, now }));
      if (more) {
        const shown = limit === 1 ? 'entry' : `${limit} entries`;
        process.stderr.write(`mfagate: note: the ${oldestFirst ? 'oldest' : 'newest'} ${shown} shown; more match (narrow with --since, --until, --user, --ip or --action, or raise --limit)\n`);
      }
      if (o.json) return json(entries.map(auditJson));
      if (entries.length === 0) return out('no audit entries match');
      out(auditTable(entries));
    });
}
