//! Where Hutch keeps its state: `$HUTCH_HOME`, `/var/lib/hutch` by default.

use std::path::PathBuf;

use crate::error::DaemonError;

/// The state directory and the well-known places in it.
#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// `$HUTCH_HOME`, or `/var/lib/hutch`.
    pub fn from_env() -> Result<Home, DaemonError> {
        let root = std::env::var_os("HUTCH_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/lib/hutch"));
        for dir in ["vms", "local"] {
            std::fs::create_dir_all(root.join(dir)).map_err(|source| DaemonError::Home {
                path: root.clone(),
                source,
            })?;
        }
        Ok(Home { root })
    }

    /// The key that signs guests' identity tokens (mode 0600, made on first start).
    pub fn identity_key(&self) -> PathBuf {
        self.root.join("identity").join("signing.key")
    }

    /// Agent tasks, one directory each (`tasks/<id>/`).
    pub fn tasks(&self) -> PathBuf {
        self.root.join("tasks")
    }

    /// Built images and their content-addressed artifacts.
    pub fn images(&self) -> PathBuf {
        self.root.join("images")
    }

    /// One private run dir per daemon-managed VM. The daemon owns everything here: at start it
    /// removes what no sandbox of its own owns.
    pub fn vms(&self) -> PathBuf {
        self.root.join("vms")
    }

    /// Run dirs of VMs that one `hutch run` owns (kept apart, so a daemon never touches them).
    pub fn local_vms(&self) -> PathBuf {
        self.root.join("local")
    }

    /// Secrets: the sealing key, sealed values and each sandbox's broker CA (0700; never in
    /// the state database).
    pub fn secrets(&self) -> PathBuf {
        self.root.join("secrets")
    }

    /// The daemon's state database.
    pub fn state_db(&self) -> PathBuf {
        self.root.join("state.db")
    }

    /// Locked by the daemon serving this home, for its whole life; holds its pid.
    pub fn daemon_lock(&self) -> PathBuf {
        self.root.join("daemon.lock")
    }

    /// The daemon's Unix socket.
    pub fn socket(&self) -> PathBuf {
        self.root.join("hutch.sock")
    }

    /// Binaries `hutch setup` installs (`firecracker`, `jailer`).
    pub fn bin(&self) -> PathBuf {
        self.root.join("bin")
    }

    /// The chroot base of jailed Firecracker VMs (`jail/firecracker/<id>/root`).
    pub fn jails(&self) -> PathBuf {
        self.root.join("jail")
    }

    /// Saved templates (`<name>.json` and their content-addressed snapshots).
    pub fn templates(&self) -> PathBuf {
        self.root.join("templates")
    }

    /// Where forks and sandboxes paused to disk keep their snapshots.
    pub fn snapshots(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// The tmpfs directory holding templates' RAM, one per home (named by a hash of its path,
    /// so two homes never share it).
    pub fn templates_shm(&self) -> PathBuf {
        use sha2::Digest;
        let hash = sha2::Sha256::digest(self.root.as_os_str().as_encoded_bytes());
        PathBuf::from(format!("/dev/shm/hutch-{}", hex::encode(&hash[..6])))
    }

    /// The sandboxes' journals (`journal/<id>/`), kept after the sandboxes are gone.
    pub fn journal(&self) -> PathBuf {
        self.root.join("journal")
    }

    /// Cached accelerator probe result.
    pub fn accel_cache(&self) -> PathBuf {
        self.root.join("accel.json")
    }
}
