//! Host loss and operability against a real etcd (Debian's `etcd-server` on loopback, one
//! per case): the reconciler's election, `running → unreachable → lost` on lease expiry, a
//! host returning within the grace period or after, fencing through a fake VM owner, drained
//! hosts, and an etcd outage that must change nothing.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use hutch_fleet::{
    place::{self, Booking, Wanted},
    testing::Etcd,
    Capacity, Fence, Fleet, FleetCache, HostRecord, Placement, PlacementState, Reconciler,
    Registrar, VmOwner,
};
use tokio::sync::watch;

/// How long any change may take to reach a cache.
const SOON: Duration = Duration::from_secs(5);
/// Host leases in these cases (etcd's minimum is about 2 s).
const TTL: Duration = Duration::from_secs(2);

fn capacity() -> Capacity {
    Capacity {
        vcpus: 4,
        memory_mib: 8192,
        free_memory_mib: 8192,
        free_disk_mib: 10_000,
        slots: 8,
        free_slots: 8,
    }
}

fn host(name: &str) -> HostRecord {
    HostRecord {
        host: name.into(),
        advertise: format!("http://{name}:1"),
        zone: None,
        labels: Default::default(),
        backend: "qemu".into(),
        incarnation: 0,
        capacity: capacity(),
    }
}

/// A registered host (the capacity sender keeps it renewing).
async fn join(fleet: &Fleet, name: &str) -> (Registrar, watch::Sender<Capacity>) {
    let (tx, rx) = watch::channel(capacity());
    let registrar = Registrar::start(fleet.clone(), host(name), TTL, rx)
        .await
        .expect("registering a host");
    (registrar, tx)
}

/// Books a slot on `host` and records `sandbox` there, as a gateway does.
async fn place_on(fleet: &Fleet, sandbox: &str, host: &str, incarnation: u64) {
    assert_eq!(place::book(fleet, host, 8).await.unwrap(), Booking::Booked);
    let p = Placement {
        sandbox: sandbox.into(),
        host: host.into(),
        incarnation,
        ..Placement::default()
    };
    assert!(place::record(fleet, &p).await.unwrap());
}

/// A VM owner that records what it was told to stop.
#[derive(Default)]
struct FakeOwner {
    stopped: Mutex<Vec<String>>,
}

impl VmOwner for FakeOwner {
    async fn stop(&self, id: &str) -> Result<(), String> {
        self.stopped.lock().unwrap().push(id.to_string());
        Ok(())
    }
}

async fn setup(case: &str) -> (Etcd, Fleet, Arc<FleetCache>) {
    let etcd = Etcd::start().await;
    let fleet = Fleet::connect_prefixed(&etcd.url(), &format!("/test/{case}/"))
        .await
        .expect("connecting to etcd");
    let cache = Arc::new(FleetCache::start(fleet.clone()).await.unwrap());
    (etcd, fleet, cache)
}

fn reconciler(fleet: &Fleet, cache: &Arc<FleetCache>, id: &str, grace: Duration) -> Reconciler {
    Reconciler::start(fleet.clone(), cache.clone(), id.into(), TTL, grace)
}

/// A fence for `host` at the incarnations `incarnation` gives, over a [`FakeOwner`] the
/// caller can look into.
fn fence(
    fleet: &Fleet,
    cache: &Arc<FleetCache>,
    host: &str,
    incarnation: watch::Receiver<u64>,
) -> (Fence, Arc<FakeOwner>) {
    let owner = Arc::new(FakeOwner::default());
    let fence = Fence::start(
        fleet.clone(),
        cache.clone(),
        host.into(),
        incarnation,
        owner.clone(),
    );
    (fence, owner)
}

