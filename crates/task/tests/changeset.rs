//! Validation of hostile changeset streams, and applying accepted ones on the host.

use std::{collections::BTreeMap, os::unix::fs::PermissionsExt, path::Path};

mod common;
use common::git;

use hutch_task::{
    apply,
    baseline::sha256_hex,
    changeset::{encode_raw, validate, Entry, Manifest, END, MAGIC},
    BaseEntry, Baseline, Change, Limits, Policy, RejectKind,
};

fn base() -> Baseline {
    let mut entries = BTreeMap::new();
    for (p, data, mode) in [
        ("a.txt", &b"one\n"[..], 0o644),
        ("b.txt", b"two\n", 0o644),
        ("run.sh", b"#!/bin/sh\n", 0o644),
    ] {
        entries.insert(
            p.to_string(),
            BaseEntry::File {
                mode,
                size: data.len() as u64,
                sha256: sha256_hex(data),
            },
        );
    }
    Baseline { entries }
}

fn write(path: &str, data: &[u8]) -> Entry {
    Entry::Write {
        path: path.into(),
        mode: 0o644,
        size: data.len() as u64,
        sha256: sha256_hex(data),
    }
}

fn stream(entries: Vec<Entry>, frames: &[&[u8]]) -> Vec<u8> {
    let total = entries.len() as u64;
    encode_raw(
        &Manifest {
            entries,
            total,
            ..Manifest::default()
        },
        frames,
    )
}

fn kinds(s: &[u8], policy: &Policy) -> Vec<RejectKind> {
    match validate(s, &base(), policy) {
        Ok(cs) => panic!("accepted: {cs:?}"),
        Err(r) => r.into_iter().map(|r| r.kind).collect(),
    }
}

#[test]
fn a_good_changeset_is_accepted_and_round_trips() {
    let s = stream(
        vec![
            write("a.txt", b"ONE\n"),
            write("dir/new.bin", b"\0\x01\x02"),
            Entry::Delete {
                path: "b.txt".into(),
            },
            Entry::Chmod {
                path: "run.sh".into(),
                mode: 0o755,
            },
            Entry::Symlink {
                path: "dir/link".into(),
                target: "../a.txt".into(),
            },
        ],
        &[b"ONE\n", b"\0\x01\x02"],
    );
    let cs = validate(&s, &base(), &Policy::default()).unwrap();
    assert_eq!(cs.changes.len(), 5);
    assert!(matches!(
        &cs.changes[0],
        Change::Write {
            added: false,
            binary: false,
            ..
        }
    ));
    assert!(matches!(
        &cs.changes[1],
        Change::Write {
            added: true,
            binary: true,
            ..
        }
    ));
    assert_eq!(
        validate(&cs.encode(), &base(), &Policy::default()).unwrap(),
        cs
    );
}

#[test]
fn an_empty_changeset_is_not_a_failure() {
    let cs = validate(&stream(vec![], &[]), &base(), &Policy::default()).unwrap();
    assert!(cs.is_empty());
}

