//! Host tools: finding them, naming the package that ships them, and running them with their
//! output logged and the tail kept for error messages.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use indicatif::ProgressBar;

use crate::ImageError;

/// Path of the Debian archive keyring used to verify the mirror.
pub(crate) const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// Host programs used by the pipeline and the Debian package that ships each.
const PACKAGES: &[(&str, &str)] = &[
    ("apt-get", "apt"),
    ("apt-cache", "apt"),
    ("dpkg-deb", "dpkg"),
    ("debootstrap", "debootstrap"),
    ("mkfs.ext4", "e2fsprogs"),
    ("xz", "xz-utils"),
    ("zstd", "zstd"),
    ("cpio", "cpio"),
    ("make", "make"),
    ("gcc", "gcc"),
    ("flex", "flex"),
    ("bison", "bison"),
    ("bc", "bc"),
    ("tar", "tar"),
];

/// Programs the kernel step needs.
pub(crate) const KERNEL_TOOLS: &[&str] = &["apt-get", "apt-cache", "dpkg-deb"];
/// Programs the rootfs step needs.
pub(crate) const ROOTFS_TOOLS: &[&str] = &["debootstrap", "mkfs.ext4"];

/// Looks `tool` up on `PATH`, then in the sbin directories a non-root `PATH` often lacks.
pub(crate) fn find(tool: &str) -> Result<PathBuf, ImageError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(extra)
        .map(|dir| dir.join(tool))
        .find(|p| is_executable(p))
        .ok_or_else(|| ImageError::ToolMissing {
            tool: tool.to_owned(),
            package: PACKAGES
                .iter()
                .find(|(t, _)| *t == tool)
                .map_or(tool, |(_, p)| *p)
                .to_owned(),
        })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Checks that every tool in `tools` is installed.
pub(crate) fn require(tools: &[&str]) -> Result<(), ImageError> {
    tools.iter().try_for_each(|t| find(t).map(drop))
}

/// Checks that the Debian archive keyring is installed.
pub(crate) fn require_keyring() -> Result<(), ImageError> {
    let path = Path::new(DEBIAN_KEYRING);
    if path.is_file() {
        Ok(())
    } else {
        Err(ImageError::KeyringMissing { path: path.into() })
    }
}

/// Checks that this process runs as root.
pub(crate) fn require_root(what: &str) -> Result<(), ImageError> {
    if rustix::process::geteuid().is_root() {
        Ok(())
    } else {
        Err(ImageError::NeedsRoot {
            what: what.to_owned(),
        })
    }
}

/// Builds a [`Command`] for `tool`, resolved with [`find`], with a clean locale.
pub(crate) fn command(tool: &str) -> Result<Command, ImageError> {
    let mut cmd = Command::new(find(tool)?);
    cmd.env("LC_ALL", "C.UTF-8")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null());
    Ok(cmd)
}

/// A short, printable form of `cmd` for logs and errors.
fn describe(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program())
        .file_name()
        .unwrap_or(cmd.get_program())
        .to_string_lossy()
        .into_owned();
    let args: Vec<_> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .filter(|a| !a.starts_with("-o"))
        .take(4)
        .collect();
    if args.is_empty() {
        program
    } else {
        format!("{program} {}", args.join(" "))
    }
}

/// How many output lines to keep for an error message.
const TAIL_LINES: usize = 6;

/// Runs `cmd` to completion, logging each output line at debug level and showing the latest line
/// on `bar`. Returns stdout; fails with the tail of the output if the command fails.
pub(crate) fn run(mut cmd: Command, bar: &ProgressBar) -> Result<String, ImageError> {
    let what = describe(&cmd);
    tracing::debug!(command = ?cmd, "running");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ImageError::Spawn {
            program: what.clone(),
            source,
        })?;
    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
    let stderr = child.stderr.take().expect("piped");
    let stderr_thread = {
        let (tail, bar, what) = (tail.clone(), bar.clone(), what.clone());
        std::thread::spawn(move || follow(stderr, &tail, &bar, &what, false))
    };
    let stdout = child.stdout.take().expect("piped");
    let out = follow(stdout, &tail, bar, &what, true);
    let _ = stderr_thread.join();
    let status = child.wait().map_err(|source| ImageError::Spawn {
        program: what.clone(),
        source,
    })?;
    if status.success() {
        return Ok(out);
    }
    let tail = tail.lock().map(|t| t.clone()).unwrap_or_default();
    let tail: String = tail.iter().map(|l| format!("\n  {l}")).collect();
    Err(ImageError::CommandFailed {
        command: what,
        status: status.to_string(),
        tail,
    })
}

/// Reads `r` line by line; logs, keeps the tail, updates the bar, and returns the whole text if
/// `keep` is set.
fn follow(
    r: impl Read,
    tail: &Mutex<VecDeque<String>>,
    bar: &ProgressBar,
    what: &str,
    keep: bool,
) -> String {
    let mut all = String::new();
    for line in BufReader::new(r).split(b'\n').map_while(Result::ok) {
        let line = String::from_utf8_lossy(&line);
        let line = line.trim_end();
        if keep {
            all.push_str(line);
            all.push('\n');
        }
        if line.is_empty() {
            continue;
        }
        tracing::debug!(target: "hutch_image::cmd", "{what}: {line}");
        let short: String = line.chars().take(70).collect();
        bar.set_message(short);
        if let Ok(mut t) = tail.lock() {
            if t.len() == TAIL_LINES {
                t.pop_front();
            }
            t.push_back(line.to_owned());
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tool_names_package() {
        let err = find("hutch-no-such-tool").unwrap_err();
        assert_eq!(
            err.to_string(),
            "hutch-no-such-tool not found: install it with `apt-get install hutch-no-such-tool`"
        );
        let err = ImageError::ToolMissing {
            tool: "debootstrap".into(),
            package: "debootstrap".into(),
        };
        assert_eq!(
            err.to_string(),
            "debootstrap not found: install it with `apt-get install debootstrap`"
        );
    }

    #[test]
    fn failing_command_keeps_tail() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo one; echo two >&2; exit 3"]);
        let err = run(cmd, &ProgressBar::hidden()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("`sh -c"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
        assert!(msg.contains("\n  two"), "{msg}");
    }

    #[test]
    fn command_returns_stdout() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo hello; echo noise >&2"]);
        assert_eq!(run(cmd, &ProgressBar::hidden()).unwrap(), "hello\n");
    }
}
