//! SSH agent forwarding's host side: an agent holding one sandbox's SSH key that signs only
//! for the servers that key is allowed to reach.
//!
//! The guest's `SSH_AUTH_SOCK` leads here over the host channel; the key never leaves the
//! host. Each forwarded connection is a [`SshSession`]: it lists the one key, and signs only
//! after the client's `session-bind@openssh.com` (OpenSSH 8.9 and later send it before user
//! authentication) whose signature over the session id verifies under a host key on the
//! secret's allow-list, for a user-authentication request of that same session. A forwarding
//! bind (`is_forwarding`: the agent reached through a further `ssh -A` hop), a second bind,
//! a bad signature or a host key off the list refuses everything after it on the connection.
//! Every signature and refusal is an event ([`EventSink`]): the host key's fingerprint and the
//! decision, never key material.

use std::sync::Arc;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use hutch_types::{BrokerDecision, BrokerEvent};
use signature::{Signer, Verifier};
use ssh_encoding::{Decode, Encode, Reader};
use ssh_key::{
    private::KeypairData, public::KeyData, Algorithm, HashAlg, PrivateKey, PublicKey, Signature,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::{EventSink, SecretValue};

/// Largest agent message read from the guest (OpenSSH's `AGENT_MAX_LEN`); a longer one ends
/// the connection before it is buffered.
pub const MAX_AGENT_MESSAGE: usize = 256 * 1024;

/// `SSH_MSG_USERAUTH_REQUEST`: what a signature for user authentication signs (after the
/// session id).
const USERAUTH_REQUEST: u8 = 50;

/// `SSH_AGENT_FAILURE`.
const AGENT_FAILURE: u8 = 5;
/// `SSH_AGENT_SUCCESS`.
const AGENT_SUCCESS: u8 = 6;
/// `SSH_AGENTC_REQUEST_IDENTITIES`.
const REQUEST_IDENTITIES: u8 = 11;
/// `SSH_AGENT_IDENTITIES_ANSWER`.
const IDENTITIES_ANSWER: u8 = 12;
/// `SSH_AGENTC_SIGN_REQUEST`.
const SIGN_REQUEST: u8 = 13;
/// `SSH_AGENT_SIGN_RESPONSE`.
const SIGN_RESPONSE: u8 = 14;
/// `SSH_AGENTC_EXTENSION`.
const EXTENSION: u8 = 27;
/// The extension OpenSSH's client sends before user authentication (PROTOCOL.agent § 1).
pub const SESSION_BIND: &str = "session-bind@openssh.com";

/// The agent requests this agent understands (draft-miller-ssh-agent; OpenSSH's
/// PROTOCOL.agent for the bind). Anything else is answered `SSH_AGENT_FAILURE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentRequest {
    /// `SSH_AGENTC_REQUEST_IDENTITIES`.
    Identities,
    /// `SSH_AGENTC_SIGN_REQUEST`: the key to sign with, the data, the flags.
    Sign {
        /// The key the client wants to sign with.
        key: KeyData,
        /// What to sign.
        data: Vec<u8>,
    },
    /// `session-bind@openssh.com`.
    Bind(SessionBind),
    /// Another extension, by name.
    OtherExtension(String),
    /// Another message type (add, remove, lock, ...): refused.
    Other(u8),
}

/// A `session-bind@openssh.com`: the server's host key, the session id of the key exchange,
/// the server's signature over that id, and whether the client is forwarding the agent on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionBind {
    /// The server's host key.
    pub host_key: KeyData,
    /// The key exchange's session identifier.
    pub session_id: Vec<u8>,
    /// The server's signature of `session_id` under `host_key`.
    pub signature: Signature,
    /// Whether this bind is for forwarding the agent rather than authenticating.
    pub is_forwarding: bool,
}

impl AgentRequest {
    /// Parses one message body (its length prefix already removed); `None` for a malformed
    /// one (trailing bytes included).
    pub fn parse(mut body: &[u8]) -> Option<AgentRequest> {
        let reader = &mut body;
        let kind = u8::decode(reader).ok()?;
        let request = match kind {
            REQUEST_IDENTITIES => AgentRequest::Identities,
            SIGN_REQUEST => {
                let key = reader.read_prefixed(KeyData::decode).ok()?;
                let data = Vec::<u8>::decode(reader).ok()?;
                let _flags = u32::decode(reader).ok()?;
                AgentRequest::Sign { key, data }
            }
            EXTENSION => {
                let name = String::decode(reader).ok()?;
                if name != SESSION_BIND {
                    return Some(AgentRequest::OtherExtension(name));
                }
                AgentRequest::Bind(SessionBind {
                    host_key: reader.read_prefixed(KeyData::decode).ok()?,
                    session_id: Vec::<u8>::decode(reader).ok()?,
                    signature: reader.read_prefixed(Signature::decode).ok()?,
                    is_forwarding: u8::decode(reader).ok()? != 0,
                })
            }
            other => return Some(AgentRequest::Other(other)),
        };
        reader.is_finished().then_some(request)
    }

