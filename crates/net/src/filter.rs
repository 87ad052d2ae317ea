//! Per-sandbox runtime: the DNS filter and the decision-log reader.
//!
//! * **DNS filter.** UDP and TCP sockets bound to the gateway address `172.16.0.1:53`, created
//!   inside the sandbox's namespace on an ns worker thread and served from tokio. A malformed
//!   query gets FORMERR, a type or class the filter does not forward REFUSED. For a name the
//!   policy allows, a query rebuilt from the parsed question ([`dns::upstream_query`]: the
//!   filter's id, the name in lower case, its own EDNS record) goes to the upstream resolver
//!   (through a socket made in the host namespace, so a host-local upstream such as
//!   `127.0.0.53` works); the answer is checked against the question, its A/AAAA addresses go
//!   into the sandbox's `allow4`/`allow6` nft sets with their TTL (under policy `allow`), and
//!   only then is it passed to the guest, under the guest's own id and question. Any other
//!   name gets NXDOMAIN. Answers and refusals are events.
//! * **Decision log.** An NFLOG socket in the namespace, bound to the group the verdict chains
//!   log to; each record becomes a [`FlowEvent`], annotated with the name the destination was
//!   resolved from.
//!
//! Everything is torn down by dropping the [`Runtime`] (its tasks are aborted, closing every
//! socket), which [`crate::Network::destroy`] does before removing the namespace.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;

use crate::dns::{self, Query};
use crate::events::{EventSink, FlowEvent, Proto, RuleName};
use crate::nft::{self, NftBackend};
use crate::plan::GATEWAY_ADDR;
use crate::{nflog, ns, NetError, Policy};

/// Shortest lifetime of an address in the allow sets, whatever the record's TTL.
pub const MIN_TTL: u32 = 5;
/// Longest lifetime of an address in the allow sets.
pub const MAX_TTL: u32 = 86_400;
/// How long the filter waits for the upstream.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// Queries in flight per sandbox (UDP); more are dropped, as a busy resolver would.
const MAX_INFLIGHT: usize = 64;
/// TCP connections per sandbox.
const MAX_TCP: usize = 16;
/// Idle limit of a TCP connection.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Remembered (address → name) pairs per sandbox, for annotating flows.
const MAX_NAMES: usize = 4096;

/// The policy a sandbox's filter answers by. The async lock is held across "check the name,
/// add its addresses to nft" and across `set_policy`'s nft transaction, so an answer for the
/// old policy can never land in the sets after the new policy flushed them.
pub(crate) type SharedPolicy = Arc<tokio::sync::Mutex<Policy>>;

/// Answers remembered per address: enough to tell apart names resolved to it in turn.
const NAMES_PER_ADDR: usize = 4;
/// How long past its TTL an answer still names late-read log lines.
const NAME_GRACE: Duration = Duration::from_secs(60);

/// Which name an address was resolved from, and when: a flow is attributed to the name most
/// recently answered for its address *before the packet was logged*, so a later answer for the
/// same address (another name) cannot rename it while its log line waits to be read.
struct Names {
    map: HashMap<IpAddr, Vec<Answered>>,
}

struct Answered {
    name: String,
    /// When the filter added the address (before the guest could learn it).
    from: SystemTime,
    /// TTL end.
    until: SystemTime,
}

impl Names {
    fn insert(&mut self, ip: IpAddr, name: &str, ttl: u32, now: SystemTime) {
        let live = |a: &Answered| a.until + NAME_GRACE > now;
        if self.map.len() >= MAX_NAMES && !self.map.contains_key(&ip) {
            self.map.retain(|_, v| {
                v.retain(live);
                !v.is_empty()
            });
            if self.map.len() >= MAX_NAMES {
                return;
            }
        }
        let v = self.map.entry(ip).or_default();
        v.retain(live);
        if v.len() >= NAMES_PER_ADDR {
            v.remove(0);
        }
        v.push(Answered {
            name: name.to_string(),
            from: now,
            until: now + Duration::from_secs(u64::from(ttl)),
        });
    }

    /// The name `ip` was last answered for at or before `at`, if that answer was still live.
    fn get(&self, ip: &IpAddr, at: SystemTime) -> Option<String> {
        self.map
            .get(ip)?
            .iter()
            .rev()
            .find(|a| a.from <= at)
            .filter(|a| at <= a.until + NAME_GRACE)
            .map(|a| a.name.clone())
    }
}