#[test]
fn hostile_paths_are_refused_with_reasons() {
    let p = Policy::default();
    let one = |e: Entry| kinds(&stream(vec![e], &[]), &p);
    assert_eq!(
        one(Entry::Symlink {
            path: "x".into(),
            target: "/etc/passwd".into()
        }),
        [RejectKind::SymlinkEscapes]
    );
    assert_eq!(
        one(Entry::Symlink {
            path: "d/x".into(),
            target: "../../etc".into()
        }),
        [RejectKind::SymlinkEscapes]
    );
    assert_eq!(
        one(Entry::Symlink {
            path: "x".into(),
            target: ".git/hooks".into()
        }),
        [RejectKind::SymlinkEscapes]
    );
    assert_eq!(
        one(Entry::Special {
            path: "fifo".into(),
            kind: "FIFO".into()
        }),
        [RejectKind::Special]
    );
    assert_eq!(
        one(Entry::Delete {
            path: "../etc/passwd".into()
        }),
        [RejectKind::BadPath]
    );
    assert_eq!(
        one(Entry::Delete {
            path: "/etc/passwd".into()
        }),
        [RejectKind::BadPath]
    );
    assert_eq!(
        one(Entry::Delete {
            path: "a//b".into()
        }),
        [RejectKind::BadPath]
    );
    assert_eq!(
        one(Entry::Delete {
            path: "./a.txt".into()
        }),
        [RejectKind::BadPath]
    );
    assert_eq!(
        one(Entry::Delete {
            path: "nope".into()
        }),
        [RejectKind::NotInBaseline]
    );
    assert_eq!(
        one(Entry::Chmod {
            path: "a.txt".into(),
            mode: 0o4755
        }),
        [RejectKind::BadMode]
    );
    let hook = kinds(
        &stream(vec![write(".git/hooks/pre-commit", b"x")], &[b"x"]),
        &p,
    );
    assert_eq!(hook, [RejectKind::GitInternals]);
    let nested = kinds(&stream(vec![write("sub/.git/config", b"x")], &[b"x"]), &p);
    assert_eq!(nested, [RejectKind::GitInternals]);
    let through = stream(
        vec![
            Entry::Symlink {
                path: "l".into(),
                target: "d".into(),
            },
            write("l/f", b"x"),
        ],
        &[b"x"],
    );
    assert_eq!(kinds(&through, &p), [RejectKind::ThroughSymlink]);
    let twice = stream(
        vec![
            write("a.txt", b"x"),
            Entry::Delete {
                path: "a.txt".into(),
            },
        ],
        &[b"x"],
    );
    assert_eq!(kinds(&twice, &p), [RejectKind::Duplicate]);
}

fn link(path: &str, target: &str) -> Entry {
    Entry::Symlink {
        path: path.into(),
        target: target.into(),
    }
}

#[test]
fn chained_relative_symlinks_that_leave_the_workspace_are_refused() {
    let p = Policy::default();
    // Each target looks inside on its own; resolved through each other they reach `../victim`.
    let chain = stream(
        vec![
            link("x/b", ".."),
            link("x/c", "b/.."),
            link("x/d", "c/victim"),
        ],
        &[],
    );
    let refused = match validate(&chain, &base(), &p) {
        Ok(cs) => panic!("accepted: {cs:?}"),
        Err(r) => r,
    };
    let escaping: Vec<&str> = refused
        .iter()
        .filter(|r| r.kind == RejectKind::SymlinkEscapes)
        .map(|r| r.path.as_str())
        .collect();
    assert_eq!(escaping, ["x/c", "x/d"], "{refused:?}");
    // A loop is refused, not followed forever; a chain that stays inside is fine.
    assert_eq!(
        kinds(
            &stream(vec![link("l1", "l2/x"), link("l2", "l1/y")], &[]),
            &p
        ),
        [RejectKind::SymlinkEscapes, RejectKind::SymlinkEscapes]
    );
    let inside = stream(vec![link("d/up", ".."), link("d/a", "up/a.txt")], &[]);
    validate(&inside, &base(), &p).unwrap();
}

#[test]
fn a_change_that_makes_an_existing_symlink_escape_is_refused() {
    let mut baseline = base();
    baseline.entries.insert(
        "k".into(),
        BaseEntry::Symlink {
            target: "r/..".into(),
        },
    );
    // `r -> .` is harmless alone, but turns the host's `k -> r/..` into `k -> ..`.
    let refused = validate(
        &stream(vec![link("r", ".")], &[]),
        &baseline,
        &Policy::default(),
    )
    .unwrap_err();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].kind, RejectKind::SymlinkEscapes);
    assert_eq!(refused[0].path, "k");
}

#[test]
fn the_allowlist_limits_what_may_change() {
    let p = Policy {
        allow: vec!["src/**".into()],
        ..Default::default()
    };
    assert!(validate(&stream(vec![write("src/x.rs", b"x")], &[b"x"]), &base(), &p).is_ok());
    assert_eq!(
        kinds(&stream(vec![write("Makefile", b"x")], &[b"x"]), &p),
        [RejectKind::NotAllowed]
    );
}

