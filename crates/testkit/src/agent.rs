//! Finding the `hutch-agent` binary [`crate::FakeVmm`] runs.
//!
//! Only the agent's own tests get its path from Cargo (`CARGO_BIN_EXE_hutch-agent`); other
//! crates' tests do not, and `cargo test -p hutch-core` does not even build it. So the first
//! [`agent_binary`] call in a test process builds it with Cargo (`cargo build -p hutch-agent`,
//! the test executable's profile, the same target directory): a no-op when it is fresh (as
//! after `cargo test --workspace`, which builds every binary first), and never a stale agent
//! speaking an older protocol. Set [`AGENT_ENV`] to use a given binary instead (e.g. where no
//! Cargo is at hand when tests run).

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

/// Environment variable naming the agent binary to run instead of building one.
pub const AGENT_ENV: &str = "HUTCH_AGENT_BIN";

/// The `hutch-agent` binary: [`AGENT_ENV`] if set, otherwise built by Cargo into the target
/// directory of the running test executable (once per process). Panics, saying why, when
/// there is none: this is for tests.
pub fn agent_binary() -> PathBuf {
    static AGENT: OnceLock<PathBuf> = OnceLock::new();
    AGENT
        .get_or_init(|| match std::env::var_os(AGENT_ENV) {
            Some(path) => PathBuf::from(path),
            None => build().unwrap_or_else(|why| panic!("no hutch-agent binary: {why}")),
        })
        .clone()
}

/// Builds the agent for the profile of the running test executable (`<target>/<profile>/deps/
/// <test>`) and returns `<target>/<profile>/hutch-agent`.
// A one-time build per test process, before any fake VM starts.
#[allow(clippy::disallowed_methods)]
fn build() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let profile_dir = exe
        .parent()
        .filter(|deps| deps.file_name().is_some_and(|n| n == "deps"))
        .and_then(Path::parent)
        .ok_or_else(|| {
            format!(
                "{} is not in a Cargo target directory; set {AGENT_ENV}",
                exe.display()
            )
        })?;
    let agent = profile_dir.join("hutch-agent");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(other) => other,
        None => return Err(format!("no profile in {}", profile_dir.display())),
    };
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .args([
            "build",
            "--quiet",
            "-p",
            "hutch-agent",
            "--bin",
            "hutch-agent",
        ])
        .args(["--profile", profile])
        .arg("--manifest-path")
        .arg(&workspace)
        .status();
    match status {
        Ok(s) if s.success() && agent.exists() => Ok(agent),
        Ok(s) if s.success() => Err(format!(
            "cargo built hutch-agent, but not as {} (another --target?); set {AGENT_ENV}",
            agent.display()
        )),
        Ok(s) => Err(format!("cargo build -p hutch-agent failed ({s})")),
        // No Cargo here: an agent built beforehand will do.
        Err(_) if agent.exists() => Ok(agent),
        Err(e) => Err(format!(
            "cannot run {}: {e}; set {AGENT_ENV}",
            Path::new(&cargo).display()
        )),
    }
}
