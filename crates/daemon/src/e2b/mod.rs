//! An E2B-compatible front end, so that programs written against E2B's SDK run unchanged
//! against this host (`hutch daemon --listen-e2b ADDR`).
//!
//! One listener serves both halves of what the SDK talks to: E2B's REST control plane
//! ([`rest`]: create, list, get, kill, set timeout, pause, resume, connect) and the
//! in-sandbox service E2B calls envd ([`envd`]: Connect-RPC process and filesystem calls in
//! JSON, and the `/files` HTTP endpoints). The SDK is pointed at it with `E2B_API_URL` and
//! `E2B_SANDBOX_URL` both set to the listener's URL; with a sandbox URL it sends every envd
//! request there and names the sandbox in its `E2b-Sandbox-Id` header, so one daemon serves
//! every sandbox without host-based routing. The API key (`X-API-Key`) is a Hutch TCP token;
//! create hands it back as the sandbox's envd access token, which the SDK then sends as
//! `X-Access-Token`, so each envd call carries the same scope as the REST calls.
//!
//! Everything parses into calls on the one request surface ([`SandboxApi`]); nothing here
//! decides what is legal. Calls Hutch does not serve answer at once with an E2B-shaped
//! error (`{"code": <status>, "message"}`; 501 for unsupported routes), which the SDK turns
//! into its own exceptions (Connect `unimplemented` for RPCs).
//!
//! [`SandboxApi`]: hutch_core::service::SandboxApi

mod connect;
mod envd;
mod fs;
mod rest;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use axum::{
    extract::{DefaultBodyLimit, Request, State},
    http::{HeaderMap, Method, StatusCode, Uri},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    Json, Router,
};
use hutch_core::service::StreamControl as ExecControl;
use hutch_core::service::{Caller, ServiceError};

use crate::{http_error::HttpError, AppState};

/// The envd version Hutch answers as: new enough that the SDK sends no default user and
/// knows stdin and octet-stream uploads, old enough that it asks for nothing newer (file
/// metadata, watch options) that Hutch does not serve.
pub const ENVD_VERSION: &str = "0.5.7";

/// What every E2B handler shares.
pub struct E2bState {
    /// The daemon's request surface and token store.
    app: Arc<AppState>,
    /// Processes started through `process.Process/Start` that are still running.
    processes: Processes,
}

/// Running processes by (sandbox id, guest pid): how `SendSignal`, `SendInput`,
/// `CloseStdin` and `List` reach a process whose output another request streams.
#[derive(Default)]
struct Processes(Mutex<HashMap<(String, u32), Process>>);

/// One running process.
#[derive(Clone)]
struct Process {
    /// Its stdin and signals.
    control: ExecControl,
    /// What it was started with, as `List` reports it.
    config: serde_json::Value,
}

impl Processes {
    fn insert(&self, sandbox: &str, pid: u32, process: Process) {
        self.0
            .lock()
            .expect("process table")
            .insert((sandbox.to_string(), pid), process);
    }

    fn remove(&self, sandbox: &str, pid: u32) {
        self.0
            .lock()
            .expect("process table")
            .remove(&(sandbox.to_string(), pid));
    }

    fn get(&self, sandbox: &str, pid: u32) -> Option<Process> {
        self.0
            .lock()
            .expect("process table")
            .get(&(sandbox.to_string(), pid))
            .cloned()
    }

    fn of(&self, sandbox: &str) -> Vec<(u32, serde_json::Value)> {
        let table = self.0.lock().expect("process table");
        let mut all: Vec<_> = table
            .iter()
            .filter(|((s, _), _)| s == sandbox)
            .map(|((_, pid), p)| (*pid, p.config.clone()))
            .collect();
        all.sort_by_key(|(pid, _)| *pid);
        all
    }
}

/// An error as E2B's API and envd's HTTP endpoints answer it: `{"code": <HTTP status>,
/// "message"}`, which the SDKs map to their exceptions. On envd's Connect-RPC routes,
/// [`rpc_errors`] answers it in Connect's own shape instead.
#[derive(Debug, Clone)]
pub struct E2bError {
    status: StatusCode,
    message: String,
    /// The Connect code, where the status alone does not say it (409: the entry exists).
    rpc_code: Option<&'static str>,
}

