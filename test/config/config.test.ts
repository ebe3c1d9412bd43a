import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { ConfigError, DEFAULT_DOVECOT_MESSAGE, loadConfig, locateConfig, parseConfigText } from '../../config/config.js';
import { formatDuration, parseDuration } from '../../config/duration.js';
import { parseEndpoint } from '../../config/listen.js';

const problemsOf = (text: string): string[] => {
  try {
    parseConfigText(text, '/etc/mfagate/mfagate.toml');
  } catch (e) {
    if (e instanceof ConfigError) return e.problems;
    throw e;
  }
  return [];
};

t.test('built-in defaults work on a fresh checkout', async (t) => {
  const c = loadConfig(undefined, '/srv/checkout');
  t.equal(c.file, undefined);
  t.equal(c.store.path, '/srv/checkout/var/mfagate.db');
  t.same(c.dovecot.listen, [{ kind: 'tcp', host: '127.0.0.1', port: 8470 }]);
  t.same(c.postfix.listen, [{ kind: 'unix', path: '/srv/checkout/var/postfix-policy.sock' }]);
  t.equal(c.postfix.socketMode, 0o660);
  t.equal(c.grants.ttlMs, 14 * 3600_000);
  t.equal(c.grants.ipv6Prefix, 64);
  t.equal(c.enforcement.mode, 'enforce');
  t.equal(c.enforcement.requiredFrom, undefined);
  t.same(c.enforcement.protocols, ['imap', 'pop3', 'smtp', 'submission', 'sieve']);
  t.equal(c.dovecot.message, DEFAULT_DOVECOT_MESSAGE);
  t.match(c.dovecot.message, /^\[AUTHENTICATIONFAILED\] [\x20-\x7e]+$/);
  t.same(c.web, {
    listen: [{ kind: 'tcp', host: '127.0.0.1', port: 8480 }],
    basePath: '',
    trustedProxies: [],
    dovecotAuthSocket: '/run/dovecot/auth-client',
    firstRegistration: 'anywhere',
    secureCookie: true,
    sessionIdleMs: 15 * 60_000,
  });
  t.same(c.appPasscodes, { enabled: false, protocols: ['imap', 'pop3', 'smtp', 'sieve'], maxPerUser: 20, ttlMs: undefined });
});

t.test('[app_passcodes]', async (t) => {
  const c = parseConfigText('[app_passcodes]\nenabled = true\nprotocols = ["imap", "smtp", "imap"]\nmax_per_user = 5\nttl = "365d"\n', '/etc/mfagate/mfagate.toml');
  t.same(c.appPasscodes, { enabled: true, protocols: ['imap', 'smtp'], maxPerUser: 5, ttlMs: 365 * 86_400_000 });
  for (const [text, error] of [
    ['protocols = ["ftp"]', /app_passcodes\.protocols\.0: expected "imap", "pop3", "smtp" or "sieve"/],
    ['protocols = []', /app_passcodes\.protocols: expected at least one protocol/],
    ['max_per_user = 0', /app_passcodes\.max_per_user: expected 1\.\.100/],
    ['ttl = "forever"', /app_passcodes\.ttl: expected a duration/],
    ['enable = true', /app_passcodes\.enable: unknown key/],
  ] as const) {
    t.throws(() => parseConfigText(`[app_passcodes]\n${text}\n`, 'f.toml'), error, text);
  }
});

t.test('a full file, relative paths against the file directory', async (t) => {
  const c = parseConfigText(
    `
[store]
path = "state/m.db"
[grants]
ttl = "1h30m"
ipv4_prefix = 24
ipv6_prefix = 56
[networks]
trusted = ["10.0.0.0/8", "2001:db8:ca::/48"]
untrusted = ["10.20.0.0/16"]
webmail = ["192.0.2.10"]
[enforcement]
mode = "log-only"
required_from = "2026-04-01T00:00:00+09:00"
exempt_users = ["SVC@example.ac.jp"]
protocols = ["IMAP", "pop3"]
[users]
strip_realms = ["example.ac.jp"]
[dovecot]
listen = ["127.0.0.1:9000", "[::1]:9000", "unix:run/dovecot.sock"]
api_key = "k"
message = "[AUTHENTICATIONFAILED] MFA required: see https://mail.example.ac.jp/mfa"
messages = { pop3 = "MFA required (POP)" }
[postfix]
listen = ["unix:/run/mfagate/policy.sock", "127.0.0.1:9001"]
socket_mode = "0666"
reject_action = "REJECT MFA required"
[web]
listen = ["127.0.0.1:9002", "unix:run/web.sock"]
base_path = "/mail/mfa/"
trusted_proxies = ["127.0.0.1", "2001:db8:ca::10"]
dovecot_auth_socket = "run/auth-client"
first_registration = "trusted-only"
secure_cookie = false
session_idle = "1h30m"
`,
    '/etc/mfagate/mfagate.toml',
  );
  t.equal(c.store.path, '/etc/mfagate/state/m.db');
  t.equal(c.grants.ttlMs, 90 * 60_000);
  t.equal(c.enforcement.requiredFrom, Date.parse('2026-03-31T15:00:00Z'));
  t.same(c.enforcement.exemptUsers, ['svc'], 'exempt users are normalised like logins');
  t.same(c.enforcement.protocols, ['imap', 'pop3']);
  t.same(c.dovecot.listen[1], { kind: 'tcp', host: '::1', port: 9000 });
  t.same(c.dovecot.listen[2], { kind: 'unix', path: '/etc/mfagate/run/dovecot.sock' });
  t.equal(c.postfix.socketMode, 0o666);
  t.equal(c.dovecot.messages['pop3'], 'MFA required (POP)');
  t.same(c.web, {
    listen: [
      { kind: 'tcp', host: '127.0.0.1', port: 9002 },
      { kind: 'unix', path: '/etc/mfagate/run/web.sock' },
    ],
    basePath: '/mail/mfa',
    trustedProxies: ['127.0.0.1', '2001:db8:ca::10'],
    dovecotAuthSocket: '/etc/mfagate/run/auth-client',
    firstRegistration: 'trusted-only',
    secureCookie: false,
    sessionIdleMs: 90 * 60_000,
  });
});

