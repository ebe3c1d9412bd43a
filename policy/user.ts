// User names are normalised once, so Dovecot's login and Postfix's sasl_username meet the same record.

export interface UserNameRules {
  lowercase: boolean;
  /** Realms (domains) stripped from "user@realm"; compared case-insensitively. */
  stripRealms: readonly string[];
}

export function normaliseUser(raw: string, rules: UserNameRules): string {
  let name = raw.trim();
  if (rules.lowercase) name = name.toLowerCase();
  const at = name.lastIndexOf('@');
  if (at > 0 && rules.stripRealms.length > 0) {
    const realm = name.slice(at + 1).toLowerCase();
    if (rules.stripRealms.some((r) => r.toLowerCase() === realm)) name = name.slice(0, at);
  }
  return name;
}

/** A user name we are willing to store and log: not empty, no control characters, bounded length. */
export function isAcceptableUserName(name: string): boolean {
  // eslint-disable-next-line no-control-regex
  return name.length > 0 && name.length <= 256 && !/[\u0000-\u001f\u007f]/.test(name);
}
