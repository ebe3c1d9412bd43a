// The external address and e-mailed codes, with a fake mailer and an injected clock (no sleeps): 10-minute life,
// single use, a newer code voids the older, one send a minute and five an hour, digits, stored hashed, failed
// sends store nothing, refused campus domains, one address per user, changing it needs a factor and tells the
// old address.
import t from 'tap';
import { jst, OTP_SUBJECT } from '../../mfa/messages.js';
import { MfaError } from '../../mfa/service.js';
import { codeIn, errorCode, failingMailError, type Harness, IP, MINUTE, mfaHarness, settle } from '../helpers/mfa.js';

const ADDR = 'alice.private@example.com';
const HOUR = 60 * MINUTE;

/** A harness with alice's external address registered and confirmed, and the clock past the send limits. */
async function withAddress(toml?: string): Promise<Harness> {
  const h = mfaHarness(toml ? { toml } : {});
  await h.registerEmail('alice', ADDR);
  h.mailer.sent.length = 0;
  h.advance(MINUTE);
  return h;
}

/** The outcome, or "still waiting" when it is held behind the mailer's gate (so a broken limit fails, not hangs). */
async function inTime(p: Promise<string>): Promise<string> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<string>((r) => (timer = setTimeout(() => r('still waiting'), 500)));
  try {
    return await Promise.race([p, late]);
  } finally {
    clearTimeout(timer);
  }
}
const email = (code: string) => ({ method: 'email', code }) as const;
const codeRows = (h: Harness, purpose = 'login') =>
  h.store.db.prepare('SELECT * FROM email_codes WHERE user = ? AND purpose = ? ORDER BY id').all('alice', purpose) as Record<string, unknown>[];

t.test('a login code: sent to the address, in both languages, with its expiry and the requesting address; used once', async (t) => {
  const h = await withAddress();
  t.teardown(() => h.close());
  const r = await h.svc.sendLoginCode('alice', IP);
  t.same(r, { sent_to: 'a***@example.com', expires_at: new Date(h.clock.now + 10 * MINUTE).toISOString() });
  t.equal(h.mailer.sent.length, 1);
  const mail = h.mailer.last(ADDR);
  t.equal(mail.subject, OTP_SUBJECT);
  t.equal(mail.subject, 'OTP notification (OTP発行のお知らせ)');
  const code = codeIn(mail.text);
  t.match(code, /^\d{6}$/, '6 digits by default');
  t.equal(mail.text.split(code).length - 1, 2, 'the code appears in the Japanese and the English part');
  const expiry = jst(h.clock.now + 10 * MINUTE);
  t.equal(expiry, '2026-11-21 13:11 (JST)', 'sent at 13:01:07 JST');
  t.match(mail.text, `有効期限: ${expiry}`);
  t.match(mail.text, `Valid until: ${expiry}`);
  t.match(mail.text, `要求元 IP アドレス: ${IP}`);
  t.match(mail.text, `Requested from IP address: ${IP}`);
  t.match(mail.text, '10 分間');
  t.match(mail.text, '10 minutes, single use');

  h.advance(MINUTE);
  const g = await h.svc.verify('alice', '198.51.100.3', email(code));
  t.match(g, { method: 'email', ip: '198.51.100.3' }, 'the code creates a grant for the address that presents it');
  t.equal(await errorCode(() => h.svc.verify('alice', '198.51.100.3', email(code))), 'factor-failed', 'used once');
  t.equal(await errorCode(() => h.svc.verify('alice', IP, email(code))), 'factor-failed', 'from anywhere');
});

t.test('a login code lives 10 minutes', async (t) => {
  const h = await withAddress();
  t.teardown(() => h.close());
  const sentAt = h.clock.now;
  await h.svc.sendLoginCode('alice', IP);
  const first = h.mailer.lastCode();
  h.clock.now = sentAt + 10 * MINUTE - 1;
  t.ok(await h.svc.verify('alice', IP, email(first)), 'valid 1 ms before 10 minutes');

  const sentAgain = h.clock.now;
  await h.svc.sendLoginCode('alice', IP);
  const second = h.mailer.lastCode();
  h.clock.now = sentAgain + 10 * MINUTE;
  t.equal(await errorCode(() => h.svc.verify('alice', IP, email(second))), 'factor-failed', 'expired at 10 minutes');
});

