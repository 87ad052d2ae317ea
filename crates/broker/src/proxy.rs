//! One guest connection: where it was going (`SO_ORIGINAL_DST` or `CONNECT`), then either a
//! splice (unbound hosts, plain HTTP) or TLS termination and per-request policy (bound hosts).

use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hutch_types::{canonical_host, BrokerDecision, BrokerEvent};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::config::{Dial, DnsOracle, EgressCheck, EventSink};
use crate::hello::{self, Hello};
use crate::policy::{self, Dest, Req};
use crate::scrub::{self, Filtered, Needle};
use crate::{target, websocket, AttachedSecret};

/// A boxed error for bodies.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type on both sides of the broker.
pub(crate) type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// The longest the broker waits for a client's first bytes (TLS ClientHello, HTTP head or
/// `CONNECT`) before giving up on the connection.
const FIRST_BYTES: Duration = Duration::from_secs(10);
/// The most bytes read while looking for a ClientHello or an HTTP head.
const MAX_PEEK: usize = 32 * 1024;

/// What every connection of one sandbox's broker shares.
pub(crate) struct Shared {
    pub(crate) sandbox_id: String,
    pub(crate) secrets: RwLock<Arc<Vec<AttachedSecret>>>,
    pub(crate) dns: Arc<dyn DnsOracle>,
    pub(crate) egress: Arc<dyn EgressCheck>,
    pub(crate) events: Arc<dyn EventSink>,
    pub(crate) dial: Arc<dyn Dial>,
    pub(crate) tls_server: Arc<rustls::ServerConfig>,
    pub(crate) tls_client: Arc<rustls::ClientConfig>,
}

/// The facts about one request that go into its events.
#[derive(Clone)]
struct Facts {
    host: String,
    port: u16,
    method: Option<String>,
    path: Option<String>,
}

impl Shared {
    fn secrets(&self) -> Arc<Vec<AttachedSecret>> {
        self.secrets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn record(
        &self,
        facts: &Facts,
        secret: &str,
        decision: BrokerDecision,
        reason: Option<String>,
    ) {
        let time = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        self.events.record(BrokerEvent {
            time,
            sandbox_id: self.sandbox_id.clone(),
            secret: secret.to_string(),
            host: facts.host.clone(),
            port: facts.port,
            method: facts.method.clone(),
            path: facts.path.clone(),
            decision,
            reason,
        });
    }

    /// Whether any secret is bound to `host:port` (its connections are terminated).
    fn bound(&self, host: &str, port: u16) -> Vec<String> {
        self.secrets()
            .iter()
            .filter(|s| s.bindings.iter().any(|b| b.host == host && b.port == port))
            .map(|s| s.name.clone())
            .collect()
    }
}

/// Serves one accepted guest connection to its end.
pub(crate) async fn handle(shared: Arc<Shared>, mut stream: TcpStream) -> io::Result<()> {
    let local = stream.local_addr()?;
    let (dst, name, mut buf) = match original_dst(&stream) {
        Some(dst) if dst != local => (dst, None, Vec::new()),
        _ => match connect_head(&shared, &mut stream).await? {
            Some(target) => target,
            None => return Ok(()),
        },
    };
    let first = loop {
        let parsed = hello::parse(&buf);
        if parsed != Hello::Incomplete || buf.len() >= MAX_PEEK {
            break parsed;
        }
        let n = tokio::time::timeout(FIRST_BYTES, stream.read_buf(&mut buf))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no ClientHello"))??;
        if n == 0 {
            return Ok(());
        }
    };
    match first {
        Hello::Sni(Some(sni)) => match canonical_host(&sni) {
            Some(host) if !shared.bound(&host, dst.port()).is_empty() => {
                terminate(shared, stream, buf, dst, host).await
            }
            _ => splice(&shared, stream, buf, dst, Some(sni)).await,
        },
        Hello::Sni(None) => splice(&shared, stream, buf, dst, name).await,
        _ => {
            let host = plain_http_host(&mut stream, &mut buf).await?.or(name);
            if host.as_deref().and_then(canonical_host).as_deref() == Some(crate::CANARY_HOST) {
                return answer_canary(&shared, &mut stream).await;
            }
            if let Some(h) = host.as_deref().and_then(canonical_host) {
                refuse_plain_http(&shared, &h, dst.port(), &buf);
            }
            splice(&shared, stream, buf, dst, host).await
        }
    }
}

/// Plain HTTP to a bound host: placeholders in the request head go upstream unchanged (values
/// only ever travel over TLS); each is recorded as a refusal. Only the first request of the
/// connection is looked at.
fn refuse_plain_http(shared: &Shared, host: &str, port: u16, head: &[u8]) {
    let facts = Facts {
        host: host.to_string(),
        port,
        method: None,
        path: None,
    };
    for s in shared.secrets().iter() {
        let bound = s.bindings.iter().any(|b| b.host == host);
        let ph = s.placeholder.as_bytes();
        if bound && head.windows(ph.len()).any(|w| w == ph) {
            let reason = "plain HTTP: secrets are only substituted over TLS".to_string();
            shared.record(&facts, &s.name, BrokerDecision::Refused, Some(reason));
        }
    }
}

/// Answers the self-test ([`crate::CANARY_HOST`]) with the sandbox's id, and closes.
async fn answer_canary(shared: &Shared, stream: &mut TcpStream) -> io::Result<()> {
    let body = format!("{}{}\n", crate::CANARY_REPLY, shared.sandbox_id);
    let reply = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}

/// Whether an HTTP head (request line first) is the broker's self-test: its `Host` is
/// [`crate::CANARY_HOST`].
fn is_canary(head: &str) -> bool {
    head.lines().skip(1).any(|line| {
        line.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("host")
                && canonical_host(strip_port(v.trim())).as_deref() == Some(crate::CANARY_HOST)
        })
    })
}

