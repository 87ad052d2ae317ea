//! Splicing a connection the broker does not decrypt: bytes move socket → pipe → socket in the
//! kernel (splice(2)), never through the broker's memory.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// A pipe's default capacity: the most one splice moves if a bigger pipe is refused.
const CHUNK: usize = 64 * 1024;
/// The pipe capacity asked for: 1 MiB (the default `fs.pipe-max-size`), so that one wakeup
/// moves all the socket holds instead of 64 KiB at a time.
const PIPE_SIZE: usize = 1 << 20;

/// Copies both ways until both directions reached end of stream; each end of stream is passed
/// on as a half-close.
pub(crate) async fn both_ways(a: &TcpStream, b: &TcpStream) -> io::Result<()> {
    let (ab, ba) = tokio::join!(one_way(a, b), one_way(b, a));
    ab.and(ba)
}

async fn one_way(from: &TcpStream, to: &TcpStream) -> io::Result<()> {
    let (pipe_r, pipe_w): (OwnedFd, OwnedFd) =
        nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    let size = fcntl(pipe_w.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32))
        .map_or(CHUNK, |n| n as usize);
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        let n = from
            .async_io(Interest::READABLE, || {
                splice(from.as_fd(), None, pipe_w.as_fd(), None, size, flags)
                    .map_err(io::Error::from)
            })
            .await?;
        if n == 0 {
            // The peer may be gone already; its end of stream is all that matters here.
            let _ = nix::sys::socket::shutdown(to.as_raw_fd(), nix::sys::socket::Shutdown::Write);
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            left -= to
                .async_io(Interest::WRITABLE, || {
                    splice(pipe_r.as_fd(), None, to.as_fd(), None, left, flags)
                        .map_err(io::Error::from)
                })
                .await?;
        }
    }
}
