//! The sandboxes' journals over HTTP: the timeline, its verification, and the latest signed
//! checkpoint on sandbox responses (`Hutch-Checkpoint`, the note in base64: a note spans
//! lines, a header cannot).

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{HeaderName, HeaderValue},
    middleware::Next,
    response::Response,
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
