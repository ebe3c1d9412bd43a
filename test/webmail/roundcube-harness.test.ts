// The Roundcube harness itself (test/helpers/roundcube.ts): a real Roundcube 1.6 in front of a real Dovecot and
// Postfix, driven with plain HTTP requests and a cookie jar the way a browser would drive it. If Roundcube, PHP
// or the mail servers are missing, this fails: the webmail tests built on the harness would prove nothing.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import Database from 'better-sqlite3';
import t from 'tap';
import { type MailStack, startMailStack } from '../helpers/mailstack.js';
import { type Answer, RoundcubeClient as Client, type Roundcube, loginToken, phpLiteral, startRoundcube } from '../helpers/roundcube.js';

const BROWSER_IP = '198.51.100.7';

let stack: MailStack;
let rc: Roundcube;

t.before(async () => {
  stack = await startMailStack({ users: { alice: 'alice-pw' } });
  rc = await startRoundcube({
    imapPort: stack.imapPort,
    smtpPort: stack.smtpPort,
    // Roundcube's userlogins log: a line for each login, with the client's address.
    config: { log_logins: true },
  });
});

t.teardown(async () => {
  await Promise.allSettled([rc?.stop(), stack?.stop()]);
});

const loginForm = (token: string, pass: string): Record<string, string> => ({
  _task: 'login',
  _action: 'login',
  _token: token,
  _user: 'alice',
  _pass: pass,
  _timezone: 'UTC',
});

const roundcubeLog = (name: string) => {
  const file = path.join(rc.dir, 'logs', `${name}.log`);
  return fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : '';
};

/** The client address Roundcube stored for a session: rcube_utils::remote_addr(), which honours proxy_whitelist. */
function sessionIp(browser: Client): string | undefined {
  const id = browser.cookies.get('roundcube_sessid');
  const db = new Database(path.join(rc.dir, 'roundcube.db'), { readonly: true, fileMustExist: true });
  try {
    return (db.prepare('SELECT ip FROM session WHERE sess_id = ?').get(id) as { ip: string } | undefined)?.ip;
  } finally {
    db.close();
  }
}

const escape = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

async function logIn(browser: Client, headers: Record<string, string> = {}): Promise<Answer> {
  const first = await browser.request('GET', '/');
  return browser.request('POST', '/?_task=login', { form: loginForm(loginToken(first.body), 'alice-pw'), headers });
}

// ---------------------------------------------------------------------------------------------------------------

t.test('config values become PHP literals', async (t) => {
  t.equal(phpLiteral("it's a \\ test"), "'it\\'s a \\\\ test'");
  t.equal(phpLiteral('line\nbreak $x'), "'line\nbreak $x'");
  t.equal(phpLiteral(42), '42');
  t.equal(phpLiteral(-1.5), '-1.5');
  t.equal(phpLiteral(true), 'true');
  t.equal(phpLiteral(null), 'null');
  t.equal(phpLiteral(['a', 1, [false]]), "['a', 1, [false]]");
  t.equal(phpLiteral({ host: 'x', nested: { n: 1 }, gone: undefined }), "['host' => 'x', 'nested' => ['n' => 1]]");
  t.throws(() => phpLiteral(Number.NaN));
  t.throws(() => phpLiteral(undefined));
  t.throws(() => phpLiteral(new Date()));
  t.throws(() => phpLiteral([1, undefined]));
  const loop: Record<string, unknown> = {};
  loop.self = loop;
  t.throws(() => phpLiteral(loop));

  // And PHP reads them back as the same values.
  const value = {
    quotes: `it's "quoted" \\ and \\' and \\\\`,
    php: '$config ?> <?php \\n \\x41 {$x}\nline two',
    unicode: 'Grüße, 日本語',
    numbers: [0, -7, 0.5, -1.5, 1e-7, 123456789012],
    flags: [true, false, null],
    nested: { list: ['a', ['b']], empty: [], map: { 'a-b': 1, 'c d': 'e' } },
  };
  const r = spawnSync('php', ['-r', `echo json_encode(${phpLiteral(value)}, JSON_UNESCAPED_UNICODE);`], { encoding: 'utf8' });
  t.equal(r.status, 0, r.stderr);
  t.strictSame(JSON.parse(r.stdout || 'null'), value);
});

