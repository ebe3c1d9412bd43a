// The MFA web page: plain HTTP on loopback behind the site's HTTPS reverse proxy. Thin, like the other
// adapters: it signs the user in through Dovecot, keeps a session, and calls MfaService for every step of the
// university's flows (register a factor, pass MFA, see and revoke grants). Server-rendered HTML, no script.
// node:http rather than a framework: a dozen routes of form posts, and the security headers, cookies and CSRF
// checks are the part we must get right ourselves in any case.
import http from 'node:http';
import { type Config, policySettings } from '../config/config.js';
import type { Logger } from '../daemon/log.js';
import { readLimitedBody } from '../daemon/http-body.js';
import { errorText } from '../daemon/log.js';
import { type MfaErrorCode, MfaError, type MfaService } from '../mfa/service.js';
import { blockOf, parseAddress, RangeList } from '../policy/address.js';
import { normaliseUser } from '../policy/user.js';
import { isTrustedNetwork, type PolicySettings } from '../policy/decide.js';
import { ForwardedError, clientIp } from './client-ip.js';
import { type DovecotAuthRequest, type DovecotAuthResult, checkPassword, credentialProblem } from './dovecot-auth.js';
import { type Lang, LANGS, pickLang, TEXT, type Text } from './i18n.js';
import { FailureLimiter } from './limiter.js';
import * as pages from './pages.js';
import { type Notice, type Session, SESSION_MAX_AGE_MS, SessionStore, sameToken } from './session.js';
import { STYLE } from './style.js';

export interface WebDeps {
  mfa: MfaService;
  config: () => Config;
  logger: Logger;
  clock?: () => number;
  /** Checks an ID and password (default: Dovecot's auth-client socket in [web] dovecot_auth_socket). */
  checkPassword?: (r: DovecotAuthRequest) => Promise<DovecotAuthResult>;
}

export interface WebServer {
  server: http.Server;
  /** Drops expired sessions and old password failures (the daemon runs it from a timer). */
  sweep(): void;
  sessions: SessionStore;
}

const SESSION_COOKIE = 'mfagate_session';
const LANG_COOKIE = 'mfagate_lang';
const MAX_FORM_BYTES = 8 * 1024;
const MAX_SESSIONS = 20_000;
const MAX_ANONYMOUS_SESSIONS = 20_000;
/** An app enrolment shown longer than this is stale (MfaService keeps the pending secret 15 minutes). */
const ENROLMENT_MS = 15 * 60_000;

const SECURITY_HEADERS: Record<string, string> = {
  'Content-Security-Policy': "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
  'X-Content-Type-Options': 'nosniff',
  'X-Frame-Options': 'DENY',
  'Referrer-Policy': 'no-referrer',
  'Cross-Origin-Opener-Policy': 'same-origin',
  'Cross-Origin-Resource-Policy': 'same-origin',
  'Permissions-Policy': 'camera=(), microphone=(), geolocation=()',
};

interface Ctx {
  req: http.IncomingMessage;
  res: http.ServerResponse;
  path: string;
  ip: string;
  lang: Lang;
  t: Text;
  session: Session | undefined;
  /** The request carried a session cookie that is no longer valid (timed out, or the daemon restarted). */
  staleCookie: boolean;
  form: URLSearchParams;
}

type Routed = Ctx & { session: Session; user: string };
type Handler = (c: Routed) => Promise<void> | void;

