//! [`AsyncStore`]: the [`Store`] for async code, without blocking its workers.
//!
//! A store call blocks (SQLite I/O, `fsync` at commit, a mutex). Async callers hand each call
//! to one dedicated thread that owns the store and await its answer. One thread, in the order
//! the calls were sent: the store's mutex is never contended, and a caller that awaits each
//! write before its next step (record as intended, create, confirm) keeps that order exactly
//! as with direct calls.

use std::{
    panic::AssertUnwindSafe,
    sync::{mpsc, Arc},
};

use hutch_types::{SandboxInfo, SandboxSpec, SandboxState};
use tokio::sync::oneshot;

use crate::{
    HostObject, ListFilter, ObjectKind, Store, StoreError, TokenRecord, TokenScope, TokenUse,
};

/// A call waiting for the store thread.
type Job = Box<dyn FnOnce(&dyn Store) + Send>;

/// A [`Store`] for async code: every call runs on the store's own thread; the caller awaits
/// only a channel. Cheap to clone; the thread ends when the last clone is dropped.
///
/// A call whose future is dropped after it was sent still runs to its end, as a direct call
/// would have.
#[derive(Clone)]
pub struct AsyncStore {
    jobs: mpsc::Sender<Job>,
}

impl AsyncStore {
    /// Starts the thread that owns `store`.
    ///
    /// # Panics
    /// When the OS cannot start a thread (as [`std::thread::spawn`] does).
    pub fn new(store: Arc<dyn Store>) -> AsyncStore {
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("hutch-store".into())
            .spawn(move || {
                for job in rx {
                    // A panicking call fails only its own caller (its answer is dropped); the
                    // thread goes on serving the others.
                    let _ = std::panic::catch_unwind(AssertUnwindSafe(|| job(store.as_ref())));
                }
            })
            .expect("cannot start the store thread");
        AsyncStore { jobs }
    }

