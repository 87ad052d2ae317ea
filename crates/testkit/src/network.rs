//! [`FakeNetwork`]: sandbox networks that are only records.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    os::fd::OwnedFd,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use async_trait::async_trait;
use hutch_core::{HostNetwork, Intercepted};
use hutch_net::{
    FlowEvent, GuestNetConfig, NetError, OwnedObject, Policy, PublishedPort, SandboxNet, Transit,
    WireGuardConfig,
};

/// A step of [`FakeNetwork`] that [`FakeNetwork::fail_at`] can make fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetStep {
    /// Creating a network (nothing is made).
    Create,
    /// Handing out a created network's TAP (by descriptor or by name): the network exists
    /// when this fails, as when the real one's TAP cannot be opened.
    Tap,
    /// Taking over a network after a restart.
    Adopt,
    /// Changing a policy.
    SetPolicy,
    /// Publishing a port.
    Publish,
    /// Removing a network (it stays).
    Destroy,
    /// Turning interception on for a secret broker.
    Intercept,
}

/// A [`HostNetwork`] that creates nothing on the host: each sandbox's "network" is a record of
/// its policy and published ports, so a test can check what exists ([`FakeNetwork::networks`])
/// and make any step fail once ([`FakeNetwork::fail_at`]). It keeps the real one's contract:
/// no network under [`Policy::None`], one network per sandbox, idempotent destroy, ports
/// published once per guest port and host port.
#[derive(Debug, Default)]
pub struct FakeNetwork {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    nets: BTreeMap<String, Net>,
    fail: Vec<NetStep>,
    next_port: u16,
    /// Brokers are started but the guest's traffic does not reach them.
    unwired: bool,
}

#[derive(Debug)]
struct Net {
    policy: Policy,
    ports: BTreeMap<u16, PublishedPort>,
    /// The broker listener's address, once interception is on.
    broker: Option<SocketAddr>,
}

/// The fake resolver: it never answered any name.
struct NoAnswers;

impl hutch_broker::DnsOracle for NoAnswers {
    fn answers(&self, _host: &str) -> Option<Vec<std::net::IpAddr>> {
        None
    }
}

/// The first host port the fake hands out for "any free port".
const FIRST_PORT: u16 = 40000;

impl FakeNetwork {
    /// A host without sandbox networks.
    pub fn new() -> FakeNetwork {
        FakeNetwork::default()
    }

    /// Makes the next `step` fail (once) with [`NetError::Config`].
    pub fn fail_at(&self, step: NetStep) {
        self.lock().fail.push(step);
    }

    /// From now on, interception starts a broker listener that the guest's traffic never
    /// reaches (a broken redirect): the broker's self-test from the guest must fail.
    pub fn unwire_brokers(&self) {
        self.lock().unwired = true;
    }

    /// The sandboxes that have a network, sorted.
    pub fn networks(&self) -> Vec<String> {
        self.lock().nets.keys().cloned().collect()
    }

    /// Where a sandbox's broker listens (a loopback port), once interception is on.
    pub fn broker(&self, id: &str) -> Option<SocketAddr> {
        self.lock().nets.get(id).and_then(|n| n.broker)
    }