/// What this sandbox's DNS filter has answered: which names resolved to which addresses, and
/// until when. The secret broker asks it whether a connection's destination is one the
/// guest learned from Hutch's own resolver for the name it claims.
#[derive(Clone)]
pub struct Answers(Arc<Mutex<Names>>);

impl Answers {
    fn new() -> Answers {
        Answers(Arc::new(Mutex::new(Names {
            map: HashMap::new(),
        })))
    }

    /// Whether the filter answered `name` (lower case, no trailing dot, as the filter asks
    /// upstream) with `ip`, and that answer's TTL has not run out.
    pub fn resolved(&self, name: &str, ip: IpAddr) -> bool {
        let now = SystemTime::now();
        self.0
            .lock()
            .unwrap()
            .map
            .get(&ip)
            .is_some_and(|v| v.iter().any(|a| a.name == name && now <= a.until))
    }

    /// Every address the filter answered `name` with whose TTL has not run out.
    pub fn addresses(&self, name: &str) -> Vec<IpAddr> {
        let now = SystemTime::now();
        let names = self.0.lock().unwrap();
        names
            .map
            .iter()
            .filter(|(_, v)| v.iter().any(|a| a.name == name && now <= a.until))
            .map(|(ip, _)| *ip)
            .collect()
    }

    fn insert(&self, ip: IpAddr, name: &str, ttl: u32, now: SystemTime) {
        self.0.lock().unwrap().insert(ip, name, ttl, now);
    }

    fn get(&self, ip: &IpAddr, at: SystemTime) -> Option<String> {
        self.0.lock().unwrap().get(ip, at)
    }
}

struct Upstream {
    sock: UdpSocket,
    pending: Mutex<HashMap<u16, oneshot::Sender<Vec<u8>>>>,
}

struct Shared {
    id: String,
    netns: PathBuf,
    table: String,
    backend: NftBackend,
    policy: SharedPolicy,
    names: Answers,
    sink: Arc<dyn EventSink>,
    upstream: Option<Upstream>,
}

