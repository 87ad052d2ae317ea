//! Applying a validated changeset on the host: to a directory (after checking that every path
//! it touches is exactly as in the baseline), or as a commit on a new git branch built with
//! plumbing commands only (no work tree change, no hook, no filter, no fsmonitor). Applying is
//! data only: nothing from the workspace is ever run.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use sha2::{Digest, Sha256};

use crate::{
    baseline::{sha256_hex, BaseEntry, Baseline},
    beneath::{is_symlink_refusal, Beneath, Kind},
    changeset::{Change, Changeset},
};

/// Why a changeset could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A file operation failed.
    #[error("{}", .path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Paths differ from the baseline: the host changed them since the task started.
    #[error("conflicts (the host changed these paths since the task's baseline): {}", .0.join(", "))]
    Conflicts(Vec<String>),
    /// A path would be reached through a host symlink.
    #[error("{0} lies below a symlink on the host")]
    ThroughSymlink(String),
    /// A git command failed.
    #[error("git {what} failed: {stderr}")]
    Git {
        /// Which command.
        what: String,
        /// Its standard error (shortened).
        stderr: String,
    },
    /// git could not be started.
    #[error("cannot run git")]
    GitSpawn(#[source] std::io::Error),
    /// The work tree has uncommitted changes; applying needs a clean one.
    #[error("the work tree is not clean (commit or stash first, or use --branch): {}", .0.join(", "))]
    Dirty(Vec<String>),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ApplyError + '_ {
    move |source| ApplyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a path holds on the host now.
#[derive(Debug, PartialEq, Eq)]
enum Current {
    Absent,
    File { mode: u32, sha256: String },
    Symlink(String),
    Dir { empty: bool },
    Other,
}

/// What `rel` holds beneath `root`, looked at without following any symlink: one among its
/// parents is [`ApplyError::ThroughSymlink`].
fn current(root: &Beneath, rel: &str) -> Result<Current, ApplyError> {
    let path = Path::new(rel);
    let fail = |e: std::io::Error| {
        if is_symlink_refusal(&e) {
            ApplyError::ThroughSymlink(rel.into())
        } else {
            io(path)(e)
        }
    };
    let Some((kind, mode)) = root.kind(path).map_err(fail)? else {
        return Ok(Current::Absent);
    };
    Ok(match kind {
        Kind::Symlink => {
            let t = root.read_link(path).map_err(fail)?;
            Current::Symlink(t.to_string_lossy().into_owned())
        }
        Kind::File => {
            let mut hasher = Sha256::new();
            let mut file = root.open_file(path).map_err(fail)?;
            std::io::copy(&mut file, &mut hasher).map_err(fail)?;
            Current::File {
                mode: mode & 0o777,
                sha256: hex::encode(hasher.finalize()),
            }
        }
        Kind::Dir => Current::Dir {
            empty: root.is_empty_dir(path).map_err(fail)?,
        },
        Kind::Other => Current::Other,
    })
}

fn expected(baseline: &Baseline, rel: &str) -> Current {
    match baseline.entries.get(rel) {
        None => Current::Absent,
        Some(BaseEntry::File { mode, sha256, .. }) => Current::File {
            mode: *mode,
            sha256: sha256.clone(),
        },
        Some(BaseEntry::Symlink { target }) => Current::Symlink(target.clone()),
        Some(BaseEntry::Dir) => Current::Dir { empty: true },
    }
}

/// Whether the host's `now` at a path the change touches is what the change expects: the
/// baseline's state, except that a new empty directory may already exist (or be implied).
fn unchanged(c: &Change, now: &Current, baseline: &Baseline, path: &str) -> bool {
    match c {
        Change::Mkdir { .. }
            if matches!(baseline.entries.get(path), None | Some(BaseEntry::Dir)) =>
        {
            matches!(now, Current::Absent | Current::Dir { .. })
        }
        _ => *now == expected(baseline, path),
    }
}

/// The changes in the order they are applied: deletes, removed directories, renames, writes,
/// symlinks, chmods, new directories.
fn ordered(cs: &Changeset) -> Vec<&Change> {
    let rank = |c: &Change| match c {
        Change::Delete { .. } => 0,
        Change::Rmdir { .. } => 1,
        Change::Rename { .. } => 2,
        Change::Write { .. } => 3,
        Change::Symlink { .. } => 4,
        Change::Chmod { .. } => 5,
        Change::Mkdir { .. } => 6,
    };
    let mut v: Vec<&Change> = cs.changes.iter().collect();
    v.sort_by_key(|c| rank(c));
    v
}

/// The tracked paths `git status` reports as modified, staged, deleted or conflicted in the
/// repository at `repo` (empty for a clean tree). Untracked files do not make a tree dirty
/// (as for `git rebase`); the per-path baseline check still covers any a changeset touches.
pub fn dirty_paths(repo: &Path) -> Result<Vec<String>, ApplyError> {
    let out = git(
        repo,
        None,
        &["status", "--porcelain=v1", "-z", "--untracked-files=no"],
        None,
    )?;
    let mut paths = Vec::new();
    let mut records = out.split(|b| *b == 0).filter(|r| !r.is_empty());
    while let Some(r) = records.next() {
        let path = String::from_utf8_lossy(r.get(3..).unwrap_or_default());
        paths.push(crate::diff::escape_path(&path).into_owned());
        // A rename or copy is followed by its source path.
        if matches!(r.first(), Some(b'R' | b'C')) {
            records.next();
        }
    }
    Ok(paths)
}

/// Applies `cs` to the user's work tree `root` ([`apply_to_dir`]); when `root` is a git work
/// tree it must be clean first ([`dirty_paths`]), so that what the changeset writes is all
/// that `git status` shows afterwards.
pub fn apply_to_work_tree(
    root: &Path,
    cs: &Changeset,
    baseline: &Baseline,
) -> Result<(), ApplyError> {
    if root.join(".git").exists() {
        let dirty = dirty_paths(root)?;
        if !dirty.is_empty() {
            return Err(ApplyError::Dirty(dirty));
        }
    }
    apply_to_dir(root, cs, baseline)
}

/// Applies `cs` to the directory `root`, after checking that every path it touches holds
/// exactly what the baseline recorded (refusing with the list of conflicts otherwise).
///
/// Every read and write is resolved beneath `root` without following a symlink
/// ([`Beneath`]): a host symlink on the way to a touched path is refused, a symlink at a
/// written path is replaced (not written through), modes are set on opened descriptors.
pub fn apply_to_dir(root: &Path, cs: &Changeset, baseline: &Baseline) -> Result<(), ApplyError> {
    let dir = Beneath::open(root).map_err(io(root))?;
    let mut conflicts = Vec::new();
    for c in &cs.changes {
        for p in c.paths() {
            if !unchanged(c, &current(&dir, p)?, baseline, p) {
                conflicts.push(p.to_string());
            }
        }
    }
    if !conflicts.is_empty() {
        return Err(ApplyError::Conflicts(conflicts));
    }
    for c in ordered(cs) {
        apply_one(&dir, c).map_err(|e| match e {
            e if is_symlink_refusal(&e) => ApplyError::ThroughSymlink(c.paths()[0].into()),
            e => io(&root.join(c.paths()[0]))(e),
        })?;
    }
    Ok(())
}

/// Applies one change beneath `dir`.
fn apply_one(dir: &Beneath, c: &Change) -> std::io::Result<()> {
    match c {
        Change::Delete { path } => {
            dir.remove(Path::new(path))?;
            dir.prune(Path::new(path));
        }
        Change::Rename { from, to, mode } => {
            dir.rename(Path::new(from), Path::new(to))?;
            dir.chmod(Path::new(to), *mode)?;
            dir.prune(Path::new(from));
        }
        Change::Write {
            path, mode, data, ..
        } => {
            dir.remove(Path::new(path))?;
            dir.write_file(Path::new(path), *mode, &mut &data[..])?;
        }
        Change::Symlink { path, target } => {
            dir.remove(Path::new(path))?;
            dir.symlink(Path::new(path), Path::new(target))?;
        }
        Change::Chmod { path, mode } => dir.chmod(Path::new(path), *mode)?,
        Change::Rmdir { path } => {
            dir.rmdir(Path::new(path))?;
            dir.prune(Path::new(path));
        }
        Change::Mkdir { path } => drop(dir.dir(Path::new(path), true)?),
    }
    Ok(())
}

/// Runs a git plumbing command in `repo` with hooks and fsmonitor off.
fn git(
    repo: &Path,
    index: Option<&Path>,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> Result<Vec<u8>, ApplyError> {
    let mut cmd = Command::new("git");
    cmd.arg("-C")
        .arg(repo)
        .args([
            "-c",
            "core.hooksPath=/dev/null",
            "-c",
            "core.fsmonitor=false",
        ])
        .args(args)
        .env("GIT_AUTHOR_NAME", "hutch task")
        .env("GIT_AUTHOR_EMAIL", "hutch@localhost")
        .env("GIT_COMMITTER_NAME", "hutch task")
        .env("GIT_COMMITTER_EMAIL", "hutch@localhost")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(i) = index {
        cmd.env("GIT_INDEX_FILE", i);
    }
    let mut child = cmd.spawn().map_err(ApplyError::GitSpawn)?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("piped");
        let input = input.to_vec();
        std::thread::spawn(move || pipe.write_all(&input));
    }
    let out = child.wait_with_output().map_err(ApplyError::GitSpawn)?;
    if !out.status.success() {
        return Err(ApplyError::Git {
            what: args.first().copied().unwrap_or("").to_string(),
            stderr: String::from_utf8_lossy(&out.stderr)
                .chars()
                .take(300)
                .collect(),
        });
    }
    Ok(out.stdout)
}

fn text(b: Vec<u8>) -> String {
    String::from_utf8_lossy(&b).trim().to_string()
}

/// `(mode, object id)` of `path` in `HEAD`, if it is there.
fn head_entry(repo: &Path, path: &str) -> Result<Option<(String, String)>, ApplyError> {
    let out = git(repo, None, &["ls-tree", "-z", "HEAD", "--", path], None)?;
    let line = String::from_utf8_lossy(&out);
    let line = line.trim_end_matches('\0');
    if line.is_empty() {
        return Ok(None);
    }
    let mut meta = line.split('\t').next().unwrap_or("").split(' ');
    match (meta.next(), meta.nth(1)) {
        (Some(mode), Some(oid)) => Ok(Some((mode.to_string(), oid.to_string()))),
        _ => Ok(None),
    }
}

/// Commits `cs` on top of `HEAD` of `repo` as the new branch `branch` (refused if it exists),
/// touching neither the work tree nor the index. Every touched path must be in `HEAD` as in
/// the baseline (git records only the executable bit, so modes compare by it). git records no
/// empty directories, so `mkdir`/`rmdir` changes are not in the commit (see
/// [`Change::is_dir`]). Returns the commit id.
pub fn apply_to_branch(
    repo: &Path,
    branch: &str,
    cs: &Changeset,
    baseline: &Baseline,
    message: &str,
) -> Result<String, ApplyError> {
    git(repo, None, &["check-ref-format", "--branch", branch], None)?;
    let head = text(git(
        repo,
        None,
        &["rev-parse", "--verify", "HEAD^{commit}"],
        None,
    )?);
    let mut conflicts = Vec::new();
    for c in cs.changes.iter().filter(|c| !c.is_dir()) {
        for p in c.paths() {
            let now = head_entry(repo, p)?;
            let same = match (expected(baseline, p), &now) {
                (Current::Absent, None) => true,
                (Current::File { mode, sha256 }, Some((m, oid))) => {
                    let blob = git(repo, None, &["cat-file", "blob", oid], None)?;
                    sha256_hex(&blob) == sha256 && (m == "100755") == (mode & 0o111 != 0)
                }
                (Current::Symlink(t), Some((m, oid))) => {
                    m == "120000"
                        && git(repo, None, &["cat-file", "blob", oid], None)? == t.as_bytes()
                }
                _ => false,
            };
            if !same {
                conflicts.push(p.to_string());
            }
        }
    }
    if !conflicts.is_empty() {
        return Err(ApplyError::Conflicts(conflicts));
    }
    let tmp = tempfile::Builder::new()
        .prefix("hutch-index")
        .tempdir()
        .map_err(io(Path::new("/tmp")))?;
    let index = tmp.path().join("index");
    let idx = Some(index.as_path());
    git(repo, idx, &["read-tree", "HEAD"], None)?;
    // Puts `oid` at `path` with `mode` in the index, replacing whatever was there.
    let stage = |mode: &str, oid: &str, path: &str| {
        let info = format!("{mode},{oid},{path}");
        let args = ["update-index", "--add", "--replace", "--cacheinfo", &info];
        git(repo, idx, &args, None).map(drop)
    };
    // Stores `bytes` as a blob; its id.
    let blob = |bytes: &[u8]| {
        let args = ["hash-object", "-w", "--no-filters", "--stdin"];
        git(repo, None, &args, Some(bytes)).map(text)
    };
    let git_mode = |mode: u32| {
        if mode & 0o111 != 0 {
            "100755"
        } else {
            "100644"
        }
    };
    for c in ordered(cs) {
        match c {
            Change::Delete { path } => {
                git(
                    repo,
                    idx,
                    &["update-index", "--force-remove", "--", path],
                    None,
                )?;
            }
            Change::Rename { from, to, mode } => {
                let (_, oid) = head_entry(repo, from)?
                    .ok_or_else(|| ApplyError::Conflicts(vec![from.clone()]))?;
                git(
                    repo,
                    idx,
                    &["update-index", "--force-remove", "--", from],
                    None,
                )?;
                stage(git_mode(*mode), &oid, to)?;
            }
            Change::Write {
                path, mode, data, ..
            } => stage(git_mode(*mode), &blob(data)?, path)?,
            Change::Symlink { path, target } => stage("120000", &blob(target.as_bytes())?, path)?,
            Change::Chmod { path, mode } => {
                let (_, oid) = head_entry(repo, path)?
                    .ok_or_else(|| ApplyError::Conflicts(vec![path.clone()]))?;
                let info = format!("{},{oid},{path}", git_mode(*mode));
                git(repo, idx, &["update-index", "--cacheinfo", &info], None)?;
            }
            Change::Mkdir { .. } | Change::Rmdir { .. } => {}
        }
    }
    let tree = text(git(repo, idx, &["write-tree"], None)?);
    let commit = text(git(
        repo,
        None,
        &["commit-tree", &tree, "-p", &head, "-m", message],
        None,
    )?);
    let refname = format!("refs/heads/{branch}");
    git(
        repo,
        None,
        &[
            "update-ref",
            "-m",
            "hutch task apply",
            &refname,
            &commit,
            "",
        ],
        None,
    )?;
    Ok(commit)
}
