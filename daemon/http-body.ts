// Reading a small HTTP request body with a hard limit, for the webmail API and the MFA page.
import type http from 'node:http';

/**
 * The body as UTF-8 text, or undefined when it is (or says it is) larger than `max` bytes. Beyond the limit
 * nothing more is read: the caller answers 413 and closes the connection.
 */
export function readLimitedBody(req: http.IncomingMessage, max: number): Promise<string | undefined> {
  return new Promise((resolve, reject) => {
    if (Number(req.headers['content-length'] ?? '0') > max) {
      resolve(undefined);
      return;
    }
    const chunks: Buffer[] = [];
    let size = 0;
    let done = false;
    req.on('data', (c: Buffer) => {
      if (done) return;
      size += c.length;
      if (size > max) {
        done = true;
        req.pause();
        resolve(undefined);
        return;
      }
      chunks.push(c);
    });
    req.on('end', () => {
      if (done) return;
      done = true;
      resolve(Buffer.concat(chunks).toString('utf8'));
    });
    req.on('error', (e) => {
      if (done) return;
      done = true;
      reject(e);
    });
  });
}
