//! Published ports: a guest TCP port reachable on a host loopback port, for previews.
//!
//! The listener is a plain TCP socket bound to `127.0.0.1:<host port>` in the host namespace
//! (the [`crate::Network`]'s). Each accepted connection gets a fresh socket created inside the
//! sandbox's namespace (on an ns worker thread, then driven by tokio) that connects to the
//! guest's address and port; bytes are copied both ways. No rule changes: the namespace may
//! always originate connections to its guest, the guest's replies are `established`, and the
//! guest can still reach nothing new. Only loopback clients on the host reach the port, and
//! only that one guest port. Dropping the [`Forward`] closes the listener and every connection.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

use crate::plan::GUEST_ADDR;
use crate::{ns, NetError};

/// Connections open at once through one published port; more wait in the listen queue.
const MAX_CONNS: usize = 64;
/// How long connecting to the guest may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A guest port published on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublishedPort {
    /// The guest's TCP port.
    pub guest_port: u16,
    /// Where it is reachable on the host (always a loopback address).
    pub host: SocketAddr,
}

/// One running forward; dropping it stops the listener and every connection through it.
pub(crate) struct Forward {
    pub(crate) published: PublishedPort,
    task: JoinHandle<()>,
}

impl Forward {
    /// Stops the forward and returns once its listener and connections are closed (dropping
    /// it only starts that).
    pub(crate) async fn close(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn io_err(what: String) -> impl FnOnce(io::Error) -> NetError {
    move |source| NetError::Io { what, source }
}

/// Binds `127.0.0.1:host_port` (0: any free port) in `host_ns` and starts forwarding each
/// connection to the guest's `guest_port` through the namespace `netns`.
pub(crate) async fn start(
    host_ns: Option<PathBuf>,
    netns: PathBuf,
    guest_port: u16,
    host_port: u16,
) -> Result<Forward, NetError> {
    let listener = ns::run_in(host_ns.as_deref(), move || {
        let want = SocketAddr::from((Ipv4Addr::LOCALHOST, host_port));
        let l = std::net::TcpListener::bind(want).map_err(|source| {
            if source.kind() == io::ErrorKind::AddrInUse {
                NetError::PortInUse(host_port)
            } else {
                NetError::Io {
                    what: format!("bind {want}"),
                    source,
                }
            }
        })?;
        l.set_nonblocking(true)
            .map_err(io_err("published port nonblocking".into()))?;
        Ok(l)
    })
    .await?;
    let host = listener
        .local_addr()
        .map_err(io_err("published port address".into()))?;
    let listener =
        TcpListener::from_std(listener).map_err(io_err("register published port".into()))?;
    let target = SocketAddrV4::new(GUEST_ADDR, guest_port);
    let task = tokio::spawn(serve(listener, Arc::new(netns), target));
    Ok(Forward {
        published: PublishedPort { guest_port, host },
        task,
    })
}

async fn serve(listener: TcpListener, netns: Arc<PathBuf>, target: SocketAddrV4) {
    let slots = Arc::new(Semaphore::new(MAX_CONNS));
    // Owned here: aborting this task drops the set, which aborts every connection.
    let mut conns = JoinSet::new();
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            // Reap finished connections so the set does not grow.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let Ok((client, _)) = accepted else {
            // E.g. out of file descriptors: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let netns = netns.clone();
        conns.spawn(async move {
            if let Err(e) = relay(client, &netns, target).await {
                tracing::debug!(%target, error = %e, "published port connection ended");
            }
            drop(permit);
        });
    }
}

/// A nonblocking TCP socket created in the calling thread's namespace.
fn socket_here() -> Result<std::net::TcpStream, NetError> {
    // SAFETY: plain syscall.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io_err("socket in sandbox namespace".into())(
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: fresh fd we own.
    Ok(std::net::TcpStream::from(unsafe {
        OwnedFd::from_raw_fd(fd)
    }))
}

async fn relay(
    mut client: TcpStream,
    netns: &std::path::Path,
    target: SocketAddrV4,
) -> Result<(), NetError> {
    let sock = ns::run_in(Some(netns), socket_here).await?;
    let sock = TcpSocket::from_std_stream(sock);
    let mut guest = tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(target.into()))
        .await
        .map_err(|_| io_err(format!("connect {target}"))(io::ErrorKind::TimedOut.into()))?
        .map_err(io_err(format!("connect {target}")))?;
    tokio::io::copy_bidirectional(&mut client, &mut guest)
        .await
        .map_err(io_err(format!("relay to {target}")))?;
    Ok(())
}
