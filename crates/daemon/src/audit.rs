//! The sandboxes' journals over HTTP: the timeline, its verification, the execs' session
//! recordings (asciicast v2, checked against the digest the journal names), and the latest signed
//! checkpoint on sandbox responses (`Hutch-Checkpoint`, the note in base64: a note spans
//! lines, a header cannot).

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{header, HeaderName, HeaderValue},
    middleware::Next,
    response::{IntoResponse, Response},
    Extension, Json,
};
use base64::{engine::general_purpose::STANDARD as B64, Engine};
use hutch_core::{audit::AuditQuery, service::Caller};
use hutch_journal::{AuditLog, Report};
use hutch_types::SandboxId;
use serde::Deserialize;

use crate::{
    extract::{sandbox_id, Path, Query},
    http_error::HttpError,
    AppState,
};

/// The header carrying a sandbox's latest checkpoint.
pub const CHECKPOINT_HEADER: HeaderName = HeaderName::from_static("hutch-checkpoint");
/// The header carrying a request's id (also in the journal records it caused).
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("hutch-request-id");

/// The header naming a recording's BLAKE3 digest (its name, and what its journal record says).
pub const RECORDING_DIGEST_HEADER: HeaderName = HeaderName::from_static("hutch-recording-digest");
/// The header naming the exec a recording is of.
pub const EXEC_ID_HEADER: HeaderName = HeaderName::from_static("hutch-exec-id");
/// The media type of asciicast v2 files.
pub const ASCIICAST: &str = "application/x-asciicast";

/// Which records to read.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct AuditParams {
    /// Only records with `seq` at or above this.
    from: Option<u64>,
    /// Only records of this kind, or below it (`exec` takes `exec.start` and `exec.end`).
    kind: Option<String>,
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/audit", tag = "audit",
    params(("id" = String, Path), AuditParams),
    responses((status = 200, description = "the sandbox's journal records and latest checkpoint", body = AuditLog),
              (status = 404, body = hutch_api::ApiError)))]
pub async fn audit(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<AuditParams>,
) -> Result<Json<AuditLog>, HttpError> {
    let query = AuditQuery {
        from: q.from.unwrap_or(0),
        kind: q.kind,
    };
    Ok(Json(
        state.api.audit(&caller, &sandbox_id(&id)?, query).await?,
    ))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/audit/verify", tag = "audit",
    params(("id" = String, Path)),
    responses((status = 200, description = "the verdict on the sandbox's journal: ok, unsealed or failed, with each failure named", body = Report),
              (status = 404, body = hutch_api::ApiError)))]
pub async fn verify(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Report>, HttpError> {
    Ok(Json(
        state.api.audit_verify(&caller, &sandbox_id(&id)?).await?,
    ))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/recordings/{exec}", tag = "audit",
    params(("id" = String, Path),
           ("exec" = String, Path, description = "the exec's id (`hutch.exec.id` in its journal records), the seq of its exec.start or exec.end record, or `latest`")),
    responses((status = 200, description = "the exec's session recording, asciicast v2 (guest-controlled text: escape before showing)",
               body = String, content_type = "application/x-asciicast",
               headers(("Hutch-Recording-Digest" = String, description = "BLAKE3 of the recording (hex), as its exec.end record names it"),
                       ("Hutch-Exec-Id" = String, description = "the exec the recording is of"))),
              (status = 404, body = hutch_api::ApiError)))]
pub async fn recording(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path((id, exec)): Path<(String, String)>,
) -> Result<Response, HttpError> {
    let rec = state
        .api
        .recording(&caller, &sandbox_id(&id)?, &exec)
        .await?;
    let mut response = rec.cast.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(ASCIICAST));
    for (name, value) in [
        (RECORDING_DIGEST_HEADER, rec.digest),
        (EXEC_ID_HEADER, rec.exec_id),
    ] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
    Ok(response)
}

/// `response` for the sandbox `id` with its latest checkpoint in [`CHECKPOINT_HEADER`].
pub async fn with_checkpoint(
    state: &AppState,
    caller: &Caller,
    id: &SandboxId,
    mut response: Response,
) -> Response {
    if let Ok(Some(note)) = state.api.checkpoint(caller, id).await {
        if let Ok(value) = HeaderValue::from_str(&B64.encode(note)) {
            response.headers_mut().insert(CHECKPOINT_HEADER, value);
        }
    }
    response
}

/// Middleware: gives each request an id, in its [`Caller`] (journals record it) and in the
/// [`REQUEST_ID_HEADER`] of the answer.
pub async fn stamp_request(mut req: Request, next: Next) -> Response {
    let id = format!("req-{:016x}", rand::random::<u64>());
    if let Some(caller) = req.extensions_mut().get_mut::<Caller>() {
        caller.actor.request_id = Some(id.clone());
    }
    let mut response = next.run(req).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}
