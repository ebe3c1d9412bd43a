// Process life: open the store, bind every listener, run the timers, reload on SIGHUP, stop cleanly.
import fs from 'node:fs';
import path from 'node:path';
import type http from 'node:http';
import type net from 'node:net';
import { type Config, ConfigError, loadConfig } from '../config/config.js';
import { type Endpoint, formatEndpoint } from '../config/listen.js';
import { type Mailer, createMailer } from '../mfa/mailer.js';
import { openSecrets } from '../mfa/secrets.js';
import { MfaService } from '../mfa/service.js';
import { Store, StoreError } from '../store/store.js';
import { StoreUnavailableError } from '../store/sqlite-file.js';
import { type DaemonStore, openDaemonStore } from './store-link.js';
import { createApiServer } from './api-server.js';
import { createDovecotServer } from './dovecot-server.js';
import { boundEndpoint, closeServer, listenOn } from './listeners.js';
import { type Logger, errorText } from './log.js';
import { type PostfixServer, createPostfixServer } from './postfix-server.js';
import { PolicyService } from './service.js';
import { type WebServer, createWebServer } from '../web/server.js';

export interface Daemon {
  service: PolicyService;
  /** Second factors and grants for the webmail API (tests and the API share it). */
  mfa: MfaService;
  /** Where each endpoint listens (TCP port 0 resolved to the real port). */
  endpoints: { dovecot: Endpoint[]; postfix: Endpoint[]; api: Endpoint[]; web: Endpoint[] };
  reload(): void;
  stop(): Promise<void>;
}

export interface DaemonOptions {
  /** The clock for decisions and second factors (tests); default Date.now. */
  clock?: () => number;
  /**
   * Create the store when it is missing (`serve --create-store`). Without it, only the built-in defaults (no
   * configuration file: a fresh checkout) create one; with a configuration a missing store stops the start.
   */
  createStore?: boolean;
}

/** The daemon cannot start as configured (the message says what to fix). */
export class StartError extends Error {
  override name = 'StartError';
}

const REPORT_FLUSH_MS = 1000;
const STATS_FLUSH_MS = 5000;
const PURGE_EVERY_MS = 10 * 60_000;
const WEB_SWEEP_MS = 60_000;
const PASSCODE_SWEEP_MS = 60_000;
/** How often the store's and the key's paths are checked (a deleted or replaced file is put back). */
const FILES_CHECK_MS = 1000;
/** A problem that persists is logged again this often, not on every check. */
const FILES_REMIND_MS = 60_000;
/** API bodies are a few fields; nothing legitimate comes near this. */
const API_MAX_BODY_BYTES = 16 * 1024;
/** Failed factor attempts are kept at least this long (the lockout window may be longer). */
const FAILURES_KEPT_MS = 24 * 3600_000;
/** How long the change feed keeps a change: a copy that fell further behind loads whole instead. */
const CHANGES_KEPT_MS = 24 * 3600_000;

/** The bearer token for TCP API listeners: one word of printable ASCII in `[api] token_file`. */
export function readApiToken(file: string): string {
  const how = 'put a random token in it, e.g. the output of "openssl rand -hex 32", readable by the daemon and the webmail only';
  if (file === '') throw new StartError(`api.token_file: expected a file holding the bearer token when api.listen has a TCP address (${how})`);
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8').trim();
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    throw new StartError(`api.token_file: cannot read ${file}: ${err.code === 'ENOENT' ? 'no such file' : err.message} (${how})`);
  }
  if (text === '') throw new StartError(`api.token_file: ${file} is empty (${how})`);
  if (!/^[\x21-\x7e]+$/.test(text)) throw new StartError(`api.token_file: ${file}: expected one word of printable ASCII, no spaces or line breaks (${how})`);
  return text;
}

/**
 * Starts completely or not at all: anything that fails (a store that cannot be written, a bad key or token
 * file, a port in use) closes what was opened and rejects, so the process can exit with the reason instead of
 * answering the policy endpoints half-started.
 */
