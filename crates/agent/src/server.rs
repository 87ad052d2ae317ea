//! One connection's life: handshake, then dispatch of host messages to operations.

use std::{
    collections::HashMap,
    os::fd::OwnedFd,
    sync::{
        atomic::{AtomicU16, AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use hutch_protocol::{
    encode,
    handshake::{choose_version, HandshakeError},
    ErrorCode, FrameReader, GuestMsg, HostMsg, OpError, TokenRequest, Welcome, CONNECTION_OP,
    GUEST_OP_BIT, MAGIC, PROTOCOL_VERSION, SSH_WINDOW, STREAM_WINDOW,
};
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    sync::{mpsc, oneshot, Semaphore},
};

use crate::{fdstream::FdStream, files, net, ops, reaper::Reaper, setup};

/// Why serving a connection stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The channel device or socket could not be opened.
    #[error("cannot open channel {path}")]
    Open {
        /// What we tried to open.
        path: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The reaper could not install its signal handler.
    #[error("cannot start the child reaper")]
    Reaper(#[source] std::io::Error),
}

/// Input the host streams to a running operation.
pub enum Input {
    /// Bytes for stdin or the file being written.
    Data(Vec<u8>),
    /// End of that stream.
    Eof,
}

/// Something for the writer task to do.
enum Out {
    Frame(Vec<u8>),
    Flush(oneshot::Sender<()>),
}

/// Host-side routing state of one operation.
struct OpEntry {
    input: mpsc::UnboundedSender<Input>,
    credit: Arc<Semaphore>,
    pgid: Option<i32>,
    /// Master side of the exec's terminal, when it runs under one.
    tty: Option<Arc<OwnedFd>>,
}

/// Shared state of one connection.
pub struct Conn {
    out: mpsc::UnboundedSender<Out>,
    ops: Mutex<HashMap<u32, OpEntry>>,
    /// Reaps every child of the agent.
    pub reaper: Arc<Reaper>,
    /// Whether the agent is the VM's init (and may touch clock, RNG, hostname, power).
    pub is_init: bool,
    /// The protocol version agreed with this host.
    version: AtomicU16,
    /// Requests this side started, waiting for the host's answer.
    requests: Mutex<HashMap<u32, oneshot::Sender<Result<String, OpError>>>>,
    next_request: AtomicU32,
}

/// How long a guest-started request waits for the host's answer.
const REQUEST_DEADLINE: Duration = Duration::from_secs(30);

/// What an operation task receives when it starts.
pub struct OpIo {
    /// Data the host streams to the operation.
    pub input: mpsc::UnboundedReceiver<Input>,
    /// Credit for data the operation sends to the host.
    pub credit: Arc<Semaphore>,
}

impl Conn {
    /// Queues one message for the host.
    pub fn send(&self, op: u32, msg: GuestMsg) {
        match encode(op, &msg) {
            Ok(frame) => {
                let _ = self.out.send(Out::Frame(frame));
            }
            Err(e) => tracing::error!(error = %e, "cannot encode reply"),
        }
    }

    /// Queues a data message once the host has granted credit; false if the host is gone.
    pub async fn send_data(&self, op: u32, credit: &Semaphore, msg: GuestMsg) -> bool {
        match credit.acquire_many(msg.data_len() as u32).await {
            Ok(p) => p.forget(),
            Err(_) => return false,
        }
        self.send(op, msg);
        true
    }

    /// Sends the final reply of an operation and forgets it.
    pub fn finish(&self, op: u32, result: Result<GuestMsg, OpError>) {
        // An op aborted by a new host's Hello must not answer that host.
        if self.ops.lock().expect("ops lock").remove(&op).is_some() {
            self.send(op, result.unwrap_or_else(GuestMsg::Error));
        }
    }

    /// Records the process group that `Signal` messages for `op` go to.
    pub fn set_pgid(&self, op: u32, pgid: i32) {
        if let Some(e) = self.ops.lock().expect("ops lock").get_mut(&op) {
            e.pgid = Some(pgid);
        }
    }

    /// Records the terminal that `Resize` messages for `op` apply to.
    pub fn set_tty(&self, op: u32, master: Arc<OwnedFd>) {
        if let Some(e) = self.ops.lock().expect("ops lock").get_mut(&op) {
            e.tty = Some(master);
        }
    }

    fn resize(&self, op: u32, size: hutch_protocol::TtySize) {
        let tty = self
            .ops
            .lock()
            .expect("ops lock")
            .get(&op)
            .and_then(|e| e.tty.clone());
        if let Some(master) = tty {
            ops::resize(&master, size);
        }
    }

    /// Asks the host for a workload identity token for `audience` (protocol version 5).
    pub async fn request_token(&self, audience: String) -> Result<String, OpError> {
        let version = self.version.load(Ordering::Relaxed);
        if version < 5 {
            return Err(invalid(format!(
                "the host speaks protocol version {version}, which has no identity tokens"
            )));
        }
        let op = self.next_guest_op();
        let (tx, rx) = oneshot::channel();
        self.requests.lock().expect("requests lock").insert(op, tx);
        self.send(op, GuestMsg::TokenRequest(TokenRequest { audience }));
        let answer = tokio::time::timeout(REQUEST_DEADLINE, rx).await;
        self.requests.lock().expect("requests lock").remove(&op);
        match answer {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(io_error("the host connection ended before it answered")),
            Err(_) => Err(io_error("the host did not answer in time")),
        }
    }

    /// A new guest operation id.
    fn next_guest_op(&self) -> u32 {
        GUEST_OP_BIT | (self.next_request.fetch_add(1, Ordering::Relaxed) & !GUEST_OP_BIT)
    }

    /// Opens a forwarded SSH agent connection (protocol version 6): its operation id, and the
    /// host's bytes and credit for it. `None` when the host speaks an older version.
    pub fn open_ssh(&self) -> Option<(u32, OpIo)> {
        if self.version.load(Ordering::Relaxed) < 6 {
            return None;
        }
        let op = self.next_guest_op();
        let io = self.register_window(op, SSH_WINDOW).ok()?;
        self.send(op, GuestMsg::SshOpen);
        Some((op, io))
    }

    /// Grants the host `n` more bytes on SSH connection `op`, unless it was closed: the close
    /// and the check share the ops lock, so no credit ever follows `SshClose`.
    pub fn credit_ssh(&self, op: u32, n: u32) {
        let ops = self.ops.lock().expect("ops lock");
        if ops.contains_key(&op) {
            self.send(op, GuestMsg::Credit(n));
        }
    }

    /// Ends SSH connection `op`: `SshClose` to the host, once.
    pub fn close_ssh(&self, op: u32) {
        let mut ops = self.ops.lock().expect("ops lock");
        if ops.remove(&op).is_some() {
            self.send(op, GuestMsg::SshClose);
        }
    }

    /// Hands the host's answer to the request it belongs to (none: it timed out meanwhile).
    fn answer(&self, op: u32, answer: Result<String, OpError>) {
        if let Some(tx) = self.requests.lock().expect("requests lock").remove(&op) {
            let _ = tx.send(answer);
        }
    }

    /// Waits until everything queued so far has been written.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.out.send(Out::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    fn register(&self, op: u32) -> Result<OpIo, OpError> {
        self.register_window(op, STREAM_WINDOW)
    }

    fn register_window(&self, op: u32, window: u32) -> Result<OpIo, OpError> {
        let mut ops = self.ops.lock().expect("ops lock");
        if ops.contains_key(&op) {
            return Err(invalid(format!("operation {op} is already running")));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let credit = Arc::new(Semaphore::new(window as usize));
        ops.insert(
            op,
            OpEntry {
                input: tx,
                credit: credit.clone(),
                pgid: None,
                tty: None,
            },
        );
        Ok(OpIo { input: rx, credit })
    }

    fn route(&self, op: u32, input: Input) {
        if let Some(e) = self.ops.lock().expect("ops lock").get(&op) {
            let _ = e.input.send(input);
        }
    }

    fn grant(&self, op: u32, n: u32) {
        if let Some(e) = self.ops.lock().expect("ops lock").get(&op) {
            e.credit.add_permits(n as usize);
        }
    }

    fn signal(&self, op: u32, sig: i32) {
        let pgid = self
            .ops
            .lock()
            .expect("ops lock")
            .get(&op)
            .and_then(|e| e.pgid);
        match (pgid, Signal::try_from(sig)) {
            (Some(pgid), Ok(sig)) => {
                let _ = nix::sys::signal::killpg(Pid::from_raw(pgid), sig);
            }
            (_, Err(_)) => tracing::warn!(sig, "ignoring invalid signal number"),
            (None, _) => {}
        }
    }

    /// The connection is gone: kill what it started and unblock its tasks.
    fn abort_all(&self) {
        self.requests.lock().expect("requests lock").clear();
        for (_, e) in self.ops.lock().expect("ops lock").drain() {
            e.credit.close();
            if let Some(pgid) = e.pgid {
                let _ = nix::sys::signal::killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            }
        }
    }

    fn dispatch(self: &Arc<Self>, op: u32, msg: HostMsg) {
        match msg {
            // A new host (e.g. a restarted daemon) whose connection began before we saw the old
            // one end: start over, so its Welcome follows nothing of the old host's.
            HostMsg::Hello(h) if op == CONNECTION_OP => {
                self.abort_all();
                let reply = welcome(&h);
                self.version
                    .store(agreed_version(&reply), Ordering::Relaxed);
                self.send(CONNECTION_OP, reply);
            }
            HostMsg::Hello(_) => self.send(
                op,
                GuestMsg::Error(invalid("Hello belongs on the connection")),
            ),
            HostMsg::Setup(s) => self.send(
                op,
                setup::apply(&s, self.is_init)
                    .map(|()| GuestMsg::Done)
                    .unwrap_or_else(GuestMsg::Error),
            ),
            HostMsg::Identity(id) => self.send(
                op,
                setup::apply_identity(&id, self.is_init)
                    .map(|()| GuestMsg::Done)
                    .unwrap_or_else(GuestMsg::Error),
            ),
            HostMsg::Trust(t) => {
                // Writes and syncs a bundle of a few hundred KiB: off the reader task.
                let c = self.clone();
                tokio::task::spawn_blocking(move || {
                    let r = crate::trust::apply(&t, c.is_init);
                    c.send(
                        op,
                        r.map(|()| GuestMsg::Done).unwrap_or_else(GuestMsg::Error),
                    );
                });
            }
            HostMsg::Exec(req) => self.start(op, |c, io| ops::exec(c, op, req, io)),
            HostMsg::WriteFile(req) => self.start(op, |c, io| files::write(c, op, req, io)),
            HostMsg::ReadFile(req) => self.start(op, |c, io| files::read(c, op, req, io)),
            HostMsg::Stdin(d) | HostMsg::FileData(d) | HostMsg::SshData(d) => {
                self.route(op, Input::Data(d))
            }
            HostMsg::StdinEof | HostMsg::FileEof | HostMsg::SshClose => self.route(op, Input::Eof),
            HostMsg::Signal(sig) => self.signal(op, sig),
            HostMsg::Credit(n) => self.grant(op, n),
            HostMsg::Ping(n) => self.send(op, GuestMsg::Pong(n)),
            HostMsg::Resize(size) => self.resize(op, size),
            HostMsg::Network(cfg) => {
                // May wait for the NIC to appear: off the reader task.
                let c = self.clone();
                tokio::task::spawn_blocking(move || {
                    let r = net::apply(&cfg, c.is_init);
                    c.send(
                        op,
                        r.map(|()| GuestMsg::Done).unwrap_or_else(GuestMsg::Error),
                    );
                });
            }
            HostMsg::Shutdown => {
                let c = self.clone();
                tokio::spawn(async move { setup::shutdown(&c, op).await });
            }
            HostMsg::Token(token) => self.answer(op, Ok(token)),
            HostMsg::Refused(e) => self.answer(op, Err(e)),
        }
    }

    fn start<F, Fut>(self: &Arc<Self>, op: u32, task: F)
    where
        F: FnOnce(Arc<Conn>, OpIo) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        match self.register(op) {
            Ok(io) => {
                tokio::spawn(task(self.clone(), io));
            }
            Err(e) => self.send(op, GuestMsg::Error(e)),
        }
    }
}

/// An `Io` error with this message.
fn io_error(message: &str) -> OpError {
    OpError {
        code: ErrorCode::Io,
        message: message.into(),
    }
}

/// The version a handshake reply agrees on (0: none).
fn agreed_version(reply: &GuestMsg) -> u16 {
    match reply {
        GuestMsg::Welcome(w) => w.version,
        _ => 0,
    }
}

/// An `InvalidRequest` error with this message.
pub fn invalid(message: impl Into<String>) -> OpError {
    OpError {
        code: ErrorCode::InvalidRequest,
        message: message.into(),
    }
}

/// Serves one connection until the host hangs up.
pub async fn serve<S>(stream: S, reaper: Arc<Reaper>, is_init: bool)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read, mut write) = tokio::io::split(stream);
    let mut reader = FrameReader::new(read);
    let reply = match reader.next::<HostMsg>().await {
        Ok(Some(env)) => match env.msg {
            HostMsg::Hello(h) => welcome(&h),
            _ => {
                GuestMsg::Error(HandshakeError::Unexpected("a request before Hello").to_op_error())
            }
        },
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(error = %e, "bad handshake frame");
            return;
        }
    };
    let accepted = matches!(reply, GuestMsg::Welcome(_));
    let frame = encode(CONNECTION_OP, &reply).expect("welcome encodes");
    if write.write_all(&frame).await.is_err() || !accepted {
        return;
    }
    tracing::info!(version = PROTOCOL_VERSION, "host connected");
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_frames(write, rx));
    let conn = Arc::new(Conn {
        out: tx,
        ops: Mutex::new(HashMap::new()),
        reaper,
        is_init,
        version: AtomicU16::new(agreed_version(&reply)),
        requests: Mutex::new(HashMap::new()),
        next_request: AtomicU32::new(1),
    });
    crate::identity::attach(&conn);
    loop {
        match reader.next::<HostMsg>().await {
            Ok(Some(env)) => conn.dispatch(env.op, env.msg),
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "bad frame from host; dropping connection");
                break;
            }
        }
    }
    conn.abort_all();
    writer.abort();
    tracing::info!("host disconnected");
}

