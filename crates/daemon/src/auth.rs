//! Who may do what: admin over the Unix socket; over TCP, what the bearer token's scope allows.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    middleware::Next,
    response::Response,
};
use hutch_core::service::Caller;
use hutch_store::TokenUse;
use hutch_types::ErrorCode;
use sha2::{Digest, Sha256};

use crate::{http_error::HttpError, AppState};

/// The stored form of a token: its SHA-256, hex.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Middleware for TCP: resolves `Authorization: Bearer …` to a [`Caller`] (recording the
/// token's use), or answers 401 for a missing, unknown, removed or expired token.
pub async fn require_token(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Result<Response, HttpError> {
    let token = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| HttpError::new(ErrorCode::Unauthorized, "a bearer token is required"))?;
    let hash = token_hash(token.trim());
    let used = state
        .store
        .use_token(&hash, hutch_core::now_ms())
        .await
        .map_err(|e| HttpError::new(ErrorCode::Internal, hutch_core::chain(&e)))?;
    let scope = match used {
        TokenUse::Valid(scope) => scope,
        TokenUse::Unknown => return Err(HttpError::new(ErrorCode::Unauthorized, "unknown token")),
        TokenUse::Expired => {
            return Err(HttpError::new(
                ErrorCode::Unauthorized,
                "this token has expired",
            ))
        }
    };
    // Journals name the token by the start of its stored hash (never by the token).
    let caller = Caller::scoped(scope).named(format!("token:{}", &hash[..16]));
    req.extensions_mut().insert(caller);
    Ok(next.run(req).await)
}
