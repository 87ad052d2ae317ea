//! Where Hutch keeps its state: `$HUTCH_HOME`, `/var/lib/hutch` by default.

use std::path::PathBuf;

use crate::error::CliError;

/// The state directory and the well-known places in it.
#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// `$HUTCH_HOME`, or `/var/lib/hutch`.
    pub fn from_env() -> Result<Home, CliError> {
        let root = std::env::var_os("HUTCH_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/lib/hutch"));
        for dir in ["vms", "local"] {
            std::fs::create_dir_all(root.join(dir)).map_err(|source| CliError::Home {
                path: root.clone(),
                source,
            })?;
        }
        Ok(Home { root })
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

    /// The daemon's state database.
    pub fn state_db(&self) -> PathBuf {
        self.root.join("state.db")
    }

    /// The daemon's Unix socket.
    pub fn socket(&self) -> PathBuf {
        self.root.join("hutch.sock")
    }

    /// Cached accelerator probe result.
    pub fn accel_cache(&self) -> PathBuf {
        self.root.join("accel.json")
    }
}
