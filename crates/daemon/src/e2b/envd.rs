//! What E2B's SDK asks of envd, the service inside an E2B sandbox: processes over
//! Connect-RPC (`process.Process/*`), the filesystem over Connect-RPC
//! (`filesystem.Filesystem/*`, in [`super::fs`]), and files over plain HTTP (`/files`).
//! The sandbox is the one the `E2b-Sandbox-Id` header names.
//!
//! Processes run as root in the guest (the user the SDK names is not switched to); a
//! process's pid is its guest pid. Its output streams while it runs, with keepalives when
//! it is quiet; a client that hangs up kills it, as dropping any Hutch exec does.
//! `Connect` (re-attaching to a process's output), PTYs, `StreamInput` and `Update` are
//! refused as unsupported.

use std::{collections::BTreeMap, convert::Infallible, sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    extract::{FromRequest, Query, Request, State},
    http::{header, HeaderMap, StatusCode},
    response::Response,
    routing::{get, post},
    Extension, Json, Router,
};
use base64::{engine::general_purpose::STANDARD as B64, Engine};
use hutch_core::{exec::split_status, service::Command};
use hutch_protocol::{host::ExecEvent, ExitInfo};
use hutch_types::SandboxId;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{connect, fs, CallerExt, E2bError, E2bState, Process, Result};

type AppState = State<Arc<E2bState>>;

/// The envd routes.
pub fn routes() -> Router<Arc<E2bState>> {
    Router::new()
        .route("/health", get(|| async { StatusCode::NO_CONTENT }))
        .route("/files", get(read_file).post(write_files))
        .route("/process.Process/Start", post(start))
        .route("/process.Process/List", post(list))
        .route("/process.Process/SendSignal", post(send_signal))
        .route("/process.Process/SendInput", post(send_input))
        .route("/process.Process/CloseStdin", post(close_stdin))
        .merge(fs::routes())
}

/// The sandbox an envd request is for: its `E2b-Sandbox-Id` header.
pub(super) fn sandbox_of(headers: &HeaderMap) -> Result<SandboxId> {
    let raw = headers
        .get("e2b-sandbox-id")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            E2bError::bad_request(
                "the E2b-Sandbox-Id header is required (set E2B_SANDBOX_URL to this daemon)",
            )
        })?;
    Ok(crate::extract::sandbox_id(raw)?)
}

/// Home of the guest user every E2B call runs as (root): where relative paths start.
const HOME: &str = "/root";

/// A guest path as E2B means it: relative paths (and `~/…`) start at the user's home.
pub(super) fn guest_path(path: &str) -> String {
    if path.starts_with('/') {
        path.to_string()
    } else {
        let rest = path.strip_prefix("~/").unwrap_or(path);
        let rest = if rest == "~" { "" } else { rest };
        format!("{HOME}/{rest}")
    }
}

/// `?path=…[&username=…]` (the user is not switched to).
#[derive(Debug, Deserialize)]
struct FileQuery {
    path: Option<String>,
}

async fn read_file(
    State(state): AppState,
    Extension(caller): CallerExt,
    headers: HeaderMap,
    Query(q): Query<FileQuery>,
) -> Result<Response> {
    let id = sandbox_of(&headers)?;
    let path = guest_path(
        q.path
            .as_deref()
            .ok_or_else(|| E2bError::bad_request("path is required"))?,
    );
    Ok(
        crate::files::streamed("application/octet-stream", |sink| async move {
            Ok(state.app.api.read_file(&caller, &id, &path, sink).await?)
        })
        .await?,
    )
}

/// What `/files` answers for each file written.
#[derive(Debug, Serialize)]
struct WriteInfo {
    name: String,
    r#type: &'static str,
    path: String,
}

impl WriteInfo {
    fn of(path: &str) -> WriteInfo {
        WriteInfo {
            name: path.rsplit('/').next().unwrap_or_default().to_string(),
            r#type: "file",
            path: path.to_string(),
        }
    }
}

/// Permission bits of a file written through `/files`.
const FILE_MODE: u32 = 0o644;

