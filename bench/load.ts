// A closed-loop load generator over raw sockets: each connection sends its next request as soon as the
// previous reply is complete. No http.Agent: a bare HTTP/1.1 keep-alive client that reads just the status,
// Content-Length and body, so the client's own cost stays small next to the server's.
import net from 'node:net';

export type Target = { kind: 'unix'; path: string } | { kind: 'tcp'; host: string; port: number };

/** Feeds reply bytes; returns 'allow' / 'refuse' / 'other' when a whole reply has arrived, else undefined. */
export interface ReplyReader {
  feed(chunk: Buffer): Verdict | undefined;
}
export type Verdict = 'allow' | 'refuse' | 'other';

/** Postfix policy replies: "action=...\n\n". */
export function postfixReader(): ReplyReader {
  let pending = '';
  return {
    feed(chunk) {
      pending += chunk.toString('latin1');
      if (!pending.endsWith('\n\n')) return undefined;
      const reply = pending;
      pending = '';
      if (reply.startsWith('action=DUNNO\n')) return 'allow';
      if (reply.startsWith('action=554 ') || reply.startsWith('action=REJECT')) return 'refuse';
      return 'other';
    },
  };
}

/** The Dovecot policy reply's verdict: its JSON "status" (0 allow, -1 refuse). */
export function dovecotVerdict(ok: boolean, body: string): Verdict {
  if (!ok) return 'other';
  if (body.startsWith('{"status":0')) return 'allow';
  if (body.startsWith('{"status":-1')) return 'refuse';
  return 'other';
}

/** HTTP/1.1 responses with a Content-Length body; `verdict` reads one (ok: the status is 200). */
export function httpReader(verdict: (ok: boolean, body: string) => Verdict = dovecotVerdict): ReplyReader {
  let pending = '';
  let bodyStart = -1;
  let length = 0;
  return {
    feed(chunk) {
      pending += chunk.toString('latin1');
      if (bodyStart < 0) {
        const end = pending.indexOf('\r\n\r\n');
        if (end < 0) return undefined;
        const m = /\r\ncontent-length:[ \t]*(\d+)/i.exec(pending.slice(0, end + 2));
        if (!m) throw new Error(`HTTP response without Content-Length: ${JSON.stringify(pending.slice(0, 200))}`);
        length = Number(m[1]);
        bodyStart = end + 4;
      }
      if (pending.length < bodyStart + length) return undefined;
      if (pending.length > bodyStart + length) throw new Error('bytes after the HTTP response: the client sends one request at a time');
      const ok = pending.startsWith('HTTP/1.1 200 ');
      const body = pending.slice(bodyStart);
      pending = '';
      bodyStart = -1;
      return verdict(ok, body);
    },
  };
}

export interface LoadOptions {
  target: Target;
  connections: number;
  warmupMs: number;
  measureMs: number;
  /** Requests to cycle through; each connection starts at its own offset. */
  payloads: readonly Buffer[];
  reader: () => ReplyReader;
  /** Called at the start and end of the measured window (e.g. to sample the server's CPU time). */
  onWindow?: (edge: 'start' | 'end') => void;
  /**
   * Paced instead of closed loop: about this many requests per second in all, spread evenly over the
   * connections (a connection whose reply comes late sends its next request at once).
   */
  rate?: number;
}

export interface LoadResult {
  requests: number;
  seconds: number;
  /** Latencies in nanoseconds of the replies that arrived in the measured window, sorted ascending. */
  latencies: Float64Array;
  allowed: number;
  refused: number;
  other: number;
  /** The generator's own CPU time over the window, as a fraction of one core. */
  clientCpu: number;
}

function connect(t: Target): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = t.kind === 'unix' ? net.createConnection({ path: t.path }) : net.createConnection({ host: t.host, port: t.port, noDelay: true });
    s.once('connect', () => {
      s.off('error', reject);
      resolve(s);
    });
    s.once('error', reject);
  });
}

