//! The hash chain: each line's raw bytes hashed with BLAKE3 in key-derivation mode under a
//! context string of their own, so a journal hash can never be confused with any other BLAKE3
//! use; a line names its predecessor's hash in `prev`, so the last line's hash commits to all.

/// A chain hash.
pub type Hash = [u8; 32];

/// The context of line hashes.
const LINE: &str = "hutch.dev 2026-12 journal v1 line";
/// The context of a journal's genesis hash (the first line's `prev`).
const GENESIS: &str = "hutch.dev 2026-12 journal v1 genesis";

/// The hash of one line (its bytes without the newline).
pub fn line_hash(line: &[u8]) -> Hash {
    blake3::derive_key(LINE, line)
}

/// What the first line of `sandbox`'s journal names as `prev`: ties a journal to its sandbox.
pub fn genesis(sandbox: &str) -> Hash {
    blake3::derive_key(GENESIS, sandbox.as_bytes())
}

/// The hex BLAKE3 of `bytes` (output digests, file digests).
pub fn digest_hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}
