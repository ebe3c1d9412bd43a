// The webmail API: HTTP/1.1 JSON over a UNIX socket (and optionally TCP loopback with a bearer token).
// Thin: match the route, check the JSON body's shape, call MfaService, map its errors. The decisions, the
// proof rule and every limit live in mfa/service.ts. Described in docs/api.md and docs/openapi.yaml; the route
// table below is what test/api/openapi.test.ts compares with the OpenAPI file.
import crypto from 'node:crypto';
import http from 'node:http';
import { MfaError, type MfaService } from '../mfa/service.js';
import { StoreUnavailableError } from '../store/sqlite-file.js';
import { readLimitedBody } from './http-body.js';
import { type Logger, errorText } from './log.js';

export type HttpMethod = 'GET' | 'POST' | 'PUT' | 'DELETE';

/** What a handler gets: the normalised user, the path parameters, the query and the checked JSON body. */
export interface ApiRequest {
  user: string;
  params: Readonly<Record<string, string>>;
  query: URLSearchParams;
  body: Readonly<Record<string, unknown>>;
}

export interface ApiRoute {
  method: HttpMethod;
  /** The OpenAPI path template, e.g. "/v1/users/{user}/status". */
  path: string;
  operationId: string;
  /** The JSON body's fields, or null when the route takes no body. Other fields are refused. */
  body: { required: readonly string[]; optional: readonly string[] } | null;
  /** Query parameters (all optional). Others are refused. */
  query: readonly string[];
  handler(mfa: MfaService, r: ApiRequest): unknown;
}

// ---- the routes ------------------------------------------------------------------------------------------

const ip = (mfa: MfaService, r: ApiRequest) => mfa.ip(r.body['ip']);

function numericId(raw: string | undefined, what: string): number {
  if (raw === undefined || !/^[1-9]\d{0,15}$/.test(raw)) throw new MfaError('bad-request', `id: expected ${what}`);
  return Number(raw);
}