/// Writes one file (`application/octet-stream`, to `?path`) or several (a multipart form
/// whose parts' file names are their paths; with one part, `?path` wins).
async fn write_files(
    State(state): AppState,
    Extension(caller): CallerExt,
    Query(q): Query<FileQuery>,
    req: Request,
) -> Result<Json<Vec<WriteInfo>>> {
    let id = sandbox_of(req.headers())?;
    if req.headers().contains_key(header::CONTENT_ENCODING) {
        return Err(E2bError::unsupported("a compressed upload"));
    }
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let api = &state.app.api;
    if !content_type.starts_with("multipart/form-data") {
        let path = guest_path(
            q.path
                .as_deref()
                .ok_or_else(|| E2bError::bad_request("path is required"))?,
        );
        let body = crate::files::upload(req.into_body());
        api.write_file(&caller, &id, &path, FILE_MODE, body).await?;
        return Ok(Json(vec![WriteInfo::of(&path)]));
    }
    let mut form = axum::extract::Multipart::from_request(req, &())
        .await
        .map_err(|e| E2bError::bad_request(e.body_text()))?;
    let mut written = Vec::new();
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| E2bError::bad_request(e.body_text()))?
    {
        let named = field.file_name().map(String::from);
        let path = match (&q.path, named) {
            (Some(p), _) if written.is_empty() => p.clone(),
            (_, Some(n)) => n,
            (_, None) => return Err(E2bError::bad_request("a file part without a name")),
        };
        let path = guest_path(&path);
        // The body limit bounds a part; a part is taken whole, then streamed to the guest.
        let data = field
            .bytes()
            .await
            .map_err(|e| E2bError::bad_request(e.body_text()))?;
        let body = Box::pin(futures::stream::once(async move { Ok(data) }));
        api.write_file(&caller, &id, &path, FILE_MODE, body).await?;
        written.push(WriteInfo::of(&path));
    }
    Ok(Json(written))
}

/// `process.ProcessConfig`.
#[derive(Debug, Clone, Deserialize, Serialize)]
struct ProcessConfig {
    cmd: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    envs: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cwd: Option<String>,
}

/// `process.StartRequest`.
#[derive(Debug, Deserialize)]
struct StartRequest {
    process: ProcessConfig,
    pty: Option<Value>,
    tag: Option<String>,
    stdin: Option<bool>,
}

/// How often a quiet process's stream gets a keepalive when the client names none.
const KEEPALIVE_SECS: u64 = 50;

async fn start(
    State(state): AppState,
    Extension(caller): CallerExt,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response> {
    let id = sandbox_of(&headers)?;
    let req: StartRequest = connect::unwrap_request(&body)?;
    if req.pty.as_ref().is_some_and(|p| !p.is_null()) {
        return Err(E2bError::unsupported("a PTY process"));
    }
    if req.tag.is_some() {
        return Err(E2bError::unsupported("a process tag"));
    }
    let config = req.process;
    let command = Command {
        argv: std::iter::once(config.cmd.clone())
            .chain(config.args.iter().cloned())
            .collect(),
        env: config.envs.clone(),
        cwd: config.cwd.as_deref().map(guest_path),
        timeout_secs: None,
    };
    let exec = state
        .app
        .api
        .exec_stream(&caller, &id, command, None)
        .await?;
    let pid = exec.pid();
    let control = exec.control();
    if !req.stdin.unwrap_or(false) {
        // Nothing will be written: a command reading stdin sees its end at once.
        control
            .close_stdin()
            .await
            .map_err(|e| E2bError::from(hutch_core::service::ServiceError::Channel(e)))?;
    }
    let config = serde_json::to_value(&config).expect("config serialises");
    state
        .processes
        .insert(id.as_str(), pid, Process { control, config });
    let keepalive = headers
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(KEEPALIVE_SECS)
        .clamp(1, 300);
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(pump(state, id, exec, Duration::from_secs(keepalive), tx));
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/connect+json")
        .body(Body::from_stream(body))
        .expect("valid response"))
}

/// Streams a process's events to its client until it exits (or the client goes, which
/// drops the exec and so kills it), then forgets it.
async fn pump(
    state: Arc<E2bState>,
    id: SandboxId,
    mut exec: hutch_core::service::ExecStream,
    keepalive: Duration,
    tx: mpsc::Sender<Bytes>,
) {
    let pid = exec.pid();
    let event = |e: Value| connect::message(&json!({ "event": e }));
    let ticker = {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(keepalive);
            tick.tick().await;
            loop {
                tick.tick().await;
                let ping = connect::message(&json!({"event": {"keepalive": {}}}));
                if tx.send(ping).await.is_err() {
                    break;
                }
            }
        })
    };
    let mut ended = None;
    if tx.send(event(json!({"start": {"pid": pid}}))).await.is_ok() {
        ended = loop {
            let next = tokio::select! {
                next = exec.next_event() => next,
                () = tx.closed() => break None,
            };
            let data = |stream: &str, d: Vec<u8>| event(json!({"data": {stream: B64.encode(d)}}));
            let out = match next {
                Ok(ExecEvent::Stdout(d)) => data("stdout", d),
                Ok(ExecEvent::Stderr(d)) => data("stderr", d),
                Ok(ExecEvent::Exited(info)) => break Some(Ok(info)),
                Err(e) => break Some(Err(e)),
            };
            if tx.send(out).await.is_err() {
                break None;
            }
        };
    }
    ticker.abort();
    state.processes.remove(id.as_str(), pid);
    match ended {
        Some(Ok(info)) => {
            let _ = tx.send(event(json!({ "end": end_event(&info) }))).await;
            let _ = tx.send(connect::end_stream(None)).await;
        }
        Some(Err(e)) => {
            let why = hutch_core::chain(&e);
            let _ = tx
                .send(connect::end_stream(Some(("unavailable", &why))))
                .await;
        }
        None => {}
    }
}

