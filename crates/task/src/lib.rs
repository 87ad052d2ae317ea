//! Agent tasks: a workspace goes into a sandbox, a checked changeset comes out.
//!
//! Everything here is pure data handling on the host: the guest's changeset stream is parsed
//! with hard limits and validated against the baseline the host computed itself
//! ([`changeset::validate`]); [`diff`] renders it; [`apply`] writes it to a host directory or
//! a new git branch without running anything from the workspace. The guest side is one small
//! Python program ([`GUEST_SCRIPT`]).

#![forbid(unsafe_code)]
// Synchronous: async callers run its hashing, validation and git calls on the blocking pool.
#![allow(clippy::disallowed_methods)]

pub mod apply;
pub mod archive;
pub mod attest;
pub mod baseline;
pub mod beneath;
pub mod changeset;
pub mod diff;
pub mod glob;
pub mod many;
pub mod model;
pub mod sign;
pub mod workspace;

pub use baseline::{BaseEntry, Baseline};
pub use changeset::{Change, Changeset, Limits, Policy, RejectKind, Rejection};
pub use model::{ProcessOutcome, TaskRecord, TaskSpec, Timings, Verdict, VerifyOutcome};

/// The guest helper (`python3 SCRIPT diff|apply …`): computes the changeset stream against the
/// host's baseline, or applies a (host-validated) changeset stream to a directory.
pub const GUEST_SCRIPT: &str = include_str!("guest.py");