/// The destination the nft redirect rewrote.
fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt};
    if let Ok(sa) = getsockopt(stream, sockopt::OriginalDst) {
        let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
        return Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be(sa.sin_port)));
    }
    let sa = getsockopt(stream, sockopt::Ip6tOriginalDst).ok()?;
    let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
    Some(SocketAddr::new(IpAddr::V6(ip), u16::from_be(sa.sin6_port)))
}

/// Reads up to the end of an HTTP head (bounded) into `buf`.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<Option<usize>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(Some(end + 4));
        }
        if buf.len() >= MAX_PEEK {
            return Ok(None);
        }
        let n = tokio::time::timeout(FIRST_BYTES, stream.read_buf(buf))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no HTTP head"))??;
        if n == 0 {
            return Ok(None);
        }
    }
}

/// The `Host` of a plain HTTP request's head.
async fn plain_http_host(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<Option<String>> {
    let Some(end) = read_head(stream, buf).await? else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    Ok(head.lines().skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("host")
            .then(|| strip_port(v.trim()).to_string())
    }))
}

fn strip_port(authority: &str) -> &str {
    match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(']') => h,
        _ => authority,
    }
}

/// An explicit proxy request: `CONNECT host:port`, the host resolved through the sandbox's
/// DNS answers. Answers 200 and returns the target, or answers an error and returns `None`.
async fn connect_head(
    shared: &Shared,
    stream: &mut TcpStream,
) -> io::Result<Option<(SocketAddr, Option<String>, Vec<u8>)>> {
    let mut buf = Vec::new();
    let Some(end) = read_head(stream, &mut buf).await? else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    if !head.starts_with("CONNECT ") && is_canary(&head) {
        answer_canary(shared, stream).await?;
        return Ok(None);
    }
    let target = head
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("CONNECT "))
        .and_then(|l| l.split(' ').next())
        .and_then(|hp| hp.rsplit_once(':'))
        .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)));
    let resolved = target.and_then(|(h, port)| match h.parse::<IpAddr>() {
        Ok(ip) => Some((SocketAddr::new(ip, port), None)),
        Err(_) => {
            let name = canonical_host(h)?;
            let ip = *shared.dns.answers(&name)?.first()?;
            Some((SocketAddr::new(ip, port), Some(name)))
        }
    });
    let Some((dst, name)) = resolved else {
        let reply: &[u8] = if target.is_some() {
            b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n"
        } else {
            b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n"
        };
        stream.write_all(reply).await?;
        return Ok(None);
    };
    stream
        .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .await?;
    Ok(Some((dst, name, buf.split_off(end))))
}

/// Copies bytes both ways between the guest and `dst` (after the egress check), replaying
/// what was read from the guest so far.
async fn splice(
    shared: &Shared,
    stream: TcpStream,
    buf: Vec<u8>,
    dst: SocketAddr,
    host: Option<String>,
) -> io::Result<()> {
    if !shared.egress.allowed(dst, host.as_deref()) {
        tracing::debug!(%dst, ?host, "egress refused");
        return Ok(());
    }
    let mut upstream = shared.dial.dial(dst).await?;
    let _ = upstream.set_nodelay(true);
    upstream.write_all(&buf).await?;
    crate::splice::both_ways(&stream, &upstream).await
}