/// A running sandbox's filter and log reader. Dropping it stops both.
pub(crate) struct Runtime {
    pub(crate) policy: SharedPolicy,
    pub(crate) answers: Answers,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Everything [`run`] needs besides the sockets.
pub(crate) struct Params {
    pub id: String,
    pub netns: String,
    pub table: String,
    pub backend: NftBackend,
    pub policy: Policy,
    pub sink: Arc<dyn EventSink>,
}

/// Where a sandbox's DNS filter forwards allowed names, and from which namespace it asks.
pub(crate) struct UpstreamParams {
    pub addr: Option<SocketAddr>,
    pub ns: Option<PathBuf>,
}

/// A sandbox's filter and log sockets, opened (in its namespace and the upstream's) but not yet
/// served: a spare network holds them ready, so handing it out makes no namespace hop for them.
pub(crate) struct Sockets {
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
    log: OwnedFd,
    upstream: Option<std::net::UdpSocket>,
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> NetError {
    move |source| NetError::Io {
        what: what.into(),
        source,
    }
}

/// Opens the DNS filter's and the log reader's sockets inside the namespace `netns`, and the
/// upstream socket inside `up.ns` (each on its own ns thread, side by side).
pub(crate) async fn open(netns: &Path, up: UpstreamParams) -> Result<Sockets, NetError> {
    let local = ns::run_in(Some(netns), || {
        let addr = SocketAddr::from((GATEWAY_ADDR, 53));
        let udp = std::net::UdpSocket::bind(addr).map_err(io_err("bind DNS filter (udp)"))?;
        udp.set_nonblocking(true)
            .map_err(io_err("DNS socket nonblocking"))?;
        let tcp = std::net::TcpListener::bind(addr).map_err(io_err("bind DNS filter (tcp)"))?;
        tcp.set_nonblocking(true)
            .map_err(io_err("DNS socket nonblocking"))?;
        Ok((udp, tcp, nflog::open_socket()?))
    });
    let upstream = async {
        let Some(addr) = up.addr else {
            return Ok(None);
        };
        ns::run_in(up.ns.as_deref(), move || {
            let any: SocketAddr = if addr.is_ipv4() {
                (Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let s = std::net::UdpSocket::bind(any).map_err(io_err("bind upstream socket"))?;
            s.connect(addr).map_err(io_err("connect upstream socket"))?;
            s.set_nonblocking(true)
                .map_err(io_err("upstream socket nonblocking"))?;
            Ok(Some(s))
        })
        .await
    };
    let (local, upstream) = tokio::join!(local, upstream);
    let (udp, tcp, log) = local?;
    Ok(Sockets {
        udp,
        tcp,
        log,
        upstream: upstream?,
    })
}

/// Serves one sandbox's DNS filter and log reader on `s` (from [`open`]).
pub(crate) fn run(p: Params, s: Sockets) -> Result<Runtime, NetError> {
    let udp = UdpSocket::from_std(s.udp).map_err(io_err("register DNS socket"))?;
    let tcp = TcpListener::from_std(s.tcp).map_err(io_err("register DNS socket"))?;
    // SAFETY: `log` is an OwnedFd moved into the AsyncFd: it stays open and the same for the
    // AsyncFd's whole life.
    let log = unsafe { AsyncFd::register(s.log) }
        .map_err(|e| io_err("register NFLOG socket")(e.into_parts().1))?;
    let upstream = match s.upstream {
        Some(u) => Some(Upstream {
            sock: UdpSocket::from_std(u).map_err(io_err("register upstream socket"))?,
            pending: Mutex::new(HashMap::new()),
        }),
        None => None,
    };
    let policy: SharedPolicy = Arc::new(tokio::sync::Mutex::new(p.policy));
    let answers = Answers::new();
    let sh = Arc::new(Shared {
        id: p.id,
        netns: ns::netns_path(&p.netns),
        table: p.table,
        backend: p.backend,
        policy: policy.clone(),
        names: answers.clone(),
        sink: p.sink,
        upstream,
    });
    let mut tasks = vec![
        tokio::spawn(serve_udp(sh.clone(), udp)),
        tokio::spawn(serve_tcp(sh.clone(), tcp)),
        tokio::spawn(read_log(sh.clone(), log)),
    ];
    if sh.upstream.is_some() {
        tasks.push(tokio::spawn(read_upstream(sh.clone())));
    }
    Ok(Runtime {
        policy,
        answers,
        tasks,
    })
}

async fn serve_udp(sh: Arc<Shared>, sock: UdpSocket) {
    let sock = Arc::new(sock);
    let slots = Arc::new(Semaphore::new(MAX_INFLIGHT));
    let mut buf = vec![0u8; dns::MAX_QUERY + 1];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        if n > dns::MAX_QUERY {
            continue;
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let (sh, sock, q) = (sh.clone(), sock.clone(), buf[..n].to_vec());
        tokio::spawn(async move {
            if let Some(r) = answer(&sh, &q, Proto::Udp).await {
                let _ = sock.send_to(&r, from).await;
            }
            drop(permit);
        });
    }
}

async fn serve_tcp(sh: Arc<Shared>, l: TcpListener) {
    let slots = Arc::new(Semaphore::new(MAX_TCP));
    loop {
        let Ok((s, _)) = l.accept().await else {
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue; // dropping `s` closes it
        };
        let sh = sh.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(60), tcp_conn(&sh, s)).await;
            drop(permit);
        });
    }
}

async fn tcp_conn(sh: &Shared, mut s: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; dns::MAX_QUERY];
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, s.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        let n = u16::from_be_bytes(len) as usize;
        if n == 0 || n > dns::MAX_QUERY {
            return Ok(());
        }
        tokio::time::timeout(TCP_IDLE, s.read_exact(&mut buf[..n]))
            .await
            .map_err(|_| io::ErrorKind::TimedOut)??;
        let Some(r) = answer(sh, &buf[..n], Proto::Tcp).await else {
            return Ok(());
        };
        let mut out = Vec::with_capacity(2 + r.len());
        out.extend_from_slice(&(r.len() as u16).to_be_bytes());
        out.extend_from_slice(&r);
        s.write_all(&out).await?;
    }
}

fn allowed(policy: &Policy, name: &str) -> bool {
    match policy {
        Policy::Open => true,
        Policy::None => false,
        Policy::Allow { domains, .. } => dns::name_allowed(domains, name),
    }
}