export async function startDaemon(config: Config, logger: Logger, opts: DaemonOptions = {}): Promise<Daemon> {
  const clock = opts.clock ?? Date.now;
  // The copy says when it goes stale (and current again) to the service, which exists once the copy does.
  let told: PolicyService | undefined;
  const link: DaemonStore = await openDaemonStore(config, opts.createStore === true || config.file === undefined, clock, {
    failed: (e, currentAt) => told?.copyStale(e, currentAt),
    recovered: (currentAt) => told?.copyCurrent(currentAt),
  });
  const store = link.opened.records;
  const pid = process.pid;
  const service = new PolicyService(config, store, link.copy, logger, clock);
  told = service;
  const bound: { server: net.Server; endpoint: Endpoint }[] = [];
  const endpoints: Daemon['endpoints'] = { dovecot: [], postfix: [], api: [], web: [] };
  const webs: WebServer[] = [];
  const timers: NodeJS.Timeout[] = [];
  let statsStarted = false;
  let mailer: Mailer | undefined;
  let mfa: MfaService;
  let apiToken: string | undefined;
  try {
    // Everything that can fail on a bad key or token file fails here, before any listener is bound.
    const secrets = await openSecrets(config.secrets.keyFile, link.opened);
    const keyText = fs.readFileSync(config.secrets.keyFile, 'utf8');
    if (config.api.listen.some((e) => e.kind === 'tcp')) {
      apiToken = readApiToken(config.api.tokenFile);
      warnAboutToken(config.api.tokenFile, apiToken, logger);
    }
    mailer = createMailer(config.mail.smtp, config.mail.from);
    mfa = new MfaService({
      store,
      config: () => service.config,
      secrets,
      mailer: () => mailer as Mailer,
      logger,
      clock,
      passcodes: service.passcodes,
    });
    for (const e of config.dovecot.listen) {
      const server = createDovecotServer(service);
      await listenOn(server, e, e.kind === 'unix' ? 0o660 : undefined);
      const real = boundEndpoint(server, e);
      bound.push({ server, endpoint: real });
      endpoints.dovecot.push(real);
    }
    for (const e of config.postfix.listen) {
      const server = createPostfixServer(service);
      await listenOn(server, e, config.postfix.socketMode);
      const real = boundEndpoint(server, e);
      bound.push({ server, endpoint: real });
      endpoints.postfix.push(real);
    }
    for (const e of config.api.listen) {
      // The UNIX socket is protected by its file mode; a TCP listener requires the bearer token.
      const server = createApiServer(mfa, {
        token: e.kind === 'tcp' ? () => apiToken : () => undefined,
        logger,
        maxBodyBytes: API_MAX_BODY_BYTES,
      });
      await listenOn(server, e, e.kind === 'unix' ? config.api.socketMode : undefined);
      const real = boundEndpoint(server, e);
      bound.push({ server, endpoint: real });
      endpoints.api.push(real);
    }
    for (const e of config.web.listen) {
      // The MFA page: plain HTTP for the site's reverse proxy (or a UNIX socket it reaches).
      const web = createWebServer({ mfa, config: () => service.config, logger, clock });
      await listenOn(web.server, e, e.kind === 'unix' ? 0o660 : undefined);
      const real = boundEndpoint(web.server, e);
      bound.push({ server: web.server, endpoint: real });
      endpoints.web.push(real);
      webs.push(web);
    }
    // The daemon writes the store (grants, reports, failures): a store it cannot write stops the start here.
    // Only now, once every listener is bound: a second copy started by mistake fails on its ports first and
    // so never takes over the running daemon's statistics.
    try {
      await link.started(pid, Date.now());
      statsStarted = true;
    } catch (e) {
      // SQLite's own reason ("attempt to write a readonly database"), not the wrapper's "cannot be used now".
      const reason = e instanceof StoreUnavailableError && e.cause instanceof Error ? e.cause : e;
      throw new StoreError(`the store (${link.opened.where}) cannot be written (${errorText(reason)}): the daemon must write it; check the file, its directory and the free space, or the database`);
    }

    // A timer's run that is still going when the next is due is not started twice.
    const every = (ms: number, fn: () => Promise<void> | void) => {
      let busy = false;
      const t = setInterval(() => {
        if (busy) return;
        busy = true;
        Promise.resolve()
          .then(fn)
          .catch((e: unknown) => logger.log('error', 'timer-failed', { error: errorText(e) }))
          .finally(() => (busy = false));
      }, ms);
      t.unref();
      timers.push(t);
    };
    every(REPORT_FLUSH_MS, async () => {
      await service.flushReports();
      await service.passcodes.flushUses();
    });
    every(PASSCODE_SWEEP_MS, () => service.passcodes.sweep());
    every(STATS_FLUSH_MS, () => link.report(pid, Date.now(), service.counters, null, service.copyState()));
    const purge = async () => {
      const now = Date.now();
      const config = service.config;
      let total = 0;
      // Small batches keep each write transaction short, so policy reads and CLI writes are never held up long.
      for (let n = await store.purgeGrants(now - config.grants.purgeAfterMs, now); n > 0; n = await store.purgeGrants(now - config.grants.purgeAfterMs, now)) {
        total += n;
      }
      if (total > 0) logger.log('info', 'grants-purged', { count: total });
      // Failed factor attempts only count inside the lockout window.
      await store.mfa.purgeFailures(now - Math.max(config.lockout.windowMs, FAILURES_KEPT_MS));
      // Passcodes revoked or expired long ago, as grants are ([grants] purge_after).
      let passcodes = 0;
      for (let n = await store.passcodes.purge(now - config.grants.purgeAfterMs); n > 0; n = await store.passcodes.purge(now - config.grants.purgeAfterMs)) passcodes += n;
      if (passcodes > 0) logger.log('info', 'passcodes-purged', { count: passcodes });
      // The change feed: a copy further behind than this reloads whole. The copy forgets expired grants.
      await store.purgeChanges(now - CHANGES_KEPT_MS);
      service.copy.sweep(now);
    };
    every(PURGE_EVERY_MS, purge);
    if (webs.length > 0) every(WEB_SWEEP_MS, () => webs.forEach((w) => w.sweep()));
    if (link.opened.sqlite) every(FILES_CHECK_MS, fileWatch(link.opened.sqlite, config.secrets.keyFile, keyText, logger));
    else every(FILES_CHECK_MS, keyWatch(config.secrets.keyFile, keyText, logger));
    await purge().catch((e: unknown) => logger.log('error', 'timer-failed', { error: errorText(e) }));
  } catch (e) {
    for (const t of timers) clearInterval(t);
    await Promise.all(bound.map((b) => closeServer(b.server, b.endpoint)));
    mailer?.close();
    if (statsStarted) {
      await link.report(pid, Date.now(), service.counters, Date.now(), service.copyState()).catch(() => {
        /* the reason the start failed is what the caller reports */
      });
    }
    await link.close();
    throw e;
  }

  logger.log('info', 'started', {
    pid,
    store: link.opened.where,
    config: config.file ?? '(built-in defaults)',
    dovecot: endpoints.dovecot.map(formatEndpoint),
    postfix: endpoints.postfix.map(formatEndpoint),
    api: endpoints.api.map(formatEndpoint),
    web: endpoints.web.map(formatEndpoint),
    mode: config.enforcement.mode,
    copy: { load_ms: link.loadMs, flagged_users: link.copy.size().flaggedUsers, grants: link.copy.size().grants },
  });

  if (config.dovecot.apiKey === '' && config.dovecot.listen.some((e) => e.kind === 'tcp')) {
    logger.log('warn', 'no-api-key', {
      note: 'dovecot.api_key is empty: any local process can ask the Dovecot endpoint and report logins; set a key in production',
    });
  }

  if (endpoints.web.length > 0) warnAboutWeb(config, endpoints.web, logger);

  let stopping: Promise<void> | undefined;
  return {
    service,
    mfa,
    endpoints,
    reload() {
      let next: Config;
      try {
        next = loadConfig(service.config.file);
      } catch (e) {
        logger.log('error', 'reload-failed', {
          error: e instanceof ConfigError ? e.message : errorText(e),
          action: 'kept the running configuration',
        });
        return;
      }
      const current = service.config;
      const needsRestart: string[] = [];
      const same = (a: Endpoint[], b: Endpoint[]) => JSON.stringify(a.map(formatEndpoint)) === JSON.stringify(b.map(formatEndpoint));
      if (!same(next.dovecot.listen, current.dovecot.listen)) needsRestart.push('dovecot.listen');
      if (!same(next.postfix.listen, current.postfix.listen)) needsRestart.push('postfix.listen');
      if (next.postfix.socketMode !== current.postfix.socketMode) needsRestart.push('postfix.socket_mode');
      if (next.store.path !== current.store.path) needsRestart.push('store.path');
      if (next.store.backend !== current.store.backend || next.store.url !== current.store.url) needsRestart.push('store.backend/url');
      if (!same(next.api.listen, current.api.listen)) needsRestart.push('api.listen');
      if (next.api.socketMode !== current.api.socketMode) needsRestart.push('api.socket_mode');
      if (next.secrets.keyFile !== current.secrets.keyFile) needsRestart.push('secrets.key_file');
      if (!same(next.web.listen, current.web.listen)) needsRestart.push('web.listen');
      // The token is read again on every reload (rotation); a bad file keeps the running token.
      if (endpoints.api.some((e) => e.kind === 'tcp')) {
        try {
          apiToken = readApiToken(next.api.tokenFile);
          warnAboutToken(next.api.tokenFile, apiToken, logger);
        } catch (e) {
          logger.log('error', 'reload-failed', { error: errorText(e), action: 'kept the running API token' });
        }
      }
      if (next.mail.smtp !== current.mail.smtp || next.mail.from !== current.mail.from) {
        const old = mailer;
        mailer = createMailer(next.mail.smtp, next.mail.from);
        old?.close();
      }
      service.reconfigure(next);
      logger.log(needsRestart.length ? 'warn' : 'info', 'reloaded', {
        config: next.file,
        mode: next.enforcement.mode,
        ...(needsRestart.length ? { restart_needed_for: needsRestart, note: 'these keys take effect after a restart; the old values stay in use' } : {}),
      });
    },
    stop() {
      stopping ??= (async () => {
        for (const t of timers) clearInterval(t);
        // Stop accepting; end idle connections now and busy ones after a short grace.
        const closing = bound.map((b) => closeServer(b.server, b.endpoint));
        for (const b of bound) {
          if ('closeIdleConnections' in b.server) (b.server as http.Server).closeIdleConnections();
          else (b.server as PostfixServer).closeAllConnections();
        }
        const grace = setTimeout(() => {
          for (const b of bound) if ('closeAllConnections' in b.server) (b.server as http.Server | PostfixServer).closeAllConnections();
        }, 2000);
        await Promise.race([Promise.all(closing), new Promise((r) => setTimeout(r, 3000))]);
        clearTimeout(grace);
        await service.flushReports();
        await service.passcodes.flushUses();
        mailer?.close();
        try {
          await link.report(pid, Date.now(), service.counters, Date.now(), service.copyState());
        } catch (e) {
          logger.log('error', 'stats-not-written', { error: errorText(e) });
        }
        await link.close();
        logger.log('info', 'stopped', { pid });
        logger.flush();
      })();
      return stopping;
    },
  };
}

