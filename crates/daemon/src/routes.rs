//! Routes: each handler parses its request into one call on the [`SandboxApi`] and formats
//! the result; scope checks, validation and the work itself happen behind that surface.
//!
//! [`SandboxApi`]: hutch_core::service::SandboxApi The OpenAPI document is generated from these same annotations.

use std::sync::Arc;

use axum::{
    extract::{DefaultBodyLimit, State},
    http::StatusCode,
    middleware,
    response::IntoResponse,
    Extension, Json, Router,
};
use hutch_api::{ApiError, CreateSandbox, ExecBody, ExecResult, NetEvent, JSON_EXEC_OUTPUT_LIMIT};
use hutch_core::{
    exec::split_status,
    service::{Caller, Command, Create, Lifecycle},
};
use hutch_store::ListFilter;
use hutch_types::{ErrorCode, NetworkPolicy, SandboxInfo, SandboxSpec};
use utoipa::OpenApi;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    audit,
    extract::{sandbox_id, JsonBody, Path, Query},
    files,
    http_error::HttpError,
    ports, secrets, tasks, templates, ws, AppState,
};

type Result<T> = std::result::Result<T, HttpError>;
type AppStateRef = State<Arc<AppState>>;

/// Largest upload body (one file or one archive).
pub const MAX_UPLOAD: usize = hutch_core::service::transfer::MAX_UPLOAD;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Hutch",
        description = "Disposable microVM sandboxes for coding agents."
    ),
    components(schemas(ApiError, SandboxInfo, SandboxSpec, hutch_types::TemplateInfo))
)]
struct ApiDoc;

/// Routes plus their OpenAPI document.
fn api() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(create_sandbox, list_sandboxes))
        .routes(routes!(get_sandbox, destroy_sandbox))
        .routes(routes!(exec))
        .routes(routes!(ws::exec_stream))
        .routes(routes!(pause))
        .routes(routes!(resume))
        .routes(routes!(stop))
        .routes(routes!(start))
        .routes(routes!(suspend))
        .routes(routes!(templates::fork))
        .routes(routes!(
            templates::create_template,
            templates::list_templates
        ))
        .routes(routes!(templates::get_template, templates::remove_template))
        .routes(routes!(templates::set_pool))
        .routes(routes!(console))
        .routes(routes!(set_network))
        .routes(routes!(network_log))
        .routes(routes!(ports::publish_port, ports::unpublish_port))
        .routes(routes!(ports::list_ports))
        .routes(routes!(files::put_file, files::get_file))
        .routes(routes!(files::put_archive, files::get_archive))
        .routes(routes!(tasks::run_task, tasks::list_tasks))
        .routes(routes!(tasks::get_task))
        .routes(routes!(tasks::task_baseline))
        .routes(routes!(tasks::task_changeset))
        .routes(routes!(tasks::task_diff))
        .routes(routes!(tasks::task_signature))
        .routes(routes!(tasks::task_attestation))
        .routes(routes!(secrets::set_secret, secrets::remove_secret))
        .routes(routes!(secrets::list_secrets))
        .routes(routes!(secrets::secret_log))
        .routes(routes!(crate::observe::metrics))
        .routes(routes!(audit::audit))
        .routes(routes!(audit::verify))
        .routes(routes!(audit::recording))
}

/// The routes that need a caller, those that do not ([`crate::observe::public_api`]), and
/// their complete OpenAPI document.
fn api_parts() -> (
    axum::Router<Arc<AppState>>,
    axum::Router<Arc<AppState>>,
    utoipa::openapi::OpenApi,
) {
    let (router, mut doc) = api().split_for_parts();
    let (public, public_doc) = crate::observe::public_api().split_for_parts();
    doc.merge(public_doc);
    crate::openapi::complete(&mut doc);
    (router, public, doc)
}

/// The generated OpenAPI document (a fleet gateway serves the same).
pub(super) fn api_doc() -> utoipa::openapi::OpenApi {
    api_parts().2
}

/// What an unknown path gets: the API's JSON 404, like every other error.
const NO_ROUTE: &str = "no such route";

