//! Placement: choosing a host for a new sandbox, booking a slot on it by compare-and-swap,
//! and recording which host owns the sandbox.
//!
//! A booking is one transaction over two keys: the host's record must still exist (its lease
//! held) and its booked-slot counter must be exactly as read, or nothing is written. Two
//! gateways booking the last slot of a host at once therefore cannot both succeed: the loser
//! reads the counter again and finds the host full. A drained host (its `drained/<host>` key
//! present, checked in the same transaction) books nothing.

use std::collections::{BTreeMap, BTreeSet};

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use rand::seq::SliceRandom;

use crate::{schema::counter, Fleet, FleetError, FleetState, HostRecord, Placement};

/// How many random candidates each choice compares (power of K choices).
pub const CHOICES: usize = 2;

/// What a sandbox asks of its host.
#[derive(Debug, Clone, Default)]
pub struct Wanted {
    /// Host labels that must all match.
    pub labels: BTreeMap<String, String>,
    /// The backend it must run on, if it names one.
    pub backend: Option<String>,
    /// The zone it must run in, if it names one.
    pub zone: Option<String>,
    /// Guest memory it needs, MiB.
    pub memory_mib: u64,
}

/// The sandbox label prefix that asks for host properties: `fleet.host/<key>=<value>` needs
/// a host labelled `<key>=<value>`, `fleet.host/backend=<b>` one running backend `<b>` and
/// `fleet.host/zone=<z>` one in zone `<z>`.
pub const HOST_SELECTOR: &str = "fleet.host/";

impl Wanted {
    /// What a sandbox with these labels and this much memory asks of its host.
    pub fn for_sandbox(labels: &BTreeMap<String, String>, memory_mib: u64) -> Wanted {
        let mut wanted = Wanted {
            memory_mib,
            ..Wanted::default()
        };
        for (key, value) in labels {
            match key.strip_prefix(HOST_SELECTOR) {
                Some("backend") => wanted.backend = Some(value.clone()),
                Some("zone") => wanted.zone = Some(value.clone()),
                Some(k) => {
                    wanted.labels.insert(k.to_string(), value.clone());
                }
                None => {}
            }
        }
        wanted
    }
}

/// Picks a host for `wanted` among those not `excluded`: `CHOICES` hosts drawn at random from
/// the eligible ones (not drained, labels and backend match, a free slot, enough free memory), the one
/// with most free slots winning (then most free memory). `None` when no host is eligible.
pub fn choose(
    state: &FleetState,
    wanted: &Wanted,
    excluded: &BTreeSet<String>,
) -> Option<HostRecord> {
    let eligible: Vec<&HostRecord> = state
        .hosts
        .values()
        .filter(|h| !excluded.contains(&h.host) && !state.drained.contains_key(&h.host))
        .filter(|h| {
            wanted
                .labels
                .iter()
                .all(|(k, v)| h.labels.get(k) == Some(v))
        })
        .filter(|h| wanted.backend.as_ref().is_none_or(|b| *b == h.backend))
        .filter(|h| wanted.zone.is_none() || wanted.zone == h.zone)
        .filter(|h| h.capacity.free_memory_mib >= wanted.memory_mib)
        .filter(|h| state.free_slots(&h.host) > 0)
        .collect();
    let drawn: Vec<&&HostRecord> = eligible
        .choose_multiple(&mut rand::thread_rng(), CHOICES)
        .collect();
    drawn
        .into_iter()
        .max_by_key(|h| (state.free_slots(&h.host), h.capacity.free_memory_mib))
        .map(|h| (*h).clone())
}

/// A booking's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Booking {
    /// A slot is held on the host (release it if the create fails).
    Booked,
    /// Every slot of the host is booked, it left the fleet or it is drained.
    Full,
}

/// Books one slot on `host` (of `slots`) by compare-and-swap, retrying while other writers
/// win: only while the host is in the fleet and not drained.
pub async fn book(fleet: &Fleet, host: &str, slots: u32) -> Result<Booking, FleetError> {
    let key = fleet.keys().booked(host);
    let host_key = fleet.keys().host(host);
    let drained_key = fleet.keys().drained(host);
    let mut client = fleet.client();
    for _ in 0..64 {
        let (booked, rev) = read_counter(fleet, &key).await?;
        if booked >= u64::from(slots) {
            return Ok(Booking::Full);
        }
        let txn = Txn::new()
            .when([
                Compare::mod_revision(key.clone(), CompareOp::Equal, rev),
                Compare::version(host_key.clone(), CompareOp::Greater, 0),
                Compare::version(drained_key.clone(), CompareOp::Equal, 0),
            ])
            .and_then([TxnOp::put(key.clone(), (booked + 1).to_string(), None)])
            .or_else([
                TxnOp::get(host_key.clone(), None),
                TxnOp::get(drained_key.clone(), None),
            ]);
        let done = client
            .txn(txn)
            .await
            .map_err(FleetError::etcd("book a slot"))?;
        if done.succeeded() {
            return Ok(Booking::Booked);
        }
        if let [host, drained] = found(&done)[..] {
            if !host || drained {
                return Ok(Booking::Full);
            }
        }
    }
    Err(FleetError::Contention("book a slot"))
}

