//! What is appended ([`Event`]) and what a line holds ([`Record`]).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The envelope's version.
pub const VERSION: u32 = 1;

/// The kinds the journal itself writes (everything else is named by its callers:
/// `sandbox.create`, `api.exec`, `exec.end`, …).
pub mod kinds {
    /// A signed checkpoint over every line before it.
    pub const CHECKPOINT: &str = "journal.checkpoint";
    /// The last event: nothing may follow but its checkpoint; the key is destroyed.
    pub const SEAL: &str = "journal.seal";
    /// A writer continued the journal (after a daemon restart).
    pub const REOPEN: &str = "journal.reopen";
    /// Bytes of an incomplete last line (a crash mid-write) were cut off at reopen.
    pub const TORN_TAIL: &str = "journal.torn_tail";
    /// The sandbox key signed an attestation (a DSSE envelope's payload).
    pub const ATTESTATION_SIGN: &str = "attestation.sign";
}

/// Who asked for what a record describes: the API principal and the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Actor {
    /// `socket` (the daemon's Unix socket: admin), `token:<fingerprint>` (a TCP bearer
    /// token), `local` (`hutch run --local`) or `daemon` (the daemon's own housekeeping).
    pub principal: String,
    /// The request's id, when it came over the API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// Something to record; the writer wraps it in a [`Record`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Event {
    /// What happened (`sandbox.create`, `exec.start`, …).
    pub kind: String,
    /// Who asked, if anyone.
    pub actor: Option<Actor>,
    /// Its attributes.
    pub attrs: Map<String, Value>,
}

impl Event {
    /// An event of `kind` with no actor and no attributes.
    pub fn new(kind: impl Into<String>) -> Event {
        Event {
            kind: kind.into(),
            ..Event::default()
        }
    }

    /// The same event, asked for by `actor`.
    pub fn by(mut self, actor: Option<&Actor>) -> Event {
        self.actor = actor.cloned();
        self
    }

    /// The same event with the attribute `key` set to `value`.
    pub fn attr(mut self, key: &str, value: impl Into<Value>) -> Event {
        self.attrs.insert(key.into(), value.into());
        self
    }
}

/// One line of a journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// The envelope's version ([`VERSION`]).
    pub v: u32,
    /// Its position: 0 for the first line, one more for each next.
    pub seq: u64,
    /// The chain hash of the line before (hex; for the first, the sandbox's genesis hash).
    pub prev: String,
    /// Wall-clock time written, RFC 3339 UTC.
    pub time: String,
    /// Nanoseconds of the writer's monotonic clock since the journal was made (continuing from
    /// the last line after a restart).
    pub mono_ns: u64,
    /// The sandbox.
    pub sandbox: String,
    /// What happened.
    pub kind: String,
    /// Who asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<Actor>,
    /// Its attributes (OpenTelemetry semantic-convention names where there is one).
    #[schema(value_type = Object)]
    pub attrs: Map<String, Value>,
}

/// A sandbox's journal as the API serves it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AuditLog {
    /// Its records (from the asked seq on, of the asked kind).
    pub records: Vec<Record>,
    /// The latest signed checkpoint (a C2SP signed note), if any.
    pub checkpoint: Option<String>,
    /// The host key (hex) that certifies sandbox keys: what `audit verify --offline` takes.
    pub host_key: String,
}
