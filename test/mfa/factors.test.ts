// Factors as a whole: backup codes, enable/disable, the last factor, the helpdesk reset, grants from a passed
// factor, the audit log of every attempt and change, and no secret or code in any log line.
import t from 'tap';
import { errorCode, failingMailError, IP, MINUTE, mfaHarness, settle, STEP_MS } from '../helpers/mfa.js';

const HOUR = 60 * MINUTE;
const ADDR = 'alice.private@example.com';
const totp = (code: string) => ({ method: 'totp', code }) as const;
const backup = (code: string) => ({ method: 'backup', code }) as const;
const email = (code: string) => ({ method: 'email', code }) as const;

t.test('backup codes: ten, single use, forgiving in form, a new set voids the old', async (t) => {
  const h = mfaHarness();
  t.teardown(() => h.close());
  t.equal(await errorCode(() => h.svc.backupGenerate('alice', IP, undefined)), 'no-factor', 'none without a registered factor');
  const secret = await h.registerApp('alice');
  t.equal(await errorCode(() => h.svc.backupGenerate('alice', IP, undefined)), 'proof-required');
  const { codes } = await h.svc.backupGenerate('alice', IP, totp(h.totp(secret)));
  t.equal(codes.length, 10);
  t.equal(new Set(codes).size, 10, 'all different');
  for (const c of codes) t.match(c, /^[23456789abcdefghjkmnpqrstuvwxyz]{5}-[23456789abcdefghjkmnpqrstuvwxyz]{5}$/);
  t.equal((await h.svc.status('alice')).factors.backup_codes_left, 10);
  const [c0, c1, c2, c3] = codes as [string, string, string, string];

  const g = await h.svc.verify('alice', IP, backup(c0));
  t.equal(g.method, 'backup', 'a backup code creates a grant');
  t.equal(await errorCode(() => h.svc.verify('alice', IP, backup(c0))), 'factor-failed', 'used once');
  t.ok(await h.svc.verify('alice', IP, backup(c1.toUpperCase())), 'upper case');
  t.ok(await h.svc.verify('alice', IP, backup(` ${c2.replace('-', '')} `)), 'without the dash, with spaces');
  t.equal((await h.svc.status('alice')).factors.backup_codes_left, 7);
  t.equal(await errorCode(() => h.svc.verify('bob', IP, backup(c3))), 'factor-failed', "alice's code is not bob's");

  // A backup code is a proof too: regenerate with one.
  const again = await h.svc.backupGenerate('alice', IP, backup(c3));
  t.equal((await h.svc.status('alice')).factors.backup_codes_left, 10, 'a full new set');
  for (const old of codes.slice(4, 7)) t.equal(await errorCode(() => h.svc.verify('alice', IP, backup(old))), 'factor-failed', 'an unused code of the old set is void');
  t.ok(await h.svc.verify('alice', IP, backup(again.codes[0] ?? '')), 'the new set works');

  h.store.db.pragma('wal_checkpoint(FULL)');
  const bytes = h.dbBytes();
  for (const c of [...codes, ...again.codes]) {
    t.equal(bytes.indexOf(c), -1, 'backup code not in the file');
    t.equal(bytes.indexOf(c.replace('-', '')), -1, 'nor its normalised form');
  }
});

t.test('enable needs a registered factor; disable needs a passed factor', async (t) => {
  const h = mfaHarness();
  t.teardown(() => h.close());
  t.equal(await errorCode(() => h.svc.enable('alice', IP)), 'no-factor');
  t.equal((await h.svc.status('alice')).mfa_enabled, false);
  const secret = await h.registerApp('alice');
  t.same(await h.svc.enable('alice', IP), { mfa_enabled: true });
  t.match(await h.svc.status('alice'), { mfa_enabled: true, mfa_required: true });
  t.equal((await h.records.getUser('alice'))?.mfaEnabled, true);
  t.equal(await errorCode(() => h.svc.disable('alice', IP, undefined)), 'proof-required');
  t.equal(await errorCode(() => h.svc.disable('alice', IP, totp(h.totp(secret) === '000000' ? '111111' : '000000'))), 'factor-failed');
  t.equal(await errorCode(() => h.svc.disable('alice', IP, { method: 'sms', code: '1' })), 'bad-request');
  t.equal((await h.records.getUser('alice'))?.mfaEnabled, true, 'still enabled');
  t.same(await h.svc.disable('alice', IP, totp(h.totp(secret))), { mfa_enabled: false });
  t.equal((await h.records.getUser('alice'))?.mfaEnabled, false);
  const actions = (await h.records.auditOf('alice', 50)).map((a) => a.action);
  t.ok(actions.includes('user-enable') && actions.includes('user-disable'), 'both are audited');
});

