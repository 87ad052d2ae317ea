//! Interception for the secret broker: a sandbox's guest TCP to ports 80 and 443 turned to a
//! listener in the sandbox's own namespace, and what the DNS filter answered, so the broker can
//! check that a connection goes where the guest's resolver said the name it claims is.
//!
//! The rules are in every sandbox table from the start with empty sets
//! (`nft::sandbox_table`); turning interception on only adds set elements, so it is idempotent
//! and a restarted daemon calls it again for the sandboxes it adopts. The namespace's own
//! outward TCP (the broker dialling upstream) always meets the deny lists and the policy.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::filter::Answers;
use crate::nft::{self, BROKER_PORT};
use crate::plan::GATEWAY_ADDR;
use crate::{ns, Names, NetError, Network, Result};

/// A sandbox's interception, on: accept on `listener` (each connection's original
/// destination is its `SO_ORIGINAL_DST`; a guest that connects to the listener itself asks
/// for an explicit proxy) and check destinations against `answers`.
pub struct Interception {
    /// Listens on the gateway address, [`BROKER_PORT`], inside the sandbox's namespace.
    pub listener: TcpListener,
    /// The sandbox's DNS answers.
    pub answers: Answers,
    /// Opens upstream connections from inside the sandbox's namespace.
    pub dialer: Dialer,
}

/// Opens TCP connections from inside one sandbox's namespace, so its routes apply and the
/// namespace's `output` chain holds them to the sandbox's policy and deny lists.
#[derive(Clone, Debug)]
pub struct Dialer {
    netns: PathBuf,
}

impl Dialer {
    /// Connects to `to`: the socket is made on an ns thread inside the namespace, the connect
    /// runs on the caller's runtime.
    pub async fn connect(&self, to: SocketAddr) -> io::Result<TcpStream> {
        let socket = ns::run_in(Some(&self.netns), move || {
            let s = if to.is_ipv4() {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            };
            s.map_err(|source| NetError::Io {
                what: "make an upstream socket".into(),
                source,
            })
        })
        .await
        .map_err(io::Error::other)?;
        socket.connect(to).await
    }
}

impl Network {
    /// Turns interception on for sandbox `id` and returns its listener. The sandbox must have
    /// a NIC (and so a DNS filter). Each call opens a new listener, so call it once per
    /// sandbox (again after adopting one).
    pub async fn intercept(&self, id: &str) -> Result<Interception> {
        let n = Names::new(id)?;
        let (table, answers) = {
            let st = self.state.lock().unwrap();
            let e = st
                .sandboxes
                .get(id)
                .ok_or_else(|| NetError::NotFound(id.into()))?;
            let rt =
                e.rt.as_ref()
                    .filter(|_| e.has_nic)
                    .ok_or_else(|| NetError::NoNic(id.into()))?;
            (e.table.clone(), rt.answers.clone())
        };
        let json = nft::sandbox_intercept(&table);
        let backend = self.cfg.nft;
        let netns = ns::netns_path(&n.netns);
        let listener = ns::run_in(Some(&netns), move || {
            let l = std::net::TcpListener::bind(SocketAddr::from((GATEWAY_ADDR, BROKER_PORT)))
                .map_err(|source| NetError::Io {
                    what: "bind the broker listener".into(),
                    source,
                })?;
            l.set_nonblocking(true).map_err(|source| NetError::Io {
                what: "broker listener nonblocking".into(),
                source,
            })?;
            nft::run(backend, "turn interception on", &json)?;
            Ok(l)
        })
        .await?;
        let listener = TcpListener::from_std(listener).map_err(|source| NetError::Io {
            what: "register the broker listener".into(),
            source,
        })?;
        Ok(Interception {
            listener,
            answers,
            dialer: Dialer { netns },
        })
    }
}
