// The catalogue of rules a decision can name. Every log line, CLI answer and test refers to these codes.

export const RULES = {
  'enforcement-off': 'enforcement mode is off: everything is allowed',
  'protocol-not-enforced': 'the protocol is not in the enforced list',
  'webmail-host': 'the login comes through a configured webmail host, which does its own MFA',
  'app-passcode': 'the login was made with a working app passcode for this protocol (usable from any network)',
  'trusted-network': 'the address is in a trusted range (campus fixed network, VPN)',
  'user-exempt': 'the user is exempt from MFA',
  'mfa-not-required': 'MFA is not required for this user (not enabled, site-wide date not reached)',
  'grant': 'an active MFA grant covers this address block',
  'no-grant': 'MFA is required and no active grant covers this address block',
} as const;

export type RuleCode = keyof typeof RULES;

export function describeRule(code: RuleCode): string {
  return RULES[code];
}
