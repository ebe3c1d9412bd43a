// A real Roundcube 1.6 (Debian 12's roundcube-core) for tests, served by PHP's built-in web server on a free
// loopback port. Nothing of the system's Roundcube site is used: Debian's code is linked into a tree of the
// test's own in a fresh temp dir, with its own config, SQLite database, logs and temp dir, so several instances
// can run side by side in parallel test processes and none touches /var/lib/roundcube or /var/log.
//
// Layout of a tree (INSTALL_PATH for Roundcube):
//   index.php, program/, SQL/            links into /usr/share/roundcube
//   skins/elastic                        link into /usr/share/roundcube/skins
//   plugins/jqueryui, plugins/filesystem_attachments
//                                        links into /usr/share/roundcube/plugins (Roundcube loads both itself,
//                                        as "required plugins", whatever the config says)
//   plugins/NAME                         a link to each `pluginDirs` entry (or to an installed plugin)
//   public_html/index.php                a copy of Debian's: it defines INSTALL_PATH as the folder above it
//                                        (realpath), which is why it cannot be a link
//   public_html/{plugins,skins}          links to ../plugins, ../skins (static files of skins and plugins)
//   public_html/program/{js,resources}   links to ../../program/{js,resources}
//   config/defaults.inc.php, config/mimetypes.php
//                                        links to Debian's (they live in /etc/roundcube)
//   config/config.inc.php                this test's config (see renderConfig)
//   logs/ (log_dir), temp/ (temp_dir), roundcube.db (schema created by Roundcube on first use)
//   php-server.log                       what `php -S` printed (one line per request, PHP errors)
//   owner, php.pid                       for reaping the server of a test process that died (see reapOrphans)
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { MAIL_DOMAIN, freePort } from './mailstack.js';
import { forEachOrphan, markOwned, stopAtExit } from './owned-dirs.js';

export interface RoundcubeOptions {
  /** Dovecot IMAP on 127.0.0.1. */
  imapPort: number;
  /** Postfix smtpd on 127.0.0.1 (plain SMTP, AUTH with the user's IMAP login and password). Omitted: no smtp_host. */
  smtpPort?: number;
  /** Roundcube plugin names to enable, e.g. ['mfagate']. */
  plugins?: string[];
  /**
   * Plugin name -> absolute path of a plugin folder (holding NAME.php) to link into the tree's plugins/.
   * A name in `plugins` without an entry here must be installed in /usr/share/roundcube/plugins.
   */
  pluginDirs?: Record<string, string>;
  /**
   * Extra $config keys, set after (over) the harness's own: a key given here replaces the harness's value as a
   * whole (no deep merge; `plugins` here replaces the list made from `plugins` above). Values are rendered as PHP
   * literals (see phpLiteral); a key whose value is `undefined` is left out, harness value included, so Roundcube's
   * default from defaults.inc.php applies.
   */
  config?: Record<string, unknown>;
  /** Roundcube's `language`; default 'en_US'. */
  language?: string;
  /** Milliseconds to wait for the login page. Default 30000. */
  startTimeoutMs?: number;
}

export interface Roundcube {
  /** e.g. http://127.0.0.1:PORT/ */
  url: string;
  port: number;
  /** The tree (INSTALL_PATH). Removed by stop() unless ROUNDCUBE_KEEP=1. */
  dir: string;
  /** Roundcube's own log files (errors.log, userlogins.log, ...) and the PHP server's output, for diagnostics. */
  logs(): string;
  /** Stops the PHP server and its workers, removes the tree. Idempotent. */
  stop(): Promise<void>;
}

/** Where Debian's roundcube-core puts Roundcube's code, its config files and the public_html entry point. */
const RC_SHARE = '/usr/share/roundcube';
const RC_ETC = '/etc/roundcube';
const RC_PUBLIC_INDEX = '/var/lib/roundcube/public_html/index.php';
const HOST = '127.0.0.1';
const DIR_PREFIX = 'mfagate-roundcube-';
const KEEP = process.env.ROUNDCUBE_KEEP === '1';
/**
 * php -S serves one request at a time unless PHP_CLI_SERVER_WORKERS forks workers (PHP >= 7.4, not on Windows):
 * a page's parallel requests for scripts, styles and AJAX calls would otherwise queue behind each other.
 */
