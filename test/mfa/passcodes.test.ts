// PasscodeService on its own (a real store, scrypt, the harness's clock): the passcode's shape, what a check
// accepts and refuses (wrong, revoked while remembered, expired, not for the protocol, another user's, the
// webmail's), the limits per user and per address block that never touch the site password or the factors,
// the two-minute window in which a policy request may name a passcode, the SMTP session for Postfix, last
// uses, and a row whose hash was made some other way.
import t, { type Test } from 'tap';
import { PASSCODE_ALPHABET, PASSCODE_SHAPE, groupPasscode, normalisePasscode, passcodeProtocolOf } from '../../mfa/passcodes.js';
import { type Harness, IP, MINUTE, mfaHarness } from '../helpers/mfa.js';

const TOML = '[app_passcodes]\nenabled = true\nmax_per_user = 4\n[lockout]\nmax_failures = 3\nwindow = "15m"\nip_max_failures = 5\n';
const noWebmail = () => false;

function rig(t: Test, toml = TOML): Harness {
  const h = mfaHarness({ toml });
  t.teardown(() => h.close());
  return h;
}

/** A passcode for `user`, made as the page makes it; its plain text. */
async function make(h: Harness, user = 'alice', protocols: string[] = ['imap', 'pop3', 'smtp', 'sieve'], ttlMs?: number): Promise<{ id: number; passcode: string }> {
  const p = await h.svc.passcodes.prepare(user, 'Phone', protocols, ttlMs, 'test');
  const view = await h.records.tx(() => p.insert());
  return { id: view.id, passcode: p.passcode };
}

const check = (h: Harness, passcode: string, o: { user?: string; ip?: string; protocol?: string; realIp?: string; isWebmail?: (a: string) => boolean } = {}) =>
  h.svc.passcodes.check({ user: o.user ?? 'alice', passcode, ip: o.ip ?? IP, protocol: o.protocol ?? 'imap', realIp: o.realIp, isWebmail: o.isWebmail ?? noWebmail });

t.test('the shape: 16 letters without look-alikes, typed any way', async (t) => {
  t.equal(PASSCODE_ALPHABET.length, 23);
  t.notMatch(PASSCODE_ALPHABET, /[ilo]/, 'no i, l or o');
  t.equal(normalisePasscode('ABCD-efgh jkmn\tPQRS'), 'abcdefghjkmnpqrs');
  for (const bad of ['abcdefghjkmnpqr', 'abcdefghjkmnpqrst', 'abcdefghjkmnpqrl', 'abcdefghjkmnpqr1', 'abcdéfghjkmnpqrs', '']) t.equal(normalisePasscode(bad), undefined, JSON.stringify(bad));
  t.equal(groupPasscode('abcdefghjkmnpqrs'), 'abcd efgh jkmn pqrs');
  t.equal(passcodeProtocolOf('SUBMISSION'), 'smtp', "Dovecot's submission service is SMTP");
  t.equal(passcodeProtocolOf('managesieve'), undefined);
  const h = rig(t);
  const made = await Promise.all(Array.from({ length: 4 }, (_, i) => make(h, `user${i}`)));
  t.ok(made.every((m) => PASSCODE_SHAPE.test(m.passcode)), 'made passcodes have the shape');
  t.equal(new Set(made.map((m) => m.passcode.slice(0, 5))).size, 4, 'each with a selector of its own');
  const row = await h.records.passcodes.byId(made[0]?.id ?? 0);
  t.equal(row?.kdf, 'scrypt:n=4096,r=8,p=1', 'the row says how its hash was made');
  t.equal(row?.hash.length, 32);
  t.notOk(h.dbBytes().includes(made[0]?.passcode ?? '?'), 'the passcode is not in the store');
});

