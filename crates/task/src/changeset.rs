//! The changeset stream a guest reports, and its validation on the host.
//!
//! Format (manifest first, explicit lengths):
//! `"HUTCHCS1" ‖ u64 LE n ‖ n bytes of JSON manifest ‖ for each `write` entry, in manifest order:
//! u64 LE len ‖ len bytes ‖ "HUTCHEND"`. The manifest is read, counted and sized before a
//! single content byte is looked at; every frame's length must equal its entry's `size` and its
//! bytes must hash to its `sha256`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::{
    baseline::{in_git_dir, sha256_hex, BaseEntry, Baseline},
    glob,
};

/// First bytes of every changeset stream.
pub const MAGIC: &[u8; 8] = b"HUTCHCS1";
/// Last bytes of every changeset stream.
pub const END: &[u8; 8] = b"HUTCHEND";
/// Largest manifest accepted.
pub const MAX_MANIFEST: u64 = 64 << 20;

/// One entry of the guest's manifest, as sent (unchecked).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Entry {
    /// A file added or modified; its contents follow in a frame.
    Write {
        /// Relative path.
        path: String,
        /// Permission bits.
        mode: u32,
        /// Length of the contents.
        size: u64,
        /// SHA-256 of the contents, hex.
        sha256: String,
    },
    /// A symlink added or changed.
    Symlink {
        /// Relative path.
        path: String,
        /// Its target.
        target: String,
    },
    /// A baseline path removed.
    Delete {
        /// Relative path.
        path: String,
    },
    /// A baseline file moved, contents unchanged.
    Rename {
        /// Baseline path.
        from: String,
        /// New path.
        to: String,
        /// Permission bits at the new path.
        mode: u32,
    },
    /// A baseline file whose permission bits changed, contents unchanged.
    Chmod {
        /// Relative path.
        path: String,
        /// New permission bits.
        mode: u32,
    },
    /// Something that cannot be carried (FIFO, device, socket, non-UTF-8 name).
    Special {
        /// Relative path (lossy).
        path: String,
        /// What it is.
        kind: String,
    },
    /// A file over the size limit, reported without its contents.
    Oversize {
        /// Relative path.
        path: String,
        /// Its length.
        size: u64,
    },
    /// An empty directory the baseline lacks (or has as something else).
    Mkdir {
        /// Relative path.
        path: String,
    },
    /// An empty directory of the baseline that is gone.
    Rmdir {
        /// Relative path.
        path: String,
    },
}

/// A change inside `.git`, reported without contents so the host can refuse it by name
/// (nothing inside `.git` is ever carried).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitEntry {
    /// Relative path (starts with `.git/`).
    pub path: String,
    /// What happened to it (`added`, `modified`, `deleted`, …).
    pub change: String,
}

/// Most `.git` changes a manifest may list; the rest are only counted.
pub const MAX_GIT_LISTED: usize = 1000;

/// The manifest: the entries, and how many changes the guest found in all (it stops listing
/// after the count limit); changes inside `.git` are listed apart and do not count.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Changes, at most the count limit plus one.
    pub entries: Vec<Entry>,
    /// All changes found.
    pub total: u64,
    /// Changes inside `.git`, at most [`MAX_GIT_LISTED`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub git: Vec<GitEntry>,
    /// All changes inside `.git` found.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub git_total: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Size and count limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest file.
    pub max_file_bytes: u64,
    /// Most changed paths.
    pub max_files: u64,
    /// Largest sum of file contents.
    pub max_total_bytes: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_file_bytes: 100 << 20,
            max_files: 50_000,
            max_total_bytes: 200 << 20,
        }
    }
}

/// What a changeset may touch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Globs a changed path must match (empty: everything). `.git` is always refused.
    pub allow: Vec<String>,
    /// Limits.
    pub limits: Limits,
}

