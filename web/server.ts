// The MFA web page: plain HTTP on loopback behind the site's HTTPS reverse proxy. Thin, like the other
// adapters: it signs the user in through Dovecot (signin.ts), keeps a session, and calls MfaService for every
// step of the university's flows (routes.ts: register a factor, pass MFA, see and revoke grants).
// Server-rendered HTML, no script. node:http rather than a framework: a dozen routes of form posts, and the
// security headers, cookies and CSRF checks are the part we must get right ourselves in any case.
import http from 'node:http';
import { type Config, policySettings } from '../config/config.js';
import { readLimitedBody } from '../daemon/http-body.js';
import { errorText } from '../daemon/log.js';
import type { MfaError, MfaErrorCode } from '../mfa/service.js';
import { RangeList } from '../policy/address.js';
import { StoreUnavailableError } from '../store/sqlite-file.js';
import type { PolicySettings } from '../policy/decide.js';
import { ForwardedError, clientIp } from './client-ip.js';
import { type Ctx, type Kit, type Routed, type WebDeps, parseCookies } from './context.js';
import { type DovecotAuthRequest, checkPassword } from './dovecot-auth.js';
import { type Lang, LANGS, pickLang, TEXT, type Text } from './i18n.js';
import { FailureLimiter } from '../mfa/limiter.js';
import * as pages from './pages.js';
import { signedInRoutes } from './routes.js';
import { type Notice, SESSION_MAX_AGE_MS, SessionStore, sameToken } from './session.js';
import { FLASH_COOKIE, type Flash, isFlash, PRE_COOKIE, SignInGuard, signInHandler } from './signin.js';
import { STYLE } from './style.js';

export type { WebDeps } from './context.js';

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
/** A phone, a laptop, a desktop at work and a few more: the user's least recently used goes beyond this. */
const MAX_SESSIONS_PER_USER = 10;

const SECURITY_HEADERS: Record<string, string> = {
  'Content-Security-Policy': "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
  'X-Content-Type-Options': 'nosniff',
  'X-Frame-Options': 'DENY',
  'Referrer-Policy': 'no-referrer',
  'Cross-Origin-Opener-Policy': 'same-origin',
  'Cross-Origin-Resource-Policy': 'same-origin',
  'Permissions-Policy': 'camera=(), microphone=(), geolocation=()',
};

