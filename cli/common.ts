// What every command group shares: output, the operator's name for the audit log, the configuration and the
// store as a command opens them, and the checks of arguments that come from the command line.
import os from 'node:os';
import type { Command } from 'commander';
import { type Config, loadConfig, locateConfig } from '../config/config.js';
import { DURATION_EXPECTED, parseDuration } from '../config/duration.js';
import { parseAddress } from '../policy/address.js';
import { mfaRequired } from '../policy/decide.js';
import { isAcceptableUserName, normaliseUser } from '../policy/user.js';
import { Store } from '../store/store.js';

/** An error the operator caused: printed without a stack, exit code as given. */
export class UsageError extends Error {
  constructor(message: string, readonly exitCode = 2) {
    super(message);
  }
}

interface GlobalOpts {
  config?: string;
}

/** What main() must know about the command that ran when it failed. */
export const running = {
  /** Set by `check`, whose exit status 1 means "refused": its failures must not look like a refusal. */
  deciding: false,
  /** Set by `serve`: a start that failed exits at once, whatever handles are still open. */
  serving: false,
};

export function out(text: string): void {
  process.stdout.write(text.endsWith('\n') ? text : text + '\n');
}

export function json(value: unknown): void {
  out(JSON.stringify(value, null, 2));
}

export function actor(): string {
  const who = process.env['SUDO_USER'] || process.env['USER'] || safeUserName();
  return `cli:${who}`;
}


function safeUserName(): string {
  try {
    return os.userInfo().username;
  } catch {
    return String(process.getuid?.() ?? 'unknown');
  }
}

export function configOf(cmd: Command): Config {
  const opts = cmd.optsWithGlobals<GlobalOpts>();
  return loadConfig(locateConfig(opts.config));
}

/**
 * The SQLite file of the configuration. The PostgreSQL backend so far holds a schema (`db migrate`) and copies
 * (`db copy`); every other command, and the daemon, work on SQLite: say so rather than act on another store.
 */
export function sqlitePath(config: Config): string {
  if (config.store.backend !== 'sqlite') {
    throw new UsageError(
      `[store] backend = "${config.store.backend}": this version of mfagate serves and manages a SQLite store only; ` +
        `with PostgreSQL, "mfagate db migrate" and "mfagate db copy" work (docs/scaling.md)`,
    );
  }
  return config.store.path;
}

export function withStore<T>(config: Config, fn: (store: Store) => T): T {
  // Never creates one: a command run against a wrong [store] path, or while the file system is not mounted,
  // must say so instead of working on a new empty store the daemon does not use.
  const store = Store.open(sqlitePath(config), { create: false, migrate: true });
  try {
    return fn(store);
  } finally {
    store.close();
  }
}

/** withStore for a command that awaits in between (a passcode's hash): the store closes when `fn` settles. */
export async function withStoreAsync<T>(config: Config, fn: (store: Store) => Promise<T>): Promise<T> {
  const store = Store.open(sqlitePath(config), { create: false, migrate: true });
  try {
    return await fn(store);
  } finally {
    store.close();
  }
}

export function userArg(config: Config, raw: string): string {
  const user = normaliseUser(raw, config.users);
  if (!isAcceptableUserName(user)) throw new UsageError(`not a user name: ${JSON.stringify(raw)}`);
  return user;
}

export function ipArg(raw: string): ReturnType<typeof parseAddress> & object {
  const a = parseAddress(raw);
  if (!a) throw new UsageError(`not an IP address: ${JSON.stringify(raw)} (expected e.g. 203.0.113.7 or 2001:db8::1)`);
  return a;
}

export function ttlArg(raw: string): number {
  const ms = parseDuration(raw);
  if (ms === undefined) throw new UsageError(`--ttl: expected ${DURATION_EXPECTED}, got ${JSON.stringify(raw)}`);
  return ms;
}

export function idArg(raw: string, what = 'a grant number'): number {
  if (!/^\d{1,15}$/.test(raw)) throw new UsageError(`--id: expected ${what}, got ${JSON.stringify(raw)}`);
  return Number(raw);
}

/** As the decision sees it: exempt in the store or in [enforcement] exempt_users, else enabled or site-wide. */
export function requiredNow(config: Config, name: string, mfaEnabled: boolean, exempt: boolean, now: number): boolean {
  const settings = { exemptUsers: new Set(config.enforcement.exemptUsers), requiredFrom: config.enforcement.requiredFrom };
  return mfaRequired(settings, name, { mfaEnabled, exempt }, now);
}

/** The store's record of a user, or exit 1: the helpdesk commands act on users the store knows. */
export function knownUser(s: Store, name: string) {
  const u = s.getUser(name);
  if (!u) throw new UsageError(`unknown user "${name}": the store has never seen it (no login, grant or setting yet)`, 1);
  return u;
}

export function exemptLabel(config: Config, u: { name: string; exempt: boolean; mfaEnabled: boolean }): string {
  if (u.exempt) return ' (exempt)';
  if (config.enforcement.exemptUsers.includes(u.name)) return ' (exempt in the configuration)';
  return u.mfaEnabled ? '' : ' (not enabled)';
}

export function plural(n: number, one: string, many = `${one}s`): string {
  return `${n} ${n === 1 ? one : many}`;
}

