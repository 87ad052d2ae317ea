//! Durable state of the daemon.
//!
//! Every host object a sandbox owns is recorded *before* it is created (`intended`) and
//! confirmed after (`created`), so a daemon killed at any point can find, on restart, both what
//! exists and what might exist, and reconcile. [`Store`] is the interface the core uses;
//! [`SqliteStore`] implements it on SQLite in WAL mode with versioned migrations. Its calls
//! block, so async code goes through [`AsyncStore`], which runs them on the store's own thread.

#![forbid(unsafe_code)]

mod facade;
mod migrations;
mod sqlite;

use hutch_types::{SandboxInfo, SandboxSpec, SandboxState};

pub use facade::AsyncStore;
pub use hutch_types::TokenScope;
pub use sqlite::SqliteStore;

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened or migrated.
    #[error("cannot open the state database {path}")]
    Open {
        /// Database file.
        path: String,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// The database was written by a newer Hutch.
    #[error("state database is at schema version {found}, newer than this hutch ({supported})")]
    TooNew {
        /// Version found.
        found: i64,
        /// Newest version this build knows.
        supported: i64,
    },
    /// A query failed.
    #[error("state database query failed")]
    Query(#[from] rusqlite::Error),
    /// A stored row could not be decoded.
    #[error("corrupt state row for {0}")]
    Corrupt(String),
    /// The idempotency key is taken by another sandbox.
    #[error("idempotency key already used by sandbox {0}")]
    KeyTaken(String),
    /// The store thread behind an [`AsyncStore`] gave no answer (the call panicked).
    #[error("the state store's thread gave no answer")]
    Stopped,
}

/// What kind of host object a sandbox owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// The VMM process: `name` is the pid, `detail` its start time (clock ticks since boot).
    VmProcess,
    /// The VM's private run directory: `name` is the path.
    RunDir,
    /// The sandbox's network (netns, veth, TAP, nft tables): `name` is the sandbox id.
    Netns,
    /// A guest port published on a host loopback port: `name` is the guest port, `detail`
    /// the host port.
    Port,
}

impl ObjectKind {
    fn as_str(self) -> &'static str {
        match self {
            ObjectKind::VmProcess => "vm-process",
            ObjectKind::RunDir => "run-dir",
            ObjectKind::Netns => "netns",
            ObjectKind::Port => "port",
        }
    }

    fn parse(s: &str) -> Option<ObjectKind> {
        match s {
            "vm-process" => Some(ObjectKind::VmProcess),
            "run-dir" => Some(ObjectKind::RunDir),
            "netns" => Some(ObjectKind::Netns),
            "port" => Some(ObjectKind::Port),
            _ => None,
        }
    }
}

/// One recorded host object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostObject {
    /// Owner.
    pub sandbox_id: String,
    /// What it is.
    pub kind: ObjectKind,
    /// Its name (pid, path).
    pub name: String,
    /// Extra identity (e.g. process start time), to never mistake a recycled pid.
    pub detail: String,
    /// `false` while only intended, `true` once confirmed created.
    pub confirmed: bool,
}

/// An API token as listed: everything but its secret (which is never stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// Its id (`tok-…`), for `hutch token rm`.
    pub id: String,
    /// What it may do.
    pub scope: TokenScope,
    /// When it was created, Unix milliseconds.
    pub created_at_ms: i64,
    /// When it stops working, Unix milliseconds; never if absent.
    pub expires_at_ms: Option<i64>,
    /// When a request last presented it, Unix milliseconds.
    pub last_used_at_ms: Option<i64>,
}

/// What presenting a token gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenUse {
    /// No token has this hash (never created, or removed).
    Unknown,
    /// The token's time is up.
    Expired,
    /// The token is good for this scope; its use is recorded.
    Valid(TokenScope),
}

/// Filter for listing sandboxes.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only this state (by name).
    pub state: Option<String>,
    /// Only sandboxes carrying all these labels.
    pub labels: Vec<(String, String)>,
    /// Include destroyed sandboxes.
    pub include_destroyed: bool,
}

/// The daemon's durable state. One implementation per database; one shared test suite.
pub trait Store: Send + Sync {
    /// Records a new sandbox in state `creating`. With an idempotency key already used, returns
    /// the existing sandbox's id instead (and `false`).
    fn insert_sandbox(
        &self,
        id: &str,
        spec: &SandboxSpec,
        idempotency_key: Option<&str>,
        now_ms: i64,
    ) -> Result<(String, bool), StoreError>;
    /// The sandbox created with this idempotency key, if any.
    fn by_idempotency_key(&self, key: &str) -> Result<Option<String>, StoreError>;
    /// Sets a sandbox's state.
    fn set_state(&self, id: &str, state: &SandboxState, now_ms: i64) -> Result<(), StoreError>;
    /// Replaces a sandbox's spec (e.g. after a policy change).
    fn set_spec(&self, id: &str, spec: &SandboxSpec, now_ms: i64) -> Result<(), StoreError>;
    /// Sets when a sandbox's TTL destroys it (`None`: never), e.g. when a client extends it.
    fn set_expiry(
        &self,
        id: &str,
        expires_at_ms: Option<i64>,
        now_ms: i64,
    ) -> Result<(), StoreError>;
    /// One sandbox.
    fn get(&self, id: &str) -> Result<Option<SandboxInfo>, StoreError>;
    /// Sandboxes matching `filter`, oldest first.
    fn list(&self, filter: &ListFilter) -> Result<Vec<SandboxInfo>, StoreError>;
    /// Live sandboxes whose TTL has passed at `now_ms`.
    fn expired(&self, now_ms: i64) -> Result<Vec<String>, StoreError>;
    /// Records that a host object is about to be created.
    fn intend_object(&self, obj: &HostObject) -> Result<(), StoreError>;
    /// Confirms that a host object exists (and updates its detail).
    fn confirm_object(&self, obj: &HostObject) -> Result<(), StoreError>;
    /// Forgets a host object once it is removed.
    fn forget_object(
        &self,
        sandbox_id: &str,
        kind: ObjectKind,
        name: &str,
    ) -> Result<(), StoreError>;
    /// Every recorded host object.
    fn objects(&self) -> Result<Vec<HostObject>, StoreError>;
    /// Stores a token (by its hash) with a scope, good until `expires_at_ms` (or forever).
    fn insert_token(
        &self,
        id: &str,
        hash: &str,
        scope: &TokenScope,
        now_ms: i64,
        expires_at_ms: Option<i64>,
    ) -> Result<(), StoreError>;
    /// Checks the token with this hash at `now_ms`, recording the use of a valid one.
    fn use_token(&self, hash: &str, now_ms: i64) -> Result<TokenUse, StoreError>;
    /// Every token, oldest first.
    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;
    /// Removes a token; `false` if there was none with this id.
    fn remove_token(&self, id: &str) -> Result<bool, StoreError>;
}
