//! Routes for templates and forks. Templates are host-wide: only an admin caller (the Unix
//! socket, or an unscoped token) creates or removes them; any caller may list them and create
//! sandboxes from them.

use std::sync::Arc;

use axum::{extract::State, http::StatusCode, response::IntoResponse, Extension, Json};
use hutch_api::{ApiError, ForkBody, PoolBody};
use hutch_core::service::Caller;
use hutch_types::{SandboxInfo, TemplateInfo, TemplateSpec};

use crate::{
    extract::{sandbox_id, JsonBody, Path},
    http_error::HttpError,
    AppState,
};

type Result<T> = std::result::Result<T, HttpError>;

#[utoipa::path(post, path = "/v1/templates", request_body = TemplateSpec, tag = "templates",
    responses((status = 201, description = "booted, provisioned and saved", body = TemplateInfo),
              (status = 400, body = ApiError), (status = 403, body = ApiError),
              (status = 404, description = "no such image", body = ApiError),
              (status = 409, description = "the name is taken", body = ApiError),
              (status = 429, description = "no room to boot it", body = ApiError),
              (status = 422, description = "provisioning failed", body = ApiError)))]
pub(super) async fn create_template(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    JsonBody(spec): JsonBody<TemplateSpec>,
) -> Result<impl IntoResponse> {
    let info = state.api.create_template(&caller, spec).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

#[utoipa::path(get, path = "/v1/templates", tag = "templates",
    responses((status = 200, body = Vec<TemplateInfo>)))]
pub(super) async fn list_templates(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<TemplateInfo>>> {
    Ok(Json(state.api.templates(&caller).await?))
}

#[utoipa::path(get, path = "/v1/templates/{name}", tag = "templates",
    params(("name" = String, Path)),
    responses((status = 200, body = TemplateInfo), (status = 404, body = ApiError)))]
pub(super) async fn get_template(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<TemplateInfo>> {
    Ok(Json(state.api.template(&caller, &name).await?))
}

#[utoipa::path(delete, path = "/v1/templates/{name}", tag = "templates",
    params(("name" = String, Path)),
    responses((status = 200, body = TemplateInfo), (status = 404, body = ApiError),
              (status = 409, description = "sandboxes still use it", body = ApiError)))]
pub(super) async fn remove_template(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<TemplateInfo>> {
    Ok(Json(state.api.remove_template(&caller, &name).await?))
}

#[utoipa::path(put, path = "/v1/templates/{name}/pool", request_body = PoolBody, tag = "templates",
    params(("name" = String, Path)),
    responses((status = 200, body = TemplateInfo), (status = 404, body = ApiError)))]
pub(super) async fn set_pool(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<PoolBody>,
) -> Result<Json<TemplateInfo>> {
    Ok(Json(state.api.set_pool(&caller, &name, body.size).await?))
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/fork", request_body = ForkBody, tag = "sandboxes",
    params(("id" = String, Path)),
    responses((status = 201, description = "the children, running", body = Vec<SandboxInfo>),
              (status = 404, body = ApiError), (status = 409, body = ApiError),
              (status = 429, body = ApiError)))]
pub(super) async fn fork(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ForkBody>,
) -> Result<impl IntoResponse> {
    let children = state
        .api
        .fork(&caller, &sandbox_id(&id)?, body.count)
        .await?;
    Ok((StatusCode::CREATED, Json(children)))
}
