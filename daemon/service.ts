// What both endpoints share: normalise the request, run the decision against the store, log one line, count.
// The adapters (dovecot-server.ts, postfix-server.ts) only parse and format.
import { type Config, policySettings, refusalMessage } from '../config/config.js';
import { parseAddress } from '../policy/address.js';
import { type Decision, type PolicySettings, decide } from '../policy/decide.js';
import { isAcceptableUserName, normaliseUser } from '../policy/user.js';
import type { LoginReport, Store } from '../store/store.js';
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
}

export type CheckOutcome =
  | { ok: true; user: string; decision: Decision; message: string }
  | { ok: false; error: string };

export class PolicyService {
  config: Config;
  settings: PolicySettings;
  readonly counters: Counters = { allowed: 0, refused: 0, logOnly: 0, badRequests: 0 };
  private reports: LoginReport[] = [];

  constructor(
    config: Config,
    readonly store: Store,
    readonly logger: Logger,
    readonly clock: () => number = Date.now,
  ) {
    this.config = config;
    this.settings = policySettings(config);
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
    const decision = decide(this.settings, { user, address, realAddress, protocol, now }, this.store);
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
    });
    return { ok: true, user, decision, message: refusalMessage(this.config, protocol) };
  }

  /** Dovecot's report after an attempt; stored in batches (see flushReports). */
  report(login: string, remote: string, protocol: string, success: boolean, policyReject: boolean): boolean {
    const user = normaliseUser(login, this.config.users);
    const address = parseAddress(remote);
    if (!isAcceptableUserName(user) || !address) return false;
    this.reports.push({ user, ip: address.toString(), protocol: protocol.toLowerCase(), success, policyReject, at: this.clock() });
    if (this.reports.length >= 1000) this.flushReports();
    return true;
  }

  flushReports(): void {
    if (this.reports.length === 0) return;
    const batch = this.reports;
    this.reports = [];
    try {
      this.store.recordLogins(batch);
    } catch (e) {
      this.logger.log('error', 'report-store-failed', { error: errorText(e), dropped: batch.length });
    }
  }

  private bad(input: CheckInput, error: string): CheckOutcome {
    this.counters.badRequests++;
    this.logger.repeated('warn', 'bad-request', `${input.endpoint} ${error}`, { endpoint: input.endpoint, error, protocol: input.protocol });
    return { ok: false, error };
  }
}
