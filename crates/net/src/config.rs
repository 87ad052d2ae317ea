//! What a sandbox network is asked to be: its egress policy, the guest device, and the
//! per-host configuration.

use std::net::Ipv4Addr;
use std::net::SocketAddr;

use ipnet::{IpNet, Ipv4Net};

use crate::{NftBackend, DEFAULT_TRANSIT_POOL, GATEWAY_ADDR, GUEST_ADDR, GUEST_MAC, GUEST_PREFIX};

/// A sandbox's egress policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Policy {
    /// No NIC at all: nothing is created. Switching a running sandbox to `None` keeps the NIC
    /// but rejects everything.
    None,
    /// Only these destinations, always minus the denied ranges.
    Allow {
        /// Allowed destination networks.
        cidrs: Vec<IpNet>,
        /// Allowed TCP/UDP destination ports; empty means any port (and any protocol).
        ports: Vec<u16>,
        /// Allowed names: exact (`api.example.com`) or `*.suffix` (every name strictly below
        /// `suffix`). The sandbox's DNS filter answers only these, and puts each answer's
        /// addresses into the `allow4`/`allow6` sets for the record's TTL, so a destination
        /// is reachable only after it was resolved through the policy.
        domains: Vec<String>,
    },
    /// Every public address.
    Open,
}

/// What stands where the VMM's TAP would be.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GuestDevice {
    /// A persistent TAP (`IFF_TAP|IFF_NO_PI|IFF_VNET_HDR`) for the VMM, opened with
    /// [`crate::Network::open_tap`].
    #[default]
    Tap,
    /// Tests without a VM: the guest-facing device is one end of a veth pair (same name as the
    /// TAP would have) whose other end, configured exactly as the guest would configure its NIC,
    /// sits in a third namespace `hutch-<id>.guest`. The same rules apply to it.
    Veth,
}

/// Configuration of a [`crate::Network`].
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// Pool of per-sandbox transit /30s (default `10.200.0.0/16`). Always denied to guests.
    pub transit_pool: Ipv4Net,
    /// Host interface guest traffic leaves through; `None` = the default route's device.
    pub uplink: Option<String>,
    /// Run the host side inside this named namespace instead of the caller's (tests, or a
    /// daemon that keeps its sandboxes behind a router namespace). `None` = the caller's.
    pub host_netns: Option<String>,
    /// TAP (production) or a veth into a guest namespace (tests without a VM).
    pub guest_device: GuestDevice,
    /// How nft rules are applied.
    pub nft: NftBackend,
    /// Where the DNS filter forwards allowed names (from the host namespace). `None` = the
    /// first `nameserver` of the host's `/etc/resolv.conf`; if there is none, allowed names
    /// get SERVFAIL.
    pub upstream_dns: Option<SocketAddr>,
    /// Decision-log events per second per sandbox passed on (after nft's own limit of 20/s per
    /// rule); bursts up to [`NetConfig::event_burst`]. The rest are counted, not kept.
    pub event_rate: u32,
    /// See [`NetConfig::event_rate`].
    pub event_burst: u32,
    /// Tag written on every host veth this Network makes (e.g. [`crate::names::owner_tag`] of a
    /// daemon's home), so that several daemons on one host each adopt and list only their own
    /// sandbox networks (namespaces are host-wide). Untagged veths (an older Hutch, or an
    /// empty owner) count as anyone's.
    pub owner: String,
    /// Spare networks kept ready (default 0): namespace, TAP, transit veth, table (rejecting
    /// everything) and DNS/log sockets made ahead under spare names ([`crate::Names::spare`]). A
    /// [`crate::Network::create`] without a tunnel takes one and renames it to the sandbox's names
    /// (the netns by a bind mount, the links by netlink, the table's device sets in the same nft
    /// transaction that applies the policy), instead of making everything then. Spares are made
    /// by [`crate::Network::refill`] (or the task [`crate::Network::keep_spares`] starts), count against the
    /// transit pool, are not [`crate::Network::list_owned`]'s, and are removed when the `Network` is
    /// dropped, by [`crate::Network::set_spares`]`(0)`, or by the next `Network::new` of the same owner
    /// in the same host namespace (after a crash).
    pub spares: usize,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            transit_pool: DEFAULT_TRANSIT_POOL,
            uplink: None,
            host_netns: None,
            guest_device: GuestDevice::Tap,
            nft: NftBackend::Auto,
            upstream_dns: None,
            event_rate: 20,
            event_burst: 100,
            owner: String::new(),
            spares: 0,
        }
    }
}

/// What the guest must configure on its NIC (pushed by the agent, not DHCP). Identical in
/// every sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestNetConfig {
    /// Guest address.
    pub address: Ipv4Addr,
    /// Prefix length.
    pub prefix_len: u8,
    /// Default gateway (the TAP side).
    pub gateway: Ipv4Addr,
    /// DNS server (Hutch's resolver on the TAP side; phase 2).
    pub dns: Ipv4Addr,
    /// MAC address for the guest NIC.
    pub mac: [u8; 6],
}

impl GuestNetConfig {
    /// The plan's guest configuration.
    pub fn standard() -> Self {
        GuestNetConfig {
            address: GUEST_ADDR,
            prefix_len: GUEST_PREFIX,
            gateway: GATEWAY_ADDR,
            dns: GATEWAY_ADDR,
            mac: GUEST_MAC,
        }
    }
}
