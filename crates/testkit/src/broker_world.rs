//! The broker's test world: a guest namespace whose TCP 80/443 is redirected by nft to the
//! broker in a sandbox namespace, and an "internet" namespace whose HTTPS origins (RFC 5737
//! addresses) are signed by a test root CA. Origins record every request they receive. The
//! broker's namespace tests and `hutch-bench secrets` use it (root only: [`can_run`]).

// Test fixtures: namespace setup is a few short synchronous commands, run once per world.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::{Arc, Mutex};

pub use crate::origin::Seen;
use crate::origin::{listen_in as listen, origin_tls, serve_origins};
use hutch_broker::{
    AttachedSecret, Broker, BrokerConfig, Dial, DialFuture, DnsOracle, EgressCheck, EventSink,
    SandboxCa, SecretValue,
};
use hutch_types::{BrokerEvent, SecretBinding};
use rustls::pki_types::CertificateDer;

/// The API origin's address.
pub const API_IP: &str = "203.0.113.10";
/// The attacker's origin.
pub const EVIL_IP: &str = "203.0.113.20";
/// An origin no secret is bound to.
pub const OTHER_IP: &str = "203.0.113.30";
/// The broker's address on the guest link (where explicit `CONNECT` goes).
pub const BROKER_IP: &str = "192.0.2.1";
/// The broker's port.
pub const BROKER_PORT: u16 = 15001;

/// True when this process may make namespaces and the tools exist; prints SKIP otherwise.
pub fn can_run(test: &str) -> bool {
    let root = rustix::process::geteuid().is_root();
    let tools = ["ip", "nft", "curl"].iter().all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !(root && tools) {
        println!("SKIP {test}: needs root, ip, nft and curl");
    }
    root && tools
}

