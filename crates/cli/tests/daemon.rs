//! `hutch daemon` with real VMs under QEMU, driven through the typed client the CLI uses.
//!
//! One daemon (a child process with a private `HUTCH_HOME`, on its Unix socket and on a
//! loopback TCP port) serves most cases; the reconciliation case kills and restarts its own.
//! After everything, no VMM process or run dir of either home may remain.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
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
use common::check;

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
        let child = hutch(home.path())
            .args(["daemon", "--listen-tcp", &tcp, "--max-sandboxes", "16"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start hutch daemon");
        let socket = home.path().join("hutch.sock");
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "daemon did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
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

fn hutch(home: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hutch"));
    cmd.env("HUTCH_HOME", home)
        .env_remove("HUTCH_HOST")
        .env_remove("HUTCH_TOKEN");
    cmd
}

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
    if std::env::var_os("HUTCH_SKIP_VM_TESTS").is_some() {
        eprintln!("SKIP daemon suite: HUTCH_SKIP_VM_TESTS is set");
        return;
    }
    if hutch_image::open(&common::hutch_home().join("images"), "default").is_err() {
        eprintln!("daemon suite needs the default image; run scripts/test.sh, or set HUTCH_SKIP_VM_TESTS=1 to skip");
        std::process::exit(1);
    }
    // VMs of a killed daemon are re-parented to us, so we can reap them.
    // SAFETY: prctl with constant arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
    let daemon = Daemon::start(common::private_home());
    let home = daemon.home.path().to_path_buf();
    let client = daemon.client();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
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
    let leaks = common::leaks(&suite.home);
    if left.is_err() || !leaks.is_empty() {
        eprintln!("LEAK after the daemon suite: {left:?} {leaks:#?}");
        std::process::exit(1);
    }
    eprintln!("daemon suite: nothing left behind");
    conclusion.exit();
}

fn trials() -> Vec<libtest_mimic::Trial> {
    trials![
        three_concurrent_creates_then_exec,
        files_and_trees_round_trip,
        pty_shell_echoes,
        pause_then_resume_keeps_processes_alive,
        ttl_expires,
        tokens_are_scoped,
        bad_input_gets_stable_4xx_codes,
        clients_that_hang_up_leave_nothing_half_done,
        kill9_during_concurrent_creates_then_restart_reconciles,
        network_policy_is_enforced_and_changeable,
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
    let mut daemon = Daemon::start(common::private_home());
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
    let mut restarted = Daemon::start(daemon.home);
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
    let result = on_rt(async move {
        let mut req = spec(&[]);
        req.spec.network = NetworkPolicy::Open;
        let id = client.create(&req).await.map_err(|e| e.to_string())?.id;
        let inet = format!("http://{INET}:8080/");
        check(
            curl(&client, &id, &inet).await? == ("inet".into(), 0),
            "open: internet unreachable",
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
        destroy_all(&client).await.map_err(Failed::from)
    });
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGTERM) };
    let _ = daemon.child.wait();
    let namespaces =
        String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output()?.stdout)
            .into_owned();
    let leaks = common::leaks(&home);
    result?;
    check(leaks.is_empty(), format!("left behind: {leaks:?}"))?;
    check(
        !namespaces.contains("hutch-sb-"),
        format!("sandbox namespaces left: {namespaces}"),
    )
}
