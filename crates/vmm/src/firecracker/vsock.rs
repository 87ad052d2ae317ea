//! The host end of Firecracker's hybrid vsock: a Unix socket on which the host asks for a guest
//! port with `CONNECT <port>\n` and gets `OK <host port>\n` back, after which the stream carries
//! raw bytes to and from the guest's `AF_VSOCK` listener.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::error::{FirecrackerError, VsockError};

/// The longest answer Firecracker sends: `OK ` and a host-side port below 2^31, then `\n`.
const ANSWER_MAX: usize = 32;

/// Connects to the vsock Unix socket `uds` and opens guest port `port`, all within `timeout`.
///
/// The answer is read one byte at a time up to its `\n`, so nothing the guest sends after it is
/// consumed: the returned stream starts exactly at the guest's first byte.
///
/// A guest with no listener on `port` makes Firecracker close the connection
/// ([`VsockError::Closed`]) — or, on some versions and states, accept and then hang, which the
/// timeout turns into [`VsockError::Timeout`].
pub async fn connect_hybrid_vsock(
    uds: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, FirecrackerError> {
    let err = |source| FirecrackerError::Vsock {
        path: uds.to_path_buf(),
        port,
        source,
    };
    match tokio::time::timeout(timeout, handshake(uds, port)).await {
        Ok(r) => r.map_err(err),
        Err(_) => Err(err(VsockError::Timeout(timeout.as_millis() as u64))),
    }
}

async fn handshake(uds: &Path, port: u32) -> Result<UnixStream, VsockError> {
    let mut s = UnixStream::connect(uds).await.map_err(VsockError::Io)?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(VsockError::Io)?;
    let mut answer = Vec::with_capacity(ANSWER_MAX);
    loop {
        let mut b = [0u8; 1];
        match s.read(&mut b).await {
            Ok(0) => return Err(VsockError::Closed),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Err(VsockError::Closed)
            }
            Err(e) => return Err(VsockError::Io(e)),
        }
        if b[0] == b'\n' {
            break;
        }
        answer.push(b[0]);
        if answer.len() >= ANSWER_MAX {
            return Err(VsockError::BadAnswer(
                String::from_utf8_lossy(&answer).into_owned(),
            ));
        }
    }
    let text = String::from_utf8_lossy(&answer);
    match text.strip_prefix("OK ").map(|p| p.trim().parse::<u32>()) {
        Some(Ok(_host_port)) => Ok(s),
        _ => Err(VsockError::BadAnswer(text.into_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A fake Firecracker vsock socket: reads the request line, checks it, answers `reply`
    /// (or closes, or hangs), then echoes.
    async fn fake(
        reply: Option<&'static [u8]>,
        hang: bool,
    ) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let l = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while s.read(&mut b).await.unwrap() == 1 && b[0] != b'\n' {
                line.push(b[0]);
            }
            assert_eq!(line, b"CONNECT 1024");
            if hang {
                tokio::time::sleep(Duration::from_secs(30)).await;
                return;
            }
            let Some(reply) = reply else { return };
            s.write_all(reply).await.unwrap();
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).await.unwrap();
            s.write_all(&buf[..n]).await.unwrap();
        });
        (dir, path)
    }

    #[tokio::test]
    async fn ok_then_raw_bytes() {
        // The guest's first bytes arrive in the same segment as the answer: none may be lost.
        let (_d, path) = fake(Some(b"OK 1073741824\nhello"), false).await;
        let mut s = connect_hybrid_vsock(&path, 1024, Duration::from_secs(2))
            .await
            .unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        s.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }

    #[tokio::test]
    async fn no_listener_closes() {
        let (_d, path) = fake(None, false).await;
        let e = connect_hybrid_vsock(&path, 1024, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                FirecrackerError::Vsock {
                    source: VsockError::Closed,
                    port: 1024,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn hang_times_out() {
        let (_d, path) = fake(None, true).await;
        let t = std::time::Instant::now();
        let e = connect_hybrid_vsock(&path, 1024, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                FirecrackerError::Vsock {
                    source: VsockError::Timeout(200),
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn garbage_is_refused() {
        let (_d, path) = fake(Some(b"NOPE\n"), false).await;
        let e = connect_hybrid_vsock(&path, 1024, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("CONNECT 1024"), "{e}");
        assert!(matches!(
            e,
            FirecrackerError::Vsock { source: VsockError::BadAnswer(ref a), .. } if a == "NOPE"
        ));
    }
}
