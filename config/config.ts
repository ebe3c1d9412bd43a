// The configuration: TOML on disk, checked key by key, with built-in defaults that work on a fresh checkout.
// A bad file is refused with the file, the key and what was expected.
import fs from 'node:fs';
import path from 'node:path';
import { parse as parseToml, TomlDate, TomlError } from 'smol-toml';
import { z } from 'zod';
import { type BlockPrefixes, parseCidr, RangeList } from '../policy/address.js';
import type { PolicySettings } from '../policy/decide.js';
import type { UserNameRules } from '../policy/user.js';
import { normaliseUser } from '../policy/user.js';
import { DURATION_EXPECTED, parseDuration } from './duration.js';
import { type Endpoint, LISTEN_EXPECTED, parseEndpoint } from './listen.js';
import { type PgSettings, pgUrlProblem } from './postgresql.js';

export const DEFAULT_PROTOCOLS = ['imap', 'pop3', 'smtp', 'submission', 'sieve'];
export const DEFAULT_DOVECOT_MESSAGE =
  '[AUTHENTICATIONFAILED] MFA required: sign in to webmail from this network (browser), pass MFA, then retry';
export const DEFAULT_REJECT_ACTION =
  '554 5.7.1 MFA required: sign in to webmail from this network (browser), pass MFA, then retry';

export class ConfigError extends Error {
  constructor(
    readonly file: string,
    readonly problems: string[],
  ) {
    super(`${file}: ${problems.length === 1 ? problems[0] : '\n  ' + problems.join('\n  ')}`);
    this.name = 'ConfigError';
  }
}

export interface Config {
  /** The file the configuration came from, or undefined for the built-in defaults. */
  file: string | undefined;
  /** The SQLite file (backend "sqlite"), or how to reach the database (backend "postgresql": the PgSettings part). */
  /** stateFile: where the daemon on this host writes what it decides from, with PostgreSQL (mfagate stats reads it). */
  store: { backend: 'sqlite' | 'postgresql'; path: string; stateFile: string } & PgSettings;
  grants: { ttlMs: number; ipv4Prefix: number; ipv6Prefix: number; purgeAfterMs: number };
  networks: { trusted: string[]; untrusted: string[]; webmail: string[] };
  enforcement: {
    mode: 'enforce' | 'log-only' | 'off';
    requiredFrom: number | undefined;
    exemptUsers: string[];
    protocols: string[];
  };
  users: UserNameRules;
  dovecot: {
    listen: Endpoint[];
    apiKey: string;
    apiHeader: string;
    message: string;
    messages: Record<string, string>;
    maxBodyBytes: number;
  };
  postfix: { listen: Endpoint[]; socketMode: number; rejectAction: string };
  api: { listen: Endpoint[]; socketMode: number; tokenFile: string };
  web: {
    /** Empty: no web page. */
    listen: Endpoint[];
    /** The sub-path the reverse proxy forwards, without a trailing "/": "" for the root, "/mfa". */
    basePath: string;
    trustedProxies: string[];
    dovecotAuthSocket: string;
    firstRegistration: 'anywhere' | 'trusted-only';
    secureCookie: boolean;
    sessionIdleMs: number;
  };
  secrets: { keyFile: string };
  totp: { issuer: string };
  otp: { digits: number; ttlMs: number; refusedEmailDomains: string[] };
  mail: { smtp: string; from: string; notify: boolean };
  lockout: { maxFailures: number; windowMs: number; durationMs: number; ipMaxFailures: number };
  appPasscodes: {
    enabled: boolean;
    /** What a new passcode may be used for unless its creator chooses fewer. */
    protocols: PasscodeProtocol[];
    maxPerUser: number;
    /** How long a new passcode works; undefined: until revoked. */
    ttlMs: number | undefined;
  };
  log: { level: 'debug' | 'info' | 'warn' | 'error' };
}

/** The protocols an app passcode can be limited to ("smtp" covers SMTP AUTH and Dovecot's submission). */
export const PASSCODE_PROTOCOLS = ['imap', 'pop3', 'smtp', 'sieve'] as const;
export type PasscodeProtocol = (typeof PASSCODE_PROTOCOLS)[number];

// ---- field checks -------------------------------------------------------------------------------------

const duration = z.string().refine((s) => parseDuration(s) !== undefined, { message: `expected ${DURATION_EXPECTED}` });

