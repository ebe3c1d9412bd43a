import t, { type Test } from 'tap';
import { RangeList } from '../../policy/address.js';
import { ForwardedError, MAX_FORWARDED_CHARS, MAX_FORWARDED_ENTRIES, clientIp } from '../../web/client-ip.js';

// The site's reverse proxy on loopback and a second proxy tier in front of it.
const TRUSTED = new RangeList(['127.0.0.1', '::1', '10.0.0.0/24', '2001:db8:ca::/48']);
const NONE = new RangeList([]);

const throwsForwarded = (t: Test, fn: () => unknown, re: RegExp, what: string) => {
  let err: unknown;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  t.type(err, ForwardedError, what);
  t.equal((err as Error | undefined)?.name, 'ForwardedError', `${what}: name`);
  t.match((err as Error | undefined)?.message ?? '', re, `${what}: message`);
};

t.test('an untrusted peer: the header is ignored, however it looks', async (t) => {
  t.equal(clientIp('203.0.113.7', '198.51.100.1', TRUSTED), '203.0.113.7', 'a spoofed header changes nothing');
  t.equal(clientIp('203.0.113.7', ['198.51.100.1', '127.0.0.1'], TRUSTED), '203.0.113.7', 'several spoofed headers');
  t.equal(clientIp('203.0.113.7', 'unknown, garbage', TRUSTED), '203.0.113.7', 'garbage from an untrusted peer is not read');
  t.equal(clientIp('203.0.113.7', '1.1.1.1,'.repeat(100), TRUSTED), '203.0.113.7', 'nor counted');
  t.equal(clientIp('127.0.0.1', '198.51.100.1', NONE), '127.0.0.1', 'no trusted proxies: loopback is a peer like any other');
  t.equal(clientIp('::ffff:203.0.113.7', '198.51.100.1', TRUSTED), '203.0.113.7', 'a mapped peer is IPv4');
});

t.test('a trusted peer without a header: the peer itself', async (t) => {
  t.equal(clientIp('127.0.0.1', undefined, TRUSTED), '127.0.0.1');
  t.equal(clientIp('127.0.0.1', '', TRUSTED), '127.0.0.1', 'an empty header');
  t.equal(clientIp('127.0.0.1', ' , ,', TRUSTED), '127.0.0.1', 'only empty elements');
  t.equal(clientIp('127.0.0.1', [], TRUSTED), '127.0.0.1', 'no header values');
  t.equal(clientIp('::ffff:127.0.0.1', undefined, TRUSTED), '127.0.0.1', 'mapped loopback');
});

t.test('a trusted peer: the right-most entry that is not a trusted proxy', async (t) => {
  t.equal(clientIp('127.0.0.1', '198.51.100.7', TRUSTED), '198.51.100.7', 'one entry');
  t.equal(clientIp('::ffff:127.0.0.1', '198.51.100.7', TRUSTED), '198.51.100.7', 'the peer in mapped form is trusted too');
  t.equal(clientIp('127.0.0.1', '192.0.2.66, 198.51.100.7', TRUSTED), '198.51.100.7', 'what the browser wrote on the left is not believed');
  t.equal(clientIp('127.0.0.1', '192.0.2.66, 198.51.100.7, 10.0.0.5', TRUSTED), '198.51.100.7', 'a second proxy tier is skipped');
  t.equal(clientIp('127.0.0.1', '198.51.100.7,10.0.0.5,10.0.0.6,127.0.0.1', TRUSTED), '198.51.100.7', 'several trusted proxies are skipped');
  t.equal(clientIp('127.0.0.1', '10.0.0.9, 198.51.100.7, 10.0.0.5', TRUSTED), '198.51.100.7', 'a trusted address left of the client is not reached');
  t.equal(clientIp('::1', '2001:db8:ff::1, 2001:db8:ca::10', TRUSTED), '2001:db8:ff::1', 'IPv6 proxies and client');
});

t.test('every entry a trusted proxy: the left-most', async (t) => {
  t.equal(clientIp('127.0.0.1', '10.0.0.5, 10.0.0.6', TRUSTED), '10.0.0.5');
  t.equal(clientIp('127.0.0.1', '127.0.0.1', TRUSTED), '127.0.0.1', 'a single trusted entry');
  t.equal(clientIp('127.0.0.1', '2001:db8:ca::1, 10.0.0.6', TRUSTED), '2001:db8:ca::1');
});

t.test('ports, brackets, spaces and canonical text', async (t) => {
  t.equal(clientIp('127.0.0.1', '198.51.100.7:5123', TRUSTED), '198.51.100.7', 'IPv4 with a port');
  t.equal(clientIp('127.0.0.1', '[2001:db8:ff::1]:443', TRUSTED), '2001:db8:ff::1', 'IPv6 in brackets with a port');
  t.equal(clientIp('127.0.0.1', '[2001:db8:ff::1]', TRUSTED), '2001:db8:ff::1', 'IPv6 in brackets');
  t.equal(clientIp('127.0.0.1', '  198.51.100.7  ,   10.0.0.5 ', TRUSTED), '198.51.100.7', 'spaces');
  t.equal(clientIp('127.0.0.1', '198.51.100.7, [2001:db8:ca::10]:8443, 10.0.0.5:80', TRUSTED), '198.51.100.7', 'trusted proxies with ports are skipped');
  t.equal(clientIp('127.0.0.1', '2001:0DB8:00FF:0:0:0:0:0001', TRUSTED), '2001:db8:ff::1', 'IPv6 in canonical form');
  t.equal(clientIp('127.0.0.1', '::ffff:198.51.100.7', TRUSTED), '198.51.100.7', 'mapped IPv6 becomes IPv4');
  t.equal(clientIp('127.0.0.1', '[::ffff:198.51.100.7]:1', TRUSTED), '198.51.100.7', 'mapped, bracketed');
  t.equal(clientIp('127.0.0.1', '198.51.100.7, ::ffff:10.0.0.5', TRUSTED), '198.51.100.7', 'a mapped trusted proxy is trusted');
  t.equal(clientIp('2001:db8:ca::10', '198.51.100.7', TRUSTED), '198.51.100.7', 'an IPv6 peer in a trusted range');
});

