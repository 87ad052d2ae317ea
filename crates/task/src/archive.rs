//! Checking tar archives that cross the host/guest boundary as they stream, and writing
//! guest-made archives and files on the host without ever leaving the destination directory.
//!
//! Accepted entries: regular files, directories and symlinks, at relative paths without `..`,
//! never *through* (or over) a symlink that the same archive made. Refused: absolute paths, `..`,
//! device nodes, FIFOs, hard links, and anything else.

use std::{
    collections::HashSet,
    io::Read,
    path::{Component, Path, PathBuf},
};

use crate::beneath::{is_symlink_refusal, Beneath};

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

/// Checks every entry of the tar stream `tar` as it is read; `Ok` (the entry count) means it
/// is safe to unpack anywhere. File contents are skipped, never held. `passed(end)` is called
/// as soon as each entry is judged safe, where `end` is the stream offset its contents (and
/// their padding) end at: every byte before `end` belongs to checked entries, so a caller may
/// pass it on while the next header is still being read.
pub fn check_each(tar: impl Read, mut passed: impl FnMut(u64)) -> Result<usize, ArchiveError> {
    walk(tar, |_, entry| {
        let padded = entry.size().div_ceil(512) * 512;
        passed(entry.raw_file_position() + padded);
        Ok(())
    })
}

/// Unpacks the tar stream `tar` into `dest` on the host, checking each entry as it comes.
///
/// Every write is resolved beneath `dest` without following any symlink ([`Beneath`]), so a
/// symlink that this archive, or an earlier one unpacked into the same place, left behind is
/// never written, created or chmod-ed through: such an entry is refused. Files replace what
/// was at their name (a symlink there is replaced, not followed).
pub fn unpack(tar: impl Read, dest: &Path) -> Result<usize, ArchiveError> {
    let root = Beneath::open(dest).map_err(|source| ArchiveError::Write {
        path: dest.to_path_buf(),
        source,
    })?;
    walk(tar, |entry, data| {
        let (rel, done) = match entry {
            Checked::Dir(rel, _) if rel.as_os_str().is_empty() => return Ok(()),
            Checked::Dir(rel, mode) => (rel, root.mkdir(rel, *mode)),
            Checked::File(rel, mode) => (rel, root.write_file(rel, *mode, data).map(drop)),
            Checked::Symlink(rel, target) => (rel, root.symlink(rel, target)),
        };
        done.map_err(|source| match source {
            e if is_symlink_refusal(&e) => ArchiveError::Unsafe {
                path: rel.display().to_string(),
                why: "path goes through a symlink on the host",
            },
            source => ArchiveError::Write {
                path: dest.join(rel),
                source,
            },
        })
    })
}

/// Writes the guest's file contents `data` to `dst` on the host: to a fresh file in `dst`'s
/// directory, renamed over `dst` when complete, so a symlink at `dst` (say, one an earlier
/// `hutch cp` of a guest directory planted) is replaced, never written through.
pub fn save_file(mut data: impl Read, dst: &Path) -> Result<u64, ArchiveError> {
    let write_err = |source| ArchiveError::Write {
        path: dst.to_path_buf(),
        source,
    };
    let name = dst.file_name().ok_or_else(|| {
        write_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the destination has no file name",
        ))
    })?;
    let dir = match dst.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let root = Beneath::open(dir).map_err(write_err)?;
    root.write_file(Path::new(name), 0o644, &mut data)
        .map_err(write_err)
}

/// Reads every entry, checks it, and hands it (with its contents still to read) to `each`.
fn walk<R: Read>(
    tar: R,
    mut each: impl FnMut(&Checked, &mut tar::Entry<'_, R>) -> Result<(), ArchiveError>,
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
        // A naive unpacker keeps a symlink where a directory entry follows (and chmods its
        // target): refused here, so no client of a checked archive can be led there.
        if symlinks.contains(&rel) {
            return Err(unsafe_entry("replaces a symlink the archive made"));
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
        each(&checked, &mut entry)?;
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

    fn check(tar: &[u8]) -> Result<usize, ArchiveError> {
        check_each(tar, |_| {})
    }

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
        assert_eq!(unpack(&tar[..], dest.path()).unwrap(), 3);
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
            archive(|b| {
                raw_entry(b, "d", tar::EntryType::Symlink, Some("/etc"));
                raw_entry(b, "d", tar::EntryType::Directory, None);
            }),
        ];
        for (i, tar) in cases.iter().enumerate() {
            let dest = tempfile::tempdir().unwrap();
            assert!(
                matches!(check(&tar[..]), Err(ArchiveError::Unsafe { .. })),
                "case {i} passed the check"
            );
            assert!(unpack(&tar[..], dest.path()).is_err(), "case {i} unpacked");
            assert!(!Path::new("/evil").exists());
        }
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        assert!(check(&[7u8; 1024][..]).is_err());
    }

    /// A host directory outside the destination, and its permission bits.
    fn victim() -> (tempfile::TempDir, u32) {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        (dir, 0o700)
    }

    fn mode_of(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_directory_entry_over_an_archive_symlink_does_not_chmod_the_host() {
        let (outside, mode) = victim();
        let target = outside.path().to_str().unwrap();
        let tar = archive(|b| {
            raw_entry(b, "d", tar::EntryType::Symlink, Some(target));
            let mut h = header(tar::EntryType::Directory, 0);
            h.set_mode(0o777);
            b.append_data(&mut h, "d", std::io::empty()).unwrap();
        });
        let dest = tempfile::tempdir().unwrap();
        assert!(unpack(&tar[..], dest.path()).is_err());
        assert_eq!(
            mode_of(outside.path()),
            mode,
            "the host directory was chmod-ed"
        );
    }

    #[test]
    fn a_second_copy_cannot_write_through_a_symlink_the_first_planted() {
        let (outside, _) = victim();
        let target = outside.path().to_str().unwrap();
        let dest = tempfile::tempdir().unwrap();
        let first = archive(|b| raw_entry(b, "link", tar::EntryType::Symlink, Some(target)));
        unpack(&first[..], dest.path()).unwrap();
        let second = archive(|b| {
            let mut h = header(tar::EntryType::Directory, 0);
            b.append_data(&mut h, "link", std::io::empty()).unwrap();
            let mut h = header(tar::EntryType::Regular, 5);
            b.append_data(&mut h, "link/pwned", &b"pwned"[..]).unwrap();
        });
        let err = unpack(&second[..], dest.path()).unwrap_err();
        assert!(matches!(err, ArchiveError::Unsafe { .. }), "{err:?}");
        assert!(
            !outside.path().join("pwned").exists(),
            "wrote through the link"
        );
    }

    #[test]
    fn a_single_file_copy_replaces_a_planted_symlink_instead_of_its_target() {
        let (outside, _) = victim();
        let victim_file = outside.path().join("victim");
        std::fs::write(&victim_file, b"precious").unwrap();
        let dest = tempfile::tempdir().unwrap();
        let planted =
            archive(|b| raw_entry(b, "link", tar::EntryType::Symlink, victim_file.to_str()));
        unpack(&planted[..], dest.path()).unwrap();
        let dst = dest.path().join("link");
        save_file(&b"from the guest"[..], &dst).unwrap();
        assert_eq!(std::fs::read(&victim_file).unwrap(), b"precious");
        assert_eq!(std::fs::read(&dst).unwrap(), b"from the guest");
        assert!(!std::fs::symlink_metadata(&dst).unwrap().is_symlink());
    }
}
