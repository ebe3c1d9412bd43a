// The MFA web page over real HTTP (in-process server on loopback, real store, fake password check and mailer):
// security headers and cookie flags, CSRF, sign-in with session renewal, the password rate limits, idle and
// absolute session timeouts, sign-out, the client address behind a trusted proxy, passing MFA and revoking the
// grant, a base path, the language, request limits, the app enrolment, backup codes shown once, and
// first_registration = "trusted-only". The clock is the harness's, moved by hand: no sleeps.
import t, { type Test } from 'tap';
import { jst } from '../../mfa/messages.js';
import { TEXT } from '../../web/i18n.js';
import { IP, MINUTE, STEP_MS } from '../helpers/mfa.js';
import {
  type WebRig,
  cookieSet,
  formActions,
  formOf,
  hasId,
  htmlLang,
  innerHtml,
  notices,
  csrfOf,
  startWeb,
  textOf,
  wrongCode,
} from '../helpers/web.js';

const en = TEXT.en;
const ja = TEXT.ja;
const HOUR = 60 * MINUTE;
const FORM = 'application/x-www-form-urlencoded';

/** A rig closed when the (sub)test ends. */
async function rig(t: Test, toml?: string): Promise<WebRig> {
  const r = await startWeb(toml === undefined ? {} : { toml });
  t.teardown(() => r.close());
  return r;
}

const isSignInPage = (body: string) => hasId(body, 'signin') && !hasId(body, 'network-status');

t.test('security headers and cookie flags', async (t) => {
  for (const secure of [true, false]) {
    const w = await rig(t, `[web]\nsecure_cookie = ${secure}\n`);
    const c = w.client();
    const r = await c.get('/');
    t.equal(r.status, 200, 'the sign-in page');
    t.ok(isSignInPage(r.body), 'it is the sign-in form');
    t.equal(r.headers['content-type'], 'text/html; charset=utf-8');
    const csp = String(r.headers['content-security-policy'] ?? '').split(';').map((s) => s.trim());
    for (const d of ["default-src 'none'", "style-src 'self'", "form-action 'self'", "frame-ancestors 'none'"]) t.ok(csp.includes(d), `CSP has ${d}`);
    t.notOk(csp.some((d) => /unsafe-(inline|eval)|\*/.test(d)), 'CSP allows nothing unsafe');
    t.equal(r.headers['x-content-type-options'], 'nosniff');
    t.equal(r.headers['x-frame-options'], 'DENY');
    t.equal(r.headers['referrer-policy'], 'no-referrer');
    t.equal(r.headers['cache-control'], 'no-store');
    t.notOk(/<script/i.test(r.body), 'no script on the page');

    t.equal(cookieSet(r, 'mfagate_session'), undefined, 'no session before the password is right');
    const sc = cookieSet(r, 'mfagate_pre');
    t.ok(sc, "the sign-in form's nonce cookie is set");
    t.match(sc?.value ?? '', /^[A-Za-z0-9_-]{43}$/, 'an opaque 256-bit nonce');
    t.ok(sc?.attrs.has('httponly'), 'HttpOnly');
    t.equal(sc?.attrs.get('samesite'), 'Strict', 'SameSite=Strict');
    t.equal(sc?.attrs.get('path'), '/', 'Path=/');
    t.equal(sc?.attrs.has('secure'), secure, secure ? 'Secure when secure_cookie = true' : 'no Secure when secure_cookie = false');
    t.notOk(sc?.attrs.has('max-age') || sc?.attrs.has('expires'), 'a browser-session cookie');
    t.notOk(r.body.includes(sc?.value ?? '<none>'), 'the nonce is not in the page');
    t.ok(c.csrf && c.csrf !== sc?.value, 'the CSRF token in the form is not the nonce');
    t.equal(w.web.sessions.size, 0, 'loading the page kept nothing on the server');
    const again = await c.get('/');
    t.equal(cookieSet(again, 'mfagate_pre'), undefined, 'a browser that has the nonce keeps it (several tabs share it)');
    t.equal(c.csrf, csrfOf(again.body), 'and gets the same token');

    // Every other kind of response carries the headers too.
    for (const [what, res] of [
      ['a redirect', await c.get('/settings')],
      ['a 404', await c.get('/no-such-page')],
      ['the style sheet', await c.get('/style.css')],
      ['a refused POST', await c.post('/signin', {}, { csrf: null })],
    ] as const) {
      t.equal(res.headers['x-frame-options'], 'DENY', `${what}: X-Frame-Options`);
      t.equal(res.headers['x-content-type-options'], 'nosniff', `${what}: nosniff`);
      t.match(String(res.headers['content-security-policy'] ?? ''), /frame-ancestors 'none'/, `${what}: CSP`);
    }
    const css = await c.get('/style.css');
    t.equal(css.status, 200);
    t.equal(css.headers['content-type'], 'text/css; charset=utf-8');
  }
});