const WORKERS = 4;
/** PHP extensions Roundcube (and a plugin talking HTTP) needs, with the Debian package that provides each. */
const EXTENSIONS: readonly (readonly [string, string])[] = [
  ['pdo', 'php-common'],
  ['pdo_sqlite', 'php-sqlite3'],
  ['curl', 'php-curl'],
  ['mbstring', 'php-mbstring'],
  ['intl', 'php-intl'],
  ['dom', 'php-xml'],
];

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));
/** Blocks the thread (for the exit hook, where nothing asynchronous runs any more). */
const sleepSync = (ms: number) => Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);

function readText(file: string): string {
  try {
    return fs.readFileSync(file, 'utf8');
  } catch {
    return '';
  }
}

// ---------------------------------------------------------------------------------------------------------------
// PHP literals for config.inc.php

/**
 * A JavaScript value as a PHP literal:
 *   string          single-quoted; only \ and ' are escaped (as \\ and \'), everything else is verbatim
 *   number          an integer as decimal digits (must be a safe integer, else give a bigint), any other finite
 *                   number as JavaScript prints it (0.5, -1.5, 1e-7: PHP float literals); NaN, Infinity refused
 *   bigint          decimal digits (within +-(2^63 - 1))
 *   boolean, null   true, false, null
 *   array           a PHP list [a, b]; holes and `undefined` elements are refused
 *   plain object    an associative array ['key' => value, ...] in the object's key order, keys as strings
 *                   (PHP itself turns a key like '7' into the integer 7; JavaScript lists such keys first);
 *                   properties whose value is `undefined` are left out
 * Anything else (undefined at the top, functions, symbols, Date, Map, class instances, cycles) throws: there is
 * no way to emit raw PHP (constants such as LOG_USER are written as their values).
 */
export function phpLiteral(value: unknown): string {
  return literal(value, 'value', new Set());
}

function literal(value: unknown, where: string, seen: Set<object>): string {
  if (value === null) return 'null';
  switch (typeof value) {
    case 'string':
      return `'${value.replace(/\\/g, '\\\\').replace(/'/g, "\\'")}'`;
    case 'boolean':
      return value ? 'true' : 'false';
    case 'number':
      if (!Number.isFinite(value)) throw new TypeError(`roundcube: ${where} is ${value}, which PHP config cannot hold`);
      if (Number.isInteger(value) && !Number.isSafeInteger(value)) {
        throw new TypeError(`roundcube: ${where} = ${value} is beyond 2^53; give it as a bigint`);
      }
      return Object.is(value, -0) ? '0' : String(value);
    case 'bigint':
      // PHP reads -9223372036854775808 as minus a float, so the range stops one short of PHP_INT_MIN.
      if (value > 9223372036854775807n || value < -9223372036854775807n) throw new TypeError(`roundcube: ${where} does not fit a PHP int literal`);
      return value.toString();
    case 'object':
      break;
    default:
      throw new TypeError(`roundcube: ${where} is a ${typeof value}, which has no PHP literal`);
  }
  if (seen.has(value)) throw new TypeError(`roundcube: ${where} refers to itself`);
  seen.add(value);
  try {
    if (Array.isArray(value)) {
      const items: string[] = [];
      for (let i = 0; i < value.length; i++) {
        if (!(i in value) || value[i] === undefined) throw new TypeError(`roundcube: ${where}[${i}] is undefined`);
        items.push(literal(value[i], `${where}[${i}]`, seen));
      }
      return `[${items.join(', ')}]`;
    }
    const proto = Object.getPrototypeOf(value) as unknown;
    if (proto !== Object.prototype && proto !== null) {
      throw new TypeError(`roundcube: ${where} is not a plain object (${Object.prototype.toString.call(value)})`);
    }
    const pairs = Object.entries(value as Record<string, unknown>)
      .filter(([, v]) => v !== undefined)
      .map(([k, v]) => `${phpLiteral(k)} => ${literal(v, `${where}.${k}`, seen)}`);
    return `[${pairs.join(', ')}]`;
  } finally {
    seen.delete(value);
  }
}

/** The harness's settings (see startRoundcube), `extra` set over them, as a config.inc.php. */
function renderConfig(settings: Record<string, unknown>, extra: Record<string, unknown>): string {
  const merged: Record<string, unknown> = { ...settings, ...extra };
  const lines = ['<?php', '// Written by the test harness for this instance only.', '$config = [];'];
  for (const [key, value] of Object.entries(merged)) {
    if (value === undefined) continue;
    lines.push(`$config[${phpLiteral(key)}] = ${literal(value, key, new Set())};`);
  }
  return lines.join('\n') + '\n';
}

