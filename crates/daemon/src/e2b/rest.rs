//! E2B's REST control plane: sandboxes created, listed, inspected, killed, timed out,
//! paused, resumed and connected to, as calls on the request surface.
//!
//! Mapping: a template id is a Hutch template when one has that name, else an image name
//! (`base`, E2B's default, is the default image); `metadata` is the sandbox's labels;
//! `timeout` (seconds) is its TTL; `envVars` is its environment; `allow_internet_access`
//! true is an open network (left out or false: no network). What Hutch cannot honour
//! (MCP, volumes, IAM, network rules, auto-pause) is refused, not ignored.

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    extract::{Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Extension, Json, Router,
};
use hutch_core::service::{Create, Lifecycle};
use hutch_store::ListFilter;
use hutch_types::{NetworkPolicy, SandboxId, SandboxInfo, SandboxSpec, SandboxState};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiKey, CallerExt, E2bError, E2bState, Result, ENVD_VERSION};

type AppState = State<Arc<E2bState>>;

/// The REST routes.
pub fn routes() -> Router<Arc<E2bState>> {
    Router::new()
        .route("/sandboxes", post(create).get(list))
        .route("/v2/sandboxes", post(create).get(list))
        .route("/sandboxes/{id}", get(info).delete(kill))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/v2/sandboxes/{id}/connect", post(connect))
}

/// E2B's default template.
const BASE_TEMPLATE: &str = "base";

/// The body of `POST /sandboxes`: what Hutch maps, and what it must refuse when present.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: String,
    timeout: Option<u64>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    env_vars: BTreeMap<String, String>,
    #[serde(rename = "allow_internet_access")]
    allow_internet_access: Option<bool>,
    auto_pause: Option<bool>,
    auto_resume: Option<Value>,
    mcp: Option<Value>,
    network: Option<Value>,
    iam: Option<Value>,
    volume_mounts: Option<Value>,
}

impl NewSandbox {
    /// The first requested feature Hutch does not serve.
    fn unsupported(&self) -> Option<&'static str> {
        let set = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null());
        if self.auto_pause == Some(true) {
            Some("autoPause")
        } else if set(&self.auto_resume) {
            Some("autoResume")
        } else if set(&self.mcp) {
            Some("mcp")
        } else if set(&self.network) {
            Some("network rules")
        } else if set(&self.iam) {
            Some("iam")
        } else if set(&self.volume_mounts) {
            Some("volumeMounts")
        } else {
            None
        }
    }
}

async fn create(
    State(state): AppState,
    Extension(caller): CallerExt,
    Extension(key): Extension<ApiKey>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response> {
    let req: NewSandbox = serde_json::from_slice(&body)
        .map_err(|e| E2bError::bad_request(format!("bad sandbox request: {e}")))?;
    if let Some(feature) = req.unsupported() {
        return Err(E2bError::unsupported(feature));
    }
    let mut spec = SandboxSpec {
        env: req.env_vars,
        labels: req.metadata,
        ttl_secs: Some(req.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS)),
        network: if req.allow_internet_access == Some(true) {
            NetworkPolicy::Open
        } else {
            NetworkPolicy::None
        },
        ..Default::default()
    };
    if req.template_id != BASE_TEMPLATE {
        if state
            .app
            .api
            .template(&caller, &req.template_id)
            .await
            .is_ok()
        {
            spec.template = Some(req.template_id.clone());
        } else {
            spec.image = req.template_id.clone();
        }
    }
    let idempotency_key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let (info, _) = state
        .app
        .api
        .create(
            &caller,
            Create {
                spec,
                idempotency_key,
            },
        )
        .await?;
    Ok((StatusCode::CREATED, Json(sandbox(&info, &key))).into_response())
}

/// E2B's default sandbox timeout, when a create names none.
const DEFAULT_TIMEOUT_SECS: u64 = 300;

/// The template id E2B shows for a sandbox.
fn template_of(info: &SandboxInfo) -> &str {
    match &info.spec.template {
        Some(t) => t,
        None if info.spec.image == SandboxSpec::default().image => BASE_TEMPLATE,
        None => &info.spec.image,
    }
}

/// A created or connected sandbox as E2B's `Sandbox` model.
fn sandbox(info: &SandboxInfo, key: &ApiKey) -> Value {
    json!({
        "templateID": template_of(info),
        "sandboxID": info.id,
        "clientID": "hutch",
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": key.0,
        "domain": null,
    })
}