t.test('[web]: no listener means no page; base_path is normalised; session_idle is bounded', async (t) => {
  const web = (text: string) => parseConfigText(`[web]\n${text}\n`, '/etc/mfagate/mfagate.toml').web;
  t.same(web('listen = []').listen, [], 'an empty list is allowed here (no web page)');
  t.same(web('listen = ["[::1]:8480"]').listen, [{ kind: 'tcp', host: '::1', port: 8480 }]);
  const table: [string, string][] = [
    ['/', ''],
    ['/mfa', '/mfa'],
    ['/mfa/', '/mfa'],
    ['/mail/mfa', '/mail/mfa'],
    ['/a.b_c~d-e/', '/a.b_c~d-e'],
    ['/.well-known', '/.well-known'],
  ];
  for (const [given, want] of table) t.equal(web(`base_path = "${given}"`).basePath, want, given);
  t.equal(web('dovecot_auth_socket = "/var/run/dovecot/auth-client"').dovecotAuthSocket, '/var/run/dovecot/auth-client', 'absolute paths stay');
  t.equal(web('session_idle = "1m"').sessionIdleMs, 60_000, 'the shortest');
  t.equal(web('session_idle = "24h"').sessionIdleMs, 86_400_000, 'the longest');
  t.equal(web('session_idle = "1d"').sessionIdleMs, 86_400_000, 'one day is 24h');
});

t.test('a TOML date-time works for required_from; a local one does not', async (t) => {
  const c = parseConfigText('[enforcement]\nrequired_from = 2026-04-01T00:00:00+09:00\n', '/x.toml');
  t.equal(c.enforcement.requiredFrom, Date.parse('2026-03-31T15:00:00Z'));
  t.match(problemsOf('[enforcement]\nrequired_from = 2026-04-01T00:00:00\n').join(), /enforcement\.required_from: expected an RFC 3339 instant/);
});

