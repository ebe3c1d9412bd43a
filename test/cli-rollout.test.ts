// `mfagate report rollout` over a store made by real logins: the real `mfagate serve` process, a real Dovecot
// asking it about every IMAP/POP3 login and reporting each one, a real Postfix for SMTP AUTH through that
// Dovecot, and clients from distinct loopback addresses:
//   127.0.0.2  campus (trusted)      127.0.0.6  eduroam (untrusted, inside the trusted range)
//   127.0.0.9  outside               127.0.0.10 another outside address     127.0.0.20 the webmail host
// Second factors are registered through the daemon's webmail API (an app, and an enrolment left unconfirmed)
// and at the desk (`totp enroll`). Then the report, as text, JSON and CSV, lists exactly the users who would be
// refused at the date; `--at` before and after required_from; `--since`; log-only mode's count of refusals let
// through (the store keeps no count per day); the same answer from PostgreSQL after `db copy`; bad arguments.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { formatTime } from '../cli/format.js';
import { csvField } from '../cli/report.js';
import { Authenticator, apiClient } from './helpers/api.js';
import { type LoginResult, imapLogin, pop3Login, smtpSubmit } from './helpers/clients.js';
import { type DaemonProcess, cli, spawnDaemon, tempDir } from './helpers/daemon.js';
import { type MailStack, freePort, startMailStack } from './helpers/mailstack.js';
import { type PgServer, startPostgres } from './helpers/postgres.js';

const CAMPUS = '127.0.0.2';
const EDUROAM = '127.0.0.6';
const OUTSIDE = '127.0.0.9';
const ELSEWHERE = '127.0.0.10';
const WEBMAIL = '127.0.0.20';
// A login name that needs quoting in CSV (Dovecot is told to accept any character in names, below). A quote
// cannot be tried here (Dovecot escapes it in the passwd-file lookup): csvField is checked on its own below.
const ODD = 'lee,jr';
const USERS: Record<string, string> = {
  alice: 'alice-pw', // an authenticator app registered through the API: ready
  bob: 'bob-pw', // no factor; outside, then another outside address by SMTP, then campus: refused
  carol: 'carol-pw', // no factor; campus, the webmail host, a wrong password from outside: not refused
  dave: 'dave-pw', // no factor; POP3 from eduroam: refused
  erin: 'erin-pw', // no factor, exempt in the store: not refused
  frank: 'frank-pw', // no factor, exempt in the configuration: not refused
  gina: 'gina-pw', // MFA enabled by the helpdesk, no factor, in from outside through a helpdesk grant: refused
  henry: 'henry-pw', // an authenticator app enrolled at the desk: ready
  ivan: 'ivan-pw', // an app enrolment begun and never confirmed: refused
  olga: 'olga-pw', // no factor, outside, but only before the short --since window
  [ODD]: 'lee-pw', // no factor, outside: refused
};
const MESSAGE = '[AUTHENTICATIONFAILED] MFA required: sign in to webmail from this network, then retry';
const DAY = 86_400_000;

const dir = tempDir('mfagate-rollout-');
const configFile = path.join(dir, 'mfagate.toml');
const apiSocket = path.join(dir, 'api.sock');
// required_from a month ahead, to the second: the announced date.
const requiredFrom = Math.floor((Date.now() + 30 * DAY) / 1000) * 1000;
let policyPort = 0;
let daemon: DaemonProcess;
let stack: MailStack;
const api = apiClient({ socketPath: apiSocket });

