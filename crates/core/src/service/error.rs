//! What a request to the [`SandboxApi`](super::SandboxApi) can fail with, each with its stable
//! [`ErrorCode`] so every front end reports the same category.

use hutch_protocol::host::ChannelError;
use hutch_types::ErrorCode;

use crate::{task::TaskError, CoreError};

/// Why a request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The manager refused or failed.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// A task could not be run or read.
    #[error(transparent)]
    Task(#[from] TaskError),
    /// The request itself is refused (malformed, out of the caller's scope, unsafe path,
    /// over a cap, a command that could not start), with the reason.
    #[error("{message}")]
    Refused {
        /// The stable category.
        code: ErrorCode,
        /// Why, in words.
        message: String,
    },
    /// A secret could not be set, read or attached.
    #[error(transparent)]
    Secret(#[from] crate::secrets::SecretError),
    /// The guest channel failed during a transfer or exec.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// A sandbox's journal could not be read.
    #[error(transparent)]
    Journal(#[from] hutch_journal::JournalError),
}

impl From<hutch_types::Forbidden> for ServiceError {
    fn from(e: hutch_types::Forbidden) -> ServiceError {
        ServiceError::refused(ErrorCode::Forbidden, e.0)
    }
}

impl From<crate::exec::ExecError> for ServiceError {
    fn from(e: crate::exec::ExecError) -> ServiceError {
        match e {
            crate::exec::ExecError::Start(e) => ServiceError::exec_start(e),
            crate::exec::ExecError::Stream(e) => ServiceError::Channel(e),
        }
    }
}

impl ServiceError {
    /// A refusal with `code` and `message`.
    pub fn refused(code: ErrorCode, message: impl Into<String>) -> ServiceError {
        ServiceError::Refused {
            code,
            message: message.into(),
        }
    }

    /// An exec that could not start: the guest's reason, with a code saying whether the
    /// command is missing (shells exit 127) or could not run (126).
    pub fn exec_start(e: ChannelError) -> ServiceError {
        use hutch_protocol::ErrorCode as Guest;
        match &e {
            ChannelError::Remote(op) if op.code == Guest::NotFound => {
                ServiceError::refused(ErrorCode::CommandNotFound, op.message.clone())
            }
            ChannelError::Remote(op) => {
                ServiceError::refused(ErrorCode::ExecFailed, op.message.clone())
            }
            _ => ServiceError::Channel(e),
        }
    }

    /// The stable API category of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ServiceError::Core(e) => e.code(),
            ServiceError::Task(e) => e.code(),
            ServiceError::Secret(e) => e.code(),
            ServiceError::Refused { code, .. } => *code,
            ServiceError::Channel(e) => channel_code(e),
            ServiceError::Journal(hutch_journal::JournalError::State { .. }) => ErrorCode::NotFound,
            ServiceError::Journal(hutch_journal::JournalError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                ErrorCode::NotFound
            }
            ServiceError::Journal(_) => ErrorCode::Internal,
        }
    }
}

/// The category of a guest channel failure during a transfer.
fn channel_code(e: &ChannelError) -> ErrorCode {
    use hutch_protocol::ErrorCode as Guest;
    match e {
        ChannelError::Remote(op) if op.code == Guest::NotFound => ErrorCode::NotFound,
        ChannelError::Remote(op) if op.code == Guest::InvalidRequest => ErrorCode::BadRequest,
        ChannelError::Remote(op) if op.code == Guest::TooLarge => ErrorCode::BadRequest,
        ChannelError::Remote(_) | ChannelError::TooLarge(_) => ErrorCode::ExecFailed,
        ChannelError::Timeout(_) => ErrorCode::Timeout,
        _ => ErrorCode::Internal,
    }
}
