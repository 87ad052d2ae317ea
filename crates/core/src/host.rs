//! The host side effects core drives besides the VMM ([`hutch_vmm::Vmm`]) and the state store
//! ([`hutch_store::Store`]): sandbox networks and images. Each is a trait holding only what core
//! calls, so that tests can run the [`crate::Manager`] over fakes (`hutch-testkit`) and inject
//! failures at any step; the daemon passes the real [`hutch_net::Network`] and an
//! [`ImageDir`].

use std::{os::fd::OwnedFd, path::PathBuf, sync::Arc, time::SystemTime};

use async_trait::async_trait;
use hutch_image::{Image, ImageError};
use hutch_net::{
    FlowEvent, NetError, Network, OwnedObject, Policy, PublishedPort, SandboxNet, WireGuardConfig,
};

/// Per-sandbox host networks, as core uses them (see [`hutch_net::Network`], the real one, for
/// what each operation guarantees). Every object a network owns is named by its sandbox id, and
/// [`HostNetwork::destroy`] removes all of them.
#[async_trait]
pub trait HostNetwork: Send + Sync {
    /// Creates a sandbox's network behind `policy` (and `tunnel`, if given). `None` for
    /// [`Policy::None`]: nothing is created. On error nothing is left behind.
    async fn create(
        &self,
        id: &str,
        policy: &Policy,
        tunnel: Option<&WireGuardConfig>,
    ) -> Result<Option<SandboxNet>, NetError>;

    /// Opens the network's TAP and returns the descriptor, for a VMM that takes it open.
    fn open_tap(&self, net: &SandboxNet) -> Result<OwnedFd, NetError>;

    /// The network's TAP by name and the path of its namespace, for a VMM that opens it itself.
    fn named_tap(&self, net: &SandboxNet) -> Result<(String, PathBuf), NetError>;

    /// Takes over the network of a sandbox a previous daemon created (after a restart).
    async fn adopt(
        &self,
        id: &str,
        policy: &Policy,
        tunnel: Option<&WireGuardConfig>,
    ) -> Result<(), NetError>;

    /// Replaces a sandbox's egress policy.
    async fn set_policy(&self, id: &str, policy: &Policy) -> Result<(), NetError>;

    /// Publishes the guest's TCP `guest_port` on a host loopback port (`0`: any free one).
    async fn publish(
        &self,
        id: &str,
        guest_port: u16,
        host_port: u16,
    ) -> Result<PublishedPort, NetError>;

    /// Stops publishing a guest port; `false` if it was not published.
    async fn unpublish(&self, id: &str, guest_port: u16) -> Result<bool, NetError>;

    /// The sandbox's published ports.
    fn published(&self, id: &str) -> Vec<PublishedPort>;

    /// The sandbox's network decisions at or after `since`, oldest first.
    fn events(&self, id: &str, since: SystemTime) -> Vec<FlowEvent>;

    /// Removes everything the sandbox's network owns. Idempotent.
    async fn destroy(&self, id: &str) -> Result<(), NetError>;

    /// Every network object this host holds for some sandbox (to remove those no sandbox owns
    /// after a restart).
    async fn list_owned(&self) -> Result<Vec<OwnedObject>, NetError>;

    /// Turns the guest's web traffic to a broker listener (see
    /// [`hutch_net::Network::intercept`]) and gives the broker its views of the sandbox.
    async fn intercept(&self, id: &str) -> Result<Intercepted, NetError>;
}

/// What a sandbox's secret broker gets from its network.
pub struct Intercepted {
    /// Where the guest's redirected (and explicit proxy) connections arrive.
    pub listener: tokio::net::TcpListener,
    /// What the sandbox's DNS filter answered.
    pub dns: Arc<dyn hutch_broker::DnsOracle>,
    /// Opens upstream connections from the sandbox's namespace.
    pub dial: Arc<dyn hutch_broker::Dial>,
    /// Where the guest sends the broker's self-test ([`hutch_broker::CANARY_HOST`]): an address
    /// whose connections reach the listener only if interception is wired.
    pub canary: std::net::SocketAddr,
}

