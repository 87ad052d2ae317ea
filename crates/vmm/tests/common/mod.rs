//! Fixtures for the real-QEMU tests: a kernel from `HUTCH_TEST_KERNEL`, and an initramfs built
//! here from a static busybox (`HUTCH_TEST_BUSYBOX`, default `/bin/busybox`) plus, when found,
//! the kernel's virtio modules (`HUTCH_TEST_MODULES`, default `<kernel dir>/../lib/modules/<ver>`
//! as laid out by `dpkg-deb -x`).
//!
//! Tests never pass silently: without their inputs they print a `SKIP` line to stderr, and with
//! `HUTCH_REQUIRE_VM_TESTS=1` they fail instead.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Modules loaded by the test init, in dependency order (file stem, path under `kernel/`).
const MODULES: &[(&str, &str)] = &[
    ("virtio_ring", "drivers/virtio/virtio_ring.ko"),
    ("virtio", "drivers/virtio/virtio.ko"),
    ("virtio_mmio", "drivers/virtio/virtio_mmio.ko"),
    ("virtio_console", "drivers/char/virtio_console.ko"),
    ("virtio_blk", "drivers/block/virtio_blk.ko"),
    ("virtio-rng", "drivers/char/hw_random/virtio-rng.ko"),
];

/// The test guest's /init. With `hutch.probe=1` it behaves like the agent's probe mode;
/// otherwise it prints the marker, reports its disks, then answers every line on the `hutch.0`
/// port with `pong:<line>` (and prints `hutch-echo <line>` on the console), forever.
const INIT: &str = r#"#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_mmio virtio_console virtio_blk virtio-rng; do
  [ -f /mods/$m.ko ] && $B insmod /mods/$m.ko
done
if $B grep -q hutch.probe=1 /proc/cmdline; then
  echo hutch-probe-ok
  $B poweroff -f
fi
echo hutch-probe-ok
port=
i=0
while [ -z "$port" ] && [ -f /mods/virtio_console.ko ] && [ $i -lt 100 ]; do
  for p in /sys/class/virtio-ports/*; do
    [ -f "$p/name" ] && [ "$($B cat $p/name)" = hutch.0 ] && [ -e /dev/${p##*/} ] && port=/dev/${p##*/}
  done
  [ -z "$port" ] && $B sleep 0.1
  i=$((i+1))
done
for b in /sys/block/vd*; do
  [ -e "$b" ] && echo "hutch-disk ${b##*/} serial=$($B cat $b/serial) ro=$($B cat $b/ro)"
done
# The ext4 volume label: superblock at 1024, s_volume_name at 0x78, 16 bytes.
[ -e /dev/vdb ] && echo "hutch-label vdb=$($B dd if=/dev/vdb bs=1 skip=1144 count=16 2>/dev/null | $B tr -d '\000')"
if [ -n "$port" ]; then
  echo "hutch-port $port"
  # One descriptor for good: the guest kernel discards unread port data when it is closed.
  exec 3<>$port
  while true; do
    # Without a host connection read gets EOF at once: wait a little and retry.
    if read line <&3; then
      echo "pong:$line" >&3
      echo "hutch-echo $line"
    else
      $B sleep 0.2
    fi
  done
fi
while true; do $B sleep 3600; done
"#;

pub fn require() -> bool {
    std::env::var("HUTCH_REQUIRE_VM_TESTS").as_deref() == Ok("1")
}

/// Prints a SKIP line, or panics when VM tests are required.
pub fn skip(test: &str, why: &str) {
    if require() {
        panic!("{test}: {why} (HUTCH_REQUIRE_VM_TESTS=1, so this is a failure)");
    }
    // Straight to fd 2, not eprintln!: libtest hides a passing test's captured output, and a
    // skip must be visible.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIP {test}: {why} (set HUTCH_REQUIRE_VM_TESTS=1 to make this a failure)"
    );
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub rootfs: PathBuf,
    /// Whether the virtio modules are in the initramfs (then the channel and disks are
    /// visible to the guest).
    pub has_modules: bool,
}

