//! Setup + teardown of one sandbox network, N times, through netlink (+ libnftables) versus the
//! same plumbing through `ip`/`nft` subprocesses. Teardown on both sides unmounts the namespace
//! and lets the kernel take what is in it; the time the kernel then needs is printed apart.
//!
//! Two ways to set up through netlink, both reported:
//! * **cold**: `Network::create` makes everything (namespace, TAP, veth, table, sockets);
//! * **warm pool**: `NetConfig::spares` networks are made ahead by `Network::keep_spares`, and
//!   `create` hands one out (renames it, applies the policy). Before each timed cycle the bench
//!   waits, untimed, until the pool is full again, so this is the hand-out cost with a warm
//!   pool; "back-to-back" runs the cycles without that wait, the pool refilling meanwhile.
//!
//! Then 50 sandboxes' networks set up concurrently (cold, and from a pool of 50), checked for
//! collisions (transit subnets, TAP, veth and namespace names).
//! Root only; everything lives in namespaces this bench creates (`hn-bench-*`,
//! `hutch-hn-bench-*`, `hutch.spare-*`) and is removed at the end.
//!
//! `cargo bench -p hutch-net --bench plumbing [-- N]`

// The benchmark sets up and waits synchronously, outside its measured async sections.
#![allow(clippy::disallowed_methods)]

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::Arc;
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
    for (label, backend, spares, wait) in [
        ("cold, netlink + libnftables", NftBackend::Auto, 0, false),
        (
            "cold, netlink + nft -j subprocess",
            NftBackend::Binary,
            0,
            false,
        ),
        (
            "warm pool, netlink + libnftables",
            NftBackend::Auto,
            2,
            true,
        ),
        ("pool back-to-back, libnftables", NftBackend::Auto, 2, false),
    ] {
        let times = rt.block_on(async {
            let net = Arc::new(
                Network::new(NetConfig {
                    host_netns: Some(host.clone()),
                    guest_device: GuestDevice::Tap,
                    nft: backend,
                    spares,
                    ..NetConfig::default()
                })
                .await
                .unwrap(),
            );
            let keeper = net.keep_spares();
            let mut v = Vec::with_capacity(n);
            let (mut c, mut d) = (Vec::new(), Vec::new());
            let mut from_pool = 0;
            for i in 0..n + 5 {
                if wait {
                    full(&net, spares).await;
                }
                let id = format!("hn-bench-{i}");
                let pooled = net.spares() > 0;
                let t = Instant::now();
                net.create(&id, &Policy::Open).await.unwrap().unwrap();
                let t1 = Instant::now();
                net.destroy(&id).await.unwrap();
                if i >= 5 {
                    v.push(t.elapsed());
                    c.push(t1 - t);
                    d.push(t1.elapsed());
                    from_pool += usize::from(pooled);
                }
            }
            stats(&format!("  {label}: create"), c);
            stats(&format!("  {label}: destroy"), d);
            if spares > 0 {
                println!("  {label}: {from_pool} of {n} creates found a spare ready");
            }
            // Not in the numbers above: the kernel's teardown of the namespaces, after
            // `destroy` returned (each sandbox's transit slot waits for it).
            let t = Instant::now();
            net.settle().await;
            println!(
                "  {label}: kernel teardown backlog drained {:.1} ms after the last destroy",
                ms(t.elapsed())
            );
            keeper.abort();
            net.set_spares(0).await;
            net.settle().await;
            v
        });
        results.push(stats(label, times));
    }
    for spares in [0, 50] {
        rt.block_on(fifty_at_once(&host, spares));
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
    for (label, i) in [("cold", 0), ("warm pool", 2)] {
        let (p50, p95) = results[i];
        println!(
            "ratio subprocess / {label} netlink+libnftables: p50 {:.1}x  p95 {:.1}x",
            ms(sub.0) / ms(p50),
            ms(sub.1) / ms(p95)
        );
    }
}

/// Waits (untimed) until the pool holds `spares` networks.
async fn full(net: &Network, spares: usize) {
    while net.spares() < spares {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// 50 sandboxes' networks set up at once (from a warm pool of `spares`, or cold), checked for
/// collisions, then destroyed at once.
async fn fifty_at_once(host: &str, spares: usize) {
    let net = Network::new(NetConfig {
        host_netns: Some(host.to_string()),
        guest_device: GuestDevice::Tap,
        spares,
        ..NetConfig::default()
    })
    .await
    .unwrap();
    net.refill().await.unwrap();
    let ids: Vec<String> = (0..50).map(|i| format!("hn-bench-c{i}")).collect();
    let t = Instant::now();
    let nets = futures::future::join_all(ids.iter().map(|id| net.create(id, &Policy::Open))).await;
    let took = t.elapsed();
    let mut seen = HashSet::new();
    for n in nets {
        let n = n.unwrap().unwrap();
        for key in [n.transit.net.to_string(), n.tap_name, n.host_veth, n.netns] {
            assert!(seen.insert(key.clone()), "collision on {key}");
        }
    }
    let label = if spares > 0 {
        "from a warm pool"
    } else {
        "cold"
    };
    println!(
        "50 sandboxes set up concurrently, {label}: {:.1} ms in all, no collision ({} distinct names and subnets)",
        ms(took),
        seen.len()
    );
    for r in futures::future::join_all(ids.iter().map(|id| net.destroy(id))).await {
        r.unwrap();
    }
    net.set_spares(0).await;
    net.settle().await;
}
