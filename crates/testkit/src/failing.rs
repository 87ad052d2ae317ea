//! [`FailingVmm`]: a VMM that fails at a chosen step.

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use hutch_vmm::{Accel, Nic, Snapshot, Vm, VmSpec, Vmm, VmmError};

/// A step of a VM's life that [`FailingVmm::fail_at`] can make fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmStep {
    /// Starting (booting) a VM fails: nothing is started.
    Start,
    /// The VM starts, then its process dies before the agent answers (it is killed right
    /// after the start returns).
    DieDuringBoot,
    /// The VM starts but its agent never answers (it is paused right after the start
    /// returns), so the boot runs into its timeout.
    Ready,
    /// Saving a VM fails (it stays as it was).
    Snapshot,
    /// Restoring a VM from a snapshot fails: nothing is started.
    Restore,
    /// Adopting a VM after a restart fails as if it were gone.
    Adopt,
}

/// Wraps a [`Vmm`] and makes chosen steps fail, once each; everything else passes through.
/// The VMs it hands out are wrapped too, so that their [`VmmStep::Snapshot`] can fail.
pub struct FailingVmm {
    inner: Arc<dyn Vmm>,
    armed: Arc<Armed>,
}

/// The steps set to fail.
#[derive(Debug, Default)]
struct Armed(Mutex<Vec<VmmStep>>);

impl Armed {
    /// Whether `step` is set to fail (and clears it).
    fn take(&self, step: VmmStep) -> bool {
        let mut armed = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match armed.iter().position(|s| *s == step) {
            Some(i) => {
                armed.remove(i);
                true
            }
            None => false,
        }
    }

    fn injected(step: VmmStep) -> VmmError {
        VmmError::InvalidSpec(format!("injected failure at {step:?}"))
    }
}

impl FailingVmm {
    /// `inner`, failing nothing yet.
    pub fn new(inner: Arc<dyn Vmm>) -> FailingVmm {
        FailingVmm {
            inner,
            armed: Arc::default(),
        }
    }

    /// Makes the next `step` fail (once).
    pub fn fail_at(&self, step: VmmStep) {
        self.armed
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(step);
    }

    /// Applies the start-time failures to a VM that just started.
    async fn started(&self, vm: Box<dyn Vm>) -> Result<Box<dyn Vm>, VmmError> {
        if self.armed.take(VmmStep::DieDuringBoot) {
            let (pid, start) = (vm.pid(), vm.start_time());
            tokio::task::spawn_blocking(move || hutch_vmm::kill_recorded(pid, start))
                .await
                .expect("kill task panicked")?;
        } else if self.armed.take(VmmStep::Ready) {
            vm.pause().await?;
        }
        Ok(Box::new(FailingVm {
            inner: vm,
            armed: self.armed.clone(),
        }))
    }
}

#[async_trait]
impl Vmm for FailingVmm {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn shares_memory_files(&self) -> bool {
        self.inner.shares_memory_files()
    }

    fn opens_tap_by_name(&self) -> bool {
        self.inner.opens_tap_by_name()
    }

    fn needs_elf_kernel(&self) -> bool {
        self.inner.needs_elf_kernel()
    }

    async fn start(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, VmmError> {
        self.start_with_nic(spec, None).await
    }

    async fn start_with_nic(
        &self,
        spec: &VmSpec,
        nic: Option<&Nic>,
    ) -> Result<Box<dyn Vm>, VmmError> {
        if self.armed.take(VmmStep::Start) {
            return Err(Armed::injected(VmmStep::Start));
        }
        let vm = self.inner.start_with_nic(spec, nic).await?;
        self.started(vm).await
    }

    async fn adopt(&self, id: &str, run_dir: &Path) -> Result<Box<dyn Vm>, VmmError> {
        if self.armed.take(VmmStep::Adopt) {
            return Err(VmmError::Gone {
                id: id.into(),
                run_dir: run_dir.into(),
                why: "injected failure at Adopt".into(),
            });
        }
        let vm = self.inner.adopt(id, run_dir).await?;
        Ok(Box::new(FailingVm {
            inner: vm,
            armed: self.armed.clone(),
        }))
    }

    async fn restore(
        &self,
        spec: &VmSpec,
        nic: Option<&Nic>,
        snapshot: &Snapshot,
    ) -> Result<Box<dyn Vm>, VmmError> {
        if self.armed.take(VmmStep::Restore) {
            return Err(Armed::injected(VmmStep::Restore));
        }
        let vm = self.inner.restore(spec, nic, snapshot).await?;
        self.started(vm).await
    }
}

/// A VM handed out by [`FailingVmm`].
#[derive(Debug)]
struct FailingVm {
    inner: Box<dyn Vm>,
    armed: Arc<Armed>,
}

#[async_trait]
impl Vm for FailingVm {
    fn id(&self) -> &str {
        self.inner.id()
    }

    fn pid(&self) -> u32 {
        self.inner.pid()
    }

    fn start_time(&self) -> u64 {
        self.inner.start_time()
    }

    fn accel(&self) -> Accel {
        self.inner.accel()
    }

    fn run_dir(&self) -> &Path {
        self.inner.run_dir()
    }

    fn console_log(&self) -> &Path {
        self.inner.console_log()
    }

    fn has_exited(&self) -> bool {
        self.inner.has_exited()
    }

    async fn connect_channel(&self) -> Result<tokio::net::UnixStream, VmmError> {
        self.inner.connect_channel().await
    }

    async fn pause(&self) -> Result<(), VmmError> {
        self.inner.pause().await
    }

    async fn resume(&self) -> Result<(), VmmError> {
        self.inner.resume().await
    }

    async fn is_paused(&self) -> Result<bool, VmmError> {
        self.inner.is_paused().await
    }

    async fn snapshot(&self, dir: &Path) -> Result<Snapshot, VmmError> {
        if self.armed.take(VmmStep::Snapshot) {
            return Err(Armed::injected(VmmStep::Snapshot));
        }
        self.inner.snapshot(dir).await
    }

    async fn destroy(self: Box<Self>) -> Result<(), VmmError> {
        self.inner.destroy().await
    }
}
