//! One daemon per home: an exclusive lock on `$HUTCH_HOME/daemon.lock`, taken before the
//! daemon opens its store, reconciles or binds anything, and held for its whole life. A
//! second daemon on the same home would otherwise reconcile first, marking the first one's
//! sandboxes failed and killing their VMs, and only then find the socket taken.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, Write},
    os::unix::fs::OpenOptionsExt,
    path::Path,
};

use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};

use crate::error::DaemonError;

/// The held lock; released when dropped (or when the process ends, however it ends).
pub struct HomeLock {
    _file: Flock<File>,
}

/// Takes the lock at `path`, writing this process's pid into it, or says which daemon holds it.
pub fn acquire(path: &Path) -> Result<HomeLock, DaemonError> {
    let io_err = |source| DaemonError::Lock {
        path: path.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io_err)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(mut file) => {
            file.set_len(0).map_err(io_err)?;
            file.rewind().map_err(io_err)?;
            writeln!(file, "{}", std::process::id()).map_err(io_err)?;
            Ok(HomeLock { _file: file })
        }
        Err((mut file, Errno::EWOULDBLOCK)) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            Err(DaemonError::DaemonRunning {
                lock: path.to_path_buf(),
                holder: text.trim().parse().ok(),
            })
        }
        Err((_, errno)) => Err(io_err(errno.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_file_is_refused_with_the_holders_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.lock");
        let held = acquire(&path).unwrap();
        match acquire(&path) {
            Err(DaemonError::DaemonRunning { holder, .. }) => {
                assert_eq!(holder, Some(std::process::id()))
            }
            other => panic!("expected DaemonRunning, got {:?}", other.map(|_| ())),
        }
        drop(held);
        acquire(&path).expect("a released lock can be taken again");
    }
}
