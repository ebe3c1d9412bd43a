// A passed factor and the grant it buys commit together or not at all (issue 8, item 5). Before, `verify` used
// the code up in one transaction and added the grant in another, so a `kill -9` between the two lost both: the
// user's backup code was spent and no grant made. To kill the real daemon at exactly that point, the test gives
// the store a trigger that keeps the grant's INSERT busy (as a stalled disk would), waits until the daemon has
// spent over a second of CPU inside it, and kills it there. Then the code must still be unused, and work.
import fs from 'node:fs';
import path from 'node:path';
import Database from 'better-sqlite3';
import t from 'tap';
import { Authenticator } from '../helpers/api.js';
import { type Served, serve } from '../helpers/served.js';

const CAMPUS = '192.0.2.10';
const HOME = '198.51.100.7';
let d: Served;
t.teardown(() => d?.close());

/** CPU seconds the process has used (user + system), from /proc. */
function cpuSeconds(pid: number): number {
  const fields = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]?.split(' ') ?? [];
  // utime and stime are fields 14 and 15 of the line; after "comm) " they are the 12th and 13th.
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

t.test('kill -9 while the grant is being written: the backup code is not spent, and works after the restart', async (t) => {
  d = await serve();
  const begin = await d.api.post('/v1/users/alice/totp', { ip: CAMPUS });
  const phone = new Authenticator(begin.json.secret as string);
  t.equal((await d.api.post('/v1/users/alice/totp/confirm', { ip: CAMPUS, code: await phone.next() })).status, 200);
  const backup = await d.api.post('/v1/users/alice/backup-codes', { ip: CAMPUS, factor: { method: 'totp', code: await phone.next() } });
  t.equal(backup.status, 200, backup.text);
  const code = (backup.json.codes as string[])[0] ?? '';

  const store = path.join(d.dir, 'state/mfagate.db');
  const db = new Database(store);
  t.teardown(() => db.close());
  const unused = () => (db.prepare("SELECT count(*) AS n FROM backup_codes WHERE user = 'alice' AND used_at IS NULL").get() as { n: number }).n;
  const grants = () => (db.prepare("SELECT count(*) AS n FROM grants WHERE user = 'alice'").get() as { n: number }).n;
  t.equal(unused(), 10, 'ten unused backup codes');
  // A grant INSERT that does not finish: a cross join of 10^5 x 10^5 rows.
  db.exec(`CREATE TABLE hang (n INTEGER);
    INSERT INTO hang WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 100000) SELECT x FROM c;
    CREATE TRIGGER hang_grants BEFORE INSERT ON grants BEGIN SELECT count(*) FROM hang a, hang b; END;`);

  const pid = d.daemon.child.pid ?? 0;
  const before = cpuSeconds(pid);
  const pending = d.api.post('/v1/users/alice/verify', { ip: HOME, factor: { method: 'backup', code } }).catch((e: unknown) => e);
  const deadline = Date.now() + 30_000;
  while (cpuSeconds(pid) - before < 1.5) {
    if (Date.now() > deadline) throw new Error('the daemon never got busy inside the grant INSERT');
    await new Promise((r) => setTimeout(r, 100));
  }
  await d.daemon.stop('SIGKILL');
  t.type(await pending, Error, 'the verify request got no answer: the daemon died inside it');

  db.exec('DROP TRIGGER hang_grants; DROP TABLE hang;');
  t.equal(grants(), 0, 'no grant was made');
  t.equal(unused(), 10, 'and the backup code was not used up: its transaction was rolled back with the grant');

  await d.restart();
  const again = await d.api.post('/v1/users/alice/verify', { ip: HOME, factor: { method: 'backup', code } });
  t.equal(again.status, 200, 'after the restart the same code passes MFA');
  t.equal(again.json.grant.ip, HOME, 'and makes the grant');
  t.equal(unused(), 9, 'now it is used');
  const reused = await d.api.post('/v1/users/alice/verify', { ip: HOME, factor: { method: 'backup', code } });
  t.equal(reused.status, 403, 'once');
});