/// The routes that need a caller (with the fallback and the document), and the public ones,
/// each with `state`.
fn build(state: Arc<AppState>) -> (Router, Router) {
    let (router, public, doc) = api_parts();
    let doc = Arc::new(doc);
    let router = router
        .fallback(|| async { HttpError::new(ErrorCode::NotFound, NO_ROUTE) })
        .route(
            "/openapi.json",
            axum::routing::get(move || {
                let doc = doc.clone();
                async move { Json(doc.as_ref().clone()) }
            }),
        )
        .nest_service("/mcp", crate::mcp::service(state.api.clone()))
        .layer(DefaultBodyLimit::max(MAX_UPLOAD))
        .with_state(state.clone());
    (router, public.with_state(state))
}

/// The API where every request comes from `caller` (the Unix socket: admin).
pub fn router(state: Arc<AppState>, caller: Caller) -> Router {
    let (router, public) = build(state);
    router
        .merge(public)
        .layer(middleware::from_fn(audit::stamp_request))
        .layer(Extension(caller))
}

/// The API where each request's scope comes from its bearer token (TCP). A request that
/// passes the token check marks its connection authenticated (see [`crate::listen`]).
/// The public routes (identity keys and discovery) need no token, and serving one does not
/// mark the connection authenticated.
pub fn router_with_tokens(state: Arc<AppState>) -> Router {
    let (router, public) = build(state.clone());
    router
        .layer(middleware::from_fn(audit::stamp_request))
        .layer(middleware::from_fn(crate::listen::authenticated))
        .layer(middleware::from_fn_with_state(
            state,
            crate::auth::require_token,
        ))
        .merge(public)
}

#[utoipa::path(post, path = "/v1/sandboxes", request_body = CreateSandbox, tag = "sandboxes",
    responses((status = 201, description = "created and running", body = SandboxInfo),
              (status = 200, description = "an earlier create with the same idempotency key", body = SandboxInfo),
              (status = 400, body = ApiError), (status = 403, body = ApiError),
              (status = 404, description = "no such image or template", body = ApiError),
              (status = 429, body = ApiError)))]
async fn create_sandbox(
    State(state): AppStateRef,
    Extension(caller): Extension<Caller>,
    JsonBody(req): JsonBody<CreateSandbox>,
) -> Result<impl IntoResponse> {
    let req = Create {
        spec: req.spec,
        idempotency_key: req.idempotency_key,
    };
    let (info, created) = state.api.create(&caller, req).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(info)))
}

#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes",
    params(("state" = Option<String>, Query, description = "only this state"),
           ("label" = Option<String>, Query, description = "key=value; repeatable", pattern = "=")),
    responses((status = 200, body = Vec<SandboxInfo>)))]
async fn list_sandboxes(
    State(state): AppStateRef,
    Extension(caller): Extension<Caller>,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Json<Vec<SandboxInfo>>> {
    let mut filter = ListFilter::default();
    for (k, v) in query {
        match k.as_str() {
            "state" => filter.state = Some(v),
            "label" => {
                let (lk, lv) = v.split_once('=').ok_or_else(|| {
                    HttpError::new(
                        ErrorCode::BadRequest,
                        format!("label filter {v:.60} is not key=value"),
                    )
                })?;
                filter.labels.push((lk.to_string(), lv.to_string()));
            }
            other => {
                return Err(HttpError::new(
                    ErrorCode::BadRequest,
                    format!("unknown filter {other:.40}"),
                ))
            }
        }
    }
    Ok(Json(state.api.list(&caller, filter).await?))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}", tag = "sandboxes",
    params(("id" = String, Path)),
    responses((status = 200, description = "state confirmed by a health check", body = SandboxInfo,
               headers(("Hutch-Checkpoint" = String, description = "the latest signed checkpoint of the sandbox's journal (a C2SP signed note), base64"))),
              (status = 404, body = ApiError)))]
