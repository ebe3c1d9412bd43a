// `mfagate db backup` and `db verify` (issue 12), run as an operator runs them against a real running daemon: a
// backup taken while the daemon and CLI writers write is one consistent moment of the store; verify finds a good
// copy good and a bad one bad (corrupted, another key, a newer schema) without writing to it or beside it; and a
// restored backup is what a fresh daemon decides from: grants, factors and the audit log as they were.
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import Database from 'better-sqlite3';
import t from 'tap';
import { MIGRATIONS, SCHEMA_VERSION } from '../store/migrations.js';
import { Store } from '../store/store.js';
import { Authenticator } from './helpers/api.js';
import { CLI, type DaemonProcess, cli, spawnDaemon, tempDir } from './helpers/daemon.js';
import { type Served, askPolicy, loginBody, serve } from './helpers/served.js';

const HOME = '203.0.113.7';
const LATER = '203.0.113.99';
const OTHER = '198.51.100.1';
const NEW = '192.0.2.44';
/** Expired grants (with their users and audit entries) that make the store big enough for a backup to take a while. */
const BULK = 50_000;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
type Row = Record<string, unknown>;

const dir = tempDir('mfagate-backup-');
const stateDir = path.join(dir, 'state');
const storeFile = path.join(stateDir, 'mfagate.db');
const keyFile = path.join(stateDir, 'secret.key');
const work = path.join(dir, 'backups');
fs.mkdirSync(stateDir, { mode: 0o750 });
fs.mkdirSync(work);

// The store before the daemon's first start: migrated, with BULK grants that expired yesterday (kept: the daemon
// purges only after [grants] purge_after), each with its user and its audit entry, as `grants add` writes them.
{
  const store = Store.open(storeFile, { create: true, migrate: true });
  const db = store.db;
  const now = Date.now();
  const user = db.prepare('INSERT OR IGNORE INTO users (name, created_at, updated_at) VALUES (?, ?, ?)');
  const grant = db.prepare("INSERT INTO grants (user, block, ip, created_at, expires_at, method, source, reason) VALUES (?, ?, ?, ?, ?, 'helpdesk', 'cli', 'bulk')");
  const audit = db.prepare("INSERT INTO audit (at, actor, action, user, ip, grant_id, detail) VALUES (?, 'cli:bulk', 'grant-add', ?, ?, ?, ?)");
  db.transaction(() => {
    for (let i = 0; i < BULK; i++) {
      const name = `bulk${i % 1000}`;
      const ip = `198.18.${(i >> 8) & 255}.${i & 255}`;
      const created = now - 2 * 86_400_000 + i;
      user.run(name, created, created);
      const id = grant.run(name, ip, ip, created, created + 86_400_000).lastInsertRowid;
      audit.run(created, name, ip, id, JSON.stringify({ block: ip, method: 'helpdesk', source: 'cli', reason: 'bulk' }));
    }
  })();
  store.close();
}

let served: Served;
let restored: DaemonProcess | undefined;
let app: Authenticator;
let appSecret: string;

t.before(async () => {
  served = await serve({ dir, args: [] });
  // alice: an authenticator app, MFA on, and a grant for HOME from passing MFA there (as the webmail does it).
  const begin = await served.api.post('/v1/users/alice/totp', { ip: HOME });
  if (begin.status !== 200) throw new Error(`totp: ${begin.status} ${begin.text}`);
  appSecret = begin.json.secret as string;
  app = new Authenticator(appSecret);
  const confirm = await served.api.post('/v1/users/alice/totp/confirm', { ip: HOME, code: await app.next() });
  if (confirm.status !== 200) throw new Error(`confirm: ${confirm.status} ${confirm.text}`);
  const mfa = await served.api.put('/v1/users/alice/mfa', { ip: HOME });
  if (mfa.status !== 200) throw new Error(`mfa: ${mfa.status} ${mfa.text}`);
  const verify = await served.api.post('/v1/users/alice/verify', { ip: HOME, factor: { method: 'totp', code: await app.next() } });
  if (verify.status !== 200) throw new Error(`verify: ${verify.status} ${verify.text}`);
});

