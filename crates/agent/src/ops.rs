//! The exec operation: run a process, stream its stdin/stdout/stderr, report how it ended.

use std::{
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use hutch_protocol::{ErrorCode, ExecRequest, ExitInfo, GuestMsg, OpError, TtySize, MAX_CHUNK};
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::unix::pipe,
    sync::{mpsc, Semaphore},
    task::JoinHandle,
};

use crate::{
    fdstream::FdStream,
    server::{invalid, Conn, Input, OpIo},
};

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
    let pty = req.tty.map(open_pty).transpose()?;
    let mut cmd = command(&req, pty.as_ref().map(|p| &p.slave))?;
    let (mut child, mut exited) = conn
        .reaper
        .spawn(&mut cmd)
        .map_err(|e| spawn_error(&req.argv[0], e))?;
    // The command holds copies of the terminal's slave side; only the child may keep one.
    drop(cmd);
    let pid = child.id() as i32;
    conn.set_pgid(op, pid);
    conn.send(op, GuestMsg::Started(pid as u32));
    let pumps = match pty {
        Some(pty) => wire_pty(conn, op, pty, io)?,
        None => wire_pipes(conn, op, &mut child, io)?,
    };

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

/// Streams the child's stdout and stderr pipes to the host and feeds its stdin pipe.
fn wire_pipes(
    conn: &Arc<Conn>,
    op: u32,
    child: &mut Child,
    io: OpIo,
) -> Result<Vec<JoinHandle<()>>, OpError> {
    let stdout = receiver(child.stdout.take().map(OwnedFd::from))?;
    let stderr = receiver(child.stderr.take().map(OwnedFd::from))?;
    let stdin = match child.stdin.take() {
        Some(s) => Some(pipe::Sender::from_owned_fd(OwnedFd::from(s)).map_err(io_error)?),
        None => None,
    };
    tokio::spawn(feed(conn.clone(), op, stdin, io.input));
    Ok(vec![
        tokio::spawn(pump(
            conn.clone(),
            op,
            stdout,
            io.credit.clone(),
            GuestMsg::Stdout,
        )),
        tokio::spawn(pump(conn.clone(), op, stderr, io.credit, GuestMsg::Stderr)),
    ])
}

/// Streams the terminal's master side to the host (as stdout) and feeds it stdin.
fn wire_pty(conn: &Arc<Conn>, op: u32, pty: Pty, io: OpIo) -> Result<Vec<JoinHandle<()>>, OpError> {
    drop(pty.slave);
    let master = Arc::new(pty.master);
    conn.set_tty(op, master.clone());
    let stream = FdStream::new(dup(&master)?).map_err(io_error)?;
    let (read, write) = tokio::io::split(stream);
    tokio::spawn(feed(conn.clone(), op, Some(write), io.input));
    Ok(vec![tokio::spawn(pump(
        conn.clone(),
        op,
        Some(read),
        io.credit,
        GuestMsg::Stdout,
    ))])
}

/// Builds the command: clean environment, own session (so signals reach the whole group).
fn command(req: &ExecRequest, pty: Option<&OwnedFd>) -> Result<Command, OpError> {
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
        .current_dir(cwd);
    match pty {
        Some(slave) => {
            let dup = |fd: &OwnedFd| fd.try_clone().map(Stdio::from).map_err(io_error);
            cmd.stdin(dup(slave)?)
                .stdout(dup(slave)?)
                .stderr(dup(slave)?);
            cmd.env("TERM", "xterm-256color");
        }
        None => {
            let stdin = if req.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            };
            cmd.stdin(stdin)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
        }
    }
    if let Some(uid) = req.uid {
        cmd.uid(uid).gid(req.gid.unwrap_or(uid));
    } else if let Some(gid) = req.gid {
        cmd.gid(gid);
    }
    let with_tty = pty.is_some();
    // SAFETY: setsid and ioctl are async-signal-safe and touch no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            if with_tty && libc::ioctl(0, libc::TIOCSCTTY as libc::Ioctl, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
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
    mut stdin: Option<impl AsyncWrite + Unpin>,
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
        _ => {
            return OpError {
                code: ErrorCode::Io,
                message: format!("cannot start {program}: {e}"),
            }
        }
    };
    OpError {
        code,
        message: format!("{what}: {program}"),
    }
}

/// Both ends of a new pseudo-terminal.
struct Pty {
    master: OwnedFd,
    slave: OwnedFd,
}

/// Opens a pseudo-terminal of `size`.
fn open_pty(size: TtySize) -> Result<Pty, OpError> {
    let ws = nix::pty::Winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&ws), None).map_err(|e| io_error(e.into()))?;
    Ok(Pty {
        master: pty.master,
        slave: pty.slave,
    })
}

/// Sets the size of the terminal whose master side is `master`.
pub fn resize(master: &OwnedFd, size: TtySize) {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize we own from a valid descriptor.
    unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ as libc::Ioctl, &ws) };
}

fn dup(fd: &OwnedFd) -> Result<OwnedFd, OpError> {
    fd.try_clone().map_err(io_error)
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
