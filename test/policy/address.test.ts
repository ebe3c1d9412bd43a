import t from 'tap';
import { RangeList, blockOf, parseAddress, parseCidr } from '../../policy/address.js';

t.test('parseAddress accepts the strict forms only', async (t) => {
  for (const ok of ['192.0.2.1', '2001:db8::1', '::1', '::ffff:192.0.2.1', 'fe80::1%eth0', '0.0.0.0']) t.ok(parseAddress(ok), ok);
  for (const bad of ['', 'localhost', '192.0.2', '192.0.2.256', '10', '0x7f.0.0.1', '1.2.3.4.5', '2001:db8::g', 'unix:', '[::1]', '192.0.2.1/24', ' '])
    t.notOk(parseAddress(bad), JSON.stringify(bad));
  t.equal(parseAddress('::ffff:192.0.2.1')?.kind(), 'ipv4', 'mapped becomes IPv4');
  t.equal(parseAddress('::FFFF:c000:0201')?.toString(), '192.0.2.1', 'mapped in hex');
});

t.test('blockOf', async (t) => {
  const p = { ipv4: 32, ipv6: 64 };
  const b = (s: string, q = p) => {
    const a = parseAddress(s);
    if (!a) throw new Error(s);
    return blockOf(a, q);
  };
  t.equal(b('203.0.113.7'), '203.0.113.7');
  t.equal(b('203.0.113.7', { ipv4: 24, ipv6: 64 }), '203.0.113.0/24');
  t.equal(b('203.0.113.7', { ipv4: 20, ipv6: 64 }), '203.0.112.0/20');
  t.equal(b('2001:db8:1:2:3:4:5:6'), '2001:db8:1:2::/64');
  t.equal(b('2001:db8:1:2:3:4:5:6', { ipv4: 32, ipv6: 56 }), '2001:db8:1::/56');
  t.equal(b('2001:db8:1:2:3:4:5:6', { ipv4: 32, ipv6: 128 }), '2001:db8:1:2:3:4:5:6');
  t.equal(b('2001:db8::1', { ipv4: 32, ipv6: 48 }), '2001:db8::/48');
  t.equal(b('::ffff:203.0.113.7'), '203.0.113.7');
});

t.test('ranges', async (t) => {
  t.same(parseCidr('192.0.2.0/24')?.[1], 24);
  t.same(parseCidr('::ffff:192.0.2.0/120')?.[1], 24, 'mapped range becomes an IPv4 range');
  t.notOk(parseCidr('192.0.2.0/33'));
  t.notOk(parseCidr('2001:db8::/129'));
  t.notOk(parseCidr('192.0.2.0/'));
  t.notOk(parseCidr('192.0.2.0/x'));
  t.notOk(parseCidr('campus'));
  const r = new RangeList(['192.0.2.0/24', '2001:db8::/32', '198.51.100.7']);
  const has = (s: string) => {
    const a = parseAddress(s);
    if (!a) throw new Error(s);
    return r.has(a);
  };
  t.ok(has('192.0.2.200'));
  t.notOk(has('192.0.3.1'));
  t.ok(has('::ffff:192.0.2.5'));
  t.ok(has('2001:db8:ffff::1'));
  t.notOk(has('2001:db9::1'));
  t.ok(has('198.51.100.7'));
  t.notOk(has('198.51.100.8'));
  t.throws(() => new RangeList(['not-a-range']));
});
