//! Finding and removing VMM processes and run dirs that no sandbox owns.
//!
//! A VMM belongs to Hutch if its command line names a run dir under `runs_dir` (the run dir's
//! name is the sandbox id), or if a run dir's `identity.json` records it (pid and start time:
//! a jailed VMM's command line names only paths inside its chroot). A share's virtiofsd is found
//! the same two ways (`identity.json`'s `helpers`, its `--socket-path` under the run dir). Its
//! jail, if any, is
//! `<jails_dir>/<exec>/<id>`. Nothing outside `runs_dir` and `jails_dir` is ever touched.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::proc::{cmdline, PidFd};

/// How long the sweep waits for each killed process to die.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// SIGKILLs every VMM process whose run dir is under `runs_dir` (named on its command line, or
/// recording it) but whose sandbox is not in `owned`. Returns how many it killed. Blocks until
/// each killed process is gone (at most seconds each): call it from `spawn_blocking`.
pub fn kill_unowned_vmms(runs_dir: &Path, owned: &[String]) -> usize {
    // Exact kills first (each waited for), then whatever has no record yet (a crash between
    // spawn and record): a dead process has no command line left to match.
    let by_record = std::fs::read_dir(runs_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            hutch_types::valid_sandbox_id(&name) && !owned.contains(&name)
        })
        .filter(|e| kill_recorded_in(&e.path()))
        .count();
    by_record + kill_named(runs_dir, owned)
}

