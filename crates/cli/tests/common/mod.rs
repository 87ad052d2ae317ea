//! Helpers shared by the real-VM suites.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use libtest_mimic::Failed;

/// One libtest-mimic trial per case function, named after it.
#[macro_export]
macro_rules! trials {
    ($($case:ident),* $(,)?) => {
        vec![$(libtest_mimic::Trial::test(stringify!($case), $case)),*]
    };
}

/// Runs `f` to completion as a task on `rt`, so it (and any VM it starts) lives on a runtime
/// worker thread rather than the test's own thread (a VM dies with the thread that spawned it).
pub fn on_rt<F, T>(rt: &tokio::runtime::Runtime, f: F) -> T
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    rt.block_on(async { tokio::spawn(f).await.expect("case task panicked") })
}

/// `Ok` if `cond`, else a failure with `msg`.
pub fn check(cond: bool, msg: impl Into<String>) -> Result<(), Failed> {
    if cond {
        Ok(())
    } else {
        Err(msg.into().into())
    }
}

/// `hutch` with `HUTCH_HOME=home`, and no remote-daemon settings from the environment.
pub fn hutch(home: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hutch"));
    // Host keys `task apply` pins go beside the home, not into the user's configuration.
    cmd.env("HUTCH_HOME", home)
        .env("HUTCH_HOST_KEYS", home.join("pinned-host-keys"))
        .env_remove("HUTCH_HOST")
        .env_remove("HUTCH_TOKEN");
    cmd
}

/// Starts `hutch daemon ARGS` on `home` (its log on our stderr) and waits, at most 60 s,
/// until its socket answers.
pub fn spawn_daemon(home: &Path, args: &[&str]) -> Child {
    let child = hutch(home)
        .arg("daemon")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start hutch daemon");
    let socket = home.join("hutch.sock");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "daemon did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// The default image a real-VM suite named `suite` boots, or `None` (a SKIP line printed) when
/// `HUTCH_SKIP_VM_TESTS` is set. Exits the suite, failed, when the image is missing.
pub fn default_image_or_skip(suite: &str) -> Option<hutch_image::Image> {
    if std::env::var_os("HUTCH_SKIP_VM_TESTS").is_some() {
        eprintln!("SKIP {suite} suite: HUTCH_SKIP_VM_TESTS is set");
        return None;
    }
    match hutch_image::open(&hutch_home().join("images"), "default") {
        Ok(image) => Some(image),
        Err(e) => {
            eprintln!("{suite} suite needs the default image ({e}); run scripts/test.sh, or set HUTCH_SKIP_VM_TESTS=1 to skip");
            std::process::exit(1);
        }
    }
}

/// The runtime a suite runs its cases' VMs on (see [`on_rt`]).
pub fn suite_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Named network namespaces of Hutch's that exist now and not in `before` (a leak check).
pub fn new_netns(before: &std::collections::BTreeSet<String>) -> Vec<String> {
    hutch_netns()
        .difference(before)
        .map(|ns| format!("network namespace {ns}"))
        .collect()
}

/// `$HUTCH_HOME`, or the default.
pub fn hutch_home() -> PathBuf {
    std::env::var_os("HUTCH_HOME").map_or_else(|| PathBuf::from("/var/lib/hutch"), PathBuf::from)
}

/// A private `HUTCH_HOME` that shares the real one's images and accelerator probe, so a case
/// sees only the VMs and state it made itself.
pub fn private_home() -> tempfile::TempDir {
    let home = tempfile::Builder::new()
        .prefix("hh")
        .tempdir_in("/tmp")
        .expect("temp home");
    let real = hutch_home();
    std::os::unix::fs::symlink(real.join("images"), home.path().join("images"))
        .expect("link images");
    let _ = std::fs::copy(real.join("accel.json"), home.path().join("accel.json"));
    home
}

/// Everything of Hutch's under `home` still on the host: VMM processes (their command lines
/// name their run dir) and run dirs, of daemon-managed and of local VMs.
pub fn leaks(home: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for dir in ["vms", "local"].map(|d| home.join(d)) {
        let marker = format!("{}/", dir.display());
        found.extend(
            vmm_processes()
                .into_iter()
                .filter(|(_, cmdline)| cmdline.contains(&marker))
                .map(|(pid, cmdline)| format!("process {pid}: {cmdline}")),
        );
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            found.push(format!("run dir {}", entry.path().display()));
        }
    }
    found
}

/// The named network namespaces Hutch makes (sandboxes' and spares'), for a before/after
/// comparison: the host may have others of its own.
pub fn hutch_netns() -> std::collections::BTreeSet<String> {
    std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("hutch"))
        .collect()
}

/// Live QEMU, Firecracker and virtiofsd processes: (pid, command line). Zombies have an empty command
/// line and are not listed.
pub fn vmm_processes() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let program = cmdline.split(' ').next().unwrap_or("");
        if cmdline.starts_with("qemu-system")
            || program.ends_with("/firecracker")
            || program.ends_with("/virtiofsd")
        {
            out.push((pid, cmdline));
        }
    }
    out
}
