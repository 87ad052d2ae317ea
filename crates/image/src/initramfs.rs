//! The initramfs artifact: the guest agent as `/init` plus the kernel modules it loads.
//!
//! Layout (a contract with the guest agent):
//! ```text
//! /init                              the agent binary (0755)
//! /dev/console                       char device 5,1 (0600)
//! /dev /proc /sys /run /tmp /newroot /etc/hutch     directories
//! /lib/modules/<release>/<path>.ko   decompressed modules
//! /etc/hutch/modules                 absolute module paths, one a line, deps first
//! /etc/hutch/kernel-release          the release string
//! ```

use std::io::{BufWriter, Write};
use std::path::Path;

use crate::cpio::CpioTree;
use crate::{elf, ImageError};

/// Reads the agent binary and checks that it can run as a static `/init` on x86_64.
pub(crate) fn read_agent(path: &Path) -> Result<Vec<u8>, ImageError> {
    let bad = |reason: String| ImageError::BadAgent {
        path: path.into(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string().to_lowercase()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    let data = std::fs::read(path).map_err(|e| bad(e.to_string().to_lowercase()))?;
    elf::check_static_x86_64(&data).map_err(bad)?;
    Ok(data)
}

/// Builds the initramfs tree from the agent bytes and a kernel artifact directory.
pub(crate) fn tree(
    agent: Vec<u8>,
    kernel_dir: &Path,
    release: &str,
    modules: &[String],
) -> Result<CpioTree, ImageError> {
    let mut t = CpioTree::new();
    t.file("/init", 0o755, agent);
    for d in [
        "/dev",
        "/proc",
        "/sys",
        "/run",
        "/tmp",
        "/newroot",
        "/etc/hutch",
    ] {
        t.dir(d, 0o755);
    }
    t.char_dev("/dev/console", 0o600, 5, 1);
    let mut list = String::new();
    for rel in modules {
        let src = kernel_dir.join("modules").join(rel);
        let data = std::fs::read(&src).map_err(ImageError::io("read", &src))?;
        let dest = format!("/lib/modules/{release}/{rel}");
        t.file(&dest, 0o644, data);
        list.push_str(&dest);
        list.push('\n');
    }
    t.file("/etc/hutch/modules", 0o644, list.into_bytes());
    t.file(
        "/etc/hutch/kernel-release",
        0o644,
        format!("{release}\n").into_bytes(),
    );
    Ok(t)
}

/// Writes `tree` to `path` as an uncompressed `newc` cpio archive.
pub(crate) fn write(tree: &CpioTree, path: &Path) -> Result<u64, ImageError> {
    let file = std::fs::File::create(path).map_err(ImageError::io("create", path))?;
    let mut w = BufWriter::new(file);
    let n = tree
        .write_to(&mut w)
        .map_err(ImageError::io("write", path))?;
    w.flush().map_err(ImageError::io("write", path))?;
    w.get_ref()
        .sync_all()
        .map_err(ImageError::io("sync", path))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio;

    #[test]
    fn layout() {
        let k = tempfile::tempdir().unwrap();
        let m = k.path().join("modules/kernel/drivers/virtio");
        std::fs::create_dir_all(&m).unwrap();
        std::fs::write(m.join("virtio.ko"), b"ko1").unwrap();
        std::fs::write(m.join("virtio_mmio.ko"), b"ko2").unwrap();
        let mods = vec![
            "kernel/drivers/virtio/virtio.ko".to_owned(),
            "kernel/drivers/virtio/virtio_mmio.ko".to_owned(),
        ];
        let t = tree(b"\x7fELF...".to_vec(), k.path(), "6.1.0-x", &mods).unwrap();
        let out = k.path().join("initrd.cpio");
        write(&t, &out).unwrap();
        let entries = cpio::parse(&std::fs::read(&out).unwrap()).unwrap();
        let get = |n: &str| {
            entries
                .iter()
                .find(|e| e.name == n)
                .unwrap_or_else(|| panic!("{n}"))
        };
        assert_eq!(get("init").mode, 0o100755);
        assert_eq!(get("dev/console").rdev, (5, 1));
        for d in ["dev", "proc", "sys", "run", "tmp", "newroot", "etc/hutch"] {
            assert_eq!(get(d).mode, 0o040755, "{d}");
        }
        assert_eq!(
            get("etc/hutch/modules").data,
            b"/lib/modules/6.1.0-x/kernel/drivers/virtio/virtio.ko\n\
              /lib/modules/6.1.0-x/kernel/drivers/virtio/virtio_mmio.ko\n"
        );
        assert_eq!(get("etc/hutch/kernel-release").data, b"6.1.0-x\n");
        assert_eq!(
            get("lib/modules/6.1.0-x/kernel/drivers/virtio/virtio_mmio.ko").data,
            b"ko2"
        );
    }

    #[test]
    fn agent_checks() {
        let err = read_agent(Path::new("/bin/true")).unwrap_err().to_string();
        assert!(err.contains("dynamically linked"), "{err}");
        let err = read_agent(Path::new("/nonexistent/agent"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("agent binary /nonexistent/agent: "),
            "{err}"
        );
        let err = read_agent(Path::new("/")).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }
}
