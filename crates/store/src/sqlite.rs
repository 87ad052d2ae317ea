//! [`Store`] on SQLite: one connection behind a mutex, WAL journal, foreign keys on.

use std::{path::Path, sync::Mutex};

use hutch_types::{SandboxInfo, SandboxSpec, SandboxState};
use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::{
    migrations::MIGRATIONS, HostObject, ListFilter, ObjectKind, Store, StoreError, TokenRecord,
    TokenScope, TokenUse,
};

/// The SQLite-backed store.
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl SqliteStore {
    /// Opens (creating if needed) and migrates the database at `path`.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err)?;
        migrate(&conn)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let supported = MIGRATIONS.len() as i64;
    if version > supported {
        return Err(StoreError::TooNew {
            found: version,
            supported,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "state database migrated");
    }
    Ok(())
}

const SANDBOX_COLUMNS: &str = "id, state, reason, spec, created_at, updated_at, expires_at";

fn sandbox_row(row: &Row<'_>) -> rusqlite::Result<Result<SandboxInfo, StoreError>> {
    let id: String = row.get(0)?;
    let state: String = row.get(1)?;
    let reason: Option<String> = row.get(2)?;
    let spec: String = row.get(3)?;
    let decoded = (|| {
        Some(SandboxInfo {
            state: SandboxState::from_parts(&state, reason)?,
            spec: serde_json::from_str(&spec).ok()?,
            created_at_ms: row.get(4).ok()?,
            updated_at_ms: row.get(5).ok()?,
            expires_at_ms: row.get(6).ok()?,
            id: id.clone(),
        })
    })();
    Ok(decoded.ok_or(StoreError::Corrupt(id)))
}

fn object_row(row: &Row<'_>) -> rusqlite::Result<Option<HostObject>> {
    let kind: String = row.get(1)?;
    Ok(ObjectKind::parse(&kind).map(|kind| HostObject {
        sandbox_id: row.get(0).unwrap_or_default(),
        kind,
        name: row.get(2).unwrap_or_default(),
        detail: row.get(3).unwrap_or_default(),
        confirmed: row.get::<_, i64>(4).unwrap_or(0) != 0,
    }))
}

impl Store for SqliteStore {
    fn insert_sandbox(
        &self,
        id: &str,
        spec: &SandboxSpec,
        idempotency_key: Option<&str>,
        now_ms: i64,
    ) -> Result<(String, bool), StoreError> {
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        if let Some(key) = idempotency_key {
            let existing: Option<String> = tx
                .query_row(
                    "SELECT id FROM sandboxes WHERE idempotency_key = ?1",
                    [key],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(existing) = existing {
                return Ok((existing, false));
            }
        }
        let expires = spec
            .ttl_secs
            .map(|t| now_ms.saturating_add((t as i64).saturating_mul(1000)));
        let spec_json = serde_json::to_string(spec).expect("spec serializes");
        tx.execute(
            "INSERT INTO sandboxes (id, state, spec, idempotency_key, created_at, updated_at, expires_at)
             VALUES (?1, 'creating', ?2, ?3, ?4, ?4, ?5)",
            params![id, spec_json, idempotency_key, now_ms, expires],
        )?;
        tx.commit()?;
        Ok((id.to_string(), true))
    }

    fn by_idempotency_key(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT id FROM sandboxes WHERE idempotency_key = ?1",
                [key],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn set_state(&self, id: &str, state: &SandboxState, now_ms: i64) -> Result<(), StoreError> {
        let reason = match state {
            SandboxState::Failed(r) => Some(r.as_str()),
            _ => None,
        };
        self.conn().execute(
            "UPDATE sandboxes SET state = ?2, reason = ?3, updated_at = ?4 WHERE id = ?1",
            params![id, state.name(), reason, now_ms],
        )?;
        Ok(())
    }

    fn set_spec(&self, id: &str, spec: &SandboxSpec, now_ms: i64) -> Result<(), StoreError> {
        let spec = serde_json::to_string(spec).expect("spec serializes");
        self.conn().execute(
            "UPDATE sandboxes SET spec = ?2, updated_at = ?3 WHERE id = ?1",
            params![id, spec, now_ms],
        )?;
        Ok(())
    }

    fn set_expiry(
        &self,
        id: &str,
        expires_at_ms: Option<i64>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE sandboxes SET expires_at = ?2, updated_at = ?3 WHERE id = ?1",
            params![id, expires_at_ms, now_ms],
        )?;
        Ok(())
    }

    fn get(&self, id: &str) -> Result<Option<SandboxInfo>, StoreError> {
        let conn = self.conn();
        let sql = format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = ?1");
        conn.query_row(&sql, [id], sandbox_row)
            .optional()?
            .transpose()
    }

    fn list(&self, filter: &ListFilter) -> Result<Vec<SandboxInfo>, StoreError> {
        let conn = self.conn();
        let sql = format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes ORDER BY created_at, id");
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map([], sandbox_row)?;
        let mut out = Vec::new();
        for row in rows {
            let info = row??;
            let state_ok = match &filter.state {
                Some(s) => info.state.name() == s,
                None => filter.include_destroyed || info.state != SandboxState::Destroyed,
            };
            let labels_ok = filter
                .labels
                .iter()
                .all(|(k, v)| info.spec.labels.get(k) == Some(v));
            if state_ok && labels_ok {
                out.push(info);
            }
        }
        Ok(out)
    }

    fn expired(&self, now_ms: i64) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id FROM sandboxes WHERE expires_at IS NOT NULL AND expires_at <= ?1
             AND state NOT IN ('destroyed') ORDER BY expires_at",
        )?;
        let ids = stmt.query_map([now_ms], |r| r.get(0))?;
        Ok(ids.collect::<Result<_, _>>()?)
    }

    fn intend_object(&self, obj: &HostObject) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO host_objects (sandbox_id, kind, name, detail, confirmed) VALUES (?1, ?2, ?3, ?4, 0)
             ON CONFLICT (sandbox_id, kind, name) DO UPDATE SET detail = excluded.detail",
            params![obj.sandbox_id, obj.kind.as_str(), obj.name, obj.detail],
        )?;
        Ok(())
    }

    fn confirm_object(&self, obj: &HostObject) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO host_objects (sandbox_id, kind, name, detail, confirmed) VALUES (?1, ?2, ?3, ?4, 1)
             ON CONFLICT (sandbox_id, kind, name) DO UPDATE SET detail = excluded.detail, confirmed = 1",
            params![obj.sandbox_id, obj.kind.as_str(), obj.name, obj.detail],
        )?;
        Ok(())
    }

    fn forget_object(
        &self,
        sandbox_id: &str,
        kind: ObjectKind,
        name: &str,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "DELETE FROM host_objects WHERE sandbox_id = ?1 AND kind = ?2 AND name = ?3",
            params![sandbox_id, kind.as_str(), name],
        )?;
        Ok(())
    }

    fn objects(&self) -> Result<Vec<HostObject>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT sandbox_id, kind, name, detail, confirmed FROM host_objects ORDER BY sandbox_id, kind",
        )?;
        let rows = stmt.query_map([], object_row)?;
        let mut out = Vec::new();
        for row in rows {
            out.extend(row?);
        }
        Ok(out)
    }

    fn insert_token(
        &self,
        id: &str,
        hash: &str,
        scope: &TokenScope,
        now_ms: i64,
        expires_at_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        let (k, v) = match scope {
            TokenScope::Admin => (None, None),
            TokenScope::Label { key, value } => (Some(key.as_str()), Some(value.as_str())),
        };
        self.conn().execute(
            "INSERT INTO tokens (id, hash, scope_key, scope_value, created_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![id, hash, k, v, now_ms, expires_at_ms],
        )?;
        Ok(())
    }

    fn use_token(&self, hash: &str, now_ms: i64) -> Result<TokenUse, StoreError> {
        let conn = self.conn();
        let token = conn
            .query_row(
                &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = ?1"),
                [hash],
                token_row,
            )
            .optional()?;
        let Some(token) = token else {
            return Ok(TokenUse::Unknown);
        };
        if token.expires_at_ms.is_some_and(|t| t <= now_ms) {
            return Ok(TokenUse::Expired);
        }
        conn.execute(
            "UPDATE tokens SET last_used_at = ?2 WHERE id = ?1",
            params![token.id, now_ms],
        )?;
        Ok(TokenUse::Valid(token.scope))
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created_at, id"
        ))?;
        let rows = stmt.query_map([], token_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn remove_token(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .execute("DELETE FROM tokens WHERE id = ?1", [id])?
            > 0)
    }
}

const TOKEN_COLUMNS: &str = "id, scope_key, scope_value, created_at, expires_at, last_used_at";

fn token_row(row: &Row<'_>) -> rusqlite::Result<TokenRecord> {
    let scope = match (row.get(1)?, row.get(2)?) {
        (Some(key), Some(value)) => TokenScope::Label { key, value },
        _ => TokenScope::Admin,
    };
    Ok(TokenRecord {
        id: row.get(0)?,
        scope,
        created_at_ms: row.get(3)?,
        expires_at_ms: row.get(4)?,
        last_used_at_ms: row.get(5)?,
    })
}
