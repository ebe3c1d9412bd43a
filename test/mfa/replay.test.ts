// A TOTP code (its time step) is accepted once: again in the same process, in two concurrent calls, and in two
// processes racing on the same SQLite file (the compiled service from dist/, as the daemon and the CLI run it).
import { type ChildProcessWithoutNullStreams, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import { pathToFileURL } from 'node:url';
import t from 'tap';
import { loadOrCreateKey } from '../../mfa/secrets.js';
import { codeAt } from '../../mfa/totp.js';
import { ROOT } from '../helpers/daemon.js';
import { errorCode, IP, mfaHarness, STEP_MS } from '../helpers/mfa.js';

const grantsOf = (h: ReturnType<typeof mfaHarness>, user = 'alice') => h.records.listGrants({ user, now: h.clock.now, all: true });

t.test('the same code twice: the second is refused and counted as a failure', async (t) => {
  const h = mfaHarness();
  t.teardown(() => h.close());
  const secret = await h.registerApp('alice');
  const code = h.totp(secret);
  const g = await h.svc.verify('alice', IP, { method: 'totp', code });
  t.equal(g.method, 'totp');
  h.advance(1000);
  t.equal(await errorCode(() => h.svc.verify('alice', IP, { method: 'totp', code })), 'factor-failed', 'same code, same step: refused');
  t.equal(await errorCode(() => h.svc.verify('alice', '198.51.100.9', { method: 'totp', code })), 'factor-failed', 'from another address too');
  t.equal(await h.records.mfa.failuresOfUser('alice', 0), 2, 'both replays count as failures');
  // An older code (the previous step, still inside the drift window) is refused once a newer one was used.
  t.equal(await errorCode(() => h.svc.verify('alice', IP, { method: 'totp', code: h.totp(secret, -STEP_MS) })), 'factor-failed', 'an older step is refused');
  // The code of the next time step is a new code.
  h.advance(STEP_MS);
  const next = await h.svc.verify('alice', IP, { method: 'totp', code: h.totp(secret) });
  t.equal(next.id, g.id, 'the next step passes (extending the same grant)');
  t.equal(await h.records.mfa.failuresOfUser('alice', 0), 0, 'a pass clears the failures');
});

t.test('the code used to confirm the app cannot be used again to create a grant', async (t) => {
  const h = mfaHarness();
  t.teardown(() => h.close());
  const { secret } = await h.svc.totpBegin('alice', IP, undefined);
  const code = h.totp(secret);
  await h.svc.totpConfirm('alice', IP, code);
  t.equal(await errorCode(() => h.svc.verify('alice', IP, { method: 'totp', code })), 'factor-failed');
  t.equal((await grantsOf(h)).length, 0);
});

t.test('a code used as proof for a change cannot be used again for a grant', async (t) => {
  const h = mfaHarness();
  t.teardown(() => h.close());
  const secret = await h.registerApp('alice');
  const code = h.totp(secret);
  const { codes } = await h.svc.backupGenerate('alice', IP, { method: 'totp', code });
  t.equal(codes.length, 10);
  t.equal(await errorCode(() => h.svc.verify('alice', IP, { method: 'totp', code })), 'factor-failed');
});

t.test('two concurrent verify calls with the same code: exactly one passes', async (t) => {
  const h = mfaHarness();
  t.teardown(() => h.close());
  const secret = await h.registerApp('alice');
  for (let round = 0; round < 5; round++) {
    h.advance(3 * STEP_MS);
    const code = h.totp(secret);
    const ip = `203.0.113.${10 + round}`;
    const results = await Promise.allSettled([
      h.svc.verify('alice', ip, { method: 'totp', code }),
      h.svc.verify('alice', ip, { method: 'totp', code }),
      h.svc.verify('alice', '198.51.100.1', { method: 'totp', code }),
    ]);
    const passed = results.filter((r) => r.status === 'fulfilled');
    t.equal(passed.length, 1, `round ${round}: exactly one of three passes`);
    for (const r of results) if (r.status === 'rejected') t.match(r.reason, { code: 'factor-failed' });
  }
  t.equal((await grantsOf(h)).length, 5, 'one grant per round');
});

t.test('two processes racing the same code on the same SQLite file: exactly one grant', async (t) => {
  const serviceJs = path.join(ROOT, 'dist/mfa/service.js');
  if (!fs.existsSync(serviceJs)) {
    t.fail(`${path.relative(ROOT, serviceJs)} is missing: run "npm run build" before the tests`);
    return;
  }
  const h = mfaHarness();
  t.teardown(() => h.close());
  const keyFile = path.join(h.dir, 'secret.key');
  fs.writeFileSync(keyFile, h.key.toString('base64') + '\n', { mode: 0o600 });
  t.same(loadOrCreateKey(keyFile), h.key);
  const secret = await h.registerApp('alice');

  const url = (p: string) => JSON.stringify(pathToFileURL(path.join(ROOT, 'dist', p)).href);
  // A child: opens the store, then for each line "now code ip" on stdin runs verify at that time and prints the outcome.
  const script = `
    import readline from 'node:readline';
    import { loadConfig } from ${url('config/config.js')};
    import { createLogger } from ${url('daemon/log.js')};
    import { createSecrets, loadOrCreateKey } from ${url('mfa/secrets.js')};
    import { MfaService } from ${url('mfa/service.js')};
    import { Store } from ${url('store/store.js')};
    const [dbFile, keyFile, dir] = process.argv.slice(1);
    const store = Store.open(dbFile, { create: true });
    const config = loadConfig(undefined, dir);
    let now = 0;
    const svc = new MfaService({
      store: store.records, config: () => config, secrets: createSecrets(loadOrCreateKey(keyFile)),
      mailer: () => ({ async send() {}, close() {} }), logger: createLogger('error', { write() {} }), clock: () => now,
    });
    process.stdout.write('ready\\n');
    for await (const line of readline.createInterface({ input: process.stdin })) {
      const [at, code, ip] = line.split(' ');
      now = Number(at);
      let out;
      try {
        const g = await svc.verify('alice', ip, { method: 'totp', code });
        out = { ok: true, grant: g.id };
      } catch (e) {
        out = { ok: false, code: e.code ?? String(e) };
      }
      process.stdout.write(JSON.stringify(out) + '\\n');
    }
    store.close();
  `;
  const start = () => {
    const child = spawn(process.execPath, ['--input-type=module', '-e', script, h.dbFile, keyFile, h.dir], { stdio: ['pipe', 'pipe', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
    const lines = readline.createInterface({ input: child.stdout })[Symbol.asyncIterator]();
    const next = async (): Promise<string> => {
      const r = await lines.next();
      if (r.done) throw new Error(`child exited: ${stderr}`);
      return r.value;
    };
    return { child, next };
  };
  const a = start();
  const b = start();
  const stop = (c: ChildProcessWithoutNullStreams) =>
    new Promise<void>((resolve) => {
      if (c.exitCode !== null) return resolve();
      c.once('exit', () => resolve());
      c.stdin.end();
    });
  t.teardown(() => Promise.all([stop(a.child), stop(b.child)]));
  t.equal(await a.next(), 'ready');
  t.equal(await b.next(), 'ready');

  const rounds = 10;
  let now = h.clock.now;
  for (let i = 0; i < rounds; i++) {
    now += 3 * STEP_MS;
    const line = `${now} ${codeAt(secret, now)} 203.0.113.${20 + i}\n`;
    // Both get the same request in the same tick; each answers after its own transaction.
    a.child.stdin.write(line);
    b.child.stdin.write(line);
    const outs = (await Promise.all([a.next(), b.next()])).map((l) => JSON.parse(l) as { ok: boolean; code?: string; grant?: number });
    t.equal(outs.filter((o) => o.ok).length, 1, `round ${i}: exactly one process passes`);
    t.same(outs.find((o) => !o.ok), { ok: false, code: 'factor-failed' }, `round ${i}: the other is refused as a wrong code`);
  }
  await Promise.all([stop(a.child), stop(b.child)]);
  h.clock.now = now;
  const grants = await grantsOf(h);
  t.equal(grants.length, rounds, `exactly ${rounds} grants, one per round`);
  t.same(new Set(grants.map((g) => g.ip)).size, rounds, 'each for its own round');
  const passes = h.store.db.prepare("SELECT count(*) AS n FROM audit WHERE action = 'factor-pass' AND user = 'alice'").get() as { n: number };
  t.equal(passes.n, rounds, 'one factor-pass in the audit log per round');
});
