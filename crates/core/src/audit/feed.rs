//! What the guest sets off, into its sandbox's journal: network decisions and DNS answers (the
//! network's event sink), the secret broker's decisions and workload identity tokens.
//!
//! The guest is hostile and can set these off as fast as it likes, so the feed is bounded
//! twice before anything is written: a token bucket per sandbox, and one queue of fixed size
//! to the task that appends. What either leaves out is counted per sandbox and written as one
//! `journal.suppressed` record with the count (at most one per sandbox per
//! [`SUMMARY_EVERY`]); neither memory nor the journal grows with the flood.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use hutch_journal::{attr, Event};
use hutch_net::{EventSink, FlowEvent, Proto, RuleName, Verdict};
use hutch_types::{BrokerDecision, BrokerEvent};
use tokio::sync::mpsc;

use super::Journals;
use crate::Manager;

/// The kind of the record counting events left out.
pub const SUPPRESSED: &str = "journal.suppressed";

/// How often counts of events left out are written.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(1);

/// How much of the guest's events a sandbox's journal takes.
#[derive(Debug, Clone, Copy)]
pub struct FeedLimits {
    /// Events per second per sandbox, sustained.
    pub rate_per_s: u32,
    /// Events per sandbox in a burst.
    pub burst: u32,
    /// Events waiting to be appended, all sandboxes together.
    pub queue: usize,
}

impl Default for FeedLimits {
    fn default() -> FeedLimits {
        FeedLimits {
            rate_per_s: 100,
            burst: 500,
            queue: 4096,
        }
    }
}

/// One sandbox's token bucket and the count of what it left out since the last summary.
struct Bucket {
    tokens: f64,
    last: Instant,
    suppressed: u64,
}

/// The buckets of the sandboxes that sent events lately.
struct Buckets {
    limits: FeedLimits,
    by_sandbox: Mutex<HashMap<String, Bucket>>,
}

impl Buckets {
    /// Takes a token of `sandbox`'s bucket; `false` (counted) when it has none.
    fn admit(&self, sandbox: &str) -> bool {
        let mut map = self.by_sandbox.lock().expect("feed buckets");
        let now = Instant::now();
        let burst = self.limits.burst.max(1) as f64;
        let b = map.entry(sandbox.to_string()).or_insert(Bucket {
            tokens: burst,
            last: now,
            suppressed: 0,
        });
        b.tokens = (b.tokens
            + now.duration_since(b.last).as_secs_f64() * self.limits.rate_per_s as f64)
            .min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            b.suppressed += 1;
            false
        }
    }

    /// Counts an admitted event that found the queue full.
    fn count_lost(&self, sandbox: &str) {
        if let Some(b) = self
            .by_sandbox
            .lock()
            .expect("feed buckets")
            .get_mut(sandbox)
        {
            b.suppressed += 1;
        }
    }

    /// The counts left out since the last call, by sandbox; forgets buckets that are full
    /// again (so the map holds only sandboxes that sent events lately).
    fn take_suppressed(&self) -> Vec<(String, u64)> {
        let mut map = self.by_sandbox.lock().expect("feed buckets");
        let idle = Duration::from_secs_f64(
            self.limits.burst.max(1) as f64 / self.limits.rate_per_s.max(1) as f64,
        );
        let mut counts = Vec::new();
        map.retain(|id, b| {
            if b.suppressed > 0 {
                counts.push((id.clone(), std::mem::take(&mut b.suppressed)));
            }
            b.last.elapsed() < idle
        });
        counts
    }
}

/// The bounded way from the guest's events to its sandbox's journal (see the module docs).
/// Recording never blocks and never waits for a write.
pub struct GuestFeed {
    tx: mpsc::Sender<(String, Event)>,
    buckets: Arc<Buckets>,
}

impl GuestFeed {
    /// Starts the task that appends to `journals` (opening a journal that is not open yet
    /// with its sandbox's record from `manager`, for the redaction of its spec's values). It
    /// ends when the feed is dropped.
    pub fn start(journals: Arc<Journals>, manager: Weak<Manager>, limits: FeedLimits) -> GuestFeed {
        let (tx, rx) = mpsc::channel(limits.queue.max(1));
        let buckets = Arc::new(Buckets {
            limits,
            by_sandbox: Mutex::new(HashMap::new()),
        });
        tokio::spawn(append(rx, buckets.clone(), journals, manager));
        GuestFeed { tx, buckets }
    }

    /// Records `event` in `sandbox`'s journal, unless over its limits (then it is counted).
    pub fn record(&self, sandbox: &str, event: Event) {
        if !self.buckets.admit(sandbox) {
            return;
        }
        if self.tx.try_send((sandbox.to_string(), event)).is_err() {
            self.buckets.count_lost(sandbox);
        }
    }

    /// Records one of the secret broker's decisions.
    pub fn broker(&self, event: &BrokerEvent) {
        self.record(&event.sandbox_id, broker_event(event));
    }
}

impl EventSink for GuestFeed {
    fn emit(&self, event: FlowEvent) {
        self.record(&event.sandbox, flow_event(&event));
    }
}

