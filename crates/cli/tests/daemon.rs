//! `hutch daemon` with real VMs under QEMU, driven through the typed client the CLI uses.
//!
//! One daemon (a child process with a private `HUTCH_HOME`, on its Unix socket and on a
//! loopback TCP port) serves most cases; the reconciliation case kills and restarts its own.
//! After everything, no VMM process or run dir of either home may remain.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::OnceLock,
    time::{Duration, Instant},
};

use hutch_api::{
    client::{Client, ClientError, Endpoint, StreamEvent},
    CreateSandbox, ExecBody, ExecControl, ExecEventMsg, ExecStart, TtySize,
};
use hutch_types::{ErrorCode, NetworkPolicy, SandboxInfo, SandboxSpec, SandboxState};
use libtest_mimic::{Arguments, Failed};

mod common;
use common::{check, hutch};

type Result<T = ()> = std::result::Result<T, Failed>;

/// A `hutch daemon` child process and its private home.
struct Daemon {
    home: tempfile::TempDir,
    child: Child,
    tcp: String,
}

impl Daemon {
    fn start(home: tempfile::TempDir) -> Daemon {
        Daemon::start_with(home, &[])
    }

    fn start_with(home: tempfile::TempDir, extra: &[&str]) -> Daemon {
        let port = free_port();
        let tcp = format!("127.0.0.1:{port}");
        let base = ["--listen-tcp", tcp.as_str(), "--max-sandboxes", "16"];
        let child = common::spawn_daemon(home.path(), &[&base[..], extra].concat());
        Daemon { home, child, tcp }
    }

    fn client(&self) -> Client {
        Client::new(Endpoint::Unix(self.home.path().join("hutch.sock")), None)
    }

    fn tcp_client(&self, token: Option<&str>) -> Client {
        Client::new(Endpoint::Tcp(self.tcp.clone()), token.map(String::from))
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// For a daemon that is killed and never succeeded on its home: spare networks are removed by
/// a graceful stop or by the next daemon of the same home, and this one has neither.
const NO_SPARES: &[&str] = &["--net-spares", "0"];

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Suite {
    rt: tokio::runtime::Runtime,
    daemon: std::sync::Mutex<Daemon>,
    client: Client,
    home: PathBuf,
}

static SUITE: OnceLock<Suite> = OnceLock::new();

fn suite() -> &'static Suite {
    SUITE.get().expect("suite initialised")
}

fn main() {
    let args = Arguments::from_args();
    if common::default_image_or_skip("daemon").is_none() {
        return;
    }
    // VMs of a killed daemon are re-parented to us, so we can reap them.
    // SAFETY: prctl with constant arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
    let namespaces_before = common::hutch_netns();
    let daemon = Daemon::start(common::private_home());
    let home = daemon.home.path().to_path_buf();
    let client = daemon.client();
    let rt = common::suite_runtime();
    let _ = SUITE.set(Suite {
        rt,
        daemon: std::sync::Mutex::new(daemon),
        client,
        home,
    });

    let conclusion = libtest_mimic::run(&args, trials());

    let suite = suite();
    let left = suite.rt.block_on(destroy_all(&suite.client));
    let mut daemon = suite.daemon.lock().unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGTERM) };
    let _ = daemon.child.wait();
    reap_orphans();
    let mut leaks = common::leaks(&suite.home);
    leaks.extend(common::new_netns(&namespaces_before));
    if left.is_err() || !leaks.is_empty() {
        eprintln!("LEAK after the daemon suite: {left:?} {leaks:#?}");
        std::process::exit(1);
    }
    eprintln!("daemon suite: nothing left behind");
    // The suite lives in a static, never dropped: its temporary home goes by hand (and stays
    // for a look when something leaked).
    let _ = std::fs::remove_dir_all(&suite.home);
    conclusion.exit();
}

fn trials() -> Vec<libtest_mimic::Trial> {
    trials![
        three_concurrent_creates_then_exec,
        files_and_trees_round_trip,
        cp_never_follows_what_a_guest_planted,
        downloads_stream_in_bounded_memory,
        pty_shell_echoes,
        pause_then_resume_keeps_processes_alive,
        a_stopped_sandbox_starts_again,
        ttl_expires,
        tokens_are_scoped,
        tokens_expire_are_listed_and_can_be_removed,
        cli_errors_and_json_keep_their_shape,
        bad_input_gets_stable_4xx_codes,
        clients_that_hang_up_leave_nothing_half_done,
        kill9_during_concurrent_creates_then_restart_reconciles,
        network_policy_is_enforced_and_changeable,
        published_ports_reach_the_guest_survive_a_restart_and_close_on_rm,
        wireguard_egress_leaves_through_the_tunnel_or_not_at_all,
        templates_clones_forks_and_pause_to_disk_survive_a_restart,
        a_stopped_guest_ends_its_execs_with_an_error,
        a_websocket_client_that_stops_reading_then_closes_leaves_no_process,
        idle_unauthenticated_tcp_clients_cannot_starve_the_daemon,
        a_second_daemon_on_the_same_home_refuses_and_touches_nothing,
    ]
}

// ---------------------------------------------------------------- helpers

/// [`common::on_rt`] on this suite's runtime.
fn on_rt<F, T>(f: F) -> T
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    common::on_rt(&suite().rt, f)
}

fn spec(labels: &[(&str, &str)]) -> CreateSandbox {
    CreateSandbox {
        spec: SandboxSpec {
            memory_mib: 256,
            disk_mib: 256,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        },
        idempotency_key: None,
    }
}

async fn sh(client: &Client, id: &str, script: &str) -> Result<String> {
    let out = client
        .exec(
            id,
            &ExecBody {
                argv: vec!["sh".into(), "-c".into(), script.into()],
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("exec {script:?}: {e}"))?;
    if out.exit_code != Some(0) {
        return Err(format!(
            "{script:?} ended {:?}/{:?}: {}",
            out.exit_code, out.signal, out.stderr
        )
        .into());
    }
    Ok(out.stdout.trim().to_string())
}

fn api_code<T: std::fmt::Debug>(r: std::result::Result<T, ClientError>) -> Option<ErrorCode> {
    match r {
        Err(e) => e.code(),
        Ok(v) => panic!("expected an API error, got {v:?}"),
    }
}

async fn destroy_all(client: &Client) -> std::result::Result<(), String> {
    for s in client.list(None, &[]).await.map_err(|e| e.to_string())? {
        client
            .destroy(&s.id)
            .await
            .map_err(|e| format!("destroy {}: {e}", s.id))?;
    }
    Ok(())
}

/// Reaps every exited child (VMs of a killed daemon end up here).
fn reap_orphans() {
    // SAFETY: waitpid on any child, without blocking.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
}

// ---------------------------------------------------------------- cases

fn three_concurrent_creates_then_exec() -> Result {
    on_rt(async {
        let c = suite().client.clone();
        let req = spec(&[]);
        let (a, b, d) = tokio::join!(c.create(&req), c.create(&req), c.create(&req));
        let all: Vec<SandboxInfo> = [a, b, d]
            .into_iter()
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| e.to_string())?;
        for s in &all {
            check(
                s.state == SandboxState::Running,
                format!("{} is {:?}", s.id, s.state),
            )?;
            check(
                sh(&c, &s.id, "hostname").await? == s.id,
                "hostname is not the sandbox id",
            )?;
        }
        for s in &all {
            let gone = c.destroy(&s.id).await.map_err(|e| e.to_string())?;
            check(gone.state == SandboxState::Destroyed, "not destroyed")?;
            check(
                !suite().home.join("vms").join(&s.id).exists(),
                "run dir left after destroy",
            )?;
        }
        Ok(())
    })
}

