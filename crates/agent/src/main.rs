//! `hutch-agent`: PID 1 inside every Hutch VM.
//!
//! As PID 1 it boots the guest's userspace ([`init`]) and then serves the host over the
//! virtio-serial port named `hutch.0`, forever: it never exits, and no child's crash takes it
//! down. For tests it can also run as an ordinary host process serving one inherited socket
//! (`hutch-agent --serve-fd N`), so the protocol and exec logic are exercised without a VM.

mod fdstream;
mod files;
mod init;
mod net;
mod ops;
mod reaper;
mod server;
mod setup;

use std::{os::fd::FromRawFd, time::Duration};

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false)
        .without_time()
        .init();
    let args: Vec<String> = std::env::args().collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if std::process::id() == 1 {
        runtime.block_on(run_as_init());
    } else if let [_, flag, fd] = args.as_slice() {
        if flag == "--serve-fd" {
            let fd: i32 = fd
                .parse()
                .expect("--serve-fd takes a file descriptor number");
            // SAFETY: the caller handed us this descriptor to own.
            let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
            runtime.block_on(server::serve_host_process(owned));
            return;
        }
        usage();
    } else {
        usage();
    }
}

fn usage() {
    eprintln!("hutch-agent runs as PID 1 in a Hutch VM; for tests: hutch-agent --serve-fd FD");
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
    loop {
        if let Err(e) = server::serve_port(&boot.port).await {
            tracing::error!(error = %e, "channel failed; reopening");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
