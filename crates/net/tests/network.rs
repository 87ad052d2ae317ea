//! Real kernel objects, run as root. A test "world" is `hutch_net::testbed`'s three namespaces
//! (without its HTTP servers: these tests run servers of their own), which the test creates:
//! `H` plays the host (the Network's host side runs there, via `NetConfig::host_netns`),
//! `I` the internet (203.0.113.10 and .20, plus 169.254.169.254, behind H's uplink
//! 198.51.100.1/24) and `L` a LAN (192.168.77.10/24 on a second H interface). Nothing leaves
//! these namespaces. Every server listens on every address (IPv4 and IPv6), so without the rules
//! every address would be reachable: a rejected connection is the rules' doing.

// Tests wait on processes and threads synchronously, on threads of their own.
#![allow(clippy::disallowed_methods)]

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use hutch_net::{
    dns, in_netns, tap_info, testbed, FlowEvent, GuestDevice, NetConfig, Network, OwnedObject,
    Policy, Proto, RuleName, SandboxNet, Verdict, GATEWAY_ADDR, GUEST_ADDR, TAP_FLAGS,
};

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sh_out(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The test namespaces ([`testbed::World`], without its HTTP servers: these tests run their
/// own) and every sandbox id used; all removed on drop, even after a failed assert.
struct World {
    bed: testbed::World,
    tag: String,
    ids: Mutex<Vec<String>>,
}

/// `host`, `inet` and `lan` are the test bed's namespaces.
impl std::ops::Deref for World {
    type Target = testbed::World;

    fn deref(&self) -> &testbed::World {
        &self.bed
    }
}

impl World {
    fn new(name: &str) -> World {
        let tag = format!("{name}{}", std::process::id() % 100_000);
        let bed = testbed::World::bare(&format!("n{tag}"));
        let w = World {
            bed,
            tag,
            ids: Mutex::new(Vec::new()),
        };
        let (h, i, l) = (w.host.as_str(), w.inet.as_str(), w.lan.as_str());
        for p in [53, 8080, 8081] {
            serve(i, p, "inet");
        }
        serve_dns(i);
        serve(l, 8080, "lan");
        serve(h, 8080, "host");
        w
    }

    fn id(&self, n: &str) -> String {
        let id = format!("hn-{}-{n}", self.tag);
        self.ids.lock().unwrap().push(id.clone());
        id
    }

    fn cfg(&self, dev: GuestDevice) -> NetConfig {
        NetConfig {
            host_netns: Some(self.host.clone()),
            guest_device: dev,
            upstream_dns: Some(SocketAddr::from((INET1, 53))),
            ..NetConfig::default()
        }
    }

    /// Asserts that nothing of this world's sandboxes is left, by every means available.
    async fn assert_clean(&self, net: &Network) {
        let owned: Vec<OwnedObject> = net.list_owned().await.unwrap();
        let prefix = format!("hn-{}-", self.tag);
        let ours: Vec<_> = owned
            .iter()
            .filter(|o| match o {
                OwnedObject::Link { .. } => true, // host ns belongs to this test alone
                _ => o.sandbox_id().is_some_and(|i| i.starts_with(&prefix)),
            })
            .collect();
        assert!(ours.is_empty(), "left behind: {ours:?}");
        let nslist = sh_out(&["ip", "netns", "list"]);
        assert!(!nslist.contains(&format!("hutch-{prefix}")), "{nslist}");
        let links = sh_out(&["ip", "-n", &self.host, "-o", "link"]);
        assert!(!links.contains(": hv"), "{links}");
        let tables = sh_out(&["ip", "netns", "exec", &self.host, "nft", "list", "tables"]);
        // Only the shared table remains on the host.
        assert!(!tables.contains("hutch-"), "{tables}");
    }
}

impl Drop for World {
    /// The sandboxes' namespaces; `bed` then removes its own.
    fn drop(&mut self) {
        for id in self.ids.lock().unwrap().iter() {
            for n in [format!("hutch-{id}"), format!("hutch-{id}.guest")] {
                let _ = Command::new("ip").args(["netns", "del", &n]).output();
            }
        }
    }
}

/// A TCP server in namespace `ns` answering every connection with `reply`.
fn serve(ns: &str, port: u16, reply: &'static str) {
    let l: TcpListener = in_netns(ns, move || {
        // `::` takes IPv4 as well (as v4-mapped addresses).
        TcpListener::bind(("::", port)).map_err(|e| hutch_net::NetError::Io {
            what: "bind".into(),
            source: e,
        })
    })
    .unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = s.write_all(reply.as_bytes());
        }
    });
}

/// Connects from namespace `ns`; returns the server's greeting or the connect error.
fn connect(ns: &str, ip: impl Into<IpAddr>, port: u16) -> io::Result<String> {
    let ip = ip.into();
    let t = Instant::now();
    let r = in_netns(ns, move || {
        let addr = SocketAddr::from((ip, port));
        Ok((|| {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })())
    })
    .unwrap();
    eprintln!("{ns} -> {ip}:{port}: {r:?} in {:?}", t.elapsed());
    r
}

fn guest(n: &SandboxNet) -> String {
    n.guest_netns.clone().unwrap()
}

#[track_caller]
fn refused(r: io::Result<String>) {
    match r {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
        other => panic!("expected an immediate rejection (ECONNREFUSED), got {other:?}"),
    }
}

