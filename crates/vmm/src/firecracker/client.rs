//! A small HTTP/1.1 client for Firecracker's API socket, over hyper.
//!
//! One connection per request: a Unix-socket connect costs microseconds, and a fresh connection
//! never inherits a half-read response from a timed-out call. Every call is bounded in time and
//! in response size; a refused call surfaces Firecracker's `fault_message` as
//! [`FirecrackerError::Api`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{header, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::api::*;
use super::error::{ApiFault, FirecrackerError};

/// The largest response body accepted (Firecracker's are a few KiB; `GET /vm/config` the
/// largest).
const RESPONSE_LIMIT: usize = 1 << 20;
/// The default bound on one API call.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// The bound on snapshot create/load, which write or map all of guest memory.
const DEFAULT_SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);

/// A typed client for one Firecracker process's API socket.
#[derive(Debug, Clone)]
pub struct FirecrackerClient {
    socket: PathBuf,
    timeout: Duration,
    snapshot_timeout: Duration,
}

/// What a raw call returned: the status and the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawResponse {
    /// The HTTP status.
    pub status: u16,
    /// The body (empty for 204).
    pub body: Bytes,
}

/// Checks a device id (drive, interface) before it goes into a request path.
fn check_id(id: &str) -> Result<(), FirecrackerError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(FirecrackerError::InvalidDeviceId(
            id.chars().take(80).collect(),
        ))
    }
}

fn method_name(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        _ => "?",
    }
}

/// Firecracker's `fault_message`, or the body itself (condensed) if it is not the JSON error.
fn fault_of(status: StatusCode, body: &[u8]) -> ApiFault {
    let fault_message = match serde_json::from_slice::<ApiErrorBody>(body) {
        Ok(b) if !b.fault_message.is_empty() => b.fault_message,
        _ => crate::spawn::condense(&String::from_utf8_lossy(&body[..body.len().min(400)])),
    };
    ApiFault {
        status: status.as_u16(),
        fault_message,
    }
}

