//! nftables rules, built as the `nftables` crate's JSON schema and applied in one transaction.
//!
//! The JSON goes to libnftables in-process (loaded by `libnftables.rs`, no fork) when the library
//! is present, otherwise to `nft -j -f -`. Either way it runs on the calling thread, so an ns worker
//! thread applies rules inside its namespace.

use std::borrow::Cow;
use std::collections::HashSet;
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use ipnet::{Ipv4Net, Ipv6Net};
use nftables::expr::{
    Elem, Expression as E, Fib, FibFlag, FibResult, Meta, MetaKey, NamedExpression as N, Payload,
    PayloadField, Prefix, SetItem, CT,
};
use nftables::schema::{
    Chain, Element, FlushObject, NfCmd, NfListObject as L, NfObject, Nftables, Rule, Set, SetFlag,
    SetType, SetTypeValue, Table,
};
use nftables::stmt::{
    AnonymousCounter, Counter, JumpTarget, Limit, Log, Match, Operator, Reject, RejectType,
    Statement as S, NAT,
};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook, RejectCode};

use crate::events::{RuleName, LOG_GROUP};
use crate::libnftables;
use crate::plan::{GATEWAY_ADDR, GUEST_ADDR};
use crate::{NetError, Policy};

const FAM: NfFamily = NfFamily::INet;

/// Which nft implementation applies rules.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NftBackend {
    /// libnftables in-process if it loads, else the `nft` binary.
    #[default]
    Auto,
    /// Always the `nft` binary (`nft -j -f -`).
    Binary,
}

// ---------- expression helpers ----------

fn s(v: impl Into<String>) -> E<'static> {
    E::String(Cow::Owned(v.into()))
}
fn payload(proto: &'static str, field: &'static str) -> E<'static> {
    E::Named(N::Payload(Payload::PayloadField(PayloadField {
        protocol: proto.into(),
        field: field.into(),
    })))
}
fn meta(key: MetaKey) -> E<'static> {
    E::Named(N::Meta(Meta { key }))
}
fn ct_state() -> E<'static> {
    E::Named(N::CT(CT {
        key: "state".into(),
        family: None,
        dir: None,
    }))
}
fn m(left: E<'static>, op: Operator, right: E<'static>) -> S<'static> {
    S::Match(Match { left, right, op })
}
fn eq(left: E<'static>, right: E<'static>) -> S<'static> {
    m(left, Operator::EQ, right)
}
fn anon_set(items: Vec<E<'static>>) -> E<'static> {
    E::Named(N::Set(items.into_iter().map(SetItem::Element).collect()))
}
fn prefix(addr: String, len: u8) -> E<'static> {
    E::Named(N::Prefix(Prefix {
        addr: Box::new(s(addr)),
        len: len.into(),
    }))
}
fn counter() -> S<'static> {
    S::Counter(Counter::Anonymous(Some(AnonymousCounter::default())))
}
fn goto(target: &str) -> S<'static> {
    S::Goto(JumpTarget {
        target: Cow::Owned(target.into()),
    })
}
fn jump(target: &str) -> S<'static> {
    S::Jump(JumpTarget {
        target: Cow::Owned(target.into()),
    })
}
fn accept() -> S<'static> {
    S::Accept(None)
}
fn established() -> S<'static> {
    m(
        ct_state(),
        Operator::IN,
        E::List(vec![s("established"), s("related")]),
    )
}
fn tcp_udp() -> S<'static> {
    eq(meta(MetaKey::L4proto), anon_set(vec![s("tcp"), s("udp")]))
}
/// `fib saddr . iif oif missing`: the source address is not routed back by the device the
/// packet came in by.
fn source_not_on_iif() -> S<'static> {
    let fib = Fib {
        result: FibResult::Oif,
        flags: [FibFlag::Saddr, FibFlag::Iif].into_iter().collect(),
    };
    eq(E::Named(N::Fib(fib)), E::Boolean(false))
}

fn net4(n: &Ipv4Net) -> E<'static> {
    if n.prefix_len() == 32 {
        s(n.addr().to_string())
    } else {
        prefix(n.network().to_string(), n.prefix_len())
    }
}
fn net6(n: &Ipv6Net) -> E<'static> {
    if n.prefix_len() == 128 {
        s(n.addr().to_string())
    } else {
        prefix(n.network().to_string(), n.prefix_len())
    }
}

// ---------- object helpers ----------

struct Tx {
    table: String,
    cmds: Vec<NfObject<'static>>,
}

