// Structured logging: one JSON object per line on stdout (journald keeps it). Never pass secrets here.

export type Level = 'debug' | 'info' | 'warn' | 'error';
const ORDER: Record<Level, number> = { debug: 10, info: 20, warn: 30, error: 40 };

export interface Logger {
  level: Level;
  log(level: Level, event: string, fields?: Record<string, unknown>): void;
}

export function createLogger(level: Level, write: (line: string) => void = (l) => process.stdout.write(l)): Logger {
  const logger: Logger = {
    level,
    log(lvl, event, fields = {}) {
      if (ORDER[lvl] < ORDER[logger.level]) return;
      write(JSON.stringify({ ts: new Date().toISOString(), level: lvl, event, ...fields }) + '\n');
    },
  };
  return logger;
}

/** Error text for a log line: the message only, never a stack with request data in it. */
export function errorText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
