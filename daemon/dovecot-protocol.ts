// Dovecot auth policy (HTTP JSON): request parsing and response formatting. No I/O here.
// Accepts Dovecot 2.3's default attribute set, the recommended one (with real_remote), and 2.4's names;
// attributes we do not know are ignored. What we use is checked strictly, because a request that cannot be
// judged must be refused (400), never allowed by accident: a missing, empty or odd `protocol` would otherwise
// fall outside the enforced list, and a second copy of an attribute (under the same name or an alias) could
// decide by its order which user or address is judged.

export type DovecotCommand = 'allow' | 'report';

export interface DovecotRequest {
  login: string;
  remote: string;
  realRemote: string | undefined;
  protocol: string;
  success: boolean | undefined;
  policyReject: boolean | undefined;
  /** The app passcode the login was made with (`passcode=%{passdb:mfagate_passcode}`), when there was one. */
  passcode: number | undefined;
}

/** What the Lua passdb sends to POST /passcode: a password that has the shape of a passcode. */
export interface PasscodeCheckRequest {
  login: string;
  passcode: string;
  remote: string;
  realRemote: string | undefined;
  protocol: string;
}

export type ParseResult<T> = { ok: true; value: T } | { ok: false; error: string };

/** The names each attribute may come under: 2.3's recommended names first, then what 2.4 templates use. */
const NAMES = {
  login: ['login', 'user', 'username'],
  remote: ['remote', 'remote_ip', 'rip'],
  realRemote: ['real_remote', 'real_remote_ip', 'real_rip'],
  protocol: ['protocol', 'service'],
} as const;

/** A protocol (service) name as Dovecot's %s gives it: "imap", "pop3", "smtp", "sieve", "mfagate-web". */
const PROTOCOL_NAME = /^[a-z0-9][a-z0-9_-]{0,31}$/i;

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

/** Where the string that starts at the quote `open` ends (its closing quote), skipping escaped quotes. */
function stringEnd(text: string, open: number): number {
  let j = text.indexOf('"', open + 1);
  for (;;) {
    if (j < 0) return text.length;
    let backslashes = 0;
    while (text.charCodeAt(j - 1 - backslashes) === 0x5c) backslashes++;
    if (backslashes % 2 === 0) return j;
    j = text.indexOf('"', j + 1);
  }
}

/** Calls `key(start, end)` for each top-level key of a JSON object text (the quotes included). */
function eachTopLevelKey(text: string, key: (start: number, end: number) => void): void {
  let depth = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === 0x22) {
      const end = stringEnd(text, i);
      if (depth === 1) {
        let j = end + 1;
        for (let d = text.charCodeAt(j); d === 0x20 || d === 0x09 || d === 0x0a || d === 0x0d; d = text.charCodeAt(++j));
        // A string followed by ":" is a key; otherwise a value.
        if (text.charCodeAt(j) === 0x3a) key(i, end);
      }
      i = end;
    } else if (c === 0x7b || c === 0x5b) depth++; // { [
    else if (c === 0x7d || c === 0x5d) depth--; // } ]
  }
}

/**
 * A key that occurs twice at the top level of a JSON object text, or undefined. JSON.parse silently keeps the
 * last copy; we refuse instead. `text` must already have parsed as a JSON object, to `parsed`: the keys are
 * counted first (no strings made), and named only when there are more than the object has.
 */
export function repeatedTopLevelKey(text: string, parsed: Record<string, unknown> = JSON.parse(text) as Record<string, unknown>): string | undefined {
  let count = 0;
  eachTopLevelKey(text, () => count++);
  if (count === Object.keys(parsed).length) return undefined;
  const seen = new Set<string>();
  let repeated: string | undefined;
  eachTopLevelKey(text, (start, end) => {
    if (repeated !== undefined) return;
    const raw = text.slice(start, end + 1);
    const name = raw.includes('\\') ? (JSON.parse(raw) as string) : raw.slice(1, -1);
    if (seen.has(name)) repeated = name;
    seen.add(name);
  });
  return repeated;
}

type Field = { ok: true; value: string | undefined } | { ok: false; error: string };

/** The one attribute among `names` that is present, as a string; two of them, or a non-string, is an error. */
function field(o: Record<string, unknown>, names: readonly string[]): Field {
  let found: string | undefined;
  let value: string | undefined;
  for (const name of names) {
    if (!Object.hasOwn(o, name)) continue;
    const v = o[name];
    if (found !== undefined) return { ok: false, error: `"${found}" and "${name}" both given: send one (auth_policy_request_attributes)` };
    if (typeof v !== 'string') return { ok: false, error: `"${name}" is not a string` };
    found = name;
    value = v;
  }
  return { ok: true, value };
}

