//! `hutch daemon`'s options: where it listens, its limits, its backend and networking.

/// `hutch daemon`.
#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    /// Unix socket path (default `$HUTCH_HOME/hutch.sock`).
    #[arg(long)]
    pub socket: Option<std::path::PathBuf>,
    /// Also serve on TCP at this address; every request then needs a bearer token.
    #[arg(long, value_name = "ADDR")]
    pub listen_tcp: Option<String>,
    /// Also serve an E2B-compatible API (REST and envd) on TCP at this address, for E2B's
    /// SDK with `E2B_API_URL` and `E2B_SANDBOX_URL` set to it and a hutch token as its API
    /// key.
    #[arg(long, value_name = "ADDR")]
    pub listen_e2b: Option<String>,
    /// Most sandboxes alive at once.
    #[arg(long, default_value_t = 32)]
    pub max_sandboxes: usize,
    /// Most guest memory in MiB over all live sandboxes.
    #[arg(long, default_value_t = 16384)]
    pub memory_budget_mib: u64,
    /// Seconds a boot may take.
    #[arg(long, default_value_t = 120)]
    pub boot_timeout: u64,
    /// The VMM, and whether Firecracker is jailed.
    #[command(flatten)]
    pub vmm: crate::backend::BackendArgs,
    /// Run the host side of sandbox networks inside this network namespace instead of the
    /// host's own (for tests that must not touch the host).
    #[arg(long, hide = true)]
    pub net_host_netns: Option<String>,
    /// The DNS server sandboxes' DNS filters ask for the names their policy allows (asked from
    /// the host side of the networks); default: the first `nameserver` of `/etc/resolv.conf`.
    #[arg(long, value_name = "ADDR:PORT")]
    pub net_dns_upstream: Option<std::net::SocketAddr>,
    /// A PEM file of CA certificates the secret brokers also trust for upstream servers, besides
    /// the host's trust store (a private CA in front of internal origins; a test internet).
    #[arg(long, value_name = "FILE")]
    pub secrets_upstream_roots: Option<std::path::PathBuf>,
    /// Run without sandbox networking: only `--net none` sandboxes, and templates without a
    /// NIC.
    #[arg(long)]
    pub no_network: bool,
    /// Sandbox networks kept made ahead (namespace, links, deny-all table), so that a create
    /// only renames one and applies its policy; refilled in the background. 0: make each on
    /// demand.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(0..=64))]
    pub net_spares: u16,
    /// Most TCP connections served at once that have not yet presented a valid token; more
    /// are closed as soon as they are accepted.
    #[arg(long, hide = true, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub tcp_max_unauthenticated: u32,
    /// Seconds a TCP connection may take to send a request's headers, or sit idle between
    /// requests, before it is closed.
    #[arg(long, hide = true, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub tcp_header_timeout: u64,
    /// Days a sealed journal is kept after its sandbox was destroyed (0: kept forever).
    #[arg(long, default_value_t = 30)]
    pub journal_retention_days: u64,
    /// Bytes of data (output, terminal input, resizes) each exec's session recording keeps;
    /// past it the recording is cut with a marker (the exec runs on).
    #[arg(long, value_name = "BYTES", default_value_t = hutch_journal::recording::DEFAULT_CAP,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub recording_cap: u64,
    /// The `iss` of guests' identity tokens: the URL where services reach this daemon's
    /// `/.well-known/jwks.json` (default: http:// and the --listen-tcp address).
    #[arg(long, value_name = "URL")]
    pub identity_issuer: Option<String>,
    /// Seconds a guest's identity token holds (at most 600).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub identity_token_ttl: u64,
    /// Join this fleet (`etcd://h1:2379,h2:2379`): the host registers under a lease, keeps
    /// its capacity current there, and accepts the fleet's tokens (needs --listen-tcp and
    /// --advertise).
    #[arg(long, value_name = "URL", requires_all = ["advertise", "listen_tcp"])]
    pub fleet: Option<String>,
    /// The URL gateways reach this daemon's TCP API at (`http://host:port`).
    #[arg(long, value_name = "URL")]
    pub advertise: Option<String>,
    /// This host's zone (failure domain), for placement.
    #[arg(long)]
    pub zone: Option<String>,
    /// This host's labels for placement (`k=v`, comma-separated or repeated).
    #[arg(long, value_name = "K=V", value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Options every fleet member shares.
    #[command(flatten)]
    pub fleet_opts: FleetOpts,
}

/// Fleet settings shared by `hutch daemon --fleet` and `hutch gateway`.
#[derive(Debug, Clone, clap::Args)]
pub struct FleetOpts {
    /// Where the fleet's keys live in etcd (tests give each fleet its own).
    #[arg(long, hide = true, default_value = hutch_fleet::DEFAULT_PREFIX)]
    pub fleet_prefix: String,
    /// Seconds a host's lease lasts without renewal (its record goes when it lapses).
    #[arg(long, hide = true, default_value_t = 10, value_parser = clap::value_parser!(u64).range(2..=300))]
    pub fleet_lease_ttl: u64,
    /// Seconds a sandbox whose host vanished (lease expired) stays `unreachable` before it
    /// is `lost`: never recreated elsewhere, stopped by its host if that returns.
    #[arg(long, value_name = "SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub fleet_lost_after: u64,
}

/// `hutch gateway`.
#[derive(Debug, clap::Args)]
pub struct GatewayArgs {
    /// The fleet (`etcd://h1:2379,h2:2379`).
    #[arg(long, value_name = "URL")]
    pub fleet: String,
    /// Serve the HTTP API on TCP at this address (fleet tokens required).
    #[arg(long, value_name = "ADDR")]
    pub listen: String,
    /// Options every fleet member shares.
    #[command(flatten)]
    pub fleet_opts: FleetOpts,
}

impl DaemonArgs {
    /// The identity tokens' issuer URL: `--identity-issuer`, else the TCP listener's address,
    /// else `http://localhost` (verifiers then need the keys some other way).
    pub fn issuer(&self) -> String {
        match (&self.identity_issuer, &self.listen_tcp) {
            (Some(url), _) => url.clone(),
            (None, Some(addr)) => format!("http://{addr}"),
            (None, None) => "http://localhost".into(),
        }
    }
}

/// VM shape shared by commands that boot one.
#[derive(Debug, Clone, clap::Args)]
pub struct VmArgs {
    /// Guest image to boot.
    #[arg(long, default_value = "default")]
    pub image: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=64))]
    pub cpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(128..=262144))]
    pub memory: u32,
    /// Size of the guest's writable disk in MiB.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(16..=1048576))]
    pub disk: u64,
    /// Seconds to wait for the guest agent to come up.
    #[arg(long, default_value_t = 120)]
    pub boot_timeout: u64,
    /// The VMM, and whether Firecracker is jailed.
    #[command(flatten)]
    pub vmm: crate::backend::BackendArgs,
}
