//! `hutch-bench clone`: sandboxes from a template against cold boots, in one run, through a
//! private daemon: restore → first exec result vs boot → first exec result; the VMM's own
//! restore (QEMU loading the snapshot, no control plane) against the daemon's whole create;
//! a pool hand-out; clones per second with N in parallel; host memory per idle clone.

use std::time::{Duration, Instant};

use clap::Args;
use hutch_api::{client::Client, CreateSandbox, ExecBody};
use hutch_core::{Sandbox, TemplateRecord};
use hutch_types::SandboxSpec;
use hutch_vmm::{Lifetime, VmSpec};

use crate::{
    boot::{pct, print_accel, summary, DaemonChild},
    error::BenchError,
    launch,
};
use hutch_daemon::{Home, VmArgs};

/// `hutch-bench clone`.
#[derive(Debug, Args)]
pub struct BenchCloneArgs {
    /// VM shape of the template (and so of every clone).
    #[command(flatten)]
    pub vm: VmArgs,
    /// Samples of each sequential measurement.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=100))]
    pub runs: u16,
    /// Clones restored at once for the throughput and memory figures.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=32))]
    pub parallel: u16,
}

/// What was measured.
#[derive(Default)]
struct Samples {
    cold: Vec<Duration>,
    restore: Vec<Duration>,
    vmm_restore: Vec<Duration>,
    handout: Vec<Duration>,
    parallel_wall: Duration,
    pss_kib: Vec<u64>,
    rss_kib: Vec<u64>,
}

/// Runs the benchmark and prints the figures.
pub async fn clone(home: &Home, args: BenchCloneArgs) -> Result<i32, BenchError> {
    let launcher = launch::prepare(home, &args.vm).await?;
    // Without networking, so the VMM-only restore (which has no TAP to give) is comparable.
    let child = DaemonChild::start(home, &args.vm, &["--no-network"]).await?;
    let measured = tokio::select! {
        r = measure(&child, &launcher, &args) => r.map(Some),
        _ = hutch_daemon::signal::interrupted() => Ok(None),
    };
    let removed = child.client.remove_template("bench").await;
    let stopped = child.stop().await;
    let samples = measured?;
    stopped?;
    if let Some(mut s) = samples {
        removed?;
        print_accel(&launcher);
        println!("backend: {}; sandbox networking off", launcher.vmm.name());
        print(&mut s, &args);
        Ok(0)
    } else {
        Ok(hutch_daemon::signal::INTERRUPTED)
    }
}

async fn measure(
    child: &DaemonChild,
    launcher: &launch::Launcher,
    args: &BenchCloneArgs,
) -> Result<Samples, BenchError> {
    let client = &child.client;
    let vm = &args.vm;
    crate::boot::bench_template(client, vm).await?;
    let record = template_record(child)?;
    let mut s = Samples::default();
    for _ in 0..args.runs {
        // Interleaved, so all three see the same host load.
        s.cold.push(create_and_exec(client, cold_spec(vm)).await?);
        s.restore.push(create_and_exec(client, clone_spec()).await?);
        s.vmm_restore.push(vmm_restore(launcher, &record).await?);
    }
    client.set_pool("bench", 1).await?;
    for _ in 0..args.runs {
        wait_pool_full(client).await?;
        s.handout.push(create_and_exec(client, clone_spec()).await?);
    }
    client.set_pool("bench", 0).await?;
    parallel(client, args, &mut s).await?;
    Ok(s)
}