t.test('CSRF: the sign-in post needs the nonce cookie and its token; signed-in posts the session and its token', async (t) => {
  const w = await rig(t);
  const c = w.client();
  await c.get('/');
  const nonce = c.jar.get('mfagate_pre');
  const token = c.csrf ?? '';
  t.ok(nonce && token, 'a nonce and a token from the sign-in page');

  const creds = { user: 'alice', password: 'alice-pw' };
  let r = await c.post('/signin', creds, { csrf: null });
  t.equal(r.status, 403, 'no token');
  t.ok(r.body.includes(en.pageExpired), 'the page-expired message');
  r = await c.post('/signin', creds, { csrf: 'A'.repeat(43) });
  t.equal(r.status, 403, 'a wrong token of the right length');
  r = await c.post('/signin', creds, { csrf: token.slice(0, 10) });
  t.equal(r.status, 403, 'a prefix of the token');
  r = await c.post('/signin', creds, { csrf: `${token}x` });
  t.equal(r.status, 403, 'the token with more after it');
  const other = w.client();
  await other.get('/');
  r = await c.post('/signin', creds, { csrf: other.csrf ?? '' });
  t.equal(r.status, 403, "another browser's token");
  // A cookie planted by someone else (a sibling host can set cookies) comes without a token that matches it.
  const planted = w.client();
  planted.jar.set('mfagate_pre', 'B'.repeat(43));
  r = await planted.post('/signin', creds, { csrf: token });
  t.equal(r.status, 403, 'a planted nonce with a token made for another');
  t.equal(w.auth.calls.length, 0, 'the password was never checked');
  t.equal(c.session, undefined, 'no session was made');
  t.ok(isSignInPage((await c.get('/')).body), 'still signed out');
  t.ok(w.h.lines.some((l) => l.includes('"web-csrf"')), 'the refusal is logged');

  // No nonce cookie at all (a forged cross-site post, or cookies refused).
  const fresh = w.client();
  r = await fresh.post('/signin', creds, { csrf: token });
  t.equal(r.status, 303, 'no session: back to the start');
  t.equal(r.location, '/', 'to the sign-in page');
  t.equal(w.auth.calls.length, 0, 'the password was not checked');
  const page = await fresh.get('/');
  t.ok(isSignInPage(page.body), 'signed out');
  t.ok(notices(page.body).includes(en.pageExpired), 'with the page-expired notice');

  // The right token does work (so the refusals above are about the token).
  r = await c.post('/signin', creds);
  t.equal(r.status, 303, 'the right token signs in');
  t.ok(c.session, 'a session now');
  // Signed in, a post needs the session's own token: the sign-in token is not it.
  r = await c.post('/signout', {}, { csrf: token });
  t.equal(r.status, 403, "the sign-in form's token does not work for the session");
  t.ok(hasId((await c.get('/')).body, 'network-status'), 'still signed in');
});

t.test('sign-in: wrong password, right password with a new session id, temporary failure', async (t) => {
  const w = await rig(t);
  const c = w.client({ localAddress: '127.0.0.9' });

  let r = await c.signIn('alice', '');
  t.equal(r.status, 400, 'an empty password');
  t.equal(textOf(r.body, 'signin-password-error'), en.errRequired);
  t.equal(w.auth.calls.length, 0, 'not sent to Dovecot');

  const pre = c.jar.get('mfagate_pre');
  const preCsrf = c.csrf;
  t.equal(c.session, undefined, 'no session before the sign-in');
  r = await c.signIn('alice', 'Wr0ng-Secret-pw');
  t.equal(r.status, 401, 'a wrong password');
  t.equal(textOf(r.body, 'signin-password-error'), en.errBadPassword, 'the error is next to the password field');
  t.match(r.body, /<input id="signin-password"[^>]*aria-describedby="signin-password-error"[^>]*aria-invalid="true"/, 'the field points at its error');
  t.match(r.body, /<input id="signin-user"[^>]*value="alice"/, 'the ID is kept');
  t.notOk(r.body.includes('Wr0ng-Secret-pw'), 'the password is not echoed');
  t.notOk(w.h.lines.some((l) => l.includes('Wr0ng-Secret-pw')), 'nor logged');
  t.match(w.auth.calls[0], { user: 'alice', password: 'Wr0ng-Secret-pw', remoteIp: '127.0.0.9' }, 'checked with the client address');
  t.ok(isSignInPage((await c.get('/')).body), 'not signed in');

  r = await c.signIn('alice', 'alice-pw');
  t.equal(r.status, 303, 'the right password');
  t.equal(r.location, '/');
  const post = cookieSet(r, 'mfagate_session');
  t.ok(post, 'a session cookie is set at sign-in');
  t.not(post?.value, pre, 'a new random session id, not the nonce (no fixation)');
  t.equal(c.session, post?.value);
  const home = await c.get('/');
  t.equal(home.status, 200);
  t.ok(hasId(home.body, 'network-status'), 'the home page');
  t.ok(home.body.includes(en.signedInAs('alice')), 'signed in as alice');
  t.notOk(hasId(home.body, 'signin'), 'no sign-in form');

  // The nonce from before the sign-in is no session id.
  const old = w.client();
  old.jar.set('mfagate_session', pre ?? '');
  t.ok(isSignInPage((await old.get('/')).body), 'the nonce as a session id signs nobody in');
  // Nor does the old CSRF token work with the new session.
  r = await c.post('/signout', {}, { csrf: preCsrf ?? '' });
  t.equal(r.status, 403, 'the token from before the sign-in is void');
  t.ok(hasId((await c.get('/')).body, 'network-status'), 'still signed in');

  // Dovecot cannot be asked.
  w.auth.temporary = true;
  const d = w.client();
  r = await d.signIn('alice', 'alice-pw');
  t.equal(r.status, 503, 'temporary failure');
  t.ok(notices(r.body).includes(en.errAuthUnavailable), 'the unavailable notice');
  t.notOk(hasId(r.body, 'signin-password-error'), 'not a wrong-password error');
  t.ok(isSignInPage((await d.get('/')).body), 'not signed in');
});

