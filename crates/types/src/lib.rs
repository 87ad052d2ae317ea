//! Pure data shared by the store, the core, the HTTP API and its client.
//!
//! Nothing here does I/O. Validation lives next to the data it guards, so every front end
//! (CLI, HTTP, SDK) rejects the same bad input with the same stable [`ErrorCode`].

#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

mod civil;
mod id;
mod scope;
mod secret;
mod share;
pub use civil::civil_from_days;
pub use id::{
    check_host_id, valid_sandbox_id, InvalidSandboxId, SandboxId, MAX_HOST_ID_LEN,
    MAX_SANDBOX_ID_LEN,
};
pub use scope::{Forbidden, TokenScope};
pub use secret::{
    canonical_host, check_env_name, check_secret_name, BrokerDecision, BrokerEvent, InvalidSecret,
    SecretBinding, SecretInfo, SecretLocation, SshKeyInfo, MAX_SECRET_NAME_LEN,
    NEVER_SUBSTITUTED_HEADERS, PLACEHOLDER_PREFIX,
};
pub use share::{ShareSpec, MAX_SHARES};

/// Labels attached to a sandbox: `key=value` pairs used for filtering and token scoping.
pub type Labels = BTreeMap<String, String>;

/// What a client asks for when creating a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxSpec {
    /// Guest image name.
    #[serde(default = "default_image")]
    #[schema(pattern = "^[a-z0-9][a-z0-9._-]{0,62}$")]
    pub image: String,
    /// vCPUs.
    #[serde(default = "default_cpus")]
    #[schema(minimum = 1, maximum = 64)]
    pub cpus: u8,
    /// Guest memory in MiB.
    #[serde(default = "default_memory")]
    #[schema(minimum = 128, maximum = 262144)]
    pub memory_mib: u32,
    /// Size of the writable disk in MiB; the guest can never write more than this.
    #[serde(default = "default_disk")]
    #[schema(minimum = 16, maximum = 1048576)]
    pub disk_mib: u64,
    /// Environment given to every command run in the sandbox.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Labels for filtering and token scoping.
    #[serde(default)]
    pub labels: Labels,
    /// Destroy the sandbox this many seconds after creation.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 31536000)]
    pub ttl_secs: Option<u64>,
    /// What the sandbox may reach on the network.
    #[serde(default)]
    pub network: NetworkPolicy,
    /// A WireGuard tunnel all of the sandbox's allowed egress leaves through (run on the host;
    /// the guest never sees it). Without a NIC (policy `none`) it is ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard: Option<WireGuardSpec>,
    /// Restore the sandbox from this template (`hutch template create`) instead of booting
    /// `image`: its image, vCPUs, memory and disk are the template's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[a-z0-9][a-z0-9._-]{0,62}$")]
    pub template: Option<String>,
    /// Where the sandbox came from, when it was restored rather than booted. Set by Hutch
    /// (templates and forks), never by a client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
    /// Secrets attached by name (`hutch secret set`): each appears in the guest only as a
    /// placeholder in its environment variable; the broker puts the value in on the way out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 64)]
    pub secrets: Vec<String>,
    /// Each attached secret's placeholder in this sandbox (secret name → placeholder). Set by
    /// Hutch at create (fresh for every sandbox, clone and fork), never by a client, and not
    /// shown by the API.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(ignore)]
    pub placeholders: BTreeMap<String, String>,
    /// Host directories shared into the sandbox (QEMU only; admin callers only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 16)]
    pub shares: Vec<ShareSpec>,
}

/// A restored sandbox's lineage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Origin {
    /// The template it (or its forked ancestor) was restored from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// The sandbox it was forked from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// The snapshot it was restored from (its disk reads through to it): the host keeps the
    /// directory's path; the API shows only the directory's name.
    pub snapshot: String,
}

/// A sandbox's WireGuard egress tunnel, as in a `wg-quick` configuration. If the tunnel is
/// down, the sandbox's traffic fails; it never leaves another way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WireGuardSpec {
    /// This end's private key (base64). Write-only: the API answers with
    /// [`REDACTED`] in its place.
    pub private_key: String,
    /// The peer's public key (base64).
    pub peer_public_key: String,
    /// Optional preshared key (base64); redacted like the private key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preshared_key: Option<String>,
    /// The peer's endpoint, `IPv4:port`.
    pub endpoint: String,
    /// This end's tunnel address, e.g. `10.99.0.2/32`.
    pub address: String,
    /// Destinations routed into the tunnel; nothing else is reachable.
    #[serde(default = "default_allowed_ips")]
    pub allowed_ips: Vec<String>,
    /// Persistent keepalive, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 65535)]
    pub keepalive: Option<u16>,
    /// Resolver behind the tunnel for the sandbox's DNS filter; default: the host's, asked
    /// through the tunnel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<String>,
}

