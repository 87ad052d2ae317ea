//! Per-sandbox networking for Hutch (issue #4, phases 1 and 2).
//!
//! Each sandbox with a NIC gets, following Firecracker's "network for clones" layout:
//!
//! * a network namespace `hutch-<id>` (bound at `/run/netns/hutch-<id>`, as `ip netns` does)
//!   holding the VMM's TAP `ht<hash>` with the gateway address `172.16.0.1/30`; the guest is
//!   always `172.16.0.2/30` (see [`plan`]), so every snapshot restores unchanged;
//! * a veth pair `hv<hash>h` (host) ↔ `hv<hash>g` (namespace) on a per-sandbox /30 from the
//!   transit pool, with SNAT to the transit address at the namespace edge and masquerade to the
//!   uplink on the host;
//! * an nft table `hutch-<id>` inside the namespace holding the egress policy, and one of the
//!   same name on the host that confines the veth to the uplink.
//!
//! * a DNS filter on `172.16.0.1:53` (UDP and TCP) inside the namespace that answers only names
//!   the policy allows and puts their addresses into the table's `allow4`/`allow6` sets with the
//!   record's TTL before replying, and an NFLOG reader turning the verdict rules' log lines into
//!   [`FlowEvent`]s ([`Network::events`]); see `filter.rs`.
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
mod tap;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

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
pub use tap::TAP_FLAGS;

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
    /// adopted from a previous daemon.
    rt: Option<filter::Runtime>,
}

struct State {
    pool: plan::TransitPool,
    sandboxes: HashMap<String, Entry>,
}