t.test('the life is configurable', async (t) => {
  const h = await withAddress('[otp]\nttl = "3m"\n');
  t.teardown(() => h.close());
  const r = await h.svc.sendLoginCode('alice', IP);
  t.equal(r.expires_at, new Date(h.clock.now + 3 * MINUTE).toISOString());
  t.match(h.mailer.last().text, '3 minutes, single use');
  h.advance(3 * MINUTE);
  t.equal(await errorCode(() => h.svc.verify('alice', IP, email(h.mailer.lastCode()))), 'factor-failed');
});

t.test('a newer code voids the older one', async (t) => {
  const h = await withAddress();
  t.teardown(() => h.close());
  await h.svc.sendLoginCode('alice', IP);
  const older = h.mailer.lastCode();
  h.advance(MINUTE);
  await h.svc.sendLoginCode('alice', IP);
  const newer = h.mailer.lastCode();
  if (older !== newer) {
    t.equal(await errorCode(() => h.svc.verify('alice', IP, email(older))), 'factor-failed', 'the older code is void');
  }
  const rows = codeRows(h);
  t.equal(rows.length, 2);
  t.not(rows[0]?.['voided_at'], null, 'the older row is marked void');
  t.equal(rows[1]?.['voided_at'], null);
  t.ok(await h.svc.verify('alice', IP, email(newer)), 'the newer one passes');
});

t.test('send limits: one a minute, five an hour, one in flight', async (t) => {
  const h = await withAddress();
  t.teardown(() => h.close());
  const start = h.clock.now;
  await h.svc.sendLoginCode('alice', IP);
  h.clock.now = start + MINUTE - 1;
  let err: unknown;
  try {
    await h.svc.sendLoginCode('alice', IP);
  } catch (e) {
    err = e;
  }
  t.match(err, { code: 'rate-limited', status: 429, retryAfterMs: 1 }, 'a second send within the minute is refused, with the wait');
  t.equal(h.mailer.sent.length, 1, 'and nothing is sent');
  for (let i = 1; i < 5; i++) {
    h.clock.now = start + i * MINUTE;
    await h.svc.sendLoginCode('alice', '198.51.100.7');
  }
  t.equal(h.mailer.sent.length, 5, 'five sends, one a minute');
  h.clock.now = start + 30 * MINUTE;
  t.equal(await errorCode(() => h.svc.sendLoginCode('alice', IP)), 'rate-limited', 'the sixth in the hour is refused');
  h.clock.now = start + HOUR - 1;
  t.equal(await errorCode(() => h.svc.sendLoginCode('alice', IP)), 'rate-limited', 'still within the hour');
  h.clock.now = start + HOUR;
  await h.svc.sendLoginCode('alice', IP);
  t.equal(h.mailer.sent.length, 6, 'once the first send is an hour old, one more');
  t.equal(await errorCode(() => h.svc.sendLoginCode('alice', IP)), 'rate-limited');

  // Another user is not affected by alice's sends.
  await h.registerEmail('bob', 'bob.private@example.com');
  h.advance(MINUTE);
  t.ok(await h.svc.sendLoginCode('bob', IP));
});

