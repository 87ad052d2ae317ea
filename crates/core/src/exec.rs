//! Running one command in a sandbox and collecting its output, capped per stream: the one
//! implementation behind the API's capped exec and every step of an agent task.

use hutch_protocol::{
    host::{Channel, ChannelError, ExecEvent},
    ExecRequest, ExitStatus,
};
use hutch_task::model::{FRAME_STDERR, FRAME_STDOUT};

/// Where a running command's output goes as it comes: `(FRAME_STDOUT | FRAME_STDERR, bytes)`.
/// A sink whose receiver is gone is ignored.
pub type OutputSink = tokio::sync::mpsc::Sender<(u8, Vec<u8>)>;

/// A finished command's output, each stream cut at the cap.
#[derive(Debug)]
pub struct Collected {
    /// Stdout, at most the cap.
    pub stdout: Vec<u8>,
    /// Stderr, at most the cap.
    pub stderr: Vec<u8>,
    /// Bytes beyond the cap, per stream (stdout, stderr), read and not kept.
    pub dropped: [u64; 2],
    /// How it ended.
    pub status: ExitStatus,
    /// Whether the guest killed it at its timeout.
    pub timed_out: bool,
}

impl Collected {
    /// Whether either stream was cut.
    pub fn truncated(&self) -> bool {
        self.dropped != [0, 0]
    }
}

/// What to do with output beyond the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverCap {
    /// Kill the process (its output is data, e.g. the changeset stream).
    Kill,
    /// Let it run; the rest is read (so the guest never blocks) and dropped.
    Drop,
}

/// Why a command could not be run to its end.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The guest refused to start it (not found, not executable, bad request).
    #[error("the command could not start")]
    Start(#[source] ChannelError),
    /// The channel failed while it ran.
    #[error("guest channel failed while the command ran")]
    Stream(#[source] ChannelError),
}

impl ExecError {
    /// The channel error underneath.
    pub fn into_channel(self) -> ChannelError {
        match self {
            ExecError::Start(e) | ExecError::Stream(e) => e,
        }
    }
}

/// Runs `req` to its end, feeding `stdin` (then closing it), keeping at most `cap` bytes per
/// stream and forwarding all output to `sink`.
pub async fn run_capped(
    channel: &Channel,
    req: ExecRequest,
    stdin: Option<Vec<u8>>,
    cap: usize,
    over: OverCap,
    sink: Option<&OutputSink>,
) -> Result<Collected, ExecError> {
    run_capped_observed(channel, req, stdin, cap, over, sink, |_, _| {}).await
}

/// [`run_capped`], showing `observe` every chunk of output as it comes, beyond the cap too:
/// `(0 stdout | 1 stderr, bytes)` (a session recording).
pub async fn run_capped_observed(
    channel: &Channel,
    req: ExecRequest,
    stdin: Option<Vec<u8>>,
    cap: usize,
    over: OverCap,
    sink: Option<&OutputSink>,
    mut observe: impl FnMut(usize, &[u8]) + Send,
) -> Result<Collected, ExecError> {
    let mut exec = channel.exec(req).await.map_err(ExecError::Start)?;
    let ctl = exec.control();
    if let Some(input) = stdin {
        let ctl = ctl.clone();
        tokio::spawn(async move {
            let _ = ctl.write_stdin(&input).await;
            let _ = ctl.close_stdin().await;
        });
    }
    let (mut stdout, mut stderr, mut dropped) = (Vec::new(), Vec::new(), [0u64; 2]);
    loop {
        let (buf, n, data) = match exec.next_event().await.map_err(ExecError::Stream)? {
            ExecEvent::Stdout(d) => (&mut stdout, 0, d),
            ExecEvent::Stderr(d) => (&mut stderr, 1, d),
            ExecEvent::Exited(exit) => {
                return Ok(Collected {
                    stdout,
                    stderr,
                    dropped,
                    status: exit.status,
                    timed_out: exit.timed_out,
                })
            }
        };
        observe(n, &data);
        if let Some(sink) = sink {
            let kind = if n == 0 { FRAME_STDOUT } else { FRAME_STDERR };
            let _ = sink.send((kind, data.clone())).await;
        }
        let room = cap.saturating_sub(buf.len());
        if data.len() > room {
            if over == OverCap::Kill && dropped == [0, 0] {
                let _ = ctl.signal(libc::SIGKILL).await;
            }
            buf.extend_from_slice(&data[..room]);
            dropped[n] += (data.len() - room) as u64;
        } else {
            buf.extend_from_slice(&data);
        }
    }
}

/// `(exit code, signal)` of a status: exactly one is set.
pub fn split_status(status: ExitStatus) -> (Option<i32>, Option<i32>) {
    match status {
        ExitStatus::Code(c) => (Some(c), None),
        ExitStatus::Signal(s) => (None, Some(s)),
    }
}