t.test('password rate limit per ID', async (t) => {
  const w = await rig(t, '[lockout]\nmax_failures = 3\nwindow = "15m"\nduration = "10m"\nip_max_failures = 20\n');
  const a = w.client({ localAddress: '127.0.0.9' });
  for (let i = 0; i < 3; i++) t.equal((await a.signIn('alice', `guess-${i}`)).status, 401, `wrong password ${i + 1}`);
  t.equal(w.auth.calls.length, 3);

  let r = await a.signIn('alice', 'alice-pw');
  t.equal(r.status, 429, 'the right password is refused too');
  t.equal(textOf(r.body, 'signin-password-error'), en.errSignInLimited(10), 'next to the password field, with the wait');
  t.equal(w.auth.calls.length, 3, 'the password was not even checked');
  t.ok(isSignInPage((await a.get('/')).body), 'not signed in');

  const b = w.client({ localAddress: '127.0.0.10' });
  t.equal((await b.signIn('alice', 'alice-pw')).status, 429, 'from another address as well');
  t.equal((await b.signIn('ALICE', 'alice-pw')).status, 429, 'and in capitals');
  t.equal((await w.client({ localAddress: '127.0.0.9' }).signIn('bob', 'bob-pw')).status, 303, 'another ID from the same address is not blocked');

  w.h.advance(10 * MINUTE - 1000);
  r = await b.signIn('alice', 'alice-pw');
  t.equal(r.status, 429, 'one second before the end');
  t.equal(textOf(r.body, 'signin-password-error'), en.errSignInLimited(1));
  w.h.advance(1000);
  t.equal((await b.signIn('alice', 'alice-pw')).status, 303, 'after lockout.duration the right password works');
  t.ok(hasId((await b.get('/')).body, 'network-status'), 'signed in');
});

t.test('password rate limit per client address, across IDs', async (t) => {
  const w = await rig(t, '[lockout]\nmax_failures = 3\nwindow = "15m"\nduration = "10m"\nip_max_failures = 4\n');
  const x = w.client({ localAddress: '127.0.0.20' });
  for (const u of ['u1', 'u2', 'u3', 'u4']) t.equal((await x.signIn(u, 'nope')).status, 401, `${u}: one wrong password`);
  let r = await x.signIn('alice', 'alice-pw');
  t.equal(r.status, 429, 'the address is blocked, whatever the ID');
  t.equal(textOf(r.body, 'signin-password-error'), en.errSignInLimited(15), 'until the window has passed');
  t.equal(w.auth.calls.length, 4, 'not checked');
  t.equal((await w.client({ localAddress: '127.0.0.21' }).signIn('alice', 'alice-pw')).status, 303, 'another address is not blocked');
  w.h.advance(15 * MINUTE - 1000);
  t.equal((await x.signIn('bob', 'bob-pw')).status, 429, 'still blocked just before the window ends');
  w.h.advance(1000);
  r = await x.signIn('bob', 'bob-pw');
  t.equal(r.status, 303, 'free again after the window');
});

t.test('password rate limit: guesses sent at the same time count too', async (t) => {
  const w = await rig(t, '[lockout]\nmax_failures = 3\nwindow = "15m"\nduration = "10m"\nip_max_failures = 50\n');
  const c = w.client({ localAddress: '127.0.0.30' });
  await c.get('/');
  let release = () => {};
  w.auth.gate = new Promise<void>((r) => (release = r));
  let answered = 0;
  const posts = Array.from({ length: 8 }, (_, i) =>
    c.post('/signin', { user: 'alice', password: `guess-${i}` }).then((r) => {
      answered++;
      return r;
    }),
  );
  // Wait until every request has either reached the password check or been answered (no fixed sleep).
  for (let i = 0; i < 2000 && w.auth.calls.length + answered < posts.length; i++) await new Promise((r) => setTimeout(r, 2));
  release();
  const rs = await Promise.all(posts);
  t.equal(rs.filter((r) => r.status !== 401 && r.status !== 429).length, 0, 'every guess is refused or limited');
  // Regression: each attempt is counted before its password is checked, so guesses sent at once cannot all
  // pass the limit while the first ones are in flight.
  t.ok(w.auth.calls.length <= 3, `at most max_failures passwords checked for one ID (checked: ${w.auth.calls.length})`);
});

