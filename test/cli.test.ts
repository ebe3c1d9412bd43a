// The CLI run as a process, as an operator would: tables, --json, exit codes, clear errors.
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { SCHEMA_VERSION } from '../store/migrations.js';
import { cli, tempDir } from './helpers/daemon.js';

const dir = tempDir('mfagate-cli-');
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
const configFile = path.join(dir, 'mfagate.toml');
fs.writeFileSync(
  configFile,
  `[store]
path = "state/mfagate.db"
[networks]
trusted = ["10.0.0.0/8"]
untrusted = ["10.20.0.0/16"]
[users]
strip_realms = ["example.ac.jp"]
[enforcement]
exempt_users = ["svc-backup"]
`,
);
const run = (...args: string[]) => cli(['--config', configFile, ...args]);
const j = <T>(r: { stdout: string }): T => JSON.parse(r.stdout) as T;

t.test('no store yet: every command says so and creates none; db migrate creates it', async (t) => {
  const store = path.join(dir, 'state/mfagate.db');
  for (const args of [['grants', 'list'], ['grants', 'revoke', '--user', 'alice'], ['users', 'enable', 'alice'], ['stats']]) {
    const r = run(...args);
    t.equal(r.code, 1, `${args.join(' ')}: exit 1`);
    t.match(r.stderr, /no store at \S+state\/mfagate\.db\..*create it with "mfagate db migrate"/, `${args.join(' ')}: says what is wrong`);
  }
  const c = run('check', '--user', 'alice', '--ip', '203.0.113.7');
  t.equal(c.code, 2, 'check: an error (2), not a refusal (1)');
  t.notOk(fs.existsSync(store), 'no empty store was created');
  const m = run('db', 'migrate');
  t.equal(m.code, 0, m.stderr);
  t.match(m.stdout, new RegExp(`mfagate\\.db: created, schema version ${SCHEMA_VERSION}`));
  t.equal(fs.statSync(store).mode & 0o777, 0o600, 'the store is for the daemon\'s user only');
});

t.test('a fresh store: empty listings', async (t) => {
  const r = run('grants', 'list');
  t.equal(r.code, 0, r.stderr);
  t.match(r.stdout, /no active grants/);
  t.same(j(run('grants', 'list', '--json')), []);
  t.match(run('users', 'list').stdout, /no users yet/);
  t.ok(fs.existsSync(path.join(dir, 'state/mfagate.db')), 'the store is relative to the config file');
});

