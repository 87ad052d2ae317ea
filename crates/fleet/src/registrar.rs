//! A host in the fleet: its record under a lease it keeps alive, its capacity kept current.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    schema::{check_host_name, counter},
    Capacity, Fleet, FleetError, HostRecord,
};

/// Keeps one host registered: grants a lease, writes the host record under it, renews it every
/// third of its TTL and rewrites the record when the capacity changes. When renewing fails
/// (etcd unreachable, restarted, a member lost) it keeps the same lease as long as etcd still
/// knows it, so an etcd outage changes nothing in the fleet. Only a lease that is gone (the
/// host stayed away past its TTL, and the reconciler may have judged its sandboxes) is
/// replaced: by a new one, the record written again under a new incarnation. Dropping it
/// stops renewing; [`Registrar::leave`] also revokes the lease at once.
pub struct Registrar {
    task: JoinHandle<()>,
    fleet: Fleet,
    lease: watch::Receiver<Option<i64>>,
    incarnation: watch::Receiver<u64>,
}

impl Registrar {
    /// Registers `host` (its capacity replaced by `capacity`'s latest value as it changes)
    /// under a lease of `ttl`. Fails when the first registration fails; later failures are
    /// logged and retried.
    pub async fn start(
        fleet: Fleet,
        mut host: HostRecord,
        ttl: Duration,
        capacity: watch::Receiver<Capacity>,
    ) -> Result<Registrar, FleetError> {
        if !check_host_name(&host.host) {
            return Err(FleetError::BadUrl(host.host));
        }
        host.incarnation = next_incarnation(&fleet, &host.host).await?;
        host.capacity = capacity.borrow().clone();
        let ttl_secs = ttl.as_secs().max(2) as i64;
        let lease = register(&fleet, &host, ttl_secs).await?;
        let (lease_tx, lease_rx) = watch::channel(Some(lease));
        let (incarnation_tx, incarnation) = watch::channel(host.incarnation);
        let task = tokio::spawn(keep(
            fleet.clone(),
            host,
            ttl_secs,
            lease,
            capacity,
            (lease_tx, incarnation_tx),
        ));
        Ok(Registrar {
            task,
            fleet,
            lease: lease_rx,
            incarnation,
        })
    }

    /// The incarnation the host is registered under now (bumped at each registration).
    pub fn incarnation(&self) -> u64 {
        *self.incarnation.borrow()
    }

    /// The incarnation as it changes (what a [`crate::Fence`] checks lost sandboxes against).
    pub fn incarnations(&self) -> watch::Receiver<u64> {
        self.incarnation.clone()
    }

    /// The lease the record lives under now.
    pub fn lease(&self) -> Option<i64> {
        *self.lease.borrow()
    }

    /// Stops renewing and revokes the lease: the host record goes at once.
    pub async fn leave(self) {
        self.task.abort();
        if let Some(lease) = self.lease() {
            if let Err(e) = self.fleet.client().lease_revoke(lease).await {
                tracing::warn!(error = %e, "revoking the fleet lease failed; it expires by itself");
            }
        }
    }
}

