//! The guest is hostile: a fake guest agent over an in-memory duplex stream answers the
//! handshake correctly and then breaks the protocol in every way the host must survive.
//!
//! Each test checks what the host's user sees (the pending operation's error, the reason, that
//! new operations are refused) and, where it matters, that the host never read or allocated an
//! oversized frame. Timeouts only turn a hang into a failure; nothing here waits on a clock.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use hutch_protocol::{
    encode,
    handshake::HandshakeError,
    host::{
        Channel, ChannelError, Exec, ExecEvent, SshAgentFuture, SshAgentServer, TokenFuture,
        TokenIssuer, EXEC_GRACE, MAX_GUEST_REQUESTS, REPLY_DEADLINE, TOKEN_BURST, TOKEN_REFILL,
        WRITE_DEADLINE,
    },
    Envelope, ErrorCode, ExecRequest, ExitInfo, ExitStatus, FrameReader, GuestIdentity, GuestMsg,
    HostMsg, OpError, ReadFileRequest, TokenRequest, Welcome, GUEST_OP_BIT, MAGIC, MAX_CHUNK,
    MAX_FRAME, MAX_SSH_STREAMS, PROTOCOL_VERSION, SSH_WINDOW, STREAM_WINDOW,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf, ReadHalf, WriteHalf};

// ---------------------------------------------------------------------------------------------
// Allocation watch: the largest single allocation made on the current thread. Tests run on a
// current-thread runtime, so the host's reader task allocates on the test's own thread.

struct Watch;

thread_local! {
    static LARGEST_ALLOC: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST_ALLOC.try_with(|m| {
        if size > m.get() {
            m.set(size)
        }
    });
}

// SAFETY: every method forwards to the system allocator with the caller's own arguments, so
// `Watch` keeps `System`'s guarantees; counting sizes allocates nothing.
unsafe impl GlobalAlloc for Watch {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller upholds `alloc`'s contract; passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: `ptr` came from this allocator (that is, from `System`) with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as for `realloc`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Watch = Watch;

fn reset_largest_alloc() {
    LARGEST_ALLOC.with(|m| m.set(0));
}

fn largest_alloc() -> usize {
    LARGEST_ALLOC.with(|m| m.get())
}

// ---------------------------------------------------------------------------------------------
// The host's end of the wire, counting every byte the host reads.

struct Counting {
    inner: DuplexStream,
    read: Arc<AtomicUsize>,
}

impl AsyncRead for Counting {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            self.read
                .fetch_add(buf.filled().len() - before, Ordering::SeqCst);
        }
        r
    }
}

impl AsyncWrite for Counting {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// ---------------------------------------------------------------------------------------------
// The fake guest.

struct Guest {
    rd: FrameReader<ReadHalf<DuplexStream>>,
    wr: WriteHalf<DuplexStream>,
}

impl Guest {
    async fn recv(&mut self) -> Envelope<HostMsg> {
        self.rd
            .next::<HostMsg>()
            .await
            .expect("host sent a bad frame")
            .expect("host hung up")
    }

    async fn send(&mut self, op: u32, msg: GuestMsg) {
        self.raw(&encode(op, &msg).unwrap()).await;
    }

    async fn raw(&mut self, bytes: &[u8]) {
        self.wr.write_all(bytes).await.unwrap();
        self.wr.flush().await.unwrap();
    }
}

fn welcome(version: u16) -> Welcome {
    Welcome {
        magic: MAGIC,
        version,
        agent: "fake-guest".into(),
        kernel_release: "0.0.0-test".into(),
    }
}

/// Runs `Channel::connect` against a guest whose first bytes are `reply`.
async fn handshake(reply: &[u8]) -> (Result<Channel, ChannelError>, Guest, Arc<AtomicUsize>) {
    let (host_end, guest_end) = tokio::io::duplex(64 * 1024);
    let read = Arc::new(AtomicUsize::new(0));
    let (rd, wr) = tokio::io::split(guest_end);
    let mut guest = Guest {
        rd: FrameReader::new(rd),
        wr,
    };
    guest.raw(reply).await;
    let chan = within(Channel::connect(Counting {
        inner: host_end,
        read: read.clone(),
    }))
    .await;
    let hello = guest.recv().await;
    assert_eq!(hello.op, 0);
    assert_eq!(hello.msg, hutch_protocol::handshake::hello());
    (chan, guest, read)
}

/// A channel whose handshake succeeded.
async fn connect() -> (Channel, Guest, Arc<AtomicUsize>) {
    let reply = encode(0, &GuestMsg::Welcome(welcome(PROTOCOL_VERSION))).unwrap();
    let (chan, guest, read) = handshake(&reply).await;
    let chan = chan.expect("a valid Welcome must be accepted");
    assert_eq!(chan.welcome().agent, "fake-guest");
    (chan, guest, read)
}

/// Turns a hang into a failure.
async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("timed out: the host hung")
}

fn closed_reason<T: std::fmt::Debug>(r: Result<T, ChannelError>) -> String {
    match r {
        Err(ChannelError::Closed(reason)) => reason,
        other => panic!("expected the channel to be closed, got {other:?}"),
    }
}

/// The channel is closed: a new operation fails at once, with the same reason.
async fn assert_refuses_new_ops(chan: &Channel, reason: &str) {
    let again = closed_reason(within(chan.ping(7)).await);
    assert_eq!(again, reason, "a closed channel must keep its first reason");
}

fn exec_request() -> ExecRequest {
    let mut req = ExecRequest::new(vec!["cat".into()]);
    req.stdin = true;
    req
}

/// Starts an exec; the guest answers `Started`. Returns the host's handle and the op id.
async fn start_exec(chan: &Channel, guest: &mut Guest) -> (Exec, u32) {
    let (exec, op) = within(async {
        tokio::join!(chan.exec(exec_request()), async {
            let env = guest.recv().await;
            assert!(matches!(env.msg, HostMsg::Exec(_)), "got {:?}", env.msg);
            guest.send(env.op, GuestMsg::Started(42)).await;
            env.op
        })
    })
    .await;
    let exec = exec.expect("exec must start");
    assert_eq!(exec.pid(), 42);
    (exec, op)
}

/// Starts a ping the guest never answers; returns its future and op id.
async fn pending_ping<'a>(
    chan: &'a Channel,
    guest: &mut Guest,
) -> (impl Future<Output = Result<(), ChannelError>> + 'a, u32) {
    let mut ping = Box::pin(chan.ping(1));
    // Drive the ping until its request is on the wire.
    let op = tokio::select! {
        biased;
        r = &mut ping => panic!("ping ended before the guest answered: {r:?}"),
        env = guest.recv() => {
            assert_eq!(env.msg, HostMsg::Ping(1));
            env.op
        }
    };
    (ping, op)
}

fn exited() -> GuestMsg {
    GuestMsg::Exited(ExitInfo {
        status: ExitStatus::Code(0),
        timed_out: false,
    })
}

// ---------------------------------------------------------------------------------------------
// Frame size.