// ---------------------------------------------------------------------------------------------------------------
// PHP itself

function findBinary(name: string): string | undefined {
  const dirs = [...(process.env.PATH ?? '').split(':').filter(Boolean), '/usr/bin', '/bin', '/usr/local/bin'];
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

/**
 * The environment for php. Roundcube 1.6 reads ROUNDCUBE_<KEY> variables as overrides of any config key,
 * ROUNDCUBE_CONFIG_DIR as its config folder and RCUBE_CONFIG_PATH as extra config folders: a developer's shell
 * must not change what a test runs, so all of those go.
 */
function phpEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!/^(ROUNDCUBE_|RCUBE_)/.test(k)) env[k] = v;
  env.PHP_CLI_SERVER_WORKERS = String(WORKERS);
  return env;
}

interface Php {
  bin: string;
  /** -d flags that load the extensions Debian's php-cli does not load by itself (normally none). */
  flags: string[];
}

let phpFound: Php | undefined;

/** php and the flags it needs; an Error that says which package to install when something is missing. */
function findPhp(): Php {
  if (phpFound) return phpFound;
  const bin = findBinary('php');
  if (!bin) throw new Error('roundcube: php not found. The webmail tests need it: apt-get install -y --no-install-recommends php-cli');
  const r = spawnSync(bin, ['-r', 'echo ini_get("extension_dir"), "\\n", implode(" ", get_loaded_extensions());'], {
    env: phpEnv(),
    encoding: 'utf8',
    timeout: 30_000,
  });
  if (r.status !== 0) throw new Error(`roundcube: ${bin} -r failed (exit ${r.status}): ${r.stdout}${r.stderr}`);
  const [extDir = '', list = ''] = r.stdout.split('\n');
  const loaded = new Set(list.toLowerCase().split(' '));
  const flags: string[] = [];
  const missing: string[] = [];
  for (const [ext, pkg] of EXTENSIONS) {
    if (loaded.has(ext)) continue;
    if (fs.existsSync(path.join(extDir, `${ext}.so`))) flags.push('-d', `extension=${ext}`);
    else missing.push(`${ext} (apt package ${pkg})`);
  }
  if (missing.length > 0) throw new Error(`roundcube: PHP extensions missing: ${missing.join(', ')}`);
  phpFound = { bin, flags };
  return phpFound;
}

function checkRoundcubeInstalled(): void {
  const need = [
    path.join(RC_SHARE, 'index.php'),
    path.join(RC_SHARE, 'program'),
    path.join(RC_SHARE, 'SQL', 'sqlite.initial.sql'),
    path.join(RC_SHARE, 'skins', 'elastic'),
    path.join(RC_SHARE, 'plugins', 'jqueryui'),
    path.join(RC_SHARE, 'plugins', 'filesystem_attachments'),
    path.join(RC_ETC, 'defaults.inc.php'),
    path.join(RC_ETC, 'mimetypes.php'),
    RC_PUBLIC_INDEX,
  ];
  const missing = need.filter((p) => !fs.existsSync(p));
  if (missing.length > 0) {
    throw new Error(
      `roundcube: Debian's Roundcube is not installed (missing ${missing.join(', ')}). The webmail tests need it: ` +
        'echo "roundcube-core roundcube/dbconfig-install boolean false" | debconf-set-selections; ' +
        'apt-get install -y --no-install-recommends roundcube-core roundcube-sqlite3 php-cli php-curl php-sqlite3',
    );
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Processes: php -S runs in a process group of its own (detached), because with PHP_CLI_SERVER_WORKERS its
// workers are children that outlive the master: a signal to the master alone (PHP 8.2) leaves them serving.

/** Live (not zombie) processes of a process group, from /proc. */
function groupMembers(pgid: number): number[] {
  const out: number[] = [];
  let names: string[] = [];
  try {
    names = fs.readdirSync('/proc');
  } catch {
    return out;
  }
  for (const n of names) {
    if (!/^\d+$/.test(n)) continue;
    const stat = readText(`/proc/${n}/stat`);
    if (!stat) continue;
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    if (fields[0] !== 'Z' && Number(fields[2]) === pgid) out.push(Number(n));
  }
  return out;
}

function signalGroup(pgid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(-pgid, signal);
  } catch {
    // already gone
  }
}

async function waitGroupGone(pgid: number, ms: number): Promise<boolean> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (groupMembers(pgid).length === 0) return true;
    await sleep(25);
  }
  return groupMembers(pgid).length === 0;
}

