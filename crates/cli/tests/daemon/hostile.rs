//! Hostile guests and clients: a stopped guest, an abandoned WebSocket, idle
//! unauthenticated connections, a second daemon on the same home.

use std::{
    process::Child,
    time::{Duration, Instant},
};

use hutch_api::{client::ClientError, ExecBody, ExecStart};
use hutch_types::SandboxState;
use libtest_mimic::Failed;

use crate::*;

/// The pid of the QEMU process running sandbox `id` of the suite's daemon (its pidfile).
pub(crate) fn vmm_pid(id: &str) -> Result<i32> {
    let pidfile = suite().home.join("vms").join(id).join("qemu.pid");
    let text =
        std::fs::read_to_string(&pidfile).map_err(|e| format!("{}: {e}", pidfile.display()))?;
    Ok(text.trim().parse()?)
}

/// Waits for `child` at most `limit`; kills it and fails if it is still running then.
pub(crate) fn wait_bounded(
    mut child: Child,
    limit: Duration,
    what: &str,
) -> Result<std::process::Output> {
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

pub(crate) fn a_stopped_guest_ends_its_execs_with_an_error() -> Result {
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

pub(crate) fn a_websocket_client_that_stops_reading_then_closes_leaves_no_process() -> Result {
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
pub(crate) fn http_status(stream: &mut std::net::TcpStream, token: &str) -> Result<u16> {
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
pub(crate) fn closed_by_server(stream: &mut std::net::TcpStream, limit: Duration) -> bool {
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
pub(crate) fn with_tcp_limits(
    header_timeout: &str,
    case: impl FnOnce(&Daemon, &str) -> Result,
) -> Result {
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
pub(crate) fn idle_connections(addr: &str, n: usize) -> Result<Vec<std::net::TcpStream>> {
    (0..n)
        .map(|_| Ok(std::net::TcpStream::connect(addr)?))
        .collect()
}

pub(crate) fn idle_unauthenticated_tcp_clients_cannot_starve_the_daemon() -> Result {
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

pub(crate) fn a_second_daemon_on_the_same_home_refuses_and_touches_nothing() -> Result {
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
