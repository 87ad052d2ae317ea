//! `hutch run`: boot, run one command with stdio passed through, tear down. Through the
//! daemon when one answers (or `--host` names one), otherwise (or with `--local`) through the
//! same request surface on a private manager in this process.

use std::time::Duration;

use hutch_api::{client::Client, CreateSandbox, ExecStart};
use hutch_core::service::{
    Caller, Command, Create, ExecStream, Lifecycle, SandboxApi, StreamControl as ExecControl,
};
use hutch_protocol::{host::ExecEvent, ExitInfo};
use hutch_types::{ErrorCode, SandboxId, SandboxSpec};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

use hutch_daemon::signal::{interrupted, INTERRUPTED};

use crate::{args::RunArgs, error::CliError, launch};
use hutch_daemon::Home;

/// TTL of a daemon sandbox whose command has no timeout: the safety net should `hutch run`
/// die without removing it (SIGKILL). With `--timeout`, that plus the boot timeout and a minute.
const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

/// Runs the command in a fresh VM and returns its shell-style exit code. The VM is removed
/// on every path: success, failure, or a signal to `hutch`.
pub async fn run(home: &Home, args: RunArgs) -> Result<i32, CliError> {
    let daemon = !args.local
        && (args.conn.host.is_some()
            || std::os::unix::net::UnixStream::connect(home.socket()).is_ok());
    if daemon {
        let client = crate::remote::client(home, &args.conn);
        tracing::info!(endpoint = %client.endpoint(), "running through the daemon");
        return run_remote(&client, args).await;
    }
    run_local(home, args).await
}

/// `hutch run` through the daemon: create, stream one exec, destroy (also after a signal).
async fn run_remote(client: &Client, args: RunArgs) -> Result<i32, CliError> {
    let (req, start) = remote_request(args);
    let ttl = req.spec.ttl_secs.unwrap_or_default();
    let abandoned =
        format!("hutch: interrupted again; the daemon removes the sandbox in {ttl}s (its TTL)");
    let create = async { Ok(client.create(&req).await?.id) };
    let (id, outcome) = match create_interruptibly(create, &abandoned).await? {
        Created::Abandoned => return Ok(INTERRUPTED),
        Created::Interrupted(id) => (id, Ok(INTERRUPTED)),
        Created::Ready(id) => {
            let outcome = tokio::select! {
                r = exec_remote(client, &id, &start) => r,
                sig = interrupted() => {
                    // Dropping the stream makes the daemon kill the process.
                    tracing::info!(signal = sig, "interrupted");
                    Ok(INTERRUPTED)
                }
            };
            (id, outcome)
        }
    };
    let destroyed = client.destroy(&id).await;
    let code = outcome?;
    destroyed?;
    Ok(code)
}

/// The create request (TTL as a safety net) and the exec for `hutch run`'s flags.
fn remote_request(args: RunArgs) -> (CreateSandbox, ExecStart) {
    let shares = args.shares.shares;
    let ttl = args.timeout.map_or(DEFAULT_TTL.as_secs(), |t| {
        t.saturating_add(args.vm.boot_timeout).saturating_add(60)
    });
    let req = CreateSandbox {
        spec: SandboxSpec {
            image: args.vm.image,
            cpus: args.vm.cpus,
            memory_mib: args.vm.memory,
            disk_mib: args.vm.disk,
            ttl_secs: Some(ttl.min(hutch_types::bounds::MAX_TTL_SECS)),
            secrets: args.secrets,
            shares,
            ..SandboxSpec::default()
        },
        idempotency_key: None,
    };
    let start = ExecStart {
        argv: args.command,
        env: args.env.into_iter().collect(),
        cwd: args.workdir,
        tty: None,
        timeout_secs: args.timeout,
    };
    (req, start)
}

/// How a create ended, with the new sandbox's id `I`.
enum Created<I> {
    /// The sandbox runs.
    Ready(I),
    /// It runs, but a signal came meanwhile: destroy it and stop.
    Interrupted(I),
    /// A second signal came before it was up (its TTL, or this process's end, removes it).
    Abandoned,
}

/// Runs `create` (to the new sandbox's id). A first signal lets it finish, so that what it
/// made can be destroyed (the surface completes a create even when its caller goes away); a
/// second one abandons it, saying `abandoned`.
async fn create_interruptibly<I>(
    create: impl std::future::Future<Output = Result<I, CliError>>,
    abandoned: &str,
) -> Result<Created<I>, CliError> {
    tokio::pin!(create);
    tokio::select! {
        r = &mut create => return Ok(Created::Ready(r?)),
        sig = interrupted() => tracing::info!(signal = sig, "interrupted during create"),
    }
    eprintln!("hutch: interrupted; removing the sandbox once it is up");
    tokio::select! {
        r = create => Ok(Created::Interrupted(r?)),
        _ = interrupted() => {
            eprintln!("{abandoned}");
            Ok(Created::Abandoned)
        }
    }
}

