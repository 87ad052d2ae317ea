//! Splicing a connection the broker does not decrypt: bytes move socket → pipe → socket in the
//! kernel (splice(2)), never through the broker's memory.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::fcntl::{splice, OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes moved per splice call (a pipe's default capacity).
const CHUNK: usize = 64 * 1024;

/// Copies both ways until both directions reached end of stream; each end of stream is passed
/// on as a half-close.
pub(crate) async fn both_ways(a: &TcpStream, b: &TcpStream) -> io::Result<()> {
    let (ab, ba) = tokio::join!(one_way(a, b), one_way(b, a));
    ab.and(ba)
}

async fn one_way(from: &TcpStream, to: &TcpStream) -> io::Result<()> {
    let (pipe_r, pipe_w): (OwnedFd, OwnedFd) =
        nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        let n = from
            .async_io(Interest::READABLE, || {
                splice(from.as_fd(), None, pipe_w.as_fd(), None, CHUNK, flags)
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
