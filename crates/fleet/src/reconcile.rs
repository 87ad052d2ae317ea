//! Host loss, made explicit: the elected reconciler and the placement state machine.
//!
//! ```text
//!            host's lease expires               grace period passes
//!  running ───────────────────────▶ unreachable ───────────────────▶ lost
//!     ▲                                  │                             │ host returns
//!     └──────── host returns ────────────┘                             ▼ (newer incarnation)
//!       (placement takes the host's new incarnation)         the host stops the VM and
//!                                                            removes the placement ([`crate::Fence`])
//! ```
//!
//! A sandbox is never recreated elsewhere: an agent's half-done work would run twice. Exactly
//! one [`Reconciler`] in the fleet acts (whoever holds `reconciler/leader` under its lease;
//! gateways and hosts all campaign), and each of its moves is one transaction that holds only
//! while it still holds the office, the placement is as it read it and the host's record is
//! as it read it (present or absent). An etcd outage moves nothing: no lease expires while
//! etcd is down (it renews every lease's TTL when a leader is elected again), and nothing can
//! be written either.

use std::{sync::Arc, time::Duration};

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    registrar::chain,
    schema::{decode, now_ms},
    Fleet, FleetCache, FleetError, HostRecord, Placement, PlacementState,
};

/// How often the leader looks over the placements (and so how much later than the grace
/// period a move may come).
const SWEEP: Duration = Duration::from_millis(250);
/// How often a member that does not hold the office tries for it.
const CAMPAIGN: Duration = Duration::from_millis(500);

/// The next state of `placement`, given its host's record (`None`: the host's lease is gone)
/// at `now_ms`; `None` when it stays as it is.
///
/// - `running`, host gone → `unreachable` since now;
/// - `unreachable` for `grace` or longer, host still gone → `lost` since now;
/// - `running` or `unreachable`, host present at another incarnation or `unreachable` with
///   the host back → `running` at the host's incarnation (a restarted host adopts its VMs);
/// - `lost` stays `lost`: only its host acts on it, by stopping the VM.
pub fn next(
    placement: &Placement,
    host: Option<&HostRecord>,
    now_ms: u64,
    grace: Duration,
) -> Option<Placement> {
    let moved = |state, since_ms, incarnation| Placement {
        state,
        since_ms,
        incarnation,
        ..placement.clone()
    };
    match (placement.state, host) {
        (PlacementState::Lost, _) => None,
        (PlacementState::Running, Some(h)) if h.incarnation == placement.incarnation => None,
        (PlacementState::Running | PlacementState::Unreachable, Some(h)) => {
            Some(moved(PlacementState::Running, None, h.incarnation))
        }
        (PlacementState::Running, None) => Some(moved(
            PlacementState::Unreachable,
            Some(now_ms),
            placement.incarnation,
        )),
        (PlacementState::Unreachable, None) => {
            let since = placement.since_ms.unwrap_or(0);
            (now_ms.saturating_sub(since) >= grace.as_millis() as u64)
                .then(|| moved(PlacementState::Lost, Some(now_ms), placement.incarnation))
        }
    }
}

/// One member's candidacy for the reconciler's office, and the reconciling while it holds it.
/// Dropping it stops both (the office lapses with its lease); [`Reconciler::resign`] hands
/// it over at once.
pub struct Reconciler {
    task: JoinHandle<()>,
    fleet: Fleet,
    leading: watch::Receiver<Option<i64>>,
}

impl Reconciler {
    /// Campaigns as `id` (unique in the fleet) with an office lease of `ttl`; while elected,
    /// moves placements after host loss, `lost` after `grace`.
    pub fn start(
        fleet: Fleet,
        cache: Arc<FleetCache>,
        id: String,
        ttl: Duration,
        grace: Duration,
    ) -> Reconciler {
        let (tx, leading) = watch::channel(None);
        let ttl_secs = ttl.as_secs().max(2) as i64;
        let task = tokio::spawn(serve(fleet.clone(), cache, id, ttl_secs, grace, tx));
        Reconciler {
            task,
            fleet,
            leading,
        }
    }

    /// Whether this member holds the office now.
    pub fn is_leader(&self) -> bool {
        self.leading.borrow().is_some()
    }

