// docs/openapi.yaml and the served API agree, both ways: every route the daemon serves is documented with the
// same method, operationId, body fields and query parameters, and every documented operation is served (checked
// against the route table and against a running daemon). Every $ref resolves; every error code is documented.
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { parse } from 'yaml';
import { API_ROUTES } from '../../daemon/api-server.js';
import { MFA_ERRORS } from '../../mfa/service.js';
import { RULES } from '../../policy/rules.js';
import { type ApiDaemon, apiRequest, startApiDaemon } from '../helpers/api.js';
import { ROOT } from '../helpers/daemon.js';

type Obj = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

const FILE = path.join(ROOT, 'docs/openapi.yaml');
const doc = parse(fs.readFileSync(FILE, 'utf8')) as Obj;
const HTTP_METHODS = ['get', 'put', 'post', 'delete', 'options', 'head', 'patch', 'trace'];

/** Follows a local $ref ("#/components/schemas/X"); throws on a dangling one. */
function deref(node: Obj): Obj {
  let n = node;
  for (let i = 0; i < 10 && typeof n['$ref'] === 'string'; i++) {
    const ref = n['$ref'] as string;
    if (!ref.startsWith('#/')) throw new Error(`non-local $ref ${ref}`);
    let target: unknown = doc;
    for (const part of ref.slice(2).split('/')) target = (target as Obj | undefined)?.[part.replace(/~1/g, '/').replace(/~0/g, '~')];
    if (target === undefined) throw new Error(`dangling $ref ${ref}`);
    n = target as Obj;
  }
  return n;
}

/** Every operation in the file: [path, method, operation, path-level parameters]. */
function operations(): [string, string, Obj, Obj[]][] {
  const out: [string, string, Obj, Obj[]][] = [];
  for (const [p, item] of Object.entries(doc['paths'] as Obj)) {
    for (const m of Object.keys(item as Obj)) {
      if (HTTP_METHODS.includes(m)) out.push([p, m.toUpperCase(), (item as Obj)[m] as Obj, ((item as Obj)['parameters'] ?? []) as Obj[]]);
    }
  }
  return out;
}

t.test('the file is OpenAPI 3.1 and every $ref resolves', async (t) => {
  t.match(doc['openapi'], /^3\.1\.\d+$/);
  t.ok(doc['info']?.title && doc['info']?.version, 'info');
  const refs: string[] = [];
  const walk = (n: unknown) => {
    if (Array.isArray(n)) n.forEach(walk);
    else if (n && typeof n === 'object') {
      for (const [k, v] of Object.entries(n)) {
        if (k === '$ref' && typeof v === 'string') refs.push(v);
        else walk(v);
      }
    }
  };
  walk(doc);
  t.ok(refs.length > 20, 'it uses $refs');
  for (const r of new Set(refs)) t.doesNotThrow(() => deref({ $ref: r }), r);
});

