// `npm run bench`, third part: app passcode checks (what Dovecot's Lua passdb asks, POST /?command=passcode)
// next to the auth policy requests of the same daemon. Not a test: it prints a table and records it in
// BENCHMARKS.md (between its own markers).
//
// A check costs one scrypt hash (N = 2^12, r = 8: 4 MiB, in libuv's thread pool) unless the same passcode
// passed within the last 15 minutes (then an HMAC in memory). So there are two loads:
//   - remembered: the right passcodes of 256 users, over and over (a phone that checks its mail every few
//     minutes, the usual case),
//   - hashed: a wrong last letter on each of them, so every check runs scrypt (a first login, or a guesser;
//     the [lockout] limits are raised here so that no check is cut short),
// and as their floors: the daemon's auth policy endpoint under the same connections, and crypto.scrypt with
// the same parameters called directly in this process with the same thread pool size. One hash alone is also
// timed at N = 2^14, the cost weighed against (see mfa/passcodes.ts).
//
// Environment: BENCH_SECONDS (default 10), BENCH_WARMUP_SECONDS (2), BENCH_CONNECTIONS (64), BENCH_WRITE
// ("0" leaves BENCHMARKS.md alone).
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { loadConfig } from '../config/config.js';
import { createLogger } from '../daemon/log.js';
import { PASSCODE_ALPHABET, PasscodeService, SCRYPT } from '../mfa/passcodes.js';
import { Store } from '../store/store.js';
import { type LoadResult, type Verdict, httpReader, percentileMs, runLoad } from './load.js';
import { int, runBench, writeSection } from './report.js';
import { type Child, cpuSeconds, envNumber, machine, scratchDir, start, statusKb } from './proc.js';
import { dovecotRequest, fillStore, requestMix, userName } from './workload.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, '../..');
const CLI = path.join(ROOT, 'dist/cli/main.js');
const REPORT = path.join(ROOT, 'BENCHMARKS.md');
const START = '<!-- bench:passcodes:start -->';
const END = '<!-- bench:passcodes:end -->';

const SECONDS = envNumber('BENCH_SECONDS', 10);
const WARMUP = envNumber('BENCH_WARMUP_SECONDS', 2);
const CONNECTIONS = Math.round(envNumber('BENCH_CONNECTIONS', 64));
const WRITE = process.env['BENCH_WRITE'] !== '0';
const USERS = 10_000;
/** Users with a real passcode (made through PasscodeService, as the page makes them). */
const WITH_PASSCODE = 256;
/** Other rows in the table, so the selector lookup is not on an empty table. */
const FILLER = 20_000;
const API_KEY = 'bench-api-key-0123456789abcdef';

const { dir, cleanup } = scratchDir('mfagate-bench-passcodes-');
const ms = (v: number) => (v < 10 ? v.toFixed(2) : v.toFixed(1));

function passcodeRequest(user: string, passcode: string, ip: string, host: string): Buffer {
  const body = JSON.stringify({ login: user, passcode, remote: ip, real_remote: ip, protocol: 'imap' });
  return Buffer.from(
    'POST /?command=passcode HTTP/1.1\r\n' +
      `Host: ${host}\r\n` +
      'User-Agent: dovecot/lua\r\n' +
      'Content-Type: application/json\r\n' +
      `X-API-Key: ${API_KEY}\r\n` +
      `Content-Length: ${Buffer.byteLength(body)}\r\n` +
      '\r\n' +
      body,
    'latin1',
  );
}

const passcodeVerdict = (ok: boolean, body: string): Verdict => {
  if (!ok) return 'other';
  if (body.startsWith('{"result":"ok"')) return 'allow';
  if (body === '{"result":"fail"}') return 'refuse';
  return 'other';
};

