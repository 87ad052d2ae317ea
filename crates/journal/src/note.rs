//! Checkpoints as C2SP signed notes (<https://c2sp.org/signed-note>) whose text is a
//! checkpoint in the manner of <https://c2sp.org/tlog-checkpoint>: an origin line naming the
//! journal, the number of lines it covers, and the hash of the last of them, base64; then a
//! blank line and one signature line per key: `— <key name> <base64(key id ‖ signature)>`,
//! the key id being the first four bytes of SHA-256(name ‖ "\n" ‖ 0x01 ‖ public key) for an
//! Ed25519 key.

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::chain::Hash;

/// The signature-line prefix: an em dash and a space.
const DASH: &str = "\u{2014} ";
/// The signature type byte of Ed25519 keys.
const ED25519: u8 = 0x01;

/// What a checkpoint says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The journal it covers (also the key's name).
    pub origin: String,
    /// How many lines it covers.
    pub size: u64,
    /// The hash of line `size - 1` (the genesis hash when `size` is 0).
    pub root: Hash,
}

/// Why a note does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    /// Not a signed note with a checkpoint text.
    #[error("not a checkpoint note: {0}")]
    Malformed(&'static str),
    /// No signature by the expected key verifies.
    #[error("no valid signature by {0}")]
    Unsigned(String),
}

/// The origin (and key name) of `sandbox`'s journal.
pub fn origin(sandbox: &str) -> String {
    format!("hutch.dev/journal/{sandbox}")
}

/// The note key id of the Ed25519 key `public` named `name`.
pub fn key_id(name: &str, public: &[u8; 32]) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([ED25519]);
    h.update(public);
    let d = h.finalize();
    [d[0], d[1], d[2], d[3]]
}

/// The verifier key string (`name+hexid+base64(0x01 ‖ key)`) other note tools take.
pub fn verifier_key(name: &str, public: &[u8; 32]) -> String {
    let mut typed = vec![ED25519];
    typed.extend_from_slice(public);
    format!(
        "{name}+{}+{}",
        hex::encode(key_id(name, public)),
        B64.encode(typed)
    )
}

impl Checkpoint {
    /// The note's text (what the signatures cover).
    pub fn text(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            B64.encode(self.root)
        )
    }

    /// The signed note, signed by `key` under the origin as key name.
    pub fn sign(&self, key: &SigningKey) -> String {
        let text = self.text();
        let public = key.verifying_key().to_bytes();
        let mut blob = key_id(&self.origin, &public).to_vec();
        blob.extend_from_slice(&key.sign(text.as_bytes()).to_bytes());
        format!("{text}\n{DASH}{} {}\n", self.origin, B64.encode(blob))
    }

    /// Parses `note` and checks that the key `public`, named after the note's origin, signed
    /// it; signatures by other keys are ignored, as the format asks.
    pub fn verify(note: &str, public: &[u8; 32]) -> Result<Checkpoint, NoteError> {
        let split = note
            .find("\n\n")
            .ok_or(NoteError::Malformed("no blank line before the signatures"))?;
        let (text, sigs) = (&note[..split + 1], &note[split + 2..]);
        let checkpoint = Checkpoint::parse(text)?;
        let key =
            VerifyingKey::from_bytes(public).map_err(|_| NoteError::Malformed("bad public key"))?;
        let id = key_id(&checkpoint.origin, public);
        let signed = sigs.lines().filter_map(|l| l.strip_prefix(DASH)).any(|l| {
            let Some((name, blob)) = l.split_once(' ') else {
                return false;
            };
            let Ok(blob) = B64.decode(blob) else {
                return false;
            };
            name == checkpoint.origin
                && blob.len() == 68
                && blob[..4] == id
                && <[u8; 64]>::try_from(&blob[4..]).is_ok_and(|s| {
                    key.verify(text.as_bytes(), &Signature::from_bytes(&s))
                        .is_ok()
                })
        });
        if signed {
            Ok(checkpoint)
        } else {
            Err(NoteError::Unsigned(checkpoint.origin))
        }
    }

    /// Parses a checkpoint text (origin, size, root; extension lines ignored).
    fn parse(text: &str) -> Result<Checkpoint, NoteError> {
        let mut lines = text.lines();
        let origin = lines
            .next()
            .filter(|o| !o.is_empty())
            .ok_or(NoteError::Malformed("no origin line"))?;
        let size = lines
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or(NoteError::Malformed("no size line"))?;
        let root = lines
            .next()
            .and_then(|r| B64.decode(r).ok())
            .and_then(|r| Hash::try_from(r).ok())
            .ok_or(NoteError::Malformed("no root hash line"))?;
        Ok(Checkpoint {
            origin: origin.into(),
            size,
            root,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7; 32])
    }

    #[test]
    fn a_signed_note_verifies_and_has_the_c2sp_shape() {
        let cp = Checkpoint {
            origin: origin("sb-1"),
            size: 3,
            root: [9; 32],
        };
        let note = cp.sign(&key());
        let public = key().verifying_key().to_bytes();
        assert_eq!(Checkpoint::verify(&note, &public), Ok(cp.clone()));
        let lines: Vec<&str> = note.lines().collect();
        assert_eq!(
            lines[..4],
            ["hutch.dev/journal/sb-1", "3", &B64.encode([9; 32]), ""]
        );
        assert!(lines[4].starts_with("\u{2014} hutch.dev/journal/sb-1 "));
        assert!(note.ends_with('\n'));
    }

    #[test]
    fn a_changed_text_or_another_key_does_not_verify() {
        let cp = Checkpoint {
            origin: origin("sb-1"),
            size: 3,
            root: [9; 32],
        };
        let note = cp.sign(&key());
        let public = key().verifying_key().to_bytes();
        let edited = note.replacen("\n3\n", "\n4\n", 1);
        assert!(matches!(
            Checkpoint::verify(&edited, &public),
            Err(NoteError::Unsigned(_))
        ));
        let other = SigningKey::from_bytes(&[8; 32]).verifying_key().to_bytes();
        assert!(Checkpoint::verify(&note, &other).is_err());
        assert!(Checkpoint::verify("garbage", &public).is_err());
    }
}
