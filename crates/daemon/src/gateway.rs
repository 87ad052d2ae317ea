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
//! - **Host loss** is shown, not hidden: a sandbox whose host vanished is reported by get and
//!   list as `unreachable`, then `lost` (from its placement record, moved by the elected
//!   [`Reconciler`] every gateway and host campaigns for); any other call on it is a 409.
//! - **The fleet itself** (admin tokens): `GET /v1/fleet/hosts` (capacity, health,
//!   incarnation, drained), `PUT`/`DELETE /v1/fleet/hosts/{host}/drain`, and
//!   `GET /v1/fleet/sandboxes` (every sandbox with its host), in the gateway's OpenAPI
//!   document beside the daemon's routes.
//!
//! Templates, tasks, secrets, metrics and MCP are per host and not served here yet (404).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use axum::{
    body::Body,
    extract::{Path, Request, State},
    http::{header, HeaderValue, Method, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    Json, Router,
};
use hutch_api::{ApiError, CreateSandbox};
use hutch_fleet::{
    place::{self, Booking, Wanted},
    tokens, Fleet, FleetCache, FleetState, HostRecord, Placement, PlacementState, Reconciler,
    Shape,
};
use hutch_types::{ErrorCode, SandboxInfo, SandboxSpec, SandboxState, TokenScope};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

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
    cache: Arc<FleetCache>,
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
    let cache = Arc::new(
        FleetCache::start(fleet.clone())
            .await
            .map_err(DaemonError::Fleet)?,
    );
    let _reconciler = Reconciler::start(
        fleet.clone(),
        cache.clone(),
        crate::fleet::member_id("gateway", &args.listen),
        Duration::from_secs(args.fleet_opts.fleet_lease_ttl),
        Duration::from_secs(args.fleet_opts.fleet_lost_after),
    );
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

/// The gateway's own routes (the fleet's), with their part of the OpenAPI document.
fn fleet_api() -> OpenApiRouter<Arc<Gateway>> {
    OpenApiRouter::new()
        .routes(routes!(fleet_hosts))
        .routes(routes!(drain, undrain))
        .routes(routes!(fleet_sandboxes))
}

/// The gateway's OpenAPI document: the daemon's, and the fleet's routes.
pub(crate) fn gateway_doc() -> utoipa::openapi::OpenApi {
    let mut doc = crate::routes::api_doc();
    let (_, mut fleet_doc) = fleet_api().split_for_parts();
    crate::openapi::complete(&mut fleet_doc);
    doc.merge(fleet_doc);
    doc
}

/// The gateway's routes over `fleet`, seen through `cache`.
fn router(fleet: Fleet, cache: Arc<FleetCache>) -> Router {
    let doc = serde_json::to_value(gateway_doc()).expect("the document serialises");
    let gateway = Arc::new(Gateway { fleet, cache, doc });
    let (fleet_routes, _) = fleet_api().split_for_parts();
    Router::new()
        .merge(fleet_routes)
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
        shape: Shape {
            image: info.spec.image.clone(),
            cpus: info.spec.cpus,
            memory_mib: info.spec.memory_mib,
            created_at_ms: info.created_at_ms,
            expires_at_ms: info.expires_at_ms,
        },
        ..Placement::default()
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

/// `GET /v1/sandboxes`: every host's list, as the caller may see it, in one; the sandboxes of
/// hosts that vanished or do not answer, from their placements (`unreachable`, `lost`).
async fn list(State(gw): Shared, req: Request) -> Result<Response, HttpError> {
    let all = everywhere(&gw, req).await?;
    Ok(Json(all.into_iter().map(|s| s.sandbox).collect::<Vec<_>>()).into_response())
}

/// One sandbox of the fleet and where it runs.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FleetSandbox {
    /// The host that owns it (its name in the fleet).
    pub host: String,
    /// The host incarnation that holds it (0 for a sandbox placed on the host directly).
    pub incarnation: u64,
    /// The sandbox as its host reports it, or as its placement describes it while the host
    /// is away (state `unreachable` or `lost`).
    pub sandbox: SandboxInfo,
}

