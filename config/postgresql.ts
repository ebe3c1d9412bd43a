// [store] for backend = "postgresql": the settings and the check of the URL (no I/O here).

/** How mfagate reaches PostgreSQL ([store] with backend = "postgresql", or `db copy --to`). */
export interface PgSettings {
  /** postgresql://user@host[:port][,host2[:port]]/database, without a password. */
  url: string;
  /** A file holding the password (first line), or undefined (peer, trust or certificate authentication). */
  passwordFile: string | undefined;
  /** disable: plain TCP (loopback, tests); require: TLS, any certificate; verify-full: TLS, certificate and name checked. */
  tls: 'disable' | 'require' | 'verify-full';
  /** CA certificates for verify-full (PEM); undefined: the system's. */
  caFile: string | undefined;
}

/**
 * Checks a PostgreSQL URL: postgres(ql):// scheme, at least one host, a database, no password (it would show in
 * process listings and logs: use password_file), no query (TLS and failover are mfagate's own settings).
 * Returns the problem, or undefined.
 */
export function pgUrlProblem(url: string): string | undefined {
  const m = /^postgres(?:ql)?:\/\/(?:([^@/]*)@)?([^/?#]*)(\/[^?#]*)?(\?[^#]*)?$/.exec(url);
  if (!m) return 'expected postgresql://user@host[:port][,host2[:port]...]/database';
  const [, userInfo, hosts, dbPath, query] = m;
  if (userInfo !== undefined && userInfo.includes(':')) return 'the URL holds a password: put it in password_file instead (a URL shows in process listings and logs)';
  if (!hosts) return 'expected at least one host';
  for (const h of hosts.split(',')) {
    if (!/^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:\d{1,5})?$/.test(h)) return `expected host[:port], got ${JSON.stringify(h)}`;
  }
  if (!dbPath || dbPath === '/') return 'expected a database name after the hosts (/mfagate)';
  if (query !== undefined) return 'expected no "?..." part: TLS is [store] tls, and failover to a writable host is always on';
  return undefined;
}
