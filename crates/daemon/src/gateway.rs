//! `hutch gateway`: the daemon's HTTP API in front of a fleet of hosts.
//!
//! A gateway keeps no state of its own: hosts, slot bookings, placements and tokens come from
//! etcd through a watch-fed [`FleetCache`], so any number of gateways can serve the same
//! fleet. It is a reverse proxy rather than a second implementation of
//! [`hutch_core::service::SandboxApi`]: that trait hands back guest-side objects (an exec
//! stream is the guest channel's [`hutch_protocol::host::Exec`], transfers write into local
//! pipes) that only the owning host can make, while forwarding the HTTP exchange carries every
//! route, WebSockets included, unchanged, with one OpenAPI document for both.
//!
//! - A **create** is placed: hosts are filtered (labels, backend, zone, free memory, a free
//!   slot), two drawn at random and the freer one booked by compare-and-swap
//!   ([`hutch_fleet::place`]); a host that is full, or answers 429, is excluded and the next
//!   tried; no host left is a 429. The host's answer is recorded as the sandbox's placement.
//! - **Every other sandbox call** (`/v1/sandboxes/{id}/…`: lifecycle, exec and PTY
//!   WebSockets, files, archives, console, network, ports, journal) goes to the owning host,
//!   found in the cache; a destroy also removes the placement and frees the slot. The list is
//!   the union of every host's.
//! - **Tokens** are fleet tokens (in etcd): the gateway refuses an unknown one (401) and one
//!   whose label the sandbox lacks (403) before forwarding, and passes the client's token on,
//!   so each host checks it again; nothing reaches a host unauthenticated.
//!
//! Templates, tasks, secrets, metrics and MCP are per host and not served here yet (404).

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use axum::{
    body::Body,
    extract::{Request, State},
    http::{header, HeaderValue, Method, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    Json, Router,
};
use hutch_api::CreateSandbox;
use hutch_fleet::{
    place::{self, Booking, Wanted},
    tokens, Fleet, FleetCache, HostRecord, Placement,
};
use hutch_types::{ErrorCode, SandboxInfo, TokenScope};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::{args::GatewayArgs, http_error::HttpError, DaemonError};

/// Most bytes of a create's body (a sandbox spec).
const MAX_CREATE_BODY: usize = 1 << 20;
/// Most bytes of one host's list answer.
const MAX_LIST_BODY: usize = 64 << 20;
/// How long a host may take to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// `hutch fleet-token`: mints a fleet token.
#[derive(Debug, clap::Args)]
pub struct FleetTokenArgs {
    /// The fleet (`etcd://h1:2379,h2:2379`).
    #[arg(long, value_name = "URL")]
    pub fleet: String,
    /// Limit the token to sandboxes with this label (`key=value`); admin otherwise.
    #[arg(long, value_name = "K=V")]
    pub label: Option<String>,
    /// Options every fleet member shares.
    #[command(flatten)]
    pub fleet_opts: crate::FleetOpts,
}

/// Mints a fleet token (stored in etcd by its hash): the token and its id.
pub async fn create_token(args: FleetTokenArgs) -> Result<(String, String), DaemonError> {
    if args.label.as_deref().is_some_and(|l| !l.contains('=')) {
        return Err(DaemonError::FleetArgs("--label must be key=value".into()));
    }
    let fleet = Fleet::connect_prefixed(&args.fleet, &args.fleet_opts.fleet_prefix)
        .await
        .map_err(DaemonError::Fleet)?;
    let (token, record) = tokens::create(&fleet, args.label)
        .await
        .map_err(DaemonError::Fleet)?;
    Ok((token, record.id))
}

/// What every request shares.
struct Gateway {
    fleet: Fleet,
    cache: FleetCache,
    doc: serde_json::Value,
}

type Shared = State<Arc<Gateway>>;

/// Runs a gateway until `shutdown` resolves.
pub async fn run(
    args: GatewayArgs,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    let fleet = Fleet::connect_prefixed(&args.fleet, &args.fleet_opts.fleet_prefix)
        .await
        .map_err(DaemonError::Fleet)?;
    let cache = FleetCache::start(fleet.clone())
        .await
        .map_err(DaemonError::Fleet)?;
    let listener = TcpListener::bind(&args.listen)
        .await
        .map_err(|source| DaemonError::Bind {
            addr: args.listen.clone(),
            source,
        })?;
    let app = router(fleet, cache);
    eprintln!(
        "hutch gateway: serving the fleet {} on http://{} (fleet tokens required)",
        args.fleet, args.listen
    );
    let limits = crate::listen::TcpLimits {
        max_unauthenticated: 1024,
        header_timeout: Duration::from_secs(30),
    };
    tokio::select! {
        _ = shutdown => {}
        _ = crate::listen::serve_tcp(listener, app, limits) => {}
    }
    eprintln!("hutch gateway: stopped");
    Ok(())
}

/// The gateway's routes over `fleet`, seen through `cache`.
fn router(fleet: Fleet, cache: FleetCache) -> Router {
    let doc = serde_json::to_value(crate::routes::api_doc()).expect("the document serialises");
    let gateway = Arc::new(Gateway { fleet, cache, doc });
    Router::new()
        .route("/openapi.json", axum::routing::get(document))
        .route("/v1/sandboxes", axum::routing::post(create).get(list))
        .route("/v1/sandboxes/{id}", axum::routing::any(to_owner))
        .route("/v1/sandboxes/{id}/{*rest}", axum::routing::any(to_owner))
        .fallback(|| async {
            HttpError::new(
                ErrorCode::NotFound,
                "no such route on a fleet gateway (templates, tasks, secrets, metrics and MCP are per host)",
            )
        })
        .layer(middleware::from_fn(crate::listen::authenticated))
        .layer(middleware::from_fn_with_state(gateway.clone(), require_token))
        .with_state(gateway)
}

/// Resolves the bearer token to its fleet scope (401 for an unknown one).
async fn require_token(
    State(gw): Shared,
    mut req: Request,
    next: Next,
) -> Result<Response, HttpError> {
    let token = bearer(&req)
        .ok_or_else(|| HttpError::new(ErrorCode::Unauthorized, "a bearer token is required"))?;
    let record = gw
        .cache
        .token(&tokens::hash(token))
        .ok_or_else(|| HttpError::new(ErrorCode::Unauthorized, "unknown token"))?;
    req.extensions_mut().insert(crate::fleet::scope(&record));
    Ok(next.run(req).await)
}

fn bearer(req: &Request) -> Option<&str> {
    req.headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

async fn document(State(gw): Shared) -> Json<serde_json::Value> {
    Json(gw.doc.clone())
}

/// `POST /v1/sandboxes`: placement, then the create on the chosen host.
async fn create(State(gw): Shared, req: Request) -> Result<Response, HttpError> {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, MAX_CREATE_BODY)
        .await
        .map_err(|e| HttpError::new(ErrorCode::BadRequest, format!("reading the body: {e}")))?;
    let spec: CreateSandbox = serde_json::from_slice(&body)
        .map_err(|e| HttpError::new(ErrorCode::BadRequest, format!("bad create body: {e}")))?;
    let wanted = Wanted::for_sandbox(&spec.spec.labels, u64::from(spec.spec.memory_mib));
    let mut excluded = BTreeSet::new();
    loop {
        let Some(host) = place::choose(&gw.cache.snapshot(), &wanted, &excluded) else {
            return Err(HttpError::new(
                ErrorCode::OverCapacity,
                "no host in the fleet has room for this sandbox",
            ));
        };
        match place::book(&gw.fleet, &host.host, host.capacity.slots)
            .await
            .map_err(fleet_error)?
        {
            Booking::Full => {
                excluded.insert(host.host);
                continue;
            }
            Booking::Booked => {}
        }
        let out = Request::from_parts(parts.clone(), Body::from(body.clone()));
        let answer = match forward(&host, out).await {
            Ok(answer) => answer,
            Err(e) => {
                tracing::warn!(host = %host.host, error = %e.0.message, "host unreachable; trying another");
                release(&gw.fleet, &host.host).await;
                excluded.insert(host.host);
                continue;
            }
        };
        if answer.status() == StatusCode::TOO_MANY_REQUESTS {
            release(&gw.fleet, &host.host).await;
            excluded.insert(host.host);
            continue;
        }
        if !answer.status().is_success() {
            release(&gw.fleet, &host.host).await;
            return Ok(answer);
        }
        return placed(&gw, &host, answer).await;
    }
}

/// Records a created sandbox's placement and answers as the host did. A create answered
/// from an earlier one (same idempotency key) is placed already: its booking goes back.
async fn placed(gw: &Gateway, host: &HostRecord, answer: Response) -> Result<Response, HttpError> {
    let (parts, body) = answer.into_parts();
    let body = axum::body::to_bytes(Body::new(body), MAX_CREATE_BODY)
        .await
        .map_err(|e| {
            HttpError::new(
                ErrorCode::Internal,
                format!("reading the host's answer: {e}"),
            )
        })?;
    let info: SandboxInfo = serde_json::from_slice(&body).map_err(|e| {
        HttpError::new(
            ErrorCode::Internal,
            format!("the host's answer is no sandbox: {e}"),
        )
    })?;
    let placement = Placement {
        sandbox: info.id.clone(),
        host: host.host.clone(),
        incarnation: host.incarnation,
        labels: info.spec.labels.clone(),
    };
    if !place::record(&gw.fleet, &placement)
        .await
        .map_err(fleet_error)?
    {
        release(&gw.fleet, &host.host).await;
    }
    Ok(Response::from_parts(parts, Body::from(body)))
}

/// Gives a booked slot back (logged when etcd refuses: the slot stays booked, erring on
/// the side of never over-committing a host).
async fn release(fleet: &Fleet, host: &str) {
    if let Err(e) = place::release(fleet, host).await {
        tracing::warn!(host, error = %hutch_core::chain(&e), "releasing a booked slot failed");
    }
}

/// `GET /v1/sandboxes`: every host's list, as the caller may see it, in one.
async fn list(State(gw): Shared, req: Request) -> Result<Response, HttpError> {
    let hosts: Vec<HostRecord> = gw.cache.snapshot().hosts.into_values().collect();
    let (parts, _) = req.into_parts();
    let mut all: Vec<serde_json::Value> = Vec::new();
    for host in hosts {
        let answer = forward(&host, Request::from_parts(parts.clone(), Body::empty())).await?;
        if !answer.status().is_success() {
            return Ok(answer);
        }
        let body = axum::body::to_bytes(answer.into_body(), MAX_LIST_BODY)
            .await
            .map_err(|e| host_error(&host, e))?;
        let mut listed: Vec<serde_json::Value> =
            serde_json::from_slice(&body).map_err(|e| host_error(&host, e))?;
        all.append(&mut listed);
    }
    Ok(Json(all).into_response())
}

/// `/v1/sandboxes/{id}[/…]`: to the owning host, the caller's scope checked first.
async fn to_owner(State(gw): Shared, req: Request) -> Result<Response, HttpError> {
    let id = req
        .uri()
        .path()
        .strip_prefix("/v1/sandboxes/")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_default()
        .to_string();
    let placement = owner(&gw, &id).await?;
    let scope = req
        .extensions()
        .get::<TokenScope>()
        .cloned()
        .unwrap_or(TokenScope::Admin);
    scope
        .allows_labels("sandboxes", &placement.labels)
        .map_err(|e| HttpError::new(ErrorCode::Forbidden, e.0))?;
    let host = gw.cache.host(&placement.host).ok_or_else(|| {
        HttpError::new(
            ErrorCode::Conflict,
            format!(
                "sandbox {id}'s host {} is not in the fleet now",
                placement.host
            ),
        )
    })?;
    let destroy =
        req.method() == Method::DELETE && req.uri().path().trim_end_matches('/').ends_with(&id);
    let answer = forward(&host, req).await?;
    if destroy && answer.status().is_success() {
        if let Err(e) = place::forget(&gw.fleet, &id).await {
            tracing::warn!(sandbox = %id, error = %hutch_core::chain(&e), "removing a placement failed");
        }
    }
    Ok(answer)
}

/// The placement of sandbox `id`: from the cache, or from etcd when another gateway placed it
/// a moment ago and the watch has not brought it yet.
async fn owner(gw: &Gateway, id: &str) -> Result<Placement, HttpError> {
    if let Some(p) = gw.cache.placement(id) {
        return Ok(p);
    }
    let not_found = || {
        HttpError::new(
            ErrorCode::NotFound,
            format!("no sandbox {id:.80} in the fleet"),
        )
    };
    if id.is_empty()
        || id.len() > 128
        || id.contains(|c: char| !c.is_ascii_alphanumeric() && c != '-')
    {
        return Err(not_found());
    }
    let got = gw
        .fleet
        .client()
        .get(gw.fleet.keys().placement(id), None)
        .await
        .map_err(|e| HttpError::new(ErrorCode::Internal, format!("reading the fleet: {e}")))?;
    let kv = got.kvs().first().ok_or_else(not_found)?;
    serde_json::from_slice(kv.value())
        .map_err(|e| HttpError::new(ErrorCode::Internal, format!("placement of {id}: {e}")))
}

/// Sends `req` to `host` as it came (method, path, query, headers, body; the client's token
/// included) and streams the answer back. An upgrade (an exec WebSocket) is joined end to
/// end once both sides switched protocols.
async fn forward(host: &HostRecord, mut req: Request) -> Result<Response, HttpError> {
    let authority = crate::fleet::authority(&host.advertise).ok_or_else(|| {
        HttpError::new(
            ErrorCode::Internal,
            format!("host {} advertises no http://host:port", host.host),
        )
    })?;
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(authority))
        .await
        .map_err(|_| host_error(host, "connect timed out"))?
        .map_err(|e| host_error(host, e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(stream))
        .await
        .map_err(|e| host_error(host, e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "host connection ended");
        }
    });
    let upgrading = req.headers().contains_key(header::UPGRADE);
    let client_side = upgrading.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    parts.uri = path.parse().map_err(|e| host_error(host, e))?;
    parts.headers.insert(
        header::HOST,
        HeaderValue::from_str(authority).map_err(|e| host_error(host, e))?,
    );
    let mut answer = sender
        .send_request(Request::from_parts(parts, body))
        .await
        .map_err(|e| host_error(host, e))?;
    if answer.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_side) = client_side {
            let host_side = hyper::upgrade::on(&mut answer);
            tokio::spawn(async move {
                let (Ok(client), Ok(host)) = (client_side.await, host_side.await) else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(
                    &mut TokioIo::new(client),
                    &mut TokioIo::new(host),
                )
                .await;
            });
        }
    }
    Ok(answer.map(Body::new))
}

fn host_error(host: &HostRecord, e: impl std::fmt::Display) -> HttpError {
    HttpError::new(
        ErrorCode::Internal,
        format!("host {} ({}): {e}", host.host, host.advertise),
    )
}

fn fleet_error(e: hutch_fleet::FleetError) -> HttpError {
    HttpError::new(ErrorCode::Internal, hutch_core::chain(&e))
}
