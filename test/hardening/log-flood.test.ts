// A flood of bad requests does not flood the log (issue 8, item 6). Every refused request used to write a line
// (about 155 bytes): a local process with a wrong API key wrote 48 MB in 8 s, and under journald's rate limit the
// decision lines would be dropped with them. Now repeated bad-request lines are counted and written once per
// interval with the count; every decision line is still written, one per decision.
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import t from 'tap';
import { tempDir } from '../helpers/daemon.js';
import { freePort } from '../helpers/mailstack.js';
import { POLICY_KEY, type Served, serve } from '../helpers/served.js';

const BAD = 40_000;
const GOOD = 400;
const TOKEN = 'api-token-for-the-log-flood-test-0123';

let d: Served;
let apiPort = 0;
t.before(async () => {
  const dir = tempDir('mfagate-hardening-flood-');
  fs.writeFileSync(path.join(dir, 'token'), `${TOKEN}\n`, { mode: 0o600 });
  apiPort = await freePort();
  d = await serve({ dir, toml: `[api]\nlisten = ["unix:${path.join(dir, 'api.sock')}", "127.0.0.1:${apiPort}"]\ntoken_file = "token"\n` });
});
t.teardown(() => d?.close());

/**
 * Sends `requests` over `conns` keep-alive connections, pipelined 50 at a time, and counts the answers by
 * status. Raw sockets: as fast as a misbehaving local process can go.
 */
async function blast(port: number, requests: Buffer[], conns = 8): Promise<Map<number, number>> {
  const statuses = new Map<number, number>();
  let next = 0;
  const one = () =>
    new Promise<void>((resolve, reject) => {
      const s = net.connect(port, '127.0.0.1');
      let outstanding = 0;
      let text = '';
      const send = () => {
        const batch: Buffer[] = [];
        while (batch.length < 50 && next < requests.length) batch.push(requests[next++] ?? Buffer.alloc(0));
        if (batch.length === 0) {
          s.end();
          return resolve();
        }
        outstanding = batch.length;
        s.write(Buffer.concat(batch));
      };
      s.setEncoding('latin1');
      s.on('connect', send);
      s.on('data', (chunk: string) => {
        text += chunk;
        // Each answer starts with its status line and has a Content-Length body: count status lines.
        for (let i = text.indexOf('HTTP/1.1 '); i >= 0; i = text.indexOf('HTTP/1.1 ')) {
          const end = text.indexOf('\r\n\r\n', i);
          if (end < 0) break;
          const len = Number(/content-length: (\d+)/i.exec(text.slice(i, end))?.[1] ?? '0');
          if (text.length < end + 4 + len) break;
          const status = Number(text.slice(i + 9, i + 12));
          statuses.set(status, (statuses.get(status) ?? 0) + 1);
          text = text.slice(end + 4 + len);
          if (--outstanding === 0) send();
        }
      });
      s.on('error', reject);
    });
  await Promise.all(Array.from({ length: conns }, one));
  return statuses;
}

const post = (pathAndQuery: string, headers: Record<string, string>, body: string) =>
  Buffer.from(
    `POST ${pathAndQuery} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n` +
      Object.entries(headers).map(([k, v]) => `${k}: ${v}\r\n`).join('') +
      `Content-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`,
  );

/** Request i is a real one (the right key) once in every 101: 400 of the 40,400. */
const isGood = (i: number) => i % (BAD / GOOD + 1) === 0;

t.test('a wrong Dovecot API key, 40,000 times, among 400 real requests', async (t) => {
  const requests: Buffer[] = [];
  for (let i = 0; i < BAD + GOOD; i++) {
    const body = JSON.stringify({ login: `user${i % 97}`, remote: `203.0.113.${i % 250}`, protocol: 'imap' });
    requests.push(post('/?command=allow', { 'X-API-Key': isGood(i) ? POLICY_KEY : 'wrong-key' }, body));
  }
  const statuses = await blast(d.dovecotPort, requests);
  t.same([...statuses].sort(), [[200, GOOD], [401, BAD]], 'the real ones answered, every bad one refused');
});

t.test('a wrong bearer token on the webmail API, 10,000 times', async (t) => {
  const requests = Array.from({ length: 10_000 }, () => post('/v1/users/alice/verify', { Authorization: 'Bearer not-the-token' }, '{"ip":"203.0.113.7","factor":{"method":"totp","code":"123456"}}'));
  const statuses = await blast(apiPort, requests);
  t.same([...statuses], [[401, 10_000]], 'all refused');
});

/** How many requests some log lines stand for: a line each, and a count line for as many as it counts. */
const accounted = (lines: Record<string, unknown>[]) => lines.reduce((n, l) => n + (typeof l['repeated'] === 'number' ? l['repeated'] : 1), 0);

t.test('the log: every decision, and the bad requests counted instead of written one by one', async (t) => {
  await d.daemon.stop();
  const output = d.daemon.output();
  const lines = d.logs();
  t.equal(lines.filter((l) => l['event'] === 'decision').length, GOOD, 'one decision line per real request: none dropped');

  const wrongKey = lines.filter((l) => l['event'] === 'bad-request' && l['status'] === 401);
  t.equal(accounted(wrongKey), BAD, 'the lines account for every refused request');
  t.ok(wrongKey.length <= 10, `${wrongKey.length} lines for them, not one each`);
  t.match(wrongKey.find((l) => typeof l['repeated'] === 'number'), { endpoint: 'dovecot', error: 'missing or wrong API key', peer: '127.0.0.1', interval_s: 10 }, 'a count line says what and how many');

  const api = lines.filter((l) => l['event'] === 'api' && l['status'] === 401);
  t.equal(accounted(api), 10_000, 'the API refusals are all accounted for');
  t.ok(api.length <= 10, `in ${api.length} lines`);
  t.ok(Buffer.byteLength(output) < 400_000, `the whole log is ${Buffer.byteLength(output)} bytes (one line each would be over 7 MB)`);
});