t.test('what a check accepts and refuses', async (t) => {
  const h = rig(t);
  const { id, passcode } = await make(h, 'alice', ['imap', 'smtp']);
  t.match(await check(h, passcode), { ok: true, id, name: 'Phone' });
  t.match(await check(h, groupPasscode(passcode).toUpperCase()), { ok: true }, 'grouped, capitals');
  t.match(await check(h, passcode, { protocol: 'submission' }), { ok: true }, 'smtp covers submission');
  t.match(await check(h, passcode, { protocol: 'pop3' }), { ok: false, reason: 'passcode not for pop3' });
  t.match(await check(h, passcode, { user: 'bob' }), { ok: false, reason: 'no such passcode for this user' }, "another user's passcode");
  t.match(await check(h, passcode, { realIp: '192.0.2.10', isWebmail: (a) => a === '192.0.2.10' }), { ok: false, reason: /webmail/ }, 'not through the webmail');
  t.match(await check(h, passcode, { protocol: 'mfagate-web' }), { ok: false, reason: /not a protocol/ });
  const wrong = passcode.slice(0, -1) + (passcode.endsWith('a') ? 'b' : 'a');
  t.match(await check(h, wrong), { ok: false, reason: 'wrong passcode' }, 'one letter wrong (the selector is right)');
});

t.test('remembered passcodes still fail at once when revoked or expired', async (t) => {
  const h = rig(t);
  const a = await make(h);
  t.match(await check(h, a.passcode), { ok: true }, 'hashed once, remembered');
  await h.svc.passcodes.revoke('alice', a.id, 'test');
  t.match(await check(h, a.passcode), { ok: false, reason: 'revoked passcode' }, 'revoked: the next check fails');

  const b = await make(h, 'alice', ['imap'], 10 * MINUTE);
  t.match(await check(h, b.passcode), { ok: true });
  h.advance(10 * MINUTE);
  t.match(await check(h, b.passcode), { ok: false, reason: 'expired passcode' }, 'at its expiry: refused');

  // A revoke by another process (the CLI) changes only the store: still refused at once.
  const c = await make(h);
  t.match(await check(h, c.passcode), { ok: true });
  await h.records.passcodes.revoke(c.id, 'cli:root', h.clock.now);
  t.match(await check(h, c.passcode), { ok: false, reason: 'revoked passcode' }, 'revoked behind its back');
});

t.test('limits per user and per address block; the site password and the factors are not touched', async (t) => {
  const h = rig(t);
  const { passcode } = await make(h);
  const wrong = passcode.slice(0, -1) + (passcode.endsWith('a') ? 'b' : 'a');
  for (let i = 0; i < 3; i++) t.match(await check(h, wrong), { ok: false, reason: 'wrong passcode' });
  t.match(await check(h, passcode), { ok: false, limited: true, reason: /too many wrong passcodes/ }, 'after max_failures: even the right one waits');
  t.equal(await h.records.mfa.lockedUntil('alice'), undefined, 'the user is not locked for codes');
  t.equal(await h.records.mfa.failuresOfUser('alice', 0), 0, 'and no factor failure was counted');
  h.advance(15 * MINUTE + 1);
  t.match(await check(h, passcode), { ok: true }, 'after the window: works again');

  // One address guessing across users: ip_max_failures (5) per block, an IPv6 /64 being one block.
  const others = await Promise.all(['u1', 'u2', 'u3', 'u4', 'u5', 'u6'].map((u) => make(h, u)));
  for (const [i, o] of others.slice(0, 5).entries()) {
    await check(h, o.passcode.slice(0, -1) + (o.passcode.endsWith('a') ? 'b' : 'a'), { user: `u${i + 1}`, ip: `2001:db8:1:2::${i + 1}` });
  }
  t.match(await check(h, others[5]?.passcode ?? '', { user: 'u6', ip: '2001:db8:1:2::99' }), { ok: false, limited: true, reason: /address/ }, 'the /64 is over its limit');
  t.match(await check(h, others[5]?.passcode ?? '', { user: 'u6', ip: '2001:db8:1:3::1' }), { ok: true }, 'another /64 is not');
});

t.test('a policy request may name a passcode only just after its check, from that address', async (t) => {
  const h = rig(t);
  const { id, passcode } = await make(h, 'alice', ['imap']);
  const s = h.svc.passcodes;
  t.notOk(s.loginAllowed('alice', IP, id, 'imap'), 'no check yet: a passdb field alone is not believed');
  t.ok((await check(h, passcode)).ok);
  t.ok(s.loginAllowed('alice', IP, id, 'imap'), 'just checked');
  t.notOk(s.loginAllowed('alice', '198.51.100.1', id, 'imap'), 'from another address');
  t.notOk(s.loginAllowed('bob', IP, id, 'imap'), 'for another user');
  t.notOk(s.loginAllowed('alice', IP, id, 'pop3'), 'for a protocol it is not for');
  t.notOk(s.loginAllowed('alice', IP, id + 1, 'imap'), 'another id');
  h.advance(2 * MINUTE);
  t.notOk(s.loginAllowed('alice', IP, id, 'imap'), 'two minutes later');
});

