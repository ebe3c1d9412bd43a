// Rollout readiness (`mfagate report rollout`): before MFA is required for everyone, who would be refused. The
// SQL reads what the store has (users' flags, their second factors, Dovecot's login reports) on either backend
// (store/sql.ts); whether an address is outside the trusted networks is decided here in TypeScript, with the
// decision's own statement of it (isTrustedNetwork), never in SQL.
//
// What the login record can tell, and what it cannot: `logins` keeps one row per (user, address) with the last
// successful login's time and the protocol of the last report from that address (a success or a failure). A
// login a webmail host made for a browser is recorded under the webmail host (PolicyService.report), which the
// report leaves out like every webmail address.
import { type Address, parseAddress } from '../policy/address.js';
import { type PolicySettings, isTrustedNetwork, mfaRequired } from '../policy/decide.js';
import { type Sql, num } from './sql.js';

/** A user as the report needs it: flags and what the second factors are. */
export interface RolloutUserRow {
  name: string;
  mfaEnabled: boolean;
  exempt: boolean;
  /** An authenticator app or a confirmed external address is registered. */
  usableFactor: boolean;
  /** An app enrolment begun and never confirmed with a first code. */
  totpPending: boolean;
  /** An external address waiting for its confirmation code. */
  emailPending: boolean;
}

/** A successful login within the period by a user who has no usable factor and is not exempt in the store. */
export interface RolloutLoginRow {
  user: string;
  ip: string;
  protocol: string;
  lastSuccessAt: number;
}

export interface RolloutRows {
  users: RolloutUserRow[];
  logins: RolloutLoginRow[];
}

// A factor is usable as the MFA service uses it: a confirmed app (totp_secret is set only on confirmation), or
// the registered external address (email is set only once its code was entered).
const USABLE = `(f.totp_secret IS NOT NULL OR (f.email IS NOT NULL AND f.email <> ''))`;

const USERS_SQL = `
  SELECT u.name AS name, u.mfa_enabled AS mfa_enabled, u.exempt AS exempt,
         CASE WHEN ${USABLE} THEN 1 ELSE 0 END AS usable_factor,
         CASE WHEN f.totp_pending IS NOT NULL THEN 1 ELSE 0 END AS totp_pending,
         CASE WHEN f.email_pending IS NOT NULL AND f.email_pending <> '' THEN 1 ELSE 0 END AS email_pending
  FROM users u LEFT JOIN factors f ON f."user" = u.name`;

// Only the rows that can matter: successes since the start of the period, of users without a usable factor
// who are not exempt in the store (the configuration's exempt_users are applied in TypeScript). Without a
// factors row, every f. column is NULL and USABLE is false (IS NOT NULL is never NULL itself).
const LOGINS_SQL = `
  SELECT l."user" AS "user", l.ip AS ip, l.protocol AS protocol, l.last_success_at AS last_success_at
  FROM logins l
  JOIN users u ON u.name = l."user"
  LEFT JOIN factors f ON f."user" = l."user"
  WHERE l.last_success_at IS NOT NULL AND l.last_success_at >= ? AND u.exempt = 0 AND NOT ${USABLE}`;

/** What the store knows for the report, read in one snapshot: every user, and the logins since `since` (ms). */
export async function rolloutRows(sql: Sql, since: number): Promise<RolloutRows> {
  return sql.snapshot(async () => {
    const users = (await sql.all(USERS_SQL)).map((r) => ({
      name: r['name'] as string,
      mfaEnabled: num(r, 'mfa_enabled') === 1,
      exempt: num(r, 'exempt') === 1,
      usableFactor: num(r, 'usable_factor') === 1,
      totpPending: num(r, 'totp_pending') === 1,
      emailPending: num(r, 'email_pending') === 1,
    }));
    const logins = (await sql.all(LOGINS_SQL, [since])).map((r) => ({
      user: r['user'] as string,
      ip: r['ip'] as string,
      protocol: r['protocol'] as string,
      lastSuccessAt: num(r, 'last_success_at'),
    }));
    return { users, logins };
  });
}

export type RolloutSettings = Pick<PolicySettings, 'trusted' | 'untrusted' | 'webmail' | 'protocols' | 'exemptUsers' | 'requiredFrom'>;

