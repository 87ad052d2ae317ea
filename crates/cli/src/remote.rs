//! CLI commands that drive sandboxes through the daemon's API (via the one typed client).

use std::{io::IsTerminal, path::Path};

use hutch_api::{
    client::{Client, ClientError, Endpoint, ExecReceiver, ExecSender, StreamEvent},
    CreateSandbox, ExecControl, ExecEventMsg, ExecStart, TtySize,
};
use hutch_types::{NetworkPolicy, SandboxId, SandboxInfo, SandboxSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::io::{ReaderStream, StreamReader, SyncIoBridge};

use crate::{
    args::{ConnArgs, CpArgs, CreateArgs, ExecArgs, ListArgs, NetArgs},
    error::CliError,
};
use hutch_daemon::Home;

/// The client for `--host`/`$HUTCH_HOST` (TCP, with `$HUTCH_TOKEN`), else the local socket.
pub fn client(home: &Home, conn: &ConnArgs) -> Client {
    match &conn.host {
        Some(addr) => Client::new(Endpoint::Tcp(addr.clone()), conn.token.clone()),
        None => Client::new(Endpoint::Unix(home.socket()), None),
    }
}

/// How the daemon `client` talks to is named where its host key is pinned: `tcp:ADDR`, or
/// `unix:` and the socket's path.
pub fn daemon_name(home: &Home, conn: &ConnArgs) -> String {
    match &conn.host {
        Some(addr) => format!("tcp:{addr}"),
        None => format!("unix:{}", home.socket().display()),
    }
}

/// `hutch create`.
pub async fn create(client: &Client, args: CreateArgs) -> Result<i32, CliError> {
    let req = CreateSandbox {
        spec: SandboxSpec {
            image: args.vm.image,
            cpus: args.vm.cpus,
            memory_mib: args.vm.memory,
            disk_mib: args.vm.disk,
            env: args.env.into_iter().collect(),
            labels: args.labels.into_iter().collect(),
            ttl_secs: args.ttl,
            network: policy(&args.net)?,
            wireguard: args
                .wireguard
                .as_deref()
                .map(crate::wg_conf::load)
                .transpose()?,
            template: args.template,
            secrets: args.secrets,
            shares: args.shares.shares,
            ..SandboxSpec::default()
        },
        idempotency_key: args.idempotency_key,
    };
    let info = client.create(&req).await?;
    if args.json {
        print_json(&info);
    } else {
        println!("{}", info.id);
    }
    Ok(0)
}

/// The policy the `--net`, `--allow` and `--port` flags describe; `--allow` or `--port`
/// without `--net allow` is refused rather than dropped.
pub fn policy(net: &NetArgs) -> Result<NetworkPolicy, CliError> {
    if net.mode != "allow" && !(net.allow.is_empty() && net.ports.is_empty()) {
        return Err(CliError::Usage(format!(
            "--allow and --port need --net allow (the policy is --net {})",
            net.mode
        )));
    }
    Ok(match net.mode.as_str() {
        "open" => NetworkPolicy::Open,
        "allow" => {
            let (cidrs, domains): (Vec<String>, Vec<String>) = net
                .allow
                .iter()
                .cloned()
                .partition(|t| t.contains('/') || t.parse::<std::net::IpAddr>().is_ok());
            // A bare address is a one-address network.
            let cidrs = cidrs
                .into_iter()
                .map(|c| match c.parse::<std::net::IpAddr>() {
                    Ok(std::net::IpAddr::V4(_)) => format!("{c}/32"),
                    Ok(std::net::IpAddr::V6(_)) => format!("{c}/128"),
                    Err(_) => c,
                })
                .collect();
            NetworkPolicy::Allow {
                cidrs,
                ports: net.ports.clone(),
                domains,
            }
        }
        _ => NetworkPolicy::None,
    })
}

/// `hutch net set`.
pub async fn net_set(client: &Client, id: &str, net: &NetArgs) -> Result<i32, CliError> {
    let info = client.set_network(id, &policy(net)?).await?;
    println!(
        "{} network {}",
        info.id,
        serde_json::to_string(&info.spec.network).expect("serializable")
    );
    Ok(0)
}

/// `hutch net log`.
pub async fn net_log(client: &Client, id: &str, json: bool) -> Result<i32, CliError> {
    let events = client.network_log(id).await?;
    if json {
        print_json(&events);
        return Ok(0);
    }
    for e in events {
        let domain = e.domain.map(|d| format!(" ({d})")).unwrap_or_default();
        println!(
            "{} {:<5} {:<5} {}:{}{} {}",
            e.time_ms, e.verdict, e.proto, e.dst, e.dst_port, domain, e.rule
        );
    }
    Ok(0)
}

/// `hutch ls`.
pub async fn list(client: &Client, args: ListArgs) -> Result<i32, CliError> {
    let labels: Vec<String> = args
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let all = client.list(args.state.as_deref(), &labels).await?;
    if args.json {
        print_json(&all);
        return Ok(0);
    }
    println!(
        "{:<16} {:<10} {:<10} {:>4} {:>7}  LABELS",
        "ID", "STATE", "IMAGE", "CPUS", "MEM"
    );
    for s in all {
        let labels: Vec<String> = s
            .spec
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!(
            "{:<16} {:<10} {:<10} {:>4} {:>6}M  {}",
            s.id,
            s.state.name(),
            s.spec.image,
            s.spec.cpus,
            s.spec.memory_mib,
            labels.join(",")
        );
    }
    Ok(0)
}

/// `hutch inspect`.
pub async fn inspect(client: &Client, id: &str, json: bool) -> Result<i32, CliError> {
    let info = client.inspect(id).await?;
    if json {
        print_json(&info);
    } else {
        print_info(&info);
    }
    Ok(0)
}

/// `hutch pause | resume | suspend | stop | start`: one lifecycle action, printing the new state.
pub async fn lifecycle(
    client: &Client,
    id: &str,
    action: &str,
    json: bool,
) -> Result<i32, CliError> {
    let info = client.lifecycle(id, action).await?;
    if json {
        print_json(&info);
    } else {
        println!("{} {}", info.id, info.state.name());
    }
    Ok(0)
}

/// How often `hutch logs -f` asks for more.
const FOLLOW_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// `hutch logs [-f]`: the guest console (guest-controlled bytes, written as they are); with
/// `follow`, then whatever the guest writes next, until the sandbox is gone or Ctrl-C.
pub async fn logs(client: &Client, id: &str, follow: bool) -> Result<i32, CliError> {
    let mut out = tokio::io::stdout();
    let mut shown = 0;
    loop {
        let log = match client.console(id).await {
            Ok(log) => log,
            // The sandbox went away while followed: that is the end of its log.
            Err(e) if follow && shown > 0 && e.code() == Some(hutch_types::ErrorCode::NotFound) => {
                return Ok(0)
            }
            Err(e) => return Err(e.into()),
        };
        // A log that shrank was restarted (a restore): show it from its start.
        let start = if log.len() < shown { 0 } else { shown };
        write_flush(&mut out, &log[start..]).await?;
        shown = log.len();
        if !follow {
            return Ok(0);
        }
        tokio::time::sleep(FOLLOW_POLL).await;
    }
}

/// `hutch rm ID…`: destroys each, going on past failures; prints each result (with `--json`,
/// one array of the destroyed sandboxes) and fails if any failed.
pub async fn remove(client: &Client, ids: &[SandboxId], json: bool) -> Result<i32, CliError> {
    let mut removed = Vec::new();
    let mut failed = 0;
    for id in ids {
        match client.destroy(id.as_str()).await {
            Ok(info) if json => removed.push(info),
            Ok(info) => println!("{} {}", info.id, info.state.name()),
            Err(e) => {
                eprintln!("hutch: {id}: {}", crate::error::chain(&e));
                failed += 1;
            }
        }
    }
    if json {
        print_json(&removed);
    }
    Ok(i32::from(failed > 0))
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}

fn print_info(info: &SandboxInfo) {
    println!("id:       {}", info.id);
    match &info.state {
        hutch_types::SandboxState::Failed(r) => println!("state:    failed ({r})"),
        s => println!("state:    {}", s.name()),
    }
    println!("image:    {}", info.spec.image);
    println!("cpus:     {}", info.spec.cpus);
    println!("memory:   {} MiB", info.spec.memory_mib);
    println!("disk:     {} MiB", info.spec.disk_mib);
    if let Some(origin) = &info.spec.origin {
        if let Some(t) = &origin.template {
            println!("template: {t}");
        }
        if let Some(p) = &origin.parent {
            println!("parent:   {p}");
        }
    }
    for (k, v) in &info.spec.labels {
        println!("label:    {k}={v}");
    }
    for name in &info.spec.secrets {
        println!("secret:   {name}");
    }
    if let Some(t) = info.expires_at_ms {
        println!("expires:  {t} (unix ms)");
    }
}

/// `hutch exec` and `hutch shell`: a streaming exec with this terminal attached.
pub async fn exec(client: &Client, args: ExecArgs, tty: bool) -> Result<i32, CliError> {
    let size = if tty { terminal_size() } else { None };
    let start = ExecStart {
        argv: args.command,
        env: args.env.into_iter().collect(),
        cwd: args.workdir,
        tty: tty.then(|| size.unwrap_or(TtySize { rows: 24, cols: 80 })),
        timeout_secs: args.timeout,
    };
    let (tx, rx) = client.exec_stream(args.id.as_str(), &start).await?;
    let _raw = if tty && std::io::stdin().is_terminal() {
        Some(RawMode::enter()?)
    } else {
        None
    };
    attach(tx, rx, tty).await
}

/// Pumps stdin to the exec and its output to stdout/stderr; returns the shell exit code.
pub async fn attach(mut tx: ExecSender, mut rx: ExecReceiver, tty: bool) -> Result<i32, CliError> {
    let (stdin_tx, mut stdin_rx) = tokio::sync::mpsc::channel::<Option<Vec<u8>>>(4);
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = stdin_tx.send(None).await;
                    return;
                }
                Ok(n) => {
                    if stdin_tx.send(Some(buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
        .map_err(CliError::Io)?;
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut sending = true;
    loop {
        tokio::select! {
            ev = rx.next() => match ev {
                None => return Err(ClientError::Stream("daemon closed the stream before the exit".into()).into()),
                Some(ev) => match ev? {
                    StreamEvent::Stdout(d) => write_flush(&mut stdout, &d).await?,
                    StreamEvent::Stderr(d) => write_flush(&mut stderr, &d).await?,
                    StreamEvent::Event(ExecEventMsg::Started { .. }) => {}
                    StreamEvent::Event(ExecEventMsg::Exit { exit_code, signal, .. }) => {
                        return Ok(exit_code.unwrap_or_else(|| 128 + signal.unwrap_or(0)));
                    }
                    StreamEvent::Event(ExecEventMsg::Error(e)) => {
                        let code = match e.code {
                            hutch_types::ErrorCode::CommandNotFound => 127,
                            hutch_types::ErrorCode::ExecFailed => 126,
                            _ => return Err(ClientError::Api { status: 0, error: e }.into()),
                        };
                        eprintln!("hutch: {}", e.message);
                        return Ok(code);
                    }
                },
            },
            // A send can fail once the process has exited and the daemon closed the stream;
            // the receiving side reports the real outcome, so stop sending instead.
            input = stdin_rx.recv(), if sending => match input.flatten() {
                Some(data) => sending = tx.stdin(&data).await.is_ok(),
                None => {
                    // With a TTY, EOF is the terminal's business (Ctrl-D); don't close it.
                    if !tty {
                        let _ = tx.control(&ExecControl::Eof).await;
                    }
                    sending = false;
                }
            },
            _ = winch.recv(), if tty && sending => {
                if let Some(size) = terminal_size() {
                    sending = tx.control(&ExecControl::Resize(size)).await.is_ok();
                }
            }
        }
    }
}

async fn write_flush<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    d: &[u8],
) -> Result<(), CliError> {
    w.write_all(d).await.map_err(CliError::Io)?;
    w.flush().await.map_err(CliError::Io)
}

/// The controlling terminal's size, if stdout is a terminal.
fn terminal_size() -> Option<TtySize> {
    let ws = rustix::termios::tcgetwinsize(std::io::stdout()).ok()?;
    (ws.ws_row > 0).then_some(TtySize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}

/// Puts the local terminal in raw mode until dropped.
struct RawMode(nix::sys::termios::Termios);

impl RawMode {
    fn enter() -> Result<RawMode, CliError> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).map_err(|e| CliError::Io(e.into()))?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).map_err(|e| CliError::Io(e.into()))?;
        Ok(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.0,
        );
    }
}

