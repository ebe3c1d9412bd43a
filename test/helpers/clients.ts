// Minimal real IMAP, POP3 and SMTP clients over node:net, connecting from a chosen loopback source address
// (all of 127.0.0.0/8 is local, so '127.0.0.9' is "outside" and '127.0.0.2' "on campus" in a test).
// Every call has an overall timeout: a hung server fails the test with the transcript instead of hanging it.
import net from 'node:net';

export interface LoginOptions {
  port: number;
  user: string;
  password: string;
  /** Source address of the connection, e.g. '127.0.0.9'. */
  localAddress?: string;
  /** Server address; default 127.0.0.1. */
  host?: string;
  /** Whole-conversation timeout in ms; default 10000. */
  timeoutMs?: number;
}

export interface LoginResult {
  ok: boolean;
  /** The server's answer to the login: IMAP tagged reply ("a1 OK ..." / "a1 NO [AUTHENTICATIONFAILED] ..."), POP3 +OK/-ERR. */
  line: string;
  /** Everything said, "C: " / "S: " prefixed, for assertion messages. */
  transcript: string[];
}

export interface SmtpOptions {
  port: number;
  /** Omit user/password to send without AUTH (like an MX peer); authOk is then false and authLine ''. */
  user?: string;
  password?: string;
  localAddress?: string;
  host?: string;
  from: string;
  /** One recipient or several (each gets its own RCPT TO). */
  to: string | string[];
  /** Message body (headers are added unless it already starts with headers). Default: a short text. */
  body?: string;
  subject?: string;
  /** EHLO name; default 'client.test'. */
  helo?: string;
  timeoutMs?: number;
}

export interface SmtpResult {
  authOk: boolean;
  /** Last line of the AUTH reply, e.g. "235 2.7.0 Authentication successful" or "535 5.7.8 Error: ...". */
  authLine: string;
  mailOk?: boolean;
  mailLine?: string;
  /** true when every RCPT was accepted. */
  rcptOk?: boolean;
  /** The first refused RCPT's reply, else the last RCPT reply. */
  rcptLine?: string;
  rcptLines?: string[];
  dataOk?: boolean;
  /** Reply to the end of DATA, e.g. "250 2.0.0 Ok: queued as ABC123". */
  dataLine?: string;
  /** Subject used (a unique one is generated when none is given): find the delivered message by it. */
  subject: string;
  transcript: string[];
}

/**
 * A line-oriented connection. read() returns the next CRLF/LF-terminated line; an overall deadline rejects any
 * pending or later read with the transcript, and destroys the socket.
 */
class LineConn {
  private buf = '';
  private lines: string[] = [];
  private waiter: ((v: string | Error) => void) | undefined;
  private failure: Error | undefined;
  private readonly timer: NodeJS.Timeout;
  readonly transcript: string[] = [];

  private constructor(
    private readonly sock: net.Socket,
    private readonly what: string,
    timeoutMs: number,
  ) {
    sock.setEncoding('utf8');
    sock.on('data', (chunk: string) => {
      this.buf += chunk;
      let i: number;
      while ((i = this.buf.indexOf('\n')) >= 0) {
        const line = this.buf.slice(0, i).replace(/\r$/, '');
        this.buf = this.buf.slice(i + 1);
        this.transcript.push(`S: ${line}`);
        this.lines.push(line);
      }
      this.pump();
    });
    sock.on('error', (err) => this.fail(new Error(`${what}: ${err.message}`)));
    sock.on('close', () => this.fail(new Error(`${what}: connection closed by server`)));
    this.timer = setTimeout(() => this.fail(new Error(`${what}: no answer within ${timeoutMs} ms`)), timeoutMs);
  }

  static open(what: string, o: { host?: string; port: number; localAddress?: string; timeoutMs?: number }): Promise<LineConn> {
    const timeoutMs = o.timeoutMs ?? 10_000;
    return new Promise((resolve, reject) => {
      const sock = net.connect({ host: o.host ?? '127.0.0.1', port: o.port, localAddress: o.localAddress });
      const conn = new LineConn(sock, `${what} ${o.localAddress ?? ''}->${o.host ?? '127.0.0.1'}:${o.port}`, timeoutMs);
      sock.once('connect', () => resolve(conn));
      sock.once('error', (err) => reject(new Error(`${what}: cannot connect to port ${o.port} from ${o.localAddress ?? 'default'}: ${err.message}`)));
    });
  }

  private fail(err: Error): void {
    if (this.failure) return;
    this.failure = new Error(`${err.message}\n${this.transcript.join('\n')}`);
    clearTimeout(this.timer);
    this.sock.destroy();
    this.pump();
  }

