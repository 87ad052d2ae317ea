//! The host's Ed25519 keys (`$HUTCH_HOME/tasks/host.key`, mode 0600, made on first use: it
//! certifies sandbox keys and co-signs task attestations, [`crate::attest`]; and the workload
//! identity key), and the outcome of checking a stored task against its attestation
//! ([`SignatureCheck`]). Task records themselves are no longer signed: the attestation is what
//! vouches for a task (records signed by an older hutch are refused, see
//! [`crate::attest::check_task`]).

use std::{
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use ed25519_dalek::{Signer, SigningKey};
use rand::RngCore;
use serde::{Deserialize, Serialize};

/// Why the host key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading, creating or writing the key file failed.
    #[error("signing key {}", .path.display())]
    Io {
        /// The key file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The key file does not hold a key.
    #[error("signing key {} is not 64 hex digits", .0.display())]
    Malformed(PathBuf),
    /// The key file can be read by others than its owner.
    #[error("signing key {} is readable by others (mode {mode:o}); it must be 0600", .path.display())]
    Exposed {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// An Ed25519 key the host keeps in a file of its own: the task-signing key, and the
/// workload identity key (`hutch-core::identity`).
pub struct HostKey {
    key: SigningKey,
}

/// The outcome of checking a stored task against its attestation: the envelope's signatures
/// (the host key's and the certified sandbox key's), and the stored files and the record's
/// attested fields against the statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "signature", rename_all = "snake_case")]
pub enum SignatureCheck {
    /// The attestation verifies, and the stored files and the record are as it says.
    Ok {
        /// The host's public key, hex.
        public_key: String,
    },
    /// The task has no attestation (it ended before its sandbox attested anything).
    Missing,
    /// The attestation does not verify, the record or a stored file is not as it says, or
    /// the record is one an older hutch signed (no longer accepted).
    Bad {
        /// What does not match.
        reason: String,
    },
}

impl SignatureCheck {
    /// Whether the task is as attested.
    pub fn is_ok(&self) -> bool {
        matches!(self, SignatureCheck::Ok { .. })
    }
}

impl std::fmt::Display for SignatureCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SignatureCheck::Ok { public_key } => write!(f, "ok (host key {public_key:.16}…)"),
            SignatureCheck::Missing => write!(f, "MISSING"),
            SignatureCheck::Bad { reason } => write!(f, "BAD ({reason})"),
        }
    }
}

impl HostKey {
    /// Loads the key at `path`, or makes one there (mode 0600, parent 0700) when there is none.
    pub fn load_or_create(path: &Path) -> Result<HostKey, KeyError> {
        let io = |source| KeyError::Io {
            path: path.into(),
            source,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(KeyError::Exposed {
                        path: path.into(),
                        mode,
                    });
                }
                let seed: [u8; 32] = hex::decode(text.trim())
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| KeyError::Malformed(path.into()))?;
                Ok(HostKey {
                    key: SigningKey::from_bytes(&seed),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(io)?;
                }
                let mut seed = [0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut seed);
                let opened = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path);
                let mut file = match opened {
                    Ok(f) => f,
                    // Another task made it first: use that one.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        return HostKey::load_or_create(path)
                    }
                    Err(e) => return Err(io(e)),
                };
                file.write_all(hex::encode(seed).as_bytes())
                    .and_then(|_| file.sync_all())
                    .map_err(io)?;
                tracing::info!(path = %path.display(), "made a signing key");
                Ok(HostKey {
                    key: SigningKey::from_bytes(&seed),
                })
            }
            Err(e) => Err(io(e)),
        }
    }

    /// The public key, hex.
    pub fn public_hex(&self) -> String {
        hex::encode(self.key.verifying_key().as_bytes())
    }

    /// The public key's 32 bytes.
    pub fn public_bytes(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// Signs `msg` (Ed25519, pure): the signature's 64 bytes.
    pub fn sign_bytes(&self, msg: &[u8]) -> [u8; 64] {
        self.key.sign(msg).to_bytes()
    }
}
