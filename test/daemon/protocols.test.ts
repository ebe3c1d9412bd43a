// Parsing and formatting for both endpoints, including hostile input (no sockets here; see endpoints.test.ts).
import t from 'tap';
import { allowBody, parseDovecotBody, parseTarget, refuseBody, repeatedTopLevelKey } from '../../daemon/dovecot-protocol.js';
import { PolicyProtocolError, PostfixParser, formatReply } from '../../daemon/postfix-protocol.js';

t.test('Dovecot: the bodies a real 2.3 sends', async (t) => {
  const dflt = parseDovecotBody('{"device_id":"","login":"alice","protocol":"imap","pwhash":"0a91","remote":"127.0.0.1","session_id":"LoqUpcFgEr5/AAAB","tls":false}');
  t.same(dflt, { ok: true, value: { login: 'alice', remote: '127.0.0.1', realRemote: undefined, protocol: 'imap', success: undefined, policyReject: undefined } });
  const rec = parseDovecotBody('{"local":"127.0.0.1","login":"alice","mech":"PLAIN","protocol":"smtp","real_remote":"127.0.0.9","remote":"127.0.0.9","secured":"","session_id":"","tls":false}');
  t.same(rec.ok && rec.value.realRemote, '127.0.0.9');
  const report = parseDovecotBody('{"login":"alice","protocol":"imap","remote":"127.0.0.1","success":true,"policy_reject":false,"tls":false}');
  t.same(report.ok && [report.value.success, report.value.policyReject], [true, false]);
  const v24 = parseDovecotBody('{"login":"alice","remote_ip":"2001:db8::1","real_remote_ip":"::1","protocol":"pop3","extra":{"nested":"x"}}');
  t.same(v24.ok && [v24.value.remote, v24.value.realRemote], ['2001:db8::1', '::1'], '2.4 names and unknown nested attributes');
});

t.test('Dovecot: hostile and broken bodies', async (t) => {
  const bad: [string, RegExp][] = [
    ['', /not JSON/],
    ['{', /not JSON/],
    ['[]', /not a JSON object/],
    ['null', /not a JSON object/],
    ['"alice"', /not a JSON object/],
    ['{"remote":"1.2.3.4"}', /missing "login"/],
    ['{"login":"","remote":"1.2.3.4"}', /missing "login"/],
    ['{"login":"alice"}', /missing "remote"/],
    ['{"login":5,"remote":"1.2.3.4","protocol":"imap"}', /"login" is not a string/],
    ['{"login":"a","remote":["1.2.3.4"],"protocol":"imap"}', /"remote" is not a string/],
    ['{"__proto__":{"login":"x"},"remote":"1.2.3.4","protocol":"imap"}', /missing "login"/],
    // A request that cannot be judged is refused (400), never let through as an unenforced protocol.
    ['{"login":"alice","remote":"1.2.3.4"}', /missing "protocol"/],
    ['{"login":"alice","remote":"1.2.3.4","protocol":""}', /missing "protocol"/],
    ['{"login":"alice","remote":"1.2.3.4","protocol":"imap "}', /"protocol" is not a protocol name/],
    ['{"login":"alice","remote":"1.2.3.4","protocol":" imap"}', /"protocol" is not a protocol name/],
    ['{"login":"alice","remote":"1.2.3.4","protocol":"im\\nap"}', /"protocol" is not a protocol name/],
    ['{"login":"alice","remote":"1.2.3.4","protocol":5}', /"protocol" is not a string/],
    ['{"login":"alice","remote":"1.2.3.4","protocol":{"x":"imap"}}', /"protocol" is not a string/],
    // No fallback from a bad value to another name, and no choosing between two names.
    ['{"login":"alice","remote":5,"rip":"1.2.3.4","protocol":"imap"}', /"remote" is not a string/],
    ['{"login":{"x":1},"user":"alice","remote":"1.2.3.4","protocol":"imap"}', /"login" is not a string/],
    ['{"login":"alice","user":"bob","remote":"1.2.3.4","protocol":"imap"}', /"login" and "user" both given/],
    ['{"login":"alice","remote":"1.2.3.4","remote_ip":"5.6.7.8","protocol":"imap"}', /"remote" and "remote_ip" both given/],
    ['{"login":"alice","remote":"1.2.3.4","protocol":"imap","service":"pop3"}', /"protocol" and "service" both given/],
    ['{"login":"alice","remote":"1.2.3.4","real_remote":7,"protocol":"imap"}', /"real_remote" is not a string/],
    // The same name twice: JSON.parse would keep the last.
    ['{"login":"admin","login":"alice","remote":"1.2.3.4","protocol":"imap"}', /attribute "login" given twice/],
    ['{"login":"alice","remote":"1.2.3.4","protocol":"imap","protocol":"x-none"}', /attribute "protocol" given twice/],
    ['{"login":"alice","remote":"1.2.3.4","protocol":"imap","success":"maybe"}', /"success" is not a boolean/],
  ];
  for (const [body, re] of bad) {
    const r = parseDovecotBody(body);
    t.equal(r.ok, false, body);
    if (!r.ok) t.match(r.error, re, body);
  }
  const report = parseDovecotBody('{"login":"alice","remote":"1.2.3.4","protocol":"imap"}', 'report');
  t.match(report, { ok: false, error: /report without "success"/ });
  // Keys inside nested values or strings are not top-level repeats.
  const nested = parseDovecotBody('{"a":{"login":"x"},"b":["login","login"],"login":"alice","note":"\\"login\\":1","remote":"1.2.3.4","protocol":"imap"}');
  t.equal(nested.ok && nested.value.login, 'alice');
});

