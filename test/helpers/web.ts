// The MFA web page in-process for tests: createWebServer over a second-factor harness (temp store, fake mailer,
// hand-moved clock), a fake password check, and a small HTTP client with a cookie jar that can pick its source
// address on loopback (any of 127/8), read a page, take the form's CSRF token and post the form.
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { createLogger } from '../../daemon/log.js';
import { codeAt } from '../../mfa/totp.js';
import type { DovecotAuthRequest, DovecotAuthResult } from '../../web/dovecot-auth.js';
import { type WebServer, createWebServer } from '../../web/server.js';
import { type Harness, mfaHarness } from './mfa.js';

/** A stand-in for Dovecot's password check: a fixed table of passwords, every call recorded. */
export class FakeAuth {
  readonly calls: DovecotAuthRequest[] = [];
  /** When true, every check answers "temporary failure" (Dovecot unreachable). */
  temporary = false;
  /** When set, checks wait for it before answering (to hold several in flight). */
  gate: Promise<void> | undefined;

  constructor(readonly passwords: Map<string, string>) {}

  readonly check = async (r: DovecotAuthRequest): Promise<DovecotAuthResult> => {
    this.calls.push({ ...r });
    if (this.gate) await this.gate;
    if (this.temporary) return { ok: false, temporary: true, reason: 'auth socket unreachable' };
    const user = r.user.toLowerCase();
    if (this.passwords.get(user) === r.password) return { ok: true, user };
    return { ok: false, temporary: false, reason: 'password mismatch' };
  };
}

export const PASSWORDS: Record<string, string> = { alice: 'alice-pw', bob: 'bob-pw', carol: 'carol-pw' };

export interface WebResponse {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: string;
  /** The Location header, or undefined. */
  location: string | undefined;
  /** The raw Set-Cookie headers of this response. */
  setCookies: string[];
}

export interface ClientOptions {
  /** The connection's source address (a loopback address such as 127.0.0.9); default 127.0.0.1. */
  localAddress?: string;
  /** Sent as Accept-Language; null sends none. Default "en", so pages are in English. */
  lang?: string | null;
  /** Extra headers on every request (X-Forwarded-For). */
  headers?: Record<string, string>;
}

export interface PostOptions {
  /** The CSRF token to send: default the one of the last page read; null sends no csrf field. */
  csrf?: string | null;
  contentType?: string;
  headers?: Record<string, string>;
}

export class WebClient {
  /** Cookie name -> value, as a browser would keep them (a Max-Age=0 cookie is dropped). */
  readonly jar = new Map<string, string>();
  /** The CSRF token of the last page read that had one. */
  csrf: string | undefined;

  constructor(
    readonly port: number,
    readonly opts: ClientOptions = {},
  ) {}

  /** The session cookie's value, or undefined. */
  get session(): string | undefined {
    return this.jar.get('mfagate_session');
  }

  request(method: string, path: string, body?: string | Buffer, headers: Record<string, string> = {}): Promise<WebResponse> {
    const h: Record<string, string> = { ...(this.opts.headers ?? {}) };
    const lang = this.opts.lang === undefined ? 'en' : this.opts.lang;
    if (lang !== null) h['Accept-Language'] = lang;
    if (this.jar.size) h['Cookie'] = [...this.jar].map(([k, v]) => `${k}=${v}`).join('; ');
    if (body !== undefined) h['Content-Length'] = String(Buffer.byteLength(body));
    Object.assign(h, headers);
    return new Promise((resolve, reject) => {
      const req = http.request(
        { host: '127.0.0.1', port: this.port, method, path, headers: h, agent: false, localAddress: this.opts.localAddress ?? '127.0.0.1' },
        (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('error', reject);
          res.on('end', () => {
            const setCookies = res.headers['set-cookie'] ?? [];
            for (const sc of setCookies) {
              const { name, value, attrs } = parseSetCookie(sc);
              if (attrs.get('max-age') === '0') this.jar.delete(name);
              else this.jar.set(name, value);
            }
            const text = Buffer.concat(chunks).toString('utf8');
            const token = csrfOf(text);
            if (token !== undefined) this.csrf = token;
            resolve({ status: res.statusCode ?? 0, headers: res.headers, body: text, location: res.headers.location, setCookies });
          });
        },
      );
      req.on('error', reject);
      req.end(body);
    });
  }

