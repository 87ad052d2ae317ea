//! `hutch mcp`: MCP over stdio (newline-delimited JSON-RPC), for clients that start their
//! servers as processes. It is a bridge, not a server: each message read from stdin is
//! posted to the daemon's `/mcp` endpoint and every message of the answer (progress
//! notifications, then the response) is written to stdout, so the daemon's MCP server is
//! the only implementation and the daemon's access rules apply (the Unix socket: admin;
//! `--host`/`--token`: the token's scope). Requests run concurrently, so a long exec does not
//! hold up the next call, and a request the client cancels is abandoned (the daemon then stops
//! it: an exec is killed); `initialize` is forwarded first, alone, and the protocol version
//! it negotiates is sent with every later message.

use std::{collections::HashMap, sync::Arc};

use hutch_api::client::Client;
use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    sync::mpsc,
    task::{AbortHandle, JoinSet},
};

use crate::error::CliError;

/// JSON-RPC's code for a message that is not JSON.
const PARSE_ERROR: i64 = -32700;
/// JSON-RPC's code (implementation-defined range) for a request the daemon did not answer.
const DAEMON_ERROR: i64 = -32000;

/// Bridges stdin/stdout to the daemon's MCP endpoint until stdin closes and every answer is
/// written.
pub async fn run(client: &Client) -> Result<i32, CliError> {
    let (out, mut lines_out) = mpsc::channel::<Vec<u8>>(64);
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(mut line) = lines_out.recv().await {
            line.push(b'\n');
            stdout.write_all(&line).await?;
            stdout.flush().await?;
        }
        Ok::<_, std::io::Error>(())
    });
    let mut version: Option<Arc<str>> = None;
    let mut inflight = JoinSet::new();
    // Requests in flight by their JSON id, so a client's cancellation can end one.
    let mut calls: HashMap<String, AbortHandle> = HashMap::new();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await.map_err(CliError::Io)? {
        if line.trim().is_empty() {
            continue;
        }
        let message: Value = match serde_json::from_str(&line) {
            Ok(m) => m,
            Err(e) => {
                let _ = out
                    .send(error(&Value::Null, PARSE_ERROR, &e.to_string()))
                    .await;
                continue;
            }
        };
        if message["method"] == "initialize" {
            if let Some(v) = forward(client, &message, None, &out).await {
                version = Some(v.into());
            }
            continue;
        }
        if message["method"] == "notifications/cancelled" {
            // Hanging up on the daemon cancels the request there (an exec is killed).
            if let Some(call) = calls.remove(&message["params"]["requestId"].to_string()) {
                call.abort();
            }
        }
        calls.retain(|_, call| !call.is_finished());
        let key = message["id"].to_string();
        let (client, out, version) = (client.clone(), out.clone(), version.clone());
        let call = inflight.spawn(async move {
            forward(&client, &message, version.as_deref(), &out).await;
        });
        if key != "null" {
            calls.insert(key, call);
        }
    }
    while inflight.join_next().await.is_some() {}
    drop(out);
    writer
        .await
        .map_err(|e| CliError::Io(std::io::Error::other(e)))?
        .map_err(CliError::Io)?;
    Ok(0)
}

/// Posts one message and writes every message of its answer; a request the daemon refused
/// (or could not be reached for) gets a JSON-RPC error naming why. Returns the protocol
/// version if the answer is an `initialize` result.
async fn forward(
    client: &Client,
    message: &Value,
    version: Option<&str>,
    out: &mpsc::Sender<Vec<u8>>,
) -> Option<String> {
    let id = &message["id"];
    let mut negotiated = None;
    let failed = match client.mcp(message, version).await {
        Ok(mut reply) => loop {
            match reply.next().await {
                Some(Ok(message)) => {
                    if let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(&message) {
                        if let Some(v) = m
                            .get("result")
                            .and_then(|r| r.get("protocolVersion"))
                            .and_then(Value::as_str)
                        {
                            negotiated = Some(v.to_string());
                        }
                    }
                    let _ = out.send(message.to_vec()).await;
                }
                Some(Err(e)) => break Some(e),
                None => break None,
            }
        },
        Err(e) => Some(e),
    };
    // Notifications (no id) have nobody to tell.
    if let (Some(e), false) = (failed, id.is_null()) {
        let _ = out
            .send(error(id, DAEMON_ERROR, &crate::error::chain(&e)))
            .await;
    }
    negotiated
}

/// A JSON-RPC error response to `id`.
fn error(id: &Value, code: i64, message: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": { "code": code, "message": message },
    }))
    .expect("serializable")
}
