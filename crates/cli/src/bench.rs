//! `hutch bench boot`: boot latency and exec round trip, as percentiles.

use std::time::{Duration, Instant};

use hutch_core::Sandbox;
use hutch_protocol::{host::ExecEvent, ExecRequest};

use crate::{args::BenchBootArgs, error::CliError, home::Home, launch};

/// Boots `boots` VMs one after another; in each, runs `true` `execs` times.
pub async fn boot(home: &Home, args: BenchBootArgs) -> Result<i32, CliError> {
    let mut launcher = launch::prepare(home, &args.vm).await?;
    let mut boots = Vec::new();
    let mut execs = Vec::new();
    for _ in 0..args.boots.max(1) {
        launcher.options.id = hutch_core::new_id();
        let started = Instant::now();
        let sandbox = Sandbox::boot(&launcher.vmm, &launcher.options).await?;
        boots.push(started.elapsed());
        for _ in 0..args.execs {
            let t = Instant::now();
            run_true(&sandbox).await?;
            execs.push(t.elapsed());
        }
        sandbox.destroy().await?;
    }
    println!(
        "accelerator: {} ({})",
        launcher.accel.accel, launcher.accel.reason
    );
    println!(
        "boot (start -> agent ready) over {} boots: {}",
        boots.len(),
        summary(&mut boots)
    );
    println!(
        "exec round trip of `true` over {} runs: {}",
        execs.len(),
        summary(&mut execs)
    );
    Ok(0)
}

async fn run_true(sandbox: &Sandbox) -> Result<(), CliError> {
    let mut exec = sandbox
        .channel()
        .exec(ExecRequest::new(vec!["true".into()]))
        .await?;
    while !matches!(exec.next_event().await?, ExecEvent::Exited(_)) {}
    Ok(())
}

/// `p50 X  p95 Y  (min Z, max W)`.
fn summary(samples: &mut [Duration]) -> String {
    if samples.is_empty() {
        return "no samples".into();
    }
    samples.sort();
    let pct = |p: usize| samples[(samples.len() * p / 100).min(samples.len() - 1)];
    format!(
        "p50 {:.1?}  p95 {:.1?}  (min {:.1?}, max {:.1?})",
        pct(50),
        pct(95),
        samples[0],
        samples[samples.len() - 1]
    )
}
