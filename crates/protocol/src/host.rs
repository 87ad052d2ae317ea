//! The host end of a channel: multiplexes operations over one stream to a guest agent.
//!
//! A background task reads guest frames, checks each one (size, operation id, credit) and
//! routes it to the operation it belongs to. Any violation ends the whole channel: a guest
//! that breaks the protocol gets no second chance.
//!
//! Nothing waits on the guest without a bound. An exec with a timeout must end within that
//! timeout plus [`EXEC_GRACE`]; every other wait for the guest (a reply, a file chunk, credit)
//! must end within [`REPLY_DEADLINE`]; a frame the guest does not take within
//! [`WRITE_DEADLINE`] closes the channel. [`Channel::abort`] ends every pending operation at
//! once (the sandbox was found failed), and an [`Exec`] dropped before its process exited kills
//! the process, so no client that goes away leaves one running unseen.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::{mpsc, watch, Semaphore},
    time::Instant,
};

use crate::{
    frame::{check_chunk, encode, FrameError, FrameReader},
    handshake::{check_welcome, hello, HandshakeError},
    ErrorCode, ExecRequest, ExitInfo, GuestIdentity, GuestMsg, GuestTrust, HostMsg, NetworkConfig,
    OpError, ReadFileRequest, Setup, Welcome, WriteFileRequest, CONNECTION_OP, GUEST_OP_BIT,
    MAX_CHUNK, MAX_SSH_STREAMS, SSH_WINDOW, STREAM_WINDOW,
};

/// How long an exec may run past its own timeout before the host stops waiting for its end:
/// the guest kills the process at the timeout, so only a stuck guest needs this.
pub const EXEC_GRACE: Duration = Duration::from_secs(10);

/// How long any other wait for the guest may take: a reply, the next file chunk, credit.
pub const REPLY_DEADLINE: Duration = Duration::from_secs(60);

/// How long one frame may take to reach a guest; one that takes longer stopped reading, and
/// the channel is closed.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(30);

/// Linux's SIGKILL, sent to the process group of an abandoned exec.
const SIGKILL: i32 = 9;

/// Token requests a guest may make at once before more are refused with `RateLimited`.
pub const TOKEN_BURST: u32 = 10;

/// How often the guest earns one more token request, up to [`TOKEN_BURST`].
pub const TOKEN_REFILL: Duration = Duration::from_secs(1);

/// Most guest token requests being answered at once; more are refused with `RateLimited`.
pub const MAX_GUEST_REQUESTS: usize = 4;

/// The answer to a guest's token request: the token, or why not.
pub type TokenFuture = Pin<Box<dyn Future<Output = Result<String, OpError>> + Send>>;

/// Issues workload identity tokens for the sandbox behind one channel. The channel's owner
/// binds it to that sandbox ([`Channel::serve_tokens`]); the request names only the audience,
/// so a guest can never ask for another sandbox's token.
pub trait TokenIssuer: Send + Sync {
    /// A token for `audience` (already checked by [`crate::TokenRequest::check`]).
    fn issue(&self, audience: String) -> TokenFuture;
}

/// A future serving one forwarded SSH agent connection.
pub type SshAgentFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Serves the SSH agent connections the guest forwards (version 6) for the sandbox behind one
/// channel. The channel's owner binds it to that sandbox ([`Channel::serve_ssh_agent`]); the
/// guest names nothing, so it can never reach another sandbox's key.
pub trait SshAgentServer: Send + Sync {
    /// Serves one connection: agent requests are read from `stream` and answers written to
    /// it, until either side closes it.
    fn serve(&self, stream: tokio::io::DuplexStream) -> SshAgentFuture;
}

/// The host's end of one forwarded SSH agent connection.
struct SshStream {
    /// Bytes from the guest, to the pump that writes them to the agent.
    to_agent: mpsc::UnboundedSender<Vec<u8>>,
    /// Bytes received from the guest and not yet credited back.
    uncredited: u32,
    /// Bytes sent to the guest and not yet credited back by it.
    sent_unacked: u32,
    /// Credit the guest granted for the agent's answers.
    send_credit: Arc<Semaphore>,
}

/// The host's side of guest-started requests: who answers them and how many are allowed.
struct GuestRequests {
    issuer: Option<Arc<dyn TokenIssuer>>,
    in_flight: HashSet<u32>,
    /// Who answers forwarded SSH agent connections (none: each is closed at once).
    ssh_agent: Option<Arc<dyn SshAgentServer>>,
    /// The open forwarded SSH agent connections, by guest operation.
    ssh: HashMap<u32, SshStream>,
    /// Requests the guest may still make now (a token bucket of [`TOKEN_BURST`]).
    allowance: u32,
    /// When the allowance last grew (or was full).
    refilled: Instant,
}

impl GuestRequests {
    fn new() -> GuestRequests {
        GuestRequests {
            issuer: None,
            in_flight: HashSet::new(),
            ssh_agent: None,
            ssh: HashMap::new(),
            allowance: TOKEN_BURST,
            refilled: Instant::now(),
        }
    }

