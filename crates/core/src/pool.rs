//! Pools: clones of a template restored ahead of time, so that creating a sandbox from the
//! template is a hand-out (set its policy, record it, refresh its clock and entropy) rather
//! than a restore.
//!
//! A pooled clone is a running VM with its own id, network (reaching nothing until handed
//! out) and identity, held only in memory: the store learns of it at hand-out. If the daemon
//! dies, reconciliation removes pooled VMs like any VM no sandbox owns. Pooled clones count
//! against the memory budget.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use hutch_types::{SandboxInfo, SandboxSpec, SandboxState, TemplateInfo};

use crate::{
    manager::{chain, netns_object, now_ms, CoreError, Manager, NetPlan},
    sandbox::Sandbox,
};

/// Most clones kept ready per template.
pub const MAX_POOL: u32 = 32;
/// How long a failed refill waits before trying again.
const RETRY: Duration = Duration::from_secs(5);
/// How long a refill waits after a hand-out: the new sandbox is usually used at once, and a
/// restore beside it would compete for the same cores.
const AFTER_HANDOUT: Duration = Duration::from_secs(1);

/// A restored clone waiting to be handed out.
pub(crate) struct Pooled {
    sandbox: Sandbox,
    memory_mib: u32,
    has_nic: bool,
}

/// Every template's ready clones.
#[derive(Default)]
pub(crate) struct Pools {
    ready: std::sync::Mutex<HashMap<String, Vec<Pooled>>>,
    /// Templates with a refill task running.
    refilling: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Set when the daemon stops: no refill starts, and a clone restored after this is
    /// removed instead of kept.
    closed: AtomicBool,
}

impl Pools {
    /// Guest memory held by pooled clones, MiB.
    pub(crate) fn memory_mib(&self) -> u64 {
        let ready = self.ready.lock().expect("pool lock");
        ready
            .values()
            .flatten()
            .map(|p| u64::from(p.memory_mib))
            .sum()
    }

    fn take(&self, template: &str) -> Option<Pooled> {
        self.ready
            .lock()
            .expect("pool lock")
            .get_mut(template)?
            .pop()
    }

    fn closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    fn refills_running(&self) -> bool {
        !self.refilling.lock().expect("pool lock").is_empty()
    }

    fn len(&self, template: &str) -> usize {
        let ready = self.ready.lock().expect("pool lock");
        ready.get(template).map_or(0, Vec::len)
    }
}

impl Manager {
    /// Sets how many clones of a template to keep ready, and refills or drains the pool.
    pub async fn set_pool_size(&self, name: &str, size: u32) -> Result<TemplateInfo, CoreError> {
        if size > MAX_POOL {
            return Err(hutch_types::SpecError(format!("pool size must be 0..={MAX_POOL}")).into());
        }
        let record = self.cfg.templates.set_pool_size(name, size)?;
        let surplus: Vec<Pooled> = {
            let mut ready = self.pools.ready.lock().expect("pool lock");
            let pool = ready.entry(name.to_string()).or_default();
            let keep = pool.len().min(size as usize);
            pool.drain(keep..).collect()
        };
        for p in surplus {
            self.discard_pooled(p).await;
        }
        self.refill_soon(name, Duration::ZERO);
        Ok(self.with_pool(record.info))
    }

    /// `info` with the number of clones ready now.
    pub(crate) fn with_pool(&self, info: TemplateInfo) -> TemplateInfo {
        let ready = self.pools.len(&info.spec.name) as u32;
        TemplateInfo {
            pool_ready: ready,
            ..info
        }
    }

    /// Starts filling every template's pool (after reconciliation, at daemon start).
    pub fn start_pools(&self) {
        for t in self.cfg.templates.list().unwrap_or_default() {
            if t.info.pool_size > 0 {
                self.refill_soon(&t.info.spec.name, Duration::ZERO);
            }
        }
    }

