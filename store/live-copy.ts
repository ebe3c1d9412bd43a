// The daemon's in-memory copy of what a decision needs: the users whose flags matter (MFA enabled, exempt) and
// the active grants by user and block. Decisions read it without a statement; the store's change feed keeps it
// current (see Store.liveCopy). It holds no I/O of its own: whoever feeds it calls replaceAll and setUser.
import type { Facts, GrantFacts, LookupResult, UserFacts } from '../policy/decide.js';
import type { PasscodeRow } from './passcode-store.js';

/** What the store holds for one user, as far as decisions go. */
export interface UserState {
  /** undefined: unknown, or known with neither flag (the two decide alike). */
  flags: UserFacts | undefined;
  /** The user's active grants (any order; the latest-expiring one of a block wins). */
  grants: readonly ({ block: string } & GrantFacts)[];
  /** The user's passcodes, revoked ones too until they are purged (a check says why one fails); expiry and
   * revocation are checked where they are used. */
  passcodes: readonly PasscodeRow[];
}

/** Where a passcode check reads the passcodes from: the copy in the daemon, the store's table elsewhere. */
export interface PasscodeSource {
  bySelector(selector: string): PasscodeRow | undefined;
  byId(id: number): PasscodeRow | undefined;
}

const MFA = 1;
const EXEMPT = 2;

const FLAG_FACTS: readonly (UserFacts | undefined)[] = [
  undefined,
  { mfaEnabled: true, exempt: false },
  { mfaEnabled: false, exempt: true },
  { mfaEnabled: true, exempt: true },
];

export class LiveCopy implements Facts, PasscodeSource {
  /** Users with a flag set, as MFA | EXEMPT bits; a user with neither is not kept. */
  private flags = new Map<string, number>();
  /** user -> block -> the grant that expires last. Expired entries stay until sweep() or the user changes. */
  private grants = new Map<string, Map<string, GrantFacts>>();
  private grantCount = 0;
  /** Passcodes (revoked too, until purged), by id and by selector; each user's ids, to replace them when the user changes. */
  private passcodesById = new Map<number, PasscodeRow>();
  private passcodesBySelector = new Map<string, PasscodeRow>();
  private passcodesOf = new Map<string, number[]>();
  /** The id of the newest change applied. */
  lastChange = 0;
  /** When the copy was last known to match the store (ms). */
  currentAt = 0;

  /**
   * @param beforeLookup called before each lookup: brings the copy up to date when that costs no waiting
   * (the SQLite feed: one cheap statement, and the changed users when there are any).
   */
  constructor(private readonly beforeLookup?: () => void) {}

  /** Brings the copy up to date now, as a lookup would (the statistics timer: a quiet daemon is current too). */
  refresh(): void {
    this.beforeLookup?.();
  }

  /** A passcode by its selector (brought up to date first, as a lookup is). */
  bySelector(selector: string): PasscodeRow | undefined {
    this.beforeLookup?.();
    return this.passcodesBySelector.get(selector);
  }

  /** A passcode by id (brought up to date first). */
  byId(id: number): PasscodeRow | undefined {
    this.beforeLookup?.();
    return this.passcodesById.get(id);
  }

  lookup(user: string, block: string, now: number): LookupResult {
    this.beforeLookup?.();
    const bits = this.flags.get(user) ?? 0;
    const g = this.grants.get(user)?.get(block);
    return { user: FLAG_FACTS[bits], grant: g !== undefined && g.expiresAt > now ? g : undefined };
  }

  /**
   * Replaces the whole copy (start, or after a gap in the feed). Rows as the store reads them, raw (a million
   * grants load in a second or so: no object per row but the one kept): users [name, mfa_enabled, exempt] with
   * 0/1 flags, grants [user, block, id, expires_at], best sorted by user.
   */
  replaceAll(users: Iterable<readonly unknown[]>, grants: Iterable<readonly unknown[]>, passcodes: Iterable<PasscodeRow>, lastChange: number, now: number): void {
    const fresh = new LiveCopy();
    fresh.addUserRows(users);
    fresh.addGrantRows(grants);
    for (const p of passcodes) fresh.addPasscode(p);
    fresh.lastChange = lastChange;
    fresh.currentAt = now;
    this.adopt(fresh);
  }

