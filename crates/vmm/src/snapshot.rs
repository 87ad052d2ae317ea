//! Backend-independent pieces of snapshots: the files a snapshot keeps (frozen disks, the
//! record), copy-on-write overlays for restores, and moving a state stream between a Unix
//! socket and a file.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};

use crate::spawn::condense;
use crate::{format_mac, BootFiles, Nic, Snapshot, VmSpec, VmmError};

/// Checks, before anything starts, that `snap` can be restored by `backend` as `spec` with
/// `nic`: written by the same backend, for the same vCPUs, memory and boot files, and given
/// the same NIC. The refusal names the snapshot and the reason.
pub(crate) fn check_restore(
    backend: &str,
    spec: &VmSpec,
    nic: Option<&Nic>,
    snap: &Snapshot,
) -> Result<(), VmmError> {
    check_shape(backend, spec, snap)
        .and_then(|()| check_nic(nic, snap))
        .map_err(|why| {
            VmmError::InvalidSpec(format!(
                "cannot restore snapshot {}: {why}",
                snap.dir.display()
            ))
        })
}

fn check_shape(backend: &str, spec: &VmSpec, snap: &Snapshot) -> Result<(), String> {
    if snap.backend != backend {
        return Err(format!(
            "it was written by the {:.20} backend",
            snap.backend
        ));
    }
    if (spec.cpus, spec.memory_mib) != (snap.cpus, snap.memory_mib) {
        return Err(format!(
            "it has {} vCPUs and {} MiB, the spec asks for {} and {}",
            snap.cpus, snap.memory_mib, spec.cpus, spec.memory_mib
        ));
    }
    let wanted = BootFiles::of(spec);
    match &snap.boot {
        Some(boot) if *boot != wanted => Err(format!(
            "its VM booted from {} (root filesystem {}), the spec names {} ({}): was the image \
             rebuilt since?",
            boot.kernel.display(),
            boot.rootfs.display(),
            wanted.kernel.display(),
            wanted.rootfs.display()
        )),
        _ => Ok(()),
    }
}

/// Checks that a restore gives the guest exactly the NIC its snapshot had (same MAC), or none
/// when it had none; the reason otherwise.
pub(crate) fn check_nic(nic: Option<&Nic>, snap: &Snapshot) -> Result<(), String> {
    if nic.map(|n| n.mac) == snap.nic_mac {
        return Ok(());
    }
    Err(match snap.nic_mac {
        Some(mac) => format!(
            "its guest has a NIC with MAC {}, which the restore must give it",
            format_mac(&mac)
        ),
        None => "its guest has no NIC, so the restore cannot add one".into(),
    })
}

/// How long a disk copy or `qemu-img` may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// Copies `from` to `to` (which must not exist) keeping holes, so a mostly empty disk image
/// stays small: `cp --sparse=always`, with reflinks where the filesystem has them.
pub async fn copy_sparse(from: &Path, to: &Path) -> Result<(), VmmError> {
    if to.exists() {
        return Err(VmmError::io(
            "copy to",
            to,
            std::io::ErrorKind::AlreadyExists.into(),
        ));
    }
    let mut cmd = tokio::process::Command::new("cp");
    cmd.args(["--sparse=always", "--reflink=auto", "--"])
        .arg(from)
        .arg(to);
    run_tool(cmd, "cp", to).await
}

/// Copies the qcow2 image `from` and everything it reads through to into `to`, a standalone
/// qcow2 image: a snapshot's disk then depends on no other snapshot's files. `-U`: the VM that
/// has `from` open is stopped and flushed.
pub(crate) async fn flatten(from: &Path, to: &Path) -> Result<(), VmmError> {
    let qemu_img = find_qemu_img()?;
    let mut cmd = tokio::process::Command::new(qemu_img);
    cmd.args(["convert", "-q", "-U", "-f", "qcow2", "-O", "qcow2"])
        .arg(from)
        .arg(to);
    run_tool(cmd, "qemu-img convert", to).await
}

