//! The guest helper (`guest.py`, run here with the host's python3 on a temp directory standing
//! in for the guest's `/workspace`) against the host's validation: real frames, real files,
//! full-size hostile cases (a 200 MB file, 100 000 files) under the default limits.

// Tests run the guest helper synchronously.
#![allow(clippy::disallowed_methods)]

use std::{
    collections::BTreeMap,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
    process::Command,
    time::Instant,
};

mod common;
use common::git;

use hutch_task::{
    apply,
    changeset::{validate, Entry, Manifest},
    Baseline, Change, Limits, Policy, RejectKind, GUEST_SCRIPT,
};

/// A workspace packed as the host packs it, unpacked into a "guest" directory, with the
/// baseline the host computes.
struct Guest {
    host: tempfile::TempDir,
    guest: tempfile::TempDir,
    baseline: Baseline,
}

/// A git repository with a few files, unpacked for the guest.
fn setup(git_repo: bool) -> Guest {
    let host = tempfile::tempdir().unwrap();
    let p = host.path();
    std::fs::write(p.join("a.txt"), "one\n").unwrap();
    std::fs::write(p.join("b.txt"), "two\n").unwrap();
    std::fs::create_dir(p.join("sub")).unwrap();
    std::fs::write(p.join("sub/x.txt"), "x\n").unwrap();
    if git_repo {
        git(p, &["init", "-q"]);
        git(p, &["add", "."]);
        git(p, &["commit", "-qm", "base"]);
    } else {
        std::fs::create_dir(p.join("empty")).unwrap();
    }
    let tar = hutch_task::workspace::pack(p).unwrap();
    let baseline = Baseline::from_tar(&tar).unwrap();
    let guest = tempfile::tempdir().unwrap();
    let mut archive = tar::Archive::new(&tar[..]);
    archive.set_preserve_permissions(true);
    archive.unpack(guest.path()).unwrap();
    Guest {
        host,
        guest,
        baseline,
    }
}

/// Runs `guest.py diff` on the guest directory; returns the stream.
fn diff(g: &Guest, limits: Limits) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("task.py");
    let base = dir.path().join("baseline.json");
    std::fs::write(&script, GUEST_SCRIPT).unwrap();
    std::fs::write(&base, serde_json::to_vec(&g.baseline).unwrap()).unwrap();
    let out = Command::new("python3")
        .arg(&script)
        .arg("diff")
        .arg(g.guest.path())
        .arg(&base)
        .arg(limits.max_files.to_string())
        .arg(limits.max_file_bytes.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "guest.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn policy() -> Policy {
    Policy::default()
}

fn reasons(r: &[hutch_task::Rejection]) -> Vec<(RejectKind, String)> {
    r.iter().map(|r| (r.kind, r.path.clone())).collect()
}

#[test]
fn git_changes_are_named_never_carried_and_hooks_reject() {
    let g = setup(true);
    let w = g.guest.path();
    // An agent that uses git: the index, objects and refs change; and it edits a file.
    std::fs::write(w.join("a.txt"), "ONE\n").unwrap();
    git(w, &["add", "a.txt"]);
    git(w, &["commit", "-qm", "agent"]);
    let cs = validate(&diff(&g, Limits::default()), &g.baseline, &policy()).unwrap();
    assert!(
        matches!(&cs.changes[..], [Change::Write { path, .. }] if path == "a.txt"),
        "{:?}",
        cs.changes
    );
    let named: Vec<&str> = cs.not_carried.iter().map(|r| r.path.as_str()).collect();
    for want in [".git/index", ".git/logs/HEAD"] {
        assert!(named.contains(&want), "{want} not reported: {named:?}");
    }
    assert!(cs
        .not_carried
        .iter()
        .all(|r| r.kind == RejectKind::GitInternals && r.reason.contains("never carried")));

    // A hook (or config) rejects the whole changeset, with every .git change listed.
    std::fs::write(w.join(".git/hooks/pre-commit"), "#!/bin/sh\necho pwned\n").unwrap();
    std::fs::write(w.join(".git/config"), "[core]\n\tfsmonitor = evil\n").unwrap();
    let r = validate(&diff(&g, Limits::default()), &g.baseline, &policy()).unwrap_err();
    let got = reasons(&r);
    for want in [".git/hooks/pre-commit", ".git/config", ".git/index"] {
        assert!(
            got.contains(&(RejectKind::GitInternals, want.to_string())),
            "{want} missing from {got:?}"
        );
    }
}

#[test]
fn an_agent_that_only_touches_git_leaves_an_empty_changeset_with_reasons() {
    let g = setup(true);
    std::fs::write(g.guest.path().join(".git/description"), "agent was here\n").unwrap();
    let stream = diff(&g, Limits::default());
    let cs = validate(&stream, &g.baseline, &policy()).unwrap();
    assert!(cs.is_empty());
    assert_eq!(
        reasons(&cs.not_carried),
        [(RejectKind::GitInternals, ".git/description".into())]
    );
    // An empty stream is not a broken one: a cut stream is refused, never read as empty.
    let cut = &stream[..stream.len() - 3];
    assert!(validate(cut, &g.baseline, &policy()).is_err());
}

