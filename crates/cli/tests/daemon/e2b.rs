//! E2B's own SDKs, unmodified from their registries, against the suite's daemon. The Python
//! script `e2b_sdk.py` creates a sandbox, runs commands (one streaming in the background,
//! one killed, one fed stdin), writes, reads, lists, makes, moves and removes files, pauses
//! and connects, sets its timeout, lists and kills it, and is refused with a wrong API key;
//! the Node.js script `e2b_sdk.mjs` does the same core with the npm package. The README's
//! E2B examples are these scripts' openings (between their `README:begin`/`end` markers).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use super::{access::token_cmd, suite, Result};

/// The PyPI `e2b` release this was written and tested against (README: known to work).
pub(crate) const E2B_VERSION: &str = "2.63.0";
/// The npm `e2b` release this was written and tested against (README: known to work).
pub(crate) const E2B_NPM_VERSION: &str = "2.51.0";

/// A tool `scripts/test.sh` installs under `target/tools`, or where `env` says.
fn tool(env: &str, default: &str) -> PathBuf {
    std::env::var_os(env).map_or_else(
        || {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/tools")
                .join(default)
        },
        Into::into,
    )
}

fn here(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/daemon")
        .join(file)
}

pub(crate) fn the_e2b_sdk_runs_unchanged_against_hutch() -> Result {
    // `target/tools/e2b` (a venv), or `$HUTCH_E2B_VENV`.
    let python = tool("HUTCH_E2B_VENV", "e2b").join("bin/python");
    let script = here("e2b_sdk.py");
    readme_shows(&script, "```python\n")?;
    let mut cmd = Command::new(&python);
    cmd.arg(&script);
    run_client(
        &python,
        &format!("e2b=={E2B_VERSION}"),
        cmd,
        "suite=e2b",
        &format!("e2b sdk {E2B_VERSION}: ok"),
    )
}

pub(crate) fn the_e2b_npm_sdk_runs_unchanged_against_hutch() -> Result {
    // `target/tools/e2b-npm` (a package directory), or `$HUTCH_E2B_NPM`.
    let dir = tool("HUTCH_E2B_NPM", "e2b-npm");
    let script = here("e2b_sdk.mjs");
    readme_shows(&script, "```js\n")?;
    // An ES module evaluated from the package directory, where `import 'e2b'` resolves.
    let mut cmd = Command::new("node");
    cmd.current_dir(&dir)
        .arg("--input-type=module")
        .arg("--eval")
        .arg(std::fs::read_to_string(&script)?);
    run_client(
        &dir.join("node_modules/e2b/package.json"),
        &format!("e2b@{E2B_NPM_VERSION} (npm)"),
        cmd,
        "suite=e2b-npm",
        &format!("e2b npm {E2B_NPM_VERSION}: ok"),
    )
}

/// Runs an E2B client configured only by E2B's environment variables (a fresh token scoped
/// to `label` as the API key); it must print `want` alone. Without `installed`, the case
/// skips, or fails under `HUTCH_REQUIRE_VM_TESTS=1`.
fn run_client(
    installed: &Path,
    package: &str,
    mut cmd: Command,
    label: &str,
    want: &str,
) -> Result {
    if !installed.exists() {
        let why = format!(
            "no {} (scripts/test.sh installs {package} there)",
            installed.display()
        );
        if std::env::var("HUTCH_REQUIRE_VM_TESTS").as_deref() == Ok("1") {
            return Err(why.into());
        }
        eprintln!("SKIP {package}: {why}");
        return Ok(());
    }
    let token = token_cmd(&["create", "--label", label])?.trim().to_string();
    let url = format!("http://{}", suite().daemon.lock().unwrap().e2b);
    let out = cmd
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("E2B_API_URL", &url)
        .env("E2B_SANDBOX_URL", &url)
        .env("E2B_API_KEY", &token)
        .output()?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    if !out.status.success() {
        return Err(format!(
            "{package} client failed ({}):\n{stdout}\n{stderr}",
            out.status
        )
        .into());
    }
    if stdout.trim() != want {
        return Err(format!("{package} client said {stdout:?}, not {want:?} ({stderr})").into());
    }
    Ok(())
}

/// The README's E2B section shows, in a `fence` block, exactly the opening of `script`
/// (between its `README:begin` and `README:end` lines).
fn readme_shows(script: &Path, fence: &str) -> Result {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))?;
    let section = readme
        .split_once("### E2B SDK\n")
        .ok_or("README has no E2B SDK section")?
        .1;
    let section = section.split("\n## ").next().unwrap_or_default();
    let shown = section
        .split_once(fence)
        .and_then(|(_, rest)| rest.split_once("```"))
        .ok_or_else(|| format!("README's E2B section has no {fence:?} block"))?
        .0;
    let text = std::fs::read_to_string(script)?;
    let opening = text
        .lines()
        .skip_while(|l| !l.ends_with("README:begin"))
        .skip(1)
        .take_while(|l| !l.ends_with("README:end"))
        .map(|l| format!("{l}\n"))
        .collect::<String>();
    if opening.is_empty() || shown != opening {
        return Err(format!(
            "README's E2B {fence:?} block is not {}'s opening:\n{shown}\n---\n{opening}",
            script.display()
        )
        .into());
    }
    Ok(())
}
