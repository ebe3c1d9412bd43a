// Failed factor attempts: at most 5 per user in 15 minutes, then a 15-minute lock (configurable), a per-address
// limit across users, unlock by the helpdesk, and the lock in the status. Time moves by an injected clock.
import t from 'tap';
import { MfaError } from '../../mfa/service.js';
import { errorCode, IP, MINUTE, mfaHarness, STEP_MS } from '../helpers/mfa.js';

const WRONG = { method: 'totp', code: '000000' } as const;

/** A wrong code that is surely not the right one for this secret at this time. */
function wrongCode(right: string): { method: 'totp'; code: string } {
  return { method: 'totp', code: right === '000000' ? '111111' : WRONG.code };
}

t.test('five failures lock the user for 15 minutes: even the right code is refused; then it passes', async (t) => {
  const h = mfaHarness();
  t.teardown(() => h.close());
  const secret = await h.registerApp('alice');
  t.equal((await h.svc.status('alice')).locked_until, null);
  for (let i = 1; i <= 4; i++) {
    t.equal(await errorCode(() => h.svc.verify('alice', IP, wrongCode(h.totp(secret)))), 'factor-failed', `failure ${i}`);
    h.advance(10_000);
  }
  t.equal((await h.svc.status('alice')).locked_until, null, 'four failures: not locked');
  const lockedAt = h.clock.now;
  t.equal(await errorCode(() => h.svc.verify('alice', IP, wrongCode(h.totp(secret)))), 'factor-failed', 'the fifth failure is reported as a wrong code');
  const until = new Date(lockedAt + 15 * MINUTE).toISOString();
  t.equal((await h.svc.status('alice')).locked_until, until, 'status shows the lock and when it ends');

  h.advance(1000);
  let err: unknown;
  try {
    await h.svc.verify('alice', IP, { method: 'totp', code: h.totp(secret) });
  } catch (e) {
    err = e;
  }
  t.ok(err instanceof MfaError);
  t.match(err, { code: 'locked', status: 423, retryAfterMs: 15 * MINUTE - 1000 }, 'the right code is refused while locked, with the time to wait');
  t.equal(await errorCode(() => h.svc.verify('alice', '198.51.100.2', { method: 'totp', code: h.totp(secret) })), 'locked', 'from any address');
  t.equal(await errorCode(() => h.svc.sendLoginCode('alice', IP)), 'not-registered', '(no address registered: that is said first)');
  t.equal(await errorCode(() => h.svc.backupGenerate('alice', IP, { method: 'totp', code: h.totp(secret) })), 'locked', 'changes that need a proof are locked too');
  t.equal(await errorCode(() => h.svc.disable('alice', IP, { method: 'totp', code: h.totp(secret) })), 'locked', 'disabling too');
  t.equal(await h.records.mfa.failuresOfUser('alice', 0), 5, 'attempts while locked are not counted as more failures');

  h.clock.now = lockedAt + 15 * MINUTE - 1;
  t.equal(await errorCode(() => h.svc.verify('alice', IP, { method: 'totp', code: h.totp(secret) })), 'locked', 'still locked 1 ms before the end');
  t.not((await h.svc.status('alice')).locked_until, null);
  h.clock.now = lockedAt + 15 * MINUTE;
  t.equal((await h.svc.status('alice')).locked_until, null, 'the lock has expired');
  const g = await h.svc.verify('alice', IP, { method: 'totp', code: h.totp(secret) });
  t.equal(g.ip, IP, 'the right code passes once the lock expired');
  t.equal(await h.records.mfa.failuresOfUser('alice', 0), 0, 'the pass cleared the failures');

  const audit = await h.records.auditOf('alice', 100);
  const locks = audit.filter((a) => a.action === 'user-locked');
  t.equal(locks.length, 1, 'the lock is in the audit log');
  t.match(locks[0], { user: 'alice', ip: IP, detail: { until } });
  t.ok(
    h.lines.some((l) => /"event":"user-locked"/.test(l) && l.includes('"user":"alice"')),
    'and in the log',
  );
});