impl Tx {
    fn new(table: &str) -> Tx {
        Tx {
            table: table.into(),
            cmds: Vec::new(),
        }
    }
    fn add(&mut self, o: L<'static>) {
        self.cmds.push(NfObject::CmdObject(NfCmd::Add(o)));
    }
    fn table(&self) -> Table<'static> {
        Table {
            family: FAM,
            name: Cow::Owned(self.table.clone()),
            handle: None,
        }
    }
    fn chain(&self, name: &str) -> Chain<'static> {
        Chain {
            family: FAM,
            table: Cow::Owned(self.table.clone()),
            name: Cow::Owned(name.into()),
            ..Chain::default()
        }
    }
    fn base_chain(
        &mut self,
        name: &str,
        ty: NfChainType,
        hook: NfHook,
        prio: i32,
        pol: NfChainPolicy,
    ) {
        let c = Chain {
            _type: Some(ty),
            hook: Some(hook),
            prio: Some(prio),
            policy: Some(pol),
            ..self.chain(name)
        };
        self.add(L::Chain(c));
    }
    /// A filter chain on `hook` at priority 0.
    fn filter_chain(&mut self, name: &str, hook: NfHook, pol: NfChainPolicy) {
        self.base_chain(name, NfChainType::Filter, hook, 0, pol);
    }
    /// The filter chain `prerouting` at the raw priority (-300): before connection tracking
    /// and before any other rule, so what it drops is neither tracked nor answered.
    fn raw_prerouting(&mut self) {
        let (ty, hook, pol) = (
            NfChainType::Filter,
            NfHook::Prerouting,
            NfChainPolicy::Accept,
        );
        self.base_chain("prerouting", ty, hook, -300, pol);
    }
    /// The source-NAT chain `postrouting` (priority 100).
    fn nat_postrouting(&mut self) {
        let (ty, hook) = (NfChainType::NAT, NfHook::Postrouting);
        self.base_chain("postrouting", ty, hook, 100, NfChainPolicy::Accept);
    }
    /// The destination-NAT chain `intercept` (prerouting, priority -100).
    fn nat_prerouting(&mut self) {
        let (ty, hook) = (NfChainType::NAT, NfHook::Prerouting);
        self.base_chain("intercept", ty, hook, -100, NfChainPolicy::Accept);
    }
    fn regular_chain(&mut self, name: &str) {
        let c = self.chain(name);
        self.add(L::Chain(c));
    }
    fn rule(&mut self, chain: &str, comment: Option<&str>, expr: Vec<S<'static>>) {
        self.add(L::Rule(Rule {
            family: FAM,
            table: Cow::Owned(self.table.clone()),
            chain: Cow::Owned(chain.into()),
            expr: Cow::Owned(expr),
            handle: None,
            index: None,
            comment: comment.map(|c| Cow::Owned(c.to_string())),
        }));
    }
    fn set_obj(&self, name: &str, ty: SetType, flags: &[SetFlag]) -> Set<'static> {
        Set {
            family: FAM,
            table: Cow::Owned(self.table.clone()),
            name: Cow::Owned(name.into()),
            handle: None,
            set_type: SetTypeValue::Single(ty),
            policy: None,
            flags: (!flags.is_empty()).then(|| flags.iter().copied().collect::<HashSet<_>>()),
            elem: None,
            timeout: None,
            gc_interval: None,
            size: None,
            comment: None,
        }
    }
    fn set(&mut self, name: &str, ty: SetType, flags: &[SetFlag]) {
        let o = self.set_obj(name, ty, flags);
        self.add(L::Set(Box::new(o)));
    }
    fn elements(&mut self, set: &str, elem: Vec<E<'static>>) {
        if elem.is_empty() {
            return;
        }
        self.add(L::Element(Element {
            family: FAM,
            table: Cow::Owned(self.table.clone()),
            name: Cow::Owned(set.into()),
            elem: Cow::Owned(elem),
        }));
    }
    fn flush_chain(&mut self, name: &str) {
        let c = self.chain(name);
        self.cmds
            .push(NfObject::CmdObject(NfCmd::Flush(FlushObject::Chain(c))));
    }
    fn flush_set(&mut self, name: &str, ty: SetType) {
        let o = self.set_obj(name, ty, &[]);
        self.cmds
            .push(NfObject::CmdObject(NfCmd::Flush(FlushObject::Set(
                Box::new(o),
            ))));
    }
    fn json(self) -> String {
        serde_json::to_string(&Nftables {
            objects: Cow::Owned(self.cmds),
        })
        .expect("nft JSON serializes")
    }
}

