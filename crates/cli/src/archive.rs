//! Checking tar archives that cross the host/guest boundary, and unpacking guest-made ones
//! on the host without ever leaving the destination directory.
//!
//! Accepted entries: regular files, directories and symlinks, at relative paths without `..`,
//! never *through* a symlink that the same archive made. Refused: absolute paths, `..`,
//! device nodes, FIFOs, hard links, and anything else.

use std::{
    collections::HashSet,
    io::Read,
    path::{Component, Path, PathBuf},
};

/// Most entries one archive may hold.
pub const MAX_ENTRIES: usize = 100_000;

/// Why an archive was refused.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// An entry's path or type is not allowed.
    #[error("archive entry {path:?} refused: {why}")]
    Unsafe {
        /// The entry's path as written in the archive.
        path: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Too many entries.
    #[error("archive has more than {MAX_ENTRIES} entries")]
    TooManyEntries,
    /// The archive is not a readable tar stream.
    #[error("archive is malformed")]
    Malformed(#[source] std::io::Error),
    /// Writing an entry on the host failed.
    #[error("cannot write {path}")]
    Write {
        /// Host path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A checked entry: where it goes (relative) and what it is.
enum Checked {
    Dir(PathBuf, u32),
    File(PathBuf, u32),
    Symlink(PathBuf, PathBuf),
}

/// Checks every entry of `tar`; `Ok` means it is safe to unpack anywhere.
pub fn check(tar: &[u8]) -> Result<usize, ArchiveError> {
    walk(tar, |_, _| Ok(()))
}

/// Unpacks a checked archive into `dest` on the host. Symlinks are created but never followed.
pub fn unpack(tar: &[u8], dest: &Path) -> Result<usize, ArchiveError> {
    walk(tar, |entry, data| {
        let write_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ArchiveError::Write { path, source }
        };
        match entry {
            Checked::Dir(rel, mode) => {
                let p = dest.join(rel);
                std::fs::create_dir_all(&p).map_err(write_err(&p))?;
                set_mode(&p, *mode).map_err(write_err(&p))
            }
            Checked::File(rel, mode) => {
                let p = dest.join(rel);
                if let Some(parent) = p.parent() {
                    std::fs::create_dir_all(parent).map_err(write_err(parent))?;
                }
                // O_NOFOLLOW-like: refuse to write through an existing symlink.
                if p.symlink_metadata()
                    .is_ok_and(|m| m.file_type().is_symlink())
                {
                    return Err(ArchiveError::Unsafe {
                        path: rel.display().to_string(),
                        why: "would write through a symlink",
                    });
                }
                std::fs::write(&p, data).map_err(write_err(&p))?;
                set_mode(&p, *mode).map_err(write_err(&p))
            }
            Checked::Symlink(rel, target) => {
                let p = dest.join(rel);
                std::os::unix::fs::symlink(target, &p).map_err(write_err(&p))
            }
        }
    })
}

fn set_mode(p: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode & 0o777))
}

/// Reads every entry, checks it, and hands it (with its contents) to `each`.
fn walk(
    tar: &[u8],
    mut each: impl FnMut(&Checked, &[u8]) -> Result<(), ArchiveError>,
) -> Result<usize, ArchiveError> {
    let mut archive = tar::Archive::new(tar);
    let mut symlinks: HashSet<PathBuf> = HashSet::new();
    let mut count = 0;
    for entry in archive.entries().map_err(ArchiveError::Malformed)? {
        let mut entry = entry.map_err(ArchiveError::Malformed)?;
        count += 1;
        if count > MAX_ENTRIES {
            return Err(ArchiveError::TooManyEntries);
        }
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let unsafe_entry = |why| ArchiveError::Unsafe {
            path: shown.clone(),
            why,
        };
        let rel = relative_path(&raw).ok_or_else(|| unsafe_entry("absolute path or `..`"))?;
        if rel.ancestors().skip(1).any(|a| symlinks.contains(a)) {
            return Err(unsafe_entry("path goes through a symlink in the archive"));
        }
        let mode = entry.header().mode().map_err(ArchiveError::Malformed)?;
        let kind = entry.header().entry_type();
        let checked = if kind.is_dir() {
            Checked::Dir(rel, mode)
        } else if kind.is_file() {
            Checked::File(rel, mode)
        } else if kind.is_symlink() {
            let target = entry
                .link_name()
                .map_err(ArchiveError::Malformed)?
                .ok_or_else(|| unsafe_entry("symlink without a target"))?
                .into_owned();
            symlinks.insert(rel.clone());
            Checked::Symlink(rel, target)
        } else {
            return Err(unsafe_entry(
                "only files, directories and symlinks are allowed",
            ));
        };
        let mut data = Vec::new();
        if let Checked::File(..) = checked {
            entry
                .read_to_end(&mut data)
                .map_err(ArchiveError::Malformed)?;
        }
        if !matches!(&checked, Checked::Dir(p, _) if p.as_os_str().is_empty()) {
            each(&checked, &data)?;
        }
    }
    Ok(count)
}

