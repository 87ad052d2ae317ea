//! Blocking work on async paths (removing file trees, hashing, waiting on processes), run on
//! tokio's blocking pool so that the async workers keep serving.

use std::path::PathBuf;

/// Runs `f` on the blocking pool and returns its result; a panic in `f` goes on here.
pub(crate) async fn off_worker<T, F>(f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("blocking work did not run: {e}"),
        },
    }
}

/// Removes a directory tree (a save of the guest's memory and disk, a run dir).
pub(crate) async fn remove_tree(dir: impl Into<PathBuf>) -> std::io::Result<()> {
    let dir = dir.into();
    off_worker(move || std::fs::remove_dir_all(dir)).await
}
