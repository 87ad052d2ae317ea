//! The guest's network, pushed by the host (`HostMsg::Network`): the NIC whose MAC the host
//! names gets the address and comes up, the default route goes through the gateway, and
//! `/etc/resolv.conf` lists the name servers. Plain ioctls, no netlink library.
//!
//! Everything in the request is checked before anything is touched; as a host process the
//! agent only validates (a test must never reconfigure the host's network).

use std::{
    io,
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use hutch_protocol::{ErrorCode, NetworkConfig, OpError};

use crate::{ops::io_error, server::invalid};

/// Where the kernel lists network interfaces.
const SYS_CLASS_NET: &str = "/sys/class/net";
/// The resolver configuration written for the guest's programs.
const RESOLV_CONF: &str = "/etc/resolv.conf";
/// How long to wait for the NIC to appear (the driver may still be probing it).
const NIC_WAIT: Duration = Duration::from_secs(5);

/// `SIOCADDRT` / `SIOCDELRT` (`<linux/sockios.h>`).
const SIOCADDRT: libc::Ioctl = 0x890B;
const SIOCDELRT: libc::Ioctl = 0x890C;
/// `RTF_UP` / `RTF_GATEWAY` (`<linux/route.h>`).
const RTF_UP: u16 = 0x0001;
const RTF_GATEWAY: u16 = 0x0002;

/// `struct rtentry` from `<linux/route.h>` (libc only has it for musl).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// A request that passed validation (IPv4 only, for now).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// NIC to configure.
    pub mac: [u8; 6],
    /// Its address.
    pub address: Ipv4Addr,
    /// Prefix length.
    pub prefix_len: u8,
    /// Default gateway.
    pub gateway: Ipv4Addr,
    /// Name servers, in order.
    pub dns: Vec<IpAddr>,
}