t.test('idle timeout and absolute lifetime', async (t) => {
  const w = await rig(t, '[web]\nsession_idle = "5m"\n');
  await w.h.registerApp('alice');
  const c = w.client();
  t.equal((await c.signIn('alice', 'alice-pw')).status, 303);
  w.h.advance(5 * MINUTE - 1000);
  t.ok(hasId((await c.get('/')).body, 'network-status'), 'alive just before the idle time');
  w.h.advance(5 * MINUTE - 1000);
  t.equal((await c.get('/settings')).status, 200, 'each request restarts the idle time');
  const sid = c.session ?? '';
  const csrf = c.csrf ?? '';

  w.h.advance(5 * MINUTE);
  // A post with the old cookie does nothing (enable MFA, which needs no code).
  const stale = w.client();
  stale.jar.set('mfagate_session', sid);
  let r = await stale.post('/mfa/enable', {}, { csrf });
  t.equal(r.status, 303, 'the post is turned away');
  t.equal(r.location, '/', 'to the sign-in page');
  t.equal((await w.h.svc.status('alice')).mfa_enabled, false, 'MFA was not enabled');
  let page = await stale.get('/');
  t.ok(isSignInPage(page.body), 'signed out');
  t.ok(notices(page.body).includes(en.sessionExpired), 'told why');

  // The signed-in browser itself, reading the home page after the idle time.
  const other = w.client();
  t.equal((await other.signIn('alice', 'alice-pw')).status, 303);
  const sid2 = other.session;
  w.h.advance(5 * MINUTE);
  page = await other.get('/');
  t.equal(page.status, 200);
  t.ok(isSignInPage(page.body), 'the sign-in page');
  t.ok(notices(page.body).includes(en.sessionExpired), '"signed out after a period without activity"');
  t.not(other.session, sid2, 'a new (signed-out) session');

  // The same post in a live session does act (so the refusal above is the timeout's doing).
  t.equal((await c.signIn('alice', 'alice-pw')).status, 303);
  r = await c.submit('/settings', 'enable');
  t.equal(r.status, 303);
  t.equal((await w.h.svc.status('alice')).mfa_enabled, true, 'enabled from a live session');
});

t.test('idle timeout: a bookmarked page after the timeout still says why', async (t) => {
  const w = await rig(t, '[web]\nsession_idle = "5m"\n');
  const c = w.client();
  t.equal((await c.signIn('alice', 'alice-pw')).status, 303);
  w.h.advance(5 * MINUTE);
  const r = await c.get('/settings');
  t.equal(r.status, 303, 'to the sign-in page');
  t.equal(r.location, '/');
  const page = await c.get('/');
  t.ok(isSignInPage(page.body), 'signed out');
  // Regression: the notice survives a redirect from another page (a session holding it is made first).
  t.ok(notices(page.body).includes(en.sessionExpired), 'the timeout notice after GET /settings -> /');
});

t.test('absolute session lifetime of 12 hours', async (t) => {
  const w = await rig(t, '[web]\nsession_idle = "24h"\n');
  const c = w.client();
  t.equal((await c.signIn('alice', 'alice-pw')).status, 303);
  w.h.advance(12 * HOUR - 1000);
  t.ok(hasId((await c.get('/')).body, 'network-status'), 'alive just before 12 h');
  w.h.advance(1000);
  const page = await c.get('/');
  t.ok(isSignInPage(page.body), 'signed out at 12 h, however active');
});

t.test('sign-out ends the session', async (t) => {
  const w = await rig(t);
  const c = w.client();
  t.equal((await c.signIn('alice', 'alice-pw')).status, 303);
  const old = c.session ?? '';
  const oldCsrf = c.csrf ?? '';
  t.equal((await c.get('/settings')).status, 200);
  const r = await c.submit('/settings', 'signout');
  t.equal(r.status, 303);
  t.equal(r.location, '/');
  t.not(c.session, old, 'the browser gets a new, signed-out session');
  const page = await c.get('/');
  t.ok(isSignInPage(page.body), 'signed out');
  t.ok(notices(page.body).includes(en.signedOut), 'told so');

  const replay = w.client();
  replay.jar.set('mfagate_session', old);
  const s = await replay.get('/settings');
  t.equal(s.status, 303, 'the old cookie no longer opens the settings');
  t.equal(s.location, '/');
  replay.jar.set('mfagate_session', old);
  const p = await replay.post('/backup', { method: 'totp', code: '123456' }, { csrf: oldCsrf });
  t.equal(p.status, 303, 'nor can it post');
  t.equal(p.location, '/');
});