export const API_ROUTES: readonly ApiRoute[] = [
  {
    method: 'GET',
    path: '/v1/users/{user}/status',
    operationId: 'getStatus',
    body: null,
    query: ['ip'],
    handler: (mfa, r) => {
      const raw = r.query.get('ip');
      return mfa.status(r.user, raw === null ? undefined : mfa.ip(raw));
    },
  },
  {
    method: 'POST',
    path: '/v1/users/{user}/totp',
    operationId: 'beginTotp',
    body: { required: ['ip'], optional: ['factor'] },
    query: [],
    handler: (mfa, r) => mfa.totpBegin(r.user, ip(mfa, r), r.body['factor']),
  },
  {
    method: 'DELETE',
    path: '/v1/users/{user}/totp',
    operationId: 'removeTotp',
    body: { required: ['ip'], optional: ['factor'] },
    query: [],
    handler: async (mfa, r) => {
      await mfa.totpRemove(r.user, ip(mfa, r), r.body['factor']);
      return { removed: true };
    },
  },
  {
    method: 'POST',
    path: '/v1/users/{user}/totp/confirm',
    operationId: 'confirmTotp',
    body: { required: ['ip', 'code'], optional: [] },
    query: [],
    handler: (mfa, r) => mfa.totpConfirm(r.user, ip(mfa, r), r.body['code']),
  },
  {
    method: 'POST',
    path: '/v1/users/{user}/email',
    operationId: 'registerEmail',
    body: { required: ['ip', 'address'], optional: ['factor'] },
    query: [],
    handler: (mfa, r) => mfa.emailRegister(r.user, ip(mfa, r), r.body['address'], r.body['factor']),
  },
  {
    method: 'DELETE',
    path: '/v1/users/{user}/email',
    operationId: 'removeEmail',
    body: { required: ['ip'], optional: ['factor'] },
    query: [],
    handler: async (mfa, r) => {
      await mfa.emailRemove(r.user, ip(mfa, r), r.body['factor']);
      return { removed: true };
    },
  },
  {
    method: 'POST',
    path: '/v1/users/{user}/email/confirm',
    operationId: 'confirmEmail',
    body: { required: ['ip', 'code'], optional: [] },
    query: [],
    handler: (mfa, r) => mfa.emailConfirm(r.user, ip(mfa, r), r.body['code']),
  },
  {
    method: 'POST',
    path: '/v1/users/{user}/email/code',
    operationId: 'sendEmailCode',
    body: { required: ['ip'], optional: [] },
    query: [],
    handler: (mfa, r) => mfa.sendLoginCode(r.user, ip(mfa, r)),
  },
  {
    method: 'POST',
    path: '/v1/users/{user}/backup-codes',
    operationId: 'generateBackupCodes',
    body: { required: ['ip'], optional: ['factor'] },
    query: [],
    handler: (mfa, r) => mfa.backupGenerate(r.user, ip(mfa, r), r.body['factor']),
  },
  {
    method: 'POST',
    path: '/v1/users/{user}/verify',
    operationId: 'verifyFactor',
    body: { required: ['ip', 'factor'], optional: [] },
    query: [],
    handler: async (mfa, r) => ({ grant: await mfa.verify(r.user, ip(mfa, r), r.body['factor']) }),
  },
  {
    method: 'PUT',
    path: '/v1/users/{user}/mfa',
    operationId: 'enableMfa',
    body: { required: ['ip'], optional: [] },
    query: [],
    handler: (mfa, r) => mfa.enable(r.user, ip(mfa, r)),
  },
  {
    method: 'DELETE',
    path: '/v1/users/{user}/mfa',
    operationId: 'disableMfa',
    body: { required: ['ip'], optional: ['factor'] },
    query: [],
    handler: (mfa, r) => mfa.disable(r.user, ip(mfa, r), r.body['factor']),
  },
  {
    method: 'GET',
    path: '/v1/users/{user}/grants',
    operationId: 'listGrants',
    body: null,
    query: [],
    handler: async (mfa, r) => ({ grants: await mfa.grants(r.user) }),
  },
  {
    method: 'DELETE',
    path: '/v1/users/{user}/grants/{id}',
    operationId: 'revokeGrant',
    body: { required: ['ip'], optional: [] },
    query: [],
    handler: async (mfa, r) => {
      const id = numericId(r.params['id'], 'a grant number from the grants list');
      return { grant: await mfa.revokeGrant(r.user, ip(mfa, r), id) };
    },
  },
  {
    method: 'GET',
    path: '/v1/users/{user}/passcodes',
    operationId: 'listPasscodes',
    body: null,
    query: [],
    handler: async (mfa, r) => ({ passcodes: await mfa.passcodeList(r.user), app_passcodes: mfa.passcodeSettings() }),
  },
  {
    method: 'POST',
    path: '/v1/users/{user}/passcodes',
    operationId: 'createPasscode',
    body: { required: ['ip', 'name', 'factor'], optional: ['protocols'] },
    query: [],
    handler: (mfa, r) => mfa.passcodeCreate(r.user, ip(mfa, r), r.body['factor'], r.body['name'], r.body['protocols']),
  },
  {
    method: 'DELETE',
    path: '/v1/users/{user}/passcodes/{id}',
    operationId: 'revokePasscode',
    body: { required: ['ip'], optional: [] },
    query: [],
    handler: async (mfa, r) => {
      const id = numericId(r.params['id'], 'a passcode number from the passcodes list');
      return { passcode: await mfa.passcodeRevoke(r.user, ip(mfa, r), id) };
    },
  },
];

// ---- matching --------------------------------------------------------------------------------------------

interface CompiledPath {
  template: string;
  segments: { literal?: string; param?: string }[];
  routes: Map<string, ApiRoute>;
}

