//! `hutch run`: boot, run one command with stdio passed through, tear down.

use hutch_core::Sandbox;
use hutch_protocol::{
    host::{ExecControl, ExecEvent},
    ExecRequest, ExitInfo,
};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{args::RunArgs, error::CliError, home::Home, launch};

/// Exit code when hutch itself is interrupted (SIGINT convention).
const INTERRUPTED: i32 = 130;

/// Runs the command in a fresh VM and returns its shell-style exit code. The VM is removed
/// on every path: success, failure, or a signal to `hutch`.
pub async fn run(home: &Home, args: RunArgs) -> Result<i32, CliError> {
    let launcher = launch::prepare(home, &args.vm).await?;
    let req = ExecRequest {
        env: args.env,
        cwd: args.workdir,
        stdin: true,
        timeout_ms: args.timeout.map(|s| s.saturating_mul(1000)),
        ..ExecRequest::new(args.command)
    };
    let boot = Sandbox::boot(&launcher.vmm, &launcher.options);
    let sandbox = tokio::select! {
        s = boot => s?,
        sig = interrupted() => {
            // Dropping the boot future dropped the VM, which kills it and removes its files.
            tracing::info!(signal = sig, "interrupted during boot");
            return Ok(INTERRUPTED);
        }
    };
    let outcome = tokio::select! {
        r = exec_attached(&sandbox, req) => r.map(|info| info.status.shell_code()),
        sig = interrupted() => {
            tracing::info!(signal = sig, "interrupted");
            Ok(INTERRUPTED)
        }
    };
    let destroyed = sandbox.destroy().await;
    let code = match outcome {
        Ok(code) => code,
        Err(e) => match shell_code_for(&e) {
            Some(code) => {
                eprintln!("hutch: {}", crate::error::chain(&e));
                code
            }
            None => return Err(e),
        },
    };
    destroyed?;
    Ok(code)
}

/// The shell's exit codes for a command that could not start: 127 not found, 126 not executable.
fn shell_code_for(e: &CliError) -> Option<i32> {
    use hutch_protocol::{host::ChannelError, ErrorCode};
    match e {
        CliError::Channel(ChannelError::Remote(op)) => match op.code {
            ErrorCode::NotFound => Some(127),
            ErrorCode::PermissionDenied => Some(126),
            _ => None,
        },
        _ => None,
    }
}

/// Runs `req` with this process's stdin, stdout and stderr attached.
pub async fn exec_attached(sandbox: &Sandbox, req: ExecRequest) -> Result<ExitInfo, CliError> {
    let mut exec = sandbox.channel().exec(req).await?;
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

/// Resolves on SIGINT, SIGTERM or SIGHUP, with the signal number.
pub async fn interrupted() -> i32 {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => libc::SIGINT,
        _ = term.recv() => libc::SIGTERM,
        _ = hup.recv() => libc::SIGHUP,
    }
}