    /// Waits until this member holds the office (true) or `timeout` passes (false).
    pub async fn wait_elected(&self, timeout: Duration) -> bool {
        let mut leading = self.leading.clone();
        tokio::time::timeout(timeout, leading.wait_for(Option::is_some))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Stops campaigning and gives the office up at once (another member takes it within
    /// its campaign period).
    pub async fn resign(self) {
        self.task.abort();
        let lease = *self.leading.borrow();
        if let Some(lease) = lease {
            if let Err(e) = self.fleet.client().lease_revoke(lease).await {
                tracing::warn!(error = %e, "giving up the reconciler's office failed; it lapses");
            }
        }
    }
}

impl Drop for Reconciler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Campaigns, and reconciles while elected, forever.
async fn serve(
    fleet: Fleet,
    cache: Arc<FleetCache>,
    id: String,
    ttl_secs: i64,
    grace: Duration,
    leading: watch::Sender<Option<i64>>,
) {
    loop {
        match campaign(&fleet, &id, ttl_secs).await {
            Ok(Some(lease)) => {
                tracing::info!(%id, "elected the fleet's reconciler");
                let _ = leading.send(Some(lease));
                let end = lead(&fleet, &cache, lease, ttl_secs, grace).await;
                let _ = leading.send(None);
                tracing::warn!(%id, error = %chain(&end), "no longer the fleet's reconciler");
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %chain(&e), "campaigning failed"),
        }
        tokio::time::sleep(CAMPAIGN).await;
    }
}

/// Takes the office when it is vacant (or still held by `id` under an older lease, after
/// etcd came back): the lease holding it, or `None` when another member holds it.
async fn campaign(fleet: &Fleet, id: &str, ttl_secs: i64) -> Result<Option<i64>, FleetError> {
    let key = fleet.keys().leader();
    let mut client = fleet.client();
    let holder = client
        .get(key.clone(), None)
        .await
        .map_err(FleetError::etcd("read the reconciler's office"))?;
    let vacant = match holder.kvs().first() {
        None => true,
        Some(kv) if kv.value() == id.as_bytes() => false,
        Some(_) => return Ok(None),
    };
    let lease = client
        .lease_grant(ttl_secs, None)
        .await
        .map_err(FleetError::etcd("grant the office's lease"))?
        .id();
    let condition = if vacant {
        Compare::create_revision(key.clone(), CompareOp::Equal, 0)
    } else {
        Compare::value(key.clone(), CompareOp::Equal, id)
    };
    let txn = Txn::new().when([condition]).and_then([TxnOp::put(
        key,
        id,
        Some(PutOptions::new().with_lease(lease)),
    )]);
    let won = client
        .txn(txn)
        .await
        .map_err(FleetError::etcd("take the reconciler's office"))?
        .succeeded();
    if won {
        return Ok(Some(lease));
    }
    if let Err(e) = client.lease_revoke(lease).await {
        tracing::debug!(error = %e, "revoking an unused lease failed; it lapses");
    }
    Ok(None)
}

/// Keeps the office's lease alive and sweeps the placements until the lease is lost.
async fn lead(
    fleet: &Fleet,
    cache: &FleetCache,
    lease: i64,
    ttl_secs: i64,
    grace: Duration,
) -> FleetError {
    let run = async {
        let (mut keeper, mut answers) = fleet
            .client()
            .lease_keep_alive(lease)
            .await
            .map_err(FleetError::etcd("keep the office's lease alive"))?;
        let period = Duration::from_millis(ttl_secs as u64 * 1000 / 3);
        let mut renew = tokio::time::interval(period);
        let mut sweeping = tokio::time::interval(SWEEP);
        loop {
            tokio::select! {
                _ = renew.tick() => {
                    keeper.keep_alive().await.map_err(FleetError::etcd("keep the office's lease alive"))?;
                    let answer = tokio::time::timeout(period, answers.message())
                        .await
                        .map_err(|_| FleetError::Unanswered("a keep-alive"))?
                        .map_err(FleetError::etcd("keep the office's lease alive"))?;
                    if answer.is_none_or(|a| a.ttl() <= 0) {
                        return Err(FleetError::LeaseLost);
                    }
                }
                _ = sweeping.tick() => sweep(fleet, cache, lease, grace).await?,
            }
        }
    };
    let result: Result<std::convert::Infallible, FleetError> = run.await;
    let Err(e) = result;
    e
}

/// Moves every placement whose host's presence calls for it.
async fn sweep(
    fleet: &Fleet,
    cache: &FleetCache,
    lease: i64,
    grace: Duration,
) -> Result<(), FleetError> {
    let view = cache.snapshot();
    let now = now_ms();
    for placement in view.placements.values() {
        if next(placement, view.hosts.get(&placement.host), now, grace).is_some() {
            apply(fleet, &placement.sandbox, lease, grace).await?;
        }
    }
    Ok(())
}

/// Reads one placement and its host afresh and moves it if it still should, in a
/// transaction that holds only while this member holds the office (`lease`) and both keys
/// are as read.
async fn apply(
    fleet: &Fleet,
    sandbox: &str,
    lease: i64,
    grace: Duration,
) -> Result<(), FleetError> {
    let mut client = fleet.client();
    let key = fleet.keys().placement(sandbox);
    let got = client
        .get(key.clone(), None)
        .await
        .map_err(FleetError::etcd("read a placement"))?;
    let Some(kv) = got.kvs().first() else {
        return Ok(());
    };
    let placement: Placement = decode(&key, kv.value())?;
    let host_key = fleet.keys().host(&placement.host);
    let got = client
        .get(host_key.clone(), None)
        .await
        .map_err(FleetError::etcd("read a host"))?;
    let host = match got.kvs().first() {
        Some(h) => Some((
            decode::<HostRecord>(&host_key, h.value())?,
            h.mod_revision(),
        )),
        None => None,
    };
    let Some(moved) = next(&placement, host.as_ref().map(|(h, _)| h), now_ms(), grace) else {
        return Ok(());
    };
    let host_as_read = match &host {
        Some((_, rev)) => Compare::mod_revision(host_key, CompareOp::Equal, *rev),
        None => Compare::version(host_key, CompareOp::Equal, 0),
    };
    let txn = Txn::new()
        .when([
            Compare::lease(fleet.keys().leader(), CompareOp::Equal, lease),
            Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision()),
            host_as_read,
        ])
        .and_then([TxnOp::put(
            key,
            serde_json::to_vec(&moved).expect("a placement serialises"),
            None,
        )]);
    let done = client
        .txn(txn)
        .await
        .map_err(FleetError::etcd("move a placement"))?;
    if done.succeeded() {
        tracing::warn!(
            sandbox,
            host = %moved.host,
            from = placement.state.name(),
            to = moved.state.name(),
            "sandbox placement moved"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(60);

    fn placement(state: PlacementState, incarnation: u64, since_ms: Option<u64>) -> Placement {
        Placement {
            sandbox: "sb-1".into(),
            host: "h1".into(),
            incarnation,
            state,
            since_ms,
            ..Placement::default()
        }
    }

    fn host(incarnation: u64) -> HostRecord {
        HostRecord {
            host: "h1".into(),
            advertise: "http://h1:1".into(),
            zone: None,
            labels: Default::default(),
            backend: "qemu".into(),
            incarnation,
            capacity: Default::default(),
        }
    }

    #[test]
    fn a_running_sandbox_stays_while_its_host_holds_its_lease() {
        let p = placement(PlacementState::Running, 3, None);
        assert_eq!(next(&p, Some(&host(3)), 1_000, GRACE), None);
    }

    #[test]
    fn a_vanished_host_makes_its_sandboxes_unreachable_then_lost_after_the_grace() {
        let p = placement(PlacementState::Running, 3, None);
        let unreachable = next(&p, None, 1_000, GRACE).unwrap();
        assert_eq!(
            (
                unreachable.state,
                unreachable.since_ms,
                unreachable.incarnation
            ),
            (PlacementState::Unreachable, Some(1_000), 3)
        );
        // Not before the grace period is over, even on many sweeps.
        assert_eq!(next(&unreachable, None, 60_999, GRACE), None);
        let lost = next(&unreachable, None, 61_000, GRACE).unwrap();
        assert_eq!(
            (lost.state, lost.since_ms, lost.incarnation),
            (PlacementState::Lost, Some(61_000), 3)
        );
        // Lost is final as far as the reconciler goes, host back or not.
        assert_eq!(next(&lost, None, 1_000_000, GRACE), None);
        assert_eq!(next(&lost, Some(&host(4)), 1_000_000, GRACE), None);
    }

    #[test]
    fn a_host_back_within_the_grace_gets_its_sandboxes_back_at_its_new_incarnation() {
        let unreachable = placement(PlacementState::Unreachable, 3, Some(1_000));
        let back = next(&unreachable, Some(&host(4)), 30_000, GRACE).unwrap();
        assert_eq!(
            (back.state, back.since_ms, back.incarnation),
            (PlacementState::Running, None, 4)
        );
        // Its record as a whole is kept (labels, shape), only the state moves.
        assert_eq!(back.sandbox, unreachable.sandbox);
    }

    #[test]
    fn a_host_restarted_within_its_lease_adopts_its_running_sandboxes() {
        let p = placement(PlacementState::Running, 3, None);
        let adopted = next(&p, Some(&host(5)), 1_000, GRACE).unwrap();
        assert_eq!(
            (adopted.state, adopted.incarnation),
            (PlacementState::Running, 5)
        );
    }

    #[test]
    fn placements_of_the_first_slice_read_as_running() {
        let old = br#"{"sandbox":"sb-1","host":"h1","incarnation":2,"labels":{}}"#;
        let p: Placement = decode("k", old).unwrap();
        assert_eq!((p.state, p.since_ms), (PlacementState::Running, None));
    }
}
