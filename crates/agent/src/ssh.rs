//! SSH agent forwarding inside the guest: `SSH_AUTH_SOCK` without a key.
//!
//! The agent listens on a Unix socket ([`hutch_protocol::SSH_AUTH_SOCK`], mode 0666) and
//! forwards each connection, byte for byte, over the host channel (protocol version 6:
//! `GuestMsg::SshOpen`, then `SshData` and credit both ways, then `SshClose`). The host's agent
//! holds the sandbox's key and decides what to sign; the guest holds nothing but the stream.

use std::{os::unix::fs::PermissionsExt, path::Path, path::PathBuf, sync::Arc, time::Duration};

use hutch_protocol::{GuestMsg, MAX_CHUNK, MAX_SSH_STREAMS};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{unix::OwnedReadHalf, unix::OwnedWriteHalf, UnixListener, UnixStream},
    sync::{mpsc, Semaphore},
};

use crate::server::{Conn, Input};

/// Overrides [`hutch_protocol::SSH_AUTH_SOCK`] (host-process test mode).
pub const SOCKET_ENV: &str = "HUTCH_SSH_AUTH_SOCK";

/// The socket path: `$HUTCH_SSH_AUTH_SOCK`, else [`hutch_protocol::SSH_AUTH_SOCK`].
pub fn socket_path() -> PathBuf {
    std::env::var_os(SOCKET_ENV).map_or_else(|| hutch_protocol::SSH_AUTH_SOCK.into(), PathBuf::from)
}

/// Serves forwarded SSH agent connections on the socket at `path` for as long as the agent
/// runs: at most [`MAX_SSH_STREAMS`] at once (more wait for a turn), each to the newest host.
pub async fn serve(path: PathBuf) {
    let listener = match bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "no SSH agent socket");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(MAX_SSH_STREAMS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(async move {
                    forward(stream).await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "SSH agent socket accept failed");
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
    // Any guest user may ask: the host decides what the key signs, not the caller.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

/// Forwards one connection until either end closes it. Without a host speaking version 6 the
/// connection is closed at once (the client sees an agent that went away).
async fn forward(stream: UnixStream) {
    let Some(conn) = crate::identity::current() else {
        return;
    };
    let Some((op, io)) = conn.open_ssh() else {
        return;
    };
    let (rd, wr) = stream.into_split();
    let to_host = tokio::spawn(to_host(conn.clone(), op, io.credit, rd));
    to_socket(&conn, op, io.input, wr).await;
    // The host closed its end, or the connection went: the socket's reader ends when the
    // client closes its end (or the host is gone and credit fails).
    let _ = to_host.await;
}

/// The client's bytes to the host within credit; `SshClose` at its end of file.
async fn to_host(conn: Arc<Conn>, op: u32, credit: Arc<Semaphore>, mut rd: OwnedReadHalf) {
    let mut buf = vec![0u8; MAX_CHUNK];
    loop {
        let n = match rd.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !conn
            .send_data(op, &credit, GuestMsg::SshData(buf[..n].to_vec()))
            .await
        {
            return;
        }
    }
    conn.close_ssh(op);
}

/// The host's bytes to the client, granting credit back once written; the host's `SshClose`
/// shuts the socket's write side.
async fn to_socket(
    conn: &Conn,
    op: u32,
    mut input: mpsc::UnboundedReceiver<Input>,
    mut wr: OwnedWriteHalf,
) {
    while let Some(input) = input.recv().await {
        match input {
            Input::Data(d) => {
                if wr.write_all(&d).await.is_err() {
                    // The client is gone; its reader sends the close.
                    break;
                }
                conn.credit_ssh(op, d.len() as u32);
            }
            Input::Eof => break,
        }
    }
    let _ = wr.shutdown().await;
}