#[test]
fn limits_are_checked_before_contents_are_read() {
    let limits = Limits {
        max_file_bytes: 4,
        max_files: 2,
        max_total_bytes: 6,
    };
    let p = Policy {
        allow: vec![],
        limits,
    };
    // Oversized: refused even though no frame follows.
    let big = stream(vec![write("big", b"12345")], &[]);
    assert_eq!(kinds(&big, &p), [RejectKind::TooLarge]);
    let reported = stream(
        vec![Entry::Oversize {
            path: "big".into(),
            size: 200 << 20,
        }],
        &[],
    );
    assert_eq!(
        kinds(&reported, &p),
        [RejectKind::TooLarge, RejectKind::TooLarge]
    );
    let total = stream(vec![write("x", b"1234"), write("y", b"1234")], &[]);
    assert_eq!(kinds(&total, &p), [RejectKind::TooLarge]);
    let many = encode_raw(
        &Manifest {
            entries: vec![],
            total: 100_000,
            ..Manifest::default()
        },
        &[],
    );
    assert_eq!(kinds(&many, &p), [RejectKind::TooMany]);
    let listed = stream(
        (0..3)
            .map(|i| Entry::Delete {
                path: format!("f{i}"),
            })
            .collect(),
        &[],
    );
    assert_eq!(kinds(&listed, &p), [RejectKind::TooMany]);
}

#[test]
fn frames_that_lie_are_refused() {
    let p = Policy::default();
    // The frame says 3 bytes, the manifest 4.
    let mut s = stream(vec![write("a.txt", b"abcd")], &[b"abc"]);
    assert_eq!(kinds(&s, &p), [RejectKind::LengthMismatch]);
    // The frame claims more bytes than the stream holds.
    let manifest = serde_json::to_vec(&Manifest {
        entries: vec![write("a.txt", b"abcd")],
        total: 1,
        ..Manifest::default()
    })
    .unwrap();
    s = MAGIC.to_vec();
    s.extend((manifest.len() as u64).to_le_bytes());
    s.extend(&manifest);
    s.extend(4u64.to_le_bytes());
    s.extend(b"ab");
    assert_eq!(kinds(&s, &p), [RejectKind::LengthMismatch]);
    // The manifest claims more bytes than the stream holds.
    let mut lying = MAGIC.to_vec();
    lying.extend(u64::MAX.to_le_bytes());
    assert_eq!(kinds(&lying, &p), [RejectKind::TooLarge]);
    lying = MAGIC.to_vec();
    lying.extend(1000u64.to_le_bytes());
    lying.extend(b"{}");
    assert_eq!(kinds(&lying, &p), [RejectKind::LengthMismatch]);
    // Right length, wrong bytes.
    let forged = stream(vec![write("a.txt", b"abcd")], &[b"abce"]);
    assert_eq!(kinds(&forged, &p), [RejectKind::DigestMismatch]);
    // Trailing bytes, missing end marker, bad magic, bad JSON.
    let mut trailing = stream(vec![], &[]);
    trailing.extend(b"x");
    assert_eq!(kinds(&trailing, &p), [RejectKind::Malformed]);
    let good = stream(vec![], &[]);
    assert_eq!(
        kinds(&good[..good.len() - END.len()], &p),
        [RejectKind::Malformed]
    );
    assert_eq!(kinds(b"NOTHUTCH", &p), [RejectKind::Malformed]);
    let mut junk = MAGIC.to_vec();
    junk.extend(2u64.to_le_bytes());
    junk.extend(b"[]");
    junk.extend(END);
    assert_eq!(kinds(&junk, &p), [RejectKind::Malformed]);
}

