//! The crate's error type.

use std::io;

use ipnet::Ipv4Net;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The sandbox id cannot be used in names.
    #[error("invalid sandbox id {id:?}: {reason}")]
    InvalidId {
        /// The id (truncated).
        id: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// `create` for an id that already has a network.
    #[error("sandbox {0} already has a network")]
    AlreadyExists(String),
    /// The id has no network (never created, or destroyed).
    #[error("sandbox {0} has no network")]
    NotFound(String),
    /// A policy that needs a NIC for a sandbox created without one (`none`).
    #[error(
        "sandbox {0} was created without a NIC (policy none); a NIC cannot be added while it runs"
    )]
    NoNic(String),
    /// Every transit subnet is taken.
    #[error("transit pool {0} is exhausted")]
    PoolExhausted(Ipv4Net),
    /// Bad configuration or environment.
    #[error("configuration: {0}")]
    Config(String),
    /// A netlink request failed.
    #[error("netlink: {what}")]
    Netlink {
        /// What was being done.
        what: String,
        /// The netlink error.
        #[source]
        source: rtnetlink::Error,
    },
    /// A system call or file operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// nft refused a transaction.
    #[error("nftables: {what}: {message}")]
    Nft {
        /// What was being done.
        what: String,
        /// nft's error output.
        message: String,
    },
    /// The host port asked for is taken.
    #[error("host port 127.0.0.1:{0} is in use")]
    PortInUse(u16),
    /// The guest port is already published on another host port.
    #[error("guest port {guest_port} is already published on 127.0.0.1:{host_port}")]
    AlreadyPublished {
        /// The guest port.
        guest_port: u16,
        /// Where it is published.
        host_port: u16,
    },
    /// A namespace worker thread panicked.
    #[error("namespace worker thread died")]
    Worker,
}

/// Result alias.
pub type Result<T, E = NetError> = std::result::Result<T, E>;

pub(crate) fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Netlink { what, source }
}