/// What the API shows in place of a secret.
pub const REDACTED: &str = "<redacted>";

fn default_allowed_ips() -> Vec<String> {
    vec!["0.0.0.0/0".into()]
}

impl SandboxInfo {
    /// The sandbox as the API shows it: secrets (the WireGuard keys) replaced by [`REDACTED`],
    /// no secret placeholders, and the origin's snapshot named by its directory alone, never
    /// by a host path.
    pub fn redacted(mut self) -> SandboxInfo {
        if let Some(origin) = &mut self.spec.origin {
            origin.snapshot = snapshot_name(&origin.snapshot).to_string();
        }
        self.spec.placeholders.clear();
        if let Some(w) = &mut self.spec.wireguard {
            w.private_key = REDACTED.into();
            if let Some(k) = &mut w.preshared_key {
                *k = REDACTED.into();
            }
        }
        self
    }
}

/// The last component of a snapshot directory's path: what the API shows of it.
fn snapshot_name(dir: &str) -> &str {
    dir.rsplit('/').find(|c| !c.is_empty()).unwrap_or("")
}

/// The schema of a list of TCP/UDP ports: integers 0–65535 (utoipa gives a `u16` list item no
/// bounds of its own).
fn port_list() -> utoipa::openapi::schema::Array {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};
    let port = ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(0))
        .maximum(Some(65535));
    ArrayBuilder::new().items(port).build()
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
        #[schema(schema_with = port_list)]
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
            wireguard: None,
            template: None,
            origin: None,
            secrets: Vec::new(),
            placeholders: BTreeMap::new(),
            shares: Vec::new(),
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
        if let Some(t) = &self.template {
            check_template_name(t)?;
        }
        if self.ttl_secs.is_some_and(|t| t == 0 || t > MAX_TTL_SECS) {
            return bad(format!("ttl_secs must be 1..={MAX_TTL_SECS}"));
        }
        check_map("labels", &self.labels, valid_label_key)?;
        check_map("env", &self.env, valid_env_name)?;
        share::check_shares(&self.shares)?;
        if self.template.is_some() && !self.shares.is_empty() {
            return bad(
                "shares cannot be combined with a template: a restored VM has no shares".into(),
            );
        }
        self.check_secrets()
    }

    /// Attached secrets: valid names, each once, at most [`bounds::MAX_ENTRIES`].
    fn check_secrets(&self) -> Result<(), SpecError> {
        if self.secrets.len() > bounds::MAX_ENTRIES {
            return Err(SpecError(format!(
                "more than {} secrets",
                bounds::MAX_ENTRIES
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        for name in &self.secrets {
            check_secret_name(name).map_err(|e| SpecError(e.to_string()))?;
            if !seen.insert(name) {
                return Err(SpecError(format!("secret {name} is attached twice")));
            }
        }
        Ok(())
    }
}

/// Refuses a template name that is not [`valid_name`].
pub fn check_template_name(name: &str) -> Result<(), SpecError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(SpecError(format!(
            "template name {:?} is not [a-z0-9][a-z0-9._-]*",
            truncate(name)
        )))
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
    /// Paused to disk: its memory and disk are saved, no VMM runs; resume restores it.
    Suspended,
    /// Fleet only (a gateway reports it; no host stores it): its host's lease expired, the
    /// sandbox may still run there; back to its host's state if the host returns in time.
    Unreachable,
    /// Fleet only: its host stayed away past the grace period; the sandbox is given up (never
    /// recreated elsewhere) and its host stops it if it returns.
    Lost,
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
            SandboxState::Suspended => "suspended",
            SandboxState::Unreachable => "unreachable",
            SandboxState::Lost => "lost",
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
            "suspended" => SandboxState::Suspended,
            "unreachable" => SandboxState::Unreachable,
            "lost" => SandboxState::Lost,
            _ => return None,
        })
    }
}

/// What `hutch template create` builds: a VM booted from `image`, provisioned by `provision`,
/// and saved, so sandboxes are restored from it instead of booting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateSpec {
    /// The template's name (`[a-z0-9][a-z0-9._-]*`).
    #[schema(pattern = "^[a-z0-9][a-z0-9._-]{0,62}$")]
    pub name: String,
    /// Guest image name.
    #[serde(default = "default_image")]
    #[schema(pattern = "^[a-z0-9][a-z0-9._-]{0,62}$")]
    pub image: String,
    /// vCPUs of every sandbox restored from it.
    #[serde(default = "default_cpus")]
    #[schema(minimum = 1, maximum = 64)]
    pub cpus: u8,
    /// Guest memory in MiB of every sandbox restored from it.
    #[serde(default = "default_memory")]
    #[schema(minimum = 128, maximum = 262144)]
    pub memory_mib: u32,
    /// Writable disk in MiB.
    #[serde(default = "default_disk")]
    #[schema(minimum = 16, maximum = 1048576)]
    pub disk_mib: u64,
    /// A shell script run as root in the VM before it is saved; it must exit 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provision: Option<String>,
    /// What provisioning may reach (e.g. `open` to install packages). Sandboxes restored from
    /// the template get their own policy.
    #[serde(default)]
    pub network: NetworkPolicy,
}

