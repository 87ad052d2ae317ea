//! `hutch daemon` with real VMs under QEMU, driven through the typed client the CLI uses.
//!
//! One daemon (a child process with a private `HUTCH_HOME`, on its Unix socket and on a
//! loopback TCP port) serves most cases; the reconciliation case kills and restarts its own.
//! After everything, no VMM process or run dir of either home may remain. This file holds the
//! harness and the helpers every case uses; the cases live in modules by purpose.

// Tests wait on processes and threads synchronously, on threads of their own.
#![allow(clippy::disallowed_methods)]

use std::{path::PathBuf, process::Child, sync::OnceLock};

use hutch_api::{
    client::{Client, ClientError, Endpoint},
    CreateSandbox, ExecBody,
};
use hutch_types::{ErrorCode, SandboxSpec};
use libtest_mimic::{Arguments, Failed};

mod access;
mod audit;
mod broker;
#[path = "../common/mod.rs"]
mod common;
mod e2b;
mod files;
mod hostile;
mod identity;
mod lifecycle;
mod mcp;
mod network;
mod replay;
mod secrets;
mod templates;

use common::{check, hutch};

type Result<T = ()> = std::result::Result<T, Failed>;

/// A `hutch daemon` child process and its private home.
struct Daemon {
    home: tempfile::TempDir,
    child: Child,
    tcp: String,
    /// The E2B-compatible API's address.
    e2b: String,
}

impl Daemon {
    fn start(home: tempfile::TempDir) -> Daemon {
        Daemon::start_with(home, &[])
    }

    fn start_with(home: tempfile::TempDir, extra: &[&str]) -> Daemon {
        let port = free_port();
        let tcp = format!("127.0.0.1:{port}");
        let ttl = identity::TOKEN_TTL_SECS.to_string();
        let e2b = format!("127.0.0.1:{}", free_port());
        let base = [
            "--listen-tcp",
            tcp.as_str(),
            "--listen-e2b",
            e2b.as_str(),
            "--max-sandboxes",
            "16",
            "--identity-token-ttl",
            ttl.as_str(),
        ];
        let child = common::spawn_daemon(home.path(), &[&base[..], extra].concat());
        Daemon {
            home,
            child,
            tcp,
            e2b,
        }
    }

    fn client(&self) -> Client {
        Client::new(Endpoint::Unix(self.home.path().join("hutch.sock")), None)
    }

    fn tcp_client(&self, token: Option<&str>) -> Client {
        Client::new(Endpoint::Tcp(self.tcp.clone()), token.map(String::from))
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// For a daemon that is killed and never succeeded on its home: spare networks are removed by
/// a graceful stop or by the next daemon of the same home, and this one has neither.
const NO_SPARES: &[&str] = &["--net-spares", "0"];

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Suite {
    rt: tokio::runtime::Runtime,
    daemon: std::sync::Mutex<Daemon>,
    client: Client,
    home: PathBuf,
}

static SUITE: OnceLock<Suite> = OnceLock::new();

fn suite() -> &'static Suite {
    SUITE.get().expect("suite initialised")
}

fn main() {
    let args = Arguments::from_args();
    if args.list {
        // Listing (nextest asks for it before running each case in a process of its own)
        // starts nothing.
        libtest_mimic::run(&args, trials()).exit();
    }
    if common::default_image_or_skip("daemon").is_none() {
        return;
    }
    // VMs of a killed daemon are re-parented to us, so we can reap them.
    // SAFETY: prctl with constant arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
    let namespaces_before = common::hutch_netns();
    let daemon = Daemon::start(common::private_home());
    let home = daemon.home.path().to_path_buf();
    let client = daemon.client();
    let rt = common::suite_runtime();
    let _ = SUITE.set(Suite {
        rt,
        daemon: std::sync::Mutex::new(daemon),
        client,
        home,
    });

    let conclusion = libtest_mimic::run(&args, trials());

    let suite = suite();
    let left = suite.rt.block_on(destroy_all(&suite.client));
    let mut daemon = suite.daemon.lock().unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGTERM) };
    let _ = daemon.child.wait();
    reap_orphans();
    let mut leaks = common::leaks(&suite.home);
    leaks.extend(common::new_netns(&namespaces_before));
    if left.is_err() || !leaks.is_empty() {
        eprintln!("LEAK after the daemon suite: {left:?} {leaks:#?}");
        std::process::exit(1);
    }
    eprintln!("daemon suite: nothing left behind");
    // The suite lives in a static, never dropped: its temporary home goes by hand (and stays
    // for a look when something leaked).
    let _ = std::fs::remove_dir_all(&suite.home);
    conclusion.exit();
}