/** Each body once, eight at a time; every one must be a right passcode. */
async function firstChecks(port: number, bodies: object[]): Promise<void> {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 8 });
  const one = (body: object) =>
    new Promise<void>((resolve, reject) => {
      const text = JSON.stringify(body);
      const req = http.request({ host: '127.0.0.1', port, method: 'POST', path: '/?command=passcode', agent, headers: { 'content-type': 'application/json', 'x-api-key': API_KEY, 'content-length': Buffer.byteLength(text) } }, (res) => {
        let answer = '';
        res.on('data', (b: Buffer) => (answer += b.toString()));
        res.on('end', () => (answer.startsWith('{"result":"ok"') ? resolve() : reject(new Error(`a right passcode was not accepted: ${res.statusCode} ${answer}`))));
      });
      req.on('error', reject);
      req.end(text);
    });
  const queue = [...bodies];
  await Promise.all(Array.from({ length: 8 }, async () => {
    for (let b = queue.shift(); b !== undefined; b = queue.shift()) await one(b);
  }));
  agent.destroy();
}

interface Run {
  name: string;
  load: LoadResult;
  serverCpu: number;
}

/** crypto.scrypt with the daemon's parameters, `concurrency` at a time, for `seconds`: hashes per second. */
async function scryptFloor(seconds: number, concurrency: number, N = SCRYPT.N): Promise<{ perSecond: number; latencies: number[] }> {
  const scrypt = promisify(crypto.scrypt) as (p: string, s: Buffer, n: number, o: crypto.ScryptOptions) => Promise<Buffer>;
  const salt = crypto.randomBytes(16);
  const latencies: number[] = [];
  const until = performance.now() + seconds * 1000;
  let done = 0;
  await Promise.all(
    Array.from({ length: concurrency }, async (_, k) => {
      for (let n = 0; performance.now() < until; n++) {
        const t0 = performance.now();
        await scrypt(`user${k}\0abcdefghjkmnpq${n}`, salt, 32, { ...SCRYPT, N, maxmem: 64 * 1024 * 1024 });
        latencies.push(performance.now() - t0);
        done++;
      }
    }),
  );
  latencies.sort((a, b) => a - b);
  return { perSecond: done / seconds, latencies };
}

