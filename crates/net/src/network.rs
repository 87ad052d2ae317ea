//! The per-host network manager: creating, adopting, changing and destroying sandbox
//! networks, and listing what the host holds.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::net::Ipv4Addr;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ipnet::{IpNet, Ipv4Net};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::error::nl;
use crate::netlink::{
    add_addr, add_veth, all_addrs, all_links, default_route, default_route_dev, handle_from_fd,
    handle_in, link_alias, link_name, must_index, owned_by, reap, set_up, wait_oper_up,
};
use crate::spares::{unmount_spare, Spare};
use crate::{
    filter, first_nameserver, names, nft, ns, plan, ports, tap, wg, EventRing, EventSink,
    FlowEvent, GuestDevice, GuestNetConfig, Names, NetConfig, NetError, Policy, PublishedPort,
    RateLimitedSink, Result, Transit, WireGuardConfig, GATEWAY_ADDR, GUEST_ADDR, GUEST_MAC,
    GUEST_PREFIX,
};

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

pub(crate) struct Entry {
    pub(crate) transit: Transit,
    pub(crate) has_nic: bool,
    /// The nft table in its namespace: `hutch-<id>`, or the spare's it was handed out from.
    pub(crate) table: String,
    /// The spare's names while it is being handed out (removed by these, too, on failure).
    pub(crate) leftover: Option<Names>,
    /// DNS filter and decision-log reader; absent for sandboxes without a NIC and for ones
    /// a previous daemon left until [`Network::adopt`] takes them over.
    pub(crate) rt: Option<filter::Runtime>,
    /// Published guest ports, by guest port.
    pub(crate) ports: BTreeMap<u16, ports::Forward>,
    /// The WireGuard egress tunnel's driver, if the sandbox has one.
    pub(crate) tunnel: Option<wg::Tunnel>,
}

impl Entry {
    fn new(transit: Transit, has_nic: bool, table: String) -> Entry {
        Entry {
            transit,
            has_nic,
            table,
            leftover: None,
            rt: None,
            ports: BTreeMap::new(),
            tunnel: None,
        }
    }
}

/// The always-denied IPv4 and IPv6 networks (see [`plan::deny_lists`]).
pub(crate) type DenyLists = (Vec<Ipv4Net>, Vec<ipnet::Ipv6Net>);

/// What [`Network::build`] made.
pub(crate) struct Built {
    pub(crate) nsh: Handle,
    pub(crate) deny: DenyLists,
    pub(crate) host_index: u32,
    pub(crate) tap_index: u32,
    pub(crate) ns_veth_index: u32,
    pub(crate) guest_netns: Option<String>,
}

pub(crate) struct State {
    pub(crate) pool: plan::TransitPool,
    /// Spare networks ready to hand out.
    pub(crate) spares: Vec<Spare>,
    pub(crate) sandboxes: HashMap<String, Entry>,
    /// Host veths of destroyed sandboxes whose namespaces the kernel is still tearing down;
    /// their transit slots stay taken until they are gone.
    pub(crate) quarantined: HashSet<String>,
    /// Sandboxes with a per-sandbox host table (made by an older Hutch), removed on destroy.
    legacy_host_tables: HashSet<String>,
}

/// How often a quarantined host veth is checked for.
pub(crate) const REAP_POLL: Duration = Duration::from_millis(5);
/// How long the kernel gets to remove a destroyed sandbox's veth with its namespace before
/// Hutch deletes it itself (e.g. when something still holds the namespace).
pub(crate) const REAP_DEADLINE: Duration = Duration::from_secs(5);