const configText = (o: { mode?: string; requiredFrom?: boolean } = {}) => `[store]
path = "mfagate.db"
[networks]
trusted = ["127.0.0.0/29"]
untrusted = ["${EDUROAM}"]
webmail = ["${WEBMAIL}"]
[enforcement]
mode = "${o.mode ?? 'enforce'}"
required_from = "${o.requiredFrom === false ? '' : new Date(requiredFrom).toISOString()}"
exempt_users = ["frank"]
[dovecot]
listen = ["127.0.0.1:${policyPort}"]
api_key = "rollout-key"
message = "${MESSAGE}"
[postfix]
listen = ["unix:policy.sock"]
[api]
listen = ["unix:${apiSocket}"]
[web]
listen = []
[secrets]
key_file = "secret.key"
`;
const mfagate = (...args: string[]) => cli(['--config', configFile, ...args]);
/** The command's JSON output; when it is not JSON, an error that shows how the command ended. */
function j<T>(r: { code: number; stdout: string; stderr: string }): T {
  try {
    return JSON.parse(r.stdout) as T;
  } catch {
    throw new Error(`expected JSON on stdout; exit ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  }
}

interface Listed {
  user: string;
  last_outside_login: string;
  ip: string;
  protocol: string;
  mfa_enabled: boolean;
  reason: string;
  outside_addresses: number;
}
interface Report {
  at: string;
  at_from: string;
  required_from: string | null;
  mode: string;
  period: { since: string; from: string; to: string };
  counts: Record<string, number>;
  would_be_refused: Listed[];
  log_only: null | { per_day: null; per_day_note: string; daemon: null | { pid: number; running: boolean; started_at: string; as_of: string; let_through: number } };
  notes: string[];
}

t.before(async () => {
  policyPort = await freePort();
  fs.writeFileSync(configFile, configText());
  // As a site installs it: the store first, then the daemon (which makes the secrets key).
  const m = mfagate('db', 'migrate');
  if (m.code !== 0) throw new Error(m.stderr);
  daemon = spawnDaemon(configFile);
  stack = await startMailStack({
    users: USERS,
    policyUrl: `http://127.0.0.1:${policyPort}/`,
    policyApiHeader: 'X-API-Key: rollout-key',
    policyAttributes: 'recommended',
    postfixExtra: 'smtpd_recipient_restrictions = permit_mynetworks, permit_sasl_authenticated, reject',
    // Any character in a login name (Dovecot's default list has no comma or quote).
    dovecotExtra: 'auth_username_chars =',
  });
  await daemon.ready;
});

t.teardown(async () => {
  await stack?.stop();
  await daemon?.stop();
  fs.rmSync(dir, { recursive: true, force: true });
});

const pw = (user: string) => USERS[user] ?? '';
const imap = (user: string, from: string, password = pw(user)) => imapLogin({ port: stack.imapPort, user, password, localAddress: from });
const pop3 = (user: string, from: string) => pop3Login({ port: stack.pop3Port, user, password: pw(user), localAddress: from });
const smtp = (user: string, from: string) =>
  smtpSubmit({ port: stack.smtpPort, user, password: pw(user), localAddress: from, from: `${user}@${stack.domain}`, to: `alice@${stack.domain}` });
const why = (r: LoginResult) => ({ transcript: r.transcript.join('\n'), daemon: daemon.output().slice(-2000) });
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** When each listed user's last outside login happened: between the two instants around the login. */
const window: Record<string, { before: number; after: number }> = {};
let olgaDone = 0;
let othersFrom = 0;