const cidrList = z.array(
  z.string().refine((s) => parseCidr(s) !== undefined, {
    message: 'expected an IP address or CIDR range such as "192.0.2.0/24" or "2001:db8::/48"',
  }),
);

// Text a mail program shows: printable ASCII on one line (non-ASCII is shown badly by IMAP/POP/SMTP clients).
const asciiLine = (what: string, max: number) =>
  z
    .string()
    .min(1, { message: `expected ${what}, not empty` })
    .max(max, { message: `expected at most ${max} characters` })
    .refine((s) => /^[\x20-\x7e]+$/.test(s), { message: `expected ${what} in printable ASCII on one line` });

const ACTION_WORDS = /^(REJECT|DEFER|DEFER_IF_PERMIT|DEFER_IF_REJECT|HOLD|DISCARD|WARN|INFO)(\s|$)|^[45]\d\d(\s|$)/i;

const endpointList = z.array(
  z.string().refine((s) => parseEndpoint(s, "/") !== undefined, { message: `expected ${LISTEN_EXPECTED} (UNIX paths at most 107 bytes)` }),
);

const listen = endpointList.refine((a) => a.length > 0, { message: 'expected at least one listener' });

const socketMode = z.string().refine((s) => /^0?[0-7]{3}$/.test(s), { message: 'expected an octal mode such as "0660"' });

// A URL path prefix: "/", "/mfa", "/mail/mfa/". No "//" and no "." or ".." segments, which browsers and proxies
// would collapse, so that the page's own links always match what the proxy forwards.
const basePath = z.string().refine(
  (s) => /^\/[A-Za-z0-9._~/-]*$/.test(s) && !s.includes('//') && !s.split('/').some((seg) => seg === '.' || seg === '..'),
  { message: 'expected a URL path such as "/" or "/mfa" (letters, digits, ".", "_", "~", "-" and "/"; no "//", "." or ".." segments)' },
);

const SESSION_IDLE_MIN_MS = 60_000;
const SESSION_IDLE_MAX_MS = 86_400_000;

const rfc3339 =
  /^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$/;

