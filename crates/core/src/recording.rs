//! Session recordings of execs, kept beside their sandbox's journal: started with the exec's
//! [`ExecTap`](crate::audit::ExecTap), fed its output (and, on a terminal, its input and
//! resizes), named by digest in its `exec.end` record, and found again by the exec's id.

use hutch_journal::{
    attr, cast::Source, recording_path, Event, JournalError, Record, Recorder, Summary,
};
use std::collections::BTreeMap;

use hutch_protocol::TtySize;
use hutch_types::SandboxInfo;
use serde_json::Value;

use crate::{
    audit::{AuditQuery, Journals, REDACT_MIN_LEN},
    blocking::off_worker,
};

/// What asks for the latest recorded exec of a sandbox.
pub const LATEST: &str = "latest";

/// One exec's recording as found through its journal.
#[derive(Debug, Clone)]
pub struct Recording {
    /// The exec's id (`hutch.exec.id`).
    pub exec_id: String,
    /// BLAKE3 of the file (hex), as its `exec.end` record names it.
    pub digest: String,
    /// The asciicast v2 file.
    pub cast: Vec<u8>,
}

impl Journals {
    /// The same journals, each exec's recording keeping at most `cap` bytes of data.
    pub fn with_recording_cap(mut self, cap: u64) -> Journals {
        self.recordings = self.recordings.with_cap(cap);
        self
    }

    /// Starts recording an exec of the sandbox `info` (with a terminal of `tty`'s size, if
    /// any). What the journal redacts from records is replaced in the recording too: the
    /// host's secret values, the sandbox's own, and the exec's `env` values (those of 8 bytes
    /// or more: shorter ones are too common to take out of a terminal's output).
    pub fn recorder(
        &self,
        info: &SandboxInfo,
        tty: Option<TtySize>,
        env: &BTreeMap<String, String>,
    ) -> Recorder {
        let mut redactor = self.redactor(Some(info));
        redactor.extend(env.values().filter(|v| v.len() >= REDACT_MIN_LEN).cloned());
        self.recordings
            .start(&self.dir(&info.id), tty.map(|t| (t.cols, t.rows)), redactor)
    }

    /// The recording of `sandbox`'s exec `exec`: its id, the seq of its `exec.start` or
    /// `exec.end` record, or [`LATEST`]; `None` when the journal names no such recording.
    pub async fn recording(
        &self,
        sandbox: &str,
        exec: &str,
    ) -> Result<Option<Recording>, JournalError> {
        let query = AuditQuery {
            from: 0,
            kind: Some("exec".into()),
        };
        let records = self.read(sandbox, query).await?.records;
        let Some((exec_id, digest)) = find(&records, exec) else {
            return Ok(None);
        };
        let Some(path) = recording_path(&self.dir(sandbox), &digest) else {
            return Ok(None);
        };
        self.recordings.sync().await?;
        let expected = digest.clone();
        let cast = off_worker(move || {
            let cast = std::fs::read(&path).map_err(|source| JournalError::Io {
                path: path.clone(),
                source,
            })?;
            if blake3::hash(&cast).to_hex().as_str() != expected {
                return Err(JournalError::Altered(path));
            }
            Ok(cast)
        })
        .await?;
        Ok(Some(Recording {
            exec_id,
            digest,
            cast,
        }))
    }
}

/// The exec id and recording digest of the `exec.end` record `exec` names among `records`.
fn find(records: &[Record], exec: &str) -> Option<(String, String)> {
    let text = |r: &Record, key: &str| r.attrs.get(key).and_then(Value::as_str).map(String::from);
    let recorded =
        |r: &&Record| r.kind == "exec.end" && r.attrs.contains_key(attr::RECORDING_DIGEST);
    let end = if exec == LATEST {
        records.iter().rev().find(recorded)
    } else {
        let by_id = |id: &str| {
            records
                .iter()
                .filter(recorded)
                .find(|r| text(r, attr::EXEC_ID).as_deref() == Some(id))
        };
        by_id(exec).or_else(|| {
            let seq: u64 = exec.parse().ok()?;
            let named = records.iter().find(|r| r.seq == seq)?;
            by_id(&text(named, attr::EXEC_ID)?)
        })
    }?;
    Some((
        text(end, attr::EXEC_ID)?,
        text(end, attr::RECORDING_DIGEST)?,
    ))
}

/// The recording's source for output stream `n` (0 stdout, 1 stderr).
pub(crate) fn source(n: usize) -> Source {
    if n == 0 {
        Source::Stdout
    } else {
        Source::Stderr
    }
}

/// `event` with what the recording `summary` says: its digest, size, and whether it was cut.
pub(crate) fn summary_attrs(event: Event, summary: &Summary) -> Event {
    event
        .attr(attr::RECORDING_DIGEST, summary.digest.clone())
        .attr(attr::RECORDING_BYTES, summary.bytes)
        .attr(attr::RECORDING_TRUNCATED, summary.truncated)
        .attr(attr::RECORDING_DROPPED, summary.dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, kind: &str, attrs: &[(&str, &str)]) -> Record {
        Record {
            v: 1,
            seq,
            prev: String::new(),
            time: String::new(),
            mono_ns: 0,
            sandbox: "sb-1".into(),
            kind: kind.into(),
            actor: None,
            attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), Value::from(*v)))
                .collect(),
        }
    }

    #[test]
    fn an_exec_is_found_by_id_by_either_records_seq_or_as_the_latest() {
        let d1 = "1".repeat(64);
        let d2 = "2".repeat(64);
        let records = [
            record(3, "exec.start", &[(attr::EXEC_ID, "aaa")]),
            record(
                4,
                "exec.end",
                &[(attr::EXEC_ID, "aaa"), (attr::RECORDING_DIGEST, &d1)],
            ),
            // An exec id of digits only is still an id first.
            record(5, "exec.start", &[(attr::EXEC_ID, "3")]),
            record(
                7,
                "exec.end",
                &[(attr::EXEC_ID, "3"), (attr::RECORDING_DIGEST, &d2)],
            ),
            record(8, "exec.start", &[(attr::EXEC_ID, "ccc")]),
        ];
        let one = Some(("aaa".to_string(), d1.clone()));
        let two = Some(("3".to_string(), d2.clone()));
        assert_eq!(find(&records, "aaa"), one);
        assert_eq!(find(&records, "4"), one);
        assert_eq!(find(&records, "3"), two);
        assert_eq!(find(&records, "5"), two);
        assert_eq!(find(&records, LATEST), two);
        // Still running (no end record yet), or unknown.
        assert_eq!(find(&records, "ccc"), None);
        assert_eq!(find(&records, "8"), None);
        assert_eq!(find(&records, "zzz"), None);
        assert_eq!(find(&[], LATEST), None);
    }
}