function flag(o: Record<string, unknown>, name: string): ParseResult<boolean | undefined> {
  if (!Object.hasOwn(o, name)) return { ok: true, value: undefined };
  const v = o[name];
  if (typeof v === 'boolean') return { ok: true, value: v };
  if (v === 'true' || v === '1') return { ok: true, value: true };
  if (v === 'false' || v === '0') return { ok: true, value: false };
  return { ok: false, error: `"${name}" is not a boolean` };
}

/** The JSON object of a request body, refused when it is not one or repeats a key. */
function jsonObject(body: string): ParseResult<Record<string, unknown>> {
  let data: unknown;
  try {
    data = JSON.parse(body);
  } catch {
    return { ok: false, error: 'body is not JSON' };
  }
  if (typeof data !== 'object' || data === null || Array.isArray(data)) return { ok: false, error: 'body is not a JSON object' };
  const o = data as Record<string, unknown>;
  const repeated = repeatedTopLevelKey(body, o);
  if (repeated !== undefined) return { ok: false, error: `attribute ${JSON.stringify(repeated.slice(0, 64))} given twice` };
  return { ok: true, value: o };
}

/** The attributes every request must carry, each once and usable: the login, the addresses, the protocol. */
function loginAttributes(o: Record<string, unknown>): ParseResult<{ login: string; remote: string; realRemote: string | undefined; protocol: string }> {
  const login = field(o, NAMES.login);
  if (!login.ok) return login;
  if (login.value === undefined || login.value === '') return { ok: false, error: 'missing "login"' };
  const remote = field(o, NAMES.remote);
  if (!remote.ok) return remote;
  if (remote.value === undefined || remote.value === '') return { ok: false, error: 'missing "remote"' };
  const realRemote = field(o, NAMES.realRemote);
  if (!realRemote.ok) return realRemote;
  const protocol = field(o, NAMES.protocol);
  if (!protocol.ok) return protocol;
  if (protocol.value === undefined || protocol.value === '') return { ok: false, error: 'missing "protocol"' };
  if (!PROTOCOL_NAME.test(protocol.value)) return { ok: false, error: `"protocol" is not a protocol name: ${JSON.stringify(protocol.value.slice(0, 40))}` };
  return {
    ok: true,
    value: { login: login.value, remote: remote.value, realRemote: realRemote.value === '' ? undefined : realRemote.value, protocol: protocol.value },
  };
}

export function parseDovecotBody(body: string, command: DovecotCommand = 'allow'): ParseResult<DovecotRequest> {
  const o = jsonObject(body);
  if (!o.ok) return o;
  const base = loginAttributes(o.value);
  if (!base.ok) return base;
  const success = flag(o.value, 'success');
  if (!success.ok) return success;
  const policyReject = flag(o.value, 'policy_reject');
  if (!policyReject.ok) return policyReject;
  if (command === 'report' && success.value === undefined) return { ok: false, error: 'report without "success"' };
  const passcode = field(o.value, ['passcode']);
  if (!passcode.ok) return passcode;
  if (passcode.value !== undefined && passcode.value !== '' && !/^[1-9]\d{0,15}$/.test(passcode.value)) return { ok: false, error: '"passcode" is not a passcode id' };
  return {
    ok: true,
    value: {
      ...base.value,
      success: success.value,
      policyReject: policyReject.value,
      passcode: passcode.value === undefined || passcode.value === '' ? undefined : Number(passcode.value),
    },
  };
}

/** POST /passcode from the Lua passdb: the login's attributes, as strictly as a policy request, and the passcode. */
export function parsePasscodeBody(body: string): ParseResult<PasscodeCheckRequest> {
  const o = jsonObject(body);
  if (!o.ok) return o;
  const base = loginAttributes(o.value);
  if (!base.ok) return base;
  const passcode = field(o.value, ['passcode']);
  if (!passcode.ok) return passcode;
  if (passcode.value === undefined || passcode.value === '' || passcode.value.length > 128) return { ok: false, error: 'missing "passcode"' };
  return { ok: true, value: { ...base.value, passcode: passcode.value } };
}

export function allowBody(): string {
  return '{"status":0}';
}

export function refuseBody(msg: string): string {
  return JSON.stringify({ status: -1, msg });
}
