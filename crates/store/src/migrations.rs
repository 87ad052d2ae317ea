//! Versioned schema migrations, applied in order and recorded in `PRAGMA user_version`.

/// Migration `i` takes the schema from version `i` to `i + 1`. Append only; never edit one
/// that has shipped.
pub const MIGRATIONS: &[&str] = &[
    // 1: sandboxes, their host objects, API tokens.
    "CREATE TABLE sandboxes (
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        reason TEXT,
        spec TEXT NOT NULL,
        idempotency_key TEXT UNIQUE,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        expires_at INTEGER
     );
     CREATE INDEX sandboxes_expiry ON sandboxes(expires_at) WHERE expires_at IS NOT NULL;
     CREATE TABLE host_objects (
        sandbox_id TEXT NOT NULL REFERENCES sandboxes(id),
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '',
        confirmed INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (sandbox_id, kind, name)
     );
     CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        hash TEXT NOT NULL UNIQUE,
        scope_key TEXT,
        scope_value TEXT,
        created_at INTEGER NOT NULL
     );",
    // 2: tokens expire and record when they were last used.
    "ALTER TABLE tokens ADD COLUMN expires_at INTEGER;
     ALTER TABLE tokens ADD COLUMN last_used_at INTEGER;",
];