/// The per-host network manager.
pub struct Network {
    cfg: NetConfig,
    host_ns: Option<PathBuf>,
    host: Handle,
    uplink: String,
    state: Mutex<State>,
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
            let Some(id) = alias.strip_prefix(names::ALIAS_PREFIX) else {
                continue;
            };
            if !names::is_host_veth_name(name) {
                continue;
            }
            for (_, a) in addrs.iter().filter(|(i, _)| *i == l.header.index) {
                if let IpNet::V4(a) = a {
                    if let Some(slot) = pool.slot_of(a.addr()) {
                        pool.mark(slot);
                        sandboxes.insert(
                            id.to_string(),
                            Entry {
                                transit: pool.transit(slot),
                                has_nic: true,
                                rt: None,
                            },
                        );
                    }
                }
            }
        }
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
            state: Mutex::new(State { pool, sandboxes }),
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
        let n = Names::new(id)?;
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
                },
            );
            t
        };
        let made = async {
            let net = self.create_inner(id, &n, transit, policy).await?;
            let rt = filter::start(filter::Params {
                id: id.to_string(),
                netns: n.netns.clone(),
                table: n.table.clone(),
                backend: self.cfg.nft,
                policy: policy.clone(),
                upstream: self.upstream,
                host_ns: self.host_ns.clone(),
                sink: self.sink.clone(),
            })
            .await?;
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
    ) -> Result<SandboxNet> {
        let (d4, d6) = self.deny_lists().await?;
        let rules = nft::sandbox_table(
            &nft::SandboxRules {
                table: &n.table,
                tap: &n.tap,
                ns_veth: &n.ns_veth,
                transit_ns: t.ns,
                deny4: &d4,
                deny6: &d6,
            },
            policy,
        );
        let veth_mode = self.cfg.guest_device == GuestDevice::Veth;
        let backend = self.cfg.nft;
        let (netns, tap_name) = (n.netns.clone(), n.tap.clone());
        // One worker thread: make the namespace, its TAP, sysctls and rules, and a netlink socket.
        let fd = ns::run_in(None, move || {
            ns::create_and_enter(&netns)?;
            ns::write_sysctl("net/ipv4/ip_forward", "1")?;
            if !veth_mode {
                tap::create_persistent(&tap_name)?;
            }
            nft::run(backend, "create sandbox table", &rules)?;
            ns::netlink_socket()
        })
        .await?;
        let nsh = handle_from_fd(fd);
        let ns_file = ns::open_netns(&n.netns)?;

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
                    .alias(n.alias.clone())
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(nl(format!("tag and raise {}", n.host_veth)))?;
        add_addr(&self.host, hi, t.host, 30, &n.host_veth).await?;

        let lo = must_index(&nsh, "lo").await?;
        set_up(&nsh, lo, "lo").await?;
        let vi = must_index(&nsh, &n.ns_veth).await?;
        add_addr(&nsh, vi, t.ns, 30, &n.ns_veth).await?;
        set_up(&nsh, vi, &n.ns_veth).await?;
        default_route(&nsh, vi, t.host, &n.netns).await?;

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

        let host_rules = nft::host_table(&n.table, &n.host_veth, &self.uplink, t.ns);
        ns::run_in(self.host_ns.as_deref(), move || {
            nft::run(backend, "create host table", &host_rules).map(drop)
        })
        .await?;

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

    /// Removes everything the sandbox owns, by id: the host nft table, the host veth (taking its
    /// peer along), the namespace (taking the TAP and the namespace's table along once no VMM
    /// holds the TAP) and the stand-in guest namespace. Idempotent.
    pub async fn destroy(&self, id: &str) -> Result<()> {
        let n = Names::new(id)?;
        // Stop the DNS filter and log reader first: their sockets hold the namespace.
        let rt = self
            .state
            .lock()
            .unwrap()
            .sandboxes
            .get_mut(id)
            .and_then(|e| e.rt.take());
        drop(rt);
        let backend = self.cfg.nft;
        let del = nft::delete_table(&n.table);
        // The two slow kernel operations (each waits for an RCU grace period) run side by side:
        // the host table's removal on an ns thread, the veth's over netlink.
        let table = ns::run_in(self.host_ns.as_deref(), move || {
            nft::run(backend, "delete host table", &del).map(drop)
        });
        let veth = async {
            if let Some(i) = link_index(&self.host, &n.host_veth).await? {
                match self.host.link().del(i).execute().await {
                    Ok(()) => {}
                    Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {}
                    Err(e) => return Err(nl(format!("delete {}", n.host_veth))(e)),
                }
            }
            Ok(())
        };
        let (t, v) = tokio::join!(table, veth);
        t?;
        v?;
        ns::remove(&n.netns)?;
        ns::remove(&n.guest_netns)?;
        let mut st = self.state.lock().unwrap();
        if let Some(e) = st.sandboxes.remove(id) {
            if e.has_nic {
                st.pool.free(e.transit.slot);
            }
        }
        drop(st);
        self.ring.forget(id);
        self.sink.forget(id);
        Ok(())
    }

    /// Every object Hutch owns: namespaces `hutch-*` (global), host links `hv<hash>h` and host
    /// nft tables `hutch-*` (in this Network's host namespace). A restarted daemon compares this
    /// with its records and destroys or adopts by id.
    pub async fn list_owned(&self) -> Result<Vec<OwnedObject>> {
        let mut out = Vec::new();
        for name in ns::list(names::NETNS_PREFIX)? {
            let rest = &name[names::NETNS_PREFIX.len()..];
            let id = rest.strip_suffix(".guest").unwrap_or(rest).to_string();
            out.push(OwnedObject::Netns { name, id });
        }
        let _g = self.dump_lock.lock().await;
        let links: Vec<LinkMessage> = self
            .host
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("dump links"))?;
        for l in &links {
            if let Some(name) = link_name(l).filter(|n| names::is_host_veth_name(n)) {
                let id = link_alias(l)
                    .and_then(|a| a.strip_prefix(names::ALIAS_PREFIX))
                    .map(str::to_string);
                out.push(OwnedObject::Link {
                    name: name.to_string(),
                    id,
                });
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
