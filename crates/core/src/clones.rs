//! Sandboxes from snapshots: clones of templates, forks of running sandboxes, and pausing a
//! sandbox to disk.
//!
//! Snapshot directories live in [`ManagerConfig::snapshots_dir`](crate::ManagerConfig):
//! `fork-<parent>-<ms>/` (the children's disks read through to it: removed with the last
//! sandbox whose origin names it) and `suspend-<id>-<ms>/` (a sandbox paused to disk: removed
//! when it is destroyed, or suspended again). Every snapshot's disk is standalone (the VMM
//! flattens overlays), except that clones of a template read through to the template's.

use std::path::{Path, PathBuf};

use hutch_store::ListFilter;
use hutch_types::{
    Origin, SandboxInfo, SandboxSpec, SandboxState, SpecError, TemplateInfo, TemplateSpec,
};
use hutch_vmm::Snapshot;

use crate::{
    blocking::{off_worker, remove_tree},
    lifecycle::{check, ActionKind},
    manager::{chain, now_ms, CoreError, Manager},
    template::{TemplateError, Templates},
};

/// Most children one fork makes.
pub const MAX_FORK: u32 = 16;

impl Manager {
    /// Resolves `spec.template`: takes the template's shape into `spec`, records the origin,
    /// and returns the snapshot to restore.
    pub(crate) async fn template_snapshot(
        &self,
        spec: &mut SandboxSpec,
        name: &str,
    ) -> Result<Snapshot, CoreError> {
        hutch_types::check_template_name(name)?;
        let record = self.cfg.templates.get(name)?;
        let t = &record.info.spec;
        let image = self.image(&t.image)?;
        Templates::check_image(&record, &image)?;
        spec.image = t.image.clone();
        spec.cpus = t.cpus;
        spec.memory_mib = t.memory_mib;
        spec.disk_mib = t.disk_mib;
        let snapshot = self.cfg.templates.snapshot(&record).await?;
        spec.origin = Some(Origin {
            template: Some(name.to_string()),
            parent: None,
            snapshot: snapshot.dir.display().to_string(),
        });
        Ok(snapshot)
    }

    /// Boots, provisions and saves a template. Its memory counts against the budget while it
    /// builds.
    pub async fn create_template(&self, spec: TemplateSpec) -> Result<TemplateInfo, CoreError> {
        spec.validate()?;
        {
            let _admit = self.admission.lock().await;
            self.admit(&SandboxSpec {
                memory_mib: spec.memory_mib,
                ..SandboxSpec::default()
            })
            .await?;
        }
        let net = self.net().ok();
        let record = self
            .cfg
            .templates
            .create(
                self.vmm.as_ref(),
                net,
                self.cfg.images.as_ref(),
                &self.cfg.runs_dir,
                &spec,
            )
            .await?;
        tracing::info!(template = %spec.name, ms = record.info.build_ms, "template saved");
        Ok(self.with_pool(record.info))
    }

    /// Every template.
    pub fn templates(&self) -> Result<Vec<TemplateInfo>, CoreError> {
        Ok(self
            .cfg
            .templates
            .list()?
            .into_iter()
            .map(|r| self.with_pool(r.info))
            .collect())
    }

    /// One template.
    pub fn template(&self, name: &str) -> Result<TemplateInfo, CoreError> {
        Ok(self.with_pool(self.cfg.templates.get(name)?.info))
    }

    /// Removes a template, refusing while any sandbox (or a fork of one) still reads through
    /// to its disk.
    pub async fn remove_template(&self, name: &str) -> Result<TemplateInfo, CoreError> {
        self.cfg.templates.get(name)?;
        let users = self
            .disk_users(|o| o.template.as_deref() == Some(name))
            .await?;
        if users > 0 {
            return Err(TemplateError::InUse {
                name: name.to_string(),
                users,
            }
            .into());
        }
        self.cfg.templates.set_pool_size(name, 0)?;
        self.drain_pool(name).await;
        // Removing its memory and disk files: off the async workers.
        let (templates, name) = (self.cfg.templates.clone(), name.to_owned());
        Ok(off_worker(move || templates.remove(&name)).await?.info)
    }

