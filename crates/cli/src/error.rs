//! The CLI's errors, printed as one line: the error and its chain of causes.

use std::path::PathBuf;

/// Everything a `hutch` command can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A benchmark's scratch directory is unusable.
    #[error("scratch directory {path} is unusable")]
    Workdir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The guest agent binary could not be found.
    #[error("guest agent binary not found (looked in {searched}): build it with `cargo build --release -p hutch-agent --target x86_64-unknown-linux-musl` or pass --agent")]
    AgentMissing {
        /// Where we looked.
        searched: String,
    },
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
    /// The image build task panicked or was cancelled.
    #[error("image build was interrupted")]
    Interrupted,
    /// The state database failed.
    #[error(transparent)]
    Store(hutch_store::StoreError),
    /// A sandbox manager action failed.
    #[error(transparent)]
    Core(Box<hutch_core::CoreError>),
    /// The daemon (or the backend choice) failed.
    #[error(transparent)]
    Daemon(#[from] hutch_daemon::DaemonError),
    /// A request to the in-process request surface failed.
    #[error(transparent)]
    Service(Box<hutch_core::service::ServiceError>),
    /// A sandbox id is malformed.
    #[error(transparent)]
    SandboxId(#[from] hutch_types::InvalidSandboxId),
    /// A daemon API call failed.
    #[error(transparent)]
    Client(Box<hutch_api::client::ClientError>),
    /// An archive was refused or could not be unpacked.
    #[error(transparent)]
    Archive(#[from] hutch_task::archive::ArchiveError),
    /// `hutch setup` failed.
    #[error(transparent)]
    Setup(#[from] crate::setup_cmd::SetupError),
    /// The command line is inconsistent.
    #[error("{0}")]
    Usage(String),
    /// A journal could not be read for offline verification.
    #[error(transparent)]
    Journal(#[from] hutch_journal::JournalError),
    /// A session recording could not be read.
    #[error("the recording is not asciicast v2")]
    Recording(#[from] hutch_journal::cast::CastError),
    /// An input file named on the command line is unreadable.
    #[error("cannot read {path}")]
    ReadInput {
        /// The file (`-`: stdin).
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Local terminal I/O failed.
    #[error("terminal I/O failed")]
    Io(#[source] std::io::Error),
}

pub use hutch_core::chain;

impl CliError {
    /// For `map_err`: reading the local `path` failed.
    pub fn reading(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> CliError + '_ {
        move |source| CliError::ReadInput {
            path: path.display().to_string(),
            source,
        }
    }
}

impl From<hutch_api::client::ClientError> for CliError {
    fn from(e: hutch_api::client::ClientError) -> CliError {
        CliError::Client(Box::new(e))
    }
}

impl From<hutch_core::CoreError> for CliError {
    fn from(e: hutch_core::CoreError) -> CliError {
        CliError::Core(Box::new(e))
    }
}

impl From<hutch_core::service::ServiceError> for CliError {
    fn from(e: hutch_core::service::ServiceError) -> CliError {
        CliError::Service(Box::new(e))
    }
}
