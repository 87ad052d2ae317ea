//! The baseline: what the workspace held when the task started, computed on the host from the
//! tar archive that goes into the guest (never from anything the guest says).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::changeset::check_path;

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

/// Why a workspace archive was refused.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The archive could not be read.
    #[error("the workspace archive is unreadable")]
    Read(#[source] std::io::Error),
    /// An entry is not allowed in a workspace archive.
    #[error("workspace archive entry {path:?}: {reason}")]
    Entry {
        /// The entry's path (lossy).
        path: String,
        /// Why.
        reason: String,
    },
}

/// SHA-256 of `data`, hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Whether a relative path lies inside `.git` (any component named `.git`).
pub fn in_git_dir(path: &str) -> bool {
    path.split('/').any(|c| c == ".git")
}

/// Visits every entry of a workspace archive after checking it: relative, normalised paths,
/// only directories, regular files and symlinks, no entry below a symlink the archive made.
/// `f` gets the normalised path, the header and the contents of regular files.
fn each_entry(
    tar_bytes: &[u8],
    mut f: impl FnMut(&str, &tar::Header, Option<Vec<u8>>) -> Result<(), ArchiveError>,
) -> Result<(), ArchiveError> {
    let mut archive = tar::Archive::new(tar_bytes);
    let mut links = BTreeSet::new();
    for entry in archive.entries().map_err(ArchiveError::Read)? {
        let mut entry = entry.map_err(ArchiveError::Read)?;
        let raw = entry.path_bytes().into_owned();
        let lossy = String::from_utf8_lossy(&raw).into_owned();
        let bad = |reason: &str| ArchiveError::Entry {
            path: lossy.chars().take(200).collect(),
            reason: reason.into(),
        };
        let text = std::str::from_utf8(&raw).map_err(|_| bad("not UTF-8"))?;
        let trimmed = text
            .strip_prefix("./")
            .unwrap_or(text)
            .trim_end_matches('/');
        if trimmed.is_empty() || trimmed == "." {
            continue;
        }
        check_path(trimmed).map_err(|(_, why)| bad(&why))?;
        let mut prefix = String::new();
        for c in trimmed.split('/') {
            if !prefix.is_empty() && links.contains(&prefix) {
                return Err(bad("lies below a symlink"));
            }
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(c);
        }
        let kind = entry.header().entry_type();
        let data = if kind.is_file() {
            let mut buf = Vec::new();
            entry.read_to_end(&mut buf).map_err(ArchiveError::Read)?;
            Some(buf)
        } else if kind.is_symlink() {
            links.insert(trimmed.to_string());
            None
        } else if kind.is_dir() {
            None
        } else {
            return Err(bad(
                "only files, directories and symlinks may be in a workspace",
            ));
        };
        f(trimmed, entry.header(), data)?;
    }
    Ok(())
}

impl Baseline {
    /// The baseline of a workspace archive.
    pub fn from_tar(tar_bytes: &[u8]) -> Result<Baseline, ArchiveError> {
        let mut entries = BTreeMap::new();
        let mut parents = BTreeSet::new();
        each_entry(tar_bytes, |path, header, data| {
            if let Some((parent, _)) = path.rsplit_once('/') {
                parents.insert(parent.to_string());
            }
            if header.entry_type().is_dir() {
                if !in_git_dir(path) {
                    entries.insert(path.to_string(), BaseEntry::Dir);
                }
                return Ok(());
            }
            let mode = header.mode().unwrap_or(0o644) & 0o777;
            if let Some(data) = data {
                entries.insert(
                    path.to_string(),
                    BaseEntry::File {
                        mode,
                        size: data.len() as u64,
                        sha256: sha256_hex(&data),
                    },
                );
            } else if header.entry_type().is_symlink() {
                let target = header
                    .link_name_bytes()
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                entries.insert(path.to_string(), BaseEntry::Symlink { target });
            }
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
    each_entry(tar_bytes, |path, _, data| {
        if let Some(data) = data.filter(|_| wanted.contains(path)) {
            out.insert(path.to_string(), data);
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
