//! `hutch-bench task`: agent tasks through a private daemon, sandboxes restored from a
//! template: workspace copy-in and changeset copy-out throughput for a generated workspace
//! (by default 100 MiB in 10 000 files), and the task overhead (the client's whole wait minus
//! the agent's own run) as p50 over N tasks, on that workspace and on a tiny one.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use clap::Args;
use hutch_api::client::Client;
use hutch_task::{TaskRecord, TaskSpec, Verdict};
use rand::{RngCore, SeedableRng};

use crate::{
    boot::{print_accel, summary, DaemonChild},
    error::BenchError,
    launch,
};
use hutch_daemon::{Home, VmArgs};

/// `hutch-bench task`.
#[derive(Debug, Args)]
pub struct BenchTaskArgs {
    /// VM shape of the template the task sandboxes are restored from.
    #[command(flatten)]
    pub vm: VmArgs,
    /// Tasks of each kind.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=100))]
    pub runs: u16,
    /// Files in the generated workspace.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=40_000))]
    pub files: u32,
    /// Size of the generated workspace in MiB.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=180))]
    pub mib: u64,
}

/// Rewrites every file of the workspace (one byte appended), so the changeset is the whole
/// workspace.
const REWRITE_ALL: &str = "import os\nfor d, _, fs in os.walk('.'):\n    for f in fs:\n        open(os.path.join(d, f), 'ab').write(b'!')\n";

/// What was measured.
#[derive(Default)]
struct Samples {
    copy_in: Vec<Duration>,
    copy_out: Vec<Duration>,
    copy_out_bytes: u64,
    overhead_big: Vec<Duration>,
    overhead_small: Vec<Duration>,
    create: Vec<Duration>,
}

/// Runs the benchmark and prints the figures.
pub async fn task(home: &Home, args: BenchTaskArgs) -> Result<i32, BenchError> {
    let launcher = launch::prepare(home, &args.vm).await?;
    let big = tempfile::Builder::new()
        .prefix("hutch-bench-ws")
        .tempdir()
        .map_err(BenchError::Io)?;
    let small = tempfile::Builder::new()
        .prefix("hutch-bench-ws")
        .tempdir()
        .map_err(BenchError::Io)?;
    let bytes = generate(big.path(), args.files, args.mib << 20).map_err(BenchError::Io)?;
    std::fs::write(small.path().join("README"), "tiny\n").map_err(BenchError::Io)?;
    let child = DaemonChild::start(home, &args.vm, &["--no-network"]).await?;
    let measured = tokio::select! {
        r = measure(&child.client, &args, big.path(), small.path()) => r.map(Some),
        _ = hutch_daemon::signal::interrupted() => Ok(None),
    };
    let removed = child.client.remove_template("bench").await;
    let stopped = child.stop().await;
    let samples = measured?;
    stopped?;
    let Some(mut s) = samples else {
        return Ok(hutch_daemon::signal::INTERRUPTED);
    };
    removed?;
    print_accel(&launcher);
    println!(
        "workspace: {} files, {:.1} MiB (plain directory); sandboxes restored from a template, no network; {} task(s) of each kind",
        args.files,
        bytes as f64 / f64::from(1 << 20),
        args.runs
    );
    let rate = |b: u64, d: &[Duration]| {
        let p50 = crate::boot::pct(d, 50).as_secs_f64().max(f64::EPSILON);
        b as f64 / f64::from(1 << 20) / p50
    };
    let line = |what: &str, v: &mut Vec<Duration>| println!("{what:<58} {}", summary(v));
    line("copy-in (tar into the guest, unpacked)", &mut s.copy_in);
    println!("{:<58} {:.1} MiB/s at p50", "", rate(bytes, &s.copy_in));
    line(
        "copy-out (guest diff, stream, host validation), all files",
        &mut s.copy_out,
    );
    println!(
        "{:<58} {:.1} MiB/s at p50",
        "",
        rate(s.copy_out_bytes, &s.copy_out)
    );
    line("sandbox create (template restore)", &mut s.create);
    line(
        "task overhead, whole workspace (wall - agent)",
        &mut s.overhead_big,
    );
    line(
        "task overhead, 1-file workspace (wall - agent)",
        &mut s.overhead_small,
    );
    Ok(0)
}

/// Fills `dir` with `files` files of random bytes, `total` bytes in all, 100 to a directory.
fn generate(dir: &Path, files: u32, total: u64) -> std::io::Result<u64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let each = (total / u64::from(files)) as usize;
    let mut buf = vec![0u8; each];
    for i in 0..files {
        let sub = dir.join(format!("d{:03}", i / 100));
        if i % 100 == 0 {
            std::fs::create_dir(&sub)?;
        }
        rng.fill_bytes(&mut buf);
        std::fs::write(sub.join(format!("f{i:05}.bin")), &buf)?;
    }
    Ok(each as u64 * u64::from(files))
}

async fn measure(
    client: &Client,
    args: &BenchTaskArgs,
    big: &Path,
    small: &Path,
) -> Result<Samples, BenchError> {
    crate::boot::bench_template(client, &args.vm).await?;
    let spec = |argv: &[&str]| TaskSpec {
        command: argv.iter().map(|s| s.to_string()).collect(),
        template: Some("bench".into()),
        ..serde_json::from_str(r#"{"command":["true"]}"#).expect("a spec")
    };
    let mut s = Samples::default();
    for _ in 0..args.runs {
        // Interleaved, so each kind sees the same host load.
        let (wall, r) = run(client, small, &spec(&["true"])).await?;
        s.overhead_small.push(overhead(wall, &r));
        let (wall, r) = run(client, big, &spec(&["true"])).await?;
        s.overhead_big.push(overhead(wall, &r));
        s.copy_in.push(Duration::from_millis(r.timings.copy_in_ms));
        s.create.push(Duration::from_millis(r.timings.create_ms));
        let (_, r) = run(client, big, &spec(&["python3", "-c", REWRITE_ALL])).await?;
        if !matches!(r.verdict, Verdict::Accepted { changes } if changes == args.files as usize) {
            return Err(BenchError::Usage(format!(
                "the rewrite task's changeset was not all {} files: {:?} {:?}",
                args.files, r.verdict, r.error
            )));
        }
        s.copy_out
            .push(Duration::from_millis(r.timings.changeset_ms));
        s.copy_out_bytes = r
            .changes
            .iter()
            .map(|c| match c {
                hutch_task::Change::Write { size, .. } => *size,
                _ => 0,
            })
            .sum();
    }
    Ok(s)
}

/// Packs `ws` and runs one task on it; returns the client's whole wait (packing included).
async fn run(
    client: &Client,
    ws: &Path,
    spec: &TaskSpec,
) -> Result<(Duration, TaskRecord), BenchError> {
    let t = Instant::now();
    let tar = hutch_task::workspace::pack(ws)
        .map_err(|e| BenchError::Usage(format!("packing the workspace: {e}")))?;
    let record = client.run_task(spec, &tar).await?;
    let wall = t.elapsed();
    if record.error.is_some() || !record.agent.as_ref().is_some_and(|a| a.succeeded()) {
        return Err(BenchError::Usage(format!(
            "a benchmark task failed: {:?} {:?}",
            record.agent, record.error
        )));
    }
    Ok((wall, record))
}

fn overhead(wall: Duration, r: &TaskRecord) -> Duration {
    wall.saturating_sub(Duration::from_millis(r.timings.agent_ms))
}