t.test('a store made by real logins, factors registered through the API and at the desk', async (t) => {
  // olga first: the only outside login before the short --since window below.
  const o = await imap('olga', OUTSIDE);
  t.ok(o.ok, 'olga: IMAP from outside', why(o));
  olgaDone = Date.now();

  // alice registers an authenticator app through the webmail API (begin, then confirm with a first code).
  const begin = await api.post('/v1/users/alice/totp', { ip: OUTSIDE });
  t.equal(begin.status, 200, begin.text);
  const phone = new Authenticator(begin.json.secret as string);
  const confirm = await api.post('/v1/users/alice/totp/confirm', { ip: OUTSIDE, code: await phone.next() });
  t.equal(confirm.status, 200, confirm.text);
  // ivan begins and never confirms.
  t.equal((await api.post('/v1/users/ivan/totp', { ip: OUTSIDE })).status, 200);
  // henry at the desk.
  const enrol = mfagate('totp', 'enroll', 'henry', '--json');
  t.equal(enrol.code, 0, enrol.stderr);
  t.match(j<{ user: string }>(enrol), { user: 'henry', replaced: false });
  // The helpdesk: erin exempt, gina required (MFA enabled) with a grant for the outside address.
  t.equal(mfagate('users', 'exempt', 'erin', '--reason', 'robot').code, 0);
  t.equal(mfagate('users', 'enable', 'gina').code, 0);
  t.equal(mfagate('grants', 'add', '--user', 'gina', '--ip', OUTSIDE, '--ttl', '1h').code, 0);

  // The short window must separate olga from everybody else by a few seconds (see the --since test).
  await sleep(Math.max(0, olgaDone + 6000 - Date.now()));
  othersFrom = Date.now();
  const login = async (user: string, f: () => Promise<LoginResult>, label: string, outsideLast = false) => {
    const before = Date.now();
    const r = await f();
    t.ok(r.ok, `${user}: ${label}`, why(r));
    if (outsideLast) window[user] = { before, after: Date.now() };
  };
  await login('alice', () => imap('alice', OUTSIDE), 'IMAP from outside (MFA not required yet)');
  await login('bob', () => imap('bob', OUTSIDE), 'IMAP from outside');
  const before = Date.now();
  const s = await smtp('bob', ELSEWHERE);
  t.ok(s.authOk && s.rcptOk && s.dataOk, 'bob: SMTP AUTH from another outside address', { transcript: s.transcript.join('\n') });
  window['bob'] = { before, after: Date.now() };
  await login('bob', () => imap('bob', CAMPUS), 'IMAP from campus, later: does not count');
  await login('carol', () => imap('carol', CAMPUS), 'IMAP from campus');
  await login('carol', () => imap('carol', WEBMAIL), 'IMAP from the webmail host');
  const wrong = await imap('carol', OUTSIDE, 'not-her-password');
  t.equal(wrong.ok, false, 'carol: a wrong password from outside fails (and is no login)');
  await login('dave', () => pop3('dave', EDUROAM), 'POP3 from eduroam', true);
  await login('erin', () => imap('erin', OUTSIDE), 'IMAP from outside (exempt)');
  await login('frank', () => imap('frank', OUTSIDE), 'IMAP from outside (exempt in the configuration)');
  await login('gina', () => imap('gina', OUTSIDE), 'IMAP from outside through the grant', true);
  await login('henry', () => imap('henry', OUTSIDE), 'IMAP from outside');
  await login('ivan', () => imap('ivan', OUTSIDE), 'IMAP from outside', true);
  await login(ODD, () => imap(ODD, OUTSIDE), 'IMAP from outside', true);
  await login('alice', () => imap('alice', CAMPUS), 'IMAP from campus (the last report)');

  // Dovecot reports every attempt; the daemon stores them in batches, in order: wait for the last one.
  let logins: { ip: string }[] = [];
  for (const deadline = Date.now() + 10_000; Date.now() < deadline; await sleep(100)) {
    logins = j<{ logins: { ip: string }[] }>(mfagate('users', 'show', 'alice', '--json')).logins;
    if (logins.some((l) => l.ip === CAMPUS)) break;
  }
  t.ok(logins.some((l) => l.ip === CAMPUS), 'the daemon stored the reports');
  const carol = j<{ logins: { ip: string; protocol: string; last_success_at: string | null; last_failure_at: string | null }[] }>(mfagate('users', 'show', 'carol', '--json')).logins;
  t.match(carol.find((l) => l.ip === OUTSIDE), { last_success_at: null, last_failure_at: String }, 'carol\'s failure from outside is recorded as a failure only');
  t.ok(carol.find((l) => l.ip === WEBMAIL)?.last_success_at, 'and her login from the webmail host as a success');
});

const REFUSED = ['bob', 'dave', 'gina', 'ivan', ODD, 'olga'].sort();

