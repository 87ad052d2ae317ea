//! What starting or running the daemon can fail with (request errors are [`HttpError`]s).
//!
//! [`HttpError`]: crate::http_error::HttpError

use std::path::PathBuf;

/// Why the daemon (or the backend choice it shares with `hutch run`) failed.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// `$HUTCH_HOME` is unusable.
    #[error("HUTCH_HOME {path} is unusable")]
    Home {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An image could not be opened.
    #[error(transparent)]
    Image(#[from] hutch_image::ImageError),
    /// The backend could not be set up.
    #[error(transparent)]
    Vmm(#[from] hutch_vmm::VmmError),
    /// The state database failed.
    #[error(transparent)]
    Store(hutch_store::StoreError),
    /// The secret store cannot be opened (its key does not open a stored value, …).
    #[error("cannot open the secret store")]
    Secrets(#[source] hutch_core::secrets::SecretError),
    /// Adopting what an earlier daemon left failed.
    #[error(transparent)]
    Core(Box<hutch_core::CoreError>),
    /// The fleet (etcd) could not be joined or read.
    #[error("fleet")]
    Fleet(#[source] hutch_fleet::FleetError),
    /// A fleet option is missing or malformed.
    #[error("{0}")]
    FleetArgs(String),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address or socket path.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another daemon serves this home.
    #[error("another hutch daemon{} holds {}: stop it first (this one touched nothing)", holder.map(|p| format!(" (pid {p})")).unwrap_or_default(), lock.display())]
    DaemonRunning {
        /// The lock file.
        lock: PathBuf,
        /// The holder's pid, when it wrote one.
        holder: Option<u32>,
    },
    /// The home's daemon lock could not be taken.
    #[error("cannot lock {path}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The backend asked for cannot run here.
    #[error("{0}")]
    Backend(String),
    /// A server stopped with an I/O error.
    #[error("serving failed")]
    Io(#[source] std::io::Error),
    /// The identity token signing key could not be loaded or made.
    #[error("cannot load the identity signing key")]
    IdentityKey(#[source] hutch_task::sign::KeyError),
}

impl From<hutch_core::CoreError> for DaemonError {
    fn from(e: hutch_core::CoreError) -> DaemonError {
        DaemonError::Core(Box::new(e))
    }
}
