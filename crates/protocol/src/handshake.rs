//! Version negotiation: the host offers a range, the guest picks the newest common version.

use crate::{
    ErrorCode, GuestMsg, Hello, HostMsg, OpError, Welcome, MAGIC, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};

/// Why a handshake failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    /// The peer is not speaking this protocol.
    #[error("peer is not a hutch endpoint (bad magic)")]
    BadMagic,
    /// The ranges of versions do not overlap.
    #[error("no common protocol version: peer speaks {peer_min}..={peer_max}, we speak {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}")]
    NoCommonVersion {
        /// Oldest version the peer speaks.
        peer_min: u16,
        /// Newest version the peer speaks.
        peer_max: u16,
    },
    /// The peer chose a version we never offered.
    #[error("guest chose protocol version {0}, which the host did not offer")]
    NotOffered(u16),
    /// The peer sent something other than the handshake message.
    #[error("expected a handshake message, got {0}")]
    Unexpected(&'static str),
    /// The guest refused the handshake.
    #[error("guest refused the handshake: {0}")]
    Refused(OpError),
}

/// The host's opening message.
pub fn hello() -> HostMsg {
    HostMsg::Hello(Hello {
        magic: MAGIC,
        min_version: MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
    })
}

/// Guest side: picks the version to use for `hello`, or the error to report.
pub fn choose_version(hello: &Hello) -> Result<u16, HandshakeError> {
    if hello.magic != MAGIC {
        return Err(HandshakeError::BadMagic);
    }
    let best = hello.max_version.min(PROTOCOL_VERSION);
    if best < hello.min_version.max(MIN_PROTOCOL_VERSION) {
        return Err(HandshakeError::NoCommonVersion {
            peer_min: hello.min_version,
            peer_max: hello.max_version,
        });
    }
    Ok(best)
}

/// Host side: checks the guest's answer to [`hello`].
pub fn check_welcome(msg: GuestMsg) -> Result<Welcome, HandshakeError> {
    match msg {
        GuestMsg::Welcome(w) if w.magic != MAGIC => Err(HandshakeError::BadMagic),
        GuestMsg::Welcome(w) if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&w.version) => {
            Err(HandshakeError::NotOffered(w.version))
        }
        GuestMsg::Welcome(w) => Ok(w),
        GuestMsg::Error(e) => Err(HandshakeError::Refused(e)),
        _ => Err(HandshakeError::Unexpected("a non-handshake message")),
    }
}

impl HandshakeError {
    /// The error as the guest reports it to the host.
    pub fn to_op_error(&self) -> OpError {
        OpError {
            code: ErrorCode::UnsupportedVersion,
            message: self.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(min: u16, max: u16) -> Hello {
        Hello {
            magic: MAGIC,
            min_version: min,
            max_version: max,
        }
    }

    #[test]
    fn picks_newest_common_version() {
        assert_eq!(choose_version(&offer(1, 9)), Ok(PROTOCOL_VERSION));
        let v = MIN_PROTOCOL_VERSION;
        assert_eq!(choose_version(&offer(v, v)), Ok(v));
        // A host that only speaks versions older than ours is refused.
        assert!(matches!(
            choose_version(&offer(1, v - 1)),
            Err(HandshakeError::NoCommonVersion { .. })
        ));
    }

    #[test]
    fn refuses_disjoint_ranges_and_bad_magic() {
        assert!(matches!(
            choose_version(&offer(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 5)),
            Err(HandshakeError::NoCommonVersion { .. })
        ));
        let mut bad = offer(PROTOCOL_VERSION, PROTOCOL_VERSION);
        bad.magic = *b"NOPE";
        assert_eq!(choose_version(&bad), Err(HandshakeError::BadMagic));
    }

    #[test]
    fn host_rejects_versions_it_never_offered() {
        let w = Welcome {
            magic: MAGIC,
            version: PROTOCOL_VERSION + 1,
            agent: "x".into(),
            kernel_release: "y".into(),
        };
        assert_eq!(
            check_welcome(GuestMsg::Welcome(w)),
            Err(HandshakeError::NotOffered(PROTOCOL_VERSION + 1))
        );
        assert!(matches!(
            check_welcome(GuestMsg::Pong(1)),
            Err(HandshakeError::Unexpected(_))
        ));
    }
}