/// Everything the sandbox table needs to know.
pub struct SandboxRules<'a> {
    /// `hutch-<id>`.
    pub table: &'a str,
    /// Guest-facing device in the namespace (TAP or its stand-in).
    pub tap: &'a str,
    /// Namespace end of the transit veth.
    pub ns_veth: &'a str,
    /// Source address guest traffic is rewritten to on its way out.
    pub transit_ns: Ipv4Addr,
    /// Merged IPv4 deny list.
    pub deny4: &'a [Ipv4Net],
    /// Merged IPv6 deny list.
    pub deny6: &'a [Ipv6Net],
    /// The WireGuard egress tunnel, if the sandbox has one.
    pub tunnel: Option<TunnelRules<'a>>,
}

/// What the rules of a sandbox with a WireGuard egress tunnel need.
#[derive(Clone, Copy, Debug)]
pub struct TunnelRules<'a> {
    /// The TUN device in the namespace.
    pub tun: &'a str,
    /// The tunnel's address guest traffic is translated to.
    pub address: Ipv4Addr,
    /// The peer's UDP endpoint: the only thing the namespace may send out of the veth.
    pub endpoint: std::net::SocketAddrV4,
}

fn verdict_chain(tx: &mut Tx, rule: RuleName) {
    let name = rule.as_str();
    tx.regular_chain(name);
    // `limit` first: over the limit the rule stops matching and evaluation goes on to the verdict,
    // so logging is rate-limited but the verdict never is.
    tx.rule(
        name,
        Some(name),
        vec![
            S::Limit(Limit {
                rate: 20,
                rate_unit: None,
                per: Some("second".into()),
                burst: Some(40),
                burst_unit: None,
                inv: None,
            }),
            S::Log(Some(Log {
                prefix: Some(Cow::Owned(rule.log_prefix())),
                ..Log::new(Some(LOG_GROUP))
            })),
        ],
    );
    match rule.verdict() {
        crate::Verdict::Allow => tx.rule(name, Some(name), vec![accept()]),
        crate::Verdict::Deny if !rule.rejects() => tx.rule(name, Some(name), vec![S::Drop(None)]),
        crate::Verdict::Deny => {
            tx.rule(
                name,
                Some(name),
                vec![
                    eq(meta(MetaKey::L4proto), s("tcp")),
                    S::Reject(Some(Reject::new(Some(RejectType::TCPReset), None))),
                ],
            );
            tx.rule(
                name,
                Some(name),
                vec![S::Reject(Some(Reject::new(
                    Some(RejectType::ICMPX),
                    Some(RejectCode::AdminProhibited),
                )))],
            );
        }
    }
}

/// ICMP error types: the messages that quote the packet they answer.
const ICMP_ERRORS: &[&str] = &[
    "destination-unreachable",
    "source-quench",
    "redirect",
    "time-exceeded",
    "parameter-problem",
];
/// ICMPv6 error types (and redirects, which quote too).
const ICMPV6_ERRORS: &[&str] = &[
    "destination-unreachable",
    "packet-too-big",
    "time-exceeded",
    "parameter-problem",
    "nd-redirect",
];

/// Set of the guest-facing device's name.
const GUEST_IF: &str = "guest_if";
/// Set of the namespace end of the transit veth's name.
const UPLINK_IF: &str = "uplink_if";

fn device_elements(tx: &mut Tx, tap: &str, ns_veth: &str) {
    tx.elements(GUEST_IF, vec![s(tap)]);
    tx.elements(UPLINK_IF, vec![s(ns_veth)]);
}

fn deny_elements(tx: &mut Tx, deny4: &[Ipv4Net], deny6: &[Ipv6Net]) {
    tx.elements("deny4", deny4.iter().map(net4).collect());
    tx.elements("deny6", deny6.iter().map(net6).collect());
}

fn policy_rules(tx: &mut Tx, policy: &Policy) {
    match policy {
        // A running sandbox switched to `none`: its NIC stays, everything is rejected.
        Policy::None => {}
        Policy::Open => tx.rule(
            "policy",
            Some("allow_open"),
            vec![counter(), goto(RuleName::AllowOpen.as_str())],
        ),
        Policy::Allow { cidrs, ports, .. } => {
            let v4: Vec<Ipv4Net> = cidrs
                .iter()
                .filter_map(|c| match c {
                    ipnet::IpNet::V4(n) => Some(n.trunc()),
                    _ => None,
                })
                .collect();
            let v6: Vec<Ipv6Net> = cidrs
                .iter()
                .filter_map(|c| match c {
                    ipnet::IpNet::V6(n) => Some(n.trunc()),
                    _ => None,
                })
                .collect();
            tx.elements(
                "allow_net4",
                Ipv4Net::aggregate(&v4).iter().map(net4).collect(),
            );
            tx.elements(
                "allow_net6",
                Ipv6Net::aggregate(&v6).iter().map(net6).collect(),
            );
            let mut ports_sorted: Vec<u16> = ports.clone();
            ports_sorted.sort_unstable();
            ports_sorted.dedup();
            tx.elements(
                "allow_ports",
                ports_sorted
                    .iter()
                    .map(|p| E::Number(u32::from(*p)))
                    .collect(),
            );
            let port_match = |mut v: Vec<S<'static>>| {
                if !ports.is_empty() {
                    v.push(tcp_udp());
                    v.push(eq(payload("th", "dport"), s("@allow_ports")));
                }
                v
            };
            for (fam, set, rule) in [
                ("ip", "allow_net4", RuleName::AllowCidr),
                ("ip6", "allow_net6", RuleName::AllowCidr),
                ("ip", "allow4", RuleName::AllowDomain),
                ("ip6", "allow6", RuleName::AllowDomain),
            ] {
                let mut v = port_match(vec![eq(payload(fam, "daddr"), s(format!("@{set}")))]);
                v.push(counter());
                v.push(goto(rule.as_str()));
                tx.rule("policy", Some(rule.as_str()), v);
            }
        }
    }
}