/// A stream whose first bytes were already read.
struct Replay<S> {
    head: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.head.len() {
            let n = out.remaining().min(self.head.len() - self.at);
            let at = self.at;
            out.put_slice(&self.head[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A terminated connection to a bound host.
struct Conn {
    shared: Arc<Shared>,
    /// The SNI, canonical.
    host: String,
    dst: SocketAddr,
    /// The SNI was answered by the sandbox's DNS with `dst`'s address.
    verified: bool,
    /// Once a substitution happened here, every response is scrubbed of these.
    needles: Mutex<Vec<Needle>>,
    /// Idle upstream connections (HTTP/1.1 over TLS to `dst`, verified for `host`).
    idle: Mutex<Vec<SendRequest<BoxBody>>>,
}

async fn terminate(
    shared: Arc<Shared>,
    stream: TcpStream,
    buf: Vec<u8>,
    dst: SocketAddr,
    host: String,
) -> io::Result<()> {
    if !shared.egress.allowed(dst, Some(&host)) {
        tracing::debug!(%dst, %host, "egress refused");
        return Ok(());
    }
    let verified = shared
        .dns
        .answers(&host)
        .is_some_and(|ips| ips.contains(&dst.ip()));
    let acceptor = tokio_rustls::TlsAcceptor::from(shared.tls_server.clone());
    let tls = acceptor
        .accept(Replay {
            head: buf,
            at: 0,
            inner: stream,
        })
        .await?;
    let conn = Arc::new(Conn {
        shared,
        host,
        dst,
        verified,
        needles: Mutex::new(Vec::new()),
        idle: Mutex::new(Vec::new()),
    });
    let service = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(conn.request(req).await) }
    });
    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(tls), service)
        .await
        .map_err(io::Error::other)
}

/// A small JSON response the broker makes itself.
fn reply(status: StatusCode, reason: &str) -> Response<BoxBody> {
    let body = serde_json::json!({ "error": reason, "by": "hutch-broker" }).to_string();
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Reads and drops a refused request's body (bounded), so the client sees the refusal rather
/// than a reset stream.
async fn drain(body: Incoming) {
    const LIMIT: usize = 1 << 20;
    let mut body = body;
    let mut read = 0;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, Bytes::len);
            if read > LIMIT {
                break;
            }
        }
    })
    .await;
}

/// Request headers that belong to one hop.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
];

