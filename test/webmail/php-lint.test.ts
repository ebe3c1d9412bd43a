// PHP's own lint (`php -l`) on every PHP file of the Roundcube plugin: a syntax error in the plugin would break
// every webmail login, so it fails the suite here rather than in a browser test's timeout.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { ROOT } from '../helpers/daemon.js';

function phpFiles(dir: string): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) return phpFiles(p);
    return /\.(php|inc|php\.dist)$/.test(e.name) ? [p] : [];
  });
}

const files = phpFiles(path.join(ROOT, 'webmail'));
t.ok(files.length >= 6, `the plugin's PHP files are found (${files.length})`);
for (const f of files) {
  const r = spawnSync('php', ['-l', f], { encoding: 'utf8' });
  t.equal(r.status, 0, `php -l ${path.relative(ROOT, f)}: ${(r.stdout + r.stderr).trim()}`);
}
