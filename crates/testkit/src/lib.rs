//! Fakes for the host side effects `hutch-core` drives, so that the [`Manager`](hutch_core::Manager)
//! runs in tests without VMs, network namespaces or built images, in seconds:
//!
//! * [`FakeVmm`] implements [`hutch_vmm::Vmm`] by running the real guest agent (`hutch-agent
//!   --listen-fd`) as a host process instead of booting a VM: create, exec, files, pause,
//!   stop, destroy and adopt behave as with a real backend, and its snapshots are records a
//!   restore turns into a fresh agent (the guest's memory is not carried over);
//! * [`FakeNetwork`] implements [`hutch_core::HostNetwork`] and records which sandboxes have a
//!   network, so a test can assert that nothing is left behind;
//! * [`FakeImages`] implements [`hutch_core::ImageSource`] with images of any name;
//! * failure injection, once per arming: [`FailingVmm`] fails at a chosen [`VmmStep`] (e.g. the
//!   VM dies during boot), [`FakeNetwork::fail_at`] at a chosen [`NetStep`] (e.g. the TAP
//!   hand-over, once the network exists), and [`FailingStore`] fails a chosen [`StoreOp`] of
//!   any [`hutch_store::Store`].
//!
//! The agent binary is found by [`agent_binary`].
//!
//! For the secret broker's tests (namespaces or real VMs): [`origin`] (HTTPS origins under a
//! test root CA that record and echo what they get) and [`serve_dns`] (the test internet's
//! authoritative DNS); [`broker_world`] (guest, sandbox and internet namespaces around a
//! serving broker, for its namespace tests and `hutch-bench secrets`).

#![forbid(unsafe_code)]

mod agent;
pub mod broker_world;
mod dns;
mod failing;
mod images;
mod network;
pub mod origin;
mod proc;
mod store;
mod vmm;

pub use agent::{agent_binary, AGENT_ENV};
pub use dns::serve_dns;
pub use failing::{FailingVmm, VmmStep};
pub use images::FakeImages;
pub use network::{FakeNetwork, NetStep};
pub use store::{FailingStore, StoreOp};
pub use vmm::{FakeVm, FakeVmm, BACKEND, IDENTITY_SOCKET};
