//! `hutch-bench mcp`: the round trip of `exec true` through the daemon's MCP server
//! (`tools/call exec` posted to `/mcp`) against the native HTTP API's JSON exec, on the same
//! sandbox, interleaved, both over the Unix socket with a connection per call.

use clap::Args;
use hutch_api::client::Client;
use hutch_daemon::{Home, VmArgs};
use serde_json::{json, Value};

use crate::{
    boot::{create_req, json_true, pct, ratio, summary, timed, unexpected, DaemonChild},
    error::BenchError,
};

/// The protocol version the benchmark's calls name (the initialize-era one most clients use).
const PROTOCOL_VERSION: &str = "2025-11-25";

/// `hutch-bench mcp`.
#[derive(Debug, Args)]
pub struct BenchMcpArgs {
    /// VM shape of the sandbox.
    #[command(flatten)]
    pub vm: VmArgs,
    /// Round trips per way.
    #[arg(long, default_value_t = 200)]
    pub execs: usize,
}

/// Starts a private daemon, creates one sandbox and times both ways.
pub async fn mcp(home: &Home, args: BenchMcpArgs) -> Result<i32, BenchError> {
    let child = DaemonChild::start(home, &args.vm, &["--net-spares", "0"]).await?;
    let measured = tokio::select! {
        r = measure(&child.client, &args) => r.map(Some),
        _ = hutch_daemon::signal::interrupted() => Ok(None),
    };
    child.stop().await?;
    let Some((mut native, mut mcp)) = measured? else {
        return Ok(hutch_daemon::signal::INTERRUPTED);
    };
    native.sort();
    mcp.sort();
    println!(
        "exec round trip of `true`, {} runs each way, interleaved, same sandbox:",
        native.len()
    );
    println!("  HTTP API (JSON exec):   {}", summary(&mut native.clone()));
    println!(
        "  MCP (tools/call exec):  {}  (MCP/API: p50 {:.2}x, p95 {:.2}x; p50 +{:.2?})",
        summary(&mut mcp.clone()),
        ratio(&mcp, &native, 50),
        ratio(&mcp, &native, 95),
        pct(&mcp, 50).saturating_sub(pct(&native, 50)),
    );
    Ok(0)
}

async fn measure(
    client: &Client,
    args: &BenchMcpArgs,
) -> Result<(Vec<std::time::Duration>, Vec<std::time::Duration>), BenchError> {
    let id = client
        .create(&create_req(&args.vm, args.vm.memory))
        .await?
        .id;
    // One untimed round first: connections, page cache, the guest's first fork.
    json_true(client, &id).await?;
    mcp_true(client, &id).await?;
    let (mut native, mut mcp) = (Vec::new(), Vec::new());
    for _ in 0..args.execs.max(1) {
        native.push(timed(json_true(client, &id)).await?);
        mcp.push(timed(mcp_true(client, &id)).await?);
    }
    client.destroy(&id).await?;
    Ok((native, mcp))
}

/// `exec true` as an MCP tool call; its exit code must be 0.
async fn mcp_true(client: &Client, id: &str) -> Result<(), BenchError> {
    let call = json!({
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": { "name": "exec", "arguments": { "sandbox_id": id, "argv": ["true"] } },
    });
    let mut reply = client.mcp(&call, Some(PROTOCOL_VERSION)).await?;
    while let Some(message) = reply.next().await {
        let message: Value = serde_json::from_slice(&message?)
            .map_err(|e| unexpected(format!("MCP answer is not JSON: {e}")))?;
        if message.get("id").is_none() {
            continue;
        }
        let result = &message["result"];
        return match (
            &result["isError"],
            &result["structuredContent"]["exit_code"],
        ) {
            (Value::Bool(false), Value::Number(code)) if code.as_i64() == Some(0) => Ok(()),
            _ => Err(unexpected(format!("`true` over MCP ended with {message}"))),
        };
    }
    Err(unexpected("the MCP answer had no response".into()))
}
