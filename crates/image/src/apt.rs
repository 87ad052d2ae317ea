//! The Debian mirror (from the spec or the host's apt sources) and a private apt configuration
//! that downloads packages without touching the host's apt state.

use std::path::{Path, PathBuf};
use std::process::Command;

use indicatif::ProgressBar;

use crate::tools::{self, DEBIAN_KEYRING};
use crate::ImageError;

/// Checks a mirror URL given by the user and normalizes it (no trailing `/`).
pub(crate) fn check_mirror(url: &str) -> Result<String, ImageError> {
    let ok_scheme = ["http://", "https://", "file:/"]
        .iter()
        .any(|s| url.starts_with(s));
    if !ok_scheme || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ImageError::InvalidSpec {
            field: "mirror",
            value: url.to_owned(),
            reason: "expected an http://, https:// or file:/ URL",
        });
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// Finds a Debian archive mirror in the host's apt sources under `etc_apt` (normally
/// `/etc/apt`): deb822 `sources.list.d/*.sources` and one-line `sources.list` /
/// `sources.list.d/*.list` files.
pub(crate) fn host_mirror(etc_apt: &Path) -> Result<String, ImageError> {
    let mut files = vec![etc_apt.join("sources.list")];
    if let Ok(dir) = std::fs::read_dir(etc_apt.join("sources.list.d")) {
        let mut more: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let uris = match file.extension().and_then(|e| e.to_str()) {
            Some("sources") => deb822_uris(&text),
            _ => one_line_uris(&text),
        };
        if let Some(uri) = uris.into_iter().find(|u| is_debian_archive(u)) {
            tracing::debug!(file = %file.display(), mirror = %uri, "mirror from host apt sources");
            return Ok(uri.trim_end_matches('/').to_owned());
        }
    }
    Err(ImageError::NoMirror)
}

/// A URI of the main Debian archive: http(s), path ending in `/debian` (not `-security`,
/// `-ports`, snapshots and the like).
fn is_debian_archive(uri: &str) -> bool {
    (uri.starts_with("http://") || uri.starts_with("https://"))
        && uri.trim_end_matches('/').ends_with("/debian")
}

/// `URIs:` of the enabled `deb` stanzas of a deb822 sources file.
fn deb822_uris(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    for stanza in lines.split(|l| l.trim().is_empty()) {
        let field = |name: &str| {
            stanza.iter().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (!l.starts_with([' ', '\t']) && k.trim().eq_ignore_ascii_case(name))
                    .then(|| v.trim().to_owned())
            })
        };
        let is_deb = field("Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
        let enabled = !matches!(field("Enabled"), Some(e) if e.eq_ignore_ascii_case("no"));
        if is_deb && enabled {
            if let Some(uris) = field("URIs") {
                out.extend(uris.split_whitespace().map(str::to_owned));
            }
        }
    }
    out
}

/// URIs of the `deb` lines of a one-line-style sources file.
fn one_line_uris(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line.strip_prefix("deb ").or(line.strip_prefix("deb\t")) else {
            continue;
        };
        let mut rest = rest.trim_start();
        if rest.starts_with('[') {
            match rest.find(']') {
                Some(end) => rest = rest[end + 1..].trim_start(),
                None => continue,
            }
        }
        if let Some(uri) = rest.split_whitespace().next() {
            out.push(uri.to_owned());
        }
    }
    out
}

/// apt with its own sources list, state, cache and lists under one directory.
pub(crate) struct PrivateApt {
    root: PathBuf,
}

