//! Finding and removing VMM processes and run dirs that no sandbox owns.
//!
//! A VMM belongs to Hutch if its command line names a run dir under `runs_dir` (the run dir's
//! name is the sandbox id), or if a run dir's `identity.json` records it (pid and start time:
//! a jailed VMM's command line names only paths inside its chroot). Its jail, if any, is
//! `<jails_dir>/<exec>/<id>`. Nothing outside `runs_dir` and `jails_dir` is ever touched.

use std::path::{Path, PathBuf};

/// SIGKILLs every VMM process whose run dir is under `runs_dir` (named on its command line, or
/// recording it) but whose sandbox is not in `owned`. Returns how many it killed. Blocks until
/// each recorded process is gone (at most seconds).
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

/// Kills the process a run dir's `identity.json` records, if it still runs; whether it did.
fn kill_recorded_in(run_dir: &Path) -> bool {
    #[derive(serde::Deserialize)]
    struct Recorded {
        pid: u32,
        start_time: u64,
    }
    let Some(r) = std::fs::read(run_dir.join("identity.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Recorded>(&b).ok())
    else {
        return false;
    };
    match hutch_vmm::kill_recorded(r.pid, r.start_time) {
        Ok(killed) => {
            if killed {
                tracing::warn!(pid = r.pid, dir = %run_dir.display(), "killed a VMM no sandbox owns");
            }
            killed
        }
        Err(e) => {
            tracing::warn!(pid = r.pid, error = %e, "could not kill a VMM no sandbox owns");
            false
        }
    }
}

/// The command-line pass of [`kill_unowned_vmms`].
fn kill_named(runs_dir: &Path, owned: &[String]) -> usize {
    let prefix = format!("{}/", runs_dir.display());
    let mut killed = 0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !args
            .first()
            .is_some_and(|a| a.contains("qemu-system") || a.contains("firecracker"))
        {
            continue;
        }
        let Some(id) = args.iter().find_map(|a| sandbox_of(a, &prefix)) else {
            continue;
        };
        if owned.contains(&id) {
            continue;
        }
        tracing::warn!(pid, %id, "killing a VMM no sandbox owns");
        // SAFETY: kill(2) on a pid whose command line we just matched.
        if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
            killed += 1;
        }
    }
    killed
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