t.test('Dovecot: repeated top-level keys, found by a scanner of the JSON text', async (t) => {
  t.equal(repeatedTopLevelKey('{"a":1,"b":2}'), undefined);
  t.equal(repeatedTopLevelKey('{"a":1,"a":2}'), 'a');
  t.equal(repeatedTopLevelKey('{ "a" : 1 , "b":{"a":2}, "c":"a", "a" :3}'), 'a');
  t.equal(repeatedTopLevelKey('{"\\u0061":1,"a":2}'), 'a', 'escapes are decoded before comparing');
  t.equal(repeatedTopLevelKey('{"x\\"y":1,"z":"\\\\","x\\"y":2}'), 'x"y');
  t.equal(repeatedTopLevelKey('{"a":[{"b":1},{"b":2}],"b":3}'), undefined);
});

t.test('Dovecot: request targets, origin and absolute form', async (t) => {
  t.same(parseTarget('/?command=allow'), { ok: true, value: { path: '/', command: 'allow' } });
  t.same(parseTarget('http://127.0.0.1:8470/?command=report'), { ok: true, value: { path: '/', command: 'report' } });
  t.same(parseTarget('/?x=1&command=allow'), { ok: true, value: { path: '/', command: 'allow' } });
  t.same(parseTarget('/other'), { ok: true, value: { path: '/other', command: undefined } });
});

t.test('Dovecot: responses', async (t) => {
  t.same(JSON.parse(allowBody()), { status: 0 });
  const r = JSON.parse(refuseBody('[AUTHENTICATIONFAILED] MFA "required"')) as { status: unknown; msg: unknown };
  t.equal(r.status, -1);
  t.equal(Number.isInteger(r.status), true, 'status is a JSON integer');
  t.equal(r.msg, '[AUTHENTICATIONFAILED] MFA "required"');
});