fn event(sh: &Shared, proto: Proto, rule: RuleName, q: &Query, answers: Vec<IpAddr>) -> FlowEvent {
    FlowEvent {
        time: SystemTime::now(),
        sandbox: sh.id.clone(),
        proto,
        dst: IpAddr::V4(GATEWAY_ADDR),
        dst_port: 53,
        domain: Some(q.name.clone()),
        answers,
        verdict: rule.verdict(),
        rule,
    }
}

/// Answers one guest message; `None` drops it (too short to answer, or not a query).
async fn answer(sh: &Shared, msg: &[u8], proto: Proto) -> Option<Vec<u8>> {
    let Ok(q) = dns::parse_query(msg) else {
        return dns::reply_malformed(msg);
    };
    if !dns::forwarded(&q) {
        sh.sink
            .emit(event(sh, proto, RuleName::DnsRefused, &q, Vec::new()));
        return Some(dns::reply_with_rcode(msg, &q, dns::RCODE_REFUSED));
    }
    if !allowed(&*sh.policy.lock().await, &q.name) {
        sh.sink
            .emit(event(sh, proto, RuleName::DnsRefused, &q, Vec::new()));
        return Some(dns::reply_with_rcode(msg, &q, dns::RCODE_NXDOMAIN));
    }
    let servfail = || Some(dns::reply_with_rcode(msg, &q, dns::RCODE_SERVFAIL));
    let Some(up) = &sh.upstream else {
        return servfail();
    };
    let Some((resp, ans)) = ask(up, &q).await else {
        return servfail();
    };
    // Under the policy lock: re-check (the policy may have changed while we waited), then make
    // the addresses reachable before the guest learns them.
    let pol = sh.policy.lock().await;
    if !allowed(&pol, &q.name) {
        drop(pol);
        sh.sink
            .emit(event(sh, proto, RuleName::DnsRefused, &q, Vec::new()));
        return Some(dns::reply_with_rcode(msg, &q, dns::RCODE_NXDOMAIN));
    }
    if !ans.addrs.is_empty() {
        if matches!(*pol, Policy::Allow { .. }) {
            let json = nft::add_resolved(&sh.table, &ans.addrs, MIN_TTL, MAX_TTL);
            let backend = sh.backend;
            let r = ns::run_in(Some(&sh.netns), move || {
                nft::run(backend, "add resolved addresses", &json).map(drop)
            })
            .await;
            if let Err(e) = r {
                tracing::warn!(sandbox = %sh.id, error = %e, "DNS filter: allow set update failed");
                return servfail();
            }
        }
        let now = SystemTime::now();
        for (ip, ttl) in &ans.addrs {
            sh.names
                .insert(*ip, &q.name, (*ttl).clamp(MIN_TTL, MAX_TTL), now);
        }
    }
    drop(pol);
    let ips = ans.addrs.iter().map(|(ip, _)| *ip).collect();
    sh.sink.emit(event(sh, proto, RuleName::DnsAnswer, &q, ips));
    let resp = dns::guest_reply(resp, msg, &q);
    if proto == Proto::Udp && resp.len() > dns::udp_limit(&q) {
        return Some(dns::reply_truncated(msg, &q));
    }
    Some(resp)
}

fn random_u16() -> u16 {
    let mut b = [0u8; 2];
    // SAFETY: valid buffer; a short read leaves zeros, which is still a usable id.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), 2, 0) };
    u16::from_be_bytes(b)
}

/// Asks the upstream `q`'s question in a query of the filter's own making, under a fresh random
/// id; returns the checked response (still with that id and its question) and its addresses.
async fn ask(up: &Upstream, q: &Query) -> Option<(Vec<u8>, dns::Answer)> {
    let (tx, rx) = oneshot::channel();
    let uid = {
        let mut p = up.pending.lock().unwrap();
        if p.len() >= MAX_INFLIGHT {
            return None;
        }
        let mut uid = random_u16();
        while p.contains_key(&uid) {
            uid = random_u16();
        }
        p.insert(uid, tx);
        uid
    };
    let out = dns::upstream_query(uid, q);
    let uq = Query {
        id: uid,
        ..q.clone()
    };
    let r = async {
        up.sock.send(&out).await.ok()?;
        let resp = tokio::time::timeout(UPSTREAM_TIMEOUT, rx)
            .await
            .ok()?
            .ok()?;
        let ans = dns::parse_answer(&resp, &uq).ok()?;
        Some((resp, ans))
    }
    .await;
    up.pending.lock().unwrap().remove(&uid);
    r
}

