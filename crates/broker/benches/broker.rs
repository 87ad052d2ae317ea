//! Not a test: the broker's cost. From the guest namespace, p50/p95 of a small HTTPS request on
//! a kept-alive connection through the broker with a substitution, spliced, and direct (not
//! redirected); then bulk download throughput spliced vs direct. Needs root.
//! `cargo bench -p hutch-broker --bench broker`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hutch_types::{SecretBinding, SecretLocation};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use support::{TestSecret, World};

const ROUNDS: usize = 2000;
const BULK: usize = 256 << 20;
const PH: &str = "hutch_ph_bench0123456789abcdefghij";

async fn client(
    w: &World,
    dst: &str,
    host: &str,
    root: &CertificateDer<'static>,
) -> SendRequest<Empty<Bytes>> {
    let tcp = support::connect_in(&w.guest, dst.parse::<SocketAddr>().unwrap())
        .await
        .unwrap();
    tcp.set_nodelay(true).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from(host.to_string()).unwrap(), tcp)
        .await
        .unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn get(s: &mut SendRequest<Empty<Bytes>>, host: &str, path: &str) -> usize {
    let req = hyper::Request::get(path)
        .header("host", host)
        .header("x-api-key", PH)
        .body(Empty::new())
        .unwrap();
    s.ready().await.unwrap();
    let resp = s.send_request(req).await.unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let mut body = resp.into_body();
    let mut n = 0;
    while let Some(frame) = body.frame().await {
        n += frame.unwrap().data_ref().map_or(0, Bytes::len);
    }
    n
}

fn percentile(sorted: &[Duration], p: usize) -> f64 {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)].as_secs_f64() * 1e3
}

async fn latency(
    w: &World,
    name: &str,
    dst: &str,
    host: &str,
    root: &CertificateDer<'static>,
) -> f64 {
    let mut s = client(w, dst, host, root).await;
    for _ in 0..100 {
        get(&mut s, host, "/v1/echo").await;
    }
    let mut times = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let t = Instant::now();
        get(&mut s, host, "/v1/echo").await;
        times.push(t.elapsed());
    }
    times.sort();
    let (p50, p95) = (percentile(&times, 50), percentile(&times, 95));
    println!("{name:<24} p50 {p50:.3} ms  p95 {p95:.3} ms  ({ROUNDS} requests, kept alive)");
    p50
}

async fn throughput(
    w: &World,
    name: &str,
    dst: &str,
    host: &str,
    root: &CertificateDer<'static>,
) -> f64 {
    let mut best = 0f64;
    for _ in 0..3 {
        let mut s = client(w, dst, host, root).await;
        let t = Instant::now();
        let n = get(&mut s, host, &format!("/big/{BULK}")).await;
        assert_eq!(n, BULK);
        best = best.max(n as f64 / t.elapsed().as_secs_f64() / 1e6);
    }
    println!("{name:<24} {best:.0} MB/s (best of 3, {} MiB)", BULK >> 20);
    best
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    if !support::can_run("bench broker") {
        return;
    }
    let secret = TestSecret {
        name: "bench",
        value: "sk-bench-real-value-0123456789",
        placeholder: PH,
        bindings: vec![SecretBinding {
            host: "api.example.test".into(),
            port: 443,
            path: None,
            methods: vec![],
            at: SecretLocation::Header {
                name: "x-api-key".into(),
            },
            fetch_only: false,
        }],
    };
    let w = World::new("bench", vec![secret]).await;
    let (ca, root) = (w.sandbox_ca_der.clone(), w.test_root_der.clone());
    let api = format!("{}:443", support::API_IP);
    let other = format!("{}:443", support::OTHER_IP);
    let direct = format!("{}:8443", support::OTHER_IP);
    let brokered = latency(&w, "broker (substituted)", &api, "api.example.test", &ca).await;
    let spliced = latency(&w, "spliced", &other, "other.example.test", &root).await;
    let plain = latency(&w, "direct", &direct, "other.example.test", &root).await;
    println!(
        "substitution adds {:.3} ms p50 over splice (target ≤ 1 ms); splice adds {:.3} ms over direct",
        brokered - spliced,
        spliced - plain
    );
    let s = throughput(&w, "bulk spliced", &other, "other.example.test", &root).await;
    let d = throughput(&w, "bulk direct", &direct, "other.example.test", &root).await;
    throughput(&w, "bulk broker (scrubbed)", &api, "api.example.test", &ca).await;
    println!(
        "splice costs {:.1} % of direct throughput (target ≤ 5 %)",
        (1.0 - s / d) * 100.0
    );
}
