//! The rootfs artifact: a debootstrap tree packed into an ext4 image labelled `hutch-root`,
//! without mounting anything.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use indicatif::ProgressBar;

use crate::tools::{self, DEBIAN_KEYRING};
use crate::ImageError;

/// The ext4 label the guest agent looks for to find its root disk.
pub const ROOTFS_LABEL: &str = "hutch-root";

/// Hostname written into the image; the agent sets the real one at boot.
const HOSTNAME: &str = "hutch";

/// Runs debootstrap into `tree` and packs it into `out/rootfs.ext4`. The caller removes `tree`.
pub(crate) fn build(
    out: &Path,
    tree: &Path,
    mirror: &str,
    suite: &str,
    packages: &[String],
    bar: &ProgressBar,
) -> Result<u64, ImageError> {
    let mut cmd = tools::command("debootstrap")?;
    cmd.args(["--variant=minbase", "--arch=amd64"])
        .arg(format!("--keyring={DEBIAN_KEYRING}"))
        .arg(format!("--include={}", packages.join(",")))
        .arg(suite)
        .arg(tree)
        .arg(mirror);
    bar.set_message(format!("debootstrap {suite}"));
    tools::run(cmd, bar)?;
    bar.set_message("cleaning up");
    scrub(tree)?;

    let (used, files) = usage(tree)?;
    const MIB: u64 = 1 << 20;
    let size_mib = (used + used * 3 / 10).div_ceil(MIB) + 64;
    let inodes = files + files * 3 / 10 + 4096;
    tracing::info!(used_mib = used / MIB, files, size_mib, "rootfs tree ready");

    let image = out.join("rootfs.ext4");
    bar.set_message(format!("mkfs.ext4 ({size_mib} MiB)"));
    let mut cmd = tools::command("mkfs.ext4")?;
    cmd.args(["-q", "-L", ROOTFS_LABEL, "-N", &inodes.to_string(), "-d"])
        .arg(tree)
        .arg("-F")
        .arg(&image)
        .arg(format!("{size_mib}M"));
    tools::run(cmd, bar)?;
    Ok(size_mib * MIB)
}

/// Removes apt caches and lists and writes identity placeholders.
fn scrub(tree: &Path) -> Result<(), ImageError> {
    for dir in [
        "var/cache/apt/archives",
        "var/cache/apt",
        "var/lib/apt/lists",
    ] {
        let dir = tree.join(dir);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_file() && p.file_name().is_some_and(|n| n != "lock") {
                std::fs::remove_file(&p).map_err(ImageError::io("remove", &p))?;
            }
        }
    }
    let write = |rel: &str, text: &str| {
        let p = tree.join(rel);
        // Never write through a symlink planted in the tree.
        let _ = std::fs::remove_file(&p);
        std::fs::write(&p, text).map_err(ImageError::io("write", p))
    };
    write("etc/hostname", &format!("{HOSTNAME}\n"))?;
    write(
        "etc/hosts",
        &format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{HOSTNAME}\n"),
    )?;
    // debootstrap copies the host's resolv.conf; the guest agent writes the real one.
    write("etc/resolv.conf", "")?;
    // Empty machine-id: systemd-style tools treat it as "not yet initialized".
    write("etc/machine-id", "")?;
    let dbus_id = tree.join("var/lib/dbus/machine-id");
    if dbus_id.symlink_metadata().is_ok() {
        std::fs::remove_file(&dbus_id).map_err(ImageError::io("remove", &dbus_id))?;
    }
    Ok(())
}

/// Bytes allocated and number of inodes under `root`, hard links counted once, symlinks not
/// followed.
fn usage(root: &Path) -> Result<(u64, u64), ImageError> {
    let (mut bytes, mut files) = (0u64, 0u64);
    let mut seen = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = p.symlink_metadata().map_err(ImageError::io("stat", &p))?;
        if m.nlink() > 1 && !m.is_dir() && !seen.insert((m.dev(), m.ino())) {
            continue;
        }
        files += 1;
        bytes += (m.blocks() * 512).max(m.len().min(4096));
        if m.is_dir() {
            for e in std::fs::read_dir(&p).map_err(ImageError::io("read", &p))? {
                stack.push(e.map_err(ImageError::io("read", &p))?.path());
            }
        }
    }
    Ok((bytes, files))
}