export interface RolloutCounts {
  /** Users the store knows. */
  users: number;
  mfaEnabled: number;
  usableFactor: number;
  /** Exempt in the store or in [enforcement] exempt_users. */
  exempt: number;
  /** Users for whom MFA is required at the date (enabled, or required_from has passed; not exempt). */
  mfaRequired: number;
  /** Of those, the ones without a usable factor. */
  requiredWithoutFactor: number;
  /** Of those, the ones who logged in from outside within the period: the list. */
  wouldBeRefused: number;
}

export interface WouldBeRefused {
  user: string;
  mfaEnabled: boolean;
  /** The last successful login from outside within the period, and where from. */
  lastOutsideLogin: number;
  ip: string;
  /** The protocol of the last report from that address (see the note at the top). */
  protocol: string;
  /** How many outside addresses the user logged in from within the period. */
  outsideAddresses: number;
  reason: string;
}

export interface RolloutReadiness {
  counts: RolloutCounts;
  /** Sorted by user name. */
  wouldBeRefused: WouldBeRefused[];
}

/**
 * Whether a recorded login address counts as outside: not in a trusted range, or in an untrusted one (eduroam
 * inside the campus range), as the decision treats it; and not a webmail host (its own logins are allowed by
 * the webmail rule). An address that does not parse cannot be shown to be inside: it counts as outside.
 */
export function isOutside(settings: Pick<PolicySettings, 'trusted' | 'untrusted' | 'webmail'>, ip: string): boolean {
  const a: Address | undefined = parseAddress(ip);
  if (!a) return true;
  return !isTrustedNetwork(settings, a) && !settings.webmail.has(a);
}

function reasonOf(u: RolloutUserRow): string {
  if (u.totpPending && u.emailPending) return 'authenticator app and external address not confirmed';
  if (u.totpPending) return 'authenticator app not confirmed';
  if (u.emailPending) return 'external address not confirmed';
  return 'no second factor';
}

/**
 * Who would be refused at `at`: users for whom MFA is required then (the decision's rule 4, exemptions of both
 * kinds included), without a usable factor, who logged in successfully with a mail program (a protocol in
 * [enforcement] protocols) from outside within the rows' period. Pure: the rows come from rolloutRows.
 */
export function rolloutReadiness(rows: RolloutRows, settings: RolloutSettings, at: number): RolloutReadiness {
  const byName = new Map(rows.users.map((u) => [u.name, u]));
  const required = (u: RolloutUserRow) => mfaRequired(settings, u.name, u, at);
  const counts: RolloutCounts = {
    users: rows.users.length,
    mfaEnabled: rows.users.filter((u) => u.mfaEnabled).length,
    usableFactor: rows.users.filter((u) => u.usableFactor).length,
    exempt: rows.users.filter((u) => u.exempt || settings.exemptUsers.has(u.name)).length,
    mfaRequired: rows.users.filter(required).length,
    requiredWithoutFactor: rows.users.filter((u) => required(u) && !u.usableFactor).length,
    wouldBeRefused: 0,
  };
  const found = new Map<string, WouldBeRefused>();
  for (const l of rows.logins) {
    const u = byName.get(l.user);
    if (!u || u.usableFactor || !required(u)) continue;
    if (!settings.protocols.has(l.protocol.toLowerCase()) || !isOutside(settings, l.ip)) continue;
    const seen = found.get(u.name);
    if (!seen) {
      found.set(u.name, { user: u.name, mfaEnabled: u.mfaEnabled, lastOutsideLogin: l.lastSuccessAt, ip: l.ip, protocol: l.protocol, outsideAddresses: 1, reason: reasonOf(u) });
      continue;
    }
    seen.outsideAddresses++;
    if (l.lastSuccessAt > seen.lastOutsideLogin || (l.lastSuccessAt === seen.lastOutsideLogin && l.ip < seen.ip)) {
      seen.lastOutsideLogin = l.lastSuccessAt;
      seen.ip = l.ip;
      seen.protocol = l.protocol;
    }
  }
  const wouldBeRefused = [...found.values()].sort((a, b) => (a.user < b.user ? -1 : a.user > b.user ? 1 : 0));
  counts.wouldBeRefused = wouldBeRefused.length;
  return { counts, wouldBeRefused };
}
