// The decision as a table of cases: every rule, IPv4 and IPv6 blocks, ::ffff: mapping, realms, modes, dates.
import t from 'tap';
import { RangeList, parseAddress } from '../../policy/address.js';
import { type Facts, type PolicySettings, decide } from '../../policy/decide.js';
import { normaliseUser } from '../../policy/user.js';

const NOW = Date.parse('2026-11-21T12:00:00Z');
const HOUR = 3_600_000;

function settings(over: Partial<PolicySettings> = {}): PolicySettings {
  return {
    mode: 'enforce',
    requiredFrom: undefined,
    exemptUsers: new Set(['svc-backup']),
    protocols: new Set(['imap', 'pop3', 'smtp', 'submission', 'sieve']),
    trusted: new RangeList(['10.0.0.0/8', '192.0.2.0/24', '2001:db8:ca::/48']),
    untrusted: new RangeList(['10.20.0.0/16', '2001:db8:ca:e0::/60']),
    webmail: new RangeList(['192.0.2.10']),
    prefixes: { ipv4: 32, ipv6: 64 },
    ...over,
  };
}

/** In-memory facts: users and grants keyed as the store keys them. */
function facts(users: Record<string, { mfaEnabled: boolean; exempt?: boolean }>, grants: { user: string; block: string; expiresAt: number; revoked?: boolean }[]): Facts & { lookups: number } {
  const f = {
    lookups: 0,
    lookup(name: string, block: string, now: number) {
      f.lookups++;
      const u = users[name];
      const i = grants.findIndex((g) => g.user === name && g.block === block && !g.revoked && g.expiresAt > now);
      const g = grants[i];
      return {
        user: u ? { mfaEnabled: u.mfaEnabled, exempt: u.exempt ?? false } : undefined,
        grant: g ? { id: i + 1, expiresAt: g.expiresAt } : undefined,
      };
    },
  };
  return f;
}

const USERS = {
  alice: { mfaEnabled: true },
  bob: { mfaEnabled: false },
  carol: { mfaEnabled: true, exempt: true },
};
const GRANTS = [
  { user: 'alice', block: '203.0.113.7', expiresAt: NOW + 14 * HOUR },
  { user: 'alice', block: '2001:db8:1:2::/64', expiresAt: NOW + HOUR },
  { user: 'alice', block: '198.51.100.1', expiresAt: NOW - 1 }, // expired
  { user: 'alice', block: '198.51.100.2', expiresAt: NOW + HOUR, revoked: true },
  { user: 'alice', block: '10.20.1.5', expiresAt: NOW + HOUR }, // eduroam address with a grant
];

interface Case {
  name: string;
  user?: string;
  ip: string;
  real?: string;
  protocol?: string;
  now?: number;
  s?: Partial<PolicySettings>;
  allow: boolean;
  rule: string;
  block?: string;
  logOnly?: boolean;
}

