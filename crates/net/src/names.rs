//! Names of every kernel object a sandbox's network owns, all derived from the sandbox id.
//!
//! Interface names are limited to 15 bytes (`IFNAMSIZ - 1`), so they carry a 40-bit hash of the
//! id; the id itself is carried by the netns name, the nft table name (a network handed out from
//! a spare keeps the spare's table, inside the sandbox's namespace) and the host veth's `ifalias`
//! (`hutch:<id>`), which is how [`crate::Network::list_owned`] maps objects back to ids.

use sha2::{Digest, Sha256};

use crate::NetError;

/// Prefix of every network namespace Hutch creates (`/run/netns/hutch-<id>`).
pub const NETNS_PREFIX: &str = "hutch-";
/// Prefix of every nft table Hutch creates (host side and inside sandbox namespaces).
pub const TABLE_PREFIX: &str = "hutch-";
/// Prefix of the `ifalias` tag on host-side links.
pub const ALIAS_PREFIX: &str = "hutch:";

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
        Ok(Names::with(
            format!("{NETNS_PREFIX}{id}"),
            &hash10(id),
            format!("{TABLE_PREFIX}{id}"),
            format!("{ALIAS_PREFIX}{id}"),
        ))
    }

    /// Names of a spare network (made ahead, handed out to a sandbox by renaming; see
    /// [`crate::NetConfig::spares`]) with the token `h` (10 hex digits): namespace
    /// `hutch.spare-<h>` (outside [`NETNS_PREFIX`], so it is no sandbox's) and links as for an
    /// id hashing to `h`; [`Names::alias`] carries no owner (see [`spare_alias`]).
    pub fn spare(h: &str) -> Names {
        Names::with(
            format!("{SPARE_NETNS_PREFIX}{h}"),
            h,
            format!("{TABLE_PREFIX}spare-{h}"),
            spare_alias(h, ""),
        )
    }

    fn with(netns: String, h: &str, table: String, alias: String) -> Names {
        Names {
            guest_netns: format!("{netns}.guest"),
            netns,
            host_veth: format!("hv{h}h"),
            ns_veth: format!("hv{h}g"),
            tap: format!("ht{h}"),
            tun: format!("hw{h}"),
            guest_veth: format!("ht{h}p"),
            table,
            alias,
        }
    }
}

/// Prefix of a spare network's namespace (`/run/netns/hutch.spare-<token>`).
pub const SPARE_NETNS_PREFIX: &str = "hutch.spare-";
/// Prefix of the `ifalias` tag on a spare network's host veth.
pub const SPARE_ALIAS_PREFIX: &str = "hutch.spare:";

/// The `ifalias` of a spare network's host veth: `hutch.spare:<token>`, or
/// `hutch.spare:<token>@<owner>`.
pub fn spare_alias(token: &str, owner: &str) -> String {
    tagged(SPARE_ALIAS_PREFIX, token, owner)
}

/// `(token, owner)` from a spare network's host veth alias (see [`spare_alias`]); `None` for
/// another alias, or a token that is not 10 hex digits (it names a path).
pub fn parse_spare_alias(alias: &str) -> Option<(&str, Option<&str>)> {
    parse_tagged(SPARE_ALIAS_PREFIX, alias).filter(|(token, _)| is_hash10(token))
}

fn tagged(prefix: &str, what: &str, owner: &str) -> String {
    if owner.is_empty() {
        format!("{prefix}{what}")
    } else {
        format!("{prefix}{what}@{owner}")
    }
}

fn parse_tagged<'a>(prefix: &str, alias: &'a str) -> Option<(&'a str, Option<&'a str>)> {
    let rest = alias.strip_prefix(prefix)?;
    Some(match rest.split_once('@') {
        Some((id, owner)) => (id, Some(owner)),
        None => (rest, None),
    })
}

/// The `ifalias` of a sandbox's host veth: `hutch:<id>`, or `hutch:<id>@<owner>` for a
/// [`crate::NetConfig::owner`].
pub fn alias(id: &str, owner: &str) -> String {
    tagged(ALIAS_PREFIX, id, owner)
}

/// `(sandbox id, owner)` from a host veth's alias (see [`alias`]); `None` for another alias.
pub fn parse_alias(alias: &str) -> Option<(&str, Option<&str>)> {
    parse_tagged(ALIAS_PREFIX, alias)
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

/// True for what [`hash10`] returns: 10 lowercase hex digits.
fn is_hash10(s: &str) -> bool {
    s.len() == 10
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// True for a host link name Hutch could have made (`hv<10 hex>h`).
pub fn is_host_veth_name(name: &str) -> bool {
    name.len() == 13 && name.starts_with("hv") && name.ends_with('h') && is_hash10(&name[2..12])
}

/// Accepts the ids [`hutch_types::check_host_id`] does (the rule the sandbox's VM holds its
/// id to as well): the id ends up in a path (`/run/netns/hutch-<id>`), an nft table name and
/// a log prefix, so no `/`, `.` or whitespace.
pub fn validate_id(id: &str) -> Result<(), NetError> {
    hutch_types::check_host_id(id).map_err(|reason| NetError::InvalidId {
        id: id.chars().take(64).collect(),
        reason,
    })
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
        assert_eq!(parse_alias(&spare_alias("0123456789", &tag)), None);
        assert_eq!(
            parse_spare_alias(&spare_alias("0123456789", &tag)),
            Some(("0123456789", Some(tag.as_str())))
        );
        assert_eq!(parse_spare_alias(&spare_alias("../../etc/x", "")), None);
        assert!(alias(&"x".repeat(hutch_types::MAX_HOST_ID_LEN), &tag).len() < 256);
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
        for bad in [
            "",
            "-x",
            "a/b",
            "a.b",
            "a b",
            "../x",
            "A_b-9",
            &"x".repeat(49),
        ] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
        for good in ["a", "sbx-1", "a-b-9", &"x".repeat(48)] {
            validate_id(good).unwrap();
        }
    }
}
