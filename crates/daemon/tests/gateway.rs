//! `hutch gateway` against a real etcd and small stub hosts (HTTP servers answering the
//! host API's create, get, list and destroy): placement under contention, forwarding to the
//! owner, and tokens checked at the gateway and passed on to the host.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    body::Body,
    extract::{Path, Request, State},
    http::{header, Method, StatusCode},
    Json, Router,
};
use hutch_daemon::{gateway, FleetOpts, GatewayArgs};
use hutch_fleet::{testing, Capacity, Fleet, FleetCache, HostRecord, Registrar};
use hutch_types::{SandboxInfo, SandboxSpec, SandboxState};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::watch};

/// A stub host: creates up to its slots (then 429), remembers what it created and every
/// Authorization header it was sent.
#[derive(Default)]
struct Stub {
    name: String,
    slots: usize,
    sandboxes: Mutex<BTreeMap<String, SandboxInfo>>,
    tokens_seen: Mutex<Vec<String>>,
}

type Shared = State<Arc<Stub>>;

fn seen(stub: &Stub, req: &Request) {
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    stub.tokens_seen.lock().unwrap().push(auth);
}

async fn stub_create(State(stub): Shared, req: Request) -> (StatusCode, Json<serde_json::Value>) {
    seen(&stub, &req);
    // Slow enough that creates overlap.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut sandboxes = stub.sandboxes.lock().unwrap();
    if sandboxes.len() >= stub.slots {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            Json(serde_json::json!({"code": "over_capacity", "message": "full"})),
        );
    }
    let id = format!("sb-{}-{}", stub.name, sandboxes.len());
    let info = SandboxInfo {
        id: id.clone(),
        state: SandboxState::Running,
        spec: SandboxSpec::default(),
        created_at_ms: 0,
        updated_at_ms: 0,
        expires_at_ms: None,
    };
    sandboxes.insert(id, info.clone());
    (
        StatusCode::CREATED,
        Json(serde_json::to_value(info).unwrap()),
    )
}

async fn stub_one(
    State(stub): Shared,
    Path(id): Path<String>,
    req: Request,
) -> (StatusCode, Json<serde_json::Value>) {
    seen(&stub, &req);
    let mut sandboxes = stub.sandboxes.lock().unwrap();
    let found = if req.method() == Method::DELETE {
        sandboxes.remove(&id)
    } else {
        sandboxes.get(&id).cloned()
    };
    match found {
        Some(info) => (StatusCode::OK, Json(serde_json::to_value(info).unwrap())),
        None => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"code": "not_found", "message": id})),
        ),
    }
}

/// An echo WebSocket where the host serves exec streams.
async fn stub_ws(ws: axum::extract::ws::WebSocketUpgrade) -> axum::response::Response {
    ws.on_upgrade(|mut socket| async move {
        while let Some(Ok(msg)) = socket.recv().await {
            if socket.send(msg).await.is_err() {
                return;
            }
        }
    })
}

async fn stub_list(State(stub): Shared, req: Request) -> Json<Vec<SandboxInfo>> {
    seen(&stub, &req);
    Json(stub.sandboxes.lock().unwrap().values().cloned().collect())
}

