//! A test world for sandbox networks: namespaces that play the host, the internet and a LAN,
//! with HTTP servers in them, so tests of real networks never touch the real host or any
//! address outside this machine. Enabled by the `testbed` feature (tests only).
//!
//! `H` plays the host (give [`World::cfg`] to [`crate::Network::new`] so the sandbox networks'
//! host side lives there), `I` the internet (HTTP on [`INET`]:8080 and [`METADATA`]:80, behind
//! H's uplink 198.51.100.1/24) and `L` a LAN (HTTP on [`LAN`]:8080 on a second H interface).
//! Every server listens on 0.0.0.0, so a refused connection is the sandbox policy's doing.

// A test fixture: it sets its namespaces up and removes them synchronously.
#![allow(clippy::disallowed_methods)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use crate::{in_netns, NetConfig};

/// A public-looking address served in the internet namespace (TEST-NET-3).
pub const INET: &str = "203.0.113.10";
/// A second public-looking address in the internet namespace (no server of its own).
pub const INET2: &str = "203.0.113.20";
/// An RFC 1918 address served in the LAN namespace.
pub const LAN: &str = "192.168.77.10";
/// The host namespace's uplink: a veth to the internet namespace.
pub const UPLINK: &str = "nv-up";
/// The uplink's peer, in the internet namespace (where tests capture what leaves).
pub const UPLINK_PEER: &str = "nv-upi";
/// The cloud metadata address, served in the internet namespace.
pub const METADATA: &str = "169.254.169.254";

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The test's namespaces; removed on drop with everything of the sandbox, even after a failed
/// assert.
pub struct World {
    /// The namespace playing the host.
    pub host: String,
    /// The internet namespace.
    pub inet: String,
    /// The LAN namespace.
    pub lan: String,
    /// The sandbox id a test uses (its namespaces are removed on drop).
    pub sandbox: String,
}

impl World {
    /// Builds the world with its HTTP servers; names carry `tag` so parallel tests do not
    /// collide.
    pub fn new(tag: &str) -> World {
        let w = World::bare(tag);
        http(&w.inet, 8080, "inet");
        http(&w.inet, 80, "metadata");
        http(&w.lan, 8080, "lan");
        w
    }

    /// Builds the namespaces, links, addresses and routes only, for tests that run servers of
    /// their own.
    pub fn bare(tag: &str) -> World {
        let w = World {
            host: format!("nv-h-{tag}"),
            inet: format!("nv-i-{tag}"),
            lan: format!("nv-l-{tag}"),
            sandbox: format!("nv-{tag}"),
        };
        let (h, i, l) = (w.host.as_str(), w.inet.as_str(), w.lan.as_str());
        for n in [h, i, l] {
            sh(&["ip", "netns", "add", n]);
            sh(&["ip", "-n", n, "link", "set", "lo", "up"]);
        }
        let ip = |ns: &str, rest: &str| {
            let mut args = vec!["ip", "-n", ns];
            args.extend(rest.split_whitespace());
            sh(&args);
        };
        ip(
            h,
            &format!("link add {UPLINK} type veth peer name {UPLINK_PEER} netns {i}"),
        );
        ip(h, &format!("addr add 198.51.100.1/24 dev {UPLINK}"));
        ip(h, &format!("link set {UPLINK} up"));
        ip(i, &format!("addr add 198.51.100.2/24 dev {UPLINK_PEER}"));
        ip(i, &format!("link set {UPLINK_PEER} up"));
        for a in [INET, INET2, METADATA] {
            ip(i, &format!("addr add {a}/32 dev lo"));
        }
        ip(h, "route add default via 198.51.100.2");
        ip(
            h,
            &format!("link add nv-lan type veth peer name nv-lanl netns {l}"),
        );
        ip(h, "addr add 192.168.77.1/24 dev nv-lan");
        ip(h, "link set nv-lan up");
        ip(l, "addr add 192.168.77.10/24 dev nv-lanl");
        ip(l, "link set nv-lanl up");
        ip(l, "route add default via 192.168.77.1");
        w
    }

    /// A network configuration whose host side runs in this world's host namespace.
    pub fn cfg(&self) -> NetConfig {
        NetConfig {
            host_netns: Some(self.host.clone()),
            ..NetConfig::default()
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for n in [
            format!("hutch-{}", self.sandbox),
            format!("hutch-{}.guest", self.sandbox),
            self.host.clone(),
            self.inet.clone(),
            self.lan.clone(),
        ] {
            let _ = Command::new("ip").args(["netns", "del", &n]).output();
        }
    }
}

/// A minimal HTTP server in namespace `ns`: reads the request head (bounded), answers `body`.
pub fn http(ns: &str, port: u16, body: &'static str) {
    let l: TcpListener = in_netns(ns, move || {
        TcpListener::bind(("0.0.0.0", port)).map_err(|e| crate::NetError::Io {
            what: "bind".into(),
            source: e,
        })
    })
    .unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
}

/// The far end of a sandbox's WireGuard tunnel, running in a test namespace (this crate's own
/// boringtun driver, listening instead of connecting). Dropping it takes the peer down.
pub struct WireGuardPeer {
    _tunnel: crate::wg::Tunnel,
}

/// Starts a [`WireGuardPeer`] in namespace `ns`: a TUN `tun` with `address`, UDP on `listen`,
/// accepting tunnelled packets from `allowed_ips`.
pub async fn wireguard_peer(
    ns: &str,
    tun: &str,
    private_key: [u8; 32],
    peer_public_key: [u8; 32],
    listen: std::net::SocketAddr,
    address: ipnet::Ipv4Net,
    allowed_ips: Vec<ipnet::IpNet>,
) -> crate::Result<WireGuardPeer> {
    let tunnel = crate::wg::start(crate::wg::Params {
        netns: &crate::ns::netns_path(ns),
        tun,
        private_key,
        peer_public_key,
        preshared_key: None,
        keepalive: None,
        udp: crate::wg::Udp::Listen(listen),
        allowed_ips,
    })
    .await?;
    sh(&[
        "ip",
        "-n",
        ns,
        "addr",
        "add",
        &address.to_string(),
        "dev",
        tun,
    ]);
    sh(&["ip", "-n", ns, "link", "set", tun, "up"]);
    Ok(WireGuardPeer { _tunnel: tunnel })
}
