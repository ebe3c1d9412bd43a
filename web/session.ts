// Sessions of the MFA page, held in memory: an opaque random id in an HttpOnly cookie, a CSRF token per
// session, an idle timeout and an absolute lifetime. A restart signs everyone out, which costs a user one
// sign-in and keeps no session secret on disk. A session is made only once the password is right (the sign-in
// form needs no server state, see signin-guard.ts), so loading pages cannot push anyone out; each user holds at
// most a few, so one account signing in again and again cannot either.
import crypto from 'node:crypto';

export type Notice = { kind: 'ok' | 'error' | 'info'; text: string };

export interface Session {
  readonly id: string;
  readonly csrf: string;
  /** The signed-in user: sessions exist only after a right password (see signin-guard.ts for before). */
  readonly user: string;
  createdAt: number;
  lastSeen: number;
  /** Messages for the next page shown (post/redirect/get). */
  notices: Notice[];
  /** An app enrolment in progress: what the enrolment page shows until it is confirmed or cancelled. */
  enrolment?: { secret: string; qrSvg: string; startedAt: number };
  /** Backup codes just issued: shown once, then dropped. */
  backupCodes?: string[];
  /** An app passcode just made: shown once, then dropped. */
  passcodeShown?: { name: string; code: string; protocols: string[] };
  /** The masked address and expiry of the last login code sent, so the page asks for it. */
  emailSent?: { to: string; expiresAt: number };
}

export interface SessionOptions {
  idleMs: () => number;
  maxAgeMs: number;
  /** At most this many sessions; the least recently used go first. */
  max: number;
  /** At most this many sessions per user; the user's least recently used goes first. */
  maxPerUser: number;
  clock: () => number;
}

export const SESSION_MAX_AGE_MS = 12 * 3600_000;

export function newToken(): string {
  return crypto.randomBytes(32).toString('base64url');
}

export class SessionStore {
  /** Map order is the eviction order (least recently used first). */
  private readonly sessions = new Map<string, Session>();
  /** Each user's session ids, least recently used first: one account signing in again and again only ends its own. */
  private readonly byUser = new Map<string, Set<string>>();

  constructor(private readonly o: SessionOptions) {}

  get size(): number {
    return this.sessions.size;
  }

  /** How many sessions the user has. */
  countOf(user: string): number {
    return this.byUser.get(user)?.size ?? 0;
  }

  /** The live session with this id, touched; undefined when unknown or expired (an expired one is dropped). */
  get(id: string | undefined): Session | undefined {
    if (id === undefined || !/^[A-Za-z0-9_-]{43}$/.test(id)) return undefined;
    const s = this.sessions.get(id);
    if (!s) return undefined;
    const now = this.o.clock();
    if (this.expired(s, now)) {
      this.destroy(id);
      return undefined;
    }
    s.lastSeen = now;
    this.sessions.delete(id);
    this.sessions.set(id, s);
    const mine = this.byUser.get(s.user);
    mine?.delete(id);
    mine?.add(id);
    return s;
  }

  private expired(s: Session, now: number): boolean {
    return now - s.lastSeen >= this.o.idleMs() || now - s.createdAt >= this.o.maxAgeMs;
  }

  /** Sign-in: a new session, with a new id and CSRF token, for the user (an old one, if given, ends). */
  signIn(old: Session | undefined, user: string): Session {
    if (old) this.destroy(old.id);
    const now = this.o.clock();
    const s: Session = { id: newToken(), csrf: newToken(), user, createdAt: now, lastSeen: now, notices: [] };
    this.sessions.set(s.id, s);
    let mine = this.byUser.get(user);
    if (!mine) {
      mine = new Set();
      this.byUser.set(user, mine);
    }
    mine.add(s.id);
    for (const id of mine) {
      if (mine.size <= this.o.maxPerUser) break;
      this.destroy(id);
    }
    for (const id of this.sessions.keys()) {
      if (this.sessions.size <= this.o.max) break;
      this.destroy(id);
    }
    return s;
  }

  destroy(id: string): void {
    const s = this.sessions.get(id);
    if (!s) return;
    this.sessions.delete(id);
    const mine = this.byUser.get(s.user);
    mine?.delete(id);
    if (mine?.size === 0) this.byUser.delete(s.user);
  }

  /** Drops every expired session (run from a timer). */
  sweep(): number {
    const now = this.o.clock();
    let n = 0;
    for (const [id, s] of this.sessions) {
      if (this.expired(s, now)) {
        this.destroy(id);
        n++;
      }
    }
    return n;
  }
}

export function sameToken(a: string | undefined, b: string): boolean {
  if (a === undefined) return false;
  const x = Buffer.from(a);
  const y = Buffer.from(b);
  return x.length === y.length && crypto.timingSafeEqual(x, y);
}