/// The whole table inside a sandbox's namespace, policy included, as one transaction.
pub fn sandbox_table(r: &SandboxRules<'_>, policy: &Policy) -> String {
    let mut tx = Tx::new(r.table);
    let t = tx.table();
    tx.add(L::Table(t));
    tx.set("deny4", SetType::Ipv4Addr, &[SetFlag::Interval]);
    tx.set("deny6", SetType::Ipv6Addr, &[SetFlag::Interval]);
    tx.set("allow_net4", SetType::Ipv4Addr, &[SetFlag::Interval]);
    tx.set("allow_net6", SetType::Ipv6Addr, &[SetFlag::Interval]);
    // Filled by the DNS filter (phase 2) with each answer's TTL.
    tx.set("allow4", SetType::Ipv4Addr, &[SetFlag::Timeout]);
    tx.set("allow6", SetType::Ipv6Addr, &[SetFlag::Timeout]);
    tx.set("allow_ports", SetType::InetService, &[]);
    // Guest TCP ports turned to the namespace's broker listener, and that listener's port:
    // empty until `sandbox_intercept` fills them (a sandbox with secrets attached).
    tx.set(INTERCEPTED, SetType::InetService, &[]);
    tx.set(BROKER_LISTEN, SetType::InetService, &[]);
    // The devices by name through sets, so that a spare network's table serves it under the
    // names it is handed out with (see `sandbox_claim`).
    tx.set(GUEST_IF, SetType::Ifname, &[]);
    tx.set(UPLINK_IF, SetType::Ifname, &[]);
    device_elements(&mut tx, r.tap, r.ns_veth);
    deny_elements(&mut tx, r.deny4, r.deny6);
    for rule in RuleName::ALL {
        verdict_chain(&mut tx, rule);
    }
    tx.regular_chain("policy");
    policy_rules(&mut tx, policy);

    let tap = || s(format!("@{GUEST_IF}"));
    let uplink = || s(format!("@{UPLINK_IF}"));
    // prerouting, before anything can track or answer it: the guest speaks from its own
    // address only (IPv6: from addresses routed back to its link, that is link-local), or it
    // is dropped unanswered. An answer would go to the forged source, quoting the packet.
    tx.raw_prerouting();
    tx.rule(
        "prerouting",
        None,
        vec![
            eq(meta(MetaKey::Iifname), tap()),
            eq(meta(MetaKey::Nfproto), s("ipv4")),
            m(
                payload("ip", "saddr"),
                Operator::NEQ,
                s(GUEST_ADDR.to_string()),
            ),
            counter(),
            goto(RuleName::DenySpoof.as_str()),
        ],
    );
    tx.rule(
        "prerouting",
        None,
        vec![
            eq(meta(MetaKey::Iifname), tap()),
            eq(meta(MetaKey::Nfproto), s("ipv6")),
            source_not_on_iif(),
            counter(),
            goto(RuleName::DenySpoof.as_str()),
        ],
    );

    // Interception (empty sets: none): the guest's TCP to an intercepted port goes to the
    // broker's listener on the gateway address, whatever its destination.
    tx.nat_prerouting();
    tx.rule(
        "intercept",
        None,
        vec![
            eq(meta(MetaKey::Iifname), tap()),
            eq(meta(MetaKey::Nfproto), s("ipv4")),
            eq(meta(MetaKey::L4proto), s("tcp")),
            eq(payload("th", "dport"), s(format!("@{INTERCEPTED}"))),
            S::Redirect(Some(NAT {
                addr: None,
                family: None,
                port: Some(E::Number(u32::from(BROKER_PORT))),
                flags: None,
            })),
        ],
    );

    // input: the namespace itself answers only DNS on the gateway address (and, intercepting,
    // the broker).
    tx.filter_chain("input", NfHook::Input, NfChainPolicy::Drop);
    tx.rule("input", None, vec![established(), accept()]);
    tx.rule(
        "input",
        None,
        vec![eq(meta(MetaKey::Iifname), s("lo")), accept()],
    );
    tx.rule(
        "input",
        Some("allow_dns"),
        vec![
            eq(meta(MetaKey::Iifname), tap()),
            eq(payload("ip", "daddr"), s(GATEWAY_ADDR.to_string())),
            tcp_udp(),
            eq(payload("th", "dport"), E::Number(53)),
            counter(),
            goto(RuleName::Dns.as_str()),
        ],
    );
    tx.rule(
        "input",
        Some("allow_broker"),
        vec![
            eq(meta(MetaKey::Iifname), tap()),
            eq(payload("ip", "daddr"), s(GATEWAY_ADDR.to_string())),
            eq(meta(MetaKey::L4proto), s("tcp")),
            eq(payload("th", "dport"), s(format!("@{BROKER_LISTEN}"))),
            accept(),
        ],
    );
    tx.rule(
        "input",
        None,
        vec![
            eq(meta(MetaKey::Iifname), tap()),
            counter(),
            goto(RuleName::DenyHost.as_str()),
        ],
    );
    tx.rule(
        "input",
        None,
        vec![counter(), goto(RuleName::DenyInbound.as_str())],
    );

    // forward: guest → world.
    tx.filter_chain("forward", NfHook::Forward, NfChainPolicy::Drop);
    tx.rule("forward", None, vec![established(), accept()]);
    tx.rule(
        "forward",
        None,
        vec![eq(ct_state(), s("invalid")), S::Drop(None)],
    );
    tx.rule(
        "forward",
        None,
        vec![
            m(meta(MetaKey::Iifname), Operator::NEQ, tap()),
            counter(),
            goto(RuleName::DenyInbound.as_str()),
        ],
    );
    tx.rule(
        "forward",
        None,
        vec![
            tcp_udp(),
            eq(payload("th", "dport"), E::Number(53)),
            counter(),
            goto(RuleName::DenyDns.as_str()),
        ],
    );
    tx.rule(
        "forward",
        Some("no_quic"),
        vec![
            eq(meta(MetaKey::L4proto), s("udp")),
            eq(payload("th", "dport"), s(format!("@{INTERCEPTED}"))),
            counter(),
            goto(RuleName::DenyPolicy.as_str()),
        ],
    );
    tx.rule(
        "forward",
        None,
        vec![
            eq(payload("ip", "daddr"), s("@deny4")),
            counter(),
            goto(RuleName::DenyReserved.as_str()),
        ],
    );
    tx.rule(
        "forward",
        None,
        vec![
            eq(payload("ip6", "daddr"), s("@deny6")),
            counter(),
            goto(RuleName::DenyReserved.as_str()),
        ],
    );
    if let Some(tun) = &r.tunnel {
        // Through the tunnel or not at all (the routes allow nothing else but the endpoint).
        tx.rule(
            "forward",
            None,
            vec![
                m(meta(MetaKey::Oifname), Operator::NEQ, s(tun.tun)),
                counter(),
                goto(RuleName::DenyTunnel.as_str()),
            ],
        );
    }
    tx.rule("forward", None, vec![jump("policy")]);
    tx.rule(
        "forward",
        None,
        vec![counter(), goto(RuleName::DenyPolicy.as_str())],
    );

    // The namespace originates nothing but replies (and, in phase 2, nothing else either).
    tx.filter_chain("output", NfHook::Output, NfChainPolicy::Accept);
    // What its stack makes to answer a packet (a reject's reset or ICMP error, an ICMP error of
    // the stack's own), which quotes that packet, goes to the guest or nowhere: never out of
    // the veth or the tunnel.
    let not_to_guest = || {
        vec![
            m(meta(MetaKey::Oifname), Operator::NEQ, tap()),
            m(meta(MetaKey::Oifname), Operator::NEQ, s("lo")),
        ]
    };
    for (proto, errors) in [("icmp", ICMP_ERRORS), ("icmpv6", ICMPV6_ERRORS)] {
        let mut v = not_to_guest();
        v.push(eq(
            payload(proto, "type"),
            anon_set(errors.iter().map(|t| s(*t)).collect()),
        ));
        v.extend([counter(), S::Drop(None)]);
        tx.rule("output", None, v);
    }
    let mut v = not_to_guest();
    v.push(m(payload("tcp", "flags"), Operator::IN, s("rst")));
    v.extend([counter(), S::Drop(None)]);
    tx.rule("output", None, v);

    // TCP the namespace itself opens outwards (the broker dialling upstream for the guest)
    // meets the same always-deny lists and policy as the guest's own traffic.
    own_tcp_rules(&mut tx);

    if let Some(tun) = &r.tunnel {
        // Nothing leaves by the veth but the encrypted UDP to the endpoint.
        tx.rule(
            "output",
            None,
            vec![
                eq(meta(MetaKey::Oifname), uplink()),
                eq(payload("ip", "daddr"), s(tun.endpoint.ip().to_string())),
                eq(
                    payload("udp", "dport"),
                    E::Number(u32::from(tun.endpoint.port())),
                ),
                accept(),
            ],
        );
        tx.rule(
            "output",
            None,
            vec![
                eq(meta(MetaKey::Oifname), uplink()),
                counter(),
                S::Drop(None),
            ],
        );
    }

    // SNAT at the namespace edge: every guest looks like its transit address outside.
    tx.nat_postrouting();
    snat_guest(&mut tx, uplink(), r.transit_ns);
    if let Some(tun) = &r.tunnel {
        snat_guest(&mut tx, s(tun.tun), tun.address);
    }
    tx.json()
}

