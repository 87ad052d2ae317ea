//! Spare networks: whole sandbox networks made ahead under spare names, handed out by
//! renaming (see [`crate::NetConfig::spares`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use rtnetlink::Handle;

use crate::network::DenyLists;
use crate::{filter, names, ns, Names, Network, Policy, Result, Transit};

/// A spare network: everything a sandbox's network has but its names and policy (see
/// [`crate::NetConfig::spares`]).
pub(crate) struct Spare {
    pub(crate) names: Names,
    pub(crate) transit: Transit,
    /// Netlink in its namespace.
    pub(crate) nsh: Handle,
    pub(crate) host_index: u32,
    pub(crate) tap_index: u32,
    pub(crate) ns_veth_index: u32,
    /// The deny lists its table holds.
    pub(crate) deny: DenyLists,
    /// A thread waiting inside its namespace to hand it out.
    pub(crate) worker: ns::Parked,
    pub(crate) sockets: filter::Sockets,
    pub(crate) guest_netns: Option<String>,
}

impl Network {
    /// Spare networks ready to hand out now.
    pub fn spares(&self) -> usize {
        self.state.lock().unwrap().spares.len()
    }

    /// Keeps `n` spares from now on (see [`crate::NetConfig::spares`]); spares above that are removed
    /// at once ([`Network::settle`] waits for the kernel to finish with them), missing ones
    /// are made by the next [`Network::refill`].
    pub async fn set_spares(&self, n: usize) {
        self.spare_target.store(n, Ordering::SeqCst);
        let extra: Vec<Spare> = {
            let mut st = self.state.lock().unwrap();
            let keep = st.spares.len().min(n);
            st.spares.split_off(keep)
        };
        for sp in extra {
            self.discard(&sp.names, Some(sp.transit.slot));
        }
        self.spare_wanted.notify_one();
    }

    /// Removes every spare for good, including one a refill is still making (which a process
    /// that exits right after [`Network::set_spares`] would leave behind), and waits until the
    /// kernel is done with them. For a daemon that stops.
    pub async fn drop_spares(&self) {
        self.set_spares(0).await;
        // A refill in flight finishes its spare, finds the target is 0 and discards it.
        drop(self.refill_lock.lock().await);
        self.settle().await;
    }

    /// Makes spare networks, one after the other, until [`crate::NetConfig::spares`] (or
    /// [`Network::set_spares`]) are ready. One refill runs at a time; a second call waits for
    /// it and then finds nothing to do.
    pub async fn refill(&self) -> Result<()> {
        let _g = self.refill_lock.lock().await;
        while self.spares() < self.spare_target.load(Ordering::SeqCst) {
            let sp = self.make_spare().await?;
            let mut st = self.state.lock().unwrap();
            if st.spares.len() < self.spare_target.load(Ordering::SeqCst) {
                st.spares.push(sp);
            } else {
                drop(st);
                self.discard(&sp.names, Some(sp.transit.slot));
            }
        }
        Ok(())
    }

    /// Starts a task that refills the spares ([`Network::refill`]) whenever a create takes one
    /// (or [`Network::set_spares`] asks for more), until the `Network` is dropped.
    pub fn keep_spares(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let (net, wanted) = (Arc::downgrade(self), self.spare_wanted.clone());
        tokio::spawn(async move {
            loop {
                {
                    let Some(net) = net.upgrade() else { return };
                    if let Err(e) = net.refill().await {
                        tracing::warn!(error = %e, "cannot make a spare network");
                    }
                }
                wanted.notified().await;
            }
        })
    }

    /// One spare network, under fresh spare names, rejecting everything.
    async fn make_spare(&self) -> Result<Spare> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let token = names::hash10(&format!(
            "{}/{}/{}/{:?}",
            self.cfg.owner,
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            SystemTime::now()
        ));
        let n = Names::spare(&token);
        let t = self.state.lock().unwrap().pool.alloc()?;
        let alias = names::spare_alias(&token, &self.cfg.owner);
        let made = async {
            let b = self.build(&n, t, &Policy::None, None, alias).await?;
            let up = self.upstream_params(&n, None);
            let sockets = filter::open(&ns::netns_path(&n.netns), up).await?;
            let worker = ns::Parked::start(Some(&ns::netns_path(&n.netns)))?;
            Ok(Spare {
                worker,
                transit: t,
                nsh: b.nsh,
                host_index: b.host_index,
                tap_index: b.tap_index,
                ns_veth_index: b.ns_veth_index,
                deny: b.deny,
                sockets,
                guest_netns: b.guest_netns,
                names: n.clone(),
            })
        };
        match made.await {
            Ok(sp) => Ok(sp),
            Err(e) => {
                self.discard(&n, Some(t.slot));
                Err(e)
            }
        }
    }
}

/// Unmounts a spare network's namespaces (`n`: its names); the kernel takes the rest.
pub(crate) fn unmount_spare(n: &Names) {
    for netns in [&n.netns, &n.guest_netns] {
        if let Err(e) = ns::remove(netns) {
            tracing::warn!(netns, error = %e, "cannot remove a spare network");
        }
    }
}
