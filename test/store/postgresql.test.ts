// The PostgreSQL schema and moving a SQLite store into it, against a real PostgreSQL 15 started here:
//   - `mfagate db migrate` makes the same tables, columns and indexes as in SQLite, and is idempotent;
//   - the change feed: written by triggers, ids committed in order (a second writer waits for the first's
//     commit), a NOTIFY at each commit;
//   - `mfagate db copy --to`: every row, ids kept, nothing twice on a second run, the same decisions after;
//   - the configuration: a URL with a password is refused; the helpdesk commands work on the database; a
//     database that cannot be reached is said, by db migrate, the other commands and the daemon.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { LiveCopy } from '../../store/live-copy.js';
import { MIGRATIONS, SCHEMA_VERSION } from '../../store/migrations.js';
import { type PgDb, loadPgCopy, openPg } from '../../store/pg.js';
import { Store } from '../../store/store.js';
import { CLI, cli, tempDir } from '../helpers/daemon.js';
import { type PgServer, startPostgres, startPostgresTls } from '../helpers/postgres.js';

const HOUR = 3_600_000;
const dir = tempDir('mfagate-pgtest-');
let pg: PgServer;
let sql: PgDb;
t.before(async () => {
  pg = await startPostgres();
  sql = openPg({ url: pg.url, passwordFile: pg.passwordFile, tls: 'disable', caFile: undefined });
});
t.teardown(async () => {
  await sql?.end();
  pg?.destroy();
  fs.rmSync(dir, { recursive: true, force: true });
});

const pgConfig = (extra = '') => {
  const file = path.join(dir, `pg-${Math.random().toString(36).slice(2)}.toml`);
  fs.writeFileSync(file, `[store]\nbackend = "postgresql"\nurl = "${pg.url}"\npassword_file = "${pg.passwordFile}"\ntls = "disable"\n${extra}`);
  return file;
};

t.test('db migrate creates the schema, then says it is up to date', async (t) => {
  const config = pgConfig();
  const first = cli(['--config', config, 'db', 'migrate']);
  t.equal(first.code, 0, first.stderr);
  t.match(first.stdout, new RegExp(`mfagate@127\\.0\\.0\\.1:${pg.port}/mfagate: created, schema version ${SCHEMA_VERSION}`));
  const again = cli(['--config', config, 'db', 'migrate']);
  t.equal(again.code, 0, again.stderr);
  t.match(again.stdout, `schema version ${SCHEMA_VERSION}, up to date`);
  t.equal(pg.psql('SELECT version FROM mfagate_schema', 'mfagate').trim(), String(SCHEMA_VERSION));
  t.equal(pg.psql("SELECT tableowner FROM pg_tables WHERE tablename = 'grants'", 'mfagate').trim(), 'mfagate', 'owned by the role mfagate connects as');
});

