// The MFA page's sessions under abuse, against the real daemon signing users in through a real Dovecot (issue
// 8, items 1 and 7):
//   - a flood of anonymous page loads from one address used to push every other visitor's sign-in form out of
//     the server (20,000 anonymous sessions at most), so their right password landed back on the sign-in form;
//     the sign-in form now keeps no server state at all;
//   - one account signing in again and again used to push everyone else's signed-in session out (20,000 in
//     all, none per user); each user now holds at most 10, and the user's own oldest goes.
import http from 'node:http';
import path from 'node:path';
import t from 'tap';
import { type MailStack, startMailStack } from '../helpers/mailstack.js';
import { type Served, serve } from '../helpers/served.js';
import { WebClient, hasId } from '../helpers/web.js';

const USERS = { alice: 'alice-pw', bob: 'bob-pw', carol: 'carol-pw' };
let stack: MailStack;
let d: Served;

t.before(async () => {
  stack = await startMailStack({ users: USERS });
  d = await serve({
    web: true,
    toml: `[web]\ndovecot_auth_socket = "${path.join(stack.dir, 'run/auth-client')}"\ntrusted_proxies = ["127.0.0.1"]\n`,
  });
});
t.teardown(async () => {
  await d?.close();
  await stack?.stop();
});

const client = (ip: string) => new WebClient(d.webPort ?? 0, { headers: { 'X-Forwarded-For': ip } });
const signedIn = async (c: WebClient) => hasId((await c.get('/')).body, 'network-status');

/** `n` loads of the sign-in page without cookies, as fast as 16 keep-alive connections go. Returns the statuses. */
async function flood(n: number, ip: string): Promise<Map<number, number>> {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 16 });
  const statuses = new Map<number, number>();
  let sent = 0;
  const one = (): Promise<void> =>
    new Promise((resolve, reject) => {
      const req = http.get({ host: '127.0.0.1', port: d.webPort, path: '/', agent, headers: { 'X-Forwarded-For': ip, 'Accept-Language': 'en' } }, (res) => {
        res.resume();
        res.on('end', () => {
          statuses.set(res.statusCode ?? 0, (statuses.get(res.statusCode ?? 0) ?? 0) + 1);
          resolve();
        });
      });
      req.on('error', reject);
    });
  const worker = async () => {
    while (sent < n) {
      sent++;
      await one();
    }
  };
  await Promise.all(Array.from({ length: 16 }, worker));
  agent.destroy();
  return statuses;
}

t.test('a flood of anonymous page loads from one address keeps nobody from signing in', async (t) => {
  const carol = client('203.0.113.30');
  t.equal((await carol.signIn('carol', USERS.carol)).status, 303, 'carol signs in before the flood');
  // bob opens the sign-in page, then takes his time typing.
  const bob = client('203.0.113.20');
  const form = await bob.get('/');
  t.ok(hasId(form.body, 'signin'), 'bob has the sign-in form');

  const statuses = await flood(25_000, '198.51.100.66');
  t.same([...statuses], [[200, 25_000]], '25,000 page loads, each answered');

  const r = await bob.post('/signin', { user: 'bob', password: USERS.bob });
  t.equal(r.status, 303, "bob's right password is taken");
  t.ok(await signedIn(bob), 'bob is signed in');
  t.ok(await signedIn(carol), 'carol is still signed in');
  const ok = d.logs().filter((l) => l['event'] === 'web-signin' && l['result'] === 'ok').map((l) => l['user']);
  t.same(ok, ['carol', 'bob'], 'the log has both sign-ins');
});

t.test('one account signing in again and again ends only its own oldest sessions', async (t) => {
  const carol = client('203.0.113.31');
  t.equal((await carol.signIn('carol', USERS.carol)).status, 303);
  const alices: WebClient[] = [];
  for (let i = 0; i < 12; i++) {
    const c = client(`203.0.113.${100 + i}`);
    t.equal((await c.signIn('alice', USERS.alice)).status, 303, `alice signs in (${i + 1})`);
    alices.push(c);
  }
  const still = [];
  for (const c of alices) still.push(await signedIn(c));
  t.same(still, [false, false, ...Array(10).fill(true)], "alice keeps her 10 newest sessions; her 2 oldest ended");
  t.ok(await signedIn(carol), "carol's session is untouched");
  const home = await alices[0]?.get('/');
  t.ok(home && hasId(home.body, 'signin'), "alice's oldest browser is back at the sign-in page");
});
