// The アプリ用パスコード / App passcodes part of the MFA page over real HTTP (in-process server, real store and
// PasscodeService with its scrypt hashes, fake password check): hidden when [app_passcodes] is off, asks for a
// factor first, the form's errors next to their fields, a code required, the passcode shown once with how to
// type it in, listed with its last use, removed; at most max_per_user. The real Dovecot and browser flow is in
// browser-passcodes.test.ts.
import t, { type Test } from 'tap';
import { TEXT } from '../../web/i18n.js';
import { type WebClient, type WebRig, formOf, hasId, innerHtml, notices, startWeb, textOf, unescapeHtml, wrongCode } from '../helpers/web.js';

const en = TEXT.en;
const ja = TEXT.ja;
const ON = '[app_passcodes]\nenabled = true\n';
const OUTSIDE = '127.0.0.9';

async function rig(t: Test, toml = ON): Promise<WebRig> {
  const r = await startWeb({ toml });
  t.teardown(() => r.close());
  return r;
}

/** Posts the create form as a browser would: its hidden fields, the name, each ticked protocol, the proof. */
async function create(c: WebClient, name: string, protocols: string[], proof: { method: string; code: string }) {
  const page = await c.get('/settings');
  const f = formOf(page.body, 'passcode-add');
  if (!f) throw new Error(`no passcode form on the settings page:\n${page.body.slice(0, 3000)}`);
  const body = new URLSearchParams(Object.entries(f.hidden));
  body.set('name', name);
  for (const p of protocols) body.append('protocol', p);
  body.set('method', proof.method);
  body.set('code', proof.code);
  return c.request('POST', f.action, body.toString(), { 'Content-Type': 'application/x-www-form-urlencoded' });
}

const rows = (page: string) => [...page.matchAll(/<tr data-passcode="(\d+)">(.*?)<\/tr>/g)].map((m) => ({ id: Number(m[1]), text: unescapeHtml((m[2] ?? '').replace(/<[^>]+>/g, ' ')).replace(/\s+/g, ' ').trim() }));

t.test('off by default: no part on the page, and its form does nothing', async (t) => {
  const w = await rig(t, '');
  await w.h.registerApp('alice');
  const c = w.client({ localAddress: OUTSIDE });
  t.equal((await c.signIn('alice', 'alice-pw')).status, 303);
  const page = await c.get('/settings');
  t.notOk(hasId(page.body, 'h-passcodes'), 'no app passcodes part');
  const r = await c.post('/passcodes/add', { name: 'iPhone', method: 'totp', code: '000000' });
  t.equal(r.location, '/settings');
  t.same(await w.h.svc.passcodeList('alice'), [], 'nothing made');
});

t.test('a factor first', async (t) => {
  const w = await rig(t);
  const c = w.client({ localAddress: OUTSIDE });
  t.equal((await c.signIn('alice', 'alice-pw')).status, 303);
  const page = await c.get('/settings');
  t.equal(textOf(page.body, 'h-passcodes'), en.pc.section);
  t.ok(page.body.includes(en.pc.needsFactor), 'says to register a factor first');
  t.notOk(formOf(page.body, 'passcode-add'), 'no form');
});

