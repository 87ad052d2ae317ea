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
    let caller = caller_for(&state, token.trim()).await?;
    req.extensions_mut().insert(caller);
    Ok(next.run(req).await)
}

/// The caller a token stands for (recording its use), or 401 for an unknown, removed or
/// expired one.
pub async fn caller_for(state: &AppState, token: &str) -> Result<Caller, HttpError> {
    let hash = token_hash(token);
    let used = state
        .store
        .use_token(&hash, hutch_core::now_ms())
        .await
        .map_err(|e| HttpError::new(ErrorCode::Internal, hutch_core::chain(&e)))?;
    match used {
        // Journals name the token by the start of its stored hash (never by the token).
        TokenUse::Valid(scope) => Ok(Caller::scoped(scope).named(format!("token:{}", &hash[..16]))),
        // A token of the fleet this host joined (a gateway passes its client's on).
        TokenUse::Unknown => match state.fleet.as_ref().and_then(|f| f.token(&hash)) {
            Some(t) => Ok(Caller::scoped(crate::fleet::scope(&t)).named(format!("fleet:{}", t.id))),
            None => Err(HttpError::new(ErrorCode::Unauthorized, "unknown token")),
        },
        TokenUse::Expired => Err(HttpError::new(
            ErrorCode::Unauthorized,
            "this token has expired",
        )),
    }
}
