//! The fleet's records in etcd and where they live.
//!
//! ```text
//! <prefix>hosts/<host>        HostRecord (JSON), under the host's lease
//! <prefix>incarnations/<host> the host's incarnation counter (decimal), bumped at each start
//! <prefix>booked/<host>       slots booked on the host by gateways (decimal), moved by CAS
//! <prefix>placements/<id>     Placement (JSON): the host that owns sandbox <id>; not leased
//! <prefix>tokens/<sha256>     FleetToken (JSON): a token every gateway and host accepts
//! <prefix>drained/<host>      Drain (JSON): the host takes no new placements; not leased
//! <prefix>reconciler/leader   the elected reconciler's id, under its lease
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

/// Where a placed sandbox stands as far as the fleet can tell (see [`crate::reconcile`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlacementState {
    /// Its host holds its lease: the host's own state is the sandbox's.
    #[default]
    Running,
    /// Its host's lease expired; the sandbox may still run there. Back to `running` when the
    /// host returns within the grace period.
    Unreachable,
    /// Its host stayed away past the grace period: the sandbox is given up (never recreated
    /// elsewhere) and its host stops it when it returns.
    Lost,
}

impl PlacementState {
    /// The state's name, as the API reports it.
    pub fn name(self) -> &'static str {
        match self {
            PlacementState::Running => "running",
            PlacementState::Unreachable => "unreachable",
            PlacementState::Lost => "lost",
        }
    }
}

/// Which host owns a sandbox (written once by the gateway that placed it; afterwards only
/// its state moves, by the elected reconciler).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The sandbox.
    pub sandbox: String,
    /// Its host.
    pub host: String,
    /// The host incarnation that holds the sandbox: the one it was placed on, moved to the
    /// host's newer incarnation when a restarted host keeps it. A host stops the sandboxes
    /// marked [`PlacementState::Lost`] at an incarnation older than its own (fencing).
    pub incarnation: u64,
    /// The sandbox's labels (a gateway checks a token's scope on them before proxying).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Where it stands.
    #[serde(default)]
    pub state: PlacementState,
    /// When it entered its state, Unix milliseconds (set for `unreachable` and `lost`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<u64>,
    /// What it was created as, for reporting it while its host is away.
    #[serde(default)]
    pub shape: Shape,
}

/// A sandbox's shape as created, kept in its placement so a gateway can still describe it
/// while its host is unreachable (no environment or secrets: those stay on the host).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    /// Guest image name.
    #[serde(default)]
    pub image: String,
    /// vCPUs.
    #[serde(default)]
    pub cpus: u8,
    /// Guest memory, MiB.
    #[serde(default)]
    pub memory_mib: u32,
    /// Creation time, Unix milliseconds.
    #[serde(default)]
    pub created_at_ms: i64,
    /// When its TTL destroys it, Unix milliseconds.
    #[serde(default)]
    pub expires_at_ms: Option<i64>,
}

/// A drained host's marker: no new placements go there; its sandboxes run on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    /// When it was drained, Unix milliseconds.
    pub since_ms: u64,
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

    /// A host's drain marker.
    pub fn drained(&self, host: &str) -> String {
        format!("{}drained/{host}", self.prefix)
    }

    /// The elected reconciler's key.
    pub fn leader(&self) -> String {
        format!("{}reconciler/leader", self.prefix)
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
            "drained" => Some(Entry::Drained(name)),
            "reconciler" if name == "leader" => Some(Entry::Leader),
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
    /// `drained/<host>`.
    Drained(&'k str),
    /// `reconciler/leader`.
    Leader,
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

/// Now, Unix milliseconds.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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
        assert_eq!(keys.parse(&keys.drained("h1")), Some(Entry::Drained("h1")));
        assert_eq!(keys.parse(&keys.leader()), Some(Entry::Leader));
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
