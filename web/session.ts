// Sessions of the MFA page, held in memory: an opaque random id in an HttpOnly cookie, a CSRF token per
// session, an idle timeout and an absolute lifetime. A restart signs everyone out, which costs a user one
// sign-in and keeps no session secret on disk. The id is replaced at sign-in (no fixation).
import crypto from 'node:crypto';

export type Notice = { kind: 'ok' | 'error' | 'info'; text: string };

export interface Session {
  readonly id: string;
  readonly csrf: string;
  /** The signed-in user, or undefined before sign-in. */
  user: string | undefined;
  createdAt: number;
  lastSeen: number;
  /** Messages for the next page shown (post/redirect/get). */
  notices: Notice[];
  /** An app enrolment in progress: what the enrolment page shows until it is confirmed or cancelled. */
  enrolment?: { secret: string; qrSvg: string; startedAt: number };
  /** Backup codes just issued: shown once, then dropped. */
  backupCodes?: string[];
  /** The masked address and expiry of the last login code sent, so the page asks for it. */
  emailSent?: { to: string; expiresAt: number };
}

export interface SessionOptions {
  idleMs: () => number;
  maxAgeMs: number;
  /** At most this many signed-in sessions; the least recently used go first. */
  max: number;
  /** At most this many sessions before sign-in (each page load of the sign-in page makes one). */
  maxAnonymous: number;
  clock: () => number;
}

export const SESSION_MAX_AGE_MS = 12 * 3600_000;

export function newToken(): string {
  return crypto.randomBytes(32).toString('base64url');
}

export class SessionStore {
  /**
   * Sessions before sign-in and signed-in sessions are kept apart, each with its own cap: a flood of anonymous
   * page loads can only push out other anonymous sessions, never sign a user out. Map order is the eviction
   * order (least recently used first).
   */
  private readonly anonymous = new Map<string, Session>();
  private readonly signedIn = new Map<string, Session>();

  constructor(private readonly o: SessionOptions) {}

  get size(): number {
    return this.anonymous.size + this.signedIn.size;
  }

  private mapOf(s: Session): Map<string, Session> {
    return s.user === undefined ? this.anonymous : this.signedIn;
  }

  /** The live session with this id, touched; undefined when unknown or expired (an expired one is dropped). */
  get(id: string | undefined): Session | undefined {
    if (id === undefined || !/^[A-Za-z0-9_-]{43}$/.test(id)) return undefined;
    const s = this.signedIn.get(id) ?? this.anonymous.get(id);
    if (!s) return undefined;
    const map = this.mapOf(s);
    const now = this.o.clock();
    map.delete(id);
    if (this.expired(s, now)) return undefined;
    s.lastSeen = now;
    map.set(id, s);
    return s;
  }

  private expired(s: Session, now: number): boolean {
    return now - s.lastSeen >= this.o.idleMs() || now - s.createdAt >= this.o.maxAgeMs;
  }

  create(user?: string, notices: Notice[] = []): Session {
    const now = this.o.clock();
    const s: Session = { id: newToken(), csrf: newToken(), user, createdAt: now, lastSeen: now, notices };
    const map = this.mapOf(s);
    map.set(s.id, s);
    const cap = user === undefined ? this.o.maxAnonymous : this.o.max;
    while (map.size > cap) {
      const oldest = map.keys().next();
      if (oldest.done) break;
      map.delete(oldest.value);
    }
    return s;
  }

  /** Sign-in: the old session ends and a new one, with a new id and CSRF token, belongs to the user. */
  signIn(old: Session | undefined, user: string): Session {
    if (old) this.destroy(old.id);
    return this.create(user);
  }

  destroy(id: string): void {
    this.anonymous.delete(id);
    this.signedIn.delete(id);
  }

  /** Drops every expired session (run from a timer). */
  sweep(): number {
    const now = this.o.clock();
    let n = 0;
    for (const map of [this.anonymous, this.signedIn]) {
      for (const [id, s] of map) {
        if (this.expired(s, now)) {
          map.delete(id);
          n++;
        }
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
