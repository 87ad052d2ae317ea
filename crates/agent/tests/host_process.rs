//! The real agent binary, run as a host process serving one end of a socket pair, driven by
//! the real host channel. Exercises protocol, exec, signals, timeouts and files without a VM.

// Tests wait on processes and threads synchronously, on threads of their own.
#![allow(clippy::disallowed_methods)]

use std::{
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::Path,
    process::{Child, Command},
};

use hutch_protocol::{
    host::{Channel, ChannelError, Exec, ExecEvent, TokenFuture, TokenIssuer},
    ErrorCode, ExecRequest, ExitStatus, ReadFileRequest, WriteFileRequest,
};

struct Agent {
    child: Child,
    channel: std::sync::Arc<Channel>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the agent binary serving one end of a socket pair; returns it and the other end.
fn spawn_agent() -> (Child, tokio::net::UnixStream) {
    spawn_agent_with_identity(None)
}

/// [`spawn_agent`], serving token requests on the socket `identity` when given.
fn spawn_agent_with_identity(identity: Option<&Path>) -> (Child, tokio::net::UnixStream) {
    let (host, guest) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd = guest.as_raw_fd();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hutch-agent"));
    cmd.args(["--serve-fd", "3"]);
    if let Some(path) = identity {
        cmd.env("HUTCH_IDENTITY_SOCKET", path);
    }
    // SAFETY: dup2 is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    drop(guest);
    host.set_nonblocking(true).unwrap();
    (child, tokio::net::UnixStream::from_std(host).unwrap())
}

async fn agent() -> Agent {
    let (child, stream) = spawn_agent();
    let channel = std::sync::Arc::new(Channel::connect(stream).await.unwrap());
    Agent { child, channel }
}

/// Collects stdout, stderr and the exit status.
async fn collect(mut exec: Exec) -> (Vec<u8>, Vec<u8>, hutch_protocol::ExitInfo) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    loop {
        match exec.next_event().await.unwrap() {
            ExecEvent::Stdout(d) => out.extend(d),
            ExecEvent::Stderr(d) => err.extend(d),
            ExecEvent::Exited(info) => return (out, err, info),
        }
    }
}

#[tokio::test]
async fn handshake_and_ping() {
    let a = agent().await;
    assert!(a.channel.welcome().agent.starts_with("hutch-agent"));
    assert!(!a.channel.welcome().kernel_release.is_empty());
    a.channel.ping(99).await.unwrap();
}

