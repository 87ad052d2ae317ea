//! Per-sandbox networking for Hutch (issue #4).
//!
//! Each sandbox with a NIC gets, following Firecracker's "network for clones" layout:
//!
//! * a network namespace `hutch-<id>` (bound at `/run/netns/hutch-<id>`, as `ip netns` does)
//!   holding the VMM's TAP `ht<hash>` with the gateway address `172.16.0.1/30`; the guest is
//!   always `172.16.0.2/30` (see [`plan`]), so every snapshot restores unchanged;
//! * a veth pair `hv<hash>h` (host) ↔ `hv<hash>g` (namespace) on a per-sandbox /30 from the
//!   transit pool, with SNAT to the transit address at the namespace edge and masquerade to the
//!   uplink on the host;
//! * an nft table `hutch-<id>` inside the namespace holding the egress policy, and one table
//!   `hutch` on the host, shared by every sandbox, that confines every veth to the uplink.
//!
//! * a DNS filter on `172.16.0.1:53` (UDP and TCP) inside the namespace that answers only names
//!   the policy allows and puts their addresses into the table's `allow4`/`allow6` sets with the
//!   record's TTL before replying, and an NFLOG reader turning the verdict rules' log lines into
//!   [`FlowEvent`]s ([`Network::events`]); see `filter.rs`;
//! * on request, guest TCP ports published on host loopback ports ([`Network::publish`], see
//!   `ports.rs`) and a WireGuard egress tunnel ([`Network::create_with`], see [`wg`]).
//!
//! Links, addresses and routes go through rtnetlink; rules through libnftables (or `nft -j`);
//! namespace switching only on dedicated OS threads (never on a tokio worker).

#![warn(missing_docs)]

pub mod dns;
pub mod events;
mod filter;
pub mod names;
pub mod nflog;
pub mod nft;
mod ns;
pub mod plan;
mod ports;
mod tap;
pub mod wg;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::TryStreamExt;
use ipnet::{IpNet, Ipv4Net};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};

#[cfg(feature = "testbed")]
pub mod testbed;
pub use events::{EventRing, EventSink, FlowEvent, Proto, RateLimitedSink, RuleName, Verdict};
pub use filter::{first_nameserver, MAX_TTL as DNS_MAX_TTL, MIN_TTL as DNS_MIN_TTL};
pub use names::{validate_id, Names};
pub use nft::NftBackend;
pub use plan::{Transit, DEFAULT_TRANSIT_POOL, GATEWAY_ADDR, GUEST_ADDR, GUEST_MAC, GUEST_PREFIX};
pub use ports::PublishedPort;
pub use tap::TAP_FLAGS;
pub use wg::WireGuardConfig;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The sandbox id cannot be used in names.
    #[error("invalid sandbox id {id:?}: {reason}")]
    InvalidId {
        /// The id (truncated).
        id: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// `create` for an id that already has a network.
    #[error("sandbox {0} already has a network")]
    AlreadyExists(String),
    /// The id has no network (never created, or destroyed).
    #[error("sandbox {0} has no network")]
    NotFound(String),
    /// A policy that needs a NIC for a sandbox created without one (`none`).
    #[error(
        "sandbox {0} was created without a NIC (policy none); a NIC cannot be added while it runs"
    )]
    NoNic(String),
    /// Every transit subnet is taken.
    #[error("transit pool {0} is exhausted")]
    PoolExhausted(Ipv4Net),
    /// Bad configuration or environment.
    #[error("configuration: {0}")]
    Config(String),
    /// A netlink request failed.
    #[error("netlink: {what}")]
    Netlink {
        /// What was being done.
        what: String,
        /// The netlink error.
        #[source]
        source: rtnetlink::Error,
    },
    /// A system call or file operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// nft refused a transaction.
    #[error("nftables: {what}: {message}")]
    Nft {
        /// What was being done.
        what: String,
        /// nft's error output.
        message: String,
    },
    /// The host port asked for is taken.
    #[error("host port 127.0.0.1:{0} is in use")]
    PortInUse(u16),
    /// The guest port is already published on another host port.
    #[error("guest port {guest_port} is already published on 127.0.0.1:{host_port}")]
    AlreadyPublished {
        /// The guest port.
        guest_port: u16,
        /// Where it is published.
        host_port: u16,
    },
    /// A namespace worker thread panicked.
    #[error("namespace worker thread died")]
    Worker,
}

/// Result alias.
pub type Result<T, E = NetError> = std::result::Result<T, E>;

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Netlink { what, source }
}

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
    /// [`Network::open_tap`].
    #[default]
    Tap,
    /// Tests without a VM: the guest-facing device is one end of a veth pair (same name as the
    /// TAP would have) whose other end, configured exactly as the guest would configure its NIC,
    /// sits in a third namespace `hutch-<id>.guest`. The same rules apply to it.
    Veth,
}

/// Configuration of a [`Network`].
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
    /// Tag written on every host veth this Network makes (e.g. [`names::owner_tag`] of a
    /// daemon's home), so that several daemons on one host each adopt and list only their own
    /// sandbox networks (namespaces are host-wide). Untagged veths (an older Hutch, or an
    /// empty owner) count as anyone's.
    pub owner: String,
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

