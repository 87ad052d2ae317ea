//! The exec operation: run a process, stream its stdin/stdout/stderr, report how it ended.

use std::{
    os::{fd::OwnedFd, unix::process::CommandExt},
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use hutch_protocol::{ErrorCode, ExecRequest, ExitInfo, GuestMsg, OpError, MAX_CHUNK};
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::unix::pipe,
    sync::{mpsc, Semaphore},
};

use crate::server::{invalid, Conn, Input, OpIo};

/// How long output may keep arriving after the process exited (from background children
/// still holding its pipes) before the agent stops reading and reports the exit.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);

/// Default `PATH` for processes the agent starts.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs one exec operation to completion and sends its final reply.
pub async fn exec(conn: Arc<Conn>, op: u32, req: ExecRequest, io: OpIo) {
    let result = run(&conn, op, req, io).await.map(GuestMsg::Exited);
    conn.finish(op, result);
}

async fn run(conn: &Arc<Conn>, op: u32, req: ExecRequest, io: OpIo) -> Result<ExitInfo, OpError> {
    let mut cmd = command(&req)?;
    let (mut child, mut exited) = conn
        .reaper
        .spawn(&mut cmd)
        .map_err(|e| spawn_error(&req.argv[0], e))?;
    let pid = child.id() as i32;
    conn.set_pgid(op, pid);
    conn.send(op, GuestMsg::Started(pid as u32));

    let stdout = receiver(child.stdout.take().map(OwnedFd::from))?;
    let stderr = receiver(child.stderr.take().map(OwnedFd::from))?;
    let pumps = [
        tokio::spawn(pump(
            conn.clone(),
            op,
            stdout,
            io.credit.clone(),
            GuestMsg::Stdout,
        )),
        tokio::spawn(pump(
            conn.clone(),
            op,
            stderr,
            io.credit.clone(),
            GuestMsg::Stderr,
        )),
    ];
    let stdin = match child.stdin.take() {
        Some(s) => Some(pipe::Sender::from_owned_fd(OwnedFd::from(s)).map_err(io_error)?),
        None => None,
    };
    tokio::spawn(feed(conn.clone(), op, stdin, io.input));

    let mut timed_out = false;
    let status = match req.timeout_ms {
        Some(ms) => tokio::select! {
            s = &mut exited => s,
            _ = tokio::time::sleep(Duration::from_millis(ms)) => {
                timed_out = true;
                let _ = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
                (&mut exited).await
            }
        },
        None => (&mut exited).await,
    }
    .map_err(|_| io_error(std::io::Error::other("reaper dropped the child")))?;

    for p in pumps {
        let abort = p.abort_handle();
        if tokio::time::timeout(DRAIN_AFTER_EXIT, p).await.is_err() {
            abort.abort();
        }
    }
    Ok(ExitInfo { status, timed_out })
}

/// Builds the command: clean environment, own session (so signals reach the whole group).
fn command(req: &ExecRequest) -> Result<Command, OpError> {
    let Some(program) = req.argv.first() else {
        return Err(invalid("exec needs a program"));
    };
    let cwd = req.cwd.as_deref().unwrap_or("/");
    if !std::path::Path::new(cwd).is_dir() {
        return Err(OpError {
            code: ErrorCode::NotFound,
            message: format!("working directory not found: {cwd}"),
        });
    }
    let mut cmd = Command::new(program);
    cmd.args(&req.argv[1..])
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env(
            "HOME",
            if req.uid.unwrap_or(0) == 0 {
                "/root"
            } else {
                "/"
            },
        )
        .env("LANG", "C.UTF-8")
        .envs(req.env.iter().map(|(k, v)| (k, v)))
        .current_dir(cwd)
        .stdin(if req.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(uid) = req.uid {
        cmd.uid(uid).gid(req.gid.unwrap_or(uid));
    } else if let Some(gid) = req.gid {
        cmd.gid(gid);
    }
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    Ok(cmd)
}

fn receiver(fd: Option<OwnedFd>) -> Result<Option<pipe::Receiver>, OpError> {
    fd.map(pipe::Receiver::from_owned_fd)
        .transpose()
        .map_err(io_error)
}

/// Copies one output pipe to the host, within the operation's credit.
async fn pump(
    conn: Arc<Conn>,
    op: u32,
    pipe: Option<impl AsyncRead + Unpin>,
    credit: Arc<Semaphore>,
    wrap: fn(Vec<u8>) -> GuestMsg,
) {
    let Some(mut pipe) = pipe else { return };
    let mut buf = vec![0u8; MAX_CHUNK];
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if !conn.send_data(op, &credit, wrap(buf[..n].to_vec())).await {
            return;
        }
    }
}

/// Feeds host data to stdin and returns credit for each chunk once it is written (or dropped
/// because the process closed its stdin).
async fn feed(
    conn: Arc<Conn>,
    op: u32,
    mut stdin: Option<pipe::Sender>,
    mut input: mpsc::UnboundedReceiver<Input>,
) {
    while let Some(item) = input.recv().await {
        match item {
            Input::Data(d) => {
                if let Some(p) = stdin.as_mut() {
                    if p.write_all(&d).await.is_err() {
                        stdin = None;
                    }
                }
                conn.send(op, GuestMsg::Credit(d.len() as u32));
            }
            Input::Eof => stdin = None,
        }
    }
}

fn spawn_error(program: &str, e: std::io::Error) -> OpError {
    let (code, what) = match e.kind() {
        std::io::ErrorKind::NotFound => (ErrorCode::NotFound, "command not found"),
        std::io::ErrorKind::PermissionDenied => (ErrorCode::PermissionDenied, "permission denied"),
        _ => (ErrorCode::Io, "cannot start"),
    };
    OpError {
        code,
        message: format!("{what}: {program}"),
    }
}

/// Maps a local I/O failure to an operation error.
pub fn io_error(e: std::io::Error) -> OpError {
    let code = match e.kind() {
        std::io::ErrorKind::NotFound => ErrorCode::NotFound,
        std::io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
        _ => ErrorCode::Io,
    };
    OpError {
        code,
        message: e.to_string(),
    }
}