t.test('make one: the errors, then the passcode shown once, listed, working, removed', async (t) => {
  const w = await rig(t);
  const secret = await w.h.registerApp('alice');
  const c = w.client({ localAddress: OUTSIDE });
  t.equal((await c.signIn('alice', 'alice-pw')).status, 303);
  let page = await c.get('/settings');
  t.equal(textOf(page.body, 'no-passcodes'), en.pc.none);
  const form = innerHtml(page.body, 'passcode-add') ?? '';
  for (const p of ['imap', 'pop3', 'smtp', 'sieve']) t.match(form, new RegExp(`name="protocol" value="${p}" checked`), `${p} ticked by default`);

  let r = await create(c, '', ['imap'], { method: 'totp', code: w.h.totp(secret) });
  t.equal(r.status, 400);
  t.equal(textOf(r.body, 'passcode-add-name-error'), en.pc.errName, 'no name: said next to the field');
  r = await create(c, 'iPhone', [], { method: 'totp', code: w.h.totp(secret) });
  t.equal(textOf(r.body, 'passcode-add-protocols-error'), en.pc.errProtocols, 'nothing ticked');
  t.match(r.body, /id="passcode-add-name"[^>]*value="iPhone"/, 'the name is kept');
  r = await create(c, 'x'.repeat(65), ['imap'], { method: 'totp', code: w.h.totp(secret) });
  t.equal(textOf(r.body, 'passcode-add-name-error'), en.pc.errName, 'a name too long');
  r = await create(c, 'iPhone', ['imap', 'smtp'], { method: 'totp', code: '' });
  t.equal(textOf(r.body, 'passcode-add-code-error'), en.errCode, 'no code');
  r = await create(c, 'iPhone', ['imap', 'smtp'], { method: 'totp', code: wrongCode(secret, w.h.clock.now) });
  t.equal(r.status, 403);
  t.equal(textOf(r.body, 'passcode-add-code-error'), en.errors['factor-failed'], 'a wrong code');
  t.same(await w.h.svc.passcodeList('alice'), [], 'nothing made so far');

  r = await create(c, 'iPhone', ['imap', 'smtp'], { method: 'totp', code: w.h.totp(secret) });
  t.equal(r.status, 303);
  t.equal(r.location, '/settings/passcode');
  const shown = await c.get('/settings/passcode');
  t.equal(shown.status, 200);
  t.equal(shown.headers['cache-control'], 'no-store');
  const passcode = textOf(shown.body, 'passcode') ?? '';
  t.match(passcode, /^[a-hjkmnp-z]{4} [a-hjkmnp-z]{4} [a-hjkmnp-z]{4} [a-hjkmnp-z]{4}$/, 'in four groups of four letters');
  const text = unescapeHtml(shown.body);
  t.ok(text.includes(en.pc.shownFor('iPhone')) && text.includes(en.pc.shownOnce), 'for which device, and that it is shown once');
  for (const [device] of en.pc.howToSteps) t.ok(text.includes(device), `how to type it into ${device}`);
  t.notOk(w.h.lines.some((l) => l.includes(passcode.replace(/ /g, ''))), 'not logged');
  t.equal(w.h.dbBytes().indexOf(passcode.replace(/ /g, '')), -1, 'not in the store');
  const again = await c.get('/settings/passcode');
  t.equal(again.location, '/settings', 'a second look: gone');
  t.notOk(again.body.includes(passcode));

  const check = await w.h.svc.passcodes.check({ user: 'alice', passcode, ip: '198.51.100.7', protocol: 'imap', isWebmail: () => false });
  t.match(check, { ok: true, name: 'iPhone' }, 'the shown passcode is the one that works');
  t.match(await w.h.svc.passcodes.check({ user: 'alice', passcode, ip: '198.51.100.7', protocol: 'pop3', isWebmail: () => false }), { ok: false }, 'for the ticked protocols only');
  await w.h.svc.passcodes.flushUses();

  page = await c.get('/settings');
  const [row] = rows(page.body);
  t.ok(row, 'listed');
  t.match(row?.text, /^iPhone Receiving \(IMAP\), Sending \(SMTP\) \d{4}/, 'name and uses');
  t.match(row?.text, /\(198\.51\.100\.7, imap\)/, 'the last use: address and protocol');
  t.notOk(page.body.includes(passcode), 'the list never shows the passcode');

  r = await c.submit('/settings', `passcode-revoke-${row?.id}`);
  t.equal(r.location, '/settings');
  page = await c.get('/settings');
  t.ok(notices(page.body).includes(en.pc.revoked('iPhone')), 'removed, and said so');
  t.equal(rows(page.body).length, 0);
  t.match(await w.h.svc.passcodes.check({ user: 'alice', passcode, ip: '198.51.100.7', protocol: 'imap', isWebmail: () => false }), { ok: false }, 'and it no longer works');
  r = await c.post('/passcodes/revoke', { id: String(row?.id) });
  t.ok(notices((await c.get('/settings')).body).includes(en.pc.gone), 'removing it twice: already removed');
  await c.post('/passcodes/revoke', { id: 'x' });
  t.ok(notices((await c.get('/settings')).body).includes(en.pc.gone), 'a bad id: the same answer');
});

t.test("another user's passcode cannot be removed", async (t) => {
  const w = await rig(t);
  const secret = await w.h.registerApp('bob');
  const made = await w.h.svc.passcodeCreate('bob', OUTSIDE, { method: 'totp', code: w.h.totp(secret) }, 'Phone', undefined);
  const c = w.client({ localAddress: OUTSIDE });
  await w.h.registerApp('alice');
  t.equal((await c.signIn('alice', 'alice-pw')).status, 303);
  await c.get('/settings');
  await c.post('/passcodes/revoke', { id: String(made.passcode.id) });
  t.ok(notices((await c.get('/settings')).body).includes(en.pc.gone));
  t.equal((await w.h.svc.passcodeList('bob')).length, 1, "bob's passcode stays");
});

t.test('at most max_per_user', async (t) => {
  const w = await rig(t, `${ON}max_per_user = 2\n`);
  const secret = await w.h.registerApp('alice');
  const c = w.client({ localAddress: OUTSIDE });
  t.equal((await c.signIn('alice', 'alice-pw')).status, 303);
  for (const name of ['Phone', 'Tablet']) {
    t.equal((await create(c, name, ['imap'], { method: 'totp', code: w.h.totp(secret) })).status, 303, name);
    w.h.advance(30_000);
    await c.get('/settings/passcode');
  }
  const page = await c.get('/settings');
  t.equal(rows(page.body).length, 2);
  t.notOk(formOf(page.body, 'passcode-add'), 'no form at the limit');
  t.ok(unescapeHtml(page.body).includes(en.pc.max(2)), 'and why');
  const r = await c.post('/passcodes/add', { name: 'Third', protocol: 'imap', method: 'totp', code: w.h.totp(secret) });
  t.ok(notices(r.body).includes(en.pc.errMax(2)), 'posting anyway: refused, said at the top');
  t.equal((await w.h.svc.passcodeList('alice')).length, 2);
});

t.test('in Japanese', async (t) => {
  const w = await rig(t);
  const secret = await w.h.registerApp('alice');
  const c = w.client({ localAddress: OUTSIDE, lang: 'ja' });
  t.equal((await c.signIn('alice', 'alice-pw')).status, 303);
  const page = await c.get('/settings');
  t.equal(textOf(page.body, 'h-passcodes'), 'アプリ用パスコード');
  t.ok(unescapeHtml(page.body).includes(ja.pc.protocolNames['smtp'] ?? '?'), '送信 (SMTP)');
  t.equal((await create(c, 'iPhone', ['imap', 'pop3', 'smtp'], { method: 'totp', code: w.h.totp(secret) })).status, 303);
  const shown = unescapeHtml((await c.get('/settings/passcode')).body);
  t.ok(shown.includes(ja.pc.shownOnce) && shown.includes('iPhone / iPad (メール)'), 'shown once, with the steps in Japanese');
});