t.test('client address: X-Forwarded-For only from a trusted proxy', async (t) => {
  const w = await rig(t, '[web]\ntrusted_proxies = ["127.0.0.1"]\n[networks]\ntrusted = ["127.0.0.2/32"]\n');
  await w.h.registerApp('alice');
  await w.h.svc.enable('alice', IP);

  const spoof = w.client({ localAddress: '127.0.0.5', headers: { 'X-Forwarded-For': '127.0.0.2' } });
  t.equal((await spoof.signIn('alice', 'alice-pw')).status, 303);
  t.equal(w.auth.calls.at(-1)?.remoteIp, '127.0.0.5', 'Dovecot is told the peer, not the made-up header');
  let home = await spoof.get('/');
  t.equal(textOf(home.body, 'network-status'), en.needMfa('127.0.0.5'), 'a made-up header from an untrusted peer is ignored');
  t.notOk(home.body.includes(en.trustedNetwork('127.0.0.2')), 'not the trusted network');
  t.ok(hasId(home.body, 'verify-totp'), 'asked for a code');

  const proxied = w.client({ localAddress: '127.0.0.1', headers: { 'X-Forwarded-For': '127.0.0.2' } });
  t.equal((await proxied.signIn('alice', 'alice-pw')).status, 303);
  t.equal(w.auth.calls.at(-1)?.remoteIp, '127.0.0.2', 'the forwarded address');
  home = await proxied.get('/');
  t.equal(textOf(home.body, 'network-status'), en.trustedNetwork('127.0.0.2'), 'from the proxy: the trusted network');
  t.notOk(hasId(home.body, 'verify-totp'), 'no code asked');

  const outside = w.client({ localAddress: '127.0.0.1', headers: { 'X-Forwarded-For': '127.0.0.2, 198.51.100.44' } });
  t.equal((await outside.signIn('alice', 'alice-pw')).status, 303);
  home = await outside.get('/');
  t.equal(textOf(home.body, 'network-status'), en.needMfa('198.51.100.44'), 'the right-most untrusted entry is the client');

  const bad = w.client({ localAddress: '127.0.0.1', headers: { 'X-Forwarded-For': 'unknown' } });
  let r = await bad.get('/');
  t.equal(r.status, 400, 'a malformed header from the proxy');
  t.ok(r.body.includes(en.errBadForward), 'says so');
  t.equal(cookieSet(r, 'mfagate_session'), undefined, 'no session started');
  t.ok(w.h.lines.some((l) => l.includes('"web-bad-forward"')), 'logged');
  // A malformed header on a post from the proxy stops it before anything happens.
  bad.jar.set('mfagate_session', proxied.session ?? '');
  r = await bad.post('/signout', {}, { csrf: proxied.csrf ?? '' });
  t.equal(r.status, 400, 'a post too');
  t.ok(hasId((await proxied.get('/')).body, 'network-status'), 'and the session was not signed out');

  r = await w.client({ localAddress: '127.0.0.5', headers: { 'X-Forwarded-For': 'unknown' } }).get('/');
  t.equal(r.status, 200, 'the same header from an untrusted peer is simply ignored');
});

t.test('eduroam inside the campus range is not the trusted network (the same rule as the policy)', async (t) => {
  const w = await rig(t, '[web]\ntrusted_proxies = ["127.0.0.1"]\n[networks]\ntrusted = ["127.0.0.0/24"]\nuntrusted = ["127.0.0.128/25"]\n');
  await w.h.registerApp('alice');
  await w.h.svc.enable('alice', IP);
  const campus = w.client({ localAddress: '127.0.0.1', headers: { 'X-Forwarded-For': '127.0.0.20' } });
  t.equal((await campus.signIn('alice', 'alice-pw')).status, 303);
  t.equal(textOf((await campus.get('/')).body, 'network-status'), en.trustedNetwork('127.0.0.20'), 'the campus fixed network');
  const eduroam = w.client({ localAddress: '127.0.0.1', headers: { 'X-Forwarded-For': '127.0.0.200' } });
  t.equal((await eduroam.signIn('alice', 'alice-pw')).status, 303);
  const home = await eduroam.get('/');
  t.equal(textOf(home.body, 'network-status'), en.needMfa('127.0.0.200'), 'eduroam needs MFA');
  t.ok(hasId(home.body, 'verify-totp'), 'asked for a code');
});

t.test('passing MFA over HTTP, then revoking the grant', async (t) => {
  const w = await rig(t);
  const secret = await w.h.registerApp('alice');
  await w.h.svc.enable('alice', IP);
  const c = w.client({ localAddress: '127.0.0.9' });
  t.equal((await c.signIn('alice', 'alice-pw')).status, 303);
  let home = await c.get('/');
  t.equal(textOf(home.body, 'network-status'), en.needMfa('127.0.0.9'));

  let r = await c.submit('/', 'verify-totp', { code: wrongCode(secret, w.h.clock.now) });
  t.equal(r.status, 403, 'a wrong code');
  t.equal(textOf(r.body, 'verify-totp-code-error'), en.errors['factor-failed'], 'the error is next to the code field');
  t.same((await w.h.svc.status('alice')).grants, [], 'no grant');
  r = await c.submit('/', 'verify-totp', { code: '' });
  t.equal(r.status, 400, 'no code');
  t.equal(textOf(r.body, 'verify-totp-code-error'), en.errCode);

  const code = w.h.totp(secret);
  r = await c.submit('/', 'verify-totp', { code });
  t.equal(r.status, 303, 'the right code');
  t.equal(r.location, '/');
  const grants = (await w.h.svc.status('alice')).grants;
  t.equal(grants.length, 1, 'one grant');
  const g = grants[0];
  t.equal(g?.ip, '127.0.0.9', 'for the client address');
  t.equal(g?.method, 'totp');
  t.equal(Date.parse(g?.expires_at ?? ''), w.h.clock.now + w.h.config.grants.ttlMs, 'for grants.ttl');
  t.equal((await w.h.svc.status('alice', '127.0.0.9')).login?.rule, 'grant', 'a mail program from there is let in');
  home = await c.get('/');
  t.equal(textOf(home.body, 'network-status'), en.grantActive('127.0.0.9', jst(Date.parse(g?.expires_at ?? ''))), '"until" with the address');
  t.ok(notices(home.body).includes(en.passed), 'the passed notice');
  t.notOk(hasId(home.body, 'verify-totp'), 'no code asked any more');

  // The same code again (another browser, same time step) is refused: each step is used once.
  const again = w.client({ localAddress: '127.0.0.77' });
  t.equal((await again.signIn('alice', 'alice-pw')).status, 303);
  r = await again.submit('/', 'verify-totp', { code });
  t.equal(r.status, 403, 'a replayed code');
  t.equal((await w.h.svc.status('alice')).grants.length, 1, 'no second grant');

  // Another user cannot revoke alice's grant by its id.
  const bob = w.client({ localAddress: '127.0.0.9' });
  t.equal((await bob.signIn('bob', 'bob-pw')).status, 303);
  await bob.get('/settings');
  r = await bob.post('/grants/revoke', { id: String(g?.id) });
  t.equal(r.status, 303);
  t.ok(notices((await bob.get('/settings')).body).includes(en.errGrantGone), 'bob is told it is not his');
  t.equal((await w.h.svc.status('alice')).grants.length, 1, "alice's grant is still there");

  const settings = await c.get('/settings');
  t.ok(formOf(settings.body, `revoke-${g?.id}`), 'a revoke button for the grant');
  t.ok(innerHtml(settings.body, 'h-status') !== undefined, 'the status section');
  r = await c.submit('/settings', `revoke-${g?.id}`);
  t.equal(r.status, 303);
  t.equal(r.location, '/settings');
  t.same((await w.h.svc.status('alice')).grants, [], 'the grant is gone');
  t.equal((await w.h.svc.status('alice', '127.0.0.9')).login?.needs_mfa, true, 'mail programs there need MFA again');
  const after = await c.get('/settings');
  t.ok(notices(after.body).includes(en.revoked(g?.block ?? '')), 'told so');
  t.ok(hasId(after.body, 'no-grants'), 'no grants listed');
  t.equal(textOf((await c.get('/')).body, 'network-status'), en.needMfa('127.0.0.9'), 'home asks for a code again');
});