/// New TCP connections the namespace's own stack opens to anything but its guest or itself go
/// through the deny lists and the policy, as forwarded guest traffic does.
fn own_tcp_rules(tx: &mut Tx) {
    let own_tcp = || {
        vec![
            eq(meta(MetaKey::L4proto), s("tcp")),
            eq(ct_state(), s("new")),
            m(
                meta(MetaKey::Oifname),
                Operator::NEQ,
                s(format!("@{GUEST_IF}")),
            ),
            m(meta(MetaKey::Oifname), Operator::NEQ, s("lo")),
        ]
    };
    for (fam, set) in [("ip", "@deny4"), ("ip6", "@deny6")] {
        let mut v = own_tcp();
        v.extend([
            eq(payload(fam, "daddr"), s(set)),
            counter(),
            goto(RuleName::DenyReserved.as_str()),
        ]);
        tx.rule("output", None, v);
    }
    let mut v = own_tcp();
    v.push(jump("policy"));
    tx.rule("output", None, v);
    let mut v = own_tcp();
    v.extend([counter(), goto(RuleName::DenyPolicy.as_str())]);
    tx.rule("output", None, v);
}

/// The set of guest TCP ports redirected to the broker (UDP to them is dropped).
const INTERCEPTED: &str = "intercepted";
/// The set holding the broker listener's port once interception is on.
const BROKER_LISTEN: &str = "broker_listen";
/// The port of the broker's listener on the gateway address in every sandbox namespace.
pub const BROKER_PORT: u16 = 15001;
/// The guest ports a sandbox with secrets has intercepted: HTTP and HTTPS.
pub const INTERCEPTED_PORTS: [u16; 2] = [80, 443];

