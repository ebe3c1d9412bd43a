// `mfagate report rollout`: before MFA is required for everyone, who would be refused at the date, and how many
// users are ready. The store's rows come from store/rollout-query.ts; this file checks the arguments and prints
// text, JSON or a CSV for the helpdesk's reminder mails.
import type { Command } from 'commander';
import { type Config, policySettings } from '../config/config.js';
import { DURATION_EXPECTED, formatDuration, parseDuration } from '../config/duration.js';
import { readNodeState } from '../store/node-state.js';
import type { DaemonStatsRow } from '../store/records.js';
import { type RolloutReadiness, rolloutReadiness, rolloutRows } from '../store/rollout-query.js';
import { UsageError, configOf, json, out, plural, withStore } from './common.js';
import { formatTime, table } from './format.js';

const AT_EXPECTED = 'a date such as "2026-04-01" (midnight, local time) or an RFC 3339 instant such as "2026-04-01T00:00:00+09:00"';

const DAYS_IN_MONTH = (y: number, m: number) => new Date(Date.UTC(y, m, 0)).getUTCDate();

/**
 * `--at`: "YYYY-MM-DD" (that day's midnight in the server's time zone) or an RFC 3339 instant with its offset.
 * Every field is checked: Date.parse alone would turn 2026-02-30 into March 2nd.
 */
export function parseAt(text: string): number | undefined {
  const day = /^(\d{4})-(\d{2})-(\d{2})$/.exec(text);
  const instant = /^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?(?:[Zz]|([+-])(\d{2}):(\d{2}))$/.exec(text);
  const m = day ?? instant;
  if (!m) return undefined;
  const [y, mo, d] = [Number(m[1]), Number(m[2]), Number(m[3])];
  if (y < 1970 || mo < 1 || mo > 12 || d < 1 || d > DAYS_IN_MONTH(y, mo)) return undefined;
  if (day) {
    const ms = new Date(y, mo - 1, d).getTime();
    return Number.isFinite(ms) ? ms : undefined;
  }
  const [h, mi, s] = [Number(m[4]), Number(m[5]), Number(m[6])];
  if (h > 23 || mi > 59 || s > 59) return undefined;
  if (m[8] !== undefined && (Number(m[9]) > 23 || Number(m[10]) > 59)) return undefined;
  const ms = Date.parse(text.toUpperCase().replace(' ', 'T'));
  return Number.isFinite(ms) ? ms : undefined;
}

/** RFC 3339 in the server's time zone, to the second ("2026-03-01T14:03:36+09:00"): for the mail merge. */
export function rfc3339Local(ms: number): string {
  const d = new Date(ms);
  const pad = (n: number) => String(Math.abs(n)).padStart(2, '0');
  const off = -d.getTimezoneOffset();
  return (
    `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}` +
    `${off >= 0 ? '+' : '-'}${pad(Math.trunc(off / 60))}:${pad(off % 60)}`
  );
}

