//! rtnetlink helpers: handles bound to a namespace, links, addresses, routes, dumps.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkMessage, State as LinkState,
};
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};

use crate::network::{REAP_DEADLINE, REAP_POLL};
use crate::{error::nl, ns, NetError, Result};

/// Opens an rtnetlink handle bound to the namespace at `path` (or the caller's).
pub(crate) async fn handle_in(path: Option<PathBuf>) -> Result<Handle> {
    let fd = ns::run_in(path.as_deref(), ns::netlink_socket).await?;
    Ok(handle_from_fd(fd))
}

pub(crate) fn handle_from_fd(fd: OwnedFd) -> Handle {
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

pub(crate) async fn must_index(h: &Handle, name: &str) -> Result<u32> {
    link_index(h, name)
        .await?
        .ok_or_else(|| NetError::Config(format!("link {name} vanished")))
}

/// Whether a veth tagged `tag` belongs to a Network of `owner` (untagged ones to anyone).
pub(crate) fn owned_by(owner: &str, tag: Option<&str>) -> bool {
    owner.is_empty() || tag.is_none_or(|t| t == owner)
}

/// Waits for a destroyed sandbox's host veth to go with its namespace; deletes it past
/// [`REAP_DEADLINE`].
pub(crate) async fn reap(h: &Handle, veth: &str) {
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

/// Creates the veth pair `name` (in `h`'s namespace) ↔ `peer` (directly inside the namespace
/// `peer_ns`).
pub(crate) async fn add_veth(
    h: &Handle,
    name: &str,
    peer: &str,
    peer_ns: &std::fs::File,
) -> Result<()> {
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(peer.to_string())
        .setns_by_fd(peer_ns.as_raw_fd())
        .build();
    let veth = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
        .name(name.to_string())
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    h.link()
        .add(veth)
        .execute()
        .await
        .map_err(nl(format!("create veth {name}")))
}

/// Waits (a second at most) until a link's operational state is up: a new veth pair drops what
/// it is given until the kernel's link watcher has activated both ends, shortly after they are
/// raised.
pub(crate) async fn wait_oper_up(h: &Handle, index: u32, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let mut s = h.link().get().match_index(index).execute();
        let m = s.try_next().await.map_err(nl(format!("get {what}")))?;
        let up = LinkAttribute::OperState(LinkState::Up);
        if m.is_some_and(|m| m.attributes.contains(&up)) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(NetError::Config(format!("{what} did not come up")));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

pub(crate) async fn set_up(h: &Handle, index: u32, what: &str) -> Result<()> {
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl(format!("set {what} up")))
}

pub(crate) async fn add_addr(
    h: &Handle,
    index: u32,
    addr: Ipv4Addr,
    len: u8,
    what: &str,
) -> Result<()> {
    h.address()
        .add(index, IpAddr::V4(addr), len)
        .execute()
        .await
        .map_err(nl(format!("add {addr}/{len} to {what}")))
}

pub(crate) async fn default_route(h: &Handle, index: u32, gw: Ipv4Addr, what: &str) -> Result<()> {
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

pub(crate) async fn all_links(h: &Handle) -> Result<Vec<LinkMessage>> {
    h.link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("dump links"))
}

pub(crate) async fn all_addrs(h: &Handle) -> Result<Vec<(u32, IpNet)>> {
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

pub(crate) fn link_name(m: &LinkMessage) -> Option<&str> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

pub(crate) fn link_alias(m: &LinkMessage) -> Option<&str> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfAlias(n) => Some(n.as_str()),
        _ => None,
    })
}

pub(crate) async fn default_route_dev(h: &Handle) -> Result<Option<String>> {
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
