//! A real VM on a real sandbox network: the `default` image (agent as PID 1) under QEMU with a
//! TAP from `hutch-net` in its own namespace, configured over the channel (`HostMsg::Network`).
//!
//! The test's "world" is three namespaces it creates, as in `crates/net/tests`: `H` plays the
//! host (the Network's host side runs there through `NetConfig::host_netns`), `I` the internet
//! (HTTP on 203.0.113.10 and 169.254.169.254, behind H's uplink 198.51.100.1/24) and `L` a LAN
//! (HTTP on 192.168.77.10, on a second H interface). Nothing leaves these namespaces. Every
//! server listens on 0.0.0.0, so a refused connection is the sandbox policy's doing.
//!
//! Needs root, `ip`, `nft`, QEMU and the `default` image (`hutch image build`) in
//! `$HUTCH_HOME` (default `/var/lib/hutch`); otherwise a SKIP line, or a failure with
//! `HUTCH_REQUIRE_VM_TESTS=1`.

// Tests wait on processes and threads synchronously, on threads of their own.
#![allow(clippy::disallowed_methods)]

mod common;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::{pids_named, skip};
use hutch_net::testbed::{World, INET, LAN, METADATA};
use hutch_net::{Network, OwnedObject, Policy, SandboxNet};
use hutch_protocol::{
    host::{Channel, ExecEvent},
    ExecRequest, ExitStatus, NetworkConfig, Setup,
};
use hutch_vmm::{kill_recorded, Accel, Lifetime, Nic, QemuVmm, Tap, Vm, VmSpec, Vmm};

/// TCG boots are slow, and tests run in parallel on small hosts.
const BOOT_LIMIT: Duration = Duration::from_secs(120);

fn sh_out(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

/// The image to boot, or why the test cannot run.
fn prerequisites() -> Result<hutch_image::Image, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("needs root (network namespaces, TAP, nftables)".into());
    }
    for p in ["ip", "nft"] {
        if !have(p) {
            return Err(format!("{p} not found (apt-get install iproute2 nftables)"));
        }
    }
    if !Path::new("/dev/net/tun").exists() {
        return Err("/dev/net/tun is missing".into());
    }
    hutch_vmm::find_qemu().map_err(|e| e.to_string())?;
    let home = std::env::var_os("HUTCH_HOME")
        .map_or_else(|| PathBuf::from("/var/lib/hutch"), PathBuf::from);
    hutch_image::open(&home.join("images"), "default")
        .map_err(|e| format!("no default image in {}: {e}", home.display()))
}

/// Kills a detached VM when the test fails half-way (dropping its handle leaves it running).
struct KillOnPanic(u32, u64);

impl Drop for KillOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = kill_recorded(self.0, self.1);
        }
    }
}

struct Output {
    stdout: String,
    stderr: String,
    code: i32,
    elapsed: Duration,
}

async fn run(ch: &Channel, script: &str) -> Output {
    let started = Instant::now();
    let mut req = ExecRequest::shell(script);
    req.timeout_ms = Some(60_000);
    let mut exec = ch.exec(req).await.unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = loop {
        match exec.next_event().await.unwrap() {
            ExecEvent::Stdout(d) => out.extend(d),
            ExecEvent::Stderr(d) => err.extend(d),
            ExecEvent::Exited(info) => {
                assert!(!info.timed_out, "{script:?} timed out");
                break match info.status {
                    ExitStatus::Code(c) => c,
                    ExitStatus::Signal(s) => 128 + s,
                };
            }
        }
    };
    Output {
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::from_utf8_lossy(&err).into_owned(),
        code,
        elapsed: started.elapsed(),
    }
}

