//! The [`Manager`](hutch_core::Manager) and its request surface over fakes (`hutch-testkit`): the real agent as a host
//! process instead of a VM, a recording network, images without files. Lifecycle behaviour
//! and failure injection at every host side effect, in seconds; the real-VM suites in
//! `crates/cli/tests` stay the end-to-end proof.

mod failures;
mod identity;
mod journal;
mod lifecycle;
mod recording;
mod secrets;
mod surface;
mod world;
