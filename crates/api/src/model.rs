//! Request and response bodies.

use std::collections::BTreeMap;

use hutch_types::{ErrorCode, Labels, SandboxSpec, SecretBinding};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// API version prefix of every route.
pub const API_PREFIX: &str = "/v1";

/// Most bytes of stdout (and of stderr) a JSON exec returns; more is cut and flagged.
pub const JSON_EXEC_OUTPUT_LIMIT: usize = 1 << 20;

/// `POST /v1/sandboxes`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// The sandbox's shape and metadata.
    #[serde(flatten)]
    pub spec: SandboxSpec,
    /// Repeating a create with the same key returns the first sandbox instead of a new one.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// `POST /v1/sandboxes/{id}/fork`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkBody {
    /// How many children to restore from the snapshot.
    #[serde(default = "one")]
    #[schema(minimum = 1, maximum = 16)]
    pub count: u32,
}

/// `PUT /v1/templates/{name}/pool`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolBody {
    /// How many restored clones to keep ready (0 turns the pool off).
    #[schema(maximum = 32)]
    pub size: u32,
}

fn one() -> u32 {
    1
}

/// `POST /v1/sandboxes/{id}/exec`: run a short command and get its whole output.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    /// Program and arguments.
    #[schema(min_items = 1)]
    pub argv: Vec<String>,
    /// Extra environment for this command.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory in the guest.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Bytes for stdin, as UTF-8 text.
    #[serde(default)]
    pub stdin: Option<String>,
    /// Kill the command after this many seconds.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// Result of a JSON exec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExecResult {
    /// Exit code, when the command exited.
    pub exit_code: Option<i32>,
    /// Signal number, when a signal killed it.
    pub signal: Option<i32>,
    /// Whether its timeout killed it.
    pub timed_out: bool,
    /// Stdout (UTF-8, lossy), at most [`JSON_EXEC_OUTPUT_LIMIT`] bytes.
    pub stdout: String,
    /// Stderr (UTF-8, lossy), at most [`JSON_EXEC_OUTPUT_LIMIT`] bytes.
    pub stderr: String,
    /// Whether output beyond the limit was dropped.
    pub truncated: bool,
}

/// First message of an exec WebSocket: what to run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecStart {
    /// Program and arguments.
    #[schema(min_items = 1)]
    pub argv: Vec<String>,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Run under a pseudo-terminal of this size (stdout and stderr merge).
    #[serde(default)]
    pub tty: Option<TtySize>,
    /// Kill the command after this many seconds.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// A terminal size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TtySize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// Control messages a client sends on an exec WebSocket (as text frames; stdin goes as
/// binary frames).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecControl {
    /// End of stdin.
    Eof,
    /// New terminal size.
    Resize(TtySize),
    /// Send a signal to the process group.
    Signal {
        /// Signal number.
        signal: i32,
    },
}

/// Events the daemon sends on an exec WebSocket as text frames. Output goes as binary frames
/// whose first byte is the stream: 1 stdout, 2 stderr.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecEventMsg {
    /// The process started.
    Started {
        /// Its pid in the guest.
        pid: u32,
    },
    /// The process ended; the socket closes next.
    Exit {
        /// Exit code, when it exited.
        exit_code: Option<i32>,
        /// Signal, when one killed it.
        signal: Option<i32>,
        /// Whether the timeout killed it.
        timed_out: bool,
    },
    /// The exec failed.
    Error(ApiError),
}

/// Stream byte that prefixes stdout data on an exec WebSocket.
pub const STREAM_STDOUT: u8 = 1;
/// Stream byte that prefixes stderr data on an exec WebSocket.
pub const STREAM_STDERR: u8 = 2;

/// Every error response: a stable code and a human message (the cause chain).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// Stable category.
    pub code: ErrorCode,
    /// What went wrong, with its causes.
    pub message: String,
}

/// One network decision about a sandbox's traffic (`GET /v1/sandboxes/{id}/network/log`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetEvent {
    /// When, in Unix milliseconds.
    pub time_ms: i64,
    /// `tcp`, `udp`, `icmp` or the protocol number.
    pub proto: String,
    /// Destination address.
    pub dst: String,
    /// Destination port (0 where the protocol has none).
    pub dst_port: u16,
    /// The name resolved to reach it, or the name asked for (DNS decisions).
    pub domain: Option<String>,
    /// `allow` or `deny`.
    pub verdict: String,
    /// The rule that decided.
    pub rule: String,
}

/// Body of `PUT /v1/sandboxes/{id}/ports/{guest_port}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishPort {
    /// Host loopback port to listen on; absent: any free port.
    #[serde(default)]
    #[schema(maximum = 65535)]
    pub host_port: Option<u16>,
}

/// A guest TCP port published on a host loopback port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PortMapping {
    /// The guest's TCP port.
    pub guest_port: u16,
    /// Host address it is reachable on (always loopback).
    pub host_addr: String,
    /// Host port it is reachable on.
    pub host_port: u16,
}

/// A binary body (file contents or a tar archive) as the OpenAPI document describes it: a
/// string of `format: binary`, so generated clients send and receive raw bytes.
#[derive(Debug, Clone, PartialEq, Eq, ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct Binary(pub Vec<u8>);

/// `PUT /v1/secrets/{name}`: sets a secret, or rotates an existing one (same identity and
/// placeholders, new value, live).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetSecretBody {
    /// The value. Write-only: no answer ever carries it, nor does the guest.
    #[schema(min_length = 1, max_length = 65536)]
    pub value: String,
    /// The environment variable the guest sees, holding the placeholder; for an existing
    /// secret, absent keeps its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[A-Za-z_][A-Za-z0-9_]*$")]
    pub env: Option<String>,
    /// Where the value may go; for an existing secret, absent keeps its own. A new secret
    /// needs at least one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_items = 16)]
    pub bindings: Option<Vec<SecretBinding>>,
    /// Labels scoping who may see and attach it; for an existing secret, empty keeps its own.
    #[serde(default)]
    pub labels: Labels,
    /// Makes it an SSH key: the value is an unencrypted OpenSSH private key (Ed25519 or
    /// ECDSA) that the host's agent signs with only for these server host keys (OpenSSH
    /// public key lines, `ssh-ed25519 AAAA...`); the guest reaches it through `SSH_AUTH_SOCK`.
    /// For an existing SSH key, absent keeps its own list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_items = 16)]
    pub ssh_allowed_host_keys: Option<Vec<String>>,
}

impl std::fmt::Debug for SetSecretBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetSecretBody")
            .field("value", &"<redacted>")
            .field("env", &self.env)
            .field("bindings", &self.bindings)
            .field("labels", &self.labels)
            .field("ssh_allowed_host_keys", &self.ssh_allowed_host_keys)
            .finish()
    }
}
