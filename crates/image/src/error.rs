//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while building, opening or listing guest images.
///
/// Messages are short and name the thing that failed; the underlying cause, where there is one, is
/// reachable through [`std::error::Error::source`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// A host program the pipeline needs is not installed.
    #[error("{tool} not found: install it with `apt-get install {package}`")]
    ToolMissing {
        /// The program that was looked up on `PATH`.
        tool: String,
        /// The Debian package that ships it.
        package: String,
    },

    /// The Debian archive keyring is not installed on the host.
    #[error("{path} not found: install it with `apt-get install debian-archive-keyring`")]
    KeyringMissing {
        /// Where the keyring was expected.
        path: PathBuf,
    },

    /// A step that needs root privileges was started without them.
    #[error("{what} needs root: run the image build as root")]
    NeedsRoot {
        /// The step that needs root.
        what: String,
    },

    /// No Debian mirror was given and none could be found in the host's apt sources.
    #[error("no Debian mirror found in the host's apt sources: pass `--mirror URL`")]
    NoMirror,

    /// A part of the build specification is malformed.
    #[error("invalid {field} `{value}`: {reason}")]
    InvalidSpec {
        /// Which field of the spec.
        field: &'static str,
        /// The offending value.
        value: String,
        /// What is expected instead.
        reason: &'static str,
    },

    /// An image name does not match `[a-z0-9][a-z0-9._-]{0,62}`.
    #[error("invalid image name `{0}`: use 1-63 of a-z 0-9 . _ - starting with a letter or digit")]
    InvalidName(String),

    /// No image of that name has been built.
    #[error("image `{name}` not found: run `hutch image build --name {name}`")]
    NotFound {
        /// The name that was asked for.
        name: String,
    },

    /// A manifest names an artifact that is not (or no longer) in the cache.
    #[error(
        "image `{name}` is incomplete ({artifact} missing): run `hutch image build --name {name}`"
    )]
    ArtifactMissing {
        /// The image whose manifest was read.
        name: String,
        /// The artifact id that is missing.
        artifact: String,
    },

    /// A manifest or artifact metadata file could not be parsed.
    #[error("corrupt metadata in {path}")]
    Corrupt {
        /// The file that failed to parse.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },

    /// The agent binary cannot be used as the initramfs `/init`.
    #[error("agent binary {path}: {reason}")]
    BadAgent {
        /// The agent binary path.
        path: PathBuf,
        /// Why it is not usable.
        reason: String,
    },

    /// The kernel package does not contain what the pipeline needs.
    #[error("kernel package {package}: {reason}")]
    Kernel {
        /// The kernel package that was unpacked.
        package: String,
        /// What is missing or wrong.
        reason: String,
    },

    /// A kernel configuration (fragment or result) is unusable.
    #[error("kernel config: {0}")]
    KernelConfig(String),

    /// A required kernel module is neither built in nor shipped as a module.
    #[error("kernel {release}: module {module} is neither built in nor shipped as a module")]
    ModuleMissing {
        /// The kernel release.
        release: String,
        /// The module name.
        module: String,
    },

    /// A kernel module is compressed with a format this crate cannot unpack.
    #[error("kernel module {path}: unsupported compression (expected .ko, .ko.xz or .ko.zst)")]
    ModuleCompression {
        /// The module file.
        path: PathBuf,
    },

    /// A host command ran but failed.
    #[error("`{command}` failed ({status}){tail}")]
    CommandFailed {
        /// The command, shortened to program and first arguments.
        command: String,
        /// Its exit status.
        status: String,
        /// The last lines of its output, prefixed with a newline, or empty.
        tail: String,
    },

    /// A host command could not be started.
    #[error("cannot run {program}")]
    Spawn {
        /// The program.
        program: String,
        /// Why it could not be started.
        #[source]
        source: std::io::Error,
    },

    /// The ELF `vmlinux` (for Firecracker) could not be extracted from the kernel image.
    #[error("extracting vmlinux from {bzimage}")]
    Vmlinux {
        /// The bzImage it was extracted from.
        bzimage: PathBuf,
        /// Why it failed.
        #[source]
        source: crate::vmlinux::VmlinuxError,
    },

    /// A file system operation failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done, e.g. "read" or "create".
        action: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl ImageError {
    /// Shorthand for [`ImageError::Io`].
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> ImageError {
        let path = path.into();
        move |source| ImageError::Io {
            action,
            path,
            source,
        }
    }
}