const schema = z.strictObject({
  store: z
    .strictObject({
      backend: z.enum(['sqlite', 'postgresql']).default('sqlite'),
      path: z.string().min(1, { message: 'expected a file path' }).default('var/mfagate.db'),
      url: z.string().default(''),
      password_file: z.string().default(''),
      tls: z.enum(['disable', 'require', 'verify-full']).default('verify-full'),
      ca_file: z.string().default(''),
      state_file: z.string().min(1, { message: 'expected a file path' }).default('var/node-state.json'),
    })
    .prefault({}),
  grants: z
    .strictObject({
      ttl: duration.default('14h'),
      ipv4_prefix: z.int().min(8, { message: 'expected 8..32' }).max(32, { message: 'expected 8..32' }).default(32),
      ipv6_prefix: z.int().min(16, { message: 'expected 16..128' }).max(128, { message: 'expected 16..128' }).default(64),
      purge_after: duration.default('30d'),
    })
    .prefault({}),
  networks: z
    .strictObject({ trusted: cidrList.default([]), untrusted: cidrList.default([]), webmail: cidrList.default([]) })
    .prefault({}),
  enforcement: z
    .strictObject({
      mode: z.enum(['enforce', 'log-only', 'off'], { message: 'expected "enforce", "log-only" or "off"' }).default('enforce'),
      required_from: z
        .union([z.string(), z.instanceof(TomlDate)])
        .refine((v) => (v instanceof TomlDate ? v.isDateTime() && !v.isLocal() : v === '' || (rfc3339.test(v) && !Number.isNaN(Date.parse(v)))), {
          message: 'expected an RFC 3339 instant such as "2026-04-01T00:00:00+09:00", or "" for never',
        })
        .default(''),
      exempt_users: z.array(z.string().min(1)).default([]),
      protocols: z.array(z.string().regex(/^[a-z0-9_-]+$/i, { message: 'expected a protocol name such as "imap"' })).default(DEFAULT_PROTOCOLS),
    })
    .prefault({}),
  users: z
    .strictObject({
      strip_realms: z.array(z.string().regex(/^[^@\s]+$/, { message: 'expected a domain such as "example.ac.jp" (no "@")' })).default([]),
      lowercase: z.boolean().default(true),
    })
    .prefault({}),
  dovecot: z
    .strictObject({
      listen: listen.default(['127.0.0.1:8470']),
      api_key: z.string().default(''),
      api_header: z.string().regex(/^[A-Za-z0-9-]+$/, { message: 'expected an HTTP header name such as "X-API-Key"' }).default('X-API-Key'),
      message: asciiLine('the message a refused mail program shows', 400).default(DEFAULT_DOVECOT_MESSAGE),
      messages: z.record(z.string(), asciiLine('the message a refused mail program shows', 400)).default({}),
      max_body_bytes: z.int().min(1024).max(1 << 20).default(65536),
    })
    .prefault({}),
  postfix: z
    .strictObject({
      listen: listen.default(['unix:var/postfix-policy.sock']),
      socket_mode: socketMode.default('0660'),
      reject_action: asciiLine('an access(5) action', 4000)
        .refine((s) => ACTION_WORDS.test(s), {
          message: 'expected an access(5) action such as "554 5.7.1 text", "REJECT text" or "DEFER_IF_PERMIT text"',
        })
        .default(DEFAULT_REJECT_ACTION),
    })
    .prefault({}),
  api: z
    .strictObject({
      listen: listen.default(['unix:var/api.sock']),
      socket_mode: socketMode.default('0660'),
      token_file: z.string().default(''),
    })
    .prefault({}),
  web: z
    .strictObject({
      listen: endpointList.default(['127.0.0.1:8480']),
      base_path: basePath.default('/'),
      trusted_proxies: cidrList.default([]),
      dovecot_auth_socket: z.string().min(1, { message: 'expected a socket path' }).default('/run/dovecot/auth-client'),
      first_registration: z.enum(['anywhere', 'trusted-only'], { message: 'expected "anywhere" or "trusted-only"' }).default('anywhere'),
      secure_cookie: z.boolean().default(true),
      session_idle: duration
        .refine(
          (s) => {
            const ms = parseDuration(s);
            return ms === undefined || (ms >= SESSION_IDLE_MIN_MS && ms <= SESSION_IDLE_MAX_MS);
          },
          { message: 'expected a duration from "1m" to "24h"' },
        )
        .default('15m'),
    })
    .prefault({}),
  secrets: z.strictObject({ key_file: z.string().min(1, { message: 'expected a file path' }).default('var/secret.key') }).prefault({}),
  totp: z
    .strictObject({ issuer: z.string().min(1).max(64).refine((s) => !s.includes(':'), { message: 'expected a name without ":"' }).default('mfagate') })
    .prefault({}),
  otp: z
    .strictObject({
      digits: z.int().min(6, { message: 'expected 6..10' }).max(10, { message: 'expected 6..10' }).default(6),
      ttl: duration.default('10m'),
      refused_email_domains: z.array(z.string().regex(/^[^@\s]+$/, { message: 'expected a domain such as "example.ac.jp" (no "@")' })).default([]),
    })
    .prefault({}),
  mail: z
    .strictObject({
      smtp: z
        .string()
        .refine((s) => /^smtps?:\/\/[^/\s]+(:\d+)?\/?$/.test(s), { message: 'expected an SMTP URL such as "smtp://127.0.0.1:25"' })
        .default('smtp://127.0.0.1:25'),
      from: z.string().regex(/^[^\s@]+@[^\s@]+$/, { message: 'expected a mail address such as "mfa@example.ac.jp"' }).default('mfagate@localhost'),
      notify: z.boolean().default(true),
    })
    .prefault({}),
  lockout: z
    .strictObject({
      max_failures: z.int().min(1).max(1000).default(5),
      window: duration.default('15m'),
      duration: duration.default('15m'),
      ip_max_failures: z.int().min(1).max(100000).default(50),
    })
    .prefault({}),
  app_passcodes: z
    .strictObject({
      enabled: z.boolean().default(false),
      protocols: z
        .array(z.enum(PASSCODE_PROTOCOLS, { message: 'expected "imap", "pop3", "smtp" or "sieve"' }))
        .min(1, { message: 'expected at least one protocol' })
        .default([...PASSCODE_PROTOCOLS]),
      max_per_user: z.int().min(1, { message: 'expected 1..100' }).max(100, { message: 'expected 1..100' }).default(20),
      ttl: z
        .string()
        .refine((s) => s === '' || parseDuration(s) !== undefined, { message: `expected ${DURATION_EXPECTED}, or "" for no expiry` })
        .default(''),
    })
    .prefault({}),
  log: z
    .strictObject({ level: z.enum(['debug', 'info', 'warn', 'error'], { message: 'expected "debug", "info", "warn" or "error"' }).default('info') })
    .prefault({}),
});