t.test('users enable / show / check / grants add / revoke, the helpdesk path', async (t) => {
  t.match(run('users', 'enable', 'Alice@example.ac.jp').stdout, /alice: MFA enabled/);
  t.match(run('users', 'enable', 'alice').stdout, /alice: already MFA enabled/);

  let c = run('check', '--user', 'alice', '--ip', '203.0.113.7');
  t.equal(c.code, 1, 'refused: exit 1');
  t.match(c.stdout, /REFUSE\s+alice from 203\.0\.113\.7 \(imap\)/);
  t.match(c.stdout, /rule: no-grant/);
  t.match(c.stdout, /the mail program is told: \[AUTHENTICATIONFAILED\]/);

  const add = run('grants', 'add', '--user', 'ALICE', '--ip', '203.0.113.7', '--ttl', '2h', '--reason', 'ticket 42');
  t.equal(add.code, 0, add.stderr);
  t.match(add.stdout, /added grant (\d+): alice from 203\.0\.113\.7 until .* \(2h\)/);
  const again = run('grants', 'add', '--user', 'alice', '--ip', '203.0.113.7', '--json');
  t.match(j(again), { extended: true, user: 'alice', block: '203.0.113.7', state: 'active', method: 'helpdesk' }, 'adding again extends the grant');

  c = run('check', '--user', 'alice', '--ip', '203.0.113.7', '--protocol', 'smtp', '--json');
  t.equal(c.code, 0, 'allowed: exit 0');
  t.match(j(c), { result: 'allow', rule: 'grant', block: '203.0.113.7', protocol: 'smtp' });
  t.equal(run('check', '--user', 'alice', '--ip', '203.0.113.8').code, 1, 'another address is not covered');
  t.equal(run('check', '--user', 'alice', '--ip', '10.1.1.1').code, 0, 'campus is trusted');
  const edu = run('check', '--user', 'alice', '--ip', '10.20.1.1');
  t.equal(edu.code, 1, 'eduroam needs MFA');
  t.match(edu.stdout, /untrusted range/);
  t.equal(run('check', '--user', 'bob', '--ip', '203.0.113.7').code, 0, 'bob has no MFA');

  const v6 = run('grants', 'add', '--user', 'alice', '--ip', '2001:db8:1:2::77');
  t.match(v6.stdout, /2001:db8:1:2::\/64/);
  t.equal(run('check', '--user', 'alice', '--ip', '2001:db8:1:2:abcd::1').code, 0, 'the /64 is covered');

  const list = j<{ id: number; block: string }[]>(run('grants', 'list', '--user', 'alice', '--json'));
  t.equal(list.length, 2);
  const table = run('grants', 'list').stdout;
  t.match(table, /^ID\s+USER\s+BLOCK\s+STATE\s+CREATED\s+EXPIRES\s+METHOD\s+SOURCE/);
  t.match(run('grants', 'list', '--ip', '2001:db8:1:2::1', '--json').stdout, /2001:db8:1:2::\/64/, '--ip finds the block');

  const show = run('users', 'show', 'alice');
  t.equal(show.code, 0);
  t.match(show.stdout, /MFA:\s+enabled/);
  t.match(show.stdout, /active grants:/);
  t.match(show.stdout, /grant-add/);
  t.match(show.stdout, /ticket 42/);

  const rv = run('grants', 'revoke', '--user', 'alice', '--ip', '203.0.113.7', '--reason', 'password changed');
  t.equal(rv.code, 0, rv.stderr);
  t.match(rv.stdout, /revoked 1 grant/);
  t.equal(run('check', '--user', 'alice', '--ip', '203.0.113.7').code, 1, 'refused right after the revoke');
  const all = j<{ state: string; revoke_reason: string | null }[]>(run('grants', 'list', '--all', '--user', 'alice', '--json'));
  t.ok(all.some((g) => g.state === 'revoked' && g.revoke_reason === 'password changed'), '--all shows the revoked grant and why');
  t.match(run('grants', 'revoke', '--id', '999999').stdout, /nothing revoked/);
  const byId = list.find((g) => g.block.includes(':'));
  t.match(run('grants', 'revoke', '--id', String(byId?.id)).stdout, /revoked 1 grant/);
});

t.test('exempt, disable, stats', async (t) => {
  t.match(run('users', 'exempt', 'svc-mailer', '--reason', 'printer').stdout, /exempt from MFA/);
  t.equal(run('check', '--user', 'svc-mailer', '--ip', '203.0.113.1').code, 0);
  t.match(run('users', 'unexempt', 'svc-mailer').stdout, /no longer exempt/);
  t.match(run('users', 'disable', 'alice').stdout, /MFA disabled/);
  t.equal(run('check', '--user', 'alice', '--ip', '203.0.113.7').code, 0, 'disabled: allowed');
  const users = j<{ user: string }[]>(run('users', 'list', '--json'));
  t.same(users.map((u) => u.user).sort(), ['alice', 'svc-mailer']);
  const stats = j<{ users: number; mfa_enabled: number; daemon: unknown }>(run('stats', '--json'));
  t.match(stats, { users: 2, mfa_enabled: 0, daemon: null });
  t.match(run('stats').stdout, /daemon:\s+never started/);
});