/// The per-host network manager.
pub struct Network {
    pub(crate) cfg: NetConfig,
    pub(crate) host_ns: Option<PathBuf>,
    pub(crate) host: Handle,
    pub(crate) uplink: String,
    pub(crate) state: Arc<Mutex<State>>,
    /// Quarantined veths not yet gone (see [`Network::settle`]).
    pub(crate) pending: Arc<tokio::sync::watch::Sender<usize>>,
    /// The kernel runs one dump at a time per netlink socket (`EBUSY` otherwise), and every
    /// request on `host` shares one socket: dumps on it take this lock.
    dump_lock: tokio::sync::Mutex<()>,
    /// How many spares to keep (see [`NetConfig::spares`]).
    pub(crate) spare_target: AtomicUsize,
    /// One [`Network::refill`] at a time.
    pub(crate) refill_lock: tokio::sync::Mutex<()>,
    /// Wakes [`Network::keep_spares`]'s task.
    pub(crate) spare_wanted: Arc<tokio::sync::Notify>,
    pub(crate) upstream: Option<SocketAddr>,
    ring: Arc<EventRing>,
    pub(crate) sink: Arc<RateLimitedSink<Arc<EventRing>>>,
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

impl Network {
    /// Connects to the host namespace, finds the uplink, enables IPv4 forwarding there and adopts
    /// the transit slots of sandboxes a previous daemon left behind (their host veths carry the
    /// `hutch:<id>` alias); the spare networks a previous `Network` of the same owner left there
    /// are removed. Makes no spares itself (see [`Network::refill`]).
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
        let links = all_links(&host).await?;
        let addrs = all_addrs(&host).await?;
        // Spares this owner left behind (a crash): removed below, once `Network` exists.
        let mut stale_spares = Vec::new();
        for l in &links {
            let (Some(name), Some(alias)) = (link_name(l), link_alias(l)) else {
                continue;
            };
            if !names::is_host_veth_name(name) {
                continue;
            }
            let sandbox = names::parse_alias(alias);
            let spare = names::parse_spare_alias(alias);
            if sandbox.is_none() && spare.is_none() {
                continue;
            }
            for (_, a) in addrs.iter().filter(|(i, _)| *i == l.header.index) {
                let IpNet::V4(a) = a else { continue };
                let Some(slot) = pool.slot_of(a.addr()) else {
                    continue;
                };
                // Another owner's slot is taken all the same; its network is not ours.
                pool.mark(slot);
                match (sandbox, spare) {
                    (Some((id, owner)), _) if owned_by(&cfg.owner, owner) => {
                        let table = format!("{}{id}", names::TABLE_PREFIX);
                        sandboxes
                            .insert(id.to_string(), Entry::new(pool.transit(slot), true, table));
                    }
                    (_, Some((token, owner))) if owner.unwrap_or("") == cfg.owner => {
                        stale_spares.push((Names::spare(token), slot));
                    }
                    _ => {}
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
        let net = Network {
            spare_target: AtomicUsize::new(cfg.spares),
            cfg,
            host_ns,
            host,
            uplink,
            state: Arc::new(Mutex::new(State {
                pool,
                spares: Vec::new(),
                sandboxes,
                quarantined: HashSet::new(),
                legacy_host_tables,
            })),
            pending: Arc::new(tokio::sync::watch::channel(0).0),
            dump_lock: tokio::sync::Mutex::new(()),
            refill_lock: tokio::sync::Mutex::new(()),
            spare_wanted: Arc::new(tokio::sync::Notify::new()),
            upstream,
            ring,
            sink,
        };
        for (n, slot) in stale_spares {
            net.discard(&n, Some(slot));
        }
        Ok(net)
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
    /// [`crate::events::RING_CAPACITY`] events per sandbox, emptied by [`Network::destroy`].
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
        let (transit, spare) = {
            let mut st = self.state.lock().unwrap();
            if st.sandboxes.contains_key(id) {
                return Err(NetError::AlreadyExists(id.into()));
            }
            if *policy == Policy::None {
                let transit = st.pool.transit(0);
                st.sandboxes
                    .insert(id.into(), Entry::new(transit, false, n.table.clone()));
                return Ok(None);
            }
            let spare = match tunnel {
                Some(_) => None,
                None => st.spares.pop(),
            };
            let t = match &spare {
                Some(sp) => sp.transit,
                None => st.pool.alloc()?,
            };
            let mut e = Entry::new(t, true, n.table.clone());
            if let Some(sp) = &spare {
                e.table = sp.names.table.clone();
                e.leftover = Some(sp.names.clone());
            }
            st.sandboxes.insert(id.into(), e);
            (t, spare)
        };
        let made = async {
            let sockets = match spare {
                Some(sp) => {
                    let claimed = self.claim(id, &n, sp, policy).await;
                    // Refilled after the hand-out, which it would slow down.
                    self.spare_wanted.notify_one();
                    claimed?
                }
                None => self.create_cold(id, &n, transit, policy, tunnel).await?,
            };
            let (net, sockets) = sockets;
            let table = self.table_of(id)?;
            let rt = filter::run(self.filter_params(id, &n, table, policy), sockets)?;
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

    /// The nft table of a sandbox in its namespace.
    fn table_of(&self, id: &str) -> Result<String> {
        let st = self.state.lock().unwrap();
        let e = st
            .sandboxes
            .get(id)
            .ok_or_else(|| NetError::NotFound(id.into()))?;
        Ok(e.table.clone())
    }

    /// Makes a sandbox's network from nothing, tunnel included; returns it with its filter's
    /// sockets.
    async fn create_cold(
        &self,
        id: &str,
        n: &Names,
        transit: Transit,
        policy: &Policy,
        tunnel: Option<&WireGuardConfig>,
    ) -> Result<(SandboxNet, filter::Sockets)> {
        let alias = names::alias(id, &self.cfg.owner);
        let built = self.build(n, transit, policy, tunnel, alias).await?;
        if let Some(w) = tunnel {
            let tn = self.start_tunnel(n, w).await?;
            if let Some(e) = self.state.lock().unwrap().sandboxes.get_mut(id) {
                e.tunnel = Some(tn);
            }
        }
        let sockets =
            filter::open(&ns::netns_path(&n.netns), self.upstream_params(n, tunnel)).await?;
        Ok((self.sandbox_net(id, n, transit, built.guest_netns), sockets))
    }

    /// Hands the spare `sp` out as sandbox `id`'s network: renames its namespaces and links to
    /// the sandbox's names (the host veth gets the sandbox's alias) and, in one nft transaction,
    /// points its table's device sets at the new names, refreshes the deny lists and applies
    /// `policy`. Returns the network and the spare's filter sockets.
    async fn claim(
        &self,
        id: &str,
        n: &Names,
        sp: Spare,
        policy: &Policy,
    ) -> Result<(SandboxNet, filter::Sockets)> {
        let old = &sp.names;
        let rename = |h: &Handle, index: u32, to: &str, alias: Option<String>| {
            let mut b = LinkUnspec::new_with_index(index).name(to.to_string());
            if let Some(a) = alias {
                b = b.alias(a);
            }
            let what = format!("rename {index} to {to}");
            let req = h.link().set(b.build()).execute();
            async move { req.await.map_err(nl(what)) }
        };
        let links = async {
            let (a, b, c) = tokio::join!(
                rename(
                    &self.host,
                    sp.host_index,
                    &n.host_veth,
                    Some(names::alias(id, &self.cfg.owner))
                ),
                rename(&sp.nsh, sp.tap_index, &n.tap, None),
                rename(&sp.nsh, sp.ns_veth_index, &n.ns_veth, None),
            );
            a?;
            b?;
            c
        };
        // The spare's parked thread renames the namespaces and applies the rules while the
        // host's addresses are read for the deny lists; should they have changed since the
        // spare was made (seldom), its deny sets are refreshed before the network is handed out.
        let json = nft::sandbox_claim(&old.table, &n.tap, &n.ns_veth, policy);
        let backend = self.cfg.nft;
        let mut moves = vec![(old.netns.clone(), n.netns.clone())];
        if sp.guest_netns.is_some() {
            moves.push((old.guest_netns.clone(), n.guest_netns.clone()));
        }
        let applied = sp.worker.run(move || {
            for (from, to) in &moves {
                ns::rename(from, to)?;
            }
            nft::run(backend, "hand out a spare table", &json).map(drop)
        });
        let (links, deny, applied) = tokio::join!(links, self.deny_lists(), applied);
        links?;
        applied?;
        let deny = deny?;
        if deny != sp.deny {
            let json = nft::sandbox_deny(&old.table, &deny.0, &deny.1);
            ns::run_in(Some(&ns::netns_path(&n.netns)), move || {
                nft::run(backend, "refresh a spare's deny lists", &json).map(drop)
            })
            .await?;
        }
        if let Some(e) = self.state.lock().unwrap().sandboxes.get_mut(id) {
            e.leftover = None;
        }
        let guest = sp.guest_netns.map(|_| n.guest_netns.clone());
        Ok((self.sandbox_net(id, n, sp.transit, guest), sp.sockets))
    }

    fn sandbox_net(
        &self,
        id: &str,
        n: &Names,
        transit: Transit,
        guest_netns: Option<String>,
    ) -> SandboxNet {
        SandboxNet {
            id: id.into(),
            netns: n.netns.clone(),
            tap_name: n.tap.clone(),
            host_veth: n.host_veth.clone(),
            transit,
            guest: GuestNetConfig::standard(),
            guest_netns,
        }
    }

    fn filter_params(&self, id: &str, n: &Names, table: String, policy: &Policy) -> filter::Params {
        filter::Params {
            id: id.to_string(),
            netns: n.netns.clone(),
            table,
            backend: self.cfg.nft,
            policy: policy.clone(),
            sink: self.sink.clone(),
        }
    }

    /// Where the sandbox's DNS filter asks: a tunnelled sandbox's resolver is asked from inside
    /// its namespace, through the tunnel, like everything else it sends.
    pub(crate) fn upstream_params(
        &self,
        n: &Names,
        tunnel: Option<&WireGuardConfig>,
    ) -> filter::UpstreamParams {
        match tunnel {
            Some(w) => filter::UpstreamParams {
                addr: w.dns.map(|ip| SocketAddr::new(ip, 53)).or(self.upstream),
                ns: Some(ns::netns_path(&n.netns)),
            },
            None => filter::UpstreamParams {
                addr: self.upstream,
                ns: self.host_ns.clone(),
            },
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
                st.sandboxes
                    .insert(id.into(), Entry::new(transit, false, n.table.clone()));
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
        // `hutch-<id>`, or the spare's table it was handed out from: the one table there.
        let backend = self.cfg.nft;
        let table = ns::run_in(Some(&ns::netns_path(&n.netns)), move || {
            nft::list_tables(backend, names::TABLE_PREFIX)
        })
        .await?
        .into_iter()
        .next()
        .unwrap_or_else(|| n.table.clone());
        let sockets =
            filter::open(&ns::netns_path(&n.netns), self.upstream_params(&n, tunnel)).await?;
        let rt = filter::run(self.filter_params(id, &n, table.clone(), policy), sockets)?;
        if let Some(e) = self.state.lock().unwrap().sandboxes.get_mut(id) {
            if e.rt.is_none() {
                e.rt = Some(rt);
                e.table = table;
            }
        }
        Ok(())
    }

    pub(crate) async fn deny_lists(&self) -> Result<DenyLists> {
        let _g = self.dump_lock.lock().await;
        let host_addrs: Vec<IpNet> = all_addrs(&self.host)
            .await?
            .into_iter()
            .map(|(_, a)| a)
            .collect();
        Ok(plan::deny_lists(self.cfg.transit_pool, &host_addrs))
    }

    /// Makes a network under the names `n` with the host veth tagged `alias`: namespace, TAP
    /// (or stand-in veth and guest namespace), transit veth, addresses and routes, and the table
    /// with `policy`.
    pub(crate) async fn build(
        &self,
        n: &Names,
        t: Transit,
        policy: &Policy,
        tunnel: Option<&WireGuardConfig>,
        alias: String,
    ) -> Result<Built> {
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
        let (deny, fd) = (lists?, fd?);
        let (d4, d6) = &deny;
        let rules = nft::sandbox_table(
            &nft::SandboxRules {
                table: &n.table,
                tap: &n.tap,
                ns_veth: &n.ns_veth,
                transit_ns: t.ns,
                deny4: d4,
                deny6: d6,
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
        let (table, links) = tokio::join!(table, self.links(n, t, tunnel, fd, alias));
        table?;
        Ok(Built { deny, ..links? })
    }

    /// The links, addresses and routes of a new sandbox network, over netlink (`fd`: a netlink
    /// socket in its namespace; the host veth is tagged `alias`).
    pub(crate) async fn links(
        &self,
        n: &Names,
        t: Transit,
        tunnel: Option<&WireGuardConfig>,
        fd: OwnedFd,
        alias: String,
    ) -> Result<Built> {
        let veth_mode = self.cfg.guest_device == GuestDevice::Veth;
        let nsh = handle_from_fd(fd);
        let ns_file = ns::open_netns(&n.netns)?;

        // Three independent strands, side by side on the same netlink sockets: the transit
        // veth (host end, then namespace end and routes), the namespace's loopback, and the
        // guest-facing device.
        let transit = async {
            // Transit veth, peer created directly inside the namespace.
            add_veth(&self.host, &n.host_veth, &n.ns_veth, &ns_file).await?;
            let hi = must_index(&self.host, &n.host_veth).await?;
            self.host
                .link()
                .set(LinkUnspec::new_with_index(hi).alias(alias).up().build())
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

            Ok::<_, NetError>((hi, vi))
        };
        let lo = async {
            let lo = must_index(&nsh, "lo").await?;
            set_up(&nsh, lo, "lo").await?;
            Ok::<_, NetError>(())
        };
        let guest = async {
            let mut guest_netns = None;
            let mut stand_in = None;
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
                add_veth(&nsh, &n.tap, &n.guest_veth, &gfile).await?;
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
                stand_in = Some((gh, gi));
            }
            let ti = must_index(&nsh, &n.tap).await?;
            add_addr(&nsh, ti, GATEWAY_ADDR, GUEST_PREFIX, &n.tap).await?;
            set_up(&nsh, ti, &n.tap).await?;
            // The stand-in guest sends at once (a VM's TAP only carries once the VMM is there).
            if let Some((gh, gi)) = stand_in {
                wait_oper_up(&nsh, ti, &n.tap).await?;
                wait_oper_up(&gh, gi, "guest").await?;
            }
            Ok::<_, NetError>((ti, guest_netns))
        };
        let (transit, lo, guest) = tokio::join!(transit, lo, guest);
        let (host_index, ns_veth_index) = transit?;
        lo?;
        let (tap_index, guest_netns) = guest?;
        Ok(Built {
            nsh,
            deny: DenyLists::default(),
            host_index,
            tap_index,
            ns_veth_index,
            guest_netns,
        })
    }

    /// Opens the sandbox's TAP inside its namespace and returns the fd, for a VMM that stays in
    /// the host namespace (`qemu -netdev tap,fd=N,vhost=off`). Flags: [`crate::TAP_FLAGS`].
    pub fn open_tap(&self, net: &SandboxNet) -> Result<OwnedFd> {
        let (tap, netns) = self.named_tap(net)?;
        ns::run_in_sync(Some(&netns), move || tap::open(&tap))
    }

    /// The sandbox's TAP by name and the path of the namespace it lives in, for a VMM that
    /// enters the namespace and opens the TAP itself (Firecracker). The TAP is persistent and
    /// nobody holds it open, so its single queue is the VMM's to take; it goes with the
    /// namespace.
    pub fn named_tap(&self, net: &SandboxNet) -> Result<(String, PathBuf)> {
        if self.cfg.guest_device != GuestDevice::Tap {
            return Err(NetError::Config(
                "this Network makes veth stand-ins, not TAPs".into(),
            ));
        }
        Ok((net.tap_name.clone(), ns::netns_path(&net.netns)))
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
            (e.rt.as_ref().map(|rt| rt.policy.clone()), e.table.clone())
        };
        let (shared, table) = shared;
        let (d4, d6) = self.deny_lists().await?;
        let json = nft::sandbox_policy(&table, &d4, &d6, policy);
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
        let entry = self.state.lock().unwrap().sandboxes.remove(id);
        let mut veths = vec![n.host_veth];
        let mut slot = None;
        if let Some(e) = entry {
            // A spare whose hand-out failed: whatever still has its names goes too.
            if let Some(old) = e.leftover {
                ns::remove(&old.netns)?;
                ns::remove(&old.guest_netns)?;
                veths.push(old.host_veth);
            }
            slot = e.has_nic.then_some(e.transit.slot);
        }
        self.ring.forget(id);
        self.sink.forget(id);
        self.quarantine(veths, slot);
        Ok(())
    }

    /// Keeps `slot` taken until every one of the host veths `veths` is gone (they go with
    /// their unmounted namespaces; see [`reap`]), which [`Network::settle`] waits for.
    fn quarantine(&self, veths: Vec<String>, slot: Option<u32>) {
        self.state
            .lock()
            .unwrap()
            .quarantined
            .extend(veths.iter().cloned());
        self.pending.send_modify(|p| *p += 1);
        let (host, state, pending) = (self.host.clone(), self.state.clone(), self.pending.clone());
        tokio::spawn(async move {
            for v in &veths {
                reap(&host, v).await;
            }
            let mut st = state.lock().unwrap();
            for v in &veths {
                st.quarantined.remove(v);
            }
            if let Some(slot) = slot {
                st.pool.free(slot);
            }
            drop(st);
            pending.send_modify(|p| *p -= 1);
        });
    }

    /// Removes a spare network (`n`: its names) that is no sandbox's.
    pub(crate) fn discard(&self, n: &Names, slot: Option<u32>) {
        unmount_spare(n);
        self.quarantine(vec![n.host_veth.clone()], slot);
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
        let links = all_links(&self.host).await?;
        drop(_g);
        // Sandboxes whose host veth (here) is this Network's.
        let mut ours = HashSet::new();
        for l in &links {
            let Some(name) = link_name(l).filter(|n| names::is_host_veth_name(n)) else {
                continue;
            };
            if link_alias(l).is_some_and(|a| names::parse_spare_alias(a).is_some()) {
                continue;
            }
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

impl Drop for Network {
    /// Removes the spare networks (the kernel takes their links with their namespaces).
    fn drop(&mut self) {
        let spares = std::mem::take(&mut self.state.lock().unwrap().spares);
        for sp in spares {
            unmount_spare(&sp.names);
        }
        self.spare_wanted.notify_one();
    }
}

/// Reads back the name and flags of an open TAP fd (for checks and diagnostics).
pub fn tap_info(fd: &OwnedFd) -> io::Result<(String, i16)> {
    tap::info(fd)
}
