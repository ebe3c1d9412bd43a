// `mfagate setup dovecot` and `mfagate setup postfix`: the other servers' configuration for this mfagate
// configuration, printed ready to save, so the deployment guide needs no hand-copied snippets.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Command } from 'commander';
import type { Config } from '../config/config.js';
import type { Endpoint } from '../config/listen.js';
import { UsageError, configOf, out } from './common.js';

/** The Lua passdb shipped with mfagate, beside the code that runs (dist/cli/setup.js -> dovecot/). */
export const PASSCODE_SCRIPT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../dovecot/mfagate-passcode.lua');

/** What mfagate reads from Dovecot's policy requests; `passcode` only when app passcodes are on. */
export function policyAttributes(passcodes: boolean): string {
  const a = 'login=%{requested_username} remote=%{rip} real_remote=%{real_rip} local=%{lip} protocol=%s session_id=%{session} secured=%{secured} mech=%{mech}';
  return passcodes ? `${a} passcode=%{passdb:mfagate_passcode}` : a;
}

/**
 * Values that go into Dovecot's configuration unquoted: a space would split them, `$` and `%` would be
 * expanded, a quote or `#` would change the line. A key made with `openssl rand -hex 32` is fine.
 */
const PLAIN_VALUE = /^[A-Za-z0-9._~+/=:@-]*$/;

/** The URL Dovecot uses for the first TCP listener of [dovecot] listen (a wildcard address means loopback). */
function dovecotUrl(listen: readonly Endpoint[]): string {
  const tcp = listen.find((e): e is Extract<Endpoint, { kind: 'tcp' }> => e.kind === 'tcp');
  if (!tcp) throw new UsageError('setup dovecot: Dovecot 2.3 reaches mfagate over TCP only, and [dovecot] listen has no TCP listener (e.g. "127.0.0.1:8470")');
  const host = tcp.host === '0.0.0.0' || tcp.host === '' ? '127.0.0.1' : tcp.host === '::' ? '::1' : tcp.host;
  return `http://${host.includes(':') ? `[${host}]` : host}:${tcp.port}/`;
}

/** A nonce Dovecot requires with a policy URL (mfagate reads no password hash): stable for one API key. */
function hashNonce(apiKey: string): string {
  if (apiKey === '') return crypto.randomBytes(16).toString('hex');
  return crypto.createHmac('sha256', apiKey).update('mfagate auth_policy_hash_nonce').digest('hex').slice(0, 32);
}

function checkedKey(config: Config): string {
  const key = config.dovecot.apiKey;
  if (!PLAIN_VALUE.test(key)) {
    throw new UsageError('setup dovecot: [dovecot] api_key has characters Dovecot\'s configuration would change (spaces, $, %, quotes, #): make one with "openssl rand -hex 32"');
  }
  return key;
}

/** conf.d/95-mfagate.conf: the auth policy settings. */
export function dovecotPolicyConf(config: Config, source: string): string {
  const key = checkedKey(config);
  const passcodes = config.appPasscodes.enabled;
  return [
    `# /etc/dovecot/conf.d/95-mfagate.conf, made by "mfagate setup dovecot" from ${source}`,
    '# Dovecot 2.3. It holds mfagate\'s API key: install -o root -g dovecot -m 0640. Then: doveadm reload',
    `auth_policy_server_url = ${dovecotUrl(config.dovecot.listen)}`,
    ...(key === '' ? ['# [dovecot] api_key is empty: mfagate asks for no key, and Dovecot sends none'] : [`auth_policy_server_api_header = ${config.dovecot.apiHeader}: ${key}`]),
    '# Required by Dovecot with a policy URL; mfagate reads no password hash.',
    `auth_policy_hash_nonce = ${hashNonce(key)}`,
    ...(passcodes ? ['# passcode=: the app passcode a login was made with (the field of mfagate\'s Lua passdb, 05-mfagate-passcode.conf)'] : []),
    `auth_policy_request_attributes = ${policyAttributes(passcodes)}`,
    '# Asked after the password was right (a wrong one costs mfagate nothing), reported after every attempt,',
    '# and a login fails when mfagate cannot be asked.',
    'auth_policy_check_before_auth = no',
    'auth_policy_check_after_auth = yes',
    'auth_policy_report_after_auth = yes',
    'auth_policy_reject_on_fail = yes',
    '',
  ].join('\n');
}

