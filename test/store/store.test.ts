// The store's records (store/records.ts, mfa-store.ts, passcode-store.ts), the same test bodies on both
// backends: a SQLite file, and a real PostgreSQL 15 started here (each test on a database of its own):
//   - grants and their history, revoke and purge, the listing's order, logins, users and flags, statistics;
//   - the values: times (BIGINT in PostgreSQL) come back as numbers, flags as 0/1, bytes as Buffers;
//   - records.tx: a thrown error rolls back all of it; concurrent writers take turns (no lost update, no
//     deadlock); a statement outside a transaction neither joins it nor sees what it has not committed.
// Then what is SQLite's own: the file (schema, WAL), the decision's synchronous statements, and durability
// under kill -9 mid-write.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import Database from 'better-sqlite3';
import t, { type Test } from 'tap';
import { MIGRATIONS, SCHEMA_VERSION } from '../../store/migrations.js';
import { openPgStore } from '../../store/open.js';
import type { Records } from '../../store/records.js';
import { num } from '../../store/sql.js';
import { Store, StoreError } from '../../store/store.js';
import { StoreUnavailableError } from '../../store/sqlite-file.js';
import { ROOT, tempDir } from '../helpers/daemon.js';
import { type PgServer, startPostgres } from '../helpers/postgres.js';

const dir = tempDir('mfagate-store-');
const HOUR = 3_600_000;
const DAY = 24 * HOUR;

let pg: PgServer | undefined;
// PostgreSQL missing (or failing to start) fails this file: startPostgres throws.
t.before(async () => {
  pg = await startPostgres();
});
t.teardown(() => {
  pg?.destroy();
  fs.rmSync(dir, { recursive: true, force: true });
});

const grant = (user: string, ip: string, now: number, ttlMs = HOUR) => ({ user, ip, block: ip, ttlMs, method: 'helpdesk', source: 'cli', reason: '', actor: 'test', now });
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface Opened {
  records: Records;
  close(): Promise<void>;
}

interface Backend {
  name: string;
  /** A new, empty store at the current schema. */
  open(): Promise<Opened>;
}

let serial = 0;
const backends: Backend[] = [
  {
    name: 'SQLite',
    open: async () => {
      const s = Store.open(path.join(dir, `records-${++serial}.db`), { create: true });
      return { records: s.records, close: async () => s.close() };
    },
  },
  {
    name: 'PostgreSQL',
    open: async () => {
      if (!pg) throw new Error('PostgreSQL was not started');
      const name = `records_${++serial}`;
      pg.psql(`CREATE DATABASE ${name} OWNER mfagate;`);
      const o = await openPgStore({ url: pg.url.replace(/\/mfagate$/, `/${name}`), passwordFile: pg.passwordFile, tls: 'disable', caFile: undefined }, { migrate: true, create: true });
      return { records: o.records, close: () => o.close() };
    },
  },
];

/** A fresh store for one test, closed when it ends. */
async function fresh(t: Test, b: Backend): Promise<Records> {
  const o = await b.open();
  t.teardown(() => o.close());
  return o.records;
}

/** Rejects when `p` has not settled within `ms` (a deadlock must fail the test, not hang it). */
function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`not within ${ms} ms: ${what}`)), ms)));
  return Promise.race([p, late]).finally(() => clearTimeout(timer));
}

