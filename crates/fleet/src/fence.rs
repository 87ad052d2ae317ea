//! A returning host's side of host loss: it stops the sandboxes the fleet gave up on.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::{sync::watch, task::JoinHandle};

use crate::{place, registrar::chain, Fleet, FleetCache, Placement, PlacementState};

/// How often the fence looks (besides every change the cache brings).
const LOOK: Duration = Duration::from_secs(1);
/// How long after a failed stop the fence tries again.
const RETRY: Duration = Duration::from_secs(5);

/// What owns a host's VMs (the daemon's manager; a fake in tests).
pub trait VmOwner: Send + Sync + 'static {
    /// Stops and removes sandbox `id` on this host; `Ok` when it is gone already.
    fn stop(&self, id: &str) -> impl Future<Output = Result<(), String>> + Send;
}

/// Whether `host`, registered at `incarnation`, must stop `placement`'s VM: it is the
/// host's, marked `lost` while the host was away, and the host has registered again since
/// (a newer incarnation: it knows its old registration is over, and its VMs with it).
pub fn must_stop(placement: &Placement, host: &str, incarnation: u64) -> bool {
    placement.host == host
        && placement.state == PlacementState::Lost
        && placement.incarnation < incarnation
}

/// Follows the fleet on behalf of one host and stops, through its [`VmOwner`], every
/// sandbox of its that the reconciler marked `lost`, then removes the placement and frees
/// its slot. Dropping it stops following.
pub struct Fence {
    task: JoinHandle<()>,
}

impl Fence {
    /// Fences for `host`, whose current incarnation `incarnation` follows.
    pub fn start<O: VmOwner>(
        fleet: Fleet,
        cache: Arc<FleetCache>,
        host: String,
        incarnation: watch::Receiver<u64>,
        owner: Arc<O>,
    ) -> Fence {
        let task = tokio::spawn(async move {
            loop {
                let current = *incarnation.borrow();
                let due: Vec<Placement> = cache
                    .snapshot()
                    .placements
                    .into_values()
                    .filter(|p| must_stop(p, &host, current))
                    .collect();
                let mut failed = false;
                for p in due {
                    match owner.stop(&p.sandbox).await {
                        Ok(()) => {
                            tracing::warn!(sandbox = %p.sandbox, "stopped a sandbox the fleet marked lost");
                            if let Err(e) = place::forget(&fleet, &p.sandbox).await {
                                tracing::warn!(sandbox = %p.sandbox, error = %chain(&e), "removing a lost placement failed");
                            }
                        }
                        Err(e) => {
                            failed = true;
                            tracing::warn!(sandbox = %p.sandbox, error = %e, "stopping a lost sandbox failed; retrying")
                        }
                    }
                }
                if failed {
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
                cache
                    .wait_for(LOOK, |s| {
                        s.placements.values().any(|p| must_stop(p, &host, current))
                    })
                    .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Fence { task }
    }
}

impl Drop for Fence {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_stops_only_its_own_lost_sandboxes_once_registered_again() {
        let lost = Placement {
            sandbox: "sb-1".into(),
            host: "h1".into(),
            incarnation: 3,
            state: PlacementState::Lost,
            ..Placement::default()
        };
        assert!(must_stop(&lost, "h1", 4));
        // Not yet registered again: its own registration may still be the one judged.
        assert!(!must_stop(&lost, "h1", 3));
        assert!(!must_stop(&lost, "h2", 9));
        for state in [PlacementState::Running, PlacementState::Unreachable] {
            assert!(!must_stop(
                &Placement {
                    state,
                    ..lost.clone()
                },
                "h1",
                4
            ));
        }
    }
}
