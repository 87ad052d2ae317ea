//! The Firecracker backend's error type; reaches callers as [`crate::VmmError::Firecracker`].

use std::path::PathBuf;

/// Firecracker's own answer to a failed API call: the HTTP status and its `fault_message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("HTTP {status}: {fault_message}")]
pub struct ApiFault {
    /// The HTTP status code (400 for bad input, 500 otherwise in practice).
    pub status: u16,
    /// Firecracker's `fault_message` (or the raw body, condensed, if it sent no JSON).
    pub fault_message: String,
}

/// Why the hybrid-vsock `CONNECT <port>` handshake failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VsockError {
    /// The socket could not be reached or written.
    #[error("I/O")]
    Io(#[source] std::io::Error),
    /// Firecracker closed the connection: nothing listens on that port in the guest (yet).
    #[error("closed by firecracker: no guest listener")]
    Closed,
    /// No complete answer within the bound (a CONNECT with no listener can hang for seconds).
    #[error("no answer within {0} ms")]
    Timeout(u64),
    /// An answer that is not `OK <port>\n`.
    #[error("unexpected answer {0:?}")]
    BadAnswer(String),
}

/// Everything that can go wrong talking to, starting or stopping Firecracker.
///
/// Messages are short and do not repeat their `source`; print the chain for the whole story.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FirecrackerError {
    /// The `firecracker` (or `jailer`) binary was not found.
    #[error("{what} binary not found: set {env} or put it on PATH")]
    BinaryNotFound {
        /// `firecracker` or `jailer`.
        what: &'static str,
        /// The variable that names it.
        env: &'static str,
    },

    /// The kernel is not an ELF `vmlinux`, which v1.16 needs on x86_64.
    #[error("kernel {0} is not an ELF vmlinux (Firecracker refuses a bzImage): run `hutch image build` again so the image has one")]
    KernelNotElf(PathBuf),

    /// A snapshot cannot be taken or loaded as asked.
    #[error("snapshot: {0}")]
    Snapshot(String),

    /// `<binary> --version` failed, or printed no version.
    #[error("{path} --version: {detail}")]
    Version {
        /// The binary.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },

    /// Connecting to the API socket failed.
    #[error("connect to firecracker API socket {socket}")]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },

    /// The HTTP exchange itself failed (connection reset, malformed response, …).
    #[error("firecracker API {method} {path}: HTTP exchange failed")]
    Http {
        /// The request method.
        method: &'static str,
        /// The request path.
        path: String,
        /// Why.
        #[source]
        source: hyper::Error,
    },

    /// Firecracker did not answer in time.
    #[error("firecracker API {method} {path}: no answer within {ms} ms")]
    Timeout {
        /// The request method.
        method: &'static str,
        /// The request path.
        path: String,
        /// The bound.
        ms: u64,
    },

    /// Firecracker refused the request; the source carries its `fault_message`.
    #[error("firecracker API {method} {path} failed")]
    Api {
        /// The request method.
        method: &'static str,
        /// The request path.
        path: String,
        /// Firecracker's status and `fault_message`.
        #[source]
        fault: ApiFault,
    },

    /// A request body could not be encoded (e.g. a path that is not UTF-8) or a response body
    /// could not be decoded.
    #[error("firecracker API {method} {path}: bad JSON")]
    Json {
        /// The request method.
        method: &'static str,
        /// The request path.
        path: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },

    /// A response body exceeded the size we accept.
    #[error("firecracker API {method} {path}: response over {limit} bytes")]
    ResponseTooLarge {
        /// The request method.
        method: &'static str,
        /// The request path.
        path: String,
        /// The limit.
        limit: usize,
    },

    /// Firecracker (or the jailer's Firecracker) exited before its API was ready.
    #[error("firecracker exited during start ({status}): {stderr}")]
    Exited {
        /// Exit status, or what is known of it.
        status: String,
        /// Its stderr/stdout start, condensed.
        stderr: String,
    },

    /// Firecracker did not become ready in time.
    #[error("firecracker did not {what} within {ms} ms")]
    StartTimeout {
        /// What did not happen.
        what: String,
        /// The bound.
        ms: u64,
    },

    /// The jailer did not leave a usable Firecracker behind.
    #[error("jailer: {0}")]
    Jailer(String),

    /// The shared libraries a dynamically linked firecracker needs could not be found (`ldd`).
    #[error("cannot list the shared libraries of {binary} for the jail: {detail}")]
    Libraries {
        /// The firecracker binary.
        binary: PathBuf,
        /// What went wrong.
        detail: String,
    },

    /// Putting a shared library into the jail failed.
    #[error("copy shared library {library} into the jail at {dest}")]
    CopyLibrary {
        /// The library on the host.
        library: PathBuf,
        /// Where it was to go.
        dest: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },

    /// Opening the guest channel over hybrid vsock failed.
    #[error("hybrid vsock CONNECT {port} on {path}")]
    Vsock {
        /// The vsock Unix socket.
        path: PathBuf,
        /// The guest port.
        port: u32,
        /// Why.
        #[source]
        source: VsockError,
    },

    /// A request path that is not a valid URI path.
    #[error("invalid API request path {0:?}")]
    BadRequestPath(String),

    /// A device id that cannot be put in a request path.
    #[error("invalid device id {0:?}: use 1-64 of [A-Za-z0-9_]")]
    InvalidDeviceId(String),
}

impl FirecrackerError {
    /// Firecracker's `fault_message`, if this is a refused API call.
    pub fn fault_message(&self) -> Option<&str> {
        match self {
            FirecrackerError::Api { fault, .. } => Some(&fault.fault_message),
            _ => None,
        }
    }
}
