//! TAP and TUN devices through `/dev/net/tun` ioctls (netlink cannot create a usable TAP).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::NetError;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;

/// `IFF_TUN`: IP packets.
pub const IFF_TUN: i16 = 0x0001;
/// `IFF_TAP`: ethernet frames.
pub const IFF_TAP: i16 = 0x0002;
/// `IFF_NO_PI`: no packet-information prefix.
pub const IFF_NO_PI: i16 = 0x1000;
/// `IFF_VNET_HDR`: virtio-net header on each frame, as QEMU and Firecracker expect.
pub const IFF_VNET_HDR: i16 = 0x4000;
/// The flags every Hutch TAP is created and opened with.
pub const TAP_FLAGS: i16 = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

fn ifreq(name: &str, flags: i16) -> IfReq {
    let mut r = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags,
        _pad: [0; 22],
    };
    r.name[..name.len()].copy_from_slice(name.as_bytes());
    r
}

fn attach(name: &str, flags: i16) -> Result<OwnedFd, NetError> {
    assert!(name.len() < libc::IFNAMSIZ);
    // SAFETY: constant NUL-terminated path.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(NetError::Io {
            what: "open /dev/net/tun".into(),
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = ifreq(name, flags);
    // SAFETY: TUNSETIFF reads and writes an ifreq.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } != 0 {
        return Err(NetError::Io {
            what: format!("TUNSETIFF {name}"),
            source: io::Error::last_os_error(),
        });
    }
    Ok(fd)
}

/// Creates a persistent TAP `name` in the calling thread's namespace. It lives until deleted or
/// until its namespace dies.
pub fn create_persistent(name: &str) -> Result<(), NetError> {
    let fd = attach(name, TAP_FLAGS)?;
    // SAFETY: TUNSETPERSIST takes an integer argument.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) } != 0 {
        return Err(NetError::Io {
            what: format!("TUNSETPERSIST {name}"),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Opens a queue of the existing TAP `name` in the calling thread's namespace. The returned fd
/// works from any namespace (QEMU `-netdev tap,fd=N`, Firecracker via its jailer).
pub fn open(name: &str) -> Result<OwnedFd, NetError> {
    attach(name, TAP_FLAGS)
}

/// Creates a TUN `name` (IP packets, no packet-information prefix, nonblocking) in the calling
/// thread's namespace. It lives as long as the returned fd.
pub fn create_tun(name: &str) -> Result<OwnedFd, NetError> {
    attach(name, IFF_TUN | IFF_NO_PI)
}

/// Reads back `(name, flags)` of an open TAP fd (`TUNGETIFF`).
pub fn info(fd: &OwnedFd) -> io::Result<(String, i16)> {
    let mut req = ifreq("", 0);
    // SAFETY: TUNGETIFF writes an ifreq.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNGETIFF, &mut req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let end = req
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(req.name.len());
    Ok((String::from_utf8_lossy(&req.name[..end]).into(), req.flags))
}
