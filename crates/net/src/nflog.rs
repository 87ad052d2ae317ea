//! Reading the decision log: the sandbox table's verdict chains log (rate-limited by nft) to
//! NFLOG group [`LOG_GROUP`] *inside the sandbox's namespace*, and NFLOG instances are per
//! namespace, so each sandbox gets its own `NETLINK_NETFILTER` socket, opened in its namespace
//! and bound to that group. Messages are parsed by hand with every length checked: the payload
//! is a guest-made packet.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, SystemTime};

use crate::events::{Proto, RuleName, LOG_GROUP};
use crate::NetError;

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULA_CFG_QTHRESH: u16 = 4;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
const NFULA_TIMESTAMP: u16 = 3;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
/// Bytes of each logged packet copied to us: enough for an IPv6 header and the ports.
const COPY_RANGE: u32 = 64;
const NLMSG_HDR: usize = 16;
const NLMSG_ERROR: u16 = 2;

/// One parsed NFLOG record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogRecord {
    /// The rule whose prefix it carried.
    pub rule: RuleName,
    /// Transport protocol.
    pub proto: Proto,
    /// Destination address.
    pub dst: IpAddr,
    /// Destination port (0 without ports).
    pub dst_port: u16,
    /// When the packet was received (the kernel's timestamp; absent when it has none).
    pub time: Option<SystemTime>,
}

fn nlmsg(ty: u16, flags: u16, seq: u32, res_id: u16, attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut m = vec![0u8; NLMSG_HDR];
    // nfgenmsg: family AF_UNSPEC, version 0, res_id (big endian).
    m.extend_from_slice(&[0, 0]);
    m.extend_from_slice(&res_id.to_be_bytes());
    for (t, v) in attrs {
        let len = 4 + v.len();
        m.extend_from_slice(&(len as u16).to_ne_bytes());
        m.extend_from_slice(&t.to_ne_bytes());
        m.extend_from_slice(v);
        while !m.len().is_multiple_of(4) {
            m.push(0);
        }
    }
    let total = m.len() as u32;
    m[0..4].copy_from_slice(&total.to_ne_bytes());
    m[4..6].copy_from_slice(&ty.to_ne_bytes());
    m[6..8].copy_from_slice(&flags.to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    m
}

fn last_os(what: &str) -> NetError {
    NetError::Io {
        what: what.into(),
        source: io::Error::last_os_error(),
    }
}

/// Sends one config request and waits for its ack (blocking socket, on the ns thread).
fn request(fd: &OwnedFd, msg: &[u8], what: &str) -> Result<(), NetError> {
    // SAFETY: valid buffer.
    let n = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if n < 0 {
        return Err(last_os(what));
    }
    let mut buf = [0u8; 512];
    loop {
        // SAFETY: valid buffer.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(last_os(what));
        }
        let b = &buf[..n as usize];
        if b.len() >= NLMSG_HDR + 4 && u16::from_ne_bytes([b[4], b[5]]) == NLMSG_ERROR {
            let code = i32::from_ne_bytes([b[16], b[17], b[18], b[19]]);
            if code == 0 {
                return Ok(());
            }
            return Err(NetError::Io {
                what: what.into(),
                source: io::Error::from_raw_os_error(-code),
            });
        }
    }
}

/// On an ns worker thread: opens a `NETLINK_NETFILTER` socket in the calling thread's namespace
/// and binds it to NFLOG group [`LOG_GROUP`], copying [`COPY_RANGE`] bytes of each packet and
/// delivering each message at once. The returned socket is non-blocking.
pub fn open_socket() -> Result<OwnedFd, NetError> {
    // SAFETY: plain syscalls on a fresh fd.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(last_os("open NETLINK_NETFILTER socket"));
    }
    // SAFETY: fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: zeroed sockaddr_nl is valid; bind to an auto-assigned port id.
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: `sa` is a valid sockaddr_nl of the size passed, on a socket we own.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc != 0 {
        return Err(last_os("bind NETLINK_NETFILTER socket"));
    }
    // Asking for timestamps on any socket makes the kernel stamp every packet it receives, and
    // NFLOG passes a packet's stamp on: each log line then says when its packet arrived, not
    // when it was read (which is what domain attribution needs).
    let on: libc::c_int = 1;
    // SAFETY: valid option pointer.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMP,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    // A bigger receive buffer; overflow (ENOBUFS) only loses log lines, never verdicts.
    let size: libc::c_int = 1 << 20;
    // SAFETY: valid option pointer.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            4,
        )
    };
    let ty = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG;
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    let group = LOG_GROUP as u16;
    request(
        &fd,
        &nlmsg(
            ty,
            flags,
            1,
            group,
            &[(NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND])],
        ),
        "bind NFLOG group",
    )?;
    let mut mode = COPY_RANGE.to_be_bytes().to_vec();
    mode.extend_from_slice(&[NFULNL_COPY_PACKET, 0]);
    request(
        &fd,
        &nlmsg(ty, flags, 2, group, &[(NFULA_CFG_MODE, &mode)]),
        "set NFLOG copy mode",
    )?;
    request(
        &fd,
        &nlmsg(
            ty,
            flags,
            3,
            group,
            &[(NFULA_CFG_QTHRESH, &1u32.to_be_bytes())],
        ),
        "set NFLOG queue threshold",
    )?;
    // SAFETY: plain fcntl on our fd.
    unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    Ok(fd)
}

