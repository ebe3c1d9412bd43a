// The store: migrations, grants and their history, purge, and durability under kill -9 mid-write.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import Database from 'better-sqlite3';
import t from 'tap';
import { SCHEMA_VERSION } from '../../store/migrations.js';
import { Store, StoreError } from '../../store/store.js';
import { ROOT, tempDir } from '../helpers/daemon.js';

const dir = tempDir('mfagate-store-');
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
const HOUR = 3_600_000;

const grant = (user: string, ip: string, now: number, ttlMs = HOUR) => ({ user, ip, block: ip, ttlMs, method: 'helpdesk', source: 'cli', reason: '', actor: 'test', now });

t.test('a new file is created at the current schema, in WAL mode', async (t) => {
  const file = path.join(dir, 'new/sub/m.db');
  const s = Store.open(file, { create: true });
  t.equal(s.schemaVersion, SCHEMA_VERSION);
  t.equal(s.db.pragma('journal_mode', { simple: true }), 'wal');
  s.close();
  t.throws(() => Store.open(path.join(dir, 'none.db'), { create: false }), StoreError);
  const future = path.join(dir, 'future.db');
  const db = new Database(future);
  db.pragma('user_version = 99');
  db.close();
  t.throws(() => Store.open(future, { create: true }), /schema version 99, newer than this mfagate/);
});

t.test('grants: add, extend, per-block lookup, revoke with who and why, audit', async (t) => {
  const s = Store.open(path.join(dir, 'g.db'), { create: true });
  t.teardown(() => s.close());
  const now = Date.now();
  const a = s.addGrant(grant('alice', '203.0.113.7', now));
  t.equal(a.extended, false);
  t.ok(s.getUser('alice'), 'the user now exists');
  t.same(s.activeGrant('alice', '203.0.113.7', now + 1), { id: a.grant.id, expiresAt: now + HOUR });
  t.equal(s.activeGrant('alice', '203.0.113.8', now), undefined);
  t.equal(s.activeGrant('bob', '203.0.113.7', now), undefined);
  t.equal(s.activeGrant('alice', '203.0.113.7', now + HOUR), undefined, 'expired at expires_at');
  const b = s.addGrant(grant('alice', '203.0.113.7', now + 1000, 2 * HOUR));
  t.equal(b.extended, true);
  t.equal(b.grant.id, a.grant.id, 'the same grant, extended');
  t.equal(b.grant.expiresAt, now + 1000 + 2 * HOUR);
  const c = s.addGrant(grant('alice', '203.0.113.7', now + 2000, 60_000));
  t.equal(c.grant.expiresAt, now + 1000 + 2 * HOUR, 'a shorter ttl never shortens a grant');
  const revoked = s.revokeGrants({ user: 'alice' }, 'cli:op', 'lost phone', now + 3000);
  t.equal(revoked.length, 1);
  t.match(s.grantById(a.grant.id), { revokedAt: now + 3000, revokedBy: 'cli:op', revokeReason: 'lost phone' });
  t.equal(s.activeGrant('alice', '203.0.113.7', now + 4000), undefined);
  t.same(s.revokeGrants({ id: a.grant.id }, 'cli:op', '', now + 5000), [], 'revoking twice changes nothing');
  t.same(s.auditOf('alice').map((r) => r.action).reverse(), ['grant-add', 'grant-extend', 'grant-extend', 'grant-revoke']);
});

t.test('purge deletes old grants and keeps their history in the audit log', async (t) => {
  const s = Store.open(path.join(dir, 'p.db'), { create: true });
  t.teardown(() => s.close());
  const now = Date.now();
  const old = s.addGrant(grant('carol', '198.51.100.1', now - 40 * 24 * HOUR)).grant;
  const recent = s.addGrant(grant('carol', '198.51.100.2', now - 2 * HOUR)).grant;
  const live = s.addGrant(grant('carol', '198.51.100.3', now)).grant;
  t.equal(s.purgeGrants(now - 30 * 24 * HOUR, now), 1);
  t.equal(s.grantById(old.id), undefined, 'the old grant is gone');
  t.ok(s.grantById(recent.id), 'a recently expired grant is still listed (grants list --all)');
  t.ok(s.grantById(live.id));
  const purge = s.auditOf('carol').find((r) => r.action === 'grant-purge');
  t.match(purge, { grantId: old.id, ip: '198.51.100.1', detail: { block: '198.51.100.1', method: 'helpdesk' } }, 'history kept');
  t.equal(s.purgeGrants(now - 30 * 24 * HOUR, now), 0);
});

t.test('grants survive kill -9 in the middle of a stream of writes', async (t) => {
  const file = path.join(dir, 'k.db');
  Store.open(file, { create: true }).close();
  const storeUrl = pathToFileURL(path.join(ROOT, 'dist/store/store.js')).href;
  // A writer that commits grants as fast as it can and reports each committed id.
  const script = `
    import { Store } from ${JSON.stringify(storeUrl)};
    const s = Store.open(${JSON.stringify(file)}, { create: true });
    for (let i = 0; ; i++) {
      const now = Date.now();
      const { grant } = s.addGrant({ user: 'u' + (i % 500), ip: '10.0.' + (i % 250) + '.' + (i % 200), block: 'b' + i, ttlMs: 3600000, method: 'helpdesk', source: 'test', reason: '', actor: 'test', now });
      process.stdout.write(grant.id + '\\n');
    }`;
  const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  await new Promise<void>((resolve) => {
    child.stdout.on('data', (b: Buffer) => {
      out += b.toString();
      if (out.split('\n').length > 300) resolve();
    });
    child.once('exit', () => resolve());
  });
  child.kill('SIGKILL');
  await new Promise((r) => child.once('exit', r));
  const committed = out.split('\n').filter((l) => /^\d+$/.test(l)).map(Number);
  t.ok(committed.length >= 300, `${committed.length} grants committed before the kill`);
  const s = Store.open(file, { create: true });
  t.teardown(() => s.close());
  t.equal(s.db.pragma('integrity_check', { simple: true }), 'ok', 'the file is intact');
  const missing = committed.filter((id) => !s.grantById(id));
  t.same(missing, [], 'every committed grant is there');
  t.ok(s.listGrants({ now: Date.now(), limit: 10 }).length > 0);
});
