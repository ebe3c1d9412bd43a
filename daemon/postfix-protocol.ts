// Postfix policy delegation: a streaming parser for "name=value" lines ending in an empty line,
// and the reply format. No I/O here. Limits protect the daemon from a hostile or broken peer.

export interface PostfixLimits {
  maxLineLength: number;
  maxAttributes: number;
}

export const DEFAULT_POSTFIX_LIMITS: PostfixLimits = { maxLineLength: 8192, maxAttributes: 100 };

export type PostfixRequest = Map<string, string>;

export class PolicyProtocolError extends Error {
  override name = 'PolicyProtocolError';
}

/**
 * Feed it bytes as they arrive; it returns each complete request. Throws PolicyProtocolError on an over-long
 * line or too many attributes; the connection should then be closed.
 */
export class PostfixParser {
  private pending = '';
  private attrs: PostfixRequest = new Map();
  private count = 0;

  constructor(private readonly limits: PostfixLimits = DEFAULT_POSTFIX_LIMITS) {}

  push(chunk: string): PostfixRequest[] {
    const out: PostfixRequest[] = [];
    let data = this.pending + chunk;
    let start = 0;
    for (;;) {
      const nl = data.indexOf('\n', start);
      if (nl < 0) break;
      let line = data.slice(start, nl);
      start = nl + 1;
      if (line.endsWith('\r')) line = line.slice(0, -1);
      if (line.length > this.limits.maxLineLength) {
        throw new PolicyProtocolError(`line longer than ${this.limits.maxLineLength} characters`);
      }
      if (line === '') {
        // An empty line before any attribute is not a request (stray newline): ignore it.
        if (this.count > 0) out.push(this.attrs);
        this.attrs = new Map();
        this.count = 0;
        continue;
      }
      this.count++;
      if (this.count > this.limits.maxAttributes) {
        throw new PolicyProtocolError(`more than ${this.limits.maxAttributes} attributes in one request`);
      }
      const eq = line.indexOf('=');
      if (eq <= 0) throw new PolicyProtocolError('attribute line without "name="');
      const name = line.slice(0, eq);
      // Postfix sends each attribute once. A second copy (of sasl_username, client_address, anything) is not
      // resolved by its order: the request is refused and the connection closed, so Postfix applies its
      // default_action (a temporary refusal) instead of a decision about the wrong user or address.
      if (this.attrs.has(name)) throw new PolicyProtocolError(`attribute ${JSON.stringify(name.slice(0, 64))} given twice in one request`);
      this.attrs.set(name, line.slice(eq + 1));
    }
    data = data.slice(start);
    if (data.length > this.limits.maxLineLength) {
      throw new PolicyProtocolError(`line longer than ${this.limits.maxLineLength} characters`);
    }
    this.pending = data;
    return out;
  }
}

export function formatReply(action: string): string {
  return `action=${action}\n\n`;
}