fn write_tree(root: &Path) {
    std::fs::write(root.join("a.txt"), "one\n").unwrap();
    std::fs::write(root.join("b.txt"), "two\n").unwrap();
    std::fs::write(root.join("run.sh"), "#!/bin/sh\n").unwrap();
    for f in ["a.txt", "b.txt", "run.sh"] {
        std::fs::set_permissions(root.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
}

#[test]
fn apply_to_a_directory_checks_conflicts_first() {
    let dir = tempfile::tempdir().unwrap();
    write_tree(dir.path());
    let s = stream(
        vec![
            write("a.txt", b"ONE\n"),
            Entry::Delete {
                path: "b.txt".into(),
            },
            Entry::Rename {
                from: "run.sh".into(),
                to: "bin/run.sh".into(),
                mode: 0o755,
            },
            Entry::Symlink {
                path: "bin/a".into(),
                target: "../a.txt".into(),
            },
        ],
        &[b"ONE\n"],
    );
    let cs = validate(&s, &base(), &Policy::default()).unwrap();
    // A host-side edit since the baseline is a conflict; nothing is written.
    std::fs::write(dir.path().join("b.txt"), "changed\n").unwrap();
    let err = apply::apply_to_dir(dir.path(), &cs, &base()).unwrap_err();
    assert!(
        matches!(&err, apply::ApplyError::Conflicts(c) if c == &["b.txt"]),
        "{err}"
    );
    assert_eq!(std::fs::read(dir.path().join("a.txt")).unwrap(), b"one\n");
    std::fs::write(dir.path().join("b.txt"), "two\n").unwrap();
    apply::apply_to_dir(dir.path(), &cs, &base()).unwrap();
    assert_eq!(std::fs::read(dir.path().join("a.txt")).unwrap(), b"ONE\n");
    assert!(!dir.path().join("b.txt").exists());
    assert!(!dir.path().join("run.sh").exists());
    let meta = std::fs::metadata(dir.path().join("bin/run.sh")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o755);
    assert_eq!(
        std::fs::read_link(dir.path().join("bin/a")).unwrap(),
        Path::new("../a.txt")
    );
}

#[test]
fn apply_to_a_branch_leaves_the_work_tree_alone() {
    let dir = tempfile::tempdir().unwrap();
    git(dir.path(), &["init", "-q"]);
    write_tree(dir.path());
    git(dir.path(), &["add", "."]);
    git(dir.path(), &["commit", "-qm", "base"]);
    let s = stream(
        vec![
            write("a.txt", b"ONE\n"),
            Entry::Delete {
                path: "b.txt".into(),
            },
            Entry::Chmod {
                path: "run.sh".into(),
                mode: 0o755,
            },
        ],
        &[b"ONE\n"],
    );
    let cs = validate(&s, &base(), &Policy::default()).unwrap();
    let commit = apply::apply_to_branch(dir.path(), "hutch/t1", &cs, &base(), "task t1").unwrap();
    assert_eq!(git(dir.path(), &["rev-parse", "hutch/t1"]).trim(), commit);
    assert_eq!(git(dir.path(), &["show", "hutch/t1:a.txt"]), "ONE\n");
    assert_eq!(
        git(dir.path(), &["ls-tree", "hutch/t1", "run.sh"])
            .split(' ')
            .next(),
        Some("100755")
    );
    assert!(git(dir.path(), &["ls-tree", "hutch/t1", "b.txt"]).is_empty());
    // The work tree and index are untouched.
    assert_eq!(git(dir.path(), &["status", "--porcelain"]), "");
    assert_eq!(std::fs::read(dir.path().join("a.txt")).unwrap(), b"one\n");
    // The branch exists now: a second apply is refused.
    assert!(apply::apply_to_branch(dir.path(), "hutch/t1", &cs, &base(), "again").is_err());
}

#[test]
fn packing_a_repo_takes_tracked_and_unignored_files_and_git() {
    let dir = tempfile::tempdir().unwrap();
    git(dir.path(), &["init", "-q"]);
    write_tree(dir.path());
    std::fs::write(dir.path().join(".gitignore"), "ignored\n").unwrap();
    std::fs::write(dir.path().join("ignored"), "x").unwrap();
    git(dir.path(), &["add", "a.txt", ".gitignore"]);
    git(dir.path(), &["commit", "-qm", "base"]);
    std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).unwrap();
    let tar = hutch_task::workspace::pack(dir.path()).unwrap();
    let b = Baseline::from_tar(&tar).unwrap();
    // .git is recorded too (so that changes there are named), apart from the work tree.
    assert!(b.entries.contains_key(".git/HEAD"));
    assert_eq!(b.workspace_entries(), 5);
    let names: Vec<&str> = b
        .entries
        .keys()
        .map(String::as_str)
        .filter(|p| !p.starts_with(".git/"))
        .collect();
    assert_eq!(names, [".gitignore", "a.txt", "b.txt", "link", "run.sh"]);
    assert_eq!(
        b.entries["link"],
        BaseEntry::Symlink {
            target: "/etc/passwd".into()
        }
    );
    let mut a = tar::Archive::new(&tar[..]);
    let has_head = a
        .entries()
        .unwrap()
        .any(|e| e.unwrap().path().unwrap() == Path::new(".git/HEAD"));
    assert!(has_head, ".git is carried");
}
