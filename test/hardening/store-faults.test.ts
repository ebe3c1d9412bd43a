// The store under the running daemon going wrong, for real (issue 8, items 3 and 4, and the file modes):
//   - a store that cannot be written at start (an immutable file, a full file system, a read-only mount): the
//     daemon used to print an error but stay up half-started (answering, no timers, killed by the next SIGHUP);
//     now it exits non-zero with the reason, and closes what it had bound;
//   - the store deleted or replaced under the running daemon: it kept deciding from the deleted file while the
//     CLI made a new empty one (so a revoke did nothing); now the daemon notices within a second, says so, and
//     writes the store back from its open copy (a replacing file is moved aside);
//   - a missing store (a wrong [store] path, a state disk not mounted): the daemon and the CLI used to create a
//     new empty one, and users who had enabled MFA got in without it; now both refuse and say what to do.
// The file systems are real tmpfs mounts made by the test (it runs as root, as the mail stack tests do).
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import t, { type Test } from 'tap';
import { cli, mergeSections, spawnDaemon, tempDir } from '../helpers/daemon.js';
import { freePort } from '../helpers/mailstack.js';
import { type Served, askPolicy, loginBody, serve } from '../helpers/served.js';

const OUTSIDE = '198.51.100.7';

if (process.getuid?.() !== 0) throw new Error('store-faults.test.ts mounts tmpfs file systems: run the suite as root (CI does)');

