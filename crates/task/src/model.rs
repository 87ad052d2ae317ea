//! The task's spec and record, as stored under `$HUTCH_HOME/tasks/<id>/` and served by the API.

use std::collections::BTreeMap;

use hutch_types::NetworkPolicy;
use serde::{Deserialize, Serialize};

use crate::changeset::{Change, Changeset, Limits, Policy, Rejection};

/// What to run, where, and what its changes may touch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// The agent command (argv), run in the workspace.
    #[schema(min_items = 1)]
    pub command: Vec<String>,
    /// Restore the sandbox from this template instead of booting the default image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// The agent's network policy (verification always runs without a network).
    #[serde(default)]
    pub network: NetworkPolicy,
    /// Environment for the agent command.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Secrets attached to the agent's sandbox (`hutch secret set`): the agent sees each as a
    /// placeholder in its variable; the verify sandbox gets none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 64)]
    pub secrets: Vec<String>,
    /// Kill the agent after this many seconds (at most a day).
    #[serde(default = "default_timeout")]
    #[schema(minimum = 1, maximum = 86400)]
    pub timeout_secs: u64,
    /// Globs the changed paths must match (empty: everything outside `.git`).
    #[serde(default)]
    pub allow: Vec<String>,
    /// A shell command run on the changed workspace in a fresh sandbox without a network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<String>,
    /// Size and count limits of the changeset.
    #[serde(default)]
    pub limits: Limits,
}

fn default_timeout() -> u64 {
    600
}

impl TaskSpec {
    /// The validation policy this spec asks for.
    pub fn policy(&self) -> Policy {
        Policy {
            allow: self.allow.clone(),
            limits: self.limits,
        }
    }
}

/// The host's judgement of what came out of the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Verdict {
    /// Every change passed; `apply` may use them.
    Accepted {
        /// How many changes.
        changes: usize,
    },
    /// The agent changed nothing.
    Empty,
    /// Some changes were refused; nothing is kept.
    Rejected {
        /// Each refusal and its reason.
        rejections: Vec<Rejection>,
    },
    /// No changeset could be had from the guest (its helper failed, or the stream was cut).
    ExtractionFailed {
        /// Why.
        reason: String,
    },
}

impl Verdict {
    /// The verdict of a validation result.
    pub fn of(result: &Result<Changeset, Vec<Rejection>>) -> Verdict {
        match result {
            Ok(cs) if cs.is_empty() => Verdict::Empty,
            Ok(cs) => Verdict::Accepted {
                changes: cs.changes.len(),
            },
            Err(r) => Verdict::Rejected {
                rejections: r.clone(),
            },
        }
    }
}

/// How a process in a sandbox ended, and (the start of) what it printed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProcessOutcome {
    /// Exit code, when it exited.
    pub exit_code: Option<i32>,
    /// Signal, when it was killed.
    pub signal: Option<i32>,
    /// Whether the timeout killed it.
    pub timed_out: bool,
    /// Standard output (lossy UTF-8, capped).
    pub stdout: String,
    /// Standard error (lossy UTF-8, capped).
    pub stderr: String,
    /// Whether output beyond the cap was dropped.
    pub truncated: bool,
    /// Wall time in milliseconds.
    pub millis: u64,
}

impl ProcessOutcome {
    /// Exited with code 0.
    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0)
    }
}

/// Verification of the changeset in a fresh sandbox without a network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VerifyOutcome {
    /// The command.
    pub command: String,
    /// Whether it exited 0.
    pub passed: bool,
    /// How it ended.
    pub process: ProcessOutcome,
}

/// Where the time went, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Timings {
    /// Creating the agent's sandbox.
    pub create_ms: u64,
    /// Copying the workspace in.
    pub copy_in_ms: u64,
    /// The agent's own run.
    pub agent_ms: u64,
    /// Computing, copying out and validating the changeset.
    pub changeset_ms: u64,
    /// Verification, all of it.
    pub verify_ms: u64,
    /// Everything.
    pub total_ms: u64,
}