/**
 * The check run every second: the store file, deleted or replaced under the running daemon, is put back from
 * the open copy (so the CLI and the daemon keep seeing the same grants, and nothing is lost); the key file, if
 * deleted, is written again. Said loudly once when it happens; a problem that cannot be mended is repeated
 * every minute, not every second.
 */
function reminder(logger: Logger) {
  let at = -Infinity;
  const say = (event: string, fields: Record<string, unknown>) => {
    const now = Date.now();
    if (now - at < FILES_REMIND_MS) return;
    at = now;
    logger.log('error', event, fields);
  };
  return Object.assign(say, { reset: () => (at = -Infinity) });
}

function fileWatch(store: Store, keyFile: string, keyText: string, logger: Logger): () => Promise<void> {
  const remind = reminder(logger);
  const key = keyWatch(keyFile, keyText, logger);
  return async () => {
    key();
    // Not while a write transaction of this process is open on the file (it would be cut off).
    if (store.db.inTransaction) return;
    let state;
    try {
      state = store.fileState();
    } catch (e) {
      return remind('store-unreachable', { store: store.file, error: errorText(e), note: 'cannot look at the store file: the daemon keeps deciding from the file it has open' });
    }
    if (state === 'ok') return;
    let movedAside: string | undefined;
    try {
      movedAside = store.restoreFile(Date.now()).movedAside;
    } catch (e) {
      if (!store.db.open) {
        // The old copy was closed but the new one did not open: nothing left to decide from. systemd restarts us.
        logger.log('error', 'store-lost', { store: store.file, error: errorText(e) });
        logger.flush();
        process.exit(1);
      }
      return remind('store-missing', {
        store: store.file,
        was: state,
        error: errorText(e),
        note: 'the store file is gone or replaced and cannot be written back: the daemon keeps deciding from the file it has open, the CLI cannot see it',
      });
    }
    const counts = await store.records.counts(Date.now()).catch(() => undefined);
    logger.log('error', 'store-restored', {
      store: store.file,
      was: state,
      ...(movedAside ? { moved_aside: movedAside } : {}),
      ...(counts ? { users: counts.users, active_grants: counts.activeGrants } : {}),
      note:
        state === 'missing'
          ? 'the store file was deleted while the daemon ran: it was written back from the open copy, nothing was lost'
          : 'another file took the store\'s place while the daemon ran: it was moved aside and the store written back; to replace the store, stop the daemon first',
    });
    remind.reset();
  };
}

