//! What can go wrong talking to the fleet.

/// A fleet operation's failure.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The `--fleet` URL is not `etcd://host:port[,host:port…]`.
    #[error("fleet URL {0:?} is not etcd://host:port[,host:port…]")]
    BadUrl(String),
    /// No etcd member answered.
    #[error("cannot connect to the fleet at {url}")]
    Connect {
        /// The fleet URL.
        url: String,
        /// etcd's error (boxed: it is large).
        #[source]
        source: Box<etcd_client::Error>,
    },
    /// An etcd call failed.
    #[error("etcd {op} failed")]
    Etcd {
        /// What was asked.
        op: &'static str,
        /// etcd's error (boxed: it is large).
        #[source]
        source: Box<etcd_client::Error>,
    },
    /// A record in etcd is not what this version writes.
    #[error("fleet record {key} is malformed")]
    Malformed {
        /// Its key.
        key: String,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },
    /// etcd no longer knows the host's lease (it expired while etcd was unreachable).
    #[error("the host's lease expired")]
    LeaseLost,
    /// The fleet's watch ended (etcd closed or canceled it).
    #[error("the fleet watch ended: {0}")]
    WatchEnded(&'static str),
    /// etcd did not answer in time.
    #[error("etcd did not answer {0} in time")]
    Unanswered(&'static str),
    /// A compare-and-swap kept losing to other writers.
    #[error("{0}: too much contention, gave up")]
    Contention(&'static str),
}

impl FleetError {
    /// An etcd call's failure, named by what was asked.
    pub(crate) fn etcd(op: &'static str) -> impl FnOnce(etcd_client::Error) -> FleetError {
        move |source| FleetError::Etcd {
            op,
            source: Box::new(source),
        }
    }
}