/// Every sandbox of the fleet the caller may see: each live host's list (asked with the
/// caller's token, so each host applies its scope and the query's filters), and the
/// placements of hosts that are gone or do not answer, filtered here the same way.
async fn everywhere(gw: &Gateway, req: Request) -> Result<Vec<FleetSandbox>, HttpError> {
    let view = gw.cache.snapshot();
    let scope = scope_of(&req);
    let query = req.uri().query().unwrap_or("").to_string();
    let filter = ListQuery::parse(&query)?;
    let (mut parts, _) = req.into_parts();
    // Each host is asked its own list, whichever of the gateway's list routes was called.
    parts.uri = format!("/v1/sandboxes?{query}")
        .parse()
        .map_err(|e| HttpError::new(ErrorCode::BadRequest, format!("bad query: {e}")))?;
    let mut all = Vec::new();
    let mut answered = BTreeSet::new();
    for host in view.hosts.values() {
        let out = Request::from_parts(parts.clone(), Body::empty());
        match host_list(host, out).await {
            Ok(Ok(listed)) => {
                answered.insert(host.host.clone());
                all.extend(listed.into_iter().map(|mut sandbox| {
                    let placed = view.placements.get(&sandbox.id);
                    // Given up while its host was away: lost, even if the VM still runs
                    // there until the host's fence stops it.
                    if placed.is_some_and(|p| p.state == PlacementState::Lost) {
                        sandbox.state = SandboxState::Lost;
                    }
                    FleetSandbox {
                        host: host.host.clone(),
                        incarnation: placed.map_or(0, |p| p.incarnation),
                        sandbox,
                    }
                }));
            }
            // The host refused the caller (a bad filter, a token it does not know): as is.
            Ok(Err(answer)) => return Err(answer),
            Err(e) => {
                tracing::warn!(host = %host.host, error = %e.0.message, "host did not answer a list")
            }
        }
    }
    for p in view.placements.values() {
        if answered.contains(&p.host) || scope.allows_labels("sandboxes", &p.labels).is_err() {
            continue;
        }
        let sandbox = described(p);
        if filter.admits(&sandbox) {
            all.push(FleetSandbox {
                host: p.host.clone(),
                incarnation: p.incarnation,
                sandbox,
            });
        }
    }
    Ok(all)
}

/// One host's list answer: the sandboxes, its refusal as it answered, or why it gave none.
async fn host_list(
    host: &HostRecord,
    req: Request,
) -> Result<Result<Vec<SandboxInfo>, HttpError>, HttpError> {
    let answer = forward(host, req).await?;
    let status = answer.status();
    let body = axum::body::to_bytes(answer.into_body(), MAX_LIST_BODY)
        .await
        .map_err(|e| host_error(host, e))?;
    if status.is_client_error() {
        let err: ApiError = serde_json::from_slice(&body).map_err(|e| host_error(host, e))?;
        return Ok(Err(HttpError::new(err.code, err.message)));
    }
    if !status.is_success() {
        return Err(host_error(host, status));
    }
    Ok(Ok(
        serde_json::from_slice(&body).map_err(|e| host_error(host, e))?
    ))
}

/// A list's filters (`state=`, `label=k=v`), applied to sandboxes described here.
struct ListQuery {
    state: Option<String>,
    labels: Vec<(String, String)>,
}

impl ListQuery {
    fn parse(query: &str) -> Result<ListQuery, HttpError> {
        let uri: axum::http::Uri = format!("/?{query}")
            .parse()
            .map_err(|e| HttpError::new(ErrorCode::BadRequest, format!("bad query: {e}")))?;
        let axum::extract::Query(pairs) =
            axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&uri)
                .map_err(|e| HttpError::new(ErrorCode::BadRequest, format!("bad query: {e}")))?;
        let mut filter = ListQuery {
            state: None,
            labels: Vec::new(),
        };
        for (k, v) in pairs {
            match k.as_str() {
                "state" => filter.state = Some(v),
                "label" => {
                    let (lk, lv) = v.split_once('=').ok_or_else(|| {
                        HttpError::new(ErrorCode::BadRequest, "label filter must be key=value")
                    })?;
                    filter.labels.push((lk.to_string(), lv.to_string()));
                }
                _ => {}
            }
        }
        Ok(filter)
    }

    fn admits(&self, sandbox: &SandboxInfo) -> bool {
        self.state
            .as_deref()
            .is_none_or(|s| s == sandbox.state.name())
            && self
                .labels
                .iter()
                .all(|(k, v)| sandbox.spec.labels.get(k) == Some(v))
    }
}

/// A sandbox as its placement describes it while its host is away: `lost` when marked so,
/// `unreachable` otherwise (marked so, or its host gone or silent before the reconciler
/// noticed).
fn described(p: &Placement) -> SandboxInfo {
    let state = match p.state {
        PlacementState::Lost => SandboxState::Lost,
        _ => SandboxState::Unreachable,
    };
    SandboxInfo {
        id: p.sandbox.clone(),
        state,
        spec: SandboxSpec {
            image: p.shape.image.clone(),
            cpus: p.shape.cpus,
            memory_mib: p.shape.memory_mib,
            labels: p.labels.clone(),
            ..SandboxSpec::default()
        },
        created_at_ms: p.shape.created_at_ms,
        updated_at_ms: p.since_ms.map_or(0, |ms| ms as i64),
        expires_at_ms: p.shape.expires_at_ms,
    }
}