    /// Takes one request from the allowance, refilled for the time since the last refill.
    fn take_allowance(&mut self, now: Instant) -> bool {
        let earned = now.duration_since(self.refilled).as_nanos() / TOKEN_REFILL.as_nanos();
        if earned > 0 {
            self.allowance = (self.allowance as u128 + earned).min(TOKEN_BURST as u128) as u32;
            self.refilled += TOKEN_REFILL * earned as u32;
            if self.allowance == TOKEN_BURST {
                self.refilled = now;
            }
        }
        if self.allowance == 0 {
            return false;
        }
        self.allowance -= 1;
        true
    }
}

/// Why an operation on the channel failed.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The channel is gone; the reason says why.
    #[error("guest channel closed: {0}")]
    Closed(String),
    /// The handshake failed.
    #[error("handshake with the guest agent failed")]
    Handshake(#[source] HandshakeError),
    /// A frame could not be read or decoded.
    #[error("bad frame from the guest")]
    Frame(#[source] FrameError),
    /// Writing to the guest failed.
    #[error("cannot write to the guest channel")]
    Write(#[source] std::io::Error),
    /// The guest reported that the operation failed.
    #[error("{0}")]
    Remote(#[source] OpError),
    /// The guest answered something the protocol does not allow here.
    #[error("protocol violation by the guest: {0}")]
    Violation(String),
    /// A local reader or writer (file contents) failed.
    #[error("local I/O failed")]
    Local(#[source] std::io::Error),
    /// A read exceeded the caller's bound.
    #[error("guest sent more than the {0} bytes allowed")]
    TooLarge(u64),
    /// The guest did not answer in time (it is stuck, stopped or overloaded).
    #[error("the guest agent did not answer within {0:?}")]
    Timeout(Duration),
}

/// An event in the life of a running process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// Bytes written to stdout.
    Stdout(Vec<u8>),
    /// Bytes written to stderr.
    Stderr(Vec<u8>),
    /// The process ended; no more events follow.
    Exited(ExitInfo),
}

type Writer = Pin<Box<dyn AsyncWrite + Send>>;

/// Per-operation routing state.
struct Slot {
    tx: mpsc::UnboundedSender<GuestMsg>,
    /// Data bytes received from the guest and not yet credited back.
    uncredited: u32,
    /// Data bytes consumed locally and not yet granted back (batched).
    to_grant: u32,
    /// Data bytes sent to the guest and not yet credited back by it.
    sent_unacked: u32,
    /// Whether the guest already sent `Started` for this operation.
    started: bool,
    send_credit: Arc<Semaphore>,
}

#[derive(Default)]
struct OpTable {
    slots: HashMap<u32, Slot>,
    closed: Option<String>,
}

struct Inner {
    writer: tokio::sync::Mutex<Writer>,
    ops: Mutex<OpTable>,
    next_op: AtomicU32,
    /// Becomes true when the channel closes, waking writers blocked on a guest that does not
    /// read.
    closed: watch::Sender<bool>,
    /// The protocol version agreed in the handshake.
    version: u16,
    /// Requests the guest started.
    requests: Mutex<GuestRequests>,
}

/// How long an operation waits for the guest.
#[derive(Debug, Clone, Copy)]
enum Patience {
    /// Each wait (a reply, a chunk, credit) at most this long.
    EachWait(Duration),
    /// Everything by this instant, which is this long after the operation started.
    Until(Instant, Duration),
    /// As long as the channel lives (an exec without a timeout).
    Unbounded,
}

impl Patience {
    /// The deadline of a wait that starts now, and the bound it reports when missed.
    fn deadline(self) -> Option<(Instant, Duration)> {
        match self {
            Patience::EachWait(d) => Some((Instant::now() + d, d)),
            Patience::Until(at, d) => Some((at, d)),
            Patience::Unbounded => None,
        }
    }

    /// Awaits `wait`, failing with [`ChannelError::Timeout`] past the deadline.
    async fn bound<T>(self, wait: impl std::future::Future<Output = T>) -> Result<T, ChannelError> {
        match self.deadline() {
            Some((at, d)) => tokio::time::timeout_at(at, wait)
                .await
                .map_err(|_| ChannelError::Timeout(d)),
            None => Ok(wait.await),
        }
    }
}

/// A connected, handshaken channel to one guest agent. Cheap to share behind an `Arc`.
pub struct Channel {
    inner: Arc<Inner>,
    welcome: Welcome,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Receiving side of one operation.
struct OpHandle {
    op: u32,
    rx: mpsc::UnboundedReceiver<GuestMsg>,
    inner: Arc<Inner>,
    send_credit: Arc<Semaphore>,
    patience: Patience,
}

impl Channel {
    /// Performs the handshake over `stream` and starts routing guest frames.
    pub async fn connect<S>(stream: S) -> Result<Channel, ChannelError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read, write) = tokio::io::split(stream);
        let mut reader = FrameReader::new(read);
        let mut writer: Writer = Box::pin(write);
        write_msg(&mut writer, CONNECTION_OP, &hello()).await?;
        let first = first_on_connection(&mut reader).await?;
        let welcome = check_welcome(first).map_err(ChannelError::Handshake)?;
        let inner = Arc::new(Inner {
            writer: tokio::sync::Mutex::new(writer),
            ops: Mutex::new(OpTable::default()),
            next_op: AtomicU32::new(1),
            closed: watch::Sender::new(false),
            version: welcome.version,
            requests: Mutex::new(GuestRequests::new()),
        });
        let reader = tokio::spawn(route(reader, inner.clone()));
        Ok(Channel {
            inner,
            welcome,
            reader,
        })
    }

    /// Ends the channel: every pending operation fails at once with `reason`, and so does
    /// every later one. For a sandbox found failed, whose guest will never answer.
    pub fn abort(&self, reason: &str) {
        self.inner.close(reason.to_string());
    }

    /// Answers the guest's token requests with `issuer` from now on (until then they are
    /// refused). The channel's owner binds the issuer to the sandbox the channel belongs to.
    pub fn serve_tokens(&self, issuer: Arc<dyn TokenIssuer>) {
        self.inner.requests.lock().expect("requests lock").issuer = Some(issuer);
    }

    /// Answers the guest's forwarded SSH agent connections (version 6) with `server` from now
    /// on (until then each is closed at once). The channel's owner binds the server to the
    /// sandbox the channel belongs to.
    pub fn serve_ssh_agent(&self, server: Arc<dyn SshAgentServer>) {
        self.inner.requests.lock().expect("requests lock").ssh_agent = Some(server);
    }

    /// What the guest said in the handshake.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// Sends boot-time entropy, clock and hostname; returns once the guest applied them.
    pub async fn setup(&self, setup: Setup) -> Result<(), ChannelError> {
        let mut op = self.start(HostMsg::Setup(setup)).await?;
        op.expect_done().await
    }

    /// Configures the guest's NIC (found by `config.mac`), default route and resolver; returns
    /// once the guest applied them.
    pub async fn network(&self, config: NetworkConfig) -> Result<(), ChannelError> {
        let mut op = self.start(HostMsg::Network(config)).await?;
        op.expect_done().await
    }

    /// Gives the guest its machine-id and sandbox id; returns once they are written. A guest
    /// older than version 4 gets the two files written one by one instead (slower: two
    /// streamed operations instead of one message).
    pub async fn identity(&self, identity: GuestIdentity) -> Result<(), ChannelError> {
        if self.welcome.version >= 4 {
            let mut op = self.start(HostMsg::Identity(identity)).await?;
            return op.expect_done().await;
        }
        let machine_id: String = identity
            .machine_id
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let files = [
            ("/etc/machine-id", machine_id),
            ("/etc/hutch/sandbox-id", identity.sandbox_id),
        ];
        for (path, line) in files {
            let req = WriteFileRequest {
                path: path.to_string(),
                mode: 0o444,
                make_parents: true,
            };
            self.write_file(req, format!("{line}\n").as_bytes()).await?;
        }
        Ok(())
    }

    /// Installs a sandbox's CA and git credentials in the guest; returns once they are in
    /// place. A guest older than version 5 cannot: refused before anything is sent.
    pub async fn trust(&self, trust: GuestTrust) -> Result<(), ChannelError> {
        if self.welcome.version < 5 {
            return Err(ChannelError::Remote(OpError {
                code: crate::ErrorCode::UnsupportedVersion,
                message: format!(
                    "the guest agent speaks protocol {}; secrets need 5 (rebuild the image)",
                    self.welcome.version
                ),
            }));
        }
        let mut op = self.start(HostMsg::Trust(trust)).await?;
        op.expect_done().await
    }

    /// Round trip to the agent; proves it is alive and serving.
    pub async fn ping(&self, nonce: u64) -> Result<(), ChannelError> {
        let mut op = self.start(HostMsg::Ping(nonce)).await?;
        match op.recv().await? {
            GuestMsg::Pong(n) if n == nonce => Ok(()),
            other => Err(unexpected("Pong", &other)),
        }
    }

    /// Asks the guest to sync and power off.
    pub async fn shutdown(&self) -> Result<(), ChannelError> {
        let mut op = self.start(HostMsg::Shutdown).await?;
        op.expect_done().await
    }

    /// Starts a process; returns once the guest reports it running. With a timeout, the
    /// process must end within it plus [`EXEC_GRACE`], or its events fail with
    /// [`ChannelError::Timeout`].
    pub async fn exec(&self, req: ExecRequest) -> Result<Exec, ChannelError> {
        let deadline = req.timeout_ms.map(|ms| {
            let bound = Duration::from_millis(ms).saturating_add(EXEC_GRACE);
            Patience::Until(Instant::now() + bound, bound)
        });
        let mut exec = Exec {
            op: self.start(HostMsg::Exec(req)).await?,
            pid: 0,
            exited: false,
        };
        if let Some(deadline) = deadline {
            exec.op.patience = deadline;
        }
        match exec.op.recv().await {
            Ok(GuestMsg::Started(pid)) => {
                exec.pid = pid;
                exec.op.patience = deadline.unwrap_or(Patience::Unbounded);
                Ok(exec)
            }
            Ok(other) => Err(unexpected("Started", &other)),
            Err(e) => {
                // The guest ended the operation itself: nothing runs.
                exec.exited = matches!(e, ChannelError::Remote(_));
                Err(e)
            }
        }
    }

    /// Writes `data` to a file in the guest; returns the bytes written.
    pub async fn write_file<R>(
        &self,
        req: WriteFileRequest,
        mut data: R,
    ) -> Result<u64, ChannelError>
    where
        R: AsyncRead + Unpin,
    {
        let mut op = self.start(HostMsg::WriteFile(req)).await?;
        let mut buf = vec![0u8; MAX_CHUNK];
        let mut total = 0u64;
        loop {
            let n = data.read(&mut buf).await.map_err(ChannelError::Local)?;
            if n == 0 {
                break;
            }
            if let Err(e) = op.send_data(HostMsg::FileData(buf[..n].to_vec())).await {
                // The guest may have ended the op early; its reason beats ours.
                return Err(op.early_error().unwrap_or(e));
            }
            total += n as u64;
        }
        op.send(&HostMsg::FileEof).await?;
        op.expect_done().await?;
        Ok(total)
    }

    /// Streams a guest file into `sink`, refusing more than `req.max_bytes`.
    pub async fn read_file<W>(&self, req: ReadFileRequest, mut sink: W) -> Result<u64, ChannelError>
    where
        W: AsyncWrite + Unpin,
    {
        let limit = req.max_bytes;
        let mut op = self.start(HostMsg::ReadFile(req)).await?;
        let mut total = 0u64;
        loop {
            match op.recv().await? {
                GuestMsg::FileData(d) => {
                    total += d.len() as u64;
                    if total > limit {
                        return Err(ChannelError::TooLarge(limit));
                    }
                    sink.write_all(&d).await.map_err(ChannelError::Local)?;
                    op.consumed(d.len()).await?;
                }
                GuestMsg::FileEnd(n) if n == total => break,
                GuestMsg::FileEnd(n) => {
                    return Err(ChannelError::Violation(format!(
                        "file end says {n} bytes, {total} were sent"
                    )))
                }
                other => return Err(unexpected("FileData", &other)),
            }
        }
        sink.flush().await.map_err(ChannelError::Local)?;
        Ok(total)
    }

    async fn start(&self, msg: HostMsg) -> Result<OpHandle, ChannelError> {
        let op = self.inner.next_op.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let send_credit = Arc::new(Semaphore::new(STREAM_WINDOW as usize));
        {
            let mut table = self.inner.ops.lock().expect("op table poisoned");
            if let Some(reason) = &table.closed {
                return Err(ChannelError::Closed(reason.clone()));
            }
            table.slots.insert(
                op,
                Slot {
                    tx,
                    uncredited: 0,
                    to_grant: 0,
                    sent_unacked: 0,
                    started: false,
                    send_credit: send_credit.clone(),
                },
            );
        }
        let handle = OpHandle {
            op,
            rx,
            inner: self.inner.clone(),
            send_credit,
            patience: Patience::EachWait(REPLY_DEADLINE),
        };
        handle.send(&msg).await?;
        Ok(handle)
    }
}

impl OpHandle {
    async fn send(&self, msg: &HostMsg) -> Result<(), ChannelError> {
        self.inner.send(self.op, msg).await
    }

    async fn send_data(&self, msg: HostMsg) -> Result<(), ChannelError> {
        self.inner
            .send_data(self.op, &self.send_credit, msg, self.patience)
            .await
    }

    /// Next message for this operation; a closed channel or a missed deadline becomes an
    /// error.
    async fn recv(&mut self) -> Result<GuestMsg, ChannelError> {
        match self.patience.bound(self.rx.recv()).await? {
            Some(GuestMsg::Error(e)) => Err(ChannelError::Remote(e)),
            Some(msg) => Ok(msg),
            None => Err(self.inner.closed_error()),
        }
    }

    /// The guest's error if it already ended this operation.
    fn early_error(&mut self) -> Option<ChannelError> {
        match self.rx.try_recv() {
            Ok(GuestMsg::Error(e)) => Some(ChannelError::Remote(e)),
            _ => None,
        }
    }

    async fn expect_done(&mut self) -> Result<(), ChannelError> {
        match self.recv().await? {
            GuestMsg::Done => Ok(()),
            other => Err(unexpected("Done", &other)),
        }
    }

    /// Records that `n` received data bytes were consumed, granting credit back in batches.
    async fn consumed(&self, n: usize) -> Result<(), ChannelError> {
        let grant = {
            let mut table = self.inner.lock();
            let Some(slot) = table.slots.get_mut(&self.op) else {
                return Ok(());
            };
            slot.to_grant += n as u32;
            if slot.to_grant < STREAM_WINDOW / 4 {
                return Ok(());
            }
            let g = slot.to_grant;
            slot.to_grant = 0;
            slot.uncredited -= g;
            g
        };
        self.send(&HostMsg::Credit(grant)).await
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, OpTable> {
        self.ops.lock().expect("op table poisoned")
    }

    /// Writes one message. A guest that does not take it within [`WRITE_DEADLINE`] stopped
    /// reading: the channel closes. A channel closed meanwhile ends the wait at once.
    async fn send(&self, op: u32, msg: &HostMsg) -> Result<(), ChannelError> {
        let mut closed = self.closed.subscribe();
        if *closed.borrow() {
            return Err(self.closed_error());
        }
        let write = async {
            let mut w = self.writer.lock().await;
            write_msg(&mut w, op, msg).await
        };
        tokio::select! {
            r = tokio::time::timeout(WRITE_DEADLINE, write) => r.unwrap_or_else(|_| {
                self.close(format!("the guest stopped reading: a frame waited {WRITE_DEADLINE:?}"));
                Err(ChannelError::Timeout(WRITE_DEADLINE))
            }),
            _ = closed.wait_for(|c| *c) => Err(self.closed_error()),
        }
    }

    /// Sends a data message once the guest has granted credit for it.
    async fn send_data(
        &self,
        op: u32,
        credit: &Semaphore,
        msg: HostMsg,
        patience: Patience,
    ) -> Result<(), ChannelError> {
        let len = msg.data_len() as u32;
        patience
            .bound(credit.acquire_many(len))
            .await?
            .map_err(|_| self.closed_error())?
            .forget();
        if let Some(slot) = self.lock().slots.get_mut(&op) {
            slot.sent_unacked += len;
        }
        self.send(op, &msg).await
    }

    fn closed_error(&self) -> ChannelError {
        let reason = self.lock().closed.clone();
        ChannelError::Closed(reason.unwrap_or_else(|| "operation abandoned".into()))
    }

    /// Marks the channel closed and fails every pending operation.
    fn close(&self, reason: String) {
        let mut table = self.lock();
        if table.closed.is_none() {
            tracing::debug!(%reason, "guest channel closed");
            table.closed = Some(reason);
        }
        for (_, slot) in table.slots.drain() {
            slot.send_credit.close();
        }
        drop(table);
        for (_, stream) in self.requests.lock().expect("requests lock").ssh.drain() {
            stream.send_credit.close();
        }
        self.closed.send_replace(true);
    }
}

/// Most frames of a previous host's operations skipped while waiting for the Welcome.
const MAX_STALE_FRAMES: usize = 4096;

/// The first connection-level message, skipping (a bounded number of) frames addressed to
/// operations: before our Welcome they can only be leftovers meant for a previous host.
async fn first_on_connection<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
) -> Result<GuestMsg, ChannelError> {
    for _ in 0..=MAX_STALE_FRAMES {
        let env = reader
            .next::<GuestMsg>()
            .await
            .map_err(ChannelError::Frame)?
            .ok_or_else(|| ChannelError::Closed("guest hung up during handshake".into()))?;
        if env.op == CONNECTION_OP {
            return Ok(env.msg);
        }
    }
    Err(ChannelError::Violation(format!(
        "more than {MAX_STALE_FRAMES} frames before the handshake"
    )))
}

async fn write_msg(w: &mut Writer, op: u32, msg: &HostMsg) -> Result<(), ChannelError> {
    let frame = encode(op, msg).map_err(ChannelError::Frame)?;
    w.write_all(&frame).await.map_err(ChannelError::Write)?;
    w.flush().await.map_err(ChannelError::Write)
}

fn unexpected(wanted: &str, got: &GuestMsg) -> ChannelError {
    ChannelError::Violation(format!("expected {wanted}, got {}", msg_name(got)))
}

fn msg_name(m: &GuestMsg) -> &'static str {
    match m {
        GuestMsg::Welcome(_) => "Welcome",
        GuestMsg::Done => "Done",
        GuestMsg::Error(_) => "Error",
        GuestMsg::Started(_) => "Started",
        GuestMsg::Stdout(_) => "Stdout",
        GuestMsg::Stderr(_) => "Stderr",
        GuestMsg::Exited(_) => "Exited",
        GuestMsg::Credit(_) => "Credit",
        GuestMsg::FileData(_) => "FileData",
        GuestMsg::FileEnd(_) => "FileEnd",
        GuestMsg::Pong(_) => "Pong",
        GuestMsg::TokenRequest(_) => "TokenRequest",
        GuestMsg::SshOpen => "SshOpen",
        GuestMsg::SshData(_) => "SshData",
        GuestMsg::SshClose => "SshClose",
    }
}

/// Whether this message ends its operation.
fn is_terminal(m: &GuestMsg) -> bool {
    matches!(
        m,
        GuestMsg::Done
            | GuestMsg::Error(_)
            | GuestMsg::Exited(_)
            | GuestMsg::FileEnd(_)
            | GuestMsg::Pong(_)
    )
}

/// Reads guest frames until the stream ends or the guest misbehaves.
async fn route<R: AsyncRead + Unpin>(mut reader: FrameReader<R>, inner: Arc<Inner>) {
    let reason = loop {
        let env = match reader.next::<GuestMsg>().await {
            Ok(Some(env)) => env,
            Ok(None) => break "guest hung up".to_string(),
            Err(e) => break format!("{e}"),
        };
        if let Err(reason) = dispatch(&inner, env.op, env.msg).await {
            break format!("protocol violation by the guest: {reason}");
        }
    };
    inner.close(reason);
}

/// Checks one guest message against the operation's state and hands it on.
///
/// Every message that reaches an operation's queue is bounded: data messages carry at least
/// one byte and are charged against the credit window, terminal messages end the operation,
/// and an operation gets at most one `Started`. Anything else (a second `Welcome`, an empty
/// data chunk, a repeated `Started`) would let the guest grow the queue of an operation the
/// host is not reading without limit, so it ends the channel.
async fn dispatch(inner: &Arc<Inner>, op: u32, msg: GuestMsg) -> Result<(), String> {
    if op == CONNECTION_OP {
        return Err(format!("unexpected {} on the connection", msg_name(&msg)));
    }
    if op & GUEST_OP_BIT != 0 {
        return guest_request(inner, op, msg).await;
    }
    if let GuestMsg::TokenRequest(_)
    | GuestMsg::SshOpen
    | GuestMsg::SshData(_)
    | GuestMsg::SshClose = msg
    {
        return Err(format!("{} on host operation {op}", msg_name(&msg)));
    }
    let len = msg.data_len();
    check_chunk(len).map_err(|e| e.to_string())?;
    match msg {
        GuestMsg::Welcome(_) => return Err(format!("Welcome for operation {op}")),
        GuestMsg::Stdout(_) | GuestMsg::Stderr(_) | GuestMsg::FileData(_) if len == 0 => {
            return Err(format!("empty {} chunk for operation {op}", msg_name(&msg)))
        }
        _ => {}
    }
    let mut auto_grant = None;
    {
        let mut table = inner.lock();
        let slot = table
            .slots
            .get_mut(&op)
            .ok_or_else(|| format!("{} for unknown operation {op}", msg_name(&msg)))?;
        if let GuestMsg::Credit(n) = msg {
            if n > slot.sent_unacked {
                return Err(format!(
                    "credit {n} exceeds {} bytes sent",
                    slot.sent_unacked
                ));
            }
            slot.sent_unacked -= n;
            slot.send_credit.add_permits(n as usize);
            return Ok(());
        }
        if let GuestMsg::Started(_) = msg {
            if slot.started {
                return Err(format!("second Started for operation {op}"));
            }
            slot.started = true;
        }
        slot.uncredited += len as u32;
        if slot.uncredited > STREAM_WINDOW {
            return Err(format!("operation {op} exceeded its credit window"));
        }
        let terminal = is_terminal(&msg);
        if slot.tx.send(msg).is_err() && len > 0 {
            // Nobody is listening any more: keep the guest unblocked until the op ends.
            slot.uncredited -= len as u32;
            auto_grant = Some(len as u32);
        }
        if terminal {
            if let Some(slot) = table.slots.remove(&op) {
                // Wake any sender still waiting for credit this op will never grant.
                slot.send_credit.close();
            }
            auto_grant = None;
        }
    }
    if let Some(n) = auto_grant {
        inner
            .send(op, &HostMsg::Credit(n))
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Starts answering a request the guest started on operation `op`.
///
/// Token requests (version 5) and forwarded SSH agent connections (version 6: `SshOpen`,
/// then `SshData`, `Credit` and `SshClose` on the same id); a repeated operation id ends the
/// channel (its answer could not be told apart). A bad audience, a guest over its allowance
/// ([`TOKEN_BURST`], one more per [`TOKEN_REFILL`]) or with [`MAX_GUEST_REQUESTS`] unanswered
/// is refused at once: the guest's own requests cost it an answer each, nothing more.
async fn guest_request(inner: &Arc<Inner>, op: u32, msg: GuestMsg) -> Result<(), String> {
    match msg {
        GuestMsg::TokenRequest(req) => token_request(inner, op, req).await,
        GuestMsg::SshOpen => ssh_open(inner, op),
        GuestMsg::SshData(data) => ssh_data(inner, op, data),
        GuestMsg::Credit(n) if is_ssh_stream(inner, op) => ssh_credit(inner, op, n),
        GuestMsg::SshClose => ssh_close(inner, op),
        other => Err(format!("{} on guest operation {op}", msg_name(&other))),
    }
}

/// Answers a token request (version 5) on guest operation `op`.
async fn token_request(
    inner: &Arc<Inner>,
    op: u32,
    req: crate::TokenRequest,
) -> Result<(), String> {
    if inner.version < 5 {
        return Err(format!(
            "TokenRequest on protocol version {}",
            inner.version
        ));
    }
    let issuer = {
        let mut requests = inner.requests.lock().expect("requests lock");
        if requests.in_flight.contains(&op) || requests.ssh.contains_key(&op) {
            return Err(format!("second request on guest operation {op}"));
        }
        let refusal = if let Err(e) = req.check() {
            Some(e)
        } else if requests.in_flight.len() >= MAX_GUEST_REQUESTS
            || !requests.take_allowance(Instant::now())
        {
            Some(refused(
                ErrorCode::RateLimited,
                "too many token requests; try again later",
            ))
        } else if requests.issuer.is_none() {
            Some(refused(
                ErrorCode::NotFound,
                "this host issues no identity tokens",
            ))
        } else {
            None
        };
        match refusal {
            Some(e) => Err(e),
            None => {
                requests.in_flight.insert(op);
                Ok(requests.issuer.clone().expect("checked above"))
            }
        }
    };
    let issuer = match issuer {
        Ok(issuer) => issuer,
        Err(e) => {
            // Answered before the next frame is read: a guest that floods requests and stops
            // reading is held back by its own unread answers.
            tracing::debug!(op, reason = %e, "guest token request refused");
            return inner
                .send(op, &HostMsg::Refused(e))
                .await
                .map_err(|e| e.to_string());
        }
    };
    let inner = inner.clone();
    tokio::spawn(async move {
        let reply = match issuer.issue(req.audience).await {
            Ok(token) => HostMsg::Token(token),
            Err(e) => HostMsg::Refused(e),
        };
        let _ = inner.send(op, &reply).await;
        inner
            .requests
            .lock()
            .expect("requests lock")
            .in_flight
            .remove(&op);
    });
    Ok(())
}

fn is_ssh_stream(inner: &Inner, op: u32) -> bool {
    let requests = inner.requests.lock().expect("requests lock");
    requests.ssh.contains_key(&op)
}

/// Opens a forwarded SSH agent connection on guest operation `op` (version 6): two pumps join
/// it to the channel's agent server (none: a server that closes it at once). A repeated id
/// or more than [`MAX_SSH_STREAMS`] open is a violation: the guest agent never does either.
fn ssh_open(inner: &Arc<Inner>, op: u32) -> Result<(), String> {
    if inner.version < 6 {
        return Err(format!("SshOpen on protocol version {}", inner.version));
    }
    let (to_agent, from_guest) = mpsc::unbounded_channel();
    let send_credit = Arc::new(Semaphore::new(SSH_WINDOW as usize));
    let server = {
        let mut requests = inner.requests.lock().expect("requests lock");
        if requests.in_flight.contains(&op) || requests.ssh.contains_key(&op) {
            return Err(format!("second request on guest operation {op}"));
        }
        if requests.ssh.len() >= MAX_SSH_STREAMS {
            return Err(format!(
                "more than {MAX_SSH_STREAMS} SSH agent connections open"
            ));
        }
        requests.ssh.insert(
            op,
            SshStream {
                to_agent,
                uncredited: 0,
                sent_unacked: 0,
                send_credit: send_credit.clone(),
            },
        );
        requests.ssh_agent.clone()
    };
    let (ours, theirs) = tokio::io::duplex(MAX_CHUNK);
    match server {
        Some(server) => {
            tokio::spawn(server.serve(theirs));
        }
        None => drop(theirs),
    }
    let (agent_rd, agent_wr) = tokio::io::split(ours);
    tokio::spawn(ssh_to_agent(inner.clone(), op, from_guest, agent_wr));
    tokio::spawn(ssh_to_guest(inner.clone(), op, send_credit, agent_rd));
    Ok(())
}

/// Bytes from the guest for the agent: charged against the window, queued for the pump.
fn ssh_data(inner: &Inner, op: u32, data: Vec<u8>) -> Result<(), String> {
    let len = data.len();
    check_chunk(len).map_err(|e| e.to_string())?;
    if len == 0 {
        return Err(format!("empty SshData chunk for guest operation {op}"));
    }
    let mut requests = inner.requests.lock().expect("requests lock");
    let stream = requests
        .ssh
        .get_mut(&op)
        .ok_or_else(|| format!("SshData for unknown guest operation {op}"))?;
    stream.uncredited += len as u32;
    if stream.uncredited > SSH_WINDOW {
        return Err(format!("guest operation {op} exceeded its credit window"));
    }
    // The pump ends only when the stream is removed, so this cannot fail.
    let _ = stream.to_agent.send(data);
    Ok(())
}

/// The guest granted credit for the agent's answers.
fn ssh_credit(inner: &Inner, op: u32, n: u32) -> Result<(), String> {
    let mut requests = inner.requests.lock().expect("requests lock");
    let stream = requests.ssh.get_mut(&op).expect("checked by the caller");
    if n > stream.sent_unacked {
        return Err(format!(
            "credit {n} exceeds {} bytes sent",
            stream.sent_unacked
        ));
    }
    stream.sent_unacked -= n;
    stream.send_credit.add_permits(n as usize);
    Ok(())
}

/// The guest's end closed: the stream is over (its pumps end, and so does the agent's
/// connection).
fn ssh_close(inner: &Inner, op: u32) -> Result<(), String> {
    let mut requests = inner.requests.lock().expect("requests lock");
    let stream = requests
        .ssh
        .remove(&op)
        .ok_or_else(|| format!("SshClose for unknown guest operation {op}"))?;
    stream.send_credit.close();
    Ok(())
}

/// Pump: the guest's bytes into the agent, crediting each chunk back once written. An agent
/// that went away has its bytes dropped (still credited) until the guest closes.
async fn ssh_to_agent(
    inner: Arc<Inner>,
    op: u32,
    mut from_guest: mpsc::UnboundedReceiver<Vec<u8>>,
    mut agent: tokio::io::WriteHalf<tokio::io::DuplexStream>,
) {
    let mut open = true;
    while let Some(chunk) = from_guest.recv().await {
        if open {
            open = agent.write_all(&chunk).await.is_ok();
        }
        let n = chunk.len() as u32;
        let still_open = {
            let mut requests = inner.requests.lock().expect("requests lock");
            match requests.ssh.get_mut(&op) {
                Some(stream) => {
                    stream.uncredited -= n;
                    true
                }
                None => false,
            }
        };
        if !still_open || inner.send(op, &HostMsg::Credit(n)).await.is_err() {
            break;
        }
    }
    let _ = agent.shutdown().await;
}

/// Pump: the agent's answers to the guest within its credit, then `SshClose` when the agent
/// closes (unless the guest closed first). A guest that grants no credit within
/// [`REPLY_DEADLINE`] has its connection closed.
async fn ssh_to_guest(
    inner: Arc<Inner>,
    op: u32,
    credit: Arc<Semaphore>,
    mut agent: tokio::io::ReadHalf<tokio::io::DuplexStream>,
) {
    let mut buf = vec![0u8; MAX_CHUNK];
    loop {
        let n = match agent.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let msg = HostMsg::SshData(buf[..n].to_vec());
        let sent = async {
            Patience::EachWait(REPLY_DEADLINE)
                .bound(credit.acquire_many(n as u32))
                .await?
                .map_err(|_| inner.closed_error())?
                .forget();
            match inner
                .requests
                .lock()
                .expect("requests lock")
                .ssh
                .get_mut(&op)
            {
                Some(stream) => stream.sent_unacked += n as u32,
                None => return Err(ChannelError::Closed("the guest closed".into())),
            }
            inner.send(op, &msg).await
        };
        if sent.await.is_err() {
            break;
        }
    }
    let open = inner
        .requests
        .lock()
        .expect("requests lock")
        .ssh
        .contains_key(&op);
    if open {
        let _ = inner.send(op, &HostMsg::SshClose).await;
    }
}

fn refused(code: ErrorCode, message: &str) -> OpError {
    OpError {
        code,
        message: message.to_string(),
    }
}

/// A running process in the guest. Dropped before the process exited (its client went away,
/// or its deadline passed), it kills the process.
pub struct Exec {
    op: OpHandle,
    pid: u32,
    /// Whether the guest reported the end (nothing is left to kill).
    exited: bool,
}

impl Drop for Exec {
    fn drop(&mut self) {
        if self.exited {
            return;
        }
        // Nobody reads the output any more (the router credits it on its own), so the
        // process would run unseen until it ends by itself, if ever.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (inner, op) = (self.op.inner.clone(), self.op.op);
        runtime.spawn(async move {
            let _ = inner.send(op, &HostMsg::Signal(SIGKILL)).await;
        });
    }
}

/// A cloneable handle for feeding a process's stdin and signalling it.
#[derive(Clone)]
pub struct ExecControl {
    op: u32,
    inner: Arc<Inner>,
    send_credit: Arc<Semaphore>,
    patience: Patience,
}

impl Exec {
    /// The process id inside the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A handle for stdin and signals that can move to another task.
    pub fn control(&self) -> ExecControl {
        ExecControl {
            op: self.op.op,
            inner: self.op.inner.clone(),
            send_credit: self.op.send_credit.clone(),
            patience: self.op.patience,
        }
    }

    /// The next output or the exit. After `Exited`, the channel reports the op as over.
    pub async fn next_event(&mut self) -> Result<ExecEvent, ChannelError> {
        let ev = match self.op.recv().await? {
            GuestMsg::Stdout(d) => ExecEvent::Stdout(d),
            GuestMsg::Stderr(d) => ExecEvent::Stderr(d),
            GuestMsg::Exited(info) => {
                self.exited = true;
                return Ok(ExecEvent::Exited(info));
            }
            other => return Err(unexpected("process output", &other)),
        };
        let n = match &ev {
            ExecEvent::Stdout(d) | ExecEvent::Stderr(d) => d.len(),
            ExecEvent::Exited(_) => 0,
        };
        self.op.consumed(n).await?;
        Ok(ev)
    }
}

impl ExecControl {
    /// Streams bytes to the process's stdin, respecting the guest's credit.
    pub async fn write_stdin(&self, data: &[u8]) -> Result<(), ChannelError> {
        for chunk in data.chunks(MAX_CHUNK) {
            self.inner
                .send_data(
                    self.op,
                    &self.send_credit,
                    HostMsg::Stdin(chunk.to_vec()),
                    self.patience,
                )
                .await?;
        }
        Ok(())
    }

    /// Closes the process's stdin.
    pub async fn close_stdin(&self) -> Result<(), ChannelError> {
        self.inner.send(self.op, &HostMsg::StdinEof).await
    }

    /// Sends `signal` to the process group.
    pub async fn signal(&self, signal: i32) -> Result<(), ChannelError> {
        self.inner.send(self.op, &HostMsg::Signal(signal)).await
    }

    /// Resizes the process's terminal (when it runs under one).
    pub async fn resize(&self, size: crate::TtySize) -> Result<(), ChannelError> {
        self.inner.send(self.op, &HostMsg::Resize(size)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allowance_refills_one_per_interval_up_to_the_burst() {
        let mut r = GuestRequests::new();
        let t0 = r.refilled;
        for _ in 0..TOKEN_BURST {
            assert!(r.take_allowance(t0));
        }
        assert!(!r.take_allowance(t0));
        // Half an interval earns nothing; a whole one earns one request.
        assert!(!r.take_allowance(t0 + TOKEN_REFILL / 2));
        assert!(r.take_allowance(t0 + TOKEN_REFILL));
        assert!(!r.take_allowance(t0 + TOKEN_REFILL));
        // A long pause refills to the burst, no further.
        let later = t0 + TOKEN_REFILL * 1000;
        for _ in 0..TOKEN_BURST {
            assert!(r.take_allowance(later));
        }
        assert!(!r.take_allowance(later));
    }
}
