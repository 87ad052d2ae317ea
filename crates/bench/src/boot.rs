//! `hutch-bench boot` and `hutch-bench daemon`: boot latency and exec round trip (`boot`); the daemon's cost over the bare
//! channel and parallel creates through it (`daemon`). Percentiles, measured in one run.

use std::{
    future::Future,
    path::PathBuf,
    time::{Duration, Instant},
};

use hutch_api::{
    client::{Client, ClientError, Endpoint, StreamEvent},
    CreateSandbox, ExecBody, ExecEventMsg, ExecStart,
};
use hutch_core::Sandbox;
use hutch_protocol::{host::ExecEvent, ExecRequest};
use hutch_types::SandboxSpec;

use crate::{
    args::{BenchBootArgs, BenchCommand, BenchDaemonArgs},
    error::BenchError,
    launch,
};
use hutch_daemon::{Home, VmArgs};

/// The `hutch` binary whose daemon the benchmarks measure: `$HUTCH_BIN`, or the one next to
/// this executable (cargo builds both into the same directory).
pub(crate) fn hutch_binary() -> std::io::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("HUTCH_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let exe = std::env::current_exe()?;
    Ok(exe.with_file_name("hutch"))
}

/// Memory of each sandbox in the parallel creates, in MiB.
const PARALLEL_MEMORY_MIB: u32 = 256;
/// How long the benchmark's daemon may take to answer on its socket.
const DAEMON_READY: Duration = Duration::from_secs(60);
/// How long the benchmark's daemon may take to exit after SIGTERM.
const DAEMON_STOP: Duration = Duration::from_secs(10);

/// `hutch-bench …`.
pub async fn bench(home: &Home, cmd: BenchCommand) -> Result<i32, BenchError> {
    match cmd {
        BenchCommand::Boot(a) => boot(home, a).await,
        BenchCommand::Daemon(a) => daemon(home, a).await,
        BenchCommand::Firecracker(a) => crate::firecracker::firecracker(home, a).await,
        BenchCommand::Clone(a) => crate::clone::clone(home, a).await,
        BenchCommand::Task(a) => crate::task::task(home, a).await,
        BenchCommand::Mcp(a) => crate::mcp::mcp(home, a).await,
        BenchCommand::E2b(a) => crate::e2b::e2b(home, a).await,
        BenchCommand::Secrets(a) => crate::secrets::secrets(a).await,
    }
}