/// The DNS filter's answers as the broker asks for them.
struct FilterAnswers(hutch_net::Answers);

impl hutch_broker::DnsOracle for FilterAnswers {
    fn answers(&self, host: &str) -> Option<Vec<std::net::IpAddr>> {
        Some(self.0.addresses(host)).filter(|a| !a.is_empty())
    }
}

/// Upstream connections from the sandbox's namespace.
struct NamespaceDial(hutch_net::Dialer);

impl hutch_broker::Dial for NamespaceDial {
    fn dial(&self, dst: std::net::SocketAddr) -> hutch_broker::DialFuture {
        let dialer = self.0.clone();
        Box::pin(async move { dialer.connect(dst).await })
    }
}

#[async_trait]
impl HostNetwork for Network {
    async fn create(
        &self,
        id: &str,
        policy: &Policy,
        tunnel: Option<&WireGuardConfig>,
    ) -> Result<Option<SandboxNet>, NetError> {
        self.create_with(id, policy, tunnel).await
    }

    fn open_tap(&self, net: &SandboxNet) -> Result<OwnedFd, NetError> {
        Network::open_tap(self, net)
    }

    fn named_tap(&self, net: &SandboxNet) -> Result<(String, PathBuf), NetError> {
        Network::named_tap(self, net)
    }

    async fn adopt(
        &self,
        id: &str,
        policy: &Policy,
        tunnel: Option<&WireGuardConfig>,
    ) -> Result<(), NetError> {
        Network::adopt(self, id, policy, tunnel).await
    }

    async fn set_policy(&self, id: &str, policy: &Policy) -> Result<(), NetError> {
        Network::set_policy(self, id, policy).await
    }

    async fn publish(
        &self,
        id: &str,
        guest_port: u16,
        host_port: u16,
    ) -> Result<PublishedPort, NetError> {
        Network::publish(self, id, guest_port, host_port).await
    }

    async fn unpublish(&self, id: &str, guest_port: u16) -> Result<bool, NetError> {
        Network::unpublish(self, id, guest_port).await
    }

    fn published(&self, id: &str) -> Vec<PublishedPort> {
        Network::published(self, id)
    }

    fn events(&self, id: &str, since: SystemTime) -> Vec<FlowEvent> {
        Network::events(self, id, since)
    }

    async fn destroy(&self, id: &str) -> Result<(), NetError> {
        Network::destroy(self, id).await
    }

    async fn list_owned(&self) -> Result<Vec<OwnedObject>, NetError> {
        Network::list_owned(self).await
    }

    async fn intercept(&self, id: &str) -> Result<Intercepted, NetError> {
        let i = Network::intercept(self, id).await?;
        Ok(Intercepted {
            listener: i.listener,
            dns: Arc::new(FilterAnswers(i.answers)),
            dial: Arc::new(NamespaceDial(i.dialer)),
            // The gateway's port 80: redirected to the listener like any guest HTTP.
            canary: (hutch_net::GATEWAY_ADDR, 80).into(),
        })
    }
}

/// Where core finds the images sandboxes boot from, by name.
pub trait ImageSource: Send + Sync + std::fmt::Debug {
    /// The image called `name` ([`ImageError::NotFound`] if there is none).
    fn open(&self, name: &str) -> Result<Image, ImageError>;
}

/// The images `hutch image build` wrote into a directory.
#[derive(Debug, Clone)]
pub struct ImageDir(PathBuf);

impl ImageDir {
    /// The images in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> ImageDir {
        ImageDir(dir.into())
    }
}

impl ImageSource for ImageDir {
    fn open(&self, name: &str) -> Result<Image, ImageError> {
        hutch_image::open(&self.0, name)
    }
}