const cases: Case[] = [
  // 1. modes
  { name: 'enforcement off allows a user who would be refused', ip: '203.0.113.99', s: { mode: 'off' }, allow: true, rule: 'enforcement-off' },
  { name: 'log-only lets a refusal through but names the rule', ip: '203.0.113.99', s: { mode: 'log-only' }, allow: true, rule: 'no-grant', logOnly: true },
  { name: 'log-only does not touch an allow', ip: '203.0.113.7', s: { mode: 'log-only' }, allow: true, rule: 'grant', logOnly: false },
  // 2. protocols
  { name: 'a protocol outside the list is allowed', ip: '203.0.113.99', protocol: 'managesieve-x', allow: true, rule: 'protocol-not-enforced' },
  { name: 'protocol names are case-insensitive', ip: '203.0.113.99', protocol: 'IMAP', allow: false, rule: 'no-grant' },
  { name: 'pop3 is enforced', ip: '203.0.113.99', protocol: 'pop3', allow: false, rule: 'no-grant' },
  { name: 'smtp is enforced', ip: '203.0.113.99', protocol: 'smtp', allow: false, rule: 'no-grant' },
  { name: 'a shortened protocol list lets smtp through', ip: '203.0.113.99', protocol: 'smtp', s: { protocols: new Set(['imap']) }, allow: true, rule: 'protocol-not-enforced' },
  // 3. networks
  { name: 'campus fixed network is trusted', ip: '10.1.2.3', allow: true, rule: 'trusted-network' },
  { name: 'eduroam inside the campus range needs MFA', ip: '10.20.9.9', allow: false, rule: 'no-grant' },
  { name: 'eduroam with a grant for that address is allowed', ip: '10.20.1.5', allow: true, rule: 'grant' },
  { name: 'trusted IPv6 range', ip: '2001:db8:ca:1::5', allow: true, rule: 'trusted-network' },
  { name: 'untrusted IPv6 range inside a trusted one', ip: '2001:db8:ca:e5::5', allow: false, rule: 'no-grant' },
  { name: 'IPv4-mapped IPv6 counts as IPv4 (trusted)', ip: '::ffff:10.1.2.3', allow: true, rule: 'trusted-network' },
  { name: 'IPv4-mapped IPv6 counts as IPv4 (grant)', ip: '::ffff:203.0.113.7', allow: true, rule: 'grant', block: '203.0.113.7' },
  { name: 'webmail host as real_remote is allowed whatever the browser address', ip: '203.0.113.99', real: '192.0.2.10', allow: true, rule: 'webmail-host' },
  { name: 'webmail host wins over an untrusted browser address', ip: '10.20.9.9', real: '192.0.2.10', allow: true, rule: 'webmail-host' },
  { name: 'another real_remote is not the webmail', ip: '203.0.113.99', real: '192.0.2.11', allow: false, rule: 'no-grant' },
  { name: 'remote equal to the webmail host without real_remote is only trusted by range', ip: '198.18.0.1', real: undefined, s: { webmail: new RangeList(['198.18.0.1']) }, allow: false, rule: 'no-grant' },
  // 4. required?
  { name: 'a user without MFA gets in from outside', user: 'bob', ip: '203.0.113.99', allow: true, rule: 'mfa-not-required' },
  { name: 'a user the store never saw is not required', user: 'dave', ip: '203.0.113.99', allow: true, rule: 'mfa-not-required' },
  { name: 'site-wide date passed: bob is required', user: 'bob', ip: '203.0.113.99', s: { requiredFrom: NOW - 1 }, allow: false, rule: 'no-grant' },
  { name: 'site-wide date exactly now: required', user: 'bob', ip: '203.0.113.99', s: { requiredFrom: NOW }, allow: false, rule: 'no-grant' },
  { name: 'site-wide date in the future: not yet', user: 'bob', ip: '203.0.113.99', s: { requiredFrom: NOW + 1 }, allow: true, rule: 'mfa-not-required' },
  { name: 'site-wide date covers unknown users too', user: 'dave', ip: '203.0.113.99', s: { requiredFrom: NOW - 1 }, allow: false, rule: 'no-grant' },
  { name: 'config-exempt user after the site-wide date', user: 'svc-backup', ip: '203.0.113.99', s: { requiredFrom: NOW - 1 }, allow: true, rule: 'user-exempt' },
  { name: 'store-exempt user even with MFA enabled', user: 'carol', ip: '203.0.113.99', allow: true, rule: 'user-exempt' },
  // 5. grants
  { name: 'grant for the exact IPv4 address', ip: '203.0.113.7', allow: true, rule: 'grant', block: '203.0.113.7' },
  { name: 'no grant for the next IPv4 address', ip: '203.0.113.8', allow: false, rule: 'no-grant', block: '203.0.113.8' },
  { name: 'an IPv4 /24 block setting covers the neighbour', ip: '203.0.113.8', s: { prefixes: { ipv4: 24, ipv6: 64 } }, allow: false, rule: 'no-grant', block: '203.0.113.0/24' },
  { name: 'IPv6 privacy address in the same /64', ip: '2001:db8:1:2:aaaa:bbbb:cccc:dddd', allow: true, rule: 'grant', block: '2001:db8:1:2::/64' },
  { name: 'IPv6 in the next /64', ip: '2001:db8:1:3::1', allow: false, rule: 'no-grant', block: '2001:db8:1:3::/64' },
  { name: 'IPv6 written in full form meets the same block', ip: '2001:0db8:0001:0002:0000:0000:0000:0001', allow: true, rule: 'grant', block: '2001:db8:1:2::/64' },
  { name: 'expired grant does not count', ip: '198.51.100.1', allow: false, rule: 'no-grant' },
  { name: 'revoked grant does not count', ip: '198.51.100.2', allow: false, rule: 'no-grant' },
  { name: 'grant exactly at its expiry is over', ip: '203.0.113.7', now: NOW + 14 * HOUR, allow: false, rule: 'no-grant' },
  { name: 'grant one ms before expiry still holds', ip: '203.0.113.7', now: NOW + 14 * HOUR - 1, allow: true, rule: 'grant' },
  { name: 'grants are per user', user: 'bob', ip: '203.0.113.99', s: { requiredFrom: NOW - 1 }, allow: false, rule: 'no-grant' },
];

