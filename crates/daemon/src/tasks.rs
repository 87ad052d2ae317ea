//! Routes for agent tasks. A task creates sandboxes and stores data host-wide, so only an
//! admin caller (the Unix socket, or an unscoped token) may run or read tasks.

use std::sync::Arc;

use futures::StreamExt;

use axum::{
    body::{Body, Bytes},
    extract::{multipart::MultipartRejection, Multipart, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    Extension, Json,
};
use hutch_api::ApiError;
use hutch_core::service::{Caller, TASKS_HOST_WIDE};
use hutch_task::{
    attest::Envelope,
    model::{encode_frame, FRAME_ERROR, FRAME_RECORD},
    sign::SignatureCheck,
    TaskRecord, TaskSpec,
};
use hutch_types::ErrorCode;
use serde::Deserialize;

use crate::{
    extract::{Path, Query},
    http_error::HttpError,
    AppState,
};

type Result<T> = std::result::Result<T, HttpError>;

/// Query of `POST /v1/tasks`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
pub(super) struct RunQuery {
    /// Answer with a stream of frames (`u8 kind ‖ u32 LE len ‖ bytes`): the agent's and the
    /// verify command's output as it comes (kinds 1, 2), then the record (3) or an error (4).
    #[serde(default)]
    stream: bool,
}

/// The form `POST /v1/tasks` takes (`multipart/form-data`).
#[derive(utoipa::ToSchema)]
pub(super) struct TaskUpload {
    /// What to run (`application/json`).
    pub(super) spec: TaskSpec,
    /// The workspace, a tar archive (`application/x-tar`).
    #[schema(value_type = String, format = Binary)]
    pub(super) workspace: Vec<u8>,
}

impl TaskUpload {
    /// Reads the form's two parts, `spec` and `workspace`; anything else is refused.
    pub(super) async fn read(
        form: std::result::Result<Multipart, MultipartRejection>,
    ) -> Result<TaskUpload> {
        let bad = |m: String| HttpError::new(ErrorCode::BadRequest, m);
        let mut form = form.map_err(|e| bad(e.body_text()))?;
        let (mut spec, mut workspace) = (None, None);
        while let Some(field) = form.next_field().await.map_err(|e| bad(e.body_text()))? {
            let name = field.name().unwrap_or_default().to_string();
            let data = field.bytes().await.map_err(|e| bad(e.body_text()))?;
            match name.as_str() {
                "spec" => {
                    spec = Some(
                        serde_json::from_slice(&data)
                            .map_err(|e| bad(format!("task spec: {e}")))?,
                    )
                }
                "workspace" => workspace = Some(data.to_vec()),
                other => return Err(bad(format!("unknown form part {other:.40}"))),
            }
        }
        Ok(TaskUpload {
            spec: spec.ok_or_else(|| bad("the form has no spec part".into()))?,
            workspace: workspace.ok_or_else(|| bad("the form has no workspace part".into()))?,
        })
    }
}

#[utoipa::path(post, path = "/v1/tasks", tag = "tasks", params(RunQuery),
    request_body(content = TaskUpload, content_type = "multipart/form-data",
        description = "the task's spec (JSON) and its workspace (a tar archive)"),
    responses((status = 201, description = "the task ran; see its verdict", body = TaskRecord),
              (status = 200, description = "with stream=true: output frames, then the record frame", content_type = "application/octet-stream"),
              (status = 400, body = ApiError), (status = 403, body = ApiError),
              (status = 429, body = ApiError)))]
