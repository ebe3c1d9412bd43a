// Checks an ID and password through Dovecot itself, with Dovecot's auth-client protocol (version 1.x) over the
// UNIX socket of a `service auth { unix_listener ... }`. Whatever passdb the site's IMAP uses (LDAP, SQL,
// passwd-file, PAM) decides, and mfagate never stores or compares passwords.
//
// One exchange, as Dovecot 2.3 answers it (\t is a TAB, every line ends in LF):
//   C: VERSION\t1\t2                         C: CPID\t<our pid>
//   S: VERSION\t1\t2   MECH\tPLAIN\tplaintext   MECH\tLOGIN\tplaintext   SPID\t<pid>   CUID\t<n>   COOKIE\t<hex>   DONE
//   C: AUTH\t1\tPLAIN\tservice=mfagate-web\tsecured\tlip=<server>\trip=<browser>\tresp=<base64(NUL user NUL password)>
//   S: OK\t1\tuser=alice[\toriginal_user=ALICE]              the password is right; user= is the canonical name
//   S: FAIL\t1\tuser=alice                                      wrong password or unknown user (Dovecot does not say which)
//   S: FAIL\t1\tuser=alice\tcode=temp_fail[\treason=...]        passdb unreachable and the like (older: "temp")
// Parameters use Dovecot's tab-escaping: \001 escapes itself ("\0011"), TAB ("\001t"), CR ("\001r"), LF ("\001n")
// and NUL ("\0010"); a backslash is an ordinary character. "resp" must be the last parameter.
//
// rip/lip carry the browser's and the web server's addresses, so Dovecot's auth penalty (anvil), its logs
// ("passwd-file(alice,198.51.100.7)") and its auth policy server see the browser, exactly as for an IMAP login
// from there. The penalty delays the answer for an address after failures (up to 15 s), hence the 20 s default
// timeout; `penalty: false` sends "no-penalty".
//
// The socket: a listener of Dovecot's auth service that only mfagate can open, for example
//   service auth {
//     unix_listener /run/mfagate/dovecot-auth-web {
//       mode = 0600
//       user = mfagate
//     }
//   }
// Dovecot picks the protocol from the socket's file name: a name whose last "-" part is "login", "master",
// "userdb", "token", "tokenlogin" or "postmap" speaks something else; any other name (like "auth-client") is
// the auth-client protocol used here.
//
// A fresh connection per check, closed when the answer arrives: sign-ins are rare (one per user and address
// per grant), the handshake is one local round trip, and nothing lives between checks: no reconnect logic
// when Dovecot restarts or reloads, no request ids to match across users, and a check we give up on is
// cancelled (CANCEL) and its connection closed. Dovecot does not require distinct CPIDs on this kind of socket
// (only login sockets do), so parallel checks may share our pid.
//
// Only a plain OK is a success: an OK that carries "nologin" (the passdb refuses the login), "proxy" (a proxy
// passdb, often nopassword=y, so the password may not have been checked here) or "anonymous" is refused.
// Passwords go to Dovecot as typed, except that NUL cannot travel in PLAIN: Dovecot 2.3 itself refuses
// passwords containing TAB, CR, LF or 0x01 ("password having illegal chars"), and counts that as a failure.
//
// The password is never logged, never kept and never part of a result or an error: it goes into one buffer
// that is zeroed once written (JavaScript strings themselves cannot be wiped; we keep no reference to them).
import net from 'node:net';

/** Dovecot's service name for our checks (%s / %{service} in passdb queries and in its logs). */
export const DOVECOT_AUTH_SERVICE = 'mfagate-web';
/** Longer than Dovecot's largest auth penalty (15 s) plus its failure delay (2 s by default). */
export const DEFAULT_DOVECOT_AUTH_TIMEOUT_MS = 20_000;
/** User names and passwords longer than this (UTF-8 bytes) are refused without asking Dovecot. */
export const MAX_USER_BYTES = 1024;
export const MAX_PASSWORD_BYTES = 4096;
/** Dovecot's own limit for a line of this protocol (AUTH_CLIENT_MAX_LINE_LENGTH). */
const MAX_LINE_BYTES = 16_384;
/** More handshake lines than this is not Dovecot. */
const MAX_HANDSHAKE_LINES = 256;
const PROTOCOL_MAJOR = '1';
const PROTOCOL_MINOR = '2';
const REQUEST_ID = '1';

