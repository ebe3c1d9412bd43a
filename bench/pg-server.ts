// A real PostgreSQL (Debian's packages) for a test or a benchmark: initdb in a temporary directory, pg_ctl on a loopback
// port, a database and a role of mfagate's own with a password (SCRAM), reached over TCP as production would.
// The server runs as the `postgres` system user (initdb refuses root). Missing binaries fail the test:
// `.ci/run` installs them.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { freePort } from './proc.js';

export interface PgServer {
  /** The data directory's parent: logs, sockets and the password file live here too. */
  dir: string;
  port: number;
  /** postgresql://mfagate@127.0.0.1:PORT/mfagate (no password: it is in passwordFile). */
  url: string;
  /** A file holding the mfagate role's password (mode 0600). */
  passwordFile: string;
  /** Runs SQL as the superuser over the server's UNIX socket; returns psql's output (unaligned, tuples only). */
  psql(sql: string, db?: string): string;
  stop(mode?: 'fast' | 'immediate'): void;
  start(): void;
  /** A standby becomes the primary. */
  promote(): void;
  /** Stops the server and removes its directory. */
  destroy(): void;
}

const PG_USER = 'postgres';

/** Debian puts the server's programs in /usr/lib/postgresql/<major>/bin; 15 is Debian 12's. */
export function pgBinDir(): string {
  const root = '/usr/lib/postgresql';
  const majors = fs.existsSync(root) ? fs.readdirSync(root).filter((d) => fs.existsSync(path.join(root, d, 'bin/initdb'))) : [];
  const major = majors.includes('15') ? '15' : majors.sort((a, b) => Number(b) - Number(a))[0];
  if (major === undefined) throw new Error('postgres helper: no PostgreSQL server here (Debian: apt-get install postgresql; .ci/run does)');
  return path.join(root, major, 'bin');
}

function run(cmd: string, args: string[], opts: { input?: string } = {}): string {
  const r = spawnSync('runuser', ['-u', PG_USER, '--', cmd, ...args], { encoding: 'utf8', input: opts.input, timeout: 60_000 });
  if (r.status !== 0) throw new Error(`postgres helper: ${path.basename(cmd)} ${args.join(' ')} failed (exit ${r.status}): ${r.stdout}${r.stderr}`);
  return r.stdout;
}

/**
 * A streaming standby of `primary` (pg_basebackup -R over the primary's socket), on a port of its own, started.
 * Its url and passwordFile are the primary's role (replicated with everything else).
 */
export async function startStandby(primary: PgServer): Promise<PgServer> {
  const bin = pgBinDir();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mfagate-pg-standby-'));
  fs.chmodSync(dir, 0o755);
  spawnSync('chown', [PG_USER, dir]);
  const data = path.join(dir, 'data');
  const port = await freePort();
  // A fast checkpoint: the default spreads it over minutes, and the backup waits for it.
  run(path.join(bin, 'pg_basebackup'), ['-D', data, '-R', '-X', 'stream', '-c', 'fast', '-h', primary.dir, '-p', String(primary.port), '-U', 'postgres']);
  fs.appendFileSync(path.join(data, 'postgresql.conf'), `port = ${port}\nunix_socket_directories = '${dir}'\n`);
  return server(bin, dir, data, port, primary.passwordFile);
}

