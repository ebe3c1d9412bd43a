// What both endpoints share: normalise the request, run the decision against the store, log one line, count.
// The adapters (dovecot-server.ts, postfix-server.ts) only parse and format.
import { type Config, policySettings, refusalMessage } from '../config/config.js';
import { parseAddress } from '../policy/address.js';
import { type Decision, type PolicySettings, decide } from '../policy/decide.js';
import { isAcceptableUserName, normaliseUser } from '../policy/user.js';
import type { CopyState, LoginReport, Records } from '../store/records.js';
import type { LiveCopy } from '../store/live-copy.js';
import { type CheckResult, PasscodeService, passcodeProtocolOf } from '../mfa/passcodes.js';
import type { PasscodeCheckRequest } from './dovecot-protocol.js';
import { type Logger, errorText } from './log.js';

export interface Counters {
  allowed: number;
  refused: number;
  logOnly: number;
  badRequests: number;
}

export interface CheckInput {
  endpoint: 'dovecot' | 'postfix';
  login: string;
  remote: string;
  realRemote?: string | undefined;
  protocol: string;
  /** Dovecot: the app passcode the login was made with (the Lua passdb's field), if any. */
  passcode?: number | undefined;
}

export type CheckOutcome =
  | { ok: true; user: string; decision: Decision; message: string }
  | { ok: false; error: string };

export class PolicyService {
  config: Config;
  settings: PolicySettings;
  readonly counters: Counters = { allowed: 0, refused: 0, logOnly: 0, badRequests: 0 };
  private reports: LoginReport[] = [];

  /** App passcodes: checked for Dovecot's Lua passdb, and the passcode rule of the decision. */
  readonly passcodes: PasscodeService;

  constructor(
    config: Config,
    /** The store's records: login reports and passcode uses are written here. */
    readonly store: Records,
    /** What decisions read: users' flags and active grants in memory, kept current from the store's change feed. */
    readonly copy: LiveCopy,
    readonly logger: Logger,
    readonly clock: () => number = Date.now,
  ) {
    this.config = config;
    this.settings = policySettings(config);
    this.passcodes = new PasscodeService({ store, config: () => this.config, logger, clock });
    this.passcodes.readFrom(this.copy);
  }

  private staleSince = 0;

  /** The copy can no longer be brought up to date: said once, until it can again (see copyCurrent). */
  copyStale(e: unknown, currentAt: number): void {
    this.staleSince = this.clock();
    this.copyError = errorText(e);
    this.logger.log('error', 'copy-stale', {
      error: errorText(e),
      current_at: new Date(currentAt).toISOString(),
      note: 'the store cannot be read: decisions go on from the copy in memory as it was then',
    });
  }

  copyCurrent(currentAt: number): void {
    this.copyError = undefined;
    this.logger.log('info', 'copy-current', { stale_ms: this.clock() - this.staleSince, current_at: new Date(currentAt).toISOString() });
  }

  /** Why the copy could not be brought up to date, while it cannot. */
  private copyError: string | undefined;

  /** The copy's state, for the statistics in the store ("mfagate stats"). */
  copyState(): CopyState {
    this.copy.refresh();
    const size = this.copy.size();
    return { currentAt: this.copy.currentAt, flaggedUsers: size.flaggedUsers, grants: size.grants, error: this.copyError };
  }

  /** Swap in a reloaded configuration (SIGHUP). */
  reconfigure(config: Config): void {
    this.settings = policySettings(config);
    this.config = config;
    this.logger.level = config.log.level;
  }

