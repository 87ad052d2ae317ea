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

/// A stub host: its state, its registration, its capacity's sender, its server.
type StubHost = (
    Arc<Stub>,
    Registrar,
    watch::Sender<Capacity>,
    tokio::task::JoinHandle<()>,
);

/// Starts a stub host with `slots` and registers it in the fleet under a lease of `ttl`.
async fn stub_host(fleet: &Fleet, name: &str, slots: usize, ttl: Duration) -> StubHost {
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
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
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
    let registrar = Registrar::start(fleet.clone(), record, ttl, rx)
        .await
        .unwrap();
    (stub, registrar, tx, server)
}

/// Starts a gateway on `etcd`'s fleet under `prefix` and waits until it accepts
/// connections: its address.
async fn start_gateway(etcd: &testing::Etcd, prefix: &str, ttl: u64, lost_after: u64) -> String {
    let listen = format!("127.0.0.1:{}", testing::free_port());
    let args = GatewayArgs {
        fleet: etcd.url(),
        listen: listen.clone(),
        fleet_opts: FleetOpts {
            fleet_prefix: prefix.into(),
            fleet_lease_ttl: ttl,
            fleet_lost_after: lost_after,
        },
    };
    tokio::spawn(gateway::run(args, std::future::pending()));
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(&listen).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    listen
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
    let (a, _ra, _ca, _sa) = stub_host(&fleet, "a", 4, Duration::from_secs(30)).await;
    let (b, _rb, _cb, _sb) = stub_host(&fleet, "b", 6, Duration::from_secs(30)).await;
    let (token, _) = hutch_fleet::tokens::create(&fleet, None).await.unwrap();

    // Two gateways on the same fleet.
    let mut gateways = Vec::new();
    for _ in 0..2 {
        gateways.push(start_gateway(&etcd, prefix, 10, 300).await);
    }
    let cache = FleetCache::start(fleet.clone()).await.unwrap();
    assert!(
        cache
            .wait_for(Duration::from_secs(5), |s| s.hosts.len() == 2
                && s.tokens.len() == 1)
            .await
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_host_shows_unreachable_then_lost_and_drained_hosts_take_nothing() {
    let etcd = testing::Etcd::start().await;
    let prefix = "/gw-loss/";
    let fleet = Fleet::connect_prefixed(&etcd.url(), prefix).await.unwrap();
    let ttl = Duration::from_secs(2);
    let (a, ra, _ca, server_a) = stub_host(&fleet, "a", 1, ttl).await;
    let (b, _rb, _cb, _sb) = stub_host(&fleet, "b", 1, ttl).await;
    let (token, _) = hutch_fleet::tokens::create(&fleet, None).await.unwrap();
    let gw = start_gateway(&etcd, prefix, 2, 3).await;
    let cache = FleetCache::start(fleet.clone()).await.unwrap();
    assert!(
        cache
            .wait_for(Duration::from_secs(5), |s| s.hosts.len() == 2
                && s.tokens.len() == 1
                && s.reconciler.is_some())
            .await
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    // One sandbox on each host (one slot each).
    for _ in 0..2 {
        let (status, body) = call(&gw, Method::POST, "/v1/sandboxes", &token, "{}").await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let on_a = a.sandboxes.lock().unwrap().keys().next().unwrap().clone();
    let on_b = b.sandboxes.lock().unwrap().keys().next().unwrap().clone();

    // The fleet's hosts, as an admin sees them.
    let (status, hosts) = call(&gw, Method::GET, "/v1/fleet/hosts", &token, "").await;
    assert_eq!(status, StatusCode::OK, "{hosts}");
    let hosts = hosts.as_array().unwrap().clone();
    assert_eq!(hosts.len(), 2);
    for h in &hosts {
        assert_eq!(
            (
                h["health"].as_str(),
                h["incarnation"].as_u64(),
                h["booked"].as_u64()
            ),
            (Some("up"), Some(1), Some(1)),
            "{h}"
        );
        assert_eq!(h["placements"]["running"], 1, "{h}");
    }

    // Host a dies: process and lease.
    server_a.abort();
    drop(ra);
    let get_a = format!("/v1/sandboxes/{on_a}");
    let mut seen = Vec::new();
    for _ in 0..100 {
        let (status, info) = call(&gw, Method::GET, &get_a, &token, "").await;
        assert_eq!(status, StatusCode::OK, "{info}");
        let state = info["state"]["state"].as_str().unwrap().to_string();
        if seen.last() != Some(&state) {
            seen.push(state.clone());
        }
        if state == "lost" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Seen running (before the lease lapsed) or not, then unreachable, then lost.
    let tail: Vec<&str> = seen
        .iter()
        .map(String::as_str)
        .filter(|s| *s != "running")
        .collect();
    assert_eq!(tail, ["unreachable", "lost"], "{seen:?}");

    // The list shows it as lost beside b's running one; calls on it are refused, not proxied.
    let (status, listed) = call(&gw, Method::GET, "/v1/sandboxes", &token, "").await;
    assert_eq!(status, StatusCode::OK);
    let states: BTreeMap<String, String> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["state"]["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(states[&on_a], "lost", "{listed}");
    assert_eq!(states[&on_b], "running", "{listed}");
    let (status, _) = call(
        &gw,
        Method::POST,
        &format!("/v1/sandboxes/{on_a}/exec"),
        &token,
        "{\"argv\":[\"true\"]}",
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, fleet_ls) = call(&gw, Method::GET, "/v1/fleet/sandboxes", &token, "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        fleet_ls
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["host"] == hosts[0]["host"] || s["host"] == hosts[1]["host"]),
        "{fleet_ls}"
    );
    let (_, hosts) = call(&gw, Method::GET, "/v1/fleet/hosts", &token, "").await;
    let gone = hosts
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["health"] == "unreachable")
        .unwrap_or_else(|| panic!("{hosts}"));
    assert_eq!(gone["placements"]["lost"], 1, "{gone}");

    // Nothing was recreated: b is full, and a create finds no room rather than a new home.
    assert_eq!(b.sandboxes.lock().unwrap().len(), 1);
    let (status, _) = call(&gw, Method::POST, "/v1/sandboxes", &token, "{}").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);

    // Drain b, free its slot: still no placement there until it is undrained.
    let b_name = cache
        .snapshot()
        .hosts
        .keys()
        .next()
        .cloned()
        .expect("b is in the fleet");
    let (status, drained) = call(
        &gw,
        Method::PUT,
        &format!("/v1/fleet/hosts/{b_name}/drain"),
        &token,
        "",
    )
    .await;
    assert_eq!(
        (status, drained["drained"].as_bool()),
        (StatusCode::OK, Some(true))
    );
    let (status, _) = call(
        &gw,
        Method::DELETE,
        &format!("/v1/sandboxes/{on_b}"),
        &token,
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        cache
            .wait_for(Duration::from_secs(5), |s| s.booked.get(&b_name)
                == Some(&0))
            .await
    );
    let (status, _) = call(&gw, Method::POST, "/v1/sandboxes", &token, "{}").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let (status, _) = call(
        &gw,
        Method::DELETE,
        &format!("/v1/fleet/hosts/{b_name}/drain"),
        &token,
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = call(&gw, Method::POST, "/v1/sandboxes", &token, "{}").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    // A label-scoped token may not see or drain the fleet's hosts.
    let (scoped, _) = hutch_fleet::tokens::create(&fleet, Some("team=x".into()))
        .await
        .unwrap();
    assert!(
        cache
            .wait_for(Duration::from_secs(5), |s| s.tokens.len() == 2)
            .await
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _) = call(&gw, Method::GET, "/v1/fleet/hosts", &scoped, "").await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // The gateway documents its fleet routes, with the shared error statuses.
    let (_, doc) = call(&gw, Method::GET, "/openapi.json", &token, "").await;
    for (method, path) in [
        ("get", "/v1/fleet/hosts"),
        ("put", "/v1/fleet/hosts/{host}/drain"),
        ("delete", "/v1/fleet/hosts/{host}/drain"),
        ("get", "/v1/fleet/sandboxes"),
    ] {
        let responses = &doc["paths"][path][method]["responses"];
        for status in ["200", "400", "401", "500"] {
            assert!(
                responses[status].is_object(),
                "{method} {path} lacks {status}"
            );
        }
    }
}
