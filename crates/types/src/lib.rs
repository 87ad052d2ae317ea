//! Pure data shared by the store, the core, the HTTP API and its client.
//!
//! Nothing here does I/O. Validation lives next to the data it guards, so every front end
//! (CLI, HTTP, SDK) rejects the same bad input with the same stable [`ErrorCode`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Labels attached to a sandbox: `key=value` pairs used for filtering and token scoping.
pub type Labels = BTreeMap<String, String>;

/// What a client asks for when creating a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxSpec {
    /// Guest image name.
    #[serde(default = "default_image")]
    pub image: String,
    /// vCPUs.
    #[serde(default = "default_cpus")]
    pub cpus: u8,
    /// Guest memory in MiB.
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    /// Size of the writable disk in MiB; the guest can never write more than this.
    #[serde(default = "default_disk")]
    pub disk_mib: u64,
    /// Environment given to every command run in the sandbox.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Labels for filtering and token scoping.
    #[serde(default)]
    pub labels: Labels,
    /// Destroy the sandbox this many seconds after creation.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// What the sandbox may reach on the network.
    #[serde(default)]
    pub network: NetworkPolicy,
}

/// A sandbox's egress policy. Whatever it says, the host, private and link-local ranges,
/// cloud metadata and other sandboxes stay unreachable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum NetworkPolicy {
    /// No network device at all.
    #[default]
    None,
    /// Every public address.
    Open,
    /// Only these destinations.
    Allow {
        /// Allowed networks, e.g. `203.0.113.0/24`.
        #[serde(default)]
        cidrs: Vec<String>,
        /// Allowed ports; empty means any.
        #[serde(default)]
        ports: Vec<u16>,
        /// Allowed names: exact or `*.suffix`; reachable once resolved through Hutch's DNS.
        #[serde(default)]
        domains: Vec<String>,
    },
}

impl NetworkPolicy {
    /// Whether the sandbox gets a network device.
    pub fn has_nic(&self) -> bool {
        !matches!(self, NetworkPolicy::None)
    }
}

fn default_image() -> String {
    "default".into()
}
fn default_cpus() -> u8 {
    1
}
fn default_memory() -> u32 {
    512
}
fn default_disk() -> u64 {
    2048
}

impl Default for SandboxSpec {
    fn default() -> Self {
        SandboxSpec {
            image: default_image(),
            cpus: default_cpus(),
            memory_mib: default_memory(),
            disk_mib: default_disk(),
            env: BTreeMap::new(),
            labels: Labels::new(),
            ttl_secs: None,
            network: NetworkPolicy::None,
        }
    }
}

/// Hard bounds on a single sandbox's shape.
pub mod bounds {
    /// Most vCPUs per sandbox.
    pub const MAX_CPUS: u8 = 64;
    /// Least guest memory in MiB.
    pub const MIN_MEMORY_MIB: u32 = 128;
    /// Most guest memory in MiB.
    pub const MAX_MEMORY_MIB: u32 = 256 * 1024;
    /// Least writable disk in MiB.
    pub const MIN_DISK_MIB: u64 = 16;
    /// Most writable disk in MiB.
    pub const MAX_DISK_MIB: u64 = 1024 * 1024;
    /// Most labels or env entries.
    pub const MAX_ENTRIES: usize = 64;
    /// Longest key or value in labels and env.
    pub const MAX_ENTRY_LEN: usize = 4096;
    /// Longest TTL: one year.
    pub const MAX_TTL_SECS: u64 = 365 * 24 * 3600;
}

/// A spec that breaks one of the [`bounds`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid sandbox spec: {0}")]
pub struct SpecError(pub String);

impl SandboxSpec {
    /// Checks every field against [`bounds`] and the name rules.
    pub fn validate(&self) -> Result<(), SpecError> {
        use bounds::*;
        let bad = |m: String| Err(SpecError(m));
        if !valid_name(&self.image) {
            return bad(format!(
                "image name {:?} is not [a-z0-9][a-z0-9._-]*",
                truncate(&self.image)
            ));
        }
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return bad(format!("cpus must be 1..={MAX_CPUS}"));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return bad(format!(
                "memory_mib must be {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}"
            ));
        }
        if !(MIN_DISK_MIB..=MAX_DISK_MIB).contains(&self.disk_mib) {
            return bad(format!("disk_mib must be {MIN_DISK_MIB}..={MAX_DISK_MIB}"));
        }
        if self.ttl_secs.is_some_and(|t| t == 0 || t > MAX_TTL_SECS) {
            return bad(format!("ttl_secs must be 1..={MAX_TTL_SECS}"));
        }
        check_map("labels", &self.labels, valid_label_key)?;
        check_map("env", &self.env, valid_env_name)
    }
}

