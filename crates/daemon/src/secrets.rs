//! Routes for secrets: set (and rotate), list and remove them, and read what the broker did
//! with a sandbox's. Values go in and never come out; scope works as for sandboxes.

use std::sync::Arc;

use axum::{extract::State, Extension, Json};
use hutch_api::{ApiError, SetSecretBody};
use hutch_core::{
    secrets::{SecretValue, SetSecret},
    service::Caller,
};
use hutch_types::{BrokerEvent, SecretInfo};

use crate::{
    extract::{sandbox_id, JsonBody, Path},
    http_error::HttpError,
    AppState,
};

type Result<T> = std::result::Result<T, HttpError>;

#[utoipa::path(put, path = "/v1/secrets/{name}", request_body = SetSecretBody, tag = "secrets",
    params(("name" = String, Path, pattern = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")),
    responses((status = 200, description = "set; never carries the value", body = SecretInfo),
              (status = 400, body = ApiError), (status = 403, body = ApiError),
              (status = 409, description = "this host keeps no secrets", body = ApiError)))]
pub(super) async fn set_secret(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<SetSecretBody>,
) -> Result<Json<SecretInfo>> {
    let req = SetSecret {
        name,
        value: SecretValue::new(body.value.into_bytes()),
        env: body.env,
        bindings: body.bindings,
        labels: body.labels,
        ssh_allowed_host_keys: body.ssh_allowed_host_keys,
    };
    Ok(Json(state.api.set_secret(&caller, req).await?))
}

#[utoipa::path(get, path = "/v1/secrets", tag = "secrets",
    responses((status = 200, description = "names, variables, bindings, labels; never values", body = Vec<SecretInfo>)))]
pub(super) async fn list_secrets(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<SecretInfo>>> {
    Ok(Json(state.api.secrets(&caller).await?))
}

#[utoipa::path(delete, path = "/v1/secrets/{name}", tag = "secrets",
    params(("name" = String, Path)),
    responses((status = 200, body = SecretInfo), (status = 404, body = ApiError),
              (status = 409, description = "sandboxes still have it attached", body = ApiError)))]
pub(super) async fn remove_secret(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<SecretInfo>> {
    Ok(Json(state.api.remove_secret(&caller, &name).await?))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/secrets/log", tag = "secrets",
    params(("id" = String, Path)),
    responses((status = 200, description = "substitutions, refusals, violations and scrubs, oldest first; never a value or placeholder", body = Vec<BrokerEvent>),
              (status = 404, body = ApiError)))]
pub(super) async fn secret_log(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Vec<BrokerEvent>>> {
    Ok(Json(
        state.api.secret_log(&caller, &sandbox_id(&id)?).await?,
    ))
}
