// Secrets at rest: the key file (created 0600 when missing, refused when malformed), AES-256-GCM sealing of
// TOTP seeds, keyed hashes of one-time codes compared in constant time, and no seed in the SQLite file.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { createSecrets, loadOrCreateKey, openSecrets, SecretsError } from '../../mfa/secrets.js';
import { sqliteStore } from '../../store/open.js';
import { tempDir } from '../helpers/daemon.js';
import { IP, mfaHarness } from '../helpers/mfa.js';

const dir = tempDir('mfagate-secrets-');
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));

/** RFC 4648 base32 decoding, to find the seed's raw bytes in the database. */
function unbase32(s: string): Buffer {
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';
  let bits = 0;
  let value = 0;
  const out: number[] = [];
  for (const ch of s.replace(/=+$/, '')) {
    value = (value << 5) | alphabet.indexOf(ch);
    bits += 5;
    if (bits >= 8) {
      out.push((value >>> (bits - 8)) & 0xff);
      bits -= 8;
    }
  }
  return Buffer.from(out);
}

t.test('the key file is created on first start: 32 random bytes in base64, mode 0600, then reused', async (t) => {
  const file = path.join(dir, 'var/deeper/secret.key');
  t.notOk(fs.existsSync(file));
  const oldMask = process.umask(0o000); // even with a permissive umask the file is private
  let key: Buffer;
  try {
    key = loadOrCreateKey(file);
  } finally {
    process.umask(oldMask);
  }
  t.equal(key.length, 32);
  const st = fs.statSync(file);
  t.equal(st.mode & 0o777, 0o600, 'mode 0600');
  t.ok(st.isFile());
  t.equal(fs.readFileSync(file, 'utf8'), key.toString('base64') + '\n');
  t.same(loadOrCreateKey(file), key, 'the second start reads the same key');
  t.equal(fs.readFileSync(file, 'utf8'), key.toString('base64') + '\n', 'and does not rewrite it');
  const other = loadOrCreateKey(path.join(dir, 'other.key'));
  t.notSame(other, key, 'a new file gets a new random key');
});

t.test('an existing key file written by the operator is used as is', async (t) => {
  const file = path.join(dir, 'given.key');
  const key = crypto.randomBytes(32);
  fs.writeFileSync(file, `  ${key.toString('base64')}\n\n`, { mode: 0o600 });
  t.same(loadOrCreateKey(file), key);
});

t.test('a malformed key file is refused, and left alone', async (t) => {
  const cases: [string, string | Buffer][] = [
    ['empty', ''],
    ['16 bytes', crypto.randomBytes(16).toString('base64')],
    ['33 bytes', crypto.randomBytes(33).toString('base64')],
    ['64 bytes', crypto.randomBytes(64).toString('base64')],
    ['hex instead of base64', crypto.randomBytes(32).toString('hex')],
    ['raw bytes', crypto.randomBytes(32)],
    ['base64 with junk', crypto.randomBytes(32).toString('base64') + ' junk'],
    ['two keys', crypto.randomBytes(32).toString('base64') + '\n' + crypto.randomBytes(32).toString('base64')],
    ['text', 'change me'],
  ];
  for (const [what, content] of cases) {
    const file = path.join(dir, `bad-${what.replace(/\W+/g, '-')}.key`);
    fs.writeFileSync(file, content, { mode: 0o600 });
    t.throws(() => loadOrCreateKey(file), SecretsError, `refused: ${what}`);
    t.throws(() => loadOrCreateKey(file), /expected 32 bytes in base64/, `with a message that says what is expected: ${what}`);
    t.same(fs.readFileSync(file), Buffer.from(content), `not overwritten: ${what}`);
  }
  // A directory where the key file should be: an error, not a crash with a stack of fs internals.
  const asDir = path.join(dir, 'a-dir.key');
  fs.mkdirSync(asDir);
  t.throws(() => loadOrCreateKey(asDir), SecretsError);
});

