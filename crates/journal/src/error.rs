//! Why a journal operation failed.

use std::path::PathBuf;

/// Why a journal could not be created, opened, written or read.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A file of the journal could not be read or written.
    #[error("journal file {}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The journal already exists (create) or does not (open).
    #[error("journal {}: {why}", .path.display())]
    State {
        /// The journal's directory.
        path: PathBuf,
        /// What is wrong.
        why: &'static str,
    },
    /// The last complete line is not a record, so the journal cannot be continued.
    #[error("journal {}: its last line is not a record", .0.display())]
    Damaged(PathBuf),
    /// The journal was sealed: nothing more can be written.
    #[error("the journal is sealed")]
    Sealed,
    /// A session recording's bytes are not those its journal names by digest.
    #[error("recording {} does not match the digest its journal names", .0.display())]
    Altered(PathBuf),
    /// The sandbox key was asked to sign something that is not a DSSE encoding.
    #[error("the sandbox key signs only DSSE pre-authentication encodings")]
    NotDsse,
    /// The writer thread is gone (it failed, or the journal was sealed).
    #[error("the journal's writer has stopped")]
    Stopped,
}

impl JournalError {
    /// An I/O error on `path`.
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> JournalError {
        let path = path.into();
        move |source| JournalError::Io { path, source }
    }
}
