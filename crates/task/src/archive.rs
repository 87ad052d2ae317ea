//! Tar archives that cross the trust boundary: one checker for every archive Hutch reads
//! (`hutch cp` both ways, the daemon's archive routes, task workspaces), and writing
//! guest-made archives and files on the host without ever leaving the destination directory.
//!
//! Accepted entries: regular files, directories and symlinks (with a UTF-8 target), at
//! UTF-8 relative paths that [`check_path`] accepts once a leading `./` and a trailing `/`
//! are dropped, never *through* (or over) a symlink that the same archive made, and at most
//! a caller-chosen number of them ([`MAX_COPY_ENTRIES`], [`MAX_WORKSPACE_ENTRIES`]). The
//! archive's root (`.` or `./`) may only be a directory. Refused: absolute paths, `..`, `.`
//! and empty components, names that are not UTF-8, device nodes, FIFOs, hard links, and
//! anything else.

use std::{
    collections::HashSet,
    io::Read,
    path::{Path, PathBuf},
};

use crate::beneath::{is_symlink_refusal, Beneath};
use crate::changeset::check_path;

/// Most entries one archive copied in or out of a sandbox (`hutch cp`, the daemon's archive
/// routes) may hold.
pub const MAX_COPY_ENTRIES: usize = 100_000;

/// Most entries one task workspace archive may hold. Every entry of a workspace is kept in
/// its baseline, so this bounds the baseline's size; it is above what a 256 MiB upload can
/// carry in all but the most degenerate archives (one 512-byte header per entry).
pub const MAX_WORKSPACE_ENTRIES: usize = 500_000;

/// Most characters of a refused entry's path quoted in an error.
const SHOWN_CHARS: usize = 200;

/// Why an archive was refused.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// An entry's path or type is not allowed.
    #[error("archive entry {path:?} refused: {why}")]
    Unsafe {
        /// The entry's path as written in the archive (lossy, shortened).
        path: String,
        /// What is wrong with it.
        why: String,
    },
    /// Too many entries.
    #[error("archive has more than {limit} entries")]
    TooManyEntries {
        /// The cap it went over.
        limit: usize,
    },
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

/// What a checked entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file (its contents follow in the stream).
    File,
    /// A symbolic link, with its target as stored.
    Symlink(String),
}

/// An entry that passed the checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// Normalised relative path (no `./` prefix, no trailing `/`); empty for the root.
    pub path: String,
    /// Permission bits as the header gives them.
    pub mode: u32,
    /// What it is.
    pub kind: Kind,
}

impl Checked {
    /// Whether this is the archive's root directory (`.` or `./`).
    pub fn is_root(&self) -> bool {
        self.path.is_empty()
    }
}

/// Reads every entry of the tar stream `tar`, checks it, and hands it (with its contents
/// still to read) to `each`; refuses the archive at the first entry that breaks a rule, or
/// past `max_entries`. `Ok` is the entry count.
pub fn walk<R: Read>(
    tar: R,
    max_entries: usize,
    mut each: impl FnMut(&Checked, &mut tar::Entry<'_, R>) -> Result<(), ArchiveError>,
) -> Result<usize, ArchiveError> {
    let mut archive = tar::Archive::new(tar);
    let mut symlinks: HashSet<String> = HashSet::new();
    let mut count = 0;
    for entry in archive.entries().map_err(ArchiveError::Malformed)? {
        let mut entry = entry.map_err(ArchiveError::Malformed)?;
        count += 1;
        if count > max_entries {
            return Err(ArchiveError::TooManyEntries { limit: max_entries });
        }
        let checked = check_entry(&entry, &symlinks)?;
        if let Kind::Symlink(_) = checked.kind {
            symlinks.insert(checked.path.clone());
        }
        each(&checked, &mut entry)?;
    }
    Ok(count)
}

/// Checks one entry against every rule, given the symlinks the archive made before it.
fn check_entry<R: Read>(
    entry: &tar::Entry<'_, R>,
    symlinks: &HashSet<String>,
) -> Result<Checked, ArchiveError> {
    let raw = entry.path_bytes();
    let refuse = |why: &str| ArchiveError::Unsafe {
        path: String::from_utf8_lossy(&raw)
            .chars()
            .take(SHOWN_CHARS)
            .collect(),
        why: why.to_string(),
    };
    let path = relative_path(&raw).map_err(|why| refuse(&why))?;
    let header = entry.header();
    let mode = header.mode().map_err(ArchiveError::Malformed)?;
    let kind = header.entry_type();
    if path.is_empty() && !kind.is_dir() {
        return Err(refuse("the archive's root may only be a directory"));
    }
    if ancestors(&path).any(|a| symlinks.contains(a)) {
        return Err(refuse("path goes through a symlink in the archive"));
    }
    // A naive unpacker keeps a symlink where a directory entry follows (and chmods its
    // target): refused here, so no client of a checked archive can be led there.
    if symlinks.contains(&path) {
        return Err(refuse("replaces a symlink the archive made"));
    }
    let kind = if kind.is_dir() {
        Kind::Dir
    } else if kind.is_file() {
        Kind::File
    } else if kind.is_symlink() {
        let target = header
            .link_name_bytes()
            .ok_or_else(|| refuse("symlink without a target"))?;
        let target =
            std::str::from_utf8(&target).map_err(|_| refuse("symlink target is not UTF-8"))?;
        Kind::Symlink(target.to_string())
    } else {
        return Err(refuse("only files, directories and symlinks are allowed"));
    };
    Ok(Checked { path, mode, kind })
}

/// `raw` as a normalised relative path: a leading `./` and a trailing `/` dropped, then
/// held to [`check_path`]; empty for the root (`.` or `./`).
fn relative_path(raw: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(raw).map_err(|_| "path is not UTF-8".to_string())?;
    if matches!(text, "." | "./") {
        return Ok(String::new());
    }
    let path = text.strip_prefix("./").unwrap_or(text);
    // A directory's trailing `/` goes; `/` itself stays, to be refused as absolute.
    let path = path
        .strip_suffix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(path);
    check_path(path).map_err(|(_, why)| why)?;
    Ok(path.to_string())
}

/// The proper ancestors of a normalised relative path, nearest last (`a`, `a/b` for `a/b/c`).
fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/').map(move |(i, _)| &path[..i])
}

