//! Shared folders: a host directory mounted into the guest (QEMU only, through virtiofsd).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::SpecError;

/// Most shares one sandbox may have.
pub const MAX_SHARES: usize = 16;
/// Longest host or guest path of a share, in bytes.
pub const MAX_SHARE_PATH: usize = 1024;

/// A host directory shared into the sandbox at `guest_dir`. Read-only unless `writable`. A
/// writable share has no quota of its own yet: the guest can fill the host filesystem that
/// holds it, so give it a directory on a filesystem you can afford to fill.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShareSpec {
    /// The host directory (absolute; it must exist).
    #[schema(max_length = 1024)]
    pub host_dir: String,
    /// Where the guest sees it (absolute, not `/`).
    #[schema(max_length = 1024)]
    pub guest_dir: String,
    /// Whether the guest may write to it (default: read-only).
    #[serde(default)]
    pub writable: bool,
}

impl ShareSpec {
    /// Parses the CLI's `HOST_DIR:GUEST_DIR[:ro|:rw]` (read-only when no mode is given).
    pub fn parse(text: &str) -> Result<ShareSpec, SpecError> {
        let bad = |why: &str| SpecError(format!("share {text:?}: {why}"));
        let mut parts: Vec<&str> = text.split(':').collect();
        let writable = match parts.last().copied() {
            Some("rw") if parts.len() == 3 => true,
            Some("ro") if parts.len() == 3 => false,
            _ if parts.len() == 2 => false,
            _ => return Err(bad("expected HOST_DIR:GUEST_DIR[:ro|:rw]")),
        };
        parts.truncate(2);
        let share = ShareSpec {
            host_dir: parts[0].to_string(),
            guest_dir: parts[1].to_string(),
            writable,
        };
        share.validate()?;
        Ok(share)
    }

    /// Checks the paths' form (absolute, normal, bounded).
    pub fn validate(&self) -> Result<(), SpecError> {
        let bad = |why: String| Err(SpecError(why));
        check_path("host_dir", &self.host_dir)?;
        check_path("guest_dir", &self.guest_dir)?;
        if self.guest_dir == "/" {
            return bad("a share cannot be mounted on the guest's /".into());
        }
        Ok(())
    }
}

/// An absolute path without `.`/`..` components, empty components, control characters or
/// `:`/`,` (which the CLI and QEMU would split on).
fn check_path(what: &str, path: &str) -> Result<(), SpecError> {
    let shown: String = path.chars().take(80).collect();
    let bad = |why: &str| Err(SpecError(format!("share {what} {shown:?}: {why}")));
    if path.len() > MAX_SHARE_PATH {
        return bad(&format!("longer than {MAX_SHARE_PATH} bytes"));
    }
    if !path.starts_with('/') {
        return bad("not an absolute path");
    }
    if path.chars().any(|c| c.is_control() || c == ':' || c == ',') {
        return bad("has a control character, ':' or ','");
    }
    if path == "/" {
        return Ok(());
    }
    let rest = path.strip_prefix('/').unwrap_or(path);
    if rest
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return bad("has an empty, '.' or '..' component");
    }
    Ok(())
}

/// Checks a sandbox's shares: each valid, at most [`MAX_SHARES`], no guest directory twice
/// or inside another share's.
pub(crate) fn check_shares(shares: &[ShareSpec]) -> Result<(), SpecError> {
    if shares.len() > MAX_SHARES {
        return Err(SpecError(format!("more than {MAX_SHARES} shares")));
    }
    for (i, s) in shares.iter().enumerate() {
        s.validate()?;
        for other in &shares[..i] {
            let (a, b) = (&s.guest_dir, &other.guest_dir);
            let nested = |x: &str, y: &str| x == y || x.starts_with(&format!("{y}/"));
            if nested(a, b) || nested(b, a) {
                return Err(SpecError(format!(
                    "shares at {b} and {a} overlap in the guest"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_cli_form() {
        let s = ShareSpec::parse("/srv/data:/data").unwrap();
        assert_eq!(
            (s.host_dir.as_str(), s.guest_dir.as_str()),
            ("/srv/data", "/data")
        );
        assert!(!s.writable, "read-only by default");
        assert!(!ShareSpec::parse("/a:/b:ro").unwrap().writable);
        assert!(ShareSpec::parse("/a:/b:rw").unwrap().writable);
        for bad in [
            "/a",
            "/a:/b:x",
            "/a:/b:rw:1",
            "a:/b",
            "/a:b",
            "/a:/",
            "/a/../etc:/b",
            "/a:/b/./c",
            "/a//b:/c",
            "/a,b:/c",
            "/a:/b\n",
        ] {
            assert!(ShareSpec::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn overlapping_guest_dirs_are_refused() {
        let s = |g: &str| ShareSpec::parse(&format!("/h:{g}")).unwrap();
        assert!(check_shares(&[s("/a"), s("/b"), s("/ab")]).is_ok());
        assert!(check_shares(&[s("/a"), s("/a")]).is_err());
        assert!(check_shares(&[s("/a/b"), s("/a")]).is_err());
        assert!(check_shares(&[]).is_ok());
        let many: Vec<_> = (0..=MAX_SHARES).map(|i| s(&format!("/s{i}"))).collect();
        assert!(check_shares(&many).is_err());
    }
}
