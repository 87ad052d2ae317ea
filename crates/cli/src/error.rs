//! The CLI's errors, printed as one line: the error and its chain of causes.

use std::path::PathBuf;

/// Everything a `hutch` command can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// `$HUTCH_HOME` is unusable.
    #[error("HUTCH_HOME {path} is unusable")]
    Home {
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
    /// Local terminal I/O failed.
    #[error("terminal I/O failed")]
    Io(#[source] std::io::Error),
}

/// `error: cause: cause…` on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        src = s.source();
    }
    out
}