t.test('errors name the file, the key and what was expected', async (t) => {
  const table: [string, RegExp][] = [
    ['[grants]\nttl = "14 hours"', /^grants\.ttl: expected a duration such as "14h"/],
    ['[grants]\nttl = 14', /^grants\.ttl: /],
    ['[grants]\nipv6_prefix = 200', /^grants\.ipv6_prefix: expected 16\.\.128/],
    ['[networks]\ntrusted = ["10.0.0.0/33"]', /^networks\.trusted\.0: expected an IP address or CIDR range/],
    ['[enforcement]\nmode = "strict"', /^enforcement\.mode: expected "enforce", "log-only" or "off"/],
    ['[enforcement]\nrequired_from = "tomorrow"', /^enforcement\.required_from: expected an RFC 3339 instant/],
    ['[dovecot]\nlisten = ["8470"]', /^dovecot\.listen\.0: expected "host:port"/],
    ['[dovecot]\nlisten = ["example.com:8470"]', /^dovecot\.listen\.0: /],
    ['[dovecot]\nlisten = []', /^dovecot\.listen: expected at least one listener/],
    ['[web]\nlisten = ["8480"]', /^web\.listen\.0: expected "host:port"/],
    ['[web]\nlisten = "127.0.0.1:8480"', /^web\.listen: /],
    ['[web]\nbase_path = "mfa"', /^web\.base_path: expected a URL path such as "\/" or "\/mfa"/],
    ['[web]\nbase_path = ""', /^web\.base_path: expected a URL path/],
    ['[web]\nbase_path = "//mfa"', /^web\.base_path: expected a URL path/],
    ['[web]\nbase_path = "/mail//mfa"', /^web\.base_path: expected a URL path/],
    ['[web]\nbase_path = "/mail/../mfa"', /^web\.base_path: expected a URL path/],
    ['[web]\nbase_path = "/mfa/."', /^web\.base_path: expected a URL path/],
    ['[web]\nbase_path = "/mfa?x=1"', /^web\.base_path: expected a URL path/],
    ['[web]\nbase_path = "/m fa"', /^web\.base_path: expected a URL path/],
    ['[web]\nbase_path = "/多要素"', /^web\.base_path: expected a URL path/],
    ['[web]\ntrusted_proxies = ["proxy.example.ac.jp"]', /^web\.trusted_proxies\.0: expected an IP address or CIDR range/],
    ['[web]\ndovecot_auth_socket = ""', /^web\.dovecot_auth_socket: expected a socket path/],
    ['[web]\nfirst_registration = "campus"', /^web\.first_registration: expected "anywhere" or "trusted-only"/],
    ['[web]\nsecure_cookie = "yes"', /^web\.secure_cookie: /],
    ['[web]\nsession_idle = "soon"', /^web\.session_idle: expected a duration such as "14h"/],
    ['[web]\nsession_idle = "59s"', /^web\.session_idle: expected a duration from "1m" to "24h"/],
    ['[web]\nsession_idle = "24h1s"', /^web\.session_idle: expected a duration from "1m" to "24h"/],
    ['[web]\nsession_idle = "2d"', /^web\.session_idle: expected a duration from "1m" to "24h"/],
    ['[web]\nsesion_idle = "1h"', /^web\.sesion_idle: unknown key/],
    ['[dovecot]\nmessage = "多要素認証が必要です"', /^dovecot\.message: expected .* printable ASCII/],
    ['[dovecot]\nmessage = "line\\nbreak"', /^dovecot\.message: /],
    ['[postfix]\nreject_action = "please go away"', /^postfix\.reject_action: expected an access\(5\) action/],
    ['[postfix]\nsocket_mode = "rw"', /^postfix\.socket_mode: expected an octal mode/],
    ['[postfix]\nlisten = ["unix:' + 'x'.repeat(120) + '"]', /^postfix\.listen\.0: .*107 bytes/],
    ['[grant]\nttl = "1h"', /^grant: unknown key/],
    ['[grants]\ntll = "1h"', /^grants\.tll: unknown key/],
    ['[users]\nstrip_realms = ["@example.ac.jp"]', /^users\.strip_realms\.0: expected a domain/],
    ['[store\npath = 1', /^line 1, column \d+: not valid TOML/],
  ];
  for (const [text, re] of table) {
    let err: unknown;
    try {
      parseConfigText(text, '/etc/mfagate/mfagate.toml');
    } catch (e) {
      err = e;
    }
    t.type(err, ConfigError, text);
    if (!(err instanceof ConfigError)) continue;
    t.match(err.problems[0] ?? '', re, text);
    t.match(err.message, /^\/etc\/mfagate\/mfagate\.toml: /, 'names the file');
  }
  t.equal(problemsOf('[grants]\nttl = "x"\n[enforcement]\nmode = "y"').length, 2, 'every problem is reported at once');
  t.same(problemsOf('[web]\nsession_idle = "soon"'), ['web.session_idle: expected a duration such as "14h", "30m", "90s" or "1h30m"'], 'a bad duration is one problem, not two');
});

t.test('locating the file: --config, $MFAGATE_CONFIG, ./mfagate.toml, defaults', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mfagate-cfg-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  t.equal(locateConfig(undefined, {}, dir), undefined);
  fs.writeFileSync(path.join(dir, 'mfagate.toml'), '');
  t.equal(locateConfig(undefined, {}, dir), path.join(dir, 'mfagate.toml'));
  t.equal(locateConfig(undefined, { MFAGATE_CONFIG: 'env.toml' }, dir), path.join(dir, 'env.toml'));
  t.equal(locateConfig('/etc/x.toml', { MFAGATE_CONFIG: 'env.toml' }, dir), '/etc/x.toml');
  t.throws(() => loadConfig(path.join(dir, 'missing.toml')), /missing\.toml: cannot read the file/);
});

t.test('durations and endpoints', async (t) => {
  t.equal(parseDuration('14h'), 14 * 3600_000);
  t.equal(parseDuration('30m'), 1800_000);
  t.equal(parseDuration('90s'), 90_000);
  t.equal(parseDuration('1d2h'), 26 * 3600_000);
  for (const bad of ['', '0s', '14', 'h', '-1h', '1.5h', '14 h', '1w']) t.equal(parseDuration(bad), undefined, bad);
  t.equal(formatDuration(50_400_000), '14h');
  t.equal(formatDuration(5_400_000), '1h30m');
  t.same(parseEndpoint('127.0.0.1:1', '/'), { kind: 'tcp', host: '127.0.0.1', port: 1 });
  t.same(parseEndpoint('[::1]:65535', '/'), { kind: 'tcp', host: '::1', port: 65535 });
  t.same(parseEndpoint('localhost:25', '/'), { kind: 'tcp', host: 'localhost', port: 25 });
  for (const bad of ['127.0.0.1:65536', '::1:80', '[::1]', 'unix:', '127.0.0.1', '[zz]:1']) t.equal(parseEndpoint(bad, '/'), undefined, bad);
});