  get(path: string, headers?: Record<string, string>): Promise<WebResponse> {
    return this.request('GET', path, undefined, headers);
  }

  /** Posts a form (application/x-www-form-urlencoded) with the CSRF token of the last page read unless told. */
  post(path: string, fields: Record<string, string> = {}, o: PostOptions = {}): Promise<WebResponse> {
    const form = new URLSearchParams();
    const token = o.csrf === undefined ? this.csrf : o.csrf;
    if (token !== null && token !== undefined) form.set('csrf', token);
    for (const [k, v] of Object.entries(fields)) form.set(k, v);
    return this.request('POST', path, form.toString(), { 'Content-Type': o.contentType ?? 'application/x-www-form-urlencoded', ...(o.headers ?? {}) });
  }

  /**
   * What a browser does: reads `pagePath`, finds the form with id `formId`, and posts its hidden fields (the CSRF
   * token among them) and `fields` to that form's action. Throws when the page has no such form.
   */
  async submit(pagePath: string, formId: string, fields: Record<string, string> = {}): Promise<WebResponse> {
    const page = await this.get(pagePath);
    const f = formOf(page.body, formId);
    if (!f) throw new Error(`no form #${formId} on ${pagePath} (status ${page.status}):\n${page.body.slice(0, 2000)}`);
    const { csrf, ...hidden } = f.hidden;
    return this.post(f.action, { ...hidden, ...fields }, { csrf: csrf ?? null });
  }

  /** Reads the sign-in page and signs in; returns the POST's response (303 on success). */
  async signIn(user: string, password: string, base = ''): Promise<WebResponse> {
    return this.submit(`${base}/`, 'signin', { user, password });
  }
}

// ---- reading responses -------------------------------------------------------------------------------------

export function parseSetCookie(header: string): { name: string; value: string; attrs: Map<string, string> } {
  const [pair = '', ...rest] = header.split(';');
  const eq = pair.indexOf('=');
  const attrs = new Map<string, string>();
  for (const a of rest) {
    const i = a.indexOf('=');
    const k = (i < 0 ? a : a.slice(0, i)).trim().toLowerCase();
    attrs.set(k, i < 0 ? '' : a.slice(i + 1).trim());
  }
  return { name: pair.slice(0, eq).trim(), value: pair.slice(eq + 1).trim(), attrs };
}

/** The Set-Cookie header for cookie `name` in a response, parsed; undefined when it sets none. */
export function cookieSet(r: WebResponse, name: string): { value: string; attrs: Map<string, string> } | undefined {
  for (const sc of r.setCookies) {
    const c = parseSetCookie(sc);
    if (c.name === name) return { value: c.value, attrs: c.attrs };
  }
  return undefined;
}

const ENTITIES: Record<string, string> = { '&amp;': '&', '&lt;': '<', '&gt;': '>', '&quot;': '"', '&#39;': "'" };

