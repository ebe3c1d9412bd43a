#!/usr/bin/env node
// The mfagate command: the daemon (`serve`) and the operators' tools, all over the same store and config. One
// file per command group; this one builds the program and turns failures into messages and exit codes.
import { Command, CommanderError } from 'commander';
import { ConfigError } from '../config/config.js';
import { StartError } from '../daemon/daemon.js';
import { errorText } from '../daemon/log.js';
import { adminCommands } from './admin.js';
import { auditCommand } from './audit.js';
import { checkCommand } from './check.js';
import { UsageError, running } from './common.js';
import { grantsCommands } from './grants.js';
import { serveCommand } from './serve.js';
import { setupCommands } from './setup.js';
import { totpCommands } from './totp.js';
import { passcodesCommands } from './passcodes.js';
import { reportCommands } from './report.js';
import { usersCommands } from './users.js';

// `mfagate ... | head` closes the pipe early: that is not an error worth a stack trace.
process.stdout.on('error', (e: NodeJS.ErrnoException) => {
  if (e.code === 'EPIPE') process.exit(process.exitCode ?? 0);
  throw e;
});

export function buildProgram(): Command {
  const program = new Command();
  program
    .name('mfagate')
    .description('Per-IP MFA grants for Dovecot and Postfix: the daemon and the operators\' tools')
    .option('-c, --config <file>', 'configuration file (default: $MFAGATE_CONFIG, then ./mfagate.toml, then built-in defaults)')
    .showHelpAfterError()
    .exitOverride()
    .configureOutput({ writeErr: (s) => process.stderr.write(s) });
  serveCommand(program);
  grantsCommands(program);
  usersCommands(program);
  auditCommand(program);
  passcodesCommands(program);
  totpCommands(program);
  checkCommand(program);
  adminCommands(program);
  setupCommands(program);
  reportCommands(program);
  return program;
}

export async function main(argv: string[]): Promise<number> {
  const program = buildProgram();
  try {
    await program.parseAsync(argv);
    return typeof process.exitCode === 'number' ? process.exitCode : 0;
  } catch (e) {
    if (e instanceof CommanderError) {
      // Help and version are not errors; everything else commander reports is a usage error.
      return e.code === 'commander.helpDisplayed' || e.code === 'commander.help' || e.code === 'commander.version' ? 0 : 2;
    }
    if (e instanceof ConfigError) {
      process.stderr.write(`mfagate: configuration error in ${e.message}\n`);
      return 2;
    }
    if (e instanceof StartError) {
      // A file the configuration names is missing or unusable (the API token): fix the configuration.
      process.stderr.write(`mfagate: cannot start: ${e.message}\n`);
      return 2;
    }
    if (running.serving) {
      // The store, the key, a port: the daemon did not start, and says why.
      process.stderr.write(`mfagate: cannot start: ${errorText(e)}\n`);
      return 1;
    }
    if (e instanceof UsageError) {
      process.stderr.write(`mfagate: ${e.message}\n`);
      return running.deciding ? 2 : e.exitCode;
    }
    // A store or system error: 1, except for `check`, where 1 means "refused".
    process.stderr.write(`mfagate: ${errorText(e)}\n`);
    return running.deciding ? 2 : 1;
  }
}

main(process.argv).then((code) => {
  if (code !== 0 || process.exitCode === undefined) process.exitCode = code;
  // A daemon that did not start must not linger (systemd would show it running): exit now.
  if (running.serving && code !== 0) process.exit(code);
});