t.test('at required_from: exactly the users who would be refused, with their last outside login, and the counts', async (t) => {
  const r = mfagate('report', 'rollout', '--json');
  t.equal(r.code, 0, r.stderr);
  const rep = j<Report>(r);
  t.equal(rep.at, new Date(requiredFrom).toISOString(), 'judged at required_from');
  t.equal(rep.at_from, 'required_from');
  t.equal(rep.mode, 'enforce');
  t.equal(rep.period.since, '30d');
  t.equal(Date.parse(rep.period.to) - Date.parse(rep.period.from), 30 * DAY);
  t.same(rep.notes, [], 'nothing to note');
  t.equal(rep.log_only, null, 'not in log-only mode');
  t.same(rep.counts, {
    users: 11, // every login name, all of them logged in successfully
    mfa_enabled: 1, // gina
    usable_factor: 2, // alice (API), henry (desk); ivan's enrolment is not confirmed
    exempt: 2, // erin (store), frank (configuration)
    mfa_required: 9, // all but the exempt
    required_without_factor: 7, // ... and but alice and henry; carol has no outside login
    would_be_refused: 6,
  });
  t.same(rep.would_be_refused.map((u) => u.user), REFUSED, 'exactly these users, sorted');
  const by = Object.fromEntries(rep.would_be_refused.map((u) => [u.user, u]));
  t.match(by['bob'], { ip: ELSEWHERE, protocol: 'smtp', mfa_enabled: false, reason: 'no second factor', outside_addresses: 2 }, 'bob: the last outside login (SMTP), not the later campus one');
  t.match(by['dave'], { ip: EDUROAM, protocol: 'pop3', reason: 'no second factor', outside_addresses: 1 }, 'dave: eduroam counts as outside');
  t.match(by['gina'], { ip: OUTSIDE, protocol: 'imap', mfa_enabled: true, reason: 'no second factor' }, 'gina: MFA enabled, a grant is no factor');
  t.match(by['ivan'], { ip: OUTSIDE, protocol: 'imap', reason: 'authenticator app not confirmed' });
  t.match(by[ODD], { ip: OUTSIDE, protocol: 'imap', reason: 'no second factor' });
  t.match(by['olga'], { ip: OUTSIDE, protocol: 'imap' });
  t.ok(Date.parse(by['olga']?.last_outside_login ?? '') <= olgaDone, 'olga: her login, before the others');
  for (const [user, w] of Object.entries(window)) {
    const at = Date.parse(by[user]?.last_outside_login ?? '');
    t.ok(at >= w.before && at <= w.after, `${user}: the last outside login is the one made then (${by[user]?.last_outside_login})`);
  }
});