fn files_and_trees_round_trip() -> Result {
    let c = suite().client.clone();
    let id = on_rt(async move { c.create(&spec(&[])).await.map(|s| s.id) })
        .map_err(|e| e.to_string())?;
    let host = tempfile::tempdir()?;
    let tree = host.path().join("tree");
    std::fs::create_dir_all(tree.join("empty"))?;
    std::fs::create_dir_all(tree.join("bin"))?;
    std::fs::write(tree.join("bin/run.sh"), "#!/bin/sh\necho ran\n")?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        tree.join("bin/run.sh"),
        std::fs::Permissions::from_mode(0o750),
    )?;
    std::fs::set_permissions(tree.join("empty"), std::fs::Permissions::from_mode(0o700))?;
    std::os::unix::fs::symlink("bin/run.sh", tree.join("link"))?;
    std::fs::write(host.path().join("one.txt"), "one file\n")?;
    let cp = |src: &str, dst: &str| -> Result {
        let out = hutch(&suite().home).args(["cp", src, dst]).output()?;
        check(
            out.status.success(),
            format!("cp {src} {dst}: {}", String::from_utf8_lossy(&out.stderr)),
        )
    };
    let result = (|| {
        cp(
            &host.path().join("one.txt").display().to_string(),
            &format!("{id}:/root/one.txt"),
        )?;
        cp(&tree.display().to_string(), &format!("{id}:/srv/tree"))?;
        let c = suite().client.clone();
        let id2 = id.clone();
        let seen = on_rt(async move {
            sh(&c, &id2, "cat /root/one.txt; stat -c '%a %F' /srv/tree/empty /srv/tree/bin/run.sh; readlink /srv/tree/link; /srv/tree/link").await
        })?;
        check(
            seen == "one file\n700 directory\n750 regular file\nbin/run.sh\nran",
            format!("guest sees {seen:?}"),
        )?;
        let back = host.path().join("back");
        cp(&format!("{id}:/srv/tree"), &back.display().to_string())?;
        cp(
            &format!("{id}:/root/one.txt"),
            &host.path().join("one.back").display().to_string(),
        )?;
        let mode = |p: &str| {
            std::fs::metadata(back.join(p))
                .map(|m| m.permissions().mode() & 0o777)
                .unwrap_or(0)
        };
        check(
            mode("empty") == 0o700 && mode("bin/run.sh") == 0o750,
            "modes lost on the way back",
        )?;
        check(
            std::fs::read_link(back.join("link"))? == Path::new("bin/run.sh"),
            "symlink lost",
        )?;
        check(
            std::fs::read_dir(back.join("empty"))?.count() == 0,
            "empty dir not empty",
        )?;
        check(
            std::fs::read(host.path().join("one.back"))? == b"one file\n",
            "file differs",
        )
    })();
    let c = suite().client.clone();
    on_rt(async move { c.destroy(&id).await }).map_err(|e| e.to_string())?;
    result
}

/// `hutch cp SRC DST` against the suite's daemon.
fn hutch_cp(src: &str, dst: &str) -> Result<std::process::Output> {
    Ok(hutch(&suite().home).args(["cp", src, dst]).output()?)
}

fn cp_never_follows_what_a_guest_planted() -> Result {
    let c = suite().client.clone();
    let id = on_rt(async move { c.create(&spec(&[])).await.map(|s| s.id) })
        .map_err(|e| e.to_string())?;
    let host = tempfile::tempdir()?;
    let victim = host.path().join("victim");
    std::fs::create_dir(&victim)?;
    let precious = host.path().join("precious.txt");
    std::fs::write(&precious, "precious\n")?;
    let out = host.path().join("out");
    let guest_sh = |script: String| {
        let c = suite().client.clone();
        let id = id.clone();
        on_rt(async move { sh(&c, &id, &script).await })
    };
    let result = (|| {
        // First copy: the guest's tree holds symlinks to host paths; they land as symlinks.
        guest_sh(format!(
            "mkdir -p /srv/evil && ln -s {} /srv/evil/link && ln -s {} /srv/evil/file && echo guest > /srv/one",
            victim.display(),
            precious.display()
        ))?;
        let first = hutch_cp(&format!("{id}:/srv/evil"), &out.display().to_string())?;
        check(
            first.status.success(),
            format!("first cp: {}", String::from_utf8_lossy(&first.stderr)),
        )?;
        // Second copy into the same place: `link` is now a directory with a file in it (and
        // `file` is gone, so that nothing else in the tree stops the copy first).
        guest_sh(
            "rm /srv/evil/link /srv/evil/file && mkdir /srv/evil/link && echo pwned > /srv/evil/link/pwned"
                .into(),
        )?;
        let second = hutch_cp(&format!("{id}:/srv/evil"), &out.display().to_string())?;
        check(
            !second.status.success(),
            "the second cp went through the planted link",
        )?;
        check(
            std::fs::read_dir(&victim)?.count() == 0,
            "the second cp wrote into the host directory the link names",
        )?;
        // A single file copied onto the planted `file` symlink replaces the link.
        let single = hutch_cp(
            &format!("{id}:/srv/one"),
            &out.join("file").display().to_string(),
        )?;
        check(
            single.status.success(),
            format!("single cp: {}", String::from_utf8_lossy(&single.stderr)),
        )?;
        check(
            std::fs::read(&precious)? == b"precious\n",
            "the single-file cp overwrote the symlink's target",
        )?;
        check(
            std::fs::read(out.join("file"))? == b"guest\n",
            "the single-file cp did not land",
        )
    })();
    let c = suite().client.clone();
    on_rt(async move { c.destroy(&id).await }).map_err(|e| e.to_string())?;
    result
}

/// A `/proc/PID/status` field in MiB (`VmRSS`, `VmHWM`).
fn proc_mib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

/// Bytes a download delivers before it ends, or the error that cut it.
async fn drain(
    download: std::result::Result<hutch_api::client::Download, ClientError>,
) -> std::result::Result<u64, String> {
    use futures::StreamExt;
    let mut download = download.map_err(|e| e.to_string())?;
    let mut total = 0u64;
    while let Some(chunk) = download.next().await {
        total += chunk.map_err(|e| e.to_string())?.len() as u64;
    }
    Ok(total)
}

fn downloads_stream_in_bounded_memory() -> Result {
    const BIG: u64 = 250 << 20;
    let pid = suite().daemon.lock().unwrap().child.id();
    let c = suite().client.clone();
    let id = on_rt(async move { c.create(&spec(&[])).await.map(|s| s.id) })
        .map_err(|e| e.to_string())?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let result = (|| {
        let c = suite().client.clone();
        let id2 = id.clone();
        on_rt(async move {
            sh(&c, &id2, "truncate -s 250M /root/big && truncate -s 4G /root/huge && mkdir /root/hd && truncate -s 4G /root/hd/huge").await
        })?;
        let before = proc_mib(pid, "VmRSS");
        let sampler = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut peak = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    peak = peak.max(proc_mib(pid, "VmRSS"));
                    std::thread::sleep(Duration::from_millis(50));
                }
                peak
            })
        };
        let c = suite().client.clone();
        let id2 = id.clone();
        let started = Instant::now();
        let got = on_rt(async move {
            let (a, b, d) = tokio::join!(
                drain(c.download_file(&id2, "/root/big").await),
                drain(c.download_file(&id2, "/root/big").await),
                drain(c.download_file(&id2, "/root/big").await),
            );
            [a, b, d]
        });
        let took = started.elapsed();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let peak = sampler.join().map_err(|_| "sampler panicked")?;
        eprintln!(
            "3 concurrent GETs of 250 MiB in {took:.1?}: daemon VmRSS {before} MiB before, \
             peak {peak} MiB during, VmHWM {} MiB",
            proc_mib(pid, "VmHWM")
        );
        for g in &got {
            check(g == &Ok(BIG), format!("download delivered {g:?}"))?;
        }
        check(peak < 200, format!("daemon RSS peaked at {peak} MiB"))?;
        let c = suite().client.clone();
        let id2 = id.clone();
        let (file, file_took, tree, tree_took) = on_rt(async move {
            let t = Instant::now();
            let file = drain(c.download_file(&id2, "/root/huge").await).await;
            let file_took = t.elapsed();
            let t = Instant::now();
            let tree = drain(c.download_archive(&id2, "/root/hd").await).await;
            (file, file_took, tree, t.elapsed())
        });
        eprintln!(
            "4 GiB sparse file refused after {file_took:.1?} ({file:?}); \
             its directory's archive cut off after {tree_took:.1?} ({tree:?})"
        );
        check(file.is_err(), "a 4 GiB file was served")?;
        check(tree.is_err(), "a 4 GiB archive was served")
    })();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let c = suite().client.clone();
    on_rt(async move { c.destroy(&id).await }).map_err(|e| e.to_string())?;
    result
}

