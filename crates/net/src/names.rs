//! Names of every kernel object a sandbox's network owns, all derived from the sandbox id.
//!
//! Interface names are limited to 15 bytes (`IFNAMSIZ - 1`), so they carry a 40-bit hash of the
//! id; the id itself is carried by the netns name, the nft table name and the host veth's
//! `ifalias` (`hutch:<id>`), which is how [`crate::Network::list_owned`] maps objects back to ids.

use sha2::{Digest, Sha256};

use crate::NetError;

/// Prefix of every network namespace Hutch creates (`/run/netns/hutch-<id>`).
pub const NETNS_PREFIX: &str = "hutch-";
/// Prefix of every nft table Hutch creates (host side and inside sandbox namespaces).
pub const TABLE_PREFIX: &str = "hutch-";
/// Prefix of the `ifalias` tag on host-side links.
pub const ALIAS_PREFIX: &str = "hutch:";
/// Longest sandbox id accepted (keeps `/run/netns/hutch-<id>.guest` and nft names short).
pub const MAX_ID_LEN: usize = 48;

/// Every name one sandbox's network uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    /// Network namespace name under `/run/netns`: `hutch-<id>`.
    pub netns: String,
    /// Test-only "guest" namespace (when [`crate::GuestDevice::Veth`]): `hutch-<id>.guest`.
    pub guest_netns: String,
    /// Host end of the transit veth pair: `hv<10 hex>h`.
    pub host_veth: String,
    /// Namespace end of the transit veth pair: `hv<10 hex>g`.
    pub ns_veth: String,
    /// TAP device inside the namespace: `ht<10 hex>` (or the veth standing in for it).
    pub tap: String,
    /// WireGuard TUN inside the namespace (sandboxes with an egress tunnel): `hw<10 hex>`.
    pub tun: String,
    /// Guest end of the stand-in veth (test mode only): `ht<10 hex>p`.
    pub guest_veth: String,
    /// nft table, both host side and inside the namespace: `hutch-<id>`.
    pub table: String,
    /// `ifalias` written on the host veth without an owner: `hutch:<id>` (see [`alias`]).
    pub alias: String,
}

impl Names {
    /// Derives every name from a (validated) sandbox id.
    pub fn new(id: &str) -> Result<Names, NetError> {
        validate_id(id)?;
        let h = hash10(id);
        Ok(Names {
            netns: format!("{NETNS_PREFIX}{id}"),
            guest_netns: format!("{NETNS_PREFIX}{id}.guest"),
            host_veth: format!("hv{h}h"),
            ns_veth: format!("hv{h}g"),
            tap: format!("ht{h}"),
            tun: format!("hw{h}"),
            guest_veth: format!("ht{h}p"),
            table: format!("{TABLE_PREFIX}{id}"),
            alias: format!("{ALIAS_PREFIX}{id}"),
        })
    }
}

/// The `ifalias` of a sandbox's host veth: `hutch:<id>`, or `hutch:<id>@<owner>` for a
/// [`crate::NetConfig::owner`].
pub fn alias(id: &str, owner: &str) -> String {
    if owner.is_empty() {
        format!("{ALIAS_PREFIX}{id}")
    } else {
        format!("{ALIAS_PREFIX}{id}@{owner}")
    }
}

/// `(sandbox id, owner)` from a host veth's alias (see [`alias`]); `None` for another alias.
pub fn parse_alias(alias: &str) -> Option<(&str, Option<&str>)> {
    let rest = alias.strip_prefix(ALIAS_PREFIX)?;
    Some(match rest.split_once('@') {
        Some((id, owner)) => (id, Some(owner)),
        None => (rest, None),
    })
}

/// A short tag naming one owner of sandbox networks (e.g. one daemon's home directory).
pub fn owner_tag(of: &str) -> String {
    hash10(of)
}

/// First 10 hex digits (40 bits) of SHA-256 of the id.
pub fn hash10(id: &str) -> String {
    let d = Sha256::digest(id.as_bytes());
    hex::encode(&d[..5])
}

/// True for a host link name Hutch could have made (`hv<10 hex>h`).
pub fn is_host_veth_name(name: &str) -> bool {
    name.len() == 13
        && name.starts_with("hv")
        && name.ends_with('h')
        && name[2..12]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Accepts ids of 1..=48 characters from `[A-Za-z0-9_-]` starting with an alphanumeric.
///
/// The id ends up in a path (`/run/netns/hutch-<id>`), an nft table name and a log prefix, so
/// nothing else is allowed; in particular no `/`, `.` or whitespace.
pub fn validate_id(id: &str) -> Result<(), NetError> {
    let bad = |reason: &'static str| NetError::InvalidId {
        id: id.chars().take(64).collect(),
        reason,
    };
    if id.is_empty() {
        return Err(bad("empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(bad("longer than 48 characters"));
    }
    if !id.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(bad("must start with a letter or digit"));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(bad("only letters, digits, '-' and '_' are allowed"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn aliases_carry_the_id_and_the_owner() {
        assert_eq!(parse_alias(&alias("sb-1", "")), Some(("sb-1", None)));
        let tag = owner_tag("/var/lib/hutch");
        assert_eq!(tag.len(), 10);
        assert_eq!(
            parse_alias(&alias("sb-1", &tag)),
            Some(("sb-1", Some(tag.as_str())))
        );
        assert_eq!(parse_alias("something else"), None);
        assert!(alias(&"x".repeat(MAX_ID_LEN), &tag).len() < 256);
    }

    #[test]
    fn names_fit_ifnamsiz_and_are_distinct() {
        let mut seen = HashSet::new();
        for i in 0..10_000 {
            let n = Names::new(&format!("sbx-{i}")).unwrap();
            for name in [&n.host_veth, &n.ns_veth, &n.tap, &n.guest_veth] {
                assert!(name.len() <= 15, "{name}");
                assert!(seen.insert(name.clone()), "collision on {name}");
            }
            assert!(is_host_veth_name(&n.host_veth));
            assert!(!is_host_veth_name(&n.ns_veth));
        }
    }

    #[test]
    fn ids_are_validated() {
        for bad in ["", "-x", "a/b", "a.b", "a b", "../x", &"x".repeat(49)] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
        for good in ["a", "sbx-1", "A_b-9", &"x".repeat(48)] {
            validate_id(good).unwrap();
        }
    }
}