/// The template's record in the daemon's private home.
fn template_record(child: &DaemonChild) -> Result<TemplateRecord, BenchError> {
    let path = child.dir.join("templates").join("bench.json");
    let bytes = std::fs::read(&path).map_err(|source| BenchError::ReadInput {
        path: path.display().to_string(),
        source,
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| BenchError::Usage(format!("{}: {e}", path.display())))
}

fn cold_spec(vm: &VmArgs) -> SandboxSpec {
    SandboxSpec {
        image: vm.image.clone(),
        cpus: vm.cpus,
        memory_mib: vm.memory,
        disk_mib: vm.disk,
        ..SandboxSpec::default()
    }
}

fn clone_spec() -> SandboxSpec {
    SandboxSpec {
        template: Some("bench".into()),
        ..SandboxSpec::default()
    }
}

/// Create → first `true` answered, then destroy (untimed).
async fn create_and_exec(client: &Client, spec: SandboxSpec) -> Result<Duration, BenchError> {
    let started = Instant::now();
    let id = client
        .create(&CreateSandbox {
            spec,
            idempotency_key: None,
        })
        .await?
        .id;
    let ran = client
        .exec(
            &id,
            &ExecBody {
                argv: vec!["true".into()],
                ..ExecBody::default()
            },
        )
        .await;
    let took = started.elapsed();
    client.destroy(&id).await?;
    ran?;
    Ok(took)
}

/// The VMM alone: QEMU restores the template's snapshot (no network, no daemon, no records),
/// the agent answers its handshake and one `true`.
async fn vmm_restore(
    launcher: &launch::Launcher,
    t: &TemplateRecord,
) -> Result<Duration, BenchError> {
    let image = &launcher.options.image;
    let id = hutch_core::new_id();
    let spec = VmSpec {
        shares: Vec::new(),
        id: id.clone(),
        kernel: hutch_core::kernel_for(&*launcher.vmm, image),
        initrd: image.initrd.clone(),
        rootfs: image.rootfs.clone(),
        cpus: t.snapshot.cpus,
        memory_mib: t.snapshot.memory_mib,
        scratch_disk_mib: 0,
        run_dir: launcher.options.runs_dir.join(&id),
        extra_cmdline: vec![],
        lifetime: Lifetime::Owned,
        memory: hutch_vmm::GuestMemory::Anonymous,
    };
    if t.snapshot.nic_mac.is_some() {
        // A NIC needs a TAP: the VMM-only figure is taken only for NIC-less templates.
        return Err(BenchError::Usage(
            "the VMM-only restore needs a template without a NIC: run the benchmark with the daemon's networking off".into(),
        ));
    }
    let started = Instant::now();
    let vm = launcher.vmm.restore(&spec, None, &t.snapshot).await?;
    vm.resume().await?;
    let sandbox = Sandbox::attach(&id, vm, Duration::from_secs(60)).await?;
    crate::boot::run_true(&sandbox).await?;
    let took = started.elapsed();
    sandbox.discard().await?;
    Ok(took)
}

/// Waits until the template's pool holds a ready clone.
async fn wait_pool_full(client: &Client) -> Result<(), BenchError> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ready = client
            .templates()
            .await?
            .iter()
            .any(|t| t.spec.name == "bench" && t.pool_ready >= 1);
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BenchError::Usage(
                "the pool did not fill within 120 s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `parallel` clones at once: wall time, then each idle clone's QEMU memory.
async fn parallel(
    client: &Client,
    args: &BenchCloneArgs,
    s: &mut Samples,
) -> Result<(), BenchError> {
    let started = Instant::now();
    let req = CreateSandbox {
        spec: clone_spec(),
        idempotency_key: None,
    };
    let creates = (0..args.parallel).map(|_| client.create(&req));
    let results = futures::future::join_all(creates).await;
    s.parallel_wall = started.elapsed();
    let mut ids = Vec::new();
    let mut failed = None;
    for r in results {
        match r {
            Ok(info) => ids.push(info.id),
            Err(e) => failed = failed.or(Some(e)),
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for id in &ids {
        if let Some((pss, rss)) = qemu_memory(id) {
            s.pss_kib.push(pss);
            s.rss_kib.push(rss);
        }
    }
    for id in &ids {
        client.destroy(id).await?;
    }
    match failed {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// (PSS, RSS) in KiB of the QEMU process named `hutch-<id>`.
fn qemu_memory(id: &str) -> Option<(u64, u64)> {
    let name = format!("hutch-{id}");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if !cmdline.split(|b| *b == 0).any(|a| a == name.as_bytes()) {
            continue;
        }
        let rollup = std::fs::read_to_string(entry.path().join("smaps_rollup")).ok()?;
        let field = |key: &str| {
            rollup
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        };
        return Some((field("Pss:")?, field("Rss:")?));
    }
    None
}

fn print(s: &mut Samples, args: &BenchCloneArgs) {
    let n = s.cold.len();
    println!(
        "cold boot -> first exec, {n} runs:        {}",
        summary(&mut s.cold)
    );
    println!(
        "restore -> first exec (daemon), {n} runs: {}",
        summary(&mut s.restore)
    );
    println!(
        "VMM-only restore -> first exec, {n} runs: {}",
        summary(&mut s.vmm_restore)
    );
    println!(
        "pool hand-out -> first exec, {n} runs:   {}",
        summary(&mut s.handout)
    );
    let (cold, restore, vmm) = (
        pct(&s.cold, 50),
        pct(&s.restore, 50),
        pct(&s.vmm_restore, 50),
    );
    println!(
        "p50 ratios: cold/restore {:.1}x, cold/hand-out {:.1}x; control plane over the VMM's own restore: {:+.0}%",
        cold.as_secs_f64() / restore.as_secs_f64(),
        cold.as_secs_f64() / pct(&s.handout, 50).as_secs_f64(),
        (restore.as_secs_f64() / vmm.as_secs_f64() - 1.0) * 100.0
    );
    println!(
        "{} clones at once: {:.1?} wall, {:.2} clones/s",
        args.parallel,
        s.parallel_wall,
        f64::from(args.parallel) / s.parallel_wall.as_secs_f64()
    );
    if !s.pss_kib.is_empty() {
        let avg = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len() as f64 / 1024.0;
        println!(
            "idle clone QEMU memory: PSS {:.0} MiB, RSS {:.0} MiB (average of {}; guest RAM {} MiB)",
            avg(&s.pss_kib),
            avg(&s.rss_kib),
            s.pss_kib.len(),
            args.vm.memory
        );
    }
}
