//! Packing a host workspace into the tar archive that goes into the guest. A git repository
//! contributes its tracked files plus untracked files that are not ignored, and all of `.git`;
//! a plain directory contributes everything, empty directories included (git does not track
//! empty directories, so a repository's are left out). Symlinks are stored as symlinks (never
//! followed); FIFOs, sockets and devices are left out.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Command,
};

/// Why a workspace could not be packed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// Reading the workspace failed.
    #[error("{}", .path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Listing the repository's files with git failed.
    #[error("git ls-files in {} failed: {stderr}", .dir.display())]
    Git {
        /// The workspace.
        dir: PathBuf,
        /// git's complaint.
        stderr: String,
    },
    /// A file name is not UTF-8 (changesets carry UTF-8 paths only).
    #[error("{} has a name that is not UTF-8", .0.display())]
    NotUtf8(PathBuf),
}

/// The relative paths to pack from `dir`.
fn files(dir: &Path) -> Result<Vec<String>, PackError> {
    let mut out = Vec::new();
    if dir.join(".git").exists() {
        let o = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args([
                "-c",
                "core.fsmonitor=false",
                "ls-files",
                "-z",
                "--cached",
                "--others",
                "--exclude-standard",
            ])
            .output()
            .map_err(|source| PackError::Io {
                path: dir.into(),
                source,
            })?;
        if !o.status.success() {
            return Err(PackError::Git {
                dir: dir.into(),
                stderr: String::from_utf8_lossy(&o.stderr)
                    .chars()
                    .take(300)
                    .collect(),
            });
        }
        for raw in o.stdout.split(|b| *b == 0).filter(|r| !r.is_empty()) {
            let p = std::str::from_utf8(raw)
                .map_err(|_| PackError::NotUtf8(dir.join(String::from_utf8_lossy(raw).as_ref())))?;
            out.push(p.to_string());
        }
        out.sort();
        out.dedup();
        walk(dir, Path::new(".git"), &mut out)?;
    } else {
        walk(dir, Path::new(""), &mut out)?;
    }
    Ok(out)
}

fn walk(root: &Path, rel: &Path, out: &mut Vec<String>) -> Result<(), PackError> {
    let dir = root.join(rel);
    let io = |source| PackError::Io {
        path: dir.clone(),
        source,
    };
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .map_err(io)?
        .collect::<Result<_, _>>()
        .map_err(io)?;
    names.sort_by_key(|e| e.file_name());
    if names.is_empty() && !rel.as_os_str().is_empty() {
        out.push(
            rel.to_str()
                .ok_or_else(|| PackError::NotUtf8(dir.clone()))?
                .to_string(),
        );
    }
    for e in names {
        let p = rel.join(e.file_name());
        let ft = e.file_type().map_err(|source| PackError::Io {
            path: root.join(&p),
            source,
        })?;
        if ft.is_dir() {
            walk(root, &p, out)?;
        } else {
            out.push(
                p.to_str()
                    .ok_or_else(|| PackError::NotUtf8(root.join(&p)))?
                    .to_string(),
            );
        }
    }
    Ok(())
}

/// Packs the workspace `dir` as a tar archive of relative paths.
pub fn pack(dir: &Path) -> Result<Vec<u8>, PackError> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    for rel in files(dir)? {
        let path = dir.join(&rel);
        let io = |source| PackError::Io {
            path: path.clone(),
            source,
        };
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            // Listed by git but deleted in the work tree: not part of the workspace.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(e)),
        };
        let mut h = tar::Header::new_gnu();
        h.set_mode(meta.mode() & 0o777);
        h.set_mtime(meta.mtime().max(0) as u64);
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&path).map_err(io)?;
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, &rel, &target).map_err(io)?;
        } else if meta.is_file() {
            let data = std::fs::read(&path).map_err(io)?;
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, &rel, &data[..]).map_err(io)?;
        } else if meta.is_dir() {
            // Only empty directories are listed; the others come with their contents.
            h.set_entry_type(tar::EntryType::Directory);
            h.set_size(0);
            b.append_data(&mut h, &rel, std::io::empty()).map_err(io)?;
        }
        // Anything else is left out.
    }
    b.into_inner().map_err(|source| PackError::Io {
        path: dir.into(),
        source,
    })
}
