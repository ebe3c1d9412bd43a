// `mfagate totp enroll`: an authenticator app registered at the helpdesk desk.
import type { Command } from 'commander';
import QRCode from 'qrcode';
import { openSecrets } from '../mfa/secrets.js';
import { DIGITS, PERIOD } from '../mfa/totp.js';
import { actor, configOf, json, out, userArg, withStore } from './common.js';
import { formatTime, groupKey } from './format.js';
import { factorsOf, mfaService } from './mfa.js';

export function totpCommands(program: Command): void {
  const totp = program.command('totp').description('authenticator apps (TOTP)');
  totp
    .command('enroll')
    .description("register an authenticator app at the helpdesk desk: prints a QR code to scan (replaces the user's app)")
    .argument('<user>')
    .option('--json', 'machine-readable output (the key and the otpauth:// URI, no QR code)')
    .action(async (raw: string, o: { json?: boolean }, cmd: Command) => {
      const config = configOf(cmd);
      const name = userArg(config, raw);
      const r = await withStore(config, async (s, store) => {
        const secrets = await openSecrets(config.secrets.keyFile, store);
        const before = await factorsOf(s, name);
        const { secret, uri } = await mfaService(config, s, secrets).enrollAtDesk(name, actor());
        return { before, secret, uri, at: Date.now() };
      });
      const replaced = r.before.totp;
      if (replaced) {
        process.stderr.write(
          `mfagate: warning: this replaced the authenticator app ${name} registered ${formatTime(r.before.totp_since === null ? null : Date.parse(r.before.totp_since))}: its codes no longer work\n`,
        );
      }
      if (o.json) {
        return json({
          user: name,
          issuer: config.totp.issuer,
          secret: r.secret,
          uri: r.uri,
          digits: DIGITS,
          period: PERIOD,
          registered_at: new Date(r.at).toISOString(),
          replaced,
          replaced_registered_at: replaced ? r.before.totp_since : null,
        });
      }
      const qr = await QRCode.toString(r.uri, { type: 'terminal', small: true });
      out(`${name}: authenticator app registered${replaced ? ' (the previous app no longer works)' : ''}`);
      out('Scan this with the authenticator app (Google Authenticator, Microsoft Authenticator, Authy, ...):');
      out('');
      out(qr);
      out(`Or add the account by hand: issuer ${config.totp.issuer}, account ${name}, time-based, ${DIGITS} digits, every ${PERIOD} s,`);
      out(`key: ${groupKey(r.secret)}`);
      out(`URI: ${r.uri}`);
      out('');
      out('The key is shown only now. Keep it out of tickets and mail, and clear the screen afterwards.');
      out(`Check it: ${name} signs in to webmail and passes MFA with a code from the app.`);
    });
}
