// The Dovecot auth-policy endpoint: HTTP/1.1 with keep-alive. Thin: parse, ask the service, format.
import crypto from 'node:crypto';
import http from 'node:http';
import type net from 'node:net';
import { allowBody, parseDovecotBody, parsePasscodeBody, parseTarget, refuseBody } from './dovecot-protocol.js';
import type { PolicyService } from './service.js';

const JSON_HEADERS = { 'content-type': 'application/json' };

const digest = (s: string) => crypto.createHash('sha256').update(s).digest();

/** The configured key's digest, computed once per key (it changes only on reload). */
let keyCache: { key: string; digest: Buffer } | undefined;

/** Constant-time comparison of what the client sent with the configured key (digests: equal lengths). */
function keyMatches(presented: string, key: string): boolean {
  if (keyCache?.key !== key) keyCache = { key, digest: digest(key) };
  return crypto.timingSafeEqual(digest(presented), keyCache.digest);
}

/** Dovecot's two targets, parsed once; anything else goes through the URL parser. */
const FAST_TARGETS = new Map<string, { path: string; command: string }>([
  ['/?command=allow', { path: '/', command: 'allow' }],
  ['/?command=report', { path: '/', command: 'report' }],
  ['/?command=passcode', { path: '/', command: 'passcode' }],
]);

/** The key Dovecot sent: the configured header, or X-API-Key (Dovecot's default when no header name is given). */
function presentedKey(req: http.IncomingMessage, header: string): string | undefined {
  const v = req.headers[header] ?? req.headers['x-api-key'];
  return Array.isArray(v) ? v[0] : v;
}

export function createDovecotServer(service: PolicyService): http.Server {
  const server = http.createServer({ keepAlive: true }, (req, res) => {
    const send = (status: number, body: string, headers: http.OutgoingHttpHeaders = JSON_HEADERS) => {
      if (res.headersSent) return;
      res.writeHead(status, { ...headers, 'content-length': Buffer.byteLength(body) });
      res.end(body);
    };
    const fail = (status: number, error: string, drain = true) => {
      service.counters.badRequests++;
      const peer = req.socket.remoteAddress;
      service.logger.repeated('warn', 'bad-request', `dovecot ${peer ?? ''} ${status} ${error}`, { endpoint: 'dovecot', status, error, peer });
      if (!drain) res.setHeader('connection', 'close');
      send(status, JSON.stringify({ error }));
      if (!drain) req.destroy();
    };

    const fast = FAST_TARGETS.get(req.url ?? '');
    const target = fast ? { ok: true as const, value: fast } : parseTarget(req.url ?? '/');
    if (!target.ok) return fail(400, target.error);
    if (target.value.path !== '/') return fail(404, 'unknown path');
    if (req.method !== 'POST') return send(405, JSON.stringify({ error: 'use POST' }), { ...JSON_HEADERS, allow: 'POST' });
    const command = target.value.command;
    if (command !== 'allow' && command !== 'report' && command !== 'passcode') return fail(400, 'command must be "allow", "report" or "passcode"');

    const { apiKey, apiHeader, maxBodyBytes } = service.config.dovecot;
    if (apiKey !== '') {
      const key = presentedKey(req, apiHeader);
      if (key === undefined || !keyMatches(key, apiKey)) return fail(401, 'missing or wrong API key');
    }
    const declared = Number(req.headers['content-length'] ?? '0');
    if (declared > maxBodyBytes) return fail(413, `body larger than ${maxBodyBytes} bytes`, false);

    const chunks: Buffer[] = [];
    let size = 0;
    let tooBig = false;
    req.on('data', (c: Buffer) => {
      size += c.length;
      if (size > maxBodyBytes) {
        if (!tooBig) fail(413, `body larger than ${maxBodyBytes} bytes`, false);
        tooBig = true;
        return;
      }
      chunks.push(c);
    });
    req.on('error', () => req.destroy());
    req.on('end', () => {
      if (tooBig) return;
      if (command === 'passcode') {
        // Dovecot's Lua passdb: is this password an app passcode? (It sends only what has a passcode's shape.)
        const p = parsePasscodeBody(Buffer.concat(chunks).toString('utf8'));
        if (!p.ok) return fail(400, p.error);
        service.checkPasscode(p.value).then(
          (outcome) => {
            if (!outcome.ok) return send(400, JSON.stringify({ error: outcome.error }));
            const r = outcome.result;
            send(200, r.ok ? JSON.stringify({ result: 'ok', passcode: String(r.id) }) : JSON.stringify({ result: 'fail' }));
          },
          (e: unknown) => {
            service.logger.log('error', 'passcode-check-failed', { error: e instanceof Error ? e.message : String(e) });
            send(500, '{"error":"internal"}');
          },
        );
        return;
      }
      const parsed = parseDovecotBody(Buffer.concat(chunks).toString('utf8'), command);
      if (!parsed.ok) return fail(400, parsed.error);
      const r = parsed.value;
      if (command === 'report') {
        const stored = service.report(r.login, r.remote, r.protocol, r.success === true, r.policyReject === true, r.realRemote);
        if (!stored) return fail(400, 'report with an unacceptable login or remote address');
        return send(200, '{}');
      }
      const outcome = service.check({ endpoint: 'dovecot', login: r.login, remote: r.remote, realRemote: r.realRemote, protocol: r.protocol, passcode: r.passcode });
      // Refused by the service (and logged there): with auth_policy_reject_on_fail = yes, Dovecot refuses the login.
      if (!outcome.ok) return send(400, JSON.stringify({ error: outcome.error }));
      send(200, outcome.decision.allow ? allowBody() : refuseBody(outcome.message));
    });
  });
  // Dovecot keeps idle connections for 10 s; hold ours a little longer so it is the one to close them.
  server.keepAliveTimeout = 15_000;
  server.headersTimeout = 10_000;
  server.requestTimeout = 10_000;
  server.maxHeadersCount = 100;
  server.on('clientError', (err, socket) => {
    service.counters.badRequests++;
    const error = `malformed HTTP: ${err.message}`;
    const peer = 'remoteAddress' in socket ? (socket as net.Socket).remoteAddress : undefined;
    service.logger.repeated('warn', 'bad-request', `dovecot ${peer ?? ''} ${error}`, { endpoint: 'dovecot', error, peer });
    if (socket.writable) socket.end('HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n');
    else socket.destroy();
  });
  return server;
}