impl E2bError {
    fn new(status: StatusCode, message: impl Into<String>) -> E2bError {
        E2bError {
            status,
            message: message.into(),
            rpc_code: None,
        }
    }

    /// What a filesystem call answers for an entry that is there already (envd's
    /// `already_exists`, on which the SDKs' `make_dir` returns false).
    fn exists(message: impl Into<String>) -> E2bError {
        E2bError {
            rpc_code: Some("already_exists"),
            ..E2bError::new(StatusCode::CONFLICT, message)
        }
    }

    fn bad_request(message: impl Into<String>) -> E2bError {
        E2bError::new(StatusCode::BAD_REQUEST, message)
    }

    fn unsupported(what: impl std::fmt::Display) -> E2bError {
        E2bError::new(
            StatusCode::NOT_IMPLEMENTED,
            format!("{what} is not supported by Hutch's E2B-compatible API"),
        )
    }
}

impl From<ServiceError> for E2bError {
    fn from(e: ServiceError) -> E2bError {
        HttpError::from(e).into()
    }
}

impl From<HttpError> for E2bError {
    fn from(e: HttpError) -> E2bError {
        E2bError::new(crate::http_error::status(e.0.code), e.0.message)
    }
}

impl IntoResponse for E2bError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"code": self.status.as_u16(), "message": self.message});
        let mut response = (self.status, Json(body)).into_response();
        // For `rpc_errors`, which reshapes it on Connect routes.
        response.extensions_mut().insert(self);
        response
    }
}

/// Answers an error on envd's Connect-RPC routes (`/process.Process/…`,
/// `/filesystem.Filesystem/…`, refused or unknown ones included) as a Connect error, whose
/// string code both SDKs read: a unary call's `{code, message}` with its status, a streaming
/// call's 200 with only the end-of-stream message. (A bare status would do for the Python
/// SDK; the JavaScript one reads only a Connect code, and takes a 404 for `unimplemented`.)
async fn rpc_errors(req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if !(path.starts_with("/process.Process/") || path.starts_with("/filesystem.Filesystem/")) {
        return next.run(req).await;
    }
    let streaming = req
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/connect+"));
    let response = next.run(req).await;
    match response.extensions().get::<E2bError>() {
        Some(e) => connect::error_response(e, streaming),
        None => response,
    }
}

type Result<T> = std::result::Result<T, E2bError>;

/// The key a request authenticated with, handed back as the envd access token.
#[derive(Clone)]
struct ApiKey(String);

/// The E2B routes, each request authenticated by its `X-API-Key` (REST) or `X-Access-Token`
/// (envd) being a Hutch token.
pub fn router(app: Arc<AppState>) -> Router {
    let state = Arc::new(E2bState {
        app,
        processes: Processes::default(),
    });
    rest::routes()
        .merge(envd::routes())
        .fallback(unsupported_route)
        .layer(DefaultBodyLimit::max(crate::routes::MAX_UPLOAD))
        .layer(middleware::from_fn(crate::listen::authenticated))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn(rpc_errors))
        .with_state(state)
}

async fn unsupported_route(method: Method, uri: Uri) -> E2bError {
    E2bError::unsupported(format_args!("{method} {:.80}", uri.path()))
}

/// Resolves the request's key to a [`Caller`], or answers 401.
async fn authenticate(
    State(state): State<Arc<E2bState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(key) = presented_key(req.headers()) else {
        return E2bError::new(
            StatusCode::UNAUTHORIZED,
            "an API key (X-API-Key) or envd access token (X-Access-Token) is required",
        )
        .into_response();
    };
    match crate::auth::caller_for(&state.app, &key).await {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            req.extensions_mut().insert(ApiKey(key));
            next.run(req).await
        }
        Err(e) => E2bError::from(e).into_response(),
    }
}

/// The API key, envd access token or bearer token a request carries.
fn presented_key(headers: &HeaderMap) -> Option<String> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    header("x-api-key")
        .or_else(|| header("x-access-token"))
        .or_else(|| header("authorization").and_then(|v| v.strip_prefix("Bearer ")))
        .map(|k| k.trim().to_string())
        .filter(|k| !k.is_empty())
}

/// The caller a request was authenticated as.
type CallerExt = axum::Extension<Caller>;
