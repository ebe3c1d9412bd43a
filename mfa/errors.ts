// The errors of the second-factor services, as the API maps them to HTTP statuses (daemon/api-server.ts) and the
// page and the Roundcube plugin put them in words.
/** The catalogue of errors the API maps to HTTP statuses. Messages are safe to show and never name a secret. */
export const MFA_ERRORS = {
  'bad-request': { status: 400, message: 'the request is malformed' },
  'factor-failed': { status: 403, message: 'the code is not right' },
  'proof-required': { status: 403, message: 'a passed second factor is required for this change' },
  'no-factor': { status: 409, message: 'no second factor is registered' },
  'not-registered': { status: 409, message: 'that factor is not registered' },
  conflict: { status: 409, message: 'the request conflicts with the current state' },
  'refused-domain': { status: 422, message: 'addresses in this domain cannot be used as an external address' },
  locked: { status: 423, message: 'too many failed attempts: try again later' },
  'rate-limited': { status: 429, message: 'too many requests: try again later' },
  'mail-failed': { status: 502, message: 'the mail could not be sent' },
  'store-unavailable': { status: 503, message: 'the store cannot be reached now: nothing was changed; try again in a few minutes' },
} as const;
export type MfaErrorCode = keyof typeof MFA_ERRORS;

export class MfaError extends Error {
  override name = 'MfaError';
  constructor(
    readonly code: MfaErrorCode,
    detail?: string,
    readonly retryAfterMs?: number,
  ) {
    super(detail ?? MFA_ERRORS[code].message);
  }
  get status(): number {
    return MFA_ERRORS[this.code].status;
  }
}