/**
 * Stops the PHP servers of trees whose test process died without stopping them, and removes those trees (not
 * one kept with "keep"). Only processes whose working directory is such a tree are killed: php -S is started
 * there, so those are servers this harness started.
 */
function reapOrphans(): void {
  forEachOrphan(DIR_PREFIX, (dir) => {
    if (fs.existsSync(path.join(dir, 'keep'))) return;
    const pgid = Number(readText(path.join(dir, 'php.pid')).trim());
    if (Number.isInteger(pgid) && pgid > 1) {
      const ours = groupMembers(pgid).filter((pid) => {
        try {
          return fs.readlinkSync(`/proc/${pid}/cwd`) === dir;
        } catch {
          return false;
        }
      });
      // As in stop(): SIGINT for a clean shutdown, SIGKILL for whatever still runs a second later.
      const signal = (sig: NodeJS.Signals) => {
        for (const pid of groupMembers(pgid).filter((p) => ours.includes(p))) {
          try {
            process.kill(pid, sig);
          } catch {
            // gone
          }
        }
      };
      signal('SIGINT');
      const end = Date.now() + 1000;
      while (Date.now() < end && groupMembers(pgid).some((pid) => ours.includes(pid))) sleepSync(20);
      signal('SIGKILL');
    }
    fs.rmSync(dir, { recursive: true, force: true });
  });
}

// ---------------------------------------------------------------------------------------------------------------
// The tree

function link(target: string, at: string): void {
  fs.mkdirSync(path.dirname(at), { recursive: true });
  fs.symlinkSync(target, at);
}

/** The plugins to link: Roundcube's two required ones, the test's folders, and installed plugins it names. */
function pluginLinks(o: RoundcubeOptions): Map<string, string> {
  const links = new Map<string, string>([
    ['jqueryui', path.join(RC_SHARE, 'plugins', 'jqueryui')],
    ['filesystem_attachments', path.join(RC_SHARE, 'plugins', 'filesystem_attachments')],
  ]);
  for (const [name, dir] of Object.entries(o.pluginDirs ?? {})) {
    // Roundcube accepts only such names (rcube_plugin_api::load_plugin) and loads plugins/NAME/NAME.php.
    if (!/^[a-z0-9_]+$/i.test(name)) throw new Error(`roundcube: plugin name ${JSON.stringify(name)} is not one Roundcube loads`);
    if (!path.isAbsolute(dir)) throw new Error(`roundcube: pluginDirs.${name} must be an absolute path, not ${JSON.stringify(dir)}`);
    const main = path.join(dir, `${name}.php`);
    if (!fs.existsSync(main)) throw new Error(`roundcube: plugin ${name}: ${main} does not exist`);
    links.set(name, dir);
  }
  for (const name of o.plugins ?? []) {
    if (links.has(name)) continue;
    const installed = path.join(RC_SHARE, 'plugins', name);
    if (!fs.existsSync(path.join(installed, `${name}.php`))) {
      throw new Error(`roundcube: plugin ${name} is neither in pluginDirs nor installed in ${path.dirname(installed)}`);
    }
    links.set(name, installed);
  }
  return links;
}