type RawConfig = z.output<typeof schema>;

// ---- loading -------------------------------------------------------------------------------------------

/** Which file to read: --config, then $MFAGATE_CONFIG, then ./mfagate.toml if it exists, else none (defaults). */
export function locateConfig(explicit: string | undefined, env: NodeJS.ProcessEnv = process.env, cwd = process.cwd()): string | undefined {
  if (explicit !== undefined && explicit !== '') return path.resolve(cwd, explicit);
  const fromEnv = env['MFAGATE_CONFIG'];
  if (fromEnv !== undefined && fromEnv !== '') return path.resolve(cwd, fromEnv);
  const local = path.resolve(cwd, 'mfagate.toml');
  return fs.existsSync(local) ? local : undefined;
}

export function loadConfig(file: string | undefined, cwd = process.cwd()): Config {
  if (file === undefined) return fromRaw(schema.parse({}), undefined, cwd);
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw new ConfigError(file, [`cannot read the file: ${(e as Error).message}`]);
  }
  return parseConfigText(text, file);
}

export function parseConfigText(text: string, file: string): Config {
  let data: unknown;
  try {
    data = parseToml(text);
  } catch (e) {
    const where = e instanceof TomlError ? `line ${e.line}, column ${e.column}: ` : '';
    const first = (e as Error).message.split('\n')[0] ?? '';
    throw new ConfigError(file, [`${where}not valid TOML: ${first}`]);
  }
  const result = schema.safeParse(data);
  if (!result.success) {
    const problems = result.error.issues.map((issue) => {
      const key = issue.path.map(String).join('.');
      if (issue.code === 'unrecognized_keys') {
        const keys = issue.keys.map((k) => (key ? `${key}.${k}` : k));
        return `${keys.join(', ')}: unknown key${keys.length > 1 ? 's' : ''} (see docs/configuration.md)`;
      }
      return `${key || '(top level)'}: ${issue.message}`;
    });
    throw new ConfigError(file, problems);
  }
  return fromRaw(result.data, file, path.dirname(file));
}

function storeOf(raw: RawConfig['store'], baseDir: string, problems: string[]): Config['store'] {
  const file = (f: string) => (f === '' ? undefined : path.resolve(baseDir, f));
  const pgKeys = (['url', 'password_file', 'ca_file'] as const).filter((k) => raw[k] !== '');
  if (raw.backend === 'sqlite') {
    if (pgKeys.length > 0) problems.push(`store.${pgKeys[0]}: only for backend = "postgresql" (backend is "sqlite")`);
  } else {
    const problem = raw.url === '' ? 'expected the database URL, e.g. "postgresql://mfagate@db1.example.ac.jp,db2.example.ac.jp/mfagate"' : pgUrlProblem(raw.url);
    if (problem) problems.push(`store.url: ${problem}`);
    if (raw.ca_file !== '' && raw.tls !== 'verify-full') problems.push('store.ca_file: only used with tls = "verify-full"');
  }
  return {
    backend: raw.backend,
    path: path.resolve(baseDir, raw.path),
    stateFile: path.resolve(baseDir, raw.state_file),
    url: raw.url,
    passwordFile: file(raw.password_file),
    tls: raw.tls,
    caFile: file(raw.ca_file),
  };
}