impl Drop for Registrar {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Bumps the host's incarnation counter by compare-and-swap: the new value.
async fn next_incarnation(fleet: &Fleet, host: &str) -> Result<u64, FleetError> {
    let key = fleet.keys().incarnation(host);
    let mut client = fleet.client();
    for _ in 0..32 {
        let got = client
            .get(key.clone(), None)
            .await
            .map_err(FleetError::etcd("read incarnation"))?;
        let (current, rev) = got
            .kvs()
            .first()
            .map(|kv| (counter(kv.value()), kv.mod_revision()))
            .unwrap_or((0, 0));
        let next = current + 1;
        let txn = Txn::new()
            .when([Compare::mod_revision(key.clone(), CompareOp::Equal, rev)])
            .and_then([TxnOp::put(key.clone(), next.to_string(), None)]);
        let done = client
            .txn(txn)
            .await
            .map_err(FleetError::etcd("bump incarnation"))?;
        if done.succeeded() {
            return Ok(next);
        }
    }
    Err(FleetError::Contention("bump incarnation"))
}

/// Grants a lease and writes the record under it: the lease.
async fn register(fleet: &Fleet, host: &HostRecord, ttl_secs: i64) -> Result<i64, FleetError> {
    let mut client = fleet.client();
    let lease = client
        .lease_grant(ttl_secs, None)
        .await
        .map_err(FleetError::etcd("grant lease"))?
        .id();
    put(fleet, host, lease).await?;
    Ok(lease)
}

/// Writes the host record under `lease`.
async fn put(fleet: &Fleet, host: &HostRecord, lease: i64) -> Result<(), FleetError> {
    let value = serde_json::to_vec(host).expect("a host record serialises");
    fleet
        .client()
        .put(
            fleet.keys().host(&host.host),
            value,
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .map_err(FleetError::etcd("write host record"))?;
    Ok(())
}

/// Renews the lease and follows the capacity until aborted; after a failure, resumes with
/// the same lease while etcd still holds it, or registers again under a new lease and
/// incarnation once it is gone.
async fn keep(
    fleet: Fleet,
    mut host: HostRecord,
    ttl_secs: i64,
    mut lease: i64,
    mut capacity: watch::Receiver<Capacity>,
    (lease_tx, incarnation_tx): (watch::Sender<Option<i64>>, watch::Sender<u64>),
) {
    let period = Duration::from_millis(ttl_secs as u64 * 1000 / 3);
    loop {
        match renew(&fleet, &mut host, lease, period, &mut capacity).await {
            Ok(()) => return, // the capacity's sender is gone: the daemon is stopping
            Err(e) => tracing::warn!(error = %chain(&e), "renewing the fleet lease failed"),
        }
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            match lease_alive(&fleet, lease).await {
                Ok(true) => break, // etcd came back in time: the same lease, the same record
                Ok(false) => {}
                Err(e) => {
                    tracing::debug!(error = %chain(&e), "etcd unreachable; retrying");
                    continue;
                }
            }
            let _ = lease_tx.send(None);
            tracing::warn!(host = %host.host, "fleet lease expired; registering again");
            let again = async {
                let incarnation = next_incarnation(&fleet, &host.host).await?;
                let mut record = host.clone();
                record.incarnation = incarnation;
                record.capacity = capacity.borrow().clone();
                let lease = register(&fleet, &record, ttl_secs).await?;
                Ok::<_, FleetError>((record, lease))
            };
            match again.await {
                Ok((record, l)) => {
                    host = record;
                    lease = l;
                    let _ = lease_tx.send(Some(l));
                    let _ = incarnation_tx.send(host.incarnation);
                    break;
                }
                Err(e) => tracing::debug!(error = %chain(&e), "registering again failed"),
            }
        }
    }
}

/// Whether etcd still holds `lease` (an error: etcd could not be asked).
pub(crate) async fn lease_alive(fleet: &Fleet, lease: i64) -> Result<bool, FleetError> {
    let answer = fleet
        .client()
        .lease_time_to_live(lease, None)
        .await
        .map_err(FleetError::etcd("read a lease"))?;
    Ok(answer.ttl() > 0)
}

/// Keeps `lease` alive every `period` and rewrites the record on capacity changes, until an
/// error (the lease is gone or etcd unreachable) or the capacity's sender goes away.
async fn renew(
    fleet: &Fleet,
    host: &mut HostRecord,
    lease: i64,
    period: Duration,
    capacity: &mut watch::Receiver<Capacity>,
) -> Result<(), FleetError> {
    let (mut keeper, mut answers) = fleet
        .client()
        .lease_keep_alive(lease)
        .await
        .map_err(FleetError::etcd("keep lease alive"))?;
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                keeper.keep_alive().await.map_err(FleetError::etcd("keep lease alive"))?;
                let answer = tokio::time::timeout(period, answers.message())
                    .await
                    .map_err(|_| FleetError::Unanswered("a keep-alive"))?
                    .map_err(FleetError::etcd("keep lease alive"))?;
                if answer.is_none_or(|a| a.ttl() <= 0) {
                    return Err(FleetError::LeaseLost);
                }
            }
            changed = capacity.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                host.capacity = capacity.borrow_and_update().clone();
                put(fleet, host, lease).await?;
            }
        }
    }
}

/// An error and its causes on one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