fn trials() -> Vec<libtest_mimic::Trial> {
    use {
        access::*, audit::*, broker::*, e2b::*, files::*, hostile::*, identity::*, lifecycle::*,
        mcp::*, network::*, replay::*, secrets::*, templates::*,
    };
    trials![
        three_concurrent_creates_then_exec,
        files_and_trees_round_trip,
        cp_never_follows_what_a_guest_planted,
        downloads_stream_in_bounded_memory,
        pty_shell_echoes,
        pause_then_resume_keeps_processes_alive,
        a_stopped_sandbox_starts_again,
        ttl_expires,
        tokens_are_scoped,
        tokens_expire_are_listed_and_can_be_removed,
        cli_errors_and_json_keep_their_shape,
        bad_input_gets_stable_4xx_codes,
        clients_that_hang_up_leave_nothing_half_done,
        kill9_during_concurrent_creates_then_restart_reconciles,
        network_policy_is_enforced_and_changeable,
        published_ports_reach_the_guest_survive_a_restart_and_close_on_rm,
        wireguard_egress_leaves_through_the_tunnel_or_not_at_all,
        templates_clones_forks_and_pause_to_disk_survive_a_restart,
        a_stopped_guest_ends_its_execs_with_an_error,
        a_websocket_client_that_stops_reading_then_closes_leaves_no_process,
        idle_unauthenticated_tcp_clients_cannot_starve_the_daemon,
        a_second_daemon_on_the_same_home_refuses_and_touches_nothing,
        a_guest_holds_placeholders_and_the_ca_never_the_value,
        a_real_guest_reaches_bound_hosts_only_through_the_broker,
        clones_and_pool_hand_outs_get_their_own_ca_and_placeholders,
        guests_get_tokens_pyjwt_verifies_and_metrics_move,
        mcp_clients_drive_sandboxes_over_stdio_and_http,
        the_e2b_sdk_runs_unchanged_against_hutch,
        a_session_is_journalled_and_survives_a_kill9_with_a_torn_tail,
        sessions_are_recorded_named_by_digest_and_asciinema_reads_them,
        the_e2b_npm_sdk_runs_unchanged_against_hutch,
    ]
}

// ---------------------------------------------------------------- helpers

/// [`common::on_rt`] on this suite's runtime.
fn on_rt<F, T>(f: F) -> T
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    common::on_rt(&suite().rt, f)
}

fn spec(labels: &[(&str, &str)]) -> CreateSandbox {
    CreateSandbox {
        spec: SandboxSpec {
            memory_mib: 256,
            disk_mib: 256,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        },
        idempotency_key: None,
    }
}

async fn sh(client: &Client, id: &str, script: &str) -> Result<String> {
    let out = client
        .exec(
            id,
            &ExecBody {
                argv: vec!["sh".into(), "-c".into(), script.into()],
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("exec {script:?}: {e}"))?;
    if out.exit_code != Some(0) {
        return Err(format!(
            "{script:?} ended {:?}/{:?}: {}",
            out.exit_code, out.signal, out.stderr
        )
        .into());
    }
    Ok(out.stdout.trim().to_string())
}

fn api_code<T: std::fmt::Debug>(r: std::result::Result<T, ClientError>) -> Option<ErrorCode> {
    match r {
        Err(e) => e.code(),
        Ok(v) => panic!("expected an API error, got {v:?}"),
    }
}

async fn destroy_all(client: &Client) -> std::result::Result<(), String> {
    for s in client.list(None, &[]).await.map_err(|e| e.to_string())? {
        client
            .destroy(&s.id)
            .await
            .map_err(|e| format!("destroy {}: {e}", s.id))?;
    }
    Ok(())
}

/// Reaps every exited child (VMs of a killed daemon end up here).
fn reap_orphans() {
    // SAFETY: waitpid on any child, without blocking.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
}

/// Runs `hutch ARGS` against the suite's daemon: (success, stdout, stderr).
fn cli(args: &[&str]) -> Result<(bool, String, String)> {
    let out = hutch(&suite().home).args(args).output()?;
    Ok((
        out.status.success(),
        String::from_utf8(out.stdout)?,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// A tar whose second entry climbs out through a symlink the first one made.
fn evil_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    b.append_link(&mut h, "up", "/").unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(4);
    h.set_mode(0o644);
    b.append_data(&mut h, "up/evil", &b"evil"[..]).unwrap();
    b.into_inner().unwrap()
}

/// Stops a daemon the way an operator does (SIGTERM); its sandboxes keep running.
fn sigterm(daemon: &mut Daemon) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGTERM) };
    let _ = daemon.child.wait();
}

/// `curl` from inside the sandbox: (body, curl's exit code). Exit 7 is "connection refused or
/// unreachable" (a rejected connection), 28 would be a timeout (a silently dropped one).
async fn curl(client: &Client, id: &str, url: &str) -> Result<(String, i32)> {
    let out = client
        .exec(
            id,
            &ExecBody {
                argv: vec![
                    "curl".into(),
                    "-s".into(),
                    "--connect-timeout".into(),
                    "8".into(),
                    url.into(),
                ],
                ..Default::default()
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok((out.stdout, out.exit_code.unwrap_or(-1)))
}
