//! Journals outlive their sandboxes; sealed ones older than the retention go.

use std::{
    path::Path,
    time::{Duration, SystemTime},
};

use crate::{writer::KEY_FILE, JournalError, JOURNAL_FILE};

/// Removes every sealed journal under `root` (one directory per sandbox) last written more
/// than `keep` ago: the ids removed. Unsealed journals (a sandbox still alive, or one whose
/// seal a crash prevented) are kept.
pub fn prune(root: &Path, keep: Duration) -> Result<Vec<String>, JournalError> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(JournalError::io(root)(e)),
    };
    let now = SystemTime::now();
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        let written = std::fs::metadata(dir.join(JOURNAL_FILE)).and_then(|m| m.modified());
        let old = written.is_ok_and(|t| now.duration_since(t).unwrap_or_default() > keep);
        if old && !dir.join(KEY_FILE).exists() {
            std::fs::remove_dir_all(&dir).map_err(JournalError::io(&dir))?;
            removed.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    Ok(removed)
}
