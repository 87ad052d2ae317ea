//! Who may do what: admin over the Unix socket; over TCP, what the bearer token's scope allows.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    middleware::Next,
    response::Response,
};
use hutch_store::{TokenScope, TokenUse};
use hutch_types::{ErrorCode, SandboxInfo};
use sha2::{Digest, Sha256};

use super::{error::HttpError, AppState};

/// The caller's rights, attached to every request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Everything.
    Admin,
    /// Only sandboxes labelled `key=value`.
    Label {
        /// Label key.
        key: String,
        /// Label value.
        value: String,
    },
}

impl Scope {
    /// Refuses a caller whose token is limited to some sandboxes, with `why` (for host-wide
    /// resources such as templates and tasks).
    pub fn require_admin(&self, why: &'static str) -> Result<(), HttpError> {
        match self {
            Scope::Admin => Ok(()),
            Scope::Label { .. } => Err(HttpError::new(ErrorCode::Forbidden, why)),
        }
    }

    /// Refuses (403) a sandbox outside this scope.
    pub fn allows(&self, info: &SandboxInfo) -> Result<(), HttpError> {
        match self {
            Scope::Admin => Ok(()),
            Scope::Label { key, value } if info.spec.labels.get(key) == Some(value) => Ok(()),
            Scope::Label { key, value } => Err(HttpError::new(
                ErrorCode::Forbidden,
                format!("this token is limited to sandboxes labelled {key}={value}"),
            )),
        }
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
    req.extensions_mut().insert(match scope {
        TokenScope::Admin => Scope::Admin,
        TokenScope::Label { key, value } => Scope::Label { key, value },
    });
    Ok(next.run(req).await)
}