fn pty_shell_echoes() -> Result {
    on_rt(async {
        let c = suite().client.clone();
        let id = c.create(&spec(&[])).await.map_err(|e| e.to_string())?.id;
        let start = ExecStart {
            argv: vec!["/bin/sh".into()],
            tty: Some(TtySize { rows: 24, cols: 80 }),
            ..Default::default()
        };
        let (mut tx, mut rx) = c
            .exec_stream(&id, &start)
            .await
            .map_err(|e| e.to_string())?;
        tx.stdin(b"echo h''i\n").await.map_err(|e| e.to_string())?;
        let mut screen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        // The terminal echoes the typed line (with the quotes); the command prints `hi`.
        while !String::from_utf8_lossy(&screen).contains("hi\r\n") {
            let ev = tokio::time::timeout_at(deadline, rx.next())
                .await
                .map_err(|_| format!("no `hi` in {:?}", String::from_utf8_lossy(&screen)))?;
            match ev.ok_or("stream ended")?.map_err(|e| e.to_string())? {
                StreamEvent::Stdout(d) => screen.extend(d),
                StreamEvent::Stderr(_) => return Err("a terminal has no separate stderr".into()),
                StreamEvent::Event(_) => {}
            }
        }
        tx.control(&ExecControl::Resize(TtySize {
            rows: 40,
            cols: 100,
        }))
        .await
        .map_err(|e| e.to_string())?;
        tx.stdin(b"stty size; exit 3\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut exit = None;
        while let Some(ev) = rx.next().await {
            match ev.map_err(|e| e.to_string())? {
                StreamEvent::Stdout(d) => screen.extend(d),
                StreamEvent::Event(ExecEventMsg::Exit { exit_code, .. }) => exit = exit_code,
                _ => {}
            }
        }
        c.destroy(&id).await.map_err(|e| e.to_string())?;
        check(
            String::from_utf8_lossy(&screen).contains("40 100"),
            "resize not applied",
        )?;
        check(exit == Some(3), format!("shell exit {exit:?}"))
    })
}

fn pause_then_resume_keeps_processes_alive() -> Result {
    on_rt(async {
        let c = suite().client.clone();
        let id = c.create(&spec(&[])).await.map_err(|e| e.to_string())?.id;
        let pid = sh(&c, &id, "sleep 1000 >/dev/null 2>&1 & echo $!").await?;
        let paused = c.lifecycle(&id, "pause").await.map_err(|e| e.to_string())?;
        check(
            paused.state == SandboxState::Paused,
            format!("{:?}", paused.state),
        )?;
        check(
            c.inspect(&id).await.map_err(|e| e.to_string())?.state == SandboxState::Paused,
            "inspect",
        )?;
        let refused = api_code(
            c.exec(
                &id,
                &ExecBody {
                    argv: vec!["true".into()],
                    ..Default::default()
                },
            )
            .await,
        );
        check(
            refused == Some(ErrorCode::Conflict),
            format!("exec while paused: {refused:?}"),
        )?;
        c.lifecycle(&id, "resume")
            .await
            .map_err(|e| e.to_string())?;
        let alive = sh(&c, &id, &format!("kill -0 {pid} && echo alive")).await?;
        c.destroy(&id).await.map_err(|e| e.to_string())?;
        check(alive == "alive", "process died across pause/resume")
    })
}

fn a_stopped_sandbox_starts_again() -> Result {
    let id = on_rt(async {
        let c = suite().client.clone();
        let id = c.create(&spec(&[])).await.map_err(|e| e.to_string())?.id;
        let stopped = c.lifecycle(&id, "stop").await.map_err(|e| e.to_string())?;
        check(stopped.state == SandboxState::Stopped, "not stopped")?;
        let exec = ExecBody {
            argv: vec!["true".into()],
            ..Default::default()
        };
        check(
            api_code(c.exec(&id, &exec).await) == Some(ErrorCode::Conflict),
            "exec in a stopped sandbox",
        )?;
        Ok::<_, Failed>(id)
    })?;
    let (ok, out, err) = cli(&["start", "--json", &id])?;
    check(ok, format!("hutch start: {err}"))?;
    let started: SandboxInfo = serde_json::from_str(&out)?;
    check(
        started.id == id && started.state == SandboxState::Running,
        format!("started: {:?}", started.state),
    )?;
    on_rt(async move {
        let c = suite().client.clone();
        check(sh(&c, &id, "echo ok").await? == "ok", "exec after start")?;
        check(
            api_code(c.lifecycle(&id, "start").await) == Some(ErrorCode::Conflict),
            "start of a running sandbox",
        )?;
        c.destroy(&id).await.map_err(|e| e.to_string())?;
        Ok(())
    })
}

fn ttl_expires() -> Result {
    on_rt(async {
        let c = suite().client.clone();
        let mut req = spec(&[]);
        req.spec.ttl_secs = Some(2);
        let id = c.create(&req).await.map_err(|e| e.to_string())?.id;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let state = c.inspect(&id).await.map_err(|e| e.to_string())?.state;
            if state == SandboxState::Destroyed {
                break;
            }
            check(
                Instant::now() < deadline,
                format!("still {state:?} long after its TTL"),
            )?;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        check(
            !suite().home.join("vms").join(&id).exists(),
            "run dir left after TTL",
        )
    })
}

fn tokens_are_scoped() -> Result {
    let token = |label: Option<&str>| -> Result<String> {
        let mut cmd = hutch(&suite().home);
        cmd.args(["token", "create"]);
        if let Some(l) = label {
            cmd.args(["--label", l]);
        }
        let out = cmd.output()?;
        check(
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )?;
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    };
    let team_a = token(Some("team=a"))?;
    let (anon, with_a) = {
        let d = suite().daemon.lock().unwrap();
        (d.tcp_client(None), d.tcp_client(Some(&team_a)))
    };
    on_rt(async move {
        let c = suite().client.clone();
        let b = c
            .create(&spec(&[("team", "b")]))
            .await
            .map_err(|e| e.to_string())?
            .id;
        let unauthorized = anon.list(None, &[]).await;
        check(
            matches!(&unauthorized, Err(ClientError::Api { status: 401, .. })),
            format!("no token: {unauthorized:?}"),
        )?;
        let forbidden = with_a.inspect(&b).await;
        check(
            matches!(&forbidden, Err(ClientError::Api { status: 403, .. })),
            format!("team a on b: {forbidden:?}"),
        )?;
        let destroy = with_a.destroy(&b).await;
        check(
            matches!(&destroy, Err(ClientError::Api { status: 403, .. })),
            "team a destroyed b",
        )?;
        let a = with_a.create(&spec(&[])).await.map_err(|e| e.to_string())?;
        check(
            a.spec.labels.get("team").map(String::as_str) == Some("a"),
            "create not labelled by the token",
        )?;
        let seen: Vec<String> = with_a
            .list(None, &[])
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|s| s.id)
            .collect();
        check(seen == vec![a.id.clone()], format!("team a sees {seen:?}"))?;
        check(
            sh(&with_a, &a.id, "echo ok").await? == "ok",
            "exec over TCP",
        )?;
        with_a.destroy(&a.id).await.map_err(|e| e.to_string())?;
        c.destroy(&b).await.map_err(|e| e.to_string())?;
        Ok(())
    })
}

/// Runs `hutch token ARGS` on the suite's home; its stdout.
fn token_cmd(args: &[&str]) -> Result<String> {
    let out = hutch(&suite().home).arg("token").args(args).output()?;
    check(
        out.status.success(),
        format!("token {args:?}: {}", String::from_utf8_lossy(&out.stderr)),
    )?;
    Ok(String::from_utf8(out.stdout)?)
}

/// `hutch token ls --json`, by id.
fn listed_tokens() -> Result<std::collections::BTreeMap<String, serde_json::Value>> {
    let all: Vec<serde_json::Value> = serde_json::from_str(&token_cmd(&["ls", "--json"])?)?;
    Ok(all
        .into_iter()
        .map(|t| (t["id"].as_str().unwrap_or_default().to_string(), t))
        .collect())
}

fn tokens_expire_are_listed_and_can_be_removed() -> Result {
    let before = listed_tokens()?;
    let short = token_cmd(&["create", "--ttl", "1s"])?.trim().to_string();
    let long = token_cmd(&["create", "--ttl", "1h", "--label", "team=z"])?
        .trim()
        .to_string();
    let (short_client, long_client) = {
        let d = suite().daemon.lock().unwrap();
        (d.tcp_client(Some(&short)), d.tcp_client(Some(&long)))
    };
    let fresh: Vec<(String, serde_json::Value)> = listed_tokens()?
        .into_iter()
        .filter(|(id, _)| !before.contains_key(id))
        .collect();
    check(
        fresh.len() == 2,
        format!("two new tokens listed: {fresh:?}"),
    )?;
    let shown = serde_json::to_string(&fresh)?;
    check(
        !shown.contains(short.trim_start_matches("hutch_"))
            && !shown.contains(long.trim_start_matches("hutch_")),
        "token ls shows a secret",
    )?;
    let (long_id, listed) = fresh
        .iter()
        .find(|(_, t)| t["label"] == "team=z")
        .ok_or("the labelled token is not listed")?;
    check(
        listed["last_used_at_ms"].is_null() && listed["expires_at_ms"].is_i64(),
        format!("a fresh token: {listed}"),
    )?;
    // Well past the short token's second.
    std::thread::sleep(Duration::from_millis(1500));
    let (expired, used) = on_rt(async move {
        (
            short_client.list(None, &[]).await,
            long_client.list(None, &[]).await.map(|l| l.len()),
        )
    });
    check(
        matches!(&expired, Err(ClientError::Api { status: 401, error }) if error.message.contains("expired")),
        format!("an expired token: {expired:?}"),
    )?;
    check(used.is_ok(), format!("a valid token: {used:?}"))?;
    check(
        listed_tokens()?[long_id]["last_used_at_ms"].is_i64(),
        "last use not recorded",
    )?;

    token_cmd(&["rm", long_id])?;
    let long_client = suite().daemon.lock().unwrap().tcp_client(Some(&long));
    let removed = on_rt(async move { long_client.list(None, &[]).await });
    check(
        matches!(&removed, Err(ClientError::Api { status: 401, .. })),
        format!("a removed token: {removed:?}"),
    )?;
    check(
        !listed_tokens()?.contains_key(long_id.as_str()),
        "a removed token is listed",
    )?;
    let again = hutch(&suite().home)
        .args(["token", "rm", long_id])
        .output()?;
    check(
        !again.status.success() && String::from_utf8_lossy(&again.stderr).contains("no such token"),
        "removing an unknown token succeeded",
    )
}

