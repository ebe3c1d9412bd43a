// `mfagate check`: what would happen to a login now, and the rule that decides it.
import type { Command } from 'commander';
import { policySettings } from '../config/config.js';
import { decide } from '../policy/decide.js';
import { describeRule } from '../policy/rules.js';
import { UsageError, configOf, ipArg, json, out, running, userArg, withStore } from './common.js';
import { formatTime } from './format.js';

export function checkCommand(program: Command): void {
  program
    .command('check')
    .description('what would happen to a login now: the decision and the rule that made it (exit 0 allowed, 1 refused, 2 error)')
    .requiredOption('--user <user>', 'the login name, as the mail program sends it')
    .requiredOption('--ip <ip>', 'the client address')
    .option('--protocol <name>', 'imap, pop3, smtp, submission, sieve, ...', 'imap')
    .option('--real-ip <ip>', 'the TCP peer Dovecot saw, when a webmail host or proxy forwarded the login')
    .option('--json', 'machine-readable output')
    .action((o: { user: string; ip: string; protocol: string; realIp?: string; json?: boolean }, cmd: Command) => {
      running.deciding = true;
      const config = configOf(cmd);
      const user = userArg(config, o.user);
      const address = ipArg(o.ip);
      const realAddress = o.realIp !== undefined ? ipArg(o.realIp) : undefined;
      if (!/^[a-z0-9_-]+$/i.test(o.protocol)) throw new UsageError(`--protocol: not a protocol name: ${JSON.stringify(o.protocol)}`);
      const now = Date.now();
      const d = withStore(config, (s) => decide(policySettings(config), { user, address, realAddress, protocol: o.protocol.toLowerCase(), now }, s));
      if (o.json) {
        json({ user, ip: address.toString(), block: d.block, protocol: o.protocol.toLowerCase(), result: d.allow ? 'allow' : 'refuse', verdict: d.verdict, rule: d.rule, explanation: describeRule(d.rule), log_only: d.logOnly, untrusted_range: d.untrustedRange, grant: d.grant ? { id: d.grant.id, expires_at: new Date(d.grant.expiresAt).toISOString() } : null });
      } else {
        out(`${d.allow ? 'ALLOW' : 'REFUSE'}  ${user} from ${address.toString()} (${o.protocol.toLowerCase()})`);
        out(`rule: ${d.rule}: ${describeRule(d.rule)}`);
        if (d.untrustedRange) out('note: the address is in an untrusted range ([networks] untrusted), so MFA applies even though it may be on campus');
        if (d.grant) out(`grant: ${d.grant.id}, block ${d.block}, expires ${formatTime(d.grant.expiresAt)}`);
        if (d.logOnly) out('note: enforcement mode is log-only, so this refusal is only logged and the login is let through');
        if (!d.allow) out(`the mail program is told: ${config.dovecot.messages[o.protocol.toLowerCase()] ?? config.dovecot.message}`);
      }
      process.exitCode = d.allow ? 0 : 1;
    });
}