t.teardown(async () => {
  await restored?.stop();
  await served?.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

const run = (...args: string[]) => cli(['--config', served.configFile, ...args]);
const j = <T = Row>(r: { stdout: string }): T => JSON.parse(r.stdout) as T;

/** The CLI as a child process that does not block this one (the writers run while a backup runs). */
function runAsync(args: string[], o: { umask?: string } = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  const argv = ['--config', served.configFile, ...args];
  const child =
    o.umask === undefined
      ? spawn(process.execPath, [CLI, ...argv], { stdio: ['ignore', 'pipe', 'pipe'] })
      : spawn('/bin/sh', ['-c', `umask ${o.umask} && exec "$0" "$@"`, process.execPath, CLI, ...argv], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (b: Buffer) => (stdout += b.toString()));
  child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
  return new Promise((resolve) => child.on('close', (code) => resolve({ code: code ?? -1, stdout, stderr })));
}

/** What a file and its directory look like: to prove that verify wrote nothing. */
function snapshot(file: string) {
  const st = fs.statSync(file);
  return {
    sha256: crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex'),
    size: st.size,
    mtimeMs: st.mtimeMs,
    mode: st.mode,
    beside: fs.readdirSync(path.dirname(file)).sort(),
  };
}

const readOnly = (file: string) => new Database(file, { readonly: true, fileMustExist: true });

function rowsOf(file: string, table: string, order = 'id'): Row[] {
  const db = readOnly(file);
  try {
    return db.prepare(`SELECT * FROM ${table} ORDER BY ${order}`).all() as Row[];
  } finally {
    db.close();
  }
}

const allow = async (ip: string) => (await askPolicy(served.dovecotPort, loginBody('alice', ip))).allow;

t.test('a backup taken while the daemon and CLI writers write is one consistent moment of the store', async (t) => {
  const live = readOnly(storeFile);
  t.teardown(() => live.close());
  const count = (table: string) => Number(live.prepare(`SELECT count(*) FROM ${table}`).pluck().get());

  let writing = true;
  let added = 0;
  const failures: string[] = [];
  // Three operators adding grants through the CLI at once (a new /64 each time: a new grant, never an extension)...
  const writer = async (w: number) => {
    for (let n = 0; writing; n++) {
      const r = await runAsync(['grants', 'add', '--user', `writer${w}`, '--ip', `2001:db8:${w}:${n.toString(16)}::1`, '--reason', 'backup test']);
      if (r.code === 0) added++;
      else failures.push(`grants add: ${r.code} ${r.stderr}`);
    }
  };
  // ...and Dovecot reporting logins (100 a second), which the daemon writes in batches every second.
  const reporter = async () => {
    for (let n = 0; writing; n++) {
      const a = await askPolicy(served.dovecotPort, { ...loginBody(`reporter${n % 300}`, `198.51.100.${(n % 250) + 1}`), success: true }, { command: 'report' });
      if (a.status !== 200) failures.push(`report: ${a.status} ${a.body}`);
      await sleep(10);
    }
  };
  const logins0 = count('logins');
  const loops = [writer(0), writer(1), writer(2), reporter()];
  while (added < 6 && failures.length === 0) await sleep(50);

  // Backups until one of them ran while grants were being added (the first nearly always does).
  const taken: { file: string; before: number; after: number; r: Awaited<ReturnType<typeof runAsync>> }[] = [];
  for (let i = 0; i < 8 && !taken.some((b) => b.after > b.before); i++) {
    const file = path.join(work, `live-${i}.db`);
    const before = count('grants');
    const r = await runAsync(['db', 'backup', file, '--json'], { umask: '000' });
    taken.push({ file, before, after: count('grants'), r });
  }
  const addedDuringBackups = added;
  await sleep(300);
  writing = false;
  await Promise.all(loops);

  t.same(failures, [], 'every write succeeded while backups ran');
  t.ok(addedDuringBackups >= 6, `the CLI writers added grants (${addedDuringBackups})`);
  for (let i = 0; i < 50 && count('logins') <= logins0; i++) await sleep(100);
  t.ok(count('logins') > logins0, 'the daemon wrote login reports meanwhile');
  t.ok(taken.some((b) => b.after > b.before), 'at least one backup ran while grants were being added');
  t.equal(await allow(HOME), true, 'the daemon kept deciding throughout');

  const liveGrants = new Map((live.prepare('SELECT * FROM grants').all() as Row[]).map((g) => [g['id'] as number, g]));
  for (const { file, before, after, r } of taken) {
    const name = path.basename(file);
    t.equal(r.code, 0, `${name}: exit 0 (${r.stderr})`);
    const out = j<{ file: string; bytes: number; mode: string; schema_version: number; counts: { grants: number; users: number; audit: number } }>(r);
    t.equal(out.file, file);
    t.equal(out.schema_version, SCHEMA_VERSION);
    t.equal(out.mode, '0600');
    t.equal(fs.statSync(file).mode & 0o777, 0o600, `${name}: mode 0600 even under umask 000`);
    t.equal(out.bytes, fs.statSync(file).size);
    const head = Buffer.alloc(20);
    const fd = fs.openSync(file, 'r');
    fs.readSync(fd, head, 0, 20, 0);
    fs.closeSync(fd);
    t.same([head[18], head[19]], [1, 1], `${name}: a rollback-journal file, whole without a -wal`);
    t.same(fs.readdirSync(work).filter((f) => f.startsWith(`${name}-`) || f.includes('.partial-')), [], `${name}: nothing beside it`);

    const c = readOnly(file);
    t.teardown(() => c.close());
    t.same(c.pragma('integrity_check'), [{ integrity_check: 'ok' }], `${name}: integrity ok`);
    const g = c.prepare('SELECT count(*) AS n, min(id) AS lo, max(id) AS hi FROM grants').get() as { n: number; lo: number; hi: number };
    t.ok(g.n >= before && g.n <= after, `${name}: ${g.n} grants, between ${before} before and ${after} after`);
    t.ok(g.n > BULK, `${name}: holds the writers' grants too`);
    t.equal(out.counts.grants, g.n, `${name}: the count it printed is the copy's`);
    t.equal(g.lo, 1);
    t.equal(g.hi, g.n, `${name}: grants 1..${g.hi}, none missing: a prefix of the store's history`);
    let differ = 0;
    for (const row of c.prepare('SELECT * FROM grants').iterate() as IterableIterator<Row>) {
      const l = liveGrants.get(row['id'] as number);
      if (!l || JSON.stringify(l) !== JSON.stringify(row)) differ++;
    }
    t.equal(differ, 0, `${name}: every grant row is whole, as the store has it`);
    const n = (sql: string) => Number(c.prepare(sql).pluck().get());
    const added = "SELECT grant_id FROM audit WHERE action = 'grant-add' AND grant_id IS NOT NULL";
    t.equal(n(`SELECT count(*) FROM grants WHERE id NOT IN (${added})`), 0, `${name}: every grant has its audit entry`);
    t.equal(n(`SELECT count(*) FROM (${added}) WHERE grant_id NOT IN (SELECT id FROM grants)`), 0, `${name}: no audit entry without its grant`);
    t.equal(n('SELECT count(*) FROM grants WHERE user NOT IN (SELECT name FROM users)'), 0, `${name}: every grant's user is there`);
    t.equal(n('SELECT count(*) FROM users'), out.counts.users);

    const v = run('db', 'verify', file, '--json');
    t.equal(v.code, 0, `${name}: db verify passes (${v.stdout}${v.stderr})`);
    t.match(j(v), { ok: true, integrity: 'ok', schema: 'current', secrets: { result: 'opens' }, counts: { grants: g.n } });
  }
});

t.test('db backup: an existing FILE is kept unless --force; never the store itself; every input checked', async (t) => {
  const f = path.join(work, 'exists.db');
  fs.writeFileSync(f, 'precious', { mode: 0o644 });
  let r = run('db', 'backup', f);
  t.equal(r.code, 1, 'exit 1');
  t.match(r.stderr, `mfagate: ${f} exists: give another file name, or --force to replace it`);
  t.equal(r.stdout, '');
  t.equal(fs.readFileSync(f, 'utf8'), 'precious', 'the file is untouched');
  t.same(fs.readdirSync(work).filter((x) => x.includes('.partial-')), [], 'no temporary file is left');

  r = await runAsync(['db', 'backup', f, '--force'], { umask: '022' });
  t.equal(r.code, 0, r.stderr);
  t.equal(fs.statSync(f).mode & 0o777, 0o600, 'replaced by a copy of mode 0600 (the old file was 0644)');
  t.equal(fs.readFileSync(f).toString('latin1', 0, 16), 'SQLite format 3\0');
  const lines = r.stdout.trimEnd().split('\n');
  t.equal(lines[0], `${storeFile} -> ${f}`);
  t.match(lines[1], /^size: {12}\d+\.\d (KiB|MiB) \(\d+ bytes\), mode 0600$/);
  t.equal(lines[2], `schema version:  ${SCHEMA_VERSION}`);
  t.match(lines[3], /^holds: {11}\d+ users, \d+ grants \(\d+ active\), 1 app registration, \d+ audit entries$/);
  t.match(lines[4], /^took: {12}\d+\.\d s$/);
  t.equal(lines[5], `not in it:       the secrets key ${keyFile}: keep a copy of it apart from the store's backups`);
  t.equal(lines.length, 6);
  t.notOk(r.stdout.includes(appSecret) || r.stdout.includes(fs.readFileSync(keyFile, 'utf8').trim()), 'no secret is printed');

  for (const same of [storeFile, path.join(stateDir, '..', 'state', 'mfagate.db'), `${storeFile}-wal`]) {
    r = run('db', 'backup', same, '--force');
    t.equal(r.code, 2, `${same}: exit 2`);
    t.match(r.stderr, /is the store itself \(\[store\] path\): give the copy another file name/);
  }
  const link = path.join(work, 'hardlink.db');
  fs.linkSync(storeFile, link);
  r = run('db', 'backup', link, '--force');
  t.equal(r.code, 2, 'a hard link to the store is the store');
  fs.unlinkSync(link);
  t.equal(run('grants', 'list', '--user', 'alice').code, 0, 'the store is still there and readable');

  r = run('db', 'backup', work);
  t.equal(r.code, 2);
  t.match(r.stderr, `${work} is a directory: give the file to write, e.g. ${path.join(work, 'mfagate-YYYY-MM-DD.db')}`);
  r = run('db', 'backup', path.join(work, 'no-such-dir', 'x.db'));
  t.equal(r.code, 1);
  t.match(r.stderr, `cannot write ${path.join(work, 'no-such-dir', 'x.db')}: there is no directory ${path.join(work, 'no-such-dir')}`);
  r = run('db', 'backup', '  ');
  t.equal(r.code, 2);
  t.match(r.stderr, /FILE: expected a file name, got "  "/);
  r = run('db', 'backup');
  t.equal(r.code, 2, 'FILE is required');
  r = run('db', 'backup', path.join(work, 'a.db'), path.join(work, 'b.db'));
  t.equal(r.code, 2, 'one FILE');
  t.notOk(fs.existsSync(path.join(work, 'a.db')));

  const noStore = path.join(work, 'no-store.toml');
  fs.writeFileSync(noStore, `[store]\npath = "${path.join(work, 'missing', 'mfagate.db')}"\n`);
  r = cli(['--config', noStore, 'db', 'backup', path.join(work, 'of-nothing.db')]);
  t.equal(r.code, 1, 'no store: exit 1');
  t.match(r.stderr, `mfagate: no store at ${path.join(work, 'missing', 'mfagate.db')}.`);
  t.notOk(fs.existsSync(path.join(work, 'of-nothing.db')), 'and no copy');
  t.notOk(fs.existsSync(path.join(work, 'missing')), 'and no store made');

  const stale = path.join(work, 'stale.db');
  fs.writeFileSync(`${stale}-journal`, 'left over');
  r = run('db', 'backup', stale);
  t.equal(r.code, 1, 'a journal beside FILE would be applied to the copy: refused');
  t.match(r.stderr, `${stale}-journal is beside ${stale}: SQLite would apply it to the copy`);
  t.notOk(fs.existsSync(stale));
  fs.rmSync(`${stale}-journal`);

  // A FILE that appears while the copy is being made is not replaced either (link(2), not rename, without --force).
  const racing = path.join(work, 'racing.db');
  const pending = runAsync(['db', 'backup', racing]);
  for (let i = 0; i < 200 && !fs.readdirSync(work).some((x) => x.startsWith('.racing.db.partial-')); i++) await sleep(5);
  const sawPartial = fs.readdirSync(work).some((x) => x.startsWith('.racing.db.partial-'));
  let madeMeanwhile = false;
  if (sawPartial) {
    try {
      fs.writeFileSync(racing, 'made meanwhile', { flag: 'wx' });
      madeMeanwhile = true;
    } catch {
      /* the copy was linked into place first */
    }
  }
  r = await pending;
  if (madeMeanwhile) {
    t.equal(r.code, 1, 'a file made meanwhile is kept');
    t.match(r.stderr, `${racing} exists: give another file name, or --force to replace it`);
    t.equal(fs.readFileSync(racing, 'utf8'), 'made meanwhile');
  } else t.equal(r.code, 0, 'the copy was too quick to race with');
  t.same(fs.readdirSync(work).filter((x) => x.includes('.partial-')), [], 'no temporary file is left');
});

/** A copy of the live store, made by the command (the daemon running). */
function backupTo(name: string): string {
  const file = path.join(work, name);
  const r = run('db', 'backup', file, '--force');
  if (r.code !== 0) throw new Error(`db backup: ${r.stderr}`);
  return file;
}

/** The copy the verify tests check (read-only), or copy and then damage. */
let good = '';

t.test('db verify: a good copy is OK, and nothing is written to it or beside it', async (t) => {
  good = backupTo('good.db');
  const before = snapshot(good);
  const r = run('db', 'verify', good);
  t.equal(r.code, 0, r.stderr);
  t.equal(r.stderr, '');
  const lines = r.stdout.trimEnd().split('\n');
  t.equal(lines[0], `${good}: OK`);
  t.match(lines[1], /^size: {12}\d+\.\d MiB \(\d+ bytes\), mode 0600$/);
  t.equal(lines[2], 'integrity:       ok');
  t.equal(lines[3], `schema version:  ${SCHEMA_VERSION} (this mfagate's)`);
  t.match(lines[4], /^holds: {11}\d+ users, \d+ grants \(\d+ active\), 1 app registration, \d+ audit entries$/);
  t.equal(lines[5], `secrets key:     ${keyFile} opens the app registrations in it`);
  t.equal(lines.length, 6);
  const out = j(run('db', 'verify', good, '--json'));
  t.match(out, {
    file: good,
    ok: true,
    mode: '0600',
    wal_mode: false,
    integrity: 'ok',
    integrity_errors: [],
    schema_version: SCHEMA_VERSION,
    schema: 'current',
    this_schema_version: SCHEMA_VERSION,
    counts: { app_registrations: 1 },
    secrets: { key_file: keyFile, result: 'opens' },
  });
  t.same([out['problems'], out['notes']], [[], []], 'no problem, no note');
  t.same(snapshot(good), before, 'the copy is byte for byte the same, and nothing appeared beside it');
  t.notOk(r.stdout.includes(appSecret) || r.stdout.includes(fs.readFileSync(keyFile, 'utf8').trim()), 'no secret is printed');

  // Relative names are the working directory's.
  const rel = cli(['--config', served.configFile, 'db', 'verify', path.relative(dir, good), '--key-file', 'state/secret.key', '--json'], { cwd: dir });
  t.match(j(rel), { file: good, ok: true, secrets: { key_file: keyFile, result: 'opens' } });

  const missing = run('db', 'verify', path.join(work, 'nope.db'));
  t.equal(missing.code, 1);
  t.match(missing.stderr, `mfagate: no file at ${path.join(work, 'nope.db')}`);
  t.equal(run('db', 'verify', '').code, 2, 'an empty FILE is a usage error');
  const text = path.join(work, 'notes.txt');
  fs.writeFileSync(text, 'not a database\n');
  const notDb = run('db', 'verify', text, '--json');
  t.equal(notDb.code, 1);
  t.match(j(notDb), { ok: false, integrity: null });
  t.same(j(notDb)['problems'], ['file: not a SQLite database']);
});

t.test('db verify: a corrupted copy fails, with the problem named', async (t) => {
  const bad = path.join(work, 'corrupted.db');
  fs.copyFileSync(good, bad);
  // The b-tree page of the grants table nearest the middle of the file: flip every byte of it.
  const c = readOnly(good);
  const pageSize = c.pragma('page_size', { simple: true }) as number;
  const pages = fs.statSync(good).size / pageSize;
  const page = c.prepare("SELECT pageno FROM dbstat WHERE name = 'grants' ORDER BY abs(pageno - ?) LIMIT 1").pluck().get(Math.floor(pages / 2)) as number;
  c.close();
  t.ok(page > pages / 3 && page < (2 * pages) / 3, `page ${page} of ${pages} is in the middle`);
  const bytes = fs.readFileSync(bad);
  for (let i = (page - 1) * pageSize; i < page * pageSize; i++) bytes[i] = (bytes[i] ?? 0) ^ 0xff;
  fs.writeFileSync(bad, bytes);
  const before = snapshot(bad);

  const r = run('db', 'verify', bad);
  t.equal(r.code, 1);
  t.match(r.stdout, new RegExp(`^${bad.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: \\d+ PROBLEMS?$`, 'm'));
  t.match(r.stdout, /^integrity: {7}FAILED$/m);
  t.match(r.stdout, /^problem: {9}integrity: \S/m);
  t.match(r.stderr, `mfagate: ${bad} is not a good copy: `);
  t.match(r.stderr, /\(listed above\)\n$/);
  const out = j<{ ok: boolean; integrity: string; integrity_errors: string[]; problems: string[] }>(run('db', 'verify', bad, '--json'));
  t.equal(out.ok, false);
  t.equal(out.integrity, 'failed');
  t.ok(out.integrity_errors.length > 0, `SQLite's findings: ${out.integrity_errors[0]}`);
  t.ok(out.problems[0]?.startsWith('integrity: '), 'the first problem is the integrity check');
  t.same(snapshot(bad), before, 'the corrupted copy was not touched either');
  t.equal(run('db', 'verify', good).code, 0, 'the copy it was made from is fine: the flipped page is what fails');
});

t.test('db verify: another key, a missing key, a malformed key', async (t) => {
  const other = path.join(work, 'other.key');
  const otherKey = crypto.randomBytes(32).toString('base64');
  fs.writeFileSync(other, `${otherKey}\n`, { mode: 0o600 });
  let r = run('db', 'verify', good, '--key-file', other);
  t.equal(r.code, 1);
  t.match(r.stdout, `secrets key:     ${other} does NOT open the app registrations in it`);
  t.match(r.stdout, `problem:         secrets key: ${other} does not open the app registrations in the copy: is it the key the store was written with?`);
  t.match(r.stdout, /^integrity: {7}ok$/m, 'the rest of the copy is fine');
  t.match(r.stderr, /is not a good copy: 1 problem \(listed above\)/);
  t.notOk(r.stdout.includes(otherKey) || r.stdout.includes(appSecret), 'no key or secret is printed');
  t.match(j(run('db', 'verify', good, '--key-file', other, '--json')), { ok: false, secrets: { key_file: other, result: 'does-not-open' } });

  const absent = path.join(work, 'absent.key');
  r = run('db', 'verify', good, '--key-file', absent, '--json');
  t.equal(r.code, 1);
  t.match(j(r), { ok: false, secrets: { result: 'key-missing' }, problems: [`secrets key: ${absent} does not exist, and the copy holds app registrations made with a key: without that key they cannot be used`] });
  t.notOk(fs.existsSync(absent), 'verify never creates a key file');

  const malformed = path.join(work, 'malformed.key');
  fs.writeFileSync(malformed, 'not a key\n');
  r = run('db', 'verify', good, '--key-file', malformed, '--json');
  t.equal(r.code, 1);
  t.match(j(r), { secrets: { result: 'key-unusable' }, problems: [/expected 32 bytes in base64/] });
  t.equal(run('db', 'verify', good, '--key-file', '').code, 2, 'an empty --key-file is a usage error');

  // A store with no sealed secrets says so, and needs no key.
  const emptyDir = tempDir('mfagate-backup-empty-');
  t.teardown(() => fs.rmSync(emptyDir, { recursive: true, force: true }));
  const emptyConfig = path.join(emptyDir, 'mfagate.toml');
  fs.writeFileSync(emptyConfig, '[store]\npath = "empty.db"\n[secrets]\nkey_file = "never.key"\n');
  t.equal(cli(['--config', emptyConfig, 'db', 'migrate']).code, 0);
  t.equal(cli(['--config', emptyConfig, 'db', 'backup', path.join(emptyDir, 'copy.db')]).code, 0);
  r = cli(['--config', emptyConfig, 'db', 'verify', path.join(emptyDir, 'copy.db')]);
  t.equal(r.code, 0, r.stdout);
  t.match(r.stdout, 'secrets key:     nothing to check: the copy holds no sealed secrets (no app registration or backup code)');
  t.match(r.stdout, `note:            there is no key file ${path.join(emptyDir, 'never.key')}, and the copy holds no sealed secrets: none is needed`);
  t.notOk(fs.existsSync(path.join(emptyDir, 'never.key')));
});

t.test('db verify: the schema version: newer is refused, older passes with what to do, a missing table fails', async (t) => {
  const newer = path.join(work, 'newer.db');
  fs.copyFileSync(good, newer);
  let d = new Database(newer);
  d.pragma(`user_version = ${SCHEMA_VERSION + 1}`);
  d.close();
  let r = run('db', 'verify', newer);
  t.equal(r.code, 1);
  t.match(r.stdout, `schema version:  ${SCHEMA_VERSION + 1} (NEWER than this mfagate's ${SCHEMA_VERSION})`);
  t.match(r.stdout, `problem:         schema: version ${SCHEMA_VERSION + 1} is newer than this mfagate's (${SCHEMA_VERSION}): restore it only with the mfagate that wrote it, or a newer one`);
  t.match(j(run('db', 'verify', newer, '--json')), { ok: false, integrity: 'ok', schema_version: SCHEMA_VERSION + 1, schema: 'newer', secrets: { result: 'not-checked' } });

  // An older store, as an earlier mfagate made it: the migrations up to the version before this one.
  const older = path.join(work, 'older.db');
  d = new Database(older);
  for (const m of MIGRATIONS) if (m.version < SCHEMA_VERSION) d.exec(m.sql);
  d.pragma(`user_version = ${SCHEMA_VERSION - 1}`);
  d.close();
  fs.chmodSync(older, 0o600);
  r = run('db', 'verify', older);
  t.equal(r.code, 0, r.stdout + r.stderr);
  t.match(r.stdout, `schema version:  ${SCHEMA_VERSION - 1} (older than this mfagate's ${SCHEMA_VERSION})`);
  t.match(r.stdout, `note:            schema version ${SCHEMA_VERSION - 1} is older than this mfagate's (${SCHEMA_VERSION}): after a restore, "mfagate db migrate" (or the daemon, when it starts) brings it up to date`);
  t.match(j(run('db', 'verify', older, '--json')), { ok: true, schema: 'older', schema_version: SCHEMA_VERSION - 1 });

  const holed = path.join(work, 'holed.db');
  fs.copyFileSync(good, holed);
  d = new Database(holed);
  d.exec('DROP TABLE passcodes');
  d.close();
  r = run('db', 'verify', holed, '--json');
  t.equal(r.code, 1);
  t.match(j(r), { ok: false, integrity: 'ok', problems: [new RegExp(`^schema: missing from schema version ${SCHEMA_VERSION}: .*table passcodes`)] });
});

t.test('db verify: a WAL-mode copy (sqlite3 .backup, not db backup) is checked in memory, nothing made beside it', async (t) => {
  const wal = path.join(work, 'sqlite3-backup.db');
  const live = new Database(storeFile, { fileMustExist: true });
  await live.backup(wal);
  live.close();
  fs.chmodSync(wal, 0o600);
  const head = fs.readFileSync(wal).subarray(18, 20);
  t.same([...head], [2, 2], 'the copy is in WAL mode, as sqlite3 .backup makes it');
  const before = snapshot(wal);
  const r = run('db', 'verify', wal, '--json');
  t.equal(r.code, 0, r.stdout);
  t.match(j(r), { ok: true, wal_mode: true, integrity: 'ok', secrets: { result: 'opens' }, notes: [/WAL mode \(not written by "mfagate db backup"\): it was read into memory/] });
  t.same(snapshot(wal), before, 'no -wal or -shm was made beside it, and it is unchanged');

  fs.writeFileSync(`${wal}-wal`, Buffer.alloc(4096, 1));
  const w = run('db', 'verify', wal, '--json');
  t.equal(w.code, 1);
  t.match(j(w), { ok: false, problems: [`file: ${wal}-wal is beside it, holding changes that are not in ${wal}: the copy alone is not whole (a file copy of a running store?); make copies with "mfagate db backup"`] });
  t.equal(fs.readFileSync(`${wal}-wal`).length, 4096, 'the -wal beside it is left as it was');

  // A copy with a journal beside it (a write to it interrupted): read in memory, the journal neither applied nor removed.
  const journaled = path.join(work, 'journaled.db');
  fs.copyFileSync(good, journaled);
  fs.chmodSync(journaled, 0o644);
  fs.writeFileSync(`${journaled}-journal`, Buffer.alloc(1024, 7));
  const beforeJ = snapshot(journaled);
  const jr = run('db', 'verify', journaled, '--json');
  t.equal(jr.code, 1);
  const jo = j<{ problems: string[]; notes: string[]; integrity: string }>(jr);
  t.same(jo.problems, [`file: ${journaled}-journal is beside it: a write to the copy was interrupted, and the copy alone may be half-written`]);
  t.equal(jo.integrity, 'ok', 'the file itself was still checked');
  t.match(jo.notes, ['the copy can be read by others (mode 0644): it holds sealed secrets and hashes; chmod 600 it']);
  t.same(snapshot(journaled), beforeJ, 'neither the copy nor its journal changed');
  t.same(fs.readFileSync(`${journaled}-journal`), Buffer.alloc(1024, 7));
});

t.test('db backup with the PostgreSQL backend: exit 2, use pg_dump and keep the key apart', async (t) => {
  const pgConfig = path.join(work, 'pg.toml');
  fs.writeFileSync(pgConfig, `[store]\nbackend = "postgresql"\nurl = "postgresql://mfagate@127.0.0.1:9/mfagate"\ntls = "disable"\n[secrets]\nkey_file = "${keyFile}"\n`);
  const target = path.join(work, 'pg-copy.db');
  for (const extra of [[], ['--json']]) {
    const r = cli(['--config', pgConfig, 'db', 'backup', target, ...extra]);
    t.equal(r.code, 2, `exit 2 ${extra.join(' ')}`);
    t.equal(r.stdout, '');
    t.match(
      r.stderr,
      `mfagate: db backup copies a SQLite store, and [store] backend is "postgresql": back the database up with pg_dump (pg_dump -Fc; see docs/scaling.md, "Backups"), and the secrets key file ${keyFile} ([secrets] key_file) apart from it`,
    );
  }
  t.notOk(fs.existsSync(target), 'nothing written');
  // verify still checks a SQLite copy (an old one, from before the move), and says what a pg_dump file is.
  const dump = path.join(work, 'mfagate.dump');
  fs.writeFileSync(dump, 'PGDMP...');
  const v = cli(['--config', pgConfig, 'db', 'verify', dump, '--json']);
  t.equal(v.code, 1);
  t.match(j(v), { problems: ['file: not a SQLite database'], notes: [/pg_restore --list/] });
});

t.test('a restored backup: grants, factors and the audit log as they were, and a fresh daemon decides from them', async (t) => {
  t.equal(await allow(HOME), true, 'alice passed MFA at HOME: allowed there');
  const backup = backupTo('restore.db');
  t.equal(run('db', 'verify', backup).code, 0);
  const saved = {
    grants: rowsOf(backup, 'grants'),
    factors: rowsOf(backup, 'factors', 'user'),
    audit: rowsOf(backup, 'audit'),
    users: rowsOf(backup, 'users', 'name'),
  };
  t.ok(saved.grants.some((g) => g['user'] === 'alice' && g['block'] === HOME && g['revoked_at'] === null), 'the backup holds the grant for HOME');
  t.ok(saved.factors.some((f) => f['user'] === 'alice' && f['totp_secret'] !== null), 'and the app registration');

  // After the backup: the grant for HOME is revoked, one for LATER is added. The daemon decides from that.
  t.equal(run('grants', 'revoke', '--user', 'alice', '--ip', HOME, '--reason', 'after the backup').code, 0);
  t.equal(run('grants', 'add', '--user', 'alice', '--ip', LATER, '--reason', 'after the backup').code, 0);
  t.equal(await allow(HOME), false, 'now refused at HOME');
  t.equal(await allow(LATER), true, 'now allowed at LATER');

  // The restore, as deployment.md says: stop the daemon, put the copy in place of the store, start it.
  t.equal(await served.daemon.stop(), 0, 'the daemon stopped cleanly');
  for (const f of [`${storeFile}-wal`, `${storeFile}-shm`]) fs.rmSync(f, { force: true });
  fs.copyFileSync(backup, `${storeFile}.restoring`);
  fs.chmodSync(`${storeFile}.restoring`, 0o600);
  fs.renameSync(`${storeFile}.restoring`, storeFile);
  restored = spawnDaemon(served.configFile);
  await restored.ready;

  t.equal(await allow(HOME), true, 'the grant for HOME works again, as it was in the backup');
  t.equal(await allow(LATER), false, 'the grant made after the backup is not there');
  t.equal(await allow(OTHER), false, 'another address is refused');
  t.equal(await allow(NEW), false, 'so is NEW, until alice passes MFA there');

  const now = { grants: rowsOf(storeFile, 'grants'), factors: rowsOf(storeFile, 'factors', 'user'), audit: rowsOf(storeFile, 'audit'), users: rowsOf(storeFile, 'users', 'name') };
  t.same(now.grants, saved.grants, 'every grant as it was');
  t.same(now.factors, saved.factors, 'every second factor as it was');
  t.same(now.users, saved.users, 'every user as they were');
  const lastSaved = Number(saved.audit[saved.audit.length - 1]?.['id']);
  t.same(now.audit.filter((a) => Number(a['id']) <= lastSaved), saved.audit, 'the audit log as it was');
  t.notOk(now.audit.some((a) => a['action'] === 'grant-revoke' && a['user'] === 'alice'), 'the revoke made after the backup is not in it');

  // The factor opens with the key: alice passes MFA with her app at NEW, through the fresh daemon.
  const v = await served.api.post('/v1/users/alice/verify', { ip: NEW, factor: { method: 'totp', code: await app.next() } });
  t.equal(v.status, 200, v.text);
  t.match(v.json, { grant: { block: NEW, method: 'totp' } });
  t.equal(await allow(NEW), true, 'then allowed at NEW');
  const show = run('users', 'show', 'alice', '--json');
  t.match(j(show), { user: 'alice', mfa_enabled: true, factors: { totp: true } });
});
