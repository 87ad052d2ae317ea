//! Templates: a booted, provisioned VM saved once, so that sandboxes are restored from it in a
//! fraction of a boot.
//!
//! A template boots with its RAM in a file on `/dev/shm` (shared), runs its provisioning
//! script, syncs, pauses and is saved with its RAM left out of the state (see
//! [`hutch_vmm::Snapshot`]). Its clones map that file copy-on-write: they share every page none
//! of them has written. On disk:
//!
//! ```text
//! TEMPLATES/<name>.json              the name's record (TemplateInfo + where the files are)
//! TEMPLATES/cas/<digest>/vmstate     device state         } the snapshot, addressed by the
//! TEMPLATES/cas/<digest>/disk        frozen writable disk } digest of its state; read-only
//! TEMPLATES/cas/<digest>/memory      persistent copy of the RAM (restaged after a host reboot)
//! TEMPLATES/cas/<digest>/provision.log
//! SHM/<digest>.mem                   the RAM clones map (tmpfs: lost at reboot, restaged)
//! ```

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use hutch_protocol::{
    host::{Channel, ChannelError, ExecEvent},
    ExecRequest, ExitStatus,
};
use hutch_types::{TemplateInfo, TemplateSpec};
use hutch_vmm::{copy_sparse, GuestMemory, Snapshot, SnapshotMemory, Vmm, VmmError};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::{
    blocking::{off_worker, remove_tree},
    host::{HostNetwork, ImageSource},
    manager::{now_ms, CoreError},
    network,
    sandbox::{BootOptions, Sandbox},
};

/// How long a provisioning script may run.
const PROVISION_TIMEOUT: Duration = Duration::from_secs(3600);
/// Bytes of provisioning output quoted in a failure.
const OUTPUT_TAIL: usize = 2000;

/// Why a template operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// No template has this name.
    #[error("no such template: {0}")]
    NotFound(String),
    /// The name is taken.
    #[error("template {0} exists already: remove it first (hutch template rm {0})")]
    Exists(String),
    /// The provisioning script failed.
    #[error("provisioning exited with {status}; its output ends with:\n{tail}")]
    Provision {
        /// Its exit status.
        status: String,
        /// The end of its output.
        tail: String,
    },
    /// The image changed since the template was made.
    #[error("image {image} was rebuilt since template {name} was made: recreate the template")]
    ImageChanged {
        /// The template.
        name: String,
        /// The image.
        image: String,
    },
    /// Sandboxes still read through to the template's disk.
    #[error("template {name} is in use by {users} sandbox(es): remove them first")]
    InUse {
        /// The template.
        name: String,
        /// How many sandboxes use it.
        users: usize,
    },
    /// A template file could not be read or written.
    #[error("cannot {op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Talking to the template's guest failed.
    #[error("the template's guest agent failed")]
    Channel(#[from] ChannelError),
}

impl TemplateError {
    fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        TemplateError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A template's record on disk: what the API shows, plus where its files are.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TemplateRecord {
    /// What the API shows.
    pub info: TemplateInfo,
    /// The saved VM.
    pub snapshot: Snapshot,
}

/// The templates of one Hutch home.
#[derive(Debug, Clone)]
pub struct Templates {
    dir: PathBuf,
    shm: PathBuf,
}

