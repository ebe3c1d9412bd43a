// The decision: one pure function used by every endpoint and by `mfagate check`.
// It imports no I/O. What it needs to know about users and grants comes through `Facts`,
// which the caller backs with the store (or, in tests, with plain objects).
import { type Address, type BlockPrefixes, RangeList, blockOf } from './address.js';
import type { RuleCode } from './rules.js';

export type EnforcementMode = 'enforce' | 'log-only' | 'off';

export interface PolicySettings {
  mode: EnforcementMode;
  /** Epoch ms from which MFA is required for every user; undefined = never. */
  requiredFrom: number | undefined;
  /** Normalised user names that are never required to pass MFA. */
  exemptUsers: ReadonlySet<string>;
  protocols: ReadonlySet<string>;
  trusted: RangeList;
  untrusted: RangeList;
  webmail: RangeList;
  prefixes: BlockPrefixes;
}

export interface UserFacts {
  mfaEnabled: boolean;
  exempt: boolean;
}

export interface GrantFacts {
  id: number;
  expiresAt: number;
}

export interface LookupResult {
  user: UserFacts | undefined;
  grant: GrantFacts | undefined;
}

/**
 * The read-only view of the store. Called at most once per decision, and only when the networks did not
 * decide: the user's flags and the active grant for the block come together, from one consistent snapshot.
 */
export interface Facts {
  lookup(user: string, block: string, now: number): LookupResult;
}

export interface DecisionRequest {
  /** Already normalised (see normaliseUser). */
  user: string;
  address: Address;
  /** The TCP peer Dovecot saw (real_remote), when known. */
  realAddress?: Address | undefined;
  protocol: string;
  now: number;
  /**
   * The login was made with a working app passcode for this protocol (checked by the caller: mfagate's passcode
   * check passed for this user and address moments ago, and the passcode still works).
   */
  passcode?: boolean | undefined;
}

export interface Decision {
  allow: boolean;
  /** What the rules decided, before log-only mode turned a refusal into an allow. */
  verdict: 'allow' | 'refuse';
  rule: RuleCode;
  block: string;
  /** In log-only mode, a refusal that was let through. */
  logOnly: boolean;
  /** The address is in an untrusted range (eduroam): why a campus address still needed MFA. */
  untrustedRange: boolean;
  grant?: GrantFacts;
}

/**
 * Whether MFA is required for a user: the user enabled it, or the site-wide date has passed; never for a user
 * exempt in the configuration or in the store. The one statement of rule 4, for the decision and for the
 * status the CLI and the API show.
 */
export function mfaRequired(
  settings: Pick<PolicySettings, 'exemptUsers' | 'requiredFrom'>,
  name: string,
  user: UserFacts | undefined,
  now: number,
): boolean {
  if (settings.exemptUsers.has(name) || user?.exempt) return false;
  return (user?.mfaEnabled ?? false) || (settings.requiredFrom !== undefined && now >= settings.requiredFrom);
}

/**
 * The network part of rule 3: the address is in a trusted range (campus, VPN) and not in an untrusted one
 * (eduroam inside the campus range). The one statement of it, for the decision and for the MFA page.
 */
export function isTrustedNetwork(settings: Pick<PolicySettings, 'trusted' | 'untrusted'>, address: Address): boolean {
  return !settings.untrusted.has(address) && settings.trusted.has(address);
}

export function decide(settings: PolicySettings, req: DecisionRequest, facts: Facts): Decision {
  const block = blockOf(req.address, settings.prefixes);
  let untrustedRange = false;
  const done = (verdict: 'allow' | 'refuse', rule: RuleCode, grant?: GrantFacts): Decision => {
    const logOnly = verdict === 'refuse' && settings.mode === 'log-only';
    const d: Decision = { allow: verdict === 'allow' || logOnly, verdict, rule, block, logOnly, untrustedRange };
    if (grant) d.grant = grant;
    return d;
  };

  // 1. Enforcement off allows everything (log-only is applied in `done`).
  if (settings.mode === 'off') return done('allow', 'enforcement-off');
  // 2. Protocols outside the enforced list.
  if (!settings.protocols.has(req.protocol.toLowerCase())) return done('allow', 'protocol-not-enforced');
  // 3. Networks. The webmail host comes first: it does its own MFA whatever the browser's address.
  if (req.realAddress && settings.webmail.has(req.realAddress)) return done('allow', 'webmail-host');
  // An app passcode (a per-device password made after passing MFA) works from any network.
  if (req.passcode) return done('allow', 'app-passcode');
  if (isTrustedNetwork(settings, req.address)) return done('allow', 'trusted-network');
  untrustedRange = settings.untrusted.has(req.address);
  // 4. Is MFA required for this user?
  if (settings.exemptUsers.has(req.user)) return done('allow', 'user-exempt');
  const { user, grant } = facts.lookup(req.user, block, req.now);
  if (user?.exempt) return done('allow', 'user-exempt');
  if (!mfaRequired(settings, req.user, user, req.now)) return done('allow', 'mfa-not-required');
  // 5. A grant for (user, block).
  if (grant) return done('allow', 'grant', grant);
  // 6. Refuse.
  return done('refuse', 'no-grant');
}
