//! A secret as the broker holds it: the real value (host memory only), the placeholder the
//! guest sees, and where the value may go.

use std::fmt;

use hutch_types::SecretBinding;
use zeroize::Zeroizing;

/// A secret's real value: wiped from memory on drop, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Zeroizing<Vec<u8>>);

impl SecretValue {
    /// Wraps a value (the caller's buffer moves in, so no copy is left behind by this call).
    pub fn new(value: Vec<u8>) -> SecretValue {
        SecretValue(Zeroizing::new(value))
    }

    /// The value's bytes, for substitution, scrubbing and sealing at rest.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue(<redacted>)")
    }
}

/// One secret attached to a sandbox, as the broker substitutes it.
#[derive(Debug, Clone)]
pub struct AttachedSecret {
    /// The secret's name (as events name it).
    pub name: String,
    /// The real value.
    pub value: SecretValue,
    /// The placeholder the guest holds instead (starts with
    /// [`hutch_types::PLACEHOLDER_PREFIX`]).
    pub placeholder: String,
    /// Where the value may go; hosts canonical (see [`SecretBinding::normalised`]).
    pub bindings: Vec<SecretBinding>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let v = SecretValue::new(b"sk-real-1234".to_vec());
        assert!(!format!("{v:?}").contains("sk-real"));
        assert_eq!(v.expose(), b"sk-real-1234");
    }
}