for (const c of cases) {
  t.test(c.name, async (t) => {
    const address = parseAddress(c.ip);
    t.ok(address, `parses ${c.ip}`);
    if (!address) return;
    const realAddress = c.real !== undefined ? parseAddress(c.real) : undefined;
    const d = decide(settings(c.s), { user: c.user ?? 'alice', address, realAddress, protocol: c.protocol ?? 'imap', now: c.now ?? NOW }, facts(USERS, GRANTS));
    t.equal(d.allow, c.allow, 'allow');
    t.equal(d.rule, c.rule, 'rule');
    if (c.block !== undefined) t.equal(d.block, c.block, 'block');
    if (c.logOnly !== undefined) t.equal(d.logOnly, c.logOnly, 'logOnly');
    t.equal(d.verdict === 'allow', c.allow && !d.logOnly, 'verdict agrees');
  });
}

t.test('the store is not consulted when the network decides', async (t) => {
  const f = facts(USERS, GRANTS);
  const a = parseAddress('10.1.2.3');
  if (!a) throw new Error('parse');
  decide(settings(), { user: 'alice', address: a, protocol: 'imap', now: NOW }, f);
  t.equal(f.lookups, 0);
});

t.test('an app passcode allows from any address, needing no grant; the webmail rule still comes first', async (t) => {
  const f = facts(USERS, GRANTS);
  const outside = parseAddress('198.51.100.99');
  const web = parseAddress('192.0.2.10');
  if (!outside || !web) throw new Error('parse');
  const d = decide(settings(), { user: 'alice', address: outside, protocol: 'imap', now: NOW, passcode: true }, f);
  t.match(d, { allow: true, rule: 'app-passcode' });
  t.equal(f.lookups, 0, 'no store lookup');
  t.match(decide(settings(), { user: 'alice', address: outside, protocol: 'imap', now: NOW, passcode: false }, f), { allow: false, rule: 'no-grant' }, 'without it: refused');
  t.match(decide(settings({ mode: 'off' }), { user: 'alice', address: outside, protocol: 'imap', now: NOW, passcode: true }, f), { rule: 'enforcement-off' });
  t.match(decide(settings(), { user: 'alice', address: outside, realAddress: web, protocol: 'imap', now: NOW, passcode: true }, f), { rule: 'webmail-host' });
});

t.test('an untrusted-range refusal says so', async (t) => {
  const a = parseAddress('10.20.9.9');
  if (!a) throw new Error('parse');
  const d = decide(settings(), { user: 'alice', address: a, protocol: 'imap', now: NOW }, facts(USERS, GRANTS));
  t.equal(d.untrustedRange, true);
});

t.test('user names: case and realms', async (t) => {
  const rules = { lowercase: true, stripRealms: ['example.ac.jp', 'st.example.ac.jp'] };
  t.equal(normaliseUser('Alice@Example.AC.JP', rules), 'alice');
  t.equal(normaliseUser('alice', rules), 'alice');
  t.equal(normaliseUser(' ALICE ', rules), 'alice');
  t.equal(normaliseUser('bob@st.example.ac.jp', rules), 'bob');
  t.equal(normaliseUser('bob@other.jp', rules), 'bob@other.jp', 'another realm stays');
  t.equal(normaliseUser('Bob@Example.ac.jp', { lowercase: false, stripRealms: ['example.ac.jp'] }), 'Bob', 'realm match ignores case even when names keep theirs');
  t.equal(normaliseUser('a@b@example.ac.jp', rules), 'a@b', 'only the last realm is stripped');
  // A normalised Dovecot login and a Postfix sasl_username meet the same grant.
  const f = facts(USERS, GRANTS);
  const a = parseAddress('203.0.113.7');
  if (!a) throw new Error('parse');
  const d = decide(settings(), { user: normaliseUser('ALICE@example.ac.jp', rules), address: a, protocol: 'smtp', now: NOW }, f);
  t.equal(d.rule, 'grant');
});