/// Turns interception on in a sandbox's table (add-only, so idempotent): guest TCP to
/// [`INTERCEPTED_PORTS`] is redirected to [`BROKER_PORT`] on the gateway address, which the
/// guest may then reach, and UDP to those ports (QUIC) is dropped so clients fall back to TCP.
pub fn sandbox_intercept(table: &str) -> String {
    let mut tx = Tx::new(table);
    tx.elements(
        INTERCEPTED,
        INTERCEPTED_PORTS
            .iter()
            .map(|p| E::Number(u32::from(*p)))
            .collect(),
    );
    tx.elements(BROKER_LISTEN, vec![E::Number(u32::from(BROKER_PORT))]);
    tx.json()
}

/// Atomically replaces a running sandbox's policy (and refreshes its deny lists).
pub fn sandbox_policy(
    table: &str,
    deny4: &[Ipv4Net],
    deny6: &[Ipv6Net],
    policy: &Policy,
) -> String {
    let mut tx = Tx::new(table);
    tx.flush_chain("policy");
    for (set, ty) in [
        ("allow_net4", SetType::Ipv4Addr),
        ("allow_net6", SetType::Ipv6Addr),
        ("allow4", SetType::Ipv4Addr),
        ("allow6", SetType::Ipv6Addr),
        ("allow_ports", SetType::InetService),
    ] {
        tx.flush_set(set, ty);
    }
    refresh_deny(&mut tx, deny4, deny6);
    policy_rules(&mut tx, policy);
    tx.json()
}