/// A sandbox as E2B's `ListedSandbox` (and, with the token, `SandboxDetail`).
fn listed(info: &SandboxInfo) -> Value {
    // Without a TTL it never ends; E2B's clients want a date all the same.
    const CENTURY_MS: i64 = 100 * 365 * 86_400 * 1000;
    let end = info
        .expires_at_ms
        .unwrap_or(info.created_at_ms.saturating_add(CENTURY_MS));
    json!({
        "templateID": template_of(info),
        "sandboxID": info.id,
        "clientID": "hutch",
        "startedAt": rfc3339(info.created_at_ms),
        "endAt": rfc3339(end),
        "cpuCount": info.spec.cpus,
        "memoryMB": info.spec.memory_mib,
        "diskSizeMB": info.spec.disk_mib,
        "state": state_name(&info.state),
        "envdVersion": ENVD_VERSION,
        "metadata": info.spec.labels,
    })
}

/// E2B knows two states: paused (Hutch's paused or paused to disk) and running.
fn state_name(state: &SandboxState) -> &'static str {
    match state {
        SandboxState::Paused | SandboxState::Suspended => "paused",
        _ => "running",
    }
}

async fn list(
    State(state): AppState,
    Extension(caller): CallerExt,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Response> {
    let mut filter = ListFilter::default();
    let mut states: Option<Vec<String>> = None;
    for (k, v) in query {
        match k.as_str() {
            "metadata" => filter.labels.extend(metadata_query(&v)?),
            "state" => states = Some(v.split(',').map(str::to_string).collect()),
            // One page holds every sandbox.
            "limit" | "nextToken" => {}
            other => {
                return Err(E2bError::unsupported(format_args!(
                    "the list filter {other:.40}"
                )))
            }
        }
    }
    let all = state.app.api.list(&caller, filter).await?;
    let shown: Vec<Value> = all
        .iter()
        .filter(|i| live(&i.state))
        .filter(|i| {
            states
                .as_ref()
                .is_none_or(|s| s.iter().any(|s| s == state_name(&i.state)))
        })
        .map(listed)
        .collect();
    Ok(Json(shown).into_response())
}

/// Whether E2B would list a sandbox (it forgets killed ones).
fn live(state: &SandboxState) -> bool {
    !matches!(
        state,
        SandboxState::Destroyed | SandboxState::Stopped | SandboxState::Failed(_)
    )
}

/// `metadata=k%3Dv%26k2%3Dv2` (the SDK URL-encodes keys and values, then the pairs).
fn metadata_query(raw: &str) -> Result<Vec<(String, String)>> {
    raw.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| E2bError::bad_request(format!("metadata {pair:.60} is not k=v")))?;
            Ok((percent_decode(k)?, percent_decode(v)?))
        })
        .collect()
}