/// Connects to the agent, handshakes, and sends Setup then Network.
async fn attach(vm: &dyn Vm, id: &str, net: &SandboxNet) -> Channel {
    let connect = async {
        let stream = vm.connect_channel().await.unwrap();
        Channel::connect(stream).await
    };
    let ch = match tokio::time::timeout(BOOT_LIMIT, connect).await {
        Ok(Ok(ch)) => ch,
        Ok(Err(e)) => panic!(
            "handshake failed: {e:?} (is the default image's agent older than this protocol? \
             rebuild it with `hutch image build`); console:\n{}",
            console_tail(vm)
        ),
        Err(_) => panic!(
            "no agent within {BOOT_LIMIT:?}; console:\n{}",
            console_tail(vm)
        ),
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap();
    ch.setup(Setup {
        entropy: vec![7; 32],
        unix_secs: now.as_secs(),
        unix_nanos: now.subsec_nanos(),
        hostname: id.into(),
    })
    .await
    .unwrap();
    let g = &net.guest;
    ch.network(NetworkConfig {
        mac: g.mac,
        address: IpAddr::V4(g.address),
        prefix_len: g.prefix_len,
        gateway: IpAddr::V4(g.gateway),
        dns: vec![IpAddr::V4(g.dns)],
    })
    .await
    .unwrap_or_else(|e| panic!("network: {e}; console:\n{}", console_tail(vm)));
    ch
}

fn console_tail(vm: &dyn Vm) -> String {
    let text = std::fs::read_to_string(vm.console_log()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// What the guest sees and reaches; the VM must be configured already.
async fn check_guest_network(ch: &Channel) {
    // The guest's address: the source the kernel picks towards the internet.
    let o = run(
        ch,
        "python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
         s.connect((\"203.0.113.10\", 9)); print(s.getsockname()[0])'",
    )
    .await;
    assert_eq!((o.code, o.stdout.trim()), (0, "172.16.0.2"), "{}", o.stderr);
    let o = run(ch, "cat /etc/resolv.conf").await;
    assert!(o.stdout.contains("nameserver 172.16.0.1\n"), "{}", o.stdout);

    let o = run(
        ch,
        &format!("curl -sS --connect-timeout 10 -m 20 http://{INET}:8080/"),
    )
    .await;
    assert_eq!((o.code, o.stdout.as_str()), (0, "inet"), "{}", o.stderr);

    // Refused at once (curl 7: could not connect), not dropped (curl 28: timeout).
    for url in [
        format!("http://{LAN}:8080/"),
        format!("http://{METADATA}/"),
        format!("http://{METADATA}:8080/"),
    ] {
        let o = run(ch, &format!("curl -sS --connect-timeout 8 -m 10 {url}")).await;
        assert_eq!(
            o.code, 7,
            "{url}: curl exit {}: {}{}",
            o.code, o.stdout, o.stderr
        );
        assert!(
            o.elapsed < Duration::from_secs(6),
            "{url}: refused only after {:?}",
            o.elapsed
        );
    }
}

/// Nothing of the sandbox is left: no namespace, host link, nft table, VMM process or run dir.
async fn assert_clean(w: &World, net: &Network, id: &str, pid: u32, run_dir: &Path) {
    let owned: Vec<OwnedObject> = net.list_owned().await.unwrap();
    let ours: Vec<_> = owned
        .iter()
        .filter(|o| match o {
            OwnedObject::Link { .. } => true, // the host namespace belongs to this test alone
            _ => o.sandbox_id() == Some(id),
        })
        .collect();
    assert!(ours.is_empty(), "left behind: {ours:?}");
    let nslist = sh_out(&["ip", "netns", "list"]);
    assert!(!nslist.contains(&format!("hutch-{id}")), "{nslist}");
    let links = sh_out(&["ip", "-n", &w.host, "-o", "link"]);
    assert!(!links.contains(": hv"), "{links}");
    let tables = sh_out(&["ip", "netns", "exec", &w.host, "nft", "list", "tables"]);
    // Only the host table every sandbox shares (`hutch`) stays; none is the sandbox's.
    assert!(!tables.contains("hutch-"), "{tables}");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "qemu pid {pid} still exists"
    );
    assert_eq!(pids_named(id), Vec::<u32>::new(), "hutch-{id} remains");
    assert!(!run_dir.exists(), "{} remains", run_dir.display());
}

async fn vm_on_a_sandbox_network(test: &str, tag: &str, lifetime: Lifetime) {
    let image = match prerequisites() {
        Ok(i) => i,
        Err(why) => return skip(test, &why),
    };
    let tag = format!("{tag}{}", std::process::id() % 100_000);
    let w = World::new(&tag);
    let net = Network::new(w.cfg()).await.unwrap();
    let id = w.sandbox.clone();
    let sn = net
        .create(&id, &Policy::Open)
        .await
        .unwrap()
        .expect("a NIC");
    let nic = Nic {
        tap: Tap::Fd(Arc::new(net.open_tap(&sn).unwrap())),
        mac: sn.guest.mac,
    };
    let dir = tempfile::Builder::new()
        .prefix("hutch-netvm")
        .tempdir()
        .unwrap();
    let run_dir = dir.path().join(&id);
    let spec = VmSpec {
        shares: Vec::new(),
        id: id.clone(),
        kernel: image.kernel.clone(),
        initrd: image.initrd.clone(),
        rootfs: image.rootfs.clone(),
        cpus: 1,
        memory_mib: 512,
        scratch_disk_mib: 256,
        run_dir: run_dir.clone(),
        extra_cmdline: vec![],
        lifetime,
        memory: hutch_vmm::GuestMemory::Anonymous,
    };
    let vmm = QemuVmm::new(Accel::Tcg).unwrap();
    let mut vm = vmm.start_with_nic(&spec, Some(&nic)).await.unwrap();
    // QEMU holds its own copy now: the caller's descriptor may go.
    drop(nic);
    let (pid, start_time) = (vm.pid(), vm.start_time());
    let _guard = KillOnPanic(pid, start_time);
    let taps = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == Path::new("/dev/net/tun")))
        .count();
    assert_eq!(taps, 1, "QEMU should hold exactly one TAP descriptor");
    let args = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args = String::from_utf8_lossy(&args).replace('\0', " ");
    assert!(
        args.contains("virtio-net-device,netdev=net0,mac=06:00:ac:10:00:02"),
        "{args}"
    );

    let ch = attach(vm.as_ref(), &id, &sn).await;
    check_guest_network(&ch).await;

    if lifetime == Lifetime::Detached {
        // The NIC lives in QEMU: a released and adopted VM keeps its network. (The channel is a
        // connection of its own and stays open: reconnecting at once is racy on virtio-serial,
        // see the report.)
        drop(vm);
        vm = vmm.adopt(&id, &run_dir).await.unwrap();
        let o = run(
            &ch,
            &format!("curl -sS --connect-timeout 10 -m 20 http://{INET}:8080/"),
        )
        .await;
        assert_eq!((o.code, o.stdout.as_str()), (0, "inet"), "{}", o.stderr);
    }
    let _ = tokio::time::timeout(Duration::from_secs(3), ch.shutdown()).await;
    drop(ch);

    vm.destroy().await.unwrap();
    net.destroy(&id).await.unwrap();
    assert_clean(&w, &net, &id, pid, &run_dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owned_vm_reaches_the_internet_but_not_the_lan_or_metadata() {
    vm_on_a_sandbox_network(
        "owned_vm_reaches_the_internet_but_not_the_lan_or_metadata",
        "o",
        Lifetime::Owned,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_vm_keeps_its_network_across_adoption() {
    vm_on_a_sandbox_network(
        "detached_vm_keeps_its_network_across_adoption",
        "d",
        Lifetime::Detached,
    )
    .await;
}
