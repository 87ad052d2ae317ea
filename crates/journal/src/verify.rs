//! Verifying a journal, online or offline: given only its files and the host's public key,
//! every edit, insertion, deletion, reordering, truncation (up to the last checkpoint) and
//! re-hash without the key is found and named; a journal without a seal is "unsealed".

use std::{collections::HashMap, path::Path};

use serde::{Deserialize, Serialize};

use crate::{
    attr,
    chain::{self, Hash},
    key, kinds,
    note::{self, Checkpoint},
    read::complete_lines,
    JournalError, Record, CHECKPOINT_FILE, JOURNAL_FILE, VERSION,
};

/// The verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Intact and sealed: the sandbox's whole record.
    Ok,
    /// Intact up to its last checkpoint, but never sealed (the sandbox lives, or its daemon
    /// stopped before the seal): more may have happened than it shows.
    Unsealed,
    /// Something below was found.
    Failed,
}

/// One thing wrong with a journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "failure", rename_all = "snake_case")]
pub enum Failure {
    /// The first record's key is not certified by the host key.
    Certificate {
        /// Why.
        reason: String,
    },
    /// A line is no record (edited beyond parsing).
    Malformed {
        /// Its line number, from 0.
        line: u64,
    },
    /// A record's bytes changed after it was written: the next one names another hash.
    Edited {
        /// The changed record.
        seq: u64,
    },
    /// A line repeats a record's seq.
    Inserted {
        /// Its line number, from 0.
        line: u64,
        /// The seq it repeats.
        seq: u64,
    },
    /// Records are missing.
    Deleted {
        /// The first missing seq.
        first: u64,
        /// The last missing seq.
        last: u64,
    },
    /// A record stands after a later one.
    Reordered {
        /// Its line number, from 0.
        line: u64,
        /// Its seq.
        seq: u64,
    },
    /// The journal ends before its latest checkpoint.
    Truncated {
        /// Records present.
        records: u64,
        /// Records the checkpoint covers.
        checkpoint: u64,
    },
    /// The chain holds together but a checkpoint signed a different head: lines were
    /// rewritten and re-hashed without the key.
    Rehashed {
        /// How many records the contradicted checkpoint covers.
        checkpoint: u64,
    },
    /// A checkpoint is not signed by the sandbox's key.
    BadSignature {
        /// The checkpoint's record (or the size it claims, for the `checkpoint` file).
        seq: u64,
    },
    /// A record follows the seal's checkpoint.
    AfterSeal {
        /// Its seq.
        seq: u64,
    },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Certificate { reason } => {
                write!(f, "not certified: {reason}")
            }
            Failure::Malformed { line } => write!(f, "edited: line {line} is not a record"),
            Failure::Edited { seq } => write!(
                f,
                "edited: record {seq} changed after it was written (record {} names another hash)",
                seq + 1
            ),
            Failure::Inserted { line, seq } => {
                write!(f, "inserted: line {line} repeats record {seq}")
            }
            Failure::Deleted { first, last } if first == last => {
                write!(f, "deleted: record {first} is missing")
            }
            Failure::Deleted { first, last } => {
                write!(f, "deleted: records {first} to {last} are missing")
            }
            Failure::Reordered { line, seq } => {
                write!(f, "reordered: record {seq} stands at line {line}, after a later one")
            }
            Failure::Truncated {
                records,
                checkpoint,
            } => write!(
                f,
                "truncated: {records} records, but a checkpoint covers {checkpoint} and is itself record {checkpoint}"
            ),
            Failure::Rehashed { checkpoint } => write!(
                f,
                "re-hashed: the chain holds together but the signed checkpoint over {checkpoint} records names another head (rewritten without the key)"
            ),
            Failure::BadSignature { seq } => {
                write!(f, "forged: checkpoint {seq} is not signed by the sandbox key")
            }
            Failure::AfterSeal { seq } => write!(f, "appended after the seal: record {seq}"),
        }
    }
}

