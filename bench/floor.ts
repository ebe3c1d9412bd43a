// The floor: the least a Node server can do on the same transport. It answers every request with a
// constant and looks at nothing but where the request ends. Run as a child process by bench.ts:
//   node floor.js http               HTTP/1.1 keep-alive on a free loopback port, answers {"status":0}
//   node floor.js postfix SOCKET     UNIX socket, answers action=DUNNO to each request (ended by an empty line)
// Prints "ready <port or socket>" on stdout once listening; exits on SIGTERM.
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';

const [mode, where] = process.argv.slice(2);

function ready(what: string): void {
  process.stdout.write(`ready ${what}\n`);
}

let server: net.Server;
if (mode === 'http') {
  const body = '{"status":0}';
  const headers = { 'content-type': 'application/json', 'content-length': String(Buffer.byteLength(body)) };
  const s = http.createServer({ keepAlive: true }, (req, res) => {
    // Read the body as a real server must before answering, then the constant.
    req.resume();
    req.on('end', () => {
      res.writeHead(200, headers);
      res.end(body);
    });
  });
  s.keepAliveTimeout = 15_000;
  server = s;
  s.listen({ host: '127.0.0.1', port: 0, backlog: 511 }, () => {
    const a = s.address();
    ready(String(typeof a === 'object' && a ? a.port : 0));
  });
} else if (mode === 'postfix' && where) {
  const reply = 'action=DUNNO\n\n';
  server = net.createServer((socket) => {
    // A request ends at an empty line: a newline right after a newline (the attributes are never empty).
    let lastWasNewline = false;
    socket.on('error', () => socket.destroy());
    socket.on('data', (chunk: Buffer) => {
      let from = 0;
      for (;;) {
        const nl = chunk.indexOf(10, from);
        if (nl < 0) break;
        if (nl === from && (from > 0 || lastWasNewline)) socket.write(reply);
        from = nl + 1;
      }
      lastWasNewline = chunk.length > 0 && chunk[chunk.length - 1] === 10;
    });
  });
  try {
    fs.unlinkSync(where);
  } catch {
    /* not there */
  }
  server.listen({ path: where, backlog: 511 }, () => ready(where));
} else {
  process.stderr.write('usage: floor.js http | floor.js postfix SOCKET\n');
  process.exit(2);
}

process.once('SIGTERM', () => {
  server.close();
  process.exit(0);
});
