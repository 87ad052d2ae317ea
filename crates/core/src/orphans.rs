//! Finding and removing VMM processes and run dirs that no sandbox owns.
//!
//! A VMM belongs to Hutch if its command line names a run dir under `runs_dir`; the run dir's
//! name is the sandbox id. Nothing outside `runs_dir` is ever touched.

use std::path::Path;

/// SIGKILLs every VMM process whose run dir is under `runs_dir` but whose sandbox is not in
/// `owned`. Returns how many it killed.
pub fn kill_unowned_vmms(runs_dir: &Path, owned: &[String]) -> usize {
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