function buildTree(dir: string, o: RoundcubeOptions, configText: string): void {
  for (const name of ['index.php', 'program', 'SQL']) link(path.join(RC_SHARE, name), path.join(dir, name));
  link(path.join(RC_SHARE, 'skins', 'elastic'), path.join(dir, 'skins', 'elastic'));
  fs.mkdirSync(path.join(dir, 'plugins'));
  for (const [name, target] of pluginLinks(o)) link(target, path.join(dir, 'plugins', name));
  fs.mkdirSync(path.join(dir, 'public_html', 'program'), { recursive: true });
  fs.copyFileSync(RC_PUBLIC_INDEX, path.join(dir, 'public_html', 'index.php'));
  link('../plugins', path.join(dir, 'public_html', 'plugins'));
  link('../skins', path.join(dir, 'public_html', 'skins'));
  link('../../program/js', path.join(dir, 'public_html', 'program', 'js'));
  link('../../program/resources', path.join(dir, 'public_html', 'program', 'resources'));
  fs.mkdirSync(path.join(dir, 'config'));
  link(path.join(RC_ETC, 'defaults.inc.php'), path.join(dir, 'config', 'defaults.inc.php'));
  link(path.join(RC_ETC, 'mimetypes.php'), path.join(dir, 'config', 'mimetypes.php'));
  fs.writeFileSync(path.join(dir, 'config', 'config.inc.php'), configText, { mode: 0o600 });
  fs.mkdirSync(path.join(dir, 'logs'));
  fs.mkdirSync(path.join(dir, 'temp'));
}

/** The harness's own config keys; `o.config` goes over them. */
function baseSettings(dir: string, o: RoundcubeOptions): Record<string, unknown> {
  const settings: Record<string, unknown> = {
    // The schema is created on first use; the readiness check below is that first use (one request, so no
    // two workers race to create it).
    db_dsnw: `sqlite:///${path.join(dir, 'roundcube.db')}?mode=0600`,
    // 127.0.0.1, not localhost: localhost may resolve to ::1 first, where another server could listen.
    imap_host: `${HOST}:${o.imapPort}`,
    // New users' identities are USER@mail.test, the domain the mail stack delivers to (instead of USER@127.0.0.1).
    mail_domain: MAIL_DOMAIN,
    des_key: crypto.randomBytes(18).toString('base64'), // 24 characters
    plugins: [...(o.plugins ?? [])],
    enable_installer: false,
    log_driver: 'file',
    log_dir: `${path.join(dir, 'logs')}/`,
    temp_dir: `${path.join(dir, 'temp')}/`,
    // The test client is 127.0.0.1; a test gives the browser's address in X-Forwarded-For.
    proxy_whitelist: [HOST],
    skin: 'elastic',
    language: o.language ?? 'en_US',
    // Nothing leaves the machine: no spell checker service (it would post text to a remote server) and no support
    // link. Both are off in Roundcube 1.6's defaults already, but defaults.inc.php is a conffile an admin may edit.
    // Every host above is an IP address, so nothing needs DNS either.
    enable_spellcheck: false,
    support_url: '',
    // A server that stops answering fails a test in seconds, not at PHP's default_socket_timeout (60 s).
    imap_timeout: 10,
  };
  if (o.smtpPort !== undefined) {
    // Plain SMTP on loopback (no tls:// or ssl:// prefix); Roundcube authenticates with the user's IMAP login and
    // password (smtp_user '%u', smtp_pass '%p' are the defaults).
    settings.smtp_host = `${HOST}:${o.smtpPort}`;
    settings.smtp_timeout = 10;
  }
  return settings;
}

// ---------------------------------------------------------------------------------------------------------------

interface Page {
  status: number;
  body: string;
}

function get(url: string): Promise<Page> {
  return new Promise((resolve, reject) => {
    const req = http.get(url, { agent: false, timeout: 10_000 }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => (body += c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error('no answer within 10 s')));
    req.on('error', reject);
  });
}

/** The login page, as Roundcube's Elastic skin renders it for an anonymous visitor. */
const isLoginPage = (p: Page) => p.status === 200 && /name="_token"/.test(p.body) && /name="_user"/.test(p.body);

export async function startRoundcube(o: RoundcubeOptions): Promise<Roundcube> {
  checkRoundcubeInstalled();
  const php = findPhp();
  // A port picked free can be taken by a parallel test before php binds it: retry on that only.
  for (let attempt = 1; ; attempt++) {
    try {
      return await startOnce(php, o);
    } catch (err) {
      if (attempt < 3 && (err as Error & { portTaken?: boolean }).portTaken) continue;
      throw err;
    }
  }
}