async fn get_sandbox(
    State(state): AppStateRef,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<axum::response::Response> {
    let id = sandbox_id(&id)?;
    let info = Json(state.api.get(&caller, &id).await?).into_response();
    Ok(audit::with_checkpoint(&state, &caller, &id, info).await)
}

#[utoipa::path(delete, path = "/v1/sandboxes/{id}", tag = "sandboxes",
    params(("id" = String, Path)),
    responses((status = 200, body = SandboxInfo,
               headers(("Hutch-Checkpoint" = String, description = "the sealed journal's final signed checkpoint, base64"))),
              (status = 404, body = ApiError)))]
async fn destroy_sandbox(
    State(state): AppStateRef,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<axum::response::Response> {
    let id = sandbox_id(&id)?;
    let info = state
        .api
        .lifecycle(&caller, &id, Lifecycle::Destroy)
        .await?;
    Ok(audit::with_checkpoint(&state, &caller, &id, Json(info).into_response()).await)
}

macro_rules! lifecycle_route {
    ($name:ident, $path:literal, $method:ident, $doc:literal) => {
        #[doc = $doc]
        #[utoipa::path(post, path = $path, tag = "sandboxes", params(("id" = String, Path)),
                    responses((status = 200, body = SandboxInfo,
                               headers(("Hutch-Checkpoint" = String, description = "the latest signed checkpoint of the sandbox's journal, base64"))),
                              (status = 404, body = ApiError),
                              (status = 409, body = ApiError),
                              (status = 429, description = "no room to boot or restore it", body = ApiError)))]
        async fn $name(
            State(state): AppStateRef,
            Extension(caller): Extension<Caller>,
            Path(id): Path<String>,
        ) -> Result<axum::response::Response> {
            let id = sandbox_id(&id)?;
            let info = state.api.lifecycle(&caller, &id, Lifecycle::$method).await?;
            Ok(audit::with_checkpoint(&state, &caller, &id, Json(info).into_response()).await)
        }
    };
}

lifecycle_route!(
    pause,
    "/v1/sandboxes/{id}/pause",
    Pause,
    "Freezes the sandbox's vCPUs."
);
lifecycle_route!(
    resume,
    "/v1/sandboxes/{id}/resume",
    Resume,
    "Thaws a paused sandbox, or restores one paused to disk."
);
lifecycle_route!(
    suspend,
    "/v1/sandboxes/{id}/suspend",
    Suspend,
    "Pauses the sandbox to disk: saves its memory and disk and stops its VMM."
);
lifecycle_route!(
    start,
    "/v1/sandboxes/{id}/start",
    Start,
    "Boots a stopped sandbox again (a cold boot on a fresh disk, same id and spec)."
);
lifecycle_route!(
    stop,
    "/v1/sandboxes/{id}/stop",
    Stop,
    "Powers the sandbox off, keeping its record."
);

#[utoipa::path(get, path = "/v1/sandboxes/{id}/console", tag = "sandboxes",
    params(("id" = String, Path)),
    responses((status = 200, description = "guest console log (guest-controlled bytes)", content_type = "application/octet-stream")))]
async fn console(
    State(state): AppStateRef,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Vec<u8>> {
    Ok(state.api.console(&caller, &sandbox_id(&id)?).await?)
}

#[utoipa::path(put, path = "/v1/sandboxes/{id}/network", tag = "network", request_body = NetworkPolicy,
    params(("id" = String, Path)),
    responses((status = 200, body = SandboxInfo), (status = 409, body = ApiError)))]
async fn set_network(
    State(state): AppStateRef,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(policy): JsonBody<NetworkPolicy>,
) -> Result<Json<SandboxInfo>> {
    Ok(Json(
        state
            .api
            .set_network(&caller, &sandbox_id(&id)?, policy)
            .await?,
    ))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/network/log", tag = "network",
    params(("id" = String, Path)),
    responses((status = 200, body = Vec<NetEvent>)))]
