// Process life: open the store, bind every listener, run the timers, reload on SIGHUP, stop cleanly.
import type http from 'node:http';
import type net from 'node:net';
import { type Config, ConfigError, loadConfig } from '../config/config.js';
import { type Endpoint, formatEndpoint } from '../config/listen.js';
import { Store } from '../store/store.js';
import { createDovecotServer } from './dovecot-server.js';
import { boundEndpoint, closeServer, listenOn } from './listeners.js';
import { type Logger, errorText } from './log.js';
import { type PostfixServer, createPostfixServer } from './postfix-server.js';
import { PolicyService } from './service.js';

export interface Daemon {
  service: PolicyService;
  /** Where each endpoint listens (TCP port 0 resolved to the real port). */
  endpoints: { dovecot: Endpoint[]; postfix: Endpoint[] };
  reload(): void;
  stop(): Promise<void>;
}

const REPORT_FLUSH_MS = 1000;
const STATS_FLUSH_MS = 5000;
const PURGE_EVERY_MS = 10 * 60_000;

export async function startDaemon(config: Config, logger: Logger): Promise<Daemon> {
  const store = Store.open(config.store.path, { create: true, migrate: true });
  const service = new PolicyService(config, store, logger);
  const bound: { server: net.Server; endpoint: Endpoint }[] = [];
  const endpoints: Daemon['endpoints'] = { dovecot: [], postfix: [] };
  try {
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
  } catch (e) {
    await Promise.all(bound.map((b) => closeServer(b.server, b.endpoint)));
    store.close();
    throw e;
  }

  const pid = process.pid;
  store.daemonStarted(pid, Date.now());
  const timers: NodeJS.Timeout[] = [];
  const every = (ms: number, fn: () => void) => {
    const t = setInterval(() => {
      try {
        fn();
      } catch (e) {
        logger.log('error', 'timer-failed', { error: errorText(e) });
      }
    }, ms);
    t.unref();
    timers.push(t);
  };
  every(REPORT_FLUSH_MS, () => service.flushReports());
  every(STATS_FLUSH_MS, () => store.writeDaemonStats(pid, Date.now(), service.counters));
  const purge = () => {
    const now = Date.now();
    let total = 0;
    // Small batches keep each write transaction short, so policy reads and CLI writes are never held up long.
    for (let n = store.purgeGrants(now - service.config.grants.purgeAfterMs, now); n > 0; n = store.purgeGrants(now - service.config.grants.purgeAfterMs, now)) {
      total += n;
    }
    if (total > 0) logger.log('info', 'grants-purged', { count: total });
  };
  every(PURGE_EVERY_MS, purge);
  purge();

  logger.log('info', 'started', {
    pid,
    store: config.store.path,
    config: config.file ?? '(built-in defaults)',
    dovecot: endpoints.dovecot.map(formatEndpoint),
    postfix: endpoints.postfix.map(formatEndpoint),
    mode: config.enforcement.mode,
  });

  if (config.dovecot.apiKey === '' && config.dovecot.listen.some((e) => e.kind === 'tcp')) {
    logger.log('warn', 'no-api-key', {
      note: 'dovecot.api_key is empty: any local process can ask the Dovecot endpoint and report logins; set a key in production',
    });
  }

  let stopping: Promise<void> | undefined;
  return {
    service,
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
        service.flushReports();
        store.writeDaemonStats(pid, Date.now(), service.counters, Date.now());
        store.close();
        logger.log('info', 'stopped', { pid });
        logger.flush();
      })();
      return stopping;
    },
  };
}