/// Runs `hutch ARGS` against the suite's daemon: (success, stdout, stderr).
fn cli(args: &[&str]) -> Result<(bool, String, String)> {
    let out = hutch(&suite().home).args(args).output()?;
    Ok((
        out.status.success(),
        String::from_utf8(out.stdout)?,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn cli_errors_and_json_keep_their_shape() -> Result {
    // A refused WebSocket upgrade is the API's error, not a bare status.
    let (ok, _, err) = cli(&["exec", "sb-00000000", "--", "true"])?;
    check(
        !ok && err.contains("no such sandbox"),
        format!("exec on an unknown id: {err}"),
    )?;
    let refused = on_rt(async {
        suite()
            .client
            .exec_stream("sb-00000000", &ExecStart::default())
            .await
            .map(drop)
    });
    check(
        api_code(refused) == Some(ErrorCode::NotFound),
        "exec stream on an unknown id",
    )?;
    // Listings are arrays whatever their length.
    for args in [
        &["ls", "--json"][..],
        &["template", "ls", "--json"],
        &["image", "ls", "--json"],
        &["token", "ls", "--json"],
    ] {
        let (ok, out, err) = cli(args)?;
        check(ok, format!("{args:?}: {err}"))?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        check(v.is_array(), format!("{args:?} printed {out}"))?;
    }
    let (ok, out, _) = cli(&["rm", "--json", "sb-00000000", "sb-00000001"])?;
    check(!ok, "rm of unknown ids succeeded")?;
    check(out.trim() == "[]", format!("rm --json printed {out}"))?;
    // Flags that would be dropped are refused instead.
    for args in [
        &["create", "--allow", "203.0.113.1"][..],
        &["create", "--template", "t", "--memory", "1024"],
    ] {
        let (ok, _, err) = cli(args)?;
        check(!ok && !err.is_empty(), format!("{args:?} was accepted"))?;
    }
    Ok(())
}

fn bad_input_gets_stable_4xx_codes() -> Result {
    on_rt(async {
        let c = suite().client.clone();
        check(
            api_code(c.inspect("sb-00000000").await) == Some(ErrorCode::NotFound),
            "unknown id",
        )?;
        check(
            api_code(c.inspect("../etc").await) == Some(ErrorCode::NotFound),
            "bad id",
        )?;
        let mut huge = spec(&[]);
        huge.spec.cpus = 0;
        check(
            api_code(c.create(&huge).await) == Some(ErrorCode::InvalidSpec),
            "cpus 0",
        )?;
        huge.spec.cpus = 1;
        huge.spec.memory_mib = 200_000;
        check(
            api_code(c.create(&huge).await) == Some(ErrorCode::OverCapacity),
            "over the memory budget",
        )?;
        let mut no_image = spec(&[]);
        no_image.spec.image = "no-such-image".into();
        check(
            api_code(c.create(&no_image).await) == Some(ErrorCode::NotFound),
            "missing image",
        )?;
        let id = c.create(&spec(&[])).await.map_err(|e| e.to_string())?.id;
        let evil = evil_tar();
        let refused = api_code(c.put_archive(&id, "/root", evil).await);
        let escaped = c.get_file(&id, "/evil").await;
        let relative = api_code(c.get_file(&id, "etc/passwd").await);
        let missing = c
            .exec(
                &id,
                &ExecBody {
                    argv: vec!["no-such-cmd".into()],
                    ..Default::default()
                },
            )
            .await;
        c.destroy(&id).await.map_err(|e| e.to_string())?;
        check(
            refused == Some(ErrorCode::UnsafePath),
            format!("unsafe archive: {refused:?}"),
        )?;
        check(escaped.is_err(), "the archive's escape landed")?;
        check(
            relative == Some(ErrorCode::UnsafePath),
            format!("relative path: {relative:?}"),
        )?;
        check(
            api_code(missing) == Some(ErrorCode::CommandNotFound),
            "missing command",
        )?;
        check(
            api_code(c.lifecycle(&id, "resume").await) == Some(ErrorCode::Conflict),
            "resume a destroyed sandbox",
        )
    })
}

fn clients_that_hang_up_leave_nothing_half_done() -> Result {
    use std::io::Write;
    let c = suite().client.clone();
    let before: Vec<String> =
        on_rt(async move { c.list(None, &[("purpose=hangup".to_string())]).await })
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|s| s.id)
            .collect();
    check(before.is_empty(), "stale sandboxes")?;
    // A create whose client disappears mid-boot still completes: nothing is half made.
    let body = r#"{"memory_mib":256,"disk_mib":256,"labels":{"purpose":"hangup"}}"#;
    let mut raw = std::os::unix::net::UnixStream::connect(suite().home.join("hutch.sock"))?;
    write!(raw, "POST /v1/sandboxes HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())?;
    std::thread::sleep(Duration::from_millis(300));
    drop(raw);
    on_rt(async {
        let c = suite().client.clone();
        let deadline = Instant::now() + Duration::from_secs(90);
        let id = loop {
            let found = c
                .list(None, &["purpose=hangup".to_string()])
                .await
                .map_err(|e| e.to_string())?;
            match found.first() {
                Some(s) if s.state == SandboxState::Running => break s.id.clone(),
                Some(s) if s.state != SandboxState::Creating => {
                    return Err(format!("create ended {:?}", s.state).into())
                }
                _ => {}
            }
            check(Instant::now() < deadline, "abandoned create never finished")?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        // A streaming exec whose client disappears gets its process killed.
        let start = ExecStart {
            argv: vec!["sleep".into(), "4242".into()],
            ..Default::default()
        };
        let (tx, rx) = c
            .exec_stream(&id, &start)
            .await
            .map_err(|e| e.to_string())?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop((tx, rx));
        // `424[2]` matches the sleep but not this script itself.
        let count = "grep -l '424[2]' /proc/[0-9]*/cmdline 2>/dev/null | wc -l";
        let deadline = Instant::now() + Duration::from_secs(10);
        while sh(&c, &id, count).await? != "0" {
            check(
                Instant::now() < deadline,
                "process of a vanished client still runs",
            )?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        c.destroy(&id).await.map_err(|e| e.to_string())?;
        Ok(())
    })
}

/// The pid of the QEMU process running sandbox `id` of the suite's daemon (its pidfile).
fn vmm_pid(id: &str) -> Result<i32> {
    let pidfile = suite().home.join("vms").join(id).join("qemu.pid");
    let text =
        std::fs::read_to_string(&pidfile).map_err(|e| format!("{}: {e}", pidfile.display()))?;
    Ok(text.trim().parse()?)
}

/// Waits for `child` at most `limit`; kills it and fails if it is still running then.
fn wait_bounded(mut child: Child, limit: Duration, what: &str) -> Result<std::process::Output> {
    let deadline = Instant::now() + limit;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{what} did not return within {limit:?}").into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(child.wait_with_output()?)
}

fn a_stopped_guest_ends_its_execs_with_an_error() -> Result {
    let c = suite().client.clone();
    let id = on_rt(async move { c.create(&spec(&[("purpose", "stopped")])).await })
        .map_err(|e| e.to_string())?
        .id;
    let c = suite().client.clone();
    let pending_id = id.clone();
    // An exec without a timeout, running when the guest stops.
    let pending = suite().rt.spawn(async move {
        let body = ExecBody {
            argv: vec!["sleep".into(), "1000".into()],
            ..Default::default()
        };
        c.exec(&pending_id, &body).await
    });
    let result = (|| {
        std::thread::sleep(Duration::from_secs(1));
        let vmm = vmm_pid(&id)?;
        // SAFETY: stopping a VMM process of this suite's daemon.
        check(unsafe { libc::kill(vmm, libc::SIGSTOP) } == 0, "SIGSTOP")?;
        // The CLI's exec with a timeout returns, with the error, though the guest never
        // answers again.
        let cli = hutch(&suite().home)
            .args(["exec", &id, "--timeout", "5", "--", "sleep", "100"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let out = wait_bounded(cli, Duration::from_secs(120), "hutch exec --timeout 5")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        check(!out.status.success(), format!("exec succeeded: {stderr}"))?;
        check(
            stderr.contains("did not answer"),
            format!("no timeout error: {stderr}"),
        )?;
        // The health check finds the sandbox failed and ends the exec still waiting on it.
        let c = suite().client.clone();
        let inspect_id = id.clone();
        let info = on_rt(async move { c.inspect(&inspect_id).await }).map_err(|e| e.to_string())?;
        check(
            matches!(info.state, SandboxState::Failed(_)),
            format!("a stopped guest is {:?}", info.state),
        )?;
        let ended = on_rt(async move {
            match tokio::time::timeout(Duration::from_secs(60), pending).await {
                Err(_) => Err("the pending exec was not ended by the failure".to_string()),
                Ok(joined) => match joined.expect("exec task") {
                    Err(ClientError::Api { error, .. })
                        if error.message.contains("the sandbox failed") =>
                    {
                        Ok(())
                    }
                    other => Err(format!("pending exec ended with {other:?}")),
                },
            }
        });
        Ok(ended?)
    })();
    if let Ok(vmm) = vmm_pid(&id) {
        // SAFETY: resuming the VMM this case stopped, so that it can be destroyed cleanly.
        unsafe { libc::kill(vmm, libc::SIGCONT) };
    }
    let c = suite().client.clone();
    on_rt(async move { c.destroy(&id).await }).map_err(|e| e.to_string())?;
    result
}

fn a_websocket_client_that_stops_reading_then_closes_leaves_no_process() -> Result {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let c = suite().client.clone();
    on_rt(async move {
        let id = c
            .create(&spec(&[("purpose", "ws-yes")]))
            .await
            .map_err(|e| e.to_string())?
            .id;
        let socket = tokio::net::UnixStream::connect(suite().home.join("hutch.sock")).await?;
        let url = format!("ws://localhost/v1/sandboxes/{id}/exec/ws");
        let (mut ws, _) = tokio_tungstenite::client_async(url, socket)
            .await
            .map_err(|e| e.to_string())?;
        let start = ExecStart {
            argv: vec!["yes".into()],
            ..Default::default()
        };
        ws.send(Message::text(serde_json::to_string(&start)?))
            .await
            .map_err(|e| e.to_string())?;
        let mut output = 0usize;
        while output < 64 * 1024 {
            match ws.next().await {
                Some(Ok(Message::Binary(d))) => output += d.len(),
                Some(Ok(_)) => {}
                other => return Err(format!("stream ended early: {other:?}").into()),
            }
        }
        // Stop reading until every buffer between the guest and us is full, then hang up.
        tokio::time::sleep(Duration::from_secs(3)).await;
        drop(ws);
        let count = "cat /proc/[0-9]*/comm 2>/dev/null | grep -cx yes || true";
        let deadline = Instant::now() + Duration::from_secs(30);
        while sh(&c, &id, count).await? != "0" {
            check(
                Instant::now() < deadline,
                "yes still runs after its WebSocket client closed",
            )?;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        c.destroy(&id).await.map_err(|e| e.to_string())?;
        Ok(())
    })
}

/// One HTTP/1.1 request on `stream` (kept alive); returns the response's status.
fn http_status(stream: &mut std::net::TcpStream, token: &str) -> Result<u16> {
    use std::io::{BufRead, BufReader, Read, Write};
    write!(
        stream,
        "GET /v1/sandboxes HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {token}\r\n\r\n"
    )?;
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse()?;
        }
    }
    reader.read_exact(&mut vec![0; length])?;
    Ok(status)
}

/// Whether the server closed `stream`, waiting for it at most `limit`.
fn closed_by_server(stream: &mut std::net::TcpStream, limit: Duration) -> bool {
    use std::io::Read;
    let _ = stream.set_read_timeout(Some(limit));
    match stream.read(&mut [0u8; 16]) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// Runs `case` against a daemon without networking whose TCP listener serves at most 16
/// unauthenticated connections, each closed after `header_timeout` seconds without a request;
/// `case` gets the daemon and an admin token.
fn with_tcp_limits(header_timeout: &str, case: impl FnOnce(&Daemon, &str) -> Result) -> Result {
    let limits = [
        "--no-network",
        "--tcp-max-unauthenticated",
        "16",
        "--tcp-header-timeout",
        header_timeout,
    ];
    let mut daemon = Daemon::start_with(common::private_home(), &limits);
    let result = hutch(daemon.home.path())
        .args(["token", "create"])
        .output()
        .map_err(Failed::from)
        .and_then(|out| {
            check(out.status.success(), "token create")?;
            let token = String::from_utf8(out.stdout)?;
            case(&daemon, token.trim())
        });
    sigterm(&mut daemon);
    result
}

/// `n` TCP connections to `addr` that never send a byte.
fn idle_connections(addr: &str, n: usize) -> Result<Vec<std::net::TcpStream>> {
    (0..n)
        .map(|_| Ok(std::net::TcpStream::connect(addr)?))
        .collect()
}

fn idle_unauthenticated_tcp_clients_cannot_starve_the_daemon() -> Result {
    with_tcp_limits("5", |daemon, token| {
        // An authenticated client, connected before the flood.
        let mut authed = std::net::TcpStream::connect(&daemon.tcp)?;
        check(
            http_status(&mut authed, token)? == 200,
            "authenticated request",
        )?;
        let mut idle = idle_connections(&daemon.tcp, 300)?;
        // The Unix socket and the authenticated connection are still served.
        let unix = daemon.client();
        let listed = on_rt(async move {
            tokio::time::timeout(Duration::from_secs(30), unix.list(None, &[])).await
        });
        check(
            matches!(listed, Ok(Ok(_))),
            format!("Unix socket during the flood: {listed:?}"),
        )?;
        check(
            http_status(&mut authed, token)? == 200,
            "authenticated request during the flood",
        )?;
        // Every idle connection is closed: those over the cap at once, the rest when their
        // header timeout passes.
        for (n, stream) in idle.iter_mut().enumerate() {
            check(
                closed_by_server(stream, Duration::from_secs(60)),
                format!("idle connection {n} is still open"),
            )?;
        }
        let mut fresh = std::net::TcpStream::connect(&daemon.tcp)?;
        check(
            http_status(&mut fresh, token)? == 200,
            "authenticated request after the flood",
        )
    })?;
    // With a header timeout far beyond this test, only the cap can close a connection: the
    // last of a flood larger than the cap is closed at once, while the first ones stay.
    with_tcp_limits("3600", |daemon, _| {
        let mut idle = idle_connections(&daemon.tcp, 64)?;
        let last = idle.last_mut().expect("connections");
        check(
            closed_by_server(last, Duration::from_secs(60)),
            "a connection over the cap was served",
        )
    })
}

fn a_second_daemon_on_the_same_home_refuses_and_touches_nothing() -> Result {
    let c = suite().client.clone();
    let id = on_rt(async move { c.create(&spec(&[("purpose", "second-daemon")])).await })
        .map_err(|e| e.to_string())?
        .id;
    let first = suite().daemon.lock().unwrap().child.id();
    let tcp = format!("127.0.0.1:{}", free_port());
    let second = hutch(&suite().home)
        .args(["daemon", "--listen-tcp", &tcp, "--net-spares", "0"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let out = wait_bounded(second, Duration::from_secs(60), "a second daemon")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    check(!out.status.success(), "a second daemon started")?;
    check(
        stderr.contains(&format!("another hutch daemon (pid {first})")),
        format!("unclear refusal: {stderr}"),
    )?;
    let c = suite().client.clone();
    on_rt(async move {
        let info = c.inspect(&id).await.map_err(|e| e.to_string())?;
        check(
            info.state == SandboxState::Running,
            format!("the first daemon's sandbox is {:?}", info.state),
        )?;
        check(sh(&c, &id, "echo alive").await? == "alive", "exec")?;
        c.destroy(&id).await.map_err(|e| e.to_string())?;
        Ok(())
    })
}

/// A tar whose second entry climbs out through a symlink the first one made.
fn evil_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    b.append_link(&mut h, "up", "/").unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(4);
    h.set_mode(0o644);
    b.append_data(&mut h, "up/evil", &b"evil"[..]).unwrap();
    b.into_inner().unwrap()
}

fn kill9_during_concurrent_creates_then_restart_reconciles() -> Result {
    // Killed at the end with no successor on its home: no spare networks to leave behind.
    let mut daemon = Daemon::start_with(common::private_home(), NO_SPARES);
    let home = daemon.home.path().to_path_buf();
    let client = daemon.client();
    let creates = on_rt({
        let client = client.clone();
        async move {
            let tasks: Vec<_> = (0..10)
                .map(|_| {
                    let c = client.clone();
                    tokio::spawn(async move { c.create(&spec(&[])).await })
                })
                .collect();
            tokio::time::sleep(Duration::from_secs(4)).await;
            tasks
        }
    });
    daemon.kill9();
    drop(creates);
    let mut restarted = Daemon::start_with(daemon.home, NO_SPARES);
    let result = (|| {
        let client = restarted.client();
        let listed =
            on_rt(async move { client.list(None, &[]).await }).map_err(|e| e.to_string())?;
        check(
            listed.len() == 10,
            format!("{} of 10 sandboxes recorded", listed.len()),
        )?;
        let running: Vec<String> = listed
            .iter()
            .filter(|s| s.state == SandboxState::Running)
            .map(|s| s.id.clone())
            .collect();
        check(
            listed
                .iter()
                .all(|s| matches!(s.state, SandboxState::Running | SandboxState::Failed(_))),
            format!(
                "states after restart: {:?}",
                listed.iter().map(|s| s.state.name()).collect::<Vec<_>>()
            ),
        )?;
        // Reality matches the list: exactly the running sandboxes have a VMM and a run dir.
        let marker = home.join("vms").display().to_string();
        let mut vmm_ids: Vec<String> = common::vmm_processes()
            .into_iter()
            .filter(|(_, cmd)| cmd.contains(&marker))
            .filter_map(|(_, cmd)| {
                cmd.split_whitespace()
                    .find_map(|a| a.strip_prefix("hutch-").map(String::from))
            })
            .collect();
        let mut dirs: Vec<String> = std::fs::read_dir(home.join("vms"))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let mut want = running.clone();
        want.sort();
        vmm_ids.sort();
        dirs.sort();
        check(
            vmm_ids == want,
            format!("VMMs {vmm_ids:?} but running {want:?}"),
        )?;
        check(
            dirs == want,
            format!("run dirs {dirs:?} but running {want:?}"),
        )?;
        let client = restarted.client();
        on_rt(async move {
            for id in running {
                check(
                    sh(&client, &id, "echo adopted").await? == "adopted",
                    "adopted sandbox does not answer",
                )?;
            }
            destroy_all(&client).await.map_err(Failed::from)
        })
    })();
    restarted.kill9();
    reap_orphans();
    let leaks = common::leaks(&home);
    check(leaks.is_empty(), format!("left behind: {leaks:?}"))?;
    result
}

/// `curl` from inside the sandbox: (body, curl's exit code). Exit 7 is "connection refused or
/// unreachable" (a rejected connection), 28 would be a timeout (a silently dropped one).
async fn curl(client: &Client, id: &str, url: &str) -> Result<(String, i32)> {
    let out = client
        .exec(
            id,
            &ExecBody {
                argv: vec![
                    "curl".into(),
                    "-s".into(),
                    "--connect-timeout".into(),
                    "8".into(),
                    url.into(),
                ],
                ..Default::default()
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok((out.stdout, out.exit_code.unwrap_or(-1)))
}

fn network_policy_is_enforced_and_changeable() -> Result {
    use hutch_net::testbed::{World, INET, LAN, METADATA};
    let world = World::new("dmn");
    let mut daemon = Daemon::start_with(common::private_home(), &["--net-host-netns", &world.host]);
    let home = daemon.home.path().to_path_buf();
    let client = daemon.client();
    let host_ns = world.host.clone();
    let result = on_rt(async move {
        let mut req = spec(&[]);
        req.spec.network = NetworkPolicy::Open;
        let id = client.create(&req).await.map_err(|e| e.to_string())?.id;
        let inet = format!("http://{INET}:8080/");
        check(
            curl(&client, &id, &inet).await? == ("inet".into(), 0),
            "open: internet unreachable",
        )?;
        // Another daemon (another home) on the same host side starts and reconciles: it
        // leaves this daemon's sandbox network alone.
        let mut other = tokio::task::spawn_blocking(move || {
            let args = ["--net-host-netns", &host_ns, "--net-spares", "0"];
            Daemon::start_with(common::private_home(), &args)
        })
        .await
        .map_err(|e| e.to_string())?;
        other.kill9();
        check(
            curl(&client, &id, &inet).await? == ("inet".into(), 0),
            "another daemon's start took this sandbox's network",
        )?;
        for target in [format!("http://{LAN}:8080/"), format!("http://{METADATA}/")] {
            let (_, rc) = curl(&client, &id, &target).await?;
            check(
                rc == 7,
                format!("open: {target} gave curl exit {rc}, want 7 (rejected at once)"),
            )?;
        }
        // Narrow the policy while it runs: the next connection follows it.
        let elsewhere = NetworkPolicy::Allow {
            cidrs: vec!["198.18.0.0/15".into()],
            ports: vec![],
            domains: vec![],
        };
        client
            .set_network(&id, &elsewhere)
            .await
            .map_err(|e| e.to_string())?;
        check(
            curl(&client, &id, &inet).await?.1 == 7,
            "internet still reachable after narrowing",
        )?;
        let just_inet = NetworkPolicy::Allow {
            cidrs: vec![format!("{INET}/32")],
            ports: vec![8080],
            domains: vec![],
        };
        let info = client
            .set_network(&id, &just_inet)
            .await
            .map_err(|e| e.to_string())?;
        check(info.spec.network == just_inet, "policy not recorded")?;
        check(
            curl(&client, &id, &inet).await?.0 == "inet",
            "allowed CIDR unreachable",
        )?;
        check(
            curl(&client, &id, &format!("http://{LAN}:8080/")).await?.1 == 7,
            "LAN reachable under allow",
        )?;
        let log = client.network_log(&id).await.map_err(|e| e.to_string())?;
        check(
            log.iter().any(|e| e.verdict == "deny" && e.dst == LAN),
            format!("no LAN denial in the log: {log:?}"),
        )?;
        check(
            log.iter().any(|e| e.verdict == "allow" && e.dst == INET),
            "no allowed flow in the log",
        )?;
        // A sandbox without a network has no NIC at all.
        let bare = client
            .create(&spec(&[]))
            .await
            .map_err(|e| e.to_string())?
            .id;
        check(
            sh(&client, &bare, "ls /sys/class/net").await? == "lo",
            "a sandbox without network has a NIC",
        )?;
        let refused = api_code(client.set_network(&bare, &NetworkPolicy::Open).await);
        check(
            refused == Some(ErrorCode::Conflict),
            "a NIC appeared on a sandbox created without one",
        )?;
        destroy_all(&client).await.map_err(Failed::from)?;
        Ok::<_, Failed>([id, bare])
    });
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGTERM) };
    let _ = daemon.child.wait();
    let namespaces =
        String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output()?.stdout)
            .into_owned();
    let leaks = common::leaks(&home);
    let ids = result?;
    check(leaks.is_empty(), format!("left behind: {leaks:?}"))?;
    // Namespaces are host-wide: look for this test's own (others may be running beside it).
    check(
        !ids.iter()
            .any(|id| namespaces.contains(&format!("hutch-{id}"))),
        format!("sandbox namespaces left: {namespaces}"),
    )
}

/// `curl` run in namespace `ns` (the daemon's host side): (body, curl's exit code).
fn curl_in(ns: &str, url: &str) -> Result<(String, i32)> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-s", "--max-time", "10", url])
        .output()?;
    Ok((
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.code().unwrap_or(-1),
    ))
}

fn published_ports_reach_the_guest_survive_a_restart_and_close_on_rm() -> Result {
    use hutch_net::testbed::World;
    let world = World::new("prt");
    let args = ["--net-host-netns", world.host.as_str()];
    let mut daemon = Daemon::start_with(common::private_home(), &args);
    let home = daemon.home.path().to_path_buf();
    let client = daemon.client();
    // Egress: nothing at all. Published ports still work: they are inbound, from the host.
    let id = on_rt(async move {
        let mut req = spec(&[]);
        req.spec.network = NetworkPolicy::Allow {
            cidrs: vec![],
            ports: vec![],
            domains: vec![],
        };
        let id = client.create(&req).await.map_err(|e| e.to_string())?.id;
        sh(
            &client,
            &id,
            "mkdir -p /tmp/www && echo preview > /tmp/www/index.html && cd /tmp/www && \
             (python3 -m http.server 8000 >/dev/null 2>&1 &) && \
             for i in $(seq 100); do curl -s localhost:8000/ >/dev/null && exit 0; sleep 0.2; done; exit 1",
        )
        .await?;
        Ok::<_, Failed>(id)
    })?;
    let result = (|| {
        let client = daemon.client();
        let p = on_rt({
            let (client, id) = (client.clone(), id.clone());
            async move { client.publish_port(&id, 8000, None).await }
        })
        .map_err(|e| e.to_string())?;
        check(
            p.guest_port == 8000 && p.host_addr == "127.0.0.1",
            format!("{p:?}"),
        )?;
        let url = format!("http://127.0.0.1:{}/", p.host_port);
        check(
            curl_in(&world.host, &url)? == ("preview\n".into(), 0),
            "the published port does not serve the guest's page",
        )?;
        // The CLI lists it.
        let listed = hutch(&home).args(["port", &id]).output()?;
        let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
        check(
            listed.trim() == format!("8000 -> 127.0.0.1:{}", p.host_port),
            format!("hutch port lists {listed:?}"),
        )?;

        // A restarted daemon publishes it again, and the sandbox's DNS filter and decision
        // log are back.
        daemon.kill9();
        let home_dir = std::mem::replace(&mut daemon.home, tempfile::tempdir()?);
        daemon = Daemon::start_with(home_dir, &args);
        let client = daemon.client();
        check(
            curl_in(&world.host, &url)? == ("preview\n".into(), 0),
            "the published port is gone after a daemon restart",
        )?;
        let log = on_rt({
            let (client, id) = (client.clone(), id.clone());
            async move {
                let out = client
                    .exec(
                        &id,
                        &ExecBody {
                            argv: vec!["getent".into(), "hosts".into(), "refused.test".into()],
                            ..Default::default()
                        },
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                check(out.exit_code != Some(0), "an unlisted name resolved")?;
                client
                    .network_log(&id)
                    .await
                    .map_err(|e| Failed::from(e.to_string()))
            }
        })?;
        check(
            log.iter()
                .any(|e| e.domain.as_deref() == Some("refused.test") && e.verdict == "deny"),
            format!("the adopted sandbox's DNS refusal is not logged: {log:?}"),
        )?;

        // Unpublished: closed (curl 7: connection refused).
        let out = hutch(&home)
            .args(["port", &id, "8000", "--remove"])
            .output()?;
        check(out.status.success(), "hutch port --remove failed")?;
        check(
            curl_in(&world.host, &url)?.1 == 7,
            "still open after --remove",
        )?;

        // Published on a chosen port through the CLI; the sandbox destroyed: closed.
        let out = hutch(&home)
            .args(["port", &id, "8000", "--host-port", "18080"])
            .output()?;
        check(
            String::from_utf8_lossy(&out.stdout).trim() == "127.0.0.1:18080",
            format!(
                "hutch port printed {:?}",
                String::from_utf8_lossy(&out.stdout)
            ),
        )?;
        let chosen = "http://127.0.0.1:18080/";
        check(
            curl_in(&world.host, chosen)? == ("preview\n".into(), 0),
            "the chosen host port does not serve the guest's page",
        )?;
        on_rt({
            let (client, id) = (client.clone(), id.clone());
            async move { client.destroy(&id).await }
        })
        .map_err(|e| e.to_string())?;
        check(curl_in(&world.host, chosen)?.1 == 7, "still open after rm")
    })();
    let client = daemon.client();
    let left = on_rt(async move { destroy_all(&client).await });
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGTERM) };
    let _ = daemon.child.wait();
    reap_orphans();
    let leaks = common::leaks(&home);
    result?;
    left?;
    check(leaks.is_empty(), format!("left behind: {leaks:?}"))
}

/// An HTTP server in namespace `ns` answering with the client address it sees.
fn http_who(ns: &str, port: u16) {
    use std::io::{Read, Write};
    let l = hutch_net::in_netns(ns, move || {
        std::net::TcpListener::bind(("0.0.0.0", port)).map_err(|e| hutch_net::NetError::Io {
            what: "bind".into(),
            source: e,
        })
    })
    .expect("bind who server");
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let who = s
                .peer_addr()
                .map(|a| a.ip().to_string())
                .unwrap_or_default();
            let _ = write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{who}",
                who.len()
            );
        }
    });
}

fn wireguard_egress_leaves_through_the_tunnel_or_not_at_all() -> Result {
    use hutch_net::testbed::{wireguard_peer, World, INET};
    use hutch_net::wg::{encode_key, public_key};
    let world = World::new("wgd");
    http_who(&world.inet, 8090);
    let mut daemon = Daemon::start_with(common::private_home(), &["--net-host-netns", &world.host]);
    let home = daemon.home.path().to_path_buf();
    let client = daemon.client();
    let inet_ns = world.inet.clone();
    let result = on_rt(async move {
        let (sandbox_key, peer_key) = ([3u8; 32], [4u8; 32]);
        // The peer listens on the internet namespace's uplink address.
        let endpoint = "198.51.100.2:51820".to_string();
        let peer = wireguard_peer(
            &inet_ns,
            "wgpeer",
            peer_key,
            public_key(&sandbox_key),
            endpoint.parse().unwrap(),
            "10.99.0.1/24".parse().unwrap(),
            vec!["10.99.0.2/32".parse().unwrap()],
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut req = spec(&[]);
        req.spec.network = NetworkPolicy::Open;
        req.spec.wireguard = Some(hutch_types::WireGuardSpec {
            private_key: encode_key(&sandbox_key),
            peer_public_key: encode_key(&public_key(&peer_key)),
            preshared_key: None,
            endpoint,
            address: "10.99.0.2/32".into(),
            allowed_ips: vec!["0.0.0.0/0".into()],
            keepalive: None,
            dns: None,
        });
        let info = client.create(&req).await.map_err(|e| e.to_string())?;
        let id = info.id.clone();
        // The key went in; it never comes back out.
        let shown = client.inspect(&id).await.map_err(|e| e.to_string())?;
        let w = shown
            .spec
            .wireguard
            .clone()
            .ok_or("no tunnel in the spec")?;
        check(
            w.private_key == hutch_types::REDACTED && info.spec.wireguard == Some(w),
            "the tunnel's private key is shown",
        )?;
        let who = format!("http://{INET}:8090/");
        let got = curl(&client, &id, &who).await?;
        check(
            got == ("10.99.0.2".into(), 0),
            format!("traffic did not come out of the tunnel: {got:?}"),
        )?;
        check(
            curl(&client, &id, &format!("http://{INET}:8080/")).await? == ("inet".into(), 0),
            "the internet is unreachable through the tunnel",
        )?;
        drop(peer);
        let (body, rc) = curl(&client, &id, &who).await?;
        check(
            rc != 0 && body.is_empty(),
            format!("with the peer down curl got {body:?} (exit {rc})"),
        )?;
        destroy_all(&client).await.map_err(Failed::from)
    });
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGTERM) };
    let _ = daemon.child.wait();
    daemon.kill9();
    reap_orphans();
    let leaks = common::leaks(&home);
    result?;
    check(leaks.is_empty(), format!("left behind: {leaks:?}"))
}

