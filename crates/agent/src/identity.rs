//! Workload identity inside the guest: any process can ask the agent for a short-lived token
//! that the host signs for this sandbox.
//!
//! The agent listens on a Unix socket ([`SOCKET`], mode 0666) and speaks one line each way:
//! `token <audience>\n` in, `ok <jwt>\n` or `error <message>\n` out. It forwards the audience
//! over the host channel (`GuestMsg::TokenRequest`); the host decides whose token it is from
//! the channel, so nothing a guest process sends can name another sandbox. The same binary,
//! run as `hutch-identity` (the agent bind-mounts itself at [`CLI_PATH`] at boot), is the
//! client: `hutch-identity token --audience X` prints the token.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream},
    sync::Semaphore,
};

use crate::server::Conn;

/// Where the agent (as PID 1) serves token requests.
pub const SOCKET: &str = "/run/hutch/identity.sock";

/// Where the agent puts the `hutch-identity` client (itself, bind-mounted) at boot.
pub const CLI_PATH: &str = "/usr/local/bin/hutch-identity";

/// Overrides [`SOCKET`] for the server (host-process test mode) and the client alike.
pub const SOCKET_ENV: &str = "HUTCH_IDENTITY_SOCKET";

/// Longest request line read from a guest process, in bytes.
const MAX_LINE: u64 = 512;

/// Most guest processes served at once; more wait for a turn.
const MAX_CLIENTS: usize = 8;

/// How long one guest process may take to send its request and read the answer.
const CLIENT_DEADLINE: Duration = Duration::from_secs(40);

/// The host connection requests go to: the newest one.
static CURRENT: Mutex<Option<Weak<Conn>>> = Mutex::new(None);

/// Makes `conn` the connection token requests go to.
pub fn attach(conn: &Arc<Conn>) {
    *CURRENT.lock().expect("current lock") = Some(Arc::downgrade(conn));
}

/// The newest host connection, if one is up.
pub fn current() -> Option<Arc<Conn>> {
    CURRENT.lock().expect("current lock").as_ref()?.upgrade()
}

/// The socket path: `$HUTCH_IDENTITY_SOCKET`, else [`SOCKET`].
pub fn socket_path() -> PathBuf {
    std::env::var_os(SOCKET_ENV).map_or_else(|| PathBuf::from(SOCKET), PathBuf::from)
}

/// Serves token requests on the socket at `path` for as long as the agent runs.
pub async fn serve(path: PathBuf) {
    let listener = match bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "no identity socket");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(CLIENT_DEADLINE, answer(stream)).await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "identity socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    // Every process in the guest may ask: the token names the sandbox, not the process.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

/// Reads one request line from a guest process and writes the answer.
async fn answer(stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut limited = tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_LINE));
    let reply = match limited.read_line(&mut line).await {
        Ok(_) => match parse_request(&line) {
            Ok(audience) => match current() {
                Some(conn) => conn.request_token(audience.to_string()).await,
                None => Err(crate::server::invalid("no host is connected")),
            },
            Err(e) => Err(crate::server::invalid(e)),
        },
        Err(e) => Err(crate::server::invalid(format!("unreadable request: {e}"))),
    };
    let out = match reply {
        Ok(token) => format!("ok {token}\n"),
        Err(e) => format!("error {}\n", e.message.replace('\n', " ")),
    };
    let _ = write.write_all(out.as_bytes()).await;
    let _ = write.shutdown().await;
}

/// The audience of a `token <audience>\n` line.
fn parse_request(line: &str) -> Result<&str, String> {
    let Some(line) = line.strip_suffix('\n') else {
        return Err(format!(
            "the request must be one line of at most {MAX_LINE} bytes"
        ));
    };
    match line.split_once(' ') {
        Some(("token", audience)) => Ok(audience),
        _ => Err("expected `token <audience>`".into()),
    }
}

/// `hutch-identity`: the client guest processes run. Returns the exit code.
pub fn cli(args: &[String]) -> i32 {
    let audience = match args {
        [cmd, flag, audience] if cmd == "token" && flag == "--audience" => audience.clone(),
        [cmd, flag] if cmd == "token" && flag.starts_with("--audience=") => {
            flag["--audience=".len()..].to_string()
        }
        _ => {
            eprintln!(
                "usage: hutch-identity token --audience AUDIENCE\n\
                 prints a short-lived JWT the host signed for this sandbox (socket: ${SOCKET_ENV} or {SOCKET})"
            );
            return 2;
        }
    };
    match fetch_token(&socket_path(), &audience) {
        Ok(token) => {
            println!("{token}");
            0
        }
        Err(e) => {
            eprintln!("hutch-identity: {e}");
            1
        }
    }
}

/// Asks the agent at `socket` for a token for `audience`.
fn fetch_token(socket: &Path, audience: &str) -> Result<String, String> {
    if audience.contains('\n') {
        return Err("the audience may not contain a newline".into());
    }
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| format!("cannot reach the agent at {}: {e}", socket.display()))?;
    stream
        .write_all(format!("token {audience}\n").as_bytes())
        .map_err(|e| format!("cannot send the request: {e}"))?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the answer: {e}"))?;
    let line = line.trim_end_matches('\n');
    match line.split_once(' ') {
        Some(("ok", token)) => Ok(token.to_string()),
        Some(("error", why)) => Err(why.to_string()),
        _ => Err(format!("unexpected answer from the agent: {line:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_token_line() {
        assert_eq!(
            parse_request("token https://a.example\n"),
            Ok("https://a.example")
        );
        assert!(parse_request("token aud").is_err(), "no newline: cut off");
        assert!(parse_request("tokens aud\n").is_err());
        assert!(parse_request("\n").is_err());
    }
}
