// What the MFA page's parts share: the request context, and the kit of responses and helpers the server makes
// once (server.ts) and hands to the sign-in (signin.ts) and to the signed-in routes (routes.ts).
import type http from 'node:http';
import type { Config } from '../config/config.js';
import type { Logger } from '../daemon/log.js';
import type { MfaError, MfaService } from '../mfa/service.js';
import type { RangeList } from '../policy/address.js';
import type { PolicySettings } from '../policy/decide.js';
import type { DovecotAuthRequest, DovecotAuthResult } from './dovecot-auth.js';
import type { Lang, Text } from './i18n.js';
import type { FailureLimiter } from '../mfa/limiter.js';
import type * as pages from './pages.js';
import type { Notice, Session, SessionStore } from './session.js';
import type { Flash, SignInGuard } from './signin.js';

export interface WebDeps {
  mfa: MfaService;
  config: () => Config;
  logger: Logger;
  clock?: () => number;
  /** Checks an ID and password (default: Dovecot's auth-client socket in [web] dovecot_auth_socket). */
  checkPassword?: (r: DovecotAuthRequest) => Promise<DovecotAuthResult>;
  /** Session caps (tests); default 20,000 in all and 10 per user. */
  limits?: { maxSessions?: number; maxSessionsPerUser?: number };
}

export interface Ctx {
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
  /** The sign-in form's nonce (cookie), when this answer shows the form; `fresh` ones are set in the cookie. */
  pre: { nonce: string; fresh: boolean } | undefined;
  /** The notice cookie: what to carry to the sign-in page across a redirect, or 'clear' once shown. */
  flash: Flash | 'clear' | undefined;
  /** Notices for a page shown without a session (the sign-in page). */
  notices: Notice[];
}

export type Routed = Ctx & { session: Session; user: string };
export type Handler = (c: Routed) => Promise<void> | void;

/** Made once per server: what every handler uses. */
export interface Kit {
  d: WebDeps;
  clock: () => number;
  sessions: SessionStore;
  limiter: FailureLimiter;
  guard: SignInGuard;
  check: (r: DovecotAuthRequest) => Promise<DovecotAuthResult>;
  /** The running configuration's trusted proxies and policy settings (rebuilt after a reload). */
  derived(): { config: Config; proxies: RangeList; settings: PolicySettings };
  base(): string;
  send(c: Ctx, status: number, body: string, type?: string): void;
  redirect(c: Ctx, to: string): void;
  view(c: Ctx, current: pages.View['current'], errors?: Record<string, string>, values?: Record<string, string>): pages.View;
  notify(c: Ctx, kind: Notice['kind'], text: string): void;
  renderSignIn(c: Ctx, status?: number, errors?: Record<string, string>, values?: Record<string, string>): void;
  toSignIn(c: Ctx, flash: Flash | undefined): void;
  errorMessage(t: Text, e: MfaError): string;
  statusOf(e: MfaError): number;
  /** A form field, trimmed ("" when absent). */
  value(c: Ctx, name: string): string;
}

/** Cookies of a request by name (the first of a repeated name). */
export function parseCookies(header: string | undefined): Map<string, string> {
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
