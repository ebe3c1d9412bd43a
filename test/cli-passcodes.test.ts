// The helpdesk's app passcode commands and `mfagate setup`, run as processes: passcodes add/list/revoke (the
// passcode printed once, checked by the daemon's own PasscodeService over the same store), users show, and what
// setup prints for Dovecot and Postfix from different configurations (and what it refuses).
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { loadConfig } from '../config/config.js';
import { createLogger } from '../daemon/log.js';
import { PasscodeService } from '../mfa/passcodes.js';
import { Store } from '../store/store.js';
import { ROOT, cli, tempDir } from './helpers/daemon.js';

const dir = tempDir('mfagate-cli-passcodes-');
const write = (name: string, text: string) => {
  fs.writeFileSync(path.join(dir, name), text);
  return path.join(dir, name);
};
const on = write('on.toml', '[store]\npath = "mfagate.db"\n[app_passcodes]\nenabled = true\nmax_per_user = 3\n[dovecot]\napi_key = "0123abcd"\n');
const off = write('off.toml', '[store]\npath = "mfagate.db"\n');
const run = (...args: string[]) => cli(['--config', on, ...args]);
if (run('db', 'migrate').code !== 0) throw new Error('db migrate failed');
const j = <T>(r: { code: number; stdout: string; stderr: string }): T => {
  try {
    return JSON.parse(r.stdout) as T;
  } catch {
    throw new Error(`expected JSON; exit ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  }
};

t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));

/** The daemon's check, over the store the CLI wrote. */
async function works(passcode: string, protocol = 'imap', user = 'alice'): Promise<boolean> {
  const store = Store.open(path.join(dir, 'mfagate.db'), { create: false });
  try {
    const config = loadConfig(on);
    const s = new PasscodeService({ store: store.records, config: () => config, logger: createLogger('error', { write: () => undefined }) });
    // As in the daemon: checks read the in-memory copy of the store.
    s.readFrom(store.liveCopy());
    return (await s.check({ user, passcode, ip: '203.0.113.5', protocol, isWebmail: () => false })).ok;
  } finally {
    store.close();
  }
}

t.test('passcodes add prints the passcode once; it works for what it was made for', async (t) => {
  const r = run('passcodes', 'add', '--user', 'Alice', '--name', 'iPhone');
  t.equal(r.code, 0, r.stderr);
  const passcode = /^ {4}([a-z]{4} [a-z]{4} [a-z]{4} [a-z]{4})$/m.exec(r.stdout)?.[1] ?? '';
  t.ok(passcode, 'printed in four groups');
  t.match(r.stdout, /^alice: app passcode \d+ "iPhone" made, for imap, pop3, smtp, sieve, until revoked/, 'the user name normalised; default protocols; no expiry');
  t.ok(await works(passcode), 'the daemon accepts it');
  t.notOk(fs.readFileSync(path.join(dir, 'mfagate.db')).includes(passcode.replace(/ /g, '')), 'not in the store');

  const limited = j<{ user: string; id: number; passcode: string; protocols: string[]; expires_at: string; created_by: string }>(
    run('passcodes', 'add', '--user', 'alice', '--name', 'Printer', '--protocols', 'SMTP', '--ttl', '30d', '--json'),
  );
  t.match(limited, { user: 'alice', protocols: ['smtp'], created_by: /^cli:/ });
  t.ok(Math.abs(Date.parse(limited.expires_at) - Date.now() - 30 * 86_400_000) < 60_000, 'expires in 30 days');
  t.ok(await works(limited.passcode, 'smtp'), 'for smtp');
  t.notOk(await works(limited.passcode, 'imap'), 'not for imap');
});

t.test('what passcodes add refuses', async (t) => {
  const cases: [string[], number, RegExp][] = [
    [['--name', 'x', '--protocols', 'imap,ftp'], 2, /--protocols: expected a comma-separated list of imap, pop3, smtp, sieve/],
    [['--name', 'x', '--protocols', ''], 2, /--protocols/],
    [['--name', 'x', '--ttl', 'soon'], 2, /--ttl: expected/],
    [['--name', ''], 2, /name: expected the device/],
    [['--name', 'x'.repeat(65)], 2, /name: expected the device/],
  ];
  for (const [args, code, message] of cases) {
    const r = run('passcodes', 'add', '--user', 'bob', ...args);
    t.equal(r.code, code, args.join(' '));
    t.match(r.stderr, message);
  }
  const disabled = cli(['--config', off, 'passcodes', 'add', '--user', 'bob', '--name', 'x']);
  t.equal(disabled.code, 1, 'passcodes off: exit 1');
  t.match(disabled.stderr, /app passcodes are not enabled/);
  for (const name of ['a', 'b']) t.equal(run('passcodes', 'add', '--user', 'carol', '--name', name).code, 0);
  t.equal(run('passcodes', 'add', '--user', 'carol', '--name', 'c').code, 0, 'the third (max_per_user = 3)');
  const fourth = run('passcodes', 'add', '--user', 'carol', '--name', 'd');
  t.equal(fourth.code, 1);
  t.match(fourth.stderr, /at most 3 app passcodes per user/);
});

t.test('check --passcode: the app-passcode rule, and why a passcode would not work', async (t) => {
  t.equal(run('users', 'enable', 'alice').code, 0);
  const [iphone, printer] = j<{ id: number; name: string }[]>(run('passcodes', 'list', '--user', 'alice', '--json'));
  const allowed = run('check', '--user', 'alice', '--ip', '203.0.113.9', '--passcode', String(iphone?.id));
  t.equal(allowed.code, 0, allowed.stderr);
  t.match(allowed.stdout, /^ALLOW {2}alice from 203\.0\.113\.9 \(imap\) with app passcode \d+\nrule: app-passcode: /);
  t.equal(run('check', '--user', 'alice', '--ip', '203.0.113.9').code, 1, 'the password alone: refused');
  const notFor = j<{ rule: string; passcode_problem: string }>(run('check', '--user', 'alice', '--ip', '203.0.113.9', '--passcode', String(printer?.id), '--json'));
  t.match(notFor, { rule: 'no-grant', passcode_problem: /is not for imap \(it is for smtp\)/ }, 'a passcode not for the protocol');
  t.match(j(run('check', '--user', 'bob', '--ip', '203.0.113.9', '--passcode', String(iphone?.id), '--json')), { passcode_problem: /bob has no app passcode/ }, "another user's");
  t.equal(run('check', '--user', 'alice', '--ip', '203.0.113.9', '--passcode', 'x').code, 2);
});

t.test('list, revoke, users show', async (t) => {
  const all = j<{ user: string; name: string }[]>(run('passcodes', 'list', '--json'));
  t.ok(all.some((p) => p.user === 'alice' && p.name === 'iPhone') && all.some((p) => p.user === 'carol'), 'everybody\'s');
  const table = run('passcodes', 'list').stdout;
  t.match(table, /^USER\s+ID\s+NAME\s+PROTOCOLS\s+STATE\s+CREATED\s+EXPIRES\s+LAST USE\n/);
  t.notMatch(table, /[a-z]{4} [a-z]{4} [a-z]{4} [a-z]{4}/, 'no passcode in a listing');
  const alice = j<{ id: number; name: string; last_used_at: null }[]>(run('passcodes', 'list', '--user', 'alice', '--json'));
  t.same(alice.map((p) => p.name), ['iPhone', 'Printer']);
  t.match(run('users', 'show', 'alice').stdout, /app passcodes:\nID\s+NAME.*\n\d+\s+iPhone\s+imap,pop3,smtp,sieve\s+working/);
  t.match(j<{ passcodes: unknown[] }>(run('users', 'show', 'alice', '--json')).passcodes, [{ name: 'iPhone' }, { name: 'Printer' }]);

  const id = alice[0]?.id ?? 0;
  t.equal(run('passcodes', 'revoke', '--user', 'bob', '--id', String(id)).code, 1, "another user's passcode: not found");
  const r = run('passcodes', 'revoke', '--user', 'alice', '--id', String(id), '--reason', 'lost');
  t.equal(r.stdout, `alice: revoked 1 app passcode: ${id} "iPhone"\n`);
  t.equal(run('passcodes', 'revoke', '--user', 'alice', '--id', String(id)).code, 1, 'twice: not found');
  t.match(run('passcodes', 'list', '--user', 'alice', '--all').stdout, new RegExp(`${id}\\s+iPhone\\s+\\S+\\s+revoked`), '--all shows it revoked');
  t.match(run('users', 'show', 'alice').stdout, /passcode-revoke.*"reason":"lost"/, 'audited with the reason');
  for (const args of [[], ['--id', '1', '--all'], ['--id', 'one']]) t.equal(run('passcodes', 'revoke', '--user', 'alice', ...args).code, 2, `revoke ${args.join(' ')}: usage`);
  t.equal(run('passcodes', 'list', '--all').code, 2, '--all needs --user');
  const rest = j<{ name: string }[]>(run('passcodes', 'revoke', '--user', 'carol', '--all', '--json'));
  t.same(rest.map((p) => p.name), ['a', 'b', 'c']);
  t.equal(run('passcodes', 'list', '--user', 'carol').stdout, 'carol: no working app passcodes\n');
});

t.test('setup dovecot: the policy settings, and the passdb with the installed script', async (t) => {
  const policy = run('setup', 'dovecot');
  t.equal(policy.code, 0, policy.stderr);
  const settings = new Map(policy.stdout.split('\n').filter((l) => l && !l.startsWith('#')).map((l) => [l.split(' = ')[0], l.split(' = ').slice(1).join(' = ')]));
  t.same([...settings.keys()], [
    'auth_policy_server_url',
    'auth_policy_server_api_header',
    'auth_policy_hash_nonce',
    'auth_policy_request_attributes',
    'auth_policy_check_before_auth',
    'auth_policy_check_after_auth',
    'auth_policy_report_after_auth',
    'auth_policy_reject_on_fail',
  ]);
  t.equal(settings.get('auth_policy_server_url'), 'http://127.0.0.1:8470/', 'the default listener');
  t.equal(settings.get('auth_policy_server_api_header'), 'x-api-key: 0123abcd');
  t.match(settings.get('auth_policy_request_attributes'), / passcode=%\{passdb:mfagate_passcode\}$/);
  t.match(settings.get('auth_policy_hash_nonce'), /^[0-9a-f]{32}$/);
  t.equal(run('setup', 'dovecot').stdout, policy.stdout, 'the same output every time (the nonce comes from the key)');
  t.match(policy.stderr, /--part passdb > \/etc\/dovecot\/conf\.d\/05-mfagate-passcode\.conf/, 'and says the passdb goes first');

  const passdb = run('setup', 'dovecot', '--part', 'passdb');
  t.equal(passdb.code, 0, passdb.stderr);
  t.match(passdb.stdout, `args = file=${path.join(ROOT, 'dovecot/mfagate-passcode.lua')} blocking=yes`);
  t.match(passdb.stdout, /import_environment = \$import_environment MFAGATE_PASSCODE_URL=http:\/\/127\.0\.0\.1:8470\/\?command=passcode MFAGATE_API_HEADER=x-api-key MFAGATE_API_KEY=0123abcd\n/);
  t.match(passdb.stdout, /result_success = return-ok\n\s+result_failure = continue\n\s+result_internalfail = continue\n/);
  t.notMatch(passdb.stdout, /cache_key/, 'no auth cache key');
  const moved = run('setup', 'dovecot', '--part', 'passdb', '--script', '/usr/share/mfagate/mfagate-passcode.lua');
  t.match(moved.stdout, 'args = file=/usr/share/mfagate/mfagate-passcode.lua blocking=yes');
  t.match(moved.stderr, /does not exist here/, 'a script that is not there is warned about');

  const offPolicy = cli(['--config', off, 'setup', 'dovecot']);
  t.equal(offPolicy.code, 0);
  t.notMatch(offPolicy.stdout, /passcode=|passdb:/, 'passcodes off: no passcode attribute');
  t.notMatch(offPolicy.stdout, /api_header/, 'no key: no header');
  t.match(offPolicy.stderr, /api_key is empty/);
  t.equal(cli(['--config', off, 'setup', 'dovecot', '--part', 'passdb']).code, 2, 'passcodes off: no passdb to print');
});

t.test('setup dovecot refuses what Dovecot could not use', async (t) => {
  const cases: [string, RegExp][] = [
    ['[dovecot]\nlisten = ["unix:/run/mfagate/dovecot.sock"]\n', /Dovecot 2\.3 reaches mfagate over TCP only/],
    ['[dovecot]\napi_key = "two words"\n', /api_key has characters/],
    ['[dovecot]\napi_key = "pa$$word"\n', /api_key has characters/],
  ];
  for (const [toml, message] of cases) {
    const r = cli(['--config', write('bad.toml', toml), 'setup', 'dovecot']);
    t.equal(r.code, 2, toml.trim());
    t.match(r.stderr, message);
  }
  t.equal(run('setup', 'dovecot', '--part', 'both').code, 2);
  const wildcard = cli(['--config', write('wild.toml', '[dovecot]\nlisten = ["0.0.0.0:9000"]\n'), 'setup', 'dovecot']);
  t.match(wildcard.stdout, 'auth_policy_server_url = http://127.0.0.1:9000/', 'a wildcard listener is reached on loopback');
  const v6 = cli(['--config', write('v6.toml', '[dovecot]\nlisten = ["[::1]:9000"]\n'), 'setup', 'dovecot']);
  t.match(v6.stdout, 'auth_policy_server_url = http://[::1]:9000/');
});

t.test('setup postfix: main.cf and master.cf', async (t) => {
  const inQueue = cli(['--config', write('pf.toml', '[postfix]\nlisten = ["unix:/var/spool/postfix/mfagate/policy"]\n'), 'setup', 'postfix']);
  t.equal(inQueue.code, 0, inQueue.stderr);
  t.match(inQueue.stdout, /^mfagate_submission_restrictions = check_policy_service \{ unix:mfagate\/policy, timeout=5s, \{ default_action = 451 4\.7\.1 MFA service unavailable \} \}, permit_sasl_authenticated, reject$/m, 'relative to the queue directory');
  t.match(inQueue.stdout, /^smtpd_sasl_type = dovecot$/m);
  t.match(inQueue.stdout, /^ {2}-o smtpd_recipient_restrictions=\$mfagate_submission_restrictions$/m, 'master.cf');
  const main = cli(['--config', write('pf.toml', '[postfix]\nlisten = ["127.0.0.1:10040"]\n'), 'setup', 'postfix', '--part', 'main.cf']);
  t.match(main.stdout, 'check_policy_service { inet:127.0.0.1:10040,');
  t.notMatch(main.stdout, /master\.cf|-o /, 'main.cf only');
  const outside = cli(['--config', write('pf.toml', '[postfix]\nlisten = ["unix:/run/mfagate/policy"]\n'), 'setup', 'postfix']);
  t.match(outside.stdout, /# \/run\/mfagate\/policy is outside \/var\/spool\/postfix: a chrooted smtpd cannot reach it/);
  t.equal(run('setup', 'postfix', '--part', 'header').code, 2);
});