    /// Snapshots a running (or paused) sandbox and restores `count` children from it. The
    /// children inherit its spec and policy, not its identity (each gets fresh entropy,
    /// hostname, machine-id) nor its secrets (no WireGuard keys); the parent carries on.
    pub async fn fork(&self, id: &str, count: u32) -> Result<Vec<SandboxInfo>, CoreError> {
        if !(1..=MAX_FORK).contains(&count) {
            return Err(SpecError(format!("count must be 1..={MAX_FORK}")).into());
        }
        let info = self.info(id).await?;
        check(&info.state, ActionKind::Fork)?;
        let dir = self
            .cfg
            .snapshots_dir
            .join(format!("fork-{id}-{}", now_ms()));
        let snapshot = self.save(id, &info, &dir, true).await?;
        let mut spec = info.spec.clone();
        spec.wireguard = None;
        spec.template = None;
        spec.origin = Some(Origin {
            template: info.spec.origin.as_ref().and_then(|o| o.template.clone()),
            parent: Some(id.to_string()),
            snapshot: dir.display().to_string(),
        });
        let children = (0..count).map(|_| self.restore_child(&spec, &snapshot));
        let results = futures::future::join_all(children).await;
        let mut infos = Vec::new();
        let mut first_error = None;
        for r in results {
            match r {
                Ok(info) => infos.push(info),
                Err(e) => {
                    tracing::warn!(parent = %id, error = %chain(&e), "fork child failed");
                    first_error.get_or_insert(e);
                }
            }
        }
        if infos.is_empty() {
            let _ = remove_tree(dir).await;
            return Err(first_error.expect("count >= 1"));
        }
        Ok(infos)
    }

    /// Records and restores one child of a fork.
    async fn restore_child(
        &self,
        spec: &SandboxSpec,
        snapshot: &Snapshot,
    ) -> Result<SandboxInfo, CoreError> {
        let plan = self.plan_network(spec, Some(snapshot))?;
        let image = self.image(&spec.image)?;
        let id = crate::new_id();
        // Its own placeholders (and CA, at launch): never its parent's.
        let spec = &SandboxSpec {
            placeholders: crate::secrets::placeholders_for(&spec.secrets),
            ..spec.clone()
        };
        {
            let _admit = self.admission.lock().await;
            self.admit(spec).await?;
            self.store()
                .insert_sandbox(&id, spec, None, now_ms())
                .await?;
        }
        self.launch(&id, spec, image, plan, Some(snapshot)).await?;
        self.info(&id).await
    }

    /// Saves a sandbox's VM into `dir`, pausing it for the time it takes. With `resume`, a
    /// sandbox that was running runs again afterwards (also when saving failed).
    async fn save(
        &self,
        id: &str,
        info: &SandboxInfo,
        dir: &Path,
        resume: bool,
    ) -> Result<Snapshot, CoreError> {
        let live = self
            .live(id)
            .ok_or_else(|| CoreError::NotFound(id.to_string()))?;
        let guard = live.sandbox.lock().await;
        let sandbox = guard
            .as_ref()
            .ok_or_else(|| CoreError::NotFound(id.to_string()))?;
        let running = info.state == SandboxState::Running;
        if running {
            sandbox.vm().pause().await?;
        }
        let saved = sandbox.vm().snapshot(dir).await;
        if running && (resume || saved.is_err()) {
            sandbox.vm().resume().await?;
        }
        Ok(saved?)
    }

    /// Pauses a sandbox to disk: saves its memory and disk, then stops its VMM and removes its
    /// network, freeing their memory. [`Manager::resume`] restores it, also after a daemon
    /// restart.
    pub async fn suspend(&self, id: &str) -> Result<SandboxInfo, CoreError> {
        let info = self.info(id).await?;
        check(&info.state, ActionKind::Suspend)?;
        let dir = self
            .cfg
            .snapshots_dir
            .join(format!("suspend-{id}-{}", now_ms()));
        let older = self.suspend_dirs(id);
        self.save(id, &info, &dir, false).await?;
        if let Some(live) = self.take_live(id) {
            if let Some(sandbox) = live.sandbox.lock().await.take() {
                if let Err(e) = sandbox.discard().await {
                    tracing::warn!(%id, error = %chain(&e), "VM teardown failed; removing by record");
                }
            }
        }
        self.remove_recorded(id).await?;
        self.store()
            .set_state(id, &SandboxState::Suspended, now_ms())
            .await?;
        // The VM's disk read through to the previous save; the new one is standalone.
        for old in older {
            let _ = remove_tree(old).await;
        }
        tracing::info!(%id, dir = %dir.display(), "paused to disk");
        self.info(id).await
    }