export interface DovecotAuthRequest {
  user: string;
  password: string;
  /** The browser's address (rip): Dovecot's auth penalty, logs and policy server see it. */
  remoteIp: string;
  /** The address the browser connected to (lip), if known. */
  localIp?: string;
  /** Dovecot service name; default "mfagate-web". */
  service?: string;
  /** Send "secured" (the browser's connection is TLS, or local): default true. */
  secured?: boolean;
  /** Let Dovecot's auth penalty delay this check after failures from `remoteIp`: default true. */
  penalty?: boolean;
  /** A session id for Dovecot's logs (session=), to correlate them with ours. */
  session?: string;
  /** Gives up (and closes the connection) after this long: default 20 s. */
  timeoutMs?: number;
}

export type DovecotAuthResult =
  | {
      ok: true;
      /** The canonical user name Dovecot answered (after its auth_username_format, e.g. lower-cased). */
      user: string;
    }
  | {
      ok: false;
      /**
       * true: the password was not judged (Dovecot unreachable, timed out, a temporary passdb failure, a protocol
       * problem): say "try again later". false: Dovecot (or our input check) refused the ID and password.
       */
      temporary: boolean;
      /** For logs and operators; never contains the password. Dovecot's reason= when it sent one. */
      reason: string;
      /** Dovecot's code= (e.g. "user_disabled", "pass_expired", "temp_fail"), or "nologin", "proxy". */
      code?: string;
      /**
       * The user Dovecot resolved the name to (its user=, after auth_username_format), when it said: failures
       * are counted under it too, so "alice@x.example" and "alice@y.example" cannot each start afresh.
       */
      user?: string;
    };

// ---- tab-escaping (Dovecot's str_append_tabescaped / str_tabunescape) ----------------------------------------

export function tabEscape(value: string): string {
  return value.replace(/[\0\x01\t\r\n]/g, (c) => {
    switch (c) {
      case '\0':
        return '\x010';
      case '\x01':
        return '\x011';
      case '\t':
        return '\x01t';
      case '\r':
        return '\x01r';
      default:
        return '\x01n';
    }
  });
}

export function tabUnescape(value: string): string {
  if (!value.includes('\x01')) return value;
  return value.replace(/\x01([\s\S]?)/g, (_m, c: string) => {
    switch (c) {
      case '0':
        return '\0';
      case '1':
        return '\x01';
      case 't':
        return '\t';
      case 'r':
        return '\r';
      case 'n':
        return '\n';
      default:
        return c; // "anything else writes the character itself"
    }
  });
}

// ---- input checks ------------------------------------------------------------------------------------------

/**
 * Why this user name and password cannot be checked at all, or undefined. They are what a person typed, so a
 * refusal is an answer ("wrong ID or password"), not an exception. NUL cannot travel in SASL PLAIN; control
 * characters are never part of a user name (and Dovecot's auth_username_chars refuses them); an empty password
 * could mean an anonymous bind to an LDAP passdb.
 */
export function credentialProblem(user: string, password: string): string | undefined {
  if (user === '') return 'empty user name';
  if (/[\0-\x1f\x7f]/.test(user)) return 'user name contains a control character';
  if (Buffer.byteLength(user, 'utf8') > MAX_USER_BYTES) return `user name longer than ${MAX_USER_BYTES} bytes`;
  if (password === '') return 'empty password';
  if (password.includes('\0')) return 'password contains a NUL character';
  if (Buffer.byteLength(password, 'utf8') > MAX_PASSWORD_BYTES) return `password longer than ${MAX_PASSWORD_BYTES} bytes`;
  return undefined;
}

function checkRequest(socketPath: string, r: DovecotAuthRequest): number {
  if (typeof socketPath !== 'string' || socketPath === '') throw new TypeError('Dovecot auth socket path: expected a non-empty string');
  if (typeof r.user !== 'string' || typeof r.password !== 'string') throw new TypeError('user and password: expected strings');
  if (net.isIP(r.remoteIp) === 0) throw new TypeError(`remoteIp: not an IP address: ${JSON.stringify(r.remoteIp)}`);
  if (r.localIp !== undefined && net.isIP(r.localIp) === 0) throw new TypeError(`localIp: not an IP address: ${JSON.stringify(r.localIp)}`);
  if (r.service !== undefined && !/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/.test(r.service)) {
    throw new TypeError(`service: expected a short name like "mfagate-web": ${JSON.stringify(r.service)}`);
  }
  if (r.session !== undefined && (typeof r.session !== 'string' || r.session.length > 256)) {
    throw new TypeError('session: expected a string of at most 256 characters');
  }
  const timeout = r.timeoutMs ?? DEFAULT_DOVECOT_AUTH_TIMEOUT_MS;
  if (!Number.isFinite(timeout) || timeout <= 0 || timeout > 2 ** 31 - 1) throw new RangeError(`timeoutMs: expected a positive number of milliseconds, got ${timeout}`);
  return timeout;
}

