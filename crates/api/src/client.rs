//! The typed client of the daemon's API, over its Unix socket or TCP (with a bearer token).

use std::path::PathBuf;

use futures::{SinkExt, Stream, StreamExt, TryStreamExt};
use http_body_util::{combinators::BoxBody, BodyDataStream, BodyExt, Full, StreamBody};
use hutch_types::{
    BrokerEvent, ErrorCode, NetworkPolicy, SandboxInfo, SecretInfo, TemplateInfo, TemplateSpec,
};
use hyper::{body::Bytes, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpStream, UnixStream},
};
use tokio_tungstenite::{tungstenite::Message, WebSocketStream};

mod mcp;
mod tasks;

pub use mcp::{McpReply, MCP_PATH};

pub use tasks::task_form;

use crate::{
    ApiError, CreateSandbox, ExecBody, ExecControl, ExecEventMsg, ExecResult, ExecStart, ForkBody,
    NetEvent, PoolBody, PortMapping, PublishPort, SetSecretBody, API_PREFIX, STREAM_STDERR,
    STREAM_STDOUT,
};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon is not reachable.
    #[error("cannot reach the hutch daemon at {endpoint} (is `hutch daemon` running?)")]
    Connect {
        /// Where we tried.
        endpoint: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("HTTP exchange with the daemon failed")]
    Http(#[source] hyper::Error),
    /// A streamed body broke off.
    #[error("the transfer broke off")]
    Body(#[source] std::io::Error),
    /// The daemon answered with an error.
    #[error("{}", .error.message)]
    Api {
        /// HTTP status.
        status: u16,
        /// The error body.
        error: ApiError,
    },
    /// The answer did not decode.
    #[error("unexpected answer from the daemon")]
    Decode(#[source] serde_json::Error),
    /// The WebSocket failed.
    #[error("exec stream failed")]
    WebSocket(#[source] tokio_tungstenite::tungstenite::Error),
    /// The exec stream broke the protocol.
    #[error("exec stream: {0}")]
    Stream(String),
}

impl ClientError {
    /// The API error code, when the daemon sent one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api { error, .. } => Some(error.code),
            _ => None,
        }
    }
}

/// Where the daemon listens.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// Its Unix socket.
    Unix(PathBuf),
    /// `host:port` over TCP.
    Tcp(String),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

/// A connection-per-request client; cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    endpoint: Endpoint,
    token: Option<String>,
}

/// Something both a Unix and a TCP stream are.
trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

impl Client {
    /// A client of `endpoint`, sending `token` as a bearer token when given.
    pub fn new(endpoint: Endpoint, token: Option<String>) -> Client {
        Client { endpoint, token }
    }

