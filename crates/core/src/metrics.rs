//! The daemon's metrics, in the Prometheus text exposition format (version 0.0.4).
//!
//! Counters and histograms are plain atomics the manager, the request surface and the network
//! sink update as things happen; [`Metrics::render`] writes them out together with what is
//! read at scrape time (sandboxes by recorded state, the process's resident memory). Handles
//! for features that land separately (secret substitutions, journal write errors) are public
//! fields: they increment them, the exposition already names them.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::Duration,
};

use hutch_net::{EventSink, FlowEvent, Verdict};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The count so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Durations counted into fixed buckets (upper bounds in seconds), with their sum.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative); the last one is `+Inf`.
    buckets: Vec<AtomicU64>,
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Counts one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    /// How many durations were counted.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }
}

/// Bucket bounds for sandbox creation (a restore or a pooled clone is well under a second; a
/// cold boot under emulation can take a minute).
const CREATE_BOUNDS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// Bucket bounds for exec round trips.
const EXEC_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// How a sandbox came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreatePath {
    /// Booted from its image.
    Cold,
    /// Restored from a template's snapshot.
    Restore,
    /// Handed out from a template's pool of ready clones.
    Pool,
}

impl CreatePath {
    const ALL: [CreatePath; 3] = [CreatePath::Cold, CreatePath::Restore, CreatePath::Pool];

    fn name(self) -> &'static str {
        match self {
            CreatePath::Cold => "cold",
            CreatePath::Restore => "restore",
            CreatePath::Pool => "pool",
        }
    }
}

/// How an exec was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecKind {
    /// Run to its end with its output collected (capped).
    Capped,
    /// Streamed to the client (WebSocket, PTY).
    Stream,
}

impl ExecKind {
    const ALL: [ExecKind; 2] = [ExecKind::Capped, ExecKind::Stream];

    fn name(self) -> &'static str {
        match self {
            ExecKind::Capped => "capped",
            ExecKind::Stream => "stream",
        }
    }
}

/// Every state a sandbox's record can be in, for the by-state gauge (zeros included).
const STATES: [&str; 8] = [
    "creating",
    "running",
    "paused",
    "stopping",
    "stopped",
    "destroyed",
    "failed",
    "suspended",
];

/// The daemon's metrics.
#[derive(Debug)]
pub struct Metrics {
    creates: [Histogram; 3],
    create_failures: Counter,
    execs: [Counter; 2],
    exec_seconds: Histogram,
    /// Network decisions by (verdict, rule).
    net_decisions: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// Identity tokens issued to guests.
    pub tokens_issued: Counter,
    /// Secret values substituted into guest traffic: the secret broker increments it.
    pub secret_substitutions: Counter,
    /// Journal lines that could not be written: the journal increments it.
    pub journal_write_errors: Counter,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            creates: CreatePath::ALL.map(|_| Histogram::new(CREATE_BOUNDS)),
            create_failures: Counter::default(),
            execs: ExecKind::ALL.map(|_| Counter::default()),
            exec_seconds: Histogram::new(EXEC_BOUNDS),
            net_decisions: Mutex::new(BTreeMap::new()),
            tokens_issued: Counter::default(),
            secret_substitutions: Counter::default(),
            journal_write_errors: Counter::default(),
        }
    }
}

impl Metrics {
    /// A sandbox was created by `path` in `took`.
    pub fn created(&self, path: CreatePath, took: Duration) {
        self.creates[path as usize].observe(took);
    }

    /// A create failed.
    pub fn create_failed(&self) {
        self.create_failures.inc();
    }

    /// Creates counted so far by `path`.
    pub fn creates(&self, path: CreatePath) -> u64 {
        self.creates[path as usize].count()
    }

    /// An exec started.
    pub fn exec_started(&self, kind: ExecKind) {
        self.execs[kind as usize].inc();
    }

    /// A capped exec's round trip (start to exit) took `took`.
    pub fn exec_finished(&self, took: Duration) {
        self.exec_seconds.observe(took);
    }