fn state_of(cache: &FleetCache, sandbox: &str) -> Option<PlacementState> {
    cache.placement(sandbox).map(|p| p.state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_reconcilers_elect_exactly_one_and_the_other_takes_over() {
    let (_etcd, fleet, cache) = setup("elect").await;
    let a = reconciler(&fleet, &cache, "gw-a", Duration::from_secs(60));
    let b = reconciler(&fleet, &cache, "gw-b", Duration::from_secs(60));
    assert!(
        cache.wait_for(SOON, |s| s.reconciler.is_some()).await,
        "nobody elected"
    );
    // Give the loser several campaign rounds: it must stay a follower.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        a.is_leader() ^ b.is_leader(),
        "a: {}, b: {}",
        a.is_leader(),
        b.is_leader()
    );
    let (leader, follower, follower_id) = if a.is_leader() {
        (a, b, "gw-b")
    } else {
        (b, a, "gw-a")
    };
    assert_ne!(cache.snapshot().reconciler.as_deref(), Some(follower_id));

    // The leader resigns: the other takes the office.
    leader.resign().await;
    assert!(follower.wait_elected(SOON).await, "no takeover");
    assert!(
        cache
            .wait_for(SOON, |s| s.reconciler.as_deref() == Some(follower_id))
            .await
    );

    // A leader that crashes (no resignation) is replaced once its lease lapses.
    let third = reconciler(&fleet, &cache, "gw-c", Duration::from_secs(60));
    drop(follower);
    assert!(
        third.wait_elected(TTL * 4).await,
        "no takeover after a crash"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_host_goes_unreachable_then_lost_and_stops_the_vm_when_it_returns() {
    let (_etcd, fleet, cache) = setup("lost").await;
    let grace = Duration::from_secs(3);
    let _r = reconciler(&fleet, &cache, "gw-a", grace);
    let (h1, _c1) = join(&fleet, "h1").await;
    let (_h2, _c2) = join(&fleet, "h2").await;
    assert_eq!(h1.incarnation(), 1);
    place_on(&fleet, "sb-1", "h1", 1).await;
    place_on(&fleet, "sb-2", "h2", 1).await;

    // Still running while its lease lives.
    tokio::time::sleep(TTL * 2).await;
    assert_eq!(state_of(&cache, "sb-1"), Some(PlacementState::Running));

    // h1 crashes: no renewal, no goodbye.
    drop(h1);
    assert!(
        cache
            .wait_for(TTL * 4, |s| s.placements["sb-1"].state
                == PlacementState::Unreachable)
            .await,
        "{:?}",
        cache.snapshot().placements
    );
    let unreachable = cache.placement("sb-1").unwrap();
    // Then lost, once the grace period has passed, and never placed anywhere else.
    assert!(
        cache
            .wait_for(grace * 3, |s| s.placements["sb-1"].state
                == PlacementState::Lost)
            .await
    );
    let lost = cache.placement("sb-1").unwrap();
    assert!(
        lost.since_ms.unwrap() - unreachable.since_ms.unwrap() >= grace.as_millis() as u64,
        "lost before the grace period was over: {unreachable:?} → {lost:?}"
    );
    assert_eq!((lost.host.as_str(), lost.incarnation), ("h1", 1));
    // The other host's sandbox is untouched.
    assert_eq!(state_of(&cache, "sb-2"), Some(PlacementState::Running));
    assert_eq!(cache.snapshot().placements.len(), 2);

    // h1 comes back (a new incarnation): its fence stops the lost VM and frees the slot.
    let (back, _c1) = join(&fleet, "h1").await;
    assert_eq!(back.incarnation(), 2);
    let (_fence, owner) = fence(&fleet, &cache, "h1", back.incarnations());
    assert!(
        cache
            .wait_for(SOON, |s| !s.placements.contains_key("sb-1")
                && s.booked.get("h1") == Some(&0))
            .await,
        "{:?}",
        cache.snapshot()
    );
    assert_eq!(*owner.stopped.lock().unwrap(), ["sb-1"]);
    // h2's own fence has nothing to stop.
    let (_tx, rx) = watch::channel(5);
    let (_fence2, other) = fence(&fleet, &cache, "h2", rx);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(other.stopped.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_back_within_the_grace_period_gets_its_sandboxes_back_as_running() {
    let (_etcd, fleet, cache) = setup("back").await;
    let _r = reconciler(&fleet, &cache, "gw-a", Duration::from_secs(30));
    let (h1, _c1) = join(&fleet, "h1").await;
    place_on(&fleet, "sb-1", "h1", h1.incarnation()).await;
    drop(h1);
    assert!(
        cache
            .wait_for(TTL * 4, |s| s.placements["sb-1"].state
                == PlacementState::Unreachable)
            .await
    );

    let (back, _c1) = join(&fleet, "h1").await;
    let (_fence, owner) = fence(&fleet, &cache, "h1", back.incarnations());
    assert!(
        cache
            .wait_for(SOON, |s| s.placements["sb-1"].state
                == PlacementState::Running)
            .await
    );
    let p = cache.placement("sb-1").unwrap();
    assert_eq!((p.incarnation, p.since_ms), (back.incarnation(), None));
    // Nothing is stopped, and it stays running.
    tokio::time::sleep(TTL * 2).await;
    assert!(owner.stopped.lock().unwrap().is_empty());
    assert_eq!(state_of(&cache, "sb-1"), Some(PlacementState::Running));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_host_receives_no_placement_until_undrained() {
    let (_etcd, fleet, cache) = setup("drain").await;
    let (_h1, _c1) = join(&fleet, "h1").await;
    let (_h2, _c2) = join(&fleet, "h2").await;
    place_on(&fleet, "sb-old", "h1", 1).await;
    place::drain(&fleet, "h1").await.unwrap();
    assert!(
        cache
            .wait_for(SOON, |s| s.hosts.len() == 2 && s.drained.contains_key("h1"))
            .await
    );

    let wanted = Wanted::default();
    for _ in 0..6 {
        let chosen = place::choose(&cache.snapshot(), &wanted, &BTreeSet::new()).unwrap();
        assert_eq!(chosen.host, "h2");
    }
    // Even a gateway whose cache has not seen the drain yet cannot book there.
    assert_eq!(place::book(&fleet, "h1", 8).await.unwrap(), Booking::Full);
    // What runs there runs on.
    assert_eq!(state_of(&cache, "sb-old"), Some(PlacementState::Running));

    place::undrain(&fleet, "h1").await.unwrap();
    assert!(cache.wait_for(SOON, |s| s.drained.is_empty()).await);
    assert_eq!(place::book(&fleet, "h1", 8).await.unwrap(), Booking::Booked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_outage_is_not_host_loss() {
    let (mut etcd, fleet, cache) = setup("outage").await;
    let grace = Duration::from_secs(2);
    let reconciler = reconciler(&fleet, &cache, "gw-a", grace);
    let (h1, _c1) = join(&fleet, "h1").await;
    place_on(&fleet, "sb-1", "h1", 1).await;
    assert!(reconciler.wait_elected(SOON).await);
    let before = cache.snapshot();

    // etcd goes away for longer than the host's lease and the grace period together.
    etcd.kill().await;
    tokio::time::sleep(TTL * 3).await;
    etcd.restart().await;
    // Everyone reconnects and keeps going: give leases, sweeps and the grace time to act.
    tokio::time::sleep(TTL * 3 + grace).await;
    let after = cache.snapshot();
    assert_eq!(after.placements, before.placements);
    assert_eq!(after.hosts["h1"].incarnation, 1);
    assert_eq!(h1.incarnation(), 1, "the host registered again");
    assert!(
        reconciler.wait_elected(SOON).await,
        "the office was not taken back"
    );
}

/// A VM owner whose first stop fails.
#[derive(Default)]
struct FlakyOwner {
    calls: Mutex<u32>,
}

impl VmOwner for FlakyOwner {
    async fn stop(&self, _id: &str) -> Result<(), String> {
        let mut calls = self.calls.lock().unwrap();
        *calls += 1;
        if *calls == 1 {
            Err("the VMM did not answer".into())
        } else {
            Ok(())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_stop_keeps_the_lost_placement_and_is_retried_later_not_at_once() {
    let (_etcd, fleet, cache) = setup("retry").await;
    // h1 is away (never registered here); its sandbox was marked lost.
    let lost = Placement {
        sandbox: "sb-1".into(),
        host: "h1".into(),
        incarnation: 1,
        state: PlacementState::Lost,
        since_ms: Some(1),
        ..Placement::default()
    };
    fleet
        .client()
        .put(
            fleet.keys().placement("sb-1"),
            serde_json::to_vec(&lost).unwrap(),
            None,
        )
        .await
        .unwrap();
    assert!(
        cache
            .wait_for(SOON, |s| s
                .placements
                .get("sb-1")
                .is_some_and(|p| p.state == PlacementState::Lost))
            .await
    );
    let owner = Arc::new(FlakyOwner::default());
    let (_tx, rx) = watch::channel(2);
    let _fence = Fence::start(fleet.clone(), cache.clone(), "h1".into(), rx, owner.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(*owner.calls.lock().unwrap(), 1, "retried at once");
    assert_eq!(state_of(&cache, "sb-1"), Some(PlacementState::Lost));
    assert!(
        cache
            .wait_for(Duration::from_secs(10), |s| s.placements.is_empty())
            .await
    );
    assert_eq!(*owner.calls.lock().unwrap(), 2);
}
