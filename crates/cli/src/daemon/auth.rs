//! Who may do what: admin over the Unix socket; over TCP, what the bearer token's scope allows.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    middleware::Next,
    response::Response,
};
use hutch_store::TokenUse;
use hutch_types::{ErrorCode, Forbidden};
use sha2::{Digest, Sha256};

use super::{error::HttpError, AppState};

/// The caller's rights, attached to every request: the one token-scope type.
pub use hutch_types::TokenScope as Scope;

impl From<Forbidden> for HttpError {
    fn from(e: Forbidden) -> HttpError {
        HttpError::new(ErrorCode::Forbidden, e.0)
    }
}

/// The stored form of a token: its SHA-256, hex.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Middleware for TCP: resolves `Authorization: Bearer …` to a [`Scope`] (recording the
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
    let used = state
        .store
        .use_token(&token_hash(token.trim()), hutch_core::now_ms())
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
    req.extensions_mut().insert(scope);
    Ok(next.run(req).await)
}