t.test('two hosts migrating one new database at once: one creates the schema, the other finds it up to date', async (t) => {
  pg.psql('CREATE DATABASE racing OWNER mfagate;');
  const file = path.join(dir, 'racing.toml');
  fs.writeFileSync(file, `[store]\nbackend = "postgresql"\nurl = "${pg.url.replace(/\/mfagate$/, '/racing')}"\npassword_file = "${pg.passwordFile}"\ntls = "disable"\n`);
  const run = () =>
    new Promise<{ code: number | null; out: string }>((resolve) => {
      const c = spawn(process.execPath, [CLI, '--config', file, 'db', 'migrate'], { stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      c.stdout.on('data', (d: Buffer) => (out += d.toString()));
      c.stderr.on('data', (d: Buffer) => (out += d.toString()));
      c.on('close', (code) => resolve({ code, out }));
    });
  const both = await Promise.all([run(), run()]);
  t.same(both.map((r) => r.code), [0, 0], both.map((r) => r.out).join(''));
  t.same(both.map((r) => (/created/.test(r.out) ? 'created' : /up to date/.test(r.out) ? 'up to date' : r.out)).sort(), ['created', 'up to date']);
  t.equal(pg.psql('SELECT version FROM mfagate_schema', 'racing').trim(), String(SCHEMA_VERSION));
});

t.test('the same tables, columns and indexes as a SQLite store at the same version', async (t) => {
  const s = Store.open(path.join(dir, 'schema.db'), { create: true });
  t.teardown(() => s.close());
  const sqliteTables = (s.db.prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name").pluck().all() as string[]);
  const pgTables = (await sql.query("SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'mfagate_schema' ORDER BY tablename")).rows.map((r) => r['tablename'] as string);
  t.same(pgTables, sqliteTables);
  for (const table of sqliteTables) {
    const sc = (s.db.prepare('SELECT name FROM pragma_table_info(?) ORDER BY name').pluck().all(table) as string[]);
    const pc = (await sql.query('SELECT column_name FROM information_schema.columns WHERE table_name = $1 ORDER BY column_name', [table])).rows.map((r) => r['column_name'] as string);
    t.same(pc, sc, `${table}: the same columns`);
  }
  const si = (s.db.prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND name NOT LIKE 'sqlite_%' ORDER BY name").pluck().all() as string[]);
  const pi = (await sql.query("SELECT indexname FROM pg_indexes WHERE schemaname = 'public' AND indexname NOT LIKE '%_pkey' AND indexname NOT LIKE '%_key' ORDER BY indexname")).rows.map((r) => r['indexname'] as string);
  t.same(pi, si, 'the same indexes');
  const st = (s.db.prepare("SELECT name FROM sqlite_master WHERE type = 'trigger' ORDER BY name").pluck().all() as string[]);
  const pt = (await sql.query('SELECT DISTINCT trigger_name FROM information_schema.triggers ORDER BY trigger_name')).rows.map((r) => r['trigger_name'] as string);
  t.same(pt, st, 'the same triggers feed the change feed');
  t.equal(MIGRATIONS.filter((m) => m.postgresql.trim() === '').length, 0, 'every migration has its PostgreSQL text');
});

t.test('the change feed: triggers write it, commits are in id order, each commit notifies', async (t) => {
  const heard: string[] = [];
  const listener = await sql.listen('mfagate_changes', () => heard.push('notified'), () => undefined);
  t.teardown(() => listener.close());
  const before = (await sql.query('SELECT coalesce(max(id), 0) AS id FROM changes')).rows[0]?.['id'] as number;
  await sql.query("INSERT INTO users (name, mfa_enabled, created_at, updated_at) VALUES ('feed-a', 1, 1, 1)");
  await sql.query("INSERT INTO users (name, created_at, updated_at) VALUES ('feed-plain', 1, 1)");
  await sql.query("UPDATE users SET updated_at = 2 WHERE name = 'feed-a'");
  const rows = (await sql.query('SELECT "user" FROM changes WHERE id > $1 ORDER BY id', [before])).rows;
  t.same(rows.map((r) => r['user']), ['feed-a'], 'a flagged user is a change; a plain one, or a column decisions do not read, is not');

  // Two writers: the second one's change waits for the first to commit, so its id is the later one.
  let firstId = 0;
  let secondDone = false;
  let release!: () => void;
  const held = new Promise<void>((r) => (release = r));
  const first = sql.begin(async (tx) => {
    const g = (await tx.query(`INSERT INTO grants ("user", block, ip, created_at, expires_at, method, source) VALUES ('feed-a', '203.0.113.1', '203.0.113.1', 1, $1, 'totp', 'api') RETURNING id`, [Date.now() + HOUR])).rows[0];
    t.ok(g);
    const c = (await tx.query('SELECT max(id) AS id FROM changes')).rows[0];
    firstId = c?.['id'] as number;
    await held;
  });
  await new Promise((r) => setTimeout(r, 200));
  const second = sql
    .query(`INSERT INTO grants ("user", block, ip, created_at, expires_at, method, source) VALUES ('feed-b', '203.0.113.2', '203.0.113.2', 1, $1, 'totp', 'api')`, [Date.now() + HOUR])
    .then(() => (secondDone = true));
  await new Promise((r) => setTimeout(r, 500));
  t.equal(secondDone, false, 'the second writer waits while the first holds its change uncommitted');
  release();
  await first;
  await second;
  const last = (await sql.query('SELECT id, "user" FROM changes ORDER BY id DESC LIMIT 1')).rows[0];
  t.same(last, { id: firstId + 1, user: 'feed-b' }, 'and its change takes the next id');
  for (let i = 0; i < 50 && heard.length < 4; i++) await new Promise((r) => setTimeout(r, 20));
  t.ok(heard.length >= 3, `a notification for each committing writer (${heard.length})`);
});

/** A SQLite store with something in every table. */
async function filledStore(file: string, now: number): Promise<Store> {
  const s = Store.open(file, { create: true });
  const r = s.records;
  for (let i = 0; i < 40; i++) {
    const user = `user${i}`;
    await r.addGrant({ user, ip: `203.0.113.${i}`, block: `203.0.113.${i}`, ttlMs: (i % 3) * HOUR, method: 'totp', source: 'api', reason: '', actor: 'test', now });
    if (i % 2 === 0) await r.setUserFlag(user, 'mfa_enabled', true, 'test', now);
    if (i % 7 === 0) await r.setUserFlag(user, 'exempt', true, 'test', now);
    if (i % 5 === 0) await r.revokeGrants({ user }, 'helpdesk', 'lost phone', now);
  }
  await r.addGrant({ user: 'user1', ip: '2001:db8:1:2::9', block: '2001:db8:1:2::/64', ttlMs: 10 * HOUR, method: 'email', source: 'web', reason: '', actor: 'test', now });
  await r.recordLogins([{ user: 'user3', ip: '198.51.100.1', protocol: 'imap', success: true, policyReject: false, at: now }]);
  await r.tx(async () => {
    await r.mfa.updateFactors('user2', { totp_secret: Buffer.from([1, 2, 3, 0, 255]), totp_confirmed_at: now, email: 'u2@example.net', email_verified_at: now }, now);
    await r.mfa.addCode('user2', 'login', 'u2@example.net', 'hash-of-code', '203.0.113.2', now, now + 600_000);
    await r.mfa.replaceBackupCodes('user2', ['b1', 'b2', 'b3'], now);
    await r.mfa.addFailure('user4', '203.0.113.4', '203.0.113.4', 'totp', now);
    await r.passcodes.insert({ user: 'user2', name: 'phone', selector: 'abcde', salt: Buffer.alloc(16, 7), hash: Buffer.alloc(32, 9), kdf: 'scrypt:n=4096,r=8,p=1', protocols: ['imap', 'smtp'], createdBy: 'web', expiresAt: null, now });
  });
  return s;
}

const BYTEA = (v: unknown) => (Buffer.isBuffer(v) ? `\\x${v.toString('hex')}` : v);

t.test('db copy: every row of a filled store, ids kept, nothing twice, the same decisions after', async (t) => {
  const now = Date.now();
  const file = path.join(dir, 'filled.db');
  const s = await filledStore(file, now);
  t.teardown(() => s.close());
  const config = path.join(dir, 'sqlite.toml');
  fs.writeFileSync(config, `[store]\npath = "${file}"\n`);
  // A database of its own, empty: db copy creates the schema.
  pg.psql('CREATE DATABASE copied OWNER mfagate;');
  const to = pg.url.replace(/\/mfagate$/, '/copied');
  const first = cli(['--config', config, 'db', 'copy', '--to', to, '--password-file', pg.passwordFile, '--tls', 'disable', '--json']);
  t.equal(first.code, 0, first.stderr);
  const report = JSON.parse(first.stdout) as { schema_version: number; tables: Record<string, { read: number; added: number; updated: number }> };
  t.equal(report.schema_version, SCHEMA_VERSION);
  const target = openPg({ url: to, passwordFile: pg.passwordFile, tls: 'disable', caFile: undefined });
  t.teardown(() => target.end());
  for (const [table, { read, added, updated }] of Object.entries(report.tables)) {
    const count = (s.db.prepare(`SELECT count(*) FROM ${table}`).pluck().get() as number);
    t.same({ read, added, updated }, { read: count, added: count, updated: 0 }, `${table}: all ${count} rows`);
    t.ok(count > 0, `${table}: the store had rows to copy`);
    // Row for row, column for column.
    const cols = (s.db.prepare('SELECT name FROM pragma_table_info(?) ORDER BY cid').pluck().all(table) as string[]);
    const order = cols.map((c) => `"${c}"`).join(', ');
    const mine = (s.db.prepare(`SELECT * FROM ${table} ORDER BY ${order}`).all() as Record<string, unknown>[]).map((r) => cols.map((c) => BYTEA(r[c])));
    const theirs = (await target.query(`SELECT * FROM ${table} ORDER BY ${order}`)).rows.map((r) => cols.map((c) => BYTEA(r[c])));
    t.same(theirs, mine, `${table}: the same rows`);
  }
  t.notOk('changes' in report.tables || 'daemon_stats' in report.tables, 'the change feed and the statistics are not copied');

  const second = cli(['--config', config, 'db', 'copy', '--to', to, '--password-file', pg.passwordFile, '--tls', 'disable']);
  t.equal(second.code, 0, second.stderr);
  t.match(second.stdout, /grants\s+(\d+) read,\s+0 added,\s+0 updated \(\1 already the same\)/, 'run twice, nothing is written');
  t.equal(Number(pg.psql('SELECT count(*) FROM grants', 'copied')), s.db.prepare('SELECT count(*) FROM grants').pluck().get(), 'nor duplicated');

  // Changed in SQLite after a copy (a revoke, a new grant): the next run carries the change, not only new rows.
  const live = (await s.records.listGrants({ user: 'user1', now })).find((g) => g.block === '2001:db8:1:2::/64');
  t.ok(live, 'user1 has a grant to revoke');
  await s.records.revokeGrants({ id: live?.id }, 'helpdesk', 'lost phone', now);
  await s.records.addGrant({ user: 'user8', ip: '192.0.2.8', block: '192.0.2.8', ttlMs: HOUR, method: 'totp', source: 'api', reason: '', actor: 'test', now });
  const third = cli(['--config', config, 'db', 'copy', '--to', to, '--password-file', pg.passwordFile, '--tls', 'disable', '--json']);
  t.equal(third.code, 0, third.stderr);
  const changed = (JSON.parse(third.stdout) as typeof report).tables;
  t.match(changed['grants'], { added: 1, updated: 1 }, 'the new grant added, the revoked one updated');
  t.match(changed['users'], { added: 0, updated: 0 });
  const revoked = (await target.query('SELECT revoked_by, revoke_reason FROM grants WHERE id = $1', [live?.id ?? 0])).rows[0];
  t.same(revoked, { revoked_by: 'helpdesk', revoke_reason: 'lost phone' }, 'the revoke reached PostgreSQL');

  // A grant made in PostgreSQL after the copy takes a new id, not one the copy brought.
  const maxId = (await target.query('SELECT max(id) AS id FROM grants')).rows[0];
  const fresh = (await target.query(`INSERT INTO grants ("user", block, ip, created_at, expires_at, method, source) VALUES ('user9', '192.0.2.1', '192.0.2.1', $1, $2, 'totp', 'api') RETURNING id`, [now, now + HOUR])).rows[0];
  t.ok((fresh?.['id'] as number) > (maxId?.['id'] as number), 'ids go on after the copied ones');
  await target.query('DELETE FROM grants WHERE id = $1', [fresh?.['id']]);

  // The decisions: a node's copy loaded from PostgreSQL answers every (user, block) as the SQLite store does.
  const copy = new LiveCopy();
  await loadPgCopy(target, copy, now);
  const blocks = ['2001:db8:1:2::/64', '198.51.100.1', ...Array.from({ length: 40 }, (_, i) => `203.0.113.${i}`)];
  let differ = 0;
  let granted = 0;
  for (let i = 0; i < 42; i++) {
    for (const b of blocks) {
      const a = copy.lookup(`user${i}`, b, now + 1);
      const e = s.lookup(`user${i}`, b, now + 1);
      const flags = (u: typeof a.user) => (u && (u.mfaEnabled || u.exempt) ? u : undefined);
      if (JSON.stringify([flags(a.user), a.grant]) !== JSON.stringify([flags(e.user), e.grant])) differ++;
      if (a.grant) granted++;
    }
  }
  t.equal(differ, 0, 'no (user, block) decides differently');
  t.ok(granted >= 20, `grants answered from PostgreSQL (${granted})`);
});

t.test('the configuration, and the commands on a PostgreSQL store', async (t) => {
  const withPassword = pgConfig().replace(/$/, '');
  fs.writeFileSync(withPassword, fs.readFileSync(withPassword, 'utf8').replace('postgresql://mfagate@', 'postgresql://mfagate:secret@'));
  const r = cli(['--config', withPassword, 'config', 'check']);
  t.equal(r.code, 2);
  t.match(r.stderr, /store\.url: the URL holds a password: put it in password_file/);
  t.notMatch(r.stderr + r.stdout, 'secret', 'and does not repeat it');
  const copyArg = cli(['db', 'copy', '--to', 'postgresql://mfagate:hunter2@127.0.0.1/mfagate']);
  t.equal(copyArg.code, 2);
  t.match(copyArg.stderr, /--to: the URL holds a password/);

  const bad = path.join(dir, 'bad.toml');
  fs.writeFileSync(bad, '[store]\nbackend = "postgresql"\n');
  t.match(cli(['--config', bad, 'config', 'check']).stderr, /store\.url: expected the database URL/);
  fs.writeFileSync(bad, `[store]\nurl = "${pg.url}"\n`);
  t.match(cli(['--config', bad, 'config', 'check']).stderr, /store\.url: only for backend = "postgresql"/);

  const config = pgConfig();
  const check = cli(['--config', config, 'config', 'check']);
  t.equal(check.code, 0, check.stderr);
  t.match(check.stdout, `store:            PostgreSQL ${pg.url} (tls disable, password in ${pg.passwordFile})`);
  // The helpdesk commands work on the database itself (the store layer is the same on both backends).
  const add = cli(['--config', config, 'grants', 'add', '--user', 'cli-user', '--ip', '192.0.2.77', '--ttl', '1h', '--reason', 'ticket 7', '--json']);
  t.equal(add.code, 0, add.stderr);
  const added = JSON.parse(add.stdout) as { id: number; extended: boolean };
  t.equal(added.extended, false);
  t.equal(pg.psql(`SELECT "user" || ' ' || block || ' ' || reason FROM grants WHERE id = ${Number(added.id)}`, 'mfagate').trim(), 'cli-user 192.0.2.77 ticket 7', 'the grant is in PostgreSQL');
  const list = cli(['--config', config, 'grants', 'list', '--user', 'cli-user', '--json']);
  t.equal(list.code, 0, list.stderr);
  t.match(JSON.parse(list.stdout), [{ id: added.id }], 'and listed from it');
  const revoke = cli(['--config', config, 'grants', 'revoke', '--id', String(added.id), '--reason', 'done']);
  t.equal(revoke.code, 0, revoke.stderr);
  t.equal(pg.psql(`SELECT revoke_reason FROM grants WHERE id = ${Number(added.id)}`, 'mfagate').trim(), 'done');
  // db copy reads a SQLite store: with PostgreSQL configured there is none to copy from.
  const copy = cli(['--config', config, 'db', 'copy', '--to', pg.url, '--password-file', pg.passwordFile, '--tls', 'disable']);
  t.equal(copy.code, 2);
  t.match(copy.stderr, /db copy works on a SQLite store \(\[store\] backend is "postgresql"\)/);
});

t.test('a database that cannot be reached: db migrate says which and why, and exits 1', async (t) => {
  const file = path.join(dir, 'unreachable.toml');
  fs.writeFileSync(file, `[store]\nbackend = "postgresql"\nurl = "postgresql://mfagate@127.0.0.1:1/mfagate"\ntls = "disable"\n`);
  const r = cli(['--config', file, 'db', 'migrate']);
  t.equal(r.code, 1);
  t.match(r.stderr, /PostgreSQL at postgresql:\/\/mfagate@127\.0\.0\.1:1\/mfagate: .*(ECONNREFUSED|connect)/);
  // So do the other commands and the daemon, which now use the database.
  const list = cli(['--config', file, 'grants', 'list']);
  t.equal(list.code, 1);
  t.match(list.stderr, /PostgreSQL at postgresql:\/\/mfagate@127\.0\.0\.1:1\/mfagate: .*(ECONNREFUSED|connect)/);
  const serve = cli(['--config', file, 'serve']);
  t.equal(serve.code, 1);
  t.match(serve.stderr, /cannot start: PostgreSQL at postgresql:\/\/mfagate@127\.0\.0\.1:1\/mfagate: .*(ECONNREFUSED|connect)/);
  // An unused SQLite file is never made for a PostgreSQL configuration.
  t.notOk(fs.existsSync(path.join(dir, 'var')), 'no SQLite file appeared');
});

t.test('TLS: verify-full with the site\'s CA connects; another CA, or no TLS, is refused; require encrypts only', async (t) => {
  const tls = await startPostgresTls();
  t.teardown(() => tls.destroy());
  const attempt = async (mode: 'disable' | 'require' | 'verify-full', caFile?: string) => {
    const db = openPg({ url: tls.url, passwordFile: tls.passwordFile, tls: mode, caFile });
    try {
      const r = (await db.query('SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()')).rows[0];
      return r?.['ssl'] === true ? 'tls' : 'plain';
    } catch (e) {
      return `refused: ${(e as Error).message}`;
    } finally {
      await db.end();
    }
  };
  t.equal(await attempt('verify-full', tls.caFile), 'tls', 'verify-full with the CA that signed the certificate');
  t.match(await attempt('verify-full', tls.otherCaFile), /^refused: .*(self[- ]signed|unable to verify|certificate)/i, 'verify-full with another CA: refused');
  t.match(await attempt('verify-full'), /^refused: /, 'verify-full with the system CAs (which did not sign it): refused');
  t.equal(await attempt('require'), 'tls', 'require: encrypted, whatever the certificate');
  t.match(await attempt('disable'), /^refused: .*(no pg_hba\.conf entry|SSL off|encryption)/i, 'disable: the server wants TLS, so it refuses');
});
