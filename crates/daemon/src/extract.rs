//! Extractors whose rejections are the API's JSON error: axum's own answer a malformed body,
//! path or query with plain text, which no client of the documented [`hutch_api::ApiError`]
//! can parse. Each wraps axum's extractor of the same name and maps its rejection to a
//! `bad_request` [`HttpError`] with the parser's reason.

use axum::{
    extract::{FromRequest, FromRequestParts, Request},
    http::request::Parts,
};
use hutch_types::ErrorCode;
use serde::de::DeserializeOwned;

use crate::http_error::HttpError;

/// A JSON request body (`application/json`).
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

/// Path parameters.
#[derive(Debug)]
pub struct Path<T>(pub T);

/// Query parameters.
#[derive(Debug)]
pub struct Query<T>(pub T);

/// The 400 every rejection becomes.
fn rejected(reason: String) -> HttpError {
    HttpError::new(ErrorCode::BadRequest, reason)
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = HttpError;

    async fn from_request(req: Request, state: &S) -> Result<Self, HttpError> {
        axum::Json::<T>::from_request(req, state)
            .await
            .map(|axum::Json(v)| JsonBody(v))
            .map_err(|e| rejected(e.body_text()))
    }
}

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, HttpError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| Path(v))
            .map_err(|e| rejected(e.body_text()))
    }
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, HttpError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| Query(v))
            .map_err(|e| rejected(e.body_text()))
    }
}

/// A sandbox id from a path, parsed once here: a string that cannot be one is a sandbox that
/// does not exist (404), as for an unknown id.
pub fn sandbox_id(raw: &str) -> Result<hutch_types::SandboxId, HttpError> {
    raw.parse().map_err(|_| {
        HttpError::new(
            hutch_types::ErrorCode::NotFound,
            format!("no such sandbox: {raw:.40}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_that_cannot_be_a_sandbox_id_is_a_sandbox_that_does_not_exist() {
        assert_eq!(
            sandbox_id("sb-0123456789").unwrap().as_str(),
            "sb-0123456789"
        );
        for bad in [
            "../etc",
            "sb-",
            "SB-0123456789",
            "sb-01234567890123456789012345678901234567",
            "",
        ] {
            let e = sandbox_id(bad).expect_err(bad);
            assert_eq!(e.0.code, hutch_types::ErrorCode::NotFound, "{bad:?}");
        }
    }
}