/// Every file (mode, contents), symlink and empty directory under `root`, `.git` left out.
fn tree(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, rel: &str, out: &mut BTreeMap<String, String>) {
        let dir = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        let mut names: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
        names.sort_by_key(|e| e.file_name());
        if names.is_empty() && !rel.is_empty() {
            out.insert(rel.to_string(), "empty dir".into());
        }
        for e in names {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == ".git" {
                continue;
            }
            let p = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let m = std::fs::symlink_metadata(root.join(&p)).unwrap();
            if m.is_dir() {
                walk(root, &p, out);
            } else if m.file_type().is_symlink() {
                let t = std::fs::read_link(root.join(&p)).unwrap();
                out.insert(p, format!("link {}", t.display()));
            } else {
                let data = std::fs::read(root.join(&p)).unwrap();
                out.insert(p, format!("{:o} {data:?}", m.mode() & 0o777));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, "", &mut out);
    out
}

#[test]
fn empty_directories_are_carried_both_ways() {
    let g = setup(false);
    let w = g.guest.path();
    assert_eq!(
        g.baseline.entries.get("empty"),
        Some(&hutch_task::BaseEntry::Dir)
    );
    std::fs::remove_dir(w.join("empty")).unwrap();
    std::fs::create_dir_all(w.join("new/deeper")).unwrap();
    std::fs::remove_file(w.join("sub/x.txt")).unwrap(); // leaves sub/ empty
    std::fs::set_permissions(w.join("b.txt"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cs = validate(&diff(&g, Limits::default()), &g.baseline, &policy()).unwrap();
    let mut seen: Vec<String> = cs
        .changes
        .iter()
        .map(|c| {
            format!("{c:?}")
                .split(['{', ' '])
                .next()
                .unwrap()
                .to_string()
                + " "
                + c.paths()[0]
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            "Chmod b.txt",
            "Delete sub/x.txt",
            "Mkdir new/deeper",
            "Mkdir sub",
            "Rmdir empty"
        ]
    );
    // Applied on the host, the tree is the guest's.
    apply::apply_to_dir(g.host.path(), &cs, &g.baseline).unwrap();
    assert_eq!(tree(g.host.path()), tree(w));
    let d = hutch_task::diff::unified(&cs, &BTreeMap::new(), &BTreeMap::new());
    assert!(d.contains("new empty directory new/deeper/\n"), "{d}");
    assert!(d.contains("removed empty directory empty/\n"), "{d}");
}

#[test]
fn a_200_mb_file_is_refused_unread_under_the_default_limits() {
    let g = setup(true);
    let f = std::fs::File::create(g.guest.path().join("big.bin")).unwrap();
    f.set_len(200 << 20).unwrap();
    drop(f);
    let t = Instant::now();
    let stream = diff(&g, Limits::default());
    let r = validate(&stream, &g.baseline, &policy()).unwrap_err();
    assert_eq!(reasons(&r), [(RejectKind::TooLarge, "big.bin".into())]);
    assert!(stream.len() < 4096, "the contents were not sent");

    // A stream that does carry the 200 MB frame is refused from its manifest alone.
    let data = vec![7u8; 200 << 20];
    let entry = Entry::Write {
        path: "big.bin".into(),
        mode: 0o644,
        size: data.len() as u64,
        sha256: hutch_task::baseline::sha256_hex(&data),
    };
    let manifest = Manifest {
        entries: vec![entry],
        total: 1,
        ..Manifest::default()
    };
    let full = hutch_task::changeset::encode_raw(&manifest, &[&data]);
    let v = Instant::now();
    let r = validate(&full, &g.baseline, &policy()).unwrap_err();
    assert_eq!(r[0].kind, RejectKind::TooLarge);
    assert!(
        v.elapsed().as_millis() < 500,
        "validation read the contents: {:?}",
        v.elapsed()
    );
    eprintln!("200 MB case: {:?}", t.elapsed());
}

#[test]
fn a_hundred_thousand_files_are_refused_under_the_default_limits() {
    let g = setup(true);
    let dir = g.guest.path().join("many");
    std::fs::create_dir(&dir).unwrap();
    for i in 0..100_000 {
        std::fs::write(dir.join(format!("f{i}")), b"x").unwrap();
    }
    let t = Instant::now();
    let stream = diff(&g, Limits::default());
    let r = validate(&stream, &g.baseline, &policy()).unwrap_err();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].kind, RejectKind::TooMany);
    assert!(
        r[0].reason.contains("100000 changed paths"),
        "{}",
        r[0].reason
    );
    // The guest stops listing after the limit: the manifest holds at most limit + 1 entries.
    let n = u64::from_le_bytes(stream[8..16].try_into().unwrap()) as usize;
    let m: Manifest = serde_json::from_slice(&stream[16..16 + n]).unwrap();
    assert_eq!(m.entries.len() as u64, Limits::default().max_files + 1);
    eprintln!("100 000 files case: {:?}", t.elapsed());
}