fn find_qemu_img() -> Result<std::path::PathBuf, VmmError> {
    crate::host::find_in_path("qemu-img").ok_or_else(|| {
        VmmError::InvalidSpec(
            "qemu-img not found: install it with apt-get install qemu-utils".into(),
        )
    })
}

/// Creates `overlay`, a qcow2 image whose reads fall through to `backing` (of `format`) and
/// whose writes stay in the overlay: each restored VM writes only its own file.
pub(crate) async fn make_overlay(
    backing: &Path,
    format: &str,
    overlay: &Path,
) -> Result<(), VmmError> {
    if !matches!(format, "raw" | "qcow2") {
        return Err(VmmError::InvalidSpec(format!(
            "snapshot disk format {format:.20} is neither raw nor qcow2"
        )));
    }
    let qemu_img = crate::host::find_in_path("qemu-img").ok_or_else(|| {
        VmmError::InvalidSpec(
            "qemu-img not found: install it with apt-get install qemu-utils".into(),
        )
    })?;
    let mut cmd = tokio::process::Command::new(qemu_img);
    cmd.args(["create", "-q", "-f", "qcow2", "-F", format, "-b"])
        .arg(backing)
        .arg(overlay);
    run_tool(cmd, "qemu-img create", overlay).await
}

async fn run_tool(
    mut cmd: tokio::process::Command,
    what: &'static str,
    target: &Path,
) -> Result<(), VmmError> {
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(TOOL_TIMEOUT, cmd.output())
        .await
        .map_err(|_| VmmError::io(what, target, std::io::ErrorKind::TimedOut.into()))?
        .map_err(|e| VmmError::io(what, target, e))?;
    if !out.status.success() {
        return Err(VmmError::io(
            what,
            target,
            std::io::Error::other(format!(
                "{}: {}",
                out.status,
                condense(&String::from_utf8_lossy(&out.stderr))
            )),
        ));
    }
    Ok(())
}

/// Creates a snapshot directory (mode 0700); refuses an existing one.
pub(crate) fn create_dir(dir: &Path) -> Result<(), VmmError> {
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(|e| VmmError::io("create", parent, e))?;
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|e| VmmError::io("create snapshot dir", dir, e))
}

/// Makes a snapshot file read-only, so nothing opens it for writing by mistake.
pub(crate) fn freeze(path: &Path) -> Result<(), VmmError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o400))
        .map_err(|e| VmmError::io("make read-only", path, e))
}

/// Writes the snapshot's record into its directory.
pub(crate) fn write_record(snapshot: &Snapshot) -> Result<(), VmmError> {
    let path = snapshot.dir.join(Snapshot::RECORD);
    let json = serde_json::to_vec_pretty(snapshot).expect("serializes");
    std::fs::write(&path, json).map_err(|e| VmmError::io("write", &path, e))
}

/// Accepts one connection on `listener` and copies everything it sends into the new file
/// `to`, until EOF. Returns the bytes written.
pub(crate) async fn receive_stream(listener: UnixListener, to: &Path) -> Result<u64, VmmError> {
    let (mut conn, _) = listener
        .accept()
        .await
        .map_err(|e| VmmError::io("accept the state stream on", to, e))?;
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .await
        .map_err(|e| VmmError::io("create", to, e))?;
    let n = tokio::io::copy(&mut conn, &mut file)
        .await
        .map_err(|e| VmmError::io("write", to, e))?;
    file.sync_all()
        .await
        .map_err(|e| VmmError::io("sync", to, e))?;
    Ok(n)
}