/// What verifying a journal found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Report {
    /// The verdict.
    pub status: Status,
    /// The sandbox the journal is of.
    pub sandbox: String,
    /// Complete lines.
    pub records: u64,
    /// Records covered by the last checkpoint that verified (what is proven).
    pub checkpointed: u64,
    /// Whether a seal ends it.
    pub sealed: bool,
    /// Bytes of an incomplete last line (a crash mid-write; cut off when the journal is
    /// continued).
    pub torn_bytes: u64,
    /// The sandbox's identity key (hex), as certified.
    pub public_key: Option<String>,
    /// Everything wrong, in the order found.
    pub failures: Vec<Failure>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = match self.status {
            Status::Ok => "ok",
            Status::Unsealed => "unsealed",
            Status::Failed => "FAILED",
        };
        write!(
            f,
            "{verdict}: journal of {}: {} records, {} checkpointed, {}",
            self.sandbox,
            self.records,
            self.checkpointed,
            if self.sealed { "sealed" } else { "not sealed" }
        )?;
        if self.torn_bytes > 0 {
            write!(f, ", torn tail of {} bytes", self.torn_bytes)?;
        }
        for failure in &self.failures {
            write!(f, "\n  {failure}")?;
        }
        Ok(())
    }
}

/// Verifies the journal in `dir` against the host key `host`.
pub fn verify_dir(dir: &Path, host: &[u8; 32]) -> Result<Report, JournalError> {
    let path = dir.join(JOURNAL_FILE);
    let bytes = std::fs::read(&path).map_err(JournalError::io(&path))?;
    let latest = match std::fs::read_to_string(dir.join(CHECKPOINT_FILE)) {
        Ok(note) => Some(note),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(JournalError::io(dir.join(CHECKPOINT_FILE))(e)),
    };
    Ok(verify_bytes(&bytes, latest.as_deref(), host))
}

/// The journal's lines, parsed and hashed.
struct Lines {
    records: Vec<Option<Record>>,
    hashes: Vec<Hash>,
}

impl Lines {
    /// The hash a checkpoint over `size` records must name.
    fn head(&self, size: u64, sandbox: &str) -> Option<Hash> {
        match size {
            0 => Some(chain::genesis(sandbox)),
            n => self.hashes.get(n as usize - 1).copied(),
        }
    }
}

/// Verifies `journal` (the file's bytes) with `latest` (the `checkpoint` file's note, if any)
/// against the host key `host`.
pub fn verify_bytes(journal: &[u8], latest: Option<&str>, host: &[u8; 32]) -> Report {
    let raw: Vec<&[u8]> = complete_lines(journal).collect();
    let complete: usize = raw.iter().map(|l| l.len() + 1).sum();
    let lines = Lines {
        records: raw
            .iter()
            .map(|l| serde_json::from_slice::<Record>(l).ok())
            .collect(),
        hashes: raw.iter().map(|l| chain::line_hash(l)).collect(),
    };
    let sandbox = lines
        .records
        .iter()
        .flatten()
        .next()
        .map(|r| r.sandbox.clone())
        .unwrap_or_default();
    let mut report = Report {
        status: Status::Failed,
        sandbox,
        records: raw.len() as u64,
        checkpointed: 0,
        sealed: false,
        torn_bytes: (journal.len() - complete) as u64,
        public_key: None,
        failures: Vec::new(),
    };
    for (line, record) in lines.records.iter().enumerate() {
        if record.is_none() {
            report
                .failures
                .push(Failure::Malformed { line: line as u64 });
        }
    }
    let order = order_failures(&lines);
    let structural = !order.is_empty() || !report.failures.is_empty();
    report.failures.extend(order);
    if !structural {
        report
            .failures
            .extend(link_failures(&lines, &report.sandbox));
    }
    match certified_key(&lines, &report.sandbox, host) {
        Ok(public) => {
            report.public_key = Some(hex::encode(public));
            check_checkpoints(&lines, latest, &public, &mut report);
        }
        Err(reason) => report.failures.push(Failure::Certificate { reason }),
    }
    report.status = if !report.failures.is_empty() {
        Status::Failed
    } else if report.sealed {
        Status::Ok
    } else {
        Status::Unsealed
    };
    report
}

/// Repeated, missing and out-of-order seqs.
fn order_failures(lines: &Lines) -> Vec<Failure> {
    let seqs: Vec<(u64, u64)> = lines
        .records
        .iter()
        .enumerate()
        .filter_map(|(line, r)| r.as_ref().map(|r| (line as u64, r.seq)))
        .collect();
    let mut failures = Vec::new();
    let mut seen = HashMap::new();
    for &(line, seq) in &seqs {
        if seen.insert(seq, line).is_some() {
            failures.push(Failure::Inserted { line, seq });
        }
    }
    if !failures.is_empty() {
        return failures;
    }
    let max = seqs.iter().map(|&(_, s)| s).max().unwrap_or(0);
    let mut seq = 0;
    while seq <= max && !seqs.is_empty() {
        if seen.contains_key(&seq) {
            seq += 1;
            continue;
        }
        let first = seq;
        while !seen.contains_key(&seq) {
            seq += 1;
        }
        failures.push(Failure::Deleted {
            first,
            last: seq - 1,
        });
    }
    let mut highest = None;
    for &(line, seq) in &seqs {
        if highest.is_some_and(|h| seq < h) {
            failures.push(Failure::Reordered { line, seq });
        }
        highest = highest.max(Some(seq));
    }
    failures
}