/// The answer to `hello`: a Welcome with the chosen version, or why not.
fn welcome(hello: &hutch_protocol::Hello) -> GuestMsg {
    match choose_version(hello) {
        Ok(version) => GuestMsg::Welcome(Welcome {
            magic: MAGIC,
            version,
            agent: format!("hutch-agent {}", env!("CARGO_PKG_VERSION")),
            kernel_release: kernel_release(),
        }),
        Err(e) => GuestMsg::Error(e.to_op_error()),
    }
}

async fn write_frames<W: AsyncWrite + Unpin>(mut w: W, mut rx: mpsc::UnboundedReceiver<Out>) {
    while let Some(out) = rx.recv().await {
        match out {
            Out::Frame(f) => {
                if w.write_all(&f).await.is_err() {
                    return;
                }
            }
            Out::Flush(done) => {
                let _ = w.flush().await;
                let _ = done.send(());
            }
        }
    }
}

fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// PID 1 mode: serves the virtio-serial port at `path`, one host connection after another,
/// until it cannot be opened or served any more.
///
/// The port stays open between connections (each is served on a duplicate descriptor): the
/// guest kernel discards a port's unread data when it is closed, so closing and reopening it
/// after a host hangs up could lose the next host's Hello, sent in between (a restarted daemon
/// adopting the VM, or a restored clone's first host).
pub async fn serve_port(path: &str) -> Result<(), ServeError> {
    let reaper = crate::reaper::global().map_err(ServeError::Reaper)?;
    let open = |e| ServeError::Open {
        path: path.to_string(),
        source: e,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(open)?;
    loop {
        let session = file.try_clone().map_err(open)?;
        let stream = FdStream::new(OwnedFd::from(session)).map_err(open)?;
        serve(stream, reaper.clone(), true).await;
        // A port with no host attached reads as end-of-file; don't spin while waiting.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Test mode: serves every connection accepted on an inherited listening socket, as PID 1
/// serves vsock, until killed.
pub async fn serve_host_listener(fd: OwnedFd) {
    let reaper = crate::reaper::global().expect("reaper");
    crate::vsock::serve_listener(fd, reaper, false).await;
}

/// Test mode: serves connections on an inherited socket until the host hangs up.
pub async fn serve_host_process(fd: OwnedFd) {
    let reaper = crate::reaper::global().expect("reaper");
    match FdStream::new(fd) {
        Ok(stream) => serve(stream, reaper, false).await,
        Err(e) => tracing::error!(error = %e, "cannot serve the inherited descriptor"),
    }
}
