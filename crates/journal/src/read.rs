//! Reading a journal back: its complete lines as records.

use std::path::Path;

use crate::{JournalError, Record};

/// The journal's lines, in `<dir>/journal.jsonl`.
pub const JOURNAL_FILE: &str = "journal.jsonl";

/// The records of the journal in `dir` with `seq` at or above `from`, in order; a torn last
/// line and lines that are not records are skipped (`verify` names them).
pub fn read_records(dir: &Path, from: u64) -> Result<Vec<Record>, JournalError> {
    let path = dir.join(JOURNAL_FILE);
    let bytes = std::fs::read(&path).map_err(JournalError::io(&path))?;
    Ok(complete_lines(&bytes)
        .filter_map(|l| serde_json::from_slice::<Record>(l).ok())
        .filter(|r| r.seq >= from)
        .collect())
}

/// The newline-terminated lines of `bytes` (without their newlines).
pub(crate) fn complete_lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    bytes[..complete]
        .split(|&b| b == b'\n')
        .take(bytes[..complete].iter().filter(|&&b| b == b'\n').count())
}