/** The AUTH line, in a buffer the caller zeroes once it is written. */
function authLine(r: DovecotAuthRequest): Buffer {
  const params = [`service=${tabEscape(r.service ?? DOVECOT_AUTH_SERVICE)}`];
  if (r.secured ?? true) params.push('secured');
  if (r.penalty === false) params.push('no-penalty');
  if (r.session !== undefined) params.push(`session=${tabEscape(r.session)}`);
  if (r.localIp !== undefined) params.push(`lip=${r.localIp}`);
  params.push(`rip=${r.remoteIp}`);
  const head = Buffer.from(`AUTH\t${REQUEST_ID}\tPLAIN\t${params.join('\t')}\tresp=`, 'utf8');
  // SASL PLAIN (RFC 4616): authzid NUL authcid NUL passwd, with an empty authzid.
  const user = Buffer.from(r.user, 'utf8');
  const password = Buffer.from(r.password, 'utf8');
  const plain = Buffer.alloc(2 + user.length + password.length);
  user.copy(plain, 1);
  password.copy(plain, 2 + user.length);
  password.fill(0);
  const line = Buffer.alloc(head.length + Math.ceil(plain.length / 3) * 4 + 1);
  head.copy(line);
  const end = head.length + line.write(plain.toString('base64'), head.length, 'latin1');
  plain.fill(0);
  line[end] = 0x0a;
  return line;
}

// ---- the check -----------------------------------------------------------------------------------------------

interface Fields {
  flags: Set<string>;
  values: Map<string, string>;
}

function parseFields(args: string[]): Fields {
  const flags = new Set<string>();
  const values = new Map<string, string>();
  for (const arg of args) {
    const eq = arg.indexOf('=');
    if (eq < 0) flags.add(tabUnescape(arg));
    else if (!values.has(arg.slice(0, eq))) values.set(arg.slice(0, eq), tabUnescape(arg.slice(eq + 1)));
  }
  return { flags, values };
}

/** What an OK or FAIL line for our request means. */
function interpret(kind: 'OK' | 'FAIL', args: string[]): DovecotAuthResult {
  const { flags, values } = parseFields(args);
  const code = values.get('code');
  const temporary = flags.has('temp') || code === 'temp_fail';
  const reason = values.get('reason');
  if (kind === 'FAIL') {
    const failure: DovecotAuthResult = {
      ok: false,
      temporary,
      reason: reason ?? (temporary ? 'temporary authentication failure in Dovecot' : 'Dovecot refused the user name and password'),
    };
    if (code !== undefined) failure.code = code;
    const user = values.get('user');
    if (user !== undefined && user !== '') failure.user = user;
    return failure;
  }
  // OK: the mechanism succeeded. Refuse the answers that do not mean "this password is this user's".
  if (flags.has('nologin')) {
    return { ok: false, temporary, reason: reason ?? 'Dovecot accepted the password but does not let this user log in (nologin)', code: 'nologin' };
  }
  if (flags.has('proxy')) {
    // A proxy passdb often has nopassword=y: the backend would check the password, this Dovecot did not.
    return {
      ok: false,
      temporary: true,
      reason: 'Dovecot answered with a proxy destination, so it may not have checked the password: point mfagate at a Dovecot whose passdb checks passwords',
      code: 'proxy',
    };
  }
  if (flags.has('anonymous')) return { ok: false, temporary: false, reason: 'anonymous login refused', code: 'anonymous' };
  const user = values.get('user');
  if (user === undefined || user === '') return { ok: false, temporary: true, reason: 'Dovecot answered OK without a user name' };
  return { ok: true, user };
}

/**
 * Asks Dovecot whether `password` is `user`'s. Resolves, never rejects, for anything Dovecot or the network
 * does: see DovecotAuthResult. Throws (synchronously, as a rejected promise) only for a caller's mistake: an
 * empty socket path, an address that is not an IP, a bad service name or timeout.
 */
