//! Errors as HTTP responses: a status and an [`ApiError`] body with a stable code.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use hutch_api::ApiError;
use hutch_core::{service::ServiceError, CoreError};
use hutch_types::ErrorCode;

/// An error a handler returns.
#[derive(Debug)]
pub struct HttpError(pub ApiError);

impl HttpError {
    /// An error with this code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> HttpError {
        HttpError(ApiError {
            code,
            message: message.into(),
        })
    }
}

impl From<CoreError> for HttpError {
    fn from(e: CoreError) -> HttpError {
        HttpError::new(e.code(), hutch_core::chain(&e))
    }
}

impl From<ServiceError> for HttpError {
    fn from(e: ServiceError) -> HttpError {
        HttpError::new(e.code(), hutch_core::chain(&e))
    }
}

impl From<hutch_protocol::host::ChannelError> for HttpError {
    fn from(e: hutch_protocol::host::ChannelError) -> HttpError {
        ServiceError::Channel(e).into()
    }
}

/// The HTTP status for each stable code.
pub fn status(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadRequest | ErrorCode::InvalidSpec | ErrorCode::UnsafePath => {
            StatusCode::BAD_REQUEST
        }
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::Conflict => StatusCode::CONFLICT,
        ErrorCode::OverCapacity => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::ExecFailed | ErrorCode::CommandNotFound => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (status(self.0.code), Json(self.0)).into_response()
    }
}