/// Gives back a slot booked on `host`.
pub async fn release(fleet: &Fleet, host: &str) -> Result<(), FleetError> {
    let key = fleet.keys().booked(host);
    let mut client = fleet.client();
    for _ in 0..64 {
        let (booked, rev) = read_counter(fleet, &key).await?;
        if booked == 0 {
            return Ok(());
        }
        let txn = Txn::new()
            .when([Compare::mod_revision(key.clone(), CompareOp::Equal, rev)])
            .and_then([TxnOp::put(key.clone(), (booked - 1).to_string(), None)]);
        if client
            .txn(txn)
            .await
            .map_err(FleetError::etcd("release a slot"))?
            .succeeded()
        {
            return Ok(());
        }
    }
    Err(FleetError::Contention("release a slot"))
}

/// Records that `placement.host` owns `placement.sandbox`, only where no placement of that
/// sandbox exists yet: false when one does.
pub async fn record(fleet: &Fleet, placement: &Placement) -> Result<bool, FleetError> {
    let key = fleet.keys().placement(&placement.sandbox);
    let value = serde_json::to_vec(placement).expect("a placement serialises");
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key, value, None)]);
    Ok(fleet
        .client()
        .txn(txn)
        .await
        .map_err(FleetError::etcd("record a placement"))?
        .succeeded())
}

/// Removes a destroyed sandbox's placement and gives its slot back, in one transaction
/// over both keys (each as read): a placement is never removed without its slot, nor twice.
pub async fn forget(fleet: &Fleet, sandbox: &str) -> Result<(), FleetError> {
    let key = fleet.keys().placement(sandbox);
    let mut client = fleet.client();
    for _ in 0..64 {
        let got = client
            .get(key.clone(), None)
            .await
            .map_err(FleetError::etcd("read a placement"))?;
        let Some(kv) = got.kvs().first() else {
            return Ok(());
        };
        let placement: Placement = crate::schema::decode(&key, kv.value())?;
        let booked_key = fleet.keys().booked(&placement.host);
        let (booked, booked_rev) = read_counter(fleet, &booked_key).await?;
        let txn = Txn::new()
            .when([
                Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision()),
                Compare::mod_revision(booked_key.clone(), CompareOp::Equal, booked_rev),
            ])
            .and_then([
                TxnOp::delete(key.clone(), None),
                TxnOp::put(booked_key, booked.saturating_sub(1).to_string(), None),
            ]);
        if client
            .txn(txn)
            .await
            .map_err(FleetError::etcd("remove a placement"))?
            .succeeded()
        {
            return Ok(());
        }
    }
    Err(FleetError::Contention("remove a placement"))
}

/// A counter's value and its revision (0, 0 when absent).
async fn read_counter(fleet: &Fleet, key: &str) -> Result<(u64, i64), FleetError> {
    let got = fleet
        .client()
        .get(key, None)
        .await
        .map_err(FleetError::etcd("read a slot counter"))?;
    Ok(got
        .kvs()
        .first()
        .map(|kv| (counter(kv.value()), kv.mod_revision()))
        .unwrap_or((0, 0)))
}

/// Whether each of a failed transaction's `or_else` reads found its key.
fn found(done: &etcd_client::TxnResponse) -> Vec<bool> {
    done.op_responses()
        .iter()
        .map(|op| match op {
            etcd_client::TxnOpResponse::Get(g) => !g.kvs().is_empty(),
            _ => false,
        })
        .collect()
}

/// Drains `host`: no gateway books a slot on it from now on; what runs there runs on.
pub async fn drain(fleet: &Fleet, host: &str) -> Result<(), FleetError> {
    let marker = crate::Drain {
        since_ms: crate::schema::now_ms(),
    };
    fleet
        .client()
        .put(
            fleet.keys().drained(host),
            serde_json::to_vec(&marker).expect("a drain marker serialises"),
            None,
        )
        .await
        .map_err(FleetError::etcd("drain a host"))?;
    Ok(())
}

/// Lets `host` take placements again.
pub async fn undrain(fleet: &Fleet, host: &str) -> Result<(), FleetError> {
    fleet
        .client()
        .delete(fleet.keys().drained(host), None)
        .await
        .map_err(FleetError::etcd("undrain a host"))?;
    Ok(())
}