t.test('send limits apply to confirmation mails too: one a minute, five an hour (a password alone cannot mail-bomb)', async (t) => {
  const h = mfaHarness();
  t.teardown(() => h.close());
  const start = h.clock.now;
  await h.svc.emailRegister('alice', IP, 'victim1@example.com', undefined);
  h.clock.now = start + MINUTE - 1;
  t.equal(await errorCode(() => h.svc.emailRegister('alice', IP, 'victim2@example.com', undefined)), 'rate-limited', 'a second within the minute');
  t.equal(h.mailer.sent.length, 1, 'nothing more was sent');
  t.match((await h.svc.status('alice')).factors, { email_pending: 'v***@example.com' });
  for (let i = 1; i < 5; i++) {
    h.clock.now = start + i * MINUTE;
    await h.svc.emailRegister('alice', IP, `victim${i + 1}@example.com`, undefined);
  }
  t.equal(h.mailer.sent.length, 5);
  h.clock.now = start + 10 * MINUTE;
  t.equal(await errorCode(() => h.svc.emailRegister('alice', IP, 'victim9@example.com', undefined)), 'rate-limited', 'the sixth in the hour');
  h.clock.now = start + HOUR;
  t.ok(await h.svc.emailRegister('alice', IP, 'alice.private@example.com', undefined), 'after the hour');
  // Login codes are counted apart: confirming the address and asking for a code at once works.
  await h.svc.emailConfirm('alice', IP, h.mailer.lastCode('alice.private@example.com'));
  t.ok(await h.svc.sendLoginCode('alice', IP), 'a login code right after the confirmation mail');
});

t.test('two concurrent confirmation mails: one sent, the other refused', async (t) => {
  const h = mfaHarness();
  t.teardown(() => h.close());
  let open = () => {};
  h.mailer.gate = new Promise<void>((r) => (open = r));
  const first = h.svc.emailRegister('alice', IP, 'one@example.com', undefined);
  const second = h.svc.emailRegister('alice', IP, 'two@example.com', undefined).then(
    () => 'sent',
    (e: unknown) => (e instanceof MfaError ? e.code : String(e)),
  );
  t.equal(await inTime(second), 'rate-limited', 'refused while the first is in flight');
  open();
  await first;
  t.equal(h.mailer.sent.length, 1);
  t.match((await h.svc.status('alice')).factors, { email_pending: 'o***@example.com' });
});

t.test('two concurrent sends: one mail, the other refused', async (t) => {
  const h = await withAddress();
  t.teardown(() => h.close());
  let open = () => {};
  h.mailer.gate = new Promise<void>((r) => (open = r));
  const first = h.svc.sendLoginCode('alice', IP);
  const second = h.svc.sendLoginCode('alice', IP).then(
    () => 'sent',
    (e: unknown) => (e instanceof MfaError ? e.code : String(e)),
  );
  t.equal(await inTime(second), 'rate-limited', 'refused while the first is in flight');
  open();
  await first;
  t.equal(h.mailer.sent.length, 1);
  t.equal(codeRows(h).length, 1);
});

t.test('digits: 6 by default, 8 when configured; the code and the confirmation code alike', async (t) => {
  const h = mfaHarness({ toml: '[otp]\ndigits = 8\n' });
  t.teardown(() => h.close());
  await h.svc.emailRegister('alice', IP, ADDR, undefined);
  const verifyCode = h.mailer.lastCode();
  t.match(verifyCode, /^\d{8}$/, 'the confirmation code has 8 digits');
  await h.svc.emailConfirm('alice', IP, verifyCode);
  h.advance(MINUTE);
  await h.svc.sendLoginCode('alice', IP);
  const code = h.mailer.lastCode();
  t.match(code, /^\d{8}$/, 'the login code has 8 digits');
  t.equal(await errorCode(() => h.svc.verify('alice', IP, email(code.slice(0, 6)))), 'factor-failed', 'its first 6 digits are not enough');
  t.ok(await h.svc.verify('alice', IP, email(` ${code} `)), 'surrounding spaces are forgiven');
});