t.test('errors: clear, on stderr, non-zero, no stack traces', async (t) => {
  const cases: [string[], number, RegExp][] = [
    [['users', 'show', 'nobody'], 1, /unknown user "nobody"/],
    [['users', 'disable', 'nobody'], 1, /unknown user "nobody"/],
    [['grants', 'add', '--user', 'alice', '--ip', '300.1.1.1'], 2, /not an IP address: "300\.1\.1\.1"/],
    [['grants', 'add', '--user', 'alice', '--ip', '1.2.3.4', '--ttl', 'forever'], 2, /--ttl: expected a duration/],
    [['grants', 'add', '--user', 'alice'], 2, /required option '--ip <ip>'/],
    [['grants', 'revoke'], 2, /give --id ID, or --user U/],
    [['grants', 'revoke', '--id', 'abc'], 2, /--id: expected a grant number/],
    [['grants', 'revoke', '--id', '1', '--user', 'x'], 2, /cannot be combined/],
    [['check', '--user', 'alice'], 2, /required option '--ip <ip>'/],
    [['check', '--user', 'alice', '--ip', 'x'], 2, /not an IP address/],
    [['check', '--user', 'alice', '--ip', '1.2.3.4', '--protocol', 'im ap'], 2, /not a protocol name/],
    [['frobnicate'], 2, /unknown command 'frobnicate'/],
  ];
  for (const [args, code, re] of cases) {
    const r = run(...args);
    t.equal(r.code, code, args.join(' '));
    t.match(r.stderr, re, args.join(' '));
    t.notMatch(r.stderr, /\n\s+at /, 'no stack trace');
  }
});

t.test('config check and db migrate', async (t) => {
  const ok = run('config', 'check');
  t.equal(ok.code, 0);
  t.match(ok.stdout, /mfagate\.toml: OK/);
  t.match(ok.stdout, /networks:\s+1 trusted, 1 untrusted/);
  t.match(ok.stdout, /webmail API:\s+unix:\S+\/var\/api\.sock \(mode 0660\)\n/);
  t.match(ok.stdout, /second factors:\s+app issuer "mfagate"; mailed codes 6 digits, valid 10m\n/);
  const bad = path.join(dir, 'bad.toml');
  fs.writeFileSync(bad, '[grants]\nttl = "a while"\n[dovecot]\nlisten = ["nowhere"]\n');
  const r = cli(['--config', bad, 'config', 'check']);
  t.equal(r.code, 2);
  t.match(r.stderr, /bad\.toml/);
  t.match(r.stderr, /grants\.ttl: expected a duration/);
  t.match(r.stderr, /dovecot\.listen\.0: expected "host:port"/);
  t.equal(cli(['--config', bad, 'check', '--user', 'a', '--ip', '1.2.3.4']).code, 2, 'check exits 2 on a config error');
  t.equal(cli(['--config', path.join(dir, 'missing.toml'), 'grants', 'list']).code, 2);
  const env = cli(['config', 'check'], { env: { MFAGATE_CONFIG: configFile }, cwd: dir });
  t.match(env.stdout, new RegExp(`${configFile.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: OK`), '$MFAGATE_CONFIG is used');
  const m = run('db', 'migrate');
  t.equal(m.code, 0);
  t.match(m.stdout, new RegExp(`schema version ${SCHEMA_VERSION}, up to date`));
  const fresh = path.join(dir, 'fresh.toml');
  fs.writeFileSync(fresh, '[store]\npath = "fresh.db"\n');
  t.match(cli(['--config', fresh, 'db', 'migrate']).stdout, new RegExp(`created, schema version ${SCHEMA_VERSION}`));
});

t.test('a user exempt in the configuration is not required, whatever the store says', async (t) => {
  t.equal(run('users', 'enable', 'svc-backup').code, 0);
  const show = run('users', 'show', 'svc-backup');
  t.match(show.stdout, /MFA required:  no \(exempt in the configuration\)/);
  t.match(show.stdout, /authenticator: none\nexternal mail: none\nbackup codes:  none\nlock:          not locked\n/);
  t.match(j(run('users', 'show', 'svc-backup', '--json')), { mfa_enabled: true, exempt: false, exempt_in_config: true, mfa_required: false });
  t.match(run('users', 'list').stdout, /svc-backup\s+enabled\s+no\s+config\s/);
  t.equal(run('check', '--user', 'svc-backup', '--ip', '203.0.113.7').code, 0, 'as the decision says');
});

t.test('--help lists the commands and exits 0', async (t) => {
  const r = cli(['--help']);
  t.equal(r.code, 0);
  for (const c of ['serve', 'grants', 'users', 'totp', 'check', 'config', 'db', 'stats']) t.match(r.stdout, new RegExp(`\\b${c}\\b`));
});
