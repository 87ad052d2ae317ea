//! Copying the guest's serial console into a size-capped log file.
//!
//! QEMU's own `-chardev file` would let a hostile guest fill the host disk, so QEMU writes the
//! console to a stream (its stdout for owned VMs, a socket for detached ones) and Hutch copies
//! it, up to a limit. Once the limit is hit one marker line is appended and the rest is read and
//! discarded, so the guest never blocks on a full pipe.

use std::path::Path;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

use crate::VmmError;

/// Creates `path` (which must not exist; with `append`, continues an existing log instead) and
/// copies `src` into it in the background, keeping the file at most `limit` bytes plus one
/// marker line. The task ends when `src` reaches EOF (the VMM exited or closed the stream).
pub(crate) fn spawn_copier<R>(
    src: R,
    path: &Path,
    limit: u64,
    append: bool,
) -> Result<JoinHandle<()>, VmmError>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(append)
        .create_new(!append)
        .open(path)
        .map_err(|e| VmmError::io("open console log", path, e))?;
    let mut written = file
        .metadata()
        .map_err(|e| VmmError::io("open console log", path, e))?
        .len();
    let mut file = tokio::fs::File::from_std(file);
    Ok(tokio::spawn(async move {
        let mut src = src;
        // A log that is full already got its marker from an earlier copier.
        let mut writable = written < limit;
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            let n = match src.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if !writable {
                continue;
            }
            let room = limit.saturating_sub(written) as usize;
            let take = n.min(room);
            if file.write_all(&chunk[..take]).await.is_err() {
                writable = false;
                continue;
            }
            written += take as u64;
            if take < n {
                let note = format!("\n[hutch: console log truncated at {limit} bytes]\n");
                let _ = file.write_all(note.as_bytes()).await;
                writable = false;
            }
            let _ = file.flush().await;
        }
        let _ = file.flush().await;
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn caps_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let data = vec![b'x'; 100_000];
        let task = spawn_copier(std::io::Cursor::new(data), &path, 1000, false).unwrap();
        task.await.unwrap();
        let log = std::fs::read_to_string(&path).unwrap();
        assert!(log.starts_with(&"x".repeat(1000)));
        assert!(log.ends_with("[hutch: console log truncated at 1000 bytes]\n"));
        assert!(log.len() < 1100);
        // A second copier (an adopting daemon) appends nothing to a full log.
        let task = spawn_copier(std::io::Cursor::new(vec![b'y'; 10]), &path, 1000, true).unwrap();
        task.await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), log);
    }

    #[tokio::test]
    async fn append_continues_within_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, b"boot\n").unwrap();
        let task = spawn_copier(std::io::Cursor::new(b"more".to_vec()), &path, 7, true).unwrap();
        task.await.unwrap();
        let log = std::fs::read_to_string(&path).unwrap();
        assert!(
            log.starts_with("boot\nmo\n[hutch: console log truncated"),
            "{log:?}"
        );
    }

    #[tokio::test]
    async fn refuses_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, b"").unwrap();
        assert!(spawn_copier(std::io::Cursor::new(vec![]), &path, 10, false).is_err());
    }
}