t.test('the text output says the same', async (t) => {
  const r = mfagate('report', 'rollout');
  t.equal(r.code, 0, r.stderr);
  const rep = j<Report>(mfagate('report', 'rollout', '--json'));
  const lines = r.stdout.split('\n');
  t.equal(lines[0], `rollout readiness at ${formatTime(requiredFrom)} ([enforcement] required_from)`);
  t.match(r.stdout, /^users: +11 known to the store$/m);
  t.match(r.stdout, /^MFA enabled: +1$/m);
  t.match(r.stdout, /^usable factor: +2 \(an authenticator app or a confirmed external address\)$/m);
  t.match(r.stdout, /^exempt: +2 /m);
  t.match(r.stdout, /^MFA required: +9 at that date, 7 of them without a usable factor$/m);
  t.match(r.stdout, /^would be refused: 6 \(/m);
  t.notMatch(r.stdout, /^note:/m);
  const header = lines.findIndex((l) => /^USER +LAST OUTSIDE LOGIN +IP +PROTOCOL +MFA +REASON$/.test(l));
  t.ok(header > 0, 'a table of the users');
  const rows = lines.slice(header + 1).filter((l) => l.trim() !== '');
  t.same(rows.map((l) => l.split(/\s{2,}/)[0]), REFUSED, 'one row per user who would be refused');
  const esc = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  for (const u of rep.would_be_refused) {
    const ip = u.outside_addresses > 1 ? `${u.ip} (+${u.outside_addresses - 1} more)` : u.ip;
    const row = new RegExp(`^${esc(u.user)} +${esc(formatTime(Date.parse(u.last_outside_login)))} +${esc(ip)} +${u.protocol} +${u.mfa_enabled ? 'enabled' : 'off'} +${esc(u.reason)}$`);
    t.ok(rows.some((l) => row.test(l)), `${u.user}: ${row.source}`, { rows });
  }
});

/** A minimal RFC 4180 reader: quoted fields, doubled quotes, CRLF records. */
function readCsv(text: string): string[][] {
  const records: string[][] = [];
  let field = '';
  let record: string[] = [];
  let quoted = false;
  for (let i = 0; i < text.length; i++) {
    const ch = text[i];
    if (quoted) {
      if (ch === '"' && text[i + 1] === '"') (field += '"'), i++;
      else if (ch === '"') quoted = false;
      else field += ch;
    } else if (ch === '"') quoted = true;
    else if (ch === ',') record.push(field), (field = '');
    else if (ch === '\r' && text[i + 1] === '\n') record.push(field), records.push(record), (record = []), (field = ''), i++;
    else field += ch;
  }
  if (field !== '' || record.length) throw new Error(`CSV does not end with CRLF: ${JSON.stringify(text.slice(-40))}`);
  return records;
}

t.test('--csv: a header and one record per user, quoted where needed, times in RFC 3339', async (t) => {
  const r = mfagate('report', 'rollout', '--csv');
  t.equal(r.code, 0, r.stderr);
  t.equal(r.stderr, '', 'no notes');
  const rep = j<Report>(mfagate('report', 'rollout', '--json'));
  const [header, ...records] = readCsv(r.stdout);
  t.same(header, ['user', 'last_outside_login', 'ip', 'protocol', 'mfa_enabled', 'reason']);
  t.match(r.stdout, /\r\n"lee,jr",/, 'a name with a comma is quoted');
  t.same(records.map((rec) => rec[0]), REFUSED);
  for (const u of rep.would_be_refused) {
    const rec = records.find((x) => x[0] === u.user);
    t.equal(rec?.length, 6, `${u.user}: six fields`);
    t.match(rec?.[1], /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d$/, `${u.user}: RFC 3339 with the offset`);
    t.equal(Date.parse(rec?.[1] ?? ''), Math.floor(Date.parse(u.last_outside_login) / 1000) * 1000, `${u.user}: the same instant as in JSON`);
    t.same(rec?.slice(2), [u.ip, u.protocol, String(u.mfa_enabled), u.reason], `${u.user}: ip, protocol, mfa_enabled, reason`);
  }
});

t.test('csvField: RFC 4180 quoting', async (t) => {
  t.equal(csvField('bob'), 'bob');
  t.equal(csvField('o"neil'), '"o""neil"', 'a quote is doubled, inside quotes');
  t.equal(csvField('a,b'), '"a,b"');
  t.equal(csvField('two\nlines'), '"two\nlines"');
  t.equal(csvField(' padded'), '" padded"', 'spaces at either end are kept by quoting');
  t.same(readCsv(['o"neil', 'a,b', 'x'].map(csvField).join(',') + '\r\n'), [['o"neil', 'a,b', 'x']], 'and read back whole');
});

t.test('--at before required_from: only the users who enabled MFA; after: everybody without a factor', async (t) => {
  const tomorrow = new Date(Date.now() + DAY);
  const day = `${tomorrow.getFullYear()}-${String(tomorrow.getMonth() + 1).padStart(2, '0')}-${String(tomorrow.getDate()).padStart(2, '0')}`;
  const early = j<Report>(mfagate('report', 'rollout', '--at', day, '--json'));
  t.equal(early.at, new Date(tomorrow.getFullYear(), tomorrow.getMonth(), tomorrow.getDate()).toISOString(), 'a bare date is that midnight, local time');
  t.equal(early.at_from, '--at');
  t.same(early.would_be_refused.map((u) => u.user), ['gina'], 'before the date: gina, who enabled MFA');
  t.match(early.counts, { mfa_required: 1, required_without_factor: 1, would_be_refused: 1 });
  t.match(early.notes, [/before \[enforcement\] required_from/]);
  const text = mfagate('report', 'rollout', '--at', day);
  t.match(text.stdout, /^note: that date is before \[enforcement\] required_from/m);

  const late = new Date(requiredFrom + DAY).toISOString().replace('.000Z', '+00:00');
  const after = j<Report>(mfagate('report', 'rollout', '--at', late, '--json'));
  t.equal(after.at, new Date(requiredFrom + DAY).toISOString());
  t.same(after.would_be_refused.map((u) => u.user), REFUSED, 'after the date: everybody without a factor');
  t.same(after.counts, j<Report>(mfagate('report', 'rollout', '--json')).counts);
  t.same(after.notes, []);

  // Neither --at nor required_from: said, and judged as of now.
  const none = path.join(dir, 'no-date.toml');
  fs.writeFileSync(none, configText({ requiredFrom: false }));
  const now = j<Report>(cli(['--config', none, 'report', 'rollout', '--json']));
  t.equal(now.at_from, 'now');
  t.equal(now.required_from, null);
  t.ok(Math.abs(Date.parse(now.at) - Date.now()) < 30_000, 'at: now');
  t.same(now.would_be_refused.map((u) => u.user), ['gina']);
  t.match(now.notes, [/required_from is not set and no --at was given: judged as of now/]);
  const csv = cli(['--config', none, 'report', 'rollout', '--csv']);
  t.match(csv.stderr, /^mfagate: note: \[enforcement\] required_from is not set/, 'with --csv the note goes to stderr');
  t.equal(readCsv(csv.stdout).length, 2, 'and the CSV has the header and gina');
  t.match(cli(['--config', none, 'report', 'rollout', '--at', late, '--json']).stdout, /required_from is not set: at that date MFA is required only for the users who enabled it/);
});

t.test('--since: the period counts back from now', async (t) => {
  // Seconds enough to reach back over every login but olga's (made at least 6 s before the others, and the
  // command itself starts a moment after this instant).
  const s = Math.ceil((Date.now() + 3000 - othersFrom) / 1000);
  const rep = j<Report>(mfagate('report', 'rollout', '--since', `${s}s`, '--json'));
  t.ok(Date.parse(rep.period.from) > olgaDone, 'the period starts after olga\'s login', { from: rep.period.from, olga: new Date(olgaDone).toISOString() });
  t.ok(Date.parse(rep.period.from) <= othersFrom, 'and before the others');
  t.same(rep.would_be_refused.map((u) => u.user), REFUSED.filter((u) => u !== 'olga'));
  t.equal(rep.counts['would_be_refused'], 5);
  t.equal(rep.counts['required_without_factor'], 7, 'olga still has no factor');
  t.same(j<Report>(mfagate('report', 'rollout', '--since', '1d', '--json')).would_be_refused.map((u) => u.user), REFUSED);
});

t.test('log-only: the refusals let through, as far as the store knows them', async (t) => {
  fs.writeFileSync(configFile, configText({ mode: 'log-only' }));
  daemon.child.kill('SIGHUP');
  for (const deadline = Date.now() + 10_000; Date.now() < deadline && !daemon.output().includes('"event":"reloaded"'); ) await sleep(50);
  t.match(daemon.output(), /"event":"reloaded"/);
  // gina's grant ends: from outside she would now be refused, and log-only lets her in.
  t.equal(mfagate('grants', 'revoke', '--user', 'gina', '--reason', 'test').code, 0);
  for (const from of [OUTSIDE, ELSEWHERE]) {
    const r = await imap('gina', from);
    t.ok(r.ok, `gina from ${from}: let through`, why(r));
  }
  const decisions = () =>
    daemon
      .output()
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as Record<string, unknown>)
      .filter((l) => l['event'] === 'decision' && l['log_only'] === 'would refuse');
  t.same(decisions().map((d) => [d['user'], d['ip']]), [['gina', OUTSIDE], ['gina', ELSEWHERE]], 'the daemon logged two refusals let through');
  // The daemon writes its counts every 5 s.
  let rep = j<Report>(mfagate('report', 'rollout', '--json'));
  for (const deadline = Date.now() + 15_000; Date.now() < deadline && rep.log_only?.daemon?.let_through !== 2; await sleep(250)) {
    rep = j<Report>(mfagate('report', 'rollout', '--json'));
  }
  t.equal(rep.mode, 'log-only');
  t.equal(rep.log_only?.per_day, null, 'no count per day: the store has none');
  t.match(rep.log_only?.per_day_note, /the store keeps no count per day/);
  t.match(rep.log_only?.daemon, { pid: daemon.child.pid, running: true, let_through: 2 }, 'the daemon\'s running count, from the store');
  t.equal(j<{ daemon: { decisions: { log_only: number } } }>(mfagate('stats', '--json')).daemon.decisions.log_only, 2, 'as `stats` shows it');
  t.same(rep.would_be_refused.map((u) => u.user), REFUSED, 'the list is the same');

  const text = mfagate('report', 'rollout');
  t.match(text.stdout, new RegExp(`^  let through: +2 refusals since the daemon \\(pid ${daemon.child.pid}\\) started `, 'm'));
  t.match(text.stdout, /^  per day: +not recorded in the store/m);
  const hint = /^ {18}(journalctl .*)$/m.exec(text.stdout)?.[1] ?? '';
  t.match(hint, /^journalctl -u mfagate -o cat \| /);
  // The printed pipeline, on the daemon's own output instead of the journal, counts those lines per day.
  const pipeline = hint.replace(/^journalctl -u mfagate -o cat \| /, '');
  const counted = spawnSync('bash', ['-c', pipeline], { input: daemon.output(), encoding: 'utf8' });
  t.equal(counted.status, 0, counted.stderr);
  const today = new Date().toISOString().slice(0, 10);
  t.same(counted.stdout.trim().split(/\s+/), ['2', today], 'the pipeline counts 2 for today (UTC)');
});