    /// Where this client connects.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    async fn connect(&self) -> Result<Box<dyn Io>, ClientError> {
        let err = |source| ClientError::Connect {
            endpoint: self.endpoint.to_string(),
            source,
        };
        Ok(match &self.endpoint {
            Endpoint::Unix(p) => Box::new(UnixStream::connect(p).await.map_err(err)?),
            Endpoint::Tcp(a) => Box::new(TcpStream::connect(a).await.map_err(err)?),
        })
    }

    /// Sends one request with a JSON body; returns the response with its body still to be read.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        self.send_with(method, path, "application/json", body).await
    }

    /// Sends one request with a whole body of `content_type`; returns the response with its
    /// body still to be read.
    async fn send_with(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let body = Full::new(Bytes::from(body)).map_err(|never| match never {});
        self.send_body(method, path, content_type, &[], BoxBody::new(body))
            .await
    }

    /// Sends one request with any body and `headers` besides the usual ones; returns the
    /// response with its body still to be read.
    async fn send_body(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        headers: &[(&str, &str)],
        body: BoxBody<Bytes, std::io::Error>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let io = TokioIo::new(self.connect().await?);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(ClientError::Http)?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "hutch")
            .header(hyper::header::CONTENT_TYPE, content_type);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        if let Some(t) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req.body(body).expect("valid request");
        sender.send_request(req).await.map_err(ClientError::Http)
    }

    /// Sends one request; returns the status and the whole body.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        read_all(self.send(method, path, body).await?).await
    }

    /// Sends a request and decodes a JSON answer (or the API error).
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<T, ClientError> {
        let bytes = self.ok(method, path, body).await?;
        serde_json::from_slice(&bytes).map_err(ClientError::Decode)
    }

    /// Sends a request; any non-2xx answer becomes [`ClientError::Api`].
    async fn ok(&self, method: Method, path: &str, body: Vec<u8>) -> Result<Bytes, ClientError> {
        self.ok_with(method, path, "application/json", body).await
    }

    /// [`Client::ok`] with a body of `content_type`.
    async fn ok_with(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<Bytes, ClientError> {
        let resp = self.send_with(method, path, content_type, body).await?;
        Ok(read_all(check_status(resp).await?).await?.1)
    }

    /// Creates a sandbox and waits until it runs.
    pub async fn create(&self, req: &CreateSandbox) -> Result<SandboxInfo, ClientError> {
        let body = serde_json::to_vec(req).expect("serializable");
        self.call(Method::POST, &format!("{API_PREFIX}/sandboxes"), body)
            .await
    }

    /// Lists sandboxes, optionally by state and labels (`key=value`).
    pub async fn list(
        &self,
        state: Option<&str>,
        labels: &[String],
    ) -> Result<Vec<SandboxInfo>, ClientError> {
        let mut query: Vec<String> = labels
            .iter()
            .map(|l| format!("label={}", encode(l)))
            .collect();
        query.extend(state.map(|s| format!("state={}", encode(s))));
        let path = format!("{API_PREFIX}/sandboxes?{}", query.join("&"));
        self.call(Method::GET, &path, vec![]).await
    }

    /// One sandbox.
    pub async fn inspect(&self, id: &str) -> Result<SandboxInfo, ClientError> {
        self.call(Method::GET, &sandbox_path(id, ""), vec![]).await
    }

    /// Runs a short command and returns its whole output.
    pub async fn exec(&self, id: &str, body: &ExecBody) -> Result<ExecResult, ClientError> {
        let body = serde_json::to_vec(body).expect("serializable");
        self.call(Method::POST, &sandbox_path(id, "/exec"), body)
            .await
    }

    /// `pause`, `resume`, `suspend`, `stop` or `start`.
    pub async fn lifecycle(&self, id: &str, action: &str) -> Result<SandboxInfo, ClientError> {
        self.call(
            Method::POST,
            &sandbox_path(id, &format!("/{action}")),
            vec![],
        )
        .await
    }

    /// Destroys a sandbox.
    pub async fn destroy(&self, id: &str) -> Result<SandboxInfo, ClientError> {
        self.call(Method::DELETE, &sandbox_path(id, ""), vec![])
            .await
    }

    /// Snapshots a sandbox into `count` running children.
    pub async fn fork(&self, id: &str, count: u32) -> Result<Vec<SandboxInfo>, ClientError> {
        let body = serde_json::to_vec(&ForkBody { count }).expect("serializable");
        self.call(Method::POST, &sandbox_path(id, "/fork"), body)
            .await
    }

    /// Boots, provisions and saves a template.
    pub async fn create_template(&self, spec: &TemplateSpec) -> Result<TemplateInfo, ClientError> {
        let body = serde_json::to_vec(spec).expect("serializable");
        self.call(Method::POST, &format!("{API_PREFIX}/templates"), body)
            .await
    }

    /// Every template.
    pub async fn templates(&self) -> Result<Vec<TemplateInfo>, ClientError> {
        self.call(Method::GET, &format!("{API_PREFIX}/templates"), vec![])
            .await
    }

    /// Sets how many ready clones of a template the daemon keeps.
    pub async fn set_pool(&self, name: &str, size: u32) -> Result<TemplateInfo, ClientError> {
        let path = format!("{API_PREFIX}/templates/{}/pool", encode(name));
        let body = serde_json::to_vec(&PoolBody { size }).expect("serializable");
        self.call(Method::PUT, &path, body).await
    }

    /// Removes a template.
    pub async fn remove_template(&self, name: &str) -> Result<TemplateInfo, ClientError> {
        let path = format!("{API_PREFIX}/templates/{}", encode(name));
        self.call(Method::DELETE, &path, vec![]).await
    }

    /// Sets (or rotates) a secret; the answer never carries its value.
    pub async fn set_secret(
        &self,
        name: &str,
        body: &SetSecretBody,
    ) -> Result<SecretInfo, ClientError> {
        let path = format!("{API_PREFIX}/secrets/{}", encode(name));
        let body = serde_json::to_vec(body).expect("serializable");
        self.call(Method::PUT, &path, body).await
    }

    /// The secrets this client may see (never values).
    pub async fn secrets(&self) -> Result<Vec<SecretInfo>, ClientError> {
        self.call(Method::GET, &format!("{API_PREFIX}/secrets"), vec![])
            .await
    }

    /// Removes a secret no sandbox has attached.
    pub async fn remove_secret(&self, name: &str) -> Result<SecretInfo, ClientError> {
        let path = format!("{API_PREFIX}/secrets/{}", encode(name));
        self.call(Method::DELETE, &path, vec![]).await
    }

    /// What the broker did with a sandbox's secrets.
    pub async fn secret_log(&self, id: &str) -> Result<Vec<BrokerEvent>, ClientError> {
        self.call(Method::GET, &sandbox_path(id, "/secrets/log"), vec![])
            .await
    }

    /// Changes a sandbox's network policy.
    pub async fn set_network(
        &self,
        id: &str,
        policy: &NetworkPolicy,
    ) -> Result<SandboxInfo, ClientError> {
        let body = serde_json::to_vec(policy).expect("serializable");
        self.call(Method::PUT, &sandbox_path(id, "/network"), body)
            .await
    }

    /// The sandbox's recent network decisions.
    pub async fn network_log(&self, id: &str) -> Result<Vec<NetEvent>, ClientError> {
        self.call(Method::GET, &sandbox_path(id, "/network/log"), vec![])
            .await
    }

    /// The sandbox's journal from record `from` on (of `kind` and below, if given).
    pub async fn audit(
        &self,
        id: &str,
        from: u64,
        kind: Option<&str>,
    ) -> Result<hutch_journal::AuditLog, ClientError> {
        let mut query = format!("/audit?from={from}");
        if let Some(kind) = kind {
            query.push_str(&format!("&kind={}", encode(kind)));
        }
        self.call(Method::GET, &sandbox_path(id, &query), vec![])
            .await
    }

    /// The session recording (asciicast v2) of the sandbox's exec `exec`: its id, the seq of
    /// one of its journal records, or `latest`.
    pub async fn recording(&self, id: &str, exec: &str) -> Result<Vec<u8>, ClientError> {
        let rest = format!("/recordings/{}", encode(exec));
        Ok(self
            .ok(Method::GET, &sandbox_path(id, &rest), vec![])
            .await?
            .to_vec())
    }

    /// The daemon's verdict on the sandbox's journal.
    pub async fn audit_verify(&self, id: &str) -> Result<hutch_journal::Report, ClientError> {
        self.call(Method::GET, &sandbox_path(id, "/audit/verify"), vec![])
            .await
    }

    /// Publishes a guest TCP port on a host loopback port (`None`: any free one).
    pub async fn publish_port(
        &self,
        id: &str,
        guest_port: u16,
        host_port: Option<u16>,
    ) -> Result<PortMapping, ClientError> {
        let body = serde_json::to_vec(&PublishPort { host_port }).expect("serializable");
        self.call(
            Method::PUT,
            &sandbox_path(id, &format!("/ports/{guest_port}")),
            body,
        )
        .await
    }

    /// Stops publishing a guest port; returns the ports still published.
    pub async fn unpublish_port(
        &self,
        id: &str,
        guest_port: u16,
    ) -> Result<Vec<PortMapping>, ClientError> {
        self.call(
            Method::DELETE,
            &sandbox_path(id, &format!("/ports/{guest_port}")),
            vec![],
        )
        .await
    }

    /// The sandbox's published ports.
    pub async fn ports(&self, id: &str) -> Result<Vec<PortMapping>, ClientError> {
        self.call(Method::GET, &sandbox_path(id, "/ports"), vec![])
            .await
    }

    /// The guest console log.
    pub async fn console(&self, id: &str) -> Result<Vec<u8>, ClientError> {
        Ok(self
            .ok(Method::GET, &sandbox_path(id, "/console"), vec![])
            .await?
            .to_vec())
    }

    /// Writes one file in the guest.
    pub async fn put_file(
        &self,
        id: &str,
        path: &str,
        mode: u32,
        data: Vec<u8>,
    ) -> Result<(), ClientError> {
        self.upload_file(id, path, mode, whole(data)).await
    }

    /// Writes one file in the guest from a stream of chunks, without holding it whole.
    pub async fn upload_file(
        &self,
        id: &str,
        path: &str,
        mode: u32,
        data: impl Stream<Item = std::io::Result<Bytes>> + Send + Sync + 'static,
    ) -> Result<(), ClientError> {
        let url = format!(
            "{}?path={}&mode={mode:o}",
            sandbox_path(id, "/files"),
            encode(path)
        );
        self.upload(&url, "application/octet-stream", data).await
    }

    /// Reads one file from the guest.
    pub async fn get_file(&self, id: &str, path: &str) -> Result<Vec<u8>, ClientError> {
        collect(self.download_file(id, path).await?).await
    }

    /// Reads one file from the guest as a stream of chunks (an error ends a cut-off download).
    pub async fn download_file(&self, id: &str, path: &str) -> Result<Download, ClientError> {
        let url = format!("{}?path={}", sandbox_path(id, "/files"), encode(path));
        self.download(&url).await
    }

    /// Unpacks a tar archive into `dir` in the guest (the daemon checks every entry first).
    pub async fn put_archive(&self, id: &str, dir: &str, tar: Vec<u8>) -> Result<(), ClientError> {
        self.upload_archive(id, dir, whole(tar)).await
    }

    /// Unpacks a tar archive streamed as chunks into `dir` in the guest (the daemon checks
    /// every entry as it passes).
    pub async fn upload_archive(
        &self,
        id: &str,
        dir: &str,
        tar: impl Stream<Item = std::io::Result<Bytes>> + Send + Sync + 'static,
    ) -> Result<(), ClientError> {
        let url = format!("{}?path={}", sandbox_path(id, "/archive"), encode(dir));
        self.upload(&url, "application/x-tar", tar).await
    }

    /// Packs `dir` in the guest as a tar archive (guest-made: check before unpacking).
    pub async fn get_archive(&self, id: &str, dir: &str) -> Result<Vec<u8>, ClientError> {
        collect(self.download_archive(id, dir).await?).await
    }

    /// Packs `dir` in the guest as a tar archive, streamed as chunks (guest-made: check each
    /// entry before unpacking it).
    pub async fn download_archive(&self, id: &str, dir: &str) -> Result<Download, ClientError> {
        let url = format!("{}?path={}", sandbox_path(id, "/archive"), encode(dir));
        self.download(&url).await
    }

    /// PUTs a streamed body; any non-2xx answer becomes [`ClientError::Api`].
    async fn upload(
        &self,
        url: &str,
        content_type: &str,
        data: impl Stream<Item = std::io::Result<Bytes>> + Send + Sync + 'static,
    ) -> Result<(), ClientError> {
        let body = BoxBody::new(StreamBody::new(data.map_ok(hyper::body::Frame::data)));
        let resp = self
            .send_body(Method::PUT, url, content_type, &[], body)
            .await?;
        check_status(resp).await.map(drop)
    }

    /// GETs a body to be read as a stream; a non-2xx answer becomes [`ClientError::Api`].
    async fn download(&self, url: &str) -> Result<Download, ClientError> {
        let resp = self.send(Method::GET, url, vec![]).await?;
        let resp = check_status(resp).await?;
        Ok(Box::pin(
            BodyDataStream::new(resp.into_body()).map_err(std::io::Error::other),
        ))
    }

    /// The OpenAPI document.
    pub async fn openapi(&self) -> Result<serde_json::Value, ClientError> {
        self.call(Method::GET, "/openapi.json", vec![]).await
    }

    /// Starts a streaming exec over a WebSocket.
    pub async fn exec_stream(
        &self,
        id: &str,
        start: &ExecStart,
    ) -> Result<(ExecSender, ExecReceiver), ClientError> {
        let io = self.connect().await?;
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                format!("ws://hutch{}", sandbox_path(id, "/exec/ws")),
            )
            .map_err(ClientError::WebSocket)?;
        if let Some(t) = &self.token {
            req.headers_mut().insert(
                "authorization",
                format!("Bearer {t}").parse().expect("header value"),
            );
        }
        let (mut ws, _) = tokio_tungstenite::client_async(req, io)
            .await
            .map_err(upgrade_error)?;
        let first = serde_json::to_string(start).expect("serializable");
        ws.send(Message::text(first))
            .await
            .map_err(ClientError::WebSocket)?;
        let (tx, rx) = ws.split();
        Ok((ExecSender { tx }, ExecReceiver { rx }))
    }
}