    /// A sandbox's current policy, if it has a network.
    pub fn policy(&self, id: &str) -> Option<Policy> {
        self.lock().nets.get(id).map(|n| n.policy.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    /// Fails if `step` was set to fail (and clears it).
    fn step(&mut self, step: NetStep) -> Result<(), NetError> {
        match self.fail.iter().position(|s| *s == step) {
            Some(i) => {
                self.fail.remove(i);
                Err(NetError::Config(format!("injected failure at {step:?}")))
            }
            None => Ok(()),
        }
    }

    fn net(&mut self, id: &str) -> Result<&mut Net, NetError> {
        self.nets
            .get_mut(id)
            .ok_or_else(|| NetError::NotFound(id.into()))
    }
}

/// What the real network would hand out for sandbox `id`.
fn sandbox_net(id: &str) -> SandboxNet {
    let host = Ipv4Addr::new(10, 200, 0, 1);
    SandboxNet {
        id: id.into(),
        netns: format!("hutch-{id}"),
        tap_name: "tap0".into(),
        host_veth: "hvfake".into(),
        transit: Transit {
            slot: 0,
            net: ipnet::Ipv4Net::new(Ipv4Addr::new(10, 200, 0, 0), 30).expect("a /30"),
            host,
            ns: Ipv4Addr::new(10, 200, 0, 2),
        },
        guest: GuestNetConfig::standard(),
        guest_netns: None,
    }
}

#[async_trait]
impl HostNetwork for FakeNetwork {
    async fn create(
        &self,
        id: &str,
        policy: &Policy,
        _tunnel: Option<&WireGuardConfig>,
    ) -> Result<Option<SandboxNet>, NetError> {
        hutch_net::validate_id(id)?;
        let mut st = self.lock();
        st.step(NetStep::Create)?;
        if *policy == Policy::None {
            return Ok(None);
        }
        if st.nets.contains_key(id) {
            return Err(NetError::AlreadyExists(id.into()));
        }
        let net = Net {
            policy: policy.clone(),
            ports: BTreeMap::new(),
            broker: None,
        };
        st.nets.insert(id.into(), net);
        Ok(Some(sandbox_net(id)))
    }

    fn open_tap(&self, net: &SandboxNet) -> Result<OwnedFd, NetError> {
        let mut st = self.lock();
        st.step(NetStep::Tap)?;
        st.net(&net.id)?;
        let null = std::fs::File::open("/dev/null").map_err(|e| NetError::Config(e.to_string()))?;
        Ok(null.into())
    }

    fn named_tap(&self, net: &SandboxNet) -> Result<(String, PathBuf), NetError> {
        let mut st = self.lock();
        st.step(NetStep::Tap)?;
        st.net(&net.id)?;
        let netns = PathBuf::from(format!("/run/netns/{}", net.netns));
        Ok((net.tap_name.clone(), netns))
    }

    async fn adopt(
        &self,
        id: &str,
        policy: &Policy,
        _tunnel: Option<&WireGuardConfig>,
    ) -> Result<(), NetError> {
        let mut st = self.lock();
        st.step(NetStep::Adopt)?;
        if *policy == Policy::None && !st.nets.contains_key(id) {
            return Ok(());
        }
        st.net(id)?.policy = policy.clone();
        Ok(())
    }

    async fn set_policy(&self, id: &str, policy: &Policy) -> Result<(), NetError> {
        let mut st = self.lock();
        st.step(NetStep::SetPolicy)?;
        st.net(id)?.policy = policy.clone();
        Ok(())
    }

    async fn publish(
        &self,
        id: &str,
        guest_port: u16,
        host_port: u16,
    ) -> Result<PublishedPort, NetError> {
        let mut st = self.lock();
        st.step(NetStep::Publish)?;
        if guest_port == 0 {
            return Err(NetError::Config("guest port 0 cannot be published".into()));
        }
        if let Some(p) = st.net(id)?.ports.get(&guest_port) {
            if host_port == 0 || host_port == p.host.port() {
                return Ok(*p);
            }
            return Err(NetError::AlreadyPublished {
                guest_port,
                host_port: p.host.port(),
            });
        }
        let taken = |st: &State, port: u16| {
            st.nets
                .values()
                .any(|n| n.ports.values().any(|p| p.host.port() == port))
        };
        let port = match host_port {
            0 => loop {
                let port = FIRST_PORT + st.next_port;
                st.next_port += 1;
                if !taken(&st, port) {
                    break port;
                }
            },
            port if taken(&st, port) => return Err(NetError::PortInUse(port)),
            port => port,
        };
        let published = PublishedPort {
            guest_port,
            host: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        };
        st.net(id)?.ports.insert(guest_port, published);
        Ok(published)
    }

    async fn unpublish(&self, id: &str, guest_port: u16) -> Result<bool, NetError> {
        let mut st = self.lock();
        Ok(st.net(id)?.ports.remove(&guest_port).is_some())
    }

    fn published(&self, id: &str) -> Vec<PublishedPort> {
        let st = self.lock();
        st.nets
            .get(id)
            .map(|n| n.ports.values().copied().collect())
            .unwrap_or_default()
    }

    fn events(&self, _id: &str, _since: SystemTime) -> Vec<FlowEvent> {
        Vec::new()
    }

    async fn destroy(&self, id: &str) -> Result<(), NetError> {
        let mut st = self.lock();
        st.step(NetStep::Destroy)?;
        st.nets.remove(id);
        Ok(())
    }

    /// A loopback listener stands in for the one in the namespace; the fake resolver never
    /// answered anything, and upstream connections are dialled from here.
    async fn intercept(&self, id: &str) -> Result<Intercepted, NetError> {
        self.lock().step(NetStep::Intercept)?;
        self.lock().net(id)?;
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(|source| NetError::Io {
                what: "bind the fake broker listener".into(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| NetError::Io {
            what: "fake broker listener address".into(),
            source,
        })?;
        self.lock().net(id)?.broker = Some(addr);
        // The agent runs on the host: it reaches the listener directly, or (unwired) a port
        // that was free a moment ago and has nothing behind it.
        let canary = if self.lock().unwired {
            std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .and_then(|l| l.local_addr())
                .map_err(|source| NetError::Io {
                    what: "pick a port nothing serves".into(),
                    source,
                })?
        } else {
            addr
        };
        Ok(Intercepted {
            listener,
            dns: Arc::new(NoAnswers),
            dial: Arc::new(hutch_broker::DirectDial),
            canary,
        })
    }

    async fn list_owned(&self) -> Result<Vec<OwnedObject>, NetError> {
        let st = self.lock();
        Ok(st
            .nets
            .keys()
            .map(|id| OwnedObject::Netns {
                name: format!("hutch-{id}"),
                id: id.clone(),
            })
            .collect())
    }
}
