// `npm run bench`, second part: the MFA web page of `mfagate serve` under load. Not a test: it prints a table
// and records it in BENCHMARKS.md (between its own markers; the policy benchmark keeps its part).
//
// What a university sees on the morning MFA is switched on: everyone opens the one URL the helpdesk sent.
//   - the sign-in page for browsers without a session (a load keeps nothing on the server: the form's CSRF
//     token is a MAC of a nonce cookie, so a flood of loads cannot use memory or push anyone out),
//   - the signed-in home page (the user's status: the decision for this address, factors, grants) and
//     the settings page (the same, and the status table), for 1,000 signed-in users of a store of 100,000
//     users and 1,000,000 grants, as in the policy benchmark.
// Sign-in itself asks Dovecot; here a small stand-in auth server on a UNIX socket (in this process) says yes,
// so the figures are mfagate's own, not a passdb's.
//
// Environment: BENCH_SECONDS (default 10), BENCH_WARMUP_SECONDS (2), BENCH_CONNECTIONS (64), BENCH_USERS
// (100000), BENCH_WEB_PACED_RATE (requests/s of the paced run, default 200), BENCH_WRITE ("0" leaves
// BENCHMARKS.md alone), BENCH_DAEMON_NODE_ARGS (extra node flags for the daemon, e.g. "--cpu-prof").
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { type LoadResult, type Verdict, httpReader, percentileMs, runLoad } from './load.js';
import { int, runBench, writeSection } from './report.js';
import { type Child, cpuSeconds, envNumber, machine, scratchDir, start, statusKb } from './proc.js';
import { fillStore, userName } from './workload.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, '../..');
const CLI = path.join(ROOT, 'dist/cli/main.js');
const REPORT = path.join(ROOT, 'BENCHMARKS.md');
const START = '<!-- bench:web:start -->';
const END = '<!-- bench:web:end -->';

const SECONDS = envNumber('BENCH_SECONDS', 10);
const WARMUP = envNumber('BENCH_WARMUP_SECONDS', 2);
const CONNECTIONS = Math.round(envNumber('BENCH_CONNECTIONS', 64));
const USERS = Math.round(envNumber('BENCH_USERS', 100_000));
const PACED_RATE = Math.round(envNumber('BENCH_WEB_PACED_RATE', 200));
const WRITE = process.env['BENCH_WRITE'] !== '0';
/** Extra node flags for the daemon only, e.g. "--cpu-prof --cpu-prof-dir=DIR" to profile it. */
const DAEMON_NODE_ARGS = (process.env['BENCH_DAEMON_NODE_ARGS'] ?? '').split(/\s+/).filter((a) => a !== '');
const SIGNED_IN = 1000;
const PASSWORD = 'bench-pw';

/** The scratch directory (store, config, sockets): removed, and every child killed, however the run ends. */
const { dir, cleanup } = scratchDir('mfagate-bench-web-');

/** A stand-in for Dovecot's auth-client socket: the handshake, then OK for the bench password. */
function fakeDovecotAuth(socketPath: string): Promise<net.Server> {
  const server = net.createServer((s) => {
    s.write(`VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nSPID\t${process.pid}\nCUID\t1\nCOOKIE\t0123456789abcdef0123456789abcdef\nDONE\n`);
    let pending = '';
    s.on('data', (b: Buffer) => {
      pending += b.toString('utf8');
      for (let nl = pending.indexOf('\n'); nl >= 0; nl = pending.indexOf('\n')) {
        const line = pending.slice(0, nl);
        pending = pending.slice(nl + 1);
        const f = line.split('\t');
        if (f[0] !== 'AUTH') continue;
        const resp = f.find((x) => x.startsWith('resp='))?.slice(5) ?? '';
        const [, user = '', pass = ''] = Buffer.from(resp, 'base64').toString('utf8').split('\0');
        s.write(pass === PASSWORD ? `OK\t${f[1]}\tuser=${user}\n` : `FAIL\t${f[1]}\tuser=${user}\n`);
      }
    });
    s.on('error', () => undefined);
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(socketPath, () => resolve(server));
  });
}

interface Reply {
  status: number;
  body: string;
  cookies: string[];
}

