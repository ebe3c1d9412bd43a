// Failures held in memory, limited like factor failures ([lockout]): per ID, max_failures in window blocks that
// ID for duration; per client address block, ip_max_failures in window blocks the block. Used for passwords at
// the MFA page's sign-in and for app passcodes (mfa/passcodes.ts), each with counters of its own: Dovecot's own
// auth penalty still applies, and a restart only forgets recent failures.
//
// Who "the ID" is, is Dovecot's to say, not ours: with auth_username_format = %Ln, "alice", "ALICE@x.example"
// and "alice@y.example" are one user. An attempt therefore counts under every name it may be: the name as
// mfagate normalises it, its local part (counted before Dovecot answers, so guesses sent at once under many
// domains all count), and the user Dovecot's answer names (after it answers). The address is counted per
// block (the IPv4 address, the IPv6 /64), as grants are held: one /64 is one household or one attacker.

export interface LimitSettings {
  maxFailures: number;
  windowMs: number;
  durationMs: number;
  ipMaxFailures: number;
}

export type LimitVerdict = { ok: true } | { ok: false; scope: 'user' | 'ip'; retryAfterMs: number };

/** Bounded: beyond this many keys the oldest are forgotten (an attacker cycling names cannot grow memory). */
const MAX_KEYS = 100_000;

/** The names a typed ID counts under before Dovecot answers: itself and, for "local@domain", the local part. */
export function namesOf(user: string): string[] {
  const at = user.lastIndexOf('@');
  return at > 0 ? [user, user.slice(0, at)] : [user];
}

export interface Attempt {
  /** Dovecot refused the password: count the failure under the user it named as well. */
  failed(resolved: string | undefined): void;
  /**
   * Dovecot accepted the password for `resolved`. Unless that user is blocked (by failures counted under other
   * names of it), the failures of every name are forgotten and the answer is ok; a blocked user is not signed in.
   */
  succeeded(resolved: string): LimitVerdict;
  /** The check could not be made (Dovecot unreachable): take the attempt back. */
  void(): void;
}

export class FailureLimiter {
  private readonly users = new Map<string, number[]>();
  private readonly ips = new Map<string, number[]>();

  constructor(
    private readonly settings: () => LimitSettings,
    private readonly clock: () => number,
  ) {}

  /** Whether an attempt may be made now: no name of the ID and not the address block is blocked. */
  check(names: readonly string[], block: string): LimitVerdict {
    for (const name of names) {
      const v = this.checkUser(name);
      if (!v.ok) return v;
    }
    const now = this.clock();
    const s = this.settings();
    const i = this.recent(this.ips, block, now, s.windowMs);
    if (i.length >= s.ipMaxFailures) {
      const first = i[i.length - s.ipMaxFailures] ?? now;
      return { ok: false, scope: 'ip', retryAfterMs: Math.max(1000, first + s.windowMs - now) };
    }
    return { ok: true };
  }

  private checkUser(name: string): LimitVerdict {
    const now = this.clock();
    const s = this.settings();
    const u = this.recent(this.users, name, now, Math.max(s.windowMs, s.durationMs));
    if (u.length >= s.maxFailures) {
      // Blocked for `duration` after the failure that reached the limit.
      const reached = u[u.length - s.maxFailures] ?? now;
      const last = u[u.length - 1] ?? now;
      if (last - reached < s.windowMs && last + s.durationMs > now) return { ok: false, scope: 'user', retryAfterMs: last + s.durationMs - now };
    }
    return { ok: true };
  }

  /**
   * Counts an attempt as a failure under `names` and `block` before its password is checked, so that guesses
   * sent all at once cannot all pass check() while the first ones are still in flight. What Dovecot answers
   * then settles it (see Attempt).
   */
  begin(names: readonly string[], block: string): Attempt {
    const at = this.clock();
    const counted = [...new Set(names)];
    for (const n of counted) this.push(this.users, n, at);
    this.push(this.ips, block, at);
    const takeBack = (map: Map<string, number[]>, key: string) => {
      const list = map.get(key);
      const i = list ? list.lastIndexOf(at) : -1;
      if (list && i >= 0) list.splice(i, 1);
      if (list && list.length === 0) map.delete(key);
    };
    return {
      failed: (resolved) => {
        if (resolved !== undefined && !counted.includes(resolved)) this.push(this.users, resolved, at);
      },
      succeeded: (resolved) => {
        for (const n of counted) takeBack(this.users, n);
        takeBack(this.ips, block);
        const v = this.checkUser(resolved);
        if (!v.ok) return v;
        for (const n of new Set([...counted, resolved])) this.users.delete(n);
        return v;
      },
      void: () => {
        for (const n of counted) takeBack(this.users, n);
        takeBack(this.ips, block);
      },
    };
  }

  /** Forgets failures older than the window (run from a timer). */
  sweep(): void {
    const now = this.clock();
    const s = this.settings();
    for (const [map, keep] of [[this.users, Math.max(s.windowMs, s.durationMs)], [this.ips, s.windowMs]] as const) {
      for (const key of [...map.keys()]) this.recent(map, key, now, keep);
    }
  }

  private recent(map: Map<string, number[]>, key: string, now: number, keepMs: number): number[] {
    const list = map.get(key);
    if (!list) return [];
    const kept = list.filter((t) => t > now - keepMs);
    if (kept.length === 0) map.delete(key);
    else if (kept.length !== list.length) map.set(key, kept);
    return kept;
  }

  private push(map: Map<string, number[]>, key: string, now: number): void {
    const list = map.get(key) ?? [];
    list.push(now);
    // Only the newest few matter for the limits.
    if (list.length > 1000) list.splice(0, list.length - 1000);
    map.delete(key);
    map.set(key, list);
    while (map.size > MAX_KEYS) {
      const oldest = map.keys().next();
      if (oldest.done) break;
      map.delete(oldest.value);
    }
  }
}