function sh(cmd: string, ...args: string[]): void {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: exit ${r.status}: ${r.stderr}`);
}

/** A fresh tmpfs of `size` mounted on a new dir; unmounted when the test ends. */
function tmpfs(t: Test, size: string): string {
  const dir = tempDir('mfagate-tmpfs-');
  sh('mount', '-t', 'tmpfs', '-o', `size=${size},mode=0755`, 'tmpfs', dir);
  t.teardown(() => {
    spawnSync('chattr', ['-R', '-i', dir]);
    spawnSync('umount', ['-l', dir]);
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return dir;
}

/** A config in `dir` whose store and key are under `dir/state`; the sockets are elsewhere. Returns the file. */
async function configIn(t: Test, dir: string): Promise<string> {
  const file = path.join(dir, 'mfagate.toml');
  const port = await freePort();
  const sockets = tempDir('mfagate-sockets-');
  t.teardown(() => fs.rmSync(sockets, { recursive: true, force: true }));
  fs.writeFileSync(
    file,
    mergeSections(
      `[store]\npath = "state/mfagate.db"\n[secrets]\nkey_file = "state/secret.key"\n[dovecot]\nlisten = ["127.0.0.1:${port}"]\n` +
        `[postfix]\nlisten = ["unix:${path.join(sockets, 'policy.sock')}"]\n[api]\nlisten = ["unix:${path.join(sockets, 'api.sock')}"]\n[web]\nlisten = []\n`,
    ),
  );
  return file;
}

/** `serve` on the config: resolves with how it ended if it exits within `ms`, else stops it and says so. */
async function startAndWait(configFile: string, ms = 10_000): Promise<{ exited: boolean; code: number | null; output: string }> {
  const d = spawnDaemon(configFile);
  const exited = await Promise.race([
    new Promise<boolean>((r) => d.child.once('exit', () => r(true))),
    new Promise<boolean>((r) => setTimeout(() => r(false), ms)),
  ]);
  if (!exited) await d.stop('SIGKILL');
  return { exited, code: d.child.exitCode, output: d.output() };
}

const portOf = (configFile: string) => Number(/127\.0\.0\.1:(\d+)/.exec(fs.readFileSync(configFile, 'utf8'))?.[1]);
const refused = (port: number) =>
  new Promise<boolean>((resolve) => {
    const c = net.connect(port, '127.0.0.1');
    c.once('connect', () => {
      c.destroy();
      resolve(false);
    });
    c.once('error', () => resolve(true));
  });
const cliIn = (configFile: string, ...args: string[]) => cli(['--config', configFile, ...args]);

t.test('a store that cannot be written at start: the daemon exits with the reason, leaving nothing bound', async (t) => {
  const cases: [string, (dir: string, store: string) => void, RegExp][] = [
    ['an immutable store file', (_dir, store) => sh('chattr', '+i', store), /cannot be written \(attempt to write a readonly database\)/],
    [
      // After a crash (the -wal and -shm are still there, so the store opens), the disk filled up.
      'a full file system',
      (dir) => {
        const r = spawnSync('dd', ['if=/dev/zero', `of=${path.join(dir, 'filler')}`, 'bs=4k'], { encoding: 'utf8' });
        if (!/No space left on device/.test(r.stderr)) throw new Error(`expected dd to fill the disk: ${r.stderr}`);
      },
      /cannot be written \(database or disk is full\)/,
    ],
    ['a read-only mount', (dir) => sh('mount', '-o', 'remount,ro', dir), /cannot (open|be written)/],
  ];
  for (const [what, breakIt, reason] of cases) {
    const dir = tmpfs(t, '2m');
    const configFile = await configIn(t, dir);
    const store = path.join(dir, 'state/mfagate.db');
    t.equal(cliIn(configFile, 'db', 'migrate').code, 0, `${what}: the store exists`);
    t.equal(cliIn(configFile, 'users', 'enable', 'alice').code, 0);
    const crashed = spawnDaemon(configFile);
    await crashed.ready;
    await crashed.stop('SIGKILL');
    breakIt(dir, store);
    const r = await startAndWait(configFile);
    t.ok(r.exited, `${what}: the daemon exits instead of staying up half-started`, { output: r.output.slice(-2000) });
    t.not(r.code, 0, `${what}: with a non-zero status (systemd sees the failure)`);
    t.match(r.output, /mfagate: cannot start: /, `${what}: it says it did not start`);
    t.match(r.output, store, `${what}: naming the store`);
    t.match(r.output, reason, `${what}: and why`);
    t.notMatch(r.output, /mfagate: listening|"event":"started"/, `${what}: it never claimed to be running`);
    t.ok(await refused(portOf(configFile)), `${what}: nothing listens on the Dovecot port`);
  }
});

t.test('a writable store: the daemon starts completely, runs its timers and reloads on SIGHUP', async (t) => {
  const d = await serve();
  t.teardown(() => d.close());
  await d.waitForLog((l) => l['event'] === 'started');
  d.daemon.child.kill('SIGHUP');
  await d.waitForLog((l) => l['event'] === 'reloaded');
  t.equal(d.daemon.child.exitCode, null, 'still running after SIGHUP');
  const stats = () => (JSON.parse(d.cli('stats', '--json').stdout) as { daemon: { pid: number; running: boolean } | null }).daemon;
  t.match(stats(), { running: true, pid: d.daemon.child.pid }, 'its stats reach the store');
  for (const deadline = Date.now() + 8000; Date.now() < deadline && !(stats() as { copy?: unknown } | null)?.copy; ) await new Promise((r) => setTimeout(r, 200));
  t.match(stats(), { copy: { backend: 'sqlite', users_with_a_flag: 0, grants: 0, error: null, age_ms: Number } }, 'with the copy it decides from, and how current it is');
  t.ok(((stats() as { copy?: { age_ms?: number } } | null)?.copy?.age_ms ?? Infinity) < 1000, 'current when it last reported');
  t.match(d.cli('stats').stdout, /decides from:\s+a copy in memory of the sqlite store \(0 users with MFA or exempt, 0 grants\), current as of /);
  // A second copy started by mistake fails on the ports the first one holds, and leaves the first alone.
  const second = await startAndWait(d.configFile);
  t.ok(second.exited && second.code !== 0, 'a second copy exits', { output: second.output.slice(-1000) });
  t.match(second.output, /mfagate: cannot start: cannot listen on 127\.0\.0\.1:\d+/, 'saying why');
  t.match(stats(), { running: true, pid: d.daemon.child.pid }, "the running daemon's stats are untouched");
});

let d: Served;
const decide = async (login = 'alice', ip = OUTSIDE) => (await askPolicy(d.dovecotPort, loginBody(login, ip))).allow;
const storeFile = () => path.join(d.dir, 'state/mfagate.db');

t.test('the store deleted under the running daemon is written back; the CLI and the daemon see the same grants', async (t) => {
  d = await serve();
  t.equal(d.cli('users', 'enable', 'alice').code, 0);
  t.equal(d.cli('grants', 'add', '--user', 'alice', '--ip', OUTSIDE).code, 0);
  t.equal(await decide(), true, 'alice has a grant from outside');
  for (const f of ['', '-wal', '-shm']) fs.rmSync(storeFile() + f, { force: true });

  const restored = await d.waitForLog((l) => l['event'] === 'store-restored', 5000);
  t.match(restored, { level: 'error', was: 'missing', users: 1, active_grants: 1 }, 'the daemon says so, loudly, with what it kept');
  t.ok(fs.existsSync(storeFile()), 'the file is back');
  t.equal(fs.statSync(storeFile()).mode & 0o777, 0o600, 'mode 0600');
  const show = JSON.parse(d.cli('users', 'show', 'alice', '--json').stdout) as { mfa_enabled: boolean; grants: unknown[] };
  t.match(show, { mfa_enabled: true }, 'the CLI sees alice as she was');
  t.equal(show.grants.length, 1, 'with her grant');
  const revoke = d.cli('grants', 'revoke', '--user', 'alice', '--reason', 'test');
  t.match(revoke.stdout, /revoked 1 grant/, 'the revoke finds the grant');
  t.equal(await decide(), false, 'and the daemon refuses alice at once');
});

t.test('a file put in the store\'s place is moved aside, and the store written back', async (t) => {
  t.equal(d.cli('grants', 'add', '--user', 'alice', '--ip', OUTSIDE).code, 0);
  const other = path.join(d.dir, 'other.toml');
  fs.writeFileSync(other, '[store]\npath = "elsewhere/empty.db"\n');
  t.equal(cliIn(other, 'db', 'migrate').code, 0, 'an empty store made elsewhere');
  fs.renameSync(path.join(d.dir, 'elsewhere/empty.db'), storeFile());
  const restored = await d.waitForLog((l) => l['event'] === 'store-restored' && l['was'] === 'replaced', 5000);
  const aside = String(restored['moved_aside']);
  t.match(aside, /mfagate\.db\.replaced-/, 'it names where the other file went');
  t.ok(fs.existsSync(aside), 'the other file is kept, not deleted');
  t.match(JSON.parse(d.cli('users', 'show', 'alice', '--json').stdout), { mfa_enabled: true }, 'the path holds the daemon\'s store again');
  t.equal(await decide(), true, 'and the grant still holds');
});

t.test('the secrets key deleted under the running daemon is written back', async (t) => {
  const key = path.join(d.dir, 'state/secret.key');
  const before = fs.readFileSync(key, 'utf8');
  fs.rmSync(key);
  await d.waitForLog((l) => l['event'] === 'key-restored', 5000);
  t.equal(fs.readFileSync(key, 'utf8'), before, 'the same key');
  t.equal(fs.statSync(key).mode & 0o777, 0o600, 'mode 0600');
});

t.test('a missing store: neither the daemon nor the CLI makes an empty one, so MFA cannot fail open', async (t) => {
  await d.daemon.stop();
  // The state disk is not mounted (or [store] path points at the wrong place).
  const away = path.join(d.dir, 'state.unmounted');
  fs.renameSync(path.join(d.dir, 'state'), away);
  const r = await startAndWait(d.configFile);
  t.ok(r.exited, 'the daemon does not start', { output: r.output.slice(-2000) });
  t.not(r.code, 0, 'non-zero');
  t.match(r.output, /no store at \S+state\/mfagate\.db\..*"mfagate db migrate"/, 'it says the store is missing and what to do');
  const list = d.cli('grants', 'revoke', '--user', 'alice');
  t.equal(list.code, 1, 'the CLI refuses too');
  t.match(list.stderr, /no store at/);
  t.notOk(fs.existsSync(storeFile()), 'nothing made an empty store');

  fs.renameSync(away, path.join(d.dir, 'state'));
  await d.restart();
  t.equal(await decide('alice', '203.0.113.99'), false, 'with the store back, alice still needs MFA from a new address');
  const line = await d.waitForLog((l) => l['event'] === 'decision' && l['ip'] === '203.0.113.99');
  t.equal(line['rule'], 'no-grant', 'refused for want of a grant (not "mfa-not-required")');
});

t.test('store files are for the daemon\'s user only; an older 0644 store is tightened when opened', async (t) => {
  for (const f of ['', '-wal', '-shm']) {
    if (fs.existsSync(storeFile() + f)) t.equal(fs.statSync(storeFile() + f).mode & 0o777, 0o600, `mfagate.db${f}: 0600`);
  }
  await d.daemon.stop();
  fs.chmodSync(storeFile(), 0o644);
  await d.restart();
  t.equal(fs.statSync(storeFile()).mode & 0o777, 0o600, 'a 0644 store is 0600 after the start');
  t.equal(fs.statSync(`${storeFile()}-wal`).mode & 0o777, 0o600, 'its -wal too');
  await d.close();
});