export async function runLoad(o: LoadOptions): Promise<LoadResult> {
  const sockets = await Promise.all(Array.from({ length: o.connections }, () => connect(o.target)));
  // Room for 500k replies/s; more than any single-core Node server here will do.
  const latencies = new Float64Array(Math.ceil((o.measureMs / 1000) * 500_000) + 1024);
  let recorded = 0;
  let phase: 'warmup' | 'measure' | 'stop' = 'warmup';
  let allowed = 0;
  let refused = 0;
  let other = 0;
  let failure: Error | undefined;
  let idle = 0;
  const count = o.payloads.length;

  return new Promise<LoadResult>((resolve, reject) => {
    let t0 = 0n;
    let t1 = 0n;
    let cpu0: NodeJS.CpuUsage = process.cpuUsage();
    let cpu1: NodeJS.CpuUsage = cpu0;
    let watchdog: NodeJS.Timeout | undefined;
    let finished = false;
    const finish = () => {
      if (finished) return;
      finished = true;
      clearTimeout(watchdog);
      for (const s of sockets) s.destroy();
      if (failure) return reject(failure);
      const used = latencies.subarray(0, Math.min(recorded, latencies.length)).sort();
      const seconds = Number(t1 - t0) / 1e9;
      const cpuMicros = cpu1.user - cpu0.user + (cpu1.system - cpu0.system);
      resolve({ requests: recorded, seconds, latencies: used, allowed, refused, other, clientCpu: cpuMicros / 1e6 / seconds });
    };
    const fail = (e: Error) => {
      failure ??= e;
      phase = 'stop';
      finish();
    };

    const interval = o.rate ? BigInt(Math.round((o.connections * 1e9) / o.rate)) : 0n;
    const begin = process.hrtime.bigint();
    sockets.forEach((socket, c) => {
      const reader = o.reader();
      let next = Math.floor((c * count) / o.connections);
      let sentAt = 0n;
      let done = false;
      // Paced: when this connection's next request is due (staggered so the connections do not send together).
      let due = begin + (interval * BigInt(c)) / BigInt(o.connections);
      const schedule = () => {
        if (interval === 0n) return send();
        due += interval;
        const wait = Number(due - process.hrtime.bigint()) / 1e6;
        if (wait <= 0) return send();
        setTimeout(send, wait);
      };
      const send = () => {
        if (phase === 'stop') {
          if (!done) {
            done = true;
            if (++idle === sockets.length) finish();
          }
          return;
        }
        const p = o.payloads[next] as Buffer;
        next = next + 1 === count ? 0 : next + 1;
        sentAt = process.hrtime.bigint();
        socket.write(p);
      };
      socket.on('data', (chunk: Buffer) => {
        let v: Verdict | undefined;
        try {
          v = reader.feed(chunk);
        } catch (e) {
          return fail(e as Error);
        }
        if (v === undefined) return;
        if (phase === 'measure') {
          const now = process.hrtime.bigint();
          if (recorded < latencies.length) latencies[recorded] = Number(now - sentAt);
          recorded++;
          if (v === 'allow') allowed++;
          else if (v === 'refuse') refused++;
          else other++;
        }
        schedule();
      });
      socket.on('error', (e) => fail(new Error(`connection ${c}: ${e.message}`)));
      socket.on('close', () => {
        if (phase !== 'stop') fail(new Error(`connection ${c} closed by the server mid-run`));
      });
      if (interval === 0n) send();
      else setTimeout(send, Number(due - begin) / 1e6);
    });

    setTimeout(() => {
      if (phase !== 'warmup') return;
      phase = 'measure';
      o.onWindow?.('start');
      cpu0 = process.cpuUsage();
      t0 = process.hrtime.bigint();
      setTimeout(() => {
        if (phase !== 'measure') return;
        t1 = process.hrtime.bigint();
        cpu1 = process.cpuUsage();
        o.onWindow?.('end');
        phase = 'stop';
        // Replies still in flight arrive and end each connection's loop (see send).
        watchdog = setTimeout(() => fail(new Error(`${sockets.length - idle} connections got no reply within 5 s`)), 5000);
      }, o.measureMs);
    }, o.warmupMs);
  });
}

/** The value at quantile q (0..1) of sorted latencies, in milliseconds. */
export function percentileMs(sorted: Float64Array, q: number): number {
  if (sorted.length === 0) return NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1));
  return (sorted[i] ?? NaN) / 1e6;
}