t.test('the last factor cannot be removed while MFA is enabled', async (t) => {
  const h = mfaHarness();
  t.teardown(() => h.close());
  const secret = await h.registerApp('alice');
  await h.svc.enable('alice', IP);
  const code = h.totp(secret);
  t.equal(await errorCode(() => h.svc.totpRemove('alice', IP, totp(code))), 'conflict', 'the app is the only factor');
  t.equal((await h.records.mfa.factors('alice'))?.totpSecret != null, true, 'still registered');
  t.ok(await h.svc.verify('alice', IP, totp(code)), 'the refused removal did not use up the code');

  h.advance(STEP_MS);
  await h.svc.emailRegister('alice', IP, ADDR, totp(h.totp(secret)));
  await h.svc.emailConfirm('alice', IP, h.mailer.lastCode(ADDR));
  h.advance(STEP_MS);
  t.equal(await errorCode(() => h.svc.totpRemove('alice', IP, undefined)), 'proof-required', 'with two factors: removal needs a proof');
  await h.svc.totpRemove('alice', IP, totp(h.totp(secret)));
  t.equal((await h.svc.status('alice')).factors.totp, false, 'the app is removed; the address remains');
  await h.svc.sendLoginCode('alice', IP);
  t.equal(await errorCode(() => h.svc.emailRemove('alice', IP, email(h.mailer.lastCode(ADDR)))), 'conflict', 'now the address is the last');
  t.equal(await errorCode(() => h.svc.totpRemove('alice', IP, undefined)), 'not-registered');

  await h.svc.disable('alice', IP, email(h.mailer.lastCode(ADDR)));
  h.advance(MINUTE);
  await h.svc.sendLoginCode('alice', IP);
  await h.svc.emailRemove('alice', IP, email(h.mailer.lastCode(ADDR)));
  t.match(await h.svc.status('alice'), { mfa_enabled: false, factors: { totp: false, email: null } }, 'with MFA disabled the last factor may go');
});

t.test('a passed factor creates a 14-hour grant for the address block; the user sees and revokes their grants', async (t) => {
  const h = mfaHarness();
  t.teardown(() => h.close());
  const secret = await h.registerApp('alice');
  await h.svc.enable('alice', IP);
  t.match(await h.svc.status('alice', IP), { login: { ip: IP, needs_mfa: true } });
  const g = await h.svc.verify('alice', IP, totp(h.totp(secret)));
  t.same(g, {
    id: g.id,
    block: IP,
    ip: IP,
    created_at: new Date(h.clock.now).toISOString(),
    expires_at: new Date(h.clock.now + 14 * HOUR).toISOString(),
    method: 'totp',
  });
  t.match(await h.svc.status('alice', IP), { login: { needs_mfa: false }, grants: [{ id: g.id }] });
  h.advance(STEP_MS);
  const v6 = await h.svc.verify('alice', '2001:db8:1:2:aaaa::1', totp(h.totp(secret)));
  t.equal(v6.block, '2001:db8:1:2::/64', 'IPv6: the /64');
  t.equal(await errorCode(() => h.svc.verify('alice', 'not-an-ip', totp(h.totp(secret, STEP_MS)))), 'bad-request');
  t.equal(await errorCode(() => h.svc.verify('alice', IP, undefined)), 'bad-request');
  t.equal(await errorCode(() => h.svc.verify('alice', IP, { method: 'totp' })), 'bad-request');

  t.equal((await h.svc.grants('alice')).length, 2);
  t.equal(await errorCode(() => h.svc.revokeGrant('bob', IP, g.id)), 'not-registered', "bob cannot revoke alice's grant");
  t.equal((await h.svc.revokeGrant('alice', '198.51.100.5', g.id)).id, g.id);
  t.equal(await errorCode(() => h.svc.revokeGrant('alice', IP, g.id)), 'conflict', 'already revoked');
  t.match(await h.svc.status('alice', IP), { login: { needs_mfa: true } });
  h.clock.now = Date.parse(v6.expires_at);
  t.equal((await h.svc.grants('alice')).length, 0, 'the other expired after 14 hours');
});

