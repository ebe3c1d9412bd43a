// Structured logging: one JSON object per line on stdout (journald keeps it). Never pass secrets here.

export type Level = 'debug' | 'info' | 'warn' | 'error';
const ORDER: Record<Level, number> = { debug: 10, info: 20, warn: 30, error: 40 };

export interface Logger {
  level: Level;
  log(level: Level, event: string, fields?: Record<string, unknown>): void;
  /**
   * A line about something a peer can repeat at will (a bad request, a wrong key): the first of each `key` in
   * an interval is written as it comes, the others only counted, and when the interval ends one line with the
   * same event and `repeated: N` says how many more there were. A flood of them cannot fill the disk or use up
   * journald's rate limit, which would drop the decision lines with them. `key` names what makes two lines the
   * same (endpoint, peer, reason); never a secret.
   */
  repeated(level: Level, event: string, key: string, fields?: Record<string, unknown>): void;
  /** Writes out what is buffered, the counts of repeated lines too (before exit). */
  flush(): void;
}

/** How long repeated lines are counted before their count is written. */
export const REPEAT_INTERVAL_MS = 10_000;
/** Distinct keys counted per interval; beyond that, new keys share one count (event "repeated-other"). */
const REPEAT_MAX_KEYS = 1000;

/**
 * Stdout, written once per event-loop turn: a write system call per decision would cost more than the
 * decision. What a turn logged is out before the next turn starts, and `flush` empties it at shutdown.
 */
export function stdoutWriter(): { write(line: string): void; flush(): void } {
  let pending: string[] = [];
  let size = 0;
  let scheduled = false;
  const flush = () => {
    scheduled = false;
    if (pending.length === 0) return;
    const text = pending.join('');
    pending = [];
    size = 0;
    process.stdout.write(text);
  };
  return {
    write(line) {
      pending.push(line);
      size += line.length;
      if (size >= 65536) flush();
      else if (!scheduled) {
        scheduled = true;
        setImmediate(flush);
      }
    },
    flush,
  };
}

export function createLogger(
  level: Level,
  sink: { write(line: string): void; flush?(): void } = stdoutWriter(),
  repeatIntervalMs = REPEAT_INTERVAL_MS,
): Logger {
  /** Per key: how many were not written this interval, and the last one's fields (for the summary line). */
  const counts = new Map<string, { level: Level; event: string; fields: Record<string, unknown>; n: number }>();
  let overflow = 0;
  let timer: NodeJS.Timeout | undefined;
  const summarise = () => {
    for (const [key, c] of counts) {
      if (c.n > 0) logger.log(c.level, c.event, { ...c.fields, repeated: c.n, interval_s: repeatIntervalMs / 1000 });
      counts.delete(key);
    }
    if (overflow > 0) logger.log('warn', 'repeated-other', { repeated: overflow, interval_s: repeatIntervalMs / 1000, note: 'more kinds of repeated lines than are counted one by one' });
    overflow = 0;
    if (counts.size === 0 && timer) {
      clearInterval(timer);
      timer = undefined;
    }
  };
  const logger: Logger = {
    level,
    log(lvl, event, fields = {}) {
      if (ORDER[lvl] < ORDER[logger.level]) return;
      sink.write(JSON.stringify({ ts: new Date().toISOString(), level: lvl, event, ...fields }) + '\n');
    },
    repeated(lvl, event, key, fields = {}) {
      if (ORDER[lvl] < ORDER[logger.level]) return;
      const k = `${event}\0${key}`;
      const c = counts.get(k);
      if (c) {
        c.n++;
        c.fields = fields;
        return;
      }
      if (counts.size >= REPEAT_MAX_KEYS) {
        overflow++;
        return;
      }
      counts.set(k, { level: lvl, event, fields, n: 0 });
      if (!timer) {
        timer = setInterval(summarise, repeatIntervalMs);
        timer.unref();
      }
      logger.log(lvl, event, fields);
    },
    flush() {
      summarise();
      sink.flush?.();
    },
  };
  return logger;
}

/** Error text for a log line: the message only, never a stack with request data in it. */
export function errorText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
