//! The fleet's records in etcd and where they live.
//!
//! ```text
//! <prefix>hosts/<host>        HostRecord (JSON), under the host's lease
//! <prefix>incarnations/<host> the host's incarnation counter (decimal), bumped at each start
//! <prefix>booked/<host>       slots booked on the host by gateways (decimal), moved by CAS
//! <prefix>placements/<id>     Placement (JSON): the host that owns sandbox <id>; not leased
//! <prefix>tokens/<sha256>     FleetToken (JSON): a token every gateway and host accepts
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::FleetError;

/// Where the fleet's keys live unless told otherwise.
pub const DEFAULT_PREFIX: &str = "/hutch/fleet/v1/";

/// What a host can still take, as it last reported.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// The host's CPU count.
    pub vcpus: u32,
    /// Guest memory the host may hand out in total, MiB.
    pub memory_mib: u64,
    /// Guest memory not yet handed out, MiB.
    pub free_memory_mib: u64,
    /// Free disk under the host's state directory, MiB.
    pub free_disk_mib: u64,
    /// Most sandboxes alive at once.
    pub slots: u32,
    /// Slots not taken by a live sandbox.
    pub free_slots: u32,
}

/// A host's record: how to reach it and what it offers. Lives under the host's lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    /// The host's name in the fleet (key-safe: `[A-Za-z0-9._:-]`).
    pub host: String,
    /// The URL gateways reach its HTTP API at.
    pub advertise: String,
    /// Its failure domain, if given.
    #[serde(default)]
    pub zone: Option<String>,
    /// Labels placement filters on.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Its VMM backend (`qemu`, `firecracker`).
    pub backend: String,
    /// Bumped at each daemon start: tells a restarted host from the one before.
    pub incarnation: u64,
    /// What it can take.
    pub capacity: Capacity,
}

/// Which host owns a sandbox (written once, by the gateway that placed it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The sandbox.
    pub sandbox: String,
    /// Its host.
    pub host: String,
    /// The host's incarnation when the sandbox was placed.
    pub incarnation: u64,
    /// The sandbox's labels (a gateway checks a token's scope on them before proxying).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A fleet-wide API token, stored by its SHA-256 (hex; never the token itself): gateways
/// check it, and hosts check it again on every call a gateway passes on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetToken {
    /// Its id (`ftok-…`), for listing and removal.
    pub id: String,
    /// The label (`key=value`) it is limited to; admin when absent.
    #[serde(default)]
    pub label: Option<String>,
}

/// The key layout under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// The layout under `prefix` (a trailing `/` is added if missing).
    pub fn new(prefix: &str) -> Keys {
        let mut prefix = prefix.to_string();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Keys { prefix }
    }

    /// Everything the fleet stores.
    pub fn root(&self) -> &str {
        &self.prefix
    }

    /// A host's record.
    pub fn host(&self, host: &str) -> String {
        format!("{}hosts/{host}", self.prefix)
    }

    /// A host's incarnation counter.
    pub fn incarnation(&self, host: &str) -> String {
        format!("{}incarnations/{host}", self.prefix)
    }

    /// A host's booked-slot counter.
    pub fn booked(&self, host: &str) -> String {
        format!("{}booked/{host}", self.prefix)
    }

    /// A sandbox's placement.
    pub fn placement(&self, sandbox: &str) -> String {
        format!("{}placements/{sandbox}", self.prefix)
    }

    /// A fleet token's record, by the token's SHA-256 (hex).
    pub fn token(&self, hash: &str) -> String {
        format!("{}tokens/{hash}", self.prefix)
    }

    /// What a key under the prefix names, or `None` for a key outside the layout.
    pub fn parse<'k>(&self, key: &'k str) -> Option<Entry<'k>> {
        let rest = key.strip_prefix(self.prefix.as_str())?;
        let (kind, name) = rest.split_once('/')?;
        match kind {
            "hosts" => Some(Entry::Host(name)),
            "booked" => Some(Entry::Booked(name)),
            "placements" => Some(Entry::Placement(name)),
            "tokens" => Some(Entry::Token(name)),
            _ => None,
        }
    }
}

/// A key the cache keeps, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry<'k> {
    /// `hosts/<host>`.
    Host(&'k str),
    /// `booked/<host>`.
    Booked(&'k str),
    /// `placements/<id>`.
    Placement(&'k str),
    /// `tokens/<sha256>`.
    Token(&'k str),
}

/// Whether `host` can name a host in keys: non-empty, at most 128 bytes of `[A-Za-z0-9._:-]`.
pub fn check_host_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 128
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

/// Decodes a JSON record read at `key`.
pub(crate) fn decode<T: for<'de> Deserialize<'de>>(
    key: &str,
    value: &[u8],
) -> Result<T, FleetError> {
    serde_json::from_slice(value).map_err(|source| FleetError::Malformed {
        key: key.to_string(),
        source,
    })
}

/// Reads a decimal counter (an absent or unreadable one counts as 0).
pub(crate) fn counter(value: &[u8]) -> u64 {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_back_to_what_they_name() {
        let keys = Keys::new("/t/1");
        assert_eq!(keys.host("h1"), "/t/1/hosts/h1");
        assert_eq!(keys.parse(&keys.host("h1")), Some(Entry::Host("h1")));
        assert_eq!(keys.parse(&keys.booked("h1")), Some(Entry::Booked("h1")));
        assert_eq!(
            keys.parse(&keys.placement("sb-1")),
            Some(Entry::Placement("sb-1"))
        );
        assert_eq!(keys.parse(&keys.incarnation("h1")), None);
        assert_eq!(keys.parse("/other/hosts/h1"), None);
    }

    #[test]
    fn host_names_are_key_safe() {
        assert!(check_host_name("127.0.0.1:7001"));
        for bad in ["", "a/b", "a b", &"x".repeat(129)] {
            assert!(!check_host_name(bad), "{bad:?}");
        }
    }
}
