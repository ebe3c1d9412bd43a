// What every command group shares: output, the operator's name for the audit log, the configuration and the
// store as a command opens them, and the checks of arguments that come from the command line.
import os from 'node:os';
import type { Command } from 'commander';
import { type Config, loadConfig, locateConfig } from '../config/config.js';
import { DURATION_EXPECTED, parseDuration } from '../config/duration.js';
import { parseAddress } from '../policy/address.js';
import { mfaRequired } from '../policy/decide.js';
import { isAcceptableUserName, normaliseUser } from '../policy/user.js';
import { type OpenedStore, openStore } from '../store/open.js';
import type { Records } from '../store/records.js';

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

/** The SQLite file of the configuration, for the commands that work on a SQLite file as such (db copy). */
export function sqlitePath(config: Config, what: string): string {
  if (config.store.backend !== 'sqlite') throw new UsageError(`${what} works on a SQLite store ([store] backend is "${config.store.backend}")`);
  return config.store.path;
}

/**
 * Opens the configuration's store (SQLite or PostgreSQL) for one command, runs `fn` on its records, and closes it
 * when `fn` settles. Never creates one: a command run against a wrong [store] path (or a file system not mounted,
 * or a database without the schema) must say so instead of working on a new empty store the daemon does not use.
 */
export async function withStore<T>(config: Config, fn: (records: Records, store: OpenedStore) => Promise<T>): Promise<T> {
  const store = await openStore(config, { create: false, migrate: config.store.backend === 'sqlite', applicationName: 'mfagate-cli' });
  try {
    return await fn(store.records, store);
  } finally {
    await store.close();
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
export async function knownUser(s: Records, name: string) {
  const u = await s.getUser(name);
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