/// `raw` as a normalised relative path (`./` dropped), or `None` if absolute or with `..`.
fn relative_path(raw: &[u8]) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let path = Path::new(std::ffi::OsStr::from_bytes(raw));
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn header(kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h
    }

    /// Writes `path` straight into the header, bypassing the builder's own checks, as a
    /// hostile guest's tar would.
    fn raw_entry(
        b: &mut tar::Builder<Vec<u8>>,
        path: &str,
        kind: tar::EntryType,
        link: Option<&str>,
    ) {
        let mut h = header(kind, 0);
        h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        if let Some(l) = link {
            h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_cksum();
        b.append(&h, std::io::empty()).unwrap();
    }

    #[test]
    fn a_tree_with_modes_symlinks_and_an_empty_dir_round_trips() {
        let tar = archive(|b| {
            let mut h = header(tar::EntryType::Directory, 0);
            h.set_mode(0o750);
            b.append_data(&mut h, "empty/", std::io::empty()).unwrap();
            let mut h = header(tar::EntryType::Regular, 5);
            h.set_mode(0o755);
            b.append_data(&mut h, "bin/run.sh", &b"hello"[..]).unwrap();
            let mut h = header(tar::EntryType::Symlink, 0);
            b.append_link(&mut h, "bin/link", "run.sh").unwrap();
        });
        let dest = tempfile::tempdir().unwrap();
        assert_eq!(unpack(&tar, dest.path()).unwrap(), 3);
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &str| {
            std::fs::metadata(dest.path().join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("empty"), 0o750);
        assert_eq!(mode("bin/run.sh"), 0o755);
        assert_eq!(
            std::fs::read_link(dest.path().join("bin/link")).unwrap(),
            Path::new("run.sh")
        );
    }

    #[test]
    fn escapes_devices_and_links_through_symlinks_are_refused() {
        let cases: Vec<Vec<u8>> = vec![
            archive(|b| raw_entry(b, "../evil", tar::EntryType::Regular, None)),
            archive(|b| raw_entry(b, "/etc/passwd", tar::EntryType::Regular, None)),
            archive(|b| raw_entry(b, "a/../../x", tar::EntryType::Regular, None)),
            archive(|b| raw_entry(b, "dev", tar::EntryType::Char, None)),
            archive(|b| raw_entry(b, "fifo", tar::EntryType::Fifo, None)),
            archive(|b| raw_entry(b, "hard", tar::EntryType::Link, Some("/etc/shadow"))),
            archive(|b| {
                raw_entry(b, "out", tar::EntryType::Symlink, Some("/etc"));
                raw_entry(b, "out/passwd", tar::EntryType::Regular, None);
            }),
        ];
        for (i, tar) in cases.iter().enumerate() {
            let dest = tempfile::tempdir().unwrap();
            assert!(
                matches!(check(tar), Err(ArchiveError::Unsafe { .. })),
                "case {i} passed the check"
            );
            assert!(unpack(tar, dest.path()).is_err(), "case {i} unpacked");
            assert!(!Path::new("/evil").exists());
        }
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        assert!(check(&[7u8; 1024]).is_err());
    }
}
