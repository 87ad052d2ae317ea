//! The Hutch daemon: the composition root that picks the backend, opens the store, builds the
//! [`Manager`] and serves the HTTP API (`hutch daemon` calls [`run`]).
//!
//! Serves the HTTP API on a Unix socket (mode 0660: file permissions are the access control,
//! every caller is admin) and, when asked, on TCP where every request needs a bearer token.
//! Handlers only parse requests into calls on the one request surface
//! ([`SandboxApi`], here [`LocalApi`]) and format the results; the [`Manager`] behind it
//! decides what is legal.

#![forbid(unsafe_code)]

pub mod args;
mod audit;
mod auth;
pub mod backend;
mod e2b;
mod error;
mod extract;
mod files;
mod fleet;
pub mod gateway;
mod home;
mod http_error;
mod listen;
mod lock;
mod mcp;
mod observe;
mod openapi;
mod ports;
pub mod process;
mod routes;
mod secrets;
pub mod signal;
mod tasks;
mod templates;
mod ws;

use std::{os::unix::fs::PermissionsExt, path::Path, sync::Arc, time::Duration};

use hutch_core::{
    audit::{HostKeySigner, Journals},
    service::{Caller, LocalApi, SandboxApi},
    Limits, Manager, ManagerConfig,
};
use hutch_store::{AsyncStore, SqliteStore, Store};
use tokio::net::{TcpListener, UnixListener};

pub use args::{DaemonArgs, FleetOpts, GatewayArgs, VmArgs};
pub use auth::token_hash;
pub use backend::{BackendArgs, BackendChoice};
pub use error::DaemonError;
pub use home::Home;

/// Shared by every handler.
pub struct AppState {
    /// The request surface every route calls.
    pub api: Arc<dyn SandboxApi>,
    /// Token lookups (the manager's store, off the async workers).
    pub store: AsyncStore,
    /// The fleet this host joined (`--fleet`): its tokens are accepted too.
    pub fleet: Option<Arc<hutch_fleet::FleetCache>>,
}

/// How often TTLs are checked.
const TTL_TICK: Duration = Duration::from_secs(1);