function request(port: number, method: string, p: string, headers: Record<string, string>, body?: string): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, method, path: p, headers, agent: false }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => (text += c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: text, cookies: res.headers['set-cookie'] ?? [] }));
    });
    req.on('error', reject);
    req.end(body);
  });
}

const cookieOf = (r: Reply, name: string) => new RegExp(`${name}=([A-Za-z0-9_-]+)`).exec(r.cookies.join(';'))?.[1];
const sessionOf = (r: Reply) => cookieOf(r, 'mfagate_session');

/** Signs a user in as a browser would: the sign-in page (its nonce cookie and CSRF token), then the form. */
async function signIn(port: number, user: string): Promise<string> {
  const page = await request(port, 'GET', '/', {});
  const nonce = cookieOf(page, 'mfagate_pre');
  const csrf = /name="csrf" value="([^"]+)"/.exec(page.body)?.[1];
  if (!nonce || !csrf) throw new Error(`no nonce cookie or CSRF token on the sign-in page (status ${page.status})`);
  const form = new URLSearchParams({ csrf, user, password: PASSWORD }).toString();
  const r = await request(port, 'POST', '/signin', { Cookie: `mfagate_pre=${nonce}`, 'Content-Type': 'application/x-www-form-urlencoded' }, form);
  const id = sessionOf(r);
  if (r.status !== 303 || !id) throw new Error(`sign-in of ${user} failed: ${r.status} ${r.body.slice(0, 200)}`);
  return id;
}

interface Run {
  name: string;
  load: LoadResult;
  serverCpu: number;
  rssKb: number;
}

const okVerdict = (ok: boolean): Verdict => (ok ? 'allow' : 'other');

async function measure(name: string, d: Child, port: number, payloads: Buffer[], rate?: number): Promise<Run> {
  let cpu0 = 0;
  let cpu1 = 0;
  const load = await runLoad({
    target: { kind: 'tcp', host: '127.0.0.1', port },
    connections: CONNECTIONS,
    warmupMs: (rate ? 1 : WARMUP) * 1000,
    measureMs: (rate ? Math.max(5, SECONDS / 2) : SECONDS) * 1000,
    payloads,
    reader: () => httpReader(okVerdict),
    ...(rate ? { rate } : {}),
    onWindow: (edge) => {
      if (edge === 'start') cpu0 = cpuSeconds(d.pid);
      else cpu1 = cpuSeconds(d.pid);
    },
  });
  if (load.other > 0) throw new Error(`${name}: ${load.other} replies were not "200 OK"`);
  return { name, load, serverCpu: (cpu1 - cpu0) / load.seconds, rssKb: statusKb(d.pid, 'VmRSS') };
}

const ms = (v: number) => (v < 10 ? v.toFixed(2) : v.toFixed(1));
const mib = (kb: number) => `${(kb / 1024).toFixed(0)} MiB`;