/// One event of a streaming exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// Output on stdout (or the terminal).
    Stdout(Vec<u8>),
    /// Output on stderr.
    Stderr(Vec<u8>),
    /// A control event (started, exit, error).
    Event(ExecEventMsg),
}

type Ws = WebSocketStream<Box<dyn Io>>;

/// Sending half of a streaming exec: stdin and control messages.
pub struct ExecSender {
    tx: futures::stream::SplitSink<Ws, Message>,
}

impl ExecSender {
    /// Sends stdin bytes.
    pub async fn stdin(&mut self, data: &[u8]) -> Result<(), ClientError> {
        self.send(Message::binary(data.to_vec())).await
    }

    /// Sends a control message (EOF, resize, signal).
    pub async fn control(&mut self, msg: &ExecControl) -> Result<(), ClientError> {
        self.send(Message::text(
            serde_json::to_string(msg).expect("serializable"),
        ))
        .await
    }

    async fn send(&mut self, msg: Message) -> Result<(), ClientError> {
        self.tx.send(msg).await.map_err(ClientError::WebSocket)
    }
}

/// Receiving half of a streaming exec: output and events.
pub struct ExecReceiver {
    rx: futures::stream::SplitStream<Ws>,
}

impl ExecReceiver {
    /// The next event; `None` once the daemon closed the stream.
    pub async fn next(&mut self) -> Option<Result<StreamEvent, ClientError>> {
        loop {
            let msg = match self.rx.next().await? {
                Ok(m) => m,
                Err(e) => return Some(Err(ClientError::WebSocket(e))),
            };
            return Some(match msg {
                Message::Binary(b) => match b.split_first() {
                    Some((&STREAM_STDOUT, rest)) => Ok(StreamEvent::Stdout(rest.to_vec())),
                    Some((&STREAM_STDERR, rest)) => Ok(StreamEvent::Stderr(rest.to_vec())),
                    _ => Err(ClientError::Stream(
                        "output frame without a stream byte".into(),
                    )),
                },
                Message::Text(t) => serde_json::from_str(t.as_str())
                    .map(StreamEvent::Event)
                    .map_err(ClientError::Decode),
                Message::Close(_) => return None,
                _ => continue,
            });
        }
    }
}