/// Connects to `sock` and sends it the whole of `from`.
pub(crate) async fn send_file(from: &Path, sock: &Path) -> Result<(), VmmError> {
    let mut file = tokio::fs::File::open(from)
        .await
        .map_err(|e| VmmError::io("open", from, e))?;
    let mut conn = UnixStream::connect(sock)
        .await
        .map_err(|source| VmmError::Connect {
            path: sock.to_path_buf(),
            source,
        })?;
    tokio::io::copy(&mut file, &mut conn)
        .await
        .map_err(|e| VmmError::io("send", from, e))?;
    conn.shutdown()
        .await
        .map_err(|e| VmmError::io("send", from, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_in(images: &Path) -> VmSpec {
        VmSpec {
            shares: Vec::new(),
            id: "t".into(),
            kernel: images.join("kernel-1/vmlinuz"),
            initrd: images.join("initramfs-1/initrd"),
            rootfs: images.join("rootfs-1/rootfs.ext4"),
            cpus: 1,
            memory_mib: 256,
            scratch_disk_mib: 0,
            run_dir: images.join("vm"),
            extra_cmdline: vec![],
            lifetime: crate::Lifetime::Owned,
            memory: Default::default(),
        }
    }

    #[test]
    fn the_same_image_through_a_link_restores_and_a_rebuilt_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        let spec = spec_in(&images);
        for f in [&spec.kernel, &spec.initrd, &spec.rootfs] {
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, "x").unwrap();
        }
        let snap = Snapshot {
            backend: "qemu".into(),
            dir: dir.path().join("snap"),
            memory: crate::SnapshotMemory::InState,
            cpus: 1,
            memory_mib: 256,
            nic_mac: None,
            disk_format: None,
            boot: Some(BootFiles::of(&spec)),
        };
        // Another home whose `images` is a link to the same directory.
        let other_home = dir.path().join("home");
        std::fs::create_dir(&other_home).unwrap();
        std::os::unix::fs::symlink(&images, other_home.join("images")).unwrap();
        let linked = spec_in(&other_home.join("images"));
        assert!(check_restore("qemu", &linked, None, &snap).is_ok());
        // A rebuilt image: content-addressed, so at another path.
        let rebuilt = VmSpec {
            rootfs: images.join("rootfs-2/rootfs.ext4"),
            ..spec.clone()
        };
        std::fs::create_dir_all(rebuilt.rootfs.parent().unwrap()).unwrap();
        std::fs::write(&rebuilt.rootfs, "x").unwrap();
        let e = check_restore("qemu", &rebuilt, None, &snap).unwrap_err();
        assert!(e.to_string().contains("image rebuilt"), "{e}");
        // Records from before boot files were kept restore as before.
        let old = Snapshot { boot: None, ..snap };
        assert!(check_restore("qemu", &rebuilt, None, &old).is_ok());
    }

    #[tokio::test]
    async fn sparse_copy_keeps_content_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("a");
        let f = std::fs::File::create(&from).unwrap();
        f.set_len(64 << 20).unwrap();
        drop(f);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&from)
            .and_then(|mut f| {
                use std::io::{Seek, Write};
                f.seek(std::io::SeekFrom::Start(1 << 20))?;
                f.write_all(b"hello")
            })
            .unwrap();
        let to = dir.path().join("b");
        copy_sparse(&from, &to).await.unwrap();
        assert_eq!(std::fs::read(&from).unwrap(), std::fs::read(&to).unwrap());
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&to).unwrap().blocks();
        assert!(
            blocks * 512 < 1 << 20,
            "copy is not sparse: {blocks} blocks"
        );
        assert!(copy_sparse(&from, &to).await.is_err(), "overwrote a file");
    }

    #[tokio::test]
    async fn overlay_refuses_unknown_formats() {
        let dir = tempfile::tempdir().unwrap();
        let err = make_overlay(&dir.path().join("x"), "vmdk", &dir.path().join("o"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("neither raw nor qcow2"), "{err}");
    }

    #[tokio::test]
    async fn a_stream_lands_in_a_file_and_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let src = dir.path().join("src");
        std::fs::write(&src, &data).unwrap();
        let listener = UnixListener::bind(&sock).unwrap();
        let dst = dir.path().join("dst");
        let (n, sent) = tokio::join!(receive_stream(listener, &dst), send_file(&src, &sock));
        sent.unwrap();
        assert_eq!(n.unwrap(), data.len() as u64);
        assert_eq!(std::fs::read(&dst).unwrap(), data);
    }
}
