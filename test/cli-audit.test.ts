// `mfagate audit`, run as a process after a scripted helpdesk session through the real CLI (users enable, grants
// add/revoke with reasons, a lock from wrong codes through the MFA service, users unlock, passcodes add/revoke,
// users reset, the daemon's purge): every step with its actor, address and reason, in order; each filter and a
// combination; --json; grant expiry (no row of its own: derived); what is refused (exit 2). Then the same commands
// on PostgreSQL (the store copied there with db copy) give the same output, and the query itself (store/
// audit-query.ts) against a brute-force reading of a larger store, on both backends: paging past rows a LIKE lets
// through, ties, purged grants' expiries; and the SQLite plan uses the indexes.
import fs from 'node:fs';
import path from 'node:path';
import t, { type Test } from 'tap';
import { actionsArg, ipRangeArg, limitArg, parseInstant, timeArg } from '../cli/audit.js';
import { UsageError } from '../cli/common.js';
import { mfaService } from '../cli/mfa.js';
import { formatTime } from '../cli/format.js';
import { loadConfig } from '../config/config.js';
import { MfaError } from '../mfa/service.js';
import { parseAddress, parseCidr } from '../policy/address.js';
import { AUDIT_ACTIONS, type AuditEntry, type AuditFilter, DERIVED_EXPIRY, KNOWN_ACTIONS, queryAudit } from '../store/audit-query.js';
import { openPgStore } from '../store/open.js';
import type { Records } from '../store/records.js';
import type { Row, Sql, SqlParam } from '../store/sql.js';
import { Store } from '../store/store.js';
import { ROOT, cli, startInProcess, tempDir } from './helpers/daemon.js';
import { type PgServer, startPostgres } from './helpers/postgres.js';

const dir = tempDir('mfagate-cli-audit-');
let pg: PgServer | undefined;
t.before(async () => {
  pg = await startPostgres();
});
t.teardown(() => {
  pg?.destroy();
  fs.rmSync(dir, { recursive: true, force: true });
});

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const configFile = path.join(dir, 'cli.toml');
fs.writeFileSync(configFile, '[store]\npath = "mfagate.db"\n[app_passcodes]\nenabled = true\n[lockout]\nmax_failures = 3\n');
const OPERATOR = { USER: 'helpdesk1', SUDO_USER: '' };
const run = (...args: string[]) => cli(['--config', configFile, ...args], { env: OPERATOR });

