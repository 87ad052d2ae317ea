//! What the DNS filter spends on the wire format per guest query: parsing the guest's query,
//! building the upstream query, and walking the upstream's answer. No network, no root.
//!
//! `cargo bench -p hutch-net --bench dns [-- N]`

use std::hint::black_box;
use std::net::IpAddr;
use std::time::Instant;

use hutch_net::dns;

/// Runs `f` `n` times after a warm-up and prints the mean time per call.
fn time(label: &str, n: u32, mut f: impl FnMut()) {
    for _ in 0..n / 10 {
        f();
    }
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    let ns = t.elapsed().as_nanos() as f64 / f64::from(n);
    println!("{label:<44} {ns:>8.0} ns");
}

fn main() {
    let n: u32 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let query = dns::build_query(0x4242, "Api.Example.COM", dns::TYPE_A).unwrap();
    let q = dns::parse_query(&query).unwrap();
    let addrs: Vec<IpAddr> = (1..=8u8).map(|i| IpAddr::from([203, 0, 113, i])).collect();
    let up = dns::upstream_query(7, &q);
    let uq = dns::parse_query(&up).unwrap();
    let answer = dns::build_answer(&up, &uq, &addrs, 60);
    // A question whose name is a pointer to itself.
    let mut looped = query[..12].to_vec();
    looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    println!("{n} calls each");
    time("parse_query (guest query)", n, || {
        black_box(dns::parse_query(black_box(&query)).unwrap());
    });
    time("parse_query (refused: pointer loop)", n, || {
        black_box(dns::parse_query(black_box(&looped)).unwrap_err());
    });
    time("upstream_query", n, || {
        black_box(dns::upstream_query(7, black_box(&q)));
    });
    time("parse_answer (8 A records)", n, || {
        black_box(dns::parse_answer(black_box(&answer), &uq).unwrap());
    });
}