function fromRaw(raw: RawConfig, file: string | undefined, baseDir: string): Config {
  const problems: string[] = [];
  const endpoints = (key: string, list: string[]): Endpoint[] =>
    list.flatMap((s, i) => {
      const e = parseEndpoint(s, baseDir);
      if (!e) {
        problems.push(`${key}.${i}: expected ${LISTEN_EXPECTED} (UNIX paths at most 107 bytes), got ${JSON.stringify(s)}`);
        return [];
      }
      return [e];
    });
  const userRules: UserNameRules = { lowercase: raw.users.lowercase, stripRealms: raw.users.strip_realms };
  const rf = raw.enforcement.required_from;
  const config: Config = {
    file,
    store: storeOf(raw.store, baseDir, problems),
    grants: {
      ttlMs: parseDuration(raw.grants.ttl) ?? 0,
      ipv4Prefix: raw.grants.ipv4_prefix,
      ipv6Prefix: raw.grants.ipv6_prefix,
      purgeAfterMs: parseDuration(raw.grants.purge_after) ?? 0,
    },
    networks: raw.networks,
    enforcement: {
      mode: raw.enforcement.mode,
      requiredFrom: rf instanceof TomlDate ? rf.getTime() : rf === '' ? undefined : Date.parse(rf),
      exemptUsers: raw.enforcement.exempt_users.map((u) => normaliseUser(u, userRules)),
      protocols: raw.enforcement.protocols.map((p) => p.toLowerCase()),
    },
    users: userRules,
    dovecot: {
      listen: endpoints('dovecot.listen', raw.dovecot.listen),
      apiKey: raw.dovecot.api_key,
      apiHeader: raw.dovecot.api_header.toLowerCase(),
      message: raw.dovecot.message,
      messages: Object.fromEntries(Object.entries(raw.dovecot.messages).map(([k, v]) => [k.toLowerCase(), v])),
      maxBodyBytes: raw.dovecot.max_body_bytes,
    },
    postfix: {
      listen: endpoints('postfix.listen', raw.postfix.listen),
      socketMode: parseInt(raw.postfix.socket_mode, 8),
      rejectAction: raw.postfix.reject_action,
    },
    api: {
      listen: endpoints('api.listen', raw.api.listen),
      socketMode: parseInt(raw.api.socket_mode, 8),
      tokenFile: raw.api.token_file === '' ? '' : path.resolve(baseDir, raw.api.token_file),
    },
    web: {
      listen: endpoints('web.listen', raw.web.listen),
      basePath: raw.web.base_path.replace(/\/$/, ''),
      trustedProxies: raw.web.trusted_proxies,
      dovecotAuthSocket: path.resolve(baseDir, raw.web.dovecot_auth_socket),
      firstRegistration: raw.web.first_registration,
      secureCookie: raw.web.secure_cookie,
      sessionIdleMs: parseDuration(raw.web.session_idle) ?? 0,
    },
    secrets: { keyFile: path.resolve(baseDir, raw.secrets.key_file) },
    totp: raw.totp,
    otp: { digits: raw.otp.digits, ttlMs: parseDuration(raw.otp.ttl) ?? 0, refusedEmailDomains: raw.otp.refused_email_domains.map((d) => d.toLowerCase()) },
    mail: raw.mail,
    lockout: {
      maxFailures: raw.lockout.max_failures,
      windowMs: parseDuration(raw.lockout.window) ?? 0,
      durationMs: parseDuration(raw.lockout.duration) ?? 0,
      ipMaxFailures: raw.lockout.ip_max_failures,
    },
    appPasscodes: {
      enabled: raw.app_passcodes.enabled,
      protocols: [...new Set(raw.app_passcodes.protocols)],
      maxPerUser: raw.app_passcodes.max_per_user,
      ttlMs: raw.app_passcodes.ttl === '' ? undefined : parseDuration(raw.app_passcodes.ttl),
    },
    log: raw.log,
  };
  if (config.api.listen.some((e) => e.kind === 'tcp') && config.api.tokenFile === '') {
    problems.push('api.token_file: expected a file holding the bearer token when api.listen has a TCP address');
  }
  if (problems.length > 0) throw new ConfigError(file ?? '(built-in defaults)', problems);
  return config;
}

/** The address block a grant (and an address limit) covers: the IPv4 prefix and the IPv6 prefix. */
export function blockPrefixes(config: Config): BlockPrefixes {
  return { ipv4: config.grants.ipv4Prefix, ipv6: config.grants.ipv6Prefix };
}

export function policySettings(config: Config): PolicySettings {
  return {
    mode: config.enforcement.mode,
    requiredFrom: config.enforcement.requiredFrom,
    exemptUsers: new Set(config.enforcement.exemptUsers),
    protocols: new Set(config.enforcement.protocols),
    trusted: new RangeList(config.networks.trusted),
    untrusted: new RangeList(config.networks.untrusted),
    webmail: new RangeList(config.networks.webmail),
    prefixes: blockPrefixes(config),
  };
}

/** What the refused mail program sees for this protocol. */
export function refusalMessage(config: Config, protocol: string): string {
  return config.dovecot.messages[protocol.toLowerCase()] ?? config.dovecot.message;
}