impl TemplateSpec {
    /// Checks the name and the same bounds as a sandbox's.
    pub fn validate(&self) -> Result<(), SpecError> {
        check_template_name(&self.name)?;
        if self.provision.as_ref().is_some_and(|p| p.len() > 1 << 20) {
            return Err(SpecError("the provisioning script is over 1 MiB".into()));
        }
        SandboxSpec {
            image: self.image.clone(),
            cpus: self.cpus,
            memory_mib: self.memory_mib,
            disk_mib: self.disk_mib,
            network: self.network.clone(),
            ..SandboxSpec::default()
        }
        .validate()
    }
}

/// A saved template, as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TemplateInfo {
    /// What it was built from.
    pub spec: TemplateSpec,
    /// `sha256:` digest of its saved state; names its directory.
    pub digest: String,
    /// The digest of the image it was booted from: restores need that very image.
    pub image_digest: String,
    /// Whether its guest has a NIC (then every restore gets a sandbox network).
    pub has_nic: bool,
    /// When it was saved, Unix milliseconds.
    pub created_at_ms: i64,
    /// Boot and provisioning time, milliseconds.
    pub build_ms: u64,
    /// How many restored clones the daemon keeps ready, so a create is a hand-out.
    #[serde(default)]
    pub pool_size: u32,
    /// How many are ready now (reported by the daemon, not stored).
    #[serde(default)]
    pub pool_ready: u32,
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
    /// The guest did not answer within the operation's deadline (it is stuck or stopped).
    Timeout,
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
    fn attached_secrets_are_named_once_and_placeholders_never_shown() {
        let with = |names: &[&str]| SandboxSpec {
            secrets: names.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        };
        assert!(with(&["api", "git.token-1"]).validate().is_ok());
        for bad in [&["api", "api"][..], &["-x"], &["a/b"], &[""]] {
            assert!(with(bad).validate().is_err(), "{bad:?}");
        }
        let mut spec = with(&["api"]);
        spec.placeholders
            .insert("api".into(), "hutch_ph_abc".into());
        let info = SandboxInfo {
            id: "sb-1".into(),
            state: SandboxState::Running,
            spec,
            created_at_ms: 0,
            updated_at_ms: 0,
            expires_at_ms: None,
        };
        let shown = serde_json::to_string(&info.clone().redacted()).unwrap();
        assert!(!shown.contains("hutch_ph_"), "{shown}");
        assert!(
            serde_json::to_string(&info)
                .unwrap()
                .contains("hutch_ph_abc"),
            "the store keeps it"
        );
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
    fn wireguard_keys_are_redacted_for_the_api_and_kept_for_the_store() {
        let spec: SandboxSpec = serde_json::from_str(
            r#"{"network":{"mode":"open"},"wireguard":{"private_key":"k","peer_public_key":"p",
               "preshared_key":"s","endpoint":"203.0.113.1:51820","address":"10.9.0.2/32"}}"#,
        )
        .unwrap();
        let w = spec.wireguard.clone().unwrap();
        assert_eq!(w.allowed_ips, vec!["0.0.0.0/0".to_string()]);
        let info = SandboxInfo {
            id: "sb-1".into(),
            state: SandboxState::Running,
            spec,
            created_at_ms: 0,
            updated_at_ms: 0,
            expires_at_ms: None,
        };
        let stored = serde_json::to_string(&info.spec).unwrap();
        assert!(stored.contains("\"k\"") && stored.contains("\"s\""));
        let shown = serde_json::to_string(&info.redacted()).unwrap();
        assert!(
            !shown.contains("\"k\"") && !shown.contains("\"s\""),
            "{shown}"
        );
        assert!(shown.contains(REDACTED) && shown.contains("\"p\""));
    }

    #[test]
    fn the_api_shows_no_host_path_of_a_clones_snapshot() {
        let info = SandboxInfo {
            id: "sb-1".into(),
            state: SandboxState::Running,
            spec: SandboxSpec {
                origin: Some(Origin {
                    template: Some("tpl".into()),
                    parent: None,
                    snapshot: "/var/lib/hutch/templates/sha256-ab12/".into(),
                }),
                ..Default::default()
            },
            created_at_ms: 0,
            updated_at_ms: 0,
            expires_at_ms: None,
        };
        let origin = info.redacted().spec.origin.unwrap();
        assert_eq!(origin.snapshot, "sha256-ab12");
        assert_eq!(origin.template.as_deref(), Some("tpl"));
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
    }
}
