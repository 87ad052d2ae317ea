//! Ids that cross a boundary: a sandbox's id as clients name it, and the ids that name a VM's
//! and its network's host objects. Each has one rule, checked here and nowhere else.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Longest [`SandboxId`], in characters.
pub const MAX_SANDBOX_ID_LEN: usize = 40;

/// Longest host id ([`check_host_id`]), in characters: keeps `/run/netns/hutch-<id>.guest`,
/// nft table names and link aliases short.
pub const MAX_HOST_ID_LEN: usize = 48;

/// A sandbox's id: `sb-` and 1 to 37 lowercase hex digits, as the daemon makes them.
///
/// Parsed once where an id comes in ([`FromStr`], [`TryFrom<String>`], and deserializing,
/// which refuses an invalid id); holding one means it is valid. Every sandbox id is also a
/// valid host id ([`check_host_id`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(try_from = "String", into = "String")]
#[schema(value_type = String, pattern = "^sb-[0-9a-f]{1,37}$")]
pub struct SandboxId(String);

/// A string that is not a [`SandboxId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid sandbox id {0:?}: expected sb- and 1 to 37 lowercase hex digits")]
pub struct InvalidSandboxId(
    /// The refused string (shortened).
    pub String,
);

impl SandboxId {
    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SandboxId {
    type Error = InvalidSandboxId;

    fn try_from(s: String) -> Result<SandboxId, InvalidSandboxId> {
        let ok = s.len() <= MAX_SANDBOX_ID_LEN
            && s.strip_prefix("sb-").is_some_and(|h| {
                !h.is_empty()
                    && h.bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            });
        if ok {
            Ok(SandboxId(s))
        } else {
            Err(InvalidSandboxId(s.chars().take(64).collect()))
        }
    }
}

impl FromStr for SandboxId {
    type Err = InvalidSandboxId;

    fn from_str(s: &str) -> Result<SandboxId, InvalidSandboxId> {
        SandboxId::try_from(s.to_string())
    }
}

impl From<SandboxId> for String {
    fn from(id: SandboxId) -> String {
        id.0
    }
}

impl AsRef<str> for SandboxId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `s` is a [`SandboxId`].
pub fn valid_sandbox_id(s: &str) -> bool {
    s.parse::<SandboxId>().is_ok()
}

/// Checks an id that names a VM's or its network's host objects (run dir, process name
/// `hutch-<id>`, network namespace, nft table, log prefix): 1 to [`MAX_HOST_ID_LEN`]
/// characters of `[a-z0-9-]`, starting with a letter or digit, so no `/`, `.`, `_`,
/// upper case or whitespace. Sandboxes use their [`SandboxId`]; template builds, the
/// accelerator probe and tests use ids of their own. `Err` says what is wrong.
pub fn check_host_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() {
        Err("empty")
    } else if id.len() > MAX_HOST_ID_LEN {
        Err("longer than 48 characters")
    } else if !id.as_bytes()[0].is_ascii_alphanumeric() {
        Err("must start with a letter or digit")
    } else if !id
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        Err("only [a-z0-9-] is allowed")
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_ids_are_sb_and_lowercase_hex() {
        let longest = format!("sb-{}", "f".repeat(37));
        for good in ["sb-0a1b", "sb-0", longest.as_str()] {
            let id: SandboxId = good.parse().unwrap();
            assert_eq!(id.to_string(), good);
            assert_eq!(id.as_ref(), good);
            assert_eq!(check_host_id(id.as_str()), Ok(()), "{good}");
        }
        let too_long = format!("sb-{}", "f".repeat(38));
        for bad in [
            "", "sb-", "sb-../x", "sb-0A", "sb-0g", "SB-01", "sb_01", "x-01", &too_long,
        ] {
            assert!(bad.parse::<SandboxId>().is_err(), "{bad:?}");
            assert!(!valid_sandbox_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_sandbox_id_round_trips_through_json_and_a_bad_one_is_refused() {
        let id: SandboxId = "sb-01".parse().unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"sb-01\"");
        assert_eq!(serde_json::from_str::<SandboxId>(&json).unwrap(), id);
        for bad in ["\"sb-../x\"", "\"\"", "1"] {
            assert!(serde_json::from_str::<SandboxId>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn host_ids_are_lowercase_names_of_at_most_48() {
        for bad in [
            "",
            "-x",
            "A",
            "A_b-9",
            "a_b",
            "a/b",
            "a.b",
            "a b",
            "../x",
            "é",
            &"x".repeat(49),
        ] {
            assert!(check_host_id(bad).is_err(), "{bad:?} should be rejected");
        }
        for good in [
            "a",
            "sbx-01",
            "tpl-0123456789",
            "hutch-probe-4242",
            &"x".repeat(48),
        ] {
            assert_eq!(check_host_id(good), Ok(()), "{good:?}");
        }
    }
}
