// The page as the daemon runs it: bound on [web] listen next to the other endpoints, warnings at start for a
// setup that would fail users, a listener change on reload reported as needing a restart, closed on stop.
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import t from 'tap';
import { startInProcess } from '../helpers/daemon.js';

function get(port: number, p: string): Promise<{ status: number; body: string; headers: http.IncomingHttpHeaders }> {
  return new Promise((resolve, reject) => {
    http
      .get({ host: '127.0.0.1', port, path: p, headers: { 'Accept-Language': 'en' } }, (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (c: string) => (body += c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body, headers: res.headers }));
      })
      .on('error', reject);
  });
}

t.test('the daemon serves the page, warns about a missing auth socket and an insecure cookie, and closes it on stop', async (t) => {
  const d = await startInProcess('[web]\nlisten = ["127.0.0.1:0"]\nbase_path = "/mfa"\nsecure_cookie = false\ndovecot_auth_socket = "no-such.sock"\n');
  t.teardown(() => d.stop());
  const web = d.daemon.endpoints.web[0];
  if (web?.kind !== 'tcp') throw new Error('expected a TCP web endpoint');
  const r = await get(web.port, '/mfa/');
  t.equal(r.status, 200);
  t.match(r.body, '<html lang="en">');
  t.match(r.body, 'action="/mfa/signin"', 'the sign-in form, under the base path');
  t.match(String(r.headers['content-security-policy']), "default-src 'none'");

  const events = d.logs.map((l) => l['event']);
  t.ok(events.includes('web-cookie-not-secure'), 'secure_cookie = false is warned about');
  const missing = d.logs.find((l) => l['event'] === 'web-auth-socket-missing');
  t.equal(missing?.['socket'], path.join(d.dir, 'no-such.sock'), 'a missing Dovecot auth socket is named at start');
  t.notOk(events.includes('web-not-loopback'), 'a loopback listener is fine');
  t.same(d.logs.find((l) => l['event'] === 'started')?.['web'], [`127.0.0.1:${web.port}`], 'the start line says where the page is');

  // A listener change needs a restart; the running listener stays.
  const text = fs.readFileSync(d.configFile, 'utf8').replace(/listen = \["127\.0\.0\.1:0"\]\nbase_path/, 'listen = ["127.0.0.1:1"]\nbase_path');
  fs.writeFileSync(d.configFile, text);
  d.daemon.reload();
  const reloaded = d.logs.find((l) => l['event'] === 'reloaded');
  t.match(reloaded?.['restart_needed_for'], ['web.listen']);
  t.equal((await get(web.port, '/mfa/')).status, 200, 'the page still answers on its old port');

  await d.daemon.stop();
  await t.rejects(get(web.port, '/mfa/'), 'stopped: the port is closed');
});

t.test('a listener off loopback is warned about', async (t) => {
  const d = await startInProcess('[web]\nlisten = ["0.0.0.0:0"]\nsecure_cookie = true\n');
  t.teardown(() => d.stop());
  const warn = d.logs.find((l) => l['event'] === 'web-not-loopback');
  t.ok(warn, 'plain HTTP on every interface is warned about');
  t.notOk(d.logs.some((l) => l['event'] === 'web-cookie-not-secure'), 'a Secure cookie is not warned about');
});
