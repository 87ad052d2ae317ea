//! Helpers shared by the hutch-task integration tests.

// Tests run git synchronously.
#![allow(clippy::disallowed_methods)]

use std::{path::Path, process::Command};

/// Runs git in `dir` (with an identity for commits); panics when it fails; returns stdout.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let o = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=t", "-c", "user.email=t@t"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}