#[tokio::test]
async fn exit_codes_signals_and_separate_streams() {
    let a = agent().await;
    let (out, err, info) = collect(
        a.channel
            .exec(ExecRequest::shell("echo out; echo err >&2; exit 7"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (out.as_slice(), err.as_slice()),
        (&b"out\n"[..], &b"err\n"[..])
    );
    assert_eq!(info.status, ExitStatus::Code(7));
    let (_, _, info) = collect(
        a.channel
            .exec(ExecRequest::shell("kill -SEGV $$"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(info.status, ExitStatus::Signal(11));
    assert_eq!(info.status.shell_code(), 139);
    // A crashing child does not take the agent down.
    a.channel.ping(1).await.unwrap();
}

#[tokio::test]
async fn stdin_round_trip_of_a_megabyte() {
    let a = agent().await;
    let mut req = ExecRequest::shell("cat");
    req.stdin = true;
    let exec = a.channel.exec(req).await.unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let ctl = exec.control();
    let input = data.clone();
    let feeder = tokio::spawn(async move {
        ctl.write_stdin(&input).await.unwrap();
        ctl.close_stdin().await.unwrap();
    });
    let (out, _, info) = collect(exec).await;
    feeder.await.unwrap();
    assert_eq!(info.status, ExitStatus::Code(0));
    assert_eq!(out.len(), data.len());
    assert!(out == data, "stdin came back altered");
}

#[tokio::test]
async fn concurrent_execs_do_not_mix() {
    let a = agent().await;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..4 {
        let ch = a.channel.clone();
        set.spawn(async move {
            let script = format!("for n in $(seq 1 2000); do echo task{i}-$n; done");
            (
                i,
                collect(ch.exec(ExecRequest::shell(&script)).await.unwrap()).await,
            )
        });
    }
    while let Some(res) = set.join_next().await {
        let (i, (out, _, info)) = res.unwrap();
        assert_eq!(info.status, ExitStatus::Code(0));
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2000);
        assert!(lines.iter().all(|l| l.starts_with(&format!("task{i}-"))));
    }
}

#[tokio::test]
async fn timeout_kills_the_process_group() {
    let a = agent().await;
    let mut req = ExecRequest::shell("sleep 30 & sleep 30");
    req.timeout_ms = Some(300);
    let started = std::time::Instant::now();
    let (_, _, info) = collect(a.channel.exec(req).await.unwrap()).await;
    assert!(info.timed_out);
    assert_eq!(info.status, ExitStatus::Signal(9));
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

#[tokio::test]
async fn host_signal_reaches_the_process() {
    let a = agent().await;
    let exec = a
        .channel
        .exec(ExecRequest::shell("sleep 30"))
        .await
        .unwrap();
    exec.control().signal(15).await.unwrap();
    let (_, _, info) = collect(exec).await;
    assert_eq!(info.status, ExitStatus::Signal(15));
    assert!(!info.timed_out);
}

#[tokio::test]
async fn missing_command_and_cwd_are_clear_errors() {
    let a = agent().await;
    let mut req = ExecRequest::shell("true");
    req.argv = vec!["definitely-not-a-command".into()];
    match a.channel.exec(req).await {
        Err(ChannelError::Remote(e)) => {
            assert_eq!(e.code, ErrorCode::NotFound);
            assert!(e
                .message
                .contains("command not found: definitely-not-a-command"));
        }
        other => panic!("expected NotFound, got {:?}", other.map(|e| e.pid())),
    }
    let mut req = ExecRequest::shell("true");
    req.cwd = Some("/no/such/dir".into());
    assert!(
        matches!(a.channel.exec(req).await, Err(ChannelError::Remote(e)) if e.code == ErrorCode::NotFound)
    );
    a.channel.ping(2).await.unwrap();
}

#[tokio::test]
async fn files_round_trip_and_reads_are_bounded() {
    let a = agent().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/dir/file.bin");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 13) as u8).collect();
    let req = WriteFileRequest {
        path: path.to_string_lossy().into(),
        mode: 0o640,
        make_parents: true,
    };
    let n = a.channel.write_file(req, &data[..]).await.unwrap();
    assert_eq!(n, data.len() as u64);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o640
    );

    let mut back = Vec::new();
    let read = ReadFileRequest {
        path: path.to_string_lossy().into(),
        max_bytes: 1 << 20,
    };
    a.channel.read_file(read.clone(), &mut back).await.unwrap();
    assert!(back == data);

    let small = ReadFileRequest {
        max_bytes: 1000,
        ..read
    };
    match a.channel.read_file(small, tokio::io::sink()).await {
        Err(ChannelError::Remote(e)) => assert_eq!(e.code, ErrorCode::TooLarge),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let rel = WriteFileRequest {
        path: "relative".into(),
        mode: 0o600,
        make_parents: false,
    };
    assert!(
        matches!(a.channel.write_file(rel, &b"x"[..]).await, Err(ChannelError::Remote(e)) if e.code == ErrorCode::InvalidRequest)
    );
}

#[tokio::test]
async fn a_pty_exec_sees_a_terminal_of_the_requested_size() {
    let a = agent().await;
    let mut req = ExecRequest::shell("tty; stty size; read line; echo got:$line");
    req.tty = Some(hutch_protocol::TtySize {
        rows: 33,
        cols: 101,
    });
    req.stdin = true;
    let exec = a.channel.exec(req).await.unwrap();
    let ctl = exec.control();
    ctl.write_stdin(b"typed\n").await.unwrap();
    let (out, err, info) = collect(exec).await;
    let text = String::from_utf8_lossy(&out);
    assert_eq!(info.status, ExitStatus::Code(0), "{text}");
    assert!(err.is_empty(), "a terminal merges stderr into stdout");
    assert!(text.contains("/dev/pts/"), "{text}");
    assert!(text.contains("33 101"), "{text}");
    assert!(text.contains("got:typed"), "{text}");
}

#[tokio::test]
async fn network_requests_are_validated_and_not_applied_on_the_host() {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let a = agent().await;
    let good = hutch_protocol::NetworkConfig {
        mac: [0x06, 0x00, 0xac, 0x10, 0x00, 0x02],
        address: IpAddr::V4(Ipv4Addr::new(172, 16, 0, 2)),
        prefix_len: 30,
        gateway: IpAddr::V4(Ipv4Addr::new(172, 16, 0, 1)),
        dns: vec![IpAddr::V4(Ipv4Addr::new(172, 16, 0, 1))],
    };
    // Host-process mode only validates: the host's network is left alone.
    a.channel.network(good.clone()).await.unwrap();
    let mut bad = good.clone();
    bad.gateway = IpAddr::V6(Ipv6Addr::LOCALHOST);
    match a.channel.network(bad).await {
        Err(ChannelError::Remote(e)) => assert_eq!(e.code, ErrorCode::InvalidRequest),
        other => panic!("expected InvalidRequest, got {other:?}"),
    }
    let mut bad = good;
    bad.dns = vec![IpAddr::V4(Ipv4Addr::new(1, 1, 1, 1)); 1000];
    assert!(matches!(
        a.channel.network(bad).await,
        Err(ChannelError::Remote(e)) if e.code == ErrorCode::InvalidRequest
    ));
    a.channel.ping(3).await.unwrap();
}

/// Raw frames on a socket to a fresh agent process (for sequences `Channel` never sends).
struct RawHost {
    _agent: Child,
    reader: hutch_protocol::FrameReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl RawHost {
    async fn send(&mut self, op: u32, msg: &hutch_protocol::HostMsg) {
        use tokio::io::AsyncWriteExt;
        self.writer
            .write_all(&hutch_protocol::encode(op, msg).unwrap())
            .await
            .unwrap();
    }

    async fn recv(&mut self) -> hutch_protocol::Envelope<hutch_protocol::GuestMsg> {
        let next = tokio::time::timeout(std::time::Duration::from_secs(10), self.reader.next());
        next.await
            .expect("agent answered in time")
            .unwrap()
            .expect("agent still connected")
    }
}

#[tokio::test]
async fn a_second_hello_starts_over_and_kills_the_old_hosts_processes() {
    use hutch_protocol::{GuestMsg, HostMsg};
    let (agent, stream) = spawn_agent();
    let (rd, wr) = stream.into_split();
    let mut h = RawHost {
        _agent: agent,
        reader: hutch_protocol::FrameReader::new(rd),
        writer: wr,
    };

    h.send(0, &hutch_protocol::handshake::hello()).await;
    assert!(matches!(h.recv().await.msg, GuestMsg::Welcome(_)));
    h.send(
        1,
        &HostMsg::Exec(ExecRequest::new(vec!["sleep".into(), "30".into()])),
    )
    .await;
    let GuestMsg::Started(pid) = h.recv().await.msg else {
        panic!("no Started")
    };

    // A new host speaks on the same stream: it gets a Welcome, the old process dies.
    h.send(0, &hutch_protocol::handshake::hello()).await;
    let env = h.recv().await;
    assert_eq!(
        (env.op, matches!(env.msg, GuestMsg::Welcome(_))),
        (0, true),
        "{env:?}"
    );
    let proc_dir = std::path::PathBuf::from(format!("/proc/{pid}"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while proc_dir.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the old host's process survived"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The new host is served, and hears nothing about the old host's operation.
    h.send(2, &HostMsg::Exec(ExecRequest::new(vec!["true".into()])))
        .await;
    loop {
        let env = h.recv().await;
        assert_eq!(
            env.op, 2,
            "a frame of the old host's op reached the new host: {env:?}"
        );
        if let GuestMsg::Exited(info) = env.msg {
            assert_eq!(info.status, ExitStatus::Code(0));
            break;
        }
    }
}

/// The agent serving a listening socket, as PID 1 serves vsock port 1024: every connection is
/// its own host, served at the same time as the others, and one hanging up kills only what it
/// started.
#[tokio::test]
async fn a_listening_socket_serves_independent_connections() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hutch-agent"));
    cmd.args(["--listen-fd", "3"]);
    // SAFETY: dup2 is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(listener);
    let connect = || async {
        let s = tokio::net::UnixStream::connect(&path).await.unwrap();
        Channel::connect(s).await.unwrap()
    };
    let first = connect().await;
    let second = connect().await;
    let sleeper = first
        .exec(ExecRequest::new(vec!["sleep".into(), "30".into()]))
        .await
        .unwrap();
    let pid = sleeper.pid();
    let (out, _, info) = collect(second.exec(ExecRequest::shell("echo two")).await.unwrap()).await;
    assert_eq!(
        (out.as_slice(), info.status),
        (&b"two\n"[..], ExitStatus::Code(0))
    );

    // The first host goes: its process dies, the second host is still served.
    drop(sleeper);
    drop(first);
    let proc_dir = std::path::PathBuf::from(format!("/proc/{pid}"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while proc_dir.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the first host's process survived its connection"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    second.ping(2).await.unwrap();
    // And a new host is accepted after that.
    connect().await.ping(3).await.unwrap();
    let _ = child.kill();
    let _ = child.wait();
}

/// Answers every token request with `token-for:<audience>`.
struct EchoIssuer;

impl TokenIssuer for EchoIssuer {
    fn issue(&self, audience: String) -> TokenFuture {
        Box::pin(async move { Ok(format!("token-for:{audience}")) })
    }
}

#[tokio::test]
async fn a_process_gets_a_token_through_the_identity_socket_and_client() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("identity.sock");
    let (child, stream) = spawn_agent_with_identity(Some(&socket));
    let a = Agent {
        child,
        channel: std::sync::Arc::new(Channel::connect(stream).await.unwrap()),
    };
    // The client is the agent binary under the name `hutch-identity`.
    let client = dir.path().join("hutch-identity");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_hutch-agent"), &client).unwrap();
    let run = |args: &[&str]| {
        let mut argv = vec![client.display().to_string()];
        argv.extend(args.iter().map(|a| a.to_string()));
        let mut req = ExecRequest::new(argv);
        req.env = vec![("HUTCH_IDENTITY_SOCKET".into(), socket.display().to_string())];
        let channel = a.channel.clone();
        async move { collect(channel.exec(req).await.unwrap()).await }
    };
    for _ in 0..100 {
        if socket.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // No issuer yet: the host refuses, and the client says why.
    let (out, err, info) = run(&["token", "--audience", "svc"]).await;
    assert_eq!(
        info.status,
        ExitStatus::Code(1),
        "{}",
        String::from_utf8_lossy(&err)
    );
    assert!(out.is_empty());
    assert!(String::from_utf8_lossy(&err).contains("issues no identity tokens"));

    a.channel.serve_tokens(std::sync::Arc::new(EchoIssuer));
    let (out, err, info) = run(&["token", "--audience", "https://svc.example/x"]).await;
    assert_eq!(
        info.status,
        ExitStatus::Code(0),
        "{}",
        String::from_utf8_lossy(&err)
    );
    assert_eq!(out, b"token-for:https://svc.example/x\n");
    let (out, _, info) = run(&["token", "--audience=urn:a"]).await;
    assert_eq!(
        (info.status, out),
        (ExitStatus::Code(0), b"token-for:urn:a\n".to_vec())
    );

    // The host's audience rule reaches the client as its reason.
    let (_, err, info) = run(&["token", "--audience", "two words"]).await;
    assert_eq!(info.status, ExitStatus::Code(1));
    assert!(
        String::from_utf8_lossy(&err).contains("visible ASCII"),
        "{}",
        String::from_utf8_lossy(&err)
    );
    let (_, _, info) = run(&["token"]).await;
    assert_eq!(info.status, ExitStatus::Code(2), "usage");
}