t.test('PostgreSQL: the same report from a copy of the store', async (t) => {
  let pg: PgServer | undefined;
  t.teardown(() => pg?.destroy());
  pg = await startPostgres();
  const copy = mfagate('db', 'copy', '--to', pg.url, '--password-file', pg.passwordFile, '--tls', 'disable');
  t.equal(copy.code, 0, copy.stderr);
  const pgConfig = path.join(dir, 'pg.toml');
  fs.writeFileSync(
    pgConfig,
    configText().replace('[store]\npath = "mfagate.db"', `[store]\nbackend = "postgresql"\nurl = "${pg.url}"\npassword_file = "${pg.passwordFile}"\ntls = "disable"\nstate_file = "pg-node.json"`),
  );
  const fromPg = j<Report>(cli(['--config', pgConfig, 'report', 'rollout', '--json']));
  const sqlite = j<Report>(mfagate('report', 'rollout', '--json'));
  t.same(fromPg.counts, sqlite.counts, 'the same counts');
  t.same(fromPg.would_be_refused, sqlite.would_be_refused, 'the same users, times, addresses and protocols');
  t.same(j<Report>(cli(['--config', pgConfig, 'report', 'rollout', '--at', new Date(Date.now() + DAY).toISOString(), '--json'])).would_be_refused.map((u) => u.user), ['gina']);
});