impl Templates {
    /// Templates recorded under `dir`, their RAM kept in `shm` (a tmpfs directory).
    pub fn new(dir: PathBuf, shm: PathBuf) -> Templates {
        Templates { dir, shm }
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// The named template. A name that cannot be a template's (`..`, `/`, NUL) is never
    /// looked up on disk: it is simply unknown.
    pub fn get(&self, name: &str) -> Result<TemplateRecord, TemplateError> {
        if !hutch_types::valid_name(name) {
            return Err(TemplateError::NotFound(name.chars().take(40).collect()));
        }
        let path = self.record_path(name);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(TemplateError::NotFound(name.to_string()))
            }
            Err(e) => return Err(TemplateError::io("read", &path, e)),
        };
        serde_json::from_slice(&bytes)
            .map_err(|e| TemplateError::io("parse", &path, std::io::Error::other(e.to_string())))
    }

    /// Every template, by name.
    pub fn list(&self) -> Result<Vec<TemplateRecord>, TemplateError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(TemplateError::io("list", &self.dir, e)),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(name) = name.strip_suffix(".json") {
                out.push(self.get(name)?);
            }
        }
        out.sort_by(|a, b| a.info.spec.name.cmp(&b.info.spec.name));
        Ok(out)
    }

    /// The template's snapshot, ready to restore: its RAM file is put back on the tmpfs
    /// first if it is gone (e.g. after a host reboot).
    pub async fn snapshot(&self, record: &TemplateRecord) -> Result<Snapshot, TemplateError> {
        if let SnapshotMemory::File(mem) = &record.snapshot.memory {
            // Only a tmpfs copy is restaged; a memory file inside the snapshot is the snapshot's.
            if !mem.exists() && !mem.starts_with(&record.snapshot.dir) {
                let saved = record.snapshot.dir.join("memory");
                std::fs::create_dir_all(&self.shm)
                    .map_err(|e| TemplateError::io("create", &self.shm, e))?;
                let tmp = mem.with_extension(format!("restage-{}", std::process::id()));
                let _ = std::fs::remove_file(&tmp);
                copy_sparse(&saved, &tmp).await.map_err(|e| {
                    TemplateError::io("restage", mem, std::io::Error::other(e.to_string()))
                })?;
                std::fs::rename(&tmp, mem).map_err(|e| TemplateError::io("restage", mem, e))?;
                tracing::info!(template = %record.info.spec.name, "restaged template memory");
            }
        }
        Ok(record.snapshot.clone())
    }

    /// Sets how many ready clones of the template the daemon keeps.
    pub fn set_pool_size(&self, name: &str, size: u32) -> Result<TemplateRecord, TemplateError> {
        let mut record = self.get(name)?;
        record.info.pool_size = size;
        self.write(&record)?;
        Ok(record)
    }

    /// Writes a template's record atomically.
    fn write(&self, record: &TemplateRecord) -> Result<(), TemplateError> {
        let path = self.record_path(&record.info.spec.name);
        let tmp = path.with_extension("json.tmp");
        let json = serde_json::to_vec_pretty(record).expect("serializes");
        std::fs::write(&tmp, json)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| TemplateError::io("write", &path, e))
    }

    /// Removes what a template build interrupted by a crash left behind.
    pub fn remove_staging(&self) {
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with("staging-") {
                tracing::warn!(dir = %entry.path().display(), "removing an interrupted template build");
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }

    /// Removes the named template and its files. The caller checks that no sandbox uses it.
    pub fn remove(&self, name: &str) -> Result<TemplateRecord, TemplateError> {
        let record = self.get(name)?;
        let path = self.record_path(name);
        std::fs::remove_file(&path).map_err(|e| TemplateError::io("remove", &path, e))?;
        if let SnapshotMemory::File(mem) = &record.snapshot.memory {
            let _ = std::fs::remove_file(mem);
        }
        let dir = &record.snapshot.dir;
        std::fs::remove_dir_all(dir).map_err(|e| TemplateError::io("remove", dir, e))?;
        // Only once empty: other templates' memory may still be there.
        let _ = std::fs::remove_dir(&self.shm);
        Ok(record)
    }

    /// Boots `spec`'s image, provisions it and saves it as a template. `net`: the host network
    /// (the template, and so its clones, get a NIC when there is one).
    pub async fn create(
        &self,
        vmm: &dyn Vmm,
        net: Option<&std::sync::Arc<dyn HostNetwork>>,
        images: &dyn ImageSource,
        runs_dir: &Path,
        spec: &TemplateSpec,
    ) -> Result<TemplateRecord, CoreError> {
        spec.validate()?;
        if self.record_path(&spec.name).exists() {
            return Err(TemplateError::Exists(spec.name.clone()).into());
        }
        let image = images.open(&spec.image).map_err(CoreError::Image)?;
        let started = Instant::now();
        let nonce = format!("{:016x}", rand::thread_rng().next_u64());
        let vm_id = format!("tpl-{}", &nonce[..10]);
        let staging = self.dir.join(format!("staging-{nonce}"));
        std::fs::create_dir_all(&self.shm)
            .map_err(|e| TemplateError::io("create", &self.shm, e))?;
        let mem = self.shm.join(format!("{nonce}.mem"));
        let built = async {
            let network = match net {
                Some(net) => {
                    // Clones get a NIC exactly when the template has one; a template without
                    // a provisioning policy has a NIC that reaches nothing.
                    let policy = network::nic_policy(&spec.network)?;
                    network::attach(net, vmm, &vm_id, &policy, None).await?
                }
                None => None,
            };
            let has_nic = network.is_some();
            let opts = BootOptions {
                id: vm_id.clone(),
                image: image.clone(),
                cpus: spec.cpus,
                memory_mib: spec.memory_mib,
                disk_mib: spec.disk_mib,
                runs_dir: runs_dir.to_path_buf(),
                boot_timeout: Duration::from_secs(300),
                detached: false,
                network,
                // Where the VMM can keep RAM in a shared file, clones share its pages.
                memory: if vmm.shares_memory_files() {
                    GuestMemory::SharedFile(mem.clone())
                } else {
                    GuestMemory::Anonymous
                },
                shares: Vec::new(),
            };
            let sandbox = Sandbox::boot(vmm, &opts).await?;
            let saved = provision_and_save(&sandbox, spec, &staging).await;
            let _ = sandbox.discard().await;
            Ok::<_, CoreError>((saved?, has_nic))
        };
        let result = built.await;
        if let Some(net) = net {
            let _ = net.destroy(&vm_id).await;
        }
        let (snapshot, has_nic) = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = remove_tree(&staging).await;
                let _ = std::fs::remove_file(&mem);
                return Err(e);
            }
        };
        let record = self
            .commit(spec, &image, snapshot, &staging, &mem, has_nic, started)
            .await;
        if record.is_err() {
            let _ = remove_tree(&staging).await;
            let _ = std::fs::remove_file(&mem);
        }
        record
    }

    /// Moves a saved template into its content address and records its name.
    #[allow(clippy::too_many_arguments)]
    async fn commit(
        &self,
        spec: &TemplateSpec,
        image: &hutch_image::Image,
        snapshot: Snapshot,
        staging: &Path,
        mem: &Path,
        has_nic: bool,
        started: Instant,
    ) -> Result<TemplateRecord, CoreError> {
        // RAM in the shared file the template booted with: a persistent copy goes beside the
        // snapshot, clones map the tmpfs one. Otherwise the VMM wrote its own memory file into
        // the snapshot (Firecracker) or kept RAM in the state.
        let shared = snapshot.memory == SnapshotMemory::File(mem.to_path_buf());
        if shared {
            copy_sparse(mem, &staging.join("memory")).await?;
        }
        // The state holds the guest's RAM when the VMM keeps it there: hash it off the workers.
        let state_file = snapshot.state_file();
        let digest = off_worker(move || {
            std::fs::read(&state_file)
                .map(|state| hex::encode(Sha256::digest(&state)))
                .map_err(|e| TemplateError::io("read", &state_file, e))
        })
        .await?;
        let cas = self.dir.join("cas").join(&digest);
        let shm_mem = self.shm.join(format!("{digest}.mem"));
        std::fs::create_dir_all(self.dir.join("cas"))
            .map_err(|e| TemplateError::io("create", &self.dir, e))?;
        std::fs::rename(staging, &cas).map_err(|e| TemplateError::io("store", &cas, e))?;
        let memory = match &snapshot.memory {
            _ if shared => {
                std::fs::rename(mem, &shm_mem)
                    .map_err(|e| TemplateError::io("store", &shm_mem, e))?;
                SnapshotMemory::File(shm_mem)
            }
            SnapshotMemory::File(own) => {
                SnapshotMemory::File(cas.join(own.strip_prefix(staging).unwrap_or(own)))
            }
            SnapshotMemory::InState => SnapshotMemory::InState,
        };
        let snapshot = Snapshot {
            dir: cas.clone(),
            memory,
            ..snapshot
        };
        let record = TemplateRecord {
            info: TemplateInfo {
                spec: spec.clone(),
                digest: format!("sha256:{digest}"),
                image_digest: image.digest.clone(),
                has_nic,
                created_at_ms: now_ms(),
                build_ms: started.elapsed().as_millis() as u64,
                pool_size: 0,
                pool_ready: 0,
            },
            snapshot,
        };
        self.write(&record)?;
        Ok(record)
    }

    /// Checks that `record` can still be restored from `image` (opened by its name).
    pub fn check_image(
        record: &TemplateRecord,
        image: &hutch_image::Image,
    ) -> Result<(), TemplateError> {
        if image.digest != record.info.image_digest {
            return Err(TemplateError::ImageChanged {
                name: record.info.spec.name.clone(),
                image: record.info.spec.image.clone(),
            });
        }
        Ok(())
    }
}