t.test('the login page is served with its assets, all from this server', async (t) => {
  const browser = new Client(rc.url);
  const page = await browser.request('GET', '/');
  t.equal(page.status, 200, rc.logs());
  t.match(page.body, /<form[^>]+id="login-form"/, 'the Elastic login form');
  t.ok(loginToken(page.body), 'with a _token');
  t.ok(browser.cookies.has('roundcube_sessid'), 'and a session cookie');
  // Every script and style the page links must come from the tree (program/js, skins, plugins links), not the
  // network: the browser tests run offline.
  const assets = [...page.body.matchAll(/<(?:script[^>]+src|link[^>]+href)="([^"]+)"/g)].map((m) => m[1] ?? '');
  t.ok(assets.length >= 5, `the page links scripts and styles (${assets.join(', ')})`);
  for (const asset of assets) {
    t.notMatch(asset, /^(https?:)?\/\//, `${asset} is local`);
    const a = await browser.request('GET', new URL(asset.replace(/&amp;/g, '&'), rc.url).href);
    t.equal(a.status, 200, `${asset} is served`);
  }
});

t.test('a wrong password is refused with 401, the right one opens the mailbox', async (t) => {
  const browser = new Client(rc.url);
  const first = await browser.request('GET', '/');
  const wrong = await browser.request('POST', '/?_task=login', { form: loginForm(loginToken(first.body), 'wrong') });
  t.equal(wrong.status, 401, 'a wrong password');
  t.match(wrong.body, /name="_user"/, 'shows the login form again');
  t.match(roundcubeLog('userlogins'), /Failed login for alice from 127\.0\.0\.1 in session/, 'and is logged');

  const right = await browser.request('POST', '/?_task=login', { form: loginForm(loginToken(wrong.body), 'alice-pw') });
  t.equal(right.status, 302, `the right password (${right.body.slice(0, 500)})`);
  t.match(right.headers.location ?? '', /^\.?\/?\?_task=mail(&|$)/, 'redirects to the mailbox');
  t.ok(browser.cookies.has('roundcube_sessauth'), 'sets the auth cookie');

  const mail = await browser.request('GET', new URL(right.headers.location ?? '', rc.url).href);
  t.equal(mail.status, 200);
  t.match(mail.body, /<body class="task-mail action-none/, 'the mail task');
  t.match(mail.body, /<table[^>]+id="messagelist"/, "Elastic's message list");
  t.match(mail.body, /<span class="header-title username">alice@mail\.test<\/span>/, "alice's identity");
  t.notMatch(mail.body, /name="_pass"/, 'no login form');
  t.match(stack.dovecotLog(), /imap-login: Info: Login: user=<alice>/, 'Roundcube logged in to Dovecot');
});

t.test("X-Forwarded-For from 127.0.0.1 is the browser's address", async (t) => {
  const proxied = new Client(rc.url);
  const login = await logIn(proxied, { 'X-Forwarded-For': BROWSER_IP });
  t.equal(login.status, 302);
  // The userlogins line gives REMOTE_ADDR with the header beside it (rcube_utils::remote_ip()) ...
  t.match(
    roundcubeLog('userlogins'),
    new RegExp(`Successful login for alice \\(ID: \\d+\\) from 127\\.0\\.0\\.1 \\(X-Forwarded-For: ${escape(BROWSER_IP)}\\) in session`),
  );
  // ... whoever sent it; what Roundcube believes (rcube_utils::remote_addr(), used for the session, the
  // sendmail log and plugins) follows proxy_whitelist.
  t.equal(sessionIp(proxied), BROWSER_IP, 'the session belongs to the browser');

  const direct = new Client(rc.url, '127.0.0.2');
  t.equal((await logIn(direct, { 'X-Forwarded-For': BROWSER_IP })).status, 302);
  t.equal(sessionIp(direct), '127.0.0.2', 'a client that is not the proxy cannot claim an address');
});

t.test('the mailbox sends mail through Postfix', async (t) => {
  const browser = new Client(rc.url);
  const xff = { 'X-Forwarded-For': BROWSER_IP };
  t.equal((await logIn(browser, xff)).status, 302, rc.logs());
  // The compose action redirects to itself with a compose ID, whose page holds the identity and the token.
  const start = await browser.request('GET', '/?_task=mail&_action=compose', { headers: xff });
  t.equal(start.status, 302);
  const location = start.headers.location ?? '';
  const id = /[?&]_id=([^&]+)/.exec(location)?.[1];
  t.ok(id, `a compose ID (${location})`);
  const compose = await browser.request('GET', new URL(location, rc.url).href, { headers: xff });
  t.equal(compose.status, 200);
  const from = /<select[^>]+name="_from"[^>]*>\s*<option value="(\d+)"/.exec(compose.body)?.[1];
  const token = /"request_token":"([^"]+)"/.exec(compose.body)?.[1];
  t.ok(from, 'an identity to send from');
  t.ok(token, 'a request token');
  const subject = `harness ${Date.now()}`;
  const sent = await browser.request('POST', '/?_task=mail&_unlock=1&_framed=1', {
    headers: xff,
    form: {
      _task: 'mail',
      _action: 'send',
      _id: id ?? '',
      _token: token ?? '',
      _from: from ?? '',
      _to: 'alice@mail.test',
      _subject: subject,
      _message: 'Sent by the Roundcube harness test.',
      _is_html: '0',
      // A fresh mailbox has no Sent folder: no copy to save.
      _store_target: '',
    },
  });
  t.equal(sent.status, 200, sent.body.slice(0, 2000));
  t.match(sent.body, /sent_successfully/, 'Roundcube reports the message sent');
  const message = await stack.waitForMessage('alice', (m) => m.includes(subject));
  t.match(message, /^From: alice <alice@mail\.test>$/m);
  t.match(stack.postfixLog(), /sasl_username=alice/, 'Roundcube authenticated to Postfix as alice');
  t.match(roundcubeLog('sendmail'), new RegExp(`User alice \\[${escape(BROWSER_IP)}\\]; Message `), "with the browser's address in its log");
});

t.test('stop() ends every PHP process and removes the tree; a second stop() is fine', async (t) => {
  const other = await startRoundcube({ imapPort: stack.imapPort });
  const pids = fs
    .readdirSync('/proc')
    .filter((n) => /^\d+$/.test(n))
    .filter((n) => {
      try {
        return fs.readlinkSync(`/proc/${n}/cwd`) === other.dir;
      } catch {
        return false;
      }
    });
  // The master and its PHP_CLI_SERVER_WORKERS workers.
  t.ok(pids.length > 1, `php -S runs with workers (${pids.length} processes)`);
  await other.stop();
  await other.stop();
  t.notOk(fs.existsSync(other.dir), 'the tree is gone');
  // Gone, not zombies: the master reaped its workers and this process reaped the master.
  for (const pid of pids) t.notOk(fs.existsSync(`/proc/${pid}`), `process ${pid} is gone`);
  t.match(other.logs(), /Development Server/, 'logs() still answers after stop()');
});
