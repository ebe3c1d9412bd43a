// The benchmark's data: a store filled with many users and grants, and a pool of requests that make every
// decision visit the store (all users MFA-enabled, every request from an external address), about half of
// them finding an active grant and half refused.
import fs from 'node:fs';
import { type BlockPrefixes, blockOf, parseAddress } from '../policy/address.js';
import { Store } from '../store/store.js';

export const GRANTS_PER_USER = 10;

/** Deterministic pseudo-random numbers (mulberry32), so runs are comparable. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function userName(i: number): string {
  return `user${String(i).padStart(6, '0')}`;
}

/**
 * Grant k of user i. k 0..8 are IPv4 (one address each, the default /32 block); k 9 is an IPv6 address
 * (its /64 is the block). First octets 60..75: public, outside every trusted range of the bench config.
 */
export function grantIp(i: number, k: number): string {
  if (k === GRANTS_PER_USER - 1) return `2001:db8:${(i >>> 16).toString(16)}:${(i & 0xffff).toString(16)}::a${k}`;
  const n = i * GRANTS_PER_USER + k;
  return `${60 + (n >>> 16)}.${(n >>> 8) & 255}.${n & 255}.${1 + (i % 250)}`;
}

/** What grant k of every user is: 0..6 and 9 active, 7 expired some days ago, 8 revoked an hour ago. */
export type GrantState = 'active' | 'expired' | 'revoked';
export function grantState(k: number): GrantState {
  return k === 7 ? 'expired' : k === 8 ? 'revoked' : 'active';
}

export interface FillResult {
  users: number;
  grants: number;
  activeGrants: number;
  ms: number;
}

/**
 * Creates the store with the daemon's own schema (Store.open), then bulk-loads users and grants in one
 * transaction. The grant indexes are dropped for the load and rebuilt from their own definitions afterwards.
 * No ANALYZE, as in a real store: with full statistics (sqlite_stat4) SQLite re-plans the grant lookup on
 * every call (its bound values could change the plan), which makes that query about three times slower.
 */
export function fillStore(file: string, users: number, prefixes: BlockPrefixes, now: number): FillResult {
  const started = performance.now();
  const store = Store.open(file, { create: true, migrate: true });
  const db = store.db;
  let grants = 0;
  let activeGrants = 0;
  try {
    // A fresh file and nobody else using it: no journal safety needed while loading.
    db.pragma('journal_mode = DELETE');
    db.pragma('synchronous = OFF');
    const indexes = db
      .prepare("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'grants' AND sql IS NOT NULL")
      .all() as { name: string; sql: string }[];
    const insertUser = db.prepare('INSERT INTO users (name, mfa_enabled, exempt, created_at, updated_at) VALUES (?, 1, 0, ?, ?)');
    const insertGrant = db.prepare(
      `INSERT INTO grants (user, block, ip, created_at, expires_at, method, source, reason, revoked_at, revoked_by, revoke_reason)
       VALUES (?, ?, ?, ?, ?, 'webmail', 'webmail', '', ?, ?, ?)`,
    );
    const r = rng(1);
    const hour = 3_600_000;
    db.transaction(() => {
      for (const ix of indexes) db.exec(`DROP INDEX ${ix.name}`);
      for (let i = 0; i < users; i++) {
        const name = userName(i);
        insertUser.run(name, now - 400 * 24 * hour, now - 30 * 24 * hour);
        for (let k = 0; k < GRANTS_PER_USER; k++) {
          const ip = grantIp(i, k);
          const addr = parseAddress(ip);
          if (!addr) throw new Error(`bench bug: bad address ${ip}`);
          const block = blockOf(addr, prefixes);
          const state = grantState(k);
          // Active grants expire within the next 14 h; expired ones 1..20 days ago (kept: purge_after is 30 days).
          const expires = state === 'expired' ? now - Math.floor((1 + r() * 19) * 24 * hour) : now + Math.floor((0.5 + r() * 13.5) * hour);
          const revoked = state === 'revoked' ? now - hour : null;
          insertGrant.run(name, block, ip, expires - 14 * hour, expires, revoked, revoked === null ? null : 'admin', revoked === null ? null : 'lost phone');
          grants++;
          if (state === 'active') activeGrants++;
        }
      }
      for (const ix of indexes) db.exec(ix.sql);
    })();
  } finally {
    store.close();
  }
  // Put the file on disk now, so the kernel's writeback of it does not land in a measured run.
  const fd = fs.openSync(file, 'r');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  return { users, grants, activeGrants, ms: performance.now() - started };
}