/// Builds the fixture, or reports a skip and returns `None`.
pub fn fixture(test: &str) -> Option<Fixture> {
    if hutch_vmm::find_qemu().is_err() {
        skip(
            test,
            "qemu-system-x86_64 not found (apt-get install qemu-system-x86)",
        );
        return None;
    }
    let Some(kernel) = std::env::var_os("HUTCH_TEST_KERNEL")
        .map(PathBuf::from)
        .or_else(default_image_kernel)
    else {
        skip(
            test,
            "HUTCH_TEST_KERNEL is not set (path to a Debian cloud vmlinuz) and there is no default image in $HUTCH_HOME",
        );
        return None;
    };
    if !kernel.is_file() {
        skip(
            test,
            &format!("HUTCH_TEST_KERNEL={} is not a file", kernel.display()),
        );
        return None;
    }
    let busybox = std::env::var_os("HUTCH_TEST_BUSYBOX")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/bin/busybox".into());
    if !busybox.is_file() {
        skip(
            test,
            &format!(
                "{} not found (apt-get install busybox-static)",
                busybox.display()
            ),
        );
        return None;
    }
    let modules = modules_dir(&kernel);
    if modules.is_none() && require() {
        panic!(
            "{test}: no virtio modules for {} (set HUTCH_TEST_MODULES to lib/modules/<version>)",
            kernel.display()
        );
    }
    let dir = tempfile::Builder::new()
        .prefix("hutch-vmm-it")
        .tempdir()
        .unwrap();
    let initrd = dir.path().join("initrd.cpio");
    build_initramfs(&initrd, &busybox, modules.as_deref()).unwrap();
    let rootfs = dir.path().join("rootfs.img");
    std::fs::File::create(&rootfs)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    Some(Fixture {
        dir,
        kernel,
        initrd,
        rootfs,
        has_modules: modules.is_some(),
    })
}

/// The kernel of the `default` image built by `hutch image build` (in `$HUTCH_HOME`).
fn default_image_kernel() -> Option<PathBuf> {
    let home = std::env::var_os("HUTCH_HOME")
        .map_or_else(|| PathBuf::from("/var/lib/hutch"), PathBuf::from);
    hutch_image::open(&home.join("images"), "default")
        .ok()
        .map(|i| i.kernel)
}

fn modules_dir(kernel: &Path) -> Option<PathBuf> {
    let dir = match std::env::var_os("HUTCH_TEST_MODULES") {
        Some(d) => PathBuf::from(d),
        // An image's kernel artifact keeps its modules beside vmlinuz.
        None if kernel.parent()?.join("modules/kernel").is_dir() => {
            kernel.parent()?.join("modules")
        }
        None => {
            let name = kernel.file_name()?.to_str()?;
            let version = name.strip_prefix("vmlinuz-")?;
            kernel.parent()?.parent()?.join("lib/modules").join(version)
        }
    };
    let kdir = dir.join("kernel");
    MODULES
        .iter()
        .all(|(_, rel)| kdir.join(rel).is_file())
        .then_some(kdir)
}

/// Writes a `newc` cpio archive: /init, /bin/busybox, /dev/console, mount points, modules.
pub fn build_initramfs(out: &Path, busybox: &Path, modules: Option<&Path>) -> std::io::Result<()> {
    let mut w = Vec::new();
    let mut ino = 1u32;
    let mut entry = |name: &str, mode: u32, rdev: (u32, u32), data: &[u8]| {
        let namesize = name.len() + 1;
        let fields = [
            ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            namesize as u32,
            0,
        ];
        ino += 1;
        w.extend_from_slice(b"070701");
        for f in fields {
            w.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        w.extend_from_slice(name.as_bytes());
        w.push(0);
        while w.len() % 4 != 0 {
            w.push(0);
        }
        w.extend_from_slice(data);
        while w.len() % 4 != 0 {
            w.push(0);
        }
    };
    for d in ["bin", "dev", "proc", "sys", "mods", "tmp"] {
        entry(d, 0o040755, (0, 0), &[]);
    }
    entry("dev/console", 0o020600, (5, 1), &[]);
    entry("init", 0o100755, (0, 0), INIT.as_bytes());
    entry("bin/busybox", 0o100755, (0, 0), &std::fs::read(busybox)?);
    if let Some(kdir) = modules {
        for (stem, rel) in MODULES {
            entry(
                &format!("mods/{stem}.ko"),
                0o100644,
                (0, 0),
                &std::fs::read(kdir.join(rel))?,
            );
        }
    }
    entry("TRAILER!!!", 0, (0, 0), &[]);
    std::fs::write(out, w)
}

/// Waits until `path` contains `needle`; returns the time it took, or panics with the log tail.
pub async fn wait_for_console(path: &Path, needle: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return start.elapsed();
        }
        if start.elapsed() > limit {
            let tail: String = text
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            panic!("{needle:?} not on the console within {limit:?}; last lines:\n{tail}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Pids of processes with `hutch-<id>` as an argument (how `ps` finds a VM).
pub fn pids_named(id: &str) -> Vec<u32> {
    let want = format!("hutch-{id}");
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) {
            if cmdline.split(|b| *b == 0).any(|a| a == want.as_bytes()) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// Whether `pid` is a live (not zombie) process.
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}
