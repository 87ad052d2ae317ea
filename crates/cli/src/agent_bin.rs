//! Finding the static `hutch-agent` binary to pack into images.

use std::path::PathBuf;

use crate::error::CliError;

/// `--agent` as given, else `$HUTCH_AGENT`, else the musl build output of a source checkout
/// (a plain `target/<profile>/hutch-agent` there is dynamically linked), else `hutch-agent`
/// next to this executable, else `/usr/lib/hutch/hutch-agent`.
pub fn find(explicit: Option<PathBuf>) -> Result<PathBuf, CliError> {
    if let Some(path) = explicit {
        return Ok(path);
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    candidates.extend(std::env::var_os("HUTCH_AGENT").map(PathBuf::from));
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(PathBuf::from))
    {
        if let (Some(profile), Some(target)) = (dir.file_name(), dir.parent()) {
            candidates.push(
                target
                    .join("x86_64-unknown-linux-musl")
                    .join(profile)
                    .join("hutch-agent"),
            );
            candidates.push(target.join("x86_64-unknown-linux-musl/release/hutch-agent"));
        }
        candidates.push(dir.join("hutch-agent"));
    }
    candidates.push(PathBuf::from("/usr/lib/hutch/hutch-agent"));
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    Err(CliError::AgentMissing {
        searched: candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}