/// Stops a daemon the way an operator does (SIGTERM); its sandboxes keep running.
fn sigterm(daemon: &mut Daemon) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGTERM) };
    let _ = daemon.child.wait();
}

fn templates_clones_forks_and_pause_to_disk_survive_a_restart() -> Result {
    let world = hutch_net::testbed::World::new("tpl");
    let net_args = ["--net-host-netns", world.host.as_str()];
    let mut daemon = Daemon::start_with(common::private_home(), &net_args);
    let home = daemon.home.path().to_path_buf();
    let client = daemon.client();
    let result = on_rt(clone_scenario(client.clone(), home.clone()));
    if result.is_err() {
        // Detached VMs outlive the daemon: remove them here, or a failure leaks them.
        let _ = on_rt(async move {
            let _ = destroy_all(&client).await;
            client.remove_template("tpl").await
        });
    }
    sigterm(&mut daemon);
    let result = result.and_then(|suspended| {
        // Saves a crash cut off from their sandboxes: a fork that made no child, and a pause
        // to disk of a sandbox that no longer exists.
        let stale = ["fork-sb-00000000ff-1", "suspend-sb-00000000ff-1"]
            .map(|d| home.join("snapshots").join(d));
        for dir in &stale {
            std::fs::create_dir_all(dir)?;
            std::fs::write(dir.join("snapshot.json"), "{}")?;
        }
        // A new daemon on the same home: the template and the paused-to-disk sandbox remain.
        let restarted = Daemon::start_with(daemon.home, &net_args);
        let client = restarted.client();
        let after = check(
            stale.iter().all(|d| !d.exists()),
            "a restart leaves saves no sandbox uses",
        )
        .and_then(|()| on_rt(after_restart(client.clone(), suspended)));
        let cleanup = on_rt(async move {
            destroy_all(&client).await?;
            client
                .remove_template("tpl")
                .await
                .map_err(|e| format!("template rm: {e}"))?;
            Ok::<_, String>(())
        });
        let mut restarted = restarted;
        sigterm(&mut restarted);
        after.and(cleanup.map_err(Failed::from))
    });
    reap_orphans();
    let mut leaks = common::leaks(&home);
    for dir in ["snapshots", "templates/cas"] {
        for e in std::fs::read_dir(home.join(dir))
            .into_iter()
            .flatten()
            .flatten()
        {
            leaks.push(format!("{}", e.path().display()));
        }
    }
    check(leaks.is_empty(), format!("left behind: {leaks:?}"))?;
    result
}

