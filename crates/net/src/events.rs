//! The decision log's types. Phase 1 tags every verdict in nft with a [`RuleName`] (rule
//! comment, counter and a rate-limited `log group` whose prefix is `hutch:<rule>`); reading those
//! NFLOG messages back into [`FlowEvent`]s is phase 2. The Rust-side sink is rate-limited per
//! sandbox so a hostile guest cannot flood the host's log.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

/// NFLOG group every sandbox's verdict rules log to (inside the sandbox's own namespace).
pub const LOG_GROUP: u32 = 4242;

/// Every verdict the policy engine can reach. The string form is used as nft chain name,
/// rule comment and log prefix, so a log line maps back to exactly one rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RuleName {
    /// Guest → gateway:53 (Hutch's resolver): accepted.
    Dns,
    /// Anything from outside towards the guest that is not a reply: rejected.
    DenyInbound,
    /// Guest traffic with a source address other than the guest's: dropped unanswered before
    /// anything else sees it (an answer would go to the forged source).
    DenySpoof,
    /// DNS to anywhere but Hutch's resolver: rejected.
    DenyDns,
    /// Reserved, private, link-local, multicast, host and transit addresses: rejected.
    DenyReserved,
    /// Guest → the sandbox namespace itself (other than DNS): rejected.
    DenyHost,
    /// Not allowed by the sandbox's policy: rejected.
    DenyPolicy,
    /// A sandbox with a WireGuard egress tunnel sent traffic that would leave by another way
    /// (e.g. straight to the tunnel's endpoint): rejected.
    DenyTunnel,
    /// Allowed by policy `open`.
    AllowOpen,
    /// Allowed by a CIDR of policy `allow`.
    AllowCidr,
    /// Allowed because a resolved name of policy `allow` put the address in `allow4`/`allow6`.
    AllowDomain,
    /// The DNS filter answered an allowed name (from the upstream's answer).
    DnsAnswer,
    /// The DNS filter refused a name the policy does not allow (NXDOMAIN), or a question type
    /// or class it does not forward (REFUSED).
    DnsRefused,
}

impl RuleName {
    /// The DNS filter's decisions (not nft rules).
    pub const DNS_FILTER: [RuleName; 2] = [RuleName::DnsAnswer, RuleName::DnsRefused];

    /// Every nft rule name (each is a verdict chain in the sandbox's table).
    pub const ALL: [RuleName; 11] = [
        RuleName::Dns,
        RuleName::DenyInbound,
        RuleName::DenySpoof,
        RuleName::DenyDns,
        RuleName::DenyReserved,
        RuleName::DenyHost,
        RuleName::DenyPolicy,
        RuleName::DenyTunnel,
        RuleName::AllowOpen,
        RuleName::AllowCidr,
        RuleName::AllowDomain,
    ];

    /// Stable name (nft chain name, comment, log prefix suffix).
    pub fn as_str(self) -> &'static str {
        match self {
            RuleName::Dns => "allow_dns",
            RuleName::DenyInbound => "deny_inbound",
            RuleName::DenySpoof => "deny_spoof",
            RuleName::DenyDns => "deny_dns",
            RuleName::DenyReserved => "deny_reserved",
            RuleName::DenyHost => "deny_host",
            RuleName::DenyPolicy => "deny_policy",
            RuleName::DenyTunnel => "deny_tunnel",
            RuleName::AllowOpen => "allow_open",
            RuleName::AllowCidr => "allow_cidr",
            RuleName::AllowDomain => "allow_domain",
            RuleName::DnsAnswer => "dns_answer",
            RuleName::DnsRefused => "dns_refused",
        }
    }

    /// The verdict this rule gives.
    pub fn verdict(self) -> Verdict {
        match self {
            RuleName::Dns
            | RuleName::AllowOpen
            | RuleName::AllowCidr
            | RuleName::AllowDomain
            | RuleName::DnsAnswer => Verdict::Allow,
            _ => Verdict::Deny,
        }
    }

    /// True if what this rule denies is rejected (answered with a TCP reset or an ICMP error,
    /// which only ever leave towards the guest); false for allowing rules and for
    /// [`RuleName::DenySpoof`], whose packets are dropped.
    pub fn rejects(self) -> bool {
        self.verdict() == Verdict::Deny && self != RuleName::DenySpoof
    }

    /// The NFLOG prefix written by this rule.
    pub fn log_prefix(self) -> String {
        format!("hutch:{}", self.as_str())
    }

    /// Parses an NFLOG prefix back (phase 2's reader).
    pub fn from_log_prefix(p: &str) -> Option<RuleName> {
        let s = p.trim_end().strip_prefix("hutch:")?;
        RuleName::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// Allowed or denied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// The flow was let through.
    Allow,
    /// The flow was rejected (TCP reset or ICMP admin-prohibited), or dropped (see
    /// [`RuleName::rejects`]).
    Deny,
}

