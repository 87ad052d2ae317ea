//! Sandbox lifecycle shared by every front end (`hutch run` today, the daemon next).
//!
//! A [`Sandbox`] is a VM booted from an [`Image`](hutch_image::Image) whose agent has completed
//! the handshake and applied the host's boot facts (entropy, clock, hostname). Booting waits
//! for the agent, but notices at once when the VM dies instead, and reports the console's
//! last lines so a failed boot explains itself.

#![forbid(unsafe_code)]

pub mod audit;
mod blocking;
mod clones;
pub mod exec;
mod host;
pub mod identity;
pub mod lifecycle;
mod manager;
pub mod metrics;
mod network;
mod pool;
pub mod recording;
mod sandbox;
pub mod secrets;
pub mod service;
pub mod task;
mod template;

pub use clones::MAX_FORK;
pub use host::{HostNetwork, ImageDir, ImageSource, Intercepted};
pub use manager::{chain, now_ms, CoreError, Limits, Manager, ManagerConfig, ReconcileReport};
pub use pool::MAX_POOL;
pub use sandbox::{kernel_for, new_id, BootOptions, BootShare, Sandbox, SandboxError};
pub use template::{TemplateError, TemplateRecord, Templates};