t.test('SMTP: a session for Postfix after a passcode AUTH, ended by a revoke or after ten minutes', async (t) => {
  const h = rig(t);
  const { id, passcode } = await make(h, 'alice', ['smtp']);
  const s = h.svc.passcodes;
  t.equal(s.smtpSession('alice', IP), undefined, 'none before');
  t.ok((await check(h, passcode, { protocol: 'smtp' })).ok);
  s.noteSmtpSession('alice', IP, id);
  t.equal(s.smtpSession('alice', IP), id);
  t.equal(s.smtpSession('alice', '198.51.100.1'), undefined, 'only that address');
  t.equal(s.smtpSession('bob', IP), undefined, 'only that user');
  h.advance(10 * MINUTE);
  t.equal(s.smtpSession('alice', IP), undefined, 'ten minutes later');
  s.noteSmtpSession('alice', IP, id);
  await s.revoke('alice', id, 'test');
  t.equal(s.smtpSession('alice', IP), undefined, 'revoked');
  const imapOnly = await make(h, 'carol', ['imap']);
  s.noteSmtpSession('carol', IP, imapOnly.id);
  t.equal(s.smtpSession('carol', IP), undefined, 'a passcode not for smtp never stands for a session');
});

t.test('last uses are written in batches; at most max_per_user; revokeAll', async (t) => {
  const h = rig(t);
  const { id, passcode } = await make(h);
  await check(h, passcode, { ip: '198.51.100.9', protocol: 'pop3' });
  t.equal((await h.records.passcodes.byId(id))?.lastUsedAt, null, 'not yet written');
  await h.svc.passcodes.flushUses();
  t.match(await h.records.passcodes.byId(id), { lastUsedAt: h.clock.now, lastUsedIp: '198.51.100.9', lastUsedProtocol: 'pop3' });
  for (let i = 0; i < 3; i++) await make(h);
  await t.rejects(make(h), { code: 'too-many' }, 'the fifth of max_per_user = 4');
  t.equal((await h.svc.passcodes.revokeAll('alice', 'test')).length, 4);
  t.same(await h.svc.passcodes.list('alice'), []);
  t.equal((await h.svc.passcodes.list('alice', true)).length, 4, 'kept, revoked');
});

t.test('a row whose hash was made some other way never matches', async (t) => {
  const h = rig(t);
  const { id, passcode } = await make(h);
  // (A row's kdf never changes once made, so the change feed does not carry it: the copy the checks read is loaded
  // again after each edit, as a daemon started on this store would load it.)
  h.store.db.prepare('UPDATE passcodes SET kdf = ? WHERE id = ?').run('argon2id:m=65536', id);
  h.store.reloadCopy(h.copy, h.clock.now);
  t.equal(h.copy.byId(id)?.kdf, 'argon2id:m=65536', 'the check reads the edited row');
  t.match(await check(h, passcode), { ok: false, reason: 'wrong passcode' });
  h.store.db.prepare('UPDATE passcodes SET kdf = ? WHERE id = ?').run('scrypt:n=1073741824,r=8,p=1', id);
  h.store.reloadCopy(h.copy, h.clock.now);
  t.equal(h.copy.byId(id)?.kdf, 'scrypt:n=1073741824,r=8,p=1', 'the check reads the edited row');
  t.match(await check(h, passcode), { ok: false, reason: 'wrong passcode' }, 'nor an absurd cost (no hash is attempted)');
});

t.test('off: nothing is made, every check fails', async (t) => {
  const h = rig(t, '');
  t.same(h.svc.passcodeSettings(), { enabled: false, max_per_user: 20, protocols: ['imap', 'pop3', 'smtp', 'sieve'] }, 'what a webmail is told');
  await t.rejects(h.svc.passcodeCreate('alice', IP, undefined, 'Phone', undefined), { code: 'conflict', message: /not enabled/ }, 'said before a factor or a proof is looked at');
  await t.rejects(h.svc.passcodes.prepare('alice', 'Phone', ['imap'], undefined, 'test'), { code: 'disabled' });
  t.match(await check(h, 'abcdefghjkmnpqrs'), { ok: false, reason: /not enabled/ });
});