#[tokio::test]
async fn oversized_frame_header_closes_without_reading_or_allocating_the_body() {
    for announced in [MAX_FRAME as u32 + 1, u32::MAX] {
        let (chan, mut guest, read) = connect().await;
        let (ping, _) = pending_ping(&chan, &mut guest).await;
        let before = read.load(Ordering::SeqCst);
        let body = vec![0x5a; 256 * 1024];
        reset_largest_alloc();

        // The header, then a body the host must never read. The body is written from a
        // separate task because nobody will drain it.
        guest.raw(&announced.to_le_bytes()).await;
        let junk = tokio::spawn(async move {
            let _ = guest.wr.write_all(&body).await;
            guest
        });

        let reason = closed_reason(within(ping).await);
        assert!(
            reason.contains(&format!("frame of {announced} bytes exceeds")),
            "reason: {reason}"
        );
        assert_eq!(
            read.load(Ordering::SeqCst) - before,
            4,
            "the host may read only the length prefix of an oversized frame"
        );
        assert!(
            largest_alloc() < MAX_FRAME,
            "the host allocated {} bytes for a rejected frame",
            largest_alloc()
        );
        assert_refuses_new_ops(&chan, &reason).await;
        junk.abort();
    }
}

#[tokio::test]
async fn frame_of_exactly_max_frame_is_read_then_judged_by_content() {
    // MAX_FRAME itself is allowed on the wire; this body is garbage, so it is rejected as
    // malformed rather than as too large.
    let (chan, mut guest, read) = connect().await;
    let (ping, _) = pending_ping(&chan, &mut guest).await;
    let before = read.load(Ordering::SeqCst);
    let mut frame = (MAX_FRAME as u32).to_le_bytes().to_vec();
    frame.resize(4 + MAX_FRAME, 0xff);
    let writer = tokio::spawn(async move {
        guest.raw(&frame).await;
        guest
    });
    let reason = closed_reason(within(ping).await);
    assert!(reason.contains("malformed frame"), "reason: {reason}");
    assert_eq!(read.load(Ordering::SeqCst) - before, 4 + MAX_FRAME);
    within(writer).await.unwrap();
}

#[tokio::test]
async fn data_chunk_over_max_chunk_closes_the_channel() {
    let (chan, mut guest, _) = connect().await;
    let (mut exec, op) = start_exec(&chan, &mut guest).await;
    guest
        .send(op, GuestMsg::Stdout(vec![1; MAX_CHUNK + 1]))
        .await;
    let reason = closed_reason(within(exec.next_event()).await);
    assert!(
        reason.contains(&format!("data chunk of {} bytes exceeds", MAX_CHUNK + 1)),
        "reason: {reason}"
    );
    assert!(reason.contains("protocol violation"), "reason: {reason}");
    assert_refuses_new_ops(&chan, &reason).await;
}

#[tokio::test]
async fn data_chunk_of_exactly_max_chunk_is_accepted() {
    let (chan, mut guest, _) = connect().await;
    let (mut exec, op) = start_exec(&chan, &mut guest).await;
    guest.send(op, GuestMsg::Stderr(vec![2; MAX_CHUNK])).await;
    guest.send(op, exited()).await;
    assert_eq!(
        within(exec.next_event()).await.unwrap(),
        ExecEvent::Stderr(vec![2; MAX_CHUNK])
    );
    assert!(matches!(
        within(exec.next_event()).await.unwrap(),
        ExecEvent::Exited(_)
    ));
}

// ---------------------------------------------------------------------------------------------
// Credit.

/// Sends `total` bytes of stdout for `op` in legal-size chunks, ignoring credit.
async fn blast_stdout(guest: &mut Guest, op: u32, total: usize) {
    let mut left = total;
    while left > 0 {
        let n = left.min(MAX_CHUNK);
        guest.send(op, GuestMsg::Stdout(vec![b'x'; n])).await;
        left -= n;
    }
}

/// Drains the exec's events, returning the stdout bytes seen and the final error or exit.
async fn drain(exec: &mut Exec) -> (usize, Result<ExitInfo, ChannelError>) {
    let mut seen = 0;
    loop {
        match within(exec.next_event()).await {
            Ok(ExecEvent::Stdout(d)) => seen += d.len(),
            Ok(ExecEvent::Stderr(d)) => seen += d.len(),
            Ok(ExecEvent::Exited(info)) => return (seen, Ok(info)),
            Err(e) => return (seen, Err(e)),
        }
    }
}

#[tokio::test]
async fn stdout_beyond_the_credit_window_closes_the_channel() {
    let (chan, mut guest, _) = connect().await;
    let (mut exec, op) = start_exec(&chan, &mut guest).await;
    // The host reads nothing meanwhile, so it grants no credit: the last byte is one too many.
    blast_stdout(&mut guest, op, STREAM_WINDOW as usize + 1).await;
    // A new op either starts after the close (refused) or is pending when it happens (failed).
    let reason = closed_reason(within(chan.ping(5)).await);
    assert!(
        reason.contains(&format!("operation {op} exceeded its credit window")),
        "reason: {reason}"
    );
    // What arrived within the window is still delivered, then the op fails with the reason.
    let (seen, end) = drain(&mut exec).await;
    assert_eq!(seen, STREAM_WINDOW as usize);
    assert_eq!(closed_reason(end), reason);
    assert_refuses_new_ops(&chan, &reason).await;
}

#[tokio::test]
async fn stdout_filling_exactly_the_credit_window_is_accepted() {
    let (chan, mut guest, _) = connect().await;
    let (mut exec, op) = start_exec(&chan, &mut guest).await;
    let (ping, ping_op) = pending_ping(&chan, &mut guest).await;
    blast_stdout(&mut guest, op, STREAM_WINDOW as usize).await;
    guest.send(op, exited()).await;
    // Frames are routed in order: once the Pong is through, the whole window was accepted
    // before the host consumed (and granted back) a single byte.
    guest.send(ping_op, GuestMsg::Pong(1)).await;
    within(ping)
        .await
        .expect("a full window is within the limit");
    let (seen, end) = drain(&mut exec).await;
    assert_eq!(seen, STREAM_WINDOW as usize);
    assert_eq!(end.unwrap().status, ExitStatus::Code(0));
    // The channel is still usable.
    let ping = tokio::spawn(async move {
        let env = guest.recv().await;
        // Credit grants for the drained output come first.
        let mut env = env;
        while let HostMsg::Credit(_) = env.msg {
            env = guest.recv().await;
        }
        assert_eq!(env.msg, HostMsg::Ping(3));
        guest.send(env.op, GuestMsg::Pong(3)).await;
        guest
    });
    within(chan.ping(3)).await.unwrap();
    within(ping).await.unwrap();
}

#[tokio::test]
async fn credit_larger_than_the_data_sent_closes_the_channel() {
    let (chan, mut guest, _) = connect().await;
    let (mut exec, op) = start_exec(&chan, &mut guest).await;
    let control = exec.control();
    within(control.write_stdin(b"0123456789")).await.unwrap();
    let env = guest.recv().await;
    assert_eq!(
        (env.op, env.msg),
        (op, HostMsg::Stdin(b"0123456789".to_vec()))
    );

    // Crediting what was sent is fine; crediting more is not.
    guest.send(op, GuestMsg::Credit(4)).await;
    guest.send(op, GuestMsg::Credit(6)).await;
    guest.send(op, GuestMsg::Credit(1)).await;
    let reason = closed_reason(within(exec.next_event()).await);
    assert!(
        reason.contains("credit 1 exceeds 0 bytes sent"),
        "reason: {reason}"
    );
    // Sending stdin on the dead channel fails instead of waiting for credit.
    let err = within(control.write_stdin(&vec![0; STREAM_WINDOW as usize + 1])).await;
    assert_eq!(closed_reason(err), reason);
    assert_refuses_new_ops(&chan, &reason).await;
}