/// Unmounts anything still mounted under `tree` (a failed debootstrap can leave `/proc`, `/sys`
/// or bind-mounted device nodes behind), deepest first, so removing the tree cannot reach into
/// host file systems.
pub(crate) fn unmount_below(tree: &Path) {
    let Ok(tree) = tree.canonicalize() else {
        return;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut mounts: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|m| Path::new(m).starts_with(&tree))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        tracing::warn!(mount = %m, "unmounting leftover mount in build tree");
        if let Err(e) = rustix::mount::unmount(m.as_str(), rustix::mount::UnmountFlags::DETACH) {
            tracing::warn!(mount = %m, error = %e, "umount failed");
        }
    }
}

/// Decodes the octal escapes (`\040` for space) of a mountinfo path.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = |c: &u8| (b'0'..=b'7').contains(c);
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && (b'0'..=b'3').contains(&b[i + 1])
            && b[i + 2..i + 4].iter().all(octal)
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes a debootstrap tree after unmounting anything left mounted in it.
pub(crate) fn remove_tree(tree: &Path) {
    if tree.symlink_metadata().is_err() {
        return;
    }
    unmount_below(tree);
    if let Err(e) = std::fs::remove_dir_all(tree) {
        tracing::warn!(tree = %tree.display(), error = %e, "could not remove debootstrap tree");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/a\040b/c"), "/a b/c");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/end\04"), r"/end\04");
    }

    #[test]
    fn scrub_writes_placeholders_and_clears_caches() {
        let t = tempfile::tempdir().unwrap();
        for d in [
            "etc",
            "var/cache/apt/archives/partial",
            "var/lib/apt/lists",
            "var/lib/dbus",
        ] {
            std::fs::create_dir_all(t.path().join(d)).unwrap();
        }
        std::fs::write(t.path().join("var/cache/apt/archives/x.deb"), "x").unwrap();
        std::fs::write(t.path().join("var/cache/apt/pkgcache.bin"), "x").unwrap();
        std::fs::write(t.path().join("var/lib/apt/lists/x_Packages"), "x").unwrap();
        std::fs::write(t.path().join("var/lib/apt/lists/lock"), "").unwrap();
        std::fs::write(t.path().join("etc/hostname"), "buildhost\n").unwrap();
        std::fs::write(t.path().join("etc/resolv.conf"), "nameserver 10.0.0.1\n").unwrap();
        std::fs::write(t.path().join("var/lib/dbus/machine-id"), "abc\n").unwrap();
        scrub(t.path()).unwrap();
        let read = |p: &str| std::fs::read_to_string(t.path().join(p)).unwrap();
        assert_eq!(read("etc/hostname"), "hutch\n");
        assert_eq!(read("etc/machine-id"), "");
        assert_eq!(read("etc/resolv.conf"), "");
        assert!(read("etc/hosts").contains("localhost"));
        assert!(!t.path().join("var/cache/apt/archives/x.deb").exists());
        assert!(!t.path().join("var/cache/apt/pkgcache.bin").exists());
        assert!(!t.path().join("var/lib/apt/lists/x_Packages").exists());
        assert!(t.path().join("var/lib/apt/lists/lock").exists());
        assert!(t.path().join("var/cache/apt/archives/partial").is_dir());
        assert!(!t.path().join("var/lib/dbus/machine-id").exists());
    }

    #[test]
    fn usage_counts_hard_links_once() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("a"), vec![1u8; 100_000]).unwrap();
        std::fs::hard_link(t.path().join("a"), t.path().join("b")).unwrap();
        let (bytes, files) = usage(t.path()).unwrap();
        assert_eq!(files, 2); // the directory and one of the two links
        assert!((100_000..200_000).contains(&bytes), "{bytes}");
    }
}