impl FirecrackerClient {
    /// A client for the API socket at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            timeout: DEFAULT_TIMEOUT,
            snapshot_timeout: DEFAULT_SNAPSHOT_TIMEOUT,
        }
    }

    /// Bounds every call but snapshot create/load by `timeout` (default 5 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Bounds snapshot create/load by `timeout` (default 120 s).
    pub fn with_snapshot_timeout(mut self, timeout: Duration) -> Self {
        self.snapshot_timeout = timeout;
        self
    }

    /// The API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request and returns whatever status and body came back (bounded in time and
    /// size); for calls the typed methods do not cover.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<RawResponse, FirecrackerError> {
        let name = method_name(&method);
        let exchange = self.exchange(method, path, body);
        match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(FirecrackerError::Timeout {
                method: name,
                path: path.to_string(),
                ms: timeout.as_millis() as u64,
            }),
        }
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<RawResponse, FirecrackerError> {
        let name = method_name(&method);
        let http = |source| FirecrackerError::Http {
            method: name,
            path: path.to_string(),
            source,
        };
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| FirecrackerError::Connect {
                socket: self.socket.clone(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        let conn = tokio::spawn(conn);
        let _abort = AbortOnDrop(conn.abort_handle());
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "localhost")
            .header(header::ACCEPT, "application/json");
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|_| FirecrackerError::BadRequestPath(path.chars().take(200).collect()))?;
        let resp = sender.send_request(req).await.map_err(http)?;
        let status = resp.status().as_u16();
        let body = match Limited::new(resp.into_body(), RESPONSE_LIMIT)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return Err(match e.downcast::<hyper::Error>() {
                    Ok(h) => http(*h),
                    Err(_) => FirecrackerError::ResponseTooLarge {
                        method: name,
                        path: path.to_string(),
                        limit: RESPONSE_LIMIT,
                    },
                })
            }
        };
        Ok(RawResponse { status, body })
    }

    /// Sends `body` (if any) and checks for success (2xx); returns the response body.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
        timeout: Duration,
    ) -> Result<Bytes, FirecrackerError> {
        let name = method_name(&method);
        let json = |source| FirecrackerError::Json {
            method: name,
            path: path.to_string(),
            source,
        };
        let body = body
            .map(|b| serde_json::to_vec(b))
            .transpose()
            .map_err(json)?;
        let resp = self.raw(method, path, body, timeout).await?;
        let status = StatusCode::from_u16(resp.status).unwrap_or(StatusCode::BAD_GATEWAY);
        if !status.is_success() {
            return Err(FirecrackerError::Api {
                method: name,
                path: path.to_string(),
                fault: fault_of(status, &resp.body),
            });
        }
        Ok(resp.body)
    }

    async fn put<B: Serialize>(&self, path: &str, body: &B) -> Result<(), FirecrackerError> {
        self.call(Method::PUT, path, Some(body), self.timeout)
            .await
            .map(drop)
    }

    async fn patch<B: Serialize>(&self, path: &str, body: &B) -> Result<(), FirecrackerError> {
        self.call(Method::PATCH, path, Some(body), self.timeout)
            .await
            .map(drop)
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, FirecrackerError> {
        let body = self
            .call(Method::GET, path, None::<&()>, self.timeout)
            .await?;
        serde_json::from_slice(&body).map_err(|source| FirecrackerError::Json {
            method: "GET",
            path: path.to_string(),
            source,
        })
    }

    /// `GET /`: the instance's id, state and version.
    pub async fn describe_instance(&self) -> Result<InstanceInfo, FirecrackerError> {
        self.get("/").await
    }

    /// `GET /version`.
    pub async fn version(&self) -> Result<FirecrackerVersion, FirecrackerError> {
        self.get("/version").await
    }

    /// `GET /vm/config`: the whole configuration (the parts in [`VmConfig`]).
    pub async fn vm_config(&self) -> Result<VmConfig, FirecrackerError> {
        self.get("/vm/config").await
    }

    /// `GET /machine-config`.
    pub async fn machine_config(&self) -> Result<MachineConfig, FirecrackerError> {
        self.get("/machine-config").await
    }

    /// `PUT /machine-config` (pre-boot).
    pub async fn put_machine_config(&self, c: &MachineConfig) -> Result<(), FirecrackerError> {
        self.put("/machine-config", c).await
    }

    /// `PUT /boot-source` (pre-boot).
    pub async fn put_boot_source(&self, b: &BootSource) -> Result<(), FirecrackerError> {
        self.put("/boot-source", b).await
    }

    /// `PUT /drives/{drive_id}` (pre-boot).
    pub async fn put_drive(&self, d: &Drive) -> Result<(), FirecrackerError> {
        check_id(&d.drive_id)?;
        self.put(&format!("/drives/{}", d.drive_id), d).await
    }

    /// `PATCH /drives/{drive_id}` (post-boot): a new backing file and/or rate limiter.
    pub async fn patch_drive(&self, d: &PartialDrive) -> Result<(), FirecrackerError> {
        check_id(&d.drive_id)?;
        self.patch(&format!("/drives/{}", d.drive_id), d).await
    }

    /// `PUT /network-interfaces/{iface_id}` (pre-boot).
    pub async fn put_network_interface(
        &self,
        n: &NetworkInterface,
    ) -> Result<(), FirecrackerError> {
        check_id(&n.iface_id)?;
        self.put(&format!("/network-interfaces/{}", n.iface_id), n)
            .await
    }

    /// `PATCH /network-interfaces/{iface_id}` (post-boot): rate limiters only.
    pub async fn patch_network_interface(
        &self,
        n: &PartialNetworkInterface,
    ) -> Result<(), FirecrackerError> {
        check_id(&n.iface_id)?;
        self.patch(&format!("/network-interfaces/{}", n.iface_id), n)
            .await
    }

    /// `PUT /vsock` (pre-boot).
    pub async fn put_vsock(&self, v: &Vsock) -> Result<(), FirecrackerError> {
        self.put("/vsock", v).await
    }

    /// `PUT /entropy` (pre-boot): a virtio-rng device.
    pub async fn put_entropy(&self, e: &EntropyDevice) -> Result<(), FirecrackerError> {
        self.put("/entropy", e).await
    }

    /// `PUT /balloon` (pre-boot).
    pub async fn put_balloon(&self, b: &Balloon) -> Result<(), FirecrackerError> {
        self.put("/balloon", b).await
    }

    /// `PATCH /balloon`: a new target size.
    pub async fn patch_balloon(&self, b: &BalloonUpdate) -> Result<(), FirecrackerError> {
        self.patch("/balloon", b).await
    }

    /// `PATCH /balloon/statistics`: a new statistics interval.
    pub async fn patch_balloon_statistics(
        &self,
        b: &BalloonStatsUpdate,
    ) -> Result<(), FirecrackerError> {
        self.patch("/balloon/statistics", b).await
    }

    /// `GET /balloon`.
    pub async fn balloon(&self) -> Result<Balloon, FirecrackerError> {
        self.get("/balloon").await
    }

    /// `PUT /logger` (once per process; again after a snapshot load).
    pub async fn put_logger(&self, l: &Logger) -> Result<(), FirecrackerError> {
        self.put("/logger", l).await
    }

    /// `PUT /metrics` (once per process; again after a snapshot load).
    pub async fn put_metrics(&self, m: &Metrics) -> Result<(), FirecrackerError> {
        self.put("/metrics", m).await
    }

    /// `PUT /mmds/config`.
    pub async fn put_mmds_config(&self, c: &MmdsConfig) -> Result<(), FirecrackerError> {
        self.put("/mmds/config", c).await
    }

    /// `PUT /mmds`: replaces the data store (not restored by a snapshot load).
    pub async fn put_mmds(&self, data: &serde_json::Value) -> Result<(), FirecrackerError> {
        self.put("/mmds", data).await
    }

    /// `PUT /actions`.
    pub async fn action(&self, action_type: ActionType) -> Result<(), FirecrackerError> {
        self.put("/actions", &InstanceActionInfo { action_type })
            .await
    }

    /// `PUT /actions {InstanceStart}`: boots the configured VM (once per process).
    pub async fn instance_start(&self) -> Result<(), FirecrackerError> {
        self.action(ActionType::InstanceStart).await
    }

    /// `PATCH /vm`: pause or resume the vCPUs.
    pub async fn set_vm_state(&self, state: VmState) -> Result<(), FirecrackerError> {
        self.patch("/vm", &VmStateUpdate { state }).await
    }

    /// `PUT /snapshot/create` (the VM must be paused); bounded by the snapshot timeout.
    pub async fn create_snapshot(&self, p: &SnapshotCreateParams) -> Result<(), FirecrackerError> {
        self.call(
            Method::PUT,
            "/snapshot/create",
            Some(p),
            self.snapshot_timeout,
        )
        .await
        .map(drop)
    }

    /// `PUT /snapshot/load` (a fresh process only; Firecracker ends itself if it fails);
    /// bounded by the snapshot timeout.
    pub async fn load_snapshot(&self, p: &SnapshotLoadParams) -> Result<(), FirecrackerError> {
        self.call(
            Method::PUT,
            "/snapshot/load",
            Some(p),
            self.snapshot_timeout,
        )
        .await
        .map(drop)
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids() {
        assert!(check_id("root").is_ok());
        assert!(check_id("eth_0").is_ok());
        for bad in ["", "a/b", "a b", "../x", &"a".repeat(65)] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn fault_message_or_raw_body() {
        let f = fault_of(
            StatusCode::BAD_REQUEST,
            br#"{"fault_message":"Invalid Elf magic number"}"#,
        );
        assert_eq!(f.to_string(), "HTTP 400: Invalid Elf magic number");
        let f = fault_of(StatusCode::INTERNAL_SERVER_ERROR, b"oops\nmore");
        assert_eq!(f.fault_message, "oops; more");
    }
}