    /// Restores a sandbox paused to disk. On failure it stays paused to disk, nothing lost.
    pub(crate) async fn resume_from_disk(&self, id: &str) -> Result<SandboxInfo, CoreError> {
        let info = self.info(id).await?;
        check(&info.state, ActionKind::Resume)?;
        let dir = self.suspend_dirs(id).pop().ok_or_else(|| {
            CoreError::Illegal(crate::lifecycle::IllegalAction {
                action: "resume",
                state: "paused to disk, but its snapshot is missing",
            })
        })?;
        let snapshot = Snapshot::load(&dir)?;
        let plan = self.plan_network(&info.spec, Some(&snapshot))?;
        let image = self.image(&info.spec.image)?;
        {
            let _admit = self.admission.lock().await;
            self.admit(&info.spec).await?;
            self.store()
                .set_state(id, &SandboxState::Creating, now_ms())
                .await?;
        }
        if let Err(e) = self
            .launch(id, &info.spec, image, plan, Some(&snapshot))
            .await
        {
            self.store()
                .set_state(id, &SandboxState::Suspended, now_ms())
                .await?;
            return Err(e);
        }
        self.info(id).await
    }

    /// The sandbox's saves to disk, oldest first.
    fn suspend_dirs(&self, id: &str) -> Vec<PathBuf> {
        let prefix = format!("suspend-{id}-");
        let mut dirs: Vec<(i64, PathBuf)> = std::fs::read_dir(&self.cfg.snapshots_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let ms = name.strip_prefix(&prefix)?.parse().ok()?;
                Some((ms, e.path()))
            })
            .collect();
        dirs.sort();
        dirs.into_iter().map(|(_, p)| p).collect()
    }

    /// After a sandbox is gone: removes its saves to disk, and the fork snapshot it came from
    /// once no other sandbox reads through to it.
    pub(crate) async fn release_snapshots(&self, info: &SandboxInfo) {
        for dir in self.suspend_dirs(&info.id) {
            let _ = remove_tree(dir).await;
        }
        let Some(origin) = &info.spec.origin else {
            return;
        };
        let dir = Path::new(&origin.snapshot);
        if dir.parent() != Some(self.cfg.snapshots_dir.as_path()) {
            return; // a template's: removed with the template
        }
        if let Ok(0) = self.disk_users(|o| o.snapshot == origin.snapshot).await {
            let _ = remove_tree(dir).await;
        }
    }

    /// After a restart: removes the saves that a crash cut off from their sandboxes (a fork
    /// whose children were never made, a save to disk of a sandbox that no longer exists).
    /// Returns how many were removed.
    pub(crate) async fn sweep_snapshots(&self) -> Result<usize, CoreError> {
        let known: Vec<SandboxInfo> = self.store().list(&ListFilter::default()).await?;
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.cfg.snapshots_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale = if let Some(rest) = name.strip_prefix("suspend-") {
                !known.iter().any(|s| save_of(rest, &s.id))
            } else if name.starts_with("fork-") {
                let dir = path.display().to_string();
                self.disk_users(|o| o.snapshot == dir).await? == 0
            } else {
                false
            };
            if stale {
                tracing::warn!(dir = %path.display(), "removing a save no sandbox uses");
                let _ = remove_tree(path).await;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// How many sandboxes with a VM (or about to have one) came from an origin matching `uses`:
    /// their disks read through to its snapshot. (A save to disk is standalone.)
    async fn disk_users(&self, uses: impl Fn(&Origin) -> bool) -> Result<usize, CoreError> {
        Ok(self
            .store()
            .list(&ListFilter::default())
            .await?
            .into_iter()
            .filter(|s| {
                matches!(
                    s.state,
                    SandboxState::Creating | SandboxState::Running | SandboxState::Paused
                )
            })
            .filter(|s| s.spec.origin.as_ref().is_some_and(&uses))
            .count())
    }
}

/// Whether `rest` (a save's directory name after `suspend-`) is `<id>-<ms>`.
fn save_of(rest: &str, id: &str) -> bool {
    rest.strip_prefix(id)
        .and_then(|r| r.strip_prefix('-'))
        .is_some_and(|ms| !ms.is_empty() && ms.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::save_of;

    #[test]
    fn a_save_belongs_to_exactly_its_sandbox() {
        assert!(save_of("sb-0123456789-1700000000000", "sb-0123456789"));
        assert!(!save_of("sb-0123456789-1700000000000", "sb-012345678"));
        assert!(!save_of("sb-01234567891-17", "sb-0123456789"));
        assert!(!save_of("sb-0123456789-", "sb-0123456789"));
        assert!(!save_of("sb-0123456789-12x", "sb-0123456789"));
    }
}
