//! A minimal QMP client: readiness, `quit`, pausing (`stop`/`cont`/`query-status`), and
//! [`Session`]s for multi-command work such as migration.

use std::path::Path;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Longest QMP line we accept; QEMU's replies to our few commands are tiny.
const MAX_LINE: usize = 64 * 1024;

/// Connects to QMP at `sock`, negotiates capabilities and runs `query-status`. QEMU serves QMP
/// only once the machine (kernel, initrd, disks) is set up, so success means QEMU is past
/// every start-up check, not just that its sockets exist.
pub(crate) async fn ready(sock: &Path) -> std::io::Result<()> {
    let stream = UnixStream::connect(sock).await?;
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    handshake(&mut rd, &mut wr).await?;
    wr.write_all(b"{\"execute\":\"query-status\"}\n").await?;
    expect_return(&mut rd, "query-status").await.map(drop)
}

async fn handshake<R, W>(rd: &mut R, wr: &mut W) -> std::io::Result<()>
where
    R: AsyncBufReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    // Greeting: {"QMP": {...}}
    let greeting = read_line(rd).await?;
    if !greeting.contains("\"QMP\"") {
        return Err(std::io::Error::other("no QMP greeting"));
    }
    wr.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .await?;
    expect_return(rd, "qmp_capabilities").await.map(drop)
}

/// Reads until the reply to the last command, skipping asynchronous events, and returns it.
async fn expect_return<R: AsyncBufReadExt + Unpin>(
    rd: &mut R,
    what: &str,
) -> std::io::Result<serde_json::Value> {
    loop {
        let line = read_line(rd).await?;
        let reply: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| std::io::Error::other(format!("{what}: bad QMP reply: {e}")))?;
        if reply.get("return").is_some() {
            return Ok(reply);
        }
        if reply.get("error").is_some() {
            return Err(std::io::Error::other(format!(
                "{what}: {}",
                crate::spawn::condense(&line)
            )));
        }
    }
}

/// Runs `command` (no arguments), then `query-status`, and returns the status it reports
/// (e.g. `running`, `paused`).
pub(crate) async fn command_then_status(sock: &Path, command: &str) -> std::io::Result<String> {
    let stream = UnixStream::connect(sock).await?;
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    handshake(&mut rd, &mut wr).await?;
    if !command.is_empty() {
        wr.write_all(format!("{{\"execute\":\"{command}\"}}\n").as_bytes())
            .await?;
        expect_return(&mut rd, command).await?;
    }
    wr.write_all(b"{\"execute\":\"query-status\"}\n").await?;
    let reply = expect_return(&mut rd, "query-status").await?;
    reply["return"]["status"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| std::io::Error::other("query-status: no status in the reply"))
}

/// Connects to QMP at `sock`, negotiates capabilities and sends `quit`. The caller bounds the
/// time and then waits for the process to exit.
pub(crate) async fn quit(sock: &Path) -> std::io::Result<()> {
    let stream = UnixStream::connect(sock).await?;
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    handshake(&mut rd, &mut wr).await?;
    wr.write_all(b"{\"execute\":\"quit\"}\n").await?;
    // QEMU replies and closes the socket as it exits; either is fine.
    let _ = read_line(&mut rd).await;
    Ok(())
}

/// One QMP connection, for a sequence of commands (e.g. set a capability, then migrate).
pub(crate) struct Session {
    rd: BufReader<tokio::net::unix::OwnedReadHalf>,
    wr: tokio::net::unix::OwnedWriteHalf,
}

impl Session {
    /// Connects to QMP at `sock` and negotiates capabilities.
    pub(crate) async fn open(sock: &Path) -> std::io::Result<Session> {
        let stream = UnixStream::connect(sock).await?;
        let (rd, mut wr) = stream.into_split();
        let mut rd = BufReader::new(rd);
        handshake(&mut rd, &mut wr).await?;
        Ok(Session { rd, wr })
    }

    /// Runs `command` with `arguments` and returns its `return` value.
    pub(crate) async fn execute(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> std::io::Result<serde_json::Value> {
        let mut line = serde_json::to_vec(&serde_json::json!({
            "execute": command,
            "arguments": arguments,
        }))
        .map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.wr.write_all(&line).await?;
        let mut reply = expect_return(&mut self.rd, command).await?;
        Ok(reply["return"].take())
    }
}

async fn read_line<R: AsyncBufReadExt + Unpin>(rd: &mut R) -> std::io::Result<String> {
    let mut buf = Vec::new();
    let n = (&mut *rd)
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut buf)
        .await?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}
