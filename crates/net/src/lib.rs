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

mod config;
pub mod dns;
mod error;
pub mod events;
mod filter;
mod intercept;
mod libnftables;
pub mod names;
mod netlink;
mod network;
pub mod nflog;
pub mod nft;
mod ns;
pub mod plan;
mod ports;
mod spares;
mod tap;
pub mod wg;

#[cfg(feature = "testbed")]
pub mod testbed;
pub use events::{
    EventRing, EventSink, FanOut, FlowEvent, Proto, RateLimitedSink, RuleName, Verdict,
};
pub use filter::{first_nameserver, Answers, MAX_TTL as DNS_MAX_TTL, MIN_TTL as DNS_MIN_TTL};
pub use names::{validate_id, Names};
pub use nft::NftBackend;
pub use plan::{Transit, DEFAULT_TRANSIT_POOL, GATEWAY_ADDR, GUEST_ADDR, GUEST_MAC, GUEST_PREFIX};
pub use ports::PublishedPort;
pub use tap::TAP_FLAGS;
pub use wg::WireGuardConfig;

pub use config::{GuestDevice, GuestNetConfig, NetConfig, Policy};
pub use error::{NetError, Result};
pub use intercept::{Dialer, Interception};
pub use network::{in_netns, tap_info, Network, OwnedObject, SandboxNet};
pub use nft::{BROKER_PORT, INTERCEPTED_PORTS};
