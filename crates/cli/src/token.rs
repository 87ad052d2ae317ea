//! `hutch token …`: API tokens for TCP clients, stored only as hashes. Each has an id to list
//! and remove it by, an optional expiry, and the time of its last use.

use hutch_store::{SqliteStore, Store, TokenRecord, TokenScope};
use rand::RngCore;
use serde::Serialize;

use crate::{args::TokenCommand, error::CliError};
use hutch_daemon::{token_hash, Home};

/// Runs a `hutch token` subcommand against this home's state database.
pub fn run(home: &Home, cmd: TokenCommand) -> Result<i32, CliError> {
    let store = SqliteStore::open(&home.state_db()).map_err(CliError::Store)?;
    match cmd {
        TokenCommand::Create { label, ttl } => create(&store, label, ttl),
        TokenCommand::Ls { json } => list(&store, json),
        TokenCommand::Rm { ids } => remove(&store, &ids),
    }
}

/// Creates a token (admin, or limited to one label; expiring after `ttl_secs` if given) and
/// prints it once.
fn create(
    store: &dyn Store,
    label: Option<(String, String)>,
    ttl_secs: Option<u64>,
) -> Result<i32, CliError> {
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let token = format!("hutch_{}", hex::encode(secret));
    let scope = match label {
        Some((key, value)) => TokenScope::Label { key, value },
        None => TokenScope::Admin,
    };
    // The id is listed and typed; it shares nothing with the secret.
    let mut id = [0u8; 4];
    rand::rngs::OsRng.fill_bytes(&mut id);
    let id = format!("tok-{}", hex::encode(id));
    let now = hutch_core::now_ms();
    let expires = ttl_secs.map(|s| now.saturating_add((s as i64).saturating_mul(1000)));
    store
        .insert_token(&id, &token_hash(&token), &scope, now, expires)
        .map_err(CliError::Store)?;
    eprintln!("created {id}");
    println!("{token}");
    Ok(0)
}

/// A token as `hutch token ls --json` prints it (never its secret, which is not stored).
#[derive(Debug, Serialize)]
struct Listed {
    id: String,
    /// `admin` or `label`.
    scope: &'static str,
    /// `key=value` for a label-scoped token.
    #[serde(skip_serializing_if = "Option::is_none")]
    label: Option<String>,
    created_at_ms: i64,
    expires_at_ms: Option<i64>,
    last_used_at_ms: Option<i64>,
    expired: bool,
}

impl Listed {
    fn new(t: TokenRecord, now_ms: i64) -> Listed {
        let (scope, label) = match t.scope {
            TokenScope::Admin => ("admin", None),
            TokenScope::Label { key, value } => ("label", Some(format!("{key}={value}"))),
        };
        Listed {
            id: t.id,
            scope,
            label,
            created_at_ms: t.created_at_ms,
            expired: t.expires_at_ms.is_some_and(|e| e <= now_ms),
            expires_at_ms: t.expires_at_ms,
            last_used_at_ms: t.last_used_at_ms,
        }
    }
}

/// `hutch token ls`: a table, or a JSON array with `--json`.
fn list(store: &dyn Store, json: bool) -> Result<i32, CliError> {
    let now = hutch_core::now_ms();
    let tokens: Vec<Listed> = store
        .tokens()
        .map_err(CliError::Store)?
        .into_iter()
        .map(|t| Listed::new(t, now))
        .collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&tokens).expect("serializable")
        );
        return Ok(0);
    }
    println!(
        "{:<13} {:<20} {:<17} {:<17} LAST USED",
        "ID", "SCOPE", "CREATED", "EXPIRES"
    );
    for t in tokens {
        let expires = match (t.expires_at_ms, t.expired) {
            (Some(ms), true) => format!("{} (expired)", utc(ms)),
            (Some(ms), false) => utc(ms),
            (None, _) => "never".into(),
        };
        println!(
            "{:<13} {:<20} {:<17} {:<17} {}",
            t.id,
            t.label.as_deref().unwrap_or(t.scope),
            utc(t.created_at_ms),
            expires,
            t.last_used_at_ms.map_or_else(|| "never".into(), utc)
        );
    }
    Ok(0)
}

/// `hutch token rm ID…`: removes each; fails (after removing the others) if one is unknown.
fn remove(store: &dyn Store, ids: &[String]) -> Result<i32, CliError> {
    let mut unknown = Vec::new();
    for id in ids {
        if store.remove_token(id).map_err(CliError::Store)? {
            println!("{id}");
        } else {
            unknown.push(id.as_str());
        }
    }
    if unknown.is_empty() {
        Ok(0)
    } else {
        Err(CliError::Usage(format!(
            "no such token: {}",
            unknown.join(", ")
        )))
    }
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM` UTC.
fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = hutch_types::civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_as_utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00");
        assert_eq!(utc(1_767_225_599_000), "2025-12-31 23:59");
    }
}