/// `process.ProcessEvent.EndEvent` for how a process ended.
fn end_event(info: &ExitInfo) -> Value {
    let mut end = match split_status(info.status) {
        (Some(code), _) => {
            json!({"exitCode": code, "exited": true, "status": format!("exit status {code}")})
        }
        (None, signal) => json!({
            "exitCode": -1,
            "exited": false,
            "status": format!("signal: {}", signal.unwrap_or_default()),
        }),
    };
    if info.timed_out {
        end["error"] = json!("the command timed out");
    }
    end
}

/// `process.ProcessSelector`: only by pid.
#[derive(Debug, Deserialize)]
struct Selector {
    pid: Option<u32>,
}

/// The process a request selects, by pid.
fn selected(state: &E2bState, id: &SandboxId, selector: &Selector) -> Result<Process> {
    let pid = selector
        .pid
        .ok_or_else(|| E2bError::unsupported("selecting a process by tag"))?;
    state.processes.get(id.as_str(), pid).ok_or_else(|| {
        E2bError::new(
            StatusCode::NOT_FOUND,
            format!("no process {pid} started through this API is running"),
        )
    })
}

/// A request naming a process (and maybe more).
#[derive(Debug, Deserialize)]
struct ProcessRequest {
    process: Selector,
    signal: Option<Value>,
    input: Option<Input>,
}

/// `process.ProcessInput`.
#[derive(Debug, Deserialize)]
struct Input {
    stdin: Option<String>,
    pty: Option<String>,
}

/// The parts of a process request, checked.
async fn process_request(
    state: &E2bState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(Process, ProcessRequest)> {
    let id = sandbox_of(headers)?;
    let req: ProcessRequest = connect::unary_request(body)?;
    Ok((selected(state, &id, &req.process)?, req))
}

fn channel_error(e: hutch_protocol::host::ChannelError) -> E2bError {
    hutch_core::service::ServiceError::Channel(e).into()
}

async fn send_signal(
    State(state): AppState,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>> {
    let (process, req) = process_request(&state, &headers, &body).await?;
    let signal = match req.signal.as_ref() {
        Some(Value::String(s)) if s == "SIGNAL_SIGKILL" => libc::SIGKILL,
        Some(Value::String(s)) if s == "SIGNAL_SIGTERM" => libc::SIGTERM,
        Some(Value::Number(n)) if n.as_i64() == Some(9) => libc::SIGKILL,
        Some(Value::Number(n)) if n.as_i64() == Some(15) => libc::SIGTERM,
        other => return Err(E2bError::bad_request(format!("unknown signal {other:?}"))),
    };
    process
        .control
        .signal(signal)
        .await
        .map_err(channel_error)?;
    Ok(Json(json!({})))
}

async fn send_input(
    State(state): AppState,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>> {
    let (process, req) = process_request(&state, &headers, &body).await?;
    let input = req
        .input
        .ok_or_else(|| E2bError::bad_request("input is required"))?;
    if input.pty.is_some() {
        return Err(E2bError::unsupported("PTY input"));
    }
    let data = B64
        .decode(input.stdin.unwrap_or_default())
        .map_err(|e| E2bError::bad_request(format!("stdin is not base64: {e}")))?;
    process
        .control
        .write_stdin(&data)
        .await
        .map_err(channel_error)?;
    Ok(Json(json!({})))
}

async fn close_stdin(
    State(state): AppState,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>> {
    let (process, _) = process_request(&state, &headers, &body).await?;
    process.control.close_stdin().await.map_err(channel_error)?;
    Ok(Json(json!({})))
}

/// The processes started through this API that still run in the sandbox.
async fn list(
    State(state): AppState,
    Extension(caller): CallerExt,
    headers: HeaderMap,
) -> Result<Json<Value>> {
    let id = sandbox_of(&headers)?;
    // Scope first: another caller's sandbox lists nothing.
    state.app.api.recorded(&caller, &id).await?;
    let processes: Vec<Value> = state
        .processes
        .of(id.as_str())
        .into_iter()
        .map(|(pid, config)| json!({"pid": pid, "config": config}))
        .collect();
    Ok(Json(json!({ "processes": processes })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_start_at_home() {
        assert_eq!(guest_path("/etc/x"), "/etc/x");
        assert_eq!(guest_path("a/b"), "/root/a/b");
        assert_eq!(guest_path("~/a"), "/root/a");
        assert_eq!(guest_path("~"), "/root/");
    }

    #[test]
    fn ends_say_how_the_process_ended() {
        use hutch_protocol::ExitStatus;
        let end = end_event(&ExitInfo {
            status: ExitStatus::Code(3),
            timed_out: false,
        });
        assert_eq!(end["exitCode"], 3);
        assert_eq!(end["exited"], true);
        let end = end_event(&ExitInfo {
            status: ExitStatus::Signal(9),
            timed_out: true,
        });
        assert_eq!(end["exitCode"], -1);
        assert_eq!(end["status"], "signal: 9");
        assert!(end["error"].is_string());
    }
}