  private pump(): void {
    if (!this.waiter) return;
    const line = this.lines.shift();
    const w = this.waiter;
    if (line !== undefined) {
      this.waiter = undefined;
      w(line);
    } else if (this.failure) {
      this.waiter = undefined;
      w(this.failure);
    }
  }

  read(): Promise<string> {
    return new Promise((resolve, reject) => {
      if (this.waiter) throw new Error('LineConn: concurrent reads');
      this.waiter = (v) => (v instanceof Error ? reject(v) : resolve(v));
      this.pump();
    });
  }

  /** Sends one line (CRLF added). `shown` replaces the text in the transcript (for secrets). */
  send(line: string, shown = line): void {
    if (this.failure) throw this.failure;
    this.transcript.push(`C: ${shown}`);
    this.sock.write(`${line}\r\n`, 'utf8');
  }

  /** Sends raw bytes (already CRLF-terminated as needed). */
  sendRaw(data: Buffer, shown: string): void {
    if (this.failure) throw this.failure;
    this.transcript.push(`C: ${shown}`);
    this.sock.write(data);
  }

  /** Closes politely; never throws. */
  close(): void {
    clearTimeout(this.timer);
    this.failure ??= new Error(`${this.what}: closed`);
    this.sock.end();
    setTimeout(() => this.sock.destroy(), 1000).unref();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// IMAP

/** An IMAP astring: a quoted string when that is possible, else a literal (non-ASCII, CR/LF, NUL). */
function imapString(s: string): { quoted?: string; literal?: Buffer } {
  if (/^[\x01-\x09\x0b\x0c\x0e-\x7f]*$/.test(s)) return { quoted: `"${s.replace(/[\\"]/g, (c) => `\\${c}`)}"` };
  return { literal: Buffer.from(s, 'utf8') };
}

/** Reads lines until the tagged reply for `tag`; returns it. */
async function imapTagged(c: LineConn, tag: string): Promise<string> {
  for (;;) {
    const line = await c.read();
    if (line.startsWith(`${tag} `)) return line;
  }
}

/** IMAP LOGIN (then LOGOUT). ok = tagged OK. */
export async function imapLogin(o: LoginOptions): Promise<LoginResult> {
  const c = await LineConn.open('imap', o);
  try {
    const greeting = await c.read();
    if (!greeting.startsWith('* OK')) return { ok: false, line: greeting, transcript: c.transcript };
    // LOGIN with quoted strings; a part that cannot be quoted goes as a synchronizing literal {n} + continuation.
    const parts = [imapString(o.user), imapString(o.password)];
    let prefix = 'a1 LOGIN';
    let shownPrefix = prefix;
    for (const [i, p] of parts.entries()) {
      const secret = i === 1;
      if (p.quoted !== undefined) {
        prefix += ` ${p.quoted}`;
        shownPrefix += secret ? ' "***"' : ` ${p.quoted}`;
        continue;
      }
      const lit = p.literal ?? Buffer.alloc(0);
      c.send(`${prefix} {${lit.length}}`, `${shownPrefix} {${lit.length}}`);
      const cont = await c.read();
      if (!cont.startsWith('+')) return { ok: false, line: cont, transcript: c.transcript };
      c.sendRaw(lit, secret ? '***' : lit.toString('utf8'));
      prefix = '';
      shownPrefix = '';
    }
    c.send(prefix, shownPrefix);
    const line = await imapTagged(c, 'a1');
    const ok = /^a1 OK\b/i.test(line);
    try {
      c.send('a2 LOGOUT');
      await imapTagged(c, 'a2');
    } catch {
      // the server may close first; the login result stands
    }
    return { ok, line, transcript: c.transcript };
  } finally {
    c.close();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// POP3

/** POP3 USER/PASS (then QUIT). line = the reply to PASS (or to USER when USER is refused). */
export async function pop3Login(o: LoginOptions): Promise<LoginResult> {
  const c = await LineConn.open('pop3', o);
  try {
    const greeting = await c.read();
    if (!greeting.startsWith('+OK')) return { ok: false, line: greeting, transcript: c.transcript };
    if (/[\r\n]/.test(o.user + o.password)) throw new Error('pop3Login: CR/LF in user or password');
    c.send(`USER ${o.user}`);
    const userLine = await c.read();
    if (!userLine.startsWith('+OK')) return { ok: false, line: userLine, transcript: c.transcript };
    c.send(`PASS ${o.password}`, 'PASS ***');
    const line = await c.read();
    const ok = line.startsWith('+OK');
    try {
      c.send('QUIT');
      await c.read();
    } catch {
      // ignore
    }
    return { ok, line, transcript: c.transcript };
  } finally {
    c.close();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// SMTP

/** Reads one (possibly multi-line "250-...") reply; returns its lines, the last one being "NNN text". */
async function smtpReply(c: LineConn): Promise<{ code: number; lines: string[]; last: string }> {
  const lines: string[] = [];
  for (;;) {
    const line = await c.read();
    lines.push(line);
    if (!/^\d{3}-/.test(line)) {
      const code = Number.parseInt(line.slice(0, 3), 10);
      return { code: Number.isNaN(code) ? 0 : code, lines, last: line };
    }
  }
}

let counter = 0;

/** Builds a message with headers (unless `body` starts with a header line), CRLF line ends, dot-stuffed, with the final ".". */
function smtpData(o: SmtpOptions, to: string[], subject: string): Buffer {
  const body = o.body ?? 'Hello from the mailstack test client.\n';
  const hasHeaders = /^[A-Za-z-]+:/.test(body);
  const headers = hasHeaders
    ? ''
    : [
        `From: <${o.from}>`,
        `To: ${to.map((t) => `<${t}>`).join(', ')}`,
        `Subject: ${subject}`,
        `Date: ${new Date().toUTCString().replace('GMT', '+0000')}`,
        `Message-ID: <${Date.now()}.${process.pid}.${counter}@client.test>`,
        '',
        '',
      ].join('\r\n');
  const text = (headers + body.replace(/\r?\n/g, '\r\n'))
    .split('\r\n')
    .map((l) => (l.startsWith('.') ? `.${l}` : l))
    .join('\r\n');
  return Buffer.from(`${text}${text.endsWith('\r\n') ? '' : '\r\n'}.\r\n`, 'utf8');
}

/** EHLO, AUTH PLAIN (when user given), MAIL FROM, RCPT TO, DATA when every RCPT was accepted, QUIT. */
export async function smtpSubmit(o: SmtpOptions): Promise<SmtpResult> {
  counter += 1;
  const subject = o.subject ?? `mailstack test ${process.pid}-${Date.now()}-${counter}`;
  const to = Array.isArray(o.to) ? o.to : [o.to];
  const c = await LineConn.open('smtp', o);
  const result: SmtpResult = { authOk: false, authLine: '', subject, transcript: c.transcript };
  const expect = (r: { code: number; last: string }, what: string, code: number) => {
    if (r.code !== code) throw new Error(`smtp: ${what} answered ${JSON.stringify(r.last)}\n${c.transcript.join('\n')}`);
  };
  try {
    expect(await smtpReply(c), 'greeting', 220);
    c.send(`EHLO ${o.helo ?? 'client.test'}`);
    expect(await smtpReply(c), 'EHLO', 250);

    if (o.user !== undefined) {
      const token = Buffer.from(`\0${o.user}\0${o.password ?? ''}`, 'utf8').toString('base64');
      c.send(`AUTH PLAIN ${token}`, `AUTH PLAIN <${o.user}, ***>`);
      const auth = await smtpReply(c);
      result.authOk = auth.code === 235;
      result.authLine = auth.last;
      if (!result.authOk) return result;
    }

    c.send(`MAIL FROM:<${o.from}>`);
    const mail = await smtpReply(c);
    result.mailOk = mail.code === 250;
    result.mailLine = mail.last;
    if (!result.mailOk) return result;

    result.rcptLines = [];
    let refused: string | undefined;
    for (const rcpt of to) {
      c.send(`RCPT TO:<${rcpt}>`);
      const r = await smtpReply(c);
      result.rcptLines.push(r.last);
      if (r.code !== 250 && r.code !== 251) refused ??= r.last;
    }
    result.rcptOk = refused === undefined;
    result.rcptLine = refused ?? result.rcptLines[result.rcptLines.length - 1] ?? '';
    if (!result.rcptOk) return result;

    c.send('DATA');
    const data = await smtpReply(c);
    if (data.code !== 354) {
      result.dataOk = false;
      result.dataLine = data.last;
      return result;
    }
    c.sendRaw(smtpData(o, to, subject), `<message "${subject}">`);
    const end = await smtpReply(c);
    result.dataOk = end.code === 250;
    result.dataLine = end.last;
    return result;
  } finally {
    try {
      c.send('QUIT');
      await smtpReply(c);
    } catch {
      // the server may have closed already
    }
    c.close();
  }
}