export async function checkPassword(socketPath: string, request: DovecotAuthRequest): Promise<DovecotAuthResult> {
  const timeoutMs = checkRequest(socketPath, request);
  const problem = credentialProblem(request.user, request.password);
  if (problem !== undefined) return { ok: false, temporary: false, reason: `refused before asking Dovecot: ${problem}` };
  let pendingLine: Buffer | undefined = authLine(request);

  return new Promise<DovecotAuthResult>((resolve) => {
    const socket = net.createConnection({ path: socketPath });
    let settled = false;
    let connected = false;
    let sent = false;
    let answered = false;
    let state: 'version' | 'handshake' | 'auth' = 'version';
    let hasPlain = false;
    let handshakeLines = 0;
    let chunks: Buffer[] = [];
    let buffered = 0;

    const finish = (result: DovecotAuthResult) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      pendingLine?.fill(0);
      pendingLine = undefined;
      if (sent && !answered && !socket.destroyed) {
        // Giving up on a sent request (timeout, CONT...): cancel it first, so Dovecot drops it quietly instead
        // of logging "disconnected with 1 pending requests" as an error.
        socket.end(`CANCEL\t${REQUEST_ID}\n`);
        setTimeout(() => socket.destroy(), 1000).unref();
      } else {
        socket.destroy();
      }
      resolve(result);
    };
    const unavailable = (reason: string) => finish({ ok: false, temporary: true, reason });
    const protocolError = (what: string) => unavailable(`unexpected answer from the Dovecot auth socket ${socketPath}: ${what}`);

    const timer = setTimeout(() => unavailable(`no answer from the Dovecot auth socket ${socketPath} within ${timeoutMs} ms`), timeoutMs);

    const onLine = (line: string) => {
      const args = line.split('\t');
      const command = args[0] ?? '';
      if (state === 'version') {
        if (command !== 'VERSION' || args[1] !== PROTOCOL_MAJOR) return protocolError(`expected "VERSION\\t${PROTOCOL_MAJOR}\\t...", got ${JSON.stringify(line.slice(0, 80))}`);
        state = 'handshake';
        return;
      }
      if (state === 'handshake') {
        if (++handshakeLines > MAX_HANDSHAKE_LINES) return protocolError(`more than ${MAX_HANDSHAKE_LINES} handshake lines`);
        if (command === 'MECH' && args[1] === 'PLAIN') hasPlain = true;
        if (command !== 'DONE') return; // MECH, SPID, CUID, COOKIE and whatever a later version adds
        if (!hasPlain) return unavailable(`Dovecot does not offer the PLAIN mechanism on ${socketPath} (auth_mechanisms)`);
        state = 'auth';
        const out = pendingLine;
        if (out === undefined) return;
        // From here the write owns the buffer: zeroing it earlier could corrupt a queued write.
        pendingLine = undefined;
        sent = true;
        socket.write(out, () => out.fill(0));
        return;
      }
      // state === 'auth': the answer to our only request.
      if (args[1] !== REQUEST_ID) return protocolError(`${JSON.stringify(command)} for request ${JSON.stringify(args[1] ?? '')}`);
      if (command === 'OK' || command === 'FAIL') {
        answered = true;
        return finish(interpret(command, args.slice(2)));
      }
      if (command === 'CONT') return protocolError('CONT (Dovecot asked for more than the complete PLAIN response)');
      return protocolError(`unknown command ${JSON.stringify(command.slice(0, 40))}`);
    };

    socket.on('connect', () => {
      connected = true;
      socket.write(`VERSION\t${PROTOCOL_MAJOR}\t${PROTOCOL_MINOR}\nCPID\t${process.pid}\n`);
    });
    socket.on('data', (chunk: Buffer) => {
      if (settled) return;
      let start = 0;
      for (;;) {
        const nl = chunk.indexOf(0x0a, start);
        if (nl < 0) break;
        const piece = chunk.subarray(start, nl);
        start = nl + 1;
        const lineBytes = chunks.length === 0 ? piece : Buffer.concat([...chunks, piece]);
        chunks = [];
        buffered = 0;
        if (lineBytes.length > MAX_LINE_BYTES) return protocolError(`a line longer than ${MAX_LINE_BYTES} bytes`);
        onLine(lineBytes.toString('utf8'));
        if (settled) return;
      }
      if (start < chunk.length) {
        buffered += chunk.length - start;
        if (buffered > MAX_LINE_BYTES) return protocolError(`a line longer than ${MAX_LINE_BYTES} bytes`);
        chunks.push(chunk.subarray(start));
      }
    });
    socket.on('error', (err: NodeJS.ErrnoException) => {
      if (!connected) {
        return unavailable(`cannot connect to the Dovecot auth socket ${socketPath}: ${err.code ?? err.message}`);
      }
      unavailable(`connection to the Dovecot auth socket ${socketPath} failed: ${err.code ?? err.message}`);
    });
    socket.on('close', () => unavailable(`Dovecot closed the auth connection on ${socketPath} before answering`));
  });
}