t.test('base_path = "/mfa"', async (t) => {
  const w = await rig(t, '[web]\nbase_path = "/mfa"\n');
  const c = w.client();
  let r = await c.get('/mfa');
  t.equal(r.status, 308, 'the base without a slash');
  t.equal(r.location, '/mfa/');
  t.equal((await c.get('/')).status, 404, 'nothing outside the base path');
  t.equal((await c.get('/settings')).status, 404);
  t.equal((await c.get('/mfax/')).status, 404, 'a path that only starts with the same letters');
  t.equal((await c.post('/signin', {}, { csrf: null })).status, 404, 'a post outside the base path');

  r = await c.get('/mfa/');
  t.equal(r.status, 200);
  t.ok(isSignInPage(r.body));
  t.equal(cookieSet(r, 'mfagate_pre')?.attrs.get('path'), '/mfa', 'the cookie is for /mfa only');
  const actions = formActions(r.body);
  t.ok(actions.length > 0 && actions.every((a) => a.startsWith('/mfa/')), `form actions under /mfa/: ${actions.join(' ')}`);
  t.match(r.body, /<link rel="stylesheet" href="\/mfa\/style\.css">/, 'the style sheet under /mfa/');
  t.equal((await c.get('/mfa/style.css')).status, 200);

  r = await c.signIn('alice', 'alice-pw', '/mfa');
  t.equal(r.status, 303);
  t.equal(r.location, '/mfa/', 'back to the base path');
  t.equal(cookieSet(r, 'mfagate_session')?.attrs.get('path'), '/mfa');
  const home = await c.get('/mfa/');
  t.ok(hasId(home.body, 'network-status'), 'signed in');
  t.match(home.body, /href="\/mfa\/settings"/, 'links under /mfa/');
  const settings = await c.get('/mfa/settings');
  t.equal(settings.status, 200);
  const sa = formActions(settings.body);
  t.ok(sa.length >= 3 && sa.every((a) => a.startsWith('/mfa/')), `settings form actions under /mfa/: ${sa.join(' ')}`);
  t.equal((await c.get('/mfa/settings/backup')).location, '/mfa/settings', 'redirects stay under /mfa/');

  r = await c.get('/mfa/settings?lang=ja');
  t.equal(r.status, 303);
  t.equal(r.location, '/mfa/settings', 'the language switch stays under /mfa/');
  t.equal(cookieSet(r, 'mfagate_lang')?.attrs.get('path'), '/mfa');
});

t.test('language: Accept-Language, then the switch and its cookie', async (t) => {
  const w = await rig(t);
  const page = async (lang: string | null) => (await w.client({ lang }).get('/')).body;
  let body = await page('en-US,en;q=0.9');
  t.equal(htmlLang(body), 'en', 'en-US,en;q=0.9: English');
  t.ok(body.includes(`<h1>${en.signInTitle}</h1>`), 'English text');
  body = await page('ja');
  t.equal(htmlLang(body), 'ja', 'ja: Japanese');
  t.ok(body.includes(`<h1>${ja.signInTitle}</h1>`), 'Japanese text');
  t.equal(htmlLang(await page(null)), 'ja', 'no header: Japanese');
  t.equal(htmlLang(await page('fr-FR, en;q=0.5')), 'en', 'the first of ja/en listed');
  t.equal(htmlLang(await page('en;q=0.4, ja;q=0.8')), 'ja', 'the higher q wins');

  const c = w.client({ lang: 'ja' });
  let r = await c.get('/?lang=en');
  t.equal(r.status, 303, 'the switch redirects');
  t.equal(r.location, '/', 'to the same path without the query');
  const lc = cookieSet(r, 'mfagate_lang');
  t.equal(lc?.value, 'en', 'remembered in a cookie');
  t.equal(lc?.attrs.get('path'), '/');
  t.equal(lc?.attrs.get('samesite'), 'Strict');
  t.ok(Number(lc?.attrs.get('max-age')) >= 86400 * 30, 'for a long time');
  r = await c.get('/');
  t.equal(htmlLang(r.body), 'en', 'English although the browser asks for Japanese');
  t.ok(r.body.includes(`<h1>${en.signInTitle}</h1>`));
  r = await c.get('/settings?lang=ja&x=1');
  t.equal(r.location, '/settings', 'any page, the query dropped');
  t.equal(htmlLang((await c.get('/')).body), 'ja', 'and back to Japanese');
  r = await c.get('/?lang=de');
  t.equal(r.status, 200, 'an unknown language is not a switch');
  t.equal(htmlLang(r.body), 'ja');
});

