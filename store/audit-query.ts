// The audit log read back, filtered: `mfagate audit` ("who revoked what, when"). One query for both backends (SQL
// that SQLite and PostgreSQL both accept, "user" quoted, `?` placeholders, no dialect functions), in one read
// snapshot.
//
// Which rows: every row of the audit table that matches, plus one row the store does not write: a grant's expiry
// ("grant-expire", actor null, detail.derived true). A grant that simply runs out leaves no row when it does; its
// expiry is known from the grant itself while the grants table holds it (revoked_at NULL, expires_at passed: a
// revoke only ends active grants, and an expired grant is never extended), and after the purge from the
// grant-purge row, which keeps the grant's expires_at and revoked_at (NULL: it expired).
//
// Indexes: audit has its primary key (id), audit_user ("user", at) and audit_at (at); grants has grants_expires (expires_at) and
// grants_active ("user", block, expires_at) WHERE revoked_at IS NULL. Every condition is a plain comparison of a
// column with a parameter, so a --user query is a range scan of audit_user in `at` order; without --user,
// audit_at (migration 6) serves the time range. An address block that a text comparison cannot express exactly (an IPv6
// /64, an IPv4 range) is narrowed in SQL by the literal prefix every address in it starts with and checked
// exactly here, page by page, so LIMIT still means "rows that match".
import type ipaddr from 'ipaddr.js';
import { type Address, parseAddress } from '../policy/address.js';
import { type Row, type Sql, type SqlParam, nullable, num } from './sql.js';
import { auditFromRow, parseDetail } from './records.js';

/**
 * Every action the audit log holds, by group (the part before the first "-"); docs/cli.md says who writes each. All
 * are stored rows except grant-expire, which the query derives (see above). test/cli-audit.test.ts checks this
 * list against the audit calls in the sources.
 */
export const AUDIT_ACTIONS = {
  grant: ['grant-add', 'grant-extend', 'grant-revoke', 'grant-purge', 'grant-expire'],
  user: ['user-enable', 'user-disable', 'user-exempt', 'user-unexempt', 'user-locked', 'user-unlock', 'user-reset'],
  factor: ['factor-pass', 'factor-fail', 'factor-refused'],
  totp: ['totp-begin', 'totp-register', 'totp-remove'],
  email: ['email-register', 'email-verified', 'email-change', 'email-remove', 'email-code-sent'],
  backup: ['backup-generate'],
  passcode: ['passcode-add', 'passcode-revoke'],
} as const satisfies Record<string, readonly string[]>;

export type AuditGroup = keyof typeof AUDIT_ACTIONS;

/** The one action the store does not write as a row of its own: derived from grants and grant-purge rows. */
export const DERIVED_EXPIRY = 'grant-expire';

export const KNOWN_ACTIONS: readonly string[] = Object.values(AUDIT_ACTIONS).flat();

/** An address range: rows whose address lies in it match. */
export interface AddressRange {
  address: Address;
  bits: number;
}

export interface AuditFilter {
  user?: string | undefined;
  /** Exact action names (groups already expanded); undefined: every row, whatever its action. */
  actions?: readonly string[] | undefined;
  ip?: AddressRange | undefined;
  /** at >= since (ms). */
  since?: number | undefined;
  /** at < until (ms). */
  until?: number | undefined;
  /** At most this many entries (at least 1). */
  limit: number;
  oldestFirst?: boolean | undefined;
  /** Grants whose expires_at is not after now have expired. */
  now: number;
  /** Rows read at a time where rows are checked here (an address range, purge rows); tests make it small. */
  pageSize?: number | undefined;
}

export interface AuditEntry {
  /** The audit row's id; null for a derived grant-expire entry. */
  id: number | null;
  at: number;
  /** Who: "cli:NAME", "api", "daemon"; null for a derived entry (nobody: the grant ran out). */
  actor: string | null;
  action: string;
  user: string | null;
  ip: string | null;
  grantId: number | null;
  detail: Record<string, unknown>;
}

export interface AuditResult {
  entries: AuditEntry[];
  /** More entries match than `limit`. */
  more: boolean;
}

const PAGE = 500;

const entryOfRow = (r: Row): AuditEntry => auditFromRow(r);

function compareNewest(a: AuditEntry, b: AuditEntry): number {
  if (a.at !== b.at) return b.at - a.at;
  if ((a.id === null) !== (b.id === null)) return a.id === null ? 1 : -1;
  return (b.id ?? b.grantId ?? 0) - (a.id ?? a.grantId ?? 0);
}

const compareOf = (oldestFirst: boolean) => (oldestFirst ? (a: AuditEntry, b: AuditEntry) => compareNewest(b, a) : compareNewest);

// ---- addresses ------------------------------------------------------------------------------------------------

interface IpCondition {
  where: string;
  args: SqlParam[];
  /** undefined when `where` is exact; else the exact check of a row's address. */
  check: ((ip: string | null) => boolean) | undefined;
}

