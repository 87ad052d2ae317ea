//! The fleet as a gateway sees it: hosts, bookings and placements, kept current by one watch
//! on the fleet's prefix that resumes from the last revision it applied.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use etcd_client::{EventType, GetOptions, KeyValue, WatchOptions};
use tokio::{sync::Notify, task::JoinHandle};

use crate::{
    registrar::chain,
    schema::{counter, decode, Entry},
    Drain, Fleet, FleetError, FleetToken, HostRecord, Placement,
};

/// A consistent view of the fleet at one etcd revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetState {
    /// The etcd revision this view includes every change up to.
    pub revision: i64,
    /// Live hosts (their leases held), by name.
    pub hosts: BTreeMap<String, HostRecord>,
    /// Slots booked per host.
    pub booked: BTreeMap<String, u64>,
    /// Sandbox placements, by sandbox id.
    pub placements: BTreeMap<String, Placement>,
    /// Fleet tokens, by their SHA-256 (hex).
    pub tokens: BTreeMap<String, FleetToken>,
    /// Drained hosts (no new placements), by name.
    pub drained: BTreeMap<String, Drain>,
    /// The elected reconciler's id, while one holds the office.
    pub reconciler: Option<String>,
}

impl FleetState {
    /// Applies one stored key (`None`: deleted) at its revision.
    fn apply(&mut self, fleet: &Fleet, key: &str, value: Option<&[u8]>) {
        let Some(entry) = fleet.keys().parse(key) else {
            return;
        };
        let result = match (entry, value) {
            (Entry::Host(h), Some(v)) => decode(key, v).map(|r| {
                self.hosts.insert(h.to_string(), r);
            }),
            (Entry::Host(h), None) => {
                self.hosts.remove(h);
                Ok(())
            }
            (Entry::Booked(h), Some(v)) => {
                self.booked.insert(h.to_string(), counter(v));
                Ok(())
            }
            (Entry::Booked(h), None) => {
                self.booked.remove(h);
                Ok(())
            }
            (Entry::Placement(id), Some(v)) => decode(key, v).map(|p| {
                self.placements.insert(id.to_string(), p);
            }),
            (Entry::Placement(id), None) => {
                self.placements.remove(id);
                Ok(())
            }
            (Entry::Token(h), Some(v)) => decode(key, v).map(|t| {
                self.tokens.insert(h.to_string(), t);
            }),
            (Entry::Token(h), None) => {
                self.tokens.remove(h);
                Ok(())
            }
            (Entry::Drained(h), Some(v)) => decode(key, v).map(|d| {
                self.drained.insert(h.to_string(), d);
            }),
            (Entry::Drained(h), None) => {
                self.drained.remove(h);
                Ok(())
            }
            (Entry::Leader, v) => {
                self.reconciler = v.map(|id| String::from_utf8_lossy(id).into_owned());
                Ok(())
            }
        };
        if let Err(e) = result {
            tracing::warn!(error = %chain(&e), "ignoring a malformed fleet record");
        }
    }

    /// The slots a host has left for placement: its own count of free slots, less what is
    /// booked through gateways beyond what it already runs.
    pub fn free_slots(&self, host: &str) -> u64 {
        let Some(record) = self.hosts.get(host) else {
            return 0;
        };
        let booked = self.booked.get(host).copied().unwrap_or(0);
        u64::from(record.capacity.slots).saturating_sub(booked)
    }
}

/// The watch-fed view. Reads never touch etcd; the watch task applies every change in
/// revision order and, when its stream breaks (etcd restarted, a member lost), watches again
/// from the revision after the last one applied, so no change is missed or applied twice.
/// Only a compacted history (the revision is gone) makes it read everything afresh.
pub struct FleetCache {
    state: Arc<RwLock<FleetState>>,
    changed: Arc<Notify>,
    task: JoinHandle<()>,
}

impl FleetCache {
    /// Reads the whole fleet and follows it from there.
    pub async fn start(fleet: Fleet) -> Result<FleetCache, FleetError> {
        let state = load(&fleet).await?;
        Ok(FleetCache::resume(fleet, state))
    }

    /// Follows the fleet from `state` (a view taken earlier, at `state.revision`): the changes
    /// since then arrive through the watch, deletions included.
    pub fn resume(fleet: Fleet, state: FleetState) -> FleetCache {
        let state = Arc::new(RwLock::new(state));
        let changed = Arc::new(Notify::new());
        let task = tokio::spawn(follow(fleet, state.clone(), changed.clone()));
        FleetCache {
            state,
            changed,
            task,
        }
    }

