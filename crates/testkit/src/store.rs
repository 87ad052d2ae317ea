//! [`FailingStore`]: a store whose writes fail on demand.

use std::sync::{Arc, Mutex};

use hutch_store::{
    HostObject, ListFilter, ObjectKind, Store, StoreError, TokenRecord, TokenScope, TokenUse,
};
use hutch_types::{SandboxInfo, SandboxSpec, SandboxState};

/// A write of [`hutch_store::Store`] that [`FailingStore::fail_at`] can make fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOp {
    /// [`Store::insert_sandbox`].
    InsertSandbox,
    /// [`Store::set_state`].
    SetState,
    /// [`Store::set_spec`].
    SetSpec,
    /// [`Store::set_expiry`].
    SetExpiry,
    /// [`Store::intend_object`].
    IntendObject,
    /// [`Store::confirm_object`].
    ConfirmObject,
    /// [`Store::forget_object`].
    ForgetObject,
}

/// Wraps a [`Store`] and fails chosen writes, once each, as a full disk would: the write
/// does not happen and returns [`StoreError::Query`]. Everything else passes through.
pub struct FailingStore {
    inner: Arc<dyn Store>,
    /// Armed failures: the op, and how many of its calls still succeed first.
    armed: Mutex<Vec<(StoreOp, usize)>>,
}

impl FailingStore {
    /// `inner`, failing nothing yet.
    pub fn new(inner: Arc<dyn Store>) -> FailingStore {
        FailingStore {
            inner,
            armed: Mutex::new(Vec::new()),
        }
    }

    /// Makes a call of `op` fail once, after `skip` more calls of it succeed.
    pub fn fail_at(&self, op: StoreOp, skip: usize) {
        self.lock().push((op, skip));
    }

    /// Whether a failure is still armed (i.e. the code under test never got to it).
    pub fn armed(&self) -> bool {
        !self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(StoreOp, usize)>> {
        self.armed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a call of `op`; fails it if its turn has come.
    fn call(&self, op: StoreOp) -> Result<(), StoreError> {
        let mut armed = self.lock();
        let Some(i) = armed.iter().position(|(o, _)| *o == op) else {
            return Ok(());
        };
        if armed[i].1 > 0 {
            armed[i].1 -= 1;
            return Ok(());
        }
        armed.remove(i);
        Err(StoreError::Query(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            Some(format!("injected failure of {op:?}")),
        )))
    }
}

impl Store for FailingStore {
    fn insert_sandbox(
        &self,
        id: &str,
        spec: &SandboxSpec,
        idempotency_key: Option<&str>,
        now_ms: i64,
    ) -> Result<(String, bool), StoreError> {
        self.call(StoreOp::InsertSandbox)?;
        self.inner.insert_sandbox(id, spec, idempotency_key, now_ms)
    }

    fn by_idempotency_key(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.inner.by_idempotency_key(key)
    }

    fn set_state(&self, id: &str, state: &SandboxState, now_ms: i64) -> Result<(), StoreError> {
        self.call(StoreOp::SetState)?;
        self.inner.set_state(id, state, now_ms)
    }

    fn set_spec(&self, id: &str, spec: &SandboxSpec, now_ms: i64) -> Result<(), StoreError> {
        self.call(StoreOp::SetSpec)?;
        self.inner.set_spec(id, spec, now_ms)
    }

    fn set_expiry(
        &self,
        id: &str,
        expires_at_ms: Option<i64>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.call(StoreOp::SetExpiry)?;
        self.inner.set_expiry(id, expires_at_ms, now_ms)
    }

    fn get(&self, id: &str) -> Result<Option<SandboxInfo>, StoreError> {
        self.inner.get(id)
    }

    fn list(&self, filter: &ListFilter) -> Result<Vec<SandboxInfo>, StoreError> {
        self.inner.list(filter)
    }

    fn expired(&self, now_ms: i64) -> Result<Vec<String>, StoreError> {
        self.inner.expired(now_ms)
    }

    fn intend_object(&self, obj: &HostObject) -> Result<(), StoreError> {
        self.call(StoreOp::IntendObject)?;
        self.inner.intend_object(obj)
    }

    fn confirm_object(&self, obj: &HostObject) -> Result<(), StoreError> {
        self.call(StoreOp::ConfirmObject)?;
        self.inner.confirm_object(obj)
    }

    fn forget_object(
        &self,
        sandbox_id: &str,
        kind: ObjectKind,
        name: &str,
    ) -> Result<(), StoreError> {
        self.call(StoreOp::ForgetObject)?;
        self.inner.forget_object(sandbox_id, kind, name)
    }

    fn objects(&self) -> Result<Vec<HostObject>, StoreError> {
        self.inner.objects()
    }

    fn insert_token(
        &self,
        id: &str,
        hash: &str,
        scope: &TokenScope,
        now_ms: i64,
        expires_at_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        self.inner
            .insert_token(id, hash, scope, now_ms, expires_at_ms)
    }

    fn use_token(&self, hash: &str, now_ms: i64) -> Result<TokenUse, StoreError> {
        self.inner.use_token(hash, now_ms)
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.inner.tokens()
    }

    fn remove_token(&self, id: &str) -> Result<bool, StoreError> {
        self.inner.remove_token(id)
    }
}