/// Transport protocol of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP or ICMPv6.
    Icmp,
    /// Any other IP protocol number.
    Other(u8),
}

/// One decision about one flow (the first packet of a connection).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowEvent {
    /// When the decision was observed.
    pub time: SystemTime,
    /// Sandbox id.
    pub sandbox: String,
    /// Transport protocol.
    pub proto: Proto,
    /// Destination address.
    pub dst: IpAddr,
    /// Destination port (0 where the protocol has none).
    pub dst_port: u16,
    /// The name the sandbox resolved through its DNS filter to reach `dst` (flows), or the
    /// name asked for (DNS decisions).
    pub domain: Option<String>,
    /// For [`RuleName::DnsAnswer`]: the addresses answered (and added to the allow sets).
    pub answers: Vec<IpAddr>,
    /// Allowed or denied.
    pub verdict: Verdict,
    /// Which rule decided.
    pub rule: RuleName,
}

/// Where flow events go (the sandbox's record, in the daemon).
pub trait EventSink: Send + Sync {
    /// Receives one event. Must not block.
    fn emit(&self, event: FlowEvent);
}

/// Wraps a sink with a per-sandbox token bucket; events over the limit are counted, not passed.
pub struct RateLimitedSink<S> {
    inner: S,
    rate_per_s: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    last: Instant,
    dropped: u64,
}

