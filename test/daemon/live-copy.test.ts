// The running daemon decides from its in-memory copy (store/live-copy.ts): a change another process makes
// to the store (the CLI, or any writer) is seen by the very next decision on both endpoints, and a daemon
// killed with -9 loses nothing: it loads the copy again at start and decides as before.
import path from 'node:path';
import t from 'tap';
import { Store } from '../../store/store.js';
import { type Served, askPolicy, askPostfix, loginBody, postfixRequest, serve } from '../helpers/served.js';

const OUTSIDE = '203.0.113.50';
let d: Served;
t.before(async () => {
  d = await serve();
});
t.teardown(() => d?.close());

const dovecot = async (user: string, ip: string) => (await askPolicy(d.dovecotPort, loginBody(user, ip))).allow;
const postfix = async (user: string, ip: string) => (await askPostfix(d.postfixSocket, postfixRequest(user, ip))) === 'action=DUNNO';

t.test('a change by the CLI is seen by the very next decision, on both endpoints', async (t) => {
  t.equal(d.cli('users', 'enable', 'alice').code, 0);
  t.equal(await dovecot('alice', OUTSIDE), false, 'MFA enabled elsewhere: refused at once');
  t.equal(d.cli('grants', 'add', '--user', 'alice', '--ip', OUTSIDE).code, 0);
  t.equal(await dovecot('alice', OUTSIDE), true, 'a grant added by the CLI: allowed at the next login');
  t.equal(await postfix('alice', OUTSIDE), true, 'and for SMTP');
  t.equal(d.cli('grants', 'revoke', '--user', 'alice', '--reason', 'lost phone').code, 0);
  t.equal(await dovecot('alice', OUTSIDE), false, 'revoked: refused at the next login');
  t.equal(await postfix('alice', OUTSIDE), false, 'and for SMTP');
  t.equal(d.cli('users', 'exempt', 'alice').code, 0);
  t.equal(await dovecot('alice', OUTSIDE), true, 'exempt: allowed');
  t.equal(d.cli('users', 'unexempt', 'alice').code, 0);
  t.equal(await dovecot('alice', OUTSIDE), false);
});

t.test('killed with -9, the daemon loads its copy again and decides as before', async (t) => {
  // 300 users with grants, written by another process while the daemon runs.
  const s = Store.open(path.join(d.dir, 'state/mfagate.db'));
  const now = Date.now();
  for (let i = 0; i < 300; i++) {
    const user = `u${i}`;
    await s.records.setUserFlag(user, 'mfa_enabled', true, 'test', now);
    await s.records.addGrant({ user, ip: `198.51.100.${i % 250}`, block: `198.51.100.${i % 250}`, ttlMs: 3_600_000, method: 'totp', source: 'api', reason: '', actor: 'test', now });
    if (i % 3 === 0) await s.records.revokeGrants({ user }, 'test', '', now);
  }
  s.close();
  const answers = async () => {
    const out: boolean[] = [];
    for (let i = 0; i < 300; i += 7) out.push((await dovecot(`u${i}`, `198.51.100.${i % 250}`)) === true, (await dovecot(`u${i}`, '192.0.2.1')) === true);
    return out;
  };
  const before = await answers();
  let granted = 0;
  for (let i = 0; i < 300; i += 7) if (i % 3 !== 0) granted++;
  t.equal(before.filter(Boolean).length, granted, 'the granted users allowed from their address; revoked ones and other addresses refused');
  await d.restart('SIGKILL');
  const started = await d.waitForLog((l) => l['event'] === 'started');
  // alice (MFA enabled by the first test) and the 300; alice's grant was revoked.
  t.match(started['copy'], { flagged_users: 301, grants: 200 }, 'the copy loaded at start holds what the store holds');
  t.same(await answers(), before, 'the same decisions after the restart');
});