export interface RequestSpec {
  user: string;
  ip: string;
  /** What the daemon should answer. */
  allow: boolean;
}

/**
 * The request mix, drawn uniformly over all users:
 * 45 % an address with an active IPv4 grant, 5 % another address in the /64 of an active IPv6 grant (allowed);
 * 15 % an address whose grant expired, 5 % one whose grant was revoked, 30 % an address only other users
 * hold grants for (refused).
 */
export function requestMix(count: number, users: number, seed = 2): RequestSpec[] {
  const r = rng(seed);
  const out: RequestSpec[] = [];
  for (let n = 0; n < count; n++) {
    const i = Math.floor(r() * users);
    const user = userName(i);
    const p = r();
    if (p < 0.45) out.push({ user, ip: grantIp(i, Math.floor(r() * 7)), allow: true });
    else if (p < 0.5) out.push({ user, ip: grantIp(i, GRANTS_PER_USER - 1).replace(/::a\d+$/, '::' + (1 + Math.floor(r() * 0xfffe)).toString(16)), allow: true });
    else if (p < 0.65) out.push({ user, ip: grantIp(i, 7), allow: false });
    else if (p < 0.7) out.push({ user, ip: grantIp(i, 8), allow: false });
    else out.push({ user, ip: grantIp((i + 1 + Math.floor(r() * (users - 1))) % users, Math.floor(r() * 7)), allow: false });
  }
  return out;
}

/** A Postfix 3.7 smtpd_access_policy request (the attribute set Postfix really sends), for one RCPT. */
export function postfixRequest(spec: RequestSpec, n: number): Buffer {
  const hex = (v: number) => v.toString(16);
  return Buffer.from(
    'request=smtpd_access_policy\n' +
      'protocol_state=RCPT\n' +
      'protocol_name=ESMTP\n' +
      `client_address=${spec.ip}\n` +
      'client_name=unknown\n' +
      `client_port=${1024 + (n % 60000)}\n` +
      'reverse_client_name=unknown\n' +
      'server_address=192.0.2.25\n' +
      'server_port=587\n' +
      'helo_name=[192.168.1.23]\n' +
      `sender=${spec.user}@example.ac.jp\n` +
      `recipient=someone${n % 997}@example.org\n` +
      'recipient_count=0\n' +
      'queue_id=\n' +
      `instance=${hex(0x2e74 + (n & 0xfff))}.${hex(0x6b011c44 + n)}.${hex(0xa1834 + n)}.0\n` +
      'size=0\n' +
      'etrn_domain=\n' +
      'stress=\n' +
      'sasl_method=PLAIN\n' +
      `sasl_username=${spec.user}\n` +
      'sasl_sender=\n' +
      'ccert_subject=\n' +
      'ccert_issuer=\n' +
      'ccert_fingerprint=\n' +
      'ccert_pubkey_fingerprint=\n' +
      'encryption_protocol=TLSv1.3\n' +
      'encryption_cipher=TLS_AES_256_GCM_SHA384\n' +
      'encryption_keysize=256\n' +
      'policy_context=\n' +
      '\n',
    'latin1',
  );
}

/** Dovecot 2.3's `command=allow` request with its default attribute set, as its HTTP client sends it. */
export function dovecotRequest(spec: RequestSpec, n: number, host: string, apiKey: string): Buffer {
  const session = Buffer.from(`bench${n}`).toString('base64').slice(0, 16);
  const body = JSON.stringify({
    device_id: '',
    login: spec.user,
    protocol: 'imap',
    pwhash: (n & 0xffff).toString(16).padStart(4, '0'),
    remote: spec.ip,
    session_id: session,
    tls: false,
  });
  return Buffer.from(
    'POST /?command=allow HTTP/1.1\r\n' +
      `Host: ${host}\r\n` +
      'User-Agent: dovecot/auth-policy-client\r\n' +
      'Connection: Keep-Alive\r\n' +
      'Content-Type: application/json\r\n' +
      `X-API-Key: ${apiKey}\r\n` +
      `Content-Length: ${Buffer.byteLength(body)}\r\n` +
      '\r\n' +
      body,
    'latin1',
  );
}
