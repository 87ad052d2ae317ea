//! A host's membership in a fleet (`hutch daemon --fleet`): its record and capacity in etcd,
//! the fleet's tokens accepted beside the home's own, a candidacy for the reconciler's office,
//! and the fence that stops this host's sandboxes the fleet marked lost while it was away.

use std::{path::PathBuf, sync::Arc, time::Duration};

use hutch_core::{CoreError, Manager};
use hutch_fleet::{
    Capacity, Fence, Fleet, FleetCache, FleetToken, HostRecord, Reconciler, Registrar, VmOwner,
};
use hutch_store::ListFilter;
use hutch_types::{SandboxState, TokenScope};
use tokio::sync::watch;

use crate::{args::DaemonArgs, DaemonError};

/// How often a host recounts what it can still take.
const CAPACITY_TICK: Duration = Duration::from_secs(2);

/// Connects to the fleet named by `--fleet` and follows it (for its tokens); `None` without.
pub(crate) async fn connect(
    args: &DaemonArgs,
) -> Result<Option<(Fleet, Arc<FleetCache>)>, DaemonError> {
    let Some(url) = &args.fleet else {
        return Ok(None);
    };
    let fleet = Fleet::connect_prefixed(url, &args.fleet_opts.fleet_prefix)
        .await
        .map_err(DaemonError::Fleet)?;
    let cache = FleetCache::start(fleet.clone())
        .await
        .map_err(DaemonError::Fleet)?;
    Ok(Some((fleet, Arc::new(cache))))
}

/// A host's part in the fleet while the daemon runs.
pub(crate) struct Membership {
    registrar: Registrar,
    _reconciler: Reconciler,
    _fence: Fence,
}

impl Membership {
    /// Registers this host and starts its reconciler candidacy and its fence.
    pub(crate) async fn join(
        fleet: Fleet,
        cache: Arc<FleetCache>,
        host: HostRecord,
        capacity: watch::Receiver<Capacity>,
        manager: Arc<Manager>,
        opts: &crate::FleetOpts,
    ) -> Result<Membership, DaemonError> {
        let ttl = Duration::from_secs(opts.fleet_lease_ttl);
        let name = host.host.clone();
        let registrar = Registrar::start(fleet.clone(), host, ttl, capacity)
            .await
            .map_err(DaemonError::Fleet)?;
        let reconciler = Reconciler::start(
            fleet.clone(),
            cache.clone(),
            member_id("host", &name),
            ttl,
            Duration::from_secs(opts.fleet_lost_after),
        );
        let fence = Fence::start(
            fleet,
            cache,
            name,
            registrar.incarnations(),
            Arc::new(Owner(manager)),
        );
        Ok(Membership {
            registrar,
            _reconciler: reconciler,
            _fence: fence,
        })
    }

    /// The incarnation this host is registered under.
    pub(crate) fn incarnation(&self) -> u64 {
        self.registrar.incarnation()
    }

    /// Leaves the fleet at once (the host record goes; placements stay as they are).
    pub(crate) async fn leave(self) {
        self.registrar.leave().await;
    }
}

/// A fleet-unique reconciler candidate id: what runs it, where, and a random part.
pub(crate) fn member_id(kind: &str, name: &str) -> String {
    format!("{kind}:{name}:{:016x}", rand::random::<u64>())
}

/// The daemon's manager as the owner of this host's VMs, for the fence.
struct Owner(Arc<Manager>);

impl VmOwner for Owner {
    async fn stop(&self, id: &str) -> Result<(), String> {
        let gone = match self.0.get(id).await {
            Ok(info) => info.state == SandboxState::Destroyed,
            Err(CoreError::NotFound(_)) => true,
            Err(e) => return Err(hutch_core::chain(&e)),
        };
        if gone {
            return Ok(());
        }
        match self.0.destroy(id).await {
            Ok(_) | Err(CoreError::NotFound(_)) => Ok(()),
            Err(e) => Err(hutch_core::chain(&e)),
        }
    }
}