    /// The message body (without its length prefix), as a client sends it.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let written = match self {
            AgentRequest::Identities => REQUEST_IDENTITIES.encode(&mut out),
            AgentRequest::Sign { key, data } => SIGN_REQUEST
                .encode(&mut out)
                .and_then(|()| key.encode_prefixed(&mut out))
                .and_then(|()| data.encode(&mut out))
                .and_then(|()| 0u32.encode(&mut out)),
            AgentRequest::Bind(b) => EXTENSION
                .encode(&mut out)
                .and_then(|()| SESSION_BIND.encode(&mut out))
                .and_then(|()| b.host_key.encode_prefixed(&mut out))
                .and_then(|()| b.session_id.encode(&mut out))
                .and_then(|()| b.signature.encode_prefixed(&mut out))
                .and_then(|()| u8::from(b.is_forwarding).encode(&mut out)),
            AgentRequest::OtherExtension(name) => EXTENSION
                .encode(&mut out)
                .and_then(|()| name.encode(&mut out)),
            AgentRequest::Other(kind) => kind.encode(&mut out),
        };
        written.expect("encoding into a Vec cannot fail");
        out
    }
}

/// This agent's answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentResponse {
    /// `SSH_AGENT_FAILURE`.
    Failure,
    /// `SSH_AGENT_SUCCESS`.
    Success,
    /// `SSH_AGENT_IDENTITIES_ANSWER` with one key and its comment.
    Identity(KeyData, String),
    /// `SSH_AGENT_SIGN_RESPONSE`.
    Signature(Signature),
}

impl AgentResponse {
    /// The message body (without its length prefix).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let written = match self {
            AgentResponse::Failure => AGENT_FAILURE.encode(&mut out),
            AgentResponse::Success => AGENT_SUCCESS.encode(&mut out),
            AgentResponse::Identity(key, comment) => IDENTITIES_ANSWER
                .encode(&mut out)
                .and_then(|()| 1u32.encode(&mut out))
                .and_then(|()| key.encode_prefixed(&mut out))
                .and_then(|()| comment.encode(&mut out)),
            AgentResponse::Signature(sig) => SIGN_RESPONSE
                .encode(&mut out)
                .and_then(|()| sig.encode_prefixed(&mut out)),
        };
        written.expect("encoding into a Vec cannot fail");
        out
    }
}

/// Why an SSH key or host key was refused.
#[derive(Debug, thiserror::Error)]
pub enum SshKeyError {
    /// The value is not an unencrypted OpenSSH private key.
    #[error("not an unencrypted OpenSSH private key ({0})")]
    PrivateKey(String),
    /// Only Ed25519 and ECDSA keys are served (an RSA signature's hash is the client's choice).
    #[error("an SSH key must be Ed25519 or ECDSA, not {0}")]
    Algorithm(String),
    /// A host key is not an OpenSSH public key line.
    #[error("host key {0:?} is not an OpenSSH public key (`ssh-ed25519 AAAA...`)")]
    HostKey(String),
    /// No host key allowed.
    #[error("an SSH key needs at least one allowed host key")]
    NoHostKey,
}

/// An SSH key as a secret's value holds it: checked, with its public half.
pub fn parse_private_key(value: &SecretValue) -> Result<PrivateKey, SshKeyError> {
    let text = std::str::from_utf8(value.expose())
        .map_err(|_| SshKeyError::PrivateKey("not UTF-8".into()))?;
    let key = PrivateKey::from_openssh(text).map_err(|e| SshKeyError::PrivateKey(e.to_string()))?;
    if key.is_encrypted() {
        return Err(SshKeyError::PrivateKey("it is encrypted".into()));
    }
    match key.key_data() {
        // ssh-key checks an Ed25519 pair only with its own `ed25519` feature: check here that
        // the public half listed is the one the private half signs for.
        KeypairData::Ed25519(pair) => {
            let derived = ed25519_dalek::SigningKey::from_bytes(&pair.private.to_bytes())
                .verifying_key()
                .to_bytes();
            if derived != pair.public.0 {
                return Err(SshKeyError::PrivateKey(
                    "its public half does not match its private half".into(),
                ));
            }
            Ok(key)
        }
        KeypairData::Ecdsa(_) => Ok(key),
        other => Err(SshKeyError::Algorithm(
            other
                .algorithm()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "an unknown algorithm".into()),
        )),
    }
}