for (const b of backends) {
  t.test(b.name, async (t) => {
    t.test("a purged grant's or passcode's number is never given to another (the audit log names them for good)", async (t) => {
      const s = await fresh(t, b);
      const now = Date.now();
      const kept = await s.addGrant(grant('alice', '203.0.113.7', now));
      const purged = await s.addGrant(grant('alice', '203.0.113.8', now));
      await s.revokeGrants({ id: purged.grant.id }, 'cli:op', '', now);
      t.equal(await s.purgeGrants(now + 1, now + 1), 1, 'the highest-numbered grant is purged');
      t.equal(await s.grantById(purged.grant.id), undefined);
      const next = await s.addGrant(grant('alice', '203.0.113.9', now + 2));
      t.ok(next.grant.id > purged.grant.id, `the next grant is ${next.grant.id}, after the purged ${purged.grant.id} (kept: ${kept.grant.id})`);
      const p = (id: string) => ({ user: 'alice', name: id, selector: `sel${id}`, salt: Buffer.alloc(16), hash: Buffer.alloc(32), kdf: 'scrypt:n=4096,r=8,p=1', protocols: ['imap'], createdBy: 'test', expiresAt: null, now });
      await s.passcodes.insert(p('a'));
      const last = await s.passcodes.insert(p('b'));
      await s.passcodes.revoke(last, 'test', now);
      t.equal(await s.passcodes.purge(now + 1), 1, 'the highest-numbered passcode is purged');
      t.ok((await s.passcodes.insert(p('c'))) > last, 'the next passcode gets a new number');
    });

    t.test('grants: add, extend, per-block lookup, revoke with who and why, audit', async (t) => {
      const s = await fresh(t, b);
      const now = Date.now();
      const a = await s.addGrant(grant('alice', '203.0.113.7', now));
      t.equal(a.extended, false);
      t.ok(await s.getUser('alice'), 'the user now exists');
      t.strictSame(await s.activeGrant('alice', '203.0.113.7', now + 1), { id: a.grant.id, expiresAt: now + HOUR });
      t.strictSame(await s.lookup('alice', '203.0.113.7', now + 1), { user: { mfaEnabled: false, exempt: false }, grant: { id: a.grant.id, expiresAt: now + HOUR } });
      t.equal(await s.activeGrant('alice', '203.0.113.8', now), undefined);
      t.equal(await s.activeGrant('bob', '203.0.113.7', now), undefined);
      t.strictSame(await s.lookup('bob', '203.0.113.7', now), { user: undefined, grant: undefined });
      t.equal(await s.activeGrant('alice', '203.0.113.7', now + HOUR), undefined, 'expired at expires_at');
      const b2 = await s.addGrant(grant('alice', '203.0.113.7', now + 1000, 2 * HOUR));
      t.equal(b2.extended, true);
      t.equal(b2.grant.id, a.grant.id, 'the same grant, extended');
      t.equal(b2.grant.expiresAt, now + 1000 + 2 * HOUR);
      const c = await s.addGrant(grant('alice', '203.0.113.7', now + 2000, 60_000));
      t.equal(c.extended, true);
      t.equal(c.grant.expiresAt, now + 1000 + 2 * HOUR, 'a shorter ttl never shortens a grant');
      const revoked = await s.revokeGrants({ user: 'alice' }, 'cli:op', 'lost phone', now + 3000);
      t.equal(revoked.length, 1);
      t.match(await s.grantById(a.grant.id), { revokedAt: now + 3000, revokedBy: 'cli:op', revokeReason: 'lost phone' });
      t.equal(await s.activeGrant('alice', '203.0.113.7', now + 4000), undefined);
      t.strictSame(await s.revokeGrants({ id: a.grant.id }, 'cli:op', '', now + 5000), [], 'revoking twice changes nothing');
      t.strictSame((await s.auditOf('alice')).map((r) => r.action).reverse(), ['grant-add', 'grant-extend', 'grant-extend', 'grant-revoke']);
      const added = (await s.auditOf('alice')).find((r) => r.action === 'grant-add');
      t.strictSame(
        added && { ...added, id: 0 },
        {
          id: 0,
          at: now,
          actor: 'test',
          action: 'grant-add',
          user: 'alice',
          ip: '203.0.113.7',
          grantId: a.grant.id,
          detail: { block: '203.0.113.7', expires_at: new Date(now + HOUR).toISOString(), method: 'helpdesk', source: 'cli' },
        },
        'the audit row, whole',
      );
      // A new grant after the revoke is a new one, not the revoked one extended.
      const d = await s.addGrant(grant('alice', '203.0.113.7', now + 6000));
      t.equal(d.extended, false);
      t.not(d.grant.id, a.grant.id);
    });

    t.test('values: times are numbers (BIGINT in PostgreSQL, exact to 2^53), flags 0/1, bytes Buffers', async (t) => {
      const s = await fresh(t, b);
      const now = Date.now();
      t.ok(now > 2 ** 32, 'a time does not fit in 32 bits');
      // Late enough that only a 64-bit column holds it, still a safe integer.
      const far = 2 ** 52 + 12_345;
      const { grant: g } = await s.addGrant(grant('vera', '192.0.2.1', now, far - now));
      t.strictSame(
        { ...g },
        {
          id: g.id,
          user: 'vera',
          block: '192.0.2.1',
          ip: '192.0.2.1',
          createdAt: now,
          expiresAt: far,
          method: 'helpdesk',
          source: 'cli',
          reason: '',
          revokedAt: null,
          revokedBy: null,
          revokeReason: null,
        },
      );
      t.type(g.id, 'number');
      t.strictSame(await s.grantById(g.id), g, 'read again: the same values, the same types');
      t.strictSame(await s.activeGrant('vera', '192.0.2.1', now), { id: g.id, expiresAt: far });
      const raw = await s.sql.get('SELECT id, created_at, expires_at, revoked_at FROM grants WHERE id = ?', [g.id]);
      t.strictSame(raw, { id: g.id, created_at: now, expires_at: far, revoked_at: null }, 'the driver itself gives numbers, not strings');

      await s.setUserFlag('vera', 'mfa_enabled', true, 'test', now);
      t.strictSame(await s.sql.get('SELECT mfa_enabled, exempt, created_at, locked_until FROM users WHERE name = ?', ['vera']), { mfa_enabled: 1, exempt: 0, created_at: now, locked_until: null }, 'flags are the integers 0 and 1');
      t.strictSame(await s.getUser('vera'), { name: 'vera', mfaEnabled: true, exempt: false, createdAt: now, updatedAt: now });
      t.strictSame(await s.sql.get('SELECT count(*) AS n FROM users'), { n: 1 }, 'count(*) (BIGINT in PostgreSQL) is a number');
      t.strictSame(await s.counts(now), { users: 1, mfaEnabled: 1, exempt: 0, activeGrants: 1 });

      const bytes = Buffer.from([0, 1, 2, 127, 128, 254, 255]);
      const f = await s.mfa.updateFactors('vera', { totp_secret: bytes, totp_confirmed_at: now, totp_last_step: 2 ** 40 }, now);
      t.ok(Buffer.isBuffer(f.totpSecret), 'bytes come back as a Buffer');
      t.ok(f.totpSecret?.equals(bytes), 'every byte as written');
      t.strictSame({ at: f.totpConfirmedAt, step: f.totpLastStep, pending: f.totpPending }, { at: now, step: 2 ** 40, pending: null });
      const pc = await s.passcodes.insert({ user: 'vera', name: 'phone', selector: 'vvvvv', salt: bytes, hash: Buffer.alloc(32, 9), kdf: 'scrypt:n=4096,r=8,p=1', protocols: ['imap'], createdBy: 'web', expiresAt: far, now });
      t.type(pc, 'number');
      const p = await s.passcodes.byId(pc);
      t.strictSame(p && { id: p.id, createdAt: p.createdAt, expiresAt: p.expiresAt, revokedAt: p.revokedAt, salt: p.salt.equals(bytes) }, { id: pc, createdAt: now, expiresAt: far, revokedAt: null, salt: true });
    });

    t.test('users: setUserFlag says whether it changed and audits each change; ensureUser leaves a known user alone', async (t) => {
      const s = await fresh(t, b);
      const now = Date.now();
      t.equal(await s.getUser('erin'), undefined);
      t.equal(await s.setUserFlag('erin', 'mfa_enabled', true, 'cli:op', now, 'policy'), true, 'a change');
      t.equal(await s.setUserFlag('erin', 'mfa_enabled', true, 'cli:op', now + 1), false, 'the same value again: no change');
      t.equal(await s.setUserFlag('erin', 'exempt', true, 'cli:op', now + 2), true);
      t.equal(await s.setUserFlag('erin', 'mfa_enabled', false, 'cli:op', now + 3), true);
      t.equal(await s.setUserFlag('frank', 'exempt', false, 'cli:op', now), false, 'an unset flag stays unset (the user becomes known)');
      t.strictSame(await s.getUser('erin'), { name: 'erin', mfaEnabled: false, exempt: true, createdAt: now, updatedAt: now + 3 });
      await s.ensureUser('erin', now + 99);
      t.strictSame(await s.getUser('erin'), { name: 'erin', mfaEnabled: false, exempt: true, createdAt: now, updatedAt: now + 3 }, 'ensureUser changes nothing of a known user');
      t.strictSame((await s.listUsers()).map((u) => u.name), ['erin', 'frank']);
      t.strictSame(
        (await s.auditOf('erin')).map((r) => [r.action, r.detail]).reverse(),
        [
          ['user-enable', { reason: 'policy' }],
          ['user-exempt', {}],
          ['user-disable', {}],
        ],
      );
      t.strictSame(await s.auditOf('frank'), []);
      t.strictSame(await s.counts(now), { users: 2, mfaEnabled: 0, exempt: 1, activeGrants: 0 });
    });

    t.test('listGrants: newest first (id breaks ties); by user, block, all, limit', async (t) => {
      const s = await fresh(t, b);
      const now = Date.now();
      const ids: Record<string, number> = {};
      // Three made at the same time, in id order; one older; one expired; one revoked.
      for (const [k, user, ip, at, ttl] of [
        ['a1', 'amy', '192.0.2.1', now, HOUR],
        ['a2', 'amy', '192.0.2.2', now, HOUR],
        ['b1', 'ben', '192.0.2.1', now, HOUR],
        ['old', 'amy', '192.0.2.3', now - HOUR, 2 * HOUR],
        ['gone', 'ben', '192.0.2.2', now - 2 * HOUR, HOUR],
        ['rev', 'ben', '192.0.2.3', now - 3 * HOUR, 10 * HOUR],
      ] as const) {
        ids[k] = (await s.addGrant(grant(user, ip, at, ttl))).grant.id;
      }
      await s.revokeGrants({ id: ids['rev'] as number }, 'test', '', now);
      const names = (gs: { id: number }[]) => gs.map((g) => Object.keys(ids).find((k) => ids[k] === g.id));
      t.strictSame(names(await s.listGrants({ now })), ['b1', 'a2', 'a1', 'old'], 'active ones: newest first, the later id first among equals');
      t.strictSame(names(await s.listGrants({ now, all: true })), ['b1', 'a2', 'a1', 'old', 'gone', 'rev'], 'with --all, expired and revoked ones too');
      t.strictSame(names(await s.listGrants({ now, user: 'amy' })), ['a2', 'a1', 'old']);
      t.strictSame(names(await s.listGrants({ now, block: '192.0.2.1' })), ['b1', 'a1']);
      t.strictSame(names(await s.listGrants({ now, user: 'ben', block: '192.0.2.2', all: true })), ['gone']);
      t.strictSame(names(await s.listGrants({ now, user: 'ben', block: '192.0.2.2' })), []);
      t.strictSame(names(await s.listGrants({ now, limit: 2 })), ['b1', 'a2']);
      t.strictSame(names(await s.listGrants({ now, all: true, user: 'ben', limit: 1 })), ['b1']);
    });

    t.test('revokeGrants: by id, user, block or both; only active grants; each revoke audited', async (t) => {
      const s = await fresh(t, b);
      const now = Date.now();
      const mk = async (user: string, ip: string, at = now, ttl = HOUR) => (await s.addGrant(grant(user, ip, at, ttl))).grant;
      const c1 = await mk('cleo', '192.0.2.1');
      const c2 = await mk('cleo', '192.0.2.2');
      const c3 = await mk('cleo', '192.0.2.3');
      const d1 = await mk('dan', '192.0.2.1');
      const d2 = await mk('dan', '192.0.2.2');
      const expired = await mk('dan', '192.0.2.9', now - 2 * HOUR);
      const ids = (gs: { id: number }[]) => gs.map((g) => g.id).sort((x, y) => x - y);

      t.strictSame(await s.revokeGrants({ id: expired.id }, 'op', 'x', now), [], 'an expired grant is not revoked');
      t.equal((await s.grantById(expired.id))?.revokedAt, null, 'and stays as it was');
      t.strictSame(await s.revokeGrants({ id: 999_999 }, 'op', 'x', now), [], 'an id that does not exist');

      const one = await s.revokeGrants({ id: c1.id }, 'cli:op', 'lost phone', now + 1);
      t.strictSame(one, [{ ...c1, revokedAt: now + 1, revokedBy: 'cli:op', revokeReason: 'lost phone' }], 'by id: the grant as revoked');
      t.strictSame(await s.grantById(c1.id), one[0], 'as stored');

      const both = await s.revokeGrants({ user: 'dan', block: '192.0.2.2' }, 'op', '', now + 2);
      t.strictSame(ids(both), [d2.id], 'by user and block');
      const block = await s.revokeGrants({ block: '192.0.2.1' }, 'op', '', now + 3);
      t.strictSame(ids(block), [d1.id], 'by block: every user\'s active grant there (c1 was revoked already)');
      const user = await s.revokeGrants({ user: 'cleo' }, 'op', 'left', now + 4);
      t.strictSame(ids(user), ids([c2, c3]), 'by user: the rest of hers');
      t.strictSame(await s.revokeGrants({ user: 'cleo' }, 'op', '', now + 5), [], 'nothing left to revoke');
      t.strictSame(await s.listGrants({ now: now + 5 }), [], 'no active grant left');
      t.equal((await s.grantById(c1.id))?.revokedAt, now + 1, 'a second revoke does not move the first one\'s time');
      t.strictSame(await s.revokeGrants({ user: 'dan' }, 'op', '', now + 6), [], 'the expired grant is never revoked');

      const audit = (await s.auditOf('cleo')).filter((r) => r.action === 'grant-revoke').reverse();
      t.strictSame(
        audit.map((r) => [r.grantId, r.actor, r.ip, r.detail]),
        [
          [c1.id, 'cli:op', '192.0.2.1', { block: '192.0.2.1', reason: 'lost phone' }],
          // Revoked in the listing's order, newest first (the later id among equal times).
          ...[c3, c2].map((g) => [g.id, 'op', g.ip, { block: g.block, reason: 'left' }]),
        ],
        'in the order revoked',
      );
      t.equal((await s.auditOf('dan')).filter((r) => r.action === 'grant-revoke').length, 2);
    });

    t.test('purge deletes old grants and keeps their history in the audit log', async (t) => {
      const s = await fresh(t, b);
      const now = Date.now();
      const old = (await s.addGrant(grant('carol', '198.51.100.1', now - 40 * DAY))).grant;
      const recent = (await s.addGrant(grant('carol', '198.51.100.2', now - 2 * HOUR))).grant;
      const live = (await s.addGrant(grant('carol', '198.51.100.3', now))).grant;
      t.equal(await s.purgeGrants(now - 30 * DAY, now), 1);
      t.equal(await s.grantById(old.id), undefined, 'the old grant is gone');
      t.ok(await s.grantById(recent.id), 'a recently expired grant is still listed (grants list --all)');
      t.ok(await s.grantById(live.id));
      const purge = (await s.auditOf('carol')).find((r) => r.action === 'grant-purge');
      t.match(purge, { grantId: old.id, ip: '198.51.100.1', detail: { block: '198.51.100.1', method: 'helpdesk' } }, 'history kept');
      t.strictSame(purge?.detail, {
        block: '198.51.100.1',
        created_at: new Date(now - 40 * DAY).toISOString(),
        expires_at: new Date(now - 40 * DAY + HOUR).toISOString(),
        method: 'helpdesk',
        source: 'cli',
        revoked_at: null,
        revoked_by: null,
      });
      t.equal(await s.purgeGrants(now - 30 * DAY, now), 0);
    });

    t.test('purge: revoked long ago counts as expired; at most a batch at a time; live grants never', async (t) => {
      const s = await fresh(t, b);
      const now = Date.now();
      const longAgo = now - 40 * DAY;
      const revoked = (await s.addGrant(grant('gus', '198.51.100.9', longAgo, 365 * DAY))).grant;
      await s.revokeGrants({ id: revoked.id }, 'op', 'stolen', longAgo + 1);
      for (let i = 0; i < 5; i++) await s.addGrant(grant(`old${i}`, `198.51.100.${10 + i}`, longAgo));
      const live = (await s.addGrant(grant('gus', '198.51.100.20', now, 365 * DAY))).grant;
      const before = now - 30 * DAY;
      t.equal(await s.purgeGrants(before, now, 4), 4, 'a batch of 4');
      t.equal(await s.purgeGrants(before, now, 4), 2, 'the rest');
      t.equal(await s.purgeGrants(before, now, 4), 0);
      t.equal(await s.grantById(revoked.id), undefined, 'the grant revoked long ago (its expiry still a year off) is purged');
      t.ok(await s.grantById(live.id), 'the live grant stays');
      t.strictSame((await s.listGrants({ now, all: true })).map((g) => g.id), [live.id]);
      const p = (await s.auditOf('gus')).find((r) => r.action === 'grant-purge');
      t.match(p?.detail, { revoked_at: new Date(longAgo + 1).toISOString(), revoked_by: 'op' });
      t.equal((await s.auditOf('old3')).filter((r) => r.action === 'grant-purge').length, 1, 'one audit row a purged grant');
    });

    t.test('recordLogins: a success makes the user known; failures of unknown users are dropped; each kind\'s latest kept', async (t) => {
      const s = await fresh(t, b);
      const now = Date.now();
      const login = (user: string, ip: string, at: number, success: boolean, protocol = 'imap', policyReject = false) => ({ user, ip, protocol, success, policyReject, at });
      await s.recordLogins([]);
      await s.recordLogins([login('guess', '192.0.2.66', now, false)]);
      t.equal(await s.getUser('guess'), undefined, 'a failure of a name the store does not know makes nothing');
      t.strictSame(await s.loginsOf('guess'), []);

      await s.recordLogins([login('hana', '192.0.2.1', now, true), login('hana', '192.0.2.1', now + 10, false, 'pop3', true)]);
      t.strictSame(await s.getUser('hana'), { name: 'hana', mfaEnabled: false, exempt: false, createdAt: now, updatedAt: now }, 'known from the success');
      t.strictSame(await s.loginsOf('hana'), [{ user: 'hana', ip: '192.0.2.1', protocol: 'pop3', lastSuccessAt: now, lastFailureAt: now + 10, lastPolicyRejectAt: now + 10 }], 'the failure after it, in the same batch, is kept');

      await s.recordLogins([login('hana', '192.0.2.1', now + 20, true, 'smtp')]);
      t.strictSame(await s.loginsOf('hana'), [{ user: 'hana', ip: '192.0.2.1', protocol: 'smtp', lastSuccessAt: now + 20, lastFailureAt: now + 10, lastPolicyRejectAt: now + 10 }], 'a success moves only its own time; the last protocol wins');

      await s.recordLogins([login('hana', '192.0.2.2', now + 30, false), login('hana', '192.0.2.3', now + 5, true), login('ivan', '192.0.2.1', now, false)]);
      t.strictSame(
        (await s.loginsOf('hana')).map((l) => [l.ip, l.lastSuccessAt, l.lastFailureAt, l.lastPolicyRejectAt]),
        [
          ['192.0.2.2', null, now + 30, null],
          ['192.0.2.1', now + 20, now + 10, now + 10],
          ['192.0.2.3', now + 5, null, null],
        ],
        'latest first, by the later of success and failure',
      );
      t.strictSame((await s.loginsOf('hana', 2)).map((l) => l.ip), ['192.0.2.2', '192.0.2.1'], 'limit');
      t.equal(await s.getUser('ivan'), undefined);
    });

    t.test('purgeChanges: deletes the change feed up to the newest change before, and notes how far', async (t) => {
      const s = await fresh(t, b);
      const now = Date.now();
      for (let i = 0; i < 3; i++) await s.addGrant(grant('jo', `192.0.2.${i}`, now));
      await s.setUserFlag('jo', 'mfa_enabled', true, 'test', now);
      const latest = num(await s.sql.get('SELECT max(id) AS id FROM changes'), 'id');
      t.ok(latest >= 4, `the writes fed the change feed (${latest})`);
      t.equal(await s.purgeChanges(Date.now() - DAY), 0, 'nothing written before a day ago');
      t.strictSame(await s.sql.get('SELECT upto FROM changes_purged WHERE id = 1'), { upto: 0 });
      const written = num(await s.sql.get('SELECT count(*) AS n FROM changes'), 'n');
      t.ok(written >= 4);
      t.equal(await s.purgeChanges(Date.now() + 1000), written, 'every change so far');
      t.strictSame(await s.sql.get('SELECT upto FROM changes_purged WHERE id = 1'), { upto: latest }, 'purged up to the newest');
      t.strictSame(await s.sql.get('SELECT count(*) AS n FROM changes'), { n: 0 });
      t.equal(await s.purgeChanges(Date.now() + 1000), 0, 'nothing more');
      await s.setUserFlag('jo', 'exempt', true, 'test', now);
      const next = num(await s.sql.get('SELECT max(id) AS id FROM changes'), 'id');
      t.ok(next > latest, 'ids go on past the purged ones');
      t.equal(await s.purgeChanges(Date.now() - DAY), 0);
      t.strictSame(await s.sql.get('SELECT upto FROM changes_purged WHERE id = 1'), { upto: latest }, 'never moved back');
    });

    t.test('daemon statistics: started, written only by the daemon that started, reset at the next start', async (t) => {
      const s = await fresh(t, b);
      const now = Date.now();
      t.equal(await s.daemonStats(), undefined);
      await s.daemonStarted(4242, now);
      t.strictSame(await s.daemonStats(), { pid: 4242, startedAt: now, updatedAt: now, stoppedAt: null, allowed: 0, refused: 0, logOnly: 0, badRequests: 0, copy: undefined });
      const copy = { currentAt: now + 5, flaggedUsers: 3, grants: 7, error: undefined };
      await s.writeDaemonStats(4242, now + 10, { allowed: 5, refused: 2, logOnly: 1, badRequests: 9 }, null, copy);
      t.strictSame(await s.daemonStats(), { pid: 4242, startedAt: now, updatedAt: now + 10, stoppedAt: null, allowed: 5, refused: 2, logOnly: 1, badRequests: 9, copy });
      await s.writeDaemonStats(1, now + 20, { allowed: 99, refused: 99, logOnly: 99, badRequests: 99 });
      t.match(await s.daemonStats(), { updatedAt: now + 10, allowed: 5 }, 'another pid writes nothing');
      await s.writeDaemonStats(4242, now + 30, { allowed: 6, refused: 2, logOnly: 1, badRequests: 9 }, now + 30, { ...copy, error: 'database down' });
      t.match(await s.daemonStats(), { stoppedAt: now + 30, allowed: 6, copy: { error: 'database down' } });
      await s.daemonStarted(5151, now + 40);
      t.strictSame(await s.daemonStats(), { pid: 5151, startedAt: now + 40, updatedAt: now + 40, stoppedAt: null, allowed: 0, refused: 0, logOnly: 0, badRequests: 0, copy: undefined });
    });

    t.test('second factors: factors, e-mailed codes, backup codes, failures and locks', async (t) => {
      const s = await fresh(t, b);
      const m = s.mfa;
      const now = Date.now();
      await s.ensureUser('kim', now);
      t.equal(await m.factors('kim'), undefined);
      t.equal(await m.holdsSealedSecrets(), false);
      const secret = Buffer.from('sealed-secret');
      await m.updateFactors('kim', { totp_pending: secret, totp_pending_at: now }, now);
      const f = await m.updateFactors('kim', { email: 'kim@example.net' }, now + 1);
      t.ok(f.totpPending?.equals(secret), 'an update keeps the columns it does not name');
      t.strictSame({ ...f, totpPending: null }, { user: 'kim', totpSecret: null, totpPending: null, totpPendingAt: now, totpConfirmedAt: null, totpLastStep: null, email: 'kim@example.net', emailVerifiedAt: null, emailPending: null });
      await m.updateFactors('kim', { totp_secret: secret, totp_pending: null, totp_pending_at: null, totp_confirmed_at: now + 2 }, now + 2);
      t.equal(await m.holdsSealedSecrets(), true);
      const sample = await m.sampleTotpSecret();
      t.equal(sample?.user, 'kim');
      t.ok(sample?.sealed.equals(secret));

      await m.addCode('kim', 'login', 'kim@example.net', 'h1', '192.0.2.1', now, now + 600_000);
      await m.addCode('kim', 'login', 'kim@example.net', 'h2', null, now + 1, now + 600_000);
      await m.addCode('kim', 'verify', 'new@example.net', 'h3', null, now + 2, now + 600_000);
      const code = await m.latestCode('kim', 'login', now + 3);
      t.match(code, { user: 'kim', purpose: 'login', codeHash: 'h2', createdAt: now + 1, expiresAt: now + 600_000 }, 'a newer code voids the older one');
      t.equal((await m.latestCode('kim', 'verify', now + 3))?.codeHash, 'h3', 'of the same purpose only');
      t.equal(await m.useCode(code?.id ?? 0, now + 4), true);
      t.equal(await m.useCode(code?.id ?? 0, now + 5), false, 'a code is used once');
      t.equal(await m.latestCode('kim', 'login', now + 5), undefined);
      t.equal(await m.latestCode('kim', 'verify', now + 600_000), undefined, 'expired at expires_at');
      t.equal(await m.loginCodesSince('kim', now - 1), 2);
      t.equal(await m.loginCodesSince('kim', now), 1, 'since is exclusive');
      t.equal(await m.loginCodesSince('kim', now - 1, 'verify'), 1);
      t.equal(await m.lastLoginCodeAt('kim'), now + 1);
      t.equal(await m.lastLoginCodeAt('nobody'), undefined);

      await m.replaceBackupCodes('kim', ['b1', 'b2', 'b3'], now);
      t.equal(await m.backupCodesLeft('kim'), 3);
      t.equal(await m.useBackupCode('kim', 'b2', now), true);
      t.equal(await m.useBackupCode('kim', 'b2', now), false, 'once');
      t.equal(await m.useBackupCode('kim', 'zz', now), false);
      t.equal(await m.backupCodesLeft('kim'), 2);
      await m.replaceBackupCodes('kim', ['c1'], now);
      t.equal(await m.backupCodesLeft('kim'), 1, 'replaced, not added to');

      await m.addFailure('kim', '192.0.2.1', '192.0.2.1', 'totp', now - 10);
      await m.addFailure('kim', '2001:db8::1', '2001:db8::/64', 'totp', now);
      await m.addFailure('lee', '2001:db8::2', '2001:db8::/64', 'email', now);
      t.equal(await m.failuresOfUser('kim', now - 11), 2);
      t.equal(await m.failuresOfUser('kim', now - 10), 1);
      t.equal(await m.failuresOfBlock('2001:db8::/64', now - 1), 2, 'counted by block');
      await m.purgeFailures(now - 10);
      t.equal(await m.failuresOfUser('kim', 0), 1, 'purged up to and including before');
      await m.clearFailures('kim');
      t.equal(await m.failuresOfUser('kim', 0), 0);
      t.equal(await m.failuresOfBlock('2001:db8::/64', 0), 1, 'another user\'s stay');

      t.equal(await m.lockedUntil('kim'), undefined);
      await m.setLock('kim', now + HOUR, now);
      t.equal(await m.lockedUntil('kim'), now + HOUR);
      await m.setLock('kim', null, now);
      t.equal(await m.lockedUntil('kim'), undefined);
      await m.deleteFactors('kim');
      t.equal(await m.factors('kim'), undefined);
    });

    t.test('app passcodes: insert, find, list, revoke, record uses (the later wins), purge', async (t) => {
      const s = await fresh(t, b);
      const p = s.passcodes;
      const now = Date.now();
      const row = (selector: string, user: string, at: number, expiresAt: number | null = null) => ({ user, name: `n-${selector}`, selector, salt: Buffer.alloc(16, 1), hash: Buffer.alloc(32, 2), kdf: 'scrypt:n=4096,r=8,p=1', protocols: ['imap', 'smtp'], createdBy: 'web', expiresAt, now: at });
      const a = await p.insert(row('aaaaa', 'mia', now));
      const b2 = await p.insert(row('bbbbb', 'mia', now + 1, now + HOUR));
      const c = await p.insert(row('ccccc', 'ned', now));
      t.equal(await p.selectorTaken('aaaaa'), true);
      t.equal(await p.selectorTaken('zzzzz'), false);
      t.strictSame(await p.bySelector('aaaaa'), {
        id: a,
        user: 'mia',
        name: 'n-aaaaa',
        selector: 'aaaaa',
        salt: Buffer.alloc(16, 1),
        hash: Buffer.alloc(32, 2),
        kdf: 'scrypt:n=4096,r=8,p=1',
        protocols: ['imap', 'smtp'],
        createdAt: now,
        createdBy: 'web',
        expiresAt: null,
        revokedAt: null,
        revokedBy: null,
        lastUsedAt: null,
        lastUsedIp: null,
        lastUsedProtocol: null,
      });
      t.strictSame((await p.listOf('mia', now)).map((r) => r.id), [a, b2], 'oldest first');
      t.strictSame((await p.listOf('mia', now + HOUR)).map((r) => r.id), [a], 'an expired one does not work');
      t.strictSame((await p.everyActive(now)).map((r) => r.id), [a, b2, c]);
      t.strictSame((await p.everyActive(now, 1)).map((r) => r.id), [a]);
      t.equal(await p.revoke(a, 'cli:op', now + 2), true);
      t.equal(await p.revoke(a, 'cli:op', now + 3), false, 'revoked once');
      t.match(await p.byId(a), { revokedAt: now + 2, revokedBy: 'cli:op' });
      t.strictSame((await p.listOf('mia', now)).map((r) => r.id), [b2]);
      t.strictSame((await p.listOf('mia', now + HOUR, true)).map((r) => r.id), [a, b2], 'with all, every one kept');

      await p.recordUses([
        { id: c, at: now + 20, ip: '192.0.2.1', protocol: 'imap' },
        { id: c, at: now + 10, ip: '192.0.2.2', protocol: 'smtp' },
      ]);
      t.match(await p.byId(c), { lastUsedAt: now + 20, lastUsedIp: '192.0.2.1', lastUsedProtocol: 'imap' }, 'an earlier use reported later does not win');
      await p.recordUses([{ id: c, at: now + 30, ip: '192.0.2.3', protocol: 'smtp' }]);
      t.match(await p.byId(c), { lastUsedAt: now + 30, lastUsedIp: '192.0.2.3' });

      t.equal(await p.purge(now + 1), 0, 'nothing revoked or expired before then');
      t.equal(await p.purge(now + HOUR, 1), 1, 'a batch of one');
      t.equal(await p.purge(now + HOUR), 1);
      t.equal(await p.byId(a), undefined);
      t.equal(await p.byId(b2), undefined);
      t.ok(await p.byId(c), 'a working one stays');
    });

    t.test('records.tx: a thrown error rolls back every write in it, nested ones too, and passes as it was', async (t) => {
      const s = await fresh(t, b);
      const now = Date.now();
      const kept = (await s.addGrant(grant('olga', '192.0.2.1', now))).grant;
      const boom = new Error('changed my mind');
      let inner: number | undefined;
      const caught = await s
        .tx(async () => {
          const g = await s.addGrant(grant('pia', '192.0.2.2', now)); // a transaction of its own, joined
          inner = g.grant.id;
          await s.setUserFlag('olga', 'mfa_enabled', true, 'test', now);
          await s.revokeGrants({ id: kept.id }, 'test', '', now);
          await s.mfa.addFailure('olga', '192.0.2.1', '192.0.2.1', 'totp', now);
          t.ok(await s.grantById(g.grant.id), 'inside, its own writes are seen');
          throw boom;
        })
        .then(
          () => undefined,
          (e: unknown) => e,
        );
      t.equal(caught, boom, 'the very error thrown');
      t.ok(inner, 'the nested grant was made');
      t.equal(await s.grantById(inner ?? 0), undefined, 'the nested write is rolled back');
      t.equal(await s.getUser('pia'), undefined);
      t.strictSame(await s.auditOf('pia'), []);
      t.match(await s.getUser('olga'), { mfaEnabled: false });
      t.match(await s.grantById(kept.id), { revokedAt: null }, 'the revoke is rolled back');
      t.equal(await s.mfa.failuresOfUser('olga', 0), 0);
      t.strictSame((await s.auditOf('olga')).map((r) => r.action), ['grant-add'], 'and its audit rows');

      // A statement the database refuses (a duplicate key) rolls back what came before it in the transaction.
      const dup = await s
        .tx(async () => {
          await s.addGrant(grant('quinn', '192.0.2.3', now));
          await s.sql.run('INSERT INTO users (name, created_at, updated_at) VALUES (?, ?, ?)', ['olga', now, now]);
        })
        .then(
          () => undefined,
          (e: unknown) => e,
        );
      t.ok(dup instanceof Error, `the duplicate is refused (${String(dup)})`);
      t.notOk(dup instanceof StoreUnavailableError, 'as a wrong statement, not as a store that cannot be reached');
      t.equal(await s.getUser('quinn'), undefined, 'the grant before it is rolled back');

      // The store works on after both.
      const after = await s.tx(async () => (await s.addGrant(grant('quinn', '192.0.2.3', now))).grant.id);
      t.ok(await s.grantById(after), 'a transaction after them commits');
    });

    t.test('records.tx: concurrent writers take turns (no lost update, no deadlock); others neither join one nor see it uncommitted', async (t) => {
      const s = await fresh(t, b);
      const now = Date.now();
      await s.ensureUser('counter', 0);
      const WRITERS = 8;
      let inside = 0;
      let most = 0;
      // Read, wait (as a hash or a mail would), write what was read plus one: interleaved, updates are lost.
      const bump = (i: number) =>
        s.tx(async () => {
          inside++;
          most = Math.max(most, inside);
          const v = num(await s.sql.get('SELECT updated_at FROM users WHERE name = ?', ['counter']), 'updated_at');
          await sleep(10);
          // A change the feed's trigger writes too (PostgreSQL: its lock, taken again inside the transaction).
          await s.addGrant(grant(`w${i}`, '192.0.2.1', now));
          await s.setUserFlag(`w${i}`, 'mfa_enabled', true, 'test', now);
          await s.sql.run('UPDATE users SET updated_at = ? WHERE name = ?', [v + 1, 'counter']);
          inside--;
          return i;
        });
      const done = await within(Promise.all(Array.from({ length: WRITERS }, (_, i) => bump(i))), 30_000, `${WRITERS} concurrent writers`);
      t.strictSame(done, Array.from({ length: WRITERS }, (_, i) => i), 'every writer committed');
      t.equal(most, 1, 'one transaction at a time');
      t.equal((await s.getUser('counter'))?.updatedAt, WRITERS, 'no update lost');
      t.equal((await s.listGrants({ now })).length, WRITERS);
      t.equal((await s.counts(now)).mfaEnabled, WRITERS);

      // A transaction held open: a write from outside it is not part of it (not rolled back with it), and a read
      // from outside does not see what it has not committed.
      let release!: () => void;
      const gate = new Promise<void>((r) => (release = r));
      let wrote!: () => void;
      const written = new Promise<void>((r) => (wrote = r));
      const held = s.tx(async () => {
        await s.ensureUser('uncommitted', now);
        wrote();
        await gate;
        throw new Error('rolled back');
      });
      await within(written, 10_000, 'the held transaction\'s write');
      const settled = { write: false, read: false };
      const write = s.ensureUser('outside', now).then(() => (settled.write = true));
      const read = s.getUser('uncommitted').then((u) => ((settled.read = true), u));
      if (b.name === 'SQLite') {
        // One connection: a statement from outside waits until the transaction has ended.
        await sleep(100);
        t.strictSame(settled, { write: false, read: false }, 'statements from outside wait while the transaction is open');
      } else {
        // Connections of their own: they go on meanwhile, each reading what is committed.
        await within(Promise.all([write, read]), 10_000, 'the outside statements while the transaction is open');
        t.strictSame(settled, { write: true, read: true }, 'statements from outside go on while the transaction is open');
      }
      release();
      await t.rejects(within(held, 10_000, 'the held transaction'), /rolled back/);
      t.equal(await within(read, 10_000, 'the outside read'), undefined, 'the outside read did not see the uncommitted user');
      await within(write, 10_000, 'the outside write');
      t.ok(await s.getUser('outside'), 'the outside write is kept');
      t.equal(await s.getUser('uncommitted'), undefined, 'the held transaction\'s write is not');

      // Many writers and readers at once, each writer alternating two grants: every reader sees a whole state.
      const mixed: Promise<unknown>[] = [];
      for (let i = 0; i < 20; i++) {
        mixed.push(
          s.tx(async () => {
            await s.revokeGrants({ user: 'flip' }, 'test', '', now);
            await sleep(1);
            await s.addGrant(grant('flip', `192.0.2.${i % 2 === 0 ? 10 : 11}`, now));
          }),
        );
        mixed.push(s.listGrants({ user: 'flip', now }).then((gs) => t.ok(gs.length <= 1, `reader ${i}: at most one active grant (${gs.length})`)));
      }
      await within(Promise.all(mixed), 30_000, 'writers and readers');
      t.equal((await s.listGrants({ user: 'flip', now })).length, 1);
    });
  });
}