/// `hutch cp SRC DST`: one side is `ID:/guest/path`. Files go as files, directories as tar
/// archives (checked by the daemon on the way in, and here on the way out).
pub async fn cp(client: &Client, args: CpArgs) -> Result<i32, CliError> {
    match (split_remote(&args.src), split_remote(&args.dst)) {
        (None, Some((id, guest))) => upload(client, Path::new(&args.src), id.as_str(), guest).await,
        (Some((id, guest)), None) => {
            download(client, id.as_str(), guest, Path::new(&args.dst)).await
        }
        _ => Err(CliError::Usage(
            "exactly one of SRC and DST must be ID:/path".into(),
        )),
    }
}

/// `ID:/guest/path` as the sandbox id and the guest path; `None` for a host path.
fn split_remote(s: &str) -> Option<(SandboxId, &str)> {
    let (id, path) = s.split_once(':')?;
    let id = id.parse().ok()?;
    path.starts_with('/').then_some((id, path))
}

async fn upload(client: &Client, src: &Path, id: &str, guest: &str) -> Result<i32, CliError> {
    let meta = std::fs::symlink_metadata(src).map_err(CliError::reading(src))?;
    if meta.is_dir() {
        // The tar is built on a blocking thread into a small pipe the request body reads.
        let (pipe, body) = tokio::io::duplex(256 << 10);
        let writer = SyncIoBridge::new(pipe);
        let (src_shown, src) = (src, src.to_path_buf());
        let build = tokio::task::spawn_blocking(move || {
            let mut builder = tar::Builder::new(writer);
            builder.follow_symlinks(false);
            builder.append_dir_all(".", &src)?;
            builder.into_inner()?.shutdown()
        });
        let sent = client.upload_archive(id, guest, ReaderStream::new(body));
        let (sent, built) = tokio::join!(sent, build);
        built
            .map_err(|e| CliError::Io(std::io::Error::other(e)))?
            .map_err(CliError::reading(src_shown))?;
        sent?;
    } else if meta.is_file() {
        use std::os::unix::fs::PermissionsExt;
        let file = tokio::fs::File::open(src)
            .await
            .map_err(CliError::reading(src))?;
        client
            .upload_file(
                id,
                guest,
                meta.permissions().mode() & 0o7777,
                ReaderStream::new(file),
            )
            .await?;
    } else {
        return Err(CliError::Usage(format!(
            "{} is neither a file nor a directory",
            src.display()
        )));
    }
    Ok(0)
}