/// Runs the provisioning script (keeping its output in `staging/provision.log`), syncs the
/// guest's disks, pauses it and saves it into `staging`.
async fn provision_and_save(
    sandbox: &Sandbox,
    spec: &TemplateSpec,
    staging: &Path,
) -> Result<Snapshot, CoreError> {
    let script = spec.provision.as_deref().unwrap_or("true");
    let output = run(sandbox.channel(), &format!("{script}\nsync")).await?;
    let snapshot = async {
        sandbox.vm().pause().await?;
        sandbox.vm().snapshot(staging).await
    };
    let snapshot: Result<Snapshot, VmmError> = snapshot.await;
    let snapshot = snapshot?;
    let log = staging.join("provision.log");
    std::fs::write(&log, &output).map_err(|e| TemplateError::io("write", &log, e))?;
    Ok(snapshot)
}

/// Runs `script` under `sh -e`; its combined output, or why it failed.
async fn run(channel: &Channel, script: &str) -> Result<Vec<u8>, TemplateError> {
    let mut req = ExecRequest::new(vec!["/bin/sh".into(), "-ec".into(), script.into()]);
    req.timeout_ms = Some(PROVISION_TIMEOUT.as_millis() as u64);
    let mut exec = channel.exec(req).await?;
    let mut output = Vec::new();
    let info = loop {
        match exec.next_event().await? {
            ExecEvent::Stdout(d) | ExecEvent::Stderr(d) => {
                // Keep the last 4-8 MiB: a noisy script cannot fill the host's memory.
                output.extend(d);
                if output.len() > 8 << 20 {
                    output.drain(..output.len() - (4 << 20));
                }
            }
            ExecEvent::Exited(info) => break info,
        }
    };
    match info.status {
        ExitStatus::Code(0) if !info.timed_out => Ok(output),
        status => Err(TemplateError::Provision {
            status: if info.timed_out {
                format!("a timeout after {PROVISION_TIMEOUT:?}")
            } else {
                format!("{status:?}")
            },
            tail: String::from_utf8_lossy(&output[output.len().saturating_sub(OUTPUT_TAIL)..])
                .into_owned(),
        }),
    }
}