export function createWebServer(d: WebDeps): WebServer {
  const clock = d.clock ?? Date.now;
  const sessions = new SessionStore({ idleMs: () => d.config().web.sessionIdleMs, maxAgeMs: SESSION_MAX_AGE_MS, max: MAX_SESSIONS, maxAnonymous: MAX_ANONYMOUS_SESSIONS, clock });
  const limiter = new FailureLimiter(() => d.config().lockout, clock);
  const check = d.checkPassword ?? ((r: DovecotAuthRequest) => checkPassword(d.config().web.dovecotAuthSocket, r));

  // Derived from the running config, rebuilt when a reload replaces it.
  let cached: { config: Config; proxies: RangeList; settings: PolicySettings } | undefined;
  const derived = () => {
    const config = d.config();
    if (cached?.config !== config) cached = { config, proxies: new RangeList(config.web.trustedProxies), settings: policySettings(config) };
    return cached;
  };
  const base = () => d.config().web.basePath;

  // ---- responses -----------------------------------------------------------------------------------------

  function cookie(name: string, value: string, extra: string): string {
    const c = d.config().web;
    return `${name}=${value}; Path=${c.basePath || '/'}; SameSite=Strict${c.secureCookie ? '; Secure' : ''}${extra}`;
  }

  function send(c: Ctx, status: number, body: string, type = 'text/html; charset=utf-8'): void {
    const headers: Record<string, string | string[]> = { ...SECURITY_HEADERS, 'Content-Type': type, 'Cache-Control': 'no-store', 'Content-Length': String(Buffer.byteLength(body)) };
    const cookies: string[] = [];
    if (c.session) cookies.push(cookie(SESSION_COOKIE, c.session.id, '; HttpOnly'));
    else if (c.staleCookie) cookies.push(cookie(SESSION_COOKIE, '', '; HttpOnly; Max-Age=0'));
    if (cookies.length) headers['Set-Cookie'] = cookies;
    c.res.writeHead(status, headers);
    c.res.end(c.req.method === 'HEAD' ? undefined : body);
  }

  function redirect(c: Ctx, to: string): void {
    c.res.setHeader('Location', `${base()}${to}`);
    send(c, 303, '');
  }

  function view(c: Ctx, current: pages.View['current'], errors: Record<string, string> = {}, values: Record<string, string> = {}): pages.View {
    const notices = c.session?.notices.splice(0) ?? [];
    return { lang: c.lang, t: c.t, base: base(), csrf: c.session?.csrf ?? '', user: c.session?.user, current, notices, errors, values };
  }

  function notify(c: Ctx, kind: Notice['kind'], text: string): void {
    c.session?.notices.push({ kind, text });
  }

  /** What a user reads for an MfaError, in their language, with how long to wait when there is a wait. */
  function errorMessage(t: Text, e: MfaError): string {
    const detail = e.message;
    let text = t.errors[e.code] ?? t.errServer;
    if (e.code === 'conflict') {
      if (detail.includes('last registered factor')) text = t.errLastFactor;
      else if (detail.includes('already registered')) text = t.errSameAddress;
      else if (detail.includes('enrolment')) text = t.enrolExpired;
    }
    if (e.code === 'bad-request' && detail.startsWith('address')) text = t.errAddress;
    if (e.code === 'not-registered' && detail.includes('grant')) text = t.errGrantGone;
    if (e.code === 'rate-limited' && detail.includes('less than a minute ago')) return t.errCodeTooSoon;
    if (e.code === 'locked' || e.code === 'rate-limited') {
      text += ` ${e.retryAfterMs !== undefined ? t.retryIn(Math.max(1, Math.ceil(e.retryAfterMs / 60_000))) : t.retryLater}`;
    }
    return text;
  }

  const STATUS_OF: Partial<Record<MfaErrorCode, number>> = { 'factor-failed': 403, 'proof-required': 403, locked: 423, 'rate-limited': 429, 'mail-failed': 502 };
  const statusOf = (e: MfaError) => STATUS_OF[e.code] ?? (e.status >= 500 ? 502 : 400);

  // ---- models ----------------------------------------------------------------------------------------------

  function onTrustedNetwork(ip: string): boolean {
    const a = parseAddress(ip);
    return a !== undefined && isTrustedNetwork(derived().settings, a);
  }

  function ipBlock(ip: string): string {
    const a = parseAddress(ip);
    return a ? blockOf(a, derived().settings.prefixes) : ip;
  }

  /** The last login code sent from this session, while it is still valid (the page asks for it). */
  const liveEmailSent = (c: Ctx) => (c.session?.emailSent && c.session.emailSent.expiresAt > clock() ? c.session.emailSent : undefined);

  function homeModel(c: Routed): pages.HomeModel {
    const st = d.mfa.status(c.user, c.ip);
    const block = ipBlock(c.ip);
    const emailSent = liveEmailSent(c);
    const m: pages.HomeModel = {
      ip: c.ip,
      state: 'need',
      mfaEnabled: st.mfa_enabled,
      totp: st.factors.totp,
      email: st.factors.email,
      backupLeft: st.factors.backup_codes_left,
      ttlHours: Math.round(d.config().grants.ttlMs / 3600_000),
      ...(emailSent ? { emailSent } : {}),
    };
    const rule = st.login?.rule;
    if (onTrustedNetwork(c.ip) || rule === 'trusted-network' || rule === 'webmail-host') m.state = 'trusted';
    else if (rule === 'grant') {
      m.state = 'grant';
      m.grantUntil = Math.max(0, ...st.grants.filter((g) => g.block === block).map((g) => Date.parse(g.expires_at)));
    } else if (rule === 'user-exempt') m.state = 'exempt';
    else if (rule === 'enforcement-off' || rule === 'protocol-not-enforced') m.state = 'not-enforced';
    else if (rule === 'mfa-not-required') m.state = 'not-enabled';
    return m;
  }

  function settingsModel(c: Routed): pages.SettingsModel {
    const st = d.mfa.status(c.user);
    const emailSent = liveEmailSent(c);
    return {
      ipBlock: ipBlock(c.ip),
      mfaEnabled: st.mfa_enabled,
      siteRequired: st.mfa_required && !st.mfa_enabled,
      totp: st.factors.totp,
      email: st.factors.email,
      emailPending: st.factors.email_pending,
      backupLeft: st.factors.backup_codes_left,
      grants: st.grants,
      registrationBlocked: d.config().web.firstRegistration === 'trusted-only' && !onTrustedNetwork(c.ip),
      ...(emailSent ? { emailSent } : {}),
    };
  }

  const renderHome = (c: Routed, status = 200, errors: Record<string, string> = {}) =>
    send(c, status, pages.homePage(view(c, 'home', errors), homeModel(c)));
  const renderSettings = (c: Routed, status = 200, errors: Record<string, string> = {}, values: Record<string, string> = {}) =>
    send(c, status, pages.settingsPage(view(c, 'settings', errors, values), settingsModel(c)));

  // ---- form helpers ----------------------------------------------------------------------------------------

  const value = (c: Ctx, name: string) => (c.form.get(name) ?? '').trim();

  /** The proof a change needs once a factor is registered; undefined before the first one. */
  function proof(c: Routed): { method: string; code: string } | undefined {
    const st = d.mfa.status(c.user);
    if (!st.factors.totp && st.factors.email === null) return undefined;
    return { method: value(c, 'method'), code: value(c, 'code') };
  }

  /** Runs a settings change; an MfaError is shown next to the field it concerns (or at the top). */
  async function settingsAction(c: Routed, formId: string, action: () => Promise<void> | void, fieldFor: (e: MfaError) => string | undefined = () => undefined): Promise<void> {
    const values: Record<string, string> = {};
    for (const k of ['method', 'address']) if (c.form.has(k)) values[`${formId}.${k}`] = value(c, k);
    try {
      await action();
    } catch (e) {
      if (!(e instanceof MfaError)) throw e;
      const fieldName = ['factor-failed', 'proof-required', 'locked'].includes(e.code) || (e.code === 'bad-request' && e.message.startsWith('factor')) ? 'code' : fieldFor(e);
      const text = errorMessage(c.t, e);
      if (fieldName) return renderSettings(c, statusOf(e), { [`${formId}.${fieldName}`]: text }, values);
      notify(c, 'error', text);
      return renderSettings(c, statusOf(e), {}, values);
    }
  }

  /**
   * The proof fields a change carries once a factor is registered (undefined before the first one). When the
   * code is empty, the form is shown again with the error next to it, and the answer is null.
   */
  function proofOrAsk(c: Routed, formId: string, values: Record<string, string> = {}): { method: string; code: string } | undefined | null {
    const p = proof(c);
    if (p && p.code === '') {
      renderSettings(c, 400, { [`${formId}.code`]: c.t.errCode }, values);
      return null;
    }
    return p;
  }

  /** A route for a change that needs the proof fields: the code must be there, then the change runs. */
  function proofChange(formId: string, act: (c: Routed, p: { method: string; code: string } | undefined) => void): Handler {
    return (c) => {
      const p = proofOrAsk(c, formId);
      if (p === null) return;
      return settingsAction(c, formId, () => act(c, p));
    };
  }

  function firstRegistrationRefused(c: Routed): boolean {
    if (d.config().web.firstRegistration !== 'trusted-only' || onTrustedNetwork(c.ip)) return false;
    const st = d.mfa.status(c.user);
    if (st.factors.totp || st.factors.email !== null) return false;
    notify(c, 'error', c.t.errTrustedOnly);
    renderSettings(c, 403);
    return true;
  }

  // ---- routes for signed-in users --------------------------------------------------------------------------

  const getRoutes: Record<string, Handler> = {
    '/': (c) => renderHome(c),
    '/settings': (c) => renderSettings(c),
    '/settings/app': (c) => {
      const e = c.session.enrolment;
      if (!e || e.startedAt + ENROLMENT_MS <= clock()) {
        delete c.session.enrolment;
        return redirect(c, '/settings');
      }
      send(c, 200, pages.enrolPage(view(c, 'other'), e));
    },
    '/settings/email': (c) => {
      const pending = d.mfa.status(c.user).factors.email_pending;
      if (pending === null) return redirect(c, '/settings');
      send(c, 200, pages.emailConfirmPage(view(c, 'other'), pending));
    },
    '/settings/backup': (c) => {
      const codes = c.session.backupCodes;
      if (!codes) return redirect(c, '/settings');
      // Shown once: gone from the session as soon as the page is rendered.
      delete c.session.backupCodes;
      send(c, 200, pages.backupCodesPage(view(c, 'other'), codes));
    },
  };

  const postRoutes: Record<string, Handler> = {
    '/signout': (c) => {
      sessions.destroy(c.session.id);
      d.logger.log('info', 'web-signout', { user: c.user, ip: c.ip });
      c.session = sessions.create(undefined, [{ kind: 'ok', text: c.t.signedOut }]);
      redirect(c, '/');
    },
    '/verify': async (c) => {
      const method = value(c, 'method');
      const code = value(c, 'code');
      const formId = `verify-${['totp', 'email', 'backup'].includes(method) ? method : 'totp'}`;
      if (code === '') return renderHome(c, 400, { [`${formId}.code`]: c.t.errCode });
      try {
        await d.mfa.verify(c.user, c.ip, { method, code });
      } catch (e) {
        if (!(e instanceof MfaError)) throw e;
        return renderHome(c, statusOf(e), { [`${formId}.code`]: errorMessage(c.t, e) });
      }
      delete c.session.emailSent;
      notify(c, 'ok', c.t.passed);
      redirect(c, '/');
    },
    '/email-code': async (c) => {
      const back = value(c, 'return') === 'settings' ? '/settings' : '/';
      try {
        const r = await d.mfa.sendLoginCode(c.user, c.ip);
        c.session.emailSent = { to: r.sent_to, expiresAt: Date.parse(r.expires_at) };
      } catch (e) {
        if (!(e instanceof MfaError)) throw e;
        notify(c, 'error', errorMessage(c.t, e));
      }
      redirect(c, back);
    },
    '/mfa/enable': (c) =>
      settingsAction(c, 'enable', () => {
        d.mfa.enable(c.user, c.ip);
        notify(c, 'ok', c.t.enabledDone);
        redirect(c, '/settings');
      }),
    '/mfa/disable': proofChange('disable', (c, p) => {
      d.mfa.disable(c.user, c.ip, p);
      notify(c, 'ok', c.t.disabledDone);
      redirect(c, '/settings');
    }),
    '/totp/begin': (c) => {
      if (firstRegistrationRefused(c)) return;
      const p = proofOrAsk(c, 'app-begin');
      if (p === null) return;
      return settingsAction(c, 'app-begin', async () => {
        const r = await d.mfa.totpBegin(c.user, c.ip, p);
        c.session.enrolment = { secret: r.secret, qrSvg: r.qr_svg, startedAt: clock() };
        redirect(c, '/settings/app');
      });
    },
    '/totp/confirm': (c) => {
      const e = c.session.enrolment;
      if (!e) return redirect(c, '/settings');
      const code = value(c, 'code');
      const again = (status: number, text: string) => send(c, status, pages.enrolPage(view(c, 'other', { 'app-confirm.code': text }), e));
      if (code === '') return again(400, c.t.errCode);
      try {
        d.mfa.totpConfirm(c.user, c.ip, code);
      } catch (err) {
        if (!(err instanceof MfaError)) throw err;
        if (err.code === 'conflict') {
          delete c.session.enrolment;
          notify(c, 'error', c.t.enrolExpired);
          return redirect(c, '/settings');
        }
        return again(statusOf(err), errorMessage(c.t, err));
      }
      delete c.session.enrolment;
      notify(c, 'ok', c.t.enrolDone);
      redirect(c, '/settings');
    },
    '/totp/cancel': (c) => {
      delete c.session.enrolment;
      redirect(c, '/settings');
    },
    '/totp/remove': proofChange('app-remove', (c, p) => {
      d.mfa.totpRemove(c.user, c.ip, p);
      notify(c, 'ok', c.t.appRemoved);
      redirect(c, '/settings');
    }),
    '/email/register': (c) => {
      const address = value(c, 'address');
      const values = { 'email-register.address': address, 'email-register.method': value(c, 'method') };
      if (address === '') return renderSettings(c, 400, { 'email-register.address': c.t.errRequired }, values);
      if (firstRegistrationRefused(c)) return;
      const p = proofOrAsk(c, 'email-register', values);
      if (p === null) return;
      return settingsAction(
        c,
        'email-register',
        async () => {
          await d.mfa.emailRegister(c.user, c.ip, address, p);
          redirect(c, '/settings/email');
        },
        (e) => (e.code === 'bad-request' || e.code === 'refused-domain' || (e.code === 'conflict' && e.message.includes('already')) ? 'address' : undefined),
      );
    },
    '/email/confirm': async (c) => {
      const pending = d.mfa.status(c.user).factors.email_pending;
      if (pending === null) return redirect(c, '/settings');
      const code = value(c, 'code');
      const again = (status: number, text: string) => send(c, status, pages.emailConfirmPage(view(c, 'other', { 'email-confirm.code': text }), pending));
      if (code === '') return again(400, c.t.errCode);
      try {
        const r = await d.mfa.emailConfirm(c.user, c.ip, code);
        notify(c, 'ok', c.t.emailDone(r.address));
      } catch (err) {
        if (!(err instanceof MfaError)) throw err;
        return again(statusOf(err), errorMessage(c.t, err));
      }
      redirect(c, '/settings');
    },
    '/email/remove': proofChange('email-remove', (c, p) => {
      d.mfa.emailRemove(c.user, c.ip, p);
      notify(c, 'ok', c.t.emailRemoved);
      redirect(c, '/settings');
    }),
    '/backup': proofChange('backup', (c, p) => {
      c.session.backupCodes = d.mfa.backupGenerate(c.user, c.ip, p).codes;
      redirect(c, '/settings/backup');
    }),
    '/grants/revoke': (c) => {
      const raw = value(c, 'id');
      if (!/^[1-9]\d{0,15}$/.test(raw)) {
        notify(c, 'error', c.t.errGrantGone);
        return redirect(c, '/settings');
      }
      try {
        const g = d.mfa.revokeGrant(c.user, c.ip, Number(raw));
        notify(c, 'ok', c.t.revoked(g.block));
        d.logger.log('info', 'web-revoke', { user: c.user, ip: c.ip, grant: g.id, block: g.block });
      } catch (e) {
        if (!(e instanceof MfaError)) throw e;
        notify(c, 'error', c.t.errGrantGone);
      }
      redirect(c, '/settings');
    },
  };

  // ---- sign-in ---------------------------------------------------------------------------------------------

  async function signIn(c: Ctx & { session: Session }): Promise<void> {
    const user = value(c, 'user');
    const password = c.form.get('password') ?? '';
    const again = (status: number, errors: Record<string, string>) => send(c, status, pages.signInPage(view(c, 'signin', errors, { 'signin.user': user })));
    const errors: Record<string, string> = {};
    if (user === '') errors['signin.user'] = c.t.errRequired;
    if (password === '') errors['signin.password'] = c.t.errRequired;
    if (Object.keys(errors).length) return again(400, errors);
    if (credentialProblem(user, password) !== undefined || /[\t\r\n]/.test(password)) return again(400, { 'signin.password': c.t.errBadCredentials });
    // The ID as the policy counts it ([users] rules), so "Alice" and "alice@realm" share one allowance.
    const key = normaliseUser(user, d.config().users);
    const limit = limiter.check(key, c.ip);
    if (!limit.ok) {
      d.logger.log('warn', 'web-signin', { user: key, ip: c.ip, result: 'limited', scope: limit.scope });
      return again(429, { 'signin.password': c.t.errSignInLimited(Math.max(1, Math.ceil(limit.retryAfterMs / 60_000))) });
    }
    const attempt = limiter.begin(key, c.ip);
    const r = await check({ user, password, remoteIp: c.ip });
    let canonical: string | undefined;
    if (r.ok) {
      try {
        canonical = d.mfa.user(r.user);
      } catch {
        canonical = undefined;
      }
    }
    if (!r.ok && r.temporary) {
      attempt.void();
      d.logger.log('error', 'web-signin', { user: key, ip: c.ip, result: 'unavailable', reason: r.reason });
      notify(c, 'error', c.t.errAuthUnavailable);
      return again(503, {});
    }
    if (canonical === undefined) {
      d.logger.log('info', 'web-signin', { user: key, ip: c.ip, result: 'refused', ...(r.ok ? { reason: 'unacceptable user name' } : { reason: r.reason }) });
      return again(401, { 'signin.password': c.t.errBadPassword });
    }
    attempt.succeeded();
    d.logger.log('info', 'web-signin', { user: canonical, ip: c.ip, result: 'ok' });
    c.session = sessions.signIn(c.session, canonical);
    redirect(c, '/');
  }

  // ---- dispatch --------------------------------------------------------------------------------------------

  async function handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://x');
    const cookies = parseCookies(req.headers.cookie);
    const langCookie = cookies.get(LANG_COOKIE);
    const lang: Lang = langCookie === 'ja' || langCookie === 'en' ? langCookie : pickLang(req.headers['accept-language']);
    const c: Ctx = { req, res, path: '', ip: '', lang, t: TEXT[lang], session: undefined, staleCookie: false, form: new URLSearchParams() };
    const plain = (status: number, text: string) => send(c, status, pages.messagePage(view(c, 'other'), String(status), text));

    const b = base();
    if (b !== '' && url.pathname === b) {
      res.setHeader('Location', `${b}/`);
      return send(c, 308, '');
    }
    if (!url.pathname.startsWith(`${b}/`)) return plain(404, c.t.errNotFound);
    c.path = url.pathname.slice(b.length);

    try {
      c.ip = clientIp(req.socket.remoteAddress, req.headers['x-forwarded-for'], derived().proxies);
    } catch (e) {
      if (!(e instanceof ForwardedError)) throw e;
      d.logger.log('warn', 'web-bad-forward', { peer: req.socket.remoteAddress ?? '', error: e.message });
      return plain(400, c.t.errBadForward);
    }

    const method = req.method ?? 'GET';
    if (method === 'GET' || method === 'HEAD') {
      if (c.path === '/style.css') {
        res.setHeader('Cache-Control', 'max-age=3600');
        res.writeHead(200, { ...SECURITY_HEADERS, 'Content-Type': 'text/css; charset=utf-8', 'Content-Length': String(Buffer.byteLength(STYLE)) });
        res.end(method === 'HEAD' ? undefined : STYLE);
        return;
      }
      // The language switch: remembered in a cookie for a year, then back to the same page without the query.
      const wanted = url.searchParams.get('lang');
      if (wanted !== null && (LANGS as readonly string[]).includes(wanted)) {
        res.setHeader('Set-Cookie', cookie(LANG_COOKIE, wanted, `; Max-Age=${365 * 86400}`));
        // One leading slash only: "//host" would send the browser to another site.
        res.writeHead(303, { ...SECURITY_HEADERS, Location: `${b}${c.path.replace(/^\/+/, '/')}`, 'Cache-Control': 'no-store', 'Content-Length': '0' });
        res.end();
        return;
      }
    }

    const sid = cookies.get(SESSION_COOKIE);
    c.session = sessions.get(sid);
    c.staleCookie = sid !== undefined && c.session === undefined;

    if (method === 'GET' || method === 'HEAD') {
      const route = getRoutes[c.path];
      if (!route) return plain(404, c.t.errNotFound);
      if (!c.session?.user) {
        c.session ??= sessions.create(undefined, c.staleCookie ? [{ kind: 'info', text: c.t.sessionExpired }] : []);
        if (c.path !== '/') return redirect(c, '/');
        return send(c, 200, pages.signInPage(view(c, 'signin')));
      }
      const user = c.session.user;
      return route({ ...c, session: c.session, user });
    }

    if (method !== 'POST') {
      res.setHeader('Allow', 'GET, HEAD, POST');
      return plain(405, c.t.errNotFound);
    }
    const route = c.path === '/signin' ? undefined : postRoutes[c.path];
    if (c.path !== '/signin' && !route) return plain(404, c.t.errNotFound);
    const type = (req.headers['content-type'] ?? '').split(';')[0]?.trim().toLowerCase();
    if (type !== 'application/x-www-form-urlencoded') return plain(415, c.t.pageExpired);
    const body = await readLimitedBody(req, MAX_FORM_BYTES);
    if (body === undefined) {
      // The rest of the body is not read: close the connection after the answer.
      res.setHeader('Connection', 'close');
      return plain(413, c.t.pageExpired);
    }
    c.form = new URLSearchParams(body);

    // No live session: it timed out (or the daemon restarted) — start over at the sign-in page.
    if (!c.session) {
      c.session = sessions.create(undefined, [{ kind: 'info', text: c.staleCookie ? c.t.sessionExpired : c.t.pageExpired }]);
      return redirect(c, '/');
    }
    if (!sameToken(c.form.get('csrf') ?? undefined, c.session.csrf)) {
      d.logger.log('warn', 'web-csrf', { ip: c.ip, path: c.path });
      return plain(403, c.t.pageExpired);
    }
    if (c.path === '/signin') return signIn({ ...c, session: c.session });
    if (!c.session.user || !route) {
      notify(c, 'info', c.t.sessionExpired);
      return redirect(c, '/');
    }
    // Handlers may replace the session (sign-out): they get this context itself, so send() sees the change.
    const ctx = c as Routed;
    ctx.user = c.session.user;
    return route(ctx);
  }

  const server = http.createServer((req, res) => {
    handle(req, res).catch((e: unknown) => {
      d.logger.log('error', 'web-failed', { path: (req.url ?? '').split('?')[0] ?? '', error: errorText(e) });
      if (!res.headersSent) {
        res.writeHead(500, { ...SECURITY_HEADERS, 'Content-Type': 'text/plain; charset=utf-8', 'Cache-Control': 'no-store' });
        res.end('500 エラーが発生しました / Something went wrong\n');
      } else res.destroy();
    });
  });
  server.headersTimeout = 10_000;
  server.requestTimeout = 30_000;
  return {
    server,
    sessions,
    sweep() {
      sessions.sweep();
      limiter.sweep();
    },
  };
}

function parseCookies(header: string | undefined): Map<string, string> {
  const out = new Map<string, string>();
  if (!header) return out;
  for (const part of header.split(';')) {
    const eq = part.indexOf('=');
    if (eq < 0) continue;
    const name = part.slice(0, eq).trim();
    if (!out.has(name)) out.set(name, part.slice(eq + 1).trim());
  }
  return out;
}