/// A task's durable record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskRecord {
    /// Task id (`task-…`).
    pub id: String,
    /// What was asked.
    pub spec: TaskSpec,
    /// Start, milliseconds since the epoch.
    pub created_ms: i64,
    /// SHA-256 of the baseline manifest.
    pub baseline_digest: String,
    /// Files and symlinks in the baseline (outside `.git`).
    pub baseline_files: usize,
    /// The agent's run, when it started.
    pub agent: Option<ProcessOutcome>,
    /// The verdict on its changes.
    pub verdict: Verdict,
    /// The accepted changes (contents not included).
    #[serde(default)]
    pub changes: Vec<Change>,
    /// Changes the agent made inside `.git`, each refused with its reason and never carried
    /// (when the changeset is rejected they are among its rejections instead).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_carried: Vec<Rejection>,
    /// SHA-256 of the stored changeset stream, when one was accepted.
    pub changeset_digest: Option<String>,
    /// Verification, when asked for and there was something to verify.
    pub verify: Option<VerifyOutcome>,
    /// Timings.
    pub timings: Timings,
    /// What went wrong on the host side, if anything.
    pub error: Option<String>,
    /// The host key's signature over the record, as an older hutch (before attestations)
    /// stored it: never written now; a record carrying one is refused, with the reason, by
    /// [`crate::attest::check_task`] (its sandbox key is gone, so it cannot be migrated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// Frame kind of a streamed task run: the agent's (or the verify command's) standard output.
pub const FRAME_STDOUT: u8 = 1;
/// Frame kind: standard error.
pub const FRAME_STDERR: u8 = 2;
/// Frame kind: the final [`TaskRecord`] (JSON); the stream ends after it.
pub const FRAME_RECORD: u8 = 3;
/// Frame kind: the task could not be run (an `ApiError` JSON); the stream ends after it.
pub const FRAME_ERROR: u8 = 4;
/// Largest frame a reader accepts.
pub const MAX_FRAME: usize = 64 << 20;

/// One frame of the body of `POST /v1/tasks?stream=true`: `u8 kind ‖ u32 LE len ‖ len bytes`.
pub fn encode_frame(kind: u8, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + data.len());
    out.push(kind);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
    out
}

/// Splits a streamed task run's body, fed in arbitrary pieces, into frames.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    /// Adds received bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole frame, if one has arrived; an error for a frame over [`MAX_FRAME`].
    pub fn next_frame(&mut self) -> Result<Option<(u8, Vec<u8>)>, String> {
        let Some(header) = self.buf.get(..5) else {
            return Ok(None);
        };
        let len = u32::from_le_bytes(header[1..5].try_into().expect("4 bytes")) as usize;
        if len > MAX_FRAME {
            return Err(format!("a frame of {len} bytes is over {MAX_FRAME}"));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        let kind = self.buf[0];
        let data = self.buf[5..5 + len].to_vec();
        self.buf.drain(..5 + len);
        Ok(Some((kind, data)))
    }

    /// Whether bytes of an unfinished frame are left.
    pub fn has_partial(&self) -> bool {
        !self.buf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_gets_the_default_timeout() {
        let spec: TaskSpec = serde_json::from_str(r#"{"command":["true"]}"#).unwrap();
        assert_eq!(spec.timeout_secs, 600);
    }

    #[test]
    fn frames_split_anywhere_come_back_whole() {
        let mut body = encode_frame(FRAME_STDOUT, b"hello");
        body.extend(encode_frame(FRAME_RECORD, b"{}"));
        let mut r = FrameReader::default();
        let mut got = Vec::new();
        for b in &body {
            r.push(std::slice::from_ref(b));
            while let Some(f) = r.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(
            got,
            [
                (FRAME_STDOUT, b"hello".to_vec()),
                (FRAME_RECORD, b"{}".to_vec())
            ]
        );
        assert!(!r.has_partial());
        r.push(&[FRAME_STDOUT, 0xff, 0xff, 0xff, 0xff]);
        assert!(r.next_frame().is_err());
    }
}