  check(input: CheckInput): CheckOutcome {
    const user = normaliseUser(input.login, this.config.users);
    if (!isAcceptableUserName(user)) return this.bad(input, 'unacceptable user name');
    const address = parseAddress(input.remote);
    if (!address) return this.bad(input, 'remote address is not an IP address');
    const realAddress = input.realRemote !== undefined ? parseAddress(input.realRemote) : undefined;
    // A real_remote that is there but not an address would silently skip the webmail rule: refuse to judge.
    if (input.realRemote !== undefined && !realAddress) return this.bad(input, 'real_remote address is not an IP address');
    const protocol = input.protocol.toLowerCase();
    const now = this.clock();
    // An app passcode: Dovecot names it (a check of it passed moments ago); Postfix cannot, so an SMTP AUTH
    // that Dovecot allowed with a passcode stands for this user and address for a while.
    const ip = address.toString();
    const passcodeId = input.endpoint === 'postfix' ? this.passcodes.smtpSession(user, ip) : input.passcode;
    // (smtpSession looked up whether it still works for SMTP.)
    const passcode = passcodeId !== undefined && (input.endpoint === 'postfix' || this.passcodes.loginAllowed(user, ip, passcodeId, protocol));
    const decision = decide(this.settings, { user, address, realAddress, protocol, now, passcode }, this.copy);
    if (decision.rule === 'app-passcode' && input.endpoint === 'dovecot' && passcodeId !== undefined && passcodeProtocolOf(protocol) === 'smtp') {
      this.passcodes.noteSmtpSession(user, ip, passcodeId);
    }
    if (decision.logOnly) this.counters.logOnly++;
    if (decision.allow) this.counters.allowed++;
    else this.counters.refused++;
    this.logger.log(decision.allow ? 'info' : 'warn', 'decision', {
      endpoint: input.endpoint,
      user,
      ip: address.toString(),
      ...(input.realRemote !== undefined && input.realRemote !== input.remote ? { real_ip: input.realRemote } : {}),
      protocol,
      result: decision.allow ? 'allow' : 'refuse',
      rule: decision.rule,
      block: decision.block,
      ...(decision.logOnly ? { log_only: 'would refuse' } : {}),
      ...(decision.untrustedRange ? { untrusted_range: true } : {}),
      ...(decision.grant ? { grant: decision.grant.id } : {}),
      ...(passcodeId !== undefined ? { passcode: passcodeId } : {}),
    });
    return { ok: true, user, decision, message: refusalMessage(this.config, protocol) };
  }

  /**
   * POST /passcode from Dovecot's Lua passdb: is this password a working app passcode of the user for the
   * protocol? Logged once per check (never the passcode).
   */
  async checkPasscode(r: PasscodeCheckRequest): Promise<{ ok: true; result: CheckResult } | { ok: false; error: string }> {
    const user = normaliseUser(r.login, this.config.users);
    const input: CheckInput = { endpoint: 'dovecot', login: r.login, remote: r.remote, protocol: r.protocol };
    if (!isAcceptableUserName(user)) return this.bad(input, 'unacceptable user name');
    const address = parseAddress(r.remote);
    if (!address) return this.bad(input, 'remote address is not an IP address');
    const ip = address.toString();
    const result = await this.passcodes.check({
      user,
      passcode: r.passcode,
      ip,
      protocol: r.protocol,
      realIp: r.realRemote,
      isWebmail: (a) => {
        const parsed = parseAddress(a);
        return parsed !== undefined && this.settings.webmail.has(parsed);
      },
    });
    const fields = { endpoint: 'dovecot', user, ip, protocol: r.protocol.toLowerCase(), result: result.ok ? 'ok' : 'fail', ...(result.ok ? { passcode: result.id, name: result.name } : { reason: result.reason }) };
    if (result.ok) this.logger.log('info', 'passcode-check', fields);
    // Failures are what a guesser repeats: counted, not written one by one.
    else this.logger.repeated('warn', 'passcode-check', `${user} ${ip} ${result.reason}`, fields);
    return { ok: true, result };
  }

  /**
   * Dovecot's report after an attempt; stored in batches (see flushReports). A login a webmail host made for a
   * browser (real_remote a [networks] webmail address, remote the browser's, forwarded) is recorded under the
   * webmail host: it is not a mail program's login from the browser's address (the rollout report counts those).
   */
  report(login: string, remote: string, protocol: string, success: boolean, policyReject: boolean, realRemote?: string): boolean {
    const user = normaliseUser(login, this.config.users);
    const address = parseAddress(remote);
    if (!isAcceptableUserName(user) || !address) return false;
    const real = realRemote !== undefined ? parseAddress(realRemote) : undefined;
    const by = real !== undefined && this.settings.webmail.has(real) ? real : address;
    this.reports.push({ user, ip: by.toString(), protocol: protocol.toLowerCase(), success, policyReject, at: this.clock() });
    if (this.reports.length >= 1000) void this.flushReports();
    return true;
  }

  async flushReports(): Promise<void> {
    if (this.reports.length === 0) return;
    const batch = this.reports;
    this.reports = [];
    try {
      await this.store.recordLogins(batch);
    } catch (e) {
      this.logger.log('error', 'report-store-failed', { error: errorText(e), dropped: batch.length });
    }
  }

  private bad(input: CheckInput, error: string): { ok: false; error: string } {
    this.counters.badRequests++;
    this.logger.repeated('warn', 'bad-request', `${input.endpoint} ${error}`, { endpoint: input.endpoint, error, protocol: input.protocol });
    return { ok: false, error };
  }
}
