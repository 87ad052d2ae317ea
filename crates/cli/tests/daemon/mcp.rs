//! MCP: the official `mcp` Python package (installed by `scripts/test.sh` in
//! `target/tools/mcp`) drives the daemon's MCP server over `hutch mcp` (stdio, the Unix
//! socket) and over Streamable HTTP (TCP with a token), configured by the README's
//! `mcpServers` snippet. The client script (`tests/mcp/mcp_client.py`) says what it checks.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use super::*;

/// The README's MCP client configuration lies between these markers.
const SNIPPET_BEGIN: &str = "<!-- mcp-config:begin -->";
const SNIPPET_END: &str = "<!-- mcp-config:end -->";
/// How long the whole client script may take.
const SCRIPT_DEADLINE: Duration = Duration::from_secs(600);

pub(crate) fn mcp_clients_drive_sandboxes_over_stdio_and_http() -> Result {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = std::env::var_os("HUTCH_MCP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/tools/mcp/bin/python"));
    check(
        python.exists(),
        format!(
            "{} is missing: scripts/test.sh installs the `mcp` package there",
            python.display()
        ),
    )?;
    let config = readme_snippet(&root.join("README.md"))?;
    let work = tempfile::tempdir()?;
    let config_path = work.path().join("mcp.json");
    std::fs::write(&config_path, config)?;

    let (ok, token, err) = cli(&["token", "create"])?;
    check(ok, format!("token create: {err}"))?;
    let (ok, scoped, err) = cli(&["token", "create", "--label", "team=mcp"])?;
    check(ok, format!("token create --label: {err}"))?;
    let addr = suite().daemon.lock().unwrap().tcp.clone();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mcp/mcp_client.py");
    let mut child = Command::new(&python)
        .arg(&script)
        .arg(&config_path)
        .arg(env!("CARGO_BIN_EXE_hutch"))
        .arg(&suite().home)
        .arg(&addr)
        .arg(token.trim())
        .arg(scoped.trim())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let started = Instant::now();
    while child.try_wait()?.is_none() {
        if started.elapsed() > SCRIPT_DEADLINE {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprint!("{stdout}");
    check(
        out.status.success(),
        format!(
            "the MCP client failed ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The JSON between the README's MCP markers (inside its code fence).
fn readme_snippet(readme: &Path) -> Result<String> {
    let text = std::fs::read_to_string(readme)?;
    let start = text
        .find(SNIPPET_BEGIN)
        .ok_or("README has no MCP snippet")?
        + SNIPPET_BEGIN.len();
    let end = start
        + text[start..]
            .find(SNIPPET_END)
            .ok_or("README's MCP snippet is not closed")?;
    let block = &text[start..end];
    let json: String = block
        .lines()
        .filter(|l| !l.trim_start().starts_with("```"))
        .collect::<Vec<_>>()
        .join("\n");
    Ok(json)
}
