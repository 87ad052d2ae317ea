//! HTTPS origins for tests of the secret broker: a test root CA, one leaf for every test host,
//! and a handler that records and echoes what it received, served on listeners made inside a
//! network namespace the test owns (RFC 5737 addresses only). The broker's namespace tests and
//! the real-VM daemon suite both use them, so the two see the same "internet".

use std::convert::Infallible;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The names the origins' leaf certificate holds.
pub const ORIGIN_HOSTS: [&str; 3] = [
    "api.example.test",
    "evil.example.test",
    "other.example.test",
];

/// One request as an origin received it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The address the origin was reached at.
    pub local: IpAddr,
    /// Method and path with query.
    pub target: String,
    /// Every header, as `name: value` lines.
    pub headers: String,
    /// The body.
    pub body: String,
}

impl Seen {
    /// Everything the origin received, as one string.
    pub fn all(&self) -> String {
        format!(
            "{} {}\n{}\n{}",
            self.local, self.target, self.headers, self.body
        )
    }
}

/// What every origin received, in order.
pub type SeenLog = Arc<Mutex<Vec<Seen>>>;

/// The origins' TLS: a fresh test root (its PEM written to `dir/test-root.pem`) and a leaf
/// for [`ORIGIN_HOSTS`] signed by it. Returns the server configuration (h2 and http/1.1), the
/// root's certificate and the root file's path.
pub fn origin_tls(dir: &Path) -> (rustls::ServerConfig, CertificateDer<'static>, String) {
    let root_key = KeyPair::generate().unwrap();
    let mut root = CertificateParams::new(Vec::<String>::new()).unwrap();
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root.distinguished_name
        .push(rcgen::DnType::CommonName, "test internet root");
    let root = root.self_signed(&root_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(ORIGIN_HOSTS.map(String::from).to_vec())
        .unwrap()
        .signed_by(&leaf_key, &root, &root_key)
        .unwrap();
    let root_file = dir.join("test-root.pem");
    std::fs::write(&root_file, root.pem()).unwrap();
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
    )
    .unwrap();
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    (server, root.der().clone(), root_file.display().to_string())
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// A git smart-HTTP server for the origins: `git http-backend` (the host's git) over the bare
/// repositories under `root`, for requests with HTTP Basic `password` (any user); others get
/// 401 with a Basic challenge, as a forge answers.
#[derive(Debug, Clone)]
pub struct GitServer {
    /// `GIT_PROJECT_ROOT`: the repositories (`<root>/org/repo.git`).
    pub root: std::path::PathBuf,
    /// The password a request must carry.
    pub password: String,
}

impl GitServer {
    /// Whether `req` is for a repository (its path holds `.git/`).
    fn serves(path: &str) -> bool {
        path.contains(".git/")
    }

    /// The Basic user name, if `authorization` carries this server's password.
    fn user(&self, authorization: Option<&str>) -> Option<String> {
        use base64::Engine;
        let b64 = authorization?.strip_prefix("Basic ")?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .ok()?;
        let (user, pass) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
        (pass == self.password).then(|| user.to_string())
    }

    /// Runs one request through `git http-backend` (CGI).
    async fn serve(
        &self,
        head: &hyper::http::request::Parts,
        body: Bytes,
    ) -> Response<Full<Bytes>> {
        let header = |n: &str| {
            head.headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(String::from)
        };
        let Some(user) = self.user(header("authorization").as_deref()) else {
            return Response::builder()
                .status(401)
                .header("www-authenticate", "Basic realm=\"git\"")
                .body(Full::from("authentication required\n"))
                .unwrap();
        };
        let mut cmd = tokio::process::Command::new("git");
        cmd.arg("http-backend")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("GIT_PROJECT_ROOT", &self.root)
            .env("GIT_HTTP_EXPORT_ALL", "1")
            .env("REMOTE_USER", user)
            .env("REMOTE_ADDR", "192.0.2.1")
            .env("REQUEST_METHOD", head.method.as_str())
            .env("PATH_INFO", head.uri.path())
            .env("QUERY_STRING", head.uri.query().unwrap_or(""))
            .env("CONTENT_TYPE", header("content-type").unwrap_or_default())
            .env("CONTENT_LENGTH", body.len().to_string())
            .env("GIT_PROTOCOL", header("git-protocol").unwrap_or_default())
            .env(
                "HTTP_CONTENT_ENCODING",
                header("content-encoding").unwrap_or_default(),
            )
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        let Ok(mut child) = cmd.spawn() else {
            return Response::builder()
                .status(500)
                .body(Full::from("no git\n"))
                .unwrap();
        };
        let mut stdin = child.stdin.take().unwrap();
        let feed = async move {
            use tokio::io::AsyncWriteExt;
            let _ = stdin.write_all(&body).await;
        };
        let (_, out) = tokio::join!(feed, child.wait_with_output());
        let out = out.map(|o| o.stdout).unwrap_or_default();
        let split = out
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|p| (p, 4))
            .or_else(|| out.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2)));
        let Some((end, sep)) = split else {
            return Response::builder()
                .status(502)
                .body(Full::from("bad CGI output\n"))
                .unwrap();
        };
        let mut resp = Response::builder();
        for line in String::from_utf8_lossy(&out[..end]).lines() {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let v = v.trim();
            if k.eq_ignore_ascii_case("status") {
                resp = resp.status(
                    v.split(' ')
                        .next()
                        .unwrap_or("200")
                        .parse::<u16>()
                        .unwrap_or(500),
                );
            } else {
                resp = resp.header(k.trim(), v);
            }
        }
        resp.body(Full::from(out[end + sep..].to_vec())).unwrap()
    }
}

