//! The content-addressed artifact cache under `<images_dir>/cas/`.
//!
//! Each artifact lives in `cas/<kind>-<hex>/`, where `<hex>` is the sha256 of the artifact's
//! inputs. It is assembled in a `cas/.tmp-…` directory and renamed into place only once complete,
//! with its `meta.json` written last, so a directory with the final name is always whole.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::kernel::KernelMeta;
use crate::ImageError;

/// Bumped whenever the way an artifact is made changes, so old cache entries are not reused.
pub(crate) const RECIPE: &str = "hutch-image/1";

/// The kinds of artifact.
pub(crate) const KINDS: &[&str] = &["kernel", "rootfs", "initramfs", "vmlinux", "srckernel"];

/// The cache id of an artifact of `kind` made from `inputs`: `<kind>-<sha256 hex>`.
///
/// The hash covers [`RECIPE`], the kind, and every input as a length-prefixed name and value, so
/// no two different input lists can collide by concatenation.
pub(crate) fn artifact_id(kind: &str, inputs: &BTreeMap<String, String>) -> String {
    let mut h = Sha256::new();
    for s in [RECIPE, kind]
        .into_iter()
        .chain(inputs.iter().flat_map(|(k, v)| [k.as_str(), v.as_str()]))
    {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    }
    format!("{kind}-{}", hex::encode(h.finalize()))
}

