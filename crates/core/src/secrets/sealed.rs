//! Values at rest: XChaCha20-Poly1305 under one host key, a fresh random nonce per value, the
//! secret's name as associated data (a value file renamed to another secret fails to open).

use std::{io::Write, os::unix::fs::OpenOptionsExt, path::Path};

use chacha20poly1305::{
    aead::{Aead, KeyInit, Payload},
    XChaCha20Poly1305, XNonce,
};
use rand::RngCore;
use zeroize::Zeroizing;

use super::{SecretError, SecretValue};

/// Bytes of the key.
const KEY_LEN: usize = 32;
/// Bytes of a nonce.
pub(super) const NONCE_LEN: usize = 24;

/// The host key that seals every secret's value.
pub(super) struct SealingKey(Zeroizing<[u8; KEY_LEN]>);

impl std::fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealingKey(<redacted>)")
    }
}

impl SealingKey {
    /// Reads the key file `path`, or creates it (0600, random) when `create` and it is missing.
    /// A key file others can read, or of the wrong size, is refused.
    pub(super) fn load(path: &Path, create: bool) -> Result<Option<SealingKey>, SecretError> {
        use std::os::unix::fs::PermissionsExt;
        let io = |source| SecretError::Io {
            what: "read the secrets key",
            path: path.to_path_buf(),
            source,
        };
        match std::fs::read(path) {
            Ok(bytes) => {
                let bytes = Zeroizing::new(bytes);
                let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
                if mode & 0o077 != 0 {
                    return Err(SecretError::KeyFile {
                        path: path.to_path_buf(),
                        why: format!("its mode is {:o}: others may read it", mode & 0o777),
                    });
                }
                let key: [u8; KEY_LEN] =
                    bytes
                        .as_slice()
                        .try_into()
                        .map_err(|_| SecretError::KeyFile {
                            path: path.to_path_buf(),
                            why: format!("it holds {} bytes, not {KEY_LEN}", bytes.len()),
                        })?;
                Ok(Some(SealingKey(Zeroizing::new(key))))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                let mut key = Zeroizing::new([0u8; KEY_LEN]);
                rand::rngs::OsRng.fill_bytes(key.as_mut());
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .and_then(|mut f| f.write_all(key.as_ref()).and_then(|()| f.sync_all()))
                    .map_err(|source| SecretError::Io {
                        what: "create the secrets key",
                        path: path.to_path_buf(),
                        source,
                    })?;
                Ok(Some(SealingKey(key)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(e)),
        }
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(self.0.as_ref().into())
    }

    /// Seals `value` for the secret `name`: (nonce, ciphertext with tag).
    pub(super) fn seal(&self, name: &str, value: &SecretValue) -> ([u8; NONCE_LEN], Vec<u8>) {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let payload = Payload {
            msg: value.expose(),
            aad: name.as_bytes(),
        };
        let sealed = self
            .cipher()
            .encrypt(XNonce::from_slice(&nonce), payload)
            .expect("XChaCha20-Poly1305 encrypts any length a secret may have");
        (nonce, sealed)
    }

    /// Opens the value of the secret `name`; fails when the key, the name or a byte differs.
    pub(super) fn open(
        &self,
        name: &str,
        nonce: &[u8],
        sealed: &[u8],
    ) -> Result<SecretValue, SecretError> {
        let refused = || SecretError::Decrypt(name.to_string());
        if nonce.len() != NONCE_LEN {
            return Err(refused());
        }
        let payload = Payload {
            msg: sealed,
            aad: name.as_bytes(),
        };
        self.cipher()
            .decrypt(XNonce::from_slice(nonce), payload)
            .map(SecretValue::new)
            .map_err(|_| refused())
    }
}