/**
 * The condition on an address column. A whole address is an equality (every writer stores addresses in the
 * canonical text parseAddress().toString() gives: dotted quad, RFC 5952). A shorter range is a LIKE on the text
 * every address in it starts with (the whole IPv4 octets; the leading non-zero IPv6 groups, which RFC 5952 never
 * compresses), and an exact check of each row.
 */
export function ipCondition(column: string, range: AddressRange): IpCondition {
  const { address, bits } = range;
  const v4 = address.kind() === 'ipv4';
  if (bits === (v4 ? 32 : 128)) return { where: `${column} = ?`, args: [address.toString()], check: undefined };
  let prefix = '';
  if (v4) {
    const octets = (address as ipaddr.IPv4).octets.slice(0, Math.floor(bits / 8));
    if (octets.length) prefix = `${octets.join('.')}.`;
  } else {
    const groups: string[] = [];
    for (const g of (address as ipaddr.IPv6).parts.slice(0, Math.floor(bits / 16))) {
      if (g === 0) break;
      groups.push(g.toString(16));
    }
    if (groups.length) prefix = `${groups.join(':')}:`;
  }
  const pattern = prefix ? `${prefix}%` : v4 ? '%.%' : '%:%';
  const check = (ip: string | null) => {
    const a = ip === null ? undefined : parseAddress(ip);
    if (!a || a.kind() !== address.kind()) return false;
    return v4 ? (a as ipaddr.IPv4).match(address as ipaddr.IPv4, bits) : (a as ipaddr.IPv6).match(address as ipaddr.IPv6, bits);
  };
  return { where: `${column} LIKE ?`, args: [pattern], check };
}

// ---- the query -------------------------------------------------------------------------------------------------

/** The audit rows and derived expiries that match, newest first (or oldest first), at most `limit`, in one snapshot. */
export async function queryAudit(sql: Sql, f: AuditFilter): Promise<AuditResult> {
  if (!Number.isSafeInteger(f.limit) || f.limit < 1) throw new RangeError(`audit query: limit must be a positive integer, got ${f.limit}`);
  if (f.pageSize !== undefined && !(Number.isSafeInteger(f.pageSize) && f.pageSize >= 1)) throw new RangeError(`audit query: pageSize must be a positive integer, got ${f.pageSize}`);
  const want = f.limit + 1;
  const oldestFirst = f.oldestFirst === true;
  const compare = compareOf(oldestFirst);
  const stored = f.actions === undefined ? undefined : f.actions.filter((a) => a !== DERIVED_EXPIRY);
  const expiries = f.actions === undefined || f.actions.includes(DERIVED_EXPIRY);
  const entries = await sql.snapshot(async () => {
    // (concat, not push(...rows): up to 100001 rows are too many arguments for one call.)
    let found: AuditEntry[] = stored === undefined || stored.length > 0 ? await storedRows(sql, f, stored, want, oldestFirst) : [];
    if (expiries) {
      found = found.concat(await expiredGrants(sql, f, want, oldestFirst)).sort(compare);
      // A purged grant expired before its purge row was written: when `want` entries are found already, only purge
      // rows at or after the last of them (newest first) can hold an expiry that comes before it.
      const last = found[want - 1];
      found = found.concat(await purgedExpiries(sql, f, want, oldestFirst, !oldestFirst && last ? last.at : undefined));
    }
    return found.sort(compare);
  });
  return { entries: entries.slice(0, f.limit), more: entries.length > f.limit };
}

interface Conditions {
  where: string[];
  args: SqlParam[];
  check: ((ip: string | null) => boolean) | undefined;
}

function conditions(f: AuditFilter, columns: { at: string; user: string; ip: string }, withTime = true): Conditions {
  const where: string[] = [];
  const args: SqlParam[] = [];
  if (f.user !== undefined) {
    where.push(`${columns.user} = ?`);
    args.push(f.user);
  }
  if (withTime && f.since !== undefined) {
    where.push(`${columns.at} >= ?`);
    args.push(f.since);
  }
  if (withTime && f.until !== undefined) {
    where.push(`${columns.at} < ?`);
    args.push(f.until);
  }
  let check: Conditions['check'];
  if (f.ip) {
    const c = ipCondition(columns.ip, f.ip);
    where.push(c.where);
    args.push(...c.args);
    check = c.check;
  }
  return { where, args, check };
}

/**
 * Reads `SELECT columns FROM from WHERE conditions ORDER BY key LIMIT` page by page (keyset: after the last row's
 * key) until `want` rows pass `check`, or none are left. Without a check, one page of `want` rows is the answer.
 */