t.test('sealing: AES-256-GCM with a random IV, bound to its context, opens only with the same key', async (t) => {
  const key = crypto.randomBytes(32);
  const s = createSecrets(key);
  const plain = Buffer.from('JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP');
  const a = s.encrypt(plain, 'totp:alice');
  const b = s.encrypt(plain, 'totp:alice');
  t.not(a.toString('hex'), b.toString('hex'), 'a fresh IV each time');
  t.equal(a.indexOf(plain), -1, 'the plaintext is not in the sealed bytes');
  t.equal(a.length, 1 + 12 + 16 + plain.length, 'version, 96-bit IV, 128-bit tag, body');
  t.same(s.decrypt(a, 'totp:alice'), plain);
  t.same(createSecrets(Buffer.from(key)).decrypt(a, 'totp:alice'), plain, 'the same key (a restart) opens it');

  // It is AES-256-GCM: open it with node:crypto directly, under the key derived from the key file.
  const encKey = Buffer.from(crypto.hkdfSync('sha256', key, Buffer.alloc(0), 'mfagate totp seed encryption', 32));
  const d = crypto.createDecipheriv('aes-256-gcm', encKey, a.subarray(1, 13));
  d.setAAD(Buffer.from('totp:alice'));
  d.setAuthTag(a.subarray(13, 29));
  t.same(Buffer.concat([d.update(a.subarray(29)), d.final()]), plain, 'standard AES-256-GCM opens it');

  t.throws(() => createSecrets(crypto.randomBytes(32)).decrypt(a, 'totp:alice'), SecretsError, 'another key fails');
  t.throws(() => createSecrets(crypto.randomBytes(32)).decrypt(a, 'totp:alice'), /does not open with this key/);
  t.throws(() => s.decrypt(a, 'totp:bob'), SecretsError, "another user's context fails (a row copied to another user)");
  t.throws(() => s.decrypt(a, 'totp-pending:alice'), SecretsError, 'a pending seed cannot pass for a confirmed one');
  for (const i of [0, 5, 20, a.length - 1]) {
    const bad = Buffer.from(a);
    bad[i] = (bad[i] ?? 0) ^ 1;
    t.throws(() => s.decrypt(bad, 'totp:alice'), SecretsError, `a flipped bit at byte ${i} fails`);
  }
  t.throws(() => s.decrypt(a.subarray(0, 20), 'totp:alice'), SecretsError, 'truncated');
  t.throws(() => s.decrypt(Buffer.alloc(0), 'totp:alice'), SecretsError, 'empty');
});

t.test('one-time codes: a keyed hash bound to the user, compared in constant time', async (t) => {
  const key = crypto.randomBytes(32);
  const s = createSecrets(key);
  const h = s.hashCode('alice', '123456');
  t.equal(h, s.hashCode('alice', '123456'), 'deterministic');
  t.not(h, s.hashCode('bob', '123456'), 'bound to the user');
  t.not(h, s.hashCode('alice', '123457'), 'bound to the code');
  t.not(h, createSecrets(crypto.randomBytes(32)).hashCode('alice', '123456'), 'keyed: another key gives another hash');
  t.not(h, crypto.createHash('sha256').update('alice\u0000123456').digest('base64'), 'not a plain hash a stolen database could test');
  t.notOk(h.includes('123456'));
  t.equal(Buffer.from(h, 'base64').length, 32, 'HMAC-SHA-256');
  t.equal(s.sameHash(h, s.hashCode('alice', '123456')), true);
  t.equal(s.sameHash(h, s.hashCode('alice', '654321')), false);
  t.equal(s.sameHash(h, h.slice(0, 20)), false, 'a shorter value is not equal (and does not throw)');
  t.equal(s.sameHash(h, ''), false);
  // The comparison is crypto.timingSafeEqual: a wrapper that counts calls shows it is the one used.
  const original = crypto.timingSafeEqual;
  let calls = 0;
  const spy = ((a: NodeJS.ArrayBufferView, b: NodeJS.ArrayBufferView) => {
    calls++;
    return original(a, b);
  }) as typeof crypto.timingSafeEqual;
  (crypto as { timingSafeEqual: typeof crypto.timingSafeEqual }).timingSafeEqual = spy;
  try {
    s.sameHash(h, s.hashCode('alice', '000000'));
  } finally {
    (crypto as { timingSafeEqual: typeof crypto.timingSafeEqual }).timingSafeEqual = original;
  }
  t.equal(calls, 1, 'crypto.timingSafeEqual compares equal-length hashes');
});