t.test('a grant notice goes to the registered address (unless turned off)', async (t) => {
  for (const notify of [true, false]) {
    const h = mfaHarness(notify ? {} : { toml: '[mail]\nnotify = false\n' });
    t.teardown(() => h.close());
    await h.registerEmail('alice', ADDR);
    const secret = await h.registerApp('alice').catch(() => undefined);
    t.equal(secret, undefined, '(the app needs a proof now)');
    await h.svc.sendLoginCode('alice', IP);
    const before = h.mailer.sent.length;
    await h.svc.verify('alice', '198.51.100.77', email(h.mailer.lastCode()));
    await settle();
    if (notify) {
      t.equal(h.mailer.sent.length, before + 1);
      t.equal(h.mailer.last().to, ADDR);
      t.match(h.mailer.last().text, '198.51.100.77');
    } else {
      t.equal(h.mailer.sent.length, before, 'notify = false: no notice');
    }
  }
  // A notice that cannot be sent does not undo the grant.
  const h = mfaHarness();
  t.teardown(() => h.close());
  await h.registerEmail('alice', ADDR);
  await h.svc.sendLoginCode('alice', IP);
  const code = h.mailer.lastCode();
  h.mailer.failWith = failingMailError();
  t.ok(await h.svc.verify('alice', IP, email(code)));
  await settle();
  t.equal((await h.svc.grants('alice')).length, 1);
  t.ok(h.lines.some((l) => /"event":"notice-not-sent"/.test(l)));
});

t.test('reset: factors, backup codes and app passcodes gone, grants revoked, MFA still required, registration open again', async (t) => {
  const h = mfaHarness({ toml: '[app_passcodes]\nenabled = true\n' });
  t.teardown(() => h.close());
  t.equal(await errorCode(() => h.svc.reset('nobody', 'helpdesk', 'lost phone')), 'not-registered');
  const secret = await h.registerApp('alice');
  await h.svc.emailRegister('alice', IP, ADDR, totp(h.totp(secret)));
  await h.svc.emailConfirm('alice', IP, h.mailer.lastCode(ADDR));
  h.advance(STEP_MS);
  const { codes } = await h.svc.backupGenerate('alice', IP, totp(h.totp(secret)));
  await h.svc.enable('alice', IP);
  h.advance(STEP_MS);
  await h.svc.verify('alice', IP, totp(h.totp(secret)));
  await h.svc.verify('alice', '198.51.100.1', backup(codes[0] ?? ''));
  h.advance(MINUTE);
  await h.svc.sendLoginCode('alice', IP);
  const pendingCode = h.mailer.lastCode(ADDR);
  t.equal((await h.svc.grants('alice')).length, 2);
  h.advance(STEP_MS);
  const phone = await h.svc.passcodeCreate('alice', IP, totp(h.totp(secret)), 'iPhone', undefined);

  const r = await h.svc.reset('alice', 'helpdesk:sato', 'lost phone');
  t.same(r, { grantsRevoked: 2, passcodesRevoked: 1 });
  t.match(await h.svc.passcodes.check({ user: 'alice', passcode: phone.code, ip: IP, protocol: 'imap', isWebmail: () => false }), { ok: false }, "the lost phone's passcode no longer works");
  const s = await h.svc.status('alice', IP);
  t.match(s, {
    mfa_enabled: true,
    mfa_required: true,
    factors: { totp: false, email: null, email_pending: null, backup_codes_left: 0 },
    locked_until: null,
    grants: [],
    login: { needs_mfa: true },
  });
  t.equal(await h.records.mfa.factors('alice'), undefined, 'the factor row is gone, seeds and all');
  t.equal(await errorCode(() => h.svc.verify('alice', IP, backup(codes[1] ?? ''))), 'factor-failed', 'backup codes are gone');
  t.equal(await errorCode(() => h.svc.verify('alice', IP, email(pendingCode))), 'factor-failed', 'a code sent before is void');
  t.equal(await errorCode(() => h.svc.verify('alice', IP, totp(h.totp(secret)))), 'factor-failed', 'the old app is gone');
  t.equal((await h.records.listGrants({ user: 'alice', now: h.clock.now, all: true })).every((g) => g.revokedBy === 'helpdesk:sato'), true);
  t.match((await h.records.auditOf('alice', 100)).find((a) => a.action === 'user-reset'), { actor: 'helpdesk:sato', detail: { reason: 'lost phone', grants_revoked: 2, passcodes_revoked: 1 } });
  // First registration trusts the password again.
  const fresh = await h.svc.totpBegin('alice', IP, undefined);
  t.ok(fresh.secret);
});