/** conf.d/05-mfagate-passcode.conf: the Lua passdb, which must come before the site's passdb. */
export function dovecotPasscodeConf(config: Config, source: string, script: string): string {
  if (!config.appPasscodes.enabled) throw new UsageError('setup dovecot --part passdb: app passcodes are off ([app_passcodes] enabled = false)');
  const key = checkedKey(config);
  const url = `${dovecotUrl(config.dovecot.listen)}?command=passcode`;
  if (!path.isAbsolute(script)) throw new UsageError(`setup dovecot: --script must be an absolute path, got ${JSON.stringify(script)}`);
  if (!PLAIN_VALUE.test(script)) throw new UsageError(`setup dovecot: the script's path has characters Dovecot's configuration would change: ${JSON.stringify(script)}`);
  return [
    `# /etc/dovecot/conf.d/05-mfagate-passcode.conf, made by "mfagate setup dovecot --part passdb" from ${source}`,
    '# Dovecot 2.3 with Debian\'s dovecot-auth-lua. It holds mfagate\'s API key: install -o root -g dovecot -m 0640.',
    '# App passcodes: this passdb must come FIRST, before the site\'s own (conf.d/10-auth.conf and the files it',
    '# includes), which stays as it is. Only passwords that look like a passcode are sent to mfagate; a right',
    '# passcode ends the chain, anything else goes on to the site\'s passdb.',
    `import_environment = $import_environment MFAGATE_PASSCODE_URL=${url} MFAGATE_API_HEADER=${config.dovecot.apiHeader} MFAGATE_API_KEY=${key}`,
    'passdb {',
    '  driver = lua',
    // blocking=yes: the script waits for mfagate's answer in an auth worker, never in the auth process.
    // No cache_key: an empty one crashes Dovecot 2.3.19's auth process, and a cached passcode would outlive
    // its revocation.
    `  args = file=${script} blocking=yes`,
    '  mechanisms = plain login',
    '  result_success = return-ok',
    '  result_failure = continue',
    '  result_internalfail = continue',
    '}',
    '',
  ].join('\n');
}

/** The queue directory smtpd is chrooted in on Debian; unix: names in main.cf are relative to it. */
const QUEUE_DIRECTORY = '/var/spool/postfix';

function postfixService(listen: readonly Endpoint[], queueDirectory: string): { name: string; note?: string } {
  const e = listen[0];
  if (!e) throw new UsageError('setup postfix: [postfix] listen has no listener');
  if (e.kind === 'tcp') return { name: `inet:${e.host.includes(':') ? `[${e.host}]` : e.host}:${e.port}` };
  const rel = path.relative(queueDirectory, e.path);
  if (!rel.startsWith('..') && !path.isAbsolute(rel)) return { name: `unix:${rel}` };
  return {
    name: `unix:${e.path}`,
    note: `# ${e.path} is outside ${queueDirectory}: a chrooted smtpd cannot reach it (see docs/deployment.md, "The Postfix socket")`,
  };
}

export function postfixMainCf(config: Config, source: string, queueDirectory = QUEUE_DIRECTORY): string {
  const service = postfixService(config.postfix.listen, queueDirectory);
  return [
    `# main.cf, made by "mfagate setup postfix" from ${source}: append to /etc/postfix/main.cf, then postfix reload`,
    '# SMTP AUTH through Dovecot: Dovecot\'s MFA check (and app passcodes) cover submission too.',
    'smtpd_sasl_type = dovecot',
    'smtpd_sasl_path = private/auth',
    ...(service.note ? [service.note] : []),
    '# mfagate is asked at RCPT TO, before permit_sasl_authenticated; when it does not answer, mail waits (451).',
    `mfagate_submission_restrictions = check_policy_service { ${service.name}, timeout=5s, { default_action = 451 4.7.1 MFA service unavailable } }, permit_sasl_authenticated, reject`,
    '',
  ].join('\n');
}