    /// The exposition: every metric, with `states` (sandboxes by state name) and the
    /// process's resident memory read now.
    pub fn render(&self, states: &BTreeMap<String, u64>) -> String {
        let mut out = String::new();
        let w = &mut out;
        header(
            w,
            "hutch_sandboxes",
            "gauge",
            "Sandboxes by recorded state.",
        );
        for state in STATES {
            let n = states.get(state).copied().unwrap_or(0);
            sample(w, "hutch_sandboxes", &[("state", state)], n as f64);
        }
        header(
            w,
            "hutch_sandbox_creates_total",
            "counter",
            "Sandboxes created, by path (cold boot, restore from a template, pooled clone).",
        );
        for path in CreatePath::ALL {
            let n = self.creates(path);
            sample(
                w,
                "hutch_sandbox_creates_total",
                &[("path", path.name())],
                n as f64,
            );
        }
        header(
            w,
            "hutch_sandbox_create_failures_total",
            "counter",
            "Sandbox creates that failed.",
        );
        sample(
            w,
            "hutch_sandbox_create_failures_total",
            &[],
            self.create_failures.get() as f64,
        );
        header(
            w,
            "hutch_sandbox_create_duration_seconds",
            "histogram",
            "Time from a create request to a running sandbox, by path.",
        );
        for path in CreatePath::ALL {
            histogram(
                w,
                "hutch_sandbox_create_duration_seconds",
                ("path", path.name()),
                &self.creates[path as usize],
            );
        }
        header(w, "hutch_execs_total", "counter", "Execs started, by kind.");
        for kind in ExecKind::ALL {
            let n = self.execs[kind as usize].get();
            sample(w, "hutch_execs_total", &[("kind", kind.name())], n as f64);
        }
        header(
            w,
            "hutch_exec_duration_seconds",
            "histogram",
            "Round trip of capped execs, from the request to the exit.",
        );
        histogram(
            w,
            "hutch_exec_duration_seconds",
            ("kind", "capped"),
            &self.exec_seconds,
        );
        header(
            w,
            "hutch_network_decisions_total",
            "counter",
            "Egress and DNS decisions logged (after the per-sandbox log rate limit), by verdict and rule.",
        );
        for ((verdict, rule), n) in self.net_decisions.lock().expect("metrics lock").iter() {
            let labels = [("verdict", *verdict), ("rule", *rule)];
            sample(w, "hutch_network_decisions_total", &labels, *n as f64);
        }
        let counters = [
            (
                "hutch_identity_tokens_issued_total",
                "Workload identity tokens issued to guests.",
                &self.tokens_issued,
            ),
            (
                "hutch_secret_substitutions_total",
                "Secret values substituted into guest traffic.",
                &self.secret_substitutions,
            ),
            (
                "hutch_journal_write_errors_total",
                "Journal lines that could not be written.",
                &self.journal_write_errors,
            ),
        ];
        for (name, help, counter) in counters {
            header(w, name, "counter", help);
            sample(w, name, &[], counter.get() as f64);
        }
        if let Some(rss) = resident_bytes() {
            header(
                w,
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory of the daemon process.",
            );
            sample(w, "process_resident_memory_bytes", &[], rss as f64);
        }
        out
    }
}

/// Counts the network's decisions (pass it to `hutch_net::Network::set_event_sink`).
impl EventSink for Metrics {
    fn emit(&self, event: FlowEvent) {
        let verdict = match event.verdict {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        };
        *self
            .net_decisions
            .lock()
            .expect("metrics lock")
            .entry((verdict, event.rule.as_str()))
            .or_default() += 1;
    }
}

fn header(w: &mut String, name: &str, kind: &str, help: &str) {
    let help = help.replace('\\', "\\\\").replace('\n', "\\n");
    let _ = writeln!(w, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn sample(w: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
    w.push_str(name);
    if !labels.is_empty() {
        let pairs: Vec<String> = labels
            .iter()
            .map(|(k, v)| {
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                format!("{k}=\"{v}\"")
            })
            .collect();
        let _ = write!(w, "{{{}}}", pairs.join(","));
    }
    let _ = writeln!(w, " {value}");
}

fn histogram(w: &mut String, name: &str, label: (&str, &str), h: &Histogram) {
    let mut cumulative = 0;
    for (i, count) in h.buckets.iter().enumerate() {
        cumulative += count.load(Ordering::Relaxed);
        let le = h
            .bounds
            .get(i)
            .map_or("+Inf".to_string(), |b| b.to_string());
        let bucket = format!("{name}_bucket");
        sample(w, &bucket, &[label, ("le", &le)], cumulative as f64);
    }
    let sum = h.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
    sample(w, &format!("{name}_sum"), &[label], sum);
    sample(w, &format!("{name}_count"), &[label], cumulative as f64);
}

/// The process's resident set size (`VmRSS` of `/proc/self/status`), in bytes.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_counters_move() {
        let m = Metrics::default();
        m.created(CreatePath::Cold, Duration::from_millis(700));
        m.created(CreatePath::Cold, Duration::from_secs(500));
        m.created(CreatePath::Pool, Duration::from_millis(20));
        m.exec_started(ExecKind::Capped);
        m.secret_substitutions.add(3);
        let text = m.render(&BTreeMap::from([("running".to_string(), 2)]));
        for line in [
            "hutch_sandboxes{state=\"running\"} 2",
            "hutch_sandboxes{state=\"failed\"} 0",
            "hutch_sandbox_creates_total{path=\"cold\"} 2",
            "hutch_sandbox_creates_total{path=\"pool\"} 1",
            "hutch_sandbox_create_duration_seconds_bucket{path=\"cold\",le=\"0.5\"} 0",
            "hutch_sandbox_create_duration_seconds_bucket{path=\"cold\",le=\"1\"} 1",
            "hutch_sandbox_create_duration_seconds_bucket{path=\"cold\",le=\"120\"} 1",
            "hutch_sandbox_create_duration_seconds_bucket{path=\"cold\",le=\"+Inf\"} 2",
            "hutch_sandbox_create_duration_seconds_sum{path=\"cold\"} 500.7",
            "hutch_sandbox_create_duration_seconds_count{path=\"cold\"} 2",
            "hutch_execs_total{kind=\"capped\"} 1",
            "hutch_secret_substitutions_total 3",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(resident_bytes().unwrap() > 0);
    }
}
