//! `hutch token create`: API tokens for TCP clients, stored only as hashes.

use hutch_store::{SqliteStore, Store, TokenScope};
use rand::RngCore;

use crate::{daemon::token_hash, error::CliError, home::Home};

/// Creates a token (admin, or limited to one label) and prints it once.
pub fn create(home: &Home, label: Option<(String, String)>) -> Result<i32, CliError> {
    let store = SqliteStore::open(&home.state_db()).map_err(CliError::Store)?;
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let token = format!("hutch_{}", hex::encode(secret));
    let scope = match label {
        Some((key, value)) => TokenScope::Label { key, value },
        None => TokenScope::Admin,
    };
    let id = format!("tok-{}", &hex::encode(&secret[..4]));
    store
        .insert_token(&id, &token_hash(&token), &scope, hutch_core::now_ms())
        .map_err(CliError::Store)?;
    println!("{token}");
    Ok(0)
}