/// Runs the daemon until `shutdown` resolves (the CLI passes SIGINT/SIGTERM/SIGHUP).
/// Sandboxes keep running when it stops; the next start adopts them.
pub async fn run(
    home: &Home,
    args: DaemonArgs,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    // Before anything that reads or changes the home: a second daemon must touch nothing.
    let _lock = lock::acquire(&home.daemon_lock())?;
    listen::raise_fd_limit();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(&home.state_db()).map_err(DaemonError::Store)?);
    let backend = backend::backend(home, "default", &args.vmm).await?;
    eprintln!(
        "hutch daemon: backend {} ({})",
        backend.vmm.name(),
        backend.why
    );
    let backend_name = backend.vmm.name().to_string();
    let cfg = ManagerConfig {
        images: Arc::new(hutch_core::ImageDir::new(home.images())),
        runs_dir: home.vms(),
        limits: Limits {
            max_sandboxes: args.max_sandboxes,
            memory_budget_mib: args.memory_budget_mib,
        },
        templates: hutch_core::Templates::new(home.templates(), home.templates_shm()),
        snapshots_dir: home.snapshots(),
        boot_timeout: Duration::from_secs(args.boot_timeout),
        jails_dir: Some(home.jails()),
        detached: true,
        secrets: Some(Arc::new(secret_store(home, &args)?)),
    };
    let net = network(home, &args).await;
    let spares = net.as_ref().ok().cloned();
    let net = net.map(|n| n as Arc<dyn hutch_core::HostNetwork>);
    let manager = Manager::new(cfg, store, backend.vmm, net);
    let identity = hutch_core::identity::IdentityConfig {
        issuer: args.issuer(),
        lifetime: Duration::from_secs(args.identity_token_ttl),
    };
    let issuer = hutch_core::identity::Issuer::load_or_create(&home.identity_key(), identity)
        .map_err(DaemonError::IdentityKey)?;
    eprintln!(
        "hutch daemon: identity tokens issued as {} (key {})",
        issuer.issuer(),
        issuer.kid()
    );
    manager.set_identity(Arc::new(issuer));
    // Before the reconcile, so that adopted sandboxes' events are journalled from the start.
    let journals = journals(home, args.recording_cap).await?;
    let feed = Arc::new(hutch_core::audit::GuestFeed::start(
        journals.clone(),
        Arc::downgrade(&manager),
        hutch_core::audit::FeedLimits::default(),
    ));
    manager.set_guest_feed(feed.clone());
    if let Some(net) = &spares {
        // Each decision is counted and journalled in its sandbox's journal.
        net.set_event_sink(Some(Arc::new(hutch_net::FanOut(vec![
            manager.metrics().clone(),
            feed,
        ]))));
    }
    let report = manager.reconcile().await?;
    tracing::info!(?report, "reconciled");
    eprintln!(
        "hutch daemon: adopted {}, failed {}, removed {} stray VMM(s), {} stray run dir(s) and {} unused save(s)",
        report.adopted.len(),
        report.failed.len(),
        report.killed_processes,
        report.removed_dirs,
        report.removed_snapshots
    );
    let tasks = Arc::new(hutch_core::task::Tasks::new(home.tasks(), manager.clone()));
    match tasks.recover().await {
        Ok(ids) if !ids.is_empty() => eprintln!(
            "hutch daemon: {} task(s) interrupted by the restart marked failed",
            ids.len()
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %hutch_core::chain(&e), "recovering tasks failed"),
    }
    let retention = Duration::from_secs(args.journal_retention_days.saturating_mul(86_400));
    let fleet = fleet::connect(&args).await?;
    let state = Arc::new(AppState {
        api: Arc::new(LocalApi::new(manager.clone(), tasks).with_journals(journals.clone())),
        store: manager.store().clone(),
        fleet: fleet.as_ref().map(|(_, cache)| cache.clone()),
    });
    manager.start_pools();
    tokio::spawn(expire_loop(manager.clone(), journals, retention));

    // The Unix socket is bound last: clients (and the test suites) take its appearance as the
    // daemon being ready, so every TCP listener must already be accepting by then.
    let mut servers = tokio::task::JoinSet::new();
    if let Some(addr) = &args.listen_tcp {
        let app = routes::router_with_tokens(state.clone());
        serve_tcp(&mut servers, addr, app, &args).await?;
        eprintln!("hutch daemon: listening on tcp://{addr} (bearer token required)");
    }
    if let Some(addr) = &args.listen_e2b {
        serve_tcp(&mut servers, addr, e2b::router(state.clone()), &args).await?;
        eprintln!("hutch daemon: E2B-compatible API on http://{addr} (API key: a hutch token)");
    }
    let socket = args.socket.clone().unwrap_or_else(|| home.socket());
    let unix = bind_unix(&socket)?;
    let unix_app = routes::router(state.clone(), Caller::admin().named("socket"));
    servers.spawn(async move { axum::serve(unix, unix_app).await });
    eprintln!("hutch daemon: listening on {}", socket.display());
    let membership = match fleet {
        Some((fleet, cache)) => {
            let host = fleet::host_record(&args, &backend_name)?;
            let capacity = fleet::follow_capacity(
                manager.clone(),
                home.vms(),
                args.max_sandboxes,
                args.memory_budget_mib,
            );
            let membership = fleet::Membership::join(
                fleet,
                cache,
                host,
                capacity,
                manager.clone(),
                &args.fleet_opts,
            )
            .await?;
            eprintln!(
                "hutch daemon: joined the fleet as {} (incarnation {})",
                args.advertise.as_deref().unwrap_or_default(),
                membership.incarnation()
            );
            Some(membership)
        }
        None => None,
    };
    tokio::select! {
        _ = shutdown => {}
        Some(r) = servers.join_next() => {
            if let Ok(Err(e)) = r {
                return Err(DaemonError::Io(e));
            }
        }
    }
    let _ = std::fs::remove_file(&socket);
    if let Some(membership) = membership {
        membership.leave().await;
    }
    // Pooled clones belong to no sandbox: they go with the daemon.
    manager.drain_pools().await;
    // So are spare networks (a daemon killed instead leaves them to its successor).
    if let Some(net) = spares {
        net.drop_spares().await;
    }
    eprintln!("hutch daemon: stopped; sandboxes keep running and are adopted on the next start");
    Ok(())
}

/// Binds `addr` and serves `app` (a router that checks tokens) on it with the TCP
/// listener's limits, as one more of `servers`.
async fn serve_tcp(
    servers: &mut tokio::task::JoinSet<std::io::Result<()>>,
    addr: &str,
    app: axum::Router,
    args: &DaemonArgs,
) -> Result<(), DaemonError> {
    let tcp = TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::Bind {
            addr: addr.to_string(),
            source,
        })?;
    let limits = listen::TcpLimits {
        max_unauthenticated: args.tcp_max_unauthenticated as usize,
        header_timeout: Duration::from_secs(args.tcp_header_timeout),
    };
    servers.spawn(async move {
        listen::serve_tcp(tcp, app, limits).await;
        Ok(())
    });
    Ok(())
}