fn sh(cmd: &str) {
    let out = Command::new("sh").args(["-c", cmd]).output().expect("sh");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Namespaces, origins, broker: removed on drop.
pub struct World {
    /// Guest namespace.
    pub guest: String,
    sandbox: String,
    inet: String,
    _dir: tempfile::TempDir,
    /// What the origins received.
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// What the broker recorded.
    pub events: Arc<Mutex<Vec<BrokerEvent>>>,
    /// The sandbox CA's certificate file.
    pub sandbox_ca: String,
    /// The test root's certificate file (the origins' own CA).
    pub test_root: String,
    /// The broker (a clone of the one serving).
    pub broker: Broker,
    /// The sandbox CA's certificate.
    pub sandbox_ca_der: CertificateDer<'static>,
    /// The test root's certificate.
    pub test_root_der: CertificateDer<'static>,
    _broker: tokio::task::JoinHandle<std::io::Error>,
}

impl Drop for World {
    fn drop(&mut self) {
        self._broker.abort();
        for n in [&self.guest, &self.sandbox, &self.inet] {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// The sandbox's DNS answers: each test host at its origin.
struct Answers;

impl DnsOracle for Answers {
    fn answers(&self, host: &str) -> Option<Vec<IpAddr>> {
        let ip = match host {
            "api.example.test" => API_IP,
            "evil.example.test" => EVIL_IP,
            "other.example.test" => OTHER_IP,
            _ => return None,
        };
        Some(vec![ip.parse().unwrap()])
    }
}

/// Everything but one refused port is allowed.
struct Egress;

impl EgressCheck for Egress {
    fn allowed(&self, dst: SocketAddr, _host: Option<&str>) -> bool {
        dst.port() != 8443
    }
}

struct Events(Arc<Mutex<Vec<BrokerEvent>>>);

impl EventSink for Events {
    fn record(&self, event: BrokerEvent) {
        self.0.lock().unwrap().push(event);
    }
}

/// Connects from namespace `ns` (the socket is made there, then used from any thread).
pub async fn connect_in(ns: &str, dst: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    NetnsDial(ns.to_string()).dial(dst).await
}

/// Dials from the sandbox namespace (what the daemon's dialer does too).
struct NetnsDial(String);

impl Dial for NetnsDial {
    fn dial(&self, dst: SocketAddr) -> DialFuture {
        let ns = self.0.clone();
        Box::pin(async move {
            let std = tokio::task::spawn_blocking(move || {
                hutch_net::in_netns(&ns, move || {
                    let s =
                        std::net::TcpStream::connect(dst).map_err(|e| hutch_net::NetError::Io {
                            what: "connect".into(),
                            source: e,
                        })?;
                    s.set_nonblocking(true).unwrap();
                    Ok(s)
                })
            })
            .await
            .map_err(std::io::Error::other)?
            .map_err(std::io::Error::other)?;
            tokio::net::TcpStream::from_std(std)
        })
    }
}

/// A secret for the world's broker.
pub struct TestSecret {
    /// Name.
    pub name: &'static str,
    /// Real value.
    pub value: &'static str,
    /// Placeholder.
    pub placeholder: &'static str,
    /// Bindings.
    pub bindings: Vec<SecretBinding>,
}

impl TestSecret {
    /// As the broker holds it.
    pub fn attached(self) -> AttachedSecret {
        AttachedSecret {
            name: self.name.into(),
            value: SecretValue::new(self.value.as_bytes().to_vec()),
            placeholder: self.placeholder.into(),
            bindings: self
                .bindings
                .into_iter()
                .map(|b| b.normalised().unwrap())
                .collect(),
        }
    }
}

impl World {
    /// Builds the namespaces (names carry `tag`), origins and a broker holding `secrets`.
    pub async fn new(tag: &str, secrets: Vec<TestSecret>) -> World {
        let (g, s, i) = (
            format!("hb-g-{tag}"),
            format!("hb-s-{tag}"),
            format!("hb-i-{tag}"),
        );
        for n in [&g, &s, &i] {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
            sh(&format!("ip netns add {n} && ip -n {n} link set lo up"));
        }
        sh(&format!(
            "ip -n {s} link add hbg0 type veth peer name eth0 netns {g} && \
             ip -n {s} addr add {BROKER_IP}/24 dev hbg0 && ip -n {s} link set hbg0 up && \
             ip -n {g} addr add 192.0.2.2/24 dev eth0 && ip -n {g} link set eth0 up && \
             ip -n {g} route add default via {BROKER_IP} && \
             ip -n {s} link add hbi0 type veth peer name up0 netns {i} && \
             ip -n {s} addr add 198.51.100.1/24 dev hbi0 && ip -n {s} link set hbi0 up && \
             ip -n {i} addr add 198.51.100.2/24 dev up0 && ip -n {i} link set up0 up && \
             ip -n {s} route add 203.0.113.0/24 via 198.51.100.2 && \
             ip -n {i} route add 192.0.2.0/24 via 198.51.100.1 && \
             ip netns exec {s} sysctl -qw net.ipv4.ip_forward=1"
        ));
        for a in [API_IP, EVIL_IP, OTHER_IP] {
            sh(&format!("ip -n {i} addr add {a}/32 dev lo"));
        }
        // The rules the daemon installs in a sandbox namespace: the guest's TCP 80/443 to the
        // broker, its UDP 443 dropped (QUIC falls back to TCP).
        sh(&format!(
            "ip netns exec {s} nft -f - <<'EOF'
table ip hutch_broker {{
  chain prerouting {{
    type nat hook prerouting priority dstnat;
    iifname \"hbg0\" tcp dport {{ 80, 443 }} redirect to :{BROKER_PORT}
  }}
  chain forward {{
    type filter hook forward priority filter;
    iifname \"hbg0\" udp dport 443 drop
  }}
}}
EOF"
        ));
        let dir = tempfile::tempdir().unwrap();
        let (origin_tls, test_root_der, test_root) = origin_tls(dir.path());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(test_root_der.clone()).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let origin_tls = Arc::new(origin_tls);
        for port in [443, 8443] {
            serve_origins(
                listen(&i, &format!("0.0.0.0:{port}")),
                Some(origin_tls.clone()),
                seen.clone(),
            );
        }
        serve_origins(listen(&i, "0.0.0.0:80"), None, seen.clone());

        let mut hosts: Vec<String> = secrets
            .iter()
            .flat_map(|s| s.bindings.iter().map(|b| b.host.clone()))
            .collect();
        hosts.sort();
        hosts.dedup();
        let events = Arc::new(Mutex::new(Vec::new()));
        let ca = SandboxCa::generate(&format!("sb-{tag}"), &hosts).unwrap();
        let sandbox_ca_der = ca.cert_der().clone();
        let broker = Broker::new(BrokerConfig {
            sandbox_id: format!("sb-{tag}"),
            secrets: secrets.into_iter().map(TestSecret::attached).collect(),
            ca,
            upstream_roots: Arc::new(roots),
            dns: Arc::new(Answers),
            egress: Arc::new(Egress),
            events: Arc::new(Events(events.clone())),
            dial: Arc::new(NetnsDial(s.clone())),
        })
        .unwrap();
        let sandbox_ca = dir.path().join("sandbox-ca.pem");
        std::fs::write(&sandbox_ca, broker.ca_cert_pem()).unwrap();
        let listener = listen(&s, &format!("0.0.0.0:{BROKER_PORT}"));
        let serving = {
            let broker = broker.clone();
            tokio::spawn(async move { broker.serve(listener).await })
        };
        World {
            guest: g,
            sandbox: s,
            inet: i,
            _dir: dir,
            seen,
            events,
            sandbox_ca: sandbox_ca.display().to_string(),
            test_root,
            broker,
            sandbox_ca_der,
            test_root_der,
            _broker: serving,
        }
    }

    /// Runs curl in the guest namespace; returns (exit code, body, status line info).
    pub async fn curl(&self, args: &[&str]) -> Curl {
        let out = tokio::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.guest,
                "curl",
                "-sS",
                "--max-time",
                "20",
            ])
            .args(["-w", "\n%{http_code} %{http_version}"])
            .args(args)
            .output()
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, tail) = text.rsplit_once('\n').unwrap_or(("", &text));
        let mut tail = tail.split(' ');
        Curl {
            code: out.status.code().unwrap_or(-1),
            status: tail.next().unwrap_or("").parse().unwrap_or(0),
            version: tail.next().unwrap_or("").to_string(),
            body: body.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// What origins received since `from`.
    pub fn seen_since(&self, from: usize) -> Vec<Seen> {
        self.seen.lock().unwrap()[from..].to_vec()
    }

    /// How many requests origins received so far.
    pub fn seen_count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Events since `from`.
    pub fn events_since(&self, from: usize) -> Vec<BrokerEvent> {
        self.events.lock().unwrap()[from..].to_vec()
    }

    /// How many events so far.
    pub fn event_count(&self) -> usize {
        self.events.lock().unwrap().len()
    }
}

/// One curl run.
#[derive(Debug)]
pub struct Curl {
    /// curl's exit code.
    pub code: i32,
    /// HTTP status.
    pub status: u16,
    /// HTTP version curl used.
    pub version: String,
    /// Response body.
    pub body: String,
    /// curl's errors.
    pub stderr: String,
}

/// Headers as a map, for looking one up.
pub fn header_map(seen: &Seen) -> HashMap<String, String> {
    seen.headers
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