async function startOnce(php: Php, o: RoundcubeOptions): Promise<Roundcube> {
  reapOrphans();
  const dir = fs.realpathSync(fs.mkdtempSync(path.join(os.tmpdir(), DIR_PREFIX)));
  markOwned(dir);
  if (KEEP) fs.writeFileSync(path.join(dir, 'keep'), '');
  const serverLog = path.join(dir, 'php-server.log');
  const logsDir = path.join(dir, 'logs');
  let lastLogs = '';
  const logs = (): string => {
    if (!fs.existsSync(dir)) return lastLogs;
    const parts: string[] = [];
    let names: string[] = [];
    try {
      names = fs.readdirSync(logsDir).sort();
    } catch {
      // not created yet
    }
    for (const n of names) parts.push(`--- logs/${n} ---\n${readText(path.join(logsDir, n))}`);
    if (fs.existsSync(serverLog)) parts.push(`--- php -S output ---\n${readText(serverLog)}`);
    lastLogs = parts.join('\n');
    return lastLogs;
  };

  let child: ChildProcess | undefined;
  let stopped: Promise<void> | undefined;
  const entry = {
    emergencyStop() {
      // Synchronous: only for process exit. SIGINT first (see stop) so the workers end and are reaped by the
      // master; whatever is left after a second is killed.
      const pgid = child?.pid;
      if (pgid) {
        signalGroup(pgid, 'SIGINT');
        const end = Date.now() + 1000;
        while (groupMembers(pgid).length > 0 && Date.now() < end) sleepSync(20);
        signalGroup(pgid, 'SIGKILL');
      }
      if (!KEEP) fs.rmSync(dir, { recursive: true, force: true });
    },
  };
  const stop = (): Promise<void> => {
    stopped ??= (async () => {
      let problem: string | undefined;
      const proc = child;
      const pgid = proc?.pid;
      if (proc && pgid) {
        const exited = new Promise<void>((resolve) => {
          if (proc.exitCode !== null || proc.signalCode !== null) resolve();
          else proc.once('exit', () => resolve());
        });
        // Whether this process has reaped the master within `ms` (the timer must not keep a finished test alive).
        const reaped = (ms: number) =>
          new Promise<boolean>((resolve) => {
            const timer = setTimeout(() => resolve(false), ms);
            void exited.then(() => {
              clearTimeout(timer);
              resolve(true);
            });
          });
        // SIGINT to the whole group: php -S shuts down cleanly on SIGINT, and then the master waits for its workers
        // (which got the SIGINT too), so none is left as a zombie. On SIGTERM the master dies at once and its
        // workers keep serving.
        signalGroup(pgid, 'SIGINT');
        if (!((await waitGroupGone(pgid, 5000)) && (await reaped(2000)))) {
          signalGroup(pgid, 'SIGKILL');
          await waitGroupGone(pgid, 2000);
          await reaped(2000);
          problem = `roundcube: php -S (process group ${pgid}) did not shut down within 5 s of SIGINT; killed`;
        }
      }
      logs();
      forget();
      if (!KEEP) fs.rmSync(dir, { recursive: true, force: true });
      if (problem) throw new Error(problem);
    })();
    return stopped;
  };
  const forget = stopAtExit(entry);

  try {
    const configText = renderConfig(baseSettings(dir, o), o.config ?? {});
    buildTree(dir, o, configText);
    const lint = spawnSync(php.bin, ['-l', path.join(dir, 'config', 'config.inc.php')], { env: phpEnv(), encoding: 'utf8' });
    if (lint.status !== 0) throw new Error(`roundcube: the rendered config.inc.php is not valid PHP:\n${lint.stdout}${lint.stderr}\n${configText}`);

    const port = await freePort();
    const url = `http://${HOST}:${port}/`;
    const out = fs.openSync(serverLog, 'a');
    try {
      child = spawn(php.bin, [...php.flags, '-S', `${HOST}:${port}`, '-t', path.join(dir, 'public_html')], {
        cwd: dir,
        env: phpEnv(),
        stdio: ['ignore', out, out],
        detached: true,
      });
    } finally {
      fs.closeSync(out);
    }
    // A test that forgets stop() must not hang its process on this child; the exit hook kills it then.
    child.unref();
    const proc = child;
    fs.writeFileSync(path.join(dir, 'php.pid'), String(proc.pid ?? ''));
    let exited: string | undefined;
    proc.once('exit', (code, signal) => (exited = `php -S exited (${signal ?? `code ${code}`})`));
    proc.once('error', (err) => (exited = `php -S could not start: ${err.message}`));

    const timeout = o.startTimeoutMs ?? 30_000;
    const deadline = Date.now() + timeout;
    // First until php says it listens (before that, something else may hold the port it was given: then php
    // exits with "Address already in use"), then until GET / answers.
    const listening = `Development Server (${url.replace(/\/$/, '')}) started`;
    let bound = false;
    let last = 'php -S did not report listening';
    for (;;) {
      if (exited !== undefined) {
        const err = new Error(exited) as Error & { portTaken?: boolean };
        if (/Address already in use/i.test(readText(serverLog))) err.portTaken = true;
        throw err;
      }
      bound ||= readText(serverLog).includes(listening);
      if (bound) {
        let page: Page | undefined;
        try {
          page = await get(url);
        } catch (err) {
          last = `GET / failed: ${(err as Error).message}`;
        }
        if (page && isLoginPage(page)) break;
        // Once php answers at all, Roundcube's answer is what it is (a config or database error): no use waiting.
        if (page) throw new Error(`GET / answered ${page.status} without the login form:\n${page.body.slice(0, 2000)}`);
      }
      if (Date.now() > deadline) throw new Error(`no login page within ${timeout} ms; last: ${last}`);
      await sleep(50);
    }
    return {
      url,
      port,
      dir,
      logs,
      stop,
    };
  } catch (err) {
    const e = err as Error & { portTaken?: boolean };
    const text = logs();
    await stop().catch(() => undefined);
    const where = KEEP ? `in ${dir}` : '(its tree was removed; ROUNDCUBE_KEEP=1 keeps it)';
    const wrapped = new Error(`roundcube: startup failed ${where}: ${e.message}\n${text}`) as Error & { portTaken?: boolean };
    if (e.portTaken) wrapped.portTaken = true;
    throw wrapped;
  }
}

