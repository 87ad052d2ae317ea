//! Streaming exec over a WebSocket: stdin, stdout, stderr, exit, terminal resize and signals.
//!
//! The client's first text frame is an [`ExecStart`]; then binary frames are stdin and text
//! frames are [`ExecControl`]. The daemon sends binary frames `[stream byte] ++ data` and text
//! [`ExecEventMsg`]s, the last one `exit` (or `error`), then closes.

use std::sync::Arc;

use axum::{
    extract::{
        ws::{rejection::WebSocketUpgradeRejection, Message, WebSocket, WebSocketUpgrade},
        State,
    },
    response::Response,
    Extension,
};
use hutch_api::{ApiError, ExecControl, ExecEventMsg, ExecStart, STREAM_STDERR, STREAM_STDOUT};
use hutch_protocol::{host::ExecEvent, TtySize};
use hutch_types::{ErrorCode, SandboxId};

use hutch_core::{
    exec::split_status,
    service::{Caller, Command, StreamControl as Control},
};

use crate::{
    extract::{sandbox_id, Path},
    http_error::HttpError,
    AppState,
};

#[utoipa::path(get, path = "/v1/sandboxes/{id}/exec/ws", tag = "exec", params(("id" = String, Path)),
    responses((status = 101, description = "WebSocket: first text frame ExecStart; binary frames stdin/output; text frames ExecControl/ExecEventMsg")))]
pub async fn exec_stream(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, HttpError> {
    // Refused before the upgrade when out of scope (the exec itself checks again).
    let id = sandbox_id(&id)?;
    state.api.recorded(&caller, &id).await?;
    let upgrade = upgrade.map_err(|e| HttpError::new(ErrorCode::BadRequest, e.body_text()))?;
    Ok(upgrade.on_upgrade(move |socket| async move {
        let mut socket = socket;
        if let Err(e) = serve(&state, &caller, &id, &mut socket).await {
            let _ = send_event(&mut socket, &ExecEventMsg::Error(e.0)).await;
        }
        let _ = socket.send(Message::Close(None)).await;
        closing_handshake(&mut socket).await;
    }))
}

/// How long the daemon waits for the client's answering Close frame.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits (bounded) for the client to answer our Close before the connection is dropped. A
/// client whose answer meets an already closed socket may lose the frames that came with our
/// Close, the exit event among them (Python's `websockets` does).
async fn closing_handshake(socket: &mut WebSocket) {
    let answered = async {
        while let Some(Ok(msg)) = socket.recv().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_WAIT, answered).await;
}

async fn serve(
    state: &AppState,
    caller: &Caller,
    id: &SandboxId,
    socket: &mut WebSocket,
) -> Result<(), HttpError> {
    let start: ExecStart = match socket.recv().await {
        Some(Ok(Message::Text(t))) => serde_json::from_str(t.as_str())
            .map_err(|e| HttpError::new(ErrorCode::BadRequest, format!("bad ExecStart: {e}")))?,
        _ => {
            return Err(HttpError::new(
                ErrorCode::BadRequest,
                "the first frame must be an ExecStart text frame",
            ))
        }
    };
    let command = Command {
        argv: start.argv,
        env: start.env,
        cwd: start.cwd,
        timeout_secs: start.timeout_secs,
    };
    let tty = start.tty.map(|t| TtySize {
        rows: t.rows,
        cols: t.cols,
    });
    let mut exec = state.api.exec_stream(caller, id, command, tty).await?;
    let control = exec.control();
    send_event(socket, &ExecEventMsg::Started { pid: exec.pid() }).await?;
    // Every way out before the exit (the client went away, stopped reading and then closed,
    // or the guest failed) drops `exec`, which kills the process.
    loop {
        tokio::select! {
            event = exec.next_event() => match event? {
                ExecEvent::Stdout(d) => send_output(socket, STREAM_STDOUT, d).await?,
                ExecEvent::Stderr(d) => send_output(socket, STREAM_STDERR, d).await?,
                ExecEvent::Exited(exit) => {
                    let (exit_code, signal) = split_status(exit.status);
                    let msg = ExecEventMsg::Exit { exit_code, signal, timed_out: exit.timed_out };
                    return send_event(socket, &msg).await;
                }
            },
            msg = socket.recv() => match msg {
                Some(Ok(Message::Binary(data))) => control.write_stdin(&data).await?,
                Some(Ok(Message::Text(t))) => apply(&control, t.as_str()).await?,
                Some(Ok(_)) => {}
                None | Some(Err(_)) => return Err(client_gone("the client hung up")),
            },
        }
    }
}

/// Applies one client control message.
async fn apply(control: &Control, text: &str) -> Result<(), HttpError> {
    let msg: ExecControl = serde_json::from_str(text)
        .map_err(|e| HttpError::new(ErrorCode::BadRequest, format!("bad control message: {e}")))?;
    match msg {
        ExecControl::Eof => control.close_stdin().await?,
        ExecControl::Resize(size) => {
            control
                .resize(TtySize {
                    rows: size.rows,
                    cols: size.cols,
                })
                .await?
        }
        ExecControl::Signal { signal } => control.signal(signal).await?,
    }
    Ok(())
}

async fn send_output(
    socket: &mut WebSocket,
    stream: u8,
    mut data: Vec<u8>,
) -> Result<(), HttpError> {
    data.insert(0, stream);
    socket
        .send(Message::Binary(data.into()))
        .await
        .map_err(gone)
}

async fn send_event(socket: &mut WebSocket, msg: &ExecEventMsg) -> Result<(), HttpError> {
    let text = serde_json::to_string(msg).expect("serializable");
    socket.send(Message::Text(text.into())).await.map_err(gone)
}

fn gone(e: axum::Error) -> HttpError {
    client_gone(&e.to_string())
}

fn client_gone(why: &str) -> HttpError {
    HttpError(ApiError {
        code: ErrorCode::Internal,
        message: format!("client connection lost: {why}"),
    })
}
