// The helpdesk's second-factor commands, run as processes: totp enroll, users show/reset/revoke-all/unlock.
// The test opens the same store and key file with an MfaService, as the daemon would, to pass and fail codes.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { loadConfig } from '../config/config.js';
import { createLogger } from '../daemon/log.js';
import { createSecrets, loadOrCreateKey } from '../mfa/secrets.js';
import { MfaError, MfaService } from '../mfa/service.js';
import { codeAt } from '../mfa/totp.js';
import { Store } from '../store/store.js';
import { cli, tempDir } from './helpers/daemon.js';

const dir = tempDir('mfagate-cli-mfa-');
const configFile = path.join(dir, 'mfagate.toml');
const keyFile = path.join(dir, 'state/secret.key');
fs.writeFileSync(
  configFile,
  `[store]
path = "state/mfagate.db"
[secrets]
key_file = "state/secret.key"
[totp]
issuer = "Example Univ"
[lockout]
max_failures = 3
window = "15m"
duration = "15m"
`,
);
const run = (...args: string[]) => cli(['--config', configFile, ...args]);
// A new installation: the store is created on purpose (no command creates one by accident).
if (run('db', 'migrate').code !== 0) throw new Error('db migrate failed');
/** The command's JSON output; when it is not JSON, an error that shows how the command ended (to explain a flake). */
const j = <T>(r: { code: number; stdout: string; stderr: string }): T => {
  try {
    return JSON.parse(r.stdout) as T;
  } catch {
    throw new Error(`expected JSON on stdout; exit ${r.code} (-1: killed or timed out)\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  }
};
const IP = '203.0.113.7';

// The service is opened lazily, after the first command made the key file.
let service: MfaService | undefined;
let store: Store | undefined;
function svc(): MfaService {
  if (service) return service;
  const config = loadConfig(configFile);
  store = Store.open(config.store.path, { create: false });
  service = new MfaService({
    store: store.records,
    config: () => config,
    secrets: createSecrets(loadOrCreateKey(config.secrets.keyFile)),
    mailer: () => ({ send: async () => undefined, close: () => undefined }),
    logger: createLogger('error', { write: () => undefined }),
  });
  return service;
}
t.teardown(() => {
  store?.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

/** The base32 key from the otpauth:// URI the CLI printed. */
function secretOf(stdout: string): string {
  const uri = /otpauth:\/\/totp\/\S+/.exec(stdout)?.[0];
  if (!uri) throw new Error(`no otpauth URI in:\n${stdout}`);
  const secret = new URL(uri).searchParams.get('secret');
  if (!secret) throw new Error(`no secret in ${uri}`);
  return secret;
}

async function failure(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (e) {
    if (e instanceof MfaError) return e.code;
    throw e;
  }
  return 'passed';
}

const ESC = String.fromCharCode(27);

t.test('totp enroll: URI with the issuer, a terminal QR code, a key the service accepts', async (t) => {
  t.equal(run('users', 'enable', 'alice').code, 0);
  const r = run('totp', 'enroll', 'alice');
  t.equal(r.code, 0, r.stderr);
  t.equal(r.stderr, '', 'no warning for a first registration');
  t.match(r.stdout, /^alice: authenticator app registered\n/);
  t.match(r.stdout, /otpauth:\/\/totp\/Example%20Univ:alice\?secret=[A-Z2-7]{32}&issuer=Example%20Univ/, 'the configured issuer');
  const qrLines = r.stdout.split('\n').filter((l) => l.includes(`${ESC}[47m`) && /[█▀▄]/.test(l));
  t.ok(qrLines.length >= 15, `a QR block of ${qrLines.length} lines`);
  const secret = secretOf(r.stdout);
  t.match(r.stdout, new RegExp(`key: ${secret.replace(/(.{4})(?=.)/g, '$1 ')}\\n`), 'the key for typing in, in groups of four');
  t.ok(fs.existsSync(keyFile), 'the key file was created');
  t.equal(fs.statSync(keyFile).mode & 0o777, 0o600);

  const grant = await svc().verify('alice', IP, { method: 'totp', code: codeAt(secret, Date.now()) });
  t.match(grant, { block: IP, method: 'totp' }, 'a code from the printed key passes and creates a grant');
  t.equal(run('check', '--user', 'alice', '--ip', IP).code, 0, 'the grant lets mail programs in');

  const show = run('users', 'show', 'alice');
  t.equal(show.code, 0, show.stderr);
  t.match(show.stdout, /authenticator: registered \d{4}-\d\d-\d\d /);
  t.match(show.stdout, /external mail: none/);
  t.match(show.stdout, /backup codes:  none/);
  t.match(show.stdout, /lock:          not locked\n/);
  t.match(show.stdout, /totp-register/);
  const sj = j<Record<string, unknown>>(run('users', 'show', 'alice', '--json'));
  t.match(sj, {
    user: 'alice',
    mfa_enabled: true,
    mfa_required: true,
    factors: { totp: true, totp_since: /^\d{4}-/, email: null, email_pending: null, backup_codes_left: 0 },
    locked_until: null,
    recent_failures: 0,
    grants: [{ block: IP, method: 'totp', state: 'active' }],
  });
});

t.test('totp enroll again: warns, replaces the app; --json', async (t) => {
  const first = j<{ secret: string }>(run('totp', 'enroll', 'erin', '--json'));
  const r = run('totp', 'enroll', 'erin', '--json');
  t.equal(r.code, 0, r.stderr);
  t.match(r.stderr, /warning: this replaced the authenticator app erin registered .*: its codes no longer work/);
  const second = j<{ user: string; issuer: string; secret: string; uri: string; replaced: boolean; replaced_registered_at: string | null }>(r);
  t.match(second, { user: 'erin', issuer: 'Example Univ', replaced: true, replaced_registered_at: /^\d{4}-/ });
  t.equal(secretOf(second.uri), second.secret);
  t.not(second.secret, first.secret);
  t.equal(await failure(svc().verify('erin', IP, { method: 'totp', code: codeAt(first.secret, Date.now()) })), 'factor-failed', 'the old app fails');
  t.equal(await failure(svc().verify('erin', IP, { method: 'totp', code: codeAt(second.secret, Date.now()) })), 'passed', 'the new app passes');
});

t.test('a lock: users show shows it, users unlock ends it', async (t) => {
  const secret = secretOf(run('totp', 'enroll', 'bob').stdout);
  for (let i = 0; i < 3; i++) t.equal(await failure(svc().verify('bob', IP, { method: 'totp', code: 'wrong' })), 'factor-failed');
  t.equal(await failure(svc().verify('bob', IP, { method: 'totp', code: codeAt(secret, Date.now()) })), 'locked', 'the right code is refused while locked');

  const show = run('users', 'show', 'bob');
  t.match(show.stdout, /lock:\s+LOCKED until .* \(3 failed codes in the last 15m\); "mfagate users unlock bob" ends it/);
  t.match(j(run('users', 'show', 'bob', '--json')), { locked_until: /^\d{4}-/, recent_failures: 3 });

  const u = run('users', 'unlock', 'bob');
  t.equal(u.code, 0, u.stderr);
  t.match(u.stdout, /^bob: unlocked \(was locked until .*; 3 failed codes forgotten\)\n$/);
  t.match(run('users', 'show', 'bob').stdout, /lock:\s+not locked\n/);
  t.match(run('users', 'show', 'bob').stdout, /user-unlock/, 'audited');
  t.equal(await failure(svc().verify('bob', IP, { method: 'totp', code: codeAt(secret, Date.now()) })), 'passed', 'unlocked: the code passes');

  t.equal(await failure(svc().verify('bob', IP, { method: 'totp', code: 'wrong' })), 'factor-failed');
  t.match(run('users', 'show', 'bob').stdout, /lock:\s+not locked \(1 failed code in the last 15m; locks at 3\)/);
  t.same(j(run('users', 'unlock', 'bob', '--json')), { user: 'bob', was_locked: false, was_locked_until: null, failures_cleared: 1 });
  t.equal(run('users', 'unlock', 'bob').stdout, 'bob: was not locked\n');
});

t.test('users reset: factors, backup codes and grants go, MFA stays required, the reason is audited', async (t) => {
  // alice (enabled, app registered, a grant from the first test): add backup codes and a helpdesk grant.
  const secret = secretOf(run('totp', 'enroll', 'alice').stdout);
  await svc().verify('alice', IP, { method: 'totp', code: codeAt(secret, Date.now()) });
  const { codes } = await svc().backupGenerate('alice', IP, { method: 'totp', code: codeAt(secret, Date.now() + 30_000) });
  t.equal(codes.length, 10);
  t.equal(run('grants', 'add', '--user', 'alice', '--ip', '198.51.100.9').code, 0);
  t.match(run('users', 'show', 'alice').stdout, /backup codes:  10 left/);

  const r = run('users', 'reset', 'alice', '--reason', 'ticket 4711: lost phone');
  t.equal(r.code, 0, r.stderr);
  t.match(r.stdout, /^alice: second factors reset \(reason: ticket 4711: lost phone\)\n/);
  t.match(r.stdout, /removed:  authenticator app \(registered .*\), 10 backup codes\n/);
  t.match(r.stdout, /revoked:  2 grants; no app passcode\n/);
  t.match(r.stdout, /MFA stays required/);

  const after = j<Record<string, unknown>>(run('users', 'show', 'alice', '--json'));
  t.match(after, {
    mfa_enabled: true,
    mfa_required: true,
    factors: { totp: false, totp_since: null, email: null, backup_codes_left: 0 },
    grants: [],
    audit: [{ action: 'user-reset', actor: /^cli:/, detail: { reason: 'ticket 4711: lost phone', grants_revoked: 2 } }],
  });
  t.match(run('users', 'show', 'alice').stdout, /note: MFA is required but no second factor is registered/);
  t.equal(run('check', '--user', 'alice', '--ip', IP).code, 1, 'refused: the grant is gone and MFA is still required');
  t.equal(await failure(svc().verify('alice', IP, { method: 'backup', code: codes[0] ?? '' })), 'factor-failed', 'backup codes are gone');
  t.equal(await failure(svc().verify('alice', IP, { method: 'totp', code: codeAt(secret, Date.now() + 60_000) })), 'factor-failed', 'the app is gone');

  const again = j(run('users', 'reset', 'alice', '--reason', 'again', '--json'));
  t.same(again, {
    user: 'alice',
    reason: 'again',
    removed: { totp: false, totp_pending: false, email: null, email_pending: null, backup_codes: 0 },
    grants_revoked: 0,
    passcodes_revoked: 0,
    was_locked_until: null,
    mfa_enabled: true,
    mfa_required: true,
  });
  t.match(run('users', 'reset', 'alice', '--reason', 'x').stdout, /removed:  nothing \(no factor or backup code was registered\)\nrevoked:  no active grant; no app passcode\n/);
});

t.test('users revoke-all: every active grant, for a password change', async (t) => {
  t.equal(run('grants', 'add', '--user', 'carol', '--ip', IP).code, 0);
  t.equal(run('grants', 'add', '--user', 'carol', '--ip', '2001:db8:1:2::5').code, 0);
  t.equal(run('grants', 'add', '--user', 'dave', '--ip', IP).code, 0);
  const r = run('users', 'revoke-all', 'carol', '--reason', 'password changed');
  t.equal(r.code, 0, r.stderr);
  t.match(r.stdout, /^carol: revoked 2 grants:\nID\s+USER\s+BLOCK\s+STATE/);
  t.same(j(run('grants', 'list', '--user', 'carol', '--json')), []);
  const all = j<{ revoke_reason: string }[]>(run('grants', 'list', '--user', 'carol', '--all', '--json'));
  t.ok(all.length === 2 && all.every((g) => g.revoke_reason === 'password changed'), 'the reason is kept');
  t.equal(j<unknown[]>(run('grants', 'list', '--user', 'dave', '--json')).length, 1, "another user's grant stays");
  t.equal(run('users', 'revoke-all', 'carol').stdout, 'carol: no active grant or app passcode: nothing revoked\n');
  t.same(j(run('users', 'revoke-all', 'carol', '--json')), { user: 'carol', grants: [], passcodes: [] });
  const dave = j<{ grants: { user: string; state: string }[] }>(run('users', 'revoke-all', 'dave', '--json'));
  t.match(dave.grants, [{ user: 'dave', state: 'revoked' }]);
});

t.test('the key file: only loaded when needed, never replaced behind the store', async (t) => {
  const other = path.join(dir, 'other.toml');
  const otherKey = path.join(dir, 'elsewhere/secret.key');
  fs.writeFileSync(other, `[store]\npath = "state/mfagate.db"\n[secrets]\nkey_file = "elsewhere/secret.key"\n`);
  const o = (...args: string[]) => cli(['--config', other, ...args]);
  t.equal(o('users', 'unlock', 'bob').code, 0, 'unlock needs no key');
  t.equal(o('users', 'reset', 'erin', '--reason', 'test').code, 0, 'reset needs no key');
  t.notOk(fs.existsSync(otherKey), 'and creates none');

  const missing = o('totp', 'enroll', 'frank');
  t.equal(missing.code, 1);
  t.match(missing.stderr, /elsewhere\/secret\.key \(\[secrets\] key_file\) does not exist, but the store holds app registrations.*Refusing to create a new key/);
  t.notOk(fs.existsSync(otherKey), 'no new key next to a store that has secrets');

  fs.mkdirSync(path.dirname(otherKey), { recursive: true });
  fs.writeFileSync(otherKey, crypto.randomBytes(32).toString('base64') + '\n', { mode: 0o600 });
  const wrong = o('totp', 'enroll', 'frank');
  t.equal(wrong.code, 1);
  t.match(wrong.stderr, /does not open the app registrations in the store/);
  t.notMatch(wrong.stderr, /\n\s+at /, 'no stack trace');
  t.match(j(run('users', 'show', 'bob', '--json')), { factors: { totp: true } }, 'nothing changed');
  t.equal(run('users', 'show', 'frank').code, 1, 'frank was not created');
});

t.test('errors: clear, on stderr, non-zero, no stack traces', async (t) => {
  t.equal(run('grants', 'add', '--user', 'alice', '--ip', '192.0.2.1').code, 0);
  const cases: [string[], number, RegExp][] = [
    [['users', 'show', 'nobody'], 1, /unknown user "nobody"/],
    [['users', 'reset', 'nobody', '--reason', 'x'], 1, /unknown user "nobody"/],
    [['users', 'revoke-all', 'nobody'], 1, /unknown user "nobody"/],
    [['users', 'unlock', 'nobody'], 1, /unknown user "nobody"/],
    [['users', 'reset', 'alice'], 2, /required option '--reason <text>' not specified/],
    [['users', 'reset', 'alice', '--reason', '  '], 2, /--reason must say why/],
    [['users', 'unlock'], 2, /missing required argument 'user'/],
    [['totp', 'enroll'], 2, /missing required argument 'user'/],
    [['totp', 'enroll', 'a\u0001b'], 2, /not a user name/],
  ];
  for (const [args, code, re] of cases) {
    const r = run(...args);
    t.equal(r.code, code, args.join(' '));
    t.match(r.stderr, re, args.join(' '));
    t.notMatch(r.stderr, /\n\s+at /, 'no stack trace');
  }
  t.match(j(run('grants', 'list', '--user', 'alice', '--json')), [{ block: '192.0.2.1', state: 'active' }], 'a refused reset changed nothing');
});
