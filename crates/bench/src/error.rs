//! What a benchmark can fail with, printed as one line with its chain of causes.

use std::path::PathBuf;

/// Why a benchmark stopped.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A scratch directory is unusable.
    #[error("scratch directory {path} is unusable")]
    Workdir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An input file is unreadable.
    #[error("cannot read {path}")]
    ReadInput {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The home or the backend choice failed.
    #[error(transparent)]
    Daemon(#[from] hutch_daemon::DaemonError),
    /// An image operation failed.
    #[error(transparent)]
    Image(#[from] hutch_image::ImageError),
    /// A VMM operation failed.
    #[error(transparent)]
    Vmm(#[from] hutch_vmm::VmmError),
    /// Booting or stopping a sandbox failed.
    #[error(transparent)]
    Sandbox(#[from] hutch_core::SandboxError),
    /// Talking to the guest failed.
    #[error(transparent)]
    Channel(#[from] hutch_protocol::host::ChannelError),
    /// A manager action failed.
    #[error(transparent)]
    Core(Box<hutch_core::CoreError>),
    /// A call to the benchmark's daemon failed.
    #[error(transparent)]
    Client(Box<hutch_api::client::ClientError>),
    /// The benchmark cannot run as asked.
    #[error("{0}")]
    Usage(String),
    /// Local I/O failed.
    #[error("I/O failed")]
    Io(#[source] std::io::Error),
}

impl From<hutch_api::client::ClientError> for BenchError {
    fn from(e: hutch_api::client::ClientError) -> BenchError {
        BenchError::Client(Box::new(e))
    }
}

impl From<hutch_core::CoreError> for BenchError {
    fn from(e: hutch_core::CoreError) -> BenchError {
        BenchError::Core(Box::new(e))
    }
}
