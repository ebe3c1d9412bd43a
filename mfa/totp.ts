// TOTP (RFC 6238) through otplib: SHA-1, 6 digits, 30 s, one step of drift either way, as every authenticator
// app (Google, Microsoft, Authy, ...) expects. The matched time step is returned so a code is accepted once.
import { generateSecret, generateSync, generateURI, verifySync } from 'otplib';

export const PERIOD = 30;
export const DIGITS = 6;

export function newSecret(): string {
  // 20 bytes (160 bits), the size RFC 4226 recommends for SHA-1; base32 for the apps.
  return generateSecret({ length: 20 });
}

export function otpauthUri(issuer: string, user: string, secret: string): string {
  return generateURI({ issuer, label: user, secret, algorithm: 'sha1', digits: DIGITS, period: PERIOD });
}

/** The code for a moment (tests, the CLI's enrolment check). `now` in ms. */
export function codeAt(secret: string, now: number): string {
  return generateSync({ secret, epoch: Math.floor(now / 1000), period: PERIOD, digits: DIGITS, algorithm: 'sha1' });
}

/** The time step the code belongs to (now, or one step either side), or undefined when it matches none. */
export function matchStep(secret: string, code: string, now: number): number | undefined {
  if (!/^\d{6}$/.test(code)) return undefined;
  const r = verifySync({ secret, token: code, epoch: Math.floor(now / 1000), epochTolerance: PERIOD, period: PERIOD, digits: DIGITS, algorithm: 'sha1' });
  return r.valid ? Math.floor(now / 1000 / PERIOD) + r.delta : undefined;
}
