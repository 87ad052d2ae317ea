//! `hutch-agent`: PID 1 inside every Hutch VM.
//!
//! As PID 1 it boots the guest's userspace ([`init`]) and then serves the host over the
//! virtio-serial port named `hutch.0` (QEMU) and on vsock port 1024 (Firecracker; every
//! accepted connection), forever: it never exits, and no child's crash takes it down. For tests
//! it can also run as an ordinary host process serving one inherited socket (`hutch-agent
//! --serve-fd N`) or every connection on an inherited listening socket (`hutch-agent
//! --listen-fd N`), so the protocol and exec logic are exercised without a VM.
//!
//! Run as `hutch-identity` (the name it is bind-mounted under in the guest), it is the client
//! guest processes use to get a workload identity token ([`identity`]). It also serves
//! `SSH_AUTH_SOCK`, forwarding each connection to the host's agent for the sandbox's key
//! ([`ssh`]).

mod fdstream;
mod files;
mod identity;
mod init;
mod net;
mod ops;
mod reaper;
mod server;
mod setup;
mod ssh;
mod trust;
mod vsock;

use std::{
    os::fd::{FromRawFd, OwnedFd},
    time::Duration,
};

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false)
        .without_time()
        .init();
    let args: Vec<String> = std::env::args().collect();
    let name = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .and_then(|n| n.to_str());
    if name == Some("hutch-identity") {
        std::process::exit(identity::cli(&args[1..]));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if std::process::id() == 1 {
        runtime.block_on(run_as_init());
    } else if let [_, flag, fd] = args.as_slice() {
        let Ok(fd) = fd.parse::<i32>() else {
            usage();
        };
        // SAFETY: the caller handed us this descriptor to own.
        let take = || unsafe { OwnedFd::from_raw_fd(fd) };
        if let Some(path) = std::env::var_os(identity::SOCKET_ENV) {
            runtime.spawn(identity::serve(path.into()));
        }
        if let Some(path) = std::env::var_os(ssh::SOCKET_ENV) {
            runtime.spawn(ssh::serve(path.into()));
        }
        match flag.as_str() {
            "--serve-fd" => runtime.block_on(server::serve_host_process(take())),
            "--listen-fd" => runtime.block_on(server::serve_host_listener(take())),
            _ => usage(),
        }
    } else {
        usage();
    }
}

fn usage() -> ! {
    eprintln!(
        "hutch-agent runs as PID 1 in a Hutch VM; for tests: hutch-agent --serve-fd FD \
         (one connected socket) or --listen-fd FD (a listening socket)"
    );
    std::process::exit(2);
}

/// Boots the guest, then serves the host channel for as long as the VM lives.
async fn run_as_init() {
    let boot = match init::boot() {
        Ok(boot) => boot,
        Err(e) => init::fatal(&e),
    };
    if boot.probe {
        init::probe_and_power_off();
    }
    tokio::spawn(identity::serve(identity::SOCKET.into()));
    tokio::spawn(ssh::serve(ssh::socket_path()));
    if let Some(listener) = boot.vsock {
        match reaper::global() {
            Ok(reaper) => {
                tokio::spawn(vsock::serve_listener(listener, reaper, true));
            }
            Err(e) => tracing::error!(error = %e, "cannot start the child reaper"),
        }
    }
    match boot.port {
        Some(port) => loop {
            if let Err(e) = server::serve_port(&port).await {
                tracing::error!(error = %e, "channel failed; reopening");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        },
        // Only vsock: its task serves for as long as the VM lives.
        None => std::future::pending().await,
    }
}