interface Out {
  code: number;
  stdout: string;
  stderr: string;
}
const j = <T>(r: Out): T => {
  try {
    return JSON.parse(r.stdout) as T;
  } catch {
    throw new Error(`expected JSON; exit ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  }
};
const ok = (t: Test, r: Out, what: string) => {
  t.equal(r.code, 0, `${what}: exit 0 ${r.stderr}`);
  return r;
};

interface Json {
  at: string;
  actor: string | null;
  action: string;
  user: string | null;
  ip: string | null;
  grant: number | null;
  detail: Record<string, unknown>;
}
// After the session the store does not change: each audit command line runs once.
const seen = new Map<string, Out>();
const runAudit = (...args: string[]): Out => {
  const key = JSON.stringify(args);
  const r = seen.get(key) ?? run('audit', ...args);
  seen.set(key, r);
  return r;
};
const audit = (...args: string[]): Json[] => {
  const r = runAudit('--json', '--limit', '100000', ...args);
  if (r.code !== 0) throw new Error(`audit ${args.join(' ')}: exit ${r.code}: ${r.stderr}`);
  return j<Json[]>(r);
};

const R1 = 'ticket 100: asked by phone';
const R2 = 'ticket 101: lost phone';
const R3 = 'ticket 102: at a conference';
const R4 = 'ticket 104: password stolen';
const R5 = 'ticket 105: phone sold';
const R6 = 'ticket 106: ID checked at the desk';
const V6 = '2001:db8:abcd:12:a1b2::5';
const V6_FAIL = '2001:db8:abcd:12::99';
const V6_OTHER = '2001:db8:abcd:13::99';

const ids = { g1: 0, g2: 0, g3: 0, g4: 0, g5: 0, p1: 0, p2: 0 };

t.test('a helpdesk session, then the daemon purges', async (t) => {
  ok(t, run('db', 'migrate'), 'db migrate');
  ok(t, run('users', 'enable', 'alice', '--reason', R1), 'users enable');
  ids.g1 = j<{ id: number }>(ok(t, run('grants', 'add', '--user', 'alice', '--ip', '203.0.113.7', '--ttl', '2h', '--reason', R2, '--json'), 'grants add')).id;
  ids.g2 = j<{ id: number }>(ok(t, run('grants', 'add', '--user', 'alice', '--ip', V6, '--ttl', '1s', '--reason', R3, '--json'), 'grants add v6')).id;
  // Another operator through sudo: $SUDO_USER names the person, not $USER.
  const bob = cli(['--config', configFile, 'grants', 'add', '--user', 'bob', '--ip', '198.51.100.20', '--reason', 'ticket 103', '--json'], { env: { USER: 'root', SUDO_USER: 'helpdesk2' } });
  ids.g3 = j<{ id: number }>(ok(t, bob, 'grants add via sudo')).id;
  t.match(ok(t, run('grants', 'revoke', '--user', 'alice', '--ip', '203.0.113.7', '--reason', R4), 'grants revoke').stdout, /revoked 1 grant/);

  // Wrong codes through the MFA service (the webmail API's and the page's path: actor "api") lock alice.
  const store = Store.open(path.join(dir, 'mfagate.db'), { create: false });
  try {
    const service = mfaService(loadConfig(configFile), store.records);
    const codes: string[] = [];
    for (let i = 0; i < 4; i++) {
      codes.push(await service.verify('alice', V6_FAIL, { method: 'totp', code: '000000' }).then(() => 'passed', (e: unknown) => (e instanceof MfaError ? e.code : String(e))));
    }
    t.same(codes, ['factor-failed', 'factor-failed', 'factor-failed', 'locked'], 'three wrong codes lock alice; the fourth attempt is refused');
    t.equal(await service.verify('bob', V6_OTHER, { method: 'totp', code: '000000' }).catch((e: unknown) => (e as MfaError).code), 'factor-failed');
  } finally {
    store.close();
  }
  t.match(ok(t, run('users', 'unlock', 'alice'), 'users unlock').stdout, /alice: unlocked/);
  ids.p1 = j<{ id: number }>(ok(t, run('passcodes', 'add', '--user', 'alice', '--name', 'iPhone', '--json'), 'passcodes add')).id;
  ok(t, run('passcodes', 'revoke', '--user', 'alice', '--id', String(ids.p1), '--reason', R5), 'passcodes revoke');
  ids.p2 = j<{ id: number }>(ok(t, run('passcodes', 'add', '--user', 'alice', '--name', 'iPad', '--json'), 'passcodes add')).id;
  ids.g4 = j<{ id: number }>(ok(t, run('grants', 'add', '--user', 'alice', '--ip', '203.0.113.9', '--json'), 'grants add')).id;
  t.match(ok(t, run('users', 'reset', 'alice', '--reason', R6), 'users reset').stdout, /revoked:\s+1 grant; 1 app passcode/);

  // The daemon purges grants expired or revoked longer than purge_after ago when it starts: g2 ran out, g1 and
  // g4 were revoked; bob's g3 is active.
  await sleep(2200);
  const d = await startInProcess('[grants]\npurge_after = "1s"\n', dir);
  await d.daemon.stop();
  t.same(d.logs.filter((l) => l['event'] === 'grants-purged').map((l) => l['count']), [3], 'the daemon purged three grants');
  // A grant that runs out and is still in the grants table.
  ids.g5 = j<{ id: number }>(ok(t, run('grants', 'add', '--user', 'carol', '--ip', '192.0.2.44', '--ttl', '1s', '--reason', 'ticket 107', '--json'), 'grants add')).id;
  await sleep(1100);
});

t.test('audit shows every step: who, what, where, why, in order', async (t) => {
  const all = audit('--oldest-first');
  const at = all.map((e) => Date.parse(e.at));
  t.same(at, [...at].sort((a, b) => a - b), 'oldest first: in time order');
  const step = (e: Json) => [e.actor, e.action, e.user, e.ip, e.grant];
  const inTime = all.filter((e) => e.action !== 'grant-purge' && e.action !== DERIVED_EXPIRY);
  // users reset writes its rows in one transaction; the passcode revoke reads the clock again, so it may come a
  // millisecond after the user-reset row. Within the reset, compare them by action.
  const reset = inTime.slice(16, 19);
  t.same(reset.map((e) => e.action).sort(), ['grant-revoke', 'passcode-revoke', 'user-reset'], 'the rows of users reset');
  t.equal(reset.find((e) => e.action === 'grant-revoke')?.at, reset.find((e) => e.action === 'user-reset')?.at, 'the reset and its grant revoke: one time');
  const stored = [...inTime.slice(0, 16), ...reset.sort((a, b) => a.action.localeCompare(b.action)), ...inTime.slice(19)];
  const h1 = 'cli:helpdesk1';
  t.same(stored.map(step), [
    [h1, 'user-enable', 'alice', null, null],
    [h1, 'grant-add', 'alice', '203.0.113.7', ids.g1],
    [h1, 'grant-add', 'alice', V6, ids.g2],
    ['cli:helpdesk2', 'grant-add', 'bob', '198.51.100.20', ids.g3],
    [h1, 'grant-revoke', 'alice', '203.0.113.7', ids.g1],
    ['api', 'factor-fail', 'alice', V6_FAIL, null],
    ['api', 'factor-fail', 'alice', V6_FAIL, null],
    ['api', 'factor-fail', 'alice', V6_FAIL, null],
    ['api', 'user-locked', 'alice', V6_FAIL, null],
    ['api', 'factor-refused', 'alice', V6_FAIL, null],
    ['api', 'factor-fail', 'bob', V6_OTHER, null],
    [h1, 'user-unlock', 'alice', null, null],
    [h1, 'passcode-add', 'alice', null, null],
    [h1, 'passcode-revoke', 'alice', null, null],
    [h1, 'passcode-add', 'alice', null, null],
    [h1, 'grant-add', 'alice', '203.0.113.9', ids.g4],
    [h1, 'grant-revoke', 'alice', '203.0.113.9', ids.g4],
    [h1, 'passcode-revoke', 'alice', null, null],
    [h1, 'user-reset', 'alice', null, null],
    [h1, 'grant-add', 'carol', '192.0.2.44', ids.g5],
  ], 'each step of the session, with its actor, user, address and grant');
  t.match(stored.map((e) => e.detail), [
    { reason: R1 },
    { reason: R2, block: '203.0.113.7', method: 'helpdesk', source: 'cli', expires_at: String },
    { reason: R3, block: '2001:db8:abcd:12::/64' },
    { reason: 'ticket 103' },
    { reason: R4, block: '203.0.113.7' },
    { method: 'totp' },
    { method: 'totp' },
    { method: 'totp' },
    { until: String },
    { method: 'totp', result: 'locked' },
    { method: 'totp' },
    {},
    { id: ids.p1, name: 'iPhone' },
    { id: ids.p1, name: 'iPhone', reason: R5 },
    { id: ids.p2, name: 'iPad' },
    { block: '203.0.113.9' },
    { reason: R6, block: '203.0.113.9' },
    { id: ids.p2, name: 'iPad', reason: R6 },
    { reason: R6, grants_revoked: 1, passcodes_revoked: 1 },
    { reason: 'ticket 107' },
  ], 'the reasons and details');

  const purges = all.filter((e) => e.action === 'grant-purge');
  t.same(purges.map((e) => e.grant).sort(), [ids.g1, ids.g2, ids.g4].sort(), 'the purged grants');
  t.ok(purges.every((e) => e.actor === 'daemon'), 'purged by the daemon');
  t.match(purges.find((e) => e.grant === ids.g1)?.detail, { revoked_by: 'cli:helpdesk1', revoked_at: String });
  t.match(purges.find((e) => e.grant === ids.g2)?.detail, { revoked_at: null });

  // Expiry: g2 (purged: from its purge row) and g5 (still in the grants table); never a revoked or active grant.
  const expiries = all.filter((e) => e.action === DERIVED_EXPIRY);
  t.same(expiries.map((e) => e.grant), [ids.g2, ids.g5], 'grant-expire for the two grants that ran out, in order');
  // (Not by grant number alone: SQLite gives a purged grant's number to the next grant, so carol's g5 is g4's.)
  const added = (user: string, ip: string) => stored.find((e) => e.action === 'grant-add' && e.user === user && e.ip === ip)?.detail['expires_at'];
  t.same(expiries.map((e) => e.at), [added('alice', V6), added('carol', '192.0.2.44')], 'at the expires_at the grant was given');
  t.same(expiries.map((e) => [e.actor, e.user, e.ip, e.detail]), [
    [null, 'alice', V6, { block: '2001:db8:abcd:12::/64', method: 'helpdesk', source: 'cli', derived: true }],
    [null, 'carol', '192.0.2.44', { block: '192.0.2.44', method: 'helpdesk', source: 'cli', derived: true }],
  ], 'nobody did it: no actor, marked derived');
  const g2Purge = all.findIndex((e) => e.action === 'grant-purge' && e.grant === ids.g2);
  t.ok(all.findIndex((e) => e.grant === ids.g2 && e.action === DERIVED_EXPIRY) < g2Purge, 'a grant expires before it is purged');

  // Newest first by default: the same entries, reversed; the table says the same as --json.
  const newest = audit();
  t.same(newest, [...all].reverse(), 'newest first by default');
  const text = ok(t, runAudit(), 'audit');
  const lines = text.stdout.trimEnd().split('\n');
  t.match(lines[0], /^WHEN\s+ACTOR\s+ACTION\s+USER\s+IP\s+GRANT\s+DETAIL$/, 'the header');
  t.equal(lines.length, newest.length + 1, 'one line an entry');
  newest.forEach((e, i) => {
    const cells = [formatTime(Date.parse(e.at)), e.actor ?? '-', e.action, e.user ?? '-', e.ip ?? '-', e.grant === null ? '-' : String(e.grant)];
    t.equal(lines[i + 1]?.split(/\s{2,}/).slice(0, 6).join('|'), cells.join('|'), `line ${i + 1}: ${e.action}`);
    t.ok(lines[i + 1]?.endsWith(JSON.stringify(e.detail)), `line ${i + 1}: the detail`);
  });
  t.equal(text.stderr, '', 'no note: everything fits the default limit');
  const revokeLine = lines.find((l) => l.includes('grant-revoke') && l.includes('203.0.113.7'));
  t.match(revokeLine, /cli:helpdesk1\s+grant-revoke\s+alice\s+203\.0\.113\.7\s+\d+\s+\{"block":"203\.0\.113\.7","reason":"ticket 104: password stolen"\}/, 'who revoked what, when, why');
});

t.test('every filter narrows, and they combine', async (t) => {
  const all = audit();
  const inRange = (cidr: string) => {
    const [net, bits] = parseCidr(cidr) ?? [];
    return (e: Json) => {
      const a = e.ip === null ? undefined : parseAddress(e.ip);
      return a !== undefined && net !== undefined && a.kind() === net.kind() && a.match(net as never, bits ?? 0);
    };
  };
  const atOf = (name: string) => all.filter((e) => e.action === name).reverse()[0]?.at ?? '';
  const revokeAt = atOf('grant-revoke'); // the first revoke (g1)
  const cases: [string[], (e: Json) => boolean][] = [
    [['--user', 'alice'], (e) => e.user === 'alice'],
    [['--user', 'BOB'], (e) => e.user === 'bob'],
    [['--action', 'grant-revoke'], (e) => e.action === 'grant-revoke'],
    [['--action', 'grant'], (e) => e.action.startsWith('grant-')],
    [['--action', 'grant-expire'], (e) => e.action === 'grant-expire'],
    [['--action', 'passcode-revoke,grant-revoke'], (e) => e.action.endsWith('-revoke')],
    [['--action', 'user-locked', '--action', 'User-Unlock'], (e) => e.action === 'user-locked' || e.action === 'user-unlock'],
    [['--action', 'factor,user-reset'], (e) => e.action.startsWith('factor-') || e.action === 'user-reset'],
    [['--ip', '203.0.113.7'], (e) => e.ip === '203.0.113.7'],
    [['--ip', '2001:db8:abcd:12::1'], inRange('2001:db8:abcd:12::/64')],
    [['--ip', '2001:db8:abcd:12::/64'], inRange('2001:db8:abcd:12::/64')],
    [['--ip', '2001:db8:abcd::/48'], inRange('2001:db8:abcd::/48')],
    [['--ip', '203.0.113.0/24'], inRange('203.0.113.0/24')],
    [['--since', revokeAt], (e) => e.at >= revokeAt],
    [['--until', revokeAt], (e) => e.at < revokeAt],
    [['--since', '1h'], () => true],
    [['--user', 'alice', '--action', 'grant', '--ip', '203.0.113.0/24', '--since', revokeAt], (e) => e.user === 'alice' && e.action.startsWith('grant-') && inRange('203.0.113.0/24')(e) && e.at >= revokeAt],
    [['--action', 'grant-revoke', '--since', '30d'], (e) => e.action === 'grant-revoke'],
  ];
  for (const [args, pred] of cases) {
    const expected = all.filter(pred);
    const got = audit(...args);
    t.same(got, expected, `${args.join(' ')}: ${expected.length} entries`);
    if (args[1] !== '1h' && args[1] !== '30d') t.ok(expected.length > 0 && expected.length < all.length, `${args.join(' ')}: narrows (${expected.length} of ${all.length})`);
  }
  const combo = audit('--user', 'alice', '--action', 'grant-revoke', '--ip', '203.0.113.7', '--since', revokeAt);
  t.match(combo, [{ action: 'grant-revoke', user: 'alice', ip: '203.0.113.7', actor: 'cli:helpdesk1', grant: ids.g1, detail: { reason: R4 } }], 'who revoked alice\'s grant for 203.0.113.7, when and why');
  t.equal(combo.length, 1);
  t.same(audit('--until', '1h'), [], 'nothing an hour old');
  t.same(audit('--user', 'nobody'), []);
  t.equal(runAudit('--user', 'nobody').stdout, 'no audit entries match\n');
  // Instants: an offset other than Z, fractions of a second; --until is exclusive.
  const enabled = Date.parse(atOf('user-enable'));
  const jst = (ms: number) => new Date(ms + 9 * 3_600_000).toISOString().replace('Z', '+09:00');
  t.same(audit('--since', jst(enabled), '--until', jst(enabled + 1)).map((e) => e.action), ['user-enable'], 'from the ms of user-enable to the next ms, in +09:00');

  // --limit: the newest (or oldest) N, and a note on stderr when more match.
  const three = runAudit('--json', '--limit', '3');
  t.same(j(three), all.slice(0, 3), 'the newest three');
  t.match(three.stderr, /^mfagate: note: the newest 3 entries shown; more match/);
  const oldest = runAudit('--json', '--limit', '2', '--oldest-first', '--user', 'alice');
  t.same(j(oldest), all.filter((e) => e.user === 'alice').reverse().slice(0, 2), 'the oldest two of alice');
  t.match(oldest.stderr, /the oldest 2 entries shown/);
  const exact = runAudit('--json', '--limit', String(all.length));
  t.same(j(exact), all);
  t.equal(exact.stderr, '', 'no note when all fit');
});

t.test('what audit refuses (exit 2, a clear message, nothing on stdout)', async (t) => {
  // Each kind of mistake once through the process (exit code, stderr, empty stdout)...
  const cases: [string[], RegExp][] = [
    [['--action', 'grant-delete'], /^mfagate: --action: unknown action "grant-delete"; known actions, by group[^\n]*\n\s+grant:\s+grant-add, grant-extend, grant-revoke, grant-purge, grant-expire\n[\s\S]*passcode:\s+passcode-add, passcode-revoke\n$/],
    [['--action', 'grant-revoke,'], /--action: expected an action or group/],
    [['--ip', '010.0.0.1'], /--ip: not an IP address or address block: "010.0.0.1" \(expected e\.g\. 203\.0\.113\.7, 2001:db8::1 or 2001:db8:1:2::\/64\)/],
    [['--since', 'yesterday'], /--since: expected a duration ago such as "7d".*or an RFC 3339 instant such as "2026-11-21T09:00:00\+09:00"/],
    [['--until', '2026-02-31T00:00:00Z'], /--until: expected/],
    [['--since', '1d', '--until', '2d'], /--since \(.*\) must be before --until \(.*\)/],
    [['--limit', '0'], /--limit: expected a number of entries from 1 to 100000, got "0"/],
    [['--user', ''], /not a user name: ""/],
    [['--actor', 'cli:x'], /unknown option '--actor'/],
  ];
  for (const [args, message] of cases) {
    const r = run('audit', ...args);
    t.equal(r.code, 2, `${args.join(' ')}: exit 2`);
    t.match(r.stderr, message, `${args.join(' ')}: says why`);
    t.equal(r.stdout, '', `${args.join(' ')}: prints nothing else`);
  }
  const noStore = path.join(dir, 'no-store.toml');
  fs.writeFileSync(noStore, '[store]\npath = "missing.db"\n');
  const missing = cli(['--config', noStore, 'audit']);
  t.equal(missing.code, 1, 'no store: exit 1');
  t.match(missing.stderr, /no store at \S+missing\.db/);
  t.notOk(fs.existsSync(path.join(dir, 'missing.db')), 'and none is created');

  // ...and every check of the arguments here.
  const usage = (fn: () => unknown, message: RegExp, what: string) => {
    try {
      fn();
      t.fail(`${what}: accepted`);
    } catch (e) {
      t.ok(e instanceof UsageError && e.exitCode === 2, `${what}: a usage error (exit 2)`);
      t.match((e as Error).message, message, what);
    }
  };
  const now = Date.UTC(2026, 10, 21, 5, 0, 0);
  for (const bad of ['', 'grant-', 'grants', 'revoke', 'grant-revoke,', ',grant', 'grant,,user', 'user-delete', 'passcode-use']) {
    usage(() => actionsArg([bad]), /^--action: (unknown action|expected an action or group)/, `--action ${JSON.stringify(bad)}`);
  }
  t.same(actionsArg(['grant-revoke']), ['grant-revoke']);
  t.same(actionsArg(['Passcode-Revoke, grant-revoke']), ['grant-revoke', 'passcode-revoke'], 'a list, in any case, with spaces');
  t.same(actionsArg(['grant']), AUDIT_ACTIONS.grant, 'a group: every grant-* action');
  t.same(actionsArg(['user-reset', 'factor', 'user-reset']), ['user-reset', ...AUDIT_ACTIONS.factor].sort((a, b) => KNOWN_ACTIONS.indexOf(a) - KNOWN_ACTIONS.indexOf(b)), 'repeated, without doubles');
  for (const bad of ['yesterday', '0d', '-1d', '7 days', '1y', '2026-11-21', '2026-11-21T09:00', '2026-11-21T09:00:00', '2026-02-31T00:00:00Z', '2026-02-29T00:00:00Z', '2026-13-01T00:00:00Z', '2026-11-21T24:00:00Z', '2026-11-21T10:60:00Z', '2026-11-21T10:00:60Z', '2026-11-21T10:00:00+24:00', '2026-11-21T10:00:00+09:60', '2026-11-21T10:00:00+0900', '1969-12-31T23:59:59Z', ' 2026-11-21T10:00:00Z x']) {
    usage(() => timeArg('--since', bad, now), /^--since: expected a duration ago/, `--since ${JSON.stringify(bad)}`);
  }
  t.equal(timeArg('--since', '7d', now), now - 7 * 86_400_000, '7d: seven days ago');
  t.equal(timeArg('--until', '1h30m', now), now - 5_400_000);
  t.equal(timeArg('--since', '2026-11-21T09:00:00+09:00', now), Date.UTC(2026, 10, 21, 0, 0, 0), 'an offset');
  t.equal(timeArg('--since', '2026-11-21t00:00:00.25z', now), Date.UTC(2026, 10, 21, 0, 0, 0, 250), 'lower case, a fraction');
  t.equal(timeArg('--since', '2026-11-21 00:00:00-05:30', now), Date.UTC(2026, 10, 21, 5, 30, 0), 'a space, a negative offset');
  t.equal(timeArg('--since', '2028-02-29T00:00:00Z', now), Date.UTC(2028, 1, 29), 'a leap day');
  t.equal(parseInstant('2026-11-21T00:00:00.123456789Z'), Date.UTC(2026, 10, 21, 0, 0, 0, 123), 'nanoseconds: to the ms');
  for (const bad of ['0', '-1', '100001', '1e3', '1.5', 'ten', '', '99999999']) usage(() => limitArg(bad), /^--limit: expected a number of entries from 1 to 100000/, `--limit ${JSON.stringify(bad)}`);
  t.equal(limitArg('1'), 1);
  t.equal(limitArg('100000'), 100_000);
  const prefixes = { ipv4: 32, ipv6: 64 };
  for (const bad of ['', '010.0.0.1', '0xcb.0.113.7', '203.0.113', '203.0.113.7/33', '203.0.113.7/', '203.0.113.7/x', '2001:db8::/129', '2001:db8::1::2', 'mail.example.ac.jp', '203.0.113.0/24/8']) {
    usage(() => ipRangeArg(bad, prefixes), /^--ip: not an IP address or address block/, `--ip ${JSON.stringify(bad)}`);
  }
  const r = (raw: string, p = prefixes) => {
    const x = ipRangeArg(raw, p);
    return `${x.address.toString()}/${x.bits}`;
  };
  t.equal(r('203.0.113.7'), '203.0.113.7/32', 'an IPv4 address: itself');
  t.equal(r('2001:db8:abcd:12:a1b2::5'), '2001:db8:abcd:12:a1b2::5/64', 'an IPv6 address: its /64');
  t.equal(r('::ffff:203.0.113.7'), '203.0.113.7/32', 'IPv4-mapped is IPv4');
  t.equal(r('203.0.113.7', { ipv4: 24, ipv6: 56 }), '203.0.113.7/24', 'the blocks the configuration holds grants for');
  t.equal(r('2001:db8:abcd:12::/64'), '2001:db8:abcd:12::/64', 'a block as grants list prints it');
});

t.test('the list of actions is the one the sources write', async (t) => {
  const written = new Set<string>();
  const walk = (d: string): string[] => fs.readdirSync(d, { withFileTypes: true }).flatMap((f) => (f.isDirectory() ? walk(path.join(d, f.name)) : f.name.endsWith('.ts') ? [path.join(d, f.name)] : []));
  for (const file of ['mfa', 'store', 'daemon', 'web', 'cli'].flatMap((d) => walk(path.join(ROOT, d)))) {
    for (const line of fs.readFileSync(file, 'utf8').split('\n')) {
      // The action argument of an audit call (before the detail object), or the flag actions setUserFlag picks.
      const call = /\baudit\(([^{\n]*)/.exec(line)?.[1] ?? (/const action = (.*)/.exec(line)?.[1] ?? '');
      for (const m of call.matchAll(/'([a-z]+(?:-[a-z]+)+)'/g)) if (m[1]) written.add(m[1]);
    }
  }
  t.ok(written.size >= 20, `found the actions written (${written.size})`);
  t.same([...written].filter((a) => !KNOWN_ACTIONS.includes(a)), [], 'every action written is known to audit');
  t.same(KNOWN_ACTIONS.filter((a) => a !== DERIVED_EXPIRY && !written.has(a)), [], 'every known action is written somewhere');
  for (const [group, names] of Object.entries(AUDIT_ACTIONS)) t.ok(names.every((n) => n.startsWith(`${group}-`)), `group ${group}`);
});

t.test('PostgreSQL: the same store, copied with db copy, gives the same answers', async (t) => {
  if (!pg) throw new Error('PostgreSQL was not started');
  pg.psql('CREATE DATABASE audited OWNER mfagate;');
  const url = pg.url.replace(/\/mfagate$/, '/audited');
  ok(t, run('db', 'copy', '--to', url, '--password-file', pg.passwordFile, '--tls', 'disable'), 'db copy');
  const pgConfig = path.join(dir, 'pg.toml');
  fs.writeFileSync(pgConfig, `[store]\nbackend = "postgresql"\nurl = "${url}"\npassword_file = "${pg.passwordFile}"\ntls = "disable"\nstate_file = "node-state.json"\n`);
  const all = audit();
  const revokeAt = [...all].reverse().find((e) => e.action === 'grant-revoke')?.at ?? ''; // the first revoke, as above
  const J = ['--json', '--limit', '100000'];
  const variants: string[][] = [
    [],
    ['--action', 'grant-revoke', '--since', '30d'],
    ['--json', '--limit', '3'],
    [...J, '--oldest-first'],
    [...J, '--user', 'alice'],
    [...J, '--action', 'grant'],
    [...J, '--ip', '2001:db8:abcd:12::1'],
    [...J, '--ip', '203.0.113.0/24'],
    [...J, '--until', revokeAt],
    [...J, '--user', 'alice', '--action', 'grant', '--ip', '203.0.113.0/24', '--since', revokeAt],
    ['--json', '--limit', '2', '--oldest-first', '--user', 'alice'],
  ];
  for (const args of variants) {
    const lite = runAudit(...args);
    const pgr = cli(['--config', pgConfig, 'audit', ...args], { env: OPERATOR });
    t.equal(pgr.code, 0, `${args.join(' ')}: exit 0 on PostgreSQL ${pgr.stderr}`);
    t.equal(pgr.stdout, lite.stdout, `${args.join(' ') || '(no options)'}: the same output`);
    t.equal(pgr.stderr, lite.stderr, `${args.join(' ') || '(no options)'}: the same note`);
    t.ok(lite.stdout.length > 10 && !/no audit entries/.test(lite.stdout), `${args.join(' ')}: there was something to compare`);
  }
});

// ---- the query itself, on a larger store, against a brute-force reading ----------------------------------------

interface Opened {
  records: Records;
  sqlite: Store | undefined;
  close(): Promise<void>;
}
let serial = 0;
const backends: { name: string; open(): Promise<Opened> }[] = [
  {
    name: 'SQLite',
    open: async () => {
      const s = Store.open(path.join(dir, `query-${++serial}.db`), { create: true });
      return { records: s.records, sqlite: s, close: async () => s.close() };
    },
  },
  {
    name: 'PostgreSQL',
    open: async () => {
      if (!pg) throw new Error('PostgreSQL was not started');
      const name = `query_${++serial}`;
      pg.psql(`CREATE DATABASE ${name} OWNER mfagate;`);
      const o = await openPgStore({ url: pg.url.replace(/\/mfagate$/, `/${name}`), passwordFile: pg.passwordFile, tls: 'disable', caFile: undefined }, { migrate: true, create: true });
      return { records: o.records, sqlite: undefined, close: () => o.close() };
    },
  },
];

const B = Date.UTC(2026, 0, 5, 3, 0, 0);
const NOW = B + 2_000_000;
const ACTIONS = ['grant-add', 'grant-revoke', 'factor-fail', 'user-enable', 'passcode-add', 'something-new'];
const iso = (ms: number) => new Date(ms).toISOString();

/** The address of row i: the oldest 600 in 203.0.200.x (a LIKE "203.0.%" lets them through), the newest 600 in 2001:db8:0:13::/64, a mix between. */
function ipOf(i: number): string | null {
  if (i < 600) return `203.0.200.${i % 250}`;
  if (i >= 700) return `2001:db8:0:13::${i.toString(16)}`;
  // The two rows of a millisecond share the kind of address, so ties are split across pages of matching rows.
  return [`2001:db8:0:12::${i.toString(16)}`, `203.0.113.${i % 250}`, null, `2001:db8:0:12:1::${i.toString(16)}`, '198.51.100.1'][Math.floor(i / 2) % 5] ?? null;
}

/** 1300 rows, two to a millisecond, half of them purges (of grants that had expired, or had been revoked), and 40 grants. */
async function fill(r: Records): Promise<void> {
  await r.tx(async () => {
    for (let i = 0; i < 1300; i++) {
      const at = B + Math.floor(i / 2) * 1000;
      const ip = ipOf(i);
      const user = `u${i % 3}`;
      if (i % 2 === 0) {
        // Mostly up to 400 s before the purge; every tenth within 2 s of it (at the edge of what the query reads).
        const expiresAt = at - (i % 10 === 0 ? (i / 10) % 3 : (i * 7919) % 400) * 1000;
        await r.audit(at, 'daemon', 'grant-purge', user, ip, 10_000 + i, { block: ip, created_at: iso(expiresAt - 3_600_000), expires_at: iso(expiresAt), method: 'totp', source: 'api', revoked_at: i % 3 === 0 ? iso(expiresAt - 5000) : null, revoked_by: i % 3 === 0 ? 'api' : null });
      } else {
        await r.audit(at, ['api', 'cli:helpdesk1', 'daemon'][i % 3] ?? 'api', ACTIONS[i % ACTIONS.length] ?? 'grant-add', user, ip, i % 7 === 0 ? i : null, { n: i });
      }
    }
  });
  for (let k = 0; k < 40; k++) {
    const ip = ipOf(590 + k * 3) ?? '192.0.2.1';
    const now = B + k * 40_000;
    const { grant } = await r.addGrant({ user: `u${k % 3}`, ip, block: ip, ttlMs: k % 4 === 3 ? 10_000_000 : 30_000, method: 'helpdesk', source: 'cli', reason: '', actor: 'cli:helpdesk1', now });
    if (k % 5 === 0) await r.revokeGrants({ id: grant.id }, 'cli:helpdesk1', 'test', now + 1000);
  }
}

/** Everything the audit command should see, read the simple way: every row, every grant. */
async function everything(r: Records): Promise<AuditEntry[]> {
  const detail = (v: unknown) => JSON.parse(v as string) as Record<string, unknown>;
  const n = (v: unknown) => (v === null ? null : Number(v));
  const rows: AuditEntry[] = (await r.sql.all('SELECT * FROM audit')).map((x) => ({ id: Number(x['id']), at: Number(x['at']), actor: x['actor'] as string, action: x['action'] as string, user: x['user'] as string, ip: (x['ip'] as string | null) ?? null, grantId: n(x['grant_id']), detail: detail(x['detail']) }));
  const expired = (g: Row, at: number, d: { block: unknown; method: unknown; source: unknown }): AuditEntry => ({ id: null, at, actor: null, action: DERIVED_EXPIRY, user: g['user'] as string, ip: g['ip'] as string, grantId: Number(g['id'] ?? g['grant_id']), detail: { ...d, derived: true } });
  for (const g of await r.sql.all('SELECT * FROM grants')) {
    if (g['revoked_at'] === null && Number(g['expires_at']) <= NOW) rows.push(expired(g, Number(g['expires_at']), { block: g['block'], method: g['method'], source: g['source'] }));
  }
  for (const p of rows.filter((e) => e.action === 'grant-purge' && e.detail['revoked_at'] === null)) {
    rows.push({ ...expired({ user: p.user, ip: p.ip, id: p.grantId }, Date.parse(p.detail['expires_at'] as string), { block: p.detail['block'], method: p.detail['method'], source: p.detail['source'] }) });
  }
  return rows;
}

function brute(all: AuditEntry[], f: AuditFilter): AuditEntry[] {
  const range = f.ip;
  const keep = (e: AuditEntry) => {
    if (f.user !== undefined && e.user !== f.user) return false;
    if (f.actions !== undefined && !f.actions.includes(e.action)) return false;
    if (f.since !== undefined && e.at < f.since) return false;
    if (f.until !== undefined && e.at >= f.until) return false;
    if (range) {
      const a = e.ip === null ? undefined : parseAddress(e.ip);
      if (!a || a.kind() !== range.address.kind() || !a.match(range.address as never, range.bits)) return false;
    }
    return true;
  };
  // Newest first: time, then the stored row before a derived one at the same ms, then the higher id.
  const key = (e: AuditEntry) => [e.at, e.id === null ? 0 : 1, e.id ?? e.grantId ?? 0] as const;
  const sorted = all.filter(keep).sort((a, b) => {
    const [x, y] = [key(a), key(b)];
    return y[0] - x[0] || y[1] - x[1] || y[2] - x[2];
  });
  return f.oldestFirst ? sorted.reverse() : sorted;
}

const range = (cidr: string) => {
  const r = parseCidr(cidr);
  if (!r) throw new Error(cidr);
  return { address: r[0], bits: r[1] };
};

/** An Sql that notes every statement it reads with. */
function recording(inner: Sql, seen: { text: string; params: readonly SqlParam[] }[]): Sql {
  return {
    dialect: inner.dialect,
    get: (text, params = []) => (seen.push({ text, params }), inner.get(text, params)),
    all: (text, params = []) => (seen.push({ text, params }), inner.all(text, params)),
    run: (text, params) => inner.run(text, params),
    insert: (text, params) => inner.insert(text, params),
    tx: (fn) => inner.tx(fn),
    snapshot: (fn) => inner.snapshot(fn),
  };
}

for (const b of backends) {
  t.test(`${b.name}: the query against a brute-force reading`, async (t) => {
    const o = await b.open();
    t.teardown(() => o.close());
    await fill(o.records);
    const all = await everything(o.records);
    t.ok(all.some((e) => e.action === DERIVED_EXPIRY && e.id === null && e.grantId !== null && e.grantId < 10_000), 'expiries from the grants table');
    t.ok(all.filter((e) => e.action === DERIVED_EXPIRY && (e.grantId ?? 0) >= 10_000).length > 300, 'and from more than a page of purge rows');
    const mid = B + 400_000;
    const filters: Omit<AuditFilter, 'now'>[] = [
      { limit: 5 },
      { limit: 5, oldestFirst: true },
      { limit: 700 },
      { limit: 100_000 },
      { limit: 100_000, oldestFirst: true },
      { limit: 20, user: 'u2' },
      { limit: 20, user: 'u2', oldestFirst: true },
      { limit: 30, actions: ['grant-revoke'] },
      { limit: 30, actions: [DERIVED_EXPIRY] },
      { limit: 30, actions: [DERIVED_EXPIRY], oldestFirst: true },
      { limit: 400, actions: ['grant-purge', DERIVED_EXPIRY] },
      // Expiries from the grants table and from purge rows, interleaved in time.
      { limit: 5, actions: [DERIVED_EXPIRY], until: B + 650_000 },
      { limit: 3, actions: [DERIVED_EXPIRY], until: B + 330_000 },
      { limit: 12, user: 'u1', actions: ['grant-add', DERIVED_EXPIRY], until: B + 500_000 },
      { limit: 1, ip: range('2001:db8:0:12::/64') },
      { limit: 3, ip: range('2001:db8:0:12::1/64'), oldestFirst: true },
      { limit: 1000, ip: range('2001:db8:0:12::/64') },
      { limit: 1, ip: range('203.0.112.0/20'), oldestFirst: true },
      { limit: 10, ip: range('203.0.112.0/20') },
      { limit: 10, ip: range('203.0.113.112/32') },
      { limit: 10, ip: range('2001:db8::/32') },
      { limit: 10, ip: range('0.0.0.0/0'), oldestFirst: true },
      { limit: 50, since: mid },
      { limit: 50, until: mid },
      { limit: 50, since: mid, until: mid + 100_000, oldestFirst: true },
      { limit: 7, user: 'u1', ip: range('2001:db8:0:12::/64'), since: B + 600_000, actions: ['grant-add', 'grant-purge', DERIVED_EXPIRY, 'something-new'] },
    ];
    // Each filter with the usual page, and with pages of 7 and 2 rows: many page boundaries, inside ties too.
    for (const f of filters) {
      const expected = brute(all, { ...f, now: NOW });
      const what = JSON.stringify({ ...f, ip: f.ip ? `${f.ip.address.toString()}/${f.ip.bits}` : undefined });
      t.ok(expected.length > 0, `${what}: something matches`);
      for (const pageSize of [undefined, 7, 2]) {
        const got = await queryAudit(o.records.sql, { ...f, now: NOW, pageSize });
        t.same(got.entries, expected.slice(0, f.limit), `${what}, pages of ${pageSize ?? 'default'}: ${Math.min(expected.length, f.limit)} entries`);
        t.equal(got.more, expected.length > f.limit, `${what}, pages of ${pageSize ?? 'default'}: more = ${expected.length > f.limit}`);
      }
    }
    t.ok(all.some((e) => e.action === 'something-new'), 'an action this version does not know...');
    t.ok((await queryAudit(o.records.sql, { limit: 100_000, now: NOW })).entries.some((e) => e.action === 'something-new'), '...is shown without --action');
    await t.rejects(queryAudit(o.records.sql, { limit: 0, now: NOW }), RangeError);
    await t.rejects(queryAudit(o.records.sql, { limit: 1, now: NOW, pageSize: 0 }), RangeError);

    if (o.sqlite) {
      // The plan: a --user query reads audit_user in time order; expiries read a grants index.
      const db = o.sqlite.db;
      const seen: { text: string; params: readonly SqlParam[] }[] = [];
      await queryAudit(recording(o.records.sql, seen), { limit: 10, user: 'u1', since: mid, now: NOW });
      const plan = (s: { text: string; params: readonly SqlParam[] }) => (db.prepare(`EXPLAIN QUERY PLAN ${s.text}`).all(...s.params) as { detail: string }[]).map((p) => p.detail).join('; ');
      const onAudit = seen.find((s) => /FROM audit/.test(s.text) && !/grant-purge/.test(s.text));
      const onGrants = seen.find((s) => /FROM grants/.test(s.text));
      t.match(onAudit && plan(onAudit), /SEARCH audit USING INDEX audit_user \("?user"?=\? AND at>\?\)/, 'audit rows: the audit_user index');
      t.notMatch(onAudit && plan(onAudit), /TEMP B-TREE/, 'in order, without sorting');
      t.match(onGrants && plan(onGrants), /USING INDEX grants_(active|expires)/, 'expired grants: an index on grants');
    }
  });
}
