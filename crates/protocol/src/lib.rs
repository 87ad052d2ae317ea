//! Hutch's host ↔ guest wire protocol.
//!
//! One byte stream (virtio-serial on QEMU, vsock on Firecracker) carries many operations at
//! once. Every unit on the wire is a [frame](frame): a little-endian `u32` length followed by
//! that many bytes of [postcard](https://docs.rs/postcard)-encoded [`Envelope`]. The envelope
//! names the operation (`op`) a message belongs to, so an exec's output, a file read and a ping
//! can interleave freely.
//!
//! The host speaks first with [`HostMsg::Hello`]; the guest answers [`GuestMsg::Welcome`] with
//! the version both will use (see [`handshake`]). Data-carrying messages are flow controlled
//! by per-operation credit windows ([`STREAM_WINDOW`]), so one slow consumer cannot stall the
//! channel and neither side buffers more than a window per operation.
//!
//! From version 5 the guest may start operations too (ids with [`GUEST_OP_BIT`] set): a
//! process in the guest asks for a workload identity token ([`GuestMsg::TokenRequest`]), and
//! the host answers with a token it signed for the sandbox the channel belongs to, or a
//! refusal. The host rate-limits these requests and bounds how many are in flight. From version
//! 6 the guest also opens forwarded SSH agent connections ([`GuestMsg::SshOpen`]): a byte
//! stream each way, credit controlled like an exec's, answered by the host's agent for the
//! sandbox's key.
//!
//! The host treats every guest frame as hostile: lengths are checked before anything is
//! allocated ([`MAX_FRAME`]), data chunks are bounded ([`MAX_CHUNK`]), and a guest that sends
//! more than the credit it was given is cut off.

#![forbid(unsafe_code)]

pub mod frame;
pub mod handshake;
pub mod host;
pub mod message;

pub use frame::{decode, encode, FrameError, FrameReader};
pub use message::*;

/// Protocol version implemented by this crate. Bumped on any incompatible wire change
/// (3: `HostMsg::Network`; 4: `HostMsg::Identity`; 5: `HostMsg::Trust`, and guest requests —
/// `GuestMsg::TokenRequest` answered by `HostMsg::Token` or `HostMsg::Refused`; 6: forwarded
/// SSH agent connections — `GuestMsg::SshOpen`, `SshData` and `SshClose` both ways).
pub const PROTOCOL_VERSION: u16 = 6;

/// Oldest protocol version this crate can still speak.
pub const MIN_PROTOCOL_VERSION: u16 = 3;

/// Magic bytes opening the handshake, so a stray peer is recognised at once.
pub const MAGIC: [u8; 4] = *b"HTCH";

/// Largest frame body accepted from the peer, in bytes. Anything larger is a protocol
/// violation and ends the connection before a byte of it is buffered.
pub const MAX_FRAME: usize = 256 * 1024;

/// Largest data payload (stdout, stdin, file chunk) in a single message.
pub const MAX_CHUNK: usize = 64 * 1024;

/// Bytes of data one side may send for one operation before the other grants more credit.
pub const STREAM_WINDOW: u32 = 1024 * 1024;

/// Operation id reserved for connection-level messages (handshake, protocol errors).
pub const CONNECTION_OP: u32 = 0;

/// Set in the operation id of every operation the guest starts (version 5: token requests),
/// so the two sides' id spaces never collide; the host's own ids stay below it.
pub const GUEST_OP_BIT: u32 = 1 << 31;

/// Where the guest agent serves SSH agent connections (version 6), forwarding each one to the
/// host's agent for the sandbox's SSH key; `SSH_AUTH_SOCK` names it in the execs of a sandbox
/// with one. The key never leaves the host.
pub const SSH_AUTH_SOCK: &str = "/run/hutch/ssh-agent.sock";

/// Bytes of one forwarded SSH agent connection either side may send before the other grants
/// more: an agent message is at most 256 KiB (OpenSSH's `AGENT_MAX_LEN`), sent in chunks.
pub const SSH_WINDOW: u32 = 256 * 1024;

/// Most forwarded SSH agent connections a guest may hold open at once; the agent serves no
/// more, and the host closes a channel whose guest opens more.
pub const MAX_SSH_STREAMS: usize = 4;

/// The guest's `AF_VSOCK` port on which the agent accepts the channel where the VMM gives the
/// guest a vsock device (Firecracker; the host dials it with `CONNECT 1024`). Ports below 1024
/// are privileged in the guest; this is the first free one.
pub const VSOCK_PORT: u32 = 1024;
