//! Each sandbox's broker CA: an ECDSA P-256 certificate authority (path length 0, backdated a
//! day for guest clock skew) whose key stays on the host, in the secret store's directory
//! (0600). `hutch_broker::SandboxCa` mints it and reads it back (`SandboxCa::from_pem`).

use std::{
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::Path,
};

use super::SecretError;

/// A sandbox's CA as files: the certificate (given to the guest) and its key (never).
pub struct CaFiles {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM (PKCS#8).
    pub key_pem: zeroize::Zeroizing<String>,
}

impl std::fmt::Debug for CaFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaFiles")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// File names in a sandbox's directory.
pub(super) const CERT_FILE: &str = "ca.pem";
/// The key's file name.
pub(super) const KEY_FILE: &str = "ca.key";

/// Mints a CA for the sandbox `id` ([`hutch_broker::SandboxCa`]: ECDSA P-256, path length 0,
/// backdated, IP addresses excluded).
pub fn mint(id: &str) -> Result<CaFiles, hutch_broker::BrokerError> {
    let ca = hutch_broker::SandboxCa::generate(id, &[])?;
    Ok(CaFiles {
        cert_pem: ca.cert_pem(),
        key_pem: ca.key_pem(),
    })
}

/// The sandbox's CA in `dir`, minted and written (0600, the key first) when absent.
pub(super) fn load_or_mint(dir: &Path, id: &str) -> Result<CaFiles, SecretError> {
    let io = |what, source| SecretError::Io {
        what,
        path: dir.to_path_buf(),
        source,
    };
    let (cert, key) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
    if let (Ok(cert_pem), Ok(key_pem)) = (
        std::fs::read_to_string(&cert),
        std::fs::read_to_string(&key),
    ) {
        return Ok(CaFiles {
            cert_pem,
            key_pem: zeroize::Zeroizing::new(key_pem),
        });
    }
    let files = mint(id).map_err(|e| SecretError::Ca(e.to_string()))?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io("create the sandbox's CA directory", e))?;
    write_private(&key, files.key_pem.as_bytes()).map_err(|e| io("write the CA key", e))?;
    write_private(&cert, files.cert_pem.as_bytes()).map_err(|e| io("write the CA", e))?;
    Ok(files)
}

/// Writes `bytes` to `path` (0600), replacing it through a temporary file.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path))
}