/** The key file, if deleted while the daemon runs, is written again (said once; a failure every minute). */
function keyWatch(keyFile: string, keyText: string, logger: Logger): () => void {
  const remindKey = reminder(logger);
  return () => {
    if (fs.existsSync(keyFile)) return;
    try {
      fs.mkdirSync(path.dirname(keyFile), { recursive: true, mode: 0o750 });
      fs.writeFileSync(keyFile, keyText, { mode: 0o600, flag: 'wx' });
      logger.log('error', 'key-restored', { key_file: keyFile, note: 'the secrets key file was deleted while the daemon ran: it was written back' });
      remindKey.reset();
    } catch (e) {
      remindKey('key-missing', { key_file: keyFile, error: errorText(e) });
    }
  };
}

function warnAboutToken(file: string, token: string, logger: Logger): void {
  if (token.length < 16) logger.log('warn', 'weak-api-token', { file, note: 'the API token is shorter than 16 characters: use e.g. "openssl rand -hex 32"' });
  try {
    if ((fs.statSync(file).mode & 0o004) !== 0) logger.log('warn', 'api-token-readable', { file, note: 'the API token file is readable by every local user: chmod o-r' });
  } catch {
    /* it was just read; a race with a rename is not worth a warning */
  }
}

/** Mistakes in [web] that still let the page start but would hurt users or security: said once, at start. */
function warnAboutWeb(config: Config, web: Endpoint[], logger: Logger): void {
  const exposed = web.filter((e) => e.kind === 'tcp' && !/^(127\.|::1$|localhost$)/.test(e.host));
  if (exposed.length > 0) {
    logger.log('warn', 'web-not-loopback', {
      listen: exposed.map(formatEndpoint),
      note: 'the MFA page speaks plain HTTP: keep it on loopback (or a UNIX socket) behind the HTTPS reverse proxy',
    });
  }
  if (!config.web.secureCookie) {
    logger.log('warn', 'web-cookie-not-secure', { note: 'web.secure_cookie = false: the session cookie may travel over plain HTTP; for tests only' });
  }
  let socket = false;
  try {
    socket = fs.statSync(config.web.dovecotAuthSocket).isSocket();
  } catch {
    socket = false;
  }
  if (!socket) {
    logger.log('warn', 'web-auth-socket-missing', {
      socket: config.web.dovecotAuthSocket,
      note: 'web.dovecot_auth_socket is not a socket (yet): sign-in fails until Dovecot listens there (see docs/deployment.md, the MFA web page)',
    });
  }
}