/// One validated change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    /// New or changed file contents.
    Write {
        /// Relative path.
        path: String,
        /// Permission bits.
        mode: u32,
        /// Length.
        size: u64,
        /// SHA-256, hex.
        sha256: String,
        /// Whether the baseline lacked the path.
        added: bool,
        /// Whether the contents look binary (NUL byte or not UTF-8).
        binary: bool,
        /// The contents (not part of the JSON record).
        #[serde(skip)]
        #[schema(ignore)]
        data: Vec<u8>,
    },
    /// A symlink.
    Symlink {
        /// Relative path.
        path: String,
        /// Target (stays inside the workspace).
        target: String,
    },
    /// A removed path.
    Delete {
        /// Relative path.
        path: String,
    },
    /// A moved file.
    Rename {
        /// Old path.
        from: String,
        /// New path.
        to: String,
        /// Permission bits.
        mode: u32,
    },
    /// New permission bits.
    Chmod {
        /// Relative path.
        path: String,
        /// Permission bits.
        mode: u32,
    },
    /// A new empty directory.
    Mkdir {
        /// Relative path.
        path: String,
    },
    /// A removed empty directory of the baseline.
    Rmdir {
        /// Relative path.
        path: String,
    },
}

impl Change {
    /// The paths this change writes or removes.
    pub fn paths(&self) -> Vec<&str> {
        match self {
            Change::Write { path, .. }
            | Change::Symlink { path, .. }
            | Change::Delete { path }
            | Change::Chmod { path, .. }
            | Change::Mkdir { path }
            | Change::Rmdir { path } => vec![path],
            Change::Rename { from, to, .. } => vec![from, to],
        }
    }

    /// Whether the change is about an empty directory (which git cannot record).
    pub fn is_dir(&self) -> bool {
        matches!(self, Change::Mkdir { .. } | Change::Rmdir { .. })
    }
}

/// A validated changeset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changeset {
    /// The changes, in the guest's order.
    pub changes: Vec<Change>,
    /// Changes the guest made inside `.git` that are reported but never carried, each with
    /// its reason (hooks and config are not here: they reject the whole changeset).
    pub not_carried: Vec<Rejection>,
}

/// Why a changeset (or one of its entries) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RejectKind {
    /// The stream is not a changeset.
    Malformed,
    /// A frame's length differs from its entry's size, or runs past the stream.
    LengthMismatch,
    /// A frame's bytes do not hash to its entry's digest.
    DigestMismatch,
    /// A path that is not relative and normalised.
    BadPath,
    /// A path inside `.git`.
    GitInternals,
    /// A path no `--allow` glob matches.
    NotAllowed,
    /// A symlink whose target leaves the workspace (or enters `.git`).
    SymlinkEscapes,
    /// A path below a symlink.
    ThroughSymlink,
    /// A FIFO, device node, socket or unnameable file.
    Special,
    /// A file over the size limit, or contents over the total limit.
    TooLarge,
    /// More changes than the count limit.
    TooMany,
    /// Permission bits beyond `0o777`.
    BadMode,
    /// A path changed twice.
    Duplicate,
    /// A delete, rename, chmod or rmdir of a path the baseline lacks.
    NotInBaseline,
}

/// One refusal, with its reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Rejection {
    /// Category.
    pub kind: RejectKind,
    /// The path concerned (lossy, shortened), empty for the whole stream.
    pub path: String,
    /// Human-readable reason.
    pub reason: String,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{}: {}", self.path, self.reason)
        }
    }
}

fn reject(kind: RejectKind, path: &str, reason: impl Into<String>) -> Rejection {
    Rejection {
        kind,
        path: path.chars().filter(|c| !c.is_control()).take(200).collect(),
        reason: reason.into(),
    }
}

/// Checks that `path` is relative and normalised: no empty, `.` or `..` component, no NUL,
/// no leading or trailing `/`, at most 4096 bytes and 255 per component.
pub fn check_path(path: &str) -> Result<(), (RejectKind, String)> {
    let bad = |why: &str| Err((RejectKind::BadPath, why.to_string()));
    if path.is_empty() {
        return bad("empty path");
    }
    if path.len() > 4096 {
        return bad("path longer than 4096 bytes");
    }
    if path.contains('\0') {
        return bad("path contains NUL");
    }
    if path.starts_with('/') {
        return bad("absolute path");
    }
    for c in path.split('/') {
        match c {
            "" => return bad("empty path component (`//` or trailing `/`)"),
            "." => return bad("`.` component"),
            ".." => return bad("`..` component escapes the workspace"),
            c if c.len() > 255 => return bad("component longer than 255 bytes"),
            _ => {}
        }
    }
    Ok(())
}

