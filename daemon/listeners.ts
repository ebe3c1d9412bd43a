// Binding listener endpoints: TCP, or a UNIX socket with a stale file removed and the mode set.
import fs from 'node:fs';
import path from 'node:path';
import net from 'node:net';
import type { Endpoint } from '../config/listen.js';
import { formatEndpoint } from '../config/listen.js';

export class ListenError extends Error {
  override name = 'ListenError';
}

/** True when something accepts connections on the UNIX socket. */
function socketInUse(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const c = net.connect(path);
    c.once('connect', () => {
      c.destroy();
      resolve(true);
    });
    c.once('error', () => resolve(false));
  });
}

export async function listenOn(server: net.Server, endpoint: Endpoint, mode?: number): Promise<void> {
  if (endpoint.kind === 'unix') {
    let st: fs.Stats | undefined;
    try {
      st = fs.lstatSync(endpoint.path);
    } catch {
      st = undefined;
    }
    if (st) {
      if (!st.isSocket()) throw new ListenError(`${endpoint.path} exists and is not a socket: refusing to replace it`);
      if (await socketInUse(endpoint.path)) throw new ListenError(`${endpoint.path} is in use by another process`);
      try {
        fs.unlinkSync(endpoint.path);
      } catch (e) {
        throw new ListenError(`cannot remove the stale socket ${endpoint.path} to listen there: ${(e as Error).message}`);
      }
    }
  }
  await new Promise<void>((resolve, reject) => {
    const onError = (e: Error) => {
      // Node says EACCES for a socket whose directory is missing: say what is wrong.
      const missing = endpoint.kind === 'unix' && !fs.existsSync(path.dirname(endpoint.path));
      reject(new ListenError(`cannot listen on ${formatEndpoint(endpoint)}: ${missing ? `its directory ${path.dirname(endpoint.path)} does not exist` : e.message}`));
    };
    server.once('error', onError);
    const done = () => {
      server.off('error', onError);
      resolve();
    };
    if (endpoint.kind === 'unix') server.listen({ path: endpoint.path, backlog: 511 }, done);
    else server.listen({ host: endpoint.host, port: endpoint.port, backlog: 511 }, done);
  });
  if (endpoint.kind === 'unix' && mode !== undefined) fs.chmodSync(endpoint.path, mode);
}

/** The address actually bound (a TCP port of 0 becomes the real port). */
export function boundEndpoint(server: net.Server, endpoint: Endpoint): Endpoint {
  const a = server.address();
  if (endpoint.kind === 'tcp' && a && typeof a === 'object') return { kind: 'tcp', host: endpoint.host, port: a.port };
  return endpoint;
}

export function closeServer(server: net.Server, endpoint: Endpoint): Promise<void> {
  return new Promise((resolve) => {
    server.close(() => {
      if (endpoint.kind === 'unix') {
        try {
          fs.unlinkSync(endpoint.path);
        } catch {
          /* already gone */
        }
      }
      resolve();
    });
  });
}
