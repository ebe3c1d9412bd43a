// The daemon's in-memory copy (store/live-copy.ts, Store.liveCopy): every decision it answers is the one the
// store's own statement gives, after any change made through this connection or another one (the CLI in
// another process), and it stays so across purged feeds, expiry and a store that cannot be read.
import fs from 'node:fs';
import path from 'node:path';
import Database from 'better-sqlite3';
import t from 'tap';
import { Store } from '../../store/store.js';
import { tempDir } from '../helpers/daemon.js';

const dir = tempDir('mfagate-copy-');
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
const HOUR = 3_600_000;
const T0 = Date.UTC(2026, 11, 1, 9);

const grant = (user: string, block: string, now: number, ttlMs = HOUR) => ({ user, ip: block, block, ttlMs, method: 'helpdesk', source: 'cli', reason: '', actor: 'test', now });

/** A small deterministic generator (the same run every time, so a failure can be replayed). */
function rng(seed: number) {
  let x = seed >>> 0;
  return (n: number) => {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
    return x % n;
  };
}

const USERS = ['alice', 'bob', 'carol', 'dave', 'erin', 'frank'];
const BLOCKS = ['203.0.113.1', '203.0.113.2', '198.51.100.7', '2001:db8:1:2::/64'];

/**
 * Every (user, block) answer of the copy and of the store's statement, at `now`. A user the store knows with
 * neither flag is written as an unknown one: the copy does not keep those, and mfaRequired (policy/decide.ts)
 * treats the two alike.
 */
function answers(copy: { lookup: Store['lookup'] }, now: number) {
  const out: string[] = [];
  for (const u of [...USERS, 'nobody']) {
    for (const b of BLOCKS) {
      const r = copy.lookup(u, b, now);
      const flags = r.user && (r.user.mfaEnabled || r.user.exempt) ? r.user : null;
      out.push(`${u} ${b} ${JSON.stringify(flags)} ${r.grant ? `${r.grant.id}:${r.grant.expiresAt}` : '-'}`);
    }
  }
  return out;
}

t.test('after each of 600 random changes, from this connection and another, the copy answers as the store does', async (t) => {
  const file = path.join(dir, 'random.db');
  const s = Store.open(file, { create: true });
  const other = Store.open(file); // the CLI: another connection, another process as far as SQLite knows
  t.teardown(() => {
    s.close();
    other.close();
  });
  let now = T0;
  const copy = s.liveCopy(() => now);
  const r = rng(20261201);
  const kinds = new Map<string, number>();
  for (let i = 0; i < 600; i++) {
    const by = r(2) === 0 ? s : other;
    const user = USERS[r(USERS.length)] as string;
    const block = BLOCKS[r(BLOCKS.length)] as string;
    const kind = ['grant', 'grant', 'revoke-one', 'revoke-user', 'enable', 'disable', 'exempt', 'unexempt', 'time', 'purge'][r(10)] as string;
    kinds.set(kind, (kinds.get(kind) ?? 0) + 1);
    switch (kind) {
      case 'grant':
        await by.records.addGrant(grant(user, block, now, (1 + r(4)) * HOUR));
        break;
      case 'revoke-one':
        await by.records.revokeGrants({ user, block }, 'test', '', now);
        break;
      case 'revoke-user':
        await by.records.revokeGrants({ user }, 'test', '', now);
        break;
      case 'enable':
      case 'disable':
        await by.records.setUserFlag(user, 'mfa_enabled', kind === 'enable', 'test', now);
        break;
      case 'exempt':
      case 'unexempt':
        await by.records.setUserFlag(user, 'exempt', kind === 'exempt', 'test', now);
        break;
      case 'time':
        // Expiry is checked when the copy answers: nothing tells it a grant ran out.
        now += r(3) * HOUR;
        break;
      case 'purge':
        await by.records.purgeGrants(now - HOUR, now);
        break;
    }
    t.same(answers(copy, now), answers(s, now), `step ${i} (${kind} by ${by === s ? 'this connection' : 'another'})`);
  }
  t.ok([...kinds.values()].every((n) => n > 20), `every kind of change was made (${JSON.stringify(Object.fromEntries(kinds))})`);
  t.ok(copy.size().grants > 0, 'the copy held grants along the way');
});

