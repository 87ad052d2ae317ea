//! The baseline: what the workspace held when the task started, computed on the host from the
//! tar archive that goes into the guest (never from anything the guest says).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::archive::{self, ArchiveError, Checked, Kind, MAX_WORKSPACE_ENTRIES};

/// One file, symlink or empty directory of the baseline (other directories are implied by
/// their contents).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum BaseEntry {
    /// A regular file.
    File {
        /// Permission bits (`0o777` at most).
        mode: u32,
        /// Length in bytes.
        size: u64,
        /// SHA-256 of the contents, hex.
        sha256: String,
    },
    /// A symbolic link.
    Symlink {
        /// The link's target, as stored.
        target: String,
    },
    /// An empty directory (outside `.git`).
    Dir,
}

/// Every file and symlink of the workspace, `.git` included (watched, so that each change a
/// guest makes there is reported and refused by name), and every empty directory outside
/// `.git`, by relative path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Baseline {
    /// Path → entry.
    pub entries: BTreeMap<String, BaseEntry>,
}

/// SHA-256 of `data`, hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Whether a relative path lies inside `.git` (any component named `.git`).
pub fn in_git_dir(path: &str) -> bool {
    path.split('/').any(|c| c == ".git")
}

/// Visits every entry of a workspace archive (at most [`MAX_WORKSPACE_ENTRIES`]) but its
/// root after [`archive::walk`] has checked it. `f` gets the entry and the contents of
/// regular files.
fn each_entry(
    tar_bytes: &[u8],
    mut f: impl FnMut(&Checked, Option<Vec<u8>>) -> Result<(), ArchiveError>,
) -> Result<(), ArchiveError> {
    archive::walk(tar_bytes, MAX_WORKSPACE_ENTRIES, |entry, contents| {
        if entry.is_root() {
            return Ok(());
        }
        let data = if entry.kind == Kind::File {
            let mut buf = Vec::new();
            contents
                .read_to_end(&mut buf)
                .map_err(ArchiveError::Malformed)?;
            Some(buf)
        } else {
            None
        };
        f(entry, data)
    })?;
    Ok(())
}

impl Baseline {
    /// The baseline of a workspace archive.
    pub fn from_tar(tar_bytes: &[u8]) -> Result<Baseline, ArchiveError> {
        let mut entries = BTreeMap::new();
        let mut parents = BTreeSet::new();
        each_entry(tar_bytes, |entry, data| {
            let path = entry.path.as_str();
            if let Some((parent, _)) = path.rsplit_once('/') {
                parents.insert(parent.to_string());
            }
            let recorded = match (&entry.kind, data) {
                (Kind::Dir, _) if in_git_dir(path) => return Ok(()),
                (Kind::Dir, _) => BaseEntry::Dir,
                (Kind::Symlink(target), _) => BaseEntry::Symlink {
                    target: target.clone(),
                },
                (Kind::File, data) => {
                    let data = data.unwrap_or_default();
                    BaseEntry::File {
                        mode: entry.mode & 0o777,
                        size: data.len() as u64,
                        sha256: sha256_hex(&data),
                    }
                }
            };
            entries.insert(path.to_string(), recorded);
            Ok(())
        })?;
        // Only empty directories are recorded; the others are implied by their contents.
        entries.retain(|p, e| !matches!(e, BaseEntry::Dir) || !parents.contains(p));
        Ok(Baseline { entries })
    }

    /// How many entries lie outside `.git`.
    pub fn workspace_entries(&self) -> usize {
        self.entries.keys().filter(|p| !in_git_dir(p)).count()
    }

    /// SHA-256 of the baseline's canonical JSON: equal workspaces have equal digests.
    pub fn digest(&self) -> String {
        sha256_hex(&serde_json::to_vec(self).expect("serializable"))
    }
}

/// The contents of the regular files named in `wanted` from a (checked) workspace archive.
pub fn tar_files(
    tar_bytes: &[u8],
    wanted: &BTreeSet<String>,
) -> Result<BTreeMap<String, Vec<u8>>, ArchiveError> {
    let mut out = BTreeMap::new();
    each_entry(tar_bytes, |entry, data| {
        if let Some(data) = data.filter(|_| wanted.contains(&entry.path)) {
            out.insert(entry.path.clone(), data);
        }
        Ok(())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, tar::EntryType, &[u8], &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o755);
            h.set_size(data.len() as u64);
            if !link.is_empty() {
                h.set_link_name(link).unwrap();
            }
            let name = h.as_old_mut();
            name.name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn baseline_records_files_links_empty_dirs_and_git() {
        let tar = tar_of(&[
            ("./a.txt", tar::EntryType::Regular, b"hi", ""),
            ("d/", tar::EntryType::Directory, b"", ""),
            ("d/l", tar::EntryType::Symlink, b"", "../a.txt"),
            ("e/", tar::EntryType::Directory, b"", ""),
            (".git/refs/tags/", tar::EntryType::Directory, b"", ""),
            (".git/config", tar::EntryType::Regular, b"x", ""),
        ]);
        let b = Baseline::from_tar(&tar).unwrap();
        let paths: Vec<&str> = b.entries.keys().map(String::as_str).collect();
        assert_eq!(paths, [".git/config", "a.txt", "d/l", "e"]);
        assert_eq!(b.entries["e"], BaseEntry::Dir);
        assert_eq!(b.workspace_entries(), 3);
        assert_eq!(
            b.entries["a.txt"],
            BaseEntry::File {
                mode: 0o755,
                size: 2,
                sha256: sha256_hex(b"hi")
            }
        );
        assert_eq!(
            b.entries["d/l"],
            BaseEntry::Symlink {
                target: "../a.txt".into()
            }
        );
        let wanted = ["a.txt".to_string()].into_iter().collect();
        assert_eq!(tar_files(&tar, &wanted).unwrap()["a.txt"], b"hi");
    }

    #[test]
    fn hostile_archives_are_refused() {
        for bad in [
            tar_of(&[("../x", tar::EntryType::Regular, b"", "")]),
            tar_of(&[("/etc/x", tar::EntryType::Regular, b"", "")]),
            tar_of(&[("f", tar::EntryType::Fifo, b"", "")]),
            tar_of(&[("h", tar::EntryType::Link, b"", "a")]),
            tar_of(&[
                ("l", tar::EntryType::Symlink, b"", "/etc"),
                ("l/passwd", tar::EntryType::Regular, b"x", ""),
            ]),
        ] {
            assert!(Baseline::from_tar(&bad).is_err());
        }
    }
}
