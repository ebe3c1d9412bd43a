// The shipped mfagate.example.toml and docs/configuration.md keep up with config/config.ts: the example loads,
// it lists every key the code accepts, and the reference documents each of them (and nothing else).
import fs from 'node:fs';
import path from 'node:path';
import { parse } from 'smol-toml';
import t from 'tap';
import { loadConfig } from '../config/config.js';
import { ROOT, cli } from './helpers/daemon.js';

const EXAMPLE = path.join(ROOT, 'mfagate.example.toml');
const REFERENCE = path.join(ROOT, 'docs/configuration.md');

const isTable = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v) && !(v instanceof Date);

/** "section.key" for every key of every section of the example. */
function exampleKeys(): string[] {
  const doc = parse(fs.readFileSync(EXAMPLE, 'utf8'));
  const keys: string[] = [];
  for (const [section, table] of Object.entries(doc)) {
    if (!isTable(table)) {
      keys.push(section);
      continue;
    }
    for (const key of Object.keys(table)) keys.push(`${section}.${key}`);
  }
  return keys.sort();
}

/**
 * "section.key" for every key config/config.ts accepts, read off the loaded defaults: each field of the
 * Config object (and section) is its TOML key in camelCase, with durations carrying an "Ms" suffix (ttl -> ttlMs).
 */
function acceptedKeys(): string[] {
  const config = loadConfig(undefined, ROOT) as unknown as Record<string, unknown>;
  const keys: string[] = [];
  for (const [section, fields] of Object.entries(config)) {
    if (section === 'file') continue;
    if (!isTable(fields)) throw new Error(`unexpected Config field ${section}`);
    for (const field of Object.keys(fields)) {
      const snake = (name: string) => name.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
      keys.push(`${snake(section)}.${snake(field.replace(/Ms$/, ''))}`);
    }
  }
  return keys.sort();
}

/** "section.key" for every "### `key`" heading under a "## `[section]`" heading of docs/configuration.md. */
function documentedKeys(): string[] {
  const keys: string[] = [];
  let section: string | undefined;
  for (const line of fs.readFileSync(REFERENCE, 'utf8').split('\n')) {
    const s = /^## `\[([a-z_.]+)\]`\s*$/.exec(line);
    if (s) {
      section = s[1];
      continue;
    }
    if (/^## /.test(line)) section = undefined;
    const k = /^### `([a-z0-9_]+)`\s*$/.exec(line);
    if (k && section !== undefined) keys.push(`${section}.${k[1]}`);
  }
  return keys.sort();
}

t.test('the example loads with loadConfig', async (t) => {
  const config = loadConfig(EXAMPLE);
  t.equal(config.file, EXAMPLE);
  t.equal(config.store.path, '/var/lib/mfagate/mfagate.db', 'the store where the systemd unit lets it write');
  t.same(config.postfix.listen, [{ kind: 'unix', path: '/var/spool/postfix/mfagate/policy' }], 'the socket directory of docs/deployment.md');
  t.same(config.dovecot.listen, [{ kind: 'tcp', host: '127.0.0.1', port: 8470 }], 'Dovecot 2.3 needs TCP on loopback');
  t.equal(config.enforcement.mode, 'log-only', 'a rollout starts in log-only mode');
});

t.test('the example lists every key config/config.ts accepts', async (t) => {
  const example = exampleKeys();
  t.ok(example.length > 20, `the example has keys (${example.length})`);
  t.same(example, acceptedKeys(), 'keys in mfagate.example.toml = keys of config/config.ts (add a new key to the example and to docs/configuration.md)');
});

t.test('docs/configuration.md documents every key, and no other', async (t) => {
  const documented = new Set(documentedKeys());
  for (const key of exampleKeys()) {
    const [section, name] = key.split('.');
    t.ok(documented.has(key), `docs/configuration.md documents ${key} (a "${name}" heading in the [${section}] part)`);
  }
  const example = new Set(exampleKeys());
  t.same([...documented].filter((k) => !example.has(k)), [], 'no documented key that the example (and the code) lacks');
});

t.test('mfagate config check accepts the example', async (t) => {
  const r = cli(['config', 'check', '--config', 'mfagate.example.toml'], { cwd: ROOT });
  t.equal(r.code, 0, 'exit 0', { stderr: r.stderr });
  t.match(r.stdout, /mfagate\.example\.toml: OK/);
  t.match(r.stdout, /enforcement:\s+log-only/);
  t.equal(r.stderr, '');
});