/// One streaming exec with this process's stdio attached; the shell-style exit code.
async fn exec_remote(client: &Client, id: &str, start: &ExecStart) -> Result<i32, CliError> {
    let (tx, rx) = client.exec_stream(id, start).await?;
    crate::remote::attach(tx, rx, false).await
}

/// `hutch run` in this process, through the same request surface as the daemon's
/// ([`SandboxApi`]) on a private manager whose VM dies with this process.
async fn run_local(home: &Home, args: RunArgs) -> Result<i32, CliError> {
    if !args.secrets.is_empty() {
        return Err(CliError::Usage(
            "--secret needs the daemon, whose broker holds the values: start `hutch daemon` (and drop --local)".into(),
        ));
    }
    let host = launch::in_process(home, &args.vm).await?;
    let (api, caller) = (&host.api, Caller::admin());
    let (req, start) = local_request(args);
    let create = async {
        let (info, _) = api.create(&caller, req).await?;
        Ok(SandboxId::try_from(info.id)?)
    };
    let abandoned = "hutch: interrupted again; the VM dies with this process";
    let (id, outcome) = match create_interruptibly(create, abandoned).await? {
        Created::Abandoned => return Ok(INTERRUPTED),
        Created::Interrupted(id) => (id, Ok(INTERRUPTED)),
        Created::Ready(id) => {
            let outcome = tokio::select! {
                r = exec_local(api, &caller, &id, start) => r,
                sig = interrupted() => {
                    // Dropping the exec kills the process.
                    tracing::info!(signal = sig, "interrupted");
                    Ok(INTERRUPTED)
                }
            };
            (id, outcome)
        }
    };
    let destroyed = api.lifecycle(&caller, &id, Lifecycle::Destroy).await;
    let code = outcome?;
    destroyed?;
    Ok(code)
}

/// The create request and the command for a local `hutch run`'s flags (no TTL: the VM dies
/// with this process).
fn local_request(args: RunArgs) -> (Create, Command) {
    let (req, start) = remote_request(args);
    let spec = SandboxSpec {
        ttl_secs: None,
        ..req.spec
    };
    let command = Command {
        argv: start.argv,
        env: start.env,
        cwd: start.cwd,
        timeout_secs: start.timeout_secs,
    };
    (
        Create {
            spec,
            idempotency_key: None,
        },
        command,
    )
}

/// Runs `command` with this process's stdio attached; the shell-style exit code (127 for a
/// command not found, 126 for one that could not run).
async fn exec_local(
    api: &dyn SandboxApi,
    caller: &Caller,
    id: &SandboxId,
    command: Command,
) -> Result<i32, CliError> {
    match api.exec_stream(caller, id, command, None).await {
        Ok(exec) => Ok(exec_attached(exec).await?.status.shell_code()),
        Err(e) => {
            let code = match e.code() {
                ErrorCode::CommandNotFound => 127,
                ErrorCode::ExecFailed => 126,
                _ => return Err(e.into()),
            };
            eprintln!("hutch: {}", crate::error::chain(&e));
            Ok(code)
        }
    }
}

/// Runs `exec` with this process's stdin, stdout and stderr attached.
pub async fn exec_attached(mut exec: ExecStream) -> Result<ExitInfo, CliError> {
    let feeder = tokio::spawn(forward_stdin(exec.control()));
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let result = loop {
        match exec.next_event().await {
            Ok(ExecEvent::Stdout(d)) => write_out(&mut stdout, &d).await?,
            Ok(ExecEvent::Stderr(d)) => write_out(&mut stderr, &d).await?,
            Ok(ExecEvent::Exited(info)) => break Ok(info),
            Err(e) => break Err(e.into()),
        }
    };
    feeder.abort();
    result
}

async fn write_out<W: AsyncWrite + Unpin>(w: &mut W, data: &[u8]) -> Result<(), CliError> {
    w.write_all(data).await.map_err(CliError::Io)?;
    w.flush().await.map_err(CliError::Io)
}

/// Copies host stdin to the guest process, then closes its stdin.
async fn forward_stdin(ctl: ExecControl) {
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0u8; hutch_protocol::MAX_CHUNK];
    loop {
        match stdin.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if ctl.write_stdin(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = ctl.close_stdin().await;
}