t.test('codes are stored hashed: not in the SQLite file', async (t) => {
  for (const digits of [6, 8]) {
    const h = mfaHarness({ toml: `[otp]\ndigits = ${digits}\n` });
    t.teardown(() => h.close());
    await h.svc.emailRegister('alice', IP, ADDR, undefined);
    const verifyCode = h.mailer.lastCode();
    await h.svc.emailConfirm('alice', IP, verifyCode);
    h.advance(MINUTE);
    await h.svc.sendLoginCode('alice', IP);
    const loginCode = h.mailer.lastCode();
    h.advance(MINUTE);
    await h.svc.sendLoginCode('alice', IP);
    const unusedCode = h.mailer.lastCode();
    const [login, unused] = codeRows(h).map((r) => r['code_hash']);
    t.equal(login, h.secrets.hashCode('alice', loginCode), `${digits} digits: the row holds the keyed hash`);
    t.equal(unused, h.secrets.hashCode('alice', unusedCode));
    t.equal(codeRows(h, 'verify')[0]?.['code_hash'], h.secrets.hashCode('alice', verifyCode));
    h.store.db.pragma('wal_checkpoint(FULL)');
    // The hashes are base64 and may contain digits by chance: take them out before looking for the codes.
    let bytes = h.dbBytes();
    const hashes = h.store.db.prepare('SELECT code_hash AS h FROM email_codes UNION ALL SELECT code_hash FROM backup_codes').all() as { h: string }[];
    for (const { h: hash } of hashes) bytes = bytes.split(hash).join('');
    for (const c of [verifyCode, loginCode, unusedCode]) t.equal(bytes.indexOf(c), -1, `${digits} digits: code ${'#'.repeat(c.length)} is not in the file`);
  }
});

t.test('a failed send is an error, and nothing is stored or counted', async (t) => {
  const h = await withAddress();
  t.teardown(() => h.close());
  await h.svc.sendLoginCode('alice', IP);
  const earlier = h.mailer.lastCode();
  h.advance(MINUTE);
  const rowsBefore = codeRows(h).length;
  h.mailer.failWith = failingMailError();
  let err: unknown;
  try {
    await h.svc.sendLoginCode('alice', IP);
  } catch (e) {
    err = e;
  }
  t.match(err, { code: 'mail-failed', status: 502, message: /did not accept/ });
  t.equal(codeRows(h).length, rowsBefore, 'no code row for a mail that did not go out');
  t.equal(h.mailer.sent.length, 1);
  t.ok(h.lines.some((l) => /"event":"mail-failed"/.test(l)), 'the failure is logged');
  h.mailer.failWith = new Error('socket hang up');
  t.equal(await errorCode(() => h.svc.sendLoginCode('alice', IP)), 'mail-failed', 'any failure, not only MailError');
  h.mailer.failWith = undefined;
  t.ok(await h.svc.verify('alice', IP, email(earlier)), 'the failed sends did not void the earlier code');
  await h.svc.sendLoginCode('alice', IP);
  t.equal(h.mailer.sent.filter((m) => m.subject === OTP_SUBJECT).length, 2, 'and did not use up the minute');

  // Registering an address whose confirmation cannot be sent leaves nothing behind.
  const fresh = mfaHarness();
  t.teardown(() => fresh.close());
  fresh.mailer.failWith = failingMailError();
  t.equal(await errorCode(() => fresh.svc.emailRegister('carol', IP, 'carol@example.com', undefined)), 'mail-failed');
  t.equal((await fresh.records.mfa.factors('carol'))?.emailPending ?? null, null, 'no pending address');
  t.equal((fresh.store.db.prepare('SELECT count(*) AS n FROM email_codes').get() as { n: number }).n, 0, 'no code');
  t.same((await fresh.svc.status('carol')).factors, { totp: false, email: null, email_pending: null, backup_codes_left: 0 });
});