async fn network_log(
    State(state): AppStateRef,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Vec<NetEvent>>> {
    let events = state.api.network_log(&caller, &sandbox_id(&id)?).await?;
    Ok(Json(events.into_iter().map(net_event).collect()))
}

/// The API form of a flow decision.
pub(crate) fn net_event(e: hutch_net::FlowEvent) -> NetEvent {
    let time_ms = e
        .time
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    NetEvent {
        time_ms,
        proto: match e.proto {
            hutch_net::Proto::Tcp => "tcp".into(),
            hutch_net::Proto::Udp => "udp".into(),
            hutch_net::Proto::Icmp => "icmp".into(),
            hutch_net::Proto::Other(n) => n.to_string(),
        },
        dst: e.dst.to_string(),
        dst_port: e.dst_port,
        domain: e.domain,
        verdict: match e.verdict {
            hutch_net::Verdict::Allow => "allow".into(),
            hutch_net::Verdict::Deny => "deny".into(),
        },
        rule: e.rule.as_str().into(),
    }
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec", tag = "exec", request_body = ExecBody,
    params(("id" = String, Path)),
    responses((status = 200, body = ExecResult), (status = 422, description = "command could not start", body = ApiError)))]
async fn exec(
    State(state): AppStateRef,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ExecBody>,
) -> Result<Json<ExecResult>> {
    let command = Command {
        argv: body.argv,
        env: body.env,
        cwd: body.cwd,
        timeout_secs: body.timeout_secs,
    };
    let stdin = body.stdin.map(String::into_bytes);
    let out = state
        .api
        .exec(
            &caller,
            &sandbox_id(&id)?,
            command,
            stdin,
            JSON_EXEC_OUTPUT_LIMIT,
        )
        .await?;
    let (exit_code, signal) = split_status(out.status);
    Ok(Json(ExecResult {
        exit_code,
        signal,
        timed_out: out.timed_out,
        truncated: out.truncated(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use axum::{body::Body, http::Request};
    use hutch_core::{Limits, Manager, ManagerConfig};
    use hutch_store::SqliteStore;
    use tower::ServiceExt;

    use super::*;

    /// Every operation the API offers, as (method, path).
    const OPERATIONS: &[(&str, &str)] = &[
        ("post", "/v1/sandboxes"),
        ("get", "/v1/sandboxes"),
        ("get", "/v1/sandboxes/{id}"),
        ("delete", "/v1/sandboxes/{id}"),
        ("post", "/v1/sandboxes/{id}/exec"),
        ("get", "/v1/sandboxes/{id}/exec/ws"),
        ("post", "/v1/sandboxes/{id}/pause"),
        ("post", "/v1/sandboxes/{id}/resume"),
        ("post", "/v1/sandboxes/{id}/stop"),
        ("post", "/v1/sandboxes/{id}/start"),
        ("get", "/v1/sandboxes/{id}/console"),
        ("put", "/v1/sandboxes/{id}/network"),
        ("get", "/v1/sandboxes/{id}/network/log"),
        ("put", "/v1/sandboxes/{id}/ports/{guest_port}"),
        ("delete", "/v1/sandboxes/{id}/ports/{guest_port}"),
        ("get", "/v1/sandboxes/{id}/ports"),
        ("put", "/v1/sandboxes/{id}/files"),
        ("get", "/v1/sandboxes/{id}/files"),
        ("put", "/v1/sandboxes/{id}/archive"),
        ("get", "/v1/sandboxes/{id}/archive"),
        ("post", "/v1/sandboxes/{id}/suspend"),
        ("post", "/v1/sandboxes/{id}/fork"),
        ("post", "/v1/templates"),
        ("get", "/v1/templates"),
        ("get", "/v1/templates/{name}"),
        ("delete", "/v1/templates/{name}"),
        ("put", "/v1/templates/{name}/pool"),
        ("post", "/v1/tasks"),
        ("get", "/v1/tasks"),
        ("get", "/v1/tasks/{id}"),
        ("get", "/v1/tasks/{id}/baseline"),
        ("get", "/v1/tasks/{id}/changeset"),
        ("get", "/v1/tasks/{id}/diff"),
        ("get", "/v1/tasks/{id}/signature"),
        ("get", "/v1/tasks/{id}/attestation"),
        ("put", "/v1/secrets/{name}"),
        ("get", "/v1/secrets"),
        ("delete", "/v1/secrets/{name}"),
        ("get", "/v1/sandboxes/{id}/secrets/log"),
        ("get", "/metrics"),
        ("get", "/.well-known/jwks.json"),
        ("get", "/.well-known/openid-configuration"),
        ("get", "/v1/sandboxes/{id}/audit"),
        ("get", "/v1/sandboxes/{id}/audit/verify"),
        ("get", "/v1/sandboxes/{id}/recordings/{exec}"),
    ];

    /// A daemon's state on a temporary home whose VMM cannot start (no VM in unit tests).
    pub(crate) fn state() -> (tempfile::TempDir, Arc<AppState>) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn hutch_store::Store> =
            Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
        let cfg = ManagerConfig {
            images: Arc::new(hutch_core::ImageDir::new(dir.path().join("images"))),
            runs_dir: dir.path().join("vms"),
            limits: Limits {
                max_sandboxes: 1,
                memory_budget_mib: 1024,
            },
            templates: hutch_core::Templates::new(
                dir.path().join("templates"),
                dir.path().join("shm"),
            ),
            snapshots_dir: dir.path().join("snapshots"),
            boot_timeout: Duration::from_secs(1),
            jails_dir: None,
            detached: true,
            secrets: Some(Arc::new(
                hutch_core::secrets::SecretStore::open(&dir.path().join("secrets")).unwrap(),
            )),
        };
        let vmm = Arc::new(hutch_vmm::QemuVmm::with_binary(
            "/nonexistent".into(),
            hutch_vmm::Accel::Tcg,
        ));
        let manager = Manager::new(cfg, store, vmm, Err("not in unit tests".into()));
        let tasks = Arc::new(hutch_core::task::Tasks::new(
            dir.path().join("tasks"),
            manager.clone(),
        ));
        (
            dir,
            Arc::new(AppState {
                store: manager.store().clone(),
                api: Arc::new(hutch_core::service::LocalApi::new(manager, tasks)),
                fleet: None,
            }),
        )
    }

    #[test]
    fn the_openapi_document_covers_every_route() {
        let doc = api_doc();
        let mut documented = Vec::new();
        for (path, item) in &doc.paths.paths {
            for (method, op) in [
                ("get", &item.get),
                ("post", &item.post),
                ("put", &item.put),
                ("delete", &item.delete),
            ] {
                if op.is_some() {
                    documented.push((method.to_string(), path.clone()));
                }
            }
        }
        documented.sort();
        let mut expected: Vec<_> = OPERATIONS
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        expected.sort();
        assert_eq!(documented, expected);
    }

    #[tokio::test]
    async fn every_documented_route_is_served() {
        let (_dir, state) = state();
        let app = router(state, Caller::admin());
        for (method, path) in OPERATIONS {
            let mut uri = path
                .replace("{id}", "sb-0123456789")
                .replace("{guest_port}", "8000")
                .replace("{name}", "nope");
            if path.ends_with("/files") || path.ends_with("/archive") {
                uri.push_str("?path=/x");
            }
            let req = Request::builder()
                .method(method.to_uppercase().as_str())
                .uri(uri)
                .header("content-type", "application/json")
                .body(Body::from(match *path {
                    "/v1/sandboxes" => "{\"cpus\":0}",
                    p if p.ends_with("/network") => "{\"mode\":\"open\"}",
                    p if p.ends_with("{guest_port}") => "{}",
                    p if p.ends_with("/fork") => "{\"count\":1}",
                    "/v1/templates" => "{\"name\":\"t\"}",
                    p if p.ends_with("/pool") => "{\"size\":1}",
                    // A new secret without a binding: refused.
                    "/v1/secrets/{name}" => "{\"value\":\"v\"}",
                    _ => "{\"argv\":[\"true\"]}",
                }))
                .unwrap();
            let resp = app.clone().oneshot(req).await.unwrap();
            let status = resp.status();
            let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap();
            // Our handlers answer with an ApiError body; the router's own 404/405 has none.
            let parsed: std::result::Result<ApiError, _> = serde_json::from_slice(&body);
            if matches!(
                *path,
                "/v1/sandboxes" | "/v1/templates" | "/v1/tasks" | "/v1/secrets" | "/metrics"
            ) && *method == "get"
            {
                assert_eq!(status, StatusCode::OK, "{method} {path}");
                continue;
            }
            let err = parsed
                .unwrap_or_else(|_| panic!("{method} {path}: {status} without an API error body"));
            assert_ne!(err.message, NO_ROUTE, "{method} {path} is not served");
            let want = if *path == "/v1/sandboxes" {
                ErrorCode::InvalidSpec
            } else if *path == "/v1/tasks" || (*path, *method) == ("/v1/secrets/{name}", "put") {
                ErrorCode::BadRequest
            } else {
                ErrorCode::NotFound
            };
            assert_eq!(err.code, want, "{method} {path}");
        }
    }

    #[tokio::test]
    async fn bad_json_is_a_400_with_a_stable_code() {
        let (_dir, state) = state();
        let app = router(state, Caller::admin());
        for body in ["{not json", "{\"cpus\":1,\"gpus\":4}", "[]"] {
            let req = Request::builder()
                .method("POST")
                .uri("/v1/sandboxes")
                .header("content-type", "application/json")
                .body(Body::from(body))
                .unwrap();
            let resp = app.clone().oneshot(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{body}");
            let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap();
            let err: ApiError = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(err.code, ErrorCode::BadRequest);
        }
    }

    /// Sends `method uri` with a JSON `body`; the status and the API error it answered with.
    async fn error_of(app: &Router, method: &str, uri: &str, body: &str) -> (StatusCode, ApiError) {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let err = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            panic!(
                "{method} {uri}: {status} {:?} is not an API error",
                String::from_utf8_lossy(&bytes)
            )
        });
        (status, err)
    }

    #[tokio::test]
    async fn malformed_paths_queries_and_bodies_get_the_json_error() {
        let (_dir, state) = state();
        let app = router(state, Caller::admin());
        for (method, uri, body) in [
            ("PUT", "/v1/sandboxes/sb-01/ports/http", "{}"),
            ("PUT", "/v1/sandboxes/sb-01/ports/70000", "{}"),
            ("POST", "/v1/tasks?stream=maybe", ""),
            ("GET", "/v1/sandboxes/sb-01/files?path=/x&path=/y&what", ""),
            ("POST", "/v1/sandboxes/sb-01/exec", "{\"argv\":"),
            (
                "POST",
                "/v1/sandboxes/sb-01/exec",
                "{\"argv\":[\"true\"],\"shell\":1}",
            ),
            ("PUT", "/v1/templates/t/pool", "{\"size\":-1}"),
        ] {
            let (status, err) = error_of(&app, method, uri, body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{method} {uri} {body}");
            assert_eq!(err.code, ErrorCode::BadRequest, "{method} {uri} {body}");
        }
        let (status, err) = error_of(&app, "GET", "/v2/nothing", "").await;
        assert_eq!(
            (status, err.code),
            (StatusCode::NOT_FOUND, ErrorCode::NotFound)
        );
    }

    #[tokio::test]
    async fn a_template_name_with_nul_is_a_400_that_shows_no_host_path() {
        let (dir, state) = state();
        std::fs::create_dir_all(dir.path().join("templates")).unwrap();
        let app = router(state, Caller::admin());
        let (status, err) = error_of(
            &app,
            "POST",
            "/v1/sandboxes",
            "{\"template\":\"t\\u0000x\"}",
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{}", err.message);
        assert_eq!(err.code, ErrorCode::InvalidSpec);
        let home = dir.path().to_string_lossy().into_owned();
        assert!(!err.message.contains(&home), "{}", err.message);
        for method in ["GET", "DELETE"] {
            let (status, err) = error_of(&app, method, "/v1/templates/t%00x", "").await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{method}: {}", err.message);
            assert!(!err.message.contains(&home), "{}", err.message);
        }
    }

    #[tokio::test]
    async fn a_task_upload_is_a_multipart_form_of_spec_and_workspace() {
        let (_dir, state) = state();
        let app = router(state, Caller::admin());
        let spec: hutch_task::TaskSpec =
            serde_json::from_str(r#"{"command":["true"],"verify":"false"}"#).unwrap();
        let (content_type, body) = hutch_api::client::task_form(&spec, b"not a tar");
        let req = Request::builder()
            .header("content-type", content_type)
            .body(Body::from(body))
            .unwrap();
        let form =
            <axum::extract::Multipart as axum::extract::FromRequest<()>>::from_request(req, &())
                .await;
        let upload = tasks::TaskUpload::read(form).await.unwrap();
        assert_eq!(upload.spec, spec);
        assert_eq!(upload.workspace, b"not a tar");

        let (no_workspace_type, no_workspace) = hutch_api::client::task_form(&spec, b"");
        let cut = String::from_utf8_lossy(&no_workspace)
            .find("workspace")
            .unwrap();
        let mut truncated = no_workspace[..cut].to_vec();
        truncated.extend_from_slice(b"x\"\r\n\r\n\r\n");
        for (content_type, body) in [
            (
                "application/octet-stream".to_string(),
                b"\x05\0\0\0{}".to_vec(),
            ),
            (no_workspace_type, truncated),
        ] {
            let req = Request::builder()
                .method("POST")
                .uri("/v1/tasks")
                .header("content-type", content_type)
                .body(Body::from(body))
                .unwrap();
            let resp = app.clone().oneshot(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
            let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap();
            let err: ApiError = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(err.code, ErrorCode::BadRequest, "{}", err.message);
        }
    }

    #[test]
    fn allowed_ports_are_documented_as_ports() {
        let doc = serde_json::to_value(api_doc()).unwrap();
        let variants = doc["components"]["schemas"]["NetworkPolicy"]["oneOf"]
            .as_array()
            .expect("NetworkPolicy is a oneOf");
        let items = variants
            .iter()
            .find_map(|v| v["properties"]["ports"]["items"].as_object())
            .expect("the allow variant lists ports");
        assert_eq!(items["type"], "integer");
        assert_eq!(items["minimum"].as_f64(), Some(0.0));
        assert_eq!(items["maximum"].as_f64(), Some(65535.0));
    }

    #[test]
    fn the_openapi_document_names_its_security_and_every_error_status() {
        let doc = serde_json::to_value(api_doc()).unwrap();
        let scheme = &doc["components"]["securitySchemes"]["bearer"];
        assert_eq!(scheme["type"], "http");
        assert_eq!(scheme["scheme"], "bearer");
        assert_eq!(doc["security"][0]["bearer"], serde_json::json!([]));
        for (method, path) in OPERATIONS {
            let responses = &doc["paths"][path][method]["responses"];
            let mut want = vec!["400", "500"];
            if !crate::observe::is_public(path) {
                want.push("401");
            }
            if path.contains('{') {
                want.extend(["403", "404"]);
            }
            for status in want {
                assert!(
                    responses[status]["content"]["application/json"].is_object(),
                    "{method} {path} does not document {status}"
                );
            }
        }
    }

    #[test]
    fn the_documented_constraints_are_the_ones_the_daemon_enforces() {
        use hutch_types::bounds::*;
        let doc = serde_json::to_value(api_doc()).unwrap();
        let schemas = &doc["components"]["schemas"];
        let range = |schema: &str, field: &str| {
            let p = &schemas[schema]["properties"][field];
            (p["minimum"].as_u64(), p["maximum"].as_u64())
        };
        for schema in ["SandboxSpec", "TemplateSpec"] {
            assert_eq!(range(schema, "cpus"), (Some(1), Some(MAX_CPUS.into())));
            assert_eq!(
                range(schema, "memory_mib"),
                (Some(MIN_MEMORY_MIB.into()), Some(MAX_MEMORY_MIB.into()))
            );
            assert_eq!(
                range(schema, "disk_mib"),
                (Some(MIN_DISK_MIB), Some(MAX_DISK_MIB))
            );
            // `hutch_types::valid_name`'s rule.
            assert_eq!(
                schemas[schema]["properties"]["image"]["pattern"],
                "^[a-z0-9][a-z0-9._-]{0,62}$"
            );
            assert_eq!(schemas[schema]["additionalProperties"], false);
        }
        assert_eq!(
            range("SandboxSpec", "ttl_secs"),
            (Some(1), Some(MAX_TTL_SECS))
        );
        assert_eq!(
            range("ForkBody", "count"),
            (Some(1), Some(hutch_core::MAX_FORK.into()))
        );
        assert_eq!(
            range("PoolBody", "size").1,
            Some(hutch_core::MAX_POOL.into())
        );
        assert_eq!(schemas["ExecBody"]["properties"]["argv"]["minItems"], 1);
        assert_eq!(schemas["TaskSpec"]["properties"]["command"]["minItems"], 1);
        // A create's idempotency key is one of its properties, not an unknown one.
        let create = &schemas["CreateSandbox"];
        assert_eq!(create["additionalProperties"], false, "{create}");
        assert!(
            create["properties"]["idempotency_key"].is_object(),
            "{create}"
        );
        assert_eq!(
            create["properties"]["cpus"],
            schemas["SandboxSpec"]["properties"]["cpus"]
        );
    }

    #[tokio::test]
    async fn identity_discovery_is_public_and_metrics_are_not() {
        let (_dir, state) = state();
        let app = router_with_tokens(state);
        let get = |uri: &str| {
            app.clone()
                .oneshot(Request::builder().uri(uri).body(Body::empty()).unwrap())
        };
        // No issuer in unit tests: a 404, but never a 401.
        for uri in [
            "/.well-known/jwks.json",
            "/.well-known/openid-configuration",
        ] {
            assert_eq!(
                get(uri).await.unwrap().status(),
                StatusCode::NOT_FOUND,
                "{uri}"
            );
        }
        assert_eq!(
            get("/metrics").await.unwrap().status(),
            StatusCode::UNAUTHORIZED
        );
        let doc = serde_json::to_value(api_doc()).unwrap();
        let jwks = &doc["paths"]["/.well-known/jwks.json"]["get"];
        assert_eq!(jwks["security"], serde_json::json!([{}]), "{jwks}");
        assert!(jwks["responses"]["401"].is_null());
    }

    #[tokio::test]
    async fn tcp_requires_a_known_token() {
        let (_dir, state) = state();
        let app = router_with_tokens(state);
        for auth in [None, Some("Bearer nope")] {
            let mut req = Request::builder().uri("/v1/sandboxes");
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let resp = app
                .clone()
                .oneshot(req.body(Body::empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        }
    }
    #[tokio::test]
    async fn a_secret_goes_in_and_its_value_never_comes_out() {
        let (_dir, state) = state();
        let app = router(state, Caller::admin());
        let body = r#"{"value":"sk-REAL-value","env":"API_KEY","bindings":[{"host":"API.example.test","at":{"kind":"bearer"}}]}"#;
        let send = |method: &str, uri: &str, body: &str| {
            Request::builder()
                .method(method)
                .uri(uri)
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .unwrap()
        };
        for (method, uri, body) in [
            ("PUT", "/v1/secrets/api", body),
            ("GET", "/v1/secrets", ""),
            ("DELETE", "/v1/secrets/api", ""),
        ] {
            let resp = app.clone().oneshot(send(method, uri, body)).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "{method} {uri}");
            let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap();
            let text = String::from_utf8_lossy(&bytes);
            assert!(!text.contains("sk-REAL"), "{method} {uri}: {text}");
            assert!(text.contains("api.example.test"), "{method} {uri}: {text}");
        }
        let (status, err) = error_of(&app, "DELETE", "/v1/secrets/api", "").await;
        assert_eq!(
            (status, err.code),
            (StatusCode::NOT_FOUND, ErrorCode::NotFound)
        );
        let (status, _) = error_of(&app, "PUT", "/v1/secrets/-bad", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }
}
