// `mfagate serve`: the daemon in the foreground (systemd runs it so), with reload on SIGHUP and a clean stop.
import type { Command } from 'commander';
import { formatEndpoint } from '../config/listen.js';
import { type Daemon, startDaemon } from '../daemon/daemon.js';
import { createLogger, errorText } from '../daemon/log.js';
import { configOf, running } from './common.js';

export function serveCommand(program: Command): void {
  program
    .command('serve')
    .description('run the daemon: the Dovecot and Postfix policy endpoints and the webmail API')
    .option('--create-store', 'create the store if it does not exist (a new installation; "mfagate db migrate" does the same)')
    .action(async (o: { createStore?: boolean }, cmd: Command) => {
      running.serving = true;
      // A reload asked for while starting is done once started, instead of SIGHUP's default (ending the process).
      let reloadAsked = false;
      const early = () => (reloadAsked = true);
      process.on('SIGHUP', early);
      const config = configOf(cmd);
      const logger = createLogger(config.log.level);
      let daemon: Daemon;
      try {
        daemon = await startDaemon(config, logger, { createStore: o.createStore === true });
      } finally {
        logger.flush();
      }
      process.stderr.write(
        `mfagate: listening\n` +
          daemon.endpoints.dovecot.map((e) => `  dovecot auth policy  ${formatEndpoint(e)}\n`).join('') +
          daemon.endpoints.postfix.map((e) => `  postfix policy       ${formatEndpoint(e)}\n`).join('') +
          daemon.endpoints.api.map((e) => `  webmail API          ${formatEndpoint(e)}\n`).join('') +
          daemon.endpoints.web.map((e) => `  MFA web page         ${e.kind === 'tcp' ? `http://${formatEndpoint(e)}${config.web.basePath}/` : formatEndpoint(e)}\n`).join('') +
          `  store                ${config.store.backend === 'sqlite' ? config.store.path : `PostgreSQL ${config.store.url}`}\n`,
      );
      process.on('SIGHUP', () => daemon.reload());
      process.off('SIGHUP', early);
      if (reloadAsked) daemon.reload();
      const stop = (signal: string) => {
        logger.log('info', 'stopping', { signal });
        daemon.stop().then(
          () => process.exit(0),
          (e: unknown) => {
            logger.log('error', 'stop-failed', { error: errorText(e) });
            logger.flush();
            process.exit(1);
          },
        );
      };
      process.once('SIGTERM', () => stop('SIGTERM'));
      process.once('SIGINT', () => stop('SIGINT'));
      await new Promise(() => undefined);
    });
}