impl<S: EventSink> RateLimitedSink<S> {
    /// `rate_per_s` events per second per sandbox, bursts up to `burst`.
    pub fn new(inner: S, rate_per_s: u32, burst: u32) -> Self {
        RateLimitedSink {
            inner,
            rate_per_s: rate_per_s as f64,
            burst: burst.max(1) as f64,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Events dropped so far for `sandbox`.
    pub fn dropped(&self, sandbox: &str) -> u64 {
        self.buckets
            .lock()
            .unwrap()
            .get(sandbox)
            .map_or(0, |b| b.dropped)
    }

    /// Forgets a sandbox's bucket (call on destroy).
    pub fn forget(&self, sandbox: &str) {
        self.buckets.lock().unwrap().remove(sandbox);
    }
}

impl<S: EventSink> EventSink for RateLimitedSink<S> {
    fn emit(&self, event: FlowEvent) {
        let pass = {
            let mut map = self.buckets.lock().unwrap();
            let now = Instant::now();
            let b = map.entry(event.sandbox.clone()).or_insert(Bucket {
                tokens: self.burst,
                last: now,
                dropped: 0,
            });
            let dt = now.duration_since(b.last).as_secs_f64();
            b.tokens = (b.tokens + dt * self.rate_per_s).min(self.burst);
            b.last = now;
            if b.tokens >= 1.0 {
                b.tokens -= 1.0;
                true
            } else {
                b.dropped += 1;
                false
            }
        };
        if pass {
            self.inner.emit(event);
        }
    }
}

impl<T: EventSink + ?Sized> EventSink for std::sync::Arc<T> {
    fn emit(&self, event: FlowEvent) {
        (**self).emit(event)
    }
}

/// Passes every event to each of several sinks, in order (the daemon's metrics and its
/// journals).
pub struct FanOut(pub Vec<std::sync::Arc<dyn EventSink>>);

impl EventSink for FanOut {
    fn emit(&self, event: FlowEvent) {
        if let Some((last, first)) = self.0.split_last() {
            for sink in first {
                sink.emit(event.clone());
            }
            last.emit(event);
        }
    }
}

/// Events kept per sandbox by [`EventRing`].
pub const RING_CAPACITY: usize = 1024;

/// A bounded in-memory log per sandbox (the newest [`RING_CAPACITY`] events each), optionally
/// passing every event on to another sink (the daemon's record).
#[derive(Default)]
pub struct EventRing {
    rings: Mutex<HashMap<String, std::collections::VecDeque<FlowEvent>>>,
    forward: Mutex<Option<std::sync::Arc<dyn EventSink>>>,
}

impl EventRing {
    /// Also passes every event to `sink` from now on.
    pub fn set_forward(&self, sink: Option<std::sync::Arc<dyn EventSink>>) {
        *self.forward.lock().unwrap() = sink;
    }

    /// The sandbox's events at or after `since`, oldest first.
    pub fn since(&self, sandbox: &str, since: SystemTime) -> Vec<FlowEvent> {
        self.rings
            .lock()
            .unwrap()
            .get(sandbox)
            .map(|r| r.iter().filter(|e| e.time >= since).cloned().collect())
            .unwrap_or_default()
    }

    /// Drops a sandbox's events.
    pub fn forget(&self, sandbox: &str) {
        self.rings.lock().unwrap().remove(sandbox);
    }
}

impl EventSink for EventRing {
    fn emit(&self, event: FlowEvent) {
        let fwd = self.forward.lock().unwrap().clone();
        {
            let mut map = self.rings.lock().unwrap();
            let r = map.entry(event.sandbox.clone()).or_default();
            if r.len() >= RING_CAPACITY {
                r.pop_front();
            }
            r.push_back(event.clone());
        }
        if let Some(f) = fwd {
            f.emit(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Collect(Arc<Mutex<Vec<FlowEvent>>>);
    impl EventSink for Collect {
        fn emit(&self, e: FlowEvent) {
            self.0.lock().unwrap().push(e);
        }
    }

    fn ev(sbx: &str) -> FlowEvent {
        FlowEvent {
            time: SystemTime::now(),
            sandbox: sbx.into(),
            proto: Proto::Tcp,
            dst: "203.0.113.10".parse().unwrap(),
            dst_port: 80,
            domain: None,
            answers: vec![],
            verdict: Verdict::Deny,
            rule: RuleName::DenyPolicy,
        }
    }

    #[test]
    fn a_fan_out_passes_every_event_to_each_sink() {
        let (a, b) = (Collect::default(), Collect::default());
        let fan = FanOut(vec![Arc::new(a.clone()), Arc::new(b.clone())]);
        fan.emit(ev("x"));
        fan.emit(ev("y"));
        for c in [a, b] {
            let got: Vec<_> =
                c.0.lock()
                    .unwrap()
                    .iter()
                    .map(|e| e.sandbox.clone())
                    .collect();
            assert_eq!(got, ["x", "y"]);
        }
    }

    #[test]
    fn rate_limit_is_per_sandbox() {
        let c = Collect::default();
        let s = RateLimitedSink::new(c.clone(), 1, 5);
        for _ in 0..100 {
            s.emit(ev("a"));
        }
        s.emit(ev("b"));
        let got = c.0.lock().unwrap();
        assert_eq!(got.iter().filter(|e| e.sandbox == "a").count(), 5);
        assert_eq!(got.iter().filter(|e| e.sandbox == "b").count(), 1);
        assert_eq!(s.dropped("a"), 95);
    }

    #[test]
    fn log_prefixes_round_trip() {
        for r in RuleName::ALL {
            assert_eq!(RuleName::from_log_prefix(&r.log_prefix()), Some(r));
        }
        assert_eq!(RuleName::from_log_prefix("hutch:nope"), None);
    }
}
