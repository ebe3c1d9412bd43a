// Client addresses: parsing, the address block a grant covers, and CIDR lists.
// Pure: no I/O. ipaddr.js holds the parsed addresses; parseAddress decides which texts are addresses at all.
import ipaddr from 'ipaddr.js';

export type Address = ipaddr.IPv4 | ipaddr.IPv6;

/**
 * The one parser for every address the product accepts (Dovecot's remote, Postfix's client_address, the API's
 * ip, a trusted proxy's X-Forwarded-For, the CLI, the configuration): the textual forms of RFC 4291 section 2.2
 * and dotted-quad IPv4, nothing looser. IPv4 is four decimal numbers 0..255 without leading zeros ("010.0.0.1"
 * would be octal to inet_aton; "0xcb.0.113.7" and "10" are refused), and so is an IPv4 part inside IPv6 text.
 * Only the IPv4-mapped block ::ffff:0:0/96 becomes IPv4; the deprecated IPv4-compatible form (::203.0.113.7)
 * is the IPv6 address it spells. No surrounding spaces. Returns undefined when malformed.
 */
export function parseAddress(text: string): Address | undefined {
  if (ipaddr.IPv4.isValidFourPartDecimal(text)) return ipaddr.IPv4.parse(text);
  if (!text.includes(':')) return undefined;
  // ipaddr.js reads an embedded IPv4 part with the lenient IPv4 parser and always maps it to ::ffff:a.b.c.d:
  // check that part strictly ourselves and hand ipaddr.js the two hex groups it stands for.
  const zone = text.indexOf('%');
  const body = zone < 0 ? text : text.slice(0, zone);
  const colon = body.lastIndexOf(':');
  const tail = body.slice(colon + 1);
  let hex = text;
  if (tail.includes('.')) {
    if (!ipaddr.IPv4.isValidFourPartDecimal(tail)) return undefined;
    const [a = 0, b = 0, c = 0, d = 0] = ipaddr.IPv4.parse(tail).octets;
    hex = `${body.slice(0, colon + 1)}${((a << 8) | b).toString(16)}:${((c << 8) | d).toString(16)}${zone < 0 ? '' : text.slice(zone)}`;
  }
  if (!ipaddr.IPv6.isValid(hex)) return undefined;
  const v6 = ipaddr.IPv6.parse(hex);
  return v6.isIPv4MappedAddress() ? v6.toIPv4Address() : v6;
}

export interface BlockPrefixes {
  ipv4: number;
  ipv6: number;
}

/**
 * The address block a grant is held for, as a canonical string: the address itself when the prefix
 * covers it whole ("203.0.113.7"), else the network in CIDR form ("2001:db8:1:2::/64").
 */
export function blockOf(addr: Address, prefixes: BlockPrefixes): string {
  if (addr.kind() === 'ipv4') {
    if (prefixes.ipv4 >= 32) return addr.toString();
    return `${networkOf(addr.toByteArray(), prefixes.ipv4, 'ipv4')}/${prefixes.ipv4}`;
  }
  const v6 = addr as ipaddr.IPv6;
  if (prefixes.ipv6 >= 128) return v6.toRFC5952String();
  return `${networkOf(v6.toByteArray(), prefixes.ipv6, 'ipv6')}/${prefixes.ipv6}`;
}

function networkOf(bytes: number[], prefix: number, kind: 'ipv4' | 'ipv6'): string {
  const out = bytes.map((b, i) => {
    const bitsBefore = i * 8;
    if (bitsBefore >= prefix) return 0;
    if (bitsBefore + 8 <= prefix) return b;
    const keep = prefix - bitsBefore;
    return b & (0xff << (8 - keep)) & 0xff;
  });
  if (kind === 'ipv4') return out.join('.');
  return (ipaddr.fromByteArray(out) as ipaddr.IPv6).toRFC5952String();
}

/** A parsed CIDR range list; `has` answers in one pass without allocating. */
export class RangeList {
  private readonly v4: [ipaddr.IPv4, number][] = [];
  private readonly v6: [ipaddr.IPv6, number][] = [];
  readonly source: readonly string[];

  constructor(cidrs: readonly string[]) {
    this.source = cidrs;
    for (const c of cidrs) {
      const range = parseCidr(c);
      if (!range) throw new Error(`not an address or CIDR range: ${JSON.stringify(c)}`);
      const [addr, bits] = range;
      if (addr.kind() === 'ipv4') this.v4.push([addr as ipaddr.IPv4, bits]);
      else this.v6.push([addr as ipaddr.IPv6, bits]);
    }
  }

  get size(): number {
    return this.v4.length + this.v6.length;
  }

  has(addr: Address): boolean {
    if (addr.kind() === 'ipv4') {
      const a = addr as ipaddr.IPv4;
      for (const [net, bits] of this.v4) if (a.match(net, bits)) return true;
    } else {
      const a = addr as ipaddr.IPv6;
      for (const [net, bits] of this.v6) if (a.match(net, bits)) return true;
    }
    return false;
  }
}

/** "192.0.2.0/24", "2001:db8::/32", or a bare address (a /32 or /128). IPv4-mapped IPv6 ranges become IPv4. */
export function parseCidr(text: string): [Address, number] | undefined {
  const s = text;
  const slash = s.indexOf('/');
  if (slash < 0) {
    const a = parseAddress(s);
    if (!a) return undefined;
    return [a, a.kind() === 'ipv4' ? 32 : 128];
  }
  const a = parseAddress(s.slice(0, slash));
  const bitsText = s.slice(slash + 1);
  if (!a || !/^\d{1,3}$/.test(bitsText)) return undefined;
  let bits = Number(bitsText);
  if (a.kind() === 'ipv4') {
    // A mapped range such as ::ffff:192.0.2.0/120 was turned into IPv4 by parseAddress.
    if (s.slice(0, slash).includes(':')) bits -= 96;
    if (bits < 0 || bits > 32) return undefined;
  } else if (bits > 128) {
    return undefined;
  }
  return [a, bits];
}