/// Decodes `%XX` escapes (and `+` as a space, as form encoding writes it).
fn percent_decode(s: &str) -> Result<String> {
    let bad = || E2bError::bad_request(format!("bad URL encoding in {s:.60}"));
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hex = [bytes.next().ok_or_else(bad)?, bytes.next().ok_or_else(bad)?];
                let hex = std::str::from_utf8(&hex).map_err(|_| bad())?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

/// A path's sandbox id (a malformed one is no sandbox: 404).
fn id_of(raw: &str) -> Result<SandboxId> {
    Ok(crate::extract::sandbox_id(raw)?)
}

async fn info(
    State(state): AppState,
    Extension(caller): CallerExt,
    Extension(key): Extension<ApiKey>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Response> {
    let info = state.app.api.get(&caller, &id_of(&id)?).await?;
    if !live(&info.state) {
        return Err(E2bError::new(
            StatusCode::NOT_FOUND,
            format!("sandbox {id:.40} is {}", info.state.name()),
        ));
    }
    let mut detail = listed(&info);
    detail["envdAccessToken"] = json!(key.0);
    Ok(Json(detail).into_response())
}

async fn kill(
    State(state): AppState,
    Extension(caller): CallerExt,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<StatusCode> {
    let id = id_of(&id)?;
    // E2B forgets a killed sandbox: killing it again finds nothing.
    if state.app.api.recorded(&caller, &id).await?.state == SandboxState::Destroyed {
        return Err(E2bError::new(
            StatusCode::NOT_FOUND,
            format!("sandbox {id} was killed"),
        ));
    }
    state
        .app
        .api
        .lifecycle(&caller, &id, Lifecycle::Destroy)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `{"timeout": seconds}`.
#[derive(Debug, Deserialize)]
struct Timeout {
    timeout: Option<u64>,
}

/// A body that may be empty: E2B sends `{}` or nothing where nothing is asked.
fn optional_body(body: &[u8]) -> Result<Timeout> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Timeout { timeout: None });
    }
    serde_json::from_slice(body).map_err(|e| E2bError::bad_request(format!("bad body: {e}")))
}

async fn set_timeout(
    State(state): AppState,
    Extension(caller): CallerExt,
    axum::extract::Path(id): axum::extract::Path<String>,
    body: axum::body::Bytes,
) -> Result<StatusCode> {
    let timeout = optional_body(&body)?
        .timeout
        .ok_or_else(|| E2bError::bad_request("timeout is required"))?;
    state
        .app
        .api
        .set_ttl(&caller, &id_of(&id)?, Some(timeout))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn pause(
    State(state): AppState,
    Extension(caller): CallerExt,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<StatusCode> {
    state
        .app
        .api
        .lifecycle(&caller, &id_of(&id)?, Lifecycle::Pause)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn resume(
    State(state): AppState,
    Extension(caller): CallerExt,
    Extension(key): Extension<ApiKey>,
    axum::extract::Path(id): axum::extract::Path<String>,
    body: axum::body::Bytes,
) -> Result<Response> {
    let timeout = optional_body(&body)?.timeout;
    let id = id_of(&id)?;
    state
        .app
        .api
        .lifecycle(&caller, &id, Lifecycle::Resume)
        .await?;
    let info = retime(&state, &caller, &id, timeout).await?;
    Ok((StatusCode::CREATED, Json(sandbox(&info, &key))).into_response())
}

/// Connects to a sandbox: a paused one is resumed; a timeout given becomes its TTL.
async fn connect(
    State(state): AppState,
    Extension(caller): CallerExt,
    Extension(key): Extension<ApiKey>,
    axum::extract::Path(id): axum::extract::Path<String>,
    body: axum::body::Bytes,
) -> Result<Response> {
    let timeout = optional_body(&body)?.timeout;
    let id = id_of(&id)?;
    let info = state.app.api.get(&caller, &id).await?;
    let status = match info.state {
        SandboxState::Paused | SandboxState::Suspended => {
            state
                .app
                .api
                .lifecycle(&caller, &id, Lifecycle::Resume)
                .await?;
            StatusCode::CREATED
        }
        _ if live(&info.state) => StatusCode::OK,
        _ => {
            return Err(E2bError::new(
                StatusCode::NOT_FOUND,
                format!("sandbox {id} is {}", info.state.name()),
            ))
        }
    };
    let info = retime(&state, &caller, &id, timeout).await?;
    Ok((status, Json(sandbox(&info, &key))).into_response())
}

/// Sets the TTL when a timeout was given; the sandbox as it now is.
async fn retime(
    state: &E2bState,
    caller: &hutch_core::service::Caller,
    id: &SandboxId,
    timeout: Option<u64>,
) -> Result<SandboxInfo> {
    Ok(match timeout {
        Some(t) => state.app.api.set_ttl(caller, id, Some(t)).await?,
        None => state.app.api.recorded(caller, id).await?,
    })
}

/// Unix milliseconds as RFC 3339 (UTC), the form E2B's timestamps take.
pub(super) fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = hutch_types::civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_798_761_599_000), "2026-12-31T23:59:59.000Z");
    }

    #[test]
    fn metadata_filters_are_decoded_twice_as_the_sdk_encodes_them() {
        assert_eq!(
            metadata_query("team=a%20b&k%3D=v%26").unwrap(),
            vec![
                ("team".to_string(), "a b".to_string()),
                ("k=".to_string(), "v&".to_string())
            ]
        );
        assert!(metadata_query("novalue").is_err());
        assert!(metadata_query("k=%zz").is_err());
    }

    #[test]
    fn features_hutch_lacks_are_refused_by_name() {
        let req: NewSandbox = serde_json::from_value(json!({
            "templateID": "base", "mcp": {"x": 1}
        }))
        .unwrap();
        assert_eq!(req.unsupported(), Some("mcp"));
        let req: NewSandbox = serde_json::from_value(json!({
            "templateID": "base", "autoPause": false, "metadata": {}, "envVars": {}
        }))
        .unwrap();
        assert_eq!(req.unsupported(), None);
    }
}