    /// Runs `f` on the store thread and returns its result.
    pub async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |store| {
            let _ = tx.send(f(store));
        });
        self.jobs.send(job).map_err(|_| StoreError::Stopped)?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    /// [`Store::insert_sandbox`].
    pub async fn insert_sandbox(
        &self,
        id: &str,
        spec: &SandboxSpec,
        idempotency_key: Option<&str>,
        now_ms: i64,
    ) -> Result<(String, bool), StoreError> {
        let (id, spec, key) = (
            id.to_owned(),
            spec.clone(),
            idempotency_key.map(str::to_owned),
        );
        self.call(move |s| s.insert_sandbox(&id, &spec, key.as_deref(), now_ms))
            .await
    }

    /// [`Store::by_idempotency_key`].
    pub async fn by_idempotency_key(&self, key: &str) -> Result<Option<String>, StoreError> {
        let key = key.to_owned();
        self.call(move |s| s.by_idempotency_key(&key)).await
    }

    /// [`Store::set_state`].
    pub async fn set_state(
        &self,
        id: &str,
        state: &SandboxState,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let (id, state) = (id.to_owned(), state.clone());
        self.call(move |s| s.set_state(&id, &state, now_ms)).await
    }

    /// [`Store::set_spec`].
    pub async fn set_spec(
        &self,
        id: &str,
        spec: &SandboxSpec,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let (id, spec) = (id.to_owned(), spec.clone());
        self.call(move |s| s.set_spec(&id, &spec, now_ms)).await
    }

    /// [`Store::set_expiry`].
    pub async fn set_expiry(
        &self,
        id: &str,
        expires_at_ms: Option<i64>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.call(move |s| s.set_expiry(&id, expires_at_ms, now_ms))
            .await
    }

    /// [`Store::get`].
    pub async fn get(&self, id: &str) -> Result<Option<SandboxInfo>, StoreError> {
        let id = id.to_owned();
        self.call(move |s| s.get(&id)).await
    }

    /// [`Store::list`].
    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<SandboxInfo>, StoreError> {
        let filter = filter.clone();
        self.call(move |s| s.list(&filter)).await
    }

    /// [`Store::expired`].
    pub async fn expired(&self, now_ms: i64) -> Result<Vec<String>, StoreError> {
        self.call(move |s| s.expired(now_ms)).await
    }

    /// [`Store::intend_object`].
    pub async fn intend_object(&self, obj: &HostObject) -> Result<(), StoreError> {
        let obj = obj.clone();
        self.call(move |s| s.intend_object(&obj)).await
    }

    /// [`Store::confirm_object`].
    pub async fn confirm_object(&self, obj: &HostObject) -> Result<(), StoreError> {
        let obj = obj.clone();
        self.call(move |s| s.confirm_object(&obj)).await
    }

    /// [`Store::forget_object`].
    pub async fn forget_object(
        &self,
        sandbox_id: &str,
        kind: ObjectKind,
        name: &str,
    ) -> Result<(), StoreError> {
        let (id, name) = (sandbox_id.to_owned(), name.to_owned());
        self.call(move |s| s.forget_object(&id, kind, &name)).await
    }

    /// [`Store::objects`].
    pub async fn objects(&self) -> Result<Vec<HostObject>, StoreError> {
        self.call(|s| s.objects()).await
    }

    /// [`Store::insert_token`].
    pub async fn insert_token(
        &self,
        id: &str,
        hash: &str,
        scope: &TokenScope,
        now_ms: i64,
        expires_at_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        let (id, hash, scope) = (id.to_owned(), hash.to_owned(), scope.clone());
        self.call(move |s| s.insert_token(&id, &hash, &scope, now_ms, expires_at_ms))
            .await
    }

    /// [`Store::use_token`].
    pub async fn use_token(&self, hash: &str, now_ms: i64) -> Result<TokenUse, StoreError> {
        let hash = hash.to_owned();
        self.call(move |s| s.use_token(&hash, now_ms)).await
    }

    /// [`Store::tokens`].
    pub async fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.call(|s| s.tokens()).await
    }

    /// [`Store::remove_token`].
    pub async fn remove_token(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.call(move |s| s.remove_token(&id)).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::SqliteStore;

    fn object(name: &str, confirmed: bool) -> HostObject {
        HostObject {
            sandbox_id: "sb-1".into(),
            kind: ObjectKind::RunDir,
            name: name.into(),
            detail: String::new(),
            confirmed,
        }
    }

    #[tokio::test]
    async fn calls_reach_the_store_in_the_order_they_were_awaited() {
        let dir = tempfile::tempdir().unwrap();
        let store = AsyncStore::new(Arc::new(
            SqliteStore::open(&dir.path().join("s.db")).unwrap(),
        ));
        store
            .insert_sandbox("sb-1", &SandboxSpec::default(), None, 1)
            .await
            .unwrap();
        store.intend_object(&object("/run/a", false)).await.unwrap();
        assert!(!store.objects().await.unwrap()[0].confirmed);
        store.confirm_object(&object("/run/a", true)).await.unwrap();
        assert_eq!(store.objects().await.unwrap(), [object("/run/a", true)]);
        store
            .set_state("sb-1", &SandboxState::Running, 2)
            .await
            .unwrap();
        let info = store.get("sb-1").await.unwrap().unwrap();
        assert_eq!((info.state, info.updated_at_ms), (SandboxState::Running, 2));
    }

    #[tokio::test]
    async fn a_call_that_panics_fails_alone_and_the_thread_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = AsyncStore::new(Arc::new(
            SqliteStore::open(&dir.path().join("s.db")).unwrap(),
        ));
        let panicked = store.call::<(), _>(|_| panic!("a store call panics")).await;
        assert!(matches!(panicked, Err(StoreError::Stopped)), "{panicked:?}");
        assert!(store.get("sb-1").await.unwrap().is_none());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn calls_run_off_the_async_thread() {
        let dir = tempfile::tempdir().unwrap();
        let store = AsyncStore::new(Arc::new(
            SqliteStore::open(&dir.path().join("s.db")).unwrap(),
        ));
        let caller = std::thread::current().id();
        let seen = Arc::new(Mutex::new(None));
        let s = seen.clone();
        store
            .call(move |_| {
                *s.lock().unwrap() = Some(std::thread::current().id());
                Ok(())
            })
            .await
            .unwrap();
        let ran_on = seen.lock().unwrap().take().unwrap();
        assert_ne!(ran_on, caller);
    }
}