fn check_map(
    what: &str,
    map: &BTreeMap<String, String>,
    key_ok: impl Fn(&str) -> bool,
) -> Result<(), SpecError> {
    use bounds::*;
    if map.len() > MAX_ENTRIES {
        return Err(SpecError(format!("more than {MAX_ENTRIES} {what}")));
    }
    for (k, v) in map {
        if !key_ok(k) || k.len() > MAX_ENTRY_LEN {
            return Err(SpecError(format!(
                "{what} key {:?} is not allowed",
                truncate(k)
            )));
        }
        if v.len() > MAX_ENTRY_LEN || v.contains('\0') {
            return Err(SpecError(format!(
                "{what} value for {:?} is too long or has NUL",
                truncate(k)
            )));
        }
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

/// `[a-z0-9][a-z0-9._-]{0,62}`: image names and the like.
pub fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= 63
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-_".contains(c))
}

/// Label keys: `[A-Za-z0-9._/-]+`.
pub fn valid_label_key(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._/-".contains(c))
}

/// Environment variable names: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn valid_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Sandbox ids: `sb-` followed by lowercase hex.
pub fn valid_sandbox_id(s: &str) -> bool {
    s.len() <= 40
        && s.strip_prefix("sb-").is_some_and(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

/// Where a sandbox is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", tag = "state", content = "reason")]
pub enum SandboxState {
    /// Booting; not usable yet.
    Creating,
    /// Running and answering health checks.
    Running,
    /// Frozen (vCPUs stopped); memory kept.
    Paused,
    /// Shutting down.
    Stopping,
    /// Powered off; its record remains.
    Stopped,
    /// Gone; nothing of it remains on the host.
    Destroyed,
    /// Broken, with the reason.
    Failed(String),
}

impl SandboxState {
    /// The state's name as stored and filtered on.
    pub fn name(&self) -> &'static str {
        match self {
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
            SandboxState::Stopping => "stopping",
            SandboxState::Stopped => "stopped",
            SandboxState::Destroyed => "destroyed",
            SandboxState::Failed(_) => "failed",
        }
    }

    /// Parses a stored state name plus the failure reason (for `failed`).
    pub fn from_parts(name: &str, reason: Option<String>) -> Option<SandboxState> {
        Some(match name {
            "creating" => SandboxState::Creating,
            "running" => SandboxState::Running,
            "paused" => SandboxState::Paused,
            "stopping" => SandboxState::Stopping,
            "stopped" => SandboxState::Stopped,
            "destroyed" => SandboxState::Destroyed,
            "failed" => SandboxState::Failed(reason.unwrap_or_default()),
            _ => return None,
        })
    }
}

/// A sandbox as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SandboxInfo {
    /// Its id.
    pub id: String,
    /// Where it is in its life.
    pub state: SandboxState,
    /// What it was created with.
    pub spec: SandboxSpec,
    /// Creation time, Unix milliseconds.
    pub created_at_ms: i64,
    /// Last state change, Unix milliseconds.
    pub updated_at_ms: i64,
    /// When its TTL destroys it, Unix milliseconds.
    pub expires_at_ms: Option<i64>,
}

/// Stable, machine-readable error categories of the API. Never renamed; only added to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request body or parameters are malformed.
    BadRequest,
    /// A spec value is out of bounds.
    InvalidSpec,
    /// No credentials were given where they are required.
    Unauthorized,
    /// The credentials do not allow this.
    Forbidden,
    /// No such sandbox (or image).
    NotFound,
    /// The action is not legal in the sandbox's current state.
    Conflict,
    /// Admission refused: too many sandboxes or not enough memory budget.
    OverCapacity,
    /// A path escapes the allowed tree, or an archive holds something forbidden.
    UnsafePath,
    /// The guest could not run the command (e.g. not executable).
    ExecFailed,
    /// The command does not exist in the guest.
    CommandNotFound,
    /// The guest or VMM failed.
    Internal,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_are_checked_against_bounds() {
        assert!(SandboxSpec::default().validate().is_ok());
        let bad = [
            SandboxSpec {
                cpus: 0,
                ..Default::default()
            },
            SandboxSpec {
                memory_mib: 1,
                ..Default::default()
            },
            SandboxSpec {
                disk_mib: u64::MAX,
                ..Default::default()
            },
            SandboxSpec {
                image: "../etc".into(),
                ..Default::default()
            },
            SandboxSpec {
                ttl_secs: Some(0),
                ..Default::default()
            },
            SandboxSpec {
                env: [("1X".to_string(), "v".to_string())].into(),
                ..Default::default()
            },
            SandboxSpec {
                labels: [("a b".to_string(), "v".to_string())].into(),
                ..Default::default()
            },
        ];
        for spec in bad {
            assert!(spec.validate().is_err(), "{spec:?} passed");
        }
    }

    #[test]
    fn json_specs_fill_defaults_and_reject_unknown_fields() {
        let spec: SandboxSpec = serde_json::from_str(r#"{"cpus":2}"#).unwrap();
        assert_eq!(
            spec,
            SandboxSpec {
                cpus: 2,
                ..Default::default()
            }
        );
        assert!(serde_json::from_str::<SandboxSpec>(r#"{"cpus":1,"gpus":4}"#).is_err());
        let failed = serde_json::to_string(&SandboxState::Failed("oom".into())).unwrap();
        assert_eq!(failed, r#"{"state":"failed","reason":"oom"}"#);
    }

    #[test]
    fn states_round_trip_through_their_stored_form() {
        for s in [SandboxState::Running, SandboxState::Failed("boom".into())] {
            let reason = match &s {
                SandboxState::Failed(r) => Some(r.clone()),
                _ => None,
            };
            assert_eq!(SandboxState::from_parts(s.name(), reason), Some(s));
        }
        assert!(valid_sandbox_id("sb-0a1b"));
        assert!(!valid_sandbox_id("sb-../x"));
    }
}