export function unescapeHtml(s: string): string {
  return s.replace(/&(?:amp|lt|gt|quot|#39);/g, (e) => ENTITIES[e] ?? e);
}

const escapeRe = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

/** The inner HTML of the element with this id (elements of the same tag must not nest inside it), or undefined. */
export function innerHtml(page: string, id: string): string | undefined {
  const m = new RegExp(`<([a-zA-Z0-9]+)\\b[^>]*\\bid="${escapeRe(id)}"[^>]*>([\\s\\S]*?)</\\1>`).exec(page);
  return m?.[2];
}

/** The text of the element with this id: tags removed, entities decoded, spaces collapsed; undefined if absent. */
export function textOf(page: string, id: string): string | undefined {
  const inner = innerHtml(page, id);
  return inner === undefined ? undefined : unescapeHtml(inner.replace(/<[^>]*>/g, '')).replace(/\s+/g, ' ').trim();
}

/** Whether some element carries this id. */
export function hasId(page: string, id: string): boolean {
  return new RegExp(`\\bid="${escapeRe(id)}"`).test(page);
}

/** Every notice (the messages at the top of a page), as text. */
export function notices(page: string): string[] {
  return [...page.matchAll(/<p class="notice [a-z]+"[^>]*>([\s\S]*?)<\/p>/g)].map((m) => unescapeHtml(m[1] ?? ''));
}

/** The <html lang> of a page. */
export function htmlLang(page: string): string | undefined {
  return /<html lang="([^"]*)"/.exec(page)?.[1];
}

/** The form with this id: its action, its hidden CSRF token and every hidden field (name -> value). */
export function formOf(page: string, id: string): { action: string; csrf: string | undefined; hidden: Record<string, string> } | undefined {
  const m = new RegExp(`<form id="${escapeRe(id)}"[^>]*\\baction="([^"]*)"[^>]*>([\\s\\S]*?)</form>`).exec(page);
  if (!m) return undefined;
  const hidden: Record<string, string> = {};
  for (const h of (m[2] ?? '').matchAll(/<input type="hidden" name="([^"]*)" value="([^"]*)">/g)) hidden[unescapeHtml(h[1] ?? '')] = unescapeHtml(h[2] ?? '');
  return { action: unescapeHtml(m[1] ?? ''), csrf: hidden['csrf'], hidden };
}

/** Every form action on a page. */
export function formActions(page: string): string[] {
  return [...page.matchAll(/<form\b[^>]*\baction="([^"]*)"/g)].map((m) => unescapeHtml(m[1] ?? ''));
}

export function csrfOf(page: string): string | undefined {
  const m = /<input type="hidden" name="csrf" value="([^"]*)">/.exec(page);
  return m ? unescapeHtml(m[1] ?? '') : undefined;
}

// ---- codes -------------------------------------------------------------------------------------------------

/** A 6-digit code that is not the app's code for any time step near `ms` (so it fails for certain). */
export function wrongCode(secret: string, ms: number): string {
  const near = new Set([-2, -1, 0, 1, 2].map((d) => codeAt(secret, ms + d * 30_000)));
  for (let n = 123_456; ; n = (n + 111_111) % 1_000_000) {
    const c = String(n).padStart(6, '0');
    if (!near.has(c)) return c;
  }
}

// ---- the server --------------------------------------------------------------------------------------------

export interface WebRig {
  h: Harness;
  web: WebServer;
  auth: FakeAuth;
  port: number;
  /** A client; every client has its own cookie jar. */
  client(opts?: ClientOptions): WebClient;
  close(): Promise<void>;
}

/** Starts the web page on 127.0.0.1 (a random port) over a fresh harness configured by `toml`. */
export async function startWeb(opts: { toml?: string; passwords?: Record<string, string> } = {}): Promise<WebRig> {
  const h = mfaHarness(opts.toml ? { toml: opts.toml } : {});
  const auth = new FakeAuth(new Map(Object.entries(opts.passwords ?? PASSWORDS)));
  const logger = createLogger('debug', { write: (l) => h.lines.push(l) });
  const web = createWebServer({ mfa: h.svc, config: () => h.config, logger, clock: () => h.clock.now, checkPassword: auth.check });
  await new Promise<void>((resolve, reject) => {
    web.server.once('error', reject);
    web.server.listen(0, '127.0.0.1', () => resolve());
  });
  const port = (web.server.address() as AddressInfo).port;
  return {
    h,
    web,
    auth,
    port,
    client: (o) => new WebClient(port, o),
    async close() {
      web.server.closeAllConnections();
      await new Promise<void>((resolve) => web.server.close(() => resolve()));
      h.close();
    },
  };
}
