//! The fleet against a real etcd (Debian's `etcd-server`, started by each case on loopback
//! ports with its own data directory): registration under a lease, lease expiry, slot booking
//! by compare-and-swap under contention, and the cache resuming from a revision.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use hutch_fleet::{
    place::{self, Booking, Wanted},
    testing::Etcd,
    Capacity, Fleet, FleetCache, HostRecord, Placement, Registrar,
};
use tokio::sync::watch;

/// How long any change may take to reach a cache.
const SOON: Duration = Duration::from_secs(5);

fn host(name: &str, slots: u32) -> HostRecord {
    HostRecord {
        host: name.into(),
        advertise: format!("http://{name}"),
        zone: None,
        labels: [("pool".to_string(), "a".to_string())].into(),
        backend: "qemu".into(),
        incarnation: 0,
        capacity: capacity(slots),
    }
}

fn capacity(slots: u32) -> Capacity {
    Capacity {
        vcpus: 4,
        memory_mib: 8192,
        free_memory_mib: 8192,
        free_disk_mib: 10_000,
        slots,
        free_slots: slots,
    }
}

async fn connect(etcd: &Etcd, case: &str) -> Fleet {
    Fleet::connect_prefixed(&etcd.url(), &format!("/test/{case}/"))
        .await
        .expect("connecting to etcd")
}

