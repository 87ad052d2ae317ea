//! What the daemon tells the outside about itself: the public keys and discovery document
//! that verify guests' workload identity tokens (public, read-only: served on TCP without a
//! token, like any OIDC issuer's), and the Prometheus metrics (admin only).

use std::sync::Arc;

use axum::{extract::State, http::header::CONTENT_TYPE, response::IntoResponse, Extension, Json};
use hutch_api::ApiError;
use hutch_core::service::Caller;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{http_error::HttpError, AppState};

type Result<T> = std::result::Result<T, HttpError>;

/// The Prometheus text exposition format's media type.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4";

/// Routes anyone may call, also without a token on TCP.
pub fn public_api() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(jwks))
        .routes(routes!(openid_configuration))
}

/// Whether `path` is served without a token (the OpenAPI document omits 401 for it).
pub fn is_public(path: &str) -> bool {
    path.starts_with("/.well-known/")
}

#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "identity", security(()),
    responses((status = 200, description = "the public keys (JWKS, RFC 7517) that verify guests' identity tokens", body = serde_json::Value),
              (status = 404, description = "this host issues no identity tokens", body = ApiError)))]
async fn jwks(State(state): State<Arc<AppState>>) -> Result<Json<serde_json::Value>> {
    Ok(Json(state.api.identity_keys().await?))
}

#[utoipa::path(get, path = "/.well-known/openid-configuration", tag = "identity", security(()),
    responses((status = 200, description = "OpenID-style discovery document of the identity token issuer", body = serde_json::Value),
              (status = 404, description = "this host issues no identity tokens", body = ApiError)))]
async fn openid_configuration(
    State(state): State<Arc<AppState>>,
) -> Result<Json<serde_json::Value>> {
    Ok(Json(state.api.identity_discovery().await?))
}

/// The host's metrics in the Prometheus text format (admin only).
#[utoipa::path(get, path = "/metrics", tag = "metrics",
    responses((status = 200, description = "Prometheus text exposition format 0.0.4", body = String, content_type = "text/plain; version=0.0.4"),
              (status = 403, description = "a scoped token: metrics describe the whole host", body = ApiError)))]
pub async fn metrics(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Result<impl IntoResponse> {
    let text = state.api.metrics(&caller).await?;
    Ok(([(CONTENT_TYPE, PROMETHEUS_TEXT)], text))
}