t.test('failures older than the window do not count', async (t) => {
  const h = mfaHarness();
  t.teardown(() => h.close());
  const secret = await h.registerApp('alice');
  for (let i = 0; i < 4; i++) await errorCode(() => h.svc.verify('alice', IP, wrongCode(h.totp(secret))));
  h.advance(15 * MINUTE);
  for (let i = 0; i < 4; i++) {
    t.equal(await errorCode(() => h.svc.verify('alice', IP, wrongCode(h.totp(secret)))), 'factor-failed');
  }
  t.equal((await h.svc.status('alice')).locked_until, null, '4 + 4 failures, 15 minutes apart: not locked');
  t.equal(await errorCode(() => h.svc.verify('alice', IP, wrongCode(h.totp(secret)))), 'factor-failed');
  t.not((await h.svc.status('alice')).locked_until, null, 'the fifth inside the window locks');
});

t.test('every kind of failed code counts: app confirmation, address confirmation, e-mailed and backup codes', async (t) => {
  const h = mfaHarness();
  t.teardown(() => h.close());
  const { secret } = await h.svc.totpBegin('alice', IP, undefined);
  const right = h.totp(secret);
  t.equal(await errorCode(() => h.svc.totpConfirm('alice', IP, right === '000000' ? '111111' : '000000')), 'factor-failed');
  await h.svc.totpConfirm('alice', IP, right);
  t.equal(await h.records.mfa.failuresOfUser('alice', 0), 0, 'a passed confirmation clears the count');
  h.advance(STEP_MS);
  await h.svc.emailRegister('alice', IP, 'alice@example.com', { method: 'totp', code: h.totp(secret) });
  const sent = h.mailer.lastCode('alice@example.com');
  t.equal(await errorCode(() => h.svc.emailConfirm('alice', IP, sent === '000000' ? '111111' : '000000')), 'factor-failed');
  t.equal(await errorCode(() => h.svc.verify('alice', IP, { method: 'backup', code: 'aaaaa-aaaaa' })), 'factor-failed');
  t.equal(await errorCode(() => h.svc.verify('alice', IP, { method: 'email', code: '12345678' })), 'factor-failed');
  t.equal(await errorCode(() => h.svc.verify('alice', IP, wrongCode(h.totp(secret)))), 'factor-failed');
  t.equal(await h.records.mfa.failuresOfUser('alice', 0), 4);
  t.equal((await h.svc.status('alice')).locked_until, null);
  t.equal(await errorCode(() => h.svc.emailConfirm('alice', IP, sent === '000000' ? '111111' : '000000')), 'factor-failed');
  t.not((await h.svc.status('alice')).locked_until, null, 'the fifth, of any kind, locks');
  t.equal(await errorCode(() => h.svc.emailConfirm('alice', IP, sent)), 'locked', 'confirming the address waits too');
  t.equal(await errorCode(() => h.svc.totpConfirm('alice', IP, '123456')), 'locked', 'and an app confirmation');
});

t.test('the limits are configurable', async (t) => {
  const h = mfaHarness({ toml: '[lockout]\nmax_failures = 3\nwindow = "5m"\nduration = "1h"\n' });
  t.teardown(() => h.close());
  t.same(h.config.lockout, { maxFailures: 3, windowMs: 5 * MINUTE, durationMs: 60 * MINUTE, ipMaxFailures: 50 });
  const secret = await h.registerApp('alice');
  await errorCode(() => h.svc.verify('alice', IP, wrongCode(h.totp(secret))));
  await errorCode(() => h.svc.verify('alice', IP, wrongCode(h.totp(secret))));
  h.advance(5 * MINUTE);
  await errorCode(() => h.svc.verify('alice', IP, wrongCode(h.totp(secret))));
  t.equal((await h.svc.status('alice')).locked_until, null, 'the first two fell out of the 5-minute window');
  await errorCode(() => h.svc.verify('alice', IP, wrongCode(h.totp(secret))));
  const t3 = h.clock.now;
  await errorCode(() => h.svc.verify('alice', IP, wrongCode(h.totp(secret))));
  t.equal((await h.svc.status('alice')).locked_until, new Date(t3 + 60 * MINUTE).toISOString(), 'three in 5 minutes lock for an hour');
  h.advance(59 * MINUTE);
  t.equal(await errorCode(() => h.svc.verify('alice', IP, { method: 'totp', code: h.totp(secret) })), 'locked');
  h.advance(MINUTE);
  t.ok(await h.svc.verify('alice', IP, { method: 'totp', code: h.totp(secret) }), 'after the hour');
});