// ---- a minimal browser: one cookie jar, one request at a time ------------------------------------------------

export interface Answer {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: string;
}

export class RoundcubeClient {
  readonly cookies = new Map<string, string>();

  /** `localAddress`: the loopback address to connect from (127.0.0.1 unless given). */
  constructor(
    readonly base: string,
    readonly localAddress?: string,
  ) {}

  request(method: 'GET' | 'POST', target: string, o: { form?: Record<string, string>; headers?: Record<string, string> } = {}): Promise<Answer> {
    const body = o.form ? new URLSearchParams(o.form).toString() : undefined;
    const headers: Record<string, string | number> = { ...o.headers };
    if (this.cookies.size > 0) headers.cookie = [...this.cookies].map(([k, v]) => `${k}=${v}`).join('; ');
    if (body !== undefined) {
      headers['content-type'] = 'application/x-www-form-urlencoded';
      headers['content-length'] = Buffer.byteLength(body);
    }
    return new Promise((resolve, reject) => {
      const options: http.RequestOptions = { method, headers, agent: false, timeout: 20_000 };
      if (this.localAddress) options.localAddress = this.localAddress;
      const req = http.request(new URL(target, this.base), options, (res) => {
        this.store(res.headers['set-cookie'] ?? []);
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (c: string) => (text += c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: text }));
        res.on('error', reject);
      });
      req.on('timeout', () => req.destroy(new Error(`${method} ${target}: no answer within 20 s`)));
      req.on('error', reject);
      req.end(body);
    });
  }

  /** Set-Cookie as a browser applies it to one host: a past expiry or Max-Age <= 0 deletes the cookie. */
  private store(lines: string[]): void {
    for (const line of lines) {
      const [pair = '', ...attrs] = line.split(';');
      const eq = pair.indexOf('=');
      if (eq <= 0) continue;
      const name = pair.slice(0, eq).trim();
      const value = pair.slice(eq + 1).trim();
      const expired = attrs.some((a) => {
        const [k = '', v = ''] = a.split('=').map((s) => s.trim());
        if (k.toLowerCase() === 'max-age') return Number(v) <= 0;
        if (k.toLowerCase() === 'expires') return Date.parse(v) <= Date.now();
        return false;
      });
      if (expired || value === '' || value === 'deleted') this.cookies.delete(name);
      else this.cookies.set(name, value);
    }
  }
}

/** The CSRF token of the login form (Roundcube puts one into every POST form it renders). */
export function loginToken(body: string): string {
  const m = /<input[^>]*name="_token"[^>]*value="([^"]+)"/.exec(body);
  if (!m?.[1]) throw new Error(`no _token in the login form:\n${body.slice(0, 3000)}`);
  return m[1];
}
