// Versioned schema migrations. PRAGMA user_version holds the version the file is at.
// Append new migrations; never edit one that has shipped.

export const MIGRATIONS: readonly { version: number; name: string; sql: string }[] = [
  {
    version: 1,
    name: 'users, grants, logins, audit log, daemon stats',
    sql: `
      CREATE TABLE users (
        name        TEXT PRIMARY KEY,
        mfa_enabled INTEGER NOT NULL DEFAULT 0 CHECK (mfa_enabled IN (0, 1)),
        exempt      INTEGER NOT NULL DEFAULT 0 CHECK (exempt IN (0, 1)),
        created_at  INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL
      ) WITHOUT ROWID;

      CREATE TABLE grants (
        id            INTEGER PRIMARY KEY,
        user          TEXT NOT NULL,
        block         TEXT NOT NULL,
        ip            TEXT NOT NULL,
        created_at    INTEGER NOT NULL,
        expires_at    INTEGER NOT NULL,
        method        TEXT NOT NULL,
        source        TEXT NOT NULL,
        reason        TEXT NOT NULL DEFAULT '',
        revoked_at    INTEGER,
        revoked_by    TEXT,
        revoke_reason TEXT
      );
      CREATE INDEX grants_active ON grants (user, block, expires_at) WHERE revoked_at IS NULL;
      CREATE INDEX grants_block ON grants (block);
      CREATE INDEX grants_expires ON grants (expires_at);

      CREATE TABLE logins (
        user                  TEXT NOT NULL,
        ip                    TEXT NOT NULL,
        protocol              TEXT NOT NULL,
        last_success_at       INTEGER,
        last_failure_at       INTEGER,
        last_policy_reject_at INTEGER,
        PRIMARY KEY (user, ip)
      ) WITHOUT ROWID;

      CREATE TABLE audit (
        id       INTEGER PRIMARY KEY,
        at       INTEGER NOT NULL,
        actor    TEXT NOT NULL,
        action   TEXT NOT NULL,
        user     TEXT,
        ip       TEXT,
        grant_id INTEGER,
        detail   TEXT NOT NULL DEFAULT '{}'
      );
      CREATE INDEX audit_user ON audit (user, at);

      CREATE TABLE daemon_stats (
        id          INTEGER PRIMARY KEY CHECK (id = 1),
        pid         INTEGER NOT NULL,
        started_at  INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL,
        stopped_at  INTEGER,
        allowed     INTEGER NOT NULL DEFAULT 0,
        refused     INTEGER NOT NULL DEFAULT 0,
        log_only    INTEGER NOT NULL DEFAULT 0,
        bad_requests INTEGER NOT NULL DEFAULT 0
      );
    `,
  },
  {
    version: 2,
    name: 'second factors: authenticator app, external address, e-mailed codes, backup codes, failures and locks',
    sql: `
      ALTER TABLE users ADD COLUMN locked_until INTEGER;

      CREATE TABLE factors (
        user              TEXT PRIMARY KEY,
        totp_secret       BLOB,            -- AES-256-GCM under the key file; set once confirmed
        totp_pending      BLOB,            -- a begun enrolment, waiting for its first code
        totp_pending_at   INTEGER,
        totp_confirmed_at INTEGER,
        totp_last_step    INTEGER,         -- the last accepted time step: a code is accepted once
        email             TEXT,            -- the verified external address
        email_verified_at INTEGER,
        email_pending     TEXT,            -- an address waiting for its verification code
        updated_at        INTEGER NOT NULL
      ) WITHOUT ROWID;

      CREATE TABLE email_codes (
        id         INTEGER PRIMARY KEY,
        user       TEXT NOT NULL,
        purpose    TEXT NOT NULL CHECK (purpose IN ('login', 'verify')),
        address    TEXT NOT NULL,
        code_hash  TEXT NOT NULL,
        ip         TEXT,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        used_at    INTEGER,
        voided_at  INTEGER
      );
      CREATE INDEX email_codes_user ON email_codes (user, created_at);

      CREATE TABLE backup_codes (
        user       TEXT NOT NULL,
        code_hash  TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        used_at    INTEGER,
        PRIMARY KEY (user, code_hash)
      ) WITHOUT ROWID;

      CREATE TABLE failures (
        id     INTEGER PRIMARY KEY,
        user   TEXT NOT NULL,
        ip     TEXT NOT NULL,
        method TEXT NOT NULL,
        at     INTEGER NOT NULL
      );
      CREATE INDEX failures_user ON failures (user, at);
      CREATE INDEX failures_ip ON failures (ip, at);
    `,
  },
  {
    version: 3,
    name: 'failed attempts counted per address block (the IPv4 address, the IPv6 /64), as grants are held',
    sql: `
      ALTER TABLE failures ADD COLUMN block TEXT NOT NULL DEFAULT '';
      -- Older rows name an address; as a block it is exact (IPv4 /32). They expire within a day.
      UPDATE failures SET block = ip;
      DROP INDEX failures_ip;
      CREATE INDEX failures_block ON failures (block, at);
    `,
  },
  {
    version: 4,
    name: 'app passcodes: per-device passwords for mail programs, stored as scrypt hashes under a public selector',
    sql: `
      CREATE TABLE passcodes (
        id                 INTEGER PRIMARY KEY,
        user               TEXT NOT NULL,
        name               TEXT NOT NULL,
        selector           TEXT NOT NULL UNIQUE,  -- the passcode's first letters: finds the row, proves nothing
        salt               BLOB NOT NULL,
        hash               BLOB NOT NULL,         -- scrypt of the whole passcode, bound to the user
        kdf                TEXT NOT NULL,         -- how hash was made, e.g. scrypt:n=4096,r=8,p=1 (a later cost can differ)
        protocols          TEXT NOT NULL,         -- comma-separated: imap,pop3,smtp,sieve
        created_at         INTEGER NOT NULL,
        created_by         TEXT NOT NULL,
        expires_at         INTEGER,
        revoked_at         INTEGER,
        revoked_by         TEXT,
        last_used_at       INTEGER,
        last_used_ip       TEXT,
        last_used_protocol TEXT
      );
      CREATE INDEX passcodes_user ON passcodes (user, created_at);
    `,
  },
];

export const SCHEMA_VERSION = MIGRATIONS[MIGRATIONS.length - 1]?.version ?? 0;