/// Checks a path a change touches: normalised, outside `.git`, allowed.
fn check_touch(path: &str, allow: Option<&glob::AllowList>) -> Result<(), Rejection> {
    check_path(path).map_err(|(k, why)| reject(k, path, why))?;
    if in_git_dir(path) {
        return Err(reject(
            RejectKind::GitInternals,
            path,
            "inside .git (hooks, config and objects are never taken from a guest)",
        ));
    }
    if allow.is_some_and(|a| !a.allows(path)) {
        return Err(reject(
            RejectKind::NotAllowed,
            path,
            "matches no --allow glob",
        ));
    }
    Ok(())
}

/// Most symlinks one target may pass through while it is resolved (Linux's own limit).
const MAX_LINK_HOPS: usize = 40;

/// Every symlink of the workspace as it will be once the changes are applied: the baseline's,
/// less those the changes delete, move or overwrite, plus the changes' own.
fn tree_links<'a>(baseline: &'a Baseline, changes: &'a [Change]) -> BTreeMap<&'a str, &'a str> {
    let mut links: BTreeMap<&str, &str> = baseline
        .entries
        .iter()
        .filter_map(|(p, e)| match e {
            BaseEntry::Symlink { target } => Some((p.as_str(), target.as_str())),
            _ => None,
        })
        .collect();
    for c in changes {
        for p in c.paths() {
            links.remove(p);
        }
    }
    for c in changes {
        if let Change::Symlink { path, target } = c {
            links.insert(path, target);
        }
    }
    links
}

/// Resolves the target of the link at `path` the way the kernel will: component by
/// component from the link's directory, substituting every symlink met on the way (looked up
/// in `links`, the tree as it will be). `Err` says why it leaves the workspace (or enters
/// `.git`); a lexical check alone misses chains such as `b -> ..`, `c -> b/..`.
fn resolve_target(path: &str, target: &str, links: &BTreeMap<&str, &str>) -> Result<(), String> {
    let mut dir: Vec<&str> = path.split('/').collect();
    dir.pop();
    let mut todo: std::collections::VecDeque<&str> = target.split('/').collect();
    let mut hops = 0;
    while let Some(c) = todo.pop_front() {
        match c {
            "" | "." => {}
            ".." => {
                if dir.pop().is_none() {
                    return Err("leaves the workspace".into());
                }
            }
            name => {
                dir.push(name);
                let Some(next) = links.get(dir.join("/").as_str()) else {
                    continue;
                };
                hops += 1;
                if hops > MAX_LINK_HOPS {
                    return Err(format!("passes through more than {MAX_LINK_HOPS} symlinks"));
                }
                if next.starts_with('/') {
                    return Err(format!(
                        "passes through {} to an absolute path",
                        dir.join("/")
                    ));
                }
                dir.pop();
                for part in next.split('/').rev() {
                    todo.push_front(part);
                }
            }
        }
    }
    if dir.contains(&".git") {
        return Err("points into .git".into());
    }
    Ok(())
}

/// Checks a symlink's target: relative, and, resolved through the tree as it will be once
/// applied (`links`), inside the workspace and outside `.git`.
fn check_target(path: &str, target: &str, links: &BTreeMap<&str, &str>) -> Result<(), Rejection> {
    let escapes = |why: &str| {
        reject(
            RejectKind::SymlinkEscapes,
            path,
            format!("target {target:.200?} {why}"),
        )
    };
    if target.is_empty() || target.contains('\0') {
        return Err(escapes("is empty or contains NUL"));
    }
    if target.starts_with('/') {
        return Err(escapes("is absolute"));
    }
    resolve_target(path, target, links).map_err(|why| escapes(&why))
}

/// Refuses every symlink the baseline already had that the changes make leave the workspace
/// (say, `k -> r/..` once a change adds `r -> .`). A baseline link that left it before is the
/// host's own and not the changeset's doing.
fn check_baseline_links(
    baseline: &Baseline,
    links: &BTreeMap<&str, &str>,
    out: &mut Vec<Rejection>,
) {
    let before = tree_links(baseline, &[]);
    for (path, target) in &before {
        if links.get(path) != Some(target) || resolve_target(path, target, &before).is_err() {
            continue;
        }
        if let Err(why) = resolve_target(path, target, links) {
            out.push(reject(
                RejectKind::SymlinkEscapes,
                path,
                format!("existing symlink's target {target:.200?} {why} after the changes"),
            ));
        }
    }
}

fn check_mode(path: &str, mode: u32) -> Result<(), Rejection> {
    if mode & !0o777 != 0 {
        return Err(reject(
            RejectKind::BadMode,
            path,
            format!("mode {mode:o} has bits beyond 0o777 (setuid, setgid, sticky or type)"),
        ));
    }
    Ok(())
}

