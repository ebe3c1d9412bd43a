// Signing in to the MFA page. The form's CSRF protection needs no server state. Loading the sign-in page keeps nothing on the
// server: the browser gets a random nonce in a cookie (HttpOnly, SameSite=Strict) and the form carries a MAC
// of that nonce under a key that lives only in this process. A post is taken only when the two match, which a
// page of another site cannot arrange (it can neither read the cookie nor compute the MAC, and a cookie it
// manages to plant, say from a sibling host, comes without a matching MAC). A restart makes a new key: a form
// loaded before it says "page expired" once, as a timed-out session does.
//
// Why not sessions before sign-in with a cap per address: anything kept per page load is something a flood of
// page loads can fill, and a cap per address both fails the many users behind one NAT (a campus, a mobile
// carrier) and is walked around with the addresses of one IPv6 /64. With no state, there is nothing to fill.
// Server sessions begin once Dovecot has accepted the password (signInHandler, below).
import crypto from 'node:crypto';
import { normaliseUser } from '../policy/user.js';
import type { Ctx, Kit } from './context.js';
import { credentialProblem } from './dovecot-auth.js';
import { namesOf } from '../mfa/limiter.js';

export const PRE_COOKIE = 'mfagate_pre';

const NONCE = /^[A-Za-z0-9_-]{43}$/;

export class SignInGuard {
  private readonly key = crypto.randomBytes(32);

  /** The nonce the browser keeps: the one it sent when well-formed (several tabs share it), else a new one. */
  nonce(fromCookie: string | undefined): { nonce: string; fresh: boolean } {
    if (fromCookie !== undefined && NONCE.test(fromCookie)) return { nonce: fromCookie, fresh: false };
    return { nonce: crypto.randomBytes(32).toString('base64url'), fresh: true };
  }

  /** The form's token for a nonce. */
  token(nonce: string): string {
    return crypto.createHmac('sha256', this.key).update(`mfagate sign-in\0${nonce}`).digest('base64url');
  }

  /** Whether a posted token belongs to the nonce in the cookie (constant time). */
  check(nonce: string | undefined, token: string | undefined): boolean {
    if (nonce === undefined || token === undefined || !NONCE.test(nonce)) return false;
    const want = Buffer.from(this.token(nonce));
    const got = Buffer.from(token);
    return got.length === want.length && crypto.timingSafeEqual(got, want);
  }
}

/** Notices carried to the sign-in page by a cookie across a redirect (there is no session to hold them). */
export const FLASH_COOKIE = 'mfagate_notice';
export const FLASHES = ['expired', 'signed-out', 'page-expired'] as const;
export type Flash = (typeof FLASHES)[number];

export function isFlash(v: string | undefined): v is Flash {
  return (FLASHES as readonly (string | undefined)[]).includes(v);
}

/**
 * The sign-in post, once its CSRF token checked out: the password goes to Dovecot (never before the limits
 * allow an attempt), and only a right password makes a session.
 */
export function signInHandler(k: Kit): (c: Ctx) => Promise<void> {
  const { d, sessions, limiter, check, renderSignIn, redirect, notify, value } = k;
  return async function signIn(c: Ctx): Promise<void> {
    const user = value(c, 'user');
    const password = c.form.get('password') ?? '';
    const again = (status: number, errors: Record<string, string>) => renderSignIn(c, status, errors, { 'signin.user': user });
    const errors: Record<string, string> = {};
    if (user === '') errors['signin.user'] = c.t.errRequired;
    if (password === '') errors['signin.password'] = c.t.errRequired;
    if (Object.keys(errors).length) return again(400, errors);
    if (credentialProblem(user, password) !== undefined || /[\t\r\n]/.test(password)) return again(400, { 'signin.password': c.t.errBadCredentials });
    // The ID as the policy counts it ([users] rules), so "Alice" and "alice@realm" share one allowance, and its
    // local part, which is what Dovecot often makes of it; the address per block, as grants are held.
    const key = normaliseUser(user, d.config().users);
    const names = namesOf(key);
    const block = d.mfa.limitBlock(c.ip);
    const limited = (scope: 'user' | 'ip', retryAfterMs: number, who = key) => {
      // Refused without asking Dovecot: a client hammering on after the limit gets one line per interval.
      d.logger.repeated('warn', 'web-signin', `limited ${scope} ${scope === 'ip' ? block : who}`, { user: who, ip: c.ip, result: 'limited', scope });
      return again(429, { 'signin.password': c.t.errSignInLimited(Math.max(1, Math.ceil(retryAfterMs / 60_000))) });
    };
    const limit = limiter.check(names, block);
    if (!limit.ok) return limited(limit.scope, limit.retryAfterMs);
    const attempt = limiter.begin(names, block);
    const r = await check({ user, password, remoteIp: c.ip });
    // Dovecot says who the user is (user=, after its auth_username_format), on success and on failure.
    const resolved = (raw: string | undefined): string | undefined => {
      if (raw === undefined) return undefined;
      try {
        return d.mfa.user(raw);
      } catch {
        return undefined;
      }
    };
    if (!r.ok && r.temporary) {
      attempt.void();
      d.logger.log('error', 'web-signin', { user: key, ip: c.ip, result: 'unavailable', reason: r.reason });
      notify(c, 'error', c.t.errAuthUnavailable);
      return again(503, {});
    }
    const canonical = r.ok ? resolved(r.user) : undefined;
    if (canonical === undefined) {
      attempt.failed(r.ok ? undefined : resolved(r.user));
      d.logger.log('info', 'web-signin', { user: key, ip: c.ip, result: 'refused', ...(r.ok ? { reason: 'unacceptable user name' } : { reason: r.reason }) });
      return again(401, { 'signin.password': c.t.errBadPassword });
    }
    // The right password, but for a user whose failures (counted under other names of it) block it.
    const after = attempt.succeeded(canonical);
    if (!after.ok) return limited(after.scope, after.retryAfterMs, canonical);
    d.logger.log('info', 'web-signin', { user: canonical, ip: c.ip, result: 'ok' });
    c.session = sessions.signIn(c.session, canonical);
    redirect(c, '/');
  };
}
