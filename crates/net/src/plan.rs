//! The address plan.
//!
//! Every sandbox sees the same guest network (so a snapshot restores unchanged); sandboxes are
//! told apart only by their namespace and a per-sandbox transit subnet on the veth to the host:
//!
//! ```text
//!  guest 172.16.0.2/30 ──TAP── 172.16.0.1/30 [netns hutch-<id>] 10.200.N.2/30 ──veth── 10.200.N.1/30 [host] ── uplink
//!                             (gateway, DNS)   SNAT 172.16.0.2→10.200.N.2       masquerade 10.200.N.2→uplink
//! ```
//!
//! `N` is slot `i` of the transit pool (`10.200.0.0/16` by default: 16384 /30 slots).

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::NetError;

/// Guest address, identical in every sandbox.
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 2);
/// TAP-side address inside the sandbox namespace: the guest's gateway and DNS server.
pub const GATEWAY_ADDR: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 1);
/// Prefix length of the guest link.
pub const GUEST_PREFIX: u8 = 30;
/// Guest MAC address (locally administered), identical in every sandbox.
pub const GUEST_MAC: [u8; 6] = [0x06, 0x00, 0xac, 0x10, 0x00, 0x02];
/// Default transit pool.
pub const DEFAULT_TRANSIT_POOL: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(10, 200, 0, 0), 16) {
    Ok(n) => n,
    Err(_) => unreachable!(),
};

/// One sandbox's transit subnet (a /30 of the pool).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Transit {
    /// Slot number inside the pool.
    pub slot: u32,
    /// The /30 itself.
    pub net: Ipv4Net,
    /// Host end of the veth (`.1`).
    pub host: Ipv4Addr,
    /// Namespace end of the veth (`.2`); guest traffic leaves the namespace with this source.
    pub ns: Ipv4Addr,
}

/// Allocator of transit /30s.
#[derive(Debug)]
pub struct TransitPool {
    net: Ipv4Net,
    used: BTreeSet<u32>,
}

impl TransitPool {
    /// A pool over `net`, which must be a /30 or larger.
    pub fn new(net: Ipv4Net) -> Result<TransitPool, NetError> {
        if net.prefix_len() > 30 {
            return Err(NetError::Config(format!(
                "transit pool {net} is smaller than a /30"
            )));
        }
        Ok(TransitPool {
            net: net.trunc(),
            used: BTreeSet::new(),
        })
    }

    /// The pool's network.
    pub fn net(&self) -> Ipv4Net {
        self.net
    }

    fn slots(&self) -> u32 {
        1u32 << (30 - self.net.prefix_len())
    }

    /// Slot `slot`'s addresses.
    pub fn transit(&self, slot: u32) -> Transit {
        let base = u32::from(self.net.network()) + slot * 4;
        Transit {
            slot,
            net: Ipv4Net::new(Ipv4Addr::from(base), 30).unwrap(),
            host: Ipv4Addr::from(base + 1),
            ns: Ipv4Addr::from(base + 2),
        }
    }

    /// Slot holding `addr`, if `addr` is in the pool.
    pub fn slot_of(&self, addr: Ipv4Addr) -> Option<u32> {
        self.net
            .contains(&addr)
            .then(|| (u32::from(addr) - u32::from(self.net.network())) / 4)
    }

    /// Takes the lowest free slot.
    pub fn alloc(&mut self) -> Result<Transit, NetError> {
        let n = self.slots();
        let mut slot = 0;
        for &u in &self.used {
            if u != slot {
                break;
            }
            slot += 1;
        }
        if slot >= n {
            return Err(NetError::PoolExhausted(self.net));
        }
        self.used.insert(slot);
        Ok(self.transit(slot))
    }

    /// Marks a slot used (adopting one found at startup). False if it already was.
    pub fn mark(&mut self, slot: u32) -> bool {
        self.used.insert(slot)
    }

    /// Returns a slot.
    pub fn free(&mut self, slot: u32) {
        self.used.remove(&slot);
    }
}

fn v4(a: [u8; 4], len: u8) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::from(a), len).unwrap()
}

fn v6(s: &str, len: u8) -> Ipv6Net {
    Ipv6Net::new(s.parse::<Ipv6Addr>().unwrap(), len).unwrap()
}

/// IPv4 destinations denied whatever the policy (besides the host's own addresses and the
/// transit pool, which are added at setup).
pub fn always_denied_v4() -> Vec<Ipv4Net> {
    vec![
        v4([0, 0, 0, 0], 8),      // "this network"
        v4([10, 0, 0, 0], 8),     // RFC1918
        v4([100, 64, 0, 0], 10),  // CGNAT
        v4([127, 0, 0, 0], 8),    // loopback
        v4([169, 254, 0, 0], 16), // link-local, incl. 169.254.169.254 metadata
        v4([172, 16, 0, 0], 12),  // RFC1918 (incl. the guest link itself)
        v4([192, 0, 0, 0], 24),   // IETF protocol assignments
        v4([192, 168, 0, 0], 16), // RFC1918
        v4([198, 18, 0, 0], 15),  // benchmarking
        v4([224, 0, 0, 0], 4),    // multicast
        v4([240, 0, 0, 0], 4),    // reserved, incl. 255.255.255.255 broadcast
    ]
}