/// Sandbox networking on this host, or why it is unavailable (sandboxes asking for a network
/// are then refused with that reason; those without one still work).
async fn network(home: &Home, args: &DaemonArgs) -> Result<Arc<hutch_net::Network>, String> {
    if args.no_network {
        return Err("the daemon runs with --no-network".into());
    }
    // Several daemons (homes) may share a host: each adopts and removes only its own networks.
    let home_dir = home.vms();
    let cfg = hutch_net::NetConfig {
        host_netns: args.net_host_netns.clone(),
        owner: hutch_net::names::owner_tag(&home_dir.to_string_lossy()),
        spares: usize::from(args.net_spares),
        upstream_dns: args.net_dns_upstream,
        ..Default::default()
    };
    match hutch_net::Network::new(cfg).await {
        Ok(net) => {
            let net = Arc::new(net);
            // Ends by itself when the last `Arc` goes.
            drop(net.keep_spares());
            Ok(net)
        }
        Err(e) => {
            let why = hutch_core::chain(&e);
            eprintln!("hutch daemon: sandbox networking unavailable: {why}");
            Err(why)
        }
    }
}

/// The host's secrets, with the extra upstream roots the options name.
fn secret_store(
    home: &Home,
    args: &DaemonArgs,
) -> Result<hutch_core::secrets::SecretStore, DaemonError> {
    let store =
        hutch_core::secrets::SecretStore::open(&home.secrets()).map_err(DaemonError::Secrets)?;
    match &args.secrets_upstream_roots {
        Some(path) => store
            .trust_upstream_roots(path)
            .map_err(DaemonError::Secrets),
        None => Ok(store),
    }
}

/// Binds the Unix socket with mode 0660, replacing a stale socket file but never a live one.
fn bind_unix(path: &Path) -> Result<UnixListener, DaemonError> {
    let err = |source| DaemonError::Bind {
        addr: path.display().to_string(),
        source,
    };
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another hutch daemon is serving it",
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    Ok(listener)
}

/// The sandboxes' journals, their keys certified by the host key (the one that signs task
/// records), read off the async workers.
async fn journals(home: &Home, recording_cap: u64) -> Result<Arc<Journals>, DaemonError> {
    let path = home.tasks().join("host.key");
    let key = tokio::task::spawn_blocking(move || hutch_task::sign::HostKey::load_or_create(&path))
        .await
        .map_err(|e| DaemonError::Io(std::io::Error::other(e)))?
        .map_err(|e| DaemonError::Io(std::io::Error::other(hutch_core::chain(&e))))?;
    Ok(Arc::new(
        Journals::new(home.journal(), Arc::new(HostKeySigner(key)))
            .with_recording_cap(recording_cap),
    ))
}

/// How many TTL ticks between two sweeps of journals past their retention.
const PRUNE_EVERY: u32 = 3600;

/// Destroys sandboxes whose TTL passed, also those that expired while the daemon was down,
/// and seals their journals; now and then removes sealed journals past `retention` (0: never).
async fn expire_loop(manager: Arc<Manager>, journals: Arc<Journals>, retention: Duration) {
    let mut tick = 0u32;
    loop {
        match manager.expire_due().await {
            Ok(ids) => {
                for id in ids {
                    let seal = hutch_journal::Event::new(hutch_journal::kinds::SEAL)
                        .by(Some(&hutch_journal::Actor {
                            principal: "daemon".into(),
                            request_id: None,
                        }))
                        .attr(hutch_journal::attr::SEAL_REASON, "ttl expired");
                    journals.seal(&id, seal).await;
                }
            }
            Err(e) => tracing::warn!(error = %hutch_core::chain(&e), "TTL check failed"),
        }
        if tick.is_multiple_of(PRUNE_EVERY) && !retention.is_zero() {
            match journals.prune(retention).await {
                Ok(ids) if !ids.is_empty() => {
                    tracing::info!(?ids, "removed journals past retention")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "journal retention sweep failed"),
            }
        }
        tick = tick.wrapping_add(1);
        tokio::time::sleep(TTL_TICK).await;
    }
}