t.test('SQLite only: the file, its statements for decisions, durability', async (t) => {
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

  t.test('the decision\'s synchronous statements (Store.lookup, activeGrant) answer as the records do', async (t) => {
    const s = Store.open(path.join(dir, 'sync.db'), { create: true });
    t.teardown(() => s.close());
    const now = Date.now();
    await s.records.setUserFlag('rita', 'mfa_enabled', true, 'test', now);
    await s.records.setUserFlag('sam', 'exempt', true, 'test', now);
    const g = (await s.records.addGrant(grant('rita', '203.0.113.1', now))).grant;
    await s.records.addGrant(grant('sam', '203.0.113.2', now - 2 * HOUR));
    await s.records.addGrant(grant('tom', '203.0.113.1', now));
    let granted = 0;
    for (const user of ['rita', 'sam', 'tom', 'nobody']) {
      for (const block of ['203.0.113.1', '203.0.113.2']) {
        for (const at of [now, now + HOUR - 1, now + HOUR]) {
          const sync = s.lookup(user, block, at);
          t.strictSame(sync, await s.records.lookup(user, block, at), `${user} ${block} at +${at - now}`);
          t.strictSame(s.activeGrant(user, block, at), await s.records.activeGrant(user, block, at));
          if (sync.grant) granted++;
        }
      }
    }
    t.equal(granted, 4, 'rita and tom, each until the hour is up');
    t.strictSame(s.lookup('rita', '203.0.113.1', now), { user: { mfaEnabled: true, exempt: false }, grant: { id: g.id, expiresAt: now + HOUR } });
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
        const { grant } = await s.records.addGrant({ user: 'u' + (i % 500), ip: '10.0.' + (i % 250) + '.' + (i % 200), block: 'b' + i, ttlMs: 3600000, method: 'helpdesk', source: 'test', reason: '', actor: 'test', now });
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
    const missing: number[] = [];
    for (const id of committed) if (!(await s.records.grantById(id))) missing.push(id);
    t.same(missing, [], 'every committed grant is there');
    t.ok((await s.records.listGrants({ now: Date.now(), limit: 10 })).length > 0);
  });
});