/// This host's record from its options (capacity and incarnation are filled in by the
/// registrar): named by its advertised address.
pub(crate) fn host_record(args: &DaemonArgs, backend: &str) -> Result<HostRecord, DaemonError> {
    let advertise = args.advertise.clone().unwrap_or_default();
    let host = authority(&advertise)
        .filter(|h| hutch_fleet::check_host_name(h))
        .ok_or_else(|| {
            DaemonError::FleetArgs(format!("--advertise {advertise:?} is not http://host:port"))
        })?
        .to_string();
    let labels = args
        .labels
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| DaemonError::FleetArgs(format!("--labels {kv:?} is not k=v")))
        })
        .collect::<Result<_, _>>()?;
    Ok(HostRecord {
        host,
        advertise,
        zone: args.zone.clone(),
        labels,
        backend: backend.to_string(),
        incarnation: 0,
        capacity: Capacity::default(),
    })
}

/// The `host:port` of an `http://host:port` URL.
pub(crate) fn authority(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("http://")?.trim_end_matches('/');
    (!rest.is_empty() && !rest.contains('/') && rest.contains(':')).then_some(rest)
}

/// What this host can take, recounted every [`CAPACITY_TICK`] from the manager's sandboxes;
/// the registrar rewrites the host record when it changes.
pub(crate) fn follow_capacity(
    manager: Arc<Manager>,
    state_dir: PathBuf,
    slots: usize,
    memory_mib: u64,
) -> watch::Receiver<Capacity> {
    let (tx, rx) = watch::channel(Capacity::default());
    tokio::spawn(async move {
        loop {
            match manager.list(&ListFilter::default()).await {
                Ok(sandboxes) => {
                    let live: Vec<_> = sandboxes
                        .iter()
                        .filter(|s| {
                            !matches!(s.state, SandboxState::Destroyed | SandboxState::Failed(_))
                        })
                        .collect();
                    let used_mib: u64 = live.iter().map(|s| u64::from(s.spec.memory_mib)).sum();
                    let capacity = Capacity {
                        vcpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
                        memory_mib,
                        free_memory_mib: memory_mib.saturating_sub(used_mib),
                        free_disk_mib: free_disk_mib(&state_dir),
                        slots: slots as u32,
                        free_slots: slots.saturating_sub(live.len()) as u32,
                    };
                    tx.send_if_modified(|c| {
                        let changed = *c != capacity;
                        *c = capacity;
                        changed
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %hutch_core::chain(&e), "counting sandboxes failed")
                }
            }
            tokio::time::sleep(CAPACITY_TICK).await;
        }
    });
    rx
}

/// Free space for unprivileged use under `dir`, MiB (0 when it cannot be read).
fn free_disk_mib(dir: &std::path::Path) -> u64 {
    rustix::fs::statvfs(dir).map_or(0, |s| s.f_bavail.saturating_mul(s.f_frsize) >> 20)
}

/// The scope a fleet token grants.
pub(crate) fn scope(token: &FleetToken) -> TokenScope {
    match token.label.as_deref().and_then(|l| l.split_once('=')) {
        Some((key, value)) => TokenScope::Label {
            key: key.to_string(),
            value: value.to_string(),
        },
        None => TokenScope::Admin,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_named_by_their_advertised_address() {
        assert_eq!(authority("http://127.0.0.1:7001/"), Some("127.0.0.1:7001"));
        for bad in [
            "127.0.0.1:7001",
            "https://h:1",
            "http://h",
            "http://h:1/x",
            "http://",
        ] {
            assert_eq!(authority(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_fleet_token_without_a_label_is_admin() {
        let t = |label: Option<&str>| FleetToken {
            id: "ftok-1".into(),
            label: label.map(String::from),
        };
        assert_eq!(scope(&t(None)), TokenScope::Admin);
        assert_eq!(
            scope(&t(Some("team=a"))),
            TokenScope::Label {
                key: "team".into(),
                value: "a".into()
            }
        );
    }
}