impl Conn {
    async fn request(&self, mut req: Request<Incoming>) -> Response<BoxBody> {
        // The guest's side of a WebSocket upgrade, taken before the request is consumed.
        let upgrade = websocket::is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
        let secrets = self.shared.secrets();
        let facts = Facts {
            host: self.host.clone(),
            port: self.dst.port(),
            method: Some(req.method().to_string()),
            path: target::normalise(req.uri().path()),
        };
        let fwd = match self.check(&req, &secrets, &facts) {
            Ok(fwd) => fwd,
            Err((status, reason)) => {
                drain(req.into_body()).await;
                return reply(status, &reason);
            }
        };
        for &i in &fwd.substituted {
            let s = &secrets[i];
            let mut needles = self.needles.lock().unwrap_or_else(|p| p.into_inner());
            for n in scrub::reflections(&s.name, s.value.expose(), s.placeholder.as_bytes()) {
                if !needles.contains(&n) {
                    needles.push(n);
                }
            }
        }
        let path = facts.path.clone().unwrap_or_default();
        let upstream =
            match self.upstream_request(req, &path, fwd, &secrets, &facts, upgrade.is_some()) {
                Ok(r) => r,
                Err(reason) => return reply(StatusCode::BAD_GATEWAY, &reason),
            };
        match self.send(upstream, upgrade.is_some()).await {
            Ok(resp) => match upgrade {
                Some(guest) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                    self.join_upgrade(guest, resp, &facts)
                }
                _ => self.response(resp, &facts),
            },
            Err(e) => {
                tracing::debug!(host = %self.host, error = %e, "upstream request failed");
                reply(StatusCode::BAD_GATEWAY, "upstream request failed")
            }
        }
    }

    /// The request-level checks and the policy's decision (recorded as events); `Err` is the
    /// status and reason of the broker's own answer.
    fn check(
        &self,
        req: &Request<Incoming>,
        secrets: &[AttachedSecret],
        facts: &Facts,
    ) -> Result<policy::Forward, (StatusCode, String)> {
        let method = req.method().as_str();
        let authority = req
            .uri()
            .authority()
            .map(|a| a.host().to_string())
            .or_else(|| {
                let h = req.headers().get(header::HOST)?.to_str().ok()?;
                Some(strip_port(h).to_string())
            });
        let early = if method == "TRACE" || method == "TRACK" {
            Some((
                StatusCode::METHOD_NOT_ALLOWED,
                "TRACE and TRACK are refused",
            ))
        } else if authority.as_deref().and_then(canonical_host).as_deref() != Some(&self.host) {
            Some((
                StatusCode::MISDIRECTED_REQUEST,
                "Host does not match the TLS server name",
            ))
        } else if facts.path.is_none() {
            Some((
                StatusCode::BAD_REQUEST,
                "request target is not an origin-form path",
            ))
        } else {
            None
        };
        let view = Req {
            method,
            path: facts.path.as_deref().unwrap_or_default(),
            query: req.uri().query(),
            headers: req.headers(),
        };
        if let Some((status, reason)) = early {
            for name in policy::mentioned(secrets, &view) {
                self.shared
                    .record(facts, &name, BrokerDecision::Refused, Some(reason.into()));
            }
            return Err((status, reason.to_string()));
        }
        let dest = Dest {
            host: &self.host,
            port: self.dst.port(),
            verified: self.verified,
        };
        let fwd = policy::decide(secrets, &dest, &view).map_err(|r| {
            self.shared
                .record(facts, &r.secret, r.decision, Some(r.reason.clone()));
            (r.status, r.reason)
        })?;
        for name in &fwd.forwarded {
            self.shared
                .record(facts, name, BrokerDecision::Forwarded, None);
        }
        for &i in &fwd.substituted {
            let name = &secrets[i].name;
            self.shared
                .record(facts, name, BrokerDecision::Substituted, None);
        }
        Ok(fwd)
    }

    /// The request as it goes upstream: HTTP/1.1, the normalised target, substituted headers,
    /// identity encoding, and a body watched for placeholders. A WebSocket upgrade keeps its
    /// upgrade headers but offers no extension (so frames can be scrubbed).
    fn upstream_request(
        &self,
        req: Request<Incoming>,
        path: &str,
        fwd: policy::Forward,
        secrets: &[AttachedSecret],
        facts: &Facts,
        websocket: bool,
    ) -> Result<Request<BoxBody>, String> {
        let (mut parts, body) = req.into_parts();
        let query = fwd.query.or(parts.uri.query().map(str::to_string));
        let target = match query {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        parts.uri = target.parse::<Uri>().map_err(|e| e.to_string())?;
        parts.version = Version::HTTP_11;
        for h in HOP_BY_HOP {
            parts.headers.remove(*h);
        }
        if websocket {
            parts.headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts
                .headers
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        }
        let host = match self.dst.port() {
            443 => self.host.clone(),
            port => format!("{}:{port}", self.host),
        };
        parts.headers.insert(
            header::HOST,
            HeaderValue::from_str(&host).map_err(|e| e.to_string())?,
        );
        parts.headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        for (name, value) in fwd.headers {
            parts.headers.insert(name, value);
        }
        let needles: Vec<Needle> = secrets
            .iter()
            .map(|s| Needle {
                find: s.placeholder.clone().into_bytes(),
                replace: s.placeholder.clone().into_bytes(),
                secret: s.name.clone(),
            })
            .collect();
        let (shared, facts) = (self.shared.clone(), facts.clone());
        let on_hit = Box::new(move |name: &str| {
            let reason = Some("in the request body".into());
            shared.record(&facts, name, BrokerDecision::Forwarded, reason);
        });
        let body = body.map_err(BoxError::from).boxed_unsync();
        let body = Filtered::new(body, false, needles, on_hit).boxed();
        Ok(Request::from_parts(parts, body))
    }

    /// The needles of the values that went out on this connection (none: nothing to scrub).
    fn needles(&self) -> Vec<Needle> {
        self.needles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Scrubs a response's headers, recording each secret found.
    fn scrub_headers(&self, headers: &mut hyper::HeaderMap, needles: &[Needle], facts: &Facts) {
        let mut header_scrub = scrub::Scrubber::new(needles.to_vec());
        for value in headers.values_mut() {
            let clean = header_scrub.all(value.as_bytes());
            if clean != value.as_bytes() {
                *value = HeaderValue::from_bytes(&clean).unwrap_or(HeaderValue::from_static(""));
            }
        }
        for name in &header_scrub.hits {
            self.shared.record(
                facts,
                name,
                BrokerDecision::Scrubbed,
                Some("in a response header".into()),
            );
        }
    }

    /// The upstream response as the guest gets it: scrubbed once a substitution happened here.
    fn response(&self, resp: Response<Incoming>, facts: &Facts) -> Response<BoxBody> {
        let needles = self.needles();
        let (mut parts, body) = resp.into_parts();
        let body = body.map_err(BoxError::from).boxed_unsync();
        if needles.is_empty() {
            return Response::from_parts(parts, body);
        }
        self.scrub_headers(&mut parts.headers, &needles, facts);
        let gunzip = match parts
            .headers
            .get(header::CONTENT_ENCODING)
            .map(HeaderValue::as_bytes)
        {
            None | Some(b"identity") => false,
            Some(b"gzip" | b"x-gzip") => true,
            Some(_) => {
                return reply(
                    StatusCode::BAD_GATEWAY,
                    "upstream answered in an encoding the broker cannot scrub",
                )
            }
        };
        parts.headers.remove(header::CONTENT_ENCODING);
        parts.headers.remove(header::CONTENT_LENGTH);
        let (shared, facts) = (self.shared.clone(), facts.clone());
        let on_hit = Box::new(move |name: &str| {
            let reason = Some("in the response body".into());
            shared.record(&facts, name, BrokerDecision::Scrubbed, reason);
        });
        let body = Filtered::new(body, gunzip, needles, on_hit).boxed();
        Response::from_parts(parts, body)
    }

    /// The origin accepted a WebSocket upgrade: the guest gets the 101 (headers scrubbed),
    /// and a task joins the two upgraded streams, the origin's frames scrubbed once a value
    /// went out on this connection.
    fn join_upgrade(
        &self,
        guest: hyper::upgrade::OnUpgrade,
        mut resp: Response<Incoming>,
        facts: &Facts,
    ) -> Response<BoxBody> {
        let origin = hyper::upgrade::on(&mut resp);
        let needles = self.needles();
        let (mut parts, _) = resp.into_parts();
        self.scrub_headers(&mut parts.headers, &needles, facts);
        let (shared, facts) = (self.shared.clone(), facts.clone());
        tokio::spawn(async move {
            let (guest, origin) = match tokio::join!(guest, origin) {
                (Ok(g), Ok(o)) => (TokioIo::new(g), TokioIo::new(o)),
                (g, o) => {
                    let (g, o) = (g.err(), o.err());
                    tracing::debug!(guest = ?g, origin = ?o, "WebSocket upgrade failed");
                    return;
                }
            };
            let (mut guest_r, mut guest_w) = tokio::io::split(guest);
            let (mut origin_r, mut origin_w) = tokio::io::split(origin);
            let up = async {
                let _ = tokio::io::copy(&mut guest_r, &mut origin_w).await;
                let _ = origin_w.shutdown().await;
            };
            let down = async {
                let ended = if needles.is_empty() {
                    let copied = tokio::io::copy(&mut origin_r, &mut guest_w).await;
                    let _ = guest_w.shutdown().await;
                    copied.map(drop)
                } else {
                    let mut reported = std::collections::BTreeSet::new();
                    let on_hit = |name: &str| {
                        if reported.insert(name.to_string()) {
                            let reason = Some("in a WebSocket message".into());
                            shared.record(&facts, name, BrokerDecision::Scrubbed, reason);
                        }
                    };
                    websocket::scrub_frames(origin_r, guest_w, needles, on_hit).await
                };
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "WebSocket from the origin ended");
                }
            };
            tokio::join!(up, down);
        });
        let empty = http_body_util::Empty::new()
            .map_err(|e| match e {})
            .boxed_unsync();
        Response::from_parts(parts, empty)
    }

    /// Sends on an idle upstream connection, or a new one; an upgrade always on a new one,
    /// which is not kept (it becomes the upgraded stream).
    async fn send(
        &self,
        req: Request<BoxBody>,
        upgrade: bool,
    ) -> Result<Response<Incoming>, BoxError> {
        if upgrade {
            return Ok(self.connect().await?.send_request(req).await?);
        }
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut sender = match idle {
            Some(mut s) => match s.ready().await {
                Ok(()) => s,
                Err(_) => self.connect().await?,
            },
            None => self.connect().await?,
        };
        let resp = sender.send_request(req).await?;
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(sender);
        Ok(resp)
    }

    /// Dials the checked address and verifies the real certificate for the SNI.
    async fn connect(&self) -> Result<SendRequest<BoxBody>, BoxError> {
        let tcp = self.shared.dial.dial(self.dst).await?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(self.host.clone())?;
        let tls = tokio_rustls::TlsConnector::from(self.shared.tls_client.clone())
            .connect(name, tcp)
            .await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }
}