#[tokio::test]
async fn a_host_is_listed_while_its_lease_lives_and_gone_when_it_lapses() {
    let etcd = Etcd::start().await;
    let fleet = connect(&etcd, "lease").await;
    let cache = FleetCache::start(fleet.clone()).await.unwrap();
    let (cap_tx, cap_rx) = watch::channel(capacity(4));

    let first = Registrar::start(
        fleet.clone(),
        host("h1", 4),
        Duration::from_secs(2),
        cap_rx.clone(),
    )
    .await
    .unwrap();
    assert_eq!(first.incarnation(), 1);
    assert!(
        cache
            .wait_for(SOON, |s| s
                .hosts
                .get("h1")
                .is_some_and(|h| h.incarnation == 1))
            .await
    );

    // The capacity the daemon reports reaches the record.
    cap_tx
        .send(Capacity {
            free_slots: 1,
            ..capacity(4)
        })
        .unwrap();
    assert!(
        cache
            .wait_for(SOON, |s| s.hosts["h1"].capacity.free_slots == 1)
            .await,
        "capacity not refreshed: {:?}",
        cache.snapshot().hosts
    );
    // Renewed beyond its TTL: still there after three TTLs.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        cache.snapshot().hosts.contains_key("h1"),
        "lease not kept alive"
    );

    // A crash (no renewal, no revoke): gone once the lease lapses, not before.
    drop(first);
    assert!(cache.snapshot().hosts.contains_key("h1"));
    let started = tokio::time::Instant::now();
    assert!(
        cache
            .wait_for(Duration::from_secs(8), |s| !s.hosts.contains_key("h1"))
            .await
    );
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "removed before its lease lapsed"
    );

    // The next start is a new incarnation; leaving removes the record at once.
    let second = Registrar::start(
        fleet.clone(),
        host("h1", 4),
        Duration::from_secs(30),
        cap_rx,
    )
    .await
    .unwrap();
    assert_eq!(second.incarnation(), 2);
    assert!(
        cache
            .wait_for(SOON, |s| s
                .hosts
                .get("h1")
                .is_some_and(|h| h.incarnation == 2))
            .await
    );
    second.leave().await;
    assert!(
        cache
            .wait_for(Duration::from_secs(2), |s| !s.hosts.contains_key("h1"))
            .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_bookings_for_ten_slots_book_exactly_ten() {
    let etcd = Etcd::start().await;
    let fleet = connect(&etcd, "cas").await;
    let cache = Arc::new(FleetCache::start(fleet.clone()).await.unwrap());
    let mut registrars = Vec::new();
    for name in ["h1", "h2"] {
        let (_tx, rx) = watch::channel(capacity(5));
        let record = host(name, 5);
        registrars.push((
            Registrar::start(fleet.clone(), record, Duration::from_secs(30), rx)
                .await
                .unwrap(),
            _tx,
        ));
    }
    assert!(cache.wait_for(SOON, |s| s.hosts.len() == 2).await);

    // Each attempt places as a gateway does: choose, book, on "full" exclude and go on. Two
    // separate clients stand for two gateways.
    let second = connect(&etcd, "cas").await;
    let attempts = (0..20).map(|i| {
        let fleet = if i % 2 == 0 {
            fleet.clone()
        } else {
            second.clone()
        };
        let cache = cache.clone();
        tokio::spawn(async move {
            let mut excluded = BTreeSet::new();
            let wanted = Wanted {
                labels: [("pool".to_string(), "a".to_string())].into(),
                ..Wanted::default()
            };
            while let Some(h) = place::choose(&cache.snapshot(), &wanted, &excluded) {
                match place::book(&fleet, &h.host, h.capacity.slots)
                    .await
                    .unwrap()
                {
                    Booking::Booked => return Some(h.host),
                    Booking::Full => {
                        excluded.insert(h.host);
                    }
                }
            }
            None
        })
    });
    let mut booked = Vec::new();
    for attempt in attempts.collect::<Vec<_>>() {
        booked.extend(attempt.await.expect("a booking task"));
    }
    assert_eq!(booked.len(), 10, "{booked:?}");
    for name in ["h1", "h2"] {
        assert_eq!(
            booked.iter().filter(|h| *h == name).count(),
            5,
            "{booked:?}"
        );
    }
    assert!(
        cache
            .wait_for(SOON, |s| s.booked.get("h1") == Some(&5)
                && s.booked.get("h2") == Some(&5))
            .await
    );
    assert_eq!(place::book(&fleet, "h1", 5).await.unwrap(), Booking::Full);

    // A placement is written once; forgetting it frees its slot exactly once.
    let placement = Placement {
        sandbox: "sb-1".into(),
        host: "h1".into(),
        incarnation: 1,
        ..Placement::default()
    };
    assert!(place::record(&fleet, &placement).await.unwrap());
    assert!(!place::record(
        &fleet,
        &Placement {
            host: "h2".into(),
            ..placement.clone()
        }
    )
    .await
    .unwrap());
    place::forget(&fleet, "sb-1").await.unwrap();
    place::forget(&fleet, "sb-1").await.unwrap();
    assert!(
        cache
            .wait_for(SOON, |s| s.booked.get("h1") == Some(&4)
                && s.placements.is_empty())
            .await
    );

    // A host that left cannot be booked.
    registrars.remove(0).0.leave().await;
    assert_eq!(place::book(&fleet, "h1", 5).await.unwrap(), Booking::Full);
}

#[tokio::test]
async fn a_cache_resumes_from_its_revision_and_across_an_etcd_restart() {
    let mut etcd = Etcd::start().await;
    let fleet = connect(&etcd, "resume").await;
    let p = |id: &str, host: &str| Placement {
        sandbox: id.into(),
        host: host.into(),
        incarnation: 1,
        ..Placement::default()
    };
    assert!(place::record(&fleet, &p("sb-old", "h1")).await.unwrap());
    let earlier = FleetCache::start(fleet.clone()).await.unwrap().snapshot();
    assert!(earlier.placements.contains_key("sb-old"));

    // Changes while no cache follows: one added, one removed.
    assert!(place::record(&fleet, &p("sb-new", "h2")).await.unwrap());
    fleet
        .client()
        .delete(fleet.keys().placement("sb-old"), None)
        .await
        .unwrap();

    // Resumed from the earlier view's revision, the watch delivers both, deletion included.
    let cache = FleetCache::resume(fleet.clone(), earlier.clone());
    assert!(
        cache
            .wait_for(SOON, |s| s.placements.keys().eq(["sb-new"]))
            .await,
        "{:?}",
        cache.snapshot().placements
    );
    assert!(cache.snapshot().revision > earlier.revision);

    // etcd crashes and comes back on the same data: the watch picks up where it stopped.
    etcd.kill().await;
    etcd.restart().await;
    assert!(place::record(&fleet, &p("sb-after", "h1")).await.unwrap());
    assert!(
        cache
            .wait_for(Duration::from_secs(15), |s| s
                .placements
                .contains_key("sb-after"))
            .await,
        "{:?}",
        cache.snapshot().placements
    );
    let fresh = FleetCache::start(fleet.clone()).await.unwrap().snapshot();
    assert_eq!(cache.snapshot().placements, fresh.placements);
}