/// Whether `req` is a get of sandbox `id` itself.
fn is_get(req: &Request, id: &str) -> bool {
    req.method() == Method::GET
        && req.uri().path().trim_end_matches('/') == format!("/v1/sandboxes/{id}")
}

fn scope_of(req: &Request) -> TokenScope {
    req.extensions()
        .get::<TokenScope>()
        .cloned()
        .unwrap_or(TokenScope::Admin)
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
    scope_of(&req)
        .allows_labels("sandboxes", &placement.labels)
        .map_err(|e| HttpError::new(ErrorCode::Forbidden, e.0))?;
    let host = gw
        .cache
        .host(&placement.host)
        .filter(|_| placement.state == PlacementState::Running);
    let Some(host) = host else {
        // Its host is away: a get says so; nothing else can reach the sandbox.
        let info = described(&placement);
        if is_get(&req, &id) {
            return Ok(Json(info).into_response());
        }
        return Err(HttpError::new(
            ErrorCode::Conflict,
            format!(
                "sandbox {id} is {}: its host {} left the fleet{}",
                info.state.name(),
                placement.host,
                if info.state == SandboxState::Lost {
                    " and stayed away past the grace period; it is not recreated elsewhere"
                } else {
                    "; it comes back if the host returns within the grace period"
                }
            ),
        ));
    };
    let destroy =
        req.method() == Method::DELETE && req.uri().path().trim_end_matches('/').ends_with(&id);
    let get = is_get(&req, &id);
    let answer = match forward(&host, req).await {
        Ok(answer) => answer,
        // Its host holds its lease but does not answer (dead, not yet noticed): a get
        // reports the sandbox unreachable, not a proxy error.
        Err(_) if get => return Ok(Json(described(&placement)).into_response()),
        Err(e) => return Err(e),
    };
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

/// A host of the fleet as `hutch fleet hosts` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FleetHost {
    /// Its name in the fleet.
    pub host: String,
    /// `up` (its lease held) or `unreachable` (gone, with sandboxes still placed there).
    pub health: String,
    /// Whether it takes no new placements.
    pub drained: bool,
    /// The URL gateways reach it at (empty while unreachable).
    pub advertise: String,
    /// Its zone.
    pub zone: Option<String>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its VMM backend.
    pub backend: String,
    /// Its incarnation (bumped at each registration); for an unreachable host, the last one
    /// its sandboxes were held by.
    pub incarnation: u64,
    /// CPUs.
    pub vcpus: u32,
    /// Guest memory it may hand out, MiB.
    pub memory_mib: u64,
    /// Guest memory not handed out, MiB.
    pub free_memory_mib: u64,
    /// Free disk, MiB.
    pub free_disk_mib: u64,
    /// Most sandboxes at once.
    pub slots: u32,
    /// Slots its own count finds free.
    pub free_slots: u32,
    /// Slots booked through gateways.
    pub booked: u64,
    /// Sandboxes placed on it through gateways, by placement state.
    pub placements: BTreeMap<String, u32>,
}

fn admin_only(req_scope: &TokenScope) -> Result<(), HttpError> {
    match req_scope {
        TokenScope::Admin => Ok(()),
        TokenScope::Label { .. } => Err(HttpError::new(
            ErrorCode::Forbidden,
            "the fleet's hosts need an admin token",
        )),
    }
}

