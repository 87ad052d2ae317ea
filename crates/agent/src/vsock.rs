//! The channel over `AF_VSOCK`, for VMMs that give the guest a vsock device (Firecracker) rather
//! than a virtio-serial port: the agent listens on [`hutch_protocol::VSOCK_PORT`] and serves
//! every connection the host opens with the same protocol as on the port.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::Arc,
    time::Duration,
};

use tokio::io::unix::AsyncFd;

use crate::{fdstream::FdStream, reaper::Reaper, server};

/// `IOCTL_VM_SOCKETS_GET_LOCAL_CID` (`_IO(7, 0xb9)`) on `/dev/vsock`.
const IOCTL_VM_SOCKETS_GET_LOCAL_CID: libc::Ioctl = 0x7b9;

/// Connections waiting to be accepted.
const BACKLOG: i32 = 16;

/// Binds a non-blocking vsock stream socket to `port` on any CID and listens on it.
///
/// A listener needs no device: it can be opened as soon as the vsock core is loaded, and takes
/// connections once a transport has one.
pub fn listen(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket/bind/listen on a descriptor we own, with a zeroed sockaddr_vm of the
    // right size.
    unsafe {
        let raw = libc::socket(
            libc::AF_VSOCK,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        );
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(raw);
        let mut addr: libc::sockaddr_vm = std::mem::zeroed();
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        addr.svm_port = port;
        if libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        ) < 0
            || libc::listen(fd.as_raw_fd(), BACKLOG) < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    }
}

/// The guest's own context id, once a guest-to-host vsock transport has a device; `None` before
/// (or without vsock).
pub fn local_cid() -> Option<u32> {
    let dev = std::fs::File::open("/dev/vsock").ok()?;
    let mut cid: u32 = libc::VMADDR_CID_ANY;
    // SAFETY: the ioctl writes one u32 through a pointer to a live u32.
    let rc = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            IOCTL_VM_SOCKETS_GET_LOCAL_CID,
            &mut cid as *mut u32,
        )
    };
    (rc == 0 && cid != libc::VMADDR_CID_ANY).then_some(cid)
}

/// Accepts connections on a listening stream socket (vsock, or a Unix socket for host tests)
/// for as long as it lives, serving each in its own task. Each connection is independent: its
/// end kills only what it started.
pub async fn serve_listener(listener: OwnedFd, reaper: Arc<Reaper>, is_init: bool) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(listener.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(
                listener.as_raw_fd(),
                libc::F_SETFL,
                flags | libc::O_NONBLOCK,
            );
        }
    }
    // SAFETY: the OwnedFd stays open and unchanged for the AsyncFd's whole life.
    let listener = match unsafe { AsyncFd::register(listener) } {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the listening socket");
            return;
        }
    };
    loop {
        let mut guard = match listener.readable().await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "listening socket failed");
                return;
            }
        };
        let accepted = guard.try_io(|l| {
            // SAFETY: accept4 on a listening descriptor we own; we take ownership of the result.
            let fd = unsafe {
                libc::accept4(
                    l.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                )
            };
            if fd < 0 {
                Err(io::Error::last_os_error())
            } else {
                // SAFETY: accept4 returned a fresh descriptor that nothing else owns.
                Ok(unsafe { OwnedFd::from_raw_fd(fd) })
            }
        });
        match accepted {
            Ok(Ok(conn)) => match FdStream::new(conn) {
                Ok(stream) => {
                    tokio::spawn(server::serve(stream, reaper.clone(), is_init));
                }
                Err(e) => tracing::warn!(error = %e, "cannot serve an accepted connection"),
            },
            Ok(Err(e)) => {
                // Out of descriptors or memory, or a connection reset before we took it: back
                // off briefly rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(_would_block) => continue,
        }
    }
}
