//! What the broker did with each sandbox's secrets: a bounded ring per sandbox that the broker
//! appends to and `hutch secret log` reads, and a broadcast for whoever keeps a durable record
//! (the audit journal).

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
};

use hutch_types::BrokerEvent;
use tokio::sync::broadcast;

/// Events kept per sandbox; the oldest go first.
pub const EVENTS_PER_SANDBOX: usize = 1000;

/// The broker's record of every substitution, refusal, violation and scrub, by sandbox. The
/// broker gets a clone of the `Arc` that holds it ([`SecretStore::log`](super::SecretStore::log)).
pub struct BrokerLog {
    rings: Mutex<HashMap<String, VecDeque<BrokerEvent>>>,
    feed: broadcast::Sender<BrokerEvent>,
}

impl Default for BrokerLog {
    fn default() -> Self {
        BrokerLog {
            rings: Mutex::new(HashMap::new()),
            feed: broadcast::channel(1024).0,
        }
    }
}

impl std::fmt::Debug for BrokerLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerLog").finish_non_exhaustive()
    }
}

impl BrokerLog {
    /// Appends `event` to its sandbox's ring (dropping the oldest past
    /// [`EVENTS_PER_SANDBOX`]) and sends it to every subscriber. Never blocks.
    pub fn record(&self, event: BrokerEvent) {
        {
            let mut rings = self.rings.lock().expect("broker log lock");
            let ring = rings.entry(event.sandbox_id.clone()).or_default();
            if ring.len() == EVENTS_PER_SANDBOX {
                ring.pop_front();
            }
            ring.push_back(event.clone());
        }
        // No subscriber is fine.
        let _ = self.feed.send(event);
    }

    /// The sandbox's recent events, oldest first.
    pub fn events(&self, sandbox_id: &str) -> Vec<BrokerEvent> {
        let rings = self.rings.lock().expect("broker log lock");
        rings
            .get(sandbox_id)
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Every event recorded from now on (a slow subscriber loses the oldest, and is told).
    pub fn subscribe(&self) -> broadcast::Receiver<BrokerEvent> {
        self.feed.subscribe()
    }

    /// Drops a destroyed sandbox's ring.
    pub fn forget(&self, sandbox_id: &str) {
        self.rings
            .lock()
            .expect("broker log lock")
            .remove(sandbox_id);
    }
}

#[cfg(test)]
mod tests {
    use hutch_types::BrokerDecision;

    use super::*;

    fn event(sandbox: &str, n: usize) -> BrokerEvent {
        BrokerEvent {
            time: format!("t{n}"),
            sandbox_id: sandbox.into(),
            secret: "key".into(),
            host: "api.example.test".into(),
            port: 443,
            method: Some("POST".into()),
            path: Some("/v1/x".into()),
            decision: BrokerDecision::Substituted,
            reason: None,
        }
    }

    #[test]
    fn rings_are_per_sandbox_bounded_and_fed_to_subscribers() {
        let log = BrokerLog::default();
        let mut feed = log.subscribe();
        for n in 0..EVENTS_PER_SANDBOX + 5 {
            log.record(event("sb-a", n));
        }
        log.record(event("sb-b", 0));
        let a = log.events("sb-a");
        assert_eq!(a.len(), EVENTS_PER_SANDBOX);
        assert_eq!(a[0].time, "t5");
        assert_eq!(log.events("sb-b").len(), 1);
        assert_eq!(feed.try_recv().unwrap().time, "t0");
        log.forget("sb-a");
        assert!(log.events("sb-a").is_empty());
    }
}