export function createWebServer(d: WebDeps): WebServer {
  const clock = d.clock ?? Date.now;
  const sessions = new SessionStore({
    idleMs: () => d.config().web.sessionIdleMs,
    maxAgeMs: SESSION_MAX_AGE_MS,
    max: d.limits?.maxSessions ?? MAX_SESSIONS,
    maxPerUser: d.limits?.maxSessionsPerUser ?? MAX_SESSIONS_PER_USER,
    clock,
  });
  const guard = new SignInGuard();
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
    if (c.pre?.fresh) cookies.push(cookie(PRE_COOKIE, c.pre.nonce, '; HttpOnly'));
    if (c.flash === 'clear') cookies.push(cookie(FLASH_COOKIE, '', '; HttpOnly; Max-Age=0'));
    else if (c.flash !== undefined) cookies.push(cookie(FLASH_COOKIE, c.flash, '; HttpOnly; Max-Age=300'));
    if (cookies.length) headers['Set-Cookie'] = cookies;
    c.res.writeHead(status, headers);
    c.res.end(c.req.method === 'HEAD' ? undefined : body);
  }

  function redirect(c: Ctx, to: string): void {
    c.res.setHeader('Location', `${base()}${to}`);
    send(c, 303, '');
  }

  function view(c: Ctx, current: pages.View['current'], errors: Record<string, string> = {}, values: Record<string, string> = {}): pages.View {
    const notices = c.session ? c.session.notices.splice(0) : c.notices.splice(0);
    const csrf = c.session?.csrf ?? (c.pre ? guard.token(c.pre.nonce) : '');
    return { lang: c.lang, t: c.t, base: base(), csrf, user: c.session?.user, current, notices, errors, values };
  }

  function notify(c: Ctx, kind: Notice['kind'], text: string): void {
    (c.session?.notices ?? c.notices).push({ kind, text });
  }

  const FLASH_TEXT = (t: Text, f: Flash): Notice =>
    f === 'signed-out' ? { kind: 'ok', text: t.signedOut } : { kind: 'info', text: f === 'expired' ? t.sessionExpired : t.pageExpired };

  /** The sign-in page: its form's token from the nonce cookie (made when missing). */
  function renderSignIn(c: Ctx, status = 200, errors: Record<string, string> = {}, values: Record<string, string> = {}): void {
    c.pre = guard.nonce(parseCookies(c.req.headers.cookie).get(PRE_COOKIE));
    send(c, status, pages.signInPage(view(c, 'signin', errors, values)));
  }

  /** Back to the sign-in page with a notice: no session holds it, so a short-lived cookie does. */
  function toSignIn(c: Ctx, flash: Flash | undefined): void {
    if (flash !== undefined) c.flash = flash;
    redirect(c, '/');
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
    if (e.code === 'bad-request' && detail.startsWith('name')) text = t.pc.errName;
    if (e.code === 'bad-request' && detail.startsWith('protocols')) text = t.pc.errProtocols;
    const max = /at most (\d+) app passcodes/.exec(detail)?.[1];
    if (e.code === 'conflict' && max !== undefined) text = t.pc.errMax(Number(max));
    if (e.code === 'not-registered' && detail.includes('grant')) text = t.errGrantGone;
    if (e.code === 'rate-limited' && detail.includes('less than a minute ago')) return t.errCodeTooSoon;
    if (e.code === 'locked' || e.code === 'rate-limited') {
      text += ` ${e.retryAfterMs !== undefined ? t.retryIn(Math.max(1, Math.ceil(e.retryAfterMs / 60_000))) : t.retryLater}`;
    }
    return text;
  }

  const STATUS_OF: Partial<Record<MfaErrorCode, number>> = { 'factor-failed': 403, 'proof-required': 403, locked: 423, 'rate-limited': 429, 'mail-failed': 502, 'store-unavailable': 503 };
  const statusOf = (e: MfaError) => STATUS_OF[e.code] ?? (e.status >= 500 ? 502 : 400);


  const value = (c: Ctx, name: string) => (c.form.get(name) ?? '').trim();
  const kit: Kit = { d, clock, sessions, limiter, guard, check, derived, base, send, redirect, view, notify, renderSignIn, toSignIn, errorMessage, statusOf, value };
  const { get: getRoutes, post: postRoutes } = signedInRoutes(kit);
  const signIn = signInHandler(kit);

  // ---- dispatch --------------------------------------------------------------------------------------------

  async function handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://x');
    const cookies = parseCookies(req.headers.cookie);
    const langCookie = cookies.get(LANG_COOKIE);
    const lang: Lang = langCookie === 'ja' || langCookie === 'en' ? langCookie : pickLang(req.headers['accept-language']);
    const c: Ctx = {
      req,
      res,
      path: '',
      ip: '',
      lang,
      t: TEXT[lang],
      session: undefined,
      staleCookie: false,
      form: new URLSearchParams(),
      pre: undefined,
      flash: undefined,
      notices: [],
    };
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
      d.logger.repeated('warn', 'web-bad-forward', `${req.socket.remoteAddress ?? ''} ${e.message}`, { peer: req.socket.remoteAddress ?? '', error: e.message });
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
      if (!c.session) {
        // Not signed in: the sign-in page, which keeps nothing on the server.
        if (c.path !== '/') return toSignIn(c, c.staleCookie ? 'expired' : undefined);
        const flash = cookies.get(FLASH_COOKIE);
        if (flash !== undefined) c.flash = 'clear';
        const shown = new Set<Flash>();
        if (isFlash(flash)) shown.add(flash);
        if (c.staleCookie && !shown.has('signed-out')) shown.add('expired');
        for (const f of shown) c.notices.push(FLASH_TEXT(c.t, f));
        return renderSignIn(c);
      }
      return route({ ...c, session: c.session, user: c.session.user });
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
    const csrf = c.form.get('csrf') ?? undefined;

    if (c.path === '/signin') {
      // The sign-in form's token belongs to the nonce cookie, not to a session.
      const nonce = cookies.get(PRE_COOKIE);
      if (nonce === undefined) return toSignIn(c, 'page-expired');
      if (!guard.check(nonce, csrf)) {
        d.logger.repeated('warn', 'web-csrf', `${c.ip} ${c.path}`, { ip: c.ip, path: c.path });
        return plain(403, c.t.pageExpired);
      }
      return signIn(c);
    }
    // No live session: it timed out (or the daemon restarted): start over at the sign-in page.
    if (!c.session || !route) return toSignIn(c, c.staleCookie ? 'expired' : 'page-expired');
    if (!sameToken(csrf, c.session.csrf)) {
      d.logger.repeated('warn', 'web-csrf', `${c.ip} ${c.path}`, { ip: c.ip, path: c.path });
      return plain(403, c.t.pageExpired);
    }
    // Handlers may replace the session (sign-out): they get this context itself, so send() sees the change.
    const ctx = c as Routed;
    ctx.user = c.session.user;
    return route(ctx);
  }

  /** The store down: the page says so in words (and that nothing changed), not as an internal error. */
  async function handleOrSayStoreDown(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    try {
      await handle(req, res);
    } catch (e) {
      if (!(e instanceof StoreUnavailableError) || res.headersSent) throw e;
      d.logger.repeated('error', 'web-store-unavailable', 'store', { path: (req.url ?? '').split('?')[0] ?? '', error: errorText(e) });
      const lang: Lang = pickLang(req.headers['accept-language']);
      const c = { req, res, lang, t: TEXT[lang], session: undefined, notices: [], path: '', ip: '', staleCookie: false, form: new URLSearchParams(), pre: undefined, flash: undefined } as Ctx;
      send(c, 503, pages.messagePage(view(c, 'other'), '503', TEXT[lang].errors['store-unavailable'] ?? TEXT[lang].errServer));
    }
  }

  const server = http.createServer((req, res) => {
    handleOrSayStoreDown(req, res).catch((e: unknown) => {
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