/// Brings a guest file or directory to `dst`, streamed to disk: each archive entry is checked
/// and written (beneath `dst`, never through a symlink) as it arrives.
async fn download(client: &Client, id: &str, guest: &str, dst: &Path) -> Result<i32, CliError> {
    let dst = dst.to_path_buf();
    match client.download_file(id, guest).await {
        Ok(data) => {
            let data = SyncIoBridge::new(StreamReader::new(data));
            on_thread(move || hutch_task::archive::save_file(data, &dst)).await?;
            return Ok(0);
        }
        // Not a regular file: fetch the directory as an archive.
        Err(ClientError::Api { error, .. }) if error.code == hutch_types::ErrorCode::BadRequest => {
        }
        Err(e) => return Err(e.into()),
    }
    let tar = SyncIoBridge::new(StreamReader::new(client.download_archive(id, guest).await?));
    on_thread(move || {
        std::fs::create_dir_all(&dst).map_err(|source| {
            hutch_task::archive::ArchiveError::Write {
                path: dst.clone(),
                source,
            }
        })?;
        hutch_task::archive::unpack(tar, &dst)
    })
    .await?;
    Ok(0)
}

/// Runs blocking file-system work off the async workers.
async fn on_thread<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, hutch_task::archive::ArchiveError> + Send + 'static,
) -> Result<T, CliError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| CliError::Io(std::io::Error::other(e)))?
        .map_err(CliError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_sandbox_id_and_an_absolute_path_name_a_guest_file() {
        let (id, path) = split_remote("sb-0a:/root/x").unwrap();
        assert_eq!((id.as_str(), path), ("sb-0a", "/root/x"));
        for host in ["C:/x", "sb-0a:relative", "sb-zz:/x", "plain/path", "a:b:/c"] {
            assert!(split_remote(host).is_none(), "{host}");
        }
    }
}