/// Starts a stub host with `slots` and registers it in the fleet.
async fn stub_host(
    fleet: &Fleet,
    name: &str,
    slots: usize,
) -> (Arc<Stub>, Registrar, watch::Sender<Capacity>) {
    let stub = Arc::new(Stub {
        name: name.into(),
        slots,
        ..Stub::default()
    });
    let app = Router::new()
        .route(
            "/v1/sandboxes",
            axum::routing::post(stub_create).get(stub_list),
        )
        .route(
            "/v1/sandboxes/{id}",
            axum::routing::get(stub_one).delete(stub_one),
        )
        .route("/v1/sandboxes/{id}/exec/ws", axum::routing::get(stub_ws))
        .with_state(stub.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let capacity = Capacity {
        vcpus: 4,
        memory_mib: 8192,
        free_memory_mib: 8192,
        free_disk_mib: 1000,
        slots: slots as u32,
        free_slots: slots as u32,
    };
    let (tx, rx) = watch::channel(capacity.clone());
    let record = HostRecord {
        host: addr.to_string(),
        advertise: format!("http://{addr}"),
        zone: None,
        labels: BTreeMap::new(),
        backend: "qemu".into(),
        incarnation: 0,
        capacity,
    };
    let registrar = Registrar::start(fleet.clone(), record, Duration::from_secs(30), rx)
        .await
        .unwrap();
    (stub, registrar, tx)
}

/// One request to `addr`: status and body.
async fn call(
    addr: &str,
    method: Method,
    path: &str,
    token: &str,
    body: &str,
) -> (StatusCode, serde_json::Value) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, addr)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let answer = sender.send_request(req).await.unwrap();
    let status = answer.status();
    let bytes = axum::body::to_bytes(Body::new(answer.into_body()), 1 << 20)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_creates_for_ten_slots_through_two_gateways() {
    let etcd = testing::Etcd::start().await;
    let prefix = "/gw-test/";
    let fleet = Fleet::connect_prefixed(&etcd.url(), prefix).await.unwrap();
    let (a, _ra, _ca) = stub_host(&fleet, "a", 4).await;
    let (b, _rb, _cb) = stub_host(&fleet, "b", 6).await;
    let (token, _) = hutch_fleet::tokens::create(&fleet, None).await.unwrap();

    // Two gateways on the same fleet.
    let mut gateways = Vec::new();
    for _ in 0..2 {
        let listen = format!("127.0.0.1:{}", testing::free_port());
        let args = GatewayArgs {
            fleet: etcd.url(),
            listen: listen.clone(),
            fleet_opts: FleetOpts {
                fleet_prefix: prefix.into(),
                fleet_lease_ttl: 10,
            },
        };
        tokio::spawn(gateway::run(args, std::future::pending()));
        gateways.push(listen);
    }
    let cache = FleetCache::start(fleet.clone()).await.unwrap();
    assert!(
        cache
            .wait_for(Duration::from_secs(5), |s| s.hosts.len() == 2
                && s.tokens.len() == 1)
            .await
    );
    for gw in &gateways {
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(gw).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The fleet's caches in the gateways see the hosts and the token before the creates.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Without a fleet token: refused at the gateway, nothing reaches a host.
    let (status, _) = call(&gateways[0], Method::POST, "/v1/sandboxes", "nope", "{}").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(a.tokens_seen.lock().unwrap().is_empty() && b.tokens_seen.lock().unwrap().is_empty());

    let creates = (0..20).map(|i| {
        let gw = gateways[i % 2].clone();
        let token = token.clone();
        tokio::spawn(async move { call(&gw, Method::POST, "/v1/sandboxes", &token, "{}").await })
    });
    let mut created = Vec::new();
    let mut refused = 0;
    for c in creates.collect::<Vec<_>>() {
        let (status, body) = c.await.unwrap();
        match status {
            StatusCode::CREATED => created.push(body["id"].as_str().unwrap().to_string()),
            StatusCode::TOO_MANY_REQUESTS => refused += 1,
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!((created.len(), refused), (10, 10), "{created:?}");
    assert_eq!(
        a.sandboxes.lock().unwrap().len(),
        4,
        "host a over- or under-committed"
    );
    assert_eq!(
        b.sandboxes.lock().unwrap().len(),
        6,
        "host b over- or under-committed"
    );
    // Every call a host got carried the client's token (the host checks it again).
    for stub in [&a, &b] {
        assert!(stub
            .tokens_seen
            .lock()
            .unwrap()
            .iter()
            .all(|t| *t == format!("Bearer {token}")));
    }

    // List through either gateway: every host's sandboxes.
    let (status, listed) = call(&gateways[1], Method::GET, "/v1/sandboxes", &token, "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed.as_array().unwrap().len(), 10);

    // Get and destroy go to the owner; the slot is free again afterwards.
    let id = &created[0];
    let (status, got) = call(
        &gateways[1],
        Method::GET,
        &format!("/v1/sandboxes/{id}"),
        &token,
        "",
    )
    .await;
    assert_eq!(
        (status, got["id"].as_str()),
        (StatusCode::OK, Some(id.as_str()))
    );
    let (status, _) = call(
        &gateways[0],
        Method::DELETE,
        &format!("/v1/sandboxes/{id}"),
        &token,
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(
        &gateways[0],
        Method::GET,
        "/v1/sandboxes/sb-nowhere-0",
        &token,
        "",
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        cache
            .wait_for(Duration::from_secs(5), |s| !s.placements.contains_key(id)
                && s.placements.len() == 9)
            .await
    );
    let (status, again) = call(&gateways[0], Method::POST, "/v1/sandboxes", &token, "{}").await;
    assert_eq!(status, StatusCode::CREATED, "{again}");

    // An exec WebSocket goes through the gateway to the owner and back.
    let url = format!("ws://{}/v1/sandboxes/{}/exec/ws", gateways[1], created[1]);
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
            .unwrap();
    req.headers_mut().insert(
        header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::Binary(b"stdin bytes".to_vec().into()))
        .await
        .unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echoed.into_data().as_ref(), b"stdin bytes");
    ws.close(None).await.unwrap();

    // A token limited to a label the sandboxes lack is refused at the gateway.
    let (scoped, _) = hutch_fleet::tokens::create(&fleet, Some("team=x".into()))
        .await
        .unwrap();
    assert!(
        cache
            .wait_for(Duration::from_secs(5), |s| s.tokens.len() == 2)
            .await
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _) = call(
        &gateways[0],
        Method::GET,
        &format!("/v1/sandboxes/{}", created[1]),
        &scoped,
        "",
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // The gateway serves the daemon's OpenAPI document.
    let (status, doc) = call(&gateways[0], Method::GET, "/openapi.json", &token, "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        doc["paths"]["/v1/sandboxes/{id}/exec"].is_object(),
        "{}",
        doc["paths"]
    );
}
