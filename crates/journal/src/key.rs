//! The sandbox's identity key: made with its journal, certified by the host key in the first
//! record, kept (mode 0600) beside the journal until the seal, then destroyed.

use std::{
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use ed25519_dalek::{Signature, SigningKey, Verifier, VerifyingKey};
use rand::RngCore;

use crate::JournalError;

/// The host's key, which certifies sandbox keys (the daemon's task-signing key).
pub trait HostSigner: Send + Sync {
    /// The public key.
    fn public_key(&self) -> [u8; 32];
    /// An Ed25519 signature over `message`.
    fn sign(&self, message: &[u8]) -> [u8; 64];
}

impl HostSigner for SigningKey {
    fn public_key(&self) -> [u8; 32] {
        self.verifying_key().to_bytes()
    }

    fn sign(&self, message: &[u8]) -> [u8; 64] {
        ed25519_dalek::Signer::sign(self, message).to_bytes()
    }
}

/// What the host signs to certify `public` as the identity key of `sandbox`'s journal.
pub fn certificate_message(sandbox: &str, public: &[u8; 32]) -> Vec<u8> {
    format!(
        "hutch.dev journal key v1\n{sandbox}\n{}\n",
        hex::encode(public)
    )
    .into_bytes()
}

/// Whether `certificate` (hex) is the host key `host`'s signature certifying `public` for
/// `sandbox`.
pub fn certified(host: &[u8; 32], sandbox: &str, public: &[u8; 32], certificate: &str) -> bool {
    let Ok(host) = VerifyingKey::from_bytes(host) else {
        return false;
    };
    let Some(sig) = hex::decode(certificate)
        .ok()
        .and_then(|b| <[u8; 64]>::try_from(b).ok())
    else {
        return false;
    };
    host.verify(
        &certificate_message(sandbox, public),
        &Signature::from_bytes(&sig),
    )
    .is_ok()
}

/// Makes a key and writes its seed to `path` (0600, synced); refuses to replace one.
pub(crate) fn create(path: &Path) -> Result<SigningKey, JournalError> {
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(JournalError::io(path))?;
    file.write_all(hex::encode(seed).as_bytes())
        .and_then(|_| file.sync_all())
        .map_err(JournalError::io(path))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// The key at `path`; [`JournalError::Sealed`] when there is none (destroyed at the seal).
pub(crate) fn load(path: &Path) -> Result<SigningKey, JournalError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(JournalError::Sealed),
        Err(e) => return Err(JournalError::io(path)(e)),
    };
    let seed = hex::decode(text.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| JournalError::Damaged(PathBuf::from(path)))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Overwrites the key file with zeros, syncs it and removes it.
pub(crate) fn destroy(path: &Path) -> Result<(), JournalError> {
    let wipe = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
        file.write_all(&[b'0'; 64])?;
        file.sync_all()?;
        std::fs::remove_file(path)
    };
    wipe().map_err(JournalError::io(path))
}
