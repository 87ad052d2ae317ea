//! `hutch-bench secrets`: what the secret broker costs, from the namespace stand-in of a guest
//! (`hutch_testkit::broker_world`: a guest namespace whose TCP 443 is redirected by nft to a
//! serving broker, origins in an "internet" namespace). Three ways to the same origin process:
//! through the broker with a substitution (TLS terminated), spliced by the broker (an unbound
//! host), and direct (a port the redirect leaves alone, routed by the sandbox namespace).
//! For each: p50/p95 of a small HTTPS GET on a kept-alive connection and on a new connection
//! (TCP + TLS handshake + request), and bulk download throughput. Needs root, `ip` and `nft`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Empty};
use hutch_testkit::broker_world::{self as world, TestSecret, World};
use hutch_types::{SecretBinding, SecretLocation};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::boot::{pct, summary};
use crate::error::BenchError;

/// The placeholder the requests carry (substituted on the brokered way only).
const PH: &str = "hutch_ph_bench0123456789abcdefghij";

/// `hutch-bench secrets`.
#[derive(Debug, Args)]
pub struct BenchSecretsArgs {
    /// Requests per way on one kept-alive connection.
    #[arg(long, default_value_t = 2000)]
    pub requests: usize,
    /// New connections per way (each: TCP, TLS handshake, one request).
    #[arg(long, default_value_t = 300)]
    pub connections: usize,
    /// Bytes of each bulk download (best of 3 per way).
    #[arg(long, default_value_t = 256 << 20)]
    pub bulk_bytes: usize,
}

/// One way to the origin.
struct Way {
    name: &'static str,
    dst: SocketAddr,
    host: &'static str,
    root: CertificateDer<'static>,
}

fn failed(what: &str, e: impl std::fmt::Display) -> BenchError {
    BenchError::Io(std::io::Error::other(format!("{what}: {e}")))
}

async fn connect(w: &World, way: &Way) -> Result<SendRequest<Empty<Bytes>>, BenchError> {
    let tcp = world::connect_in(&w.guest, way.dst)
        .await
        .map_err(BenchError::Io)?;
    tcp.set_nodelay(true).map_err(BenchError::Io)?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(way.root.clone()).map_err(|e| failed("root", e))?;
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| failed("TLS", e))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::try_from(way.host).map_err(|e| failed("name", e))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(BenchError::Io)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| failed("HTTP handshake", e))?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One GET carrying the placeholder; returns the body's length.
async fn get(
    s: &mut SendRequest<Empty<Bytes>>,
    host: &str,
    path: &str,
) -> Result<usize, BenchError> {
    let req = hyper::Request::get(path)
        .header("host", host)
        .header("x-api-key", PH)
        .body(Empty::new())
        .map_err(|e| failed("request", e))?;
    s.ready().await.map_err(|e| failed("connection", e))?;
    let resp = s
        .send_request(req)
        .await
        .map_err(|e| failed("request", e))?;
    if !resp.status().is_success() {
        return Err(failed(path, resp.status()));
    }
    let mut body = resp.into_body();
    let mut n = 0;
    while let Some(frame) = body.frame().await {
        n += frame
            .map_err(|e| failed("body", e))?
            .data_ref()
            .map_or(0, Bytes::len);
    }
    Ok(n)
}

/// Kept-alive and new-connection latencies of one way.
async fn latency(
    w: &World,
    way: &Way,
    args: &BenchSecretsArgs,
) -> Result<(Vec<Duration>, Vec<Duration>), BenchError> {
    let mut s = connect(w, way).await?;
    for _ in 0..100 {
        get(&mut s, way.host, "/v1/echo").await?;
    }
    let mut kept = Vec::with_capacity(args.requests);
    for _ in 0..args.requests {
        let t = Instant::now();
        get(&mut s, way.host, "/v1/echo").await?;
        kept.push(t.elapsed());
    }
    let mut fresh = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let t = Instant::now();
        let mut s = connect(w, way).await?;
        get(&mut s, way.host, "/v1/echo").await?;
        fresh.push(t.elapsed());
    }
    kept.sort();
    fresh.sort();
    Ok((kept, fresh))
}

/// Best of 3 bulk downloads, MB/s.
async fn throughput(w: &World, way: &Way, bytes: usize) -> Result<f64, BenchError> {
    let mut best = 0f64;
    for _ in 0..3 {
        let mut s = connect(w, way).await?;
        let t = Instant::now();
        let n = get(&mut s, way.host, &format!("/big/{bytes}")).await?;
        if n != bytes {
            return Err(failed("bulk", format!("{n} of {bytes} bytes")));
        }
        best = best.max(n as f64 / t.elapsed().as_secs_f64() / 1e6);
    }
    Ok(best)
}

/// Builds the namespace world and measures the three ways.
pub async fn secrets(args: BenchSecretsArgs) -> Result<i32, BenchError> {
    if !world::can_run("hutch-bench secrets") {
        return Err(BenchError::Usage(
            "hutch-bench secrets needs root, ip, nft and curl".into(),
        ));
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
    let at = |ip: &str, port: u16| -> SocketAddr {
        SocketAddr::new(ip.parse().expect("a test address"), port)
    };
    let ways = [
        Way {
            name: "broker (substituted)",
            dst: at(world::API_IP, 443),
            host: "api.example.test",
            root: w.sandbox_ca_der.clone(),
        },
        Way {
            name: "spliced",
            dst: at(world::OTHER_IP, 443),
            host: "other.example.test",
            root: w.test_root_der.clone(),
        },
        Way {
            name: "direct",
            dst: at(world::OTHER_IP, 8443),
            host: "other.example.test",
            root: w.test_root_der.clone(),
        },
    ];
    println!(
        "small HTTPS GET from the guest namespace: {} kept-alive requests, {} new connections per way",
        args.requests, args.connections
    );
    let mut p50 = Vec::new();
    for way in &ways {
        let (mut kept, mut fresh) = latency(&w, way, &args).await?;
        p50.push((pct(&kept, 50), pct(&fresh, 50)));
        println!("  {:<22} kept alive: {}", way.name, summary(&mut kept));
        println!("  {:<22} new conn:   {}", "", summary(&mut fresh));
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "  substitution adds {:+.3} ms p50 over splice, kept alive (target ≤ 1 ms); {:+.3} ms on a new connection",
        ms(p50[0].0) - ms(p50[1].0),
        ms(p50[0].1) - ms(p50[1].1),
    );
    println!(
        "  splice adds {:+.3} ms p50 over direct, kept alive; {:+.3} ms on a new connection",
        ms(p50[1].0) - ms(p50[2].0),
        ms(p50[1].1) - ms(p50[2].1),
    );
    println!("bulk download, {} MiB, best of 3:", args.bulk_bytes >> 20);
    let mut rates = Vec::new();
    for way in &ways {
        let r = throughput(&w, way, args.bulk_bytes).await?;
        println!("  {:<22} {r:.0} MB/s", way.name);
        rates.push(r);
    }
    println!(
        "  splice costs {:.1} % of direct throughput (target ≤ 5 %); the broker (TLS both sides, scrubbing) {:.1} %",
        (1.0 - rates[1] / rates[2]) * 100.0,
        (1.0 - rates[0] / rates[2]) * 100.0,
    );
    Ok(0)
}
