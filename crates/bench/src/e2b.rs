//! `hutch-bench e2b`: the round trip of `exec true` through E2B's unmodified Python SDK
//! (`commands.run("true")` against the daemon's `--listen-e2b` API) against the native HTTP
//! API's JSON exec (a bare request on a kept-alive TCP connection with a bearer token), on
//! the same sandbox, interleaved, all from one Python process (`e2b_roundtrip.py`), so both
//! ways pay the same interpreter. E2B's SDK runs a command as `/bin/bash -l -c CMD`; the
//! native API is timed both with `true` itself and with that same guest command, so the
//! ratio to the latter is the surface's own cost.

use std::{path::PathBuf, process::Stdio, time::Duration};

use clap::Args;
use hutch_api::client::Client;
use hutch_daemon::{Home, VmArgs};

use crate::{
    boot::{create_req, hutch_binary, pct, ratio, summary, DaemonChild},
    error::BenchError,
};

/// The measuring half, run with the SDK's Python.
const SCRIPT: &str = include_str!("e2b_roundtrip.py");

/// `hutch-bench e2b`.
#[derive(Debug, Args)]
pub struct BenchE2bArgs {
    /// VM shape of the sandbox.
    #[command(flatten)]
    pub vm: VmArgs,
    /// Round trips per way.
    #[arg(long, default_value_t = 200)]
    pub execs: usize,
    /// A Python with E2B's `e2b` package (`scripts/test.sh` installs the tested version in
    /// `target/tools/e2b`).
    #[arg(
        long,
        env = "HUTCH_E2B_PYTHON",
        default_value = "target/tools/e2b/bin/python"
    )]
    pub python: PathBuf,
}

/// The ways timed, as `e2b_roundtrip.py` names them.
#[derive(Debug, serde::Deserialize)]
struct Samples {
    native: Vec<f64>,
    native_bash: Vec<f64>,
    e2b: Vec<f64>,
}

/// Starts a private daemon with both TCP listeners, creates one sandbox and times the ways.
pub async fn e2b(home: &Home, args: BenchE2bArgs) -> Result<i32, BenchError> {
    if !args.python.exists() {
        return Err(BenchError::Usage(format!(
            "no Python at {} (--python: one with E2B's `e2b` package)",
            args.python.display()
        )));
    }
    let (api, e2b) = (loopback_addr()?, loopback_addr()?);
    let listeners = [
        "--net-spares",
        "0",
        "--listen-tcp",
        &api,
        "--listen-e2b",
        &e2b,
    ];
    let child = DaemonChild::start(home, &args.vm, &listeners).await?;
    let measured = tokio::select! {
        r = measure(&child, &args, &api, &e2b) => r.map(Some),
        _ = hutch_daemon::signal::interrupted() => Ok(None),
    };
    child.stop().await?;
    let Some(samples) = measured? else {
        return Ok(hutch_daemon::signal::INTERRUPTED);
    };
    let sorted = |secs: Vec<f64>| {
        let mut v: Vec<Duration> = secs.into_iter().map(Duration::from_secs_f64).collect();
        v.sort();
        v
    };
    let (native, bash, e2b) = (
        sorted(samples.native),
        sorted(samples.native_bash),
        sorted(samples.e2b),
    );
    println!(
        "exec round trip, {} runs each way, interleaved, same sandbox, one Python process:",
        native.len()
    );
    println!(
        "  HTTP API, `true`:                  {}",
        summary(&mut native.clone())
    );
    println!(
        "  HTTP API, `bash -l -c true`:       {}",
        summary(&mut bash.clone())
    );
    println!(
        "  E2B SDK, commands.run(\"true\"):     {}  (E2B/API same command: p50 {:.2}x, p95 {:.2}x; p50 +{:.2?}; E2B/API `true`: p50 {:.2}x)",
        summary(&mut e2b.clone()),
        ratio(&e2b, &bash, 50),
        ratio(&e2b, &bash, 95),
        pct(&e2b, 50).saturating_sub(pct(&bash, 50)),
        ratio(&e2b, &native, 50),
    );
    Ok(0)
}

/// A free loopback address to listen on.
fn loopback_addr() -> Result<String, BenchError> {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").map_err(BenchError::Io)?;
    Ok(probe.local_addr().map_err(BenchError::Io)?.to_string())
}

async fn measure(
    child: &DaemonChild,
    args: &BenchE2bArgs,
    api: &str,
    e2b: &str,
) -> Result<Samples, BenchError> {
    let token = admin_token(child).await?;
    let client: &Client = &child.client;
    let id = client
        .create(&create_req(&args.vm, args.vm.memory))
        .await?
        .id;
    let url = format!("http://{e2b}");
    let out = tokio::process::Command::new(&args.python)
        .arg("-c")
        .arg(SCRIPT)
        .arg(&id)
        .arg(args.execs.max(1).to_string())
        .env("E2B_API_URL", &url)
        .env("E2B_SANDBOX_URL", &url)
        .env("E2B_API_KEY", &token)
        .env("HUTCH_HOST", format!("http://{api}"))
        .env("HUTCH_TOKEN", &token)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(BenchError::Io)?;
    client.destroy(&id).await?;
    if !out.status.success() {
        return Err(BenchError::Usage(format!(
            "the E2B measurement failed ({})",
            out.status
        )));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        BenchError::Usage(format!(
            "the E2B measurement printed no samples ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        ))
    })
}

/// A new admin token on the child's home (`hutch token create`).
async fn admin_token(child: &DaemonChild) -> Result<String, BenchError> {
    let out = tokio::process::Command::new(hutch_binary().map_err(BenchError::Io)?)
        .args(["token", "create"])
        .env("HUTCH_HOME", &child.dir)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(BenchError::Io)?;
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || token.is_empty() {
        return Err(BenchError::Usage(format!(
            "`hutch token create` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(token)
}