/// Kills the processes a run dir's `identity.json` records (the VMM, then its helpers), if
/// they still run; whether it killed the VMM.
fn kill_recorded_in(run_dir: &Path) -> bool {
    #[derive(serde::Deserialize)]
    struct Process {
        pid: u32,
        start_time: u64,
    }
    #[derive(serde::Deserialize)]
    struct Recorded {
        #[serde(flatten)]
        vmm: Process,
        #[serde(default)]
        helpers: Vec<Process>,
    }
    let Some(r) = std::fs::read(run_dir.join("identity.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Recorded>(&b).ok())
    else {
        return false;
    };
    let killed = kill_one(r.vmm.pid, r.vmm.start_time, run_dir);
    for h in r.helpers {
        kill_one(h.pid, h.start_time, run_dir);
    }
    killed
}

/// Kills one recorded process of `run_dir` if it is still the one recorded; whether it did.
fn kill_one(pid: u32, start_time: u64, run_dir: &Path) -> bool {
    match crate::kill_recorded(pid, start_time) {
        Ok(killed) => {
            if killed {
                tracing::warn!(pid, dir = %run_dir.display(), "killed a VMM process no sandbox owns");
            }
            killed
        }
        Err(e) => {
            tracing::warn!(pid, error = %e, "could not kill a VMM process no sandbox owns");
            false
        }
    }
}

/// The command-line pass of [`kill_unowned_vmms`]: each candidate is pinned by a pidfd before
/// its command line is read, so the signal reaches the process whose command line matched and
/// never one that took its pid since.
fn kill_named(runs_dir: &Path, owned: &[String]) -> usize {
    let prefix = format!("{}/", runs_dir.display());
    let mut killed = 0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(pidfd) = PidFd::open(pid) else {
            continue;
        };
        let Some(id) = cmdline(pid).and_then(|args| unowned_sandbox(&args, &prefix, owned)) else {
            continue;
        };
        tracing::warn!(pid, %id, "killing a VMM no sandbox owns");
        if pidfd.kill().is_ok() {
            pidfd.wait_exit(KILL_WAIT);
            pidfd.reap();
            killed += 1;
        }
    }
    killed
}

/// The sandbox a VMM command line `args` names under `prefix`, if it is a VMM's and that
/// sandbox is not in `owned`.
fn unowned_sandbox(args: &[String], prefix: &str, owned: &[String]) -> Option<String> {
    let vmm = args.first().is_some_and(|a| {
        a.contains("qemu-system") || a.contains("firecracker") || a.contains("virtiofsd")
    });
    let id = args.iter().find_map(|a| sandbox_of(a, prefix))?;
    (vmm && !owned.contains(&id)).then_some(id)
}

/// The sandbox id in an argument that names a path under `prefix` (e.g. a socket path).
fn sandbox_of(arg: &str, prefix: &str) -> Option<String> {
    let at = arg.find(prefix)?;
    let rest = &arg[at + prefix.len()..];
    let id: String = rest.chars().take_while(|&c| c != '/' && c != ',').collect();
    hutch_types::valid_sandbox_id(&id).then_some(id)
}

/// Removes every jail (`<jails_dir>/<exec>/<id>`) whose sandbox is not in `owned`: a daemon
/// that died left them. Call after [`kill_unowned_vmms`].
pub fn remove_unowned_jails(jails_dir: &Path, owned: &[String]) -> usize {
    let execs = std::fs::read_dir(jails_dir).into_iter().flatten().flatten();
    let jails: Vec<PathBuf> = execs
        .flat_map(|exec| {
            std::fs::read_dir(exec.path())
                .into_iter()
                .flatten()
                .flatten()
        })
        .map(|jail| jail.path())
        .collect();
    let mut removed = 0;
    for jail in jails {
        let id = jail.file_name().map(|n| n.to_string_lossy().into_owned());
        let Some(id) = id.filter(|id| hutch_types::valid_sandbox_id(id)) else {
            continue;
        };
        if owned.contains(&id) {
            continue;
        }
        tracing::warn!(dir = %jail.display(), "removing a jail no sandbox owns");
        if std::fs::remove_dir_all(&jail).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Removes every run dir under `runs_dir` whose sandbox is not in `owned`.
pub fn remove_unowned_dirs(runs_dir: &Path, owned: &[String]) -> usize {
    let mut removed = 0;
    for entry in std::fs::read_dir(runs_dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if owned.contains(&name) || !hutch_types::valid_sandbox_id(&name) {
            continue;
        }
        tracing::warn!(dir = %entry.path().display(), "removing a run dir no sandbox owns");
        if std::fs::remove_dir_all(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // Tests spawn and reap processes synchronously.
mod tests {
    use super::*;

    #[test]
    fn finds_the_sandbox_in_a_qemu_argument() {
        let prefix = "/var/lib/hutch/vms/";
        let arg = "socket,id=hutch0,path=/var/lib/hutch/vms/sb-0a1b2c/channel.sock,server=on";
        assert_eq!(sandbox_of(arg, prefix), Some("sb-0a1b2c".into()));
        assert_eq!(sandbox_of("path=/elsewhere/sb-0a/x", prefix), None);
        assert_eq!(sandbox_of("path=/var/lib/hutch/vms/../etc/x", prefix), None);
    }

    /// A stand-in VMM: `sh` started through a link named `firecracker`, whose command line
    /// names a socket in `run_dir`.
    fn stand_in_vmm(bin: &Path, run_dir: &Path) -> std::process::Child {
        std::process::Command::new(bin)
            .args(["-c", "sleep 60; :"])
            .arg(run_dir.join("api.sock"))
            .spawn()
            .unwrap()
    }

    #[test]
    fn kills_unowned_vmms_by_command_line_and_spares_owned_ones() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("firecracker");
        std::os::unix::fs::symlink("/bin/sh", &bin).unwrap();
        let runs = dir.path().join("vms");
        let mut owned = stand_in_vmm(&bin, &runs.join("sb-01"));
        let mut stray = stand_in_vmm(&bin, &runs.join("sb-02"));
        // Wait until both have exec'd (their command lines name the run dirs).
        let named = |c: &std::process::Child| {
            cmdline(c.id()).is_some_and(|a| a.iter().any(|x| x.contains("/vms/sb-0")))
        };
        while !(named(&owned) && named(&stray)) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(kill_unowned_vmms(&runs, &["sb-01".into()]), 1);
        // Killed and reaped by the sweep: no process (not even a zombie) is left at its pid.
        assert!(
            crate::proc::stat(stray.id()).is_none(),
            "the unowned one is gone"
        );
        assert!(stray.wait().is_err(), "nothing left for us to reap");
        assert!(
            owned.try_wait().unwrap().is_none(),
            "the owned one still runs"
        );
        owned.kill().unwrap();
        owned.wait().unwrap();
    }

    #[test]
    fn removes_only_unowned_jails() {
        let dir = tempfile::tempdir().unwrap();
        for id in ["sb-0000000001", "sb-0000000002", "not-a-sandbox"] {
            std::fs::create_dir_all(dir.path().join("firecracker").join(id).join("root")).unwrap();
        }
        let owned = vec!["sb-0000000001".to_string()];
        assert_eq!(remove_unowned_jails(dir.path(), &owned), 1);
        let left = |id: &str| dir.path().join("firecracker").join(id).exists();
        assert!(left("sb-0000000001") && left("not-a-sandbox") && !left("sb-0000000002"));
    }

    #[test]
    fn removes_only_unowned_sandbox_dirs() {
        let dir = tempfile::tempdir().unwrap();
        for d in ["sb-01", "sb-02", "not-a-sandbox"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        assert_eq!(remove_unowned_dirs(dir.path(), &["sb-01".into()]), 1);
        assert!(dir.path().join("sb-01").exists());
        assert!(!dir.path().join("sb-02").exists());
        assert!(dir.path().join("not-a-sandbox").exists());
    }
}