t.test('the language switch never sends the browser to another site', async (t) => {
  const w = await rig(t);
  const c = w.client();
  let r = await c.get('//evil.example/?lang=en');
  t.equal(r.status, 303);
  t.equal(r.location, '/', 'a request target that looks like an authority: the path is "/"');
  // A request target with a dot segment before "//" (sent as is by a non-browser client or a proxy that passes
  // the raw target on): the URL parser removes "/." and leaves the path "//evil.example".
  r = await c.get('/.//evil.example?lang=en');
  t.equal(r.status, 303);
  // Regression: the Location never starts with "//" (a protocol-relative redirect to another host).
  t.notOk((r.location ?? '').startsWith('//'), `Location stays on this site (got ${r.location})`);
});

t.test('request limits: body size, content type, unknown paths and methods', async (t) => {
  const w = await rig(t);
  const c = w.client();
  await c.get('/');
  const csrf = c.csrf ?? '';
  const formOfSize = (n: number) => {
    const head = `csrf=${csrf}&user=alice&password=nope&pad=`;
    return head + 'a'.repeat(n - head.length);
  };
  let r = await c.request('POST', '/signin', formOfSize(8 * 1024), { 'Content-Type': FORM });
  t.equal(r.status, 401, 'exactly 8 KiB is read (and the password judged)');
  t.equal(w.auth.calls.length, 1);
  r = await c.request('POST', '/signin', formOfSize(8 * 1024 + 1), { 'Content-Type': FORM });
  t.equal(r.status, 413, 'one byte more: 413');
  r = await c.request('POST', '/signin', formOfSize(256 * 1024), { 'Content-Type': FORM });
  t.equal(r.status, 413, '256 KiB: 413');
  t.equal(w.auth.calls.length, 1, 'too large bodies are not acted on');

  const body = `csrf=${csrf}&user=alice&password=nope`;
  for (const type of ['text/plain', 'multipart/form-data; boundary=x', 'application/json', '']) {
    r = await c.request('POST', '/signin', body, type ? { 'Content-Type': type } : {});
    t.equal(r.status, 415, `content type "${type}": 415`);
  }
  t.equal(w.auth.calls.length, 1, 'nor are other content types');
  r = await c.request('POST', '/signin', body, { 'Content-Type': 'Application/X-WWW-Form-URLencoded; charset=UTF-8' });
  t.equal(r.status, 401, 'the form type with a charset, in any case, is accepted');

  t.equal((await c.get('/no-such-page')).status, 404, 'unknown page');
  t.equal((await c.get('/settings/')).status, 404, 'a trailing slash is another path');
  t.equal((await c.post('/no-such-action', {})).status, 404, 'unknown post');
  r = await c.request('PUT', '/', body, { 'Content-Type': FORM });
  t.equal(r.status, 405, 'PUT');
  t.match(r.headers['allow'] ?? '', /POST/, 'with Allow');
  t.equal((await c.request('DELETE', '/settings')).status, 405, 'DELETE');
  t.equal(w.auth.calls.length, 2);
});

t.test('app enrolment: the secret stays out of URLs', async (t) => {
  const w = await rig(t);
  const c = w.client({ localAddress: '127.0.0.9' });
  t.equal((await c.signIn('alice', 'alice-pw')).status, 303);
  t.equal((await c.get('/settings/app')).location, '/settings', 'no enrolment page before one is begun');
  let r = await c.submit('/settings', 'app-begin');
  t.equal(r.status, 303);
  t.equal(r.location, '/settings/app', 'the redirect carries nothing but the path');

  const f = await w.h.records.mfa.factors('alice');
  t.ok(f?.totpPending, 'an enrolment is pending');
  const secret = f?.totpPending ? w.h.secrets.decrypt(f.totpPending, 'totp-pending:alice').toString('utf8') : '<none>';
  const page = await c.get('/settings/app');
  t.equal(page.status, 200);
  t.equal((textOf(page.body, 'totp-key') ?? '').replace(/\s+/g, ''), secret, 'the key is shown in #totp-key');
  t.match(page.body, /<svg/, 'and a QR code');
  t.equal(page.headers['cache-control'], 'no-store', 'not cached');
  t.notOk(w.h.lines.some((l) => l.includes(secret)), 'the secret is not logged');

  r = await c.submit('/settings/app', 'app-confirm', { code: wrongCode(secret, w.h.clock.now) });
  t.equal(r.status, 403, 'a wrong code');
  t.equal(textOf(r.body, 'app-confirm-code-error'), en.errors['factor-failed']);
  r = await c.submit('/settings/app', 'app-confirm', { code: w.h.totp(secret) });
  t.equal(r.status, 303);
  t.equal(r.location, '/settings');
  t.equal((await w.h.svc.status('alice')).factors.totp, true, 'registered');
  const settings = await c.get('/settings');
  t.equal(textOf(settings.body, 'app-state'), en.registered);
  t.ok(notices(settings.body).includes(en.enrolDone));
  t.equal((await c.get('/settings/app')).location, '/settings', 'the enrolment page is gone');
});