async function main(): Promise<void> {
  if (!fs.existsSync(CLI)) throw new Error('build first: npm run build (or use npm run bench)');
  const out = (s: string) => process.stdout.write(s + '\n');
  const m = machine();
  const threads = Number(process.env['UV_THREADPOOL_SIZE'] ?? 4);
  out(`mfagate app passcode benchmark: ${m.model}, ${m.cores} cores, Node ${m.node}, thread pool ${threads}`);

  // ---- the floor of a hashed check, measured first, on the idle machine ----
  const cost = `N = 2^${Math.log2(SCRYPT.N)}, r = ${SCRYPT.r}, p = ${SCRYPT.p}`;
  out(`crypto.scrypt alone (${cost}), in this process ...`);
  const median = (l: number[]) => l[Math.floor(l.length / 2)] ?? 0;
  const floor = await scryptFloor(Math.max(3, SECONDS / 2), CONNECTIONS);
  const oneHash = median((await scryptFloor(2, 1)).latencies);
  const oneHashHigher = median((await scryptFloor(2, 1, 1 << 14)).latencies);
  out(`  ${int(floor.perSecond)} hashes/s with ${CONNECTIONS} at a time; one hash alone ${ms(oneHash)} ms (${ms(oneHashHigher)} ms at N = 2^14)`);

  // ---- the store: grants for the policy mix, passcodes ----
  const storeFile = path.join(dir, 'mfagate.db');
  fillStore(storeFile, USERS, { ipv4: 32, ipv6: 64 }, Date.now());
  const configFile = path.join(dir, 'mfagate.toml');
  fs.writeFileSync(
    configFile,
    [
      '[store]',
      'path = "mfagate.db"',
      '[dovecot]',
      'listen = ["127.0.0.1:0"]',
      `api_key = "${API_KEY}"`,
      '[postfix]',
      'listen = ["unix:policy.sock"]',
      '[web]',
      'listen = []',
      '[app_passcodes]',
      'enabled = true',
      '[lockout]',
      'max_failures = 1000',
      'ip_max_failures = 100000',
      '[log]',
      'level = "info"',
      '',
    ].join('\n'),
  );
  out(`making ${WITH_PASSCODE} passcodes through PasscodeService and ${int(FILLER)} filler rows ...`);
  const passcodes: { user: string; passcode: string }[] = [];
  {
    const store = Store.open(storeFile, { create: false, migrate: true });
    try {
      const config = loadConfig(configFile);
      const records = store.records;
      const service = new PasscodeService({ store: records, config: () => config, logger: createLogger('error', { write: () => undefined }) });
      const letters = (n: number) => Array.from({ length: n }, () => PASSCODE_ALPHABET[crypto.randomInt(PASSCODE_ALPHABET.length)]).join('');
      await records.tx(async () => {
        const now = Date.now();
        for (let i = 0; i < FILLER; i++) {
          const selector = letters(5);
          if (await records.passcodes.selectorTaken(selector)) continue;
          await records.passcodes.insert({ user: userName(WITH_PASSCODE + (i % (USERS - WITH_PASSCODE))), name: 'filler', selector, salt: crypto.randomBytes(16), hash: crypto.randomBytes(32), kdf: 'scrypt:n=4096,r=8,p=1', protocols: ['imap'], createdBy: 'bench', expiresAt: null, now });
        }
      });
      const made = await Promise.all(Array.from({ length: WITH_PASSCODE }, (_, i) => service.prepare(userName(i), 'bench phone', ['imap', 'smtp'], undefined, 'bench')));
      await records.tx(async () => {
        for (const p of made) await p.insert();
      });
      made.forEach((p, i) => passcodes.push({ user: userName(i), passcode: p.passcode }));
    } finally {
      store.close();
    }
  }

  const log = fs.openSync(path.join(dir, 'daemon.log'), 'w');
  const d: Child = await start([CLI, '--config', configFile, 'serve'], log, /dovecot auth policy\s+127\.0\.0\.1:(\d+)\n/, 'mfagate serve');
  const port = Number(d.match[1]);
  const host = `127.0.0.1:${port}`;
  const ip = (i: number) => `203.0.${(i >> 8) & 255}.${i & 255}`;
  const right = passcodes.map((p, i) => passcodeRequest(p.user, p.passcode, ip(i), host));
  const wrong = passcodes.map((p, i) => passcodeRequest(p.user, p.passcode.slice(0, -1) + (p.passcode.endsWith('a') ? 'b' : 'a'), ip(i), host));
  const policy = requestMix(65_536, USERS).map((r, n) => dovecotRequest(r, n, host, API_KEY));

  const runs: Run[] = [];
  const step = async (name: string, payloads: Buffer[], verdict: (ok: boolean, body: string) => Verdict, o: { rate?: number; expect?: 'allow' | 'refuse' } = {}) => {
    out(`${name} ...`);
    let cpu0 = 0;
    let cpu1 = 0;
    const load = await runLoad({
      target: { kind: 'tcp', host: '127.0.0.1', port },
      connections: o.rate ? Math.min(CONNECTIONS, 16) : CONNECTIONS,
      warmupMs: (o.rate ? 1 : WARMUP) * 1000,
      measureMs: (o.rate ? Math.max(5, SECONDS / 2) : SECONDS) * 1000,
      payloads,
      reader: () => httpReader(verdict),
      ...(o.rate ? { rate: o.rate } : {}),
      onWindow: (edge) => {
        if (edge === 'start') cpu0 = cpuSeconds(d.pid);
        else cpu1 = cpuSeconds(d.pid);
      },
    });
    if (load.other > 0) throw new Error(`${name}: ${load.other} unexpected replies`);
    if (o.expect === 'allow' && load.refused > 0) throw new Error(`${name}: ${load.refused} right passcodes refused`);
    if (o.expect === 'refuse' && load.allowed > 0) throw new Error(`${name}: ${load.allowed} wrong passcodes accepted`);
    const r = { name, load, serverCpu: (cpu1 - cpu0) / load.seconds };
    runs.push(r);
    out(`  ${int(load.requests / load.seconds)} req/s, p50 ${ms(percentileMs(load.latencies, 0.5))} ms, p99 ${ms(percentileMs(load.latencies, 0.99))} ms, server CPU ${(r.serverCpu * 100).toFixed(0)} %`);
    return r;
  };
  // Every right passcode once, so that the remembered runs measure remembered checks only.
  out(`first checks of the ${WITH_PASSCODE} passcodes (hashed once, then remembered) ...`);
  await firstChecks(port, passcodes.map((p, i) => ({ login: p.user, passcode: p.passcode, remote: ip(i), real_remote: ip(i), protocol: 'imap' })));
  const policyRun = await step('auth policy requests (command=allow), saturated', policy, (ok, body) => (ok && body.startsWith('{"status":') ? (body.startsWith('{"status":0') ? 'allow' : 'refuse') : 'other'));
  const remembered = await step('passcode checks, remembered, saturated', right, passcodeVerdict, { expect: 'allow' });
  await step('passcode checks, remembered, 2,000 req/s paced', right, passcodeVerdict, { rate: 2000, expect: 'allow' });
  const hashed = await step('passcode checks, scrypt each time, saturated', wrong, passcodeVerdict, { expect: 'refuse' });
  await step('passcode checks, scrypt each time, 20 req/s paced', wrong, passcodeVerdict, { rate: 20, expect: 'refuse' });
  const peak = statusKb(d.pid, 'VmHWM');
  await d.stop();

  const rps = (r: Run) => r.load.requests / r.load.seconds;
  const date = new Date().toISOString().slice(0, 16).replace('T', ' ') + ' UTC';
  const section = [
    START,
    `## App passcode checks: latest run ${date}`,
    '',
    `\`npm run bench\` also measures what Dovecot's Lua passdb asks (bench/passcodes.ts): POST /?command=passcode on the Dovecot ` +
      `endpoint, ${CONNECTIONS} connections (16 for the paced rows), closed loop ${WARMUP} s + ${SECONDS} s, against a store of ${int(USERS)} users ` +
      `with ${int(WITH_PASSCODE)} real passcodes and ${int(FILLER)} other rows. Hash: scrypt ${cost} (${(128 * SCRYPT.N * SCRYPT.r) / 2 ** 20} MiB), in libuv's ` +
      `thread pool (${threads} threads). ${m.model}, ${m.cores} cores, Node ${m.node}.`,
    '',
    '| load | req/s | p50 ms | p99 ms | max ms | server CPU |',
    '|---|--:|--:|--:|--:|--:|',
    ...runs.map((r) => {
      const l = r.load;
      return `| ${r.name} | ${int(rps(r))} | ${ms(percentileMs(l.latencies, 0.5))} | ${ms(percentileMs(l.latencies, 0.99))} | ${ms(percentileMs(l.latencies, 1))} | ${(r.serverCpu * 100).toFixed(0)} % |`;
    }),
    `| floor: crypto.scrypt alone in one process, ${CONNECTIONS} at a time | ${int(floor.perSecond)} | ${ms(floor.latencies[Math.floor(floor.latencies.length / 2)] ?? 0)} | ${ms(floor.latencies[Math.floor(floor.latencies.length * 0.99)] ?? 0)} | ${ms(floor.latencies.at(-1) ?? 0)} | |`,
    '',
    `- A remembered passcode (the phone's next logins within 15 minutes) costs ${((rps(remembered) / rps(policyRun)) * 100).toFixed(0)} % of an auth policy request's throughput: ` +
      `${int(rps(remembered))} against ${int(rps(policyRun))} req/s.`,
    `- A hashed check runs at ${((rps(hashed) / floor.perSecond) * 100).toFixed(0)} % of the scrypt floor (${int(rps(hashed))} against ${int(floor.perSecond)} hashes/s): the hash is the cost, ` +
      `and it never blocks the event loop: policy requests arriving meanwhile are answered between hashes. One hash alone takes ${ms(oneHash)} ms (${ms(oneHashHigher)} ms at N = 2^14).`,
    `- For scale: 30,000 phones that each make a first login after the daemon restarts need ${Math.ceil(30_000 / Math.max(1, rps(hashed)))} s of hashing at this rate; after that, checks are remembered.`,
    `- Peak RSS of the daemon over these runs: ${(peak / 1024).toFixed(0)} MiB (each hash in flight holds ${(128 * SCRYPT.N * SCRYPT.r) / 2 ** 20} MiB).`,
    END,
  ].join('\n');
  out('');
  out(section);
  if (WRITE) {
    writeSection(REPORT, START, END, section);
    out('figures written to BENCHMARKS.md');
  }
}

runBench(main, cleanup);
