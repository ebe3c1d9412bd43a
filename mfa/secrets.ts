// The secrets key: AES-256-GCM for TOTP seeds at rest, and an HMAC subkey for hashing one-time codes.
// The key file is created (mode 0600) on first start when missing. Nothing here ever logs a secret.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { giveToDaemonUser } from '../store/ownership.js';
import type { Records } from '../store/records.js';

export class SecretsError extends Error {
  override name = 'SecretsError';
}

export interface Secrets {
  encrypt(plain: Buffer, context: string): Buffer;
  decrypt(sealed: Buffer, context: string): Buffer;
  /** A keyed hash of a one-time code, bound to its user: a stolen database alone cannot test guesses. */
  hashCode(user: string, code: string): string;
  /** Constant-time comparison of two hashes from hashCode. */
  sameHash(a: string, b: string): boolean;
}

const VERSION = 1;

/** Reads the key file, creating it (32 random bytes, base64, mode 0600) if it does not exist. */
export function loadOrCreateKey(file: string): Buffer {
  if (!fs.existsSync(file)) {
    fs.mkdirSync(path.dirname(file), { recursive: true, mode: 0o750 });
    try {
      fs.writeFileSync(file, crypto.randomBytes(32).toString('base64') + '\n', { mode: 0o600, flag: 'wx' });
    } catch (e) {
      // Another process (the CLI, the daemon) created it first: use theirs.
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw new SecretsError(`cannot create the key file ${file}: ${(e as Error).message}`);
    }
  }
  return readKeyFile(file);
}

/** Reads an existing key file (never creates one): `db verify` checks a backup with it. */
export function readKeyFile(file: string): Buffer {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8').trim();
  } catch (e) {
    throw new SecretsError(`cannot read the key file ${file}: ${(e as Error).message}`);
  }
  const key = Buffer.from(text, 'base64');
  if (key.length !== 32 || key.toString('base64') !== text) {
    throw new SecretsError(`${file}: expected 32 bytes in base64 (as created by mfagate); refusing to use it`);
  }
  return key;
}

export function createSecrets(key: Buffer): Secrets {
  const encKey = Buffer.from(crypto.hkdfSync('sha256', key, Buffer.alloc(0), 'mfagate totp seed encryption', 32));
  const macKey = Buffer.from(crypto.hkdfSync('sha256', key, Buffer.alloc(0), 'mfagate one-time code hash', 32));
  return {
    encrypt(plain, context) {
      const iv = crypto.randomBytes(12);
      const c = crypto.createCipheriv('aes-256-gcm', encKey, iv);
      c.setAAD(Buffer.from(context, 'utf8'));
      const body = Buffer.concat([c.update(plain), c.final()]);
      return Buffer.concat([Buffer.from([VERSION]), iv, c.getAuthTag(), body]);
    },
    decrypt(sealed, context) {
      if (sealed.length < 29 || sealed[0] !== VERSION) throw new SecretsError('sealed secret has an unknown format');
      const d = crypto.createDecipheriv('aes-256-gcm', encKey, sealed.subarray(1, 13));
      d.setAAD(Buffer.from(context, 'utf8'));
      d.setAuthTag(sealed.subarray(13, 29));
      try {
        return Buffer.concat([d.update(sealed.subarray(29)), d.final()]);
      } catch {
        throw new SecretsError('sealed secret does not open with this key (wrong key file?)');
      }
    },
    hashCode(user, code) {
      return crypto.createHmac('sha256', macKey).update(`${user}\0${code}`).digest('base64');
    },
    sameHash(a, b) {
      const ba = Buffer.from(a, 'base64');
      const bb = Buffer.from(b, 'base64');
      return ba.length === bb.length && crypto.timingSafeEqual(ba, bb);
    },
  };
}

/**
 * The key for a store, as the daemon and the CLI load it: created when missing (mode 0600, owned like the
 * store's directory when root creates it), but never silently replaced. A missing key file while the store
 * holds secrets sealed with a key (a new key would void every app registration and backup code), or a key
 * that does not open them (a wrong [secrets] key_file), is an error that says what to do.
 */
export async function openSecrets(file: string, store: { records: Records; where: string; file?: string | undefined }): Promise<Secrets> {
  const existed = fs.existsSync(file);
  if (!existed && (await store.records.mfa.holdsSealedSecrets())) {
    throw new SecretsError(
      `the key file ${file} ([secrets] key_file) does not exist, but the store holds app registrations or backup codes ` +
        'made with a key: restore the key file from the backup of the store, or correct [secrets] key_file. Refusing to create a new key.',
    );
  }
  const key = loadOrCreateKey(file);
  if (!existed) giveToDaemonUser([file], store.file === undefined ? [path.dirname(file)] : [path.dirname(file), store.file, path.dirname(store.file)]);
  const secrets = createSecrets(key);
  const sample = await store.records.mfa.sampleTotpSecret();
  if (sample) {
    try {
      secrets.decrypt(sample.sealed, `totp:${sample.user}`);
    } catch {
      throw new SecretsError(
        `the key file ${file} ([secrets] key_file) does not open the app registrations in the store ${store.where}: ` +
          'is it the key the store was written with?',
      );
    }
  }
  return secrets;
}