  /**
   * Takes over all that `loaded` holds: a copy loaded whole in parts (addUserRows, addGrantRows, addPasscode)
   * while this one went on answering. Decisions see the old copy, then the new one, never a mix.
   */
  adopt(loaded: LiveCopy): void {
    this.flags = loaded.flags;
    this.grants = loaded.grants;
    this.grantCount = loaded.grantCount;
    this.passcodesById = loaded.passcodesById;
    this.passcodesBySelector = loaded.passcodesBySelector;
    this.passcodesOf = loaded.passcodesOf;
    this.lastChange = loaded.lastChange;
    this.currentAt = loaded.currentAt;
  }

  /** Users' rows [name, mfa_enabled, exempt] of a whole load. */
  addUserRows(users: Iterable<readonly unknown[]>): void {
    for (const u of users) {
      const bits = (u[1] === 1 ? MFA : 0) | (u[2] === 1 ? EXEMPT : 0);
      if (bits !== 0) this.flags.set(u[0] as string, bits);
    }
  }

  /** Active grants' rows [user, block, id, expires_at] of a whole load, in any number of parts. */
  addGrantRows(grants: Iterable<readonly unknown[]>): void {
    let lastUser: string | undefined;
    let blocks: Map<string, GrantFacts> | undefined;
    for (const g of grants) {
      const user = g[0] as string;
      if (user !== lastUser || blocks === undefined) {
        lastUser = user;
        blocks = this.grants.get(user);
        if (!blocks) {
          blocks = new Map();
          this.grants.set(user, blocks);
        }
      }
      const block = g[1] as string;
      const expiresAt = g[3] as number;
      const held = blocks.get(block);
      if (held === undefined) this.grantCount++;
      if (held === undefined || expiresAt > held.expiresAt) blocks.set(block, { id: g[2] as number, expiresAt });
    }
  }

  /** Replaces what the copy holds for one user with what the store holds now. */
  setUser(user: string, state: UserState): void {
    this.setFlags(user, state.flags);
    const old = this.grants.get(user);
    if (old) {
      this.grantCount -= old.size;
      this.grants.delete(user);
    }
    for (const g of state.grants) this.addGrant(user, g.block, { id: g.id, expiresAt: g.expiresAt });
    for (const id of this.passcodesOf.get(user) ?? []) {
      const p = this.passcodesById.get(id);
      this.passcodesById.delete(id);
      if (p && this.passcodesBySelector.get(p.selector) === p) this.passcodesBySelector.delete(p.selector);
    }
    this.passcodesOf.delete(user);
    for (const p of state.passcodes) this.addPasscode(p);
  }

  /** Forgets grants that expired at or before `now`; returns how many. */
  sweep(now: number): number {
    let n = 0;
    for (const [user, blocks] of this.grants) {
      for (const [block, g] of blocks) {
        if (g.expiresAt <= now) {
          blocks.delete(block);
          n++;
        }
      }
      if (blocks.size === 0) this.grants.delete(user);
    }
    this.grantCount -= n;
    return n;
  }

  /** What the copy holds: users with a flag, and (user, block) grants kept (some may have expired since). */
  size(): { flaggedUsers: number; grants: number; passcodes: number } {
    return { flaggedUsers: this.flags.size, grants: this.grantCount, passcodes: this.passcodesById.size };
  }

  /** One passcode (a whole load, or a user changed). */
  addPasscode(p: PasscodeRow): void {
    this.passcodesById.set(p.id, p);
    this.passcodesBySelector.set(p.selector, p);
    const ids = this.passcodesOf.get(p.user);
    if (ids) ids.push(p.id);
    else this.passcodesOf.set(p.user, [p.id]);
  }

  private setFlags(user: string, f: UserFacts | undefined): void {
    const bits = f ? (f.mfaEnabled ? MFA : 0) | (f.exempt ? EXEMPT : 0) : 0;
    if (bits === 0) this.flags.delete(user);
    else this.flags.set(user, bits);
  }

  private addGrant(user: string, block: string, g: GrantFacts): void {
    let blocks = this.grants.get(user);
    if (!blocks) {
      blocks = new Map();
      this.grants.set(user, blocks);
    }
    const held = blocks.get(block);
    if (held === undefined) this.grantCount++;
    if (held === undefined || g.expiresAt > held.expiresAt) blocks.set(block, g);
  }
}
