// Structured logging: one JSON object per line on stdout (journald keeps it). Never pass secrets here.

export type Level = 'debug' | 'info' | 'warn' | 'error';
const ORDER: Record<Level, number> = { debug: 10, info: 20, warn: 30, error: 40 };

export interface Logger {
  level: Level;
  log(level: Level, event: string, fields?: Record<string, unknown>): void;
  /** Writes out what is buffered (before exit). */
  flush(): void;
}

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

export function createLogger(level: Level, sink: { write(line: string): void; flush?(): void } = stdoutWriter()): Logger {
  const logger: Logger = {
    level,
    log(lvl, event, fields = {}) {
      if (ORDER[lvl] < ORDER[logger.level]) return;
      sink.write(JSON.stringify({ ts: new Date().toISOString(), level: lvl, event, ...fields }) + '\n');
    },
    flush() {
      sink.flush?.();
    },
  };
  return logger;
}

/** Error text for a log line: the message only, never a stack with request data in it. */
export function errorText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
