//! Sandbox networks: turning a spec's policy into a host network, a NIC and the guest's
//! configuration.

use std::{net::IpAddr, sync::Arc};

use hutch_net::{Network, Policy};
use hutch_protocol::NetworkConfig;
use hutch_types::{NetworkPolicy, SpecError};
use hutch_vmm::Nic;

use crate::manager::CoreError;

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

/// Creates the sandbox's network and opens its TAP; `None` for a sandbox without a NIC.
pub async fn attach(
    net: &Arc<Network>,
    id: &str,
    policy: &Policy,
) -> Result<Option<(Nic, NetworkConfig)>, CoreError> {
    let Some(sn) = net.create(id, policy).await? else {
        return Ok(None);
    };
    let tap = match net.open_tap(&sn) {
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
    Ok(Some((
        Nic {
            tap: Arc::new(tap),
            mac: g.mac,
        },
        config,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

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