/// Appends what comes in, and every [`SUMMARY_EVERY`] the counts of what was left out.
async fn append(
    mut rx: mpsc::Receiver<(String, Event)>,
    buckets: Arc<Buckets>,
    journals: Arc<Journals>,
    manager: Weak<Manager>,
) {
    let mut summary = tokio::time::interval(SUMMARY_EVERY);
    summary.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            next = rx.recv() => match next {
                Some((sandbox, event)) => deliver(&journals, &manager, &sandbox, event).await,
                None => break,
            },
            _ = summary.tick() => {
                for (sandbox, count) in buckets.take_suppressed() {
                    let event = Event::new(SUPPRESSED).attr(attr::SUPPRESSED_COUNT, count);
                    deliver(&journals, &manager, &sandbox, event).await;
                }
            }
        }
    }
}

/// Appends `event` to `sandbox`'s journal; dropped when the sandbox has no open journal and
/// the manager no longer knows it (destroyed: its journal is sealed).
async fn deliver(journals: &Journals, manager: &Weak<Manager>, sandbox: &str, event: Event) {
    let journal = match journals.opened(sandbox).await {
        Some(j) => Some(j),
        None => match manager.upgrade() {
            Some(m) => match m.info(sandbox).await {
                Ok(info) => journals.journal(sandbox, Some(&info)).await,
                Err(_) => None,
            },
            None => None,
        },
    };
    match journal {
        Some(j) => j.append(event),
        None => tracing::debug!(sandbox, kind = %event.kind, "no open journal: event dropped"),
    }
}

/// A network decision (`network.flow`) or a DNS filter's answer or refusal (`network.dns`).
pub fn flow_event(e: &FlowEvent) -> Event {
    let verdict = match e.verdict {
        Verdict::Allow => "allow",
        Verdict::Deny => "deny",
    };
    if RuleName::DNS_FILTER.contains(&e.rule) {
        let answers: Vec<String> = e.answers.iter().map(|a| a.to_string()).collect();
        return Event::new("network.dns")
            .attr(
                attr::DNS_QUESTION_NAME,
                e.domain.clone().unwrap_or_default(),
            )
            .attr(attr::DNS_ANSWERS, answers)
            .attr(attr::NETWORK_VERDICT, verdict)
            .attr(attr::NETWORK_RULE, e.rule.as_str());
    }
    let transport = match e.proto {
        Proto::Tcp => "tcp".to_string(),
        Proto::Udp => "udp".to_string(),
        Proto::Icmp => "icmp".to_string(),
        Proto::Other(n) => n.to_string(),
    };
    let mut event = Event::new("network.flow")
        .attr(attr::NETWORK_TRANSPORT, transport)
        .attr(attr::DESTINATION_ADDRESS, e.dst.to_string())
        .attr(attr::NETWORK_VERDICT, verdict)
        .attr(attr::NETWORK_RULE, e.rule.as_str());
    if e.dst_port != 0 {
        event = event.attr(attr::DESTINATION_PORT, e.dst_port);
    }
    if let Some(name) = &e.domain {
        event = event.attr(attr::SERVER_ADDRESS, name.clone());
    }
    event
}

/// One of the secret broker's decisions (`secret.substituted`, `secret.violation`, …): the
/// secret's name, never a value or a placeholder.
pub fn broker_event(e: &BrokerEvent) -> Event {
    let decision = match e.decision {
        BrokerDecision::Substituted => "substituted",
        BrokerDecision::Refused => "refused",
        BrokerDecision::Violation => "violation",
        BrokerDecision::Forwarded => "forwarded",
        BrokerDecision::Scrubbed => "scrubbed",
        BrokerDecision::Signed => "signed",
    };
    let mut event = Event::new(format!("secret.{decision}"))
        .attr(attr::SECRET_NAME, e.secret.clone())
        .attr(attr::SECRET_DECISION, decision)
        .attr(attr::SERVER_ADDRESS, e.host.clone())
        .attr(attr::SERVER_PORT, e.port);
    if let Some(m) = &e.method {
        event = event.attr(attr::HTTP_REQUEST_METHOD, m.clone());
    }
    if let Some(p) = &e.path {
        event = event.attr(attr::URL_PATH, p.clone());
    }
    if let Some(r) = &e.reason {
        event = event.attr(attr::SECRET_REASON, r.clone());
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buckets(rate_per_s: u32, burst: u32) -> Buckets {
        Buckets {
            limits: FeedLimits {
                rate_per_s,
                burst,
                queue: 16,
            },
            by_sandbox: Mutex::new(HashMap::new()),
        }
    }

    #[test]
    fn a_flood_is_cut_at_the_burst_and_counted_per_sandbox() {
        let b = buckets(1, 10);
        let admitted = (0..1000).filter(|_| b.admit("a")).count();
        assert_eq!(admitted, 10);
        assert!(b.admit("b"), "another sandbox has its own bucket");
        assert_eq!(b.take_suppressed(), vec![("a".to_string(), 990)]);
        assert!(b.take_suppressed().is_empty(), "counts are taken once");
    }

    #[test]
    fn idle_buckets_are_forgotten() {
        let b = buckets(1, 1);
        assert!(b.admit("a"));
        assert!(!b.admit("a"));
        b.take_suppressed();
        assert_eq!(b.by_sandbox.lock().unwrap().len(), 1, "just used: kept");
        // Long enough ago to be full again.
        b.by_sandbox.lock().unwrap().get_mut("a").unwrap().last -= Duration::from_secs(2);
        b.take_suppressed();
        assert!(b.by_sandbox.lock().unwrap().is_empty());
    }
}