impl PrivateApt {
    /// Lays out a private apt tree in `root` (which must exist) for `mirror` and `suite`.
    pub(crate) fn new(root: &Path, mirror: &str, suite: &str) -> Result<Self, ImageError> {
        tools::require(tools::KERNEL_TOOLS)?;
        tools::require_keyring()?;
        for d in [
            "etc/sources.list.d",
            "etc/preferences.d",
            "etc/trusted.gpg.d",
            "state/lists/partial",
            "cache/archives/partial",
        ] {
            let d = root.join(d);
            std::fs::create_dir_all(&d).map_err(ImageError::io("create", d))?;
        }
        let list = root.join("etc/sources.list");
        let line = format!(
            "deb [arch=amd64 signed-by={DEBIAN_KEYRING} target=Packages] {mirror} {suite} main\n"
        );
        std::fs::write(&list, line).map_err(ImageError::io("write", &list))?;
        let status = root.join("state/status");
        std::fs::write(&status, "").map_err(ImageError::io("write", &status))?;
        Ok(Self { root: root.into() })
    }

    /// `apt-get` or `apt-cache` with the private configuration.
    fn command(&self, tool: &str) -> Result<Command, ImageError> {
        let r = &self.root;
        let mut cmd = tools::command(tool)?;
        let opts = [
            format!(
                "Dir::Etc::SourceList={}",
                r.join("etc/sources.list").display()
            ),
            format!(
                "Dir::Etc::SourceParts={}",
                r.join("etc/sources.list.d").display()
            ),
            format!(
                "Dir::Etc::Preferences={}",
                r.join("etc/preferences").display()
            ),
            format!(
                "Dir::Etc::PreferencesParts={}",
                r.join("etc/preferences.d").display()
            ),
            format!("Dir::Etc::Trusted={}", r.join("etc/trusted.gpg").display()),
            format!(
                "Dir::Etc::TrustedParts={}",
                r.join("etc/trusted.gpg.d").display()
            ),
            format!("Dir::State={}", r.join("state").display()),
            format!("Dir::State::Lists={}", r.join("state/lists").display()),
            format!("Dir::State::status={}", r.join("state/status").display()),
            format!("Dir::Cache={}", r.join("cache").display()),
            format!(
                "Dir::Cache::archives={}",
                r.join("cache/archives").display()
            ),
            "Debug::NoLocking=1".into(),
            "APT::Architecture=amd64".into(),
            "APT::Architectures=amd64".into(),
            "Acquire::Languages=none".into(),
            "APT::Get::List-Cleanup=0".into(),
            // Downloads go to a root-owned temp dir the `_apt` sandbox user cannot write.
            "APT::Sandbox::User=root".into(),
        ];
        for o in opts {
            cmd.arg("-o").arg(o);
        }
        cmd.current_dir(r);
        Ok(cmd)
    }

    /// `apt-get update`.
    pub(crate) fn update(&self, bar: &ProgressBar) -> Result<(), ImageError> {
        let mut cmd = self.command("apt-get")?;
        cmd.args(["-q", "update"]);
        tools::run(cmd, bar).map(drop)
    }

    /// The `Depends:` package names of the candidate version of `package` (first alternative of
    /// each, without version constraints).
    pub(crate) fn depends(
        &self,
        package: &str,
        bar: &ProgressBar,
    ) -> Result<Vec<String>, ImageError> {
        let mut cmd = self.command("apt-cache")?;
        cmd.args(["show", "--no-all-versions", package]);
        let out = tools::run(cmd, bar)?;
        Ok(parse_depends(&out))
    }

    /// `apt-get download package` into `dir`; returns the path of the `.deb`.
    pub(crate) fn download(
        &self,
        package: &str,
        dir: &Path,
        bar: &ProgressBar,
    ) -> Result<PathBuf, ImageError> {
        let mut cmd = self.command("apt-get")?;
        cmd.args(["-q", "download", package]).current_dir(dir);
        tools::run(cmd, bar)?;
        let prefix = format!("{package}_");
        std::fs::read_dir(dir)
            .map_err(ImageError::io("read", dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
            })
            .ok_or_else(|| ImageError::Kernel {
                package: package.to_owned(),
                reason: "apt-get download produced no .deb".into(),
            })
    }
}