/// Parses every NFLOG packet message in one datagram; anything malformed or foreign (no
/// `hutch:` prefix) is skipped.
pub fn parse_datagram(mut b: &[u8]) -> Vec<LogRecord> {
    let mut out = Vec::new();
    while b.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if len < NLMSG_HDR || len > b.len() {
            break;
        }
        let ty = u16::from_ne_bytes([b[4], b[5]]);
        if ty == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET {
            if let Some(r) = parse_packet_msg(&b[NLMSG_HDR..len]) {
                out.push(r);
            }
        }
        let adv = (len + 3) & !3;
        if adv >= b.len() {
            break;
        }
        b = &b[adv..];
    }
    out
}

fn parse_packet_msg(b: &[u8]) -> Option<LogRecord> {
    // nfgenmsg: family, version, res_id; the payload's own version field is what counts.
    let mut attrs = b.get(4..)?;
    let (mut prefix, mut payload, mut time) = (None, None, None);
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let ty = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            break;
        }
        let v = &attrs[4..len];
        match ty {
            NFULA_PREFIX => prefix = Some(v),
            NFULA_PAYLOAD => payload = Some(v),
            NFULA_TIMESTAMP => time = timestamp(v),
            _ => {}
        }
        let adv = (len + 3) & !3;
        if adv >= attrs.len() {
            break;
        }
        attrs = &attrs[adv..];
    }
    let prefix = prefix?;
    let end = prefix.iter().position(|&c| c == 0).unwrap_or(prefix.len());
    let rule = RuleName::from_log_prefix(std::str::from_utf8(&prefix[..end]).ok()?)?;
    let (proto, dst, dst_port) = parse_ip(payload?)?;
    Some(LogRecord {
        rule,
        proto,
        dst,
        dst_port,
        time,
    })
}

/// `struct nfulnl_msg_packet_timestamp { __be64 sec; __be64 usec; }`.
fn timestamp(v: &[u8]) -> Option<SystemTime> {
    let sec = u64::from_be_bytes(v.get(0..8)?.try_into().ok()?);
    let usec = u64::from_be_bytes(v.get(8..16)?.try_into().ok()?);
    if usec >= 1_000_000 {
        return None;
    }
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(sec) + Duration::from_micros(usec))
}

fn port_at(p: &[u8], l4: usize) -> u16 {
    p.get(l4 + 2..l4 + 4)
        .map_or(0, |s| u16::from_be_bytes([s[0], s[1]]))
}

/// `(proto, dst, dst port)` of an IPv4 or IPv6 packet's first bytes.
pub fn parse_ip(p: &[u8]) -> Option<(Proto, IpAddr, u16)> {
    let version = p.first()? >> 4;
    let (proto_num, dst, l4) = match version {
        4 if p.len() >= 20 => {
            let ihl = usize::from(p[0] & 0xf) * 4;
            let d: [u8; 4] = p[16..20].try_into().ok()?;
            (p[9], IpAddr::V4(Ipv4Addr::from(d)), ihl)
        }
        6 if p.len() >= 40 => {
            let d: [u8; 16] = p[24..40].try_into().ok()?;
            (p[6], IpAddr::V6(Ipv6Addr::from(d)), 40)
        }
        _ => return None,
    };
    let (proto, port) = match proto_num {
        6 => (Proto::Tcp, port_at(p, l4)),
        17 => (Proto::Udp, port_at(p, l4)),
        1 | 58 => (Proto::Icmp, 0),
        n => (Proto::Other(n), 0),
    };
    Some((proto, dst, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet_msg(prefix: &str, payload: &[u8]) -> Vec<u8> {
        let mut p = prefix.as_bytes().to_vec();
        p.push(0);
        nlmsg(
            (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET,
            0,
            0,
            LOG_GROUP as u16,
            &[
                (1, &[8, 0, 3, 0]),
                (NFULA_PREFIX, &p),
                (NFULA_PAYLOAD, payload),
            ],
        )
    }

    #[test]
    fn parses_tcp_v4_and_skips_garbage() {
        let mut ip = vec![
            0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0, 172, 16, 0, 2, 203, 0, 113, 10,
        ];
        ip.extend_from_slice(&[0xc0, 0x00, 0x1f, 0x90]);
        let mut m = packet_msg("hutch:deny_policy", &ip);
        m[16] = libc::AF_INET as u8;
        let mut dgram = m.clone();
        dgram.extend_from_slice(&packet_msg("other:thing", &ip));
        let got = parse_datagram(&dgram);
        assert_eq!(
            got,
            vec![LogRecord {
                rule: RuleName::DenyPolicy,
                proto: Proto::Tcp,
                dst: "203.0.113.10".parse().unwrap(),
                dst_port: 8080,
                time: None,
            }]
        );
        // With the kernel's receive timestamp.
        let mut ts = 1_700_000_000u64.to_be_bytes().to_vec();
        ts.extend_from_slice(&250_000u64.to_be_bytes());
        let mut p = b"hutch:allow_open".to_vec();
        p.push(0);
        let mut m2 = nlmsg(
            (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET,
            0,
            0,
            LOG_GROUP as u16,
            &[
                (NFULA_TIMESTAMP, &ts),
                (NFULA_PREFIX, &p),
                (NFULA_PAYLOAD, &ip),
            ],
        );
        m2[16] = libc::AF_INET as u8;
        let got = parse_datagram(&m2);
        assert_eq!(
            got[0].time,
            Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_250))
        );
        for n in 0..m.len() {
            let _ = parse_datagram(&m[..n]);
        }
        for i in 0..m.len() {
            let mut x = m.clone();
            x[i] = 0xff;
            let _ = parse_datagram(&x);
        }
    }
}
