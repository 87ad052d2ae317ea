//! Sandbox networks: turning a spec's policy into a host network, a NIC and the guest's
//! configuration.

use std::{net::IpAddr, sync::Arc};

use hutch_net::{wg, Policy, PublishedPort, WireGuardConfig};
use hutch_protocol::NetworkConfig;
use hutch_store::{HostObject, ObjectKind};
use hutch_types::{NetworkPolicy, SandboxInfo, SandboxSpec, SpecError};
use hutch_vmm::{Nic, Tap, Vmm};

use crate::blocking::off_worker;
use crate::host::HostNetwork;
use crate::lifecycle::{check, ActionKind, IllegalAction};
use crate::manager::{chain, CoreError, Manager};

/// The host-side policy for `policy`, or why it is malformed.
pub fn to_policy(policy: &NetworkPolicy) -> Result<Policy, SpecError> {
    Ok(match policy {
        NetworkPolicy::None => Policy::None,
        NetworkPolicy::Open => Policy::Open,
        NetworkPolicy::Allow {
            cidrs,
            ports,
            domains,
        } => Policy::Allow {
            cidrs: cidrs
                .iter()
                .map(|c| {
                    c.parse()
                        .map_err(|_| SpecError(format!("{c:.60} is not a CIDR")))
                })
                .collect::<Result<_, _>>()?,
            ports: ports.clone(),
            domains: domains.clone(),
        },
    })
}

/// The host-side WireGuard tunnel of `spec`, or why it is malformed. `None` without one, and
/// for a sandbox without a NIC.
pub fn to_tunnel(spec: &SandboxSpec) -> Result<Option<WireGuardConfig>, SpecError> {
    let Some(w) = spec.wireguard.as_ref().filter(|_| spec.network.has_nic()) else {
        return Ok(None);
    };
    let bad = |what: &str| SpecError(format!("wireguard: {what}"));
    let key = |k: &str, what: &str| {
        wg::parse_key(k).map_err(|_| bad(&format!("{what} is not a base64 key")))
    };
    let cfg = WireGuardConfig {
        private_key: key(&w.private_key, "private_key")?,
        peer_public_key: key(&w.peer_public_key, "peer_public_key")?,
        preshared_key: w
            .preshared_key
            .as_deref()
            .map(|k| key(k, "preshared_key"))
            .transpose()?,
        endpoint: w
            .endpoint
            .parse()
            .map_err(|_| bad("endpoint is not IPv4:port"))?,
        address: w
            .address
            .parse()
            .map_err(|_| bad("address is not an IPv4 CIDR"))?,
        allowed_ips: w
            .allowed_ips
            .iter()
            .map(|c| {
                c.parse()
                    .map_err(|_| bad(&format!("{c:.60} is not a CIDR")))
            })
            .collect::<Result<_, _>>()?,
        keepalive: w.keepalive,
        dns: w
            .dns
            .as_deref()
            .map(|d| d.parse().map_err(|_| bad("dns is not an address")))
            .transpose()?,
    };
    cfg.validate().map_err(|e| SpecError(e.to_string()))?;
    Ok(Some(cfg))
}

/// The host-side policy for a guest that has a NIC whatever its policy (a clone of a
/// template with a NIC): `none` becomes a policy that reaches nothing.
pub fn nic_policy(policy: &NetworkPolicy) -> Result<Policy, SpecError> {
    match policy {
        NetworkPolicy::None => Ok(Policy::Allow {
            cidrs: vec![],
            ports: vec![],
            domains: vec![],
        }),
        p => to_policy(p),
    }
}