pub(super) async fn run_task(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<RunQuery>,
    form: std::result::Result<Multipart, MultipartRejection>,
) -> Result<Response> {
    // Refused before the upload is read (the surface checks again).
    caller.require_admin(TASKS_HOST_WIDE)?;
    let TaskUpload {
        spec,
        workspace: tar,
    } = TaskUpload::read(form).await?;
    let (sink, output) = tokio::sync::mpsc::channel(64);
    let sink = query.stream.then_some(sink);
    // The surface runs the task to its end even if the client hangs up.
    let run = tokio::spawn(async move { state.api.run_task(&caller, spec, tar, sink).await });
    if !query.stream {
        let record = run
            .await
            .map_err(|e| HttpError::new(ErrorCode::Internal, format!("task failed: {e}")))??;
        return Ok((StatusCode::CREATED, Json(record)).into_response());
    }
    // Output frames until the task drops its sink, then the record (or the error).
    let frames = futures::stream::unfold((output, Some(run)), |(mut output, run)| async move {
        if let Some((kind, data)) = output.recv().await {
            return Some((encode_frame(kind, &data), (output, run)));
        }
        let last = match run?.await {
            Ok(Ok(record)) => encode_frame(
                FRAME_RECORD,
                &serde_json::to_vec(&record).expect("serializable"),
            ),
            Ok(Err(e)) => encode_frame(FRAME_ERROR, &error_json(HttpError::from(e))),
            Err(e) => encode_frame(
                FRAME_ERROR,
                &error_json(HttpError::new(
                    ErrorCode::Internal,
                    format!("task failed: {e}"),
                )),
            ),
        };
        Some((last, (output, None)))
    })
    .map(|frame| Ok::<_, std::convert::Infallible>(Bytes::from(frame)));
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(Body::from_stream(frames))
        .expect("valid response"))
}

fn error_json(e: HttpError) -> Vec<u8> {
    serde_json::to_vec(&e.0).expect("serializable")
}

#[utoipa::path(get, path = "/v1/tasks", tag = "tasks",
    responses((status = 200, body = Vec<TaskRecord>), (status = 403, body = ApiError)))]
pub(super) async fn list_tasks(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<TaskRecord>>> {
    Ok(Json(state.api.tasks(&caller).await?))
}

#[utoipa::path(get, path = "/v1/tasks/{id}", tag = "tasks", params(("id" = String, Path)),
    responses((status = 200, body = TaskRecord), (status = 404, body = ApiError)))]
pub(super) async fn get_task(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<TaskRecord>> {
    Ok(Json(state.api.task(&caller, &id).await?))
}

#[utoipa::path(get, path = "/v1/tasks/{id}/signature", tag = "tasks", params(("id" = String, Path)),
    responses((status = 200, description = "whether the task's attestation verifies with the host key and the stored baseline, changeset and record are as it says", body = SignatureCheck),
              (status = 404, body = ApiError)))]
pub(super) async fn task_signature(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<SignatureCheck>> {
    Ok(Json(state.api.task_signature(&caller, &id).await?))
}

#[utoipa::path(get, path = "/v1/tasks/{id}/attestation", tag = "tasks", params(("id" = String, Path)),
    responses((status = 200, description = "the task's in-toto statement in a DSSE envelope, signed by its sandbox's key and the host key", body = Envelope),
              (status = 404, body = ApiError)))]
pub(super) async fn task_attestation(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Envelope>> {
    Ok(Json(state.api.task_attestation(&caller, &id).await?))
}

#[utoipa::path(get, path = "/v1/tasks/{id}/baseline", tag = "tasks", params(("id" = String, Path)),
    responses((status = 200, description = "the baseline manifest (path → file or symlink)"),
              (status = 404, body = ApiError)))]
pub(super) async fn task_baseline(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<hutch_task::Baseline>> {
    Ok(Json(state.api.task_baseline(&caller, &id).await?))
}

#[utoipa::path(get, path = "/v1/tasks/{id}/changeset", tag = "tasks", params(("id" = String, Path)),
    responses((status = 200, description = "the accepted changeset stream", content_type = "application/octet-stream"),
              (status = 404, body = ApiError)))]
pub(super) async fn task_changeset(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Vec<u8>> {
    Ok(state.api.task_changeset(&caller, &id).await?)
}

#[utoipa::path(get, path = "/v1/tasks/{id}/diff", tag = "tasks", params(("id" = String, Path)),
    responses((status = 200, description = "unified diff against the baseline", content_type = "text/plain"),
              (status = 404, body = ApiError)))]
pub(super) async fn task_diff(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<String> {
    Ok(state.api.task_diff(&caller, &id).await?)
}
