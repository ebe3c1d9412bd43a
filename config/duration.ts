// Durations as people write them in a config file or on the command line: "14h", "30m", "90s", "7d", "1h30m".

const UNIT_MS: Record<string, number> = { d: 86_400_000, h: 3_600_000, m: 60_000, s: 1000 };

/** Milliseconds, or undefined when the text is not a duration. Zero is not a duration. */
export function parseDuration(text: string): number | undefined {
  const s = text.trim().toLowerCase();
  if (!/^(\d+[dhms])+$/.test(s)) return undefined;
  let total = 0;
  for (const m of s.matchAll(/(\d+)([dhms])/g)) {
    const n = Number(m[1]);
    const unit = UNIT_MS[m[2] ?? ''];
    if (unit === undefined) return undefined;
    total += n * unit;
  }
  if (total <= 0 || !Number.isSafeInteger(total)) return undefined;
  return total;
}

export function formatDuration(ms: number): string {
  if (ms <= 0) return '0s';
  let rest = Math.round(ms / 1000);
  let out = '';
  for (const [unit, size] of [['d', 86400], ['h', 3600], ['m', 60], ['s', 1]] as const) {
    const n = Math.floor(rest / size);
    if (n > 0) {
      out += `${n}${unit}`;
      rest -= n * size;
    }
  }
  return out || '0s';
}

export const DURATION_EXPECTED = 'a duration such as "14h", "30m", "90s" or "1h30m"';