t.test('campus domains (and their subdomains) are refused as external addresses', async (t) => {
  const h = mfaHarness({ toml: '[otp]\nrefused_email_domains = ["kit.ac.jp", "Kyoto-U.ac.jp"]\n' });
  t.teardown(() => h.close());
  for (const a of ['alice@kit.ac.jp', 'alice@edu.kit.ac.jp', 'ALICE@KIT.AC.JP', 'a@x.y.kit.ac.jp', 'alice@kyoto-u.ac.jp', 'alice@st.kyoto-u.ac.jp']) {
    let err: unknown;
    try {
      await h.svc.emailRegister('alice', IP, a, undefined);
    } catch (e) {
      err = e;
    }
    t.match(err, { code: 'refused-domain', status: 422 }, `refused: ${a}`);
  }
  t.equal(h.mailer.sent.length, 0, 'nothing was sent');
  t.equal(await h.records.mfa.factors('alice'), undefined, 'nothing was stored');
  for (const a of ['alice@notkit.ac.jp', 'alice@kit.ac.jp.example.com', 'alice@kyoto-u.ac.jp.evil.example']) {
    const fresh = mfaHarness({ toml: '[otp]\nrefused_email_domains = ["kit.ac.jp", "kyoto-u.ac.jp"]\n' });
    t.teardown(() => fresh.close());
    t.ok(await fresh.svc.emailRegister('alice', IP, a, undefined), `accepted (not a campus domain): ${a}`);
  }
  for (const bad of ['alice', 'alice@', '@example.com', 'alice@localhost', 'a b@example.com', '<a@example.com>', 'a@example.com, b@example.com', 42, null, `${'x'.repeat(250)}@example.com`]) {
    t.equal(await errorCode(() => h.svc.emailRegister('alice', IP, bad, undefined)), 'bad-request', `malformed: ${JSON.stringify(bad)}`);
  }
});

t.test('the confirmation code: confirms the address once, lives 10 minutes, a newer one voids the older', async (t) => {
  const h = mfaHarness();
  t.teardown(() => h.close());
  const r = await h.svc.emailRegister('alice', IP, ADDR, undefined);
  t.same(r, { pending: 'a***@example.com', expires_at: new Date(h.clock.now + 10 * MINUTE).toISOString() });
  const mail = h.mailer.last(ADDR);
  t.match(mail.text, `Requested from IP address: ${IP}`);
  t.match(mail.text, `要求元 IP アドレス: ${IP}`);
  const first = codeIn(mail.text);
  t.match((await h.svc.status('alice')).factors, { email: null, email_pending: 'a***@example.com' }, 'pending, not yet a factor');
  t.equal(await errorCode(() => h.svc.enable('alice', IP)), 'no-factor', 'an unconfirmed address is not a factor');

  h.advance(10 * MINUTE);
  t.equal(await errorCode(() => h.svc.emailConfirm('alice', IP, first)), 'conflict', 'expired after 10 minutes: register again');
  await h.svc.emailRegister('alice', IP, ADDR, undefined);
  const second = h.mailer.lastCode();
  h.advance(MINUTE);
  await h.svc.emailRegister('alice', IP, ADDR, undefined);
  const third = h.mailer.lastCode();
  if (second !== third) t.equal(await errorCode(() => h.svc.emailConfirm('alice', IP, second)), 'factor-failed', 'the older confirmation code is void');
  t.same(await h.svc.emailConfirm('alice', IP, third), { address: 'a***@example.com' });
  t.match((await h.svc.status('alice')).factors, { email: 'a***@example.com', email_pending: null });
  t.equal(await errorCode(() => h.svc.emailConfirm('alice', IP, third)), 'conflict', 'used once: nothing is waiting any more');
  t.equal(await errorCode(() => h.svc.emailConfirm('alice', IP, 42)), 'bad-request');
});

