// Listener strings an operator can read: "127.0.0.1:8470", "[::1]:8470", "unix:/run/mfagate/policy.sock".
import net from 'node:net';
import path from 'node:path';

export type Endpoint = { kind: 'tcp'; host: string; port: number } | { kind: 'unix'; path: string };

export const LISTEN_EXPECTED = '"host:port", "[ipv6]:port" or "unix:/path/to/socket"';

/** Parses one listener string; relative UNIX paths are resolved against `baseDir`. */
export function parseEndpoint(text: string, baseDir: string): Endpoint | undefined {
  if (text.startsWith('unix:')) {
    const p = text.slice(5);
    if (p.length === 0 || p.includes('\0')) return undefined;
    const full = path.resolve(baseDir, p);
    // Linux limits sun_path to 107 bytes.
    if (Buffer.byteLength(full) > 107) return undefined;
    return { kind: 'unix', path: full };
  }
  const m = /^(?:\[([0-9A-Fa-f:.]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(text);
  if (!m) return undefined;
  const host = m[1] ?? m[2] ?? '';
  const port = Number(m[3]);
  // Port 0 binds any free port (tests); the daemon prints the real one when it starts.
  if (port > 65535) return undefined;
  if (m[1] !== undefined && net.isIPv6(host) === false) return undefined;
  if (m[2] !== undefined && !net.isIPv4(host) && host !== 'localhost') return undefined;
  return { kind: 'tcp', host, port };
}

export function formatEndpoint(e: Endpoint): string {
  if (e.kind === 'unix') return `unix:${e.path}`;
  return e.host.includes(':') ? `[${e.host}]:${e.port}` : `${e.host}:${e.port}`;
}
