//! Setup + teardown of one sandbox network, N times, through netlink (+ libnftables) versus the
//! same plumbing through `ip`/`nft` subprocesses. Teardown on both sides unmounts the namespace
//! and lets the kernel take what is in it; the time the kernel then needs is printed apart.
//! Root only; everything lives in namespaces this bench creates (`hn-bench-*`,
//! `hutch-hn-bench-*`) and is removed at the end.
//!
//! `cargo bench -p hutch-net --bench plumbing [-- N]`

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hutch_net::names::Names;
use hutch_net::{nft, plan, GuestDevice, NetConfig, Network, NftBackend, Policy};

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sh_stdin(args: &[&str], input: &str) {
    use std::io::Write;
    let mut c = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn stats(name: &str, mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    let (p50, p95) = (p(0.5), p(0.95));
    println!(
        "{name:<34} p50 {:>9.3} ms   p95 {:>9.3} ms",
        ms(p50),
        ms(p95)
    );
    (p50, p95)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The same objects `Network::create` + `destroy` make, by `ip` and `nft` subprocesses.
fn subprocess_cycle(host: &str, id: &str, slot: u32) {
    let n = Names::new(id).unwrap();
    let pool = plan::TransitPool::new(plan::DEFAULT_TRANSIT_POOL).unwrap();
    let t = pool.transit(slot);
    let (d4, d6) = plan::deny_lists(plan::DEFAULT_TRANSIT_POOL, &[]);
    let rules = nft::sandbox_table(
        &nft::SandboxRules {
            table: &n.table,
            tap: &n.tap,
            ns_veth: &n.ns_veth,
            transit_ns: t.ns,
            deny4: &d4,
            deny6: &d6,
            tunnel: None,
        },
        &Policy::Open,
    );
    let ns = n.netns.as_str();
    sh(&["ip", "netns", "add", ns]);
    sh(&[
        "ip",
        "netns",
        "exec",
        ns,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ]);
    sh(&[
        "ip", "-n", ns, "tuntap", "add", "dev", &n.tap, "mode", "tap", "vnet_hdr",
    ]);
    sh_stdin(&["ip", "netns", "exec", ns, "nft", "-j", "-f", "-"], &rules);
    sh(&[
        "ip",
        "-n",
        host,
        "link",
        "add",
        &n.host_veth,
        "type",
        "veth",
        "peer",
        "name",
        &n.ns_veth,
        "netns",
        ns,
    ]);
    sh(&[
        "ip",
        "-n",
        host,
        "link",
        "set",
        &n.host_veth,
        "alias",
        &n.alias,
        "up",
    ]);
    sh(&[
        "ip",
        "-n",
        host,
        "addr",
        "add",
        &format!("{}/30", t.host),
        "dev",
        &n.host_veth,
    ]);
    sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    sh(&[
        "ip",
        "-n",
        ns,
        "addr",
        "add",
        &format!("{}/30", t.ns),
        "dev",
        &n.ns_veth,
    ]);
    sh(&["ip", "-n", ns, "link", "set", &n.ns_veth, "up"]);
    sh(&[
        "ip",
        "-n",
        ns,
        "route",
        "add",
        "default",
        "via",
        &t.host.to_string(),
    ]);
    sh(&[
        "ip",
        "-n",
        ns,
        "addr",
        "add",
        "172.16.0.1/30",
        "dev",
        &n.tap,
    ]);
    sh(&["ip", "-n", ns, "link", "set", &n.tap, "up"]);
    // teardown: the kernel takes the veth pair, the TAP and the table with the namespace
    sh(&["ip", "netns", "del", ns]);
}

struct Cleanup(Vec<String>);
impl Drop for Cleanup {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100);
    let host = format!("hn-bench-{}", std::process::id());
    let _c = Cleanup(vec![host.clone()]);
    sh(&["ip", "netns", "add", &host]);
    sh(&[
        "ip", "-n", &host, "link", "add", "hn-up", "type", "veth", "peer", "name", "hn-upp",
    ]);
    sh(&[
        "ip",
        "-n",
        &host,
        "addr",
        "add",
        "198.51.100.1/24",
        "dev",
        "hn-up",
    ]);
    sh(&["ip", "-n", &host, "link", "set", "hn-up", "up"]);
    sh(&[
        "ip",
        "-n",
        &host,
        "route",
        "add",
        "default",
        "via",
        "198.51.100.2",
    ]);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "{n} setup+teardown cycles each, sequential; libnftables in-process: {}",
        nft::uses_library(NftBackend::Auto)
    );
    let mut results = Vec::new();
    for (label, backend) in [
        ("netlink + libnftables", NftBackend::Auto),
        ("netlink + nft -j subprocess", NftBackend::Binary),
    ] {
        let times = rt.block_on(async {
            let net = Network::new(NetConfig {
                host_netns: Some(host.clone()),
                guest_device: GuestDevice::Tap,
                nft: backend,
                ..NetConfig::default()
            })
            .await
            .unwrap();
            let mut v = Vec::with_capacity(n);
            let (mut c, mut d) = (Vec::new(), Vec::new());
            for i in 0..n + 5 {
                let id = format!("hn-bench-{i}");
                let t = Instant::now();
                net.create(&id, &Policy::Open).await.unwrap().unwrap();
                let t1 = Instant::now();
                net.destroy(&id).await.unwrap();
                if i >= 5 {
                    v.push(t.elapsed());
                    c.push(t1 - t);
                    d.push(t1.elapsed());
                }
            }
            stats(&format!("  {label}: create"), c);
            stats(&format!("  {label}: destroy"), d);
            // Not in the numbers above: the kernel's teardown of the namespaces, after
            // `destroy` returned (each sandbox's transit slot waits for it).
            let t = Instant::now();
            net.settle().await;
            println!(
                "  {label}: kernel teardown backlog drained {:.1} ms after the last destroy",
                ms(t.elapsed())
            );
            v
        });
        results.push(stats(label, times));
    }
    let mut v = Vec::with_capacity(n);
    for i in 0..n.min(50) + 2 {
        let id = format!("hn-bench-s{i}");
        let t = Instant::now();
        subprocess_cycle(&host, &id, 1000 + i as u32);
        if i >= 2 {
            v.push(t.elapsed());
        }
    }
    let sub = stats("ip + nft subprocesses", v);
    let t = Instant::now();
    while String::from_utf8_lossy(
        &Command::new("ip")
            .args(["-n", &host, "-o", "link"])
            .output()
            .unwrap()
            .stdout,
    )
    .contains(": hv")
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    println!(
        "  subprocesses: kernel teardown backlog drained {:.1} ms after the last `ip netns del`",
        ms(t.elapsed())
    );
    let (fast50, fast95) = results[0];
    println!(
        "ratio subprocess / netlink+libnftables: p50 {:.1}x  p95 {:.1}x",
        ms(sub.0) / ms(fast50),
        ms(sub.1) / ms(fast95)
    );
}