async function paged(
  sql: Sql,
  columns: string,
  from: string,
  c: Conditions,
  key: { at: string; id: string },
  want: number,
  oldestFirst: boolean,
  pageSize: number | undefined,
): Promise<Row[]> {
  const dir = oldestFirst ? 'ASC' : 'DESC';
  const after = oldestFirst ? '>' : '<';
  const rows: Row[] = [];
  let last: Row | undefined;
  for (;;) {
    const where = [...c.where];
    const args = [...c.args];
    if (last) {
      where.push(`(${key.at} ${after} ? OR (${key.at} = ? AND ${key.id} ${after} ?))`);
      args.push(num(last, 'k_at'), num(last, 'k_at'), num(last, 'k_id'));
    }
    const size = c.check ? (pageSize ?? Math.max(want, PAGE)) : want;
    const page = await sql.all(
      `SELECT ${columns}, ${key.at} AS k_at, ${key.id} AS k_id FROM ${from} ${where.length ? `WHERE ${where.join(' AND ')}` : ''} ORDER BY ${key.at} ${dir}, ${key.id} ${dir} LIMIT ?`,
      [...args, size],
    );
    for (const r of page) if (c.check === undefined || c.check((r['ip'] as string | null) ?? null)) rows.push(r);
    if (page.length < size || rows.length >= want) return rows.slice(0, want);
    last = page[page.length - 1];
  }
}

async function storedRows(sql: Sql, f: AuditFilter, actions: readonly string[] | undefined, want: number, oldestFirst: boolean): Promise<AuditEntry[]> {
  const c = conditions(f, { at: 'at', user: '"user"', ip: 'ip' });
  if (actions !== undefined) {
    c.where.push(actions.length === 1 ? 'action = ?' : `action IN (${actions.map(() => '?').join(', ')})`);
    c.args.push(...actions);
  }
  const rows = await paged(sql, 'id, at, actor, action, "user", ip, grant_id, detail', 'audit', c, { at: 'at', id: 'id' }, want, oldestFirst, f.pageSize);
  return rows.map(entryOfRow);
}

const expiryEntry = (g: { id: number; user: string; ip: string; expiresAt: number; block: unknown; method: unknown; source: unknown }): AuditEntry => ({
  id: null,
  at: g.expiresAt,
  actor: null,
  action: DERIVED_EXPIRY,
  user: g.user,
  ip: g.ip,
  grantId: g.id,
  detail: { block: g.block, method: g.method, source: g.source, derived: true },
});

/** Grants the table still holds that ran out unrevoked: their expiry, at expires_at (index grants_expires). */
async function expiredGrants(sql: Sql, f: AuditFilter, want: number, oldestFirst: boolean): Promise<AuditEntry[]> {
  const c = conditions(f, { at: 'expires_at', user: '"user"', ip: 'ip' });
  c.where.push('revoked_at IS NULL', 'expires_at <= ?');
  c.args.push(f.now);
  const rows = await paged(sql, 'id, "user", ip, block, expires_at, method, source', 'grants', c, { at: 'expires_at', id: 'id' }, want, oldestFirst, f.pageSize);
  return rows.map((r) =>
    expiryEntry({ id: num(r, 'id'), user: r['user'] as string, ip: r['ip'] as string, expiresAt: num(r, 'expires_at'), block: r['block'], method: r['method'], source: r['source'] }),
  );
}

/**
 * Purged grants that had expired (the purge row's revoked_at is null): their expiry, at the purge row's
 * expires_at. A grant is purged after it expired, so only purge rows at or after `since` (and `from`) can hold one.
 * Read by id, a page at a time, keeping the best `want`.
 */
async function purgedExpiries(sql: Sql, f: AuditFilter, want: number, oldestFirst: boolean, from: number | undefined): Promise<AuditEntry[]> {
  const c = conditions(f, { at: 'at', user: '"user"', ip: 'ip' }, false);
  c.where.push("action = 'grant-purge'");
  const lower = Math.max(f.since ?? -Infinity, from ?? -Infinity);
  if (Number.isFinite(lower)) {
    c.where.push('at >= ?');
    c.args.push(lower);
  }
  const compare = compareOf(oldestFirst);
  const size = f.pageSize ?? PAGE;
  let best: AuditEntry[] = [];
  let after = 0;
  for (;;) {
    const page = await sql.all(
      `SELECT id, "user", ip, grant_id, detail FROM audit WHERE ${[...c.where, 'id > ?'].join(' AND ')} ORDER BY id LIMIT ?`,
      [...c.args, after, size],
    );
    for (const r of page) {
      if (c.check && !c.check((r['ip'] as string | null) ?? null)) continue;
      const d = parseDetail(r['detail']);
      if (d['revoked_at'] !== null || typeof d['expires_at'] !== 'string') continue;
      const expiresAt = Date.parse(d['expires_at']);
      if (Number.isNaN(expiresAt) || expiresAt > f.now) continue;
      if ((f.since !== undefined && expiresAt < f.since) || (f.until !== undefined && expiresAt >= f.until)) continue;
      const grantId = nullable(r['grant_id']);
      if (grantId === null) continue;
      best.push(expiryEntry({ id: grantId, user: r['user'] as string, ip: r['ip'] as string, expiresAt, block: d['block'], method: d['method'], source: d['source'] }));
    }
    if (best.length > 2 * want) best = best.sort(compare).slice(0, want);
    if (page.length < size) return best.sort(compare).slice(0, want);
    after = num(page[page.length - 1], 'id');
  }
}
