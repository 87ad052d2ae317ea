//! A VM's writable disk: a sparse file formatted ext4 (no journal, nothing reserved), made by
//! every backend the same way.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::spawn::condense;
use crate::VmmError;

/// How long `mkfs.ext4` may take.
const MKFS_TIMEOUT: Duration = Duration::from_secs(60);

/// Creates the sparse scratch file (mode 0600), formats it, and gives it to `owner` (a jailed
/// VMM's user) if given.
pub(crate) async fn make(path: &Path, mib: u64, owner: Option<(u32, u32)>) -> Result<(), VmmError> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| VmmError::io("create scratch disk", path, e))?;
    let bytes = mib
        .checked_mul(1 << 20)
        .ok_or_else(|| VmmError::InvalidSpec(format!("scratch disk of {mib} MiB is too big")))?;
    file.set_len(bytes)
        .map_err(|e| VmmError::io("size scratch disk", path, e))?;
    drop(file);
    let mkfs = crate::host::find_in_path("mkfs.ext4").ok_or(VmmError::MkfsNotFound)?;
    let out = tokio::process::Command::new(mkfs)
        .args(["-q", "-F", "-L", crate::SCRATCH_LABEL])
        .args(["-O", "^has_journal", "-m", "0", "-E", "root_owner=0:0"])
        .arg(path)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(MKFS_TIMEOUT, out)
        .await
        .map_err(|_| VmmError::Mkfs {
            path: path.to_path_buf(),
            detail: format!("timed out after {}s", MKFS_TIMEOUT.as_secs()),
        })?
        .map_err(|e| VmmError::io("run mkfs.ext4 on", path, e))?;
    if !out.status.success() {
        return Err(VmmError::Mkfs {
            path: path.to_path_buf(),
            detail: format!(
                "{}: {}",
                out.status,
                condense(&String::from_utf8_lossy(&out.stderr))
            ),
        });
    }
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(|e| VmmError::io("chown scratch disk", path, e))?;
    }
    Ok(())
}