t.test('backup codes are shown once', async (t) => {
  const w = await rig(t);
  const secret = await w.h.registerApp('alice');
  const c = w.client({ localAddress: '127.0.0.9' });
  t.equal((await c.signIn('alice', 'alice-pw')).status, 303);
  t.equal(textOf((await c.get('/settings')).body, 'backup-state'), en.backupNone);

  let r = await c.submit('/settings', 'backup', { method: 'totp', code: '' });
  t.equal(r.status, 400, 'no code');
  t.equal(textOf(r.body, 'backup-code-error'), en.errCode);
  r = await c.submit('/settings', 'backup', { method: 'totp', code: wrongCode(secret, w.h.clock.now) });
  t.equal(r.status, 403, 'a wrong code');
  t.equal(textOf(r.body, 'backup-code-error'), en.errors['factor-failed']);
  t.equal((await w.h.svc.status('alice')).factors.backup_codes_left, 0, 'no codes issued');

  r = await c.submit('/settings', 'backup', { method: 'totp', code: w.h.totp(secret) });
  t.equal(r.status, 303);
  t.equal(r.location, '/settings/backup');
  const page = await c.get('/settings/backup');
  t.equal(page.status, 200);
  const codes = [...(innerHtml(page.body, 'backup-codes') ?? '').matchAll(/<li>([^<]*)<\/li>/g)].map((m) => m[1] ?? '');
  t.equal(codes.length, 10, 'ten codes');
  t.equal(new Set(codes).size, 10, 'all different');
  t.ok(codes.every((x) => /^[2-9a-z]{5}-[2-9a-z]{5}$/.test(x)), 'in the issued form');
  t.equal((await w.h.svc.status('alice')).factors.backup_codes_left, 10);
  t.notOk(w.h.lines.some((l) => codes.some((x) => l.includes(x))), 'no code is logged');

  r = await c.get('/settings/backup');
  t.equal(r.status, 303, 'a second look: gone');
  t.equal(r.location, '/settings');
  t.notOk(codes.some((x) => r.body.includes(x)));

  const g = await w.h.svc.verify('alice', '127.0.0.9', { method: 'backup', code: codes[0] ?? '' });
  t.equal(g.method, 'backup', 'a shown code works');
});

t.test('first_registration = "trusted-only"', async (t) => {
  const w = await rig(t, '[web]\nfirst_registration = "trusted-only"\n[networks]\ntrusted = ["127.0.0.2/32"]\n');
  const out = w.client({ localAddress: '127.0.0.9' });
  t.equal((await out.signIn('alice', 'alice-pw')).status, 303);
  let settings = await out.get('/settings');
  t.notOk(formOf(settings.body, 'app-begin'), 'no app registration form outside');
  t.notOk(formOf(settings.body, 'email-register'), 'nor the address form');
  t.ok(settings.body.includes(en.errTrustedOnly), 'the reason is shown');

  let r = await out.post('/totp/begin', {});
  t.equal(r.status, 403, 'a post from outside is refused');
  t.ok(notices(r.body).includes(en.errTrustedOnly));
  t.notOk((await w.h.records.mfa.factors('alice'))?.totpPending, 'no pending enrolment');
  t.equal((await out.get('/settings/app')).location, '/settings', 'no enrolment page');
  r = await out.post('/email/register', { address: 'alice@example.com' });
  t.equal(r.status, 403, 'nor an external address');
  t.equal(w.h.mailer.sent.length, 0, 'no mail sent');
  t.equal((await w.h.svc.status('alice')).factors.email_pending, null);

  const inside = w.client({ localAddress: '127.0.0.2' });
  t.equal((await inside.signIn('alice', 'alice-pw')).status, 303);
  settings = await inside.get('/settings');
  t.ok(formOf(settings.body, 'app-begin'), 'the form on the trusted network');
  r = await inside.submit('/settings', 'app-begin');
  t.equal(r.status, 303, 'begun on the trusted network');
  t.equal(r.location, '/settings/app');
  const f = await w.h.records.mfa.factors('alice');
  t.ok(f?.totpPending, 'pending');
  const secret = f?.totpPending ? w.h.secrets.decrypt(f.totpPending, 'totp-pending:alice').toString('utf8') : '';
  t.equal((await inside.submit('/settings/app', 'app-confirm', { code: w.h.totp(secret) })).status, 303);
  t.equal((await w.h.svc.status('alice')).factors.totp, true, 'registered');

  // Once there is a factor, changes from outside are allowed with its code.
  w.h.advance(STEP_MS);
  r = await out.submit('/settings', 'app-begin', { method: 'totp', code: w.h.totp(secret) });
  t.equal(r.status, 303, 'replacing the app from outside, with a code');
  t.equal(r.location, '/settings/app');
});