    /// The current view.
    pub fn snapshot(&self) -> FleetState {
        self.state.read().expect("fleet state lock").clone()
    }

    /// One placement.
    pub fn placement(&self, sandbox: &str) -> Option<Placement> {
        self.state
            .read()
            .expect("fleet state lock")
            .placements
            .get(sandbox)
            .cloned()
    }

    /// The fleet token whose SHA-256 (hex) is `hash`.
    pub fn token(&self, hash: &str) -> Option<FleetToken> {
        self.state
            .read()
            .expect("fleet state lock")
            .tokens
            .get(hash)
            .cloned()
    }

    /// One live host.
    pub fn host(&self, host: &str) -> Option<HostRecord> {
        self.state
            .read()
            .expect("fleet state lock")
            .hosts
            .get(host)
            .cloned()
    }

    /// Waits until `ready` holds for the view (true) or `timeout` passes (false).
    pub async fn wait_for(&self, timeout: Duration, ready: impl Fn(&FleetState) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            if ready(&self.state.read().expect("fleet state lock")) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }
}

impl Drop for FleetCache {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Everything under the prefix, at one revision.
async fn load(fleet: &Fleet) -> Result<FleetState, FleetError> {
    let got = fleet
        .client()
        .get(fleet.keys().root(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(FleetError::etcd("read the fleet"))?;
    let mut state = FleetState {
        revision: got.header().map(|h| h.revision()).unwrap_or(0),
        ..FleetState::default()
    };
    for kv in got.kvs() {
        apply_kv(&mut state, fleet, kv, false);
    }
    Ok(state)
}

fn apply_kv(state: &mut FleetState, fleet: &Fleet, kv: &KeyValue, deleted: bool) {
    let Ok(key) = kv.key_str() else { return };
    state.apply(fleet, key, (!deleted).then(|| kv.value()));
}

/// Applies the watch's events forever, watching again after any break.
async fn follow(fleet: Fleet, state: Arc<RwLock<FleetState>>, changed: Arc<Notify>) {
    loop {
        let from = state.read().expect("fleet state lock").revision + 1;
        let Err(end) = watch_from(&fleet, &state, &changed, from).await;
        match end {
            WatchEnd::Compacted => {
                tracing::warn!(from, "fleet history compacted; reading it afresh");
                match load(&fleet).await {
                    Ok(fresh) => {
                        *state.write().expect("fleet state lock") = fresh;
                        changed.notify_waiters();
                    }
                    Err(e) => tracing::debug!(error = %chain(&e), "reading the fleet failed"),
                }
            }
            WatchEnd::Broken(e) => {
                tracing::debug!(error = %chain(&e), from, "fleet watch broke; watching again")
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Why a watch ended.
enum WatchEnd {
    /// The revision asked for is compacted away.
    Compacted,
    /// The stream failed or closed.
    Broken(FleetError),
}

async fn watch_from(
    fleet: &Fleet,
    state: &RwLock<FleetState>,
    changed: &Notify,
    from: i64,
) -> Result<std::convert::Infallible, WatchEnd> {
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(from)
        .with_progress_notify();
    let (_watcher, mut stream) = fleet
        .client()
        .watch(fleet.keys().root(), Some(options))
        .await
        .map_err(|e| WatchEnd::Broken(FleetError::etcd("watch the fleet")(e)))?;
    loop {
        let Some(answer) = stream
            .message()
            .await
            .map_err(|e| WatchEnd::Broken(FleetError::etcd("watch the fleet")(e)))?
        else {
            return Err(WatchEnd::Broken(FleetError::WatchEnded("stream closed")));
        };
        if answer.compact_revision() > 0 {
            return Err(WatchEnd::Compacted);
        }
        if answer.canceled() {
            return Err(WatchEnd::Broken(FleetError::WatchEnded("canceled")));
        }
        let mut view = state.write().expect("fleet state lock");
        for event in answer.events() {
            if let Some(kv) = event.kv() {
                apply_kv(
                    &mut view,
                    fleet,
                    kv,
                    event.event_type() == EventType::Delete,
                );
                view.revision = view.revision.max(kv.mod_revision());
            }
        }
        // A progress notification (no events, not the creation answer, sent only once the
        // watch has caught up) says the view is current to its header's revision.
        if answer.events().is_empty() && !answer.created() {
            if let Some(h) = answer.header() {
                view.revision = view.revision.max(h.revision());
            }
        }
        drop(view);
        changed.notify_waiters();
    }
}
