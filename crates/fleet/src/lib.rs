//! A fleet of Hutch hosts on etcd.
//!
//! etcd (Kubernetes' datastore) holds the fleet's small shared state; Hutch adds no
//! membership or consensus of its own. Each host daemon stays the source of truth for its own
//! VMs; etcd holds only:
//!
//! - **host records** ([`HostRecord`], under the host's lease: gone when the host stops
//!   renewing it), written by the [`Registrar`];
//! - **slot bookings** (one counter per host), moved by multi-key compare-and-swap
//!   ([`place`]) so two gateways never book the same slot;
//! - **placement records** ([`Placement`]: which host owns a sandbox; not leased), written
//!   only where none exists yet;
//! - **fleet tokens** ([`FleetToken`], by hash): accepted by every gateway and host;
//! - **drain markers** ([`Drain`]): hosts that take no new placements;
//! - **the reconciler's office** (a key under the elected [`Reconciler`]'s lease): the one
//!   member that moves the sandboxes of a vanished host `running → unreachable → lost`
//!   ([`reconcile`]); a returning host stops what was given up ([`Fence`]).
//!
//! Gateways read all of it through a [`FleetCache`] fed by one watch that resumes from the
//! last revision it applied.

mod cache;
mod error;
mod fence;
pub mod place;
pub mod reconcile;
mod registrar;
mod schema;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tokens;

pub use cache::{FleetCache, FleetState};
pub use error::FleetError;
pub use fence::{Fence, VmOwner};
pub use reconcile::Reconciler;
pub use registrar::Registrar;
pub use schema::{
    check_host_name, Capacity, Drain, FleetToken, HostRecord, Keys, Placement, PlacementState,
    Shape, DEFAULT_PREFIX,
};

use etcd_client::{Client, ConnectOptions};

/// A connection to the fleet's etcd cluster and the key prefix the fleet lives under.
#[derive(Clone)]
pub struct Fleet {
    client: Client,
    keys: Keys,
}

impl Fleet {
    /// Connects to `url` (`etcd://h1:2379,h2:2379`; plain `http://` endpoints are accepted
    /// too) with the default key prefix.
    pub async fn connect(url: &str) -> Result<Fleet, FleetError> {
        Fleet::connect_prefixed(url, schema::DEFAULT_PREFIX).await
    }

    /// Connects with the fleet's keys under `prefix` (tests give each case its own).
    pub async fn connect_prefixed(url: &str, prefix: &str) -> Result<Fleet, FleetError> {
        let endpoints = endpoints(url)?;
        let options = ConnectOptions::new()
            .with_connect_timeout(std::time::Duration::from_secs(5))
            .with_timeout(std::time::Duration::from_secs(10))
            .with_keep_alive(
                std::time::Duration::from_secs(5),
                std::time::Duration::from_secs(5),
            );
        let client = Client::connect(&endpoints, Some(options))
            .await
            .map_err(|source| FleetError::Connect {
                url: url.to_string(),
                source: Box::new(source),
            })?;
        Ok(Fleet {
            client,
            keys: Keys::new(prefix),
        })
    }

    /// The fleet's key layout.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A handle on the etcd client (cheap: clients share their channel).
    pub fn client(&self) -> Client {
        self.client.clone()
    }
}

/// The gRPC endpoints of a fleet URL: `etcd://h1:2379,h2:2379` → `http://h1:2379`, ….
pub fn endpoints(url: &str) -> Result<Vec<String>, FleetError> {
    let bad = || FleetError::BadUrl(url.to_string());
    let rest = url
        .strip_prefix("etcd://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(bad)?;
    let endpoints: Vec<String> = rest
        .split(',')
        .map(|hp| hp.trim().trim_end_matches('/'))
        .map(|hp| {
            if hp.is_empty() || hp.contains('/') || !hp.contains(':') {
                Err(bad())
            } else {
                Ok(format!("http://{hp}"))
            }
        })
        .collect::<Result<_, _>>()?;
    if endpoints.is_empty() {
        return Err(bad());
    }
    Ok(endpoints)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_urls_name_every_member() {
        assert_eq!(
            endpoints("etcd://h1:2379,10.0.0.2:2379").unwrap(),
            ["http://h1:2379", "http://10.0.0.2:2379"]
        );
        for bad in [
            "h1:2379",
            "etcd://",
            "etcd://h1",
            "etcd://h1:2379/x",
            "etcd://a:1,,b:2",
        ] {
            assert!(endpoints(bad).is_err(), "{bad}");
        }
    }
}
