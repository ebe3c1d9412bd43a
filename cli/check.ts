// `mfagate check`: what would happen to a login now, and the rule that decides it.
import type { Command } from 'commander';
import { policySettings } from '../config/config.js';
import { passcodeProtocolOf } from '../mfa/passcodes.js';
import { blockOf } from '../policy/address.js';
import { decide } from '../policy/decide.js';
import { describeRule } from '../policy/rules.js';
import { UsageError, configOf, idArg, ipArg, json, out, running, userArg, withStore } from './common.js';
import { formatTime } from './format.js';

export function checkCommand(program: Command): void {
  program
    .command('check')
    .description('what would happen to a login now: the decision and the rule that made it (exit 0 allowed, 1 refused, 2 error)')
    .requiredOption('--user <user>', 'the login name, as the mail program sends it')
    .requiredOption('--ip <ip>', 'the client address')
    .option('--protocol <name>', 'imap, pop3, smtp, submission, sieve, ...', 'imap')
    .option('--real-ip <ip>', 'the TCP peer Dovecot saw, when a webmail host or proxy forwarded the login')
    .option('--passcode <id>', 'the login is made with this app passcode of the user (its number from passcodes list)')
    .option('--json', 'machine-readable output')
    .action(async (o: { user: string; ip: string; protocol: string; realIp?: string; passcode?: string; json?: boolean }, cmd: Command) => {
      running.deciding = true;
      const config = configOf(cmd);
      const user = userArg(config, o.user);
      const address = ipArg(o.ip);
      const realAddress = o.realIp !== undefined ? ipArg(o.realIp) : undefined;
      if (!/^[a-z0-9_-]+$/i.test(o.protocol)) throw new UsageError(`--protocol: not a protocol name: ${JSON.stringify(o.protocol)}`);
      const protocol = o.protocol.toLowerCase();
      const passcodeId = o.passcode !== undefined ? idArg(o.passcode, 'a passcode number') : undefined;
      const now = Date.now();
      const settings = policySettings(config);
      const { d, passcodeProblem } = await withStore(config, async (s) => {
        // As the daemon judges it: the passcode must be the user's, working, made for this protocol (the Lua
        // passdb refuses it otherwise, and the login goes on with the password).
        let problem: string | undefined;
        if (passcodeId !== undefined) {
          const row = await s.passcodes.byId(passcodeId);
          const p = passcodeProtocolOf(protocol);
          if (!config.appPasscodes.enabled) problem = 'app passcodes are off ([app_passcodes] enabled)';
          else if (!row || row.user !== user) problem = `${user} has no app passcode ${passcodeId}`;
          else if (row.revokedAt !== null) problem = `app passcode ${passcodeId} is revoked`;
          else if (row.expiresAt !== null && row.expiresAt <= now) problem = `app passcode ${passcodeId} has expired`;
          else if (p === undefined || !row.protocols.includes(p)) problem = `app passcode ${passcodeId} is not for ${protocol} (it is for ${row.protocols.join(', ')})`;
        }
        const passcode = passcodeId !== undefined && problem === undefined;
        // The store's facts for the one (user, block) the decision asks about, read now.
        const facts = await s.lookup(user, blockOf(address, settings.prefixes), now);
        return { d: decide(settings, { user, address, realAddress, protocol, now, passcode }, { lookup: () => facts }), passcodeProblem: problem };
      });
      if (o.json) {
        json({ user, ip: address.toString(), block: d.block, protocol, result: d.allow ? 'allow' : 'refuse', verdict: d.verdict, rule: d.rule, explanation: describeRule(d.rule), log_only: d.logOnly, untrusted_range: d.untrustedRange, grant: d.grant ? { id: d.grant.id, expires_at: new Date(d.grant.expiresAt).toISOString() } : null, ...(passcodeId !== undefined ? { passcode: passcodeId, passcode_problem: passcodeProblem ?? null } : {}) });
      } else {
        out(`${d.allow ? 'ALLOW' : 'REFUSE'}  ${user} from ${address.toString()} (${protocol})${passcodeId !== undefined ? ` with app passcode ${passcodeId}` : ''}`);
        out(`rule: ${d.rule}: ${describeRule(d.rule)}`);
        if (passcodeProblem) out(`note: ${passcodeProblem}: Dovecot would refuse the passcode, so this is the decision for the password alone`);
        if (d.untrustedRange) out('note: the address is in an untrusted range ([networks] untrusted), so MFA applies even though it may be on campus');
        if (d.grant) out(`grant: ${d.grant.id}, block ${d.block}, expires ${formatTime(d.grant.expiresAt)}`);
        if (d.logOnly) out('note: enforcement mode is log-only, so this refusal is only logged and the login is let through');
        if (!d.allow) out(`the mail program is told: ${config.dovecot.messages[protocol] ?? config.dovecot.message}`);
      }
      process.exitCode = d.allow ? 0 : 1;
    });
}
