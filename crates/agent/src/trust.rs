//! A sandbox's trust material from the host (`HostMsg::Trust`): the secret broker's CA in the
//! distro's trust store and in a combined bundle, and a git credential helper that answers
//! with placeholders for the hosts a secret is bound to.
//!
//! Everything written was checked first ([`GuestTrust::validate`]): one PEM certificate, and
//! `host password` lines of plain characters. Files are replaced atomically through a fresh
//! temporary file, so a link planted by a guest process is replaced, never followed.

use std::{
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use hutch_protocol::{
    ErrorCode, GuestTrust, OpError, CA_BUNDLE, GIT_CONFIG, GIT_CREDENTIAL_HELPER,
};

use crate::ops::io_error;

/// The distro's bundle (Debian's `update-ca-certificates` output).
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The distro's bundle as it was before any sandbox CA, kept once: a second install (a clone
/// or fork handed out) replaces the CA instead of adding another.
const DISTRO_BUNDLE: &str = "/etc/hutch/ca-bundle.distro.pem";
/// Where `update-ca-certificates` picks up local CAs, so a later run keeps this one.
const LOCAL_CA: &str = "/usr/local/share/ca-certificates/hutch-sandbox.crt";
/// `host password` per line, read by the helper.
const GIT_CREDENTIALS: &str = "/etc/hutch/git-credentials";

/// The credential helper: answers `get` for a listed https host with `x-access-token` and the
/// host's placeholder, and nothing for any other host (git then asks elsewhere).
const HELPER: &str = r#"#!/bin/sh
# git-credential-hutch, installed by the Hutch agent: answers git's credential requests for the
# hosts a secret is bound to with a placeholder; the host's broker puts the real value in.
[ "$1" = get ] || exit 0
host= protocol=
while IFS= read -r line && [ -n "$line" ]; do
    case $line in
        host=*) host=${line#host=} ;;
        protocol=*) protocol=${line#protocol=} ;;
    esac
done
[ "$protocol" = https ] || exit 0
while read -r h password; do
    if [ "$h" = "$host" ]; then
        printf 'username=x-access-token\npassword=%s\n' "$password"
        exit 0
    fi
done < "${HUTCH_GIT_CREDENTIALS:-/etc/hutch/git-credentials}"
"#;

/// Installs `trust` when the agent is the VM's init; as a host process it only validates, so a
/// test never touches the host's trust store.
pub fn apply(trust: &GuestTrust, is_init: bool) -> Result<(), OpError> {
    trust.validate().map_err(|message| OpError {
        code: ErrorCode::InvalidRequest,
        message,
    })?;
    if !is_init {
        return Ok(());
    }
    install(trust, Path::new("/")).map_err(io_error)?;
    tracing::info!(
        git_hosts = trust.git.len(),
        "sandbox CA and git credentials installed"
    );
    Ok(())
}

/// Writes everything beneath `root`.
fn install(trust: &GuestTrust, root: &Path) -> std::io::Result<()> {
    let at = |p: &str| root.join(p.trim_start_matches('/'));
    let system = at(SYSTEM_BUNDLE);
    let distro = at(DISTRO_BUNDLE);
    if !distro.exists() {
        let original = std::fs::read(&system).unwrap_or_default();
        replace(&distro, &original, 0o644)?;
    }
    let mut bundle = std::fs::read(&distro)?;
    if !bundle.is_empty() && !bundle.ends_with(b"\n") {
        bundle.push(b'\n');
    }
    bundle.extend_from_slice(trust.ca_pem.as_bytes());
    replace(&at(LOCAL_CA), trust.ca_pem.as_bytes(), 0o644)?;
    replace(&at(CA_BUNDLE), &bundle, 0o644)?;
    if system.parent().is_some_and(Path::is_dir) {
        // For tools that read the distro's bundle and no variable.
        replace(&system, &bundle, 0o644)?;
    }
    let credentials: String = trust
        .git
        .iter()
        .map(|c| format!("{} {}\n", c.host, c.password))
        .collect();
    replace(&at(GIT_CREDENTIALS), credentials.as_bytes(), 0o644)?;
    replace(&at(GIT_CREDENTIAL_HELPER), HELPER.as_bytes(), 0o755)?;
    replace(&at(GIT_CONFIG), git_config(trust).as_bytes(), 0o644)
}

/// The git configuration `GIT_CONFIG_SYSTEM` names: the distro's own, the helper, and
/// `git@host:` / `ssh://git@host/` rewritten to HTTPS for every bound host on port 443.
fn git_config(trust: &GuestTrust) -> String {
    let mut out = format!(
        "# Written by the Hutch agent for a sandbox with secrets.\n[include]\n\tpath = /etc/gitconfig\n[credential]\n\thelper = {GIT_CREDENTIAL_HELPER}\n"
    );
    for c in trust.git.iter().filter(|c| !c.host.contains(':')) {
        let h = &c.host;
        out.push_str(&format!(
            "[url \"https://{h}/\"]\n\tinsteadOf = git@{h}:\n\tinsteadOf = ssh://git@{h}/\n"
        ));
    }
    out
}

/// Replaces `path` with `bytes` (mode `mode`), making its parents: written to a fresh
/// temporary file (never one that exists, so never through a link), then renamed over it.
fn replace(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp: PathBuf = path.with_extension("hutch-tmp");
    let _ = std::fs::remove_file(&tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use hutch_protocol::GitCredential;

    use super::*;

    fn pem(body: &str) -> String {
        format!("-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n")
    }

    fn trust(body: &str) -> GuestTrust {
        GuestTrust {
            ca_pem: pem(body),
            git: vec![
                GitCredential {
                    host: "git.example.test".into(),
                    password: "hutch_ph_abc".into(),
                },
                GitCredential {
                    host: "other.example.test:8443".into(),
                    password: "hutch_ph_def".into(),
                },
            ],
        }
    }

    #[test]
    fn a_second_install_replaces_the_ca_and_keeps_the_distro_roots() {
        let root = tempfile::tempdir().unwrap();
        let at = |p: &str| root.path().join(p.trim_start_matches('/'));
        std::fs::create_dir_all(at("/etc/ssl/certs")).unwrap();
        let distro = pem("ROOTS");
        std::fs::write(at(SYSTEM_BUNDLE), &distro).unwrap();
        // A guest process plants a link where the bundle goes: replaced, not followed.
        let victim = root.path().join("victim");
        std::fs::write(&victim, "untouched").unwrap();
        std::fs::create_dir_all(at("/etc/hutch")).unwrap();
        std::os::unix::fs::symlink(&victim, at(CA_BUNDLE)).unwrap();
        install(&trust("FIRST"), root.path()).unwrap();
        install(&trust("SECOND"), root.path()).unwrap();
        let expected = format!("{distro}{}", pem("SECOND"));
        for bundle in [CA_BUNDLE, SYSTEM_BUNDLE] {
            assert_eq!(std::fs::read_to_string(at(bundle)).unwrap(), expected);
        }
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        assert_eq!(
            std::fs::read_to_string(at(LOCAL_CA)).unwrap(),
            pem("SECOND")
        );
        let helper = std::fs::metadata(at(GIT_CREDENTIAL_HELPER)).unwrap();
        assert_eq!(helper.permissions().mode() & 0o777, 0o755);
        let config = std::fs::read_to_string(at(GIT_CONFIG)).unwrap();
        assert!(
            config.contains("insteadOf = git@git.example.test:"),
            "{config}"
        );
        assert!(!config.contains("insteadOf = git@other"), "{config}");
        let leftovers: Vec<_> = std::fs::read_dir(at("/etc/hutch"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with("hutch-tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn the_helper_answers_bound_https_hosts_only() {
        #![allow(clippy::disallowed_methods)] // A sync test runs sh.
        let root = tempfile::tempdir().unwrap();
        install(&trust("CA"), root.path()).unwrap();
        let helper = root
            .path()
            .join(GIT_CREDENTIAL_HELPER.trim_start_matches('/'));
        let creds = root.path().join(GIT_CREDENTIALS.trim_start_matches('/'));
        let ask = |action: &str, input: &str| {
            let mut child = std::process::Command::new("sh")
                .arg(&helper)
                .arg(action)
                .env("HUTCH_GIT_CREDENTIALS", &creds)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            match child.stdin.take().unwrap().write_all(input.as_bytes()) {
                Ok(()) => {}
                // `store` and `erase` may exit before reading what git sends them.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                Err(e) => panic!("writing to the helper: {e}"),
            }
            String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
        };
        assert_eq!(
            ask("get", "protocol=https\nhost=git.example.test\n\n"),
            "username=x-access-token\npassword=hutch_ph_abc\n"
        );
        assert_eq!(
            ask("get", "protocol=https\nhost=other.example.test:8443\n\n"),
            "username=x-access-token\npassword=hutch_ph_def\n"
        );
        for input in [
            "protocol=http\nhost=git.example.test\n\n",
            "protocol=https\nhost=evil.example.test\n\n",
            "protocol=https\nhost=other.example.test\n\n",
        ] {
            assert_eq!(ask("get", input), "", "{input:?}");
        }
        assert_eq!(
            ask("store", "protocol=https\nhost=git.example.test\n\n"),
            ""
        );
    }

    #[test]
    fn nothing_unchecked_is_applied() {
        let mut t = trust("CA");
        t.git[0].password = "p\nhost=x".into();
        assert_eq!(
            apply(&t, false).unwrap_err().code,
            ErrorCode::InvalidRequest
        );
        assert!(apply(&trust("CA"), false).is_ok());
    }
}