/// Creates the sandbox's network (behind `tunnel`, if given) and hands over its TAP in the
/// form `vmm` takes: opened here as a descriptor (QEMU), or by name with its namespace for a
/// VMM that opens it itself ([`Vmm::opens_tap_by_name`], Firecracker: nothing here holds the
/// TAP open, or its `TUNSETIFF` would fail with `EBUSY`). `None` for a sandbox without a NIC.
/// Either way the TAP goes with the network's namespace.
pub async fn attach(
    net: &Arc<dyn HostNetwork>,
    vmm: &dyn Vmm,
    id: &str,
    policy: &Policy,
    tunnel: Option<&WireGuardConfig>,
) -> Result<Option<(Nic, NetworkConfig)>, CoreError> {
    let Some(sn) = net.create(id, policy, tunnel).await? else {
        return Ok(None);
    };
    let tap = if vmm.opens_tap_by_name() {
        net.named_tap(&sn)
            .map(|(name, netns)| Tap::Named { name, netns })
    } else {
        // Opening it joins a thread that entered the namespace: off the async workers.
        let (net, sn) = (net.clone(), sn.clone());
        off_worker(move || net.open_tap(&sn))
            .await
            .map(|fd| Tap::Fd(Arc::new(fd)))
    };
    let tap = match tap {
        Ok(tap) => tap,
        Err(e) => {
            let _ = net.destroy(id).await;
            return Err(e.into());
        }
    };
    let g = &sn.guest;
    let config = NetworkConfig {
        mac: g.mac,
        address: IpAddr::V4(g.address),
        prefix_len: g.prefix_len,
        gateway: IpAddr::V4(g.gateway),
        dns: vec![IpAddr::V4(g.dns)],
    };
    Ok(Some((Nic { tap, mac: g.mac }, config)))
}

/// The record of a published port: `name` the guest port, `detail` the host port.
fn port_object(id: &str, guest_port: u16, host_port: u16, confirmed: bool) -> HostObject {
    HostObject {
        sandbox_id: id.to_string(),
        kind: ObjectKind::Port,
        name: guest_port.to_string(),
        detail: host_port.to_string(),
        confirmed,
    }
}

impl Manager {
    /// Publishes a sandbox's guest TCP port on a host loopback port (`None`: any free one),
    /// for previews. Recorded, so a restarted daemon publishes it again; removed with the
    /// sandbox.
    pub async fn publish_port(
        &self,
        id: &str,
        guest_port: u16,
        host_port: Option<u16>,
    ) -> Result<PublishedPort, CoreError> {
        let info = self.get(id).await?;
        check(&info.state, ActionKind::Network)?;
        if guest_port == 0 {
            return Err(SpecError("guest port 0 cannot be published".into()).into());
        }
        if !info.spec.network.has_nic() {
            return Err(CoreError::Illegal(IllegalAction {
                action: "publish a port of",
                state: "created without a network",
            }));
        }
        let net = self.net()?;
        let store = self.store();
        store
            .intend_object(&port_object(id, guest_port, host_port.unwrap_or(0), false))
            .await?;
        match net.publish(id, guest_port, host_port.unwrap_or(0)).await {
            Ok(p) => {
                store
                    .confirm_object(&port_object(id, guest_port, p.host.port(), true))
                    .await?;
                Ok(p)
            }
            Err(e) => {
                // The record follows what is published: an earlier publication of this guest
                // port stays as it was, a failed new one is forgotten.
                match net
                    .published(id)
                    .iter()
                    .find(|p| p.guest_port == guest_port)
                {
                    Some(p) => {
                        store
                            .confirm_object(&port_object(id, guest_port, p.host.port(), true))
                            .await?
                    }
                    None => {
                        store
                            .forget_object(id, ObjectKind::Port, &guest_port.to_string())
                            .await?
                    }
                }
                Err(e.into())
            }
        }
    }

    /// Stops publishing a guest port; returns the ports still published.
    pub async fn unpublish_port(
        &self,
        id: &str,
        guest_port: u16,
    ) -> Result<Vec<PublishedPort>, CoreError> {
        let info = self.get(id).await?;
        check(&info.state, ActionKind::Network)?;
        if let Ok(net) = self.net() {
            if info.spec.network.has_nic() {
                net.unpublish(id, guest_port).await?;
            }
        }
        self.store()
            .forget_object(id, ObjectKind::Port, &guest_port.to_string())
            .await?;
        self.published_ports(id).await
    }

    /// The sandbox's published ports.
    pub async fn published_ports(&self, id: &str) -> Result<Vec<PublishedPort>, CoreError> {
        self.get(id).await?;
        Ok(self.net().map(|n| n.published(id)).unwrap_or_default())
    }
}

