//! WireGuard egress, host side and in userspace (these hosts' kernels have no WireGuard
//! module): a TUN inside the sandbox's namespace, driven by boringtun's [`Tunn`] from one
//! tokio task, with the encrypted UDP going to the peer over the transit veth.
//!
//! The namespace's routes send the allowed IPs into the TUN and nothing else anywhere but the
//! endpoint (one /32 over the veth), and its nft table rejects guest traffic leaving by any
//! other device and drops anything the namespace itself would send out of the veth but the UDP
//! to the endpoint. So when the tunnel is down (no handshake, or the driver gone), traffic
//! fails closed: there is no other way out.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::{IpNet, Ipv4Net};
use tokio::io::unix::AsyncFd;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use crate::{ns, tap, NetError};

/// MTU of the tunnel device: room for WireGuard's 80 bytes of overhead in a 1500-byte packet.
pub const TUNNEL_MTU: u32 = 1420;
/// How often boringtun's timers (handshake retries, keepalives, expiry) are driven.
const TIMER_TICK: Duration = Duration::from_millis(250);
/// Largest packet handled (TUN reads and UDP datagrams).
const MAX_PACKET: usize = 65_536;

/// A sandbox's WireGuard egress tunnel.
#[derive(Clone, PartialEq, Eq)]
pub struct WireGuardConfig {
    /// This end's private key.
    pub private_key: [u8; 32],
    /// The peer's public key.
    pub peer_public_key: [u8; 32],
    /// Optional preshared key.
    pub preshared_key: Option<[u8; 32]>,
    /// The peer's UDP endpoint (IPv4).
    pub endpoint: SocketAddr,
    /// This end's address inside the tunnel (guest traffic is translated to it).
    pub address: Ipv4Net,
    /// Destinations routed into the tunnel (`0.0.0.0/0` for everything); there is no route to
    /// anything else. Packets coming out of the tunnel must come from one of these.
    pub allowed_ips: Vec<IpNet>,
    /// Persistent keepalive interval in seconds.
    pub keepalive: Option<u16>,
    /// The resolver the sandbox's DNS filter forwards to, reached through the tunnel; `None`:
    /// the Network's upstream, also through the tunnel.
    pub dns: Option<IpAddr>,
}

impl std::fmt::Debug for WireGuardConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WireGuardConfig")
            .field("private_key", &"<redacted>")
            .field("peer_public_key", &encode_key(&self.peer_public_key))
            .field("endpoint", &self.endpoint)
            .field("address", &self.address)
            .field("allowed_ips", &self.allowed_ips)
            .field("keepalive", &self.keepalive)
            .field("dns", &self.dns)
            .finish()
    }
}

impl WireGuardConfig {
    /// Checks what the plumbing relies on.
    pub fn validate(&self) -> Result<(), NetError> {
        let bad = |why: &str| Err(NetError::Config(format!("wireguard: {why}")));
        if !self.endpoint.is_ipv4() {
            return bad("the endpoint must be an IPv4 address");
        }
        if self.endpoint.port() == 0 {
            return bad("the endpoint needs a port");
        }
        if self.allowed_ips.is_empty() {
            return bad("allowed_ips is empty");
        }
        Ok(())
    }

    /// The IPv4 destinations routed into the tunnel.
    pub(crate) fn routes(&self) -> Vec<Ipv4Net> {
        self.allowed_ips
            .iter()
            .filter_map(|n| match n {
                IpNet::V4(n) => Some(*n),
                IpNet::V6(_) => None,
            })
            .collect()
    }

    /// The endpoint's IPv4 address.
    pub(crate) fn endpoint_v4(&self) -> Ipv4Addr {
        match self.endpoint.ip() {
            IpAddr::V4(a) => a,
            IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
        }
    }
}

/// Parses a base64 WireGuard key (as `wg genkey`/`wg pubkey` print them).
pub fn parse_key(b64: &str) -> Result<[u8; 32], NetError> {
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .ok_or_else(|| NetError::Config("wireguard: a key is not 32 bytes of base64".into()))
}