/// IPv6 destinations denied whatever the policy.
pub fn always_denied_v6() -> Vec<Ipv6Net> {
    vec![
        v6("::", 96),          // unspecified, loopback and IPv4-compatible (deprecated)
        v6("::ffff:0:0", 96),  // IPv4-mapped (would bypass the v4 list)
        v6("2001::", 32),      // Teredo (embeds an IPv4 server and client)
        v6("2002::", 16),      // 6to4 (embeds an IPv4 address: relays reach the v4 LAN)
        v6("64:ff9b::", 96),   // NAT64 well-known prefix (ditto)
        v6("64:ff9b:1::", 48), // local-use NAT64
        v6("fc00::", 7),       // ULA
        v6("fe80::", 10),      // link-local
        v6("fec0::", 10),      // site-local (deprecated)
        v6("ff00::", 8),       // multicast
    ]
}

/// The complete deny lists for a sandbox: the fixed ranges, the transit pool and every address
/// the host holds, merged so that nft's interval sets get no overlaps.
pub fn deny_lists(pool: Ipv4Net, host_addrs: &[IpNet]) -> (Vec<Ipv4Net>, Vec<Ipv6Net>) {
    let mut d4 = always_denied_v4();
    let mut d6 = always_denied_v6();
    d4.push(pool);
    for a in host_addrs {
        match a {
            IpNet::V4(n) => d4.push(Ipv4Net::new(n.addr(), 32).unwrap()),
            IpNet::V6(n) => d6.push(Ipv6Net::new(n.addr(), 128).unwrap()),
        }
    }
    (Ipv4Net::aggregate(&d4), Ipv6Net::aggregate(&d6))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_that_embed_ipv4_are_always_denied() {
        let (_, d6) = deny_lists(DEFAULT_TRANSIT_POOL, &[]);
        let denied = |a: &str| {
            let a: Ipv6Addr = a.parse().unwrap();
            d6.iter().any(|n| n.contains(&a))
        };
        for a in [
            "::1",
            "::",
            "::a00:1",
            "::ffff:10.0.0.1",
            "2002:a00:1::1",
            "2001:0:4136::1",
        ] {
            assert!(denied(a), "{a} is not denied");
        }
        for a in ["2001:4860::8888", "2606:4700::1111"] {
            assert!(!denied(a), "{a} (public) is denied");
        }
    }

    #[test]
    fn pool_allocates_distinct_slots_and_reuses_freed() {
        let mut p = TransitPool::new(DEFAULT_TRANSIT_POOL).unwrap();
        let a = p.alloc().unwrap();
        let b = p.alloc().unwrap();
        assert_eq!(a.host, Ipv4Addr::new(10, 200, 0, 1));
        assert_eq!(a.ns, Ipv4Addr::new(10, 200, 0, 2));
        assert_eq!(b.net, "10.200.0.4/30".parse().unwrap());
        p.free(a.slot);
        assert_eq!(p.alloc().unwrap().slot, 0);
        assert_eq!(p.slot_of(Ipv4Addr::new(10, 200, 0, 6)), Some(1));
        let mut tiny = TransitPool::new("10.9.0.0/29".parse().unwrap()).unwrap();
        tiny.alloc().unwrap();
        tiny.alloc().unwrap();
        assert!(matches!(tiny.alloc(), Err(NetError::PoolExhausted(_))));
    }

    #[test]
    fn deny_lists_cover_the_classics_and_merge() {
        let host: Vec<IpNet> = vec![
            "198.51.100.1/24".parse().unwrap(),
            "10.200.0.1/30".parse().unwrap(),
            "2001:db8::5/64".parse().unwrap(),
        ];
        let (d4, d6) = deny_lists(DEFAULT_TRANSIT_POOL, &host);
        let has4 = |a: [u8; 4]| d4.iter().any(|n| n.contains(&Ipv4Addr::from(a)));
        for a in [
            [10, 1, 2, 3],
            [172, 31, 0, 1],
            [192, 168, 1, 1],
            [100, 64, 0, 1],
            [169, 254, 169, 254],
            [127, 0, 0, 1],
            [224, 0, 0, 1],
            [255, 255, 255, 255],
            [198, 51, 100, 1],
        ] {
            assert!(has4(a), "{a:?}");
        }
        assert!(!has4([198, 51, 100, 2]));
        assert!(!has4([203, 0, 113, 10]));
        let has6 = |s: &str| {
            d6.iter()
                .any(|n| n.contains(&s.parse::<Ipv6Addr>().unwrap()))
        };
        for a in [
            "::1",
            "fe80::1",
            "fd00::1",
            "ff02::1",
            "2001:db8::5",
            "::ffff:10.0.0.1",
        ] {
            assert!(has6(a), "{a}");
        }
        assert!(!has6("2001:db8::6"));
        // aggregated: no element contains another
        for (i, a) in d4.iter().enumerate() {
            for (j, b) in d4.iter().enumerate() {
                assert!(i == j || !a.contains(b), "{a} overlaps {b}");
            }
        }
    }
}
