// The browser's address behind the site's reverse proxy: X-Forwarded-For is believed only when it comes from a
// proxy listed in [web] trusted_proxies, and only as far as the chain of trusted proxies reaches.
// Pure: no I/O.
import { type Address, parseAddress, type RangeList } from '../policy/address.js';

/** A forwarded header (or a peer address) that cannot be read: the server answers 400. */
export class ForwardedError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ForwardedError';
  }
}

/** More entries or characters than any real proxy chain produces: refused rather than walked. */
export const MAX_FORWARDED_ENTRIES = 64;
export const MAX_FORWARDED_CHARS = 4096;

const IPV4_WITH_PORT = /^(\d{1,3}(?:\.\d{1,3}){3}):(\d{1,5})$/;
const BRACKETED = /^\[([^\]]*)\](?::(\d{1,5}))?$/;

/** How a bad entry is named in an error: quoted and escaped, and cut short. */
function quote(entry: string): string {
  const s = entry.length > 64 ? `${entry.slice(0, 64)}...` : entry;
  return JSON.stringify(s);
}

/**
 * One X-Forwarded-For entry: "203.0.113.7", "203.0.113.7:5123", "2001:db8::1", "[2001:db8::1]" or
 * "[2001:db8::1]:443", with spaces around. Anything else ("unknown", an RFC 7239 obfuscated name such as
 * "_hidden", a host name, an IPv6 zone index, which means nothing to another host) is not an address.
 */
function parseEntry(entry: string): Address | undefined {
  const s = entry.trim();
  if (s.includes('%')) return undefined;
  let host = s;
  let port: string | undefined;
  const v4 = IPV4_WITH_PORT.exec(s);
  const bracketed = BRACKETED.exec(s);
  if (v4) {
    host = v4[1] ?? '';
    port = v4[2];
  } else if (bracketed) {
    host = bracketed[1] ?? '';
    port = bracketed[2];
    // Brackets hold IPv6 text only.
    if (!host.includes(':')) return undefined;
  }
  if (port !== undefined && Number(port) > 65535) return undefined;
  return parseAddress(host);
}

/**
 * The browser's address. `peer` is the TCP peer (req.socket.remoteAddress: "::ffff:127.0.0.1" counts as
 * "127.0.0.1"); `header` is req.headers['x-forwarded-for'] (several headers count as one list).
 *
 * From a peer outside `trusted` the header is ignored entirely, so a header a browser made up changes nothing.
 * From a trusted peer the entries are walked from the right, skipping those that are trusted proxies
 * themselves; the first that is not is the client. If all of them are trusted proxies, the left-most is the
 * client; without entries, the peer itself. An entry that is not an address among those walked, a peer that
 * is missing or not an address, or a header longer than MAX_FORWARDED_ENTRIES entries or MAX_FORWARDED_CHARS
 * characters throws ForwardedError.
 *
 * Returns the address in canonical text ("192.0.2.7", "2001:db8::1").
 */
export function clientIp(peer: string | undefined, header: string | string[] | undefined, trusted: RangeList): string {
  const peerAddress = peer === undefined ? undefined : parseAddress(peer);
  if (!peerAddress) throw new ForwardedError(`the connection has no usable peer address: ${peer === undefined ? 'none' : quote(peer)}`);
  if (!trusted.has(peerAddress)) return peerAddress.toString();

  const text = header === undefined ? '' : typeof header === 'string' ? header : header.join(',');
  if (text.length > MAX_FORWARDED_CHARS) {
    throw new ForwardedError(`X-Forwarded-For: ${text.length} characters, more than ${MAX_FORWARDED_CHARS}`);
  }
  const all = text.split(',');
  if (all.length > MAX_FORWARDED_ENTRIES) {
    throw new ForwardedError(`X-Forwarded-For: ${all.length} entries, more than ${MAX_FORWARDED_ENTRIES}`);
  }
  // HTTP lists may hold empty elements ("a, , b", a trailing comma, an empty header among several): ignored.
  const entries = all.filter((e) => e.trim() !== '');
  if (entries.length === 0) return peerAddress.toString();

  let address: Address | undefined;
  for (let i = entries.length - 1; i >= 0; i--) {
    const entry = entries[i] ?? '';
    address = parseEntry(entry);
    if (!address) throw new ForwardedError(`X-Forwarded-For: not an IP address: ${quote(entry.trim())}`);
    if (!trusted.has(address)) return address.toString();
  }
  // Every entry was a trusted proxy: the left-most one is as far as the chain can be followed.
  return (address ?? peerAddress).toString();
}