t.test('bad arguments are refused (exit 2) before the store is read', async (t) => {
  const bad: [string[], RegExp][] = [
    [['--since', 'abc'], /--since: expected a duration/],
    [['--since', '30'], /--since: expected a duration/],
    [['--since', '0d'], /--since: expected a duration/],
    [['--since', ''], /--since: expected a duration/],
    [['--at', 'tomorrow'], /--at: expected a date/],
    [['--at', '2026-02-30'], /--at: expected a date/],
    [['--at', '2026-13-01'], /--at: expected a date/],
    [['--at', '2026-04-01T24:00:00Z'], /--at: expected a date/],
    [['--at', '2026-04-01T00:00:00'], /--at: expected a date/],
    [['--at', '2026-04-01T00:00:00+25:00'], /--at: expected a date/],
    [['--at', ' 2026-04-01'], /--at: expected a date/],
    [['--json', '--csv'], /--json and --csv cannot be combined/],
    [['--bogus'], /unknown option '--bogus'/],
    [['extra'], /too many arguments/],
    [['--at'], /option '--at <date>' argument missing/],
  ];
  for (const [args, message] of bad) {
    const r = mfagate('report', 'rollout', ...args);
    t.equal(r.code, 2, `${JSON.stringify(args)}: exit 2`);
    t.match(r.stderr, message, `${JSON.stringify(args)}: says why`);
    t.equal(r.stdout, '', `${JSON.stringify(args)}: prints no report`);
  }
  const unknown = mfagate('report', 'nothing');
  t.equal(unknown.code, 2, 'an unknown report: exit 2');
  // A configuration whose store does not exist: the usual message, exit 1, and no store made.
  const missing = path.join(dir, 'missing.toml');
  fs.writeFileSync(missing, configText().replace('path = "mfagate.db"', 'path = "nowhere/mfagate.db"'));
  const r = cli(['--config', missing, 'report', 'rollout']);
  t.equal(r.code, 1);
  t.match(r.stderr, /no store at \S+nowhere\/mfagate\.db/);
  t.notOk(fs.existsSync(path.join(dir, 'nowhere')), 'no store was created');
});
