//! Signed task records: the host holds an Ed25519 key (`$HUTCH_HOME/tasks/host.key`, mode
//! 0600, made on first use) and signs each stored [`TaskRecord`]'s JSON, which names the
//! baseline's and the changeset's digests, so that a record (or the files it names) changed
//! after the fact is detected before anyone applies it.

use std::{
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::TaskRecord;

/// Why the host key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading, creating or writing the key file failed.
    #[error("task signing key {}", .path.display())]
    Io {
        /// The key file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The key file does not hold a key.
    #[error("task signing key {} is not 64 hex digits", .0.display())]
    Malformed(PathBuf),
    /// The key file can be read by others than its owner.
    #[error("task signing key {} is readable by others (mode {mode:o}); it must be 0600", .path.display())]
    Exposed {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// The host's task-signing key.
pub struct HostKey {
    key: SigningKey,
}

/// The outcome of checking a stored task against its signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "signature", rename_all = "snake_case")]
pub enum SignatureCheck {
    /// The record is as signed, and the files it names have its digests.
    Ok {
        /// The host's public key, hex.
        public_key: String,
    },
    /// The record carries no signature.
    Missing,
    /// The record, or a file it names, was changed after signing.
    Bad {
        /// What does not match.
        reason: String,
    },
}

impl SignatureCheck {
    /// Whether the task is as signed.
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

/// The bytes a record's signature covers: its JSON with `signature` left out.
fn signed_bytes(record: &TaskRecord) -> Vec<u8> {
    let unsigned = TaskRecord {
        signature: None,
        ..record.clone()
    };
    serde_json::to_vec(&unsigned).expect("serializable")
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
                tracing::info!(path = %path.display(), "made the task signing key");
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

    /// The public key's bytes.
    pub fn public_bytes(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// Signs `message` (what the host certifies besides task records: the journals' sandbox
    /// keys).
    pub fn sign_message(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }

    /// Signs `record` (replacing any signature it had).
    pub fn sign(&self, record: &mut TaskRecord) {
        record.signature = Some(hex::encode(self.key.sign(&signed_bytes(record)).to_bytes()));
    }

    /// Checks `record`'s signature (not the files it names; see [`HostKey::check_task`]).
    pub fn check(&self, record: &TaskRecord) -> SignatureCheck {
        let Some(sig) = &record.signature else {
            return SignatureCheck::Missing;
        };
        let bad = |reason: &str| SignatureCheck::Bad {
            reason: reason.into(),
        };
        let Some(sig) = hex::decode(sig)
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
        else {
            return bad("the signature is not 64 bytes of hex");
        };
        match self
            .key
            .verifying_key()
            .verify(&signed_bytes(record), &Signature::from_bytes(&sig))
        {
            Ok(()) => SignatureCheck::Ok {
                public_key: self.public_hex(),
            },
            Err(_) => bad("the record does not match its signature"),
        }
    }

    /// Checks `record`'s signature and that the stored baseline digest and changeset stream
    /// (if any) are the ones it names.
    pub fn check_task(
        &self,
        record: &TaskRecord,
        baseline_digest: &str,
        changeset: Option<&[u8]>,
    ) -> SignatureCheck {
        let check = self.check(record);
        if !check.is_ok() {
            return check;
        }
        if baseline_digest != record.baseline_digest {
            return SignatureCheck::Bad {
                reason: "the stored baseline is not the one the record names".into(),
            };
        }
        let stored = changeset.map(crate::baseline::sha256_hex);
        if stored != record.changeset_digest {
            return SignatureCheck::Bad {
                reason: "the stored changeset is not the one the record names".into(),
            };
        }
        check
    }
}