/// A key in WireGuard's base64 form.
pub fn encode_key(key: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// The public key of a private key.
pub fn public_key(private_key: &[u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(*private_key)).to_bytes()
}

/// A running tunnel; dropping it stops the driver and removes its TUN.
pub(crate) struct Tunnel {
    task: JoinHandle<()>,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where the encrypted side talks.
pub(crate) enum Udp {
    /// Connect to the peer's endpoint (a sandbox).
    Endpoint(SocketAddr),
    /// Listen on this address and answer whoever authenticates (the testbed's peer).
    #[cfg(feature = "testbed")]
    Listen(SocketAddr),
}

/// Everything [`start`] needs.
pub(crate) struct Params<'a> {
    pub netns: &'a Path,
    pub tun: &'a str,
    pub private_key: [u8; 32],
    pub peer_public_key: [u8; 32],
    pub preshared_key: Option<[u8; 32]>,
    pub keepalive: Option<u16>,
    pub udp: Udp,
    pub allowed_ips: Vec<IpNet>,
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> NetError {
    move |source| NetError::Io {
        what: what.into(),
        source,
    }
}

/// Creates the TUN and the UDP socket inside the namespace and starts the driver. The TUN is
/// left down and unaddressed: the caller configures it.
pub(crate) async fn start(p: Params<'_>) -> Result<Tunnel, NetError> {
    let tun_name = p.tun.to_string();
    let (bind, connect) = match p.udp {
        Udp::Endpoint(e) => (SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)), Some(e)),
        #[cfg(feature = "testbed")]
        Udp::Listen(a) => (a, None),
    };
    let (tun, udp) = ns::run_in(Some(p.netns), move || {
        let tun = tap::create_tun(&tun_name)?;
        let udp = std::net::UdpSocket::bind(bind).map_err(io_err("bind WireGuard socket"))?;
        if let Some(e) = connect {
            udp.connect(e).map_err(io_err("connect WireGuard socket"))?;
        }
        udp.set_nonblocking(true)
            .map_err(io_err("WireGuard socket nonblocking"))?;
        Ok((tun, udp))
    })
    .await?;
    let tunn = Tunn::new(
        StaticSecret::from(p.private_key),
        PublicKey::from(p.peer_public_key),
        p.preshared_key,
        p.keepalive,
        random_index(),
        None,
    )
    .map_err(|e| NetError::Config(format!("wireguard: {e}")))?;
    let udp = UdpSocket::from_std(udp).map_err(io_err("register WireGuard socket"))?;
    // SAFETY: the OwnedFd moves into the AsyncFd: it stays open and the same for the
    // AsyncFd's whole life.
    let tun =
        unsafe { AsyncFd::register(tun) }.map_err(|e| io_err("register TUN")(e.into_parts().1))?;
    let task = tokio::spawn(drive(tun, udp, tunn, connect, p.allowed_ips));
    Ok(Tunnel { task })
}

fn random_index() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: valid buffer; a short read leaves zeros, still a usable index.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), 4, 0) };
    u32::from_ne_bytes(b) >> 8
}

fn read_fd(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: valid buffer of that length.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Writes one packet into the TUN; a full queue drops it, as a congested link would.
fn write_tun(fd: &OwnedFd, p: &[u8]) {
    // SAFETY: valid buffer of that length.
    unsafe { libc::write(fd.as_raw_fd(), p.as_ptr().cast(), p.len()) };
}

async fn drive(
    tun: AsyncFd<OwnedFd>,
    udp: UdpSocket,
    mut tunn: Tunn,
    endpoint: Option<SocketAddr>,
    allowed: Vec<IpNet>,
) {
    let mut peer = endpoint;
    let mut tick = tokio::time::interval(TIMER_TICK);
    let mut from_tun = vec![0u8; MAX_PACKET];
    let mut from_udp = vec![0u8; MAX_PACKET];
    let mut out = vec![0u8; MAX_PACKET + 256];
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let (TunnResult::WriteToNetwork(p), Some(to)) = (tunn.update_timers(&mut out), peer) {
                    let _ = udp.send_to(p, to).await;
                }
            }
            ready = tun.readable() => {
                let Ok(mut g) = ready else { return };
                let n = match g.try_io(|fd| read_fd(fd.get_ref(), &mut from_tun)) {
                    Ok(Ok(n)) => n,
                    // The TUN is gone (or broken): the tunnel is down, and stays down.
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "WireGuard TUN failed; tunnel down");
                        return;
                    }
                    Err(_would_block) => continue,
                };
                if let (TunnResult::WriteToNetwork(p), Some(to)) =
                    (tunn.encapsulate(&from_tun[..n], &mut out), peer)
                {
                    let _ = udp.send_to(p, to).await;
                }
            }
            got = udp.recv_from(&mut from_udp) => {
                let Ok((n, from)) = got else {
                    // E.g. ECONNREFUSED while the peer is down: keep trying, without spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                if endpoint.is_some_and(|e| e != from) {
                    continue;
                }
                let mut first = true;
                loop {
                    let r = if first {
                        tunn.decapsulate(Some(from.ip()), &from_udp[..n], &mut out)
                    } else {
                        tunn.decapsulate(None, &[], &mut out)
                    };
                    first = false;
                    match r {
                        // A handshake answer, or queued packets to flush: send, ask again.
                        TunnResult::WriteToNetwork(p) => {
                            let _ = udp.send_to(p, from).await;
                            if endpoint.is_none() {
                                peer = Some(from);
                            }
                        }
                        TunnResult::WriteToTunnelV4(p, src) => {
                            if allowed.iter().any(|a| a.contains(&IpAddr::V4(src))) {
                                write_tun(tun.get_ref(), p);
                            }
                            if endpoint.is_none() {
                                peer = Some(from);
                            }
                            break;
                        }
                        TunnResult::WriteToTunnelV6(p, src) => {
                            if allowed.iter().any(|a| a.contains(&IpAddr::V6(src))) {
                                write_tun(tun.get_ref(), p);
                            }
                            break;
                        }
                        TunnResult::Done | TunnResult::Err(_) => break,
                    }
                }
            }
        }
    }
}
