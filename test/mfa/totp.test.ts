// TOTP: the RFC 6238 Appendix B test vectors through otplib (as mfa/totp.ts calls it), an independent HMAC
// computation of the same vectors, and the app parameters (SHA-1, 6 digits, 30 s, one step of drift either way).
import crypto from 'node:crypto';
import { generateSync, verifySync } from 'otplib';
import t from 'tap';
import { codeAt, DIGITS, matchStep, newSecret, otpauthUri, PERIOD } from '../../mfa/totp.js';

type Algorithm = 'sha1' | 'sha256' | 'sha512';

// RFC 6238 Appendix B: the seeds are ASCII strings of 20, 32 and 64 bytes.
const SEEDS: Record<Algorithm, string> = {
  sha1: '12345678901234567890',
  sha256: '12345678901234567890123456789012',
  sha512: '1234567890123456789012345678901234567890123456789012345678901234',
};

const VECTORS: [number, Record<Algorithm, string>][] = [
  [59, { sha1: '94287082', sha256: '46119246', sha512: '90693936' }],
  [1111111109, { sha1: '07081804', sha256: '68084774', sha512: '25091201' }],
  [1111111111, { sha1: '14050471', sha256: '67062674', sha512: '99943326' }],
  [1234567890, { sha1: '89005924', sha256: '91819424', sha512: '93441116' }],
  [2000000000, { sha1: '69279037', sha256: '90698825', sha512: '38618901' }],
  [20000000000, { sha1: '65353130', sha256: '77737706', sha512: '47863826' }],
];

/** RFC 4648 base32 (what otplib expects for a string secret), written here so the test does not trust otplib's. */
function base32(bytes: Buffer): string {
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';
  let bits = 0;
  let value = 0;
  let out = '';
  for (const b of bytes) {
    value = (value << 8) | b;
    bits += 8;
    while (bits >= 5) {
      out += alphabet[(value >>> (bits - 5)) & 31];
      bits -= 5;
    }
  }
  if (bits > 0) out += alphabet[(value << (5 - bits)) & 31];
  return out;
}

/** RFC 4226/6238 straight from node:crypto: an independent check of the table above. */
function reference(alg: Algorithm, seed: Buffer, seconds: number, digits: number, period = 30): string {
  const counter = Buffer.alloc(8);
  counter.writeBigUInt64BE(BigInt(Math.floor(seconds / period)));
  const mac = crypto.createHmac(alg, seed).update(counter).digest();
  const offset = (mac[mac.length - 1] ?? 0) & 0xf;
  const bin = mac.readUInt32BE(offset) & 0x7fffffff;
  return String(bin % 10 ** digits).padStart(digits, '0');
}

t.test('base32 helper matches RFC 4648 test vectors', async (t) => {
  t.equal(base32(Buffer.from('foobar')), 'MZXW6YTBOI');
  t.equal(base32(Buffer.from('f')), 'MY');
  t.equal(base32(Buffer.from(SEEDS.sha1)), 'GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ');
});

t.test('RFC 6238 Appendix B vectors (8 digits): otplib with the seed as base32 and as bytes, and the reference', async (t) => {
  let checked = 0;
  for (const [seconds, codes] of VECTORS) {
    for (const alg of ['sha1', 'sha256', 'sha512'] as const) {
      const seed = Buffer.from(SEEDS[alg], 'ascii');
      const want = codes[alg];
      const what = `${alg} at T=${seconds}`;
      t.equal(reference(alg, seed, seconds, 8), want, `reference HMAC: ${what}`);
      const opts = { epoch: seconds, period: 30, digits: 8, algorithm: alg } as const;
      t.equal(generateSync({ ...opts, secret: base32(seed) }), want, `otplib, base32 seed: ${what}`);
      t.equal(generateSync({ ...opts, secret: new Uint8Array(seed) }), want, `otplib, byte seed: ${what}`);
      const v = verifySync({ ...opts, secret: base32(seed), token: want });
      t.ok(v.valid, `otplib verifies ${what}`);
      const wrong = String((Number(want) + 1) % 1e8).padStart(8, '0');
      t.notOk(verifySync({ ...opts, secret: base32(seed), token: wrong }).valid, `otplib refuses a neighbouring code: ${what}`);
      checked++;
    }
  }
  t.equal(checked, 18, 'all 18 vectors');
});

t.test('our parameters agree with the RFC: the SHA-1 vectors cut to 6 digits, through codeAt and matchStep', async (t) => {
  const secret = base32(Buffer.from(SEEDS.sha1));
  for (const [seconds, codes] of VECTORS) {
    const six = codes.sha1.slice(-6);
    t.equal(codeAt(secret, seconds * 1000), six, `codeAt at T=${seconds}`);
    t.equal(matchStep(secret, six, seconds * 1000), Math.floor(seconds / 30), `matchStep at T=${seconds} names the step`);
  }
  t.equal(DIGITS, 6);
  t.equal(PERIOD, 30);
});

t.test('app parameters: ±1 step accepted (with the step it matched), ±2 refused, wherever "now" lies in the step', async (t) => {
  const secret = newSecret();
  t.match(secret, /^[A-Z2-7]{32}$/, '20 random bytes in base32');
  const base = 1_800_000_000 * 1000; // a step boundary
  for (const into of [0, 1, 15_000, 29_999]) {
    const now = base + into;
    const step = Math.floor(now / 30_000);
    for (const d of [-1, 0, 1]) {
      const code = codeAt(secret, now + d * 30_000);
      t.equal(matchStep(secret, code, now), step + d, `offset ${into} ms: step ${d >= 0 ? '+' : ''}${d} accepted as step ${step + d}`);
    }
    for (const d of [-3, -2, 2, 3]) {
      const code = codeAt(secret, now + d * 30_000);
      // A code of another step may collide with one of the three accepted steps (1 in 10^6 per step): skip then.
      const accepted = [-1, 0, 1].map((x) => codeAt(secret, now + x * 30_000));
      if (accepted.includes(code)) continue;
      t.equal(matchStep(secret, code, now), undefined, `offset ${into} ms: step ${d} refused`);
    }
  }
});

t.test('codes that are not 6 digits are refused without reaching otplib', async (t) => {
  const secret = newSecret();
  const now = 1_800_000_000_000;
  const good = codeAt(secret, now);
  t.ok(matchStep(secret, good, now) !== undefined);
  for (const bad of ['', ' ' + good, good + '0', good.slice(1), 'abcdef', '12345x', '１２３４５６']) {
    t.equal(matchStep(secret, bad, now), undefined, `refused: ${JSON.stringify(bad)}`);
  }
});

t.test('the otpauth URI carries what the apps need', async (t) => {
  const secret = newSecret();
  const uri = new URL(otpauthUri('Example Univ', 'alice', secret));
  t.equal(uri.protocol, 'otpauth:');
  t.equal(uri.host, 'totp');
  t.equal(uri.searchParams.get('secret'), secret);
  t.equal(uri.searchParams.get('issuer'), 'Example Univ');
  t.equal(uri.searchParams.get('digits') ?? '6', '6');
  t.equal(uri.searchParams.get('period') ?? '30', '30');
  t.match((uri.searchParams.get('algorithm') ?? 'SHA1').toUpperCase(), 'SHA1');
  t.match(decodeURIComponent(uri.pathname), /^\/\/?Example Univ:alice$/);
});
