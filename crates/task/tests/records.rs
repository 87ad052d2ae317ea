//! The host key, and applying only onto a clean work tree.

use std::os::unix::fs::PermissionsExt;

mod common;
use common::git;

use hutch_task::{
    apply,
    baseline::sha256_hex,
    changeset::{encode_raw, validate, Entry, Manifest},
    sign::{HostKey, KeyError},
    BaseEntry, Baseline, Policy,
};

#[test]
fn the_host_key_is_private_and_kept() {
    let home = tempfile::tempdir().unwrap();
    let path = home.path().join("tasks/host.key");
    let key = HostKey::load_or_create(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let again = HostKey::load_or_create(&path).unwrap();
    assert_eq!(again.public_hex(), key.public_hex());
    // A key others can read is refused.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(matches!(
        HostKey::load_or_create(&path),
        Err(KeyError::Exposed { mode: 0o644, .. })
    ));
}

#[test]
fn applying_to_a_work_tree_needs_a_clean_one() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    git(p, &["init", "-q"]);
    for (f, data) in [("a.txt", "one\n"), ("b.txt", "two\n")] {
        std::fs::write(p.join(f), data).unwrap();
        std::fs::set_permissions(p.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    git(p, &["add", "."]);
    git(p, &["commit", "-qm", "base"]);
    let file = |d: &[u8]| BaseEntry::File {
        mode: 0o644,
        size: d.len() as u64,
        sha256: sha256_hex(d),
    };
    let baseline = Baseline {
        entries: [
            ("a.txt".to_string(), file(b"one\n")),
            ("b.txt".to_string(), file(b"two\n")),
        ]
        .into(),
    };
    let entry = Entry::Write {
        path: "a.txt".into(),
        mode: 0o644,
        size: 4,
        sha256: sha256_hex(b"ONE\n"),
    };
    let manifest = Manifest {
        entries: vec![entry],
        total: 1,
        ..Manifest::default()
    };
    let cs = validate(
        &encode_raw(&manifest, &[b"ONE\n"]),
        &baseline,
        &Policy::default(),
    )
    .unwrap();

    // A change to a path the changeset does not touch still makes the tree dirty.
    std::fs::write(p.join("b.txt"), "edited on the host\n").unwrap();
    let err = apply::apply_to_work_tree(p, &cs, &baseline).unwrap_err();
    assert!(
        matches!(&err, apply::ApplyError::Dirty(paths) if paths == &["b.txt"]),
        "{err}"
    );
    assert!(err.to_string().contains("not clean"), "{err}");
    assert_eq!(std::fs::read(p.join("a.txt")).unwrap(), b"one\n");
    // Untracked files do not count; a clean tree takes the change.
    std::fs::write(p.join("b.txt"), "two\n").unwrap();
    std::fs::write(p.join("untracked.txt"), "u\n").unwrap();
    apply::apply_to_work_tree(p, &cs, &baseline).unwrap();
    assert_eq!(std::fs::read(p.join("a.txt")).unwrap(), b"ONE\n");

    // The allowlist is enforced again at apply time: a stored changeset outside it is refused.
    let narrow = Policy {
        allow: vec!["docs/**".into()],
        ..Policy::default()
    };
    let r = validate(&encode_raw(&manifest, &[b"ONE\n"]), &baseline, &narrow).unwrap_err();
    assert_eq!(r[0].kind, hutch_task::RejectKind::NotAllowed);
}
