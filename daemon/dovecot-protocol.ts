// Dovecot auth policy (HTTP JSON): request parsing and response formatting. No I/O here.
// Accepts Dovecot 2.3's default attribute set, the recommended one (with real_remote), and 2.4's names;
// attributes we do not know are ignored.

export type DovecotCommand = 'allow' | 'report';

export interface DovecotRequest {
  login: string;
  remote: string;
  realRemote: string | undefined;
  protocol: string;
  success: boolean | undefined;
  policyReject: boolean | undefined;
}

export type ParseResult<T> = { ok: true; value: T } | { ok: false; error: string };

const str = (v: unknown): string | undefined => (typeof v === 'string' ? v : undefined);
const bool = (v: unknown): boolean | undefined =>
  typeof v === 'boolean' ? v : v === 'true' || v === '1' ? true : v === 'false' || v === '0' ? false : undefined;

/** The `command` from the request target; absolute-form targets (Dovecot 2.4 through a proxy socket) work too. */
export function parseTarget(target: string): ParseResult<{ path: string; command: string | undefined }> {
  let url: URL;
  try {
    url = new URL(target, 'http://policy.invalid');
  } catch {
    return { ok: false, error: 'malformed request target' };
  }
  return { ok: true, value: { path: url.pathname, command: url.searchParams.get('command') ?? undefined } };
}

export function parseDovecotBody(body: string): ParseResult<DovecotRequest> {
  let data: unknown;
  try {
    data = JSON.parse(body);
  } catch {
    return { ok: false, error: 'body is not JSON' };
  }
  if (typeof data !== 'object' || data === null || Array.isArray(data)) return { ok: false, error: 'body is not a JSON object' };
  const o = data as Record<string, unknown>;
  // 2.3: login, remote, real_remote, protocol. 2.4 templates are configured by the admin; accept the usual names.
  const login = str(o['login']) ?? str(o['user']) ?? str(o['username']);
  const remote = str(o['remote']) ?? str(o['remote_ip']) ?? str(o['rip']);
  const realRemote = str(o['real_remote']) ?? str(o['real_remote_ip']) ?? str(o['real_rip']);
  const protocol = str(o['protocol']) ?? str(o['service']) ?? '';
  if (login === undefined || login === '') return { ok: false, error: 'missing "login"' };
  if (remote === undefined || remote === '') return { ok: false, error: 'missing "remote"' };
  return {
    ok: true,
    value: {
      login,
      remote,
      realRemote: realRemote === '' ? undefined : realRemote,
      protocol,
      success: bool(o['success']),
      policyReject: bool(o['policy_reject']),
    },
  };
}

export function allowBody(): string {
  return '{"status":0}';
}

export function refuseBody(msg: string): string {
  return JSON.stringify({ status: -1, msg });
}
