//! E2B's own Python SDK, unmodified from the registry, against the suite's daemon: the
//! script `e2b_sdk.py` (the README's example) creates a sandbox, runs commands (one
//! streaming in the background, one killed), writes, reads and lists files, sets its
//! timeout, lists and kills it, and is refused with a wrong API key.

use std::process::Command;

use super::{access::token_cmd, suite, Result};

/// The `e2b` release this was written and tested against (README: known to work).
pub(crate) const E2B_VERSION: &str = "2.63.0";

/// Where `scripts/test.sh` installs it: `target/tools/e2b` (a venv), or `$HUTCH_E2B_VENV`.
fn venv() -> std::path::PathBuf {
    std::env::var_os("HUTCH_E2B_VENV").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/tools/e2b"),
        Into::into,
    )
}

pub(crate) fn the_e2b_sdk_runs_unchanged_against_hutch() -> Result {
    let python = venv().join("bin/python");
    if !python.exists() {
        let why = format!(
            "no e2b SDK at {} (scripts/test.sh installs e2b=={E2B_VERSION} there)",
            python.display()
        );
        if std::env::var("HUTCH_REQUIRE_VM_TESTS").as_deref() == Ok("1") {
            return Err(why.into());
        }
        eprintln!("SKIP the_e2b_sdk_runs_unchanged_against_hutch: {why}");
        return Ok(());
    }
    let token = token_cmd(&["create", "--label", "suite=e2b"])?
        .trim()
        .to_string();
    let url = format!("http://{}", suite().daemon.lock().unwrap().e2b);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/daemon/e2b_sdk.py");
    let out = Command::new(&python)
        .arg(&script)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("E2B_API_URL", &url)
        .env("E2B_SANDBOX_URL", &url)
        .env("E2B_API_KEY", &token)
        .output()?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    if !out.status.success() {
        return Err(format!("e2b_sdk.py failed ({}):\n{stdout}\n{stderr}", out.status).into());
    }
    let want = format!("e2b sdk {E2B_VERSION}: ok");
    if stdout.trim() != want {
        return Err(format!("e2b_sdk.py said {stdout:?}, not {want:?} ({stderr})").into());
    }
    Ok(())
}
