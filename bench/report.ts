// What the benchmark scripts share once they have their figures: their section of BENCHMARKS.md, and how a
// script ends (its scratch directory removed and its children killed, however it ends).
import fs from 'node:fs';

/**
 * Puts `section` (which starts with `start` and ends with `end`) into `file` in place of the one between the
 * same markers, or at the end; a file that does not exist yet starts as `initial`.
 */
export function writeSection(file: string, start: string, end: string, section: string, initial = ''): void {
  let text = fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : initial;
  const i = text.indexOf(start);
  const j = text.indexOf(end);
  if (i >= 0 && j > i) text = text.slice(0, i) + section + text.slice(j + end.length);
  else text = text.replace(/\n*$/, '\n\n') + section + '\n';
  if (!text.endsWith('\n')) text += '\n';
  fs.writeFileSync(file, text);
}

/** A count as the report writes it: 12,345. */
export const int = (v: number): string => Math.round(v).toLocaleString('en-US');

/** Runs a benchmark's main: exit 0 when it finished, 1 with the error; `cleanup` either way. */
export function runBench(main: () => Promise<void>, cleanup: () => void): void {
  main().then(
    () => {
      cleanup();
      process.exit(0);
    },
    (e: unknown) => {
      process.stderr.write(`bench failed: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`);
      cleanup();
      process.exit(1);
    },
  );
}