/// Whether contents look binary: a NUL byte in the first 8000 bytes, or not UTF-8.
pub fn is_binary(data: &[u8]) -> bool {
    data.iter().take(8000).any(|b| *b == 0) || std::str::from_utf8(data).is_err()
}

/// A cursor over the stream that never reads past its end.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64) -> Option<&'a [u8]> {
        if n > self.buf.len() as u64 {
            return None;
        }
        let (head, tail) = self.buf.split_at(n as usize);
        self.buf = tail;
        Some(head)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
}

/// Parses and checks a guest-made changeset stream against the host's baseline. Either every
/// change is acceptable, or the reasons why not (all that were found).
pub fn validate(
    stream: &[u8],
    baseline: &Baseline,
    policy: &Policy,
) -> Result<Changeset, Vec<Rejection>> {
    let limits = policy.limits;
    let mut r = Reader { buf: stream };
    if r.take(MAGIC.len() as u64) != Some(&MAGIC[..]) {
        return Err(vec![reject(
            RejectKind::Malformed,
            "",
            "the stream does not start with the changeset magic",
        )]);
    }
    let n = r
        .u64()
        .ok_or_else(|| vec![reject(RejectKind::Malformed, "", "no manifest length")])?;
    if n > MAX_MANIFEST {
        return Err(vec![reject(
            RejectKind::TooLarge,
            "",
            format!("manifest of {n} bytes is over {MAX_MANIFEST}"),
        )]);
    }
    let json = r.take(n).ok_or_else(|| {
        vec![reject(
            RejectKind::LengthMismatch,
            "",
            format!("manifest claims {n} bytes; the stream is shorter"),
        )]
    })?;
    let manifest: Manifest = serde_json::from_slice(json)
        .map_err(|e| vec![reject(RejectKind::Malformed, "", format!("manifest: {e}"))])?;
    let count = manifest.total.max(manifest.entries.len() as u64);
    if count > limits.max_files {
        return Err(vec![reject(
            RejectKind::TooMany,
            "",
            format!("{count} changed paths; the limit is {}", limits.max_files),
        )]);
    }
    // Sizes first: nothing over a limit is read.
    let mut rejections = Vec::new();
    let mut total = 0u64;
    for e in &manifest.entries {
        let (path, size) = match e {
            Entry::Write { path, size, .. } | Entry::Oversize { path, size } => (path, *size),
            _ => continue,
        };
        total = total.saturating_add(size);
        if size > limits.max_file_bytes || matches!(e, Entry::Oversize { .. }) {
            rejections.push(reject(
                RejectKind::TooLarge,
                path,
                format!("{size} bytes; the limit is {}", limits.max_file_bytes),
            ));
        }
    }
    if total > limits.max_total_bytes {
        rejections.push(reject(
            RejectKind::TooLarge,
            "",
            format!(
                "{total} bytes of contents; the limit is {}",
                limits.max_total_bytes
            ),
        ));
    }
    if !rejections.is_empty() {
        return Err(rejections);
    }
    // Frames.
    let mut data = Vec::new();
    for e in &manifest.entries {
        if let Entry::Write {
            path, size, sha256, ..
        } = e
        {
            let len = r.u64().ok_or_else(|| {
                vec![reject(
                    RejectKind::LengthMismatch,
                    path,
                    "the stream ends before this entry's frame",
                )]
            })?;
            if len != *size {
                return Err(vec![reject(
                    RejectKind::LengthMismatch,
                    path,
                    format!("frame of {len} bytes; the manifest says {size}"),
                )]);
            }
            let bytes = r.take(len).ok_or_else(|| {
                vec![reject(
                    RejectKind::LengthMismatch,
                    path,
                    format!("frame claims {len} bytes; the stream is shorter"),
                )]
            })?;
            if sha256_hex(bytes) != *sha256 {
                return Err(vec![reject(
                    RejectKind::DigestMismatch,
                    path,
                    "contents do not match the manifest's digest",
                )]);
            }
            data.push(bytes.to_vec());
        }
    }
    if r.take(END.len() as u64) != Some(&END[..]) || !r.buf.is_empty() {
        return Err(vec![reject(
            RejectKind::Malformed,
            "",
            "missing end marker, or bytes after it",
        )]);
    }
    let mut data = data.into_iter();
    let mut changes = Vec::new();
    for e in manifest.entries {
        let change = match e {
            Entry::Write {
                path,
                mode,
                size,
                sha256,
            } => {
                let bytes = data.next().expect("one frame per write");
                Change::Write {
                    added: !baseline.entries.contains_key(&path),
                    binary: is_binary(&bytes),
                    path,
                    mode,
                    size,
                    sha256,
                    data: bytes,
                }
            }
            Entry::Symlink { path, target } => Change::Symlink { path, target },
            Entry::Delete { path } => Change::Delete { path },
            Entry::Rename { from, to, mode } => Change::Rename { from, to, mode },
            Entry::Chmod { path, mode } => Change::Chmod { path, mode },
            Entry::Special { path, kind } => {
                rejections.push(reject(
                    RejectKind::Special,
                    &path,
                    format!("{kind:.40}: only regular files and symlinks can be carried"),
                ));
                continue;
            }
            Entry::Mkdir { path } => Change::Mkdir { path },
            Entry::Rmdir { path } => Change::Rmdir { path },
            Entry::Oversize { .. } => unreachable!("refused above"),
        };
        changes.push(change);
    }
    check_changes(&changes, baseline, policy, &mut rejections);
    let not_carried = git_changes(&manifest.git, manifest.git_total, &mut rejections);
    if rejections.is_empty() {
        Ok(Changeset {
            changes,
            not_carried,
        })
    } else {
        rejections.extend(not_carried);
        Err(rejections)
    }
}