async function main(): Promise<void> {
  if (!fs.existsSync(CLI)) throw new Error('build first: npm run build (or use npm run bench)');
  const out = (s: string) => process.stdout.write(s + '\n');
  const m = machine();
  out(`mfagate web page benchmark: ${m.model}, ${m.cores} cores, Node ${m.node}`);

  out(`filling the store: ${int(USERS)} users, ${int(USERS * 10)} grants ...`);
  const storeFile = path.join(dir, 'mfagate.db');
  fillStore(storeFile, USERS, { ipv4: 32, ipv6: 64 }, Date.now());
  const auth = await fakeDovecotAuth(path.join(dir, 'auth.sock'));
  const configFile = path.join(dir, 'mfagate.toml');
  fs.writeFileSync(
    configFile,
    [
      '[store]',
      'path = "mfagate.db"',
      '[dovecot]',
      'listen = ["127.0.0.1:0"]',
      '[postfix]',
      'listen = ["unix:policy.sock"]',
      '[api]',
      'listen = ["unix:api.sock"]',
      '[web]',
      'listen = ["127.0.0.1:0"]',
      'secure_cookie = false',
      'dovecot_auth_socket = "auth.sock"',
      '[log]',
      'level = "info"',
      '',
    ].join('\n'),
  );
  const log = fs.openSync(path.join(dir, 'daemon.log'), 'w');
  const d = await start([...DAEMON_NODE_ARGS, CLI, 'serve', '--config', configFile], log, /MFA web page\s+http:\/\/127\.0\.0\.1:(\d+)\//, 'mfagate serve');
  const port = Number(d.match[1]);
  const rssIdle = statusKb(d.pid, 'VmRSS');

  out(`signing in ${int(SIGNED_IN)} users ...`);
  const ids: string[] = [];
  for (let i = 0; i < SIGNED_IN; i += 16) {
    const batch = Array.from({ length: Math.min(16, SIGNED_IN - i) }, (_, k) => signIn(port, userName(((i + k) * 97) % USERS)));
    ids.push(...(await Promise.all(batch)));
  }
  const rssSignedIn = statusKb(d.pid, 'VmRSS');

  const get = (p: string, cookie?: string) => Buffer.from(`GET ${p} HTTP/1.1\r\nHost: bench\r\n${cookie ? `Cookie: mfagate_session=${cookie}\r\n` : ''}\r\n`);
  const runs: Run[] = [];
  const step = async (name: string, payloads: Buffer[], rate?: number) => {
    out(`${name} ...`);
    const r = await measure(name, d, port, payloads, rate);
    runs.push(r);
    out(
      `  ${int(r.load.requests / r.load.seconds)} req/s (server CPU ${(r.serverCpu * 100).toFixed(0)} %, load generator CPU ${(r.load.clientCpu * 100).toFixed(0)} %), ` +
        `p50 ${ms(percentileMs(r.load.latencies, 0.5))} ms, p99 ${ms(percentileMs(r.load.latencies, 0.99))} ms`,
    );
  };
  await step('sign-in page, no session (a load keeps nothing on the server)', [get('/')]);
  const rssAfterFlood = statusKb(d.pid, 'VmRSS');
  await step('home page, signed in', ids.map((id) => get('/', id)));
  await step('settings page, signed in', ids.map((id) => get('/settings', id)));
  await step(`home page, signed in, ${int(PACED_RATE)} req/s paced`, ids.map((id) => get('/', id)), PACED_RATE);
  const peak = statusKb(d.pid, 'VmHWM');
  await d.stop();
  auth.close();

  const date = new Date().toISOString().slice(0, 16).replace('T', ' ') + ' UTC';
  const section = [
    START,
    `## The MFA web page: latest run ${date}`,
    '',
    `\`npm run bench\` also measures the page (bench/web.ts): the same store (${int(USERS)} users, ${int(USERS * 10)} grants), ` +
      `${int(SIGNED_IN)} users signed in through a stand-in Dovecot auth socket, ${CONNECTIONS} connections, ` +
      `closed loop ${WARMUP} s + ${SECONDS} s, each page fully rendered (no cache). ${m.model}, ${m.cores} cores, Node ${m.node}.`,
    '',
    '| load | req/s | p50 ms | p99 ms | max ms | server CPU | RSS after |',
    '|---|--:|--:|--:|--:|--:|--:|',
    ...runs.map((r) => {
      const l = r.load;
      return `| ${r.name} | ${int(l.requests / l.seconds)} | ${ms(percentileMs(l.latencies, 0.5))} | ${ms(percentileMs(l.latencies, 0.99))} | ${ms(percentileMs(l.latencies, 1))} | ${(r.serverCpu * 100).toFixed(0)} % | ${mib(r.rssKb)} |`;
    }),
    '',
    `- Memory: ${mib(rssIdle)} after start, ${mib(rssSignedIn)} with ${int(SIGNED_IN)} signed-in sessions, ` +
      `${mib(rssAfterFlood)} after the sign-in-page flood (${int(runs[0]?.load.requests ?? 0)} page loads in the measured window alone, ` +
      `none of which keeps anything on the server); peak ${mib(peak)}.`,
    "- Sign-in itself is bounded by the site's passdb behind Dovecot, not measured here.",
    '- For scale: 30,000 students who all open the page within ten minutes make 50 page views a second; the paced row is four times that.',
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