/// Checks every entry of a copied tar stream (at most [`MAX_COPY_ENTRIES`]) as it is read;
/// `Ok` (the entry count) means it is safe to unpack anywhere. File contents are skipped,
/// never held. `passed(end)` is called as soon as each entry is judged safe, where `end` is
/// the stream offset its contents (and their padding) end at: every byte before `end`
/// belongs to checked entries, so a caller may pass it on while the next header is still
/// being read.
pub fn check_each(tar: impl Read, mut passed: impl FnMut(u64)) -> Result<usize, ArchiveError> {
    walk(tar, MAX_COPY_ENTRIES, |_, entry| {
        let padded = entry.size().div_ceil(512) * 512;
        passed(entry.raw_file_position() + padded);
        Ok(())
    })
}

/// Unpacks the copied tar stream `tar` into `dest` on the host, checking each entry as it
/// comes (at most [`MAX_COPY_ENTRIES`]).
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
    walk(tar, MAX_COPY_ENTRIES, |entry, data| {
        if entry.is_root() {
            return Ok(());
        }
        let rel = Path::new(&entry.path);
        let done = match &entry.kind {
            Kind::Dir => root.mkdir(rel, entry.mode),
            Kind::File => root.write_file(rel, entry.mode, data).map(drop),
            Kind::Symlink(target) => root.symlink(rel, Path::new(target)),
        };
        done.map_err(|source| match source {
            e if is_symlink_refusal(&e) => ArchiveError::Unsafe {
                path: entry.path.chars().take(SHOWN_CHARS).collect(),
                why: "path goes through a symlink on the host".into(),
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
        raw_bytes_entry(b, path.as_bytes(), kind, link.map(str::as_bytes));
    }

    /// [`raw_entry`] for names that need not be UTF-8.
    fn raw_bytes_entry(
        b: &mut tar::Builder<Vec<u8>>,
        path: &[u8],
        kind: tar::EntryType,
        link: Option<&[u8]>,
    ) {
        let mut h = header(kind, 0);
        h.as_old_mut().name[..path.len()].copy_from_slice(path);
        if let Some(l) = link {
            h.as_old_mut().linkname[..l.len()].copy_from_slice(l);
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
        use tar::EntryType::{Char, Directory, Fifo, Link, Regular, Symlink};
        let long = "x".repeat(256);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("..", archive(|b| raw_entry(b, "../evil", Regular, None))),
            (
                "absolute",
                archive(|b| raw_entry(b, "/etc/passwd", Regular, None)),
            ),
            (
                "absolute root",
                archive(|b| raw_entry(b, "/", Directory, None)),
            ),
            (
                "inner ..",
                archive(|b| raw_entry(b, "a/../../x", Regular, None)),
            ),
            ("device", archive(|b| raw_entry(b, "dev", Char, None))),
            ("fifo", archive(|b| raw_entry(b, "fifo", Fifo, None))),
            (
                "hard link",
                archive(|b| raw_entry(b, "hard", Link, Some("/etc/shadow"))),
            ),
            (
                "through a symlink",
                archive(|b| {
                    raw_entry(b, "out", Symlink, Some("/etc"));
                    raw_entry(b, "out/passwd", Regular, None);
                }),
            ),
            (
                "deep through a symlink",
                archive(|b| {
                    raw_entry(b, "out", Symlink, Some("/etc"));
                    raw_entry(b, "out/ssh/sshd_config", Regular, None);
                }),
            ),
            (
                "over a symlink",
                archive(|b| {
                    raw_entry(b, "d", Symlink, Some("/etc"));
                    raw_entry(b, "d", Directory, None);
                }),
            ),
            (
                "not UTF-8",
                archive(|b| raw_bytes_entry(b, b"bad\xff", Regular, None)),
            ),
            (
                "`.` component",
                archive(|b| raw_entry(b, "a/./b", Regular, None)),
            ),
            (
                "empty component",
                archive(|b| raw_entry(b, "a//b", Regular, None)),
            ),
            (
                "long component",
                archive(|b| {
                    let mut h = header(Regular, 0);
                    b.append_data(&mut h, &long, std::io::empty()).unwrap();
                }),
            ),
            (
                "root as a file",
                archive(|b| raw_entry(b, ".", Regular, None)),
            ),
            (
                "root as a symlink",
                archive(|b| raw_entry(b, "./", Symlink, Some("/"))),
            ),
            (
                "symlink without a target",
                archive(|b| raw_entry(b, "l", Symlink, None)),
            ),
            (
                "symlink target not UTF-8",
                archive(|b| raw_bytes_entry(b, b"l", Symlink, Some(b"\xff"))),
            ),
        ];
        for (case, tar) in &cases {
            let dest = tempfile::tempdir().unwrap();
            if case.starts_with("absolute") {
                let err = check(&tar[..]).unwrap_err().to_string();
                assert!(err.contains("absolute path"), "{case}: {err}");
            }
            assert!(
                matches!(check(&tar[..]), Err(ArchiveError::Unsafe { .. })),
                "case {case:?} passed the check"
            );
            assert!(
                unpack(&tar[..], dest.path()).is_err(),
                "case {case:?} unpacked"
            );
            assert!(!Path::new("/evil").exists());
        }
    }

    #[test]
    fn a_tar_of_a_directory_as_tar_makes_it_passes_with_its_root() {
        let tar = archive(|b| {
            raw_entry(b, "./", tar::EntryType::Directory, None);
            raw_entry(b, "./a/", tar::EntryType::Directory, None);
            raw_entry(b, "./a/f", tar::EntryType::Regular, None);
            raw_entry(b, "./a/l", tar::EntryType::Symlink, Some("f"));
        });
        let mut seen = Vec::new();
        walk(&tar[..], 4, |c, _| {
            seen.push(c.clone());
            Ok(())
        })
        .unwrap();
        let paths: Vec<&str> = seen.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(paths, ["", "a", "a/f", "a/l"]);
        assert!(seen[0].is_root());
        assert_eq!(seen[3].kind, Kind::Symlink("f".into()));
    }

    #[test]
    fn the_entry_cap_counts_every_entry() {
        let tar = archive(|b| {
            for name in ["a", "b", "c"] {
                raw_entry(b, name, tar::EntryType::Regular, None);
            }
        });
        assert_eq!(walk(&tar[..], 3, |_, _| Ok(())).unwrap(), 3);
        assert!(matches!(
            walk(&tar[..], 2, |_, _| Ok(())),
            Err(ArchiveError::TooManyEntries { limit: 2 })
        ));
    }

    #[test]
    fn a_copy_holds_at_most_max_copy_entries() {
        let tar = archive(|b| {
            for i in 0..=MAX_COPY_ENTRIES {
                raw_entry(b, &format!("{i:x}"), tar::EntryType::Regular, None);
            }
        });
        assert!(matches!(
            check(&tar[..]),
            Err(ArchiveError::TooManyEntries {
                limit: MAX_COPY_ENTRIES
            })
        ));
        // The same archive less its last entry (and with its end blocks) passes.
        let mut at_cap = tar[..tar.len() - 1024 - 512].to_vec();
        at_cap.extend([0u8; 1024]);
        assert_eq!(check(&at_cap[..]).unwrap(), MAX_COPY_ENTRIES);
    }

    #[test]
    fn a_header_with_a_garbled_mode_is_malformed() {
        let tar = archive(|b| {
            let mut h = header(tar::EntryType::Regular, 0);
            h.as_old_mut().name[..1].copy_from_slice(b"f");
            h.as_old_mut().mode = *b"zzzzzzz\0";
            h.set_cksum();
            b.append(&h, std::io::empty()).unwrap();
        });
        assert!(matches!(check(&tar[..]), Err(ArchiveError::Malformed(_))));
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
