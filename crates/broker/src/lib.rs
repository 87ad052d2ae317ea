//! The secret broker: one per sandbox, serving the guest's redirected TCP 80/443 (and explicit
//! `CONNECT`) inside the sandbox's network namespace, so that the real value of a secret never
//! enters the guest.
//!
//! * Hosts no secret is bound to are **spliced**: the TLS ClientHello's SNI is read without
//!   consuming it, the egress check asked, and bytes copied both ways (the guest sees the
//!   origin's own certificate).
//! * Bound hosts are **terminated** with a leaf from the sandbox's own [`SandboxCa`]; each
//!   request is checked (SNI answered by the sandbox's DNS with the original destination,
//!   `Host` = SNI, target normalised once, binding path and method, no TRACE) before the
//!   placeholder is replaced by the value at the binding's location only. Upstream is dialed
//!   at the checked address and its real certificate verified for the SNI.
//! * Once a value went out on a connection, every response on it is **scrubbed** of the value
//!   and its encodings. Every decision is an event ([`EventSink`]).
//!
//! # Wiring (one broker per sandbox with secrets)
//!
//! 1. [`SandboxCa::generate`] per sandbox (and per clone, fork, pool hand-out), named after the
//!    bound hosts; [`Broker::ca_cert_pem`] goes to the guest before its first exec.
//! 2. A listener made **inside the sandbox's namespace** (a std listener made on a thread in
//!    it, then `tokio::net::TcpListener::from_std`), on the gateway address.
//! 3. nft in that namespace: a `nat` prerouting rule `iifname <tap> tcp dport { 80, 443 }
//!    redirect to :<port>`, an input rule accepting `iifname <tap> tcp dport <port>`, UDP 443
//!    from the TAP dropped, and an output rule letting the broker's own upstream connections
//!    out (their sockets live in the namespace; the deny sets should apply to them too).
//! 4. A [`Dial`] that makes its sockets in that namespace (so the sandbox's routes, tunnel
//!    included, apply), a [`DnsOracle`] over the sandbox's DNS filter, an [`EgressCheck`] over
//!    its policy, an [`EventSink`] into the secret log.
//! 5. [`Broker::serve`] on a task aborted when the sandbox goes; [`Broker::set_secrets`] on
//!    rotation.
//! 6. A self-test from the guest: `GET /` with `Host:` [`CANARY_HOST`] to the gateway's port 80
//!    must come back as [`CANARY_REPLY`] and the sandbox's id, proving that the guest's traffic
//!    reaches this broker before anything relies on it.
//!
//! SSH keys are not proxied but held by a per-sandbox agent ([`ssh::SshAgentKey`]) that the
//! guest's forwarded `SSH_AUTH_SOCK` reaches over the host channel; it signs only for a
//! verified session bind to an allowed host key.

mod ca;
mod config;
mod hello;
mod policy;
mod proxy;
mod scrub;
mod secret;
mod splice;
pub mod ssh;
mod target;
mod websocket;

use std::io;
use std::sync::{Arc, RwLock};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

pub use ca::SandboxCa;
pub use config::{
    native_roots, BrokerConfig, Dial, DialFuture, DirectDial, DnsOracle, EgressCheck, EventSink,
};
pub use secret::{AttachedSecret, SecretValue};

/// The name of the broker's self-test: a plain HTTP request with this `Host`, redirected to
/// the broker like any other guest connection (or sent to its listener directly), is answered
/// by the broker itself and never forwarded. `.internal` is reserved for private use, so no
/// real origin can be named so.
pub const CANARY_HOST: &str = "hutch-broker.internal";

/// The body of the broker's answer to its self-test: this, then the sandbox's id.
pub const CANARY_REPLY: &str = "hutch-broker ";

/// Why a broker could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Generating the CA or a leaf failed.
    #[error("certificate generation failed")]
    Certificate(#[from] rcgen::Error),
    /// rustls refused a key or configuration.
    #[error("TLS configuration failed")]
    Tls(#[from] rustls::Error),
    /// A stored CA certificate could not be read.
    #[error("the stored sandbox CA is unreadable: {0}")]
    BadCa(String),
    /// The host's trust store had no usable root.
    #[error("no usable trust roots on this host: {0}")]
    NoRoots(String),
}

/// A sandbox's broker. Cheap to clone; every clone serves the same sandbox.
#[derive(Clone)]
pub struct Broker {
    shared: Arc<proxy::Shared>,
    ca: Arc<SandboxCa>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("sandbox_id", &self.shared.sandbox_id)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// Makes a broker from its configuration (no sockets yet: see [`Broker::serve`]).
    pub fn new(config: BrokerConfig) -> Result<Broker, BrokerError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ca = Arc::new(config.ca);
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(ca::LeafResolver(ca.clone())));
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(config.upstream_roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        let shared = proxy::Shared {
            sandbox_id: config.sandbox_id,
            secrets: RwLock::new(Arc::new(config.secrets)),
            dns: config.dns,
            egress: config.egress,
            events: config.events,
            dial: config.dial,
            tls_server: Arc::new(server),
            tls_client: Arc::new(client),
        };
        Ok(Broker {
            shared: Arc::new(shared),
            ca,
        })
    }

    /// The sandbox CA's certificate (PEM), for the guest's trust stores.
    pub fn ca_cert_pem(&self) -> String {
        self.ca.cert_pem()
    }

    /// Replaces the attached secrets (rotation): new connections and requests use them.
    pub fn set_secrets(&self, secrets: Vec<AttachedSecret>) {
        *self
            .shared
            .secrets
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(secrets);
    }

    /// Serves one guest connection (redirected, or explicit `CONNECT`) to its end.
    pub async fn serve_connection(&self, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        if let Err(e) = proxy::handle(self.shared.clone(), stream).await {
            tracing::debug!(sandbox = %self.shared.sandbox_id, error = %e, "broker connection ended");
        }
    }

    /// Accepts and serves connections until accepting fails. Dropping the future ends every
    /// connection it serves (the sandbox is going away).
    pub async fn serve(&self, listener: TcpListener) -> io::Error {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let me = self.clone();
                        conns.spawn(async move { me.serve_connection(stream).await });
                    }
                    Err(e) => return e,
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
    }
}