/// One sandbox's network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxNet {
    /// Sandbox id.
    pub id: String,
    /// Namespace name (under `/run/netns`).
    pub netns: String,
    /// TAP device name inside the namespace.
    pub tap_name: String,
    /// Host end of the transit veth.
    pub host_veth: String,
    /// The transit /30.
    pub transit: Transit,
    /// What the guest configures.
    pub guest: GuestNetConfig,
    /// The stand-in guest's namespace, with [`GuestDevice::Veth`].
    pub guest_netns: Option<String>,
}

/// A kernel object Hutch owns, found by [`Network::list_owned`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnedObject {
    /// A namespace `hutch-<id>` or `hutch-<id>.guest`.
    Netns {
        /// Its name.
        name: String,
        /// The sandbox id.
        id: String,
    },
    /// A host link `hv<hash>h`; `id` from its `hutch:<id>` alias (absent if setup died before
    /// the alias was written).
    Link {
        /// Its name.
        name: String,
        /// The sandbox id, if tagged.
        id: Option<String>,
    },
    /// A host nft table `hutch-<id>`.
    NftTable {
        /// Its name.
        name: String,
        /// The sandbox id.
        id: String,
    },
}

impl OwnedObject {
    /// The owning sandbox's id, where known.
    pub fn sandbox_id(&self) -> Option<&str> {
        match self {
            OwnedObject::Netns { id, .. } | OwnedObject::NftTable { id, .. } => Some(id),
            OwnedObject::Link { id, .. } => id.as_deref(),
        }
    }
}

struct Entry {
    transit: Transit,
    has_nic: bool,
    /// DNS filter and decision-log reader; absent for sandboxes without a NIC and for ones
    /// a previous daemon left until [`Network::adopt`] takes them over.
    rt: Option<filter::Runtime>,
    /// Published guest ports, by guest port.
    ports: BTreeMap<u16, ports::Forward>,
    /// The WireGuard egress tunnel's driver, if the sandbox has one.
    tunnel: Option<wg::Tunnel>,
}

struct State {
    pool: plan::TransitPool,
    sandboxes: HashMap<String, Entry>,
    /// Host veths of destroyed sandboxes whose namespaces the kernel is still tearing down;
    /// their transit slots stay taken until they are gone.
    quarantined: HashSet<String>,
    /// Sandboxes with a per-sandbox host table (made by an older Hutch), removed on destroy.
    legacy_host_tables: HashSet<String>,
}

/// How often a quarantined host veth is checked for.
const REAP_POLL: Duration = Duration::from_millis(5);
/// How long the kernel gets to remove a destroyed sandbox's veth with its namespace before
/// Hutch deletes it itself (e.g. when something still holds the namespace).
const REAP_DEADLINE: Duration = Duration::from_secs(5);

/// The per-host network manager.
pub struct Network {
    cfg: NetConfig,
    host_ns: Option<PathBuf>,
    host: Handle,
    uplink: String,
    state: Arc<Mutex<State>>,
    /// Quarantined veths not yet gone (see [`Network::settle`]).
    pending: Arc<tokio::sync::watch::Sender<usize>>,
    /// The kernel runs one dump at a time per netlink socket (`EBUSY` otherwise), and every
    /// request on `host` shares one socket: dumps on it take this lock.
    dump_lock: tokio::sync::Mutex<()>,
    upstream: Option<SocketAddr>,
    ring: Arc<EventRing>,
    sink: Arc<RateLimitedSink<Arc<EventRing>>>,
}

/// Runs `f` on a dedicated OS thread inside the named namespace and returns its result (for
/// creating sockets that must live in a sandbox's namespace, e.g. the DNS resolver's).
pub fn in_netns<T, F>(name: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    ns::run_in_sync(Some(&ns::netns_path(name)), f)
}

/// Opens an rtnetlink handle bound to the namespace at `path` (or the caller's).
async fn handle_in(path: Option<PathBuf>) -> Result<Handle> {
    let fd = ns::run_in(path.as_deref(), ns::netlink_socket).await?;
    Ok(handle_from_fd(fd))
}

fn handle_from_fd(fd: OwnedFd) -> Handle {
    use rtnetlink::sys::TokioSocket;
    // SAFETY: we own the fd and hand it over.
    let sock = unsafe { TokioSocket::from_raw_fd(fd.into_raw_fd()) };
    let (conn, handle, _) = rtnetlink::from_socket(sock);
    tokio::spawn(conn);
    handle
}

async fn link_index(h: &Handle, name: &str) -> Result<Option<u32>> {
    let mut s = h.link().get().match_name(name.to_string()).execute();
    match s.try_next().await {
        Ok(Some(m)) => Ok(Some(m.header.index)),
        Ok(None) => Ok(None),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(nl(format!("get link {name}"))(e)),
    }
}

async fn must_index(h: &Handle, name: &str) -> Result<u32> {
    link_index(h, name)
        .await?
        .ok_or_else(|| NetError::Config(format!("link {name} vanished")))
}

/// Whether a veth tagged `tag` belongs to a Network of `owner` (untagged ones to anyone).
fn owned_by(owner: &str, tag: Option<&str>) -> bool {
    owner.is_empty() || tag.is_none_or(|t| t == owner)
}