t.test('the TOTP seed is not in the SQLite file: neither in base32 nor as bytes; the stored row opens only with the key', async (t) => {
  const h = mfaHarness();
  t.teardown(() => h.close());
  const begun = await h.svc.totpBegin('alice', IP, undefined);
  const raw = unbase32(begun.secret);
  t.equal(raw.length, 20);
  const pendingBytes = h.dbBytes();
  t.equal(pendingBytes.indexOf(begun.secret), -1, 'the pending seed is not in the file (base32)');
  t.equal(pendingBytes.indexOf(raw.toString('latin1')), -1, 'nor as raw bytes');
  await h.svc.totpConfirm('alice', IP, h.totp(begun.secret));
  // Force everything into the main file as well, then look at the file, the WAL and the shared memory.
  h.store.db.pragma('wal_checkpoint(FULL)');
  const bytes = h.dbBytes();
  t.ok(bytes.length > 4096);
  t.equal(bytes.indexOf(begun.secret), -1, 'the confirmed seed is not in the file (base32)');
  t.equal(bytes.indexOf(begun.secret.toLowerCase()), -1, 'nor in lower case');
  t.equal(bytes.indexOf(raw.toString('latin1')), -1, 'nor as raw bytes');
  t.equal(bytes.indexOf(raw.toString('base64')), -1, 'nor as base64');
  t.equal(bytes.indexOf(raw.toString('hex')), -1, 'nor as hex');
  t.equal(bytes.indexOf(h.key.toString('base64')), -1, 'the key is not there either');
  const row = h.store.db.prepare('SELECT totp_secret, totp_pending FROM factors WHERE user = ?').get('alice') as { totp_secret: Buffer; totp_pending: Buffer | null };
  t.ok(Buffer.isBuffer(row.totp_secret));
  t.equal(row.totp_pending, null, 'the pending seed is gone once confirmed');
  t.equal(h.secrets.decrypt(row.totp_secret, 'totp:alice').toString('utf8'), begun.secret, 'the row opens with the key');
  t.throws(() => createSecrets(crypto.randomBytes(32)).decrypt(row.totp_secret, 'totp:alice'), SecretsError, 'and not with another');
});

t.test('a service started with another key cannot use the stored seed (refuses, does not accept)', async (t) => {
  const h = mfaHarness();
  t.teardown(() => h.close());
  const secret = await h.registerApp('alice');
  const other = mfaHarness({ dir: h.dir, key: crypto.randomBytes(32), now: h.clock.now });
  t.teardown(() => other.store.close());
  await t.rejects(other.svc.verify('alice', IP, { method: 'totp', code: other.totp(secret) }), SecretsError);
  t.equal((await h.records.listGrants({ user: 'alice', now: h.clock.now })).length, 0, 'no grant');
});

t.test('openSecrets never replaces a key the store depends on', async (t) => {
  const h = mfaHarness();
  t.teardown(() => h.close());
  const keyFile = path.join(dir, 'guard/secret.key');
  // A fresh store: the key is created.
  const first = await openSecrets(keyFile, sqliteStore(h.store));
  t.ok(fs.existsSync(keyFile));
  // Seal something with it, as an enrolment would.
  await h.records.mfa.updateFactors('alice', { totp_secret: first.encrypt(Buffer.from('JBSWY3DPEHPK3PXP'), 'totp:alice') }, Date.now());
  t.ok(await openSecrets(keyFile, sqliteStore(h.store)), 'the same key opens it again');
  fs.renameSync(keyFile, `${keyFile}.moved`);
  await t.rejects(openSecrets(keyFile, sqliteStore(h.store)), /does not exist, but the store holds app registrations/, 'a missing key is not silently recreated');
  t.notOk(fs.existsSync(keyFile), 'and no new key file was written');
  fs.writeFileSync(keyFile, crypto.randomBytes(32).toString('base64') + '\n', { mode: 0o600 });
  await t.rejects(openSecrets(keyFile, sqliteStore(h.store)), /does not open the app registrations/, 'a different key is refused');
});