/// Whether a change to this `.git` path rejects the whole changeset (it would make git run
/// something, were it ever carried): hooks and config.
fn git_change_is_hostile(path: &str) -> bool {
    path == ".git/config" || path == ".git/hooks" || path.starts_with(".git/hooks/")
}

/// Turns the guest's `.git` changes into rejections: hooks and config into `out` (they reject
/// the changeset), everything else into the returned list (reported, not carried).
fn git_changes(git: &[GitEntry], total: u64, out: &mut Vec<Rejection>) -> Vec<Rejection> {
    let mut not_carried = Vec::new();
    if git.len() > MAX_GIT_LISTED {
        out.push(reject(
            RejectKind::Malformed,
            "",
            format!(
                "{} .git changes listed; at most {MAX_GIT_LISTED} may be",
                git.len()
            ),
        ));
        return not_carried;
    }
    for g in git {
        let change: String = g
            .change
            .chars()
            .filter(|c| c.is_ascii_alphabetic())
            .take(20)
            .collect();
        if let Err((kind, why)) = check_path(&g.path) {
            out.push(reject(kind, &g.path, why));
        } else if !g.path.starts_with(".git/") {
            out.push(reject(
                RejectKind::Malformed,
                &g.path,
                "listed as a .git change but lies outside .git",
            ));
        } else if git_change_is_hostile(&g.path) {
            out.push(reject(
                RejectKind::GitInternals,
                &g.path,
                format!("{change} inside .git: a guest may not change hooks or config"),
            ));
        } else {
            not_carried.push(reject(
                RejectKind::GitInternals,
                &g.path,
                format!("{change} inside .git: git metadata is never carried back (work tree changes are)"),
            ));
        }
    }
    let unlisted = total.saturating_sub(git.len() as u64);
    if unlisted > 0 {
        not_carried.push(reject(
            RejectKind::GitInternals,
            ".git",
            format!("{unlisted} more changes inside .git, not listed and not carried"),
        ));
    }
    not_carried
}