/// A host key line (`ssh-ed25519 AAAA... [comment]`, as in `known_hosts` without the host
/// names or `/etc/ssh/ssh_host_*.pub`) in its canonical form: algorithm and base64, no comment.
pub fn canonical_host_key(line: &str) -> Result<String, SshKeyError> {
    let bad = || SshKeyError::HostKey(line.chars().take(80).collect());
    let key = PublicKey::from_openssh(line.trim()).map_err(|_| bad())?;
    let mut key = key;
    key.set_comment("");
    key.to_openssh()
        .map(|s| s.trim().to_string())
        .map_err(|_| bad())
}

/// The public half of `key`, as `authorized_keys` holds it (no comment).
pub fn public_key_line(key: &PrivateKey) -> String {
    let mut public = key.public_key().clone();
    public.set_comment("");
    public.to_openssh().unwrap_or_default().trim().to_string()
}

/// One sandbox's SSH key as its host agent holds it.
pub struct SshAgentKey {
    sandbox_id: String,
    secret: String,
    key: PrivateKey,
    allowed: Vec<KeyData>,
    events: Arc<dyn EventSink>,
}

impl std::fmt::Debug for SshAgentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshAgentKey")
            .field("sandbox_id", &self.sandbox_id)
            .field("secret", &self.secret)
            .field("key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl SshAgentKey {
    /// The agent for sandbox `sandbox_id`'s secret `secret`: `value` is its private key,
    /// `allowed_host_keys` the servers it may sign for (OpenSSH public key lines).
    pub fn new(
        sandbox_id: &str,
        secret: &str,
        value: &SecretValue,
        allowed_host_keys: &[String],
        events: Arc<dyn EventSink>,
    ) -> Result<SshAgentKey, SshKeyError> {
        let key = parse_private_key(value)?;
        let allowed = allowed_host_keys
            .iter()
            .map(|line| {
                PublicKey::from_openssh(line.trim())
                    .map(|k| k.key_data().clone())
                    .map_err(|_| SshKeyError::HostKey(line.chars().take(80).collect()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if allowed.is_empty() {
            return Err(SshKeyError::NoHostKey);
        }
        Ok(SshAgentKey {
            sandbox_id: sandbox_id.to_string(),
            secret: secret.to_string(),
            key,
            allowed,
            events,
        })
    }

    /// Serves one forwarded connection until either side closes it or sends what is not an
    /// agent message.
    pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(self: Arc<Self>, stream: S) {
        let codec = LengthDelimitedCodec::builder()
            .max_frame_length(MAX_AGENT_MESSAGE)
            .new_codec();
        let mut framed = Framed::new(stream, codec);
        let mut session = SshSession::new(&self);
        while let Some(Ok(frame)) = framed.next().await {
            let response = match AgentRequest::parse(&frame) {
                Some(request) => session.handle(request),
                None => AgentResponse::Failure,
            };
            if framed.send(Bytes::from(response.encode())).await.is_err() {
                break;
            }
        }
    }
}

/// How far a connection got.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Bound {
    /// No bind yet: nothing is signed.
    No,
    /// Bound to an allowed host key for this session id.
    To {
        host_key: KeyData,
        session_id: Vec<u8>,
    },
    /// A refused bind: nothing is signed on this connection any more.
    Refused,
}

/// One forwarded agent connection: its bind and what it may sign. Pure: the tests drive it
/// with real keys and real agent messages.
pub struct SshSession<'a> {
    agent: &'a SshAgentKey,
    bound: Bound,
}

impl<'a> SshSession<'a> {
    /// A connection that has bound nothing yet.
    pub fn new(agent: &'a SshAgentKey) -> SshSession<'a> {
        SshSession {
            agent,
            bound: Bound::No,
        }
    }

    /// The answer to one request (recording each signature and refusal).
    pub fn handle(&mut self, request: AgentRequest) -> AgentResponse {
        match request {
            AgentRequest::Identities => AgentResponse::Identity(
                self.agent.key.public_key().key_data().clone(),
                format!("hutch secret {}", self.agent.secret),
            ),
            AgentRequest::Sign { key, data } => match self.sign(&key, &data) {
                Ok(signature) => {
                    self.record(BrokerDecision::Signed, None);
                    AgentResponse::Signature(signature)
                }
                Err(why) => {
                    self.record(BrokerDecision::Refused, Some(why));
                    AgentResponse::Failure
                }
            },
            AgentRequest::Bind(bind) => self.bind(bind),
            // Unknown extensions are answered as OpenSSH's agent answers them; adding,
            // removing, locking: this agent's one key is not the guest's to change.
            AgentRequest::OtherExtension(_) | AgentRequest::Other(_) => AgentResponse::Failure,
        }
    }

    fn sign(&self, key: &KeyData, data: &[u8]) -> Result<Signature, String> {
        let Bound::To { session_id, .. } = &self.bound else {
            return Err(match self.bound {
                Bound::Refused => "the connection's session bind was refused".into(),
                _ => "no session-bind@openssh.com before the sign request".into(),
            });
        };
        if key != self.agent.key.public_key().key_data() {
            return Err("not this agent's key".into());
        }
        if !is_userauth_for(data, session_id) {
            return Err("the data is not a user authentication for the bound session".into());
        }
        sign(&self.agent.key, data).map_err(|e| format!("signing failed: {e}"))
    }

    fn bind(&mut self, bind: SessionBind) -> AgentResponse {
        let host_key = Some(&bind.host_key);
        if self.bound != Bound::No {
            return self.refuse_bind(host_key, "a second session bind on one connection".into());
        }
        if verify(&bind.host_key, &bind.session_id, &bind.signature).is_err() {
            return self.refuse_bind(
                host_key,
                "the session bind's signature does not verify under its host key".into(),
            );
        }
        if bind.is_forwarding {
            return self.refuse_bind(
                host_key,
                "a forwarded session (ssh -A beyond the first hop) is refused".into(),
            );
        }
        if !self.agent.allowed.contains(&bind.host_key) {
            return self.refuse_bind(
                host_key,
                "the host key is not on the secret's allow-list".into(),
            );
        }
        self.bound = Bound::To {
            host_key: bind.host_key,
            session_id: bind.session_id,
        };
        AgentResponse::Success
    }

    fn refuse_bind(&mut self, host_key: Option<&KeyData>, why: String) -> AgentResponse {
        self.bound = Bound::Refused;
        self.record_for(host_key, BrokerDecision::Refused, Some(why));
        AgentResponse::Failure
    }

    fn record(&self, decision: BrokerDecision, reason: Option<String>) {
        let host_key = match &self.bound {
            Bound::To { host_key, .. } => Some(host_key),
            _ => None,
        };
        self.record_for(host_key, decision, reason);
    }

    fn record_for(
        &self,
        host_key: Option<&KeyData>,
        decision: BrokerDecision,
        reason: Option<String>,
    ) {
        let host = host_key
            .map(|k| k.fingerprint(HashAlg::Sha256).to_string())
            .unwrap_or_else(|| "unbound".into());
        self.agent.events.record(BrokerEvent {
            time: time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            sandbox_id: self.agent.sandbox_id.clone(),
            secret: self.agent.secret.clone(),
            host,
            port: 0,
            method: Some("ssh-sign".into()),
            path: None,
            decision,
            reason,
        });
    }
}

/// Signs `data` with `key`: Ed25519 through the workspace's ed25519-dalek, ECDSA through
/// ssh-key.
pub fn sign(key: &PrivateKey, data: &[u8]) -> Result<Signature, signature::Error> {
    match key.key_data() {
        KeypairData::Ed25519(pair) => {
            let signing = ed25519_dalek::SigningKey::from_bytes(&pair.private.to_bytes());
            let sig = signing.sign(data);
            Signature::new(Algorithm::Ed25519, sig.to_bytes().to_vec())
                .map_err(signature::Error::from_source)
        }
        other => other.try_sign(data),
    }
}

/// Verifies `signature` over `message` under `key` (Ed25519 strictly, or ECDSA).
pub fn verify(
    key: &KeyData,
    message: &[u8],
    signature: &Signature,
) -> Result<(), signature::Error> {
    match key {
        KeyData::Ed25519(public) => {
            if signature.algorithm() != Algorithm::Ed25519 {
                return Err(signature::Error::new());
            }
            let public = ed25519_dalek::VerifyingKey::from_bytes(&public.0)
                .map_err(|_| signature::Error::new())?;
            let sig = ed25519_dalek::Signature::from_slice(signature.as_bytes())
                .map_err(|_| signature::Error::new())?;
            public
                .verify_strict(message, &sig)
                .map_err(|_| signature::Error::new())
        }
        other => other.verify(message, signature),
    }
}

/// Whether `data` is an SSH user authentication request of the session `session_id`: the
/// session id as an SSH string, then `SSH_MSG_USERAUTH_REQUEST`.
fn is_userauth_for(data: &[u8], session_id: &[u8]) -> bool {
    let mut reader = data;
    match Vec::<u8>::decode(&mut reader) {
        Ok(id) => id == session_id && reader.first() == Some(&USERAUTH_REQUEST),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests;