/// Whether `id` has the shape of an artifact id (so it is safe to join onto a path).
pub(crate) fn is_artifact_id(id: &str) -> bool {
    id.split_once('-').is_some_and(|(kind, hex)| {
        KINDS.contains(&kind)
            && hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// `meta.json` of an artifact.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct ArtifactMeta {
    /// The artifact id (also its directory name).
    pub id: String,
    /// What went into it.
    pub inputs: BTreeMap<String, String>,
    /// sha256 of its main files, by file name.
    pub sha256: BTreeMap<String, String>,
    /// Seconds since the epoch at which it was made.
    pub created_unix: u64,
    /// Kernel details, for kernel artifacts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelMeta>,
}

/// sha256 of a file, hex.
pub(crate) fn sha256_file(path: &Path) -> Result<String, ImageError> {
    let mut f = std::fs::File::open(path).map_err(ImageError::io("open", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(ImageError::io("read", path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// sha256 of bytes, hex.
pub(crate) fn sha256_bytes(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The cache directory.
pub(crate) struct Cas {
    dir: PathBuf,
}

impl Cas {
    /// Opens (creating) `<images_dir>/cas`.
    pub(crate) fn open(images_dir: &Path) -> Result<Self, ImageError> {
        let dir = images_dir.join("cas");
        std::fs::create_dir_all(&dir).map_err(ImageError::io("create", &dir))?;
        Ok(Self { dir })
    }

    /// The directory of artifact `id` (whether or not it exists).
    pub(crate) fn path(&self, id: &str) -> PathBuf {
        debug_assert!(is_artifact_id(id), "{id}");
        self.dir.join(id)
    }

    /// The metadata of artifact `id` if it is in the cache.
    pub(crate) fn get(&self, id: &str) -> Result<Option<ArtifactMeta>, ImageError> {
        let meta = self.path(id).join("meta.json");
        match std::fs::read(&meta) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|source| ImageError::Corrupt { path: meta, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ImageError::io("read", meta)(e)),
        }
    }

    /// Makes artifact `id`: `make(out, scratch)` fills `out` (and may use `scratch`, which is
    /// removed afterwards) and returns the metadata to record. The result is renamed into place
    /// only if `make` succeeds. If another build finished the same artifact meanwhile, its copy
    /// wins and ours is discarded.
    pub(crate) fn create(
        &self,
        id: &str,
        make: impl FnOnce(&Path, &Path) -> Result<ArtifactMeta, ImageError>,
    ) -> Result<ArtifactMeta, ImageError> {
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".tmp-{}-{}-", std::process::id(), id))
            .tempdir_in(&self.dir)
            .map_err(ImageError::io("create temp dir in", &self.dir))?;
        let out = tmp.path().join("artifact");
        let scratch = tmp.path().join("work");
        for d in [&out, &scratch] {
            std::fs::create_dir(d).map_err(ImageError::io("create", d))?;
        }
        let made = make(&out, &scratch);
        // Unmount-then-remove, also on failure: a failed debootstrap can leave mounts behind.
        crate::rootfs::remove_tree(&scratch);
        let meta = made?;
        let meta_path = out.join("meta.json");
        let json = serde_json::to_vec_pretty(&meta).expect("meta serializes");
        write_synced(&meta_path, &json)?;
        sync_dir(&out);
        let dest = self.path(id);
        match std::fs::rename(&out, &dest) {
            Ok(()) => {
                sync_dir(&self.dir);
                Ok(meta)
            }
            Err(_) if dest.join("meta.json").is_file() => {
                tracing::info!(%id, "artifact was built concurrently; using the other copy");
                self.get(id)?.ok_or_else(|| ImageError::Io {
                    action: "read",
                    path: dest.join("meta.json"),
                    source: std::io::ErrorKind::NotFound.into(),
                })
            }
            Err(e) => Err(ImageError::io("rename into", dest)(e)),
        }
    }

    /// Removes `.tmp-<pid>-…` directories left by builds whose process no longer exists.
    pub(crate) fn clean_stale(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix(".tmp-")
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<i32>().ok())
                .and_then(rustix::process::Pid::from_raw)
            else {
                continue;
            };
            // Signal 0 only checks whether the process exists (EPERM: it does, not ours).
            let alive = match rustix::process::test_kill_process(pid) {
                Ok(()) => true,
                Err(e) => e == rustix::io::Errno::PERM,
            };
            if !alive {
                tracing::info!(dir = %name, "removing leftover of an interrupted build");
                crate::rootfs::remove_tree(&e.path());
            }
        }
    }
}

/// Writes `data` to `path` and fsyncs it.
pub(crate) fn write_synced(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(ImageError::io("create", path))?;
    f.write_all(data).map_err(ImageError::io("write", path))?;
    f.sync_all().map_err(ImageError::io("sync", path))
}

/// Best-effort fsync of a directory, so a rename in it is durable.
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        let a = artifact_id(
            "rootfs",
            &inputs(&[("suite", "bookworm"), ("packages", "a b")]),
        );
        // Pinned: changing the key scheme must be deliberate (bump RECIPE).
        assert_eq!(
            a,
            artifact_id(
                "rootfs",
                &inputs(&[("packages", "a b"), ("suite", "bookworm")])
            )
        );
        assert!(is_artifact_id(&a));
        assert_ne!(
            a,
            artifact_id(
                "rootfs",
                &inputs(&[("suite", "bookwor"), ("packages", "ma b")])
            )
        );
        assert_ne!(
            a,
            artifact_id(
                "kernel",
                &inputs(&[("suite", "bookworm"), ("packages", "a b")])
            )
        );
        assert!(!is_artifact_id("rootfs-../../etc"));
        assert!(!is_artifact_id(&format!("evil-{}", "0".repeat(64))));
    }

    #[test]
    fn create_is_atomic() {
        let d = tempfile::tempdir().unwrap();
        let cas = Cas::open(d.path()).unwrap();
        let id = artifact_id("initramfs", &inputs(&[("x", "1")]));
        let meta = |id: &str| ArtifactMeta {
            id: id.to_owned(),
            inputs: inputs(&[("x", "1")]),
            sha256: BTreeMap::new(),
            created_unix: 0,
            kernel: None,
        };

        let err = cas.create(&id, |out, _| {
            std::fs::write(out.join("half"), "x").unwrap();
            Err(ImageError::NoMirror)
        });
        assert!(err.is_err());
        assert_eq!(cas.get(&id).unwrap(), None);
        assert!(!cas.path(&id).exists());

        let m = cas
            .create(&id, |out, scratch| {
                std::fs::write(scratch.join("tmp"), "x").unwrap();
                std::fs::write(out.join("initrd.cpio"), "x").unwrap();
                Ok(meta(&id))
            })
            .unwrap();
        assert_eq!(cas.get(&id).unwrap(), Some(m.clone()));
        assert!(cas.path(&id).join("initrd.cpio").is_file());

        // A second create of the same id keeps the first copy.
        let again = cas.create(&id, |_, _| Ok(meta(&id))).unwrap();
        assert_eq!(again, m);
        // No temp dirs are left behind.
        let names: Vec<_> = std::fs::read_dir(d.path().join("cas"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [id]);
    }

    #[test]
    fn stale_temp_dirs_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let cas = Cas::open(d.path()).unwrap();
        // pid_max is at most 2^22, so this pid cannot exist.
        let stale = d.path().join("cas/.tmp-99999999-kernel-x");
        let live = d
            .path()
            .join(format!("cas/.tmp-{}-kernel-y", std::process::id()));
        std::fs::create_dir_all(stale.join("work")).unwrap();
        std::fs::create_dir_all(&live).unwrap();
        cas.clean_stale();
        assert!(!stale.exists());
        assert!(live.exists());
    }
}