function compile(routes: readonly ApiRoute[]): CompiledPath[] {
  const byPath = new Map<string, CompiledPath>();
  for (const r of routes) {
    let p = byPath.get(r.path);
    if (!p) {
      const segments = r.path
        .split('/')
        .slice(1)
        .map((s) => {
          const m = /^\{([a-z_]+)\}$/.exec(s);
          return m ? { param: m[1] as string } : { literal: s };
        });
      p = { template: r.path, segments, routes: new Map() };
      byPath.set(r.path, p);
    }
    p.routes.set(r.method, r);
  }
  return [...byPath.values()];
}

const COMPILED = compile(API_ROUTES);

/** The path whose template matches, with its decoded parameters; a malformed %-escape is a bad request. */
function matchPath(pathname: string): { path: CompiledPath; params: Record<string, string> } | undefined {
  const parts = pathname.split('/').slice(1);
  for (const p of COMPILED) {
    if (p.segments.length !== parts.length) continue;
    const params: Record<string, string> = {};
    let ok = true;
    for (let i = 0; i < parts.length && ok; i++) {
      const seg = p.segments[i];
      const part = parts[i] ?? '';
      if (seg?.literal !== undefined) ok = seg.literal === part;
      else if (seg?.param !== undefined) {
        if (part === '') ok = false;
        else {
          try {
            params[seg.param] = decodeURIComponent(part);
          } catch {
            throw new MfaError('bad-request', `${seg.param}: malformed %-escape in the path`);
          }
        }
      }
    }
    if (ok) return { path: p, params };
  }
  return undefined;
}

// ---- the server ------------------------------------------------------------------------------------------

export interface ApiServerOptions {
  /**
   * The bearer token clients must send. Returning a string requires it; returning undefined requires none,
   * except on a TCP connection, which is then refused (a TCP listener without a token fails closed).
   */
  token: () => string | undefined;
  logger: Logger;
  maxBodyBytes: number;
}

/** An error the adapter itself raises (not in the service's catalogue). */
class HttpError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly headers: http.OutgoingHttpHeaders = {},
  ) {
    super(message);
  }
}

const digest = (s: string) => crypto.createHash('sha256').update(s, 'utf8').digest();

/** Constant-time comparison (of digests, so the lengths are equal and the token's length does not leak). */
function tokenMatches(presented: string, token: string): boolean {
  return crypto.timingSafeEqual(digest(presented), digest(token));
}

function describeFields(f: { required: readonly string[]; optional: readonly string[] }): string {
  const parts = [...f.required.map((k) => `"${k}"`), ...f.optional.map((k) => `"${k}" (optional)`)];
  return `a JSON object with ${parts.join(', ')}`;
}

function checkBody(route: ApiRoute, text: string, contentType: string | undefined): Record<string, unknown> {
  const spec = route.body;
  if (spec === null) return {};
  const expected = describeFields(spec);
  if (text.trim() === '') throw new MfaError('bad-request', `expected ${expected}; the body is empty`);
  if (contentType !== undefined && !/^application\/json\s*(;|$)/i.test(contentType)) {
    throw new HttpError(415, 'unsupported-media-type', `expected Content-Type: application/json, got ${JSON.stringify(contentType.slice(0, 100))}`);
  }
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch {
    // Not the parser's message: it can quote the body, and a body can hold a code.
    throw new MfaError('bad-request', `the body is not valid JSON; expected ${expected}`);
  }
  if (typeof data !== 'object' || data === null || Array.isArray(data)) throw new MfaError('bad-request', `expected ${expected}`);
  const o = data as Record<string, unknown>;
  const allowed = new Set([...spec.required, ...spec.optional]);
  const unknown = Object.keys(o).filter((k) => !allowed.has(k));
  if (unknown.length > 0) throw new MfaError('bad-request', `unknown field${unknown.length > 1 ? 's' : ''} ${unknown.map((k) => JSON.stringify(k.slice(0, 64))).join(', ')}; expected ${expected}`);
  const missing = spec.required.filter((k) => o[k] === undefined || o[k] === null);
  if (missing.length > 0) throw new MfaError('bad-request', `missing field${missing.length > 1 ? 's' : ''} ${missing.map((k) => `"${k}"`).join(', ')}; expected ${expected}`);
  return o;
}