/// The fleet's hosts: live ones from their records, vanished ones from their placements.
fn hosts_of(view: &FleetState) -> Vec<FleetHost> {
    let mut hosts: BTreeMap<String, FleetHost> = view
        .hosts
        .values()
        .map(|h| {
            let c = &h.capacity;
            let entry = FleetHost {
                host: h.host.clone(),
                health: "up".into(),
                drained: false,
                advertise: h.advertise.clone(),
                zone: h.zone.clone(),
                labels: h.labels.clone(),
                backend: h.backend.clone(),
                incarnation: h.incarnation,
                vcpus: c.vcpus,
                memory_mib: c.memory_mib,
                free_memory_mib: c.free_memory_mib,
                free_disk_mib: c.free_disk_mib,
                slots: c.slots,
                free_slots: c.free_slots,
                booked: 0,
                placements: BTreeMap::new(),
            };
            (h.host.clone(), entry)
        })
        .collect();
    for p in view.placements.values() {
        let entry = hosts.entry(p.host.clone()).or_insert_with(|| FleetHost {
            host: p.host.clone(),
            health: "unreachable".into(),
            drained: false,
            advertise: String::new(),
            zone: None,
            labels: BTreeMap::new(),
            backend: String::new(),
            incarnation: p.incarnation,
            vcpus: 0,
            memory_mib: 0,
            free_memory_mib: 0,
            free_disk_mib: 0,
            slots: 0,
            free_slots: 0,
            booked: 0,
            placements: BTreeMap::new(),
        });
        *entry
            .placements
            .entry(p.state.name().to_string())
            .or_default() += 1;
    }
    for (name, entry) in hosts.iter_mut() {
        entry.booked = view.booked.get(name).copied().unwrap_or(0);
        entry.drained = view.drained.contains_key(name);
    }
    hosts.into_values().collect()
}

/// The fleet's hosts: capacity, health, incarnation, drained.
#[utoipa::path(get, path = "/v1/fleet/hosts", tag = "fleet",
    responses((status = 200, body = Vec<FleetHost>),
              (status = 403, description = "not an admin token", body = ApiError)))]
async fn fleet_hosts(State(gw): Shared, req: Request) -> Result<Json<Vec<FleetHost>>, HttpError> {
    admin_only(&scope_of(&req))?;
    Ok(Json(hosts_of(&gw.cache.snapshot())))
}

/// Waits (briefly) until this gateway's view agrees with a drain change it just made, and
/// answers with the host.
async fn drained_host(
    gw: &Gateway,
    host: &str,
    drained: bool,
) -> Result<Json<FleetHost>, HttpError> {
    gw.cache
        .wait_for(Duration::from_secs(5), |s| {
            s.drained.contains_key(host) == drained
        })
        .await;
    hosts_of(&gw.cache.snapshot())
        .into_iter()
        .find(|h| h.host == host)
        .map(Json)
        .ok_or_else(|| no_host(host))
}

fn no_host(host: &str) -> HttpError {
    HttpError::new(
        ErrorCode::NotFound,
        format!("no host {host:.130} in the fleet"),
    )
}

/// Drains a host: no new placements there; its sandboxes run on to their TTL.
#[utoipa::path(put, path = "/v1/fleet/hosts/{host}/drain", tag = "fleet",
    params(("host" = String, Path, description = "the host's name in the fleet")),
    responses((status = 200, description = "drained", body = FleetHost),
              (status = 403, description = "not an admin token", body = ApiError),
              (status = 404, description = "no such host", body = ApiError)))]
async fn drain(
    State(gw): Shared,
    Path(host): Path<String>,
    req: Request,
) -> Result<Json<FleetHost>, HttpError> {
    admin_only(&scope_of(&req))?;
    if !hosts_of(&gw.cache.snapshot())
        .iter()
        .any(|h| h.host == host)
    {
        return Err(no_host(&host));
    }
    place::drain(&gw.fleet, &host).await.map_err(fleet_error)?;
    drained_host(&gw, &host, true).await
}

/// Lets a drained host take placements again.
#[utoipa::path(delete, path = "/v1/fleet/hosts/{host}/drain", tag = "fleet",
    params(("host" = String, Path, description = "the host's name in the fleet")),
    responses((status = 200, description = "taking placements again", body = FleetHost),
              (status = 403, description = "not an admin token", body = ApiError),
              (status = 404, description = "no such host", body = ApiError)))]
async fn undrain(
    State(gw): Shared,
    Path(host): Path<String>,
    req: Request,
) -> Result<Json<FleetHost>, HttpError> {
    admin_only(&scope_of(&req))?;
    if !hutch_fleet::check_host_name(&host) {
        return Err(no_host(&host));
    }
    place::undrain(&gw.fleet, &host)
        .await
        .map_err(fleet_error)?;
    drained_host(&gw, &host, false).await
}

/// Every sandbox of the fleet the caller may see, with its host (`hutch fleet ls`).
#[utoipa::path(get, path = "/v1/fleet/sandboxes", tag = "fleet",
    params(("state" = Option<String>, Query, description = "only this state"),
           ("label" = Option<String>, Query, description = "key=value; repeatable", pattern = "=")),
    responses((status = 200, body = Vec<FleetSandbox>)))]
async fn fleet_sandboxes(
    State(gw): Shared,
    req: Request,
) -> Result<Json<Vec<FleetSandbox>>, HttpError> {
    Ok(Json(everywhere(&gw, req).await?))
}
