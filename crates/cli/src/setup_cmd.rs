//! `hutch setup firecracker [--from PATH]`: installs `firecracker` and `jailer` into
//! `$HUTCH_HOME/bin`, either from the pinned upstream release (downloaded with `curl`, its
//! SHA-256 checked before anything is unpacked) or from a local tarball, directory or binary.
//! Either way each binary must run and report its version, and the two versions must match.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use clap::Subcommand;
use sha2::{Digest, Sha256};

use crate::error::CliError;
use hutch_daemon::Home;

/// The Firecracker release `hutch setup firecracker` downloads.
pub const FIRECRACKER_VERSION: &str = "v1.16.1";

/// Where that release's x86_64 tarball lives.
pub const FIRECRACKER_URL: &str = "https://github.com/firecracker-microvm/firecracker/releases/download/v1.16.1/firecracker-v1.16.1-x86_64.tgz";

/// The published SHA-256 of that tarball (its `.sha256.txt`). Pinned here rather than fetched
/// next to the tarball, which would only prove that both came from the same place.
pub const FIRECRACKER_SHA256: &str =
    "382a02a869e4d6d5cb14c40577f9545e8458021ea8b0b2d3fc10ec14d9c242e6";

/// How long the download may take.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// `hutch setup …`.
#[derive(Debug, Subcommand)]
pub enum SetupCommand {
    /// Install Firecracker and its jailer into $HUTCH_HOME/bin: the pinned release (SHA-256
    /// checked), or a local release tarball, directory or binary with --from.
    Firecracker {
        /// A release tarball (.tgz), a directory holding `firecracker` and `jailer` (or the
        /// release's `firecracker-vX-x86_64` names), or a `firecracker` binary.
        #[arg(long, value_name = "PATH")]
        from: Option<PathBuf>,
    },
}

