//! Routes for templates and forks. Templates are host-wide: only an admin caller (the Unix
//! socket, or an unscoped token) creates or removes them; any caller may list them and create
//! sandboxes from them.

use std::sync::Arc;

use axum::{extract::State, http::StatusCode, response::IntoResponse, Extension, Json};
use hutch_api::{ApiError, ForkBody, PoolBody};
use hutch_types::{ErrorCode, SandboxInfo, TemplateInfo, TemplateSpec};

use super::{
    auth::Scope,
    error::HttpError,
    extract::{JsonBody, Path},
    routes::{authorize, completed},
    AppState,
};

type Result<T> = std::result::Result<T, HttpError>;

/// Why a label-scoped token is refused here.
const HOST_WIDE: &str = "templates are host-wide: only an unscoped token may create or remove them";

#[utoipa::path(post, path = "/v1/templates", request_body = TemplateSpec, tag = "templates",
    responses((status = 201, description = "booted, provisioned and saved", body = TemplateInfo),
              (status = 400, body = ApiError), (status = 403, body = ApiError),
              (status = 404, description = "no such image", body = ApiError),
              (status = 409, description = "the name is taken", body = ApiError),
              (status = 429, description = "no room to boot it", body = ApiError),
              (status = 422, description = "provisioning failed", body = ApiError)))]
pub(super) async fn create_template(
    State(state): State<Arc<AppState>>,
    Extension(scope): Extension<Scope>,
    JsonBody(spec): JsonBody<TemplateSpec>,
) -> Result<impl IntoResponse> {
    scope.require_admin(HOST_WIDE)?;
    let manager = state.manager.clone();
    let info = completed(async move { manager.create_template(spec).await }).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

#[utoipa::path(get, path = "/v1/templates", tag = "templates",
    responses((status = 200, body = Vec<TemplateInfo>)))]
pub(super) async fn list_templates(
    State(state): State<Arc<AppState>>,
) -> Result<Json<Vec<TemplateInfo>>> {
    Ok(Json(state.manager.templates()?))
}

#[utoipa::path(get, path = "/v1/templates/{name}", tag = "templates",
    params(("name" = String, Path)),
    responses((status = 200, body = TemplateInfo), (status = 404, body = ApiError)))]
pub(super) async fn get_template(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<TemplateInfo>> {
    valid(&name)?;
    Ok(Json(state.manager.template(&name)?))
}

#[utoipa::path(delete, path = "/v1/templates/{name}", tag = "templates",
    params(("name" = String, Path)),
    responses((status = 200, body = TemplateInfo), (status = 404, body = ApiError),
              (status = 409, description = "sandboxes still use it", body = ApiError)))]
pub(super) async fn remove_template(
    State(state): State<Arc<AppState>>,
    Extension(scope): Extension<Scope>,
    Path(name): Path<String>,
) -> Result<Json<TemplateInfo>> {
    scope.require_admin(HOST_WIDE)?;
    valid(&name)?;
    let manager = state.manager.clone();
    Ok(Json(
        completed(async move { manager.remove_template(&name).await }).await?,
    ))
}

#[utoipa::path(put, path = "/v1/templates/{name}/pool", request_body = PoolBody, tag = "templates",
    params(("name" = String, Path)),
    responses((status = 200, body = TemplateInfo), (status = 404, body = ApiError)))]
pub(super) async fn set_pool(
    State(state): State<Arc<AppState>>,
    Extension(scope): Extension<Scope>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<PoolBody>,
) -> Result<Json<TemplateInfo>> {
    scope.require_admin(HOST_WIDE)?;
    valid(&name)?;
    let manager = state.manager.clone();
    Ok(Json(
        completed(async move { manager.set_pool_size(&name, body.size).await }).await?,
    ))
}

/// 404 for a name that cannot be a template's (and so never reaches the filesystem).
fn valid(name: &str) -> Result<()> {
    if hutch_types::valid_name(name) {
        Ok(())
    } else {
        Err(HttpError::new(
            ErrorCode::NotFound,
            format!("no such template: {name:.40}"),
        ))
    }
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/fork", request_body = ForkBody, tag = "sandboxes",
    params(("id" = String, Path)),
    responses((status = 201, description = "the children, running", body = Vec<SandboxInfo>),
              (status = 404, body = ApiError), (status = 409, body = ApiError),
              (status = 429, body = ApiError)))]
pub(super) async fn fork(
    State(state): State<Arc<AppState>>,
    Extension(scope): Extension<Scope>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ForkBody>,
) -> Result<impl IntoResponse> {
    authorize(&state, &scope, &id).await?;
    let manager = state.manager.clone();
    let children = completed(async move { manager.fork(&id, body.count).await }).await?;
    let children: Vec<SandboxInfo> = children.into_iter().map(SandboxInfo::redacted).collect();
    Ok((StatusCode::CREATED, Json(children)))
}
