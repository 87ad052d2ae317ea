//! Sandbox lifecycle: concurrent creates, PTY, pause and resume, start after stop, TTLs,
//! clients that hang up, and a killed daemon's restart.

use std::time::{Duration, Instant};

use hutch_api::{client::StreamEvent, ExecBody, ExecControl, ExecEventMsg, ExecStart, TtySize};
use hutch_types::{ErrorCode, SandboxInfo, SandboxState};
use libtest_mimic::Failed;

use crate::*;

pub(crate) fn three_concurrent_creates_then_exec() -> Result {
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

pub(crate) fn pty_shell_echoes() -> Result {
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

pub(crate) fn pause_then_resume_keeps_processes_alive() -> Result {
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

pub(crate) fn a_stopped_sandbox_starts_again() -> Result {
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

pub(crate) fn ttl_expires() -> Result {
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

pub(crate) fn clients_that_hang_up_leave_nothing_half_done() -> Result {
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

pub(crate) fn kill9_during_concurrent_creates_then_restart_reconciles() -> Result {
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