/// Waits for a destroyed sandbox's host veth to go with its namespace; deletes it past
/// [`REAP_DEADLINE`].
async fn reap(h: &Handle, veth: &str) {
    let deadline = Instant::now() + REAP_DEADLINE;
    loop {
        match link_index(h, veth).await {
            Ok(None) => return,
            Ok(Some(i)) if Instant::now() >= deadline => {
                tracing::warn!(veth, "namespace still held; deleting its veth");
                match h.link().del(i).execute().await {
                    Ok(()) => return,
                    Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
                        return
                    }
                    Err(e) => tracing::warn!(veth, error = %e, "cannot delete a veth"),
                }
            }
            Ok(Some(_)) => {}
            Err(e) if Instant::now() >= deadline => {
                tracing::warn!(veth, error = %e, "cannot check a quarantined veth");
                return;
            }
            Err(_) => {}
        }
        tokio::time::sleep(REAP_POLL).await;
    }
}

async fn set_up(h: &Handle, index: u32, what: &str) -> Result<()> {
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl(format!("set {what} up")))
}

async fn add_addr(h: &Handle, index: u32, addr: Ipv4Addr, len: u8, what: &str) -> Result<()> {
    h.address()
        .add(index, IpAddr::V4(addr), len)
        .execute()
        .await
        .map_err(nl(format!("add {addr}/{len} to {what}")))
}

async fn default_route(h: &Handle, index: u32, gw: Ipv4Addr, what: &str) -> Result<()> {
    let msg = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(gw)
        .output_interface(index)
        .build();
    h.route()
        .add(msg)
        .execute()
        .await
        .map_err(nl(format!("default route via {gw} in {what}")))
}

fn addr_of(m: &AddressMessage) -> Option<IpNet> {
    m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) | AddressAttribute::Address(ip) => {
            IpNet::new(*ip, m.header.prefix_len).ok()
        }
        _ => None,
    })
}

async fn all_addrs(h: &Handle) -> Result<Vec<(u32, IpNet)>> {
    let msgs: Vec<AddressMessage> = h
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("dump addresses"))?;
    Ok(msgs
        .iter()
        .filter_map(|m| addr_of(m).map(|a| (m.header.index, a)))
        .collect())
}

fn link_name(m: &LinkMessage) -> Option<&str> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn link_alias(m: &LinkMessage) -> Option<&str> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfAlias(n) => Some(n.as_str()),
        _ => None,
    })
}

async fn default_route_dev(h: &Handle) -> Result<Option<String>> {
    let routes: Vec<RouteMessage> = h
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(nl("dump routes"))?;
    for r in routes {
        if r.header.destination_prefix_length != 0 || r.header.table != 254 {
            continue;
        }
        if let Some(oif) = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        }) {
            let mut s = h.link().get().match_index(oif).execute();
            if let Some(m) = s.try_next().await.map_err(nl("get uplink"))? {
                return Ok(link_name(&m).map(str::to_string));
            }
        }
    }
    Ok(None)
}