/// Why a setup failed.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The download failed (no network, or the URL is unreachable).
    #[error("downloading {url} failed ({detail}): without network, download it elsewhere and run `hutch setup firecracker --from FILE`")]
    Download {
        /// The URL.
        url: String,
        /// What curl said.
        detail: String,
    },
    /// The downloaded file is not the pinned release.
    #[error("{path} has SHA-256 {actual}, not the pinned {expected}: refusing to install it")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// What it hashed to.
        actual: String,
        /// What it should hash to.
        expected: String,
    },
    /// A tool this command runs is missing.
    #[error("{0} not found: install it (apt-get install {0})")]
    ToolMissing(&'static str),
    /// Unpacking the tarball failed.
    #[error("unpacking {path} failed: {detail}")]
    Unpack {
        /// The tarball.
        path: PathBuf,
        /// What tar said.
        detail: String,
    },
    /// The source holds no usable binary.
    #[error("no {what} binary in {path}")]
    NotFound {
        /// `firecracker` or `jailer`.
        what: &'static str,
        /// Where we looked.
        path: PathBuf,
    },
    /// A binary does not run, or is not what it claims.
    #[error("{path} is not a working {what}")]
    NotRunnable {
        /// `firecracker` or `jailer`.
        what: &'static str,
        /// The binary.
        path: PathBuf,
        /// Why.
        #[source]
        source: hutch_vmm::firecracker::FirecrackerError,
    },
    /// `--version` named another program.
    #[error("{path} reports {version:?}, expected {what}")]
    WrongProgram {
        /// `firecracker` or `jailer`.
        what: &'static str,
        /// The binary.
        path: PathBuf,
        /// What it reported.
        version: String,
    },
    /// Firecracker and the jailer are of different versions.
    #[error("firecracker is {firecracker} but the jailer is {jailer}: use the jailer of the same release")]
    VersionMismatch {
        /// Firecracker's version line.
        firecracker: String,
        /// The jailer's version line.
        jailer: String,
    },
    /// The pinned release exists only for x86_64.
    #[error("the pinned release is for x86_64, this host is {0}: install with --from")]
    Arch(&'static str),
    /// A file operation failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SetupError {
    let path = path.to_path_buf();
    move |source| SetupError::Io {
        action,
        path,
        source,
    }
}

/// Runs `hutch setup …`.
pub async fn run(home: &Home, cmd: SetupCommand) -> Result<i32, CliError> {
    match cmd {
        SetupCommand::Firecracker { from } => {
            let bin = home.bin();
            let installed = install_firecracker(&bin, from.as_deref()).await?;
            for (name, version) in installed {
                println!("{name}: {version} ({})", bin.join(name).display());
            }
            Ok(0)
        }
    }
}

/// Installs firecracker (and the jailer, where the source has one) into `bin`; returns the
/// installed names and their version lines.
async fn install_firecracker(
    bin: &Path,
    from: Option<&Path>,
) -> Result<Vec<(&'static str, String)>, SetupError> {
    std::fs::create_dir_all(bin).map_err(io("create", bin))?;
    // Work next to the destination, so the final renames stay on one file system.
    let work = tempfile::Builder::new()
        .prefix(".setup-")
        .tempdir_in(bin)
        .map_err(io("create a temp dir in", bin))?;
    let (firecracker, jailer) = match from {
        None => {
            if std::env::consts::ARCH != "x86_64" {
                return Err(SetupError::Arch(std::env::consts::ARCH));
            }
            let tgz = work.path().join("firecracker.tgz");
            download(FIRECRACKER_URL, &tgz).await?;
            verify_sha256(&tgz, FIRECRACKER_SHA256)?;
            let tree = work.path().join("unpacked");
            unpack(&tgz, &tree).await?;
            find_pair(&tree)?
        }
        Some(p) if p.is_dir() => find_pair(p)?,
        Some(p) if is_tarball(p) => {
            if sha256_file(p)? == FIRECRACKER_SHA256 {
                eprintln!("{}: the pinned {FIRECRACKER_VERSION} release", p.display());
            }
            let tree = work.path().join("unpacked");
            unpack(p, &tree).await?;
            find_pair(&tree)?
        }
        Some(p) => {
            let beside = p.parent().map(|d| d.join("jailer")).filter(|j| j.is_file());
            (p.to_path_buf(), beside)
        }
    };
    let fc_version = checked_version("firecracker", "Firecracker v", &firecracker).await?;
    let jailer_version = match &jailer {
        Some(j) => {
            let v = checked_version("jailer", "Jailer v", j).await?;
            let number = |s: &str| s.rsplit(' ').next().unwrap_or(s).to_string();
            if number(&v) != number(&fc_version) {
                return Err(SetupError::VersionMismatch {
                    firecracker: fc_version,
                    jailer: v,
                });
            }
            Some(v)
        }
        None => None,
    };
    let mut installed = vec![("firecracker", fc_version)];
    place(&firecracker, work.path(), &bin.join("firecracker"))?;
    if let (Some(j), Some(v)) = (jailer, jailer_version) {
        place(&j, work.path(), &bin.join("jailer"))?;
        installed.push(("jailer", v));
    } else {
        eprintln!(
            "no jailer found next to the firecracker binary: only --no-jailer launches will work"
        );
    }
    Ok(installed)
}

/// Whether `p` names a gzipped tarball.
fn is_tarball(p: &Path) -> bool {
    let name = p.to_string_lossy();
    name.ends_with(".tgz") || name.ends_with(".tar.gz")
}

/// Downloads `url` to `dest` with curl (HTTPS only, redirects followed, bounded in time).
async fn download(url: &str, dest: &Path) -> Result<(), SetupError> {
    let curl = find_tool("curl")?;
    eprintln!("downloading {url}");
    let out = tokio::process::Command::new(curl)
        .args(["--fail", "--location", "--silent", "--show-error"])
        .args(["--proto", "=https", "--proto-redir", "=https"])
        .args(["--connect-timeout", "20", "--max-time"])
        .arg(DOWNLOAD_TIMEOUT.as_secs().to_string())
        .arg("--output")
        .arg(dest)
        .arg(url)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(io("run curl for", dest))?;
    if !out.status.success() {
        return Err(SetupError::Download {
            url: url.to_string(),
            detail: one_line(&out.stderr, &out.status),
        });
    }
    Ok(())
}

/// Unpacks the gzipped tarball `tgz` into `dest` with the host's tar (no absolute paths, no
/// ownership changes).
async fn unpack(tgz: &Path, dest: &Path) -> Result<(), SetupError> {
    let tar = find_tool("tar")?;
    std::fs::create_dir_all(dest).map_err(io("create", dest))?;
    let out = tokio::process::Command::new(tar)
        .args(["--extract", "--gzip", "--no-same-owner", "--file"])
        .arg(tgz)
        .arg("--directory")
        .arg(dest)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(io("run tar on", tgz))?;
    if !out.status.success() {
        return Err(SetupError::Unpack {
            path: tgz.to_path_buf(),
            detail: one_line(&out.stderr, &out.status),
        });
    }
    Ok(())
}

fn one_line(stderr: &[u8], status: &std::process::ExitStatus) -> String {
    let text = String::from_utf8_lossy(stderr);
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.is_empty() {
        status.to_string()
    } else {
        text
    }
}

fn find_tool(name: &'static str) -> Result<PathBuf, SetupError> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(SetupError::ToolMissing(name))
}

fn sha256_file(path: &Path) -> Result<String, SetupError> {
    let mut f = std::fs::File::open(path).map_err(io("open", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io("read", path))?;
        if n == 0 {
            return Ok(hex::encode(h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

/// Refuses `path` unless it hashes to `expected`.
fn verify_sha256(path: &Path, expected: &str) -> Result<(), SetupError> {
    let actual = sha256_file(path)?;
    if actual != expected {
        return Err(SetupError::Checksum {
            path: path.to_path_buf(),
            actual,
            expected: expected.to_string(),
        });
    }
    Ok(())
}

/// Finds firecracker (required) and the jailer (optional) under `dir`: plain `firecracker` /
/// `jailer`, or the release's `firecracker-vX-<arch>` names, at most two levels down (the
/// release tarball holds a `release-vX-<arch>/` directory).
fn find_pair(dir: &Path) -> Result<(PathBuf, Option<PathBuf>), SetupError> {
    let fc = find_named(dir, "firecracker", 2).ok_or_else(|| SetupError::NotFound {
        what: "firecracker",
        path: dir.to_path_buf(),
    })?;
    Ok((fc, find_named(dir, "jailer", 2)))
}

fn find_named(dir: &Path, name: &str, depth: u32) -> Option<PathBuf> {
    let mut entries: Vec<_> = std::fs::read_dir(dir).ok()?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    // `firecracker-v1.16.1-x86_64`, not `firecracker-v1.16.1-x86_64.debug`.
    let arch_suffix = format!("-{}", std::env::consts::ARCH);
    let matches = |file: &str| {
        file == name || (file.starts_with(&format!("{name}-v")) && file.ends_with(&arch_suffix))
    };
    for e in &entries {
        let ft = e.file_type().ok()?;
        let file = e.file_name().to_string_lossy().into_owned();
        if ft.is_file() && matches(&file) {
            return Some(e.path());
        }
    }
    if depth == 0 {
        return None;
    }
    entries
        .iter()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .find_map(|e| find_named(&e.path(), name, depth - 1))
}

/// Runs `path --version` and checks it names the expected program.
async fn checked_version(
    what: &'static str,
    prefix: &str,
    path: &Path,
) -> Result<String, SetupError> {
    let v = hutch_vmm::firecracker::binary_version(path)
        .await
        .map_err(|source| SetupError::NotRunnable {
            what,
            path: path.to_path_buf(),
            source,
        })?;
    if !v.starts_with(prefix) {
        return Err(SetupError::WrongProgram {
            what,
            path: path.to_path_buf(),
            version: v,
        });
    }
    Ok(v)
}

/// Copies `src` into `work`, makes it executable, and renames it over `dest`.
fn place(src: &Path, work: &Path, dest: &Path) -> Result<(), SetupError> {
    use std::os::unix::fs::PermissionsExt;
    let name = dest.file_name().expect("a file name");
    let tmp = work.join(name);
    std::fs::copy(src, &tmp).map_err(io("copy", src))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
        .map_err(io("chmod", &tmp))?;
    std::fs::rename(&tmp, dest).map_err(io("install", dest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(path: &Path, version_line: &str) {
        std::fs::write(
            path,
            format!("#!/bin/sh\necho '{version_line}'\necho\necho 'exiting'\n"),
        )
        .unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[tokio::test]
    async fn installs_a_matching_pair_from_a_directory() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("release-v1.16.1-x86_64");
        std::fs::create_dir(&src).unwrap();
        script(
            &src.join("firecracker-v1.16.1-x86_64"),
            "Firecracker v1.16.1",
        );
        script(&src.join("jailer-v1.16.1-x86_64"), "Jailer v1.16.1");
        std::fs::write(src.join("firecracker-v1.16.1-x86_64.debug"), "x").unwrap();
        let bin = d.path().join("home/bin");
        let got = install_firecracker(&bin, Some(d.path())).await.unwrap();
        assert_eq!(
            got,
            [
                ("firecracker", "Firecracker v1.16.1".to_string()),
                ("jailer", "Jailer v1.16.1".to_string())
            ]
        );
        let mode = std::fs::metadata(bin.join("firecracker"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert!(bin.join("jailer").is_file());
        // Nothing else is left in bin.
        let names: Vec<_> = std::fs::read_dir(&bin)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[tokio::test]
    async fn installs_from_a_tarball() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src/release-v1.16.1-x86_64");
        std::fs::create_dir_all(&src).unwrap();
        script(
            &src.join("firecracker-v1.16.1-x86_64"),
            "Firecracker v1.16.1",
        );
        script(&src.join("jailer-v1.16.1-x86_64"), "Jailer v1.16.1");
        let tgz = d.path().join("fc.tgz");
        #[allow(clippy::disallowed_methods)] // A test's short synchronous setup.
        let ok = std::process::Command::new("tar")
            .arg("czf")
            .arg(&tgz)
            .arg("-C")
            .arg(d.path().join("src"))
            .arg("release-v1.16.1-x86_64")
            .status()
            .unwrap();
        assert!(ok.success());
        let bin = d.path().join("bin");
        let got = install_firecracker(&bin, Some(&tgz)).await.unwrap();
        assert_eq!(got.len(), 2);
        assert!(bin.join("firecracker").is_file() && bin.join("jailer").is_file());
    }

    #[tokio::test]
    async fn refuses_mismatched_broken_or_wrong_binaries() {
        let d = tempfile::tempdir().unwrap();
        let bin = d.path().join("bin");
        script(&d.path().join("firecracker"), "Firecracker v1.16.1");
        script(&d.path().join("jailer"), "Jailer v1.15.0");
        let e = install_firecracker(&bin, Some(d.path())).await.unwrap_err();
        assert!(matches!(e, SetupError::VersionMismatch { .. }), "{e}");
        assert!(!bin.join("firecracker").exists(), "nothing installed");

        script(&d.path().join("jailer"), "Something v1.16.1");
        let e = install_firecracker(&bin, Some(d.path())).await.unwrap_err();
        assert!(
            matches!(e, SetupError::WrongProgram { what: "jailer", .. }),
            "{e}"
        );

        let e = install_firecracker(&bin, Some(Path::new("/bin/false")))
            .await
            .unwrap_err();
        assert!(matches!(e, SetupError::NotRunnable { .. }), "{e}");

        let empty = tempfile::tempdir().unwrap();
        let e = install_firecracker(&bin, Some(empty.path()))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                SetupError::NotFound {
                    what: "firecracker",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn checksums_are_enforced() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, b"abc").unwrap();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        verify_sha256(&f, abc).unwrap();
        let e = verify_sha256(&f, FIRECRACKER_SHA256).unwrap_err();
        assert!(e.to_string().contains("refusing"), "{e}");
        assert_eq!(FIRECRACKER_SHA256.len(), 64);
        assert!(FIRECRACKER_URL.contains(FIRECRACKER_VERSION));
    }

    #[tokio::test]
    async fn a_failed_download_says_what_to_do() {
        if find_tool("curl").is_err() {
            eprintln!("SKIP a_failed_download_says_what_to_do: no curl on PATH");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        // Nothing listens on port 1 of the loopback address: refused at once.
        let e = download("https://127.0.0.1:1/firecracker.tgz", &d.path().join("x"))
            .await
            .unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, SetupError::Download { .. }), "{msg}");
        assert!(msg.contains("--from FILE"), "{msg}");
    }
}