/// The transaction handing out a spare network's table (made with [`Policy::None`], so its
/// policy chain and allow sets are empty): the guest-facing device and the transit veth's
/// namespace end go by these names from now on, and `policy` applies. It only adds: a
/// transaction that deletes anything makes closing its nft socket wait for an RCU grace period.
/// The spare's own device names stay in the device sets; no device in the namespace bears them
/// any more.
pub fn sandbox_claim(table: &str, tap: &str, ns_veth: &str, policy: &Policy) -> String {
    let mut tx = Tx::new(table);
    device_elements(&mut tx, tap, ns_veth);
    policy_rules(&mut tx, policy);
    tx.json()
}

/// Replaces a sandbox table's deny lists (for a spare made before the host's addresses changed).
pub fn sandbox_deny(table: &str, deny4: &[Ipv4Net], deny6: &[Ipv6Net]) -> String {
    let mut tx = Tx::new(table);
    refresh_deny(&mut tx, deny4, deny6);
    tx.json()
}

/// Guest traffic leaving by `oif` gets the source address `to`.
fn snat_guest(tx: &mut Tx, oif: E<'static>, to: Ipv4Addr) {
    tx.rule(
        "postrouting",
        None,
        vec![
            eq(meta(MetaKey::Oifname), oif),
            eq(payload("ip", "saddr"), s(GUEST_ADDR.to_string())),
            S::SNAT(Some(NAT {
                addr: Some(s(to.to_string())),
                family: Some(nftables::stmt::NATFamily::IP),
                port: None,
                flags: None,
            })),
        ],
    );
}

fn refresh_deny(tx: &mut Tx, deny4: &[Ipv4Net], deny6: &[Ipv6Net]) {
    tx.flush_set("deny4", SetType::Ipv4Addr);
    tx.flush_set("deny6", SetType::Ipv6Addr);
    deny_elements(tx, deny4, deny6);
}

/// Puts resolved addresses into the `allow4`/`allow6` sets with their TTL clamped to
/// `min..=max` seconds. Each element is added, deleted and added again in one transaction, so an
/// address already present gets the new timeout instead of keeping the old one.
pub fn add_resolved(table: &str, addrs: &[(std::net::IpAddr, u32)], min: u32, max: u32) -> String {
    let mut tx = Tx::new(table);
    let mut seen = HashSet::new();
    for (ip, ttl) in addrs {
        if !seen.insert(*ip) {
            continue;
        }
        let set = if ip.is_ipv4() { "allow4" } else { "allow6" };
        let elem = |timeout| {
            vec![E::Named(N::Elem(Elem {
                val: Box::new(s(ip.to_string())),
                timeout,
                expires: None,
                comment: None,
                counter: None,
            }))]
        };
        let ttl = (*ttl).clamp(min, max);
        tx.elements(set, elem(Some(ttl)));
        let del = Element {
            family: FAM,
            table: Cow::Owned(tx.table.clone()),
            name: Cow::Owned(set.into()),
            elem: Cow::Owned(elem(None)),
        };
        tx.cmds
            .push(NfObject::CmdObject(NfCmd::Delete(L::Element(del))));
        tx.elements(set, elem(Some(ttl)));
    }
    tx.json()
}

/// Name of the one host-side table every sandbox shares.
pub const HOST_TABLE: &str = "hutch";

/// Wildcard matching every sandbox's host veth (`hv<hash>h`).
const HOST_VETHS: &str = "hv*";