/// Per-change checks: paths, modes, targets, baseline, duplicates, paths through symlinks.
fn check_changes(
    changes: &[Change],
    baseline: &Baseline,
    policy: &Policy,
    out: &mut Vec<Rejection>,
) {
    let mut seen = BTreeSet::new();
    let tree = tree_links(baseline, changes);
    let allow = (!policy.allow.is_empty()).then(|| glob::AllowList::new(&policy.allow));
    let mut links: BTreeSet<&str> = baseline
        .entries
        .iter()
        .filter(|(_, e)| matches!(e, BaseEntry::Symlink { .. }))
        .map(|(p, _)| p.as_str())
        .collect();
    for c in changes {
        if let Change::Symlink { path, .. } = c {
            links.insert(path);
        }
    }
    for c in changes {
        let before = out.len();
        for path in c.paths() {
            if let Err(r) = check_touch(path, allow.as_ref()) {
                out.push(r);
                continue;
            }
            if !seen.insert((path, c.is_dir())) {
                out.push(reject(
                    RejectKind::Duplicate,
                    path,
                    "changed more than once",
                ));
            }
            let mut prefix = String::new();
            for comp in path.split('/') {
                if links.contains(prefix.as_str()) {
                    out.push(reject(
                        RejectKind::ThroughSymlink,
                        path,
                        format!("lies below the symlink {prefix}"),
                    ));
                    break;
                }
                if !prefix.is_empty() {
                    prefix.push('/');
                }
                prefix.push_str(comp);
            }
        }
        if out.len() > before {
            continue;
        }
        let base_file = |p: &str| matches!(baseline.entries.get(p), Some(BaseEntry::File { .. }));
        let base_dir = |p: &str| matches!(baseline.entries.get(p), Some(BaseEntry::Dir));
        let result = match c {
            Change::Write { path, mode, .. } => check_mode(path, *mode),
            Change::Symlink { path, target } => check_target(path, target, &tree),
            Change::Delete { path } if !baseline.entries.contains_key(path) => Err(reject(
                RejectKind::NotInBaseline,
                path,
                "deleted, but the baseline lacks it",
            )),
            Change::Rename { from, .. } if !base_file(from) => Err(reject(
                RejectKind::NotInBaseline,
                from,
                "renamed, but the baseline has no such file",
            )),
            Change::Rename { to, mode, .. } => check_mode(to, *mode),
            Change::Chmod { path, .. } if !base_file(path) => Err(reject(
                RejectKind::NotInBaseline,
                path,
                "mode changed, but the baseline has no such file",
            )),
            Change::Chmod { path, mode } => check_mode(path, *mode),
            Change::Delete { path } if base_dir(path) => Err(reject(
                RejectKind::NotInBaseline,
                path,
                "deleted as a file, but the baseline has an empty directory there",
            )),
            Change::Rmdir { path } if !base_dir(path) => Err(reject(
                RejectKind::NotInBaseline,
                path,
                "directory removed, but the baseline has no such empty directory",
            )),
            Change::Delete { .. } | Change::Mkdir { .. } | Change::Rmdir { .. } => Ok(()),
        };
        if let Err(r) = result {
            out.push(r);
        }
    }
    check_baseline_links(baseline, &tree, out);
}

/// Encodes a manifest and its frames (the guest's side of the format; also how the host
/// stores a validated changeset and hands it to a verify sandbox).
pub fn encode_raw(manifest: &Manifest, frames: &[&[u8]]) -> Vec<u8> {
    let json = serde_json::to_vec(manifest).expect("serializable");
    let mut out = Vec::with_capacity(json.len() + 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for f in frames {
        out.extend_from_slice(&(f.len() as u64).to_le_bytes());
        out.extend_from_slice(f);
    }
    out.extend_from_slice(END);
    out
}

impl Changeset {
    /// The canonical stream of this changeset.
    pub fn encode(&self) -> Vec<u8> {
        let mut frames: Vec<&[u8]> = Vec::new();
        let entries: Vec<Entry> = self
            .changes
            .iter()
            .map(|c| match c {
                Change::Write {
                    path,
                    mode,
                    size,
                    sha256,
                    data,
                    ..
                } => {
                    frames.push(data);
                    Entry::Write {
                        path: path.clone(),
                        mode: *mode,
                        size: *size,
                        sha256: sha256.clone(),
                    }
                }
                Change::Symlink { path, target } => Entry::Symlink {
                    path: path.clone(),
                    target: target.clone(),
                },
                Change::Delete { path } => Entry::Delete { path: path.clone() },
                Change::Rename { from, to, mode } => Entry::Rename {
                    from: from.clone(),
                    to: to.clone(),
                    mode: *mode,
                },
                Change::Chmod { path, mode } => Entry::Chmod {
                    path: path.clone(),
                    mode: *mode,
                },
                Change::Mkdir { path } => Entry::Mkdir { path: path.clone() },
                Change::Rmdir { path } => Entry::Rmdir { path: path.clone() },
            })
            .collect();
        let total = entries.len() as u64;
        let manifest = Manifest {
            entries,
            total,
            ..Manifest::default()
        };
        encode_raw(&manifest, &frames)
    }

    /// Whether there are no changes.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}