t.test('reset also clears a lock', async (t) => {
  const h = mfaHarness();
  t.teardown(() => h.close());
  const secret = await h.registerApp('alice');
  for (let i = 0; i < 5; i++) await errorCode(() => h.svc.verify('alice', IP, totp(h.totp(secret) === '000000' ? '111111' : '000000')));
  t.not((await h.svc.status('alice')).locked_until, null);
  await h.svc.reset('alice', 'helpdesk', '');
  t.equal((await h.svc.status('alice')).locked_until, null);
});

t.test('the audit log has every attempt, registration, removal, grant and revoke, with user, address, method and result', async (t) => {
  const h = mfaHarness();
  t.teardown(() => h.close());
  const A = '198.51.100.21';
  const wrong = (right: string) => (right === '000000' ? '111111' : '000000');
  const { secret } = await h.svc.totpBegin('alice', A, undefined);
  await errorCode(() => h.svc.totpConfirm('alice', A, wrong(h.totp(secret))));
  await h.svc.totpConfirm('alice', A, h.totp(secret));
  h.advance(STEP_MS);
  await h.svc.emailRegister('alice', A, ADDR, totp(h.totp(secret)));
  await h.svc.emailConfirm('alice', A, h.mailer.lastCode(ADDR));
  h.advance(STEP_MS);
  await errorCode(() => h.svc.backupGenerate('alice', A, backup('aaaaa-bbbbb')));
  const { codes } = await h.svc.backupGenerate('alice', A, totp(h.totp(secret)));
  h.advance(MINUTE);
  await h.svc.sendLoginCode('alice', A);
  const login = h.mailer.lastCode(ADDR);
  const g = await h.svc.verify('alice', A, email(login));
  await errorCode(() => h.svc.verify('alice', A, email(login)));
  await h.svc.revokeGrant('alice', A, g.id);
  await h.svc.totpRemove('alice', A, backup(codes[0] ?? ''));
  // Lock the user, then try once more: the refused attempt is recorded too.
  for (let i = 0; i < 5; i++) await errorCode(() => h.svc.verify('alice', A, backup('zzzzz-zzzzz')));
  t.equal(await errorCode(() => h.svc.verify('alice', A, backup(codes[1] ?? ''))), 'locked');

  const rows = (await h.records.auditOf('alice', 1000)).reverse();
  t.ok(rows.every((r) => r.user === 'alice'), 'every row names the user');
  const of = (action: string) => rows.filter((r) => r.action === action);
  t.same(
    rows.map((r) => r.action),
    [
      'totp-begin',
      'factor-fail',
      'totp-register',
      'factor-pass',
      'email-register',
      'email-verified',
      'factor-fail',
      'factor-pass',
      'backup-generate',
      'email-code-sent',
      'grant-add',
      'factor-pass',
      'factor-fail',
      'grant-revoke',
      'factor-pass',
      'totp-remove',
      'factor-fail',
      'factor-fail',
      'factor-fail',
      'factor-fail',
      'factor-fail',
      'user-locked',
      'factor-refused',
    ],
    'each attempt and change, in order',
  );
  t.ok(rows.every((r) => r.ip === A), 'every row names the client address');
  t.same(
    of('factor-fail').map((r) => r.detail['method']),
    ['totp', 'backup', 'email', 'backup', 'backup', 'backup', 'backup', 'backup'],
    'failed attempts name their method',
  );
  t.same(
    of('factor-pass').map((r) => r.detail['method']),
    ['totp', 'totp', 'email', 'backup'],
    'passed attempts name their method, also those that prove a change',
  );
  t.equal(of('factor-pass')[2]?.grantId, g.id, 'the pass that created the grant names it');
  t.match(of('grant-add')[0], { grantId: g.id, actor: 'api', detail: { method: 'email' } });
  t.match(of('grant-revoke')[0], { grantId: g.id, detail: { reason: new RegExp(A.replace(/\./g, '\\.')) } });
  t.match(of('factor-refused')[0], { detail: { method: 'backup', result: 'locked' } }, 'a refused attempt names method and result');
  t.match(of('email-register')[0], { detail: { address: 'a***@example.com' } });
});