/// The one host-side table (in the host namespace) confining every sandbox veth: its traffic may
/// only leave by `uplink`, coming from the transit `pool`, and is masqueraded there (what NAT
/// did not rewrite does not leave); nothing else goes to or through the host from a veth but
/// replies, and nothing from a veth is answered unless its source is routed back by it.
/// Replaced atomically (created once per [`crate::Network`]), so no per-sandbox host rule is
/// ever added or removed.
pub fn host_table(uplink: &str, pool: Ipv4Net) -> String {
    let mut tx = Tx::new(HOST_TABLE);
    let t = tx.table();
    // add + delete + add: a fresh table whether or not one existed, in one transaction.
    tx.add(L::Table(t.clone()));
    tx.cmds
        .push(NfObject::CmdObject(NfCmd::Delete(L::Table(t.clone()))));
    tx.add(L::Table(t));
    let veths = || s(HOST_VETHS);
    // Before conntrack and before any rule that could answer: a packet from a veth whose source
    // is not routed back by that veth is dropped unanswered (an answer would go to the forged
    // source, by the uplink).
    tx.raw_prerouting();
    tx.rule(
        "prerouting",
        None,
        vec![
            eq(meta(MetaKey::Iifname), veths()),
            source_not_on_iif(),
            counter(),
            S::Drop(None),
        ],
    );
    tx.nat_postrouting();
    tx.rule(
        "postrouting",
        None,
        vec![
            eq(payload("ip", "saddr"), net4(&pool)),
            eq(meta(MetaKey::Oifname), s(uplink)),
            S::Masquerade(None),
        ],
    );
    tx.filter_chain("forward", NfHook::Forward, NfChainPolicy::Accept);
    tx.rule(
        "forward",
        None,
        vec![
            eq(meta(MetaKey::Iifname), veths()),
            eq(meta(MetaKey::Oifname), s(uplink)),
            eq(payload("ip", "saddr"), net4(&pool)),
            accept(),
        ],
    );
    tx.rule(
        "forward",
        None,
        vec![eq(meta(MetaKey::Iifname), veths()), counter(), reject_any()],
    );
    tx.rule(
        "forward",
        None,
        vec![eq(meta(MetaKey::Oifname), veths()), established(), accept()],
    );
    tx.rule(
        "forward",
        None,
        vec![eq(meta(MetaKey::Oifname), veths()), counter(), reject_any()],
    );
    // After source NAT (priority 100): a transit address still on a packet leaving by the
    // uplink means no NAT rule saw it (conntrack tracks nothing for it, as for an ICMP error
    // or an echo reply that answers nothing), and it does not leave.
    let (ty, hook, pol) = (
        NfChainType::Filter,
        NfHook::Postrouting,
        NfChainPolicy::Accept,
    );
    tx.base_chain("egress", ty, hook, 300, pol);
    tx.rule(
        "egress",
        None,
        vec![
            eq(meta(MetaKey::Oifname), s(uplink)),
            eq(payload("ip", "saddr"), net4(&pool)),
            counter(),
            S::Drop(None),
        ],
    );
    tx.filter_chain("input", NfHook::Input, NfChainPolicy::Accept);
    tx.rule(
        "input",
        None,
        vec![eq(meta(MetaKey::Iifname), veths()), established(), accept()],
    );
    tx.rule(
        "input",
        None,
        vec![eq(meta(MetaKey::Iifname), veths()), counter(), reject_any()],
    );
    tx.json()
}

fn reject_any() -> S<'static> {
    S::Reject(Some(Reject::new(
        Some(RejectType::ICMPX),
        Some(RejectCode::AdminProhibited),
    )))
}

/// Deletes a table whether or not it exists (`add` then `delete` in one transaction).
pub fn delete_table(table: &str) -> String {
    let mut tx = Tx::new(table);
    let t = tx.table();
    tx.add(L::Table(t.clone()));
    tx.cmds
        .push(NfObject::CmdObject(NfCmd::Delete(L::Table(t))));
    tx.json()
}

// ---------- runner ----------

/// True if rules go through libnftables in-process.
pub fn uses_library(backend: NftBackend) -> bool {
    backend == NftBackend::Auto && libnftables::api().is_some()
}

/// Runs one nft command buffer (JSON, or text such as `list tables`) in the calling thread's
/// network namespace, returning JSON output. One buffer is one kernel transaction.
#[allow(clippy::disallowed_methods)] // Waits for `nft`: callers run it on a netns thread.
pub fn run(backend: NftBackend, what: &str, cmd: &str) -> Result<String, NetError> {
    let fail = |message: String| NetError::Nft {
        what: what.to_string(),
        message,
    };
    if let (NftBackend::Auto, Some(lib)) = (backend, libnftables::api()) {
        return lib.run(cmd).map_err(fail);
    }
    let json_in = cmd.trim_start().starts_with('{');
    let mut c = Command::new("nft");
    c.arg("-j");
    if json_in {
        c.args(["-f", "-"]);
    } else {
        c.args(cmd.split_whitespace());
    }
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| NetError::Io {
            what: "spawn nft".into(),
            source: e,
        })?;
    if json_in {
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(cmd.as_bytes()).map_err(|e| NetError::Io {
            what: "write to nft".into(),
            source: e,
        })?;
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().map_err(|e| NetError::Io {
        what: "wait for nft".into(),
        source: e,
    })?;
    if !out.status.success() {
        return Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Names of the `inet` tables in the calling thread's namespace starting with `prefix`.
pub fn list_tables(backend: NftBackend, prefix: &str) -> Result<Vec<String>, NetError> {
    let out = run(backend, "list tables", "list tables")?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| NetError::Nft {
        what: "parse nft output".into(),
        message: e.to_string(),
    })?;
    let mut names = Vec::new();
    if let Some(arr) = v.get("nftables").and_then(|a| a.as_array()) {
        for o in arr {
            if let Some(t) = o.get("table") {
                if t.get("family").and_then(|f| f.as_str()) == Some("inet") {
                    if let Some(n) = t.get("name").and_then(|n| n.as_str()) {
                        if n.starts_with(prefix) {
                            names.push(n.to_string());
                        }
                    }
                }
            }
        }
    }
    Ok(names)
}
