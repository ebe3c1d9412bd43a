// Files that root creates for the daemon (the CLI run as root on the daemon's store, a new key file) must stay
// usable by the daemon's own user: give them the owner of the first candidate that root does not own.
import fs from 'node:fs';

export function giveToDaemonUser(files: readonly string[], candidates: readonly string[]): void {
  if (process.getuid?.() !== 0) return;
  let owner: fs.Stats | undefined;
  for (const c of candidates) {
    try {
      const st = fs.statSync(c);
      if (st.uid !== 0) {
        owner = st;
        break;
      }
    } catch {
      /* not there: try the next */
    }
  }
  if (!owner) return;
  for (const f of files) {
    try {
      const st = fs.statSync(f);
      if (st.uid !== owner.uid || st.gid !== owner.gid) fs.chownSync(f, owner.uid, owner.gid);
    } catch {
      /* not there (yet) */
    }
  }
}