t.test('one address per user: changing it needs a passed factor, the old address is told, its codes are void', async (t) => {
  const h = await withAddress();
  t.teardown(() => h.close());
  const NEW = 'alice.new@example.net';
  t.equal(await errorCode(() => h.svc.emailRegister('alice', IP, NEW, undefined)), 'proof-required', 'no proof: refused');
  t.equal(await errorCode(() => h.svc.emailRegister('alice', IP, ADDR.toUpperCase(), undefined)), 'conflict', 'the same address again');
  t.equal(await errorCode(() => h.svc.emailRegister('alice', IP, NEW, email('00000000'))), 'factor-failed', 'a wrong proof: refused');
  t.equal(h.mailer.sent.length, 0, 'nothing was sent to the new address');
  t.equal((await h.records.mfa.factors('alice'))?.emailPending ?? null, null);

  // A code to the current address is the proof.
  await h.svc.sendLoginCode('alice', IP);
  const proof = h.mailer.lastCode(ADDR);
  h.advance(MINUTE);
  await h.svc.sendLoginCode('alice', IP);
  const pendingLogin = h.mailer.lastCode(ADDR);
  // (the newer code voided `proof`; ask for one more to use as proof, keep `pendingLogin` unused)
  t.equal(await errorCode(() => h.svc.emailRegister('alice', IP, NEW, email(proof === pendingLogin ? 'x' : proof))), 'factor-failed');
  await h.svc.emailRegister('alice', IP, NEW, email(pendingLogin));
  const confirm = h.mailer.lastCode(NEW);
  t.match((await h.svc.status('alice')).factors, { email: 'a***@example.com', email_pending: 'a***@example.net' }, 'the old address stays until the new one is confirmed');

  h.advance(MINUTE);
  await h.svc.sendLoginCode('alice', IP);
  t.equal(h.mailer.last().to, ADDR, 'meanwhile login codes still go to the old address');
  const toOld = h.mailer.lastCode(ADDR);
  const sentBefore = h.mailer.sent.length;
  await h.svc.emailConfirm('alice', '198.51.100.8', confirm);
  await settle();
  t.equal(h.mailer.sent.length, sentBefore + 1, 'one notice');
  const notice = h.mailer.last();
  t.equal(notice.to, ADDR, 'the old address is told');
  t.match(notice.subject, /external address was changed/);
  t.match(notice.text, 'a***@example.net', 'with the new address, masked');
  t.notMatch(notice.text, NEW, 'not in full');
  t.match(notice.text, '198.51.100.8');
  t.match((await h.svc.status('alice')).factors, { email: 'a***@example.net', email_pending: null });
  t.equal(await errorCode(() => h.svc.verify('alice', IP, email(toOld))), 'factor-failed', 'a code sent to the old address is void');
  h.advance(MINUTE);
  await h.svc.sendLoginCode('alice', IP);
  t.equal(h.mailer.last().to, NEW, 'codes now go to the new address');
  t.ok(await h.svc.verify('alice', IP, email(h.mailer.lastCode(NEW))));
  const audit = (await h.records.auditOf('alice', 100)).map((a) => a.action);
  t.ok(audit.includes('email-change'), 'the change is audited');
});

t.test('with the app registered, the app is the proof for an address change', async (t) => {
  const h = mfaHarness();
  t.teardown(() => h.close());
  const secret = await h.registerApp('alice');
  t.equal(await errorCode(() => h.svc.emailRegister('alice', IP, ADDR, undefined)), 'proof-required', 'a second factor needs the first');
  await h.svc.emailRegister('alice', IP, ADDR, { method: 'totp', code: h.totp(secret) });
  await h.svc.emailConfirm('alice', IP, h.mailer.lastCode(ADDR));
  await settle();
  t.equal(h.mailer.sent.length, 1, 'no "address changed" notice when there was no old address');
});

t.test('removing the address needs a factor and voids its codes', async (t) => {
  const h = await withAddress();
  t.teardown(() => h.close());
  const secret = await h.registerApp('alice').catch(() => '');
  t.equal(secret, '', 'adding the app needs a proof once an address is registered');
  await h.svc.sendLoginCode('alice', IP);
  const code = h.mailer.lastCode();
  t.equal(await errorCode(() => h.svc.emailRemove('alice', IP, undefined)), 'proof-required');
  await h.svc.emailRemove('alice', IP, email(code));
  t.match((await h.svc.status('alice')).factors, { email: null, email_pending: null });
  t.equal(await errorCode(() => h.svc.sendLoginCode('alice', IP)), 'not-registered');
  t.equal(await errorCode(() => h.svc.emailRemove('alice', IP, undefined)), 'not-registered');
});