function server(bin: string, dir: string, data: string, port: number, passwordFile: string): PgServer {
  const pg: PgServer = {
    dir,
    port,
    url: `postgresql://mfagate@127.0.0.1:${port}/mfagate`,
    passwordFile,
    psql(sql, db = 'postgres') {
      return run(path.join(bin, 'psql'), ['-X', '-q', '-v', 'ON_ERROR_STOP=1', '-At', '-h', dir, '-p', String(port), '-U', 'postgres', '-d', db], { input: sql });
    },
    stop(mode = 'fast') {
      run(path.join(bin, 'pg_ctl'), ['-D', data, '-m', mode, '-w', 'stop']);
    },
    start() {
      run(path.join(bin, 'pg_ctl'), ['-D', data, '-l', path.join(dir, 'server.log'), '-w', '-t', '60', 'start']);
    },
    promote() {
      run(path.join(bin, 'pg_ctl'), ['-D', data, '-w', 'promote']);
    },
    destroy() {
      try {
        pg.stop('immediate');
      } catch {
        /* already stopped */
      }
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
  pg.start();
  return pg;
}

/**
 * TLS for a server: a CA of its own (ca.crt, what a client's ca_file names), a certificate for 127.0.0.1 signed by
 * it, and a second CA that signed nothing (other-ca.crt, a wrong one), made with openssl in `dir`.
 */
function makeCertificates(dir: string): void {
  const ssl = (...args: string[]) => {
    const r = spawnSync('openssl', args, { cwd: dir, encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`postgres helper: openssl ${args[0]} failed: ${r.stderr}`);
  };
  for (const ca of ['ca', 'other-ca']) {
    ssl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2', '-subj', `/CN=mfagate test ${ca}`, '-keyout', `${ca}.key`, '-out', `${ca}.crt`);
  }
  ssl('req', '-newkey', 'rsa:2048', '-nodes', '-subj', '/CN=127.0.0.1', '-keyout', 'server.key', '-out', 'server.csr');
  fs.writeFileSync(path.join(dir, 'san.ext'), 'subjectAltName = IP:127.0.0.1\n');
  ssl('x509', '-req', '-in', 'server.csr', '-CA', 'ca.crt', '-CAkey', 'ca.key', '-CAcreateserial', '-days', '2', '-extfile', 'san.ext', '-out', 'server.crt');
  spawnSync('chown', [PG_USER, path.join(dir, 'server.key'), path.join(dir, 'server.crt')]);
  fs.chmodSync(path.join(dir, 'server.key'), 0o600);
}

/** A primary with TLS on (hostssl only: plain TCP is refused), and the CA files a client would name. */
export async function startPostgresTls(): Promise<PgServer & { caFile: string; otherCaFile: string }> {
  const pg = await startPostgres({ tls: true });
  return Object.assign(pg, { caFile: path.join(pg.dir, 'ca.crt'), otherCaFile: path.join(pg.dir, 'other-ca.crt') });
}

export async function startPostgres(o: { tls?: boolean } = {}): Promise<PgServer> {
  if (process.getuid?.() !== 0) throw new Error('postgres helper: run the suite as root (it starts PostgreSQL as the postgres user)');
  const bin = pgBinDir();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mfagate-pg-'));
  fs.chmodSync(dir, 0o755);
  const data = path.join(dir, 'data');
  const port = await freePort();
  const password = `pw-${Math.random().toString(36).slice(2)}-${Date.now().toString(36)}`;
  const passwordFile = path.join(dir, 'mfagate.password');
  fs.writeFileSync(passwordFile, `${password}\n`, { mode: 0o600 });
  spawnSync('chown', [PG_USER, dir]);
  run(path.join(bin, 'initdb'), ['-D', data, '-U', 'postgres', '--auth-local=trust', '--auth-host=scram-sha-256', '-E', 'UTF8', '--locale=C.UTF-8']);
  if (o.tls) {
    makeCertificates(dir);
    fs.appendFileSync(path.join(data, 'postgresql.conf'), `ssl = on\nssl_cert_file = '${dir}/server.crt'\nssl_key_file = '${dir}/server.key'\n`);
    // Only TLS over TCP: a client that does not ask for it is refused.
    const hba = path.join(data, 'pg_hba.conf');
    fs.writeFileSync(hba, fs.readFileSync(hba, 'utf8').replace(/^host(\s)/gm, 'hostssl$1'));
  }
  fs.appendFileSync(
    path.join(data, 'postgresql.conf'),
    `listen_addresses = '127.0.0.1'\nport = ${port}\nunix_socket_directories = '${dir}'\nfsync = off\n` +
      `wal_level = replica\nmax_wal_senders = 4\nlogging_collector = off\n`,
  );
  const pg = server(bin, dir, data, port, passwordFile);
  pg.psql(`CREATE ROLE mfagate LOGIN PASSWORD '${password}'; CREATE DATABASE mfagate OWNER mfagate;`);
  return pg;
}