t.test('a revoke by another connection is seen by the very next lookup', async (t) => {
  const file = path.join(dir, 'next.db');
  const s = Store.open(file, { create: true });
  const cli = Store.open(file);
  t.teardown(() => {
    s.close();
    cli.close();
  });
  await s.records.setUserFlag('alice', 'mfa_enabled', true, 'test', T0);
  const g = (await s.records.addGrant(grant('alice', '203.0.113.1', T0))).grant;
  const copy = s.liveCopy(() => T0);
  t.same(copy.lookup('alice', '203.0.113.1', T0), { user: { mfaEnabled: true, exempt: false }, grant: { id: g.id, expiresAt: T0 + HOUR } });
  await cli.records.revokeGrants({ id: g.id }, 'helpdesk', 'lost phone', T0);
  t.equal(copy.lookup('alice', '203.0.113.1', T0).grant, undefined, 'the revoked grant is gone at once');
  await cli.records.setUserFlag('alice', 'exempt', true, 'test', T0);
  t.same(copy.lookup('alice', '203.0.113.1', T0).user, { mfaEnabled: true, exempt: true }, 'so is a flag set elsewhere');
});

t.test('loaded at start: flagged users and active grants only; expired ones are not kept', async (t) => {
  const s = Store.open(path.join(dir, 'load.db'), { create: true });
  t.teardown(() => s.close());
  for (let i = 0; i < 50; i++) await s.records.addGrant(grant(`u${i}`, '203.0.113.1', T0, (i % 2 === 0 ? 1 : 10) * HOUR));
  await s.records.setUserFlag('u1', 'mfa_enabled', true, 'test', T0);
  await s.records.setUserFlag('u2', 'exempt', true, 'test', T0);
  await s.records.recordLogins([{ user: 'plain', ip: '203.0.113.9', protocol: 'imap', success: true, policyReject: false, at: T0 }]);
  const later = T0 + 2 * HOUR;
  const copy = s.liveCopy(() => later);
  t.same(copy.size(), { flaggedUsers: 2, grants: 25, passcodes: 0 }, 'two flagged users; the 25 grants still active two hours on');
  t.same(answers(copy, later), answers(s, later));
  t.equal(copy.sweep(T0 + 11 * HOUR), 25, 'a sweep forgets the grants that ran out since');
  t.same(copy.size(), { flaggedUsers: 2, grants: 0, passcodes: 0 });
});

t.test('a copy further behind than the purged feed loads whole, and answers right', async (t) => {
  const file = path.join(dir, 'gap.db');
  const s = Store.open(file, { create: true });
  const cli = Store.open(file);
  t.teardown(() => {
    s.close();
    cli.close();
  });
  let reads = 0;
  const copy = s.liveCopy(() => T0);
  const reload = s.reloadCopy.bind(s);
  s.reloadCopy = (c, now) => {
    reads++;
    reload(c, now);
  };
  await cli.records.setUserFlag('bob', 'mfa_enabled', true, 'test', T0);
  await cli.records.addGrant(grant('bob', '198.51.100.7', T0));
  // Purge every change the copy has not read (as a daemon does after a day): it cannot replay them.
  t.ok((await cli.records.purgeChanges(Date.now() + 1000)) >= 2, 'the feed was purged');
  const r = copy.lookup('bob', '198.51.100.7', T0);
  t.equal(reads, 1, 'the copy loaded whole once');
  t.same(r.user, { mfaEnabled: true, exempt: false });
  t.ok(r.grant, 'with the grant it never saw as a change');
  await cli.records.revokeGrants({ user: 'bob' }, 'test', '', T0);
  t.equal(copy.lookup('bob', '198.51.100.7', T0).grant, undefined);
  t.equal(reads, 1, 'and then follows the feed again');
});

