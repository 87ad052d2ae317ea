//! The tamper-evident journal of one sandbox: everything it did, who asked, and proof that the
//! record was not edited afterwards.
//!
//! A journal is a directory (`$HUTCH_HOME/journal/<id>/`) holding `journal.jsonl`, one JSON
//! object per line ([`Record`]: `v`, contiguous `seq`, `prev`, wall time, monotonic
//! nanoseconds, sandbox id, `kind`, `actor`, `attrs` named after OpenTelemetry semantic
//! conventions), `checkpoint` (the latest signed checkpoint) and, until the journal is sealed,
//! `sandbox.key` (the sandbox's Ed25519 identity key, certified by the host key in the first
//! record). Each line's raw bytes are hashed with BLAKE3 under a domain-separating context and
//! the next line names that hash in `prev` ([`chain`]): no JSON canonicalisation, the bytes
//! are the record. Checkpoints are C2SP signed notes ([`note`]) over the size and head hash,
//! written into the journal itself and to `checkpoint`; the final `journal.seal` record is
//! followed by a last checkpoint, after which the key is destroyed. [`verify`] checks it all
//! and names each failure.
//!
//! Each exec's session is recorded beside the journal as an asciicast v2 file named by its
//! BLAKE3 ([`recording`], [`cast`]), which the exec's `exec.end` record names.
//!
//! Writing happens on a thread of the journal's own ([`Journal`]): appending never blocks an
//! async worker, lines are written and `fsync`ed in batches, and always before a checkpoint.

#![forbid(unsafe_code)]

pub mod attr;
pub mod cast;
pub mod chain;
mod error;
mod event;
pub mod key;
pub mod note;
mod read;
pub mod recording;
mod redact;
mod retention;
mod time;
pub mod verify;
mod writer;

pub use error::JournalError;
pub use event::{kinds, Actor, AuditLog, Event, Record, VERSION};
pub use key::HostSigner;
pub use read::{read_records, JOURNAL_FILE};
pub use recording::{recording_path, Recorder, Recordings, Summary, RECORDINGS_DIR};
pub use redact::{LiveSecrets, Redactor, StreamRedactor, REDACTED};
pub use retention::prune;
pub use verify::{verify_dir, Failure, Report, Status};
pub use writer::{Journal, Options, Signed, CHECKPOINT_FILE, DSSE_PREFIX, KEY_FILE};
