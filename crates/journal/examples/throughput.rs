//! Benchmark (not a test): events per second one journal writer takes, exec-sized records
//! appended as fast as a caller can, until written, `fsync`ed and checkpointed.
//!
//! `cargo run --release -p hutch-journal --example throughput [EVENTS]`

use std::{sync::Arc, time::Instant};

use ed25519_dalek::SigningKey;
use hutch_journal::{attr, verify_dir, Actor, Event, Journal, Options, Redactor, Status};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let host = SigningKey::from_bytes(&[1; 32]);
    let journal = Journal::create(
        dir.path().join("sb-bench"),
        "sb-bench".into(),
        Arc::new(host.clone()),
        Event::new("sandbox.create"),
        Redactor::new(["a-secret-value".to_string()]),
        Options::default(),
    )
    .await
    .expect("journal");
    let actor = Actor {
        principal: "socket".into(),
        request_id: Some("req-0123456789abcdef".into()),
    };
    let start = Instant::now();
    for i in 0..n {
        journal.append(
            Event::new("exec.end")
                .by(Some(&actor))
                .attr(attr::PROCESS_COMMAND_ARGS, vec!["sh", "-c", "true"])
                .attr(attr::PROCESS_EXIT_CODE, 0)
                .attr(attr::PROCESS_DURATION_MS, i as u64 % 100)
                .attr(attr::STDOUT_BYTES, 0)
                .attr(
                    attr::STDOUT_DIGEST,
                    "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
                ),
        );
    }
    let queued = start.elapsed();
    journal.checkpoint().await.expect("checkpoint");
    let total = start.elapsed();
    let size = std::fs::metadata(dir.path().join("sb-bench/journal.jsonl"))
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "{n} events: appended in {:.1} ms ({:.0}/s at the caller), written+fsynced+checkpointed in {:.1} ms ({:.0} events/s), {:.0} bytes/event",
        queued.as_secs_f64() * 1e3,
        n as f64 / queued.as_secs_f64(),
        total.as_secs_f64() * 1e3,
        n as f64 / total.as_secs_f64(),
        size as f64 / n as f64,
    );
    let started = Instant::now();
    let report = verify_dir(
        &dir.path().join("sb-bench"),
        &host.verifying_key().to_bytes(),
    )
    .expect("verify");
    assert_eq!(report.status, Status::Unsealed);
    println!(
        "verify: {} records in {:.1} ms ({:.0} records/s)",
        report.records,
        started.elapsed().as_secs_f64() * 1e3,
        report.records as f64 / started.elapsed().as_secs_f64()
    );
}
