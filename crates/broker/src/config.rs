//! What the daemon gives a sandbox's broker: its secrets, CA, trust roots, and the views of the
//! sandbox's DNS filter and egress policy the broker consults.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use hutch_types::BrokerEvent;
use rustls::RootCertStore;
use tokio::net::TcpStream;

use crate::{AttachedSecret, BrokerError, SandboxCa};

/// The answers Hutch's DNS filter gave this sandbox.
pub trait DnsOracle: Send + Sync {
    /// The addresses the filter answered for `host` (canonical), or `None` if it never
    /// answered that name for this sandbox.
    fn answers(&self, host: &str) -> Option<Vec<IpAddr>>;
}

/// The sandbox's egress policy, asked before the broker dials anything.
pub trait EgressCheck: Send + Sync {
    /// Whether the sandbox may reach `dst`; `host` is the SNI, `Host` or `CONNECT` name where
    /// one is known.
    fn allowed(&self, dst: SocketAddr, host: Option<&str>) -> bool;
}

/// Where the broker's events go (`hutch secret log`, the audit journal).
pub trait EventSink: Send + Sync {
    /// Records one event; must not block for long (called on the proxy's tasks).
    fn record(&self, event: BrokerEvent);
}

/// A boxed future of an upstream connection.
pub type DialFuture = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>;

/// Opens the broker's upstream connections. The socket must be made in the sandbox's network
/// namespace, so the sandbox's own routes and policy apply to the broker's traffic.
pub trait Dial: Send + Sync {
    /// Connects to `dst`.
    fn dial(&self, dst: SocketAddr) -> DialFuture;
}

/// Dials from the calling thread's network namespace (a broker run on a runtime whose threads
/// live in the sandbox's namespace; tests).
#[derive(Debug, Clone, Copy, Default)]
pub struct DirectDial;

impl Dial for DirectDial {
    fn dial(&self, dst: SocketAddr) -> DialFuture {
        Box::pin(TcpStream::connect(dst))
    }
}

/// Everything a sandbox's broker needs.
pub struct BrokerConfig {
    /// The sandbox the broker serves (named in its events).
    pub sandbox_id: String,
    /// The secrets attached to the sandbox (replaceable later: [`crate::Broker::set_secrets`]).
    pub secrets: Vec<AttachedSecret>,
    /// The sandbox's CA (its certificate must be installed in the guest).
    pub ca: SandboxCa,
    /// Roots upstream certificates are verified against ([`native_roots`] in production).
    pub upstream_roots: Arc<RootCertStore>,
    /// The sandbox's DNS filter's answers.
    pub dns: Arc<dyn DnsOracle>,
    /// The sandbox's egress policy.
    pub egress: Arc<dyn EgressCheck>,
    /// Where events go.
    pub events: Arc<dyn EventSink>,
    /// How upstream connections are opened.
    pub dial: Arc<dyn Dial>,
}

/// The host's own trust roots (the system store), for verifying real upstream certificates.
pub fn native_roots() -> Result<RootCertStore, BrokerError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(BrokerError::NoRoots(
            found
                .errors
                .first()
                .map(|e| e.to_string())
                .unwrap_or_default(),
        ));
    }
    Ok(roots)
}