/// Applies `cfg` when the agent is the VM's init; as a host process it only validates.
#[allow(clippy::disallowed_methods)] // Polls for the NIC: the server calls it on the blocking pool.
pub fn apply(cfg: &NetworkConfig, is_init: bool) -> Result<(), OpError> {
    let plan = validate(cfg)?;
    if !is_init {
        return Ok(());
    }
    let deadline = Instant::now() + NIC_WAIT;
    let ifname = loop {
        if let Some(name) = find_interface(Path::new(SYS_CLASS_NET), &plan.mac) {
            break name;
        }
        if Instant::now() >= deadline {
            return Err(OpError {
                code: ErrorCode::NotFound,
                message: format!(
                    "no network interface with MAC {} within {NIC_WAIT:?}",
                    format_mac(&plan.mac)
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    configure(&ifname, &plan).map_err(|e| {
        let mut op = io_error(e);
        op.message = format!("configuring {ifname}: {}", op.message);
        op
    })?;
    write_resolv_conf(Path::new(RESOLV_CONF), &plan.dns).map_err(|e| {
        let mut op = io_error(e);
        op.message = format!("writing {RESOLV_CONF}: {}", op.message);
        op
    })?;
    tracing::info!(
        %ifname,
        address = %plan.address,
        prefix_len = plan.prefix_len,
        gateway = %plan.gateway,
        "network configured"
    );
    Ok(())
}

/// Checks every field of a host request (untrusted like any other input: bounds, no panics).
pub fn validate(cfg: &NetworkConfig) -> Result<Plan, OpError> {
    let mac = cfg.mac;
    if mac == [0; 6] || mac[0] & 1 != 0 {
        return Err(invalid(format!(
            "MAC {} is not a unicast address",
            format_mac(&mac)
        )));
    }
    let v4 = |what: &str, ip: IpAddr| match ip {
        IpAddr::V4(a) => Ok(a),
        IpAddr::V6(_) => Err(invalid(format!("{what} {ip}: IPv6 is not supported yet"))),
    };
    let address = v4("address", cfg.address)?;
    let gateway = v4("gateway", cfg.gateway)?;
    let prefix_len = cfg.prefix_len;
    if !(1..=31).contains(&prefix_len) {
        return Err(invalid(format!(
            "prefix length {prefix_len} is outside 1..=31"
        )));
    }
    let host_ok = |a: Ipv4Addr| {
        !(a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast())
    };
    if !host_ok(address) {
        return Err(invalid(format!("{address} cannot be a host's address")));
    }
    if !host_ok(gateway) {
        return Err(invalid(format!("{gateway} cannot be a gateway")));
    }
    let mask = u32::MAX << (32 - u32::from(prefix_len));
    let net = u32::from(address) & mask;
    if u32::from(gateway) & mask != net {
        return Err(invalid(format!(
            "gateway {gateway} is outside {address}/{prefix_len}"
        )));
    }
    if gateway == address {
        return Err(invalid(format!(
            "gateway {gateway} is the guest's own address"
        )));
    }
    if prefix_len <= 30 {
        let bcast = net | !mask;
        for (what, a) in [("address", address), ("gateway", gateway)] {
            let a = u32::from(a);
            if a == net || a == bcast {
                return Err(invalid(format!(
                    "{what} {} is the network or broadcast address of its subnet",
                    Ipv4Addr::from(a)
                )));
            }
        }
    }
    if cfg.dns.len() > NetworkConfig::MAX_DNS {
        return Err(invalid(format!(
            "{} name servers, at most {} are allowed",
            cfg.dns.len(),
            NetworkConfig::MAX_DNS
        )));
    }
    for d in &cfg.dns {
        if d.is_unspecified() || d.is_multicast() {
            return Err(invalid(format!("{d} cannot be a name server")));
        }
    }
    Ok(Plan {
        mac,
        address,
        prefix_len,
        gateway,
        dns: cfg.dns.clone(),
    })
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses sysfs's `address` file (`aa:bb:cc:dd:ee:ff`, trailing newline allowed).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let s = s.trim_end_matches('\n');
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        let p = parts.next()?;
        if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// The name of the interface under `sys_class_net` whose MAC is `mac`.
pub fn find_interface(sys_class_net: &Path, mac: &[u8; 6]) -> Option<String> {
    let entries = std::fs::read_dir(sys_class_net).ok()?;
    let mut found: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            if name.is_empty() || name.len() >= libc::IFNAMSIZ || name == "lo" {
                return None;
            }
            let text = std::fs::read_to_string(e.path().join("address")).ok()?;
            (parse_mac(&text)? == *mac).then_some(name)
        })
        .collect();
    // Deterministic if (oddly) two NICs share the MAC.
    found.sort();
    found.into_iter().next()
}

/// The contents of `/etc/resolv.conf` for these servers.
pub fn resolv_conf(dns: &[IpAddr]) -> String {
    let mut s = String::from("# Written by hutch-agent from the host's network configuration.\n");
    for d in dns {
        s.push_str(&format!("nameserver {d}\n"));
    }
    s
}

/// Replaces `path` (a file, or a symlink, which is replaced rather than followed) atomically.
pub fn write_resolv_conf(path: &Path, dns: &[IpAddr]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp: PathBuf = path.with_extension("hutch-tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    f.write_all(resolv_conf(dns).as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

fn sockaddr_v4(a: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(a).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes of plain data; the kernel reads a
    // sockaddr whose family says AF_INET as a sockaddr_in.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // `find_interface` only returns names shorter than IFNAMSIZ, so a NUL always follows.
    for (dst, b) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = b as libc::c_char;
    }
    req
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Address, netmask, up, then the default route (replacing any earlier default route).
fn configure(ifname: &str, plan: &Plan) -> io::Result<()> {
    if ifname.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    // SAFETY: a fresh socket we own.
    let sock = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        check(fd)?;
        OwnedFd::from_raw_fd(fd)
    };
    let s = sock.as_raw_fd();
    let mask = Ipv4Addr::from(u32::MAX << (32 - u32::from(plan.prefix_len)));
    // SAFETY: each ioctl gets a properly initialised ifreq/rtentry that outlives the call.
    unsafe {
        let mut req = ifreq(ifname);
        req.ifr_ifru.ifru_addr = sockaddr_v4(plan.address);
        check(libc::ioctl(s, libc::SIOCSIFADDR as libc::Ioctl, &req))?;
        let mut req = ifreq(ifname);
        req.ifr_ifru.ifru_netmask = sockaddr_v4(mask);
        check(libc::ioctl(s, libc::SIOCSIFNETMASK as libc::Ioctl, &req))?;
        let mut req = ifreq(ifname);
        check(libc::ioctl(s, libc::SIOCGIFFLAGS as libc::Ioctl, &mut req))?;
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        check(libc::ioctl(s, libc::SIOCSIFFLAGS as libc::Ioctl, &req))?;

        // Drop earlier default routes (a repeated request, e.g. after the host reconnects).
        for _ in 0..16 {
            let mut rt = route(Ipv4Addr::UNSPECIFIED, None, std::ptr::null_mut());
            if libc::ioctl(s, SIOCDELRT, &mut rt) < 0 {
                break;
            }
        }
        let mut dev: Vec<libc::c_char> = ifname
            .bytes()
            .map(|b| b as libc::c_char)
            .chain(std::iter::once(0))
            .collect();
        let mut rt = route(Ipv4Addr::UNSPECIFIED, Some(plan.gateway), dev.as_mut_ptr());
        check(libc::ioctl(s, SIOCADDRT, &mut rt))?;
    }
    Ok(())
}

/// A route to `dst`/0 (the default route) via `gateway` on `dev` (may be null).
fn route(dst: Ipv4Addr, gateway: Option<Ipv4Addr>, dev: *mut libc::c_char) -> RtEntry {
    RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr_v4(dst),
        rt_gateway: sockaddr_v4(gateway.unwrap_or(Ipv4Addr::UNSPECIFIED)),
        rt_genmask: sockaddr_v4(Ipv4Addr::UNSPECIFIED),
        rt_flags: RTF_UP | if gateway.is_some() { RTF_GATEWAY } else { 0 },
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: dev,
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    fn good() -> NetworkConfig {
        NetworkConfig {
            mac: [0x06, 0x00, 0xac, 0x10, 0x00, 0x02],
            address: IpAddr::V4(Ipv4Addr::new(172, 16, 0, 2)),
            prefix_len: 30,
            gateway: IpAddr::V4(Ipv4Addr::new(172, 16, 0, 1)),
            dns: vec![IpAddr::V4(Ipv4Addr::new(172, 16, 0, 1))],
        }
    }

    fn refused(f: impl FnOnce(&mut NetworkConfig)) -> String {
        let mut c = good();
        f(&mut c);
        let e = validate(&c).expect_err("should be refused");
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        e.message
    }

    #[test]
    fn accepts_the_standard_plan() {
        let p = validate(&good()).unwrap();
        assert_eq!(p.address, Ipv4Addr::new(172, 16, 0, 2));
        assert_eq!(p.gateway, Ipv4Addr::new(172, 16, 0, 1));
        assert_eq!(p.prefix_len, 30);
        // No name servers, or a v6 one, is fine; /31 has no network/broadcast address.
        let mut c = good();
        c.dns = vec![];
        assert!(validate(&c).is_ok());
        c.dns = vec![IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1))];
        assert!(validate(&c).is_ok());
        c.prefix_len = 31;
        c.address = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0));
        c.gateway = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        assert!(validate(&c).is_ok());
    }

    #[test]
    fn refuses_bad_fields() {
        assert!(refused(|c| c.mac = [0; 6]).contains("unicast"));
        assert!(refused(|c| c.mac[0] = 0x01).contains("unicast"));
        for p in [0, 32, 33, 255] {
            assert!(refused(|c| c.prefix_len = p).contains("prefix"));
        }
        assert!(refused(|c| c.address = IpAddr::V6(Ipv6Addr::LOCALHOST)).contains("IPv6"));
        assert!(refused(|c| c.gateway = IpAddr::V6(Ipv6Addr::LOCALHOST)).contains("IPv6"));
        for a in ["0.0.0.0", "127.0.0.1", "224.0.0.1", "255.255.255.255"] {
            let a: IpAddr = a.parse().unwrap();
            refused(|c| c.address = a);
            refused(|c| c.gateway = a);
        }
        assert!(refused(|c| c.gateway = "172.16.0.5".parse().unwrap()).contains("outside"));
        assert!(refused(|c| c.gateway = c.address).contains("own address"));
        assert!(refused(|c| c.address = "172.16.0.3".parse().unwrap()).contains("broadcast"));
        assert!(refused(|c| c.gateway = "172.16.0.0".parse().unwrap()).contains("network"));
        let many = vec![IpAddr::V4(Ipv4Addr::new(1, 1, 1, 1)); 4];
        assert!(refused(|c| c.dns = many).contains("name servers"));
        refused(|c| c.dns = vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)]);
        refused(|c| c.dns = vec!["ff02::1".parse().unwrap()]);
    }

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("06:00:ac:10:00:02\n"),
            Some([6, 0, 0xac, 0x10, 0, 2])
        );
        assert_eq!(
            parse_mac("06:00:AC:10:00:02"),
            Some([6, 0, 0xac, 0x10, 0, 2])
        );
        for bad in [
            "",
            "06:00:ac:10:00",
            "06:00:ac:10:00:02:03",
            "6:00:ac:10:00:02",
            "06:00:ac:10:00:zz",
            "06-00-ac-10-00-02",
            "06:00:ac:10:00:+2",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
        }
        assert_eq!(format_mac(&[6, 0, 0xac, 0x10, 0, 2]), "06:00:ac:10:00:02");
    }

    #[test]
    fn finds_the_interface_by_mac() {
        let d = tempfile::tempdir().unwrap();
        let nic = |name: &str, mac: &str| {
            std::fs::create_dir(d.path().join(name)).unwrap();
            std::fs::write(d.path().join(name).join("address"), mac).unwrap();
        };
        nic("lo", "06:00:ac:10:00:02\n");
        nic("eth0", "52:54:00:12:34:56\n");
        nic("eth1", "06:00:ac:10:00:02\n");
        nic(&"x".repeat(20), "06:00:ac:10:00:02\n");
        std::fs::create_dir(d.path().join("noaddr")).unwrap();
        let mac = [6, 0, 0xac, 0x10, 0, 2];
        assert_eq!(find_interface(d.path(), &mac).as_deref(), Some("eth1"));
        assert_eq!(find_interface(d.path(), &[2, 0, 0, 0, 0, 1]), None);
        assert_eq!(find_interface(&d.path().join("missing"), &mac), None);
    }

    #[test]
    fn resolv_conf_replaces_a_symlink_instead_of_following_it() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("elsewhere");
        std::fs::write(&target, "keep\n").unwrap();
        let path = d.path().join("resolv.conf");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let dns = [
            IpAddr::V4(Ipv4Addr::new(172, 16, 0, 1)),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ];
        write_resolv_conf(&path, &dns).unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep\n");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(
            text.ends_with("nameserver 172.16.0.1\nnameserver ::1\n"),
            "{text}"
        );
        // Again, over the regular file.
        write_resolv_conf(&path, &dns[..1]).unwrap();
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .ends_with("\nnameserver 172.16.0.1\n"));
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 2);
    }

    #[test]
    fn rtentry_has_the_kernel_layout() {
        // x86_64 and aarch64: 8 + 3*16 + 2 + 2 (+4 pad) + 8 + 8 + 2 (+6) + 8 + 8 + 8 + 2 (+6).
        assert_eq!(std::mem::size_of::<RtEntry>(), 120);
    }
}
