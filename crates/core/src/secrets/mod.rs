//! Secrets as host-side objects: values sealed at rest in the daemon's home, held in memory
//! as zeroizing buffers, scoped by label like sandboxes, and handed to the guest only as
//! per-sandbox placeholders (the broker swaps the value in on the way out).
//!
//! Layout under the store's directory (`$HUTCH_HOME/secrets`, 0700): `key` (32 random bytes,
//! 0600, made by the first `set`; never in the state database), `values/<name>.json` (0600:
//! the secret's [`SecretInfo`] and its value sealed with XChaCha20-Poly1305 under `key`, the
//! name as associated data), and `sandboxes/<id>/ca.{pem,key}` (each sandbox's broker CA,
//! removed when the sandbox is destroyed).

mod broker;
mod ca;
mod guest;
mod log;
mod placeholder;
mod sealed;
mod ssh;

use std::{
    collections::BTreeMap,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use hutch_types::{
    check_env_name, check_secret_name, ErrorCode, Forbidden, InvalidSecret, Labels, SecretBinding,
    SecretInfo, TokenScope,
};
use serde::{Deserialize, Serialize};

pub(crate) use broker::Brokers;
pub use ca::{mint as mint_ca, CaFiles};
pub use guest::{placeholders_for, Attached, CA_BUNDLE_VARS};
pub use log::{BrokerLog, EVENTS_PER_SANDBOX};
pub use placeholder::new_placeholder;
use sealed::SealingKey;
pub(crate) use ssh::SandboxSshAgent;

/// Largest value accepted, bytes.
pub const MAX_VALUE_LEN: usize = 64 * 1024;
/// Most bindings per secret.
pub const MAX_BINDINGS: usize = 16;
/// What a scope error calls these objects.
const WHAT: &str = "secrets";

/// A secret's value: zeroed when dropped, never printed (the broker's own type).
pub use hutch_broker::SecretValue;

/// Why a secret could not be set, read or used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// A name, binding, location or variable is malformed.
    #[error(transparent)]
    Invalid(#[from] InvalidSecret),
    /// The request is malformed otherwise (value size, no binding).
    #[error("{0}")]
    BadRequest(String),
    /// No secret has this name (or none the caller may see).
    #[error("no such secret: {0}")]
    NotFound(String),
    /// The secret is outside the caller's scope.
    #[error(transparent)]
    Forbidden(#[from] Forbidden),
    /// A stored value does not open under the key file.
    #[error("cannot decrypt secret {0}: the secrets key is not the one it was sealed with, or its file was altered")]
    Decrypt(String),
    /// The key file is unusable.
    #[error("secrets key {path}: {why}")]
    KeyFile {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// A stored secret's file is not what the store writes.
    #[error("secret file {path} is corrupt: {why}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// Reading or writing the store failed.
    #[error("cannot {what} ({path})")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A sandbox's CA could not be minted.
    #[error("cannot mint the sandbox's broker CA: {0}")]
    Ca(String),
    /// The sandbox's broker could not be set up.
    #[error("the sandbox's secret broker")]
    Broker(#[source] hutch_broker::BrokerError),
    /// The guest's self-test request did not come back from the sandbox's broker: its traffic
    /// would leave unbrokered, placeholders and all.
    #[error("the sandbox's secret broker failed its self-test from the guest ({0}); a sandbox whose traffic does not reach its broker is not started")]
    SelfTest(String),
    /// An SSH key or host key is unusable.
    #[error(transparent)]
    SshKey(#[from] hutch_broker::ssh::SshKeyError),
}

impl SecretError {
    /// The stable API category.
    pub fn code(&self) -> ErrorCode {
        match self {
            SecretError::Invalid(_) | SecretError::BadRequest(_) | SecretError::SshKey(_) => {
                ErrorCode::BadRequest
            }
            SecretError::NotFound(_) => ErrorCode::NotFound,
            SecretError::Forbidden(_) => ErrorCode::Forbidden,
            _ => ErrorCode::Internal,
        }
    }
}

/// A secret to set: a new one, or a new value (rotation) for an existing one, which keeps its
/// identity (name, creation time, every sandbox's placeholder).
#[derive(Debug)]
pub struct SetSecret {
    /// The name.
    pub name: String,
    /// The value.
    pub value: SecretValue,
    /// The variable the guest sees; for an existing secret, `None` keeps its own.
    pub env: Option<String>,
    /// Where it may go; for an existing secret, `None` keeps its own. A new one needs one.
    pub bindings: Option<Vec<SecretBinding>>,
    /// Labels; for an existing secret, empty keeps its own. A scoped caller's label is added.
    pub labels: Labels,
    /// Makes it an SSH key: `value` is an unencrypted OpenSSH private key (Ed25519 or ECDSA)
    /// that the host's agent signs with only for these server host keys (OpenSSH public key
    /// lines). For an existing SSH key, `None` keeps its own list.
    pub ssh_allowed_host_keys: Option<Vec<String>>,
}

/// A secret as stored on disk.
#[derive(Serialize, Deserialize)]
struct Stored {
    info: SecretInfo,
    /// Hex.
    nonce: String,
    /// Hex: ciphertext and tag.
    sealed: String,
}

/// One secret in memory.
struct Entry {
    info: SecretInfo,
    value: SecretValue,
}

/// Every secret of this host, and each sandbox's broker CA.
pub struct SecretStore {
    dir: PathBuf,
    key: Mutex<Option<SealingKey>>,
    entries: Mutex<BTreeMap<String, Entry>>,
    log: Arc<BrokerLog>,
    /// Roots the brokers trust for upstream certificates besides the host's own.
    extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
}

impl std::fmt::Debug for SecretStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretStore")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl SecretStore {
    /// Opens (making it if need be) the store in `dir`, opening every stored value: a value
    /// that does not open under the key file is an error here, not at first use.
    pub fn open(dir: &Path) -> Result<SecretStore, SecretError> {
        for d in [dir.to_path_buf(), dir.join("values"), dir.join("sandboxes")] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .map_err(|source| SecretError::Io {
                    what: "create the secrets directory",
                    path: d.clone(),
                    source,
                })?;
        }
        let key_path = dir.join("key");
        let key = SealingKey::load(&key_path, false)?;
        let mut entries = BTreeMap::new();
        let values = dir.join("values");
        let listing = std::fs::read_dir(&values).map_err(|source| SecretError::Io {
            what: "list secrets",
            path: values.clone(),
            source,
        })?;
        for entry in listing.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let Some(key) = &key else {
                return Err(SecretError::KeyFile {
                    path: key_path,
                    why: "it is missing, but sealed secrets exist".into(),
                });
            };
            let (info, value) = read_stored(&path, key)?;
            entries.insert(info.name.clone(), Entry { info, value });
        }
        Ok(SecretStore {
            dir: dir.to_path_buf(),
            key: Mutex::new(key),
            entries: Mutex::new(entries),
            log: Arc::new(BrokerLog::default()),
            extra_roots: Vec::new(),
        })
    }

    /// Makes the brokers also trust the CA certificates in the PEM file `path` for upstream
    /// certificates (an organisation's private CA in front of its origins; a test internet's
    /// root). Blocking (reads the file).
    pub fn trust_upstream_roots(mut self, path: &Path) -> Result<SecretStore, SecretError> {
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        let io = |source| SecretError::Io {
            what: "read the extra upstream roots",
            path: path.to_path_buf(),
            source,
        };
        let pem = std::fs::read(path).map_err(io)?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SecretError::BadRequest(format!("{}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(SecretError::BadRequest(format!(
                "{}: no certificate in it",
                path.display()
            )));
        }
        self.extra_roots.extend(certs);
        Ok(self)
    }

    /// The extra upstream roots ([`SecretStore::trust_upstream_roots`]).
    pub(crate) fn extra_roots(&self) -> &[rustls::pki_types::CertificateDer<'static>] {
        &self.extra_roots
    }

    /// Sets a secret (or rotates one) for a caller of `scope`; blocking (it writes and syncs a
    /// file). A scoped caller cannot touch another scope's secret of the same name.
    pub fn set(&self, scope: &TokenScope, req: SetSecret) -> Result<SecretInfo, SecretError> {
        check_secret_name(&req.name)?;
        let len = req.value.expose().len();
        if len == 0 || len > MAX_VALUE_LEN {
            return Err(SecretError::BadRequest(format!(
                "a secret's value must be 1 to {MAX_VALUE_LEN} bytes"
            )));
        }
        if let Some(env) = &req.env {
            check_env_name(env)?;
        }
        let bindings = match req.bindings {
            Some(b) if b.is_empty() || b.len() > MAX_BINDINGS => {
                return Err(SecretError::BadRequest(format!(
                    "a secret needs 1 to {MAX_BINDINGS} bindings"
                )))
            }
            Some(b) => Some(
                b.into_iter()
                    .map(SecretBinding::normalised)
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            None => None,
        };
        let mut entries = self.entries.lock().expect("secrets lock");
        let old_ssh = entries.get(&req.name).and_then(|e| e.info.ssh.clone());
        let ssh = ssh::key_info(&req.value, req.ssh_allowed_host_keys.as_deref(), old_ssh)?;
        if ssh.is_some() && (bindings.is_some() || req.env.is_some()) {
            return Err(SecretError::BadRequest(
                "an SSH key has no bindings and no variable: the guest reaches it through SSH_AUTH_SOCK".into(),
            ));
        }
        let now = rfc3339_now();
        let mut info = match entries.get(&req.name) {
            Some(old) => {
                scope.allows_labels(WHAT, &old.info.labels)?;
                let mut info = old.info.clone();
                info.updated_at = now;
                info
            }
            None => SecretInfo {
                name: req.name.clone(),
                env: None,
                bindings: match (&bindings, &ssh) {
                    (Some(b), _) => b.clone(),
                    (None, Some(_)) => Vec::new(),
                    (None, None) => {
                        return Err(SecretError::BadRequest(format!(
                            "secret {} is new: it needs at least one binding (--host, --at)",
                            req.name
                        )))
                    }
                },
                labels: Labels::new(),
                ssh: None,
                created_at: now.clone(),
                updated_at: now,
            },
        };
        if let Some(b) = bindings {
            info.bindings = b;
        }
        if req.env.is_some() {
            info.env = req.env;
        }
        if !req.labels.is_empty() {
            info.labels = req.labels;
        }
        info.ssh = ssh;
        scope.label_labels(WHAT, &mut info.labels)?;
        self.write(&info, &req.value)?;
        entries.insert(
            info.name.clone(),
            Entry {
                info: info.clone(),
                value: req.value,
            },
        );
        Ok(info)
    }

    /// Seals and writes one secret's file (making the key on first use).
    fn write(&self, info: &SecretInfo, value: &SecretValue) -> Result<(), SecretError> {
        let mut key = self.key.lock().expect("secrets key lock");
        if key.is_none() {
            *key = SealingKey::load(&self.dir.join("key"), true)?;
        }
        let key = key.as_ref().expect("just loaded or made");
        let (nonce, sealed) = key.seal(&info.name, value);
        let stored = Stored {
            info: info.clone(),
            nonce: hex::encode(nonce),
            sealed: hex::encode(sealed),
        };
        let json = serde_json::to_vec_pretty(&stored).expect("serializes");
        let path = self.value_path(&info.name);
        write_private(&path, &json).map_err(|source| SecretError::Io {
            what: "write the secret",
            path,
            source,
        })
    }

    fn value_path(&self, name: &str) -> PathBuf {
        self.dir.join("values").join(format!("{name}.json"))
    }

    /// The secrets `scope` may see, by name.
    pub fn list(&self, scope: &TokenScope) -> Vec<SecretInfo> {
        let entries = self.entries.lock().expect("secrets lock");
        entries
            .values()
            .filter(|e| scope.allows_labels(WHAT, &e.info.labels).is_ok())
            .map(|e| e.info.clone())
            .collect()
    }

    /// One secret `scope` may see (and so attach).
    pub fn get(&self, scope: &TokenScope, name: &str) -> Result<SecretInfo, SecretError> {
        let info = self
            .info(name)
            .ok_or_else(|| SecretError::NotFound(name.to_string()))?;
        scope.allows_labels(WHAT, &info.labels)?;
        Ok(info)
    }

    /// Removes a secret `scope` may see; blocking (it removes a file).
    pub fn remove(&self, scope: &TokenScope, name: &str) -> Result<SecretInfo, SecretError> {
        let mut entries = self.entries.lock().expect("secrets lock");
        let entry = entries
            .get(name)
            .ok_or_else(|| SecretError::NotFound(name.to_string()))?;
        scope.allows_labels(WHAT, &entry.info.labels)?;
        let path = self.value_path(name);
        std::fs::remove_file(&path).map_err(|source| SecretError::Io {
            what: "remove the secret",
            path,
            source,
        })?;
        Ok(entries.remove(name).expect("present").info)
    }

    /// A secret's metadata, whoever asks (host-internal: exec environments, the broker).
    pub fn info(&self, name: &str) -> Option<SecretInfo> {
        let entries = self.entries.lock().expect("secrets lock");
        entries.get(name).map(|e| e.info.clone())
    }

    /// A secret's current value, for the broker (a rotation is seen by the next request).
    pub fn value(&self, name: &str) -> Option<SecretValue> {
        let entries = self.entries.lock().expect("secrets lock");
        entries.get(name).map(|e| e.value.clone())
    }

    /// Every secret's current value, as text (for the journals' redaction; values that are not
    /// UTF-8 cannot appear in a record as they are).
    pub fn values(&self) -> Vec<String> {
        let entries = self.entries.lock().expect("secrets lock");
        entries
            .values()
            .filter_map(|e| std::str::from_utf8(e.value.expose()).ok().map(String::from))
            .collect()
    }

    /// The directory of a sandbox's broker material.
    fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.dir.join("sandboxes").join(id)
    }

    /// The sandbox's broker CA (certificate for the guest, key for the broker), minted on
    /// first use; blocking. `id` must be a checked sandbox id.
    pub fn sandbox_ca(&self, id: &str) -> Result<CaFiles, SecretError> {
        ca::load_or_mint(&self.sandbox_dir(id), id)
    }

    /// Removes a destroyed sandbox's CA and broker log; blocking.
    pub fn forget_sandbox(&self, id: &str) {
        let dir = self.sandbox_dir(id);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(%id, error = %e, "cannot remove the sandbox's broker CA");
            }
        }
        self.log.forget(id);
    }

    /// Removes the broker CA of every sandbox not in `keep`; blocking. The count removed.
    pub fn sweep_sandboxes(&self, keep: &[String]) -> usize {
        let dir = self.dir.join("sandboxes");
        let stale: Vec<String> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|id| !keep.contains(id))
            .collect();
        for id in &stale {
            self.forget_sandbox(id);
        }
        stale.len()
    }

    /// The broker's event log (the broker records into it; `hutch secret log` reads it).
    pub fn log(&self) -> &Arc<BrokerLog> {
        &self.log
    }
}

/// Reads and opens one stored secret.
fn read_stored(path: &Path, key: &SealingKey) -> Result<(SecretInfo, SecretValue), SecretError> {
    let corrupt = |why: String| SecretError::Corrupt {
        path: path.to_path_buf(),
        why,
    };
    let bytes = std::fs::read(path).map_err(|source| SecretError::Io {
        what: "read a secret",
        path: path.to_path_buf(),
        source,
    })?;
    let stored: Stored = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
    let expected = format!("{}.json", stored.info.name);
    if path.file_name().and_then(|n| n.to_str()) != Some(expected.as_str()) {
        return Err(corrupt(format!("it holds secret {}", stored.info.name)));
    }
    let nonce = hex::decode(&stored.nonce).map_err(|e| corrupt(e.to_string()))?;
    let sealed = hex::decode(&stored.sealed).map_err(|e| corrupt(e.to_string()))?;
    let value = key.open(&stored.info.name, &nonce, &sealed)?;
    Ok((stored.info, value))
}

/// Writes `bytes` to `path` (0600) through a fresh temporary file and a rename.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Now, RFC 3339 (UTC).
pub fn rfc3339_now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