/// A download's body: chunks as they arrive; an error means it was cut off (the daemon hit a
/// cap or refused an archive entry after the answer had started, or the connection broke).
pub type Download = std::pin::Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// A whole body as a one-chunk stream.
fn whole(data: Vec<u8>) -> impl Stream<Item = std::io::Result<Bytes>> + Send + Sync + 'static {
    futures::stream::once(futures::future::ready(Ok(Bytes::from(data))))
}

/// All of a download.
async fn collect(mut download: Download) -> Result<Vec<u8>, ClientError> {
    let mut out = Vec::new();
    while let Some(chunk) = download.next().await {
        out.extend_from_slice(&chunk.map_err(ClientError::Body)?);
    }
    Ok(out)
}

/// The response if its status is 2xx; otherwise the API error its body holds.
pub(super) async fn check_status(
    resp: hyper::Response<hyper::body::Incoming>,
) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let (status, body) = read_all(resp).await?;
    Err(api_error(status, &body))
}

/// A response's status and its whole body.
async fn read_all(
    resp: hyper::Response<hyper::body::Incoming>,
) -> Result<(StatusCode, Bytes), ClientError> {
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(ClientError::Http)?
        .to_bytes();
    Ok((status, bytes))
}

/// A refused WebSocket upgrade is the daemon's API error (e.g. 404 for an unknown sandbox),
/// not a bare status.
fn upgrade_error(e: tokio_tungstenite::tungstenite::Error) -> ClientError {
    match e {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            api_error(resp.status(), resp.body().as_deref().unwrap_or_default())
        }
        e => ClientError::WebSocket(e),
    }
}

/// The error a non-2xx answer stands for: its `ApiError` body, or the status and the start of
/// whatever else it said.
fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    let error = serde_json::from_slice(body).unwrap_or_else(|_| ApiError {
        code: ErrorCode::Internal,
        message: format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(body)
                .chars()
                .take(200)
                .collect::<String>()
        ),
    });
    ClientError::Api {
        status: status.as_u16(),
        error,
    }
}

fn sandbox_path(id: &str, rest: &str) -> String {
    format!("{API_PREFIX}/sandboxes/{}{rest}", encode(id))
}

/// Percent-encodes everything but unreserved characters.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
