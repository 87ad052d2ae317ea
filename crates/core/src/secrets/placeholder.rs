//! Placeholders: what the guest holds in place of a secret's value.

use hutch_types::PLACEHOLDER_PREFIX;
use rand::Rng;

/// Characters after the prefix.
const LEN: usize = 32;
/// The alphabet of those characters.
const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// A fresh placeholder: [`PLACEHOLDER_PREFIX`] and 32 characters of `[a-z0-9]` drawn
/// uniformly from the OS RNG (about 165 bits), so no two sandboxes ever share one.
pub fn new_placeholder() -> String {
    let mut rng = rand::rngs::OsRng;
    let tail: String = (0..LEN)
        .map(|_| char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())]))
        .collect();
    format!("{PLACEHOLDER_PREFIX}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_prefixed_plain_and_distinct() {
        let all: std::collections::BTreeSet<String> =
            (0..1000).map(|_| new_placeholder()).collect();
        assert_eq!(all.len(), 1000);
        for p in &all {
            let tail = p.strip_prefix(PLACEHOLDER_PREFIX).unwrap();
            assert_eq!(tail.len(), LEN);
            assert!(tail.bytes().all(|b| ALPHABET.contains(&b)), "{p}");
        }
        // 32 symbols of 36 carry at least 128 bits.
        assert!((LEN as f64) * (ALPHABET.len() as f64).log2() >= 128.0);
    }
}
