// The shipped systemd unit, checked without running it: `systemd-analyze verify` accepts it without a warning,
// the hardening the deployment relies on is there, and `systemd-analyze security` keeps its exposure low.
// systemd-analyze comes with the package "systemd" (CI installs it); without it these tests fail, never skip.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { CLI, ROOT, tempDir } from './helpers/daemon.js';

const UNIT = path.join(ROOT, 'systemd/mfagate.service');
/** Where docs/deployment.md installs the command (npm install --global --prefix /usr/local). */
const INSTALLED_BIN = '/usr/local/bin/mfagate';
const CONFIG = '/etc/mfagate/mfagate.toml';
/** Measured 1.2 with systemd 252 (Debian 12); a hardening line lost on the way pushes it over. */
const MAX_EXPOSURE = 1.5;

type Directive = { section: string; key: string; value: string };

function directives(text: string): Directive[] {
  const out: Directive[] = [];
  let section = '';
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#') || line.startsWith(';')) continue;
    const s = /^\[(.+)\]$/.exec(line);
    if (s) {
      section = s[1] ?? '';
      continue;
    }
    const eq = line.indexOf('=');
    if (eq > 0) out.push({ section, key: line.slice(0, eq).trim(), value: line.slice(eq + 1).trim() });
  }
  return out;
}

const unitText = fs.readFileSync(UNIT, 'utf8');
const service = directives(unitText).filter((d) => d.section === 'Service');
const values = (key: string): string[] => service.filter((d) => d.key === key).map((d) => d.value);

/** Runs systemd-analyze. A missing binary is an error that says what to install. */
function analyze(args: string[]): { ok: true; code: number; output: string } | { ok: false; error: string } {
  const r = spawnSync('systemd-analyze', args, { encoding: 'utf8', timeout: 120_000, env: { ...process.env, SYSTEMD_COLORS: '0', SYSTEMD_PAGER: '' } });
  if (r.error) {
    const missing = 'code' in r.error && r.error.code === 'ENOENT';
    return {
      ok: false,
      error: missing
        ? 'systemd-analyze is not installed: install the package "systemd" (apt-get install systemd; .ci/run does this)'
        : `systemd-analyze ${args.join(' ')} could not run: ${r.error.message}`,
    };
  }
  return { ok: true, code: r.status ?? -1, output: `${r.stdout}${r.stderr}` };
}

/**
 * The unit as shipped, except that ExecStart= and ExecReload= run this checkout's CLI with this Node instead
 * of the installed command, which verify would reject as missing. Everything else is byte for byte the same.
 */
function testableCopy(dir: string): string {
  const local = `"${process.execPath}" "${CLI}"`;
  const text = unitText
    .split('\n')
    .map((line) => (/^(ExecStart|ExecReload)=/.test(line) ? line.split(INSTALLED_BIN).join(local) : line))
    .join('\n');
  const file = path.join(dir, 'mfagate.service');
  fs.writeFileSync(file, text);
  return file;
}

t.test('the hardening and the commands the deployment relies on', async (t) => {
  t.same(values('User'), ['mfagate'], 'a dedicated user');
  t.same(values('Group'), ['mfagate']);
  t.same(values('StateDirectory'), ['mfagate'], 'StateDirectory: /var/lib/mfagate for the store');
  t.same(values('RuntimeDirectory'), ['mfagate'], 'RuntimeDirectory: /run/mfagate');
  t.same(values('ProtectSystem'), ['strict']);
  t.same(values('NoNewPrivileges'), ['yes']);
  t.same(values('RestrictAddressFamilies'), ['AF_UNIX AF_INET AF_INET6']);
  t.ok(values('SystemCallFilter').includes('@system-service'), 'SystemCallFilter=@system-service');
  t.same(values('ReadWritePaths'), ['-/var/spool/postfix/mfagate'], 'the Postfix socket directory stays writable under ProtectSystem=strict');
  t.same(values('Restart'), ['always']);
  t.same(
    directives(unitText).filter((d) => d.key === 'MemoryDenyWriteExecute'),
    [],
    'no MemoryDenyWriteExecute: V8\'s JIT aborts under it',
  );

  t.same(values('ExecStart'), [`${INSTALLED_BIN} serve --config ${CONFIG}`]);
  t.same(values('ExecReload'), [`${INSTALLED_BIN} config check --config ${CONFIG}`, '/bin/kill -HUP $MAINPID'], 'reload checks the file, then sends SIGHUP');
  const deployment = fs.readFileSync(path.join(ROOT, 'docs/deployment.md'), 'utf8');
  t.ok(deployment.includes(INSTALLED_BIN), 'docs/deployment.md installs the command where ExecStart expects it');
  t.ok(deployment.includes('--prefix /usr/local'), 'docs/deployment.md names the npm prefix');
});

t.test('systemd-analyze verify: exit 0 and no warning about the unit', async (t) => {
  t.ok(fs.existsSync(CLI), `${CLI} exists (npm run build)`);
  const dir = tempDir('mfagate-unit-');
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = testableCopy(dir);

  const shipped = unitText.split('\n');
  const changed = fs
    .readFileSync(file, 'utf8')
    .split('\n')
    .filter((line, i) => line !== shipped[i])
    .map((line) => line.slice(0, line.indexOf('=')));
  t.same(changed, ['ExecStart', 'ExecReload'], 'only the lines that run the installed command differ');

  const r = analyze(['verify', file]);
  if (!r.ok) return t.fail(r.error);
  const lines = r.output.split('\n').filter((l) => l.trim() !== '');
  const aboutUnit = lines.filter((l) => l.includes('mfagate') || l.includes(dir));
  for (const l of lines.filter((l) => !aboutUnit.includes(l))) t.comment(`(another unit) ${l}`);
  t.equal(r.code, 0, 'verify exits 0', { output: r.output });
  t.same(aboutUnit, [], 'no warning about mfagate.service');
});

t.test('systemd-analyze security --offline: exposure below the measured level', async (t) => {
  const dir = tempDir('mfagate-unit-');
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const r = analyze(['security', '--offline=true', '--no-pager', testableCopy(dir)]);
  if (!r.ok) return t.fail(r.error);
  t.equal(r.code, 0, 'security exits 0', { output: r.output });
  const m = /Overall exposure level for \S+: (\d+(?:\.\d+)?)/.exec(r.output);
  if (!m) return t.fail(`no "Overall exposure level" in the output:\n${r.output}`);
  const exposure = Number(m[1]);
  t.comment(`systemd-analyze security: overall exposure ${exposure} (threshold ${MAX_EXPOSURE})`);
  t.ok(exposure < MAX_EXPOSURE, `exposure ${exposure} < ${MAX_EXPOSURE}`);
});
