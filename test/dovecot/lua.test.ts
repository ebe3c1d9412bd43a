// The Lua passdb (dovecot/mfagate-passcode.lua): Lua 5.4's own lint (Debian 12's dovecot-auth-lua links
// liblua5.4), no global but Dovecot's three hooks, and its logic run by the real Lua interpreter against a
// stand-in for Dovecot's `dovecot` module. The end-to-end test (test/e2e/passcodes.test.ts) runs it in Dovecot.
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import t from 'tap';
import { ROOT } from '../helpers/daemon.js';

const SCRIPT = path.join(ROOT, 'dovecot/mfagate-passcode.lua');

function lua(program: string, bin = 'lua5.4'): { status: number | null; out: string } {
  const r = spawnSync(bin, ['-'], { input: program, encoding: 'utf8' });
  if (r.error) throw new Error(`${bin} is missing (apt-get install lua5.4): ${r.error.message}`);
  return { status: r.status, out: r.stdout + r.stderr };
}

t.test('luac5.4 -p, and the globals it writes and reads', async (t) => {
  const r = spawnSync('luac5.4', ['-p', '-l', SCRIPT], { encoding: 'utf8' });
  if (r.error) throw new Error(`luac5.4 is missing (apt-get install lua5.4): ${r.error.message}`);
  t.equal(r.status, 0, r.stderr);
  const globals = (op: string) => [...new Set([...r.stdout.matchAll(new RegExp(`${op}\\s.*; _ENV "(\\w+)"`, 'g'))].map((m) => m[1]))].sort();
  t.same(globals('SETTABUP'), ['auth_password_verify', 'script_deinit', 'script_init'], 'only the hooks Dovecot calls are global');
  t.same(globals('GETTABUP'), ['dovecot', 'os', 'string', 'tostring'], 'it reads no other global (a typo would be one)');
});

// A stand-in for Dovecot's Lua API: var_expand from a table, an HTTP client that records each request and
// answers what the test set. Each case prints one line: the result, the field or message, and the request.
const HARNESS = `
local answer = { status = 200, body = '{"result":"ok","passcode":"42"}' }
local sent
dovecot = {
  auth = { PASSDB_RESULT_OK = "OK", PASSDB_RESULT_USER_UNKNOWN = "UNKNOWN", PASSDB_RESULT_PASSWORD_MISMATCH = "MISMATCH", PASSDB_RESULT_INTERNAL_FAILURE = "INTERNAL" },
  http = { client = function(settings)
    return { request = function(_, r)
      sent = { url = r.url, method = r.method, headers = {} }
      return {
        add_header = function(_, k, v) sent.headers[k] = v end,
        set_payload = function(_, p) sent.body = p end,
        submit = function() return { status = function() return answer.status end, payload = function() return answer.body end } end,
      }
    end }
  end },
}
local function req(vars)
  return { var_expand = function(_, s) return vars[s] or "" end }
end
dofile(${JSON.stringify(SCRIPT)})
assert(script_init() == 0)
local function case(name, service, password, status, body, login)
  answer.status, answer.body, sent = status or 200, body or '{"result":"ok","passcode":"42"}', nil
  local result, extra = auth_password_verify(req({ ["%s"] = service, ["%u"] = login or "alice", ["%{rip}"] = "203.0.113.9", ["%{real_rip}"] = "203.0.113.9" }), password)
  local field = type(extra) == "table" and ("mfagate_passcode=" .. tostring(extra.mfagate_passcode)) or tostring(extra)
  print(name .. "|" .. result .. "|" .. field .. "|" .. (sent and (sent.method .. " " .. sent.url .. " " .. tostring(sent.headers["X-Test-Key"]) .. "|" .. sent.body) or "not sent|"))
end
case("passcode", "imap", "abcd efgh jkmn pqrs")
case("hyphens and case", "pop3", "ABCD-EFGH-JKMN-PQRS")
case("site password", "imap", "correct horse battery")
case("15 letters", "imap", "abcdefghjkmnpqr")
case("17 letters", "imap", "abcdefghjkmnpqrst")
case("look-alike l", "imap", "abcdefghjkmnpqrl")
case("digit", "imap", "abcdefghjkmnpqr2")
case("webmail page check", "mfagate-web", "abcd efgh jkmn pqrs")
case("submission", "submission", "abcdefghjkmnpqrs")
case("wrong", "imap", "abcdefghjkmnpqrs", 200, '{"result":"fail"}')
case("down", "imap", "abcdefghjkmnpqrs", 503, '')
case("odd login", "imap", "abcdefghjkmnpqrs", 200, nil, 'a"b\\\\c' .. string.char(10))
`;

interface Case {
  result: string;
  field: string;
  request: string;
  body: unknown;
}

function cases(out: string): Map<string, Case> {
  return new Map(
    out
      .trim()
      .split('\n')
      .map((l) => {
        const [name = '', result = '', field = '', request = '', body = ''] = l.split('|');
        return [name, { result, field, request, body: body === '' ? undefined : (JSON.parse(body) as unknown) }];
      }),
  );
}

t.test('what it sends, and what it answers Dovecot', async (t) => {
  const env = `os.getenv = function(k) return ({ MFAGATE_PASSCODE_URL = "http://127.0.0.1:9/?command=passcode", MFAGATE_API_HEADER = "X-Test-Key", MFAGATE_API_KEY = "k3y" })[k] end\n`;
  const r = lua(env + HARNESS);
  t.equal(r.status, 0, r.out);
  const got = cases(r.out);
  const request = 'POST http://127.0.0.1:9/?command=passcode k3y';
  const body = (passcode: string, protocol = 'imap', login = 'alice') => ({ login, passcode, remote: '203.0.113.9', real_remote: '203.0.113.9', protocol });
  t.same(got.get('passcode'), { result: 'OK', field: 'mfagate_passcode=42', request, body: body('abcdefghjkmnpqrs') }, 'a passcode: sent without spaces, with the key; OK with its id');
  t.same(got.get('hyphens and case'), { result: 'OK', field: 'mfagate_passcode=42', request, body: body('abcdefghjkmnpqrs', 'pop3') }, 'hyphens and capitals taken off');
  for (const name of ['site password', '15 letters', '17 letters', 'look-alike l', 'digit', 'webmail page check']) {
    t.same(got.get(name), { result: 'UNKNOWN', field: '', request: 'not sent', body: undefined }, `${name}: not sent, on to the site's passdb`);
  }
  t.same(got.get('submission')?.body, body('abcdefghjkmnpqrs', 'submission'), "Dovecot's submission service too");
  t.same(got.get('wrong'), { result: 'MISMATCH', field: '', request, body: body('abcdefghjkmnpqrs') }, 'a wrong passcode: a mismatch (the chain goes on)');
  t.same(got.get('down'), { result: 'INTERNAL', field: 'mfagate answered 503', request, body: body('abcdefghjkmnpqrs') }, 'mfagate failing: an internal failure (the chain goes on)');
  t.same(got.get('odd login')?.body, body('abcdefghjkmnpqrs', 'imap', 'a"b\\c\n'), 'a login with a quote, a backslash and a newline is sent as valid JSON');
});

t.test('without a key it sends no key header', async (t) => {
  const r = lua(`os.getenv = function(k) return nil end\n` + HARNESS);
  t.equal(r.status, 0, r.out);
  t.equal(cases(r.out).get('passcode')?.request, 'POST http://127.0.0.1:8470/?command=passcode nil', 'the default URL, and no header');
});