t.test('the helpdesk unlocks a user; the audit log names who', async (t) => {
  const h = mfaHarness();
  t.teardown(() => h.close());
  const secret = await h.registerApp('alice');
  t.equal(await h.svc.unlock('alice', 'helpdesk:tanaka'), false, 'not locked: nothing to do');
  for (let i = 0; i < 5; i++) await errorCode(() => h.svc.verify('alice', IP, wrongCode(h.totp(secret))));
  t.not((await h.svc.status('alice')).locked_until, null);
  h.advance(MINUTE);
  t.equal(await h.svc.unlock('alice', 'helpdesk:tanaka'), true, 'was locked');
  t.equal((await h.svc.status('alice')).locked_until, null);
  t.equal(await h.records.mfa.failuresOfUser('alice', 0), 0, 'the failures are forgotten too');
  // One more failure does not lock again at once.
  t.equal(await errorCode(() => h.svc.verify('alice', IP, wrongCode(h.totp(secret)))), 'factor-failed');
  t.equal((await h.svc.status('alice')).locked_until, null, 'a new failure after the unlock does not re-lock');
  t.ok(await h.svc.verify('alice', IP, { method: 'totp', code: h.totp(secret) }), 'the right code passes');
  t.match(
    (await h.records.auditOf('alice', 50)).find((a) => a.action === 'user-unlock'),
    { actor: 'helpdesk:tanaka', user: 'alice' },
  );
  t.equal(await h.svc.unlock('nobody-here', 'helpdesk'), false, 'an unknown user: false, no error');
});

t.test('a per-address limit across users: guessing many users from one address is stopped', async (t) => {
  const h = mfaHarness({ toml: '[lockout]\nip_max_failures = 6\n' });
  t.teardown(() => h.close());
  const secrets = new Map<string, string>();
  for (const u of ['u1', 'u2', 'u3', 'u4']) secrets.set(u, await h.registerApp(u));
  const attacker = '192.0.2.66';
  for (const u of ['u1', 'u2', 'u3']) {
    for (let i = 0; i < 2; i++) {
      t.equal(await errorCode(() => h.svc.verify(u, attacker, wrongCode(h.totp(secrets.get(u) ?? '')))), 'factor-failed');
    }
  }
  for (const u of ['u1', 'u2', 'u3']) t.equal((await h.svc.status(u)).locked_until, null, `${u} has 2 failures: not locked`);
  // The address has 6 failures: the next attempt from it is refused, for any user, even with the right code.
  let err: unknown;
  try {
    await h.svc.verify('u4', attacker, { method: 'totp', code: h.totp(secrets.get('u4') ?? '') });
  } catch (e) {
    err = e;
  }
  t.match(err, { code: 'rate-limited', status: 429 }, 'the right code of another user is refused from that address');
  t.equal(await errorCode(() => h.svc.verify('new-name', attacker, WRONG)), 'rate-limited', 'guessed names too');
  t.equal(await h.records.mfa.failuresOfBlock(attacker, 0), 6, 'refused attempts are not recorded as more failures');
  const g = await h.svc.verify('u4', '198.51.100.4', { method: 'totp', code: h.totp(secrets.get('u4') ?? '') });
  t.equal(g.ip, '198.51.100.4', 'another address is not affected');
  h.advance(15 * MINUTE);
  t.ok(await h.svc.verify('u1', attacker, { method: 'totp', code: h.totp(secrets.get('u1') ?? '') }), 'after the window the address may try again');
});

t.test('status: locked_until is null, an ISO time while locked, null again once expired', async (t) => {
  const h = mfaHarness();
  t.teardown(() => h.close());
  t.equal((await h.svc.status('nobody')).locked_until, null, 'an unknown user');
  const secret = await h.registerApp('alice');
  for (let i = 0; i < 5; i++) await errorCode(() => h.svc.verify('alice', IP, wrongCode(h.totp(secret))));
  const s = await h.svc.status('alice');
  t.match(s.locked_until, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
  t.equal(Date.parse(s.locked_until ?? ''), h.clock.now + 15 * MINUTE);
  h.advance(15 * MINUTE);
  t.equal((await h.svc.status('alice')).locked_until, null);
});