/// The text a WebSocket echo greets its client with: the `x-api-key` it was upgraded with.
pub const WS_GREETING: &str = "x-api-key: ";

/// A WebSocket echo on an upgraded connection: greets with [`WS_GREETING`] and the request's
/// `x-api-key` (a reflection, as an error message may quote it), then sends back every text
/// and binary message until the client closes.
async fn websocket_echo(upgrade: hyper::upgrade::OnUpgrade, key: String) {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::{Message, Role};
    let Ok(upgraded) = upgrade.await else {
        return;
    };
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        TokioIo::new(upgraded),
        Role::Server,
        None,
    )
    .await;
    if ws
        .send(Message::text(format!("{WS_GREETING}{key}")))
        .await
        .is_err()
    {
        return;
    }
    while let Some(Ok(m)) = ws.next().await {
        if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
            return;
        }
    }
}

/// The `101 Switching Protocols` answer to a WebSocket upgrade request.
fn websocket_accept(head: &hyper::http::request::Parts) -> Response<Full<Bytes>> {
    let key = head
        .headers
        .get("sec-websocket-key")
        .map(|k| tokio_tungstenite::tungstenite::handshake::derive_accept_key(k.as_bytes()))
        .unwrap_or_default();
    Response::builder()
        .status(101)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", key)
        .body(Full::default())
        .unwrap()
}

/// The origins' one handler: paths into a repository (`….git/…`) go to the [`GitServer`] if
/// there is one, `/reflect` answers 401 quoting `x-api-key` in its body and a header, `/gzip`
/// answers the echo gzipped whatever was asked, `/big/N` answers N bytes, `/ws` with a
/// WebSocket upgrade is a WebSocket echo ([`WS_GREETING`]), every other path echoes the
/// request (target, headers and body). Every request is recorded. HTTP/2 is served where the
/// client's ALPN offers it.
async fn origin(
    mut req: Request<hyper::body::Incoming>,
    local: IpAddr,
    seen: SeenLog,
    git: Option<Arc<GitServer>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let websocket = (req.uri().path().ends_with("/ws")
        && req
            .headers()
            .get("upgrade")
            .is_some_and(|u| u.as_bytes().eq_ignore_ascii_case(b"websocket")))
    .then(|| hyper::upgrade::on(&mut req));
    let target = format!("{} {}", req.method(), req.uri());
    let path = req.uri().path().to_string();
    let mut headers = String::new();
    for (k, v) in req.headers() {
        headers.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
    }
    let key = req
        .headers()
        .get("x-api-key")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    let (head, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let raw = body.clone();
    let body = String::from_utf8_lossy(&body).into_owned();
    let echo = format!("{target}\n{headers}\n{body}");
    seen.lock().unwrap().push(Seen {
        local,
        target,
        headers,
        body,
    });
    if let Some(upgrade) = websocket {
        tokio::spawn(websocket_echo(upgrade, key));
        return Ok(websocket_accept(&head));
    }
    if let Some(git) = git.filter(|_| GitServer::serves(&path)) {
        return Ok(git.serve(&head, raw).await);
    }
    let resp = Response::builder();
    let resp = if path.ends_with("/reflect") {
        resp.status(401)
            .header("x-invalid-key", key.clone())
            .body(Full::from(format!(
                "{{\"error\":\"invalid x-api-key: {key}\"}}"
            )))
    } else if path.ends_with("/gzip") {
        resp.header("content-encoding", "gzip")
            .body(Full::from(gzip(echo.as_bytes())))
    } else if let Some(n) = path.strip_prefix("/big/") {
        resp.body(Full::from(vec![b'x'; n.parse().unwrap_or(0)]))
    } else {
        resp.body(Full::from(echo))
    };
    Ok(resp.unwrap())
}

/// Serves the origins on `listener` (TLS with `tls`, else plain HTTP), recording into `seen`,
/// on a task of the current runtime.
pub fn serve_origins(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    seen: SeenLog,
) {
    serve_origins_with_git(listener, tls, seen, None)
}

/// [`serve_origins`], with repositories served by `git`.
pub fn serve_origins_with_git(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    seen: SeenLog,
    git: Option<Arc<GitServer>>,
) {
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (tls, seen, git) = (tls.clone(), seen.clone(), git.clone());
            let local = tcp.local_addr().unwrap().ip();
            // As real servers do (nginx, Go, Node): without it, a response written after the
            // TLS session tickets waits for the client's delayed ACK (40 ms).
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |r| {
                    origin(r, local, seen.clone(), git.clone())
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = match tls {
                    Some(tls) => {
                        let Ok(s) = tokio_rustls::TlsAcceptor::from(tls).accept(tcp).await else {
                            return;
                        };
                        builder
                            .serve_connection_with_upgrades(TokioIo::new(s), svc)
                            .await
                    }
                    None => {
                        builder
                            .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                            .await
                    }
                };
            });
        }
    });
}

/// A TCP listener on `addr` made inside network namespace `ns` (for the current runtime).
pub fn listen_in(ns: &str, addr: &str) -> tokio::net::TcpListener {
    let addr: SocketAddr = addr.parse().unwrap();
    let l = hutch_net::in_netns(ns, move || {
        let l = std::net::TcpListener::bind(addr).map_err(|e| hutch_net::NetError::Io {
            what: "bind".into(),
            source: e,
        })?;
        l.set_nonblocking(true).unwrap();
        Ok(l)
    })
    .unwrap();
    tokio::net::TcpListener::from_std(l).unwrap()
}
