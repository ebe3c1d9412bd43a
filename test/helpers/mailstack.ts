// A private, real Dovecot (IMAP + POP3) and Postfix (SMTP submission with SASL through that Dovecot) on loopback,
// for end-to-end tests. Everything lives in a fresh temp dir; ports are free ones picked at start, so several
// stacks can run side by side in parallel test processes. Runs as root (Dovecot and Postfix need it).
//
// Layout of a stack's dir (mode 0755 so the servers' unprivileged processes can reach it):
//   dovecot.conf, passwd, dovecot.log, run/ (base_dir), state/
//   conf/main.cf, conf/master.cf, conf/vmailbox   Postfix config dir (listed in the default main.cf while running)
//   queue/ (queue_directory; Dovecot's SASL socket is queue/private/auth), data/ (data_directory), maillog
//   mail/USER/{cur,new,tmp}                        Maildir shared by Dovecot (mail_location) and Postfix (virtual)
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { freePort as freePortOn } from '../../bench/proc.js';
import { forEachOrphan, markOwned, stopAtExit } from './owned-dirs.js';
import { policyAttributes } from '../../cli/setup.js';

export interface MailStackOptions {
  /** Dovecot auth_policy_server_url, e.g. "http://127.0.0.1:8470/". Omitted: no auth policy at all. */
  policyUrl?: string;
  /** auth_policy_server_api_header, e.g. "X-API-Key: secret". */
  policyApiHeader?: string;
  /**
   * 'default' (the default): Dovecot's own attribute set and phase defaults.
   * 'recommended': the attribute line `mfagate setup dovecot` prints, with check_before_auth=no, check_after_auth=yes,
   * report_after_auth=yes, reject_on_fail=yes.
   */
  policyAttributes?: 'default' | 'recommended';
  /** auth_policy_server_timeout_msecs; omitted = Dovecot's default (2000). */
  policyTimeoutMs?: number;
  /** Value for Postfix check_policy_service, e.g. "unix:/abs/path.sock" or "inet:127.0.0.1:12345". Omitted = none. */
  postfixPolicy?: string;
  /** login -> plain password, written to Dovecot's passwd-file passdb. Each login also gets LOGIN@mail.test in Postfix. */
  users: Record<string, string>;
  /** Extra lines appended to dovecot.conf (later settings win). */
  dovecotExtra?: string;
  /**
   * Files for a conf.d/ directory, laid out as Debian's Dovecot does it: the site's passwd-file passdb moves to
   * conf.d/10-auth.conf and `!include conf.d/*.conf` takes its place, so a file named 05-... comes before the
   * site's passdb and 95-... after it (the names `mfagate setup dovecot` prints).
   */
  dovecotConfD?: Record<string, string>;
  /** Extra main.cf settings for Postfix ("name = value" lines; applied with postconf -e after the base config). */
  postfixExtra?: string;
  /** Milliseconds to wait for each server to come up. Default 20000. */
  startTimeoutMs?: number;
}

export interface MailStack {
  /** The domain Postfix delivers to users' Maildirs: "mail.test" (send to alice@mail.test). */
  domain: string;
  /** Where the servers listen (clients may connect from any other 127.x.y.z). */
  host: string;
  imapPort: number;
  pop3Port: number;
  smtpPort: number;
  dir: string;
  /** Stops both servers (even if one fails to stop), waits for their masters to exit, removes the dir. Idempotent. */
  stop(): Promise<void>;
  dovecotLog(): string;
  postfixLog(): string;
  /** The user's Maildir root (has cur/, new/, tmp/ once something was delivered or the user logged in). */
  maildir(user: string): string;
  /** Full texts of the messages in the user's Maildir: new/ then cur/, each sorted by file name (delivery time). */
  messages(user: string): string[];
  /** Polls (50 ms) until one of the user's messages satisfies `predicate`; returns its text. Throws with the log tails on timeout (default 15 s). */
  waitForMessage(user: string, predicate?: (text: string) => boolean, timeoutMs?: number): Promise<string>;
}

export const MAIL_DOMAIN = 'mail.test';
const HOST = '127.0.0.1';
const DIR_PREFIX = 'mfagate-mailstack-';
/** The attribute line `mfagate setup dovecot` prints (without app passcodes). */
const RECOMMENDED_ATTRIBUTES = policyAttributes(false);
const KEEP = process.env.MAILSTACK_KEEP === '1';

// ---------------------------------------------------------------------------------------------------------------
// Small process helpers

interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Environment without MAIL_CONFIG so postconf/postfix default to the system config unless told otherwise. */
function cleanEnv(): NodeJS.ProcessEnv {
  const env = { ...process.env };
  delete env.MAIL_CONFIG;
  const extra = ['/usr/sbin', '/sbin', '/usr/bin', '/bin'];
  env.PATH = [env.PATH ?? '', ...extra].filter(Boolean).join(':');
  return env;
}