t.test('migration 6 on a version-5 store: every row and number kept; new numbers after every one the audit log named', async (t) => {
  const file = path.join(dir, 'v5.db');
  const db = new Database(file);
  db.pragma('journal_mode = WAL');
  for (const m of MIGRATIONS.filter((x) => x.version <= 5)) db.exec(m.sql);
  db.pragma('user_version = 5');
  const now = Date.now();
  const insert = db.prepare("INSERT INTO grants (id, user, block, ip, created_at, expires_at, method, source) VALUES (?, 'alice', ?, ?, ?, ?, 'totp', 'api')");
  insert.run(1, '203.0.113.1', '203.0.113.1', now, now + HOUR);
  insert.run(2, '203.0.113.2', '203.0.113.2', now, now + HOUR);
  // Grant 7 existed once and was purged: only the audit log still names it.
  db.prepare("INSERT INTO audit (at, actor, action, user, ip, grant_id, detail) VALUES (?, 'daemon', 'grant-purge', 'alice', '203.0.113.7', 7, '{}')").run(now);
  db.prepare("INSERT INTO audit (at, actor, action, user, ip, grant_id, detail) VALUES (?, 'api', 'passcode-revoke', 'alice', NULL, NULL, '{\"id\":12}')").run(now);
  db.close();

  const s = Store.open(file, { migrate: true });
  t.teardown(() => s.close());
  t.equal(s.schemaVersion, SCHEMA_VERSION, 'migrated');
  t.equal(s.db.pragma('integrity_check', { simple: true }), 'ok');
  t.strictSame((await s.records.listGrants({ now, all: true })).map((g) => g.id).sort(), [1, 2], 'the grants, with their numbers');
  const before = s.latestChange();
  const next = await s.records.addGrant(grant('alice', '203.0.113.3', now + 1));
  t.equal(next.grant.id, 8, 'the next grant comes after the purged grant 7 the audit log names');
  t.ok(s.latestChange() > before, "the feed's trigger is there again on the rebuilt table");
  const id = await s.records.passcodes.insert({ user: 'alice', name: 'phone', selector: 'abcde', salt: Buffer.alloc(16), hash: Buffer.alloc(32), kdf: 'scrypt:n=4096,r=8,p=1', protocols: ['imap'], createdBy: 'test', expiresAt: null, now });
  t.equal(id, 13, 'the next passcode comes after passcode 12 of the audit log');
  t.ok(s.db.prepare("SELECT 1 FROM sqlite_schema WHERE type = 'index' AND name = 'audit_at'").get(), 'the audit log has its index by time');
  t.equal(s.db.prepare('SELECT count(*) FROM grants INDEXED BY grants_active WHERE revoked_at IS NULL AND expires_at > ?').pluck().get(now), 3, 'the index of active grants is back');
});