/// Template → 4 clones → a fork → a pause to disk; returns the suspended sandbox's id.
async fn clone_scenario(client: Client, home: PathBuf) -> Result<String> {
    let spec = hutch_types::TemplateSpec {
        name: "tpl".into(),
        image: "default".into(),
        cpus: 1,
        memory_mib: 256,
        disk_mib: 256,
        provision: Some("echo provisioned > /root/p".into()),
        network: NetworkPolicy::None,
    };
    let t = client
        .create_template(&spec)
        .await
        .map_err(|e| format!("template create: {e}"))?;
    check(t.spec.name == "tpl", "template name")?;
    check(
        api_code(client.create_template(&spec).await) == Some(ErrorCode::Conflict),
        "a second template of the same name is refused",
    )?;
    let from_template = CreateSandbox {
        spec: SandboxSpec {
            template: Some("tpl".into()),
            ..Default::default()
        },
        idempotency_key: None,
    };
    // A pool of 2: clones wait, restored, with run dirs no sandbox owns yet; a create hands
    // one of them out. (A run dir appears when a restore starts: wait for `pool_ready`.)
    client
        .set_pool("tpl", 2)
        .await
        .map_err(|e| format!("pool: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let pooled = loop {
        let ready = client.templates().await.map_err(|e| e.to_string())?[0].pool_ready;
        let pooled = unowned_run_dirs(&client, &home).await?;
        if ready == 2 && pooled.len() == 2 {
            break pooled;
        }
        check(Instant::now() < deadline, format!("pool holds {pooled:?}"))?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Handed out with `open`: its network, which reached nothing while pooled, follows.
    let mut open_clone = from_template.clone();
    open_clone.spec.network = NetworkPolicy::Open;
    let handed = client
        .create(&open_clone)
        .await
        .map_err(|e| format!("create from a pool: {e}"))?;
    check(
        pooled.contains(&handed.id),
        format!("{} is not one of the pooled {pooled:?}", handed.id),
    )?;
    check(
        sh(&client, &handed.id, "cat /root/p").await? == "provisioned",
        "pooled clone",
    )?;
    check(
        sh(&client, &handed.id, "hostname").await? == handed.id,
        "pooled hostname",
    )?;
    let inet = format!("http://{}:8080/", hutch_net::testbed::INET);
    check(
        curl(&client, &handed.id, &inet).await? == ("inet".into(), 0),
        "a handed-out open clone cannot reach the internet",
    )?;
    client
        .destroy(&handed.id)
        .await
        .map_err(|e| format!("rm: {e}"))?;
    let creates = (0..4).map(|_| client.create(&from_template));
    let clones: Vec<SandboxInfo> = futures::future::join_all(creates)
        .await
        .into_iter()
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| format!("clone: {e}"))?;
    let ids: Vec<String> = clones.iter().map(|c| c.id.clone()).collect();
    for c in &clones {
        let origin = c.spec.origin.as_ref().ok_or("a clone without an origin")?;
        check(
            origin.template.as_deref() == Some("tpl"),
            "origin names the template",
        )?;
        check(c.spec.memory_mib == 256, "a clone has the template's shape")?;
    }
    let mut seen = Vec::new();
    for id in &ids {
        check(
            sh(&client, id, "cat /root/p").await? == "provisioned",
            "template file",
        )?;
        check(
            sh(&client, id, "hostname").await? == *id,
            "hostname is the id",
        )?;
        let clock: i64 = sh(&client, id, "date +%s")
            .await?
            .parse()
            .map_err(|_| "date")?;
        let host = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        check(
            (clock - host).abs() <= 2,
            format!("clock {clock} vs host {host}"),
        )?;
        let unique = sh(
            &client,
            id,
            "head -c 32 /dev/urandom | od -An -tx1; cat /etc/machine-id",
        )
        .await?;
        check(
            !seen.contains(&unique),
            "two clones share random bytes or a machine-id",
        )?;
        seen.push(unique);
    }
    // The same guest address in every clone, each behind its own namespace: `none` reaches
    // nothing.
    check(
        curl(&client, &ids[2], &inet).await?.1 == 7,
        "a clone with policy none reached the internet",
    )?;
    sh(&client, &ids[0], "echo mine > /root/a && sync").await?;
    for other in &ids[1..] {
        check(
            sh(&client, other, "test -e /root/a && echo yes || echo no").await? == "no",
            "a clone sees another clone's file",
        )?;
    }
    // A fork of clone 0: the children have its file from before the fork only.
    let children = client
        .fork(&ids[0], 2)
        .await
        .map_err(|e| format!("fork: {e}"))?;
    check(children.len() == 2, "two children")?;
    sh(&client, &ids[0], "echo later > /root/later && sync").await?;
    for child in &children {
        let origin = child
            .spec
            .origin
            .as_ref()
            .ok_or("a child without an origin")?;
        check(
            origin.parent.as_deref() == Some(ids[0].as_str()),
            "lineage names the parent",
        )?;
        check(
            origin.template.as_deref() == Some("tpl"),
            "lineage names the template",
        )?;
        check(
            sh(&client, &child.id, "cat /root/a").await? == "mine",
            "fork lost a file",
        )?;
        check(
            sh(
                &client,
                &child.id,
                "test -e /root/later && echo yes || echo no",
            )
            .await?
                == "no",
            "a child sees its parent's later write",
        )?;
        check(
            sh(&client, &child.id, "hostname").await? == child.id,
            "child hostname",
        )?;
    }
    // Pause clone 1 to disk: its VMM goes, its state stays.
    sh(&client, &ids[1], "echo kept > /root/kept && sync").await?;
    let s = client
        .lifecycle(&ids[1], "suspend")
        .await
        .map_err(|e| format!("suspend: {e}"))?;
    check(
        s.state == SandboxState::Suspended,
        format!("state {:?}", s.state),
    )?;
    let marker = format!("hutch-{} ", ids[1]);
    check(
        !common::vmm_processes()
            .iter()
            .any(|(_, c)| c.contains(&marker)),
        "a suspended sandbox still has a VMM",
    )?;
    check(
        api_code(client.remove_template("tpl").await) == Some(ErrorCode::Conflict),
        "a template in use was removed",
    )?;
    Ok(ids[1].clone())
}

/// Run dirs of VMs no listed sandbox owns (a pool's clones).
async fn unowned_run_dirs(client: &Client, home: &Path) -> Result<Vec<String>> {
    let listed: Vec<String> = client
        .list(None, &[])
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|s| s.id)
        .collect();
    Ok(std::fs::read_dir(home.join("vms"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|d| !listed.contains(d))
        .collect())
}

async fn after_restart(client: Client, suspended: String) -> Result {
    let templates = client.templates().await.map_err(|e| e.to_string())?;
    check(
        templates.len() == 1,
        format!("{} templates after a restart", templates.len()),
    )?;
    let info = client
        .inspect(&suspended)
        .await
        .map_err(|e| e.to_string())?;
    check(
        info.state == SandboxState::Suspended,
        format!("state {:?}", info.state),
    )?;
    let resumed = client
        .lifecycle(&suspended, "resume")
        .await
        .map_err(|e| format!("resume from disk: {e}"))?;
    check(resumed.state == SandboxState::Running, "resumed")?;
    check(
        sh(&client, &suspended, "cat /root/kept").await? == "kept",
        "lost a file",
    )?;
    // A clone made after the restart still comes from the template.
    let c = client
        .create(&CreateSandbox {
            spec: SandboxSpec {
                template: Some("tpl".into()),
                ..Default::default()
            },
            idempotency_key: None,
        })
        .await
        .map_err(|e| format!("clone after restart: {e}"))?;
    check(
        sh(&client, &c.id, "cat /root/p").await? == "provisioned",
        "template file",
    )?;
    check(
        sh(&client, &c.id, "test -e /root/a && echo yes || echo no").await? == "no",
        "a clone's write reached the template",
    )?;
    Ok(())
}