async fn read_upstream(sh: Arc<Shared>) {
    let Some(up) = &sh.upstream else { return };
    let mut buf = vec![0u8; dns::MAX_RESPONSE];
    loop {
        let n = match up.sock.recv(&mut buf).await {
            Ok(n) => n,
            Err(_) => {
                // e.g. ECONNREFUSED from an ICMP error: waiters time out.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if n < 2 || n >= buf.len() {
            continue;
        }
        let id = u16::from_be_bytes([buf[0], buf[1]]);
        if let Some(tx) = up.pending.lock().unwrap().remove(&id) {
            let _ = tx.send(buf[..n].to_vec());
        }
    }
}

async fn read_log(sh: Arc<Shared>, fd: AsyncFd<OwnedFd>) {
    use std::os::fd::AsRawFd;
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok(mut g) = fd.readable().await else {
            return;
        };
        let r = g.try_io(|fd| {
            // SAFETY: valid buffer.
            let n = unsafe {
                libc::recv(
                    fd.get_ref().as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                )
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        let n = match r {
            Ok(Ok(n)) => n,
            // ENOBUFS: the kernel dropped log lines for us; keep reading.
            Ok(Err(_)) | Err(_) => continue,
        };
        for rec in nflog::parse_datagram(&buf[..n]) {
            let time = rec.time.unwrap_or_else(SystemTime::now);
            let domain = sh.names.get(&rec.dst, time);
            sh.sink.emit(FlowEvent {
                time,
                sandbox: sh.id.clone(),
                proto: rec.proto,
                dst: rec.dst,
                dst_port: rec.dst_port,
                domain,
                answers: Vec::new(),
                verdict: rec.rule.verdict(),
                rule: rec.rule,
            });
        }
    }
}

/// The first `nameserver` of a resolv.conf, on port 53.
pub fn first_nameserver(resolv_conf: &str) -> Option<SocketAddr> {
    resolv_conf.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next()? == "nameserver")
            .then(|| w.next()?.split('%').next()?.parse::<IpAddr>().ok())
            .flatten()
            .map(|ip| SocketAddr::new(ip, 53))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_are_named_as_of_their_packet_time() {
        let mut n = Names {
            map: HashMap::new(),
        };
        let ip: IpAddr = "203.0.113.20".parse().unwrap();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let s = Duration::from_secs;
        n.insert(ip, "a.test", 300, t0);
        n.insert(ip, "b.test", 300, t0 + s(10));
        // A packet sent between the two answers, read after the second: still `a.test`.
        assert_eq!(n.get(&ip, t0 + s(5)).as_deref(), Some("a.test"));
        assert_eq!(n.get(&ip, t0 + s(10)).as_deref(), Some("b.test"));
        // Before any answer, or long after the last one expired: no name.
        assert_eq!(n.get(&ip, t0 - s(1)), None);
        assert_eq!(n.get(&ip, t0 + s(10 + 300) + NAME_GRACE + s(1)), None);
        // Bounded per address: the oldest answers go first.
        for i in 0..10u64 {
            n.insert(ip, &format!("n{i}.test"), 300, t0 + s(20 + i));
        }
        assert_eq!(n.map[&ip].len(), NAMES_PER_ADDR);
        assert_eq!(n.get(&ip, t0 + s(29)).as_deref(), Some("n9.test"));
        assert_eq!(n.get(&ip, t0 + s(5)), None);
    }

    #[test]
    fn resolv_conf_first_nameserver() {
        let s = "# c\nsearch x\nnameserver 10.255.255.53\nnameserver 1.1.1.1\n";
        assert_eq!(
            first_nameserver(s),
            Some("10.255.255.53:53".parse().unwrap())
        );
        assert_eq!(
            first_nameserver("nameserver fe80::1%eth0\n"),
            Some("[fe80::1]:53".parse().unwrap())
        );
        assert_eq!(first_nameserver("nameserver bogus\n"), None);
    }
}