/// Boots `boots` VMs one after another; in each, runs `true` `execs` times.
pub async fn boot(home: &Home, args: BenchBootArgs) -> Result<i32, BenchError> {
    let mut launcher = launch::prepare(home, &args.vm).await?;
    let mut boots = Vec::new();
    let mut execs = Vec::new();
    for _ in 0..args.boots.max(1) {
        launcher.options.id = hutch_core::new_id();
        let started = Instant::now();
        let sandbox = Sandbox::boot(&*launcher.vmm, &launcher.options).await?;
        boots.push(started.elapsed());
        for _ in 0..args.execs {
            execs.push(timed(run_true(&sandbox)).await?);
        }
        sandbox.destroy().await?;
    }
    print_accel(&launcher);
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

/// What `bench daemon` measured.
#[derive(Default)]
struct DaemonSamples {
    direct: Vec<Duration>,
    json: Vec<Duration>,
    stream: Vec<Duration>,
    creates: Vec<Duration>,
    creates_wall: Duration,
}

/// Exec round trips of `true` straight over a local sandbox's channel and through a daemon
/// (JSON and streaming), interleaved so both see the same host load; then `parallel` creates
/// at once through the daemon. The daemon is a child with a private `HUTCH_HOME`.
pub async fn daemon(home: &Home, args: BenchDaemonArgs) -> Result<i32, BenchError> {
    let launcher = launch::prepare(home, &args.vm).await?;
    print_accel(&launcher);
    let sandbox = Sandbox::boot(&*launcher.vmm, &launcher.options).await?;
    let child = match DaemonChild::start(home, &args.vm, &[]).await {
        Ok(child) => child,
        Err(e) => {
            let _ = sandbox.destroy().await;
            return Err(e);
        }
    };
    let measured = tokio::select! {
        r = measure(&sandbox, &child.client, &args) => r.map(Some),
        _ = hutch_daemon::signal::interrupted() => Ok(None),
    };
    let stopped = child.stop().await;
    let destroyed = sandbox.destroy().await;
    let samples = measured?;
    stopped?;
    destroyed?;
    match samples {
        Some(mut s) => print_daemon(&mut s, &args),
        None => return Ok(hutch_daemon::signal::INTERRUPTED),
    }
    Ok(0)
}

async fn measure(
    sandbox: &Sandbox,
    client: &Client,
    args: &BenchDaemonArgs,
) -> Result<DaemonSamples, BenchError> {
    let id = client
        .create(&create_req(&args.vm, args.vm.memory))
        .await?
        .id;
    // One untimed round first: connections, page cache, the guest's first fork.
    run_true(sandbox).await?;
    json_true(client, &id).await?;
    stream_true(client, &id).await?;
    let mut s = DaemonSamples::default();
    for _ in 0..args.execs {
        s.direct.push(timed(run_true(sandbox)).await?);
        s.json.push(timed(json_true(client, &id)).await?);
        s.stream.push(timed(stream_true(client, &id)).await?);
    }
    client.destroy(&id).await?;
    (s.creates_wall, s.creates) = parallel_creates(client, args).await?;
    Ok(s)
}

/// `parallel` creates at once; their wall time and each one's latency. Destroys them after.
async fn parallel_creates(
    client: &Client,
    args: &BenchDaemonArgs,
) -> Result<(Duration, Vec<Duration>), BenchError> {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.parallel {
        let (client, req) = (client.clone(), create_req(&args.vm, PARALLEL_MEMORY_MIB));
        tasks.spawn(async move {
            let t = Instant::now();
            client.create(&req).await.map(|info| (info.id, t.elapsed()))
        });
    }
    let (mut ids, mut latencies, mut failed) = (Vec::new(), Vec::new(), None);
    while let Some(joined) = tasks.join_next().await {
        match joined.expect("create task panicked") {
            Ok((id, t)) => {
                ids.push(id);
                latencies.push(t);
            }
            Err(e) => failed = failed.or(Some(e)),
        }
    }
    let wall = started.elapsed();
    for id in &ids {
        client.destroy(id).await?;
    }
    match failed {
        Some(e) => Err(e.into()),
        None => Ok((wall, latencies)),
    }
}

pub(crate) fn create_req(vm: &VmArgs, memory_mib: u32) -> CreateSandbox {
    CreateSandbox {
        spec: SandboxSpec {
            image: vm.image.clone(),
            cpus: vm.cpus,
            memory_mib,
            disk_mib: vm.disk,
            // A safety net only: the benchmark destroys everything it made.
            ttl_secs: Some(3600),
            ..SandboxSpec::default()
        },
        idempotency_key: None,
    }
}

pub(crate) async fn timed(
    op: impl Future<Output = Result<(), BenchError>>,
) -> Result<Duration, BenchError> {
    let started = Instant::now();
    op.await?;
    Ok(started.elapsed())
}

pub(crate) async fn run_true(sandbox: &Sandbox) -> Result<(), BenchError> {
    let mut exec = sandbox
        .channel()
        .exec(ExecRequest::new(vec!["true".into()]))
        .await?;
    while !matches!(exec.next_event().await?, ExecEvent::Exited(_)) {}
    Ok(())
}

pub(crate) async fn json_true(client: &Client, id: &str) -> Result<(), BenchError> {
    let body = ExecBody {
        argv: vec!["true".into()],
        ..ExecBody::default()
    };
    let result = client.exec(id, &body).await?;
    match result.exit_code {
        Some(0) => Ok(()),
        _ => Err(unexpected(format!("`true` ended with {result:?}"))),
    }
}

async fn stream_true(client: &Client, id: &str) -> Result<(), BenchError> {
    let start = ExecStart {
        argv: vec!["true".into()],
        ..ExecStart::default()
    };
    // Holding the sending half keeps the exec's client present until its exit.
    let (_tx, mut rx) = client.exec_stream(id, &start).await?;
    loop {
        match rx.next().await.transpose()? {
            None => return Err(unexpected("stream closed before the exit".into())),
            Some(StreamEvent::Event(ExecEventMsg::Exit {
                exit_code: Some(0), ..
            })) => return Ok(()),
            Some(StreamEvent::Event(ev @ (ExecEventMsg::Exit { .. } | ExecEventMsg::Error(_)))) => {
                return Err(unexpected(format!("`true` ended with {ev:?}")))
            }
            Some(_) => {}
        }
    }
}

pub(crate) fn unexpected(what: String) -> BenchError {
    ClientError::Stream(what).into()
}

/// A `hutch daemon` child with a private `HUTCH_HOME` (sharing the images and the
/// accelerator probe), removed with everything in it by [`DaemonChild::stop`].
pub(crate) struct DaemonChild {
    process: tokio::process::Child,
    /// Its private home.
    pub(crate) dir: PathBuf,
    /// A client on its socket.
    pub(crate) client: Client,
}

impl DaemonChild {
    /// Starts a daemon with `extra` arguments.
    pub(crate) async fn start(
        home: &Home,
        vm: &VmArgs,
        extra: &[&str],
    ) -> Result<DaemonChild, BenchError> {
        let dir = std::env::temp_dir().join(format!("hutch-bench-{}", hutch_core::new_id()));
        let home_err = |source| BenchError::Workdir {
            path: dir.clone(),
            source,
        };
        std::fs::create_dir(&dir).map_err(home_err)?;
        let socket = dir.join("hutch.sock");
        let spawned = private_home(home, &dir).and_then(|log| {
            tokio::process::Command::new(hutch_binary()?)
                .arg("daemon")
                .arg("--socket")
                .arg(&socket)
                .args(["--boot-timeout", &vm.boot_timeout.to_string()])
                .args(extra)
                .env("HUTCH_HOME", &dir)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
        });
        let process = match spawned {
            Ok(p) => p,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(home_err(e));
            }
        };
        let mut child = DaemonChild {
            process,
            dir,
            client: Client::new(Endpoint::Unix(socket), None),
        };
        if let Err(e) = child.wait_ready().await {
            let _ = child.stop().await;
            return Err(e);
        }
        Ok(child)
    }

    /// Polls the socket until the daemon answers; fails if it exits or takes too long.
    async fn wait_ready(&mut self) -> Result<(), BenchError> {
        let deadline = Instant::now() + DAEMON_READY;
        loop {
            let last = match self.client.list(None, &[]).await {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            let exited = self.process.try_wait().map_err(BenchError::Io)?;
            if exited.is_some() || Instant::now() > deadline {
                let log = std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default();
                eprintln!("hutch: the benchmark's daemon ({exited:?}) logged:\n{log}");
                return Err(last.into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Destroys every sandbox through the API (VMs outlive a daemon), stops the daemon with
    /// SIGTERM, checks that no run dir is left, and removes the private home.
    pub(crate) async fn stop(mut self) -> Result<(), BenchError> {
        let destroyed = self.destroy_all().await;
        if let Some(pid) = self.process.id() {
            // Our own child, not yet reaped (`id()` is `Some`): the pid is still its own.
            let pid =
                rustix::process::Pid::from_raw(pid as i32).expect("a child's pid is positive");
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        if tokio::time::timeout(DAEMON_STOP, self.process.wait())
            .await
            .is_err()
        {
            let _ = self.process.kill().await;
        }
        let left: Vec<_> = std::fs::read_dir(self.dir.join("vms"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        if !left.is_empty() {
            return Err(BenchError::Usage(format!(
                "the benchmark's daemon left run dirs {left:?} in {}",
                self.dir.display()
            )));
        }
        std::fs::remove_dir_all(&self.dir).map_err(|source| BenchError::Workdir {
            path: self.dir.clone(),
            source,
        })?;
        destroyed
    }

    async fn destroy_all(&self) -> Result<(), BenchError> {
        for s in self.client.list(None, &[]).await? {
            if s.state != hutch_types::SandboxState::Destroyed {
                self.client.destroy(&s.id).await?;
            }
        }
        Ok(())
    }
}

/// Fills a private home: `images` links to the real one, the accelerator probe is copied.
/// Returns the daemon's log file.
fn private_home(home: &Home, dir: &std::path::Path) -> std::io::Result<std::fs::File> {
    std::os::unix::fs::symlink(home.images(), dir.join("images"))?;
    std::fs::copy(home.accel_cache(), dir.join("accel.json"))?;
    std::fs::File::create(dir.join("daemon.log"))
}

pub(crate) fn print_accel(launcher: &launch::Launcher) {
    println!(
        "accelerator: {} ({})",
        launcher.accel.accel, launcher.accel.reason
    );
}

fn print_daemon(s: &mut DaemonSamples, args: &BenchDaemonArgs) {
    for v in [&mut s.direct, &mut s.json, &mut s.stream, &mut s.creates] {
        v.sort();
    }
    println!(
        "exec round trip of `true`, {} runs each way, interleaved:",
        s.direct.len()
    );
    println!("  direct over the channel:      {}", summary(&mut s.direct));
    for (name, v) in [
        ("daemon, JSON exec:  ", &s.json),
        ("daemon, WebSocket:  ", &s.stream),
    ] {
        println!(
            "  {name}          {}  (daemon/direct: p50 {:.2}x, p95 {:.2}x)",
            summary(&mut v.clone()),
            ratio(v, &s.direct, 50),
            ratio(v, &s.direct, 95)
        );
    }
    let secs = s.creates_wall.as_secs_f64();
    println!(
        "{} creates in parallel ({} MiB each): wall {:.2?}, {:.2} creates/s; each {}",
        args.parallel,
        PARALLEL_MEMORY_MIB,
        s.creates_wall,
        s.creates.len() as f64 / secs.max(f64::EPSILON),
        summary(&mut s.creates)
    );
}

/// The `p`th percentile of sorted samples.
pub(crate) fn pct(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

pub(crate) fn ratio(a: &[Duration], b: &[Duration], p: usize) -> f64 {
    if a.is_empty() || b.is_empty() {
        return f64::NAN;
    }
    pct(a, p).as_secs_f64() / pct(b, p).as_secs_f64().max(f64::EPSILON)
}

/// Boots and saves the template `bench` in `vm`'s shape (no provisioning, default network)
/// and prints how long that took.
pub(crate) async fn bench_template(client: &Client, vm: &VmArgs) -> Result<(), BenchError> {
    let t = Instant::now();
    client
        .create_template(&hutch_types::TemplateSpec {
            name: "bench".into(),
            image: vm.image.clone(),
            cpus: vm.cpus,
            memory_mib: vm.memory,
            disk_mib: vm.disk,
            provision: None,
            network: Default::default(),
        })
        .await?;
    println!("template: booted and saved in {:.1?}", t.elapsed());
    Ok(())
}

/// `p50 X  p95 Y  (min Z, max W)`.
pub(crate) fn summary(samples: &mut [Duration]) -> String {
    if samples.is_empty() {
        return "no samples".into();
    }
    samples.sort();
    format!(
        "p50 {:.1?}  p95 {:.1?}  (min {:.1?}, max {:.1?})",
        pct(samples, 50),
        pct(samples, 95),
        samples[0],
        samples[samples.len() - 1]
    )
}
