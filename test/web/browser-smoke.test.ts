// The browser infrastructure itself: Debian's Chromium driven by playwright-core against a tiny local HTTP server.
// A form is filled and posted, the server's echo is read back, the Accept-Language and X-Forwarded-For headers
// a page was given reach the server, Japanese text renders, and screenshots land in test-artifacts/screenshots.
// When Chromium is missing this file fails (launchChromium throws): it never skips.
import fs from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { DESKTOP, PHONE, SCREENSHOT_DIR, launchChromium, newPage, screenshot } from '../helpers/browser.js';

interface Seen {
  method: string;
  url: string;
  acceptLanguage: string | undefined;
  forwardedFor: string | undefined;
}

const seen: Seen[] = [];

function escapeHtml(s: string): string {
  return s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function page(body: string): string {
  return (
    '<!doctype html><html lang="ja"><head><meta charset="utf-8"><title>多要素認証</title>' +
    '<meta name="viewport" content="width=device-width, initial-scale=1">' +
    '<style>body{font-family:sans-serif;margin:2rem}label{display:block;margin-bottom:.5rem}</style></head>' +
    `<body><h1>多要素認証 (MFA)</h1>${body}</body></html>`
  );
}

const FORM =
  '<form method="post" action="/">' +
  '<label for="code">確認コード / Code</label>' +
  '<input id="code" name="code" autocomplete="one-time-code">' +
  '<button type="submit">送信する</button></form>';

const server = http.createServer((req, res) => {
  seen.push({
    method: req.method ?? '',
    url: req.url ?? '',
    acceptLanguage: req.headers['accept-language'],
    forwardedFor: typeof req.headers['x-forwarded-for'] === 'string' ? req.headers['x-forwarded-for'] : undefined,
  });
  const chunks: Buffer[] = [];
  req.on('data', (c: Buffer) => chunks.push(c));
  req.on('end', () => {
    let html: string;
    if (req.method === 'POST') {
      const code = new URLSearchParams(Buffer.concat(chunks).toString('utf8')).get('code') ?? '';
      html = page(`<p>受け取りました: <output id="echo">${escapeHtml(code)}</output></p>${FORM}`);
    } else if (req.url === '/' || req.url === '/?') {
      html = page(`<p>ログインを完了するには確認コードを入力してください。</p>${FORM}`);
    } else {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8', 'Cache-Control': 'no-store' }).end(html);
  });
});
await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
t.teardown(() => new Promise<void>((resolve) => server.close(() => resolve())));
const base = `http://127.0.0.1:${(server.address() as AddressInfo).port}/`;

const session = await launchChromium();
t.teardown(() => session.close());

/** The PNG's width and height from its IHDR chunk, after checking the signature. */
function pngSize(file: string): { width: number; height: number } {
  const png = fs.readFileSync(file);
  if (!png.subarray(0, 8).equals(Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]))) throw new Error(`${file}: not a PNG`);
  return { width: png.readUInt32BE(16), height: png.readUInt32BE(20) };
}

t.test('a form is filled, posted and echoed; headers reach the server; phone screenshot', async (t) => {
  const p = await newPage(session, { viewport: PHONE, locale: 'ja', headers: { 'X-Forwarded-For': '203.0.113.7' } });
  seen.length = 0;
  const res = await p.goto(base);
  t.equal(res?.status(), 200);
  t.equal(await p.locator('h1').textContent(), '多要素認証 (MFA)');
  t.match(seen[0], { method: 'GET', url: '/', forwardedFor: '203.0.113.7' });
  t.equal(seen[0]?.acceptLanguage, 'ja', 'locale "ja" is sent as Accept-Language, exactly');

  const value = 'コード-042 <&> "x"';
  await p.getByLabel('確認コード / Code').fill(value);
  // The URL stays the same (the form posts back to /), so wait for the POST's response, not for a URL.
  const posted = p.waitForResponse((r) => r.request().method() === 'POST');
  await p.getByRole('button', { name: '送信する' }).click();
  t.equal((await posted).status(), 200);
  await p.waitForLoadState('load');
  t.equal(await p.locator('#echo').textContent(), value, 'the posted value (UTF-8, HTML-escaped) is echoed');
  const post = seen.find((s) => s.method === 'POST');
  t.match(post, { url: '/', forwardedFor: '203.0.113.7' }, 'the extra header is sent with the form post too');
  t.equal(post?.acceptLanguage, 'ja');
  t.equal(await p.evaluate('navigator.language'), 'ja');

  const file = await screenshot(p, 'smoke');
  t.equal(file, path.join(SCREENSHOT_DIR, 'smoke.png'));
  t.ok(fs.statSync(file).size > 1000, 'the screenshot is not empty');
  t.equal(pngSize(file).width, PHONE.width, 'phone-width screenshot');
});

t.test('another context has its own locale and viewport; desktop screenshot', async (t) => {
  const p = await newPage(session, { locale: 'en-US' });
  seen.length = 0;
  await p.goto(base);
  t.equal(seen[0]?.acceptLanguage, 'en-US', 'locale "en-US" is sent as Accept-Language, exactly');
  t.equal(seen[0]?.forwardedFor, undefined, "the other context's extra header does not leak");
  t.equal(await p.evaluate('navigator.language'), 'en-US');

  // Per-page headers can be changed later (the context's locale still decides Accept-Language).
  await p.setExtraHTTPHeaders({ 'X-Forwarded-For': '2001:db8::5' });
  seen.length = 0;
  await p.reload();
  t.match(seen[0], { acceptLanguage: 'en-US', forwardedFor: '2001:db8::5' });

  const file = await screenshot(p, 'smoke-desktop');
  t.same(pngSize(file), { width: DESKTOP.width, height: DESKTOP.height }, 'a page shorter than the viewport fills it');
});

t.test('an exact Accept-Language header instead of a locale', async (t) => {
  const p = await newPage(session, { headers: { 'Accept-Language': 'de-CH,de;q=0.9' } });
  seen.length = 0;
  await p.goto(base);
  t.equal(seen[0]?.acceptLanguage, 'de-CH,de;q=0.9');
  await p.context().close();
  // Chromium would send the locale or the header, whichever wins a race: the helper refuses the combination.
  await t.rejects(newPage(session, { locale: 'ja', headers: { 'accept-language': 'de' } }), /not both/);
});

t.test('the profile is a fresh temp dir, removed when the browser closes', async (t) => {
  const p = await newPage(session);
  await p.goto('chrome://version');
  const profile = path.dirname((await p.locator('#profile_path').textContent()) ?? '');
  t.equal(path.dirname(profile), os.tmpdir(), `profile dir in the temp dir: ${profile}`);
  t.notMatch(profile, /\.config[/\\]chromium/, "never the user's own profile");
  t.ok(fs.existsSync(profile));
  await session.close();
  t.notOk(fs.existsSync(profile), 'removed on close');
  t.equal(session.browser.isConnected(), false);
});