impl Network {
    /// Connects to the host namespace, finds the uplink, enables IPv4 forwarding there and adopts
    /// the transit slots of sandboxes a previous daemon left behind (their host veths carry the
    /// `hutch:<id>` alias).
    pub async fn new(cfg: NetConfig) -> Result<Network> {
        ns::prepare_run_dir()?;
        let host_ns = cfg.host_netns.as_deref().map(ns::netns_path);
        let host = handle_in(host_ns.clone()).await?;
        let uplink = match &cfg.uplink {
            Some(u) => u.clone(),
            None => default_route_dev(&host).await?.ok_or_else(|| {
                NetError::Config("no default route; set NetConfig::uplink".into())
            })?,
        };
        ns::run_in(host_ns.as_deref(), || {
            ns::write_sysctl("net/ipv4/ip_forward", "1")
        })
        .await?;
        let mut pool = plan::TransitPool::new(cfg.transit_pool)?;
        let mut sandboxes = HashMap::new();
        let links: Vec<LinkMessage> = host
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("dump links"))?;
        let addrs = all_addrs(&host).await?;
        for l in &links {
            let (Some(name), Some(alias)) = (link_name(l), link_alias(l)) else {
                continue;
            };
            let Some((id, owner)) = names::parse_alias(alias) else {
                continue;
            };
            if !names::is_host_veth_name(name) {
                continue;
            }
            for (_, a) in addrs.iter().filter(|(i, _)| *i == l.header.index) {
                if let IpNet::V4(a) = a {
                    if let Some(slot) = pool.slot_of(a.addr()) {
                        // Another owner's slot is taken all the same; its sandbox is not ours.
                        pool.mark(slot);
                        if !owned_by(&cfg.owner, owner) {
                            continue;
                        }
                        sandboxes.insert(
                            id.to_string(),
                            Entry {
                                transit: pool.transit(slot),
                                has_nic: true,
                                rt: None,
                                ports: BTreeMap::new(),
                                tunnel: None,
                            },
                        );
                    }
                }
            }
        }
        // The one shared host table, and the per-sandbox ones an older Hutch made.
        let (backend, up, pool_net) = (cfg.nft, uplink.clone(), cfg.transit_pool);
        let legacy_host_tables = ns::run_in(host_ns.as_deref(), move || {
            nft::run(
                backend,
                "create host table",
                &nft::host_table(&up, pool_net),
            )?;
            nft::list_tables(backend, names::TABLE_PREFIX)
        })
        .await?
        .into_iter()
        .map(|t| t[names::TABLE_PREFIX.len()..].to_string())
        .collect();
        let upstream = match cfg.upstream_dns {
            Some(u) => Some(u),
            None => std::fs::read_to_string("/etc/resolv.conf")
                .ok()
                .and_then(|s| first_nameserver(&s)),
        };
        let ring = Arc::new(EventRing::default());
        let sink = Arc::new(RateLimitedSink::new(
            ring.clone(),
            cfg.event_rate,
            cfg.event_burst,
        ));
        Ok(Network {
            cfg,
            host_ns,
            host,
            uplink,
            state: Arc::new(Mutex::new(State {
                pool,
                sandboxes,
                quarantined: HashSet::new(),
                legacy_host_tables,
            })),
            pending: Arc::new(tokio::sync::watch::channel(0).0),
            dump_lock: tokio::sync::Mutex::new(()),
            upstream,
            ring,
            sink,
        })
    }

    /// The uplink interface in use.
    pub fn uplink(&self) -> &str {
        &self.uplink
    }

    /// The resolver the DNS filters forward to.
    pub fn upstream_dns(&self) -> Option<SocketAddr> {
        self.upstream
    }

    /// Passes every decision-log event (after rate limiting) to `sink` as well, e.g. the
    /// daemon's record of the sandbox. `None` stops that.
    pub fn set_event_sink(&self, sink: Option<Arc<dyn EventSink>>) {
        self.ring.set_forward(sink);
    }

    /// The sandbox's decision log at or after `since`, oldest first: flows (from the nft
    /// verdict rules) and DNS answers and refusals. A bounded ring of the newest
    /// [`events::RING_CAPACITY`] events per sandbox, emptied by [`Network::destroy`].
    pub fn events(&self, id: &str, since: SystemTime) -> Vec<FlowEvent> {
        self.ring.since(id, since)
    }

    /// Events of the sandbox the rate limit has dropped so far.
    pub fn events_dropped(&self, id: &str) -> u64 {
        self.sink.dropped(id)
    }

    /// Creates a sandbox's network. Returns `None` for [`Policy::None`] (nothing is created).
    ///
    /// The transit slot is recorded before any kernel object exists; on any failure everything
    /// made so far is removed by id before the error is returned.
    pub async fn create(&self, id: &str, policy: &Policy) -> Result<Option<SandboxNet>> {
        self.create_with(id, policy, None).await
    }

    /// [`Network::create`], and with `tunnel` all of the sandbox's allowed egress leaves
    /// through that WireGuard tunnel or not at all (see `wg.rs`): the namespace routes only
    /// the tunnel's allowed IPs (into the tunnel) and the endpoint (over the veth), its rules
    /// reject guest traffic leaving by any other device and let nothing out of the veth but
    /// the encrypted UDP to the endpoint, and the DNS filter asks its upstream through the
    /// tunnel. Ignored under [`Policy::None`].
    pub async fn create_with(
        &self,
        id: &str,
        policy: &Policy,
        tunnel: Option<&WireGuardConfig>,
    ) -> Result<Option<SandboxNet>> {
        if let Some(w) = tunnel {
            w.validate()?;
        }
        let n = Names::new(id)?;
        // The same id destroyed a moment ago: let the kernel finish with its objects first.
        if self
            .state
            .lock()
            .unwrap()
            .quarantined
            .contains(&n.host_veth)
        {
            self.settle().await;
        }
        let transit = {
            let mut st = self.state.lock().unwrap();
            if st.sandboxes.contains_key(id) {
                return Err(NetError::AlreadyExists(id.into()));
            }
            if *policy == Policy::None {
                let transit = st.pool.transit(0);
                st.sandboxes.insert(
                    id.into(),
                    Entry {
                        transit,
                        has_nic: false,
                        rt: None,
                        ports: BTreeMap::new(),
                        tunnel: None,
                    },
                );
                return Ok(None);
            }
            let t = st.pool.alloc()?;
            st.sandboxes.insert(
                id.into(),
                Entry {
                    transit: t,
                    has_nic: true,
                    rt: None,
                    ports: BTreeMap::new(),
                    tunnel: None,
                },
            );
            t
        };
        let made = async {
            let net = self.create_inner(id, &n, transit, policy, tunnel).await?;
            if let Some(w) = tunnel {
                let tn = self.start_tunnel(&n, w).await?;
                if let Some(e) = self.state.lock().unwrap().sandboxes.get_mut(id) {
                    e.tunnel = Some(tn);
                }
            }
            let rt = filter::start(self.filter_params(id, &n, policy, tunnel)).await?;
            if let Some(e) = self.state.lock().unwrap().sandboxes.get_mut(id) {
                e.rt = Some(rt);
            }
            Ok(net)
        };
        match made.await {
            Ok(net) => Ok(Some(net)),
            Err(e) => {
                if let Err(e2) = self.destroy(id).await {
                    tracing::warn!(id, error = %e2, "cleanup after failed create");
                }
                Err(e)
            }
        }
    }

    fn filter_params(
        &self,
        id: &str,
        n: &Names,
        policy: &Policy,
        tunnel: Option<&WireGuardConfig>,
    ) -> filter::Params {
        // A tunnelled sandbox's resolver is asked from inside its namespace: through the
        // tunnel, like everything else it sends.
        let (upstream, upstream_ns) = match tunnel {
            Some(w) => (
                w.dns.map(|ip| SocketAddr::new(ip, 53)).or(self.upstream),
                Some(ns::netns_path(&n.netns)),
            ),
            None => (self.upstream, self.host_ns.clone()),
        };
        filter::Params {
            id: id.to_string(),
            netns: n.netns.clone(),
            table: n.table.clone(),
            backend: self.cfg.nft,
            policy: policy.clone(),
            upstream,
            host_ns: upstream_ns,
            sink: self.sink.clone(),
        }
    }

    /// Starts the tunnel's driver (which creates its TUN in the namespace), then addresses
    /// the TUN, raises it and routes the allowed IPs into it.
    async fn start_tunnel(&self, n: &Names, w: &WireGuardConfig) -> Result<wg::Tunnel> {
        let netns = ns::netns_path(&n.netns);
        let tunnel = wg::start(wg::Params {
            netns: &netns,
            tun: &n.tun,
            private_key: w.private_key,
            peer_public_key: w.peer_public_key,
            preshared_key: w.preshared_key,
            keepalive: w.keepalive,
            udp: wg::Udp::Endpoint(w.endpoint),
            allowed_ips: w.allowed_ips.clone(),
        })
        .await?;
        let h = handle_in(Some(netns)).await?;
        let ti = must_index(&h, &n.tun).await?;
        h.link()
            .set(
                LinkUnspec::new_with_index(ti)
                    .mtu(wg::TUNNEL_MTU)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(nl(format!("raise {}", n.tun)))?;
        add_addr(&h, ti, w.address.addr(), w.address.prefix_len(), &n.tun).await?;
        for r in w.routes() {
            let msg = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(r.network(), r.prefix_len())
                .output_interface(ti)
                .build();
            match h.route().add(msg).execute().await {
                Ok(()) => {}
                // The TUN's own prefix is routed already.
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
                Err(e) => return Err(nl(format!("route {r} into {}", n.tun))(e)),
            }
        }
        Ok(tunnel)
    }

    /// Takes over the network of a sandbox a previous daemon created (its transit slot was
    /// found by [`Network::new`]): restarts its DNS filter and decision-log reader, answering
    /// by `policy` (the one its table already holds), and its WireGuard tunnel (the one it was
    /// created with). Under [`Policy::None`] it only records that the sandbox has no NIC.
    /// Idempotent.
    pub async fn adopt(
        &self,
        id: &str,
        policy: &Policy,
        tunnel: Option<&WireGuardConfig>,
    ) -> Result<()> {
        let n = Names::new(id)?;
        {
            let mut st = self.state.lock().unwrap();
            if *policy == Policy::None && !st.sandboxes.contains_key(id) {
                let transit = st.pool.transit(0);
                st.sandboxes.insert(
                    id.into(),
                    Entry {
                        transit,
                        has_nic: false,
                        rt: None,
                        ports: BTreeMap::new(),
                        tunnel: None,
                    },
                );
                return Ok(());
            }
            let e = st
                .sandboxes
                .get(id)
                .ok_or_else(|| NetError::NotFound(id.into()))?;
            if !e.has_nic || e.rt.is_some() {
                return Ok(());
            }
        }
        // The old driver's TUN went with its process: a new one, same address and routes.
        if let Some(w) = tunnel {
            let tn = self.start_tunnel(&n, w).await?;
            if let Some(e) = self.state.lock().unwrap().sandboxes.get_mut(id) {
                e.tunnel.get_or_insert(tn);
            }
        }
        let rt = filter::start(self.filter_params(id, &n, policy, tunnel)).await?;
        if let Some(e) = self.state.lock().unwrap().sandboxes.get_mut(id) {
            if e.rt.is_none() {
                e.rt = Some(rt);
            }
        }
        Ok(())
    }

    async fn deny_lists(&self) -> Result<(Vec<Ipv4Net>, Vec<ipnet::Ipv6Net>)> {
        let _g = self.dump_lock.lock().await;
        let host_addrs: Vec<IpNet> = all_addrs(&self.host)
            .await?
            .into_iter()
            .map(|(_, a)| a)
            .collect();
        Ok(plan::deny_lists(self.cfg.transit_pool, &host_addrs))
    }

    async fn create_inner(
        &self,
        id: &str,
        n: &Names,
        t: Transit,
        policy: &Policy,
        tunnel: Option<&WireGuardConfig>,
    ) -> Result<SandboxNet> {
        let veth_mode = self.cfg.guest_device == GuestDevice::Veth;
        let backend = self.cfg.nft;
        let (netns, tap_name) = (n.netns.clone(), n.tap.clone());
        // One worker thread makes the namespace, its TAP and sysctls, and a netlink socket,
        // while the host's addresses are read for the deny lists.
        let made = ns::run_in(None, move || {
            ns::create_and_enter(&netns)?;
            ns::write_sysctl("net/ipv4/ip_forward", "1")?;
            if !veth_mode {
                tap::create_persistent(&tap_name)?;
            }
            ns::netlink_socket()
        });
        let (lists, fd) = tokio::join!(self.deny_lists(), made);
        let ((d4, d6), fd) = (lists?, fd?);
        let rules = nft::sandbox_table(
            &nft::SandboxRules {
                table: &n.table,
                tap: &n.tap,
                ns_veth: &n.ns_veth,
                transit_ns: t.ns,
                deny4: &d4,
                deny6: &d6,
                tunnel: tunnel.map(|w| nft::TunnelRules {
                    tun: &n.tun,
                    address: w.address.addr(),
                    endpoint: std::net::SocketAddrV4::new(w.endpoint_v4(), w.endpoint.port()),
                }),
            },
            policy,
        );
        // Then the rules (one nft transaction on a thread in the namespace) and the links,
        // addresses and routes (netlink) go side by side; nothing can flow before both are
        // done, since no VMM holds the TAP yet.
        let nsp = ns::netns_path(&n.netns);
        let table = ns::run_in(Some(&nsp), move || {
            nft::run(backend, "create sandbox table", &rules).map(drop)
        });
        let (table, links) = tokio::join!(table, self.links(id, n, t, tunnel, fd));
        table?;
        let guest_netns = links?;

        Ok(SandboxNet {
            id: id.into(),
            netns: n.netns.clone(),
            tap_name: n.tap.clone(),
            host_veth: n.host_veth.clone(),
            transit: t,
            guest: GuestNetConfig::standard(),
            guest_netns,
        })
    }

    /// The links, addresses and routes of a new sandbox network, over netlink (`fd`: a netlink
    /// socket in its namespace). Returns the stand-in guest's namespace, if any.
    async fn links(
        &self,
        id: &str,
        n: &Names,
        t: Transit,
        tunnel: Option<&WireGuardConfig>,
        fd: OwnedFd,
    ) -> Result<Option<String>> {
        let veth_mode = self.cfg.guest_device == GuestDevice::Veth;
        let nsh = handle_from_fd(fd);
        let ns_file = ns::open_netns(&n.netns)?;

        // Three independent strands, side by side on the same netlink sockets: the transit
        // veth (host end, then namespace end and routes), the namespace's loopback, and the
        // guest-facing device.
        let transit = async {
            // Transit veth, peer created directly inside the namespace.
            let peer = LinkMessageBuilder::<LinkUnspec>::new()
                .name(n.ns_veth.clone())
                .setns_by_fd(ns_file.as_raw_fd())
                .build();
            let veth = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
                .name(n.host_veth.clone())
                .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                .build();
            self.host
                .link()
                .add(veth)
                .execute()
                .await
                .map_err(nl(format!("create veth {}", n.host_veth)))?;
            let hi = must_index(&self.host, &n.host_veth).await?;
            self.host
                .link()
                .set(
                    LinkUnspec::new_with_index(hi)
                        .alias(names::alias(id, &self.cfg.owner))
                        .up()
                        .build(),
                )
                .execute()
                .await
                .map_err(nl(format!("tag and raise {}", n.host_veth)))?;
            add_addr(&self.host, hi, t.host, 30, &n.host_veth).await?;

            let vi = must_index(&nsh, &n.ns_veth).await?;
            add_addr(&nsh, vi, t.ns, 30, &n.ns_veth).await?;
            set_up(&nsh, vi, &n.ns_veth).await?;
            match tunnel {
                // Only the endpoint is reachable over the veth; the tunnel routes the rest.
                Some(w) => {
                    let msg = RouteMessageBuilder::<Ipv4Addr>::new()
                        .destination_prefix(w.endpoint_v4(), 32)
                        .gateway(t.host)
                        .output_interface(vi)
                        .build();
                    nsh.route()
                        .add(msg)
                        .execute()
                        .await
                        .map_err(nl(format!("route to the tunnel endpoint in {}", n.netns)))?;
                }
                None => default_route(&nsh, vi, t.host, &n.netns).await?,
            }

            Ok::<_, NetError>(())
        };
        let lo = async {
            let lo = must_index(&nsh, "lo").await?;
            set_up(&nsh, lo, "lo").await?;
            Ok::<_, NetError>(())
        };
        let guest = async {
            let mut guest_netns = None;
            if veth_mode {
                let gname = n.guest_netns.clone();
                let gfd = ns::run_in(None, move || {
                    ns::create_and_enter(&gname)?;
                    ns::netlink_socket()
                })
                .await?;
                guest_netns = Some(n.guest_netns.clone());
                let gh = handle_from_fd(gfd);
                let gfile = ns::open_netns(&n.guest_netns)?;
                let peer = LinkMessageBuilder::<LinkUnspec>::new()
                    .name(n.guest_veth.clone())
                    .setns_by_fd(gfile.as_raw_fd())
                    .build();
                let v = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
                    .name(n.tap.clone())
                    .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                    .build();
                nsh.link()
                    .add(v)
                    .execute()
                    .await
                    .map_err(nl(format!("create guest veth {}", n.tap)))?;
                let glo = must_index(&gh, "lo").await?;
                set_up(&gh, glo, "guest lo").await?;
                let gi = must_index(&gh, &n.guest_veth).await?;
                gh.link()
                    .set(
                        LinkUnspec::new_with_index(gi)
                            .address(GUEST_MAC.to_vec())
                            .build(),
                    )
                    .execute()
                    .await
                    .map_err(nl("set guest mac"))?;
                add_addr(&gh, gi, GUEST_ADDR, GUEST_PREFIX, "guest").await?;
                set_up(&gh, gi, "guest").await?;
                default_route(&gh, gi, GATEWAY_ADDR, "guest").await?;
            }
            let ti = must_index(&nsh, &n.tap).await?;
            add_addr(&nsh, ti, GATEWAY_ADDR, GUEST_PREFIX, &n.tap).await?;
            set_up(&nsh, ti, &n.tap).await?;
            Ok::<_, NetError>(guest_netns)
        };
        let (transit, lo, guest) = tokio::join!(transit, lo, guest);
        transit?;
        lo?;
        guest
    }

    /// Opens the sandbox's TAP inside its namespace and returns the fd, for a VMM that stays in
    /// the host namespace (`qemu -netdev tap,fd=N,vhost=off`). Flags: [`TAP_FLAGS`].
    pub fn open_tap(&self, net: &SandboxNet) -> Result<OwnedFd> {
        if self.cfg.guest_device != GuestDevice::Tap {
            return Err(NetError::Config(
                "this Network makes veth stand-ins, not TAPs".into(),
            ));
        }
        let tap = net.tap_name.clone();
        ns::run_in_sync(Some(&ns::netns_path(&net.netns)), move || tap::open(&tap))
    }

    /// Replaces a sandbox's policy in one nft transaction (the deny lists are refreshed with the
    /// host's current addresses at the same time, and the resolved-address sets are emptied).
    /// Takes effect for the next connection and the next DNS query; established connections
    /// keep going.
    pub async fn set_policy(&self, id: &str, policy: &Policy) -> Result<()> {
        let n = Names::new(id)?;
        let shared = {
            let st = self.state.lock().unwrap();
            let e = st
                .sandboxes
                .get(id)
                .ok_or_else(|| NetError::NotFound(id.into()))?;
            if !e.has_nic {
                return if *policy == Policy::None {
                    Ok(())
                } else {
                    Err(NetError::NoNic(id.into()))
                };
            }
            e.rt.as_ref().map(|rt| rt.policy.clone())
        };
        let (d4, d6) = self.deny_lists().await?;
        let json = nft::sandbox_policy(&n.table, &d4, &d6, policy);
        let backend = self.cfg.nft;
        // Held across the transaction: the filter cannot add an answer for the old policy
        // after the sets were flushed for the new one.
        let mut guard = match &shared {
            Some(p) => Some(p.lock().await),
            None => None,
        };
        ns::run_in(Some(&ns::netns_path(&n.netns)), move || {
            nft::run(backend, "replace policy", &json).map(drop)
        })
        .await?;
        if let Some(g) = guard.as_mut() {
            **g = policy.clone();
        }
        Ok(())
    }

    /// Publishes the guest's TCP `guest_port` on `127.0.0.1:host_port` in the host namespace
    /// (`host_port` 0: a free port the kernel picks), for previews; see `ports.rs`. Publishing
    /// a published guest port again with 0 or its current host port returns it unchanged.
    pub async fn publish(
        &self,
        id: &str,
        guest_port: u16,
        host_port: u16,
    ) -> Result<PublishedPort> {
        if guest_port == 0 {
            return Err(NetError::Config("guest port 0 cannot be published".into()));
        }
        let n = Names::new(id)?;
        let existing = |e: &Entry| -> Option<Result<PublishedPort>> {
            let p = e.ports.get(&guest_port)?.published;
            Some(if host_port == 0 || host_port == p.host.port() {
                Ok(p)
            } else {
                Err(NetError::AlreadyPublished {
                    guest_port,
                    host_port: p.host.port(),
                })
            })
        };
        {
            let st = self.state.lock().unwrap();
            let e = st
                .sandboxes
                .get(id)
                .ok_or_else(|| NetError::NotFound(id.into()))?;
            if !e.has_nic {
                return Err(NetError::NoNic(id.into()));
            }
            if let Some(r) = existing(e) {
                return r;
            }
        }
        let fwd = ports::start(
            self.host_ns.clone(),
            ns::netns_path(&n.netns),
            guest_port,
            host_port,
        )
        .await?;
        let mut st = self.state.lock().unwrap();
        // Destroyed meanwhile: `fwd` is dropped, closing the listener.
        let e = st
            .sandboxes
            .get_mut(id)
            .ok_or_else(|| NetError::NotFound(id.into()))?;
        // Published concurrently: the first one stays.
        if let Some(r) = existing(e) {
            return r;
        }
        let p = fwd.published;
        e.ports.insert(guest_port, fwd);
        Ok(p)
    }

    /// Stops publishing a guest port and returns once its listener and every connection
    /// through it are closed. `false` if it was not published.
    pub async fn unpublish(&self, id: &str, guest_port: u16) -> Result<bool> {
        let fwd = self
            .state
            .lock()
            .unwrap()
            .sandboxes
            .get_mut(id)
            .ok_or_else(|| NetError::NotFound(id.into()))?
            .ports
            .remove(&guest_port);
        let found = fwd.is_some();
        if let Some(f) = fwd {
            f.close().await;
        }
        Ok(found)
    }

    /// The sandbox's published ports, by guest port (empty for an unknown sandbox).
    pub fn published(&self, id: &str) -> Vec<PublishedPort> {
        self.state
            .lock()
            .unwrap()
            .sandboxes
            .get(id)
            .map(|e| e.ports.values().map(|f| f.published).collect())
            .unwrap_or_default()
    }

    /// Removes everything the sandbox owns, by id, and returns at once: its published ports,
    /// DNS filter, log reader and tunnel stop, and its namespaces (the sandbox's and the
    /// stand-in guest's) are unmounted. The kernel then tears the namespace down with the TAP,
    /// the namespace's table and the veth pair (deleting links synchronously costs an RCU
    /// grace period each); the transit slot stays quarantined until the host veth is gone, and
    /// a veth still there after a few seconds is deleted explicitly. [`Network::settle`] waits
    /// for all of that. Idempotent.
    pub async fn destroy(&self, id: &str) -> Result<()> {
        let n = Names::new(id)?;
        // Stop the DNS filter, the log reader, the published ports and the tunnel first: their
        // sockets hold the namespace.
        let (rt, ports, tunnel) = match self.state.lock().unwrap().sandboxes.get_mut(id) {
            Some(e) => (e.rt.take(), std::mem::take(&mut e.ports), e.tunnel.take()),
            None => (None, BTreeMap::new(), None),
        };
        drop((rt, tunnel));
        // Closed before returning: a published port is refused once destroy returns.
        for f in ports.into_values() {
            f.close().await;
        }
        let legacy = self.state.lock().unwrap().legacy_host_tables.remove(id);
        if legacy {
            let (backend, del) = (self.cfg.nft, nft::delete_table(&n.table));
            ns::run_in(self.host_ns.as_deref(), move || {
                nft::run(backend, "delete host table", &del).map(drop)
            })
            .await?;
        }
        ns::remove(&n.netns)?;
        ns::remove(&n.guest_netns)?;
        let slot = {
            let mut st = self.state.lock().unwrap();
            st.quarantined.insert(n.host_veth.clone());
            st.sandboxes
                .remove(id)
                .filter(|e| e.has_nic)
                .map(|e| e.transit.slot)
        };
        self.ring.forget(id);
        self.sink.forget(id);
        self.pending.send_modify(|p| *p += 1);
        let (host, state, pending) = (self.host.clone(), self.state.clone(), self.pending.clone());
        tokio::spawn(async move {
            reap(&host, &n.host_veth).await;
            let mut st = state.lock().unwrap();
            st.quarantined.remove(&n.host_veth);
            if let Some(slot) = slot {
                st.pool.free(slot);
            }
            drop(st);
            pending.send_modify(|p| *p -= 1);
        });
        Ok(())
    }

    /// Waits until every destroyed sandbox's kernel objects are gone and their transit slots
    /// are free again.
    pub async fn settle(&self) {
        let mut rx = self.pending.subscribe();
        let _ = rx.wait_for(|p| *p == 0).await;
    }

    /// Every object Hutch owns, once destroyed sandboxes' objects are gone
    /// ([`Network::settle`]): namespaces `hutch-*` (global), host links `hv<hash>h` and the
    /// per-sandbox host nft tables `hutch-*` an older Hutch made (in this Network's host
    /// namespace; the shared table `hutch` belongs to no sandbox). A restarted daemon compares
    /// this with its records and destroys or adopts by id.
    pub async fn list_owned(&self) -> Result<Vec<OwnedObject>> {
        // What destroyed sandboxes left to the kernel is not "owned" any more: wait it out.
        self.settle().await;
        let mut out = Vec::new();
        let _g = self.dump_lock.lock().await;
        let links: Vec<LinkMessage> = self
            .host
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("dump links"))?;
        drop(_g);
        // Sandboxes whose host veth (here) is this Network's.
        let mut ours = HashSet::new();
        for l in &links {
            let Some(name) = link_name(l).filter(|n| names::is_host_veth_name(n)) else {
                continue;
            };
            let tagged = link_alias(l).and_then(names::parse_alias);
            if let Some((_, owner)) = tagged {
                if !owned_by(&self.cfg.owner, owner) {
                    continue;
                }
            }
            let id = tagged.map(|(id, _)| id.to_string());
            ours.extend(id.clone());
            out.push(OwnedObject::Link {
                name: name.to_string(),
                id,
            });
        }
        // Namespaces are host-wide: with an owner, only those whose veth is ours.
        for name in ns::list(names::NETNS_PREFIX)? {
            let rest = &name[names::NETNS_PREFIX.len()..];
            let id = rest.strip_suffix(".guest").unwrap_or(rest).to_string();
            if self.cfg.owner.is_empty() || ours.contains(&id) {
                out.push(OwnedObject::Netns { name, id });
            }
        }
        let backend = self.cfg.nft;
        let tables = ns::run_in(self.host_ns.as_deref(), move || {
            nft::list_tables(backend, names::TABLE_PREFIX)
        })
        .await?;
        for name in tables {
            let id = name[names::TABLE_PREFIX.len()..].to_string();
            out.push(OwnedObject::NftTable { name, id });
        }
        Ok(out)
    }
}

/// Reads back the name and flags of an open TAP fd (for checks and diagnostics).
pub fn tap_info(fd: &OwnedFd) -> io::Result<(String, i16)> {
    tap::info(fd)
}