t.test('served routes -> documented operations', async (t) => {
  for (const route of API_ROUTES) {
    const label = `${route.method} ${route.path}`;
    const item = doc['paths']?.[route.path] as Obj | undefined;
    const op = item?.[route.method.toLowerCase()] as Obj | undefined;
    if (!t.ok(op, `${label} is documented`) || !op || !item) continue;
    t.equal(op['operationId'], route.operationId, `${label}: operationId`);

    // Parameters: every {param} of the template is a documented path parameter; the query parameters match.
    const params = [...((item['parameters'] ?? []) as Obj[]), ...((op['parameters'] ?? []) as Obj[])].map(deref);
    for (const name of [...route.path.matchAll(/\{([a-z_]+)\}/g)].map((m) => m[1])) {
      t.ok(params.some((p) => p['in'] === 'path' && p['name'] === name && p['required'] === true), `${label}: path parameter ${name}`);
    }
    t.same(
      params.filter((p) => p['in'] === 'query').map((p) => p['name']).sort(),
      [...route.query].sort(),
      `${label}: query parameters`,
    );

    // The body: same fields, same required ones, nothing else allowed.
    if (route.body === null) {
      t.notOk(op['requestBody'], `${label}: no request body`);
    } else {
      const rb = op['requestBody'] ? deref(op['requestBody'] as Obj) : undefined;
      t.equal(rb?.['required'], true, `${label}: request body required`);
      const schema = rb ? deref(rb['content']?.['application/json']?.['schema'] as Obj) : {};
      t.equal(schema['type'], 'object', `${label}: body is an object`);
      t.equal(schema['additionalProperties'], false, `${label}: no other fields`);
      t.same(Object.keys(schema['properties'] ?? {}).sort(), [...route.body.required, ...route.body.optional].sort(), `${label}: body fields`);
      t.same([...(schema['required'] ?? [])].sort(), [...route.body.required].sort(), `${label}: required body fields`);
    }

    // Responses: the success, bad input, the token, an internal error, and the generic ones.
    const responses = (op['responses'] ?? {}) as Obj;
    for (const code of ['200', '400', '401', '500', 'default']) t.ok(responses[code], `${label}: documents ${code}`);
    t.ok(deref(responses['200'] as Obj)['content']?.['application/json']?.['schema'], `${label}: 200 has a JSON schema`);
  }
});

t.test('documented operations -> served routes', async (t) => {
  for (const [p, method, op] of operations()) {
    const route = API_ROUTES.find((r) => r.path === p && r.method === method);
    t.ok(route, `${method} ${p} (${String(op['operationId'])}) is served`);
  }
  t.equal(operations().length, API_ROUTES.length, 'as many operations as routes');
  const ids = operations().map(([, , op]) => op['operationId'] as string);
  t.equal(new Set(ids).size, ids.length, 'operationIds are unique');
});

t.test('error codes and rules: the file knows every one the API can answer', async (t) => {
  const documented = deref(doc['components']['schemas']['Error'] as Obj)['properties']['error']['enum'] as string[];
  const served = [...Object.keys(MFA_ERRORS), 'unauthorized', 'not-found', 'method-not-allowed', 'too-large', 'unsupported-media-type', 'internal'];
  t.same([...documented].sort(), served.sort(), 'Error.error enum');
  const rules = deref(doc['components']['schemas']['Status'] as Obj)['properties']['login']['properties']['rule']['enum'] as string[];
  t.same([...rules].sort(), Object.keys(RULES).sort(), 'Status.login.rule enum');
  // Every status an MfaError can have is documented on some operation.
  const statuses = new Set(operations().flatMap(([, , op]) => Object.keys(op['responses'] as Obj)));
  for (const [code, e] of Object.entries(MFA_ERRORS)) t.ok(statuses.has(String(e.status)), `${code} (${e.status}) documented`);
  t.ok(deref(doc['components']['securitySchemes']['bearerToken'] as Obj)['scheme'] === 'bearer', 'bearer security scheme');
});

t.test('the running daemon serves exactly what the file documents', async (t) => {
  const d: ApiDaemon = await startApiDaemon();
  t.teardown(() => d.stop());
  const to = { socketPath: d.apiSocket };
  for (const [p, item] of Object.entries(doc['paths'] as Obj)) {
    const target = p.replace('{user}', 'openapi-probe').replace('{id}', '1');
    for (const m of HTTP_METHODS.filter((x) => x !== 'head' && x !== 'trace' && x !== 'options')) {
      const documented = m in (item as Obj);
      const body = m === 'get' ? undefined : {};
      const r = await apiRequest(to, m.toUpperCase(), target, body);
      if (documented) t.not(r.status, 404, `${m.toUpperCase()} ${p}: served (not 404)`) && t.not(r.status, 405, `${m.toUpperCase()} ${p}: served (not 405)`);
      else t.equal(r.status, 405, `${m.toUpperCase()} ${p}: not documented, 405`);
    }
  }
  t.equal((await apiRequest(to, 'GET', '/v1/users/openapi-probe/undocumented')).status, 404, 'an undocumented path: 404');
});