#[tokio::test]
async fn credit_with_nothing_sent_closes_the_channel() {
    let (chan, mut guest, _) = connect().await;
    let (ping, op) = pending_ping(&chan, &mut guest).await;
    guest.send(op, GuestMsg::Credit(u32::MAX)).await;
    let reason = closed_reason(within(ping).await);
    assert!(
        reason.contains(&format!("credit {} exceeds 0 bytes sent", u32::MAX)),
        "reason: {reason}"
    );
    assert_refuses_new_ops(&chan, &reason).await;
}

#[tokio::test]
async fn host_waits_for_credit_before_exceeding_the_guest_window() {
    // The mirror image: the host never sends the guest more stdin than the window, and the
    // guest's credit (exactly what was sent) lets the rest through.
    let (chan, mut guest, _) = connect().await;
    let (exec, op) = start_exec(&chan, &mut guest).await;
    let control = exec.control();
    let total = STREAM_WINDOW as usize + 3 * MAX_CHUNK + 5;
    let writer = tokio::spawn(async move { control.write_stdin(&vec![9; total]).await });
    let mut got = 0usize;
    while got < STREAM_WINDOW as usize {
        let env = within(guest.recv()).await;
        match env.msg {
            HostMsg::Stdin(d) => {
                assert_eq!(env.op, op);
                assert!(d.len() <= MAX_CHUNK);
                got += d.len();
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, STREAM_WINDOW as usize, "the host overran the window");
    // The stdin writer is now parked on credit: the next frame on the wire is a ping, not more
    // stdin.
    let (ping, ping_op) = pending_ping(&chan, &mut guest).await;
    guest.send(ping_op, GuestMsg::Pong(1)).await;
    within(ping).await.unwrap();
    guest.send(op, GuestMsg::Credit(got as u32)).await;
    while got < total {
        let env = within(guest.recv()).await;
        match env.msg {
            HostMsg::Stdin(d) => got += d.len(),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, total);
    within(writer).await.unwrap().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Operation ids and message kinds.

#[tokio::test]
async fn message_for_an_unknown_operation_closes_the_channel() {
    let (chan, mut guest, _) = connect().await;
    let (ping, op) = pending_ping(&chan, &mut guest).await;
    let bogus = op + 4242;
    guest.send(bogus, GuestMsg::Stdout(b"hi".to_vec())).await;
    let reason = closed_reason(within(ping).await);
    assert!(
        reason.contains(&format!("Stdout for unknown operation {bogus}")),
        "reason: {reason}"
    );
    assert_refuses_new_ops(&chan, &reason).await;
}

#[tokio::test]
async fn message_for_a_finished_operation_closes_the_channel() {
    let (chan, mut guest, _) = connect().await;
    let (ping, op) = pending_ping(&chan, &mut guest).await;
    guest.send(op, GuestMsg::Pong(1)).await;
    within(ping).await.unwrap();
    let (ping2, _) = pending_ping(&chan, &mut guest).await;
    guest.send(op, GuestMsg::Done).await;
    let reason = closed_reason(within(ping2).await);
    assert!(
        reason.contains(&format!("Done for unknown operation {op}")),
        "reason: {reason}"
    );
    assert_refuses_new_ops(&chan, &reason).await;
}

#[tokio::test]
async fn message_on_the_connection_op_closes_the_channel() {
    let (chan, mut guest, _) = connect().await;
    let (ping, _) = pending_ping(&chan, &mut guest).await;
    guest
        .send(0, GuestMsg::Welcome(welcome(PROTOCOL_VERSION)))
        .await;
    let reason = closed_reason(within(ping).await);
    assert!(
        reason.contains("unexpected Welcome on the connection"),
        "reason: {reason}"
    );
    assert_refuses_new_ops(&chan, &reason).await;
}

#[tokio::test]
async fn messages_that_would_queue_without_bound_close_the_channel() {
    // Non-data messages are not charged against the credit window, so a guest that could
    // repeat them would make the host queue memory for an op nobody is reading.
    let cases: Vec<(GuestMsg, &str)> = vec![
        (GuestMsg::Started(43), "second Started for operation"),
        (GuestMsg::Stdout(vec![]), "empty Stdout chunk for operation"),
        (GuestMsg::Stderr(vec![]), "empty Stderr chunk for operation"),
        (
            GuestMsg::FileData(vec![]),
            "empty FileData chunk for operation",
        ),
        (
            GuestMsg::Welcome(welcome(PROTOCOL_VERSION)),
            "Welcome for operation",
        ),
    ];
    for (msg, needle) in cases {
        let (chan, mut guest, _) = connect().await;
        let (mut exec, op) = start_exec(&chan, &mut guest).await;
        guest.send(op, msg).await;
        let reason = closed_reason(within(exec.next_event()).await);
        assert!(
            reason.contains(&format!("{needle} {op}")),
            "reason: {reason}"
        );
        assert_refuses_new_ops(&chan, &reason).await;
    }
}

#[tokio::test]
async fn wrong_reply_fails_the_op_and_guest_errors_are_reported() {
    let (chan, mut guest, _) = connect().await;
    // A Pong with the wrong nonce is a violation for that op.
    let (ping, op) = pending_ping(&chan, &mut guest).await;
    guest.send(op, GuestMsg::Pong(2)).await;
    assert!(matches!(
        within(ping).await,
        Err(ChannelError::Violation(_))
    ));
    // A guest error ends the op with the guest's message, verbatim.
    let (ping, op) = pending_ping(&chan, &mut guest).await;
    let e = OpError {
        code: ErrorCode::Io,
        message: "no".into(),
    };
    guest.send(op, GuestMsg::Error(e.clone())).await;
    match within(ping).await {
        Err(ChannelError::Remote(got)) => assert_eq!(got, e),
        other => panic!("expected Remote, got {other:?}"),
    }
}

#[tokio::test]
async fn read_file_beyond_max_bytes_is_refused() {
    let (chan, mut guest, _) = connect().await;
    let guest_task = tokio::spawn(async move {
        let env = guest.recv().await;
        assert!(matches!(env.msg, HostMsg::ReadFile(_)));
        guest.send(env.op, GuestMsg::FileData(vec![1; 10])).await;
        guest.send(env.op, GuestMsg::FileData(vec![1; 1])).await;
        guest.send(env.op, GuestMsg::FileEnd(11)).await;
        guest
    });
    let mut sink = Vec::new();
    let r = within(chan.read_file(
        ReadFileRequest {
            path: "/etc/passwd".into(),
            max_bytes: 10,
        },
        &mut sink,
    ))
    .await;
    assert!(matches!(r, Err(ChannelError::TooLarge(10))), "{r:?}");
    assert!(sink.len() <= 10);
    within(guest_task).await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Garbage, truncation, hang-ups.

#[tokio::test]
async fn garbage_body_closes_the_channel() {
    let (chan, mut guest, _) = connect().await;
    let (ping, _) = pending_ping(&chan, &mut guest).await;
    guest
        .raw(&[8, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff])
        .await;
    let reason = closed_reason(within(ping).await);
    assert!(reason.contains("malformed frame"), "reason: {reason}");
    assert_refuses_new_ops(&chan, &reason).await;
}

#[tokio::test]
async fn trailing_bytes_in_a_frame_close_the_channel() {
    let (chan, mut guest, _) = connect().await;
    let (ping, op) = pending_ping(&chan, &mut guest).await;
    let mut frame = encode(op, &GuestMsg::Pong(1)).unwrap();
    frame.push(0);
    let len = (frame.len() - 4) as u32;
    frame[..4].copy_from_slice(&len.to_le_bytes());
    guest.raw(&frame).await;
    let reason = closed_reason(within(ping).await);
    assert!(reason.contains("1 trailing bytes"), "reason: {reason}");
    assert_refuses_new_ops(&chan, &reason).await;
}

#[tokio::test]
async fn truncated_frame_then_hang_up_closes_the_channel() {
    for cut in [2usize, 4 + 1] {
        let (chan, mut guest, _) = connect().await;
        let (ping, op) = pending_ping(&chan, &mut guest).await;
        let frame = encode(op, &GuestMsg::Pong(1)).unwrap();
        guest.raw(&frame[..cut]).await;
        drop(guest);
        let reason = closed_reason(within(ping).await);
        assert!(
            reason.contains("connection closed mid-frame"),
            "cut {cut}: {reason}"
        );
        assert_refuses_new_ops(&chan, &reason).await;
    }
}

#[tokio::test]
async fn clean_hang_up_fails_pending_ops() {
    let (chan, mut guest, _) = connect().await;
    let (mut exec, _) = start_exec(&chan, &mut guest).await;
    drop(guest);
    let reason = closed_reason(within(exec.next_event()).await);
    assert_eq!(reason, "guest hung up");
    assert_refuses_new_ops(&chan, &reason).await;
}

// ---------------------------------------------------------------------------------------------
// A stuck guest: deadlines, abort, abandoned execs. These run on a paused clock: tokio moves
// it forward whenever every task waits, so a deadline of minutes passes at once, and an outer
// bound of an hour turns a host that waits forever into a failure.

/// Turns a host that waits forever on a stuck guest into a failure (on the paused clock).
async fn eventually<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(3600), f)
        .await
        .expect("the host waited forever on a stuck guest")
}

/// Starts an exec with a timeout; the guest answers `Started`. Returns the handle and op id.
async fn start_timed_exec(chan: &Channel, guest: &mut Guest, timeout: Duration) -> (Exec, u32) {
    let mut req = exec_request();
    req.timeout_ms = Some(timeout.as_millis() as u64);
    let (exec, op) = tokio::join!(chan.exec(req), async {
        let env = guest.recv().await;
        guest.send(env.op, GuestMsg::Started(42)).await;
        env.op
    });
    (exec.expect("exec must start"), op)
}

fn timeout_of<T: std::fmt::Debug>(r: Result<T, ChannelError>) -> Duration {
    match r {
        Err(ChannelError::Timeout(d)) => d,
        other => panic!("expected a timeout, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn exec_whose_guest_sends_half_a_frame_then_stalls_times_out() {
    let (chan, mut guest, _) = connect().await;
    let (mut exec, op) = start_timed_exec(&chan, &mut guest, Duration::from_secs(5)).await;
    let frame = encode(op, &GuestMsg::Stdout(b"partial".to_vec())).unwrap();
    guest.raw(&frame[..frame.len() / 2]).await;
    let waited = timeout_of(eventually(exec.next_event()).await);
    assert_eq!(waited, Duration::from_secs(5) + EXEC_GRACE);
}

#[tokio::test(start_paused = true)]
async fn exec_whose_guest_stops_answering_times_out_and_is_killed() {
    let (chan, mut guest, _) = connect().await;
    let (mut exec, op) = start_timed_exec(&chan, &mut guest, Duration::from_secs(1)).await;
    guest
        .send(op, GuestMsg::Stdout(b"one line\n".to_vec()))
        .await;
    assert_eq!(
        exec.next_event().await.unwrap(),
        ExecEvent::Stdout(b"one line\n".to_vec())
    );
    let waited = timeout_of(eventually(exec.next_event()).await);
    assert_eq!(waited, Duration::from_secs(1) + EXEC_GRACE);
    // Given up on, the process is killed rather than left running unseen.
    drop(exec);
    let env = eventually(guest.recv()).await;
    assert_eq!((env.op, env.msg), (op, HostMsg::Signal(9)));
}

#[tokio::test(start_paused = true)]
async fn a_reply_the_guest_never_sends_times_out() {
    let (chan, mut guest, _) = connect().await;
    let (ping, _) = pending_ping(&chan, &mut guest).await;
    assert_eq!(timeout_of(eventually(ping).await), REPLY_DEADLINE);
}

#[tokio::test(start_paused = true)]
async fn a_guest_that_stops_reading_closes_the_channel() {
    // The guest reads nothing: the host's writes fill the stream's buffer and then wait.
    let (host_end, guest_end) = tokio::io::duplex(64 * 1024);
    let (rd, mut wr) = tokio::io::split(guest_end);
    let reply = encode(0, &GuestMsg::Welcome(welcome(PROTOCOL_VERSION))).unwrap();
    wr.write_all(&reply).await.unwrap();
    let chan = Channel::connect(host_end).await.unwrap();
    let req = hutch_protocol::WriteFileRequest {
        path: "/big".into(),
        mode: 0o644,
        make_parents: false,
    };
    let data = vec![7u8; 512 * 1024];
    let written = eventually(chan.write_file(req, &data[..])).await;
    assert_eq!(timeout_of(written), WRITE_DEADLINE);
    let reason = closed_reason(eventually(chan.ping(7)).await);
    assert!(reason.contains("stopped reading"), "{reason}");
    drop(rd);
}

#[tokio::test]
async fn abort_ends_pending_operations_with_its_reason() {
    let (chan, mut guest, _) = connect().await;
    let (mut exec, _) = start_exec(&chan, &mut guest).await;
    let (ping, _) = pending_ping(&chan, &mut guest).await;
    let reason = "the sandbox failed: the VM exited";
    let (event, ping, ()) =
        within(async { tokio::join!(exec.next_event(), ping, async { chan.abort(reason) }) }).await;
    assert_eq!(closed_reason(event), reason);
    assert_eq!(closed_reason(ping), reason);
    assert_refuses_new_ops(&chan, reason).await;
}

#[tokio::test]
async fn abort_wakes_a_write_stuck_on_a_guest_that_does_not_read() {
    let (host_end, guest_end) = tokio::io::duplex(64 * 1024);
    let (_rd, mut wr) = tokio::io::split(guest_end);
    let reply = encode(0, &GuestMsg::Welcome(welcome(PROTOCOL_VERSION))).unwrap();
    wr.write_all(&reply).await.unwrap();
    let chan = within(Channel::connect(host_end)).await.unwrap();
    let req = hutch_protocol::WriteFileRequest {
        path: "/big".into(),
        mode: 0o644,
        make_parents: false,
    };
    let data = vec![7u8; 512 * 1024];
    let (written, ()) = within(async {
        tokio::join!(chan.write_file(req, &data[..]), async {
            // Let the writer fill the buffer and block first.
            for _ in 0..100 {
                tokio::task::yield_now().await;
            }
            chan.abort("the sandbox failed");
        })
    })
    .await;
    assert_eq!(closed_reason(written), "the sandbox failed");
}

#[tokio::test]
async fn a_dropped_exec_kills_its_process() {
    let (chan, mut guest, _) = connect().await;
    let (exec, op) = start_exec(&chan, &mut guest).await;
    drop(exec);
    let env = within(guest.recv()).await;
    assert_eq!((env.op, env.msg), (op, HostMsg::Signal(9)));
}

#[tokio::test]
async fn an_exec_that_exited_is_not_signalled_when_dropped() {
    let (chan, mut guest, _) = connect().await;
    let (mut exec, op) = start_exec(&chan, &mut guest).await;
    guest.send(op, exited()).await;
    assert!(matches!(
        within(exec.next_event()).await.unwrap(),
        ExecEvent::Exited(_)
    ));
    drop(exec);
    // Time for a kill, if one were sent, to reach the wire first.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    // The next frame on the wire is this ping, not a signal.
    let (ping, ping_op) = pending_ping(&chan, &mut guest).await;
    guest.send(ping_op, GuestMsg::Pong(1)).await;
    within(ping).await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Handshake.

fn handshake_error(r: Result<Channel, ChannelError>) -> HandshakeError {
    match r {
        Err(ChannelError::Handshake(e)) => e,
        Err(other) => panic!("expected a handshake error, got {other:?}"),
        Ok(_) => panic!("the handshake must fail"),
    }
}

#[tokio::test]
async fn handshake_with_bad_magic_fails() {
    let mut w = welcome(PROTOCOL_VERSION);
    w.magic = *b"EVIL";
    let (r, _guest, _) = handshake(&encode(0, &GuestMsg::Welcome(w)).unwrap()).await;
    assert_eq!(handshake_error(r), HandshakeError::BadMagic);
}

#[tokio::test]
async fn handshake_with_unsupported_version_fails() {
    for v in [0, PROTOCOL_VERSION + 1, u16::MAX] {
        let reply = encode(0, &GuestMsg::Welcome(welcome(v))).unwrap();
        let (r, _guest, _) = handshake(&reply).await;
        assert_eq!(handshake_error(r), HandshakeError::NotOffered(v));
    }
}

#[tokio::test]
async fn handshake_with_a_refusal_or_another_message_fails() {
    let e = OpError {
        code: ErrorCode::UnsupportedVersion,
        message: "too old".into(),
    };
    let (r, _guest, _) = handshake(&encode(0, &GuestMsg::Error(e.clone())).unwrap()).await;
    assert_eq!(handshake_error(r), HandshakeError::Refused(e));
    let (r, _guest, _) = handshake(&encode(0, &GuestMsg::Done).unwrap()).await;
    assert!(matches!(handshake_error(r), HandshakeError::Unexpected(_)));
}

#[tokio::test]
async fn handshake_with_garbage_or_oversized_frame_fails() {
    let (r, _guest, _) = handshake(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).await;
    assert!(matches!(r, Err(ChannelError::Frame(_))), "{:?}", r.err());
    reset_largest_alloc();
    let (r, _guest, read) = handshake(&u32::MAX.to_le_bytes()).await;
    assert!(
        matches!(
            r,
            Err(ChannelError::Frame(hutch_protocol::FrameError::TooLarge(_)))
        ),
        "{:?}",
        r.err()
    );
    assert_eq!(read.load(Ordering::SeqCst), 4);
    assert!(largest_alloc() < MAX_FRAME);
}

#[tokio::test]
async fn handshake_hang_up_fails() {
    // Gone before the Hello.
    let (host_end, guest_end) = tokio::io::duplex(1024);
    drop(guest_end);
    let r = within(Channel::connect(host_end)).await;
    assert!(matches!(r, Err(ChannelError::Write(_))), "{:?}", r.err());

    // Reads the Hello, then hangs up without a word, or halfway through a Welcome.
    let welcome_frame = encode(0, &GuestMsg::Welcome(welcome(PROTOCOL_VERSION))).unwrap();
    for cut in [0, 3, welcome_frame.len() - 1] {
        let (host_end, guest_end) = tokio::io::duplex(1024);
        let (rd, wr) = tokio::io::split(guest_end);
        let mut guest = Guest {
            rd: FrameReader::new(rd),
            wr,
        };
        let connect = tokio::spawn(Channel::connect(host_end));
        assert!(matches!(guest.recv().await.msg, HostMsg::Hello(_)));
        guest.raw(&welcome_frame[..cut]).await;
        drop(guest);
        let r = within(connect).await.unwrap();
        match (cut, r) {
            (0, Err(ChannelError::Closed(reason))) => {
                assert!(reason.contains("during handshake"), "{reason}")
            }
            (_, Err(ChannelError::Frame(hutch_protocol::FrameError::Truncated))) if cut > 0 => {}
            (_, other) => panic!("cut {cut}: unexpected {:?}", other.err()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A well-behaved guest and a slow consumer: credit flows back, nothing deadlocks or is lost.

fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 11)) as u8
}

#[tokio::test]
async fn slow_consumer_receives_8_mib_intact_under_credit() {
    const TOTAL: usize = 8 * 1024 * 1024;
    let (chan, mut guest, _) = connect().await;
    let (mut exec, op) = start_exec(&chan, &mut guest).await;

    let guest_task = tokio::spawn(async move {
        // Odd chunk sizes so chunks never line up with the window or the grant batches.
        let sizes = [MAX_CHUNK, 1, 40_000, 4093, MAX_CHUNK - 1, 12_345];
        let (mut sent, mut outstanding, mut credits) = (0usize, 0usize, 0usize);
        let mut i = 0;
        while sent < TOTAL {
            let n = sizes[i % sizes.len()].min(TOTAL - sent);
            i += 1;
            while outstanding + n > STREAM_WINDOW as usize {
                let env = guest.recv().await;
                match env.msg {
                    HostMsg::Credit(c) => {
                        assert_eq!(env.op, op);
                        assert!(c as usize <= outstanding, "host over-granted");
                        outstanding -= c as usize;
                        credits += 1;
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            let chunk: Vec<u8> = (sent..sent + n).map(pattern).collect();
            let msg = if i % 3 == 1 {
                GuestMsg::Stderr(chunk)
            } else {
                GuestMsg::Stdout(chunk)
            };
            guest.send(op, msg).await;
            sent += n;
            outstanding += n;
        }
        guest.send(op, exited()).await;
        (guest, credits)
    });

    let mut got = 0usize;
    let mut events = 0usize;
    loop {
        match within(exec.next_event())
            .await
            .expect("stream must stay healthy")
        {
            ExecEvent::Stdout(d) | ExecEvent::Stderr(d) => {
                for (k, b) in d.iter().enumerate() {
                    assert_eq!(*b, pattern(got + k), "byte {} corrupted", got + k);
                }
                got += d.len();
                events += 1;
                // A slow consumer: let the guest run ahead until it is blocked on credit.
                if events % 7 == 3 {
                    for _ in 0..4 {
                        tokio::task::yield_now().await;
                    }
                }
            }
            ExecEvent::Exited(info) => {
                assert_eq!(info.status, ExitStatus::Code(0));
                break;
            }
        }
    }
    assert_eq!(got, TOTAL);
    let (_guest, credits) = within(guest_task).await.unwrap();
    assert!(
        credits >= TOTAL / STREAM_WINDOW as usize - 1,
        "the guest should have needed credit many times, got {credits}"
    );
}

#[tokio::test]
async fn stale_operation_frames_before_the_welcome_are_skipped_but_bounded() {
    // Leftovers meant for a previous host (e.g. before a daemon restart), then the Welcome.
    let mut reply = Vec::new();
    for op in [3u32, 3, 9] {
        reply.extend(encode(op, &GuestMsg::Stdout(b"old".to_vec())).unwrap());
    }
    reply.extend(encode(0, &GuestMsg::Welcome(welcome(PROTOCOL_VERSION))).unwrap());
    let (r, _guest, _) = handshake(&reply).await;
    assert!(r.is_ok(), "stale frames broke the handshake: {:?}", r.err());
    // Without a Welcome in sight, the skipping stops.
    let mut flood = Vec::new();
    for _ in 0..5000 {
        flood.extend(encode(1, &GuestMsg::Pong(1)).unwrap());
    }
    let (r, _guest, _) = handshake(&flood).await;
    assert!(
        matches!(r, Err(ChannelError::Violation(_))),
        "{:?}",
        r.err()
    );
}

// ---------------------------------------------------------------------------------------------
// Versions: what the host sends depends on the version the guest chose.

fn identity() -> GuestIdentity {
    GuestIdentity {
        machine_id: [0xab; 16],
        sandbox_id: "sb-1".into(),
    }
}

#[tokio::test]
async fn identity_is_one_message_for_a_version_4_guest() {
    let (chan, mut guest, _) = connect().await;
    let host = tokio::spawn(async move { chan.identity(identity()).await });
    let msg = within(guest.recv()).await;
    assert_eq!(msg.msg, HostMsg::Identity(identity()));
    guest.send(msg.op, GuestMsg::Done).await;
    within(host).await.unwrap().expect("identity applied");
}

#[tokio::test]
async fn trust_is_refused_for_a_version_4_guest_without_a_message() {
    let reply = encode(0, &GuestMsg::Welcome(welcome(4))).unwrap();
    let (chan, _guest, _) = handshake(&reply).await;
    let chan = chan.expect("version 4 is still spoken");
    let trust = hutch_protocol::GuestTrust {
        ca_pem: String::new(),
        git: vec![],
    };
    let e = within(chan.trust(trust)).await.unwrap_err();
    assert!(
        matches!(&e, ChannelError::Remote(op) if op.code == ErrorCode::UnsupportedVersion),
        "{e}"
    );
    // The channel still works: nothing was sent that the guest would not understand.
    let ping = tokio::spawn(async move { chan.ping(5).await });
    let mut guest = _guest;
    let msg = within(guest.recv()).await;
    assert_eq!(msg.msg, HostMsg::Ping(5));
    guest.send(msg.op, GuestMsg::Pong(5)).await;
    within(ping).await.unwrap().expect("pong");
}

#[tokio::test]
async fn identity_is_written_as_files_for_a_version_3_guest() {
    let reply = encode(0, &GuestMsg::Welcome(welcome(3))).unwrap();
    let (chan, mut guest, _) = handshake(&reply).await;
    let chan = chan.expect("version 3 is still spoken");
    let host = tokio::spawn(async move { chan.identity(identity()).await });
    let mut written = Vec::new();
    for _ in 0..2 {
        let start = within(guest.recv()).await;
        let HostMsg::WriteFile(req) = start.msg else {
            panic!("expected a WriteFile, got {:?}", start.msg);
        };
        let mut content = Vec::new();
        loop {
            match within(guest.recv()).await.msg {
                HostMsg::FileData(d) => content.extend(d),
                HostMsg::FileEof => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        guest.send(start.op, GuestMsg::Done).await;
        written.push((req.path, req.mode, String::from_utf8(content).unwrap()));
    }
    within(host).await.unwrap().expect("identity written");
    assert_eq!(
        written,
        [
            (
                "/etc/machine-id".into(),
                0o444,
                format!("{}\n", "ab".repeat(16))
            ),
            ("/etc/hutch/sandbox-id".into(), 0o444, "sb-1\n".to_string()),
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Guest-started requests: workload identity tokens.

/// An issuer bound to one sandbox: answers `<sandbox>:<audience>`, counting what it issued.
struct Issuer {
    sandbox: &'static str,
    issued: Arc<AtomicUsize>,
}

impl TokenIssuer for Issuer {
    fn issue(&self, audience: String) -> TokenFuture {
        self.issued.fetch_add(1, Ordering::SeqCst);
        let token = format!("{}:{audience}", self.sandbox);
        Box::pin(async move { Ok(token) })
    }
}

/// An issuer that never answers, so requests stay in flight.
struct Stuck;

impl TokenIssuer for Stuck {
    fn issue(&self, _audience: String) -> TokenFuture {
        Box::pin(std::future::pending())
    }
}

/// A connected channel that serves tokens for sandbox `sb-1`; the issuer's count.
async fn connect_issuing() -> (Channel, Guest, Arc<AtomicUsize>) {
    let (chan, guest, _) = connect().await;
    let issued = Arc::new(AtomicUsize::new(0));
    chan.serve_tokens(Arc::new(Issuer {
        sandbox: "sb-1",
        issued: issued.clone(),
    }));
    (chan, guest, issued)
}

fn token_request(audience: &str) -> GuestMsg {
    GuestMsg::TokenRequest(TokenRequest {
        audience: audience.into(),
    })
}

/// The guest asks on guest operation `n` and returns the host's answer.
async fn ask(guest: &mut Guest, n: u32, audience: &str) -> HostMsg {
    let op = GUEST_OP_BIT | n;
    guest.send(op, token_request(audience)).await;
    let env = within(guest.recv()).await;
    assert_eq!(env.op, op, "the answer must name the guest's operation");
    env.msg
}

fn refusal_code(msg: HostMsg) -> ErrorCode {
    match msg {
        HostMsg::Refused(e) => e.code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_token_request_is_answered_by_the_channels_own_issuer() {
    let (chan, mut guest, issued) = connect_issuing().await;
    assert_eq!(
        ask(&mut guest, 1, "https://svc.example").await,
        HostMsg::Token("sb-1:https://svc.example".into())
    );
    // The host's own operations go on meanwhile.
    let (ping, op) = pending_ping(&chan, &mut guest).await;
    guest.send(op, GuestMsg::Pong(1)).await;
    within(ping).await.unwrap();
    assert_eq!(issued.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn without_an_issuer_token_requests_are_refused() {
    let (chan, mut guest, _) = connect().await;
    assert_eq!(
        refusal_code(ask(&mut guest, 1, "aud").await),
        ErrorCode::NotFound
    );
    within(async {
        tokio::join!(chan.ping(3), async {
            let env = guest.recv().await;
            guest.send(env.op, GuestMsg::Pong(3)).await;
        })
    })
    .await
    .0
    .expect("the channel must stay open after a refusal");
}

#[tokio::test]
async fn bad_audiences_are_refused_without_reaching_the_issuer() {
    let (_chan, mut guest, issued) = connect_issuing().await;
    let long = "a".repeat(TokenRequest::MAX_AUDIENCE + 1);
    for (n, bad) in ["", "two words", "tab\there", "nl\n", "ünï", long.as_str()]
        .into_iter()
        .enumerate()
    {
        let code = refusal_code(ask(&mut guest, n as u32 + 1, bad).await);
        assert_eq!(code, ErrorCode::InvalidRequest, "audience {bad:?}");
    }
    let longest = "a".repeat(TokenRequest::MAX_AUDIENCE);
    assert!(matches!(
        ask(&mut guest, 99, &longest).await,
        HostMsg::Token(_)
    ));
    assert_eq!(
        issued.load(Ordering::SeqCst),
        1,
        "only the valid one is issued"
    );
}

#[tokio::test(start_paused = true)]
async fn token_requests_beyond_the_burst_are_rate_limited_until_refilled() {
    let (_chan, mut guest, issued) = connect_issuing().await;
    for n in 0..TOKEN_BURST {
        assert!(matches!(ask(&mut guest, n, "aud").await, HostMsg::Token(_)));
    }
    let over = ask(&mut guest, 100, "aud").await;
    assert_eq!(refusal_code(over), ErrorCode::RateLimited);
    assert_eq!(issued.load(Ordering::SeqCst), TOKEN_BURST as usize);
    tokio::time::advance(TOKEN_REFILL).await;
    assert!(matches!(
        ask(&mut guest, 101, "aud").await,
        HostMsg::Token(_)
    ));
    let again = ask(&mut guest, 102, "aud").await;
    assert_eq!(refusal_code(again), ErrorCode::RateLimited);
}

#[tokio::test]
async fn token_requests_in_flight_are_bounded() {
    let (chan, mut guest, _) = connect().await;
    chan.serve_tokens(Arc::new(Stuck));
    for n in 0..MAX_GUEST_REQUESTS as u32 {
        guest.send(GUEST_OP_BIT | n, token_request("aud")).await;
    }
    let code = refusal_code(ask(&mut guest, 1000, "aud").await);
    assert_eq!(code, ErrorCode::RateLimited);
}

#[tokio::test]
async fn a_repeated_guest_operation_closes_the_channel() {
    let (chan, mut guest, _) = connect().await;
    chan.serve_tokens(Arc::new(Stuck));
    let (ping, _) = pending_ping(&chan, &mut guest).await;
    guest.send(GUEST_OP_BIT | 7, token_request("aud")).await;
    guest.send(GUEST_OP_BIT | 7, token_request("aud")).await;
    let reason = closed_reason(within(ping).await);
    assert!(
        reason.contains("second request on guest operation"),
        "reason: {reason}"
    );
    assert_refuses_new_ops(&chan, &reason).await;
}

#[tokio::test]
async fn guest_operations_carry_only_requests_and_requests_only_guest_operations() {
    let cases: Vec<(u32, GuestMsg, &str)> = vec![
        (GUEST_OP_BIT | 1, GuestMsg::Done, "Done on guest operation"),
        (
            GUEST_OP_BIT | 1,
            GuestMsg::Stdout(b"x".to_vec()),
            "Stdout on guest operation",
        ),
        (5, token_request("aud"), "TokenRequest on host operation 5"),
    ];
    for (op, msg, expected) in cases {
        let (chan, mut guest, _) = connect_issuing().await;
        let (ping, _) = pending_ping(&chan, &mut guest).await;
        guest.send(op, msg).await;
        let reason = closed_reason(within(ping).await);
        assert!(reason.contains(expected), "reason: {reason}");
    }
}

#[tokio::test]
async fn a_token_request_on_protocol_version_4_closes_the_channel() {
    let reply = encode(0, &GuestMsg::Welcome(welcome(4))).unwrap();
    let (chan, mut guest, _) = handshake(&reply).await;
    let chan = chan.expect("version 4 is still spoken");
    let (ping, _) = pending_ping(&chan, &mut guest).await;
    guest.send(GUEST_OP_BIT | 1, token_request("aud")).await;
    let reason = closed_reason(within(ping).await);
    assert!(
        reason.contains("TokenRequest on protocol version 4"),
        "reason: {reason}"
    );
}

// ---------------------------------------------------------------------------------------------
// Guest-started streams: forwarded SSH agent connections (version 6).

/// An agent that echoes what it reads, counting connections.
struct Echo(Arc<AtomicUsize>);

impl SshAgentServer for Echo {
    fn serve(&self, stream: DuplexStream) -> SshAgentFuture {
        self.0.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let (mut rd, mut wr) = tokio::io::split(stream);
            let _ = tokio::io::copy(&mut rd, &mut wr).await;
        })
    }
}

/// An agent that holds its connection and never reads it.
struct Deaf;

impl SshAgentServer for Deaf {
    fn serve(&self, stream: DuplexStream) -> SshAgentFuture {
        Box::pin(async move {
            std::future::pending::<()>().await;
            drop(stream);
        })
    }
}

/// An agent that writes `n` bytes as soon as it is connected, then closes.
struct Talker(usize);

impl SshAgentServer for Talker {
    fn serve(&self, mut stream: DuplexStream) -> SshAgentFuture {
        let n = self.0;
        Box::pin(async move {
            let _ = stream.write_all(&vec![7u8; n]).await;
        })
    }
}

async fn connect_ssh(server: impl SshAgentServer + 'static) -> (Channel, Guest) {
    let (chan, guest, _) = connect().await;
    chan.serve_ssh_agent(Arc::new(server));
    (chan, guest)
}

/// The channel still serves the host's own operations.
async fn assert_channel_open(chan: &Channel, guest: &mut Guest) {
    let (ping, op) = pending_ping(chan, guest).await;
    guest.send(op, GuestMsg::Pong(1)).await;
    within(ping).await.expect("the channel must stay open");
}

#[tokio::test]
async fn an_ssh_connection_reaches_the_channels_agent_and_back_under_credit() {
    let served = Arc::new(AtomicUsize::new(0));
    let (chan, mut guest) = connect_ssh(Echo(served.clone())).await;
    let op = GUEST_OP_BIT | 3;
    guest.send(op, GuestMsg::SshOpen).await;
    guest.send(op, GuestMsg::SshData(b"hello".to_vec())).await;
    let (mut credited, mut echoed) = (0, Vec::new());
    while credited < 5 || echoed.len() < 5 {
        let env = within(guest.recv()).await;
        assert_eq!(env.op, op);
        match env.msg {
            HostMsg::Credit(n) => credited += n,
            HostMsg::SshData(d) => echoed.extend(d),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((credited, echoed.as_slice()), (5, b"hello".as_slice()));
    guest.send(op, GuestMsg::Credit(5)).await;
    guest.send(op, GuestMsg::SshClose).await;
    assert_channel_open(&chan, &mut guest).await;
    assert_eq!(served.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn without_an_agent_ssh_connections_are_closed_at_once() {
    let (chan, mut guest, _) = connect().await;
    let op = GUEST_OP_BIT | 1;
    guest.send(op, GuestMsg::SshOpen).await;
    let env = within(guest.recv()).await;
    assert_eq!((env.op, env.msg), (op, HostMsg::SshClose));
    // Bytes already on their way are taken (and credited) until the guest closes.
    guest.send(op, GuestMsg::SshData(b"x".to_vec())).await;
    let env = within(guest.recv()).await;
    assert_eq!((env.op, env.msg), (op, HostMsg::Credit(1)));
    guest.send(op, GuestMsg::SshClose).await;
    assert_channel_open(&chan, &mut guest).await;
}

#[tokio::test]
async fn the_agents_answer_reaches_the_guest_only_within_its_credit() {
    let (chan, mut guest) = connect_ssh(Talker(SSH_WINDOW as usize + 10)).await;
    let op = GUEST_OP_BIT | 1;
    guest.send(op, GuestMsg::SshOpen).await;
    let mut got = 0;
    while got < SSH_WINDOW as usize {
        match within(guest.recv()).await.msg {
            HostMsg::SshData(d) => got += d.len(),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, SSH_WINDOW as usize, "never more than the window");
    // Nothing more comes before credit: the next frame is the host's own ping.
    let mut ping = Box::pin(chan.ping(9));
    let env = tokio::select! {
        r = &mut ping => panic!("ping ended early: {r:?}"),
        env = guest.recv() => env,
    };
    assert_eq!(env.msg, HostMsg::Ping(9));
    guest.send(env.op, GuestMsg::Pong(9)).await;
    within(ping).await.unwrap();
    guest.send(op, GuestMsg::Credit(SSH_WINDOW)).await;
    let env = within(guest.recv()).await;
    assert_eq!(env.msg, HostMsg::SshData(vec![7; 10]));
    let env = within(guest.recv()).await;
    assert_eq!(env.msg, HostMsg::SshClose, "the agent closed");
}

#[tokio::test]
async fn ssh_data_beyond_the_window_closes_the_channel() {
    let (chan, mut guest) = connect_ssh(Deaf).await;
    let op = GUEST_OP_BIT | 1;
    guest.send(op, GuestMsg::SshOpen).await;
    let (ping, _) = pending_ping(&chan, &mut guest).await;
    // The host's pipe to the agent takes one chunk (credited back); the window then fills.
    let chunks = SSH_WINDOW as usize / MAX_CHUNK + 2;
    let flood = tokio::spawn(async move {
        for _ in 0..chunks {
            guest.send(op, GuestMsg::SshData(vec![1; MAX_CHUNK])).await;
        }
        guest
    });
    let reason = closed_reason(within(ping).await);
    assert!(
        reason.contains("exceeded its credit window"),
        "reason: {reason}"
    );
    assert_refuses_new_ops(&chan, &reason).await;
    flood.abort();
}

#[tokio::test]
async fn more_than_the_allowed_ssh_connections_close_the_channel() {
    let (chan, mut guest) = connect_ssh(Deaf).await;
    let (ping, _) = pending_ping(&chan, &mut guest).await;
    for n in 0..=MAX_SSH_STREAMS as u32 {
        guest.send(GUEST_OP_BIT | n, GuestMsg::SshOpen).await;
    }
    let reason = closed_reason(within(ping).await);
    assert!(
        reason.contains(&format!(
            "more than {MAX_SSH_STREAMS} SSH agent connections"
        )),
        "reason: {reason}"
    );
}

#[tokio::test]
async fn closed_ssh_connections_free_their_place() {
    let (chan, mut guest) = connect_ssh(Deaf).await;
    for n in 0..3 * MAX_SSH_STREAMS as u32 {
        guest.send(GUEST_OP_BIT | n, GuestMsg::SshOpen).await;
        guest.send(GUEST_OP_BIT | n, GuestMsg::SshClose).await;
    }
    assert_channel_open(&chan, &mut guest).await;
}

#[tokio::test]
async fn ssh_messages_out_of_place_close_the_channel() {
    let g = GUEST_OP_BIT | 1;
    let cases: Vec<(Vec<(u32, GuestMsg)>, &str)> = vec![
        (
            vec![(g, GuestMsg::SshData(b"x".to_vec()))],
            "SshData for unknown guest operation",
        ),
        (
            vec![(g, GuestMsg::SshClose)],
            "SshClose for unknown guest operation",
        ),
        (vec![(5, GuestMsg::SshOpen)], "SshOpen on host operation 5"),
        (
            vec![(5, GuestMsg::SshData(b"x".to_vec()))],
            "SshData on host operation 5",
        ),
        (
            vec![(g, GuestMsg::SshOpen), (g, GuestMsg::SshOpen)],
            "second request on guest operation",
        ),
        (
            vec![(g, GuestMsg::SshOpen), (g, token_request("aud"))],
            "second request on guest operation",
        ),
        (
            vec![(g, GuestMsg::SshOpen), (g, GuestMsg::SshData(vec![]))],
            "empty SshData chunk",
        ),
        (
            vec![(g, GuestMsg::SshOpen), (g, GuestMsg::Credit(1))],
            "credit 1 exceeds 0 bytes sent",
        ),
        (
            vec![(g, GuestMsg::SshOpen), (g, GuestMsg::Done)],
            "Done on guest operation",
        ),
        (
            vec![
                (g, GuestMsg::SshOpen),
                (g, GuestMsg::SshClose),
                (g, GuestMsg::SshData(b"x".to_vec())),
            ],
            "SshData for unknown guest operation",
        ),
    ];
    for (msgs, expected) in cases {
        let (chan, mut guest) = connect_ssh(Deaf).await;
        let (ping, _) = pending_ping(&chan, &mut guest).await;
        for (op, msg) in msgs {
            guest.send(op, msg).await;
        }
        let reason = closed_reason(within(ping).await);
        assert!(reason.contains(expected), "{expected}: reason: {reason}");
    }
}

#[tokio::test]
async fn an_ssh_connection_on_protocol_version_5_closes_the_channel() {
    let reply = encode(0, &GuestMsg::Welcome(welcome(5))).unwrap();
    let (chan, mut guest, _) = handshake(&reply).await;
    let chan = chan.expect("version 5 is still spoken");
    let (ping, _) = pending_ping(&chan, &mut guest).await;
    guest.send(GUEST_OP_BIT | 1, GuestMsg::SshOpen).await;
    let reason = closed_reason(within(ping).await);
    assert!(
        reason.contains("SshOpen on protocol version 5"),
        "reason: {reason}"
    );
}