const INET1: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const INET2: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const LAN: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 10);
const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const HOST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_reaches_internet_but_never_lan_metadata_or_host() {
    let w = World::new("open");
    let net = Network::new(w.cfg(GuestDevice::Veth)).await.unwrap();
    assert_eq!(net.uplink(), testbed::UPLINK);
    let id = w.id("a");
    let n = net.create(&id, &Policy::Open).await.unwrap().unwrap();
    let g = guest(&n);
    // Control: the LAN and host servers are up and reachable for someone else.
    assert_eq!(connect(&w.host, LAN, 8080).unwrap(), "lan");
    assert_eq!(connect(&w.inet, HOST, 8080).unwrap(), "host");

    assert_eq!(connect(&g, INET1, 8080).unwrap(), "inet");
    assert_eq!(connect(&g, INET2, 8081).unwrap(), "inet");
    refused(connect(&g, LAN, 8080));
    refused(connect(&g, METADATA, 8080));
    refused(connect(&g, HOST, 8080));
    refused(connect(&g, n.transit.host, 8080));
    refused(connect(&g, hutch_net::GATEWAY_ADDR, 8080));
    // DNS anywhere but Hutch's resolver is refused, even to an allowed address.
    refused(connect(&g, INET1, 53));

    net.destroy(&id).await.unwrap();
    net.destroy(&id).await.unwrap(); // idempotent
    w.assert_clean(&net).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_limits_cidrs_and_ports_and_policy_changes_apply_to_next_connection() {
    let w = World::new("allow");
    let net = Network::new(w.cfg(GuestDevice::Veth)).await.unwrap();
    let id = w.id("a");
    let allow10 = Policy::Allow {
        cidrs: vec!["203.0.113.10/32".parse().unwrap()],
        ports: vec![8080],
        domains: vec![],
    };
    let n = net.create(&id, &allow10).await.unwrap().unwrap();
    let g = guest(&n);
    assert_eq!(connect(&g, INET1, 8080).unwrap(), "inet");
    refused(connect(&g, INET1, 8081));
    refused(connect(&g, INET2, 8080));
    refused(connect(&g, LAN, 8080));

    net.set_policy(&id, &Policy::Open).await.unwrap();
    assert_eq!(connect(&g, INET2, 8080).unwrap(), "inet");
    assert_eq!(connect(&g, INET1, 8081).unwrap(), "inet");
    refused(connect(&g, LAN, 8080));

    // A CIDR that covers private space does not open it: the deny list comes first.
    let allow20 = Policy::Allow {
        cidrs: vec![
            "203.0.113.20/32".parse().unwrap(),
            "0.0.0.0/0".parse().unwrap(),
        ],
        ports: vec![],
        domains: vec![],
    };
    net.set_policy(&id, &allow20).await.unwrap();
    assert_eq!(connect(&g, INET2, 8081).unwrap(), "inet");
    refused(connect(&g, LAN, 8080));
    refused(connect(&g, METADATA, 8080));

    let only20 = Policy::Allow {
        cidrs: vec!["203.0.113.20/32".parse().unwrap()],
        ports: vec![],
        domains: vec!["example.com".into()],
    };
    net.set_policy(&id, &only20).await.unwrap();
    refused(connect(&g, INET1, 8080));
    assert_eq!(connect(&g, INET2, 8081).unwrap(), "inet");

    net.set_policy(&id, &Policy::None).await.unwrap();
    refused(connect(&g, INET2, 8080));

    net.destroy(&id).await.unwrap();
    w.assert_clean(&net).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sandboxes_share_the_guest_address_but_cannot_reach_each_other() {
    let w = World::new("two");
    let net = Network::new(w.cfg(GuestDevice::Veth)).await.unwrap();
    let (ia, ib) = (w.id("a"), w.id("b"));
    let a = net.create(&ia, &Policy::Open).await.unwrap().unwrap();
    let b = net.create(&ib, &Policy::Open).await.unwrap().unwrap();
    assert_eq!(a.guest, b.guest);
    assert_ne!(a.transit, b.transit);
    assert_ne!(a.tap_name, b.tap_name);
    for n in [&a, &b] {
        let out = sh_out(&["ip", "-n", &guest(n), "-4", "-o", "addr"]);
        assert!(out.contains(&format!("{GUEST_ADDR}/30")), "{out}");
    }
    serve(&guest(&a), 8080, "guest-a");
    serve(&guest(&b), 8080, "guest-b");
    for (from, to) in [(&a, &b), (&b, &a)] {
        let g = guest(from);
        refused(connect(&g, to.transit.ns, 8080));
        refused(connect(&g, to.transit.host, 8080));
        assert_eq!(connect(&g, INET1, 8080).unwrap(), "inet");
    }
    // Nothing outside reaches a guest either (not even the host).
    assert!(connect(&w.host, a.transit.ns, 8080).is_err());

    net.destroy(&ia).await.unwrap();
    // b is unaffected by a's teardown.
    assert_eq!(connect(&guest(&b), INET2, 8080).unwrap(), "inet");
    net.destroy(&ib).await.unwrap();
    w.assert_clean(&net).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_none_creates_nothing() {
    let w = World::new("none");
    let net = Network::new(w.cfg(GuestDevice::Tap)).await.unwrap();
    let id = w.id("a");
    assert!(net.create(&id, &Policy::None).await.unwrap().is_none());
    w.assert_clean(&net).await;
    assert!(matches!(
        net.set_policy(&id, &Policy::Open).await,
        Err(hutch_net::NetError::NoNic(_))
    ));
    net.destroy(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_is_created_in_the_namespace_and_opened_from_outside() {
    let w = World::new("tap");
    let net = Network::new(w.cfg(GuestDevice::Tap)).await.unwrap();
    let id = w.id("a");
    let n = net.create(&id, &Policy::Open).await.unwrap().unwrap();
    assert!(matches!(
        net.create(&id, &Policy::Open).await,
        Err(hutch_net::NetError::AlreadyExists(_))
    ));
    let fd = net.open_tap(&n).unwrap();
    let (name, flags) = tap_info(&fd).unwrap();
    assert_eq!(name, n.tap_name);
    assert_eq!(flags & TAP_FLAGS, TAP_FLAGS);
    let out = sh_out(&[
        "ip",
        "-n",
        &n.netns,
        "-o",
        "addr",
        "show",
        "dev",
        &n.tap_name,
    ]);
    assert!(out.contains("172.16.0.1/30"), "{out}");
    // Not in the host namespace, nor in ours.
    assert!(!sh_out(&["ip", "-n", &w.host, "-o", "link"]).contains(&n.tap_name));
    assert!(!sh_out(&["ip", "-o", "link"]).contains(&n.tap_name));
    let owned = net.list_owned().await.unwrap();
    for want in [
        OwnedObject::Netns {
            name: n.netns.clone(),
            id: id.clone(),
        },
        OwnedObject::Link {
            name: n.host_veth.clone(),
            id: Some(id.clone()),
        },
    ] {
        assert!(owned.contains(&want), "{want:?} not in {owned:?}");
    }
    // An older Hutch made a host table per sandbox: it is found, and goes with the sandbox.
    let legacy = format!("hutch-{id}");
    sh(&[
        "ip", "netns", "exec", &w.host, "nft", "add", "table", "inet", &legacy,
    ]);
    // A restarted daemon adopts the transit slot instead of handing it out again.
    let net2 = Network::new(w.cfg(GuestDevice::Tap)).await.unwrap();
    let owned = net2.list_owned().await.unwrap();
    let want = OwnedObject::NftTable {
        name: legacy,
        id: id.clone(),
    };
    assert!(owned.contains(&want), "{want:?} not in {owned:?}");
    let id2 = w.id("b");
    let n2 = net2.create(&id2, &Policy::Open).await.unwrap().unwrap();
    assert_ne!(n2.transit, n.transit);
    net2.destroy(&id2).await.unwrap();
    drop(fd);
    drop(net); // its DNS filter's sockets hold the namespace
    net2.destroy(&id).await.unwrap();
    w.assert_clean(&net2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_sandboxes_at_once_without_collision() {
    let w = World::new("fifty");
    let net = Network::new(w.cfg(GuestDevice::Tap)).await.unwrap();
    let ids: Vec<String> = (0..50).map(|i| w.id(&i.to_string())).collect();
    let t = Instant::now();
    let nets = futures::future::join_all(ids.iter().map(|id| net.create(id, &Policy::Open))).await;
    eprintln!("50 concurrent creates: {:?}", t.elapsed());
    let nets: Vec<SandboxNet> = nets.into_iter().map(|r| r.unwrap().unwrap()).collect();
    let mut seen = std::collections::HashSet::new();
    for n in &nets {
        assert!(seen.insert(n.transit.net.to_string()));
        assert!(seen.insert(n.tap_name.clone()));
        assert!(seen.insert(n.host_veth.clone()));
        assert!(seen.insert(n.netns.clone()));
    }
    let owned = net.list_owned().await.unwrap();
    let links = owned
        .iter()
        .filter(|o| matches!(o, OwnedObject::Link { .. }))
        .count();
    let tables = owned
        .iter()
        .filter(|o| matches!(o, OwnedObject::NftTable { .. }))
        .count();
    // One veth each; no per-sandbox table on the host (they share one).
    assert_eq!((links, tables), (50, 0));
    let t = Instant::now();
    for r in futures::future::join_all(ids.iter().map(|id| net.destroy(id))).await {
        r.unwrap();
    }
    eprintln!("50 concurrent destroys: {:?}", t.elapsed());
    w.assert_clean(&net).await;
}

/// The "internet" resolver on 203.0.113.10, UDP port 53 (bound to that address, so its answers
/// come from it): `allowed.test` and every name
/// under `wild.test` → 203.0.113.20, `other.test` → 203.0.113.10, anything else NXDOMAIN.
fn serve_dns(ns: &str) {
    let sock: UdpSocket = in_netns(ns, || {
        UdpSocket::bind((INET1, 53)).map_err(|e| hutch_net::NetError::Io {
            what: "bind dns".into(),
            source: e,
        })
    })
    .unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let Ok(q) = dns::parse_query(&buf[..n]) else {
                continue;
            };
            let addrs: Vec<IpAddr> = match q.name.as_str() {
                "allowed.test" => vec![INET2.into()],
                "other.test" => vec![INET1.into()],
                n if n.ends_with(".wild.test") => vec![INET2.into()],
                _ => vec![],
            };
            let _ = sock.send_to(&dns::build_answer(&buf[..n], &q, &addrs, 30), from);
        }
    });
}

/// Asks `server` for `name`'s A records from namespace `ns`; `(rcode, addresses)`.
fn resolve_at(
    ns: &str,
    server: SocketAddr,
    name: &str,
    tcp: bool,
) -> io::Result<(u8, Vec<IpAddr>)> {
    let owned = name.to_string();
    let r = in_netns(ns, move || {
        let name = owned;
        Ok((|| -> io::Result<(u8, Vec<IpAddr>)> {
            let id = (std::process::id() & 0xffff) as u16;
            let qb = dns::build_query(id, &name, dns::TYPE_A).unwrap();
            let q = dns::parse_query(&qb).unwrap();
            let resp = if tcp {
                let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(3))?;
                s.set_read_timeout(Some(Duration::from_secs(3)))?;
                let mut m = (qb.len() as u16).to_be_bytes().to_vec();
                m.extend_from_slice(&qb);
                s.write_all(&m)?;
                let mut len = [0u8; 2];
                s.read_exact(&mut len)?;
                let mut r = vec![0u8; u16::from_be_bytes(len) as usize];
                s.read_exact(&mut r)?;
                r
            } else {
                let s = UdpSocket::bind(("0.0.0.0", 0))?;
                s.connect(server)?;
                s.set_read_timeout(Some(Duration::from_secs(3)))?;
                s.send(&qb)?;
                let mut r = vec![0u8; 4096];
                let n = s.recv(&mut r)?;
                r.truncate(n);
                r
            };
            let a = dns::parse_answer(&resp, &q).map_err(|e| io::Error::other(format!("{e:?}")))?;
            Ok((a.rcode, a.addrs.into_iter().map(|(ip, _)| ip).collect()))
        })())
    })
    .unwrap();
    eprintln!("{ns}: {name:?} via {server}: {r:?}");
    r
}

fn resolve(ns: &str, name: &str) -> io::Result<(u8, Vec<IpAddr>)> {
    resolve_at(ns, SocketAddr::from((GATEWAY_ADDR, 53)), name, false)
}

/// Sockets of this process that live in the network namespace with inode `ino`
/// (`SIOCGSKNS` on every socket fd).
fn sockets_in_netns(ino: u64) -> usize {
    const SIOCGSKNS: libc::c_ulong = 0x894c;
    let mut n = 0;
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(fd) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let is_sock = std::fs::read_link(e.path())
            .map(|l| l.to_string_lossy().starts_with("socket:"))
            .unwrap_or(false);
        if !is_sock {
            continue;
        }
        // SAFETY: ioctl on a (possibly already closed) fd; a returned ns fd is closed below.
        let nsfd = unsafe { libc::ioctl(fd, SIOCGSKNS) };
        if nsfd < 0 {
            continue;
        }
        // SAFETY: an all-zero stat is a valid out-parameter.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat fills `st` for the fd ioctl just returned to us.
        if unsafe { libc::fstat(nsfd, &mut st) } == 0 && st.st_ino == ino {
            n += 1;
        }
        // SAFETY: `nsfd` is ours (returned by the ioctl above) and closed once.
        unsafe { libc::close(nsfd) };
    }
    n
}

fn netns_inode(name: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/run/netns/{name}"))
        .unwrap()
        .ino()
}

/// Polls the decision log until `pred` holds for some event (2 s at most).
async fn wait_event(
    net: &Network,
    id: &str,
    since: SystemTime,
    pred: impl Fn(&FlowEvent) -> bool,
) -> FlowEvent {
    for _ in 0..40 {
        if let Some(e) = net.events(id, since).into_iter().find(|e| pred(e)) {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no such event; log: {:#?}", net.events(id, since));
}

fn v4(ip: Ipv4Addr) -> IpAddr {
    IpAddr::V4(ip)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_allowlist_is_honest_and_logged() {
    let w = World::new("dns");
    let net = Network::new(w.cfg(GuestDevice::Veth)).await.unwrap();
    let id = w.id("a");
    let since = SystemTime::now();
    let policy = Policy::Allow {
        cidrs: vec![],
        ports: vec![],
        domains: vec!["allowed.test".into(), "*.wild.test".into()],
    };
    let n = net.create(&id, &policy).await.unwrap().unwrap();
    let g = guest(&n);
    let ino = netns_inode(&n.netns);
    assert!(
        sockets_in_netns(ino) >= 3,
        "the filter's sockets live in the sandbox namespace"
    );

    // Before resolution the address is rejected at once.
    refused(connect(&g, INET2, 8080));
    assert_eq!(
        resolve(&g, "allowed.test").unwrap(),
        (dns::RCODE_NOERROR, vec![v4(INET2)])
    );
    assert_eq!(connect(&g, INET2, 8080).unwrap(), "inet");
    let connected = SystemTime::now();
    // Another address of the same server, never resolved through the policy: rejected.
    refused(connect(&g, INET1, 8080));
    // Unlisted names, including the wildcard's own apex: NXDOMAIN.
    assert_eq!(
        resolve(&g, "other.test").unwrap(),
        (dns::RCODE_NXDOMAIN, vec![])
    );
    assert_eq!(
        resolve(&g, "wild.test").unwrap(),
        (dns::RCODE_NXDOMAIN, vec![])
    );
    let via_tcp = resolve_at(
        &g,
        SocketAddr::from((GATEWAY_ADDR, 53)),
        "x.Wild.test",
        true,
    );
    assert_eq!(via_tcp.unwrap(), (dns::RCODE_NOERROR, vec![v4(INET2)]));
    // Other resolvers are unreachable (control: the same query works from the host side).
    let upstream = SocketAddr::from((INET1, 53));
    assert_eq!(
        resolve_at(&w.host, upstream, "other.test", false)
            .unwrap()
            .0,
        dns::RCODE_NOERROR
    );
    // Rejected at once (ICMP admin-prohibited reads as EHOSTUNREACH), not left to time out.
    let direct = resolve_at(&g, upstream, "other.test", false);
    assert!(
        matches!(&direct, Err(e) if e.raw_os_error() == Some(libc::EHOSTUNREACH)),
        "{direct:?}"
    );
    refused(resolve_at(&g, upstream, "other.test", true).map(|_| String::new()));

    // The decision log.
    let e = wait_event(&net, &id, since, |e| e.rule == RuleName::AllowDomain).await;
    assert_eq!((e.dst, e.dst_port, e.proto), (v4(INET2), 8080, Proto::Tcp));
    // Both names resolved to INET2, `x.wild.test` only after this flow: it is named as of the
    // time its packet was logged, however late the log line is read.
    assert_eq!(e.domain.as_deref(), Some("allowed.test"));
    assert!(e.time <= connected, "{:?} is not the packet's time", e.time);
    assert_eq!(e.verdict, Verdict::Allow);
    // Both rejections: the resolved address before it was resolved, and the other one.
    for ip in [INET2, INET1] {
        let e = wait_event(&net, &id, since, |e| {
            e.rule == RuleName::DenyPolicy && e.dst == v4(ip)
        })
        .await;
        assert_eq!(
            (e.dst_port, e.verdict, e.proto),
            (8080, Verdict::Deny, Proto::Tcp)
        );
    }
    let e = wait_event(&net, &id, since, |e| e.rule == RuleName::DnsRefused).await;
    assert_eq!(e.domain.as_deref(), Some("other.test"));
    let e = wait_event(&net, &id, since, |e| e.rule == RuleName::DnsAnswer).await;
    assert_eq!(
        (e.domain.as_deref(), e.answers.clone()),
        (Some("allowed.test"), vec![v4(INET2)])
    );
    let e = wait_event(&net, &id, since, |e| e.rule == RuleName::DenyDns).await;
    assert_eq!((e.dst, e.dst_port, e.proto), (v4(INET1), 53, Proto::Udp));
    wait_event(&net, &id, since, |e| e.rule == RuleName::Dns).await;

    // A policy change applies to the next query, and forgets what the old one resolved.
    let policy2 = Policy::Allow {
        cidrs: vec![],
        ports: vec![8081],
        domains: vec!["other.test".into()],
    };
    net.set_policy(&id, &policy2).await.unwrap();
    assert_eq!(
        resolve(&g, "allowed.test").unwrap(),
        (dns::RCODE_NXDOMAIN, vec![])
    );
    refused(connect(&g, INET2, 8081));
    assert_eq!(
        resolve(&g, "other.test").unwrap(),
        (dns::RCODE_NOERROR, vec![v4(INET1)])
    );
    assert_eq!(connect(&g, INET1, 8081).unwrap(), "inet");
    refused(connect(&g, INET1, 8080)); // the policy's ports still apply

    net.destroy(&id).await.unwrap();
    w.assert_clean(&net).await;
    assert!(net.events(&id, since).is_empty());
    let mut left = usize::MAX;
    for _ in 0..40 {
        left = sockets_in_netns(ino);
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(left, 0, "sockets still hold the destroyed namespace");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_resolves_anything_and_none_resolves_nothing() {
    let w = World::new("dnsopen");
    let net = Network::new(w.cfg(GuestDevice::Veth)).await.unwrap();
    let id = w.id("a");
    let n = net.create(&id, &Policy::Open).await.unwrap().unwrap();
    let g = guest(&n);
    assert_eq!(
        resolve(&g, "other.test").unwrap(),
        (dns::RCODE_NOERROR, vec![v4(INET1)])
    );
    assert_eq!(
        resolve(&g, "q.wild.test").unwrap(),
        (dns::RCODE_NOERROR, vec![v4(INET2)])
    );
    // The upstream's own NXDOMAIN passes through.
    assert_eq!(
        resolve(&g, "nope.test").unwrap(),
        (dns::RCODE_NXDOMAIN, vec![])
    );
    net.set_policy(&id, &Policy::None).await.unwrap();
    assert_eq!(
        resolve(&g, "other.test").unwrap(),
        (dns::RCODE_NXDOMAIN, vec![])
    );
    net.destroy(&id).await.unwrap();
    w.assert_clean(&net).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_denied_connections_gives_a_bounded_log() {
    let w = World::new("flood");
    let cfg = NetConfig {
        event_rate: 5,
        event_burst: 20,
        ..w.cfg(GuestDevice::Veth)
    };
    let net = Network::new(cfg).await.unwrap();
    let id = w.id("a");
    let none = Policy::Allow {
        cidrs: vec![],
        ports: vec![],
        domains: vec![],
    };
    let n = net.create(&id, &none).await.unwrap().unwrap();
    let g = guest(&n);
    let since = SystemTime::now();
    let t = Instant::now();
    let refusals = in_netns(&g, || {
        let mut refused = 0;
        for port in 0..500u16 {
            let addr = SocketAddr::from((INET1, 10_000 + port));
            if let Err(e) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                if e.kind() == io::ErrorKind::ConnectionRefused {
                    refused += 1;
                }
            }
        }
        Ok(refused)
    })
    .unwrap();
    let flood = t.elapsed();
    assert_eq!(refusals, 500, "every connection is rejected, logged or not");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let secs = t.elapsed().as_secs_f64();
    let got = net
        .events(&id, since)
        .into_iter()
        .filter(|e| e.rule == RuleName::DenyPolicy)
        .count();
    eprintln!(
        "flood of 500 in {flood:?}: {got} events, {} dropped",
        net.events_dropped(&id)
    );
    assert!(got >= 10, "{got}");
    assert!(
        got as f64 <= 20.0 + 5.0 * secs + 1.0,
        "{got} events in {secs:.1} s"
    );
    net.destroy(&id).await.unwrap();
    w.assert_clean(&net).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_port_reaches_the_guest_from_host_loopback_only() {
    let w = World::new("port");
    let net = Network::new(w.cfg(GuestDevice::Veth)).await.unwrap();
    let (ia, ib) = (w.id("a"), w.id("b"));
    let a = net
        .create(
            &ia,
            &Policy::Allow {
                cidrs: vec![],
                ports: vec![],
                domains: vec![],
            },
        )
        .await
        .unwrap()
        .unwrap();
    net.create(&ib, &Policy::Open).await.unwrap().unwrap();
    serve(&guest(&a), 8000, "guest");
    let lo = Ipv4Addr::LOCALHOST;

    let p = net.publish(&ia, 8000, 0).await.unwrap();
    assert_eq!(p.guest_port, 8000);
    assert_eq!(p.host.ip(), IpAddr::V4(lo));
    let hp = p.host.port();
    // Reached from the host namespace's loopback, as often as asked.
    for _ in 0..3 {
        assert_eq!(connect(&w.host, lo, hp).unwrap(), "guest");
    }
    // Not from anywhere else: the listener is on loopback only.
    refused(connect(&w.inet, HOST, hp));
    // The guest gains nothing: the host port is not reachable from it.
    refused(connect(&guest(&a), HOST, hp));
    assert_eq!(net.published(&ia), vec![p]);

    // Publishing again with any port or the same one is the same publication.
    assert_eq!(net.publish(&ia, 8000, 0).await.unwrap(), p);
    assert_eq!(net.publish(&ia, 8000, hp).await.unwrap(), p);
    let other = free_port_in(&w.host);
    assert!(matches!(
        net.publish(&ia, 8000, other).await,
        Err(hutch_net::NetError::AlreadyPublished { guest_port: 8000, host_port }) if host_port == hp
    ));
    // Another sandbox cannot take the host port.
    assert!(matches!(
        net.publish(&ib, 8000, hp).await,
        Err(hutch_net::NetError::PortInUse(port)) if port == hp
    ));
    assert!(matches!(
        net.publish("hn-nope", 8000, 0).await,
        Err(hutch_net::NetError::NotFound(_))
    ));

    // Unpublished: closed.
    assert!(net.unpublish(&ia, 8000).await.unwrap());
    assert!(!net.unpublish(&ia, 8000).await.unwrap());
    refused(connect(&w.host, lo, hp));
    assert!(net.published(&ia).is_empty());

    // Published on a chosen port; destroyed: closed.
    let p = net.publish(&ia, 8000, other).await.unwrap();
    assert_eq!(p.host.port(), other);
    assert_eq!(connect(&w.host, lo, other).unwrap(), "guest");
    net.destroy(&ia).await.unwrap();
    net.destroy(&ib).await.unwrap();
    refused(connect(&w.host, lo, other));
    w.assert_clean(&net).await;
}

/// A port nobody listens on in namespace `ns`'s loopback.
fn free_port_in(ns: &str) -> u16 {
    in_netns(ns, || {
        let l = TcpListener::bind("127.0.0.1:0").map_err(|e| hutch_net::NetError::Io {
            what: "bind".into(),
            source: e,
        })?;
        Ok(l.local_addr().unwrap().port())
    })
    .unwrap()
}

/// Under a policy allowing the domain `allowed.test` only, guest `g` resolves it, reaches its
/// address (and not another), and the flow is logged under the name.
async fn allowlist_of_allowed_test_holds(net: &Network, id: &str, g: &str, since: SystemTime) {
    assert_eq!(resolve(g, "allowed.test").unwrap(), (0, vec![v4(INET2)]));
    assert_eq!(connect(g, INET2, 8080).unwrap(), "inet");
    refused(connect(g, INET1, 8080));
    wait_event(net, id, since, |e| {
        e.verdict == Verdict::Allow
            && e.dst == v4(INET2)
            && e.domain.as_deref() == Some("allowed.test")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_network_gets_its_dns_filter_and_log_back() {
    let w = World::new("adopt");
    let id = w.id("a");
    let policy = Policy::Allow {
        cidrs: vec![],
        ports: vec![],
        domains: vec!["allowed.test".into()],
    };
    let g = {
        // The first daemon creates the network, then goes away without destroying it.
        let net = Network::new(w.cfg(GuestDevice::Veth)).await.unwrap();
        let n = net.create(&id, &policy).await.unwrap().unwrap();
        guest(&n)
    };
    // Its tasks are aborted; wait until their sockets (which hold the DNS address) are gone,
    // as they are when a daemon process dies.
    let ino = netns_inode(&format!("hutch-{id}"));
    for _ in 0..100 {
        if sockets_in_netns(ino) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let net = Network::new(w.cfg(GuestDevice::Veth)).await.unwrap();
    let since = SystemTime::now();
    net.adopt(&id, &policy, None).await.unwrap();
    net.adopt(&id, &policy, None).await.unwrap(); // idempotent
    allowlist_of_allowed_test_holds(&net, &id, &g, since).await;
    wait_event(&net, &id, since, |e| {
        e.verdict == Verdict::Deny && e.dst == v4(INET1)
    })
    .await;
    // Ports can be published on an adopted network, and go with it.
    serve(&g, 8000, "guest");
    let p = net.publish(&id, 8000, 0).await.unwrap();
    assert_eq!(
        connect(&w.host, Ipv4Addr::LOCALHOST, p.host.port()).unwrap(),
        "guest"
    );
    net.destroy(&id).await.unwrap();
    w.assert_clean(&net).await;
}

/// A TCP server in namespace `ns` answering every connection with the client address it sees,
/// and recording it.
fn serve_who(ns: &str, port: u16) -> std::sync::Arc<Mutex<Vec<IpAddr>>> {
    let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
    let l: TcpListener = in_netns(ns, move || {
        TcpListener::bind(("0.0.0.0", port)).map_err(|e| hutch_net::NetError::Io {
            what: "bind".into(),
            source: e,
        })
    })
    .unwrap();
    let rec = seen.clone();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let ip = s.peer_addr().unwrap().ip();
            rec.lock().unwrap().push(ip);
            let _ = s.write_all(ip.to_string().as_bytes());
        }
    });
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wireguard_egress_goes_through_the_tunnel_and_fails_closed() {
    use hutch_net::testbed::wireguard_peer;
    use hutch_net::wg::public_key;
    let w = World::new("wg");
    let net = Network::new(w.cfg(GuestDevice::Veth)).await.unwrap();
    let seen = serve_who(&w.inet, 8090);
    let (sandbox_key, peer_key) = ([7u8; 32], [9u8; 32]);
    let endpoint = SocketAddr::from((INET2, 51820));
    let peer = wireguard_peer(
        &w.inet,
        "wgpeer",
        peer_key,
        public_key(&sandbox_key),
        endpoint,
        "10.99.0.1/24".parse().unwrap(),
        vec!["10.99.0.2/32".parse().unwrap()],
    )
    .await
    .unwrap();
    let cfg = hutch_net::WireGuardConfig {
        private_key: sandbox_key,
        peer_public_key: public_key(&peer_key),
        preshared_key: None,
        endpoint,
        address: "10.99.0.2/32".parse().unwrap(),
        allowed_ips: vec!["0.0.0.0/0".parse().unwrap()],
        keepalive: None,
        dns: None,
    };
    let (it, id) = (w.id("t"), w.id("d"));
    let since = SystemTime::now();
    let t = net
        .create_with(&it, &Policy::Open, Some(&cfg))
        .await
        .unwrap()
        .unwrap();
    let d = net.create(&id, &Policy::Open).await.unwrap().unwrap();
    let (gt, gd) = (guest(&t), guest(&d));

    // Control: without a tunnel the server sees the host's uplink address.
    assert_eq!(connect(&gd, INET1, 8090).unwrap(), HOST.to_string());
    // With one, it sees the tunnel's address: the traffic came out of the peer.
    assert_eq!(connect(&gt, INET1, 8090).unwrap(), "10.99.0.2");
    // DNS goes through the tunnel as well (the upstream is behind the peer).
    assert_eq!(resolve(&gt, "allowed.test").unwrap(), (0, vec![v4(INET2)]));
    // The policy still applies inside the tunnel.
    refused(connect(&gt, LAN, 8080));
    // The endpoint itself is reachable only for the encrypted UDP: the guest is rejected...
    refused(connect(&gt, INET2, 8080));
    wait_event(&net, &it, since, |e| {
        e.rule == RuleName::DenyTunnel && e.dst == v4(INET2)
    })
    .await;
    // ...and the namespace itself cannot send anything else out of the veth.
    assert!(connect(&t.netns, INET2, 8080).is_err());
    // Spoofed sources get nowhere either: not out of the tunnel, not out of the veth.
    give_spoofed_addresses(&gt);
    let wires = [
        (w.inet.as_str(), "wgpeer"),
        (w.inet.as_str(), testbed::UPLINK_PEER),
    ];
    spoofing_leaves_nothing(&net, &it, &gt, &wires, b"tunnel-spoof").await;

    // Peer down: connections fail, and nothing leaks out directly.
    drop(peer);
    let before = seen.lock().unwrap().len();
    assert!(connect(&gt, INET1, 8090).is_err());
    assert!(connect(&gt, INET1, 8080).is_err());
    assert_eq!(
        seen.lock().unwrap().len(),
        before,
        "{:?}",
        seen.lock().unwrap()
    );
    // The tunnel-less sandbox is unaffected.
    assert_eq!(connect(&gd, INET1, 8090).unwrap(), HOST.to_string());

    net.destroy(&it).await.unwrap();
    net.destroy(&id).await.unwrap();
    w.assert_clean(&net).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn networks_handed_out_from_spares_keep_every_guarantee() {
    let w = World::new("spare");
    let cfg = NetConfig {
        spares: 2,
        ..w.cfg(GuestDevice::Veth)
    };
    let (ia, ib) = (w.id("a"), w.id("b"));
    let allow = Policy::Allow {
        cidrs: vec![],
        ports: vec![],
        domains: vec!["allowed.test".into()],
    };
    let (a, b) = {
        let net = Network::new(cfg.clone()).await.unwrap();
        net.refill().await.unwrap();
        assert_eq!(net.spares(), 2);
        // Spares are no sandbox's: nothing of them is listed as owned (the host namespace is
        // this test's alone; namespaces are host-wide).
        let owned = net.list_owned().await.unwrap();
        assert!(
            owned.iter().all(|o| match o {
                OwnedObject::Link { .. } => false,
                OwnedObject::Netns { name, .. } => !name.contains("spare"),
                OwnedObject::NftTable { .. } => true,
            }),
            "{owned:?}"
        );
        // The host gains an address after the spares were made: it is denied all the same.
        let late = Ipv4Addr::new(203, 0, 113, 99);
        sh(&[
            "ip",
            "-n",
            &w.host,
            "addr",
            "add",
            "203.0.113.99/32",
            "dev",
            "lo",
        ]);
        let since = SystemTime::now();
        let a = net.create(&ia, &allow).await.unwrap().unwrap();
        let b = net.create(&ib, &Policy::Open).await.unwrap().unwrap();
        assert_eq!(net.spares(), 0, "both came from the pool");
        // Renamed to the sandboxes' own names, and tagged with their ids.
        for (id, n) in [(&ia, &a), (&ib, &b)] {
            let names = hutch_net::Names::new(id).unwrap();
            assert_eq!(
                (&n.netns, &n.tap_name, &n.host_veth),
                (&names.netns, &names.tap, &names.host_veth)
            );
            let links = sh_out(&["ip", "-n", &n.netns, "-o", "link"]);
            assert!(
                links.contains(&names.tap) && links.contains(&names.ns_veth),
                "{links}"
            );
            let host = sh_out(&["ip", "-n", &w.host, "-o", "link", "show", &n.host_veth]);
            assert!(host.contains(&format!("alias hutch:{id}")), "{host}");
        }
        assert!(!sh_out(&["ip", "netns", "list"]).contains("hutch.spare-"));

        // a: the domain allowlist, its DNS filter and log work on the handed-out table.
        let ga = guest(&a);
        assert_eq!(resolve(&ga, "other.test").unwrap().0, dns::RCODE_NXDOMAIN);
        allowlist_of_allowed_test_holds(&net, &ia, &ga, since).await;
        // b: open, yet never the LAN, metadata, host or a; a cannot reach b either.
        let gb = guest(&b);
        assert_eq!(connect(&gb, INET1, 8080).unwrap(), "inet");
        refused(connect(&gb, LAN, 8080));
        refused(connect(&gb, METADATA, 8080));
        refused(connect(&gb, HOST, 8080));
        refused(connect(&gb, late, 8080));
        refused(connect(&gb, INET1, 53));
        serve(&ga, 8080, "guest-a");
        serve(&gb, 8080, "guest-b");
        for (from, to) in [(&ga, &b), (&gb, &a)] {
            refused(connect(from, to.transit.ns, 8080));
            refused(connect(from, to.transit.host, 8080));
        }
        // Policies change on a handed-out table as on any other.
        net.set_policy(&ib, &Policy::None).await.unwrap();
        refused(connect(&gb, INET1, 8080));
        net.set_policy(&ib, &Policy::Open).await.unwrap();
        assert_eq!(connect(&gb, INET1, 8080).unwrap(), "inet");
        // Made again ahead, then fewer kept; the daemon then goes away without destroying
        // anything.
        net.refill().await.unwrap();
        assert_eq!(net.spares(), 2);
        net.set_spares(1).await;
        assert_eq!(net.spares(), 1);
        net.refill().await.unwrap();
        assert_eq!(net.spares(), 1);
        (a, b)
    };
    let ino = netns_inode(&a.netns);
    for _ in 0..100 {
        if sockets_in_netns(ino) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The next daemon adopts both (a's filter answers from the spare's table again) and
    // removes what is left of the spares.
    let net = Network::new(cfg).await.unwrap();
    net.adopt(&ia, &allow, None).await.unwrap();
    net.adopt(&ib, &Policy::Open, None).await.unwrap();
    let since = SystemTime::now();
    allowlist_of_allowed_test_holds(&net, &ia, &guest(&a), since).await;
    assert_eq!(connect(&guest(&b), INET1, 8080).unwrap(), "inet");
    net.destroy(&ia).await.unwrap();
    net.destroy(&ib).await.unwrap();
    w.assert_clean(&net).await;
    assert!(!sh_out(&["ip", "netns", "list"]).contains("hutch.spare-"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_ipv6_cannot_leave_even_given_an_address_and_a_route_out() {
    let w = World::new("six");
    // A global IPv6 address of the host's, there before the Network reads the host's addresses.
    let host6: Ipv6Addr = "2001:db8::10".parse().unwrap();
    sh(&[
        "ip",
        "-n",
        &w.host,
        "addr",
        "add",
        "2001:db8::10/128",
        "dev",
        "lo",
    ]);
    // Control: the host's server (every address) answers there.
    assert_eq!(connect(&w.host, host6, 8080).unwrap(), "host");
    let net = Network::new(w.cfg(GuestDevice::Veth)).await.unwrap();
    let id = w.id("a");
    let n = net.create(&id, &Policy::Open).await.unwrap().unwrap();
    let names = hutch_net::Names::new(&id).unwrap();
    let (g, ns) = (guest(&n), n.netns.clone());
    let ip6 = |netns: &str, args: &[&str]| {
        let mut v = vec!["ip", "-n", netns, "-6"];
        v.extend_from_slice(args);
        sh(&v);
    };
    let mac_of = |netns: &str, dev: &str| {
        let path = format!("/sys/class/net/{dev}/address");
        sh_out(&["ip", "netns", "exec", netns, "cat", &path])
            .trim()
            .to_string()
    };
    // Hutch gives the guest no IPv6 address; give it one, and the TAP side one, with static
    // neighbours both ways (the namespace answers no neighbour discovery: its input chain
    // rejects everything from the guest but DNS over IPv4).
    ip6(
        &g,
        &[
            "addr",
            "add",
            "fd00:1::2/64",
            "dev",
            &names.guest_veth,
            "nodad",
        ],
    );
    ip6(&g, &["route", "add", "default", "via", "fd00:1::1"]);
    ip6(
        &ns,
        &["addr", "add", "fd00:1::1/64", "dev", &n.tap_name, "nodad"],
    );
    let (tap_mac, guest_mac) = (mac_of(&ns, &n.tap_name), mac_of(&g, &names.guest_veth));
    let neigh = [
        "neigh",
        "replace",
        "fd00:1::1",
        "lladdr",
        &tap_mac,
        "dev",
        &names.guest_veth,
    ];
    ip6(&g, &[&neigh[..], &["nud", "permanent"]].concat());
    let neigh = [
        "neigh",
        "replace",
        "fd00:1::2",
        "lladdr",
        &guest_mac,
        "dev",
        &n.tap_name,
    ];
    ip6(&ns, &[&neigh[..], &["nud", "permanent"]].concat());
    // The namespace routes no IPv6: nothing gets out.
    assert!(connect(&g, host6, 8080).is_err());
    // Even with a route out and IPv6 forwarding on in the namespace, the rules reject at once
    // what the deny list covers (the host's own addresses, ULA), under `open`.
    ip6(
        &ns,
        &[
            "addr",
            "add",
            "fd00:2::2/64",
            "dev",
            &names.ns_veth,
            "nodad",
        ],
    );
    ip6(
        &w.host,
        &["addr", "add", "fd00:2::1/64", "dev", &n.host_veth, "nodad"],
    );
    ip6(&ns, &["route", "add", "default", "via", "fd00:2::1"]);
    let fwd = "net.ipv6.conf.all.forwarding=1";
    sh(&["ip", "netns", "exec", &ns, "sysctl", "-qw", fwd]);
    refused(connect(&g, host6, 8080));
    refused(connect(&g, "fd00:2::1".parse::<Ipv6Addr>().unwrap(), 8080));
    // The namespace itself answers nothing over IPv6, not even DNS.
    refused(connect(&g, "fd00:1::1".parse::<Ipv6Addr>().unwrap(), 53));
    wait_event(&net, &id, SystemTime::UNIX_EPOCH, |e| {
        e.verdict == Verdict::Deny && e.dst == IpAddr::V6(host6)
    })
    .await;
    net.destroy(&id).await.unwrap();
    w.assert_clean(&net).await;
}

/// Every IPv4 packet crossing device `dev` of namespace `ns` (either way) from [`Capture::start`]
/// to [`Capture::stop`]: an `AF_PACKET` socket, so it sees what a capture on that wire sees.
struct Capture {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Vec<u8>>>,
}

impl Capture {
    fn start(ns: &str, dev: &str) -> Capture {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let name = std::ffi::CString::new(dev).unwrap();
        let fd: OwnedFd = in_netns(ns, move || {
            let proto = (libc::ETH_P_IP as u16).to_be();
            // SAFETY: a fresh descriptor, owned at once; `bind` and `setsockopt` get valid
            // pointers to initialized structures of the sizes passed.
            unsafe {
                let fd = libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                    i32::from(proto),
                );
                let err = |what: &str| hutch_net::NetError::Io {
                    what: what.into(),
                    source: io::Error::last_os_error(),
                };
                if fd < 0 {
                    return Err(err("packet socket"));
                }
                let fd = OwnedFd::from_raw_fd(fd);
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = proto;
                sll.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
                let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                if libc::bind(
                    fd.as_raw_fd(),
                    (&sll as *const libc::sockaddr_ll).cast(),
                    len,
                ) < 0
                {
                    return Err(err("bind packet socket"));
                }
                let tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 50_000,
                };
                let tlen = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
                let tvp = (&tv as *const libc::timeval).cast();
                if libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    tvp,
                    tlen,
                ) < 0
                {
                    return Err(err("packet socket timeout"));
                }
                Ok(fd)
            }
        })
        .unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut buf = vec![0u8; 65536];
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                // SAFETY: `buf` is valid for its length; the descriptor lives in this thread.
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 {
                    seen.push(buf[..n as usize].to_vec());
                }
            }
            seen
        });
        Capture { stop, thread }
    }

    /// Stops capturing (after what is in flight has had time to arrive) and returns the packets.
    async fn stop(self) -> Vec<Vec<u8>> {
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

/// The packets of `seen` that carry `marker` anywhere (the packet itself, or an ICMP error
/// quoting it), as (source, destination, length).
fn carrying(seen: &[Vec<u8>], marker: &[u8]) -> Vec<(Ipv4Addr, Ipv4Addr, usize)> {
    seen.iter()
        .filter(|p| p.len() >= 20 && p.windows(marker.len()).any(|w| w == marker))
        .map(|p| (ip_at(p, 12), ip_at(p, 16), p.len()))
        .collect()
}

fn ip_at(p: &[u8], i: usize) -> Ipv4Addr {
    Ipv4Addr::new(p[i], p[i + 1], p[i + 2], p[i + 3])
}

/// Sends one UDP datagram from namespace `ns` with source address `from` (which must be one
/// of its addresses).
fn send_udp_from(ns: &str, from: Ipv4Addr, to: SocketAddr, payload: &'static [u8]) {
    in_netns(ns, move || {
        let io = |source| hutch_net::NetError::Io {
            what: "spoofed send".into(),
            source,
        };
        let s = UdpSocket::bind((from, 0)).map_err(io)?;
        s.send_to(payload, to).map_err(io)?;
        Ok(())
    })
    .unwrap();
}

/// Sources a guest forges in [`spoofing_leaves_nothing`]: an internet host, the metadata
/// service, a LAN host and the host's own uplink address.
const SPOOFED: [Ipv4Addr; 4] = [Ipv4Addr::new(203, 0, 113, 30), METADATA, LAN, HOST];

/// Gives guest namespace `g` every [`SPOOFED`] address, so its sockets can send from them.
fn give_spoofed_addresses(g: &str) {
    for a in SPOOFED {
        sh(&[
            "ip",
            "-n",
            g,
            "addr",
            "add",
            &format!("{a}/32"),
            "dev",
            "lo",
        ]);
    }
}

/// Guest `g` of sandbox `id` sends UDP from every [`SPOOFED`] source to INET1:9999 and
/// INET2:9999 (denied, and allowed under the tests' `allow` policies); the namespace sees them
/// (its log names them), yet nothing carrying their bytes crosses any of `wires` ((namespace,
/// device)): not the packets, nor an answer quoting them.
async fn spoofing_leaves_nothing(
    net: &Network,
    id: &str,
    g: &str,
    wires: &[(&str, &str)],
    marker: &'static [u8],
) {
    let caps: Vec<Capture> = wires.iter().map(|(ns, d)| Capture::start(ns, d)).collect();
    let since = SystemTime::now();
    for from in SPOOFED {
        for to in [INET1, INET2] {
            send_udp_from(g, from, SocketAddr::from((to, 9999)), marker);
        }
    }
    wait_event(net, id, since, |e| {
        e.rule == RuleName::DenySpoof && e.dst == v4(INET1) && e.dst_port == 9999
    })
    .await;
    for ((ns, dev), cap) in wires.iter().zip(caps) {
        let seen = cap.stop().await;
        let leaked = carrying(&seen, marker);
        assert!(leaked.is_empty(), "on {ns}/{dev}: {leaked:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_guest_packets_and_their_rejections_never_leave() {
    let w = World::new("spoof");
    let cfg = NetConfig {
        spares: 1,
        ..w.cfg(GuestDevice::Veth)
    };
    let net = Network::new(cfg).await.unwrap();
    let allow = Policy::Allow {
        cidrs: vec!["203.0.113.20/32".parse().unwrap()],
        ports: vec![],
        domains: vec![],
    };
    let (ia, ib) = (w.id("a"), w.id("b"));
    let a = net.create(&ia, &allow).await.unwrap().unwrap();
    net.refill().await.unwrap();
    let b = net.create(&ib, &allow).await.unwrap().unwrap();
    assert_eq!(net.spares(), 0, "b was handed out from the pool");
    let uplink = [(w.inet.as_str(), testbed::UPLINK_PEER)];

    // Control: the capture sees what the guest sends with its own address (masqueraded).
    let ga = guest(&a);
    let cap = Capture::start(&w.inet, testbed::UPLINK_PEER);
    send_udp_from(&ga, GUEST_ADDR, SocketAddr::from((INET2, 9999)), b"own-0");
    let seen = carrying(&cap.stop().await, b"own-0");
    assert!(seen.iter().any(|(src, ..)| *src == HOST), "{seen:?}");

    // Under `allow`, then after `net set --net none`; on a network made cold and on one
    // handed out from the pool.
    for (id, n, markers) in [
        (&ia, &a, [&b"cold-allow"[..], b"cold-none"]),
        (&ib, &b, [&b"warm-allow"[..], b"warm-none"]),
    ] {
        let g = guest(n);
        give_spoofed_addresses(&g);
        spoofing_leaves_nothing(&net, id, &g, &uplink, markers[0]).await;
        net.set_policy(id, &Policy::None).await.unwrap();
        spoofing_leaves_nothing(&net, id, &g, &uplink, markers[1]).await;
    }
    net.destroy(&ia).await.unwrap();
    net.destroy(&ib).await.unwrap();
    w.assert_clean(&net).await;
}

/// Sends one UDP datagram from namespace `ns` to `to` and waits (1 s at most) for what comes
/// back: an answer, or the error an ICMP answer raises on the socket.
fn udp_probe(ns: &str, to: SocketAddr) -> io::Result<usize> {
    in_netns(ns, move || {
        Ok((|| {
            let s = UdpSocket::bind(("0.0.0.0", 0))?;
            s.connect(to)?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            s.send(b"probe")?;
            s.recv(&mut [0u8; 64])
        })())
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_answer_the_guest_and_nobody_else() {
    let w = World::new("answer");
    let net = Network::new(w.cfg(GuestDevice::Veth)).await.unwrap();
    let id = w.id("a");
    let n = net.create(&id, &Policy::Open).await.unwrap().unwrap();
    // The guest's own denied packets are answered at once (admin-prohibited: EHOSTUNREACH).
    let r = udp_probe(&guest(&n), SocketAddr::from((LAN, 9)));
    assert_eq!(
        r.map_err(|e| e.raw_os_error()),
        Err(Some(libc::EHOSTUNREACH))
    );
    // Denied packets from the other side are not: no ICMP or RST leaves by the veth.
    let r = udp_probe(&w.host, SocketAddr::from((n.transit.ns, 9)));
    assert!(
        matches!(&r, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
        "{r:?}"
    );
    let r = udp_probe(&w.host, SocketAddr::from((GATEWAY_ADDR, 9)));
    assert!(
        matches!(&r, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
        "{r:?}"
    );
    net.destroy(&id).await.unwrap();
    w.assert_clean(&net).await;
}

/// The internet checksum (RFC 1071) of `b`.
fn inet_checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends one ICMP message of type `ty` carrying `payload` from namespace `ns` to `to`, through
/// a raw socket (so the namespace's own stack sends it, as it sends its answers).
fn send_icmp(ns: &str, to: Ipv4Addr, ty: u8, payload: &'static [u8]) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    in_netns(ns, move || {
        let mut m = vec![ty, 0, 0, 0, 0x68, 0x75, 0, 1];
        m.extend_from_slice(payload);
        let c = inet_checksum(&m);
        m[2..4].copy_from_slice(&c.to_be_bytes());
        let err = |what: &str| hutch_net::NetError::Io {
            what: what.into(),
            source: io::Error::last_os_error(),
        };
        // SAFETY: a fresh descriptor, owned at once; `sendto` gets a valid buffer and a valid
        // `sockaddr_in` of the size passed.
        unsafe {
            let fd = libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_ICMP,
            );
            if fd < 0 {
                return Err(err("raw socket"));
            }
            let fd = OwnedFd::from_raw_fd(fd);
            let mut sin: libc::sockaddr_in = std::mem::zeroed();
            sin.sin_family = libc::AF_INET as u16;
            sin.sin_addr.s_addr = u32::from(to).to_be();
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let sa = (&sin as *const libc::sockaddr_in).cast();
            if libc::sendto(fd.as_raw_fd(), m.as_ptr().cast(), m.len(), 0, sa, len) < 0 {
                return Err(err("send ICMP"));
            }
        }
        Ok(())
    })
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_leaves_the_uplink_from_a_transit_address() {
    let w = World::new("masq");
    let net = Network::new(w.cfg(GuestDevice::Veth)).await.unwrap();
    let id = w.id("a");
    let n = net.create(&id, &Policy::Open).await.unwrap().unwrap();
    let cap = Capture::start(&w.inet, testbed::UPLINK_PEER);
    // An echo request starts a flow the host's conntrack tracks, so it is masqueraded; an echo
    // reply nobody asked for is tracked by nobody, so no NAT rule ever sees it.
    send_icmp(&n.netns, INET1, 8, b"masq-request");
    send_icmp(&n.netns, INET1, 0, b"masq-reply");
    let seen = cap.stop().await;
    let pool: ipnet::Ipv4Net = hutch_net::DEFAULT_TRANSIT_POOL;
    let request = carrying(&seen, b"masq-request");
    assert!(request.iter().any(|(src, ..)| *src == HOST), "{request:?}");
    let transit: Vec<_> = seen
        .iter()
        .filter(|p| p.len() >= 20 && pool.contains(&ip_at(p, 12)))
        .map(|p| (ip_at(p, 12), ip_at(p, 16), p.len()))
        .collect();
    assert!(transit.is_empty(), "left unmasqueraded: {transit:?}");
    assert_eq!(carrying(&seen, b"masq-reply"), vec![]);
    net.destroy(&id).await.unwrap();
    w.assert_clean(&net).await;
}

/// A resolver on `addr`:53 (UDP) in namespace `ns` that records every message it receives,
/// byte for byte, and answers as [`serve_dns`] does.
fn serve_recording_dns(ns: &str, addr: Ipv4Addr) -> std::sync::Arc<Mutex<Vec<Vec<u8>>>> {
    let sock: UdpSocket = in_netns(ns, move || {
        UdpSocket::bind((addr, 53)).map_err(|e| hutch_net::NetError::Io {
            what: "bind dns".into(),
            source: e,
        })
    })
    .unwrap();
    let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
    let rec = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            rec.lock().unwrap().push(buf[..n].to_vec());
            let Ok(q) = dns::parse_query(&buf[..n]) else {
                continue;
            };
            let addrs: Vec<IpAddr> = match q.name.as_str() {
                "allowed.test" => vec![INET2.into()],
                _ => vec![],
            };
            let _ = sock.send_to(&dns::build_answer(&buf[..n], &q, &addrs, 30), from);
        }
    });
    seen
}

/// Sends `msg` exactly as given to the sandbox's resolver from namespace `ns` (over TCP as one
/// framed message) and returns the reply.
fn ask_raw(ns: &str, msg: Vec<u8>, tcp: bool) -> io::Result<Vec<u8>> {
    let server = SocketAddr::from((GATEWAY_ADDR, 53));
    in_netns(ns, move || {
        Ok((|| {
            if tcp {
                let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(3))?;
                s.set_read_timeout(Some(Duration::from_secs(3)))?;
                let mut m = (msg.len() as u16).to_be_bytes().to_vec();
                m.extend_from_slice(&msg);
                s.write_all(&m)?;
                let mut len = [0u8; 2];
                s.read_exact(&mut len)?;
                let mut r = vec![0u8; u16::from_be_bytes(len) as usize];
                s.read_exact(&mut r)?;
                Ok(r)
            } else {
                let s = UdpSocket::bind(("0.0.0.0", 0))?;
                s.connect(server)?;
                s.set_read_timeout(Some(Duration::from_secs(3)))?;
                s.send(&msg)?;
                let mut r = vec![0u8; 4096];
                let n = s.recv(&mut r)?;
                r.truncate(n);
                Ok(r)
            }
        })())
    })
    .unwrap()
}

/// A guest query: id 0x4242, RD, AD and CD set, `question` (wire form), and `additional`
/// (with ARCOUNT `arcount`) after it.
fn guest_query(question: &[u8], arcount: u8, additional: &[u8]) -> Vec<u8> {
    let mut m = vec![0x42, 0x42, 0x01, 0x30, 0, 1, 0, 0, 0, 0, 0, arcount];
    m.extend_from_slice(question);
    m.extend_from_slice(additional);
    m
}

/// A guest's EDNS record: 4096-byte payload, the DO bit, a cookie option.
const GUEST_OPT: [u8; 23] = [
    0, 0, 41, 0x10, 0, 0, 0, 0x80, 0, 0, 12, 0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8,
];

/// What the upstream must receive for a question `name_wire`/`qtype`, after the id: RD only,
/// one question, the name in lower case, class IN, and the filter's own EDNS record
/// (1232 bytes, no flags, no options) when the guest sent one.
fn canonical_upstream(name_wire: &[u8], qtype: u16, edns: bool) -> Vec<u8> {
    let mut m = vec![0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns)];
    m.extend_from_slice(name_wire);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&[0, 1]);
    if edns {
        m.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dns_filter_sends_upstream_only_queries_it_rebuilt() {
    let w = World::new("dnsq");
    let up = Ipv4Addr::new(203, 0, 113, 53);
    sh(&[
        "ip",
        "-n",
        &w.inet,
        "addr",
        "add",
        "203.0.113.53/32",
        "dev",
        "lo",
    ]);
    let seen = serve_recording_dns(&w.inet, up);
    let cfg = NetConfig {
        upstream_dns: Some(SocketAddr::from((up, 53))),
        ..w.cfg(GuestDevice::Veth)
    };
    let net = Network::new(cfg).await.unwrap();
    let id = w.id("a");
    let policy = Policy::Allow {
        cidrs: vec![],
        ports: vec![],
        domains: vec!["allowed.test".into()],
    };
    let g = guest(&net.create(&id, &policy).await.unwrap().unwrap());
    let mixed: &[u8] = b"\x07AlLoWeD\x04TeSt\x00";
    let lower: &[u8] = b"\x07allowed\x04test\x00";
    let question = |qtype: u16, class: u16| {
        let mut q = mixed.to_vec();
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&class.to_be_bytes());
        q
    };
    let count = || seen.lock().unwrap().len();

    // Allowed queries: the upstream receives the filter's own query (its id, canonical case,
    // its EDNS), the guest gets the answer under its own id and question, case included.
    let mut upstream_ids = Vec::new();
    for (qtype, edns, tcp) in [
        (dns::TYPE_A, true, false),
        (dns::TYPE_A, true, true),
        (dns::TYPE_AAAA, false, false),
        (65, true, false), // HTTPS
    ] {
        let q = question(qtype, 1);
        let msg = match edns {
            true => guest_query(&q, 1, &GUEST_OPT),
            false => guest_query(&q, 0, &[]),
        };
        let before = count();
        let r = ask_raw(&g, msg.clone(), tcp).unwrap();
        assert_eq!(&r[..2], &[0x42, 0x42]);
        assert_eq!(
            &r[12..12 + q.len()],
            &q[..],
            "the guest's question, as sent"
        );
        let a = dns::parse_answer(&r, &dns::parse_query(&msg).unwrap()).unwrap();
        assert_eq!(a.rcode, dns::RCODE_NOERROR);
        if qtype == dns::TYPE_A {
            assert_eq!(a.addrs, vec![(v4(INET2), 30)]);
        }
        let got = seen.lock().unwrap()[before..].to_vec();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0][2..], canonical_upstream(lower, qtype, edns)[..]);
        upstream_ids.push(u16::from_be_bytes([got[0][0], got[0][1]]));
    }
    assert!(
        upstream_ids.iter().any(|i| *i != 0x4242),
        "{upstream_ids:?}"
    );

    // Refused or malformed: an error to the guest, nothing upstream.
    let kilo = vec![0x5a; 1000];
    let mut opt_then_kilo = GUEST_OPT.to_vec();
    opt_then_kilo.extend_from_slice(&kilo);
    let mut long_opt = GUEST_OPT.to_vec();
    long_opt[10] = 12 + 100; // RDLENGTH past the end
    let a = question(dns::TYPE_A, 1);
    for (what, msg, rcode) in [
        (
            "1 KB after the question",
            guest_query(&a, 0, &kilo),
            dns::RCODE_FORMERR,
        ),
        (
            "1 KB after EDNS",
            guest_query(&a, 1, &opt_then_kilo),
            dns::RCODE_FORMERR,
        ),
        (
            "1 KB as an additional record",
            guest_query(&a, 1, &kilo),
            dns::RCODE_FORMERR,
        ),
        (
            "EDNS longer than the message",
            guest_query(&a, 1, &long_opt),
            dns::RCODE_FORMERR,
        ),
        (
            "type NULL",
            guest_query(&question(10, 1), 0, &[]),
            dns::RCODE_REFUSED,
        ),
        (
            "type ANY",
            guest_query(&question(255, 1), 0, &[]),
            dns::RCODE_REFUSED,
        ),
        (
            "class CH",
            guest_query(&question(16, 3), 0, &[]),
            dns::RCODE_REFUSED,
        ),
    ] {
        for tcp in [false, true] {
            let before = count();
            let r = ask_raw(&g, msg.clone(), tcp).unwrap();
            assert_eq!(
                (&r[..2], dns::rcode(&r)),
                (&[0x42u8, 0x42][..], Some(rcode)),
                "{what} (tcp: {tcp})"
            );
            assert_eq!(count(), before, "{what} (tcp: {tcp}) reached the upstream");
        }
    }
    net.destroy(&id).await.unwrap();
    w.assert_clean(&net).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_answers_no_veth_packet_from_a_forged_source() {
    let w = World::new("forged");
    let net = Network::new(w.cfg(GuestDevice::Veth)).await.unwrap();
    let id = w.id("a");
    let n = net.create(&id, &Policy::Open).await.unwrap().unwrap();
    // The namespace's own stack sends from addresses that are not its transit address (the
    // guest's forged packets never get this far).
    give_spoofed_addresses(&n.netns);
    let cap = Capture::start(&w.inet, testbed::UPLINK_PEER);
    send_udp_from(
        &n.netns,
        n.transit.ns,
        SocketAddr::from((INET1, 9999)),
        b"own-veth",
    );
    for from in SPOOFED {
        send_udp_from(
            &n.netns,
            from,
            SocketAddr::from((INET1, 9999)),
            b"forged-veth",
        );
    }
    let seen = cap.stop().await;
    // Control: from its transit address, it reaches the internet (masqueraded).
    let own = carrying(&seen, b"own-veth");
    assert!(own.iter().any(|(src, ..)| *src == HOST), "{own:?}");
    // From any other, nothing: neither the packet nor the host's answer to the forged source.
    assert_eq!(carrying(&seen, b"forged-veth"), vec![]);
    net.destroy(&id).await.unwrap();
    w.assert_clean(&net).await;
}

/// A UDP echo server in namespace `ns` on `ip`, port `port` (bound to the one address, so
/// that replies come from it).
fn serve_udp_echo(ns: &str, ip: Ipv4Addr, port: u16) {
    let sock: UdpSocket = in_netns(ns, move || {
        UdpSocket::bind((ip, port)).map_err(|e| hutch_net::NetError::Io {
            what: "bind udp echo".into(),
            source: e,
        })
    })
    .unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], from);
        }
    });
}

/// The destination a redirected connection was addressed to (`SO_ORIGINAL_DST`).
fn original_dst(s: &tokio::net::TcpStream) -> SocketAddr {
    use std::os::fd::AsRawFd;
    const SO_ORIGINAL_DST: libc::c_int = 80;
    // SAFETY: an all-zero sockaddr_in is a valid value.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: `addr` and `len` are valid for writes of the size `len` says.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    assert_eq!(r, 0, "SO_ORIGINAL_DST: {}", io::Error::last_os_error());
    SocketAddr::from((
        Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
        u16::from_be(addr.sin_port),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interception_turns_guest_web_traffic_to_the_broker_whose_upstream_obeys_the_policy() {
    let w = World::new("icpt");
    for p in [80, 443] {
        serve(&w.inet, p, "origin");
    }
    for p in [443, 4443] {
        serve_udp_echo(&w.inet, INET2, p);
    }
    let net = Network::new(w.cfg(GuestDevice::Veth)).await.unwrap();
    let id = w.id("a");
    let policy = Policy::Allow {
        cidrs: vec![],
        ports: vec![],
        domains: vec!["allowed.test".into()],
    };
    let n = net.create(&id, &policy).await.unwrap().unwrap();
    let g = guest(&n);
    assert_eq!(
        resolve(&g, "allowed.test").unwrap(),
        (dns::RCODE_NOERROR, vec![v4(INET2)])
    );
    // Before interception: straight to the origin, UDP 443 too.
    assert_eq!(connect(&g, INET2, 443).unwrap(), "origin");
    assert_eq!(udp_probe(&g, SocketAddr::from((INET2, 443))).unwrap(), 5);

    let icpt = net.intercept(&id).await.unwrap();
    let dialer = icpt.dialer.clone();
    let broker = tokio::spawn(async move {
        let mut seen = Vec::new();
        for _ in 0..3 {
            let (mut s, _) = icpt.listener.accept().await.unwrap();
            let dst = original_dst(&s);
            tokio::io::AsyncWriteExt::write_all(&mut s, format!("broker {dst}").as_bytes())
                .await
                .unwrap();
            seen.push(dst);
        }
        (seen, icpt.answers)
    });
    // Web ports go to the broker, wherever they were addressed, allowed or not; the broker
    // learns where.
    assert_eq!(connect(&g, INET2, 443).unwrap(), "broker 203.0.113.20:443");
    assert_eq!(connect(&g, INET1, 80).unwrap(), "broker 203.0.113.10:80");
    // A guest that asks for the proxy itself reaches it too (explicit CONNECT).
    assert_eq!(
        connect(&g, GATEWAY_ADDR, hutch_net::BROKER_PORT).unwrap(),
        format!("broker {GATEWAY_ADDR}:{}", hutch_net::BROKER_PORT)
    );
    let (seen, answers) = broker.await.unwrap();
    assert_eq!(seen.len(), 3);
    // Other ports are untouched and still under the policy.
    refused(connect(&g, INET1, 8080));
    assert_eq!(connect(&g, INET2, 8080).unwrap(), "inet");
    // QUIC is dropped so clients fall back to TCP; other UDP still flows.
    assert!(udp_probe(&g, SocketAddr::from((INET2, 443))).is_err());
    assert_eq!(udp_probe(&g, SocketAddr::from((INET2, 4443))).unwrap(), 5);

    // What the DNS filter answered, for the broker's destination check.
    assert!(answers.resolved("allowed.test", v4(INET2)));
    assert!(!answers.resolved("allowed.test", v4(INET1)));
    assert!(!answers.resolved("other.test", v4(INET2)));
    assert_eq!(answers.addresses("allowed.test"), vec![v4(INET2)]);
    assert!(answers.addresses("other.test").is_empty());

    // The namespace's own outward TCP (the broker's upstream) meets the policy and the deny
    // lists: the resolved address is reachable, an unresolved one, the LAN, the metadata
    // service and the host are not.
    let dial = |ip: Ipv4Addr, port: u16| {
        let d = dialer.clone();
        async move {
            let mut s = d.connect(SocketAddr::from((ip, port))).await?;
            let mut out = String::new();
            tokio::io::AsyncReadExt::read_to_string(&mut s, &mut out).await?;
            io::Result::Ok(out)
        }
    };
    assert_eq!(dial(INET2, 443).await.unwrap(), "origin");
    for blocked in [INET1, LAN, METADATA, HOST] {
        let r = tokio::time::timeout(Duration::from_secs(5), dial(blocked, 8080)).await;
        assert!(matches!(r, Ok(Err(_))), "{blocked}: {r:?}");
    }

    net.destroy(&id).await.unwrap();
    w.assert_clean(&net).await;
}
