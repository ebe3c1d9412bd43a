// Password failures at sign-in, limited like factor failures ([lockout]): per ID, max_failures in window
// blocks that ID for duration; per client address, ip_max_failures in window blocks the address. Held in
// memory: Dovecot's own auth penalty still applies, and a restart only forgets recent failures.

export interface LimitSettings {
  maxFailures: number;
  windowMs: number;
  durationMs: number;
  ipMaxFailures: number;
}

export type LimitVerdict = { ok: true } | { ok: false; scope: 'user' | 'ip'; retryAfterMs: number };

/** Bounded: beyond this many keys the oldest are forgotten (an attacker cycling names cannot grow memory). */
const MAX_KEYS = 100_000;

export class FailureLimiter {
  private readonly users = new Map<string, number[]>();
  private readonly ips = new Map<string, number[]>();

  constructor(
    private readonly settings: () => LimitSettings,
    private readonly clock: () => number,
  ) {}

  check(user: string, ip: string): LimitVerdict {
    const now = this.clock();
    const s = this.settings();
    const u = this.recent(this.users, user, now, Math.max(s.windowMs, s.durationMs));
    if (u.length >= s.maxFailures) {
      // Blocked for `duration` after the failure that reached the limit.
      const reached = u[u.length - s.maxFailures] ?? now;
      const last = u[u.length - 1] ?? now;
      if (last - reached < s.windowMs && last + s.durationMs > now) return { ok: false, scope: 'user', retryAfterMs: last + s.durationMs - now };
    }
    const i = this.recent(this.ips, ip, now, s.windowMs);
    if (i.length >= s.ipMaxFailures) {
      const first = i[i.length - s.ipMaxFailures] ?? now;
      return { ok: false, scope: 'ip', retryAfterMs: Math.max(1000, first + s.windowMs - now) };
    }
    return { ok: true };
  }

  /**
   * Counts an attempt as a failure before its password is checked, so that guesses sent all at once cannot
   * all pass check() while the first ones are still in flight. Returns what to call if it was not a failure:
   * `succeeded` forgets the ID's failures, `void` takes back just this attempt (the check could not be made).
   */
  begin(user: string, ip: string): { succeeded(): void; void(): void } {
    const at = this.clock();
    this.push(this.users, user, at);
    this.push(this.ips, ip, at);
    const takeBack = (map: Map<string, number[]>, key: string) => {
      const list = map.get(key);
      const i = list ? list.lastIndexOf(at) : -1;
      if (list && i >= 0) list.splice(i, 1);
      if (list && list.length === 0) map.delete(key);
    };
    return {
      succeeded: () => {
        this.users.delete(user);
        takeBack(this.ips, ip);
      },
      void: () => {
        takeBack(this.users, user);
        takeBack(this.ips, ip);
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