    /// Hands out a ready clone of `spec.template` as a new sandbox, if one is ready and the
    /// spec can use it. `Ok(None)`: restore one instead.
    pub(crate) async fn take_pooled(
        &self,
        spec: &SandboxSpec,
        idempotency_key: Option<&str>,
        plan: Option<&NetPlan>,
    ) -> Result<Option<SandboxInfo>, CoreError> {
        let Some(template) = spec.template.as_deref() else {
            return Ok(None);
        };
        // A tunnel is set up with the network; a pooled clone's network exists already.
        if spec.wireguard.is_some() {
            return Ok(None);
        }
        let Some(pooled) = self.pools.take(template) else {
            self.refill_soon(template, Duration::ZERO);
            return Ok(None);
        };
        self.refill_soon(template, AFTER_HANDOUT);
        let id = pooled.sandbox.id().to_string();
        let handed = async {
            if let Some(plan) = plan {
                plan.net.set_policy(&id, &plan.policy).await?;
            }
            {
                let _admit = self.admission.lock().await;
                self.admit(spec).await?;
                self.store()
                    .insert_sandbox(&id, spec, idempotency_key, now_ms())
                    .await?;
                self.intend(&id, pooled.has_nic).await?;
            }
            if pooled.has_nic {
                self.store()
                    .confirm_object(&netns_object(&id, true))
                    .await?;
            }
            // The clone waited: its clock and entropy are refreshed now.
            pooled.sandbox.refresh().await?;
            self.arm(&id, spec, &pooled.sandbox).await?;
            self.start_checked_broker(&id, spec, &pooled.sandbox)
                .await?;
            Ok::<_, CoreError>(())
        };
        // Recording discards the clone itself if the store fails.
        let outcome = match handed.await {
            Ok(()) => self.record_running(&id, pooled.sandbox).await,
            Err(e) => {
                self.discard_pooled(pooled).await;
                Err(e)
            }
        };
        match outcome {
            Ok(()) => {
                tracing::info!(%id, template, "handed out a pooled clone");
                Ok(Some(self.info(&id).await?))
            }
            Err(e) => {
                if self.store().get(&id).await?.is_some() {
                    self.remove_recorded(&id).await?;
                    self.store()
                        .set_state(&id, &SandboxState::Failed(chain(&e)), now_ms())
                        .await?;
                }
                Err(e)
            }
        }
    }

    /// Starts a background refill of `template`'s pool, after `delay`, unless one is running.
    fn refill_soon(&self, template: &str, delay: Duration) {
        let Some(me) = self.me.upgrade() else {
            return;
        };
        if self.pools.closed() {
            return;
        }
        if !self
            .pools
            .refilling
            .lock()
            .expect("pool lock")
            .insert(template.to_string())
        {
            return;
        }
        let template = template.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            me.refill(&template).await;
            me.pools
                .refilling
                .lock()
                .expect("pool lock")
                .remove(&template);
        });
    }

    /// Restores clones until the pool is full, the budget is spent, or restores keep failing.
    async fn refill(&self, template: &str) {
        let mut failures = 0;
        loop {
            if self.pools.closed() {
                return;
            }
            let want = match self.cfg.templates.get(template) {
                Ok(r) => r.info.pool_size as usize,
                Err(_) => 0,
            };
            if self.pools.len(template) >= want {
                return;
            }
            match self.restore_pooled(template).await {
                // Restored while the daemon was stopping: nobody will drain it now.
                Ok(p) if self.pools.closed() => {
                    self.discard_pooled(p).await;
                    return;
                }
                Ok(p) => {
                    failures = 0;
                    let mut ready = self.pools.ready.lock().expect("pool lock");
                    ready.entry(template.to_string()).or_default().push(p);
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(template, error = %chain(&e), "pool refill failed");
                    if failures >= 3 {
                        return;
                    }
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    /// Restores one clone for the pool: its own id and network (reaching nothing yet).
    async fn restore_pooled(&self, template: &str) -> Result<Pooled, CoreError> {
        let mut spec = SandboxSpec {
            template: Some(template.to_string()),
            ..SandboxSpec::default()
        };
        let snapshot = self.template_snapshot(&mut spec, template).await?;
        {
            let _admit = self.admission.lock().await;
            self.admit(&spec).await?;
        }
        let image = self.image(&spec.image)?;
        let plan = self.plan_network(&spec, Some(&snapshot))?;
        let id = crate::new_id();
        let sandbox = self
            .start_vm(&id, &spec, image, plan.as_ref(), Some(&snapshot))
            .await?;
        Ok(Pooled {
            sandbox,
            memory_mib: spec.memory_mib,
            has_nic: plan.is_some(),
        })
    }

    async fn discard_pooled(&self, p: Pooled) {
        let id = p.sandbox.id().to_string();
        self.stop_broker(&id);
        let _ = p.sandbox.discard().await;
        if p.has_nic {
            if let Ok(net) = self.net() {
                let _ = net.destroy(&id).await;
            }
        }
    }

    /// Removes every pooled clone (when the daemon stops: they belong to no sandbox). Refills
    /// stop first: one still restoring a clone removes it itself, and this waits for it, so no
    /// clone (nor its network) outlives the daemon.
    pub async fn drain_pools(&self) {
        self.pools.closed.store(true, Ordering::SeqCst);
        while self.pools.refills_running() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let names: Vec<String> = {
            let ready = self.pools.ready.lock().expect("pool lock");
            ready.keys().cloned().collect()
        };
        for name in names {
            self.drain_pool(&name).await;
        }
    }

    /// Removes every pooled clone of `template` (before the template goes).
    pub(crate) async fn drain_pool(&self, template: &str) {
        let pooled = self
            .pools
            .ready
            .lock()
            .expect("pool lock")
            .remove(template)
            .unwrap_or_default();
        for p in pooled {
            self.discard_pooled(p).await;
        }
    }
}