export function postfixMasterCf(source: string): string {
  return [
    `# master.cf, made by "mfagate setup postfix" from ${source}: the -o lines go into /etc/postfix/master.cf's`,
    '# submission (587) service, and into submissions (465) if it is on. Then postfix reload.',
    'submission inet n       -       y       -       -       smtpd',
    '  -o syslog_name=postfix/submission',
    '  -o smtpd_tls_security_level=encrypt',
    '  -o smtpd_sasl_auth_enable=yes',
    '  -o smtpd_tls_auth_only=yes',
    '  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject',
    '  -o smtpd_recipient_restrictions=$mfagate_submission_restrictions',
    '',
  ].join('\n');
}

export function setupCommands(program: Command): void {
  const setup = program.command('setup').description("print the configuration Dovecot and Postfix need for this mfagate configuration");
  setup
    .command('dovecot')
    .description('print Dovecot 2.3\'s settings: conf.d/95-mfagate.conf (the auth policy), or with app passcodes on, --part passdb for conf.d/05-mfagate-passcode.conf')
    .option('--part <part>', '"policy" (95-mfagate.conf) or "passdb" (05-mfagate-passcode.conf: the Lua passdb for app passcodes)', 'policy')
    .option('--script <path>', 'where the Lua passdb script is installed', PASSCODE_SCRIPT)
    .action((o: { part: string; script: string }, cmd: Command) => {
      const config = configOf(cmd);
      const source = config.file ?? 'the built-in defaults';
      if (o.part === 'policy') {
        out(dovecotPolicyConf(config, source));
        if (config.appPasscodes.enabled) {
          process.stderr.write('mfagate: app passcodes are on: Dovecot also needs the Lua passdb, first in the chain:\n  mfagate setup dovecot --part passdb > /etc/dovecot/conf.d/05-mfagate-passcode.conf\n');
        }
      } else if (o.part === 'passdb') {
        if (!fs.existsSync(o.script)) process.stderr.write(`mfagate: warning: ${o.script} does not exist here: Dovecot will fail to start without it\n`);
        out(dovecotPasscodeConf(config, source, o.script));
      } else {
        throw new UsageError(`setup dovecot: --part must be "policy" or "passdb", got ${JSON.stringify(o.part)}`);
      }
      if (config.dovecot.apiKey === '') process.stderr.write('mfagate: warning: [dovecot] api_key is empty: any local process can ask mfagate as Dovecot does\n');
    });
  setup
    .command('postfix')
    .description("print Postfix's main.cf and master.cf lines for the MFA check on submission")
    .option('--part <part>', '"main.cf", "master.cf" or "all"', 'all')
    .option('--queue-directory <dir>', "Postfix's queue_directory, where smtpd is chrooted", QUEUE_DIRECTORY)
    .action((o: { part: string; queueDirectory: string }, cmd: Command) => {
      const config = configOf(cmd);
      const source = config.file ?? 'the built-in defaults';
      if (!['main.cf', 'master.cf', 'all'].includes(o.part)) throw new UsageError(`setup postfix: --part must be "main.cf", "master.cf" or "all", got ${JSON.stringify(o.part)}`);
      if (!path.isAbsolute(o.queueDirectory)) throw new UsageError('setup postfix: --queue-directory must be an absolute path');
      const parts: string[] = [];
      if (o.part !== 'master.cf') parts.push(postfixMainCf(config, source, o.queueDirectory));
      if (o.part !== 'main.cf') parts.push(postfixMasterCf(source));
      out(parts.join('\n'));
    });
}