/// After a daemon restart: takes over an adopted sandbox's network (its DNS filter and
/// decision log restart) and publishes its recorded ports again. A port that cannot be
/// published again (its host port was taken meanwhile) is logged and forgotten.
pub(crate) async fn adopt(m: &Manager, info: &SandboxInfo) -> Result<(), String> {
    let net = match m.net() {
        Ok(net) => net,
        Err(_) if !info.spec.network.has_nic() => return Ok(()),
        Err(e) => return Err(chain(&e)),
    };
    let policy = to_policy(&info.spec.network).map_err(|e| chain(&e))?;
    let tunnel = to_tunnel(&info.spec).map_err(|e| chain(&e))?;
    net.adopt(&info.id, &policy, tunnel.as_ref())
        .await
        .map_err(|e| format!("network lost across a daemon restart: {}", chain(&e)))?;
    let recorded = m
        .store()
        .objects()
        .await
        .map_err(|e| chain(&e))?
        .into_iter()
        .filter(|o| o.sandbox_id == info.id && o.kind == ObjectKind::Port);
    for obj in recorded {
        let (Ok(guest), Ok(host)) = (obj.name.parse::<u16>(), obj.detail.parse::<u16>()) else {
            continue;
        };
        match net.publish(&info.id, guest, host).await {
            Ok(p) => tracing::info!(id = %info.id, guest, host = %p.host, "port published again"),
            Err(e) => {
                tracing::warn!(id = %info.id, guest, host, error = %chain(&e), "cannot publish a port again; forgetting it");
                m.store()
                    .forget_object(&info.id, ObjectKind::Port, &obj.name)
                    .await
                    .map_err(|e| chain(&e))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod firecracker_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnels_convert_and_bad_ones_are_refused() {
        let key = wg::encode_key(&[5u8; 32]);
        let w = hutch_types::WireGuardSpec {
            private_key: key.clone(),
            peer_public_key: key,
            preshared_key: None,
            endpoint: "203.0.113.1:51820".into(),
            address: "10.9.0.2/32".into(),
            allowed_ips: vec!["0.0.0.0/0".into()],
            keepalive: Some(25),
            dns: None,
        };
        let mut spec = SandboxSpec {
            network: NetworkPolicy::Open,
            wireguard: Some(w.clone()),
            ..Default::default()
        };
        let t = to_tunnel(&spec).unwrap().unwrap();
        assert_eq!((t.endpoint.port(), t.keepalive), (51820, Some(25)));
        for bad in [
            hutch_types::WireGuardSpec {
                private_key: "short".into(),
                ..w.clone()
            },
            hutch_types::WireGuardSpec {
                endpoint: "example.com:51820".into(),
                ..w.clone()
            },
            hutch_types::WireGuardSpec {
                endpoint: "[2001:db8::1]:51820".into(),
                ..w.clone()
            },
            hutch_types::WireGuardSpec {
                allowed_ips: vec![],
                ..w.clone()
            },
        ] {
            spec.wireguard = Some(bad);
            assert!(to_tunnel(&spec).is_err(), "{:?}", spec.wireguard);
        }
        // Without a NIC there is nothing to tunnel.
        spec.network = NetworkPolicy::None;
        assert!(to_tunnel(&spec).unwrap().is_none());
    }

    #[test]
    fn policies_convert_and_bad_cidrs_are_refused() {
        assert!(matches!(to_policy(&NetworkPolicy::Open), Ok(Policy::Open)));
        let allow = NetworkPolicy::Allow {
            cidrs: vec!["203.0.113.0/24".into()],
            ports: vec![443],
            domains: vec!["*.example.com".into()],
        };
        assert!(matches!(to_policy(&allow), Ok(Policy::Allow { cidrs, .. }) if cidrs.len() == 1));
        let bad = NetworkPolicy::Allow {
            cidrs: vec!["nope".into()],
            ports: vec![],
            domains: vec![],
        };
        assert!(to_policy(&bad).is_err());
    }
}
