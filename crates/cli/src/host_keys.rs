//! The host keys `hutch task apply` checks attestations against, so that a daemon cannot
//! vouch for a changeset with a key of its choosing: `--host-key` when given, else the key
//! pinned for that daemon the first time a task of it was applied (trust on first use). Pins
//! live in `$HUTCH_HOST_KEYS`, by default `$XDG_CONFIG_HOME/hutch/host-keys`
//! (`~/.config/hutch/host-keys`): one `DAEMON KEY` line per daemon, the daemon named by its
//! address (`tcp:HOST:PORT`, or `unix:` and its socket's path), the key as 64 hex digits.

use std::{
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use crate::error::CliError;

/// A host key given as hex, or as a file holding it (`--host-key`).
pub fn parse(given: &str) -> Result<[u8; 32], CliError> {
    let text = match std::fs::read_to_string(given) {
        Ok(t) => t,
        Err(_) => given.to_string(),
    };
    from_hex(text.trim()).ok_or_else(|| {
        CliError::Usage("--host-key must be 64 hex digits (or a file of them)".into())
    })
}

fn from_hex(text: &str) -> Option<[u8; 32]> {
    hex::decode(text).ok()?.try_into().ok()
}

/// Where pins are kept: `$HUTCH_HOST_KEYS`, else `$XDG_CONFIG_HOME/hutch/host-keys`, else
/// `$HOME/.config/hutch/host-keys`.
pub fn default_file() -> Option<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(file) = var("HUTCH_HOST_KEYS") {
        return Some(file.into());
    }
    let config = var("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|h| Path::new(&h).join(".config")))?;
    Some(config.join("hutch").join("host-keys"))
}

/// The host keys pinned in one file.
#[derive(Debug)]
pub struct Pins {
    file: PathBuf,
}

/// Where the key to check with came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pinned {
    /// Pinned for the daemon before.
    Known([u8; 32]),
    /// Not pinned yet: the key the daemon names, to pin once it has been checked.
    New([u8; 32]),
}

impl Pins {
    /// The pins in `file` (which need not exist yet).
    pub fn new(file: PathBuf) -> Pins {
        Pins { file }
    }

    /// The file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The key pinned for `daemon`, else `named` (what the daemon says its key is) as new.
    pub fn lookup(&self, daemon: &str, named: [u8; 32]) -> Result<Pinned, CliError> {
        let text = match std::fs::read_to_string(&self.file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(self.error("reading", &e)),
        };
        for line in text.lines() {
            let Some((name, key)) = line.trim().rsplit_once(' ') else {
                continue;
            };
            if name.trim() == daemon {
                let key = from_hex(key).ok_or_else(|| {
                    CliError::Usage(format!(
                        "{}: the key pinned for {daemon} is not 64 hex digits",
                        self.file.display()
                    ))
                })?;
                return Ok(Pinned::Known(key));
            }
        }
        Ok(Pinned::New(named))
    }

    /// Pins `key` for `daemon` (appended; the file and its directory made private).
    pub fn pin(&self, daemon: &str, key: &[u8; 32]) -> Result<(), CliError> {
        if let Some(dir) = self.file.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| self.error("creating the directory of", &e))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.file)
            .map_err(|e| self.error("opening", &e))?;
        writeln!(file, "{daemon} {}", hex::encode(key)).map_err(|e| self.error("writing", &e))
    }

    fn error(&self, what: &str, e: &std::io::Error) -> CliError {
        CliError::Usage(format!(
            "{what} the pinned host keys {}: {e}",
            self.file.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_new_until_pinned_then_known_per_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let pins = Pins::new(dir.path().join("conf/hutch/host-keys"));
        let (a, b) = ([1u8; 32], [2u8; 32]);
        assert_eq!(pins.lookup("tcp:h:1", a).unwrap(), Pinned::New(a));
        pins.pin("tcp:h:1", &a).unwrap();
        pins.pin("unix:/run/x y/hutch.sock", &b).unwrap();
        // The daemon now names another key: the pinned one is what counts.
        assert_eq!(pins.lookup("tcp:h:1", b).unwrap(), Pinned::Known(a));
        assert_eq!(
            pins.lookup("unix:/run/x y/hutch.sock", a).unwrap(),
            Pinned::Known(b)
        );
        assert_eq!(pins.lookup("tcp:h:2", b).unwrap(), Pinned::New(b));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(pins.file()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(pins.file(), "tcp:h:1 nothex\n").unwrap();
        assert!(pins.lookup("tcp:h:1", a).is_err());
    }

    #[test]
    fn a_given_key_is_hex_or_a_file_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("host.pub");
        std::fs::write(&file, format!("{}\n", "ab".repeat(32))).unwrap();
        assert_eq!(parse(file.to_str().unwrap()).unwrap(), [0xab; 32]);
        assert_eq!(parse(&"cd".repeat(32)).unwrap(), [0xcd; 32]);
        assert!(parse("abcd").is_err());
    }
}
