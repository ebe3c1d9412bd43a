import net from 'node:net';
import t from 'tap';
import { RangeList, blockOf, parseAddress, parseCidr } from '../../policy/address.js';

t.test('parseAddress accepts the strict forms only', async (t) => {
  for (const ok of ['192.0.2.1', '2001:db8::1', '::1', '::ffff:192.0.2.1', 'fe80::1%eth0', '0.0.0.0']) t.ok(parseAddress(ok), ok);
  for (const bad of ['', 'localhost', '192.0.2', '192.0.2.256', '10', '0x7f.0.0.1', '1.2.3.4.5', '2001:db8::g', 'unix:', '[::1]', '192.0.2.1/24', ' '])
    t.notOk(parseAddress(bad), JSON.stringify(bad));
  t.equal(parseAddress('::ffff:192.0.2.1')?.kind(), 'ipv4', 'mapped becomes IPv4');
  t.equal(parseAddress('::FFFF:c000:0201')?.toString(), '192.0.2.1', 'mapped in hex');
});

t.test('parseAddress: an embedded IPv4 part is as strict as IPv4 itself, and only ::ffff:0:0/96 maps', async (t) => {
  for (const bad of ['::ffff:203.0.113.07', '::ffff:0xcb.0.113.7', '::ffff:010.0.0.1', '::ffff:1.2.3', '::ffff:1.2.3.4.5', '::ffff:256.1.1.1', '010.0.0.1', '1.2.3.04', ' 1.2.3.4', '1.2.3.4 ', '::1 ', '::ffff:1.2.3.4 '])
    t.equal(parseAddress(bad), undefined, JSON.stringify(bad));
  const compat = parseAddress('::203.0.113.7');
  t.equal(compat?.kind(), 'ipv6', 'the deprecated IPv4-compatible form stays IPv6');
  t.equal(compat?.toString(), '::cb00:7107', 'as the address it spells');
  t.equal(parseAddress('::ffff:0:203.0.113.7')?.kind(), 'ipv6', 'the IPv4-translated form (::ffff:0:0:0/96) is not mapped either');
  t.equal(parseAddress('64:ff9b::203.0.113.7')?.toString(), '64:ff9b::cb00:7107', 'NAT64 stays IPv6');
  t.equal(parseAddress('::ffff:203.0.113.7')?.toString(), '203.0.113.7', 'mapped: IPv4');
  t.equal(parseAddress('1:2:3:4:5:6:1.2.3.4')?.toString(), '1:2:3:4:5:6:102:304', 'a dotted tail after six groups');
  t.equal(parseAddress('fe80::1.2.3.4%eth0')?.toString(), 'fe80::102:304%eth0', 'a dotted tail before a zone');
});

t.test('parseAddress agrees with the RFC 4291 / inet_pton forms (Node\'s net.isIP) on a generated corpus', async (t) => {
  const groups = ['0', '1', 'ffff', 'FFFF', '0db8', '00000', 'g', '12345'];
  const quads = ['1.2.3.4', '203.0.113.7', '010.0.0.1', '0xcb.0.113.7', '1.2.3', '256.0.0.1', '0.0.0.0', '255.255.255.255', '1.02.3.4'];
  const corpus = new Set<string>();
  for (const q of quads) {
    corpus.add(q);
    for (const prefix of ['::', '::ffff:', '::FFFF:', '0:0:0:0:0:ffff:', '1::', '1:2:3:4:5:6:', '1:2:3:4:5:6:7:', ':ffff:', '::ffff::']) corpus.add(prefix + q);
  }
  for (const a of groups) {
    for (const b of groups) {
      for (const shape of [`${a}::${b}`, `${a}:${b}::`, `::${a}:${b}`, `${a}:${b}:${a}:${b}:${a}:${b}:${a}:${b}`, `${a}:${b}:${a}:${b}:${a}:${b}:${a}`, `${a}::${b}::1`, `${a}:::${b}`]) {
        corpus.add(shape);
      }
    }
  }
  let mismatches = 0;
  for (const s of corpus) {
    const ours = parseAddress(s) !== undefined;
    const theirs = net.isIP(s) !== 0;
    if (ours !== theirs) {
      mismatches++;
      t.fail(`${JSON.stringify(s)}: parseAddress ${ours ? 'accepts' : 'refuses'}, net.isIP ${theirs ? 'accepts' : 'refuses'}`);
    }
  }
  t.equal(mismatches, 0, `${corpus.size} texts, the same verdict`);
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