/** One CSV field (RFC 4180): quoted when it holds a comma, a quote, a line break, or spaces at either end. */
export function csvField(v: string): string {
  return /[",\r\n]|^\s|\s$/.test(v) ? `"${v.replace(/"/g, '""')}"` : v;
}

export const CSV_COLUMNS = ['user', 'last_outside_login', 'ip', 'protocol', 'mfa_enabled', 'reason'] as const;

export function rolloutCsv(r: RolloutReadiness): string {
  const lines = [CSV_COLUMNS.join(',')];
  for (const u of r.wouldBeRefused) {
    lines.push([u.user, rfc3339Local(u.lastOutsideLogin), u.ip, u.protocol, String(u.mfaEnabled), u.reason].map(csvField).join(','));
  }
  return lines.map((l) => l + '\r\n').join('');
}

type AtSource = 'option' | 'required_from' | 'now';

/** What the report says about its own limits and the configuration it judged. */
function notesOf(config: Config, at: number, source: AtSource): string[] {
  const notes: string[] = [];
  const rf = config.enforcement.requiredFrom;
  if (source === 'now') {
    notes.push('[enforcement] required_from is not set and no --at was given: judged as of now, when MFA is required only for the users who enabled it');
  } else if (rf === undefined) {
    notes.push('[enforcement] required_from is not set: at that date MFA is required only for the users who enabled it (set required_from to the announced date: it changes nothing before then)');
  } else if (at < rf) {
    notes.push(`that date is before [enforcement] required_from (${formatTime(rf)}): MFA is required then only for the users who enabled it`);
  }
  if (config.enforcement.mode === 'off') notes.push('[enforcement] mode is "off": nobody is refused while it stays so; the list is who would be once it is "enforce"');
  return notes;
}

const LOG_ONLY_PER_DAY_NOTE =
  'the store keeps no count per day: the daemon keeps one running count from its start (reset when it restarts), written every 5 s ' +
  '(to the store; with PostgreSQL to this host\'s [store] state_file); each refusal let through is also a decision line in its log, ' +
  'with its time and "log_only":"would refuse"';
const LOG_ONLY_JOURNAL = `journalctl -u mfagate -o cat | grep '"log_only"' | grep -o '^{"ts":"[0-9-]*' | cut -c8- | sort | uniq -c`;

export function reportCommands(program: Command): void {
  const report = program.command('report').description('reports for the rollout');
  report
    .command('rollout')
    .description('before MFA is required for everyone: who would be refused at the date (no usable factor, logins from outside), and how many are ready')
    .option('--since <duration>', 'count logins from outside within this period, back from now', '30d')
    .option('--at <date>', 'judge for this date (default: [enforcement] required_from, else now)')
    .option('--json', 'machine-readable output')
    .option('--csv', 'the users who would be refused as CSV, for the helpdesk\'s reminder mails')
    .action(async (o: { since: string; at?: string; json?: boolean; csv?: boolean }, cmd: Command) => {
      if (o.json && o.csv) throw new UsageError('report rollout: --json and --csv cannot be combined');
      const sinceMs = parseDuration(o.since);
      if (sinceMs === undefined) throw new UsageError(`--since: expected ${DURATION_EXPECTED}, got ${JSON.stringify(o.since)}`);
      let at: number | undefined;
      if (o.at !== undefined) {
        at = parseAt(o.at);
        if (at === undefined) throw new UsageError(`--at: expected ${AT_EXPECTED}, got ${JSON.stringify(o.at)}`);
      }
      const config = configOf(cmd);
      const now = Date.now();
      const source: AtSource = at !== undefined ? 'option' : config.enforcement.requiredFrom !== undefined ? 'required_from' : 'now';
      const when = at ?? config.enforcement.requiredFrom ?? now;
      const from = now - sinceMs;
      const logOnly = config.enforcement.mode === 'log-only';
      const pg = config.store.backend === 'postgresql';
      const { rows, stats } = await withStore(config, async (s) => ({
        rows: await rolloutRows(s.sql, from),
        stats: logOnly && !pg ? await s.daemonStats() : undefined,
      }));
      // With PostgreSQL each host's daemon keeps its figures in its own state file (as `stats` reads them).
      const daemon: DaemonStatsRow | undefined = logOnly && pg ? readNodeState(config.store.stateFile) : stats;
      const r = rolloutReadiness(rows, policySettings(config), when);
      const notes = notesOf(config, when, source);

      if (o.csv) {
        for (const n of notes) process.stderr.write(`mfagate: note: ${n}\n`);
        process.stdout.write(rolloutCsv(r));
        return;
      }
      const iso = (ms: number) => new Date(ms).toISOString();
      if (o.json) {
        const c = r.counts;
        return json({
          at: iso(when),
          at_from: source === 'option' ? '--at' : source,
          required_from: config.enforcement.requiredFrom === undefined ? null : iso(config.enforcement.requiredFrom),
          mode: config.enforcement.mode,
          period: { since: formatDuration(sinceMs), from: iso(from), to: iso(now) },
          counts: {
            users: c.users,
            mfa_enabled: c.mfaEnabled,
            usable_factor: c.usableFactor,
            exempt: c.exempt,
            mfa_required: c.mfaRequired,
            required_without_factor: c.requiredWithoutFactor,
            would_be_refused: c.wouldBeRefused,
          },
          would_be_refused: r.wouldBeRefused.map((u) => ({
            user: u.user,
            last_outside_login: iso(u.lastOutsideLogin),
            ip: u.ip,
            protocol: u.protocol,
            mfa_enabled: u.mfaEnabled,
            reason: u.reason,
            outside_addresses: u.outsideAddresses,
          })),
          log_only: logOnly
            ? {
                per_day: null,
                per_day_note: LOG_ONLY_PER_DAY_NOTE,
                daemon: daemon
                  ? { pid: daemon.pid, running: daemon.stoppedAt === null, started_at: iso(daemon.startedAt), as_of: iso(daemon.updatedAt), let_through: daemon.logOnly }
                  : null,
              }
            : null,
          notes,
        });
      }

      const c = r.counts;
      const whence = source === 'option' ? '--at' : source === 'required_from' ? '[enforcement] required_from' : 'now';
      out(`rollout readiness at ${formatTime(when)} (${whence})`);
      out(`outside logins:   ${formatTime(from)} to now (--since ${formatDuration(sinceMs)}); logins from trusted networks and webmail hosts do not count`);
      out(`users:            ${c.users} known to the store`);
      out(`MFA enabled:      ${c.mfaEnabled}`);
      out(`usable factor:    ${c.usableFactor} (an authenticator app or a confirmed external address)`);
      out(`exempt:           ${c.exempt} (users exempt, or in [enforcement] exempt_users)`);
      out(`MFA required:     ${c.mfaRequired} at that date, ${c.requiredWithoutFactor} of them without a usable factor`);
      out(`would be refused: ${c.wouldBeRefused}${c.wouldBeRefused ? ' (MFA required, no usable factor, logged in from outside in the period)' : ': nobody without a usable factor logged in from outside in the period'}`);
      if (logOnly) {
        out('log-only:         refusals are let through and logged');
        out(
          daemon
            ? `  let through:    ${plural(daemon.logOnly, 'refusal')} since the daemon (pid ${daemon.pid}) ${daemon.stoppedAt === null ? 'started' : 'ran from'} ${formatTime(daemon.startedAt)}${daemon.stoppedAt === null ? '' : ' to ' + formatTime(daemon.stoppedAt)} (as of ${formatTime(daemon.updatedAt)})`
            : `  let through:    unknown: the daemon has never started ${pg ? 'on this host' : 'on this store'}`,
        );
        out(`  per day:        not recorded in the store (one running count per daemon start); count the decision lines (days in UTC):`);
        out(`                  ${LOG_ONLY_JOURNAL}`);
      }
      for (const n of notes) out(`note: ${n}`);
      if (r.wouldBeRefused.length) {
        out('');
        out(
          table(
            ['USER', 'LAST OUTSIDE LOGIN', 'IP', 'PROTOCOL', 'MFA', 'REASON'],
            r.wouldBeRefused.map((u) => [
              u.user,
              formatTime(u.lastOutsideLogin),
              u.ip + (u.outsideAddresses > 1 ? ` (+${u.outsideAddresses - 1} more)` : ''),
              u.protocol,
              u.mfaEnabled ? 'enabled' : 'off',
              u.reason,
            ]),
          ),
        );
      }
    });
}