function checkQuery(route: ApiRoute, query: URLSearchParams): void {
  for (const k of new Set(query.keys())) {
    if (!route.query.includes(k)) {
      const expected = route.query.length ? `expected ${route.query.map((q) => `"${q}"`).join(', ')}` : 'this route takes none';
      throw new MfaError('bad-request', `unknown query parameter ${JSON.stringify(k.slice(0, 64))}; ${expected}`);
    }
    if (query.getAll(k).length > 1) throw new MfaError('bad-request', `query parameter "${k}" given more than once`);
  }
}

const clip = (s: string, n = 128) => (s.length > n ? `${s.slice(0, n)}...` : s);

/** Statuses of requests turned away before any action: their log lines are counted when they repeat. */
const UNJUDGED = new Set([400, 401, 404, 405, 413, 415]);

export function createApiServer(mfa: MfaService, opts: ApiServerOptions): http.Server {
  const { logger, maxBodyBytes } = opts;

  const handle = async (req: http.IncomingMessage, res: http.ServerResponse): Promise<void> => {
    const started = process.hrtime.bigint();
    const method = req.method ?? '';
    let routeName = 'unknown';
    const fields: Record<string, unknown> = {};
    let status = 500;
    let payload: unknown;
    const headers: http.OutgoingHttpHeaders = {};
    let closeAfter = false;
    let level: 'info' | 'warn' | 'error' = 'info';
    try {
      // 1. Who is asking: the socket's file mode protects the UNIX socket; TCP needs the bearer token.
      const token = opts.token();
      const tcp = req.socket.remoteAddress !== undefined;
      if (token !== undefined || tcp) {
        const presented = /^Bearer +(\S+) *$/i.exec(req.headers.authorization ?? '')?.[1];
        if (token === undefined || token === '') {
          logger.log('error', 'api-no-token', { note: 'a TCP API listener has no token configured: refusing every request' });
          throw new HttpError(401, 'unauthorized', 'missing or wrong bearer token', { 'www-authenticate': 'Bearer' });
        }
        if (presented === undefined || !tokenMatches(presented, token)) {
          throw new HttpError(401, 'unauthorized', 'missing or wrong bearer token (expected "Authorization: Bearer <token>")', { 'www-authenticate': 'Bearer' });
        }
      }
      // 2. Which route.
      let url: URL;
      try {
        url = new URL(req.url ?? '/', 'http://api.invalid');
      } catch {
        throw new MfaError('bad-request', 'malformed request target');
      }
      const found = matchPath(url.pathname);
      if (!found) {
        fields['path'] = clip(url.pathname);
        throw new HttpError(404, 'not-found', `no such route: ${clip(url.pathname)} (see docs/api.md)`);
      }
      const route = found.path.routes.get(method);
      if (!route) {
        const allow = [...found.path.routes.keys()].join(', ');
        routeName = `${clip(method, 16)} ${found.path.template}`;
        throw new HttpError(405, 'method-not-allowed', `${found.path.template} takes ${allow}`, { allow });
      }
      routeName = `${route.method} ${route.path}`;
      fields['user'] = clip(found.params['user'] ?? '');
      // 3. The request: user, query, body.
      const text = await readLimitedBody(req, maxBodyBytes);
      if (text === undefined) throw new HttpError(413, 'too-large', `the body is larger than ${maxBodyBytes} bytes`);
      const user = mfa.user(found.params['user']);
      fields['user'] = user;
      checkQuery(route, url.searchParams);
      const body = checkBody(route, text, req.headers['content-type']);
      const rawIp = typeof body['ip'] === 'string' ? body['ip'] : url.searchParams.get('ip');
      if (rawIp !== null && rawIp !== undefined) fields['ip'] = clip(rawIp, 64);
      // 4. The action.
      payload = await route.handler(mfa, { user, params: found.params, query: url.searchParams, body });
      // A promise left in the answer (a forgotten await) would be sent as {}: an internal error instead.
      if (payload !== null && typeof payload === 'object' && Object.values(payload).some((v) => v instanceof Promise)) {
        throw new Error(`${routeName} answered with a pending promise in its payload`);
      }
      status = 200;
    } catch (caught) {
      // The store down (the database unreachable, the disk full): said as such, never as an internal error.
      const e = caught instanceof StoreUnavailableError ? new MfaError('store-unavailable') : caught;
      if (caught instanceof StoreUnavailableError) fields['detail'] = errorText(caught);
      if (e instanceof MfaError) {
        status = e.status;
        fields['error'] = e.code;
        if (e.code === 'bad-request') fields['detail'] = e.message;
        payload = { error: e.code, message: e.message };
        if (e.code === 'locked' || e.code === 'rate-limited') {
          const seconds = Math.max(1, Math.ceil((e.retryAfterMs ?? 1000) / 1000));
          headers['retry-after'] = String(seconds);
          payload = { error: e.code, message: e.message, retry_after: seconds };
        }
        level = status >= 500 ? 'error' : 'warn';
      } else if (e instanceof HttpError) {
        status = e.status;
        fields['error'] = e.code;
        Object.assign(headers, e.headers);
        payload = { error: e.code, message: e.message };
        // The rest of an oversized body is not read: close the connection instead of draining it.
        if (status === 413) closeAfter = true;
        level = 'warn';
      } else {
        status = 500;
        fields['error'] = 'internal';
        fields['detail'] = errorText(e);
        payload = { error: 'internal', message: 'internal error: the daemon log has the details' };
        level = 'error';
      }
    }
    const body = JSON.stringify(payload);
    if (!res.headersSent && !res.destroyed) {
      res.writeHead(status, {
        'content-type': 'application/json; charset=utf-8',
        // Answers carry secrets (a new TOTP secret, backup codes): nothing may keep them.
        'cache-control': 'no-store',
        'content-length': Buffer.byteLength(body),
        ...(closeAfter ? { connection: 'close' } : {}),
        ...headers,
      });
      res.end(body);
      if (closeAfter) res.once('finish', () => req.destroy());
    }
    const ms = Number(process.hrtime.bigint() - started) / 1e6;
    const line = { route: routeName, ...fields, status, ms: Math.round(ms * 100) / 100 };
    // Requests that never reached an action (no token, no such route, a malformed body) can come in floods.
    if (UNJUDGED.has(status)) logger.repeated(level, 'api', `${routeName} ${status} ${String(fields['error'])} ${req.socket.remoteAddress ?? 'unix'}`, line);
    else logger.log(level, 'api', line);
  };

  const server = http.createServer({ keepAlive: true }, (req, res) => {
    handle(req, res).catch((e: unknown) => {
      // Only a failure while answering gets here (the handler catches everything else).
      logger.log('error', 'api', { route: 'unknown', status: 500, error: 'internal', detail: errorText(e) });
      if (!res.headersSent) {
        res.writeHead(500, { 'content-type': 'application/json; charset=utf-8' });
        res.end('{"error":"internal","message":"internal error: the daemon log has the details"}');
      } else res.destroy();
    });
  });
  server.keepAliveTimeout = 5_000;
  server.headersTimeout = 10_000;
  server.requestTimeout = 30_000;
  server.maxHeadersCount = 100;
  server.on('clientError', (err, socket) => {
    const detail = `malformed HTTP: ${err.message}`;
    logger.repeated('warn', 'api', `clientError ${detail}`, { route: 'unknown', status: 400, error: 'bad-request', detail });
    if (socket.writable) socket.end('HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n');
    else socket.destroy();
  });
  return server;
}