/**
 * Runs a command to completion. With `outFile`, its stdout+stderr go to that file instead of pipes (for commands
 * that leave a daemon behind, which would otherwise hold our pipes open); the file's text is returned as stderr.
 */
function run(cmd: string, args: string[], timeoutMs = 30_000, outFile?: string): Promise<RunResult> {
  if (outFile) {
    const fd = fs.openSync(outFile, 'w');
    return new Promise((resolve) => {
      const done = (code: number | null, extra = '') => {
        clearTimeout(timer);
        fs.closeSync(fd);
        resolve({ code, stdout: '', stderr: readText(outFile) + extra });
      };
      const child = spawn(cmd, args, { env: cleanEnv(), stdio: ['ignore', fd, fd] });
      const timer = setTimeout(() => {
        child.kill('SIGKILL');
      }, timeoutMs);
      child.once('error', (err) => done(null, String(err)));
      child.once('exit', (code, signal) => done(code, signal ? `\n[mailstack: ${cmd} killed by ${signal}]` : ''));
    });
  }
  return new Promise((resolve) => {
    let stdout = '';
    let stderr = '';
    let child: ChildProcess;
    try {
      child = spawn(cmd, args, { env: cleanEnv(), stdio: ['ignore', 'pipe', 'pipe'] });
    } catch (err) {
      resolve({ code: null, stdout, stderr: String(err) });
      return;
    }
    const timer = setTimeout(() => {
      stderr += `\n[mailstack: ${cmd} timed out after ${timeoutMs} ms, killed]`;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.stdout?.on('data', (b: Buffer) => (stdout += b.toString()));
    child.stderr?.on('data', (b: Buffer) => (stderr += b.toString()));
    child.once('error', (err) => {
      clearTimeout(timer);
      resolve({ code: null, stdout, stderr: stderr + String(err) });
    });
    // 'exit', not 'close': a daemon the command started (dovecot, postfix master) may inherit and keep the pipes.
    child.once('exit', (code) => {
      clearTimeout(timer);
      const finish = () => {
        child.stdout?.destroy();
        child.stderr?.destroy();
        resolve({ code, stdout, stderr });
      };
      if (child.stdout?.closed !== false && child.stderr?.closed !== false) finish();
      else {
        const grace = setTimeout(finish, 300);
        child.once('close', () => {
          clearTimeout(grace);
          finish();
        });
      }
    });
  });
}

async function runOk(cmd: string, args: string[], what: string, logs: () => string = () => ''): Promise<string> {
  const r = await run(cmd, args);
  if (r.code !== 0) {
    throw new Error(`mailstack: ${what} failed (exit ${r.code}): ${cmd} ${args.join(' ')}\n${r.stdout}${r.stderr}${logs()}`);
  }
  return r.stdout;
}

const SEARCH_PATH = ['/usr/sbin', '/sbin', '/usr/bin', '/bin', '/usr/local/sbin', '/usr/local/bin'];

function findBinary(name: string): string | undefined {
  const dirs = [...(process.env.PATH ?? '').split(':').filter(Boolean), ...SEARCH_PATH];
  for (const d of dirs) {
    const p = path.join(d, name);
    try {
      fs.accessSync(p, fs.constants.X_OK);
      return p;
    } catch {
      // next
    }
  }
  return undefined;
}

interface Binaries {
  dovecot: string;
  postfix: string;
  postconf: string;
  flock: string;
}

function binaries(): Binaries {
  const need = { dovecot: 'dovecot-imapd dovecot-pop3d', postfix: 'postfix', postconf: 'postfix', flock: 'util-linux' } as const;
  const found: Partial<Binaries> = {};
  const missing: string[] = [];
  for (const [name, pkg] of Object.entries(need) as [keyof Binaries, string][]) {
    const p = findBinary(name);
    if (p) found[name] = p;
    else missing.push(`${name} (apt package ${pkg})`);
  }
  if (missing.length > 0) {
    throw new Error(
      `mailstack: required server binaries not found: ${missing.join(', ')}. ` +
        'The end-to-end tests need a real Dovecot and Postfix: apt-get install -y dovecot-imapd dovecot-pop3d postfix',
    );
  }
  if (process.getuid?.() !== 0) {
    throw new Error('mailstack: must run as root to start private Dovecot and Postfix instances');
  }
  return found as Binaries;
}

function idOf(flag: '-u' | '-g', user: string): number {
  const r = spawnSync('id', [flag, user], { encoding: 'utf8' });
  const n = Number.parseInt(r.stdout.trim(), 10);
  if (r.status !== 0 || !Number.isInteger(n)) throw new Error(`mailstack: cannot resolve ${flag} of user ${user}: ${r.stderr}`);
  return n;
}

/** A free port on the stacks' loopback address (see bench/proc.ts). */
export const freePort = (host = HOST): Promise<number> => freePortOn(host);

async function freePorts(n: number): Promise<number[]> {
  const ports = new Set<number>();
  while (ports.size < n) ports.add(await freePort());
  return [...ports];
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Connects until the server sends its first line (greeting) matching `greeting`; then closes. */
async function waitForGreeting(port: number, greeting: RegExp, deadline: number, isDead: () => string | undefined): Promise<void> {
  let last = '';
  while (Date.now() < deadline) {
    const dead = isDead();
    if (dead) throw new Error(dead);
    const line = await new Promise<string | Error>((resolve) => {
      const sock = net.connect({ host: HOST, port });
      let buf = '';
      const done = (v: string | Error) => {
        sock.destroy();
        resolve(v);
      };
      sock.setTimeout(2000, () => done(new Error('no greeting within 2 s')));
      sock.once('error', (e) => done(e));
      sock.on('data', (b: Buffer) => {
        buf += b.toString('latin1');
        const i = buf.indexOf('\n');
        if (i >= 0) done(buf.slice(0, i).replace(/\r$/, ''));
      });
      sock.once('end', () => done(new Error(`closed before greeting (got ${JSON.stringify(buf)})`)));
    });
    if (typeof line === 'string' && greeting.test(line)) return;
    last = typeof line === 'string' ? `unexpected greeting ${JSON.stringify(line)}` : line.message;
    await sleep(50);
  }
  throw new Error(`port ${port} not ready: ${last}`);
}

function readText(file: string): string {
  try {
    return fs.readFileSync(file, 'utf8');
  } catch {
    return '';
  }
}

function tail(text: string, lines = 40): string {
  const all = text.split('\n');
  return all.slice(Math.max(0, all.length - lines - 1)).join('\n');
}

function readPid(file: string): number | undefined {
  const n = Number.parseInt(readText(file).trim(), 10);
  return Number.isInteger(n) && n > 1 ? n : undefined;
}

/** Signals a daemon master we started: its whole process group when it leads one (its children), else itself. */
function signalDaemon(pid: number, signal: NodeJS.Signals): void {
  const stat = readText(`/proc/${pid}/stat`);
  const pgrp = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[2]);
  try {
    process.kill(pgrp === pid ? -pid : pid, signal);
  } catch {
    // already gone
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
  // A daemonized master that exited stays a zombie until init reaps it, which some inits do only now and then.
  const stat = readText(`/proc/${pid}/stat`);
  return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
}

async function waitGone(pid: number, ms: number): Promise<boolean> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (!alive(pid)) return true;
    await sleep(25);
  }
  return !alive(pid);
}

// ---------------------------------------------------------------------------------------------------------------
// The default main.cf: a private config dir must be listed in alternate_config_directories there. Several test
// processes edit it at once, so every read-modify-write happens under an flock on a lock file next to the temp
// dirs. Stale entries of earlier stacks (their dir is gone) are pruned on every edit, so the list stays short.

const LOCK_FILE = path.join(os.tmpdir(), `${DIR_PREFIX}main-cf.lock`);
const OUR_ENTRY = new RegExp(`/${DIR_PREFIX}[^/]+/conf$`);

async function withMainCfLock<T>(bin: Binaries, fn: () => Promise<T>): Promise<T> {
  // flock holds the lock for as long as `cat` runs; `cat` ends when we close its stdin (or when we die).
  const holder = spawn(bin.flock, ['-w', '60', LOCK_FILE, 'sh', '-c', 'echo locked; exec cat >/dev/null'], {
    env: cleanEnv(),
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let err = '';
  holder.stderr?.on('data', (b: Buffer) => (err += b.toString()));
  const exited = new Promise<number | null>((resolve) => holder.once('close', (code) => resolve(code)));
  await new Promise<void>((resolve, reject) => {
    holder.stdout?.once('data', () => resolve());
    holder.once('error', reject);
    void exited.then((code) => reject(new Error(`mailstack: could not lock ${LOCK_FILE} (flock exit ${code}): ${err}`)));
  });
  try {
    return await fn();
  } finally {
    holder.stdin?.end();
    await exited;
  }
}

function splitList(value: string): string[] {
  return value
    .split(/[\s,]+/)
    .map((s) => s.trim())
    .filter(Boolean);
}

/** The compiled-in defaults (postconf -d never reads main.cf, so it never waits; see coolDown). */
let systemDefaults: Promise<{ configDir: string; maillogPrefixes: string }> | undefined;
function defaults(bin: Binaries) {
  systemDefaults ??= runOk(bin.postconf, ['-d', '-h', 'config_directory', 'maillog_file_prefixes'], 'postconf -d').then((out) => {
    const [configDir, maillogPrefixes] = out.split('\n');
    return { configDir: configDir?.trim() || '/etc/postfix', maillogPrefixes: maillogPrefixes?.trim() ?? '' };
  });
  return systemDefaults;
}

/**
 * A parameter's raw value in a main.cf (last definition wins; indented lines continue the previous one), without
 * running postconf: every Postfix program that reads a main.cf changed less than a second ago pauses until it is
 * older ("pausing to let main.cf cool down", up to ~2 s), so we read the file ourselves.
 */
function mainCfParam(file: string, name: string): string | undefined {
  const logical: string[] = [];
  for (const line of readText(file).split('\n')) {
    if (/^\s*(#|$)/.test(line)) continue;
    if (/^\s/.test(line) && logical.length > 0) logical[logical.length - 1] += ` ${line.trim()}`;
    else logical.push(line);
  }
  let value: string | undefined;
  for (const l of logical) {
    const m = /^([A-Za-z0-9_]+)\s*=(.*)$/s.exec(l);
    if (m?.[1] === name) value = (m[2] ?? '').trim();
  }
  return value;
}

/** Backdates a file we wrote so Postfix does not pause to let it cool down (see mainCfParam). */
function coolDown(file: string): void {
  const past = new Date(Date.now() - 5000);
  fs.utimesSync(file, past, past);
}

async function editDefaultMainCf(bin: Binaries, confDir: string, op: 'add' | 'remove'): Promise<void> {
  const { configDir, maillogPrefixes } = await defaults(bin);
  const mainCf = path.join(configDir, 'main.cf');
  await withMainCfLock(bin, async () => {
    const edits: string[] = [];
    const cur = mainCfParam(mainCf, 'alternate_config_directories') ?? '';
    const keep = splitList(cur).filter((d) => d !== confDir && !(OUR_ENTRY.test(d) && !fs.existsSync(d)));
    if (op === 'add') keep.push(confDir);
    const next = keep.join(', ');
    if (next !== cur) edits.push(`alternate_config_directories = ${next}`);
    if (op === 'add') {
      // maillog_file must be under one of these prefixes (set in the default main.cf as well as the private one).
      const list = splitList(mainCfParam(mainCf, 'maillog_file_prefixes') ?? maillogPrefixes);
      if (!list.some((p) => confDir.startsWith(p.endsWith('/') ? p : `${p}/`))) {
        edits.push(`maillog_file_prefixes = ${[...list, path.dirname(path.dirname(confDir))].join(', ')}`);
      }
    }
    if (edits.length === 0) return;
    if (op === 'remove' && next === '' && edits.length === 1) {
      await runOk(bin.postconf, ['-X', 'alternate_config_directories'], 'editing the default main.cf');
    } else {
      await runOk(bin.postconf, ['-e', ...edits], 'editing the default main.cf');
    }
    // Postfix programs read the default main.cf too (postfix set-permissions, start): without this each would
    // pause ~2 s for the file we just edited to cool down. Only the mtime moves; the content is postconf's.
    coolDown(mainCf);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Config files

/** The site's own passdb (a passwd-file with the test users). */
function sitePassdb(dir: string): string[] {
  return [`passdb {`, `  driver = passwd-file`, `  args = ${dir}/passwd`, `}`];
}

/** conf.d/ for `dovecotConfD`: the given files and 10-auth.conf with the site's passdb. */
function writeConfD(dir: string, files: Record<string, string>): void {
  const confD = path.join(dir, 'conf.d');
  fs.mkdirSync(confD, { mode: 0o755 });
  fs.writeFileSync(path.join(confD, '10-auth.conf'), sitePassdb(dir).join('\n') + '\n');
  for (const [name, text] of Object.entries(files)) {
    if (!/^[\w.-]+\.conf$/.test(name) || name === '10-auth.conf') throw new Error(`mailstack: not a conf.d file name of a test: ${name}`);
    fs.writeFileSync(path.join(confD, name), text, { mode: 0o640 });
  }
}

function dovecotConf(dir: string, ports: { imap: number; pop3: number }, opts: MailStackOptions, uid: number, gid: number): string {
  const lines = [
    `# private test instance (mailstack)`,
    `base_dir = ${dir}/run`,
    `state_dir = ${dir}/state`,
    `log_path = ${dir}/dovecot.log`,
    `protocols = imap pop3`,
    `listen = ${HOST}`,
    `ssl = no`,
    `disable_plaintext_auth = no`,
    `auth_mechanisms = plain login`,
    // Failed logins are answered at once (default 2 s) so negative tests stay fast.
    `auth_failure_delay = 0`,
    `auth_verbose = yes`,
    `auth_debug = yes`,
    `mail_location = maildir:${dir}/mail/%u`,
    `default_internal_user = dovenull`,
    `default_login_user = dovenull`,
    `default_internal_group = dovenull`,
    ...(opts.dovecotConfD ? [`!include conf.d/*.conf`] : sitePassdb(dir)),
    `userdb {`,
    `  driver = static`,
    `  args = uid=${uid} gid=${gid} home=${dir}/mail/%u`,
    `}`,
    `service imap-login {`,
    `  inet_listener imap {`,
    `    address = ${HOST}`,
    `    port = ${ports.imap}`,
    `  }`,
    `  inet_listener imaps {`,
    `    port = 0`,
    `  }`,
    `}`,
    `service pop3-login {`,
    `  inet_listener pop3 {`,
    `    address = ${HOST}`,
    `    port = ${ports.pop3}`,
    `  }`,
    `  inet_listener pop3s {`,
    `    port = 0`,
    `  }`,
    `}`,
    // Dovecot's auth penalty delays logins from an IP after failures (2, 4, 8... s, shared by IMAP, POP3 and SASL):
    // a test making several failed logins from 127.0.0.9 would crawl. This is the documented way to turn it off.
    `service anvil {`,
    `  unix_listener anvil-auth-penalty {`,
    `    mode = 0`,
    `  }`,
    `}`,
    `service auth {`,
    `  unix_listener ${dir}/queue/private/auth {`,
    `    mode = 0660`,
    `    user = postfix`,
    `    group = postfix`,
    `  }`,
    `}`,
  ];
  if (opts.policyUrl) {
    lines.push(`auth_policy_server_url = ${opts.policyUrl}`, `auth_policy_hash_nonce = mailstack-test-nonce`);
    if (opts.policyApiHeader) lines.push(`auth_policy_server_api_header = ${opts.policyApiHeader}`);
    if (opts.policyTimeoutMs !== undefined) lines.push(`auth_policy_server_timeout_msecs = ${opts.policyTimeoutMs}`);
    if (opts.policyAttributes === 'recommended') {
      lines.push(
        `auth_policy_request_attributes = ${RECOMMENDED_ATTRIBUTES}`,
        `auth_policy_check_before_auth = no`,
        `auth_policy_check_after_auth = yes`,
        `auth_policy_report_after_auth = yes`,
        `auth_policy_reject_on_fail = yes`,
      );
    }
  }
  if (opts.dovecotExtra) lines.push(opts.dovecotExtra);
  return lines.join('\n') + '\n';
}

function postfixMainCf(dir: string, opts: MailStackOptions): string {
  const restrictions = [
    ...(opts.postfixPolicy ? [`check_policy_service ${opts.postfixPolicy}`] : []),
    'permit_sasl_authenticated',
    'reject',
  ];
  return [
    `# private test instance (mailstack)`,
    `compatibility_level = 3.6`,
    `queue_directory = ${dir}/queue`,
    `data_directory = ${dir}/data`,
    `myhostname = ${MAIL_DOMAIN}`,
    `mydomain = ${MAIL_DOMAIN}`,
    `myorigin = ${MAIL_DOMAIN}`,
    // Users' mail goes to Maildirs through virtual(8): no system accounts needed. Postfix forbids a domain in
    // both mydestination and virtual_mailbox_domains, so mail.test is a virtual mailbox domain.
    `mydestination = localhost`,
    `virtual_mailbox_domains = ${MAIL_DOMAIN}`,
    `virtual_mailbox_base = ${dir}/mail`,
    `virtual_mailbox_maps = texthash:${dir}/conf/vmailbox`,
    `virtual_uid_maps = static:${idOf('-u', 'nobody')}`,
    `virtual_gid_maps = static:${idOf('-g', 'nobody')}`,
    `inet_interfaces = ${HOST}`,
    `inet_protocols = ipv4`,
    `mynetworks = ${HOST}/32`,
    `relayhost =`,
    `default_transport = error:outbound mail disabled in tests`,
    `relay_transport = error:outbound mail disabled in tests`,
    `maillog_file = ${dir}/maillog`,
    `maillog_file_prefixes = /var, /dev/stdout, /tmp, ${path.dirname(dir)}`,
    `smtpd_peername_lookup = no`,
    `disable_dns_lookups = yes`,
    `smtp_dns_support_level = disabled`,
    `biff = no`,
    `smtpd_banner = $myhostname ESMTP mailstack`,
    `smtpd_sasl_type = dovecot`,
    `smtpd_sasl_path = private/auth`,
    `smtpd_sasl_auth_enable = yes`,
    `smtpd_tls_security_level = none`,
    `smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination`,
    `smtpd_recipient_restrictions = ${restrictions.join(', ')}`,
    `alias_maps =`,
    `alias_database =`,
    `home_mailbox = Maildir/`,
    `smtpd_error_sleep_time = 0`,
    `smtpd_policy_service_timeout = 10s`,
    '',
  ].join('\n');
}

/** The system master.cf with every chroot turned off and smtpd on a private loopback port. postlog stays. */
function postfixMasterCf(systemMasterCf: string, smtpPort: number): string {
  const out: string[] = [];
  let skippingSmtpdArgs = false;
  for (const line of systemMasterCf.split('\n')) {
    if (/^\s+\S/.test(line)) {
      if (!skippingSmtpdArgs) out.push(line);
      continue;
    }
    skippingSmtpdArgs = false;
    if (line.startsWith('#') || line.trim() === '') {
      out.push(line);
      continue;
    }
    const f = line.trim().split(/\s+/);
    if (f[1] === 'inet') {
      // Any system inet service (smtp on 25, submission...) is dropped; ours is added below.
      skippingSmtpdArgs = true;
      continue;
    }
    if (f.length >= 8) f[4] = 'n';
    out.push(f.join('\t'));
  }
  if (!out.some((l) => /^postlog\s/.test(l))) out.push('postlog\tunix-dgram\tn\t-\tn\t-\t1\tpostlogd');
  out.push(`${HOST}:${smtpPort}\tinet\tn\t-\tn\t-\t-\tsmtpd`);
  return out.join('\n') + '\n';
}

function checkCredential(kind: string, value: string): void {
  if (!value || /[:\r\n\0]/.test(value)) throw new Error(`mailstack: ${kind} ${JSON.stringify(value)} cannot go into a passwd-file`);
}

/**
 * Postfix commands print their fatal errors only to a terminal or to syslog (maillog_file needs postlogd, which a
 * failed start never ran), so a config error makes "postfix start" exit 1 silently. Re-run "postfix check" on a
 * pseudo-terminal (script(1)) to get the message.
 */
async function postfixDiagnosis(bin: Binaries, confDir: string): Promise<string> {
  const script = findBinary('script');
  if (!script) return '';
  const r = await run(script, ['-qec', `'${bin.postfix}' -c '${confDir}' check`, '/dev/null'], 15_000);
  const text = `${r.stdout}${r.stderr}`.replace(/\r/g, '').trim();
  return text ? `\n--- postfix check ---\n${text}\n` : '';
}

// ---------------------------------------------------------------------------------------------------------------
// Clean-up of stacks a test forgot to stop (or when the test process dies on an uncaught error).

/**
 * Stops the servers of stacks whose test process died without stopping them and removes their dirs (unless kept
 * with MAILSTACK_KEEP=1). Only masters whose working directory is inside such a dir are signalled: those are
 * processes this harness started.
 */
function reapOrphans(): void {
  forEachOrphan(DIR_PREFIX, (dir) => {
    for (const f of ['run/master.pid', 'queue/pid/master.pid']) {
      const mpid = readPid(path.join(dir, f));
      if (!mpid || !alive(mpid)) continue;
      let cwd = '';
      try {
        cwd = fs.readlinkSync(`/proc/${mpid}/cwd`);
      } catch {
        continue;
      }
      if (cwd.startsWith(`${dir}/`)) signalDaemon(mpid, 'SIGKILL');
    }
    if (!fs.existsSync(path.join(dir, 'keep'))) fs.rmSync(dir, { recursive: true, force: true });
  });
}

// ---------------------------------------------------------------------------------------------------------------

/**
 * A stack wired to an mfagate that is about to start: Dovecot asks its policy endpoint on a free loopback port
 * (the recommended attributes, with `apiKey` as X-API-Key), and Postfix accepts mail from 127.0.0.1 without
 * AUTH, as a site's MTA takes the daemon's mail. The port is for `[dovecot] listen`.
 */
export async function startStackForMfagate(users: Record<string, string>, apiKey: string): Promise<{ stack: MailStack; policyPort: number }> {
  const policyPort = await freePort();
  const stack = await startMailStack({
    users,
    policyUrl: `http://127.0.0.1:${policyPort}/`,
    policyApiHeader: `X-API-Key: ${apiKey}`,
    policyAttributes: 'recommended',
    postfixExtra: 'smtpd_recipient_restrictions = permit_mynetworks, permit_sasl_authenticated, reject',
  });
  return { stack, policyPort };
}

export async function startMailStack(opts: MailStackOptions): Promise<MailStack> {
  const bin = binaries();
  for (const [user, pw] of Object.entries(opts.users)) {
    checkCredential('login', user);
    checkCredential('password', pw);
    if (/[\s@/]/.test(user)) throw new Error(`mailstack: login ${JSON.stringify(user)} must be a plain local part`);
  }
  // A port picked free can be taken by a parallel test before the server binds it: retry on that only.
  for (let attempt = 1; ; attempt++) {
    try {
      return await startOnce(bin, opts);
    } catch (err) {
      const msg = (err as Error).message;
      if (attempt < 3 && /Address already in use|address already in use|EADDRINUSE/.test(msg)) continue;
      throw err;
    }
  }
}

async function startOnce(bin: Binaries, opts: MailStackOptions): Promise<MailStack> {
  reapOrphans();
  const dir = fs.realpathSync(fs.mkdtempSync(path.join(os.tmpdir(), DIR_PREFIX)));
  markOwned(dir);
  if (KEEP) fs.writeFileSync(path.join(dir, 'keep'), '');
  fs.chmodSync(dir, 0o755);
  const confDir = path.join(dir, 'conf');
  for (const d of ['run', 'state', 'conf', 'queue', 'data']) fs.mkdirSync(path.join(dir, d), { mode: 0o755 });
  fs.mkdirSync(path.join(dir, 'mail'));
  fs.chmodSync(path.join(dir, 'mail'), 0o777);
  const [imapPort, pop3Port, smtpPort] = (await freePorts(3)) as [number, number, number];
  const uid = idOf('-u', 'nobody');
  const gid = idOf('-g', 'nobody');

  const dovecotConfFile = path.join(dir, 'dovecot.conf');
  const dovecotLogFile = path.join(dir, 'dovecot.log');
  const maillog = path.join(dir, 'maillog');
  fs.writeFileSync(dovecotConfFile, dovecotConf(dir, { imap: imapPort, pop3: pop3Port }, opts, uid, gid));
  if (opts.dovecotConfD) writeConfD(dir, opts.dovecotConfD);
  fs.writeFileSync(
    path.join(dir, 'passwd'),
    Object.entries(opts.users)
      .map(([u, p]) => `${u}:{PLAIN}${p}\n`)
      .join(''),
    { mode: 0o644 },
  );
  fs.writeFileSync(path.join(confDir, 'main.cf'), postfixMainCf(dir, opts));
  const systemConfDir = (await defaults(bin)).configDir;
  fs.writeFileSync(path.join(confDir, 'master.cf'), postfixMasterCf(readText(path.join(systemConfDir, 'master.cf')), smtpPort));
  fs.writeFileSync(
    path.join(confDir, 'vmailbox'),
    Object.keys(opts.users)
      .map((u) => `${u}@${MAIL_DOMAIN} ${u}/\n`)
      .join(''),
  );
  fs.writeFileSync(maillog, '');
  const extra = (opts.postfixExtra ?? '')
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l && !l.startsWith('#'));
  coolDown(path.join(confDir, 'main.cf'));
  if (extra.length > 0) await runOk(bin.postconf, ['-c', confDir, '-e', ...extra], 'postfixExtra');
  for (const f of ['main.cf', 'master.cf', 'vmailbox']) coolDown(path.join(confDir, f));

  const dovecotLog = () => readText(dovecotLogFile);
  const postfixLog = () => readText(maillog);
  const logTails = () => {
    const d = dovecotLog().trim();
    const p = postfixLog().trim();
    return `${d ? `\n--- dovecot.log (tail) ---\n${tail(d)}` : ''}${p ? `\n--- postfix maillog (tail) ---\n${tail(p)}` : ''}\n`;
  };

  let dovecotStarted = false;
  let postfixStarted = false;
  let listed = false;
  let stopped: Promise<void> | undefined;
  const dovecotPidFile = path.join(dir, 'run', 'master.pid');
  const postfixPidFile = path.join(dir, 'queue', 'pid', 'master.pid');

  const stopDovecot = async (): Promise<string | undefined> => {
    if (!dovecotStarted) return undefined;
    const pid = readPid(dovecotPidFile);
    if (!pid || !alive(pid)) return undefined;
    // "dovecot stop" took ~3 s here: it signals only the master and polls until the pid is gone, and an exited
    // daemon stays a zombie until init reaps it. The master leads its own process group (setsid), so we signal
    // the group and count a zombie as gone (see alive): ~30 ms.
    signalDaemon(pid, 'SIGTERM');
    if (await waitGone(pid, 10_000)) return undefined;
    signalDaemon(pid, 'SIGKILL');
    await waitGone(pid, 2000);
    return `dovecot master ${pid} ignored SIGTERM for 10 s; killed`;
  };
  const stopPostfix = async (): Promise<string | undefined> => {
    if (!postfixStarted) return undefined;
    const pid = readPid(postfixPidFile);
    const r = await run(bin.postfix, ['-c', confDir, 'stop'], 15_000);
    if (pid && !(await waitGone(pid, 10_000))) {
      signalDaemon(pid, 'SIGKILL');
      await waitGone(pid, 2000);
      return `postfix master ${pid} ignored "postfix stop" (${r.stderr.trim()}); killed`;
    }
    return undefined;
  };

  const entry = {
    emergencyStop() {
      // Synchronous: only for process exit. Kills both masters (their children follow) and removes the dir;
      // the default main.cf entry is pruned by the next stack's edit because the dir is gone.
      for (const f of [dovecotPidFile, postfixPidFile]) {
        const pid = readPid(f);
        if (pid && alive(pid)) signalDaemon(pid, 'SIGKILL');
      }
      if (!KEEP) fs.rmSync(dir, { recursive: true, force: true });
    },
  };

  const stop = (): Promise<void> => {
    stopped ??= (async () => {
      const problems: string[] = [];
      const results = await Promise.allSettled([stopDovecot(), stopPostfix()]);
      for (const r of results) {
        if (r.status === 'rejected') problems.push(String(r.reason));
        else if (r.value) problems.push(r.value);
      }
      if (listed) {
        try {
          await editDefaultMainCf(bin, confDir, 'remove');
        } catch (err) {
          problems.push(String(err));
        }
      }
      forget();
      if (!KEEP) fs.rmSync(dir, { recursive: true, force: true });
      if (problems.length > 0) throw new Error(`mailstack: stop had problems:\n${problems.join('\n')}`);
    })();
    return stopped;
  };

  const forget = stopAtExit(entry);
  const deadline = () => Date.now() + (opts.startTimeoutMs ?? 20_000);
  try {
    await editDefaultMainCf(bin, confDir, 'add');
    listed = true;

    // Postfix's queue tree first: Dovecot's SASL socket lives in queue/private.
    fs.mkdirSync(path.join(dir, 'queue', 'private'), { recursive: true });
    spawnSync('chown', ['-R', 'postfix:postfix', path.join(dir, 'data')]);
    const sp = await run(bin.postfix, ['-c', confDir, 'set-permissions']);
    if (sp.code !== 0) {
      throw new Error(`mailstack: postfix set-permissions failed (exit ${sp.code}):\n${sp.stdout}${sp.stderr}${await postfixDiagnosis(bin, confDir)}`);
    }

    const d = await run(bin.dovecot, ['-c', dovecotConfFile], 30_000, path.join(dir, 'dovecot.start.out'));
    dovecotStarted = true;
    if (d.code !== 0) throw new Error(`mailstack: dovecot failed to start (exit ${d.code}):\n${d.stderr}`);
    const dovecotDead = () => {
      const pid = readPid(dovecotPidFile);
      return pid && !alive(pid) ? 'dovecot master exited during startup' : undefined;
    };
    const dl = deadline();
    await Promise.all([
      waitForGreeting(imapPort, /^\* OK/, dl, dovecotDead),
      waitForGreeting(pop3Port, /^\+OK/, dl, dovecotDead),
    ]);

    const p = await run(bin.postfix, ['-c', confDir, 'start'], 30_000, path.join(dir, 'postfix.start.out'));
    postfixStarted = true;
    if (p.code !== 0) {
      throw new Error(`mailstack: postfix failed to start (exit ${p.code}):\n${p.stderr}${await postfixDiagnosis(bin, confDir)}`);
    }
    const postfixDead = () => {
      const pid = readPid(postfixPidFile);
      return pid && !alive(pid) ? 'postfix master exited during startup' : undefined;
    };
    await waitForGreeting(smtpPort, /^220[ -]/, deadline(), postfixDead);
  } catch (err) {
    const message = `${(err as Error).message}${logTails()}`;
    await stop().catch(() => undefined);
    const where = KEEP ? `in ${dir}` : `(its dir was removed; MAILSTACK_KEEP=1 keeps it)`;
    throw new Error(`mailstack: startup failed ${where}: ${message}`);
  }

  const maildir = (user: string) => path.join(dir, 'mail', user);
  const messages = (user: string): string[] => {
    const out: string[] = [];
    for (const sub of ['new', 'cur']) {
      const d = path.join(maildir(user), sub);
      let names: string[] = [];
      try {
        names = fs.readdirSync(d);
      } catch {
        continue;
      }
      for (const n of names.sort()) out.push(readText(path.join(d, n)));
    }
    return out;
  };

  return {
    domain: MAIL_DOMAIN,
    host: HOST,
    imapPort,
    pop3Port,
    smtpPort,
    dir,
    stop,
    dovecotLog,
    postfixLog,
    maildir,
    messages,
    async waitForMessage(user, predicate = () => true, timeoutMs = 15_000) {
      const end = Date.now() + timeoutMs;
      for (;;) {
        const hit = messages(user).find(predicate);
        if (hit !== undefined) return hit;
        if (Date.now() > end) throw new Error(`mailstack: no matching message for ${user} within ${timeoutMs} ms${logTails()}`);
        await sleep(50);
      }
    },
  };
}