t.test('no secret, code or key in any log line, audit detail or error message, through a whole flow', async (t) => {
  const h = mfaHarness();
  t.teardown(() => h.close());
  const secrets: string[] = [h.key.toString('base64'), h.key.toString('hex')];
  const messages: string[] = [];
  const attempt = async (fn: () => unknown) => {
    try {
      await fn();
    } catch (e) {
      messages.push(e instanceof Error ? e.message : String(e));
    }
  };
  const { secret, uri } = await h.svc.totpBegin('alice', IP, undefined);
  secrets.push(secret);
  await attempt(() => h.svc.totpConfirm('alice', IP, '000000'));
  const first = h.totp(secret);
  secrets.push(first);
  await h.svc.totpConfirm('alice', IP, first);
  h.advance(STEP_MS);
  const proof = h.totp(secret);
  secrets.push(proof);
  await h.svc.emailRegister('alice', IP, ADDR, totp(proof));
  const confirm = h.mailer.lastCode(ADDR);
  secrets.push(confirm);
  await attempt(() => h.svc.emailConfirm('alice', IP, confirm.split('').reverse().join('')));
  await h.svc.emailConfirm('alice', IP, confirm);
  h.advance(STEP_MS);
  const proof2 = h.totp(secret);
  secrets.push(proof2);
  const { codes } = await h.svc.backupGenerate('alice', IP, totp(proof2));
  secrets.push(...codes, ...codes.map((c) => c.replace('-', '')));
  await h.svc.enable('alice', IP);
  await h.svc.sendLoginCode('alice', IP);
  const login = h.mailer.lastCode(ADDR);
  secrets.push(login);
  await h.svc.verify('alice', IP, email(login));
  await attempt(() => h.svc.verify('alice', IP, email(login)));
  await attempt(() => h.svc.verify('alice', IP, backup(codes[0]?.toUpperCase() ?? '')).then(() => h.svc.verify('alice', IP, backup(codes[0] ?? ''))));
  h.advance(STEP_MS);
  const used = h.totp(secret);
  secrets.push(used);
  await h.svc.verify('alice', IP, totp(used));
  await attempt(() => h.svc.verify('alice', IP, totp(used)));
  for (let i = 0; i < 5; i++) await attempt(() => h.svc.verify('alice', IP, totp(String(100000 + i))));
  await attempt(() => h.svc.verify('alice', IP, totp(h.totp(secret))));
  await h.svc.unlock('alice', 'helpdesk');
  h.advance(MINUTE);
  h.mailer.failWith = failingMailError();
  await attempt(() => h.svc.sendLoginCode('alice', IP));
  h.mailer.failWith = undefined;
  const desk = await h.svc.enrollAtDesk('bob', 'helpdesk');
  secrets.push(desk.secret);
  await h.svc.reset('alice', 'helpdesk', 'lost phone');
  await settle();

  t.ok(h.lines.length >= 4, `the flow logged (${h.lines.length} lines)`);
  t.ok(h.lines.some((l) => l.includes('"event":"mfa-passed"')));
  t.ok(h.lines.some((l) => l.includes('"event":"user-locked"')));
  t.ok(h.lines.some((l) => l.includes('"event":"mail-failed"')));
  t.ok(messages.length >= 8, `errors were raised (${messages.length})`);
  const audit = JSON.stringify(h.store.db.prepare('SELECT * FROM audit').all());
  for (const s of secrets) {
    t.notOk(h.lines.some((l) => l.includes(s)), `no log line holds ${s.length}-character secret #${secrets.indexOf(s)}`);
    t.notOk(audit.includes(s), `no audit row holds secret #${secrets.indexOf(s)}`);
    t.notOk(messages.some((m) => m.includes(s)), `no error message holds secret #${secrets.indexOf(s)}`);
  }
  t.notOk(h.lines.some((l) => l.includes(uri)), 'nor the otpauth URI');
  t.notOk(h.lines.some((l) => l.includes(ADDR)), 'nor the full external address');
});
