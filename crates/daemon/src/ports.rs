//! Published ports: a guest TCP port on a host loopback port, for previews.

use std::sync::Arc;

use axum::{extract::State, Extension, Json};
use hutch_api::{ApiError, PortMapping, PublishPort};
use hutch_core::service::Caller;

use crate::{
    extract::{sandbox_id, JsonBody, Path},
    http_error::HttpError,
    AppState,
};

type Result<T> = std::result::Result<T, HttpError>;

/// The API form of a published port.
fn mapping(p: hutch_net::PublishedPort) -> PortMapping {
    PortMapping {
        guest_port: p.guest_port,
        host_addr: p.host.ip().to_string(),
        host_port: p.host.port(),
    }
}

#[utoipa::path(put, path = "/v1/sandboxes/{id}/ports/{guest_port}", tag = "network",
    request_body = PublishPort,
    params(("id" = String, Path), ("guest_port" = u16, Path, minimum = 0, maximum = 65535)),
    responses((status = 200, body = PortMapping),
              (status = 409, description = "host port taken, guest port published elsewhere, or no network", body = ApiError)))]
pub async fn publish_port(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path((id, guest_port)): Path<(String, u16)>,
    JsonBody(req): JsonBody<PublishPort>,
) -> Result<Json<PortMapping>> {
    let p = state
        .api
        .publish_port(&caller, &sandbox_id(&id)?, guest_port, req.host_port)
        .await?;
    Ok(Json(mapping(p)))
}

#[utoipa::path(delete, path = "/v1/sandboxes/{id}/ports/{guest_port}", tag = "network",
    params(("id" = String, Path), ("guest_port" = u16, Path, minimum = 0, maximum = 65535)),
    responses((status = 200, description = "the ports still published", body = Vec<PortMapping>)))]
pub async fn unpublish_port(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path((id, guest_port)): Path<(String, u16)>,
) -> Result<Json<Vec<PortMapping>>> {
    let left = state
        .api
        .unpublish_port(&caller, &sandbox_id(&id)?, guest_port)
        .await?;
    Ok(Json(left.into_iter().map(mapping).collect()))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/ports", tag = "network",
    params(("id" = String, Path)),
    responses((status = 200, body = Vec<PortMapping>)))]
pub async fn list_ports(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Vec<PortMapping>>> {
    let ports = state.api.ports(&caller, &sandbox_id(&id)?).await?;
    Ok(Json(ports.into_iter().map(mapping).collect()))
}