const REAL_REQUEST = `request=smtpd_access_policy
protocol_state=RCPT
protocol_name=ESMTP
client_address=127.0.0.9
client_name=unknown
client_port=46301
reverse_client_name=unknown
server_address=127.0.0.1
server_port=10587
helo_name=vm
sender=alice@mail.test
recipient=alice@mail.test
recipient_count=0
queue_id=
instance=2e74.6b011c44.a1834.0
size=0
etrn_domain=
stress=
sasl_method=PLAIN
sasl_username=alice
sasl_sender=
ccert_subject=
ccert_issuer=
ccert_fingerprint=
ccert_pubkey_fingerprint=
encryption_protocol=
encryption_cipher=
encryption_keysize=0
policy_context=

`;

t.test('Postfix: a real 3.7 request, whole and byte by byte', async (t) => {
  const whole = new PostfixParser().push(REAL_REQUEST);
  t.equal(whole.length, 1);
  t.equal(whole[0]?.get('sasl_username'), 'alice');
  t.equal(whole[0]?.get('client_address'), '127.0.0.9');
  t.equal(whole[0]?.get('queue_id'), '', 'empty values are kept');
  const p = new PostfixParser();
  const got = [];
  for (const ch of REAL_REQUEST + REAL_REQUEST.replace('sasl_username=alice', 'sasl_username=bob')) got.push(...p.push(ch));
  t.same(got.map((r) => r.get('sasl_username')), ['alice', 'bob'], 'split at every byte, two requests');
  const crlf = new PostfixParser().push(REAL_REQUEST.replace(/\n/g, '\r\n'));
  t.equal(crlf[0]?.get('sasl_username'), 'alice', 'CRLF tolerated');
  const extra = new PostfixParser().push('compatibility_level=3.6\nmail_version=3.8.1\ntls_sni=\nsasl_username=x\nclient_address=1.2.3.4\n\n');
  t.equal(extra[0]?.get('sasl_username'), 'x', 'newer attributes are ignored');
  const val = new PostfixParser().push('sender=a=b@x\n\n');
  t.equal(val[0]?.get('sender'), 'a=b@x', 'only the first "=" splits');
});

t.test('Postfix: a repeated name is refused, not resolved by its order', async (t) => {
  for (const name of ['sasl_username', 'client_address', 'recipient']) {
    t.throws(() => new PostfixParser().push(`${name}=a\nhelo_name=x\n${name}=b\n\n`), /given twice in one request/, name);
  }
  t.throws(() => new PostfixParser().push('sasl_username=alice\nsasl_username=admin\n\n'), /"sasl_username" given twice/);
  const two = new PostfixParser().push('sasl_username=alice\n\nsasl_username=bob\n\n');
  t.same(two.map((r) => r.get('sasl_username')), ['alice', 'bob'], 'the same name in two requests is fine');
});

t.test('Postfix: stray empty lines are not requests', async (t) => {
  t.same(new PostfixParser().push('\n\n\n'), []);
});

t.test('Postfix: hostile input', async (t) => {
  t.throws(() => new PostfixParser().push('sender=' + 'x'.repeat(9000) + '\n'), PolicyProtocolError, 'over-long line');
  t.throws(() => new PostfixParser().push('sender=' + 'x'.repeat(9000)), PolicyProtocolError, 'over-long line without a newline yet');
  const p = new PostfixParser();
  t.throws(() => {
    for (let i = 0; i < 10; i++) p.push('y'.repeat(1000));
  }, PolicyProtocolError, 'a line that grows chunk by chunk');
  t.throws(() => new PostfixParser().push(Array.from({ length: 200 }, (_, i) => `a${i}=1`).join('\n') + '\n'), /more than 100 attributes/);
  t.throws(() => new PostfixParser().push('no equals sign\n'), /without "name="/);
  t.throws(() => new PostfixParser().push('=value\n'), /without "name="/);
});

t.test('Postfix: replies', async (t) => {
  t.equal(formatReply('DUNNO'), 'action=DUNNO\n\n');
  t.equal(formatReply('554 5.7.1 MFA required'), 'action=554 5.7.1 MFA required\n\n');
});
