// The Postfix policy endpoint: many requests per connection, strictly one reply each, nothing after a reply.
import net from 'node:net';
import { PolicyProtocolError, PostfixParser, formatReply } from './postfix-protocol.js';
import type { PolicyService } from './service.js';
import { errorText } from './log.js';

/** The protocol name decisions use for Postfix submissions (Dovecot reports SASL through Postfix as "smtp" too). */
export const POSTFIX_PROTOCOL = 'smtp';

export interface PostfixServer extends net.Server {
  /** Ends every connection. Between requests that is normal for smtpd: it reconnects for the next one. */
  closeAllConnections(): void;
}

export function createPostfixServer(service: PolicyService): PostfixServer {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    const parser = new PostfixParser();
    socket.setEncoding('utf8');
    // smtpd drops idle policy connections after 300 s; a peer silent for longer is gone.
    socket.setTimeout(600_000, () => socket.destroy());
    socket.on('error', () => socket.destroy());
    socket.on('data', (chunk: string) => {
      let requests;
      try {
        requests = parser.push(chunk);
      } catch (e) {
        service.counters.badRequests++;
        const error = e instanceof PolicyProtocolError ? e.message : errorText(e);
        service.logger.repeated('warn', 'bad-request', `postfix ${error}`, { endpoint: 'postfix', error, action: 'connection closed' });
        socket.destroy();
        return;
      }
      for (const attrs of requests) {
        const user = attrs.get('sasl_username') ?? '';
        // Unauthenticated (inbound) mail is not ours.
        if (user === '') {
          socket.write(formatReply('DUNNO'));
          continue;
        }
        const outcome = service.check({
          endpoint: 'postfix',
          login: user,
          remote: attrs.get('client_address') ?? '',
          protocol: POSTFIX_PROTOCOL,
        });
        if (!outcome.ok) {
          // Our trouble or a broken request: Postfix's advice is to log, not reply, and close; it then retries
          // and applies its default_action.
          socket.destroy();
          return;
        }
        socket.write(formatReply(outcome.decision.allow ? 'DUNNO' : service.config.postfix.rejectAction));
      }
    });
  });
  server.maxConnections = 4096;
  return Object.assign(server, {
    closeAllConnections() {
      for (const s of sockets) s.destroy();
    },
  });
}