/// Package names from the `Depends:` field of the first stanza of `apt-cache show` output.
fn parse_depends(show: &str) -> Vec<String> {
    let stanza = show.split("\n\n").next().unwrap_or("");
    let mut field = None;
    for line in stanza.lines() {
        if let Some(v) = line.strip_prefix("Depends:") {
            field = Some(v.to_owned());
        } else if let (Some(f), true) = (field.as_mut(), line.starts_with([' ', '\t'])) {
            f.push(' ');
            f.push_str(line.trim());
        } else if field.is_some() {
            break;
        }
    }
    field
        .unwrap_or_default()
        .split(',')
        .filter_map(|dep| {
            let first = dep.split('|').next()?;
            let name = first.split(['(', ' ']).find(|s| !s.is_empty())?;
            Some(name.split(':').next().unwrap_or(name).to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn etc(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sources.list.d")).unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    #[test]
    fn deb822_sources() {
        let dir = etc(&[(
            "sources.list.d/debian.sources",
            "Types: deb\n\
             # http://snapshot.example.org/archive/debian/20250520T000000Z\n\
             URIs: http://mirror.example.net/debian/\n\
             Suites: bookworm bookworm-updates\n\
             Components: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\
             \n\
             Types: deb\n\
             URIs: http://mirror.example.net/debian-security\n\
             Suites: bookworm-security\n",
        )]);
        assert_eq!(
            host_mirror(dir.path()).unwrap(),
            "http://mirror.example.net/debian"
        );
    }

    #[test]
    fn deb822_skips_security_src_and_disabled() {
        let dir = etc(&[(
            "sources.list.d/a.sources",
            "Types: deb\nURIs: https://sec.example.org/debian-security\nSuites: bookworm-security\n\n\
             Types: deb-src\nURIs: https://src.example.org/debian\nSuites: bookworm\n\n\
             Enabled: no\nTypes: deb\nURIs: https://off.example.org/debian\nSuites: bookworm\n\n\
             Types: deb deb-src\nURIs: https://a.example.org/ubuntu https://b.example.org/debian\n\
             Suites: bookworm\n",
        )]);
        assert_eq!(
            host_mirror(dir.path()).unwrap(),
            "https://b.example.org/debian"
        );
    }

    #[test]
    fn one_line_sources() {
        let dir = etc(&[(
            "sources.list",
            "# deb http://commented.example.org/debian bookworm main\n\
             deb-src http://src.example.org/debian bookworm main\n\
             deb http://security.example.org/debian-security bookworm-security main\n\
             deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://one.example.org/debian bookworm main contrib\n",
        )]);
        assert_eq!(
            host_mirror(dir.path()).unwrap(),
            "http://one.example.org/debian"
        );
    }

    #[test]
    fn no_debian_mirror() {
        let dir = etc(&[
            (
                "sources.list",
                "deb http://archive.example.com/ubuntu noble main\n",
            ),
            (
                "sources.list.d/x.sources",
                "Types: deb\nURIs: http://archive.example.com/ubuntu\nSuites: noble\n",
            ),
        ]);
        let err = host_mirror(dir.path()).unwrap_err();
        assert!(matches!(err, ImageError::NoMirror));
        assert!(err.to_string().contains("--mirror URL"));
    }

    #[test]
    fn mirror_validation() {
        assert_eq!(
            check_mirror("http://m.example.org/debian/").unwrap(),
            "http://m.example.org/debian"
        );
        assert!(check_mirror("ftp://m.example.org/debian").is_err());
        assert!(check_mirror("http://m.example.org/debian bookworm").is_err());
    }

    #[test]
    fn depends_field() {
        let show = "Package: linux-image-cloud-amd64\n\
                    Version: 6.1.176-1\n\
                    Depends: linux-image-6.1.0-50-cloud-amd64 (= 6.1.176-1),\n foo:any | bar\n\
                    Description: x\n\n\
                    Package: linux-image-cloud-amd64\nDepends: old\n";
        assert_eq!(
            parse_depends(show),
            ["linux-image-6.1.0-50-cloud-amd64", "foo"]
        );
        assert!(parse_depends("Package: x\n").is_empty());
    }
}