t.test('several header values are one list', async (t) => {
  t.equal(clientIp('127.0.0.1', ['192.0.2.66', '198.51.100.7'], TRUSTED), '198.51.100.7', 'the last value is the right end');
  t.equal(clientIp('127.0.0.1', ['192.0.2.66, 198.51.100.7', '10.0.0.5'], TRUSTED), '198.51.100.7', 'lists within values');
  t.equal(clientIp('127.0.0.1', ['198.51.100.7', ''], TRUSTED), '198.51.100.7', 'an empty value is skipped');
  t.equal(clientIp('127.0.0.1', ['10.0.0.6', '10.0.0.5'], TRUSTED), '10.0.0.6', 'all trusted: the left-most of the first value');
});

t.test('an entry that is not an address: ForwardedError naming it', async (t) => {
  const bad: [string, RegExp][] = [
    ['unknown', /not an IP address: "unknown"/],
    ['_hidden', /"_hidden"/],
    ['198.51.100.7, garbage', /"garbage"/],
    ['proxy.example.ac.jp', /"proxy\.example\.ac\.jp"/],
    ['198.51.100.256', /"198\.51\.100\.256"/],
    ['198.51.100.7:99999', /"198\.51\.100\.7:99999"/],
    ['198.51.100.7:', /"198\.51\.100\.7:"/],
    ['[198.51.100.7]:80', /"\[198\.51\.100\.7\]:80"/],
    ['2001:db8::1]:443', /"2001:db8::1\]:443"/],
    ['[2001:db8::1', /"\[2001:db8::1"/],
    ['fe80::1%eth0', /"fe80::1%eth0"/],
    ['198.51.100.0/24', /"198\.51\.100\.0\/24"/],
    ['for=198.51.100.7', /"for=198\.51\.100\.7"/],
  ];
  for (const [header, re] of bad) throwsForwarded(t, () => clientIp('127.0.0.1', header, TRUSTED), re, header);
  throwsForwarded(t, () => clientIp('127.0.0.1', ['198.51.100.7', 'unknown'], TRUSTED), /"unknown"/, 'in a second header value');
  throwsForwarded(t, () => clientIp('127.0.0.1', '198.51.100.7, 10.0.0.5, nope', TRUSTED), /"nope"/, 'right of the client');
  t.equal(clientIp('127.0.0.1', 'garbage, 198.51.100.7, 10.0.0.5', TRUSTED), '198.51.100.7', 'left of the client the entries are not read');
  throwsForwarded(t, () => clientIp('127.0.0.1', 'x'.repeat(500), TRUSTED), /"x{64}\.\.\."$/, 'a long entry is cut short in the message');
});

t.test('a peer that is missing or not an address: ForwardedError', async (t) => {
  throwsForwarded(t, () => clientIp(undefined, undefined, TRUSTED), /no usable peer address/, 'undefined');
  throwsForwarded(t, () => clientIp('', '198.51.100.7', TRUSTED), /no usable peer address/, 'empty');
  throwsForwarded(t, () => clientIp('not-an-ip', undefined, NONE), /no usable peer address: "not-an-ip"/, 'garbage, even with nothing trusted');
});

t.test('caps: entries and characters', async (t) => {
  const many = (n: number) => Array.from({ length: n }, (_, i) => `10.0.0.${i % 200}`);
  t.equal(clientIp('127.0.0.1', ['198.51.100.7', ...many(MAX_FORWARDED_ENTRIES - 1)].join(','), TRUSTED), '198.51.100.7', `${MAX_FORWARDED_ENTRIES} entries are read`);
  throwsForwarded(
    t,
    () => clientIp('127.0.0.1', ['198.51.100.7', ...many(MAX_FORWARDED_ENTRIES)].join(','), TRUSTED),
    new RegExp(`${MAX_FORWARDED_ENTRIES + 1} entries, more than ${MAX_FORWARDED_ENTRIES}`),
    'one entry more',
  );
  throwsForwarded(t, () => clientIp('127.0.0.1', ['198.51.100.7', ...many(MAX_FORWARDED_ENTRIES)], TRUSTED), /entries, more than/, 'counted across header values');

  // Entries padded with spaces to reach the character cap exactly.
  const padded = (total: number) => {
    const head = '198.51.100.7';
    return head + ' '.repeat(total - head.length);
  };
  const exact = padded(MAX_FORWARDED_CHARS);
  t.equal(exact.length, MAX_FORWARDED_CHARS);
  t.equal(clientIp('127.0.0.1', exact, TRUSTED), '198.51.100.7', `${MAX_FORWARDED_CHARS} characters are read`);
  throwsForwarded(
    t,
    () => clientIp('127.0.0.1', padded(MAX_FORWARDED_CHARS + 1), TRUSTED),
    new RegExp(`${MAX_FORWARDED_CHARS + 1} characters, more than ${MAX_FORWARDED_CHARS}`),
    'one character more',
  );
  const halves = [padded(MAX_FORWARDED_CHARS / 2), padded(MAX_FORWARDED_CHARS / 2)];
  throwsForwarded(t, () => clientIp('127.0.0.1', halves, TRUSTED), /characters, more than/, 'counted across header values (joined with ",")');
  t.equal(MAX_FORWARDED_ENTRIES, 64);
  t.equal(MAX_FORWARDED_CHARS, 4096);
});