/// Records whose successor names another hash, and records of another sandbox or version.
fn link_failures(lines: &Lines, sandbox: &str) -> Vec<Failure> {
    let mut failures = Vec::new();
    for (i, record) in lines.records.iter().flatten().enumerate() {
        let expected = match i {
            0 => chain::genesis(sandbox),
            _ => lines.hashes[i - 1],
        };
        if record.prev != hex::encode(expected) {
            failures.push(Failure::Edited {
                seq: record.seq.saturating_sub(1),
            });
        } else if record.sandbox != sandbox || record.v != VERSION {
            failures.push(Failure::Edited { seq: record.seq });
        }
    }
    failures
}

/// The sandbox key the first record names, if the host key certifies it.
fn certified_key(lines: &Lines, sandbox: &str, host: &[u8; 32]) -> Result<[u8; 32], String> {
    let first = lines
        .records
        .first()
        .and_then(Option::as_ref)
        .filter(|r| r.seq == 0)
        .ok_or("the first record is missing")?;
    let text = |name: &str| first.attrs.get(name).and_then(|v| v.as_str());
    let public = text(attr::JOURNAL_PUBLIC_KEY)
        .and_then(|k| hex::decode(k).ok())
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .ok_or("the first record names no sandbox key")?;
    let certificate = text(attr::JOURNAL_CERTIFICATE).unwrap_or_default();
    if key::certified(host, sandbox, &public, certificate) {
        Ok(public)
    } else {
        Err(format!(
            "the sandbox key is not certified by host key {}",
            hex::encode(host)
        ))
    }
}

/// Checks every checkpoint record, the `checkpoint` file and the seal.
fn check_checkpoints(lines: &Lines, latest: Option<&str>, public: &[u8; 32], report: &mut Report) {
    let origin = note::origin(&report.sandbox);
    let chain_intact = report.failures.is_empty();
    let verify = |note: &str| {
        Checkpoint::verify(note, public)
            .ok()
            .filter(|c| c.origin == origin)
    };
    let mut seal_end = None;
    for (i, record) in lines.records.iter().enumerate() {
        let Some(record) = record else { continue };
        if let Some(end) = seal_end {
            if i as u64 > end {
                report.failures.push(Failure::AfterSeal { seq: record.seq });
            }
        }
        if record.kind == kinds::SEAL && seal_end.is_none() {
            seal_end = Some(i as u64 + 1);
        }
        if record.kind != kinds::CHECKPOINT {
            continue;
        }
        let note = record
            .attrs
            .get(attr::CHECKPOINT_NOTE)
            .and_then(|n| n.as_str());
        let Some(checkpoint) = note.and_then(verify).filter(|c| c.size == record.seq) else {
            report
                .failures
                .push(Failure::BadSignature { seq: record.seq });
            continue;
        };
        if lines.head(checkpoint.size, &report.sandbox) == Some(checkpoint.root) {
            report.checkpointed = report.checkpointed.max(checkpoint.size);
            if seal_end == Some(i as u64) {
                report.sealed = true;
            }
        } else if chain_intact {
            report.failures.push(Failure::Rehashed {
                checkpoint: checkpoint.size,
            });
        }
    }
    if seal_end.is_some() && !report.sealed && report.failures.is_empty() {
        // A seal whose checkpoint is gone: the tail was cut.
        report.failures.push(Failure::Truncated {
            records: report.records,
            checkpoint: seal_end.unwrap_or_default(),
        });
    }
    let Some(latest) = latest else { return };
    let Some(checkpoint) = verify(latest) else {
        report.failures.push(Failure::BadSignature {
            seq: report.records,
        });
        return;
    };
    if checkpoint.size >= report.records && chain_intact {
        report.failures.push(Failure::Truncated {
            records: report.records,
            checkpoint: checkpoint.size,
        });
    } else if lines.head(checkpoint.size, &report.sandbox) != Some(checkpoint.root) && chain_intact
    {
        let rehashed = Failure::Rehashed {
            checkpoint: checkpoint.size,
        };
        if !report.failures.contains(&rehashed) {
            report.failures.push(rehashed);
        }
    }
}