t.test('a store that cannot be read: the copy answers as it was, says so once, and catches up after', async (t) => {
  const file = path.join(dir, 'broken.db');
  const s = Store.open(file, { create: true });
  const cli = Store.open(file);
  t.teardown(() => {
    s.close();
    cli.close();
  });
  await s.records.setUserFlag('carol', 'mfa_enabled', true, 'test', T0);
  await s.records.addGrant(grant('carol', '203.0.113.2', T0));
  const said: string[] = [];
  const copy = s.liveCopy(() => T0, { failed: (e) => said.push(`failed: ${String(e)}`), recovered: () => said.push('recovered') });
  // Break this connection's reads of the feed (as an I/O error would).
  const realLatest = s.latestChange.bind(s);
  let broken = true;
  s.latestChange = () => {
    if (broken) throw new Error('disk I/O error');
    return realLatest();
  };
  await cli.records.revokeGrants({ user: 'carol' }, 'test', '', T0);
  for (let i = 0; i < 5; i++) t.ok(copy.lookup('carol', '203.0.113.2', T0).grant, `lookup ${i}: the copy as it was`);
  t.same(said, ['failed: Error: disk I/O error'], 'said once, not per lookup');
  broken = false;
  t.equal(copy.lookup('carol', '203.0.113.2', T0).grant, undefined, 'the revoke is seen once the store reads again');
  t.same(said.slice(1), ['recovered']);
});

t.test('the feed is written by the schema itself: a writer that knows nothing of it (plain SQL) feeds it too', async (t) => {
  const file = path.join(dir, 'sql.db');
  const s = Store.open(file, { create: true });
  t.teardown(() => s.close());
  await s.records.addGrant(grant('dave', '203.0.113.1', T0));
  const copy = s.liveCopy(() => T0);
  const db = new Database(file);
  db.prepare("UPDATE users SET mfa_enabled = 1 WHERE name = 'dave'").run();
  db.prepare("UPDATE grants SET revoked_at = ? WHERE user = 'dave'").run(T0);
  // Writes that decisions do not depend on add nothing to the feed.
  const before = s.latestChange();
  db.prepare("UPDATE users SET updated_at = 1 WHERE name = 'dave'").run();
  db.prepare("UPDATE grants SET method = 'x' WHERE user = 'dave'").run();
  db.close();
  t.equal(s.latestChange(), before, 'a column decisions do not read changes nothing');
  t.same(copy.lookup('dave', '203.0.113.1', T0), { user: { mfaEnabled: true, exempt: false }, grant: undefined });
});

t.test('passcodes: made, revoked and purged by another connection are seen by the very next check', async (t) => {
  const file = path.join(dir, 'passcodes.db');
  const s = Store.open(file, { create: true });
  const cli = Store.open(file);
  t.teardown(() => {
    s.close();
    cli.close();
  });
  const row = (selector: string, user = 'erin') => ({ user, name: 'phone', selector, salt: Buffer.alloc(16, 1), hash: Buffer.alloc(32, 2), kdf: 'scrypt:n=4096,r=8,p=1', protocols: ['imap'], createdBy: 'web', expiresAt: null, now: T0 });
  const kept = await s.records.passcodes.insert(row('aaaaa'));
  const copy = s.liveCopy(() => T0);
  t.match(copy.bySelector('aaaaa'), { id: kept, user: 'erin', revokedAt: null }, 'loaded at start');
  const made = await cli.records.passcodes.insert(row('bbbbb'));
  t.match(copy.byId(made), { selector: 'bbbbb', protocols: ['imap'] }, 'one made elsewhere is there at the next read');
  await cli.records.passcodes.revoke(made, 'cli:helpdesk', T0);
  t.match(copy.bySelector('bbbbb'), { id: made, revokedBy: 'cli:helpdesk' }, 'revoked: still known, so a check can say why it fails');
  t.same(copy.size().passcodes, 2);
  await cli.records.tx(() => cli.records.passcodes.purge(T0 + 1));
  t.equal(copy.byId(made), undefined, 'purged: gone');
  t.ok(copy.byId(kept), 'the other one stays');
  // Uses are not changes: recording one costs the copy nothing.
  const before = s.latestChange();
  await cli.records.tx(() => cli.records.passcodes.recordUses([{ id: kept, at: T0, ip: '203.0.113.1', protocol: 'imap' }]));
  t.equal(s.latestChange(), before);
});
