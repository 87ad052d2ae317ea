//! The host agent's policy, with real keys and real agent messages: nothing is signed without
//! a verified bind to an allowed host key of the same session, and no forwarded session.

use std::sync::Mutex;

use ssh_key::{private::Ed25519Keypair, LineEnding};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// Events recorded, in order.
#[derive(Default)]
struct Events(Mutex<Vec<BrokerEvent>>);

impl EventSink for Events {
    fn record(&self, event: BrokerEvent) {
        self.0.lock().unwrap().push(event);
    }
}

impl Events {
    fn decisions(&self) -> Vec<(BrokerDecision, String)> {
        let events = self.0.lock().unwrap();
        events
            .iter()
            .map(|e| (e.decision, e.reason.clone().unwrap_or_default()))
            .collect()
    }
}

/// An Ed25519 key from a fixed seed.
fn key(seed: u8) -> PrivateKey {
    let signing = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
    let mut bytes = [0u8; 64];
    bytes[..32].copy_from_slice(&[seed; 32]);
    bytes[32..].copy_from_slice(&signing.verifying_key().to_bytes());
    let pair = Ed25519Keypair::from_bytes(&bytes).unwrap();
    PrivateKey::new(KeypairData::Ed25519(pair), "test").unwrap()
}

fn value_of(key: &PrivateKey) -> SecretValue {
    SecretValue::new(key.to_openssh(LineEnding::LF).unwrap().as_bytes().to_vec())
}

struct Fixture {
    user: PrivateKey,
    allowed_host: PrivateKey,
    other_host: PrivateKey,
    events: Arc<Events>,
    agent: SshAgentKey,
}

fn fixture() -> Fixture {
    let (user, allowed_host, other_host) = (key(1), key(2), key(3));
    let events = Arc::new(Events::default());
    let agent = SshAgentKey::new(
        "sb-1",
        "deploy",
        &value_of(&user),
        &[public_key_line(&allowed_host)],
        events.clone(),
    )
    .unwrap();
    Fixture {
        user,
        allowed_host,
        other_host,
        events,
        agent,
    }
}

/// A bind as OpenSSH's client sends it: `host` signs `session_id`.
fn bind(host: &PrivateKey, session_id: &[u8], is_forwarding: bool) -> AgentRequest {
    AgentRequest::Bind(SessionBind {
        host_key: host.public_key().key_data().clone(),
        session_id: session_id.to_vec(),
        signature: sign(host, session_id).unwrap(),
        is_forwarding,
    })
}

/// What a client signs to authenticate in session `session_id`.
fn userauth(session_id: &[u8], user: &PrivateKey) -> Vec<u8> {
    let mut data = Vec::new();
    session_id.encode(&mut data).unwrap();
    USERAUTH_REQUEST.encode(&mut data).unwrap();
    for field in ["git", "ssh-connection", "publickey"] {
        field.encode(&mut data).unwrap();
    }
    1u8.encode(&mut data).unwrap();
    "ssh-ed25519".encode(&mut data).unwrap();
    user.public_key()
        .key_data()
        .encode_prefixed(&mut data)
        .unwrap();
    data
}

fn sign_request(f: &Fixture, session_id: &[u8]) -> AgentRequest {
    AgentRequest::Sign {
        key: f.user.public_key().key_data().clone(),
        data: userauth(session_id, &f.user),
    }
}

/// Runs `requests` through one connection; the last answer.
fn run(f: &Fixture, requests: Vec<AgentRequest>) -> AgentResponse {
    let mut session = SshSession::new(&f.agent);
    let mut last = AgentResponse::Failure;
    for r in requests {
        // Every request crosses the wire format first, as from a real client.
        let r = AgentRequest::parse(&r.encode()).expect("round trip");
        last = session.handle(r);
    }
    last
}

const SID: &[u8] = b"session-id-of-the-key-exchange-0";

#[test]
fn identities_list_only_the_secrets_key() {
    let f = fixture();
    assert_eq!(
        run(&f, vec![AgentRequest::Identities]),
        AgentResponse::Identity(
            f.user.public_key().key_data().clone(),
            "hutch secret deploy".into()
        )
    );
    assert!(f.events.decisions().is_empty(), "listing is not a use");
}

#[test]
fn without_a_bind_nothing_is_signed() {
    let f = fixture();
    assert_eq!(run(&f, vec![sign_request(&f, SID)]), AgentResponse::Failure);
    let d = f.events.decisions();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].0, BrokerDecision::Refused);
    assert!(d[0].1.contains("no session-bind"), "{d:?}");
}

#[test]
fn a_bind_to_a_host_key_off_the_list_is_refused_and_nothing_signed_after() {
    let f = fixture();
    let other = bind(&f.other_host, SID, false);
    assert_eq!(run(&f, vec![other.clone()]), AgentResponse::Failure);
    assert_eq!(
        run(&f, vec![other, sign_request(&f, SID)]),
        AgentResponse::Failure
    );
    let d = f.events.decisions();
    assert!(d.iter().all(|(dec, _)| *dec == BrokerDecision::Refused));
    assert!(d[0].1.contains("not on the secret's allow-list"), "{d:?}");
    assert!(d.last().unwrap().1.contains("bind was refused"), "{d:?}");
    let fingerprint = f
        .other_host
        .public_key()
        .fingerprint(HashAlg::Sha256)
        .to_string();
    assert_eq!(f.events.0.lock().unwrap()[0].host, fingerprint);
}

#[test]
fn a_bind_whose_signature_does_not_verify_is_refused() {
    let f = fixture();
    // The allowed host key, but signed by another key: someone replaying the public key.
    let AgentRequest::Bind(mut forged) = bind(&f.allowed_host, SID, false) else {
        unreachable!()
    };
    forged.signature = sign(&f.other_host, SID).unwrap();
    // And a genuine signature over another session id.
    let AgentRequest::Bind(mut moved) = bind(&f.allowed_host, b"another-session", false) else {
        unreachable!()
    };
    moved.session_id = SID.to_vec();
    for bad in [forged, moved] {
        let reply = run(&f, vec![AgentRequest::Bind(bad), sign_request(&f, SID)]);
        assert_eq!(reply, AgentResponse::Failure);
    }
    let d = f.events.decisions();
    assert!(d[0].1.contains("does not verify"), "{d:?}");
    assert!(d.iter().all(|(dec, _)| *dec == BrokerDecision::Refused));
}

#[test]
fn a_forwarding_bind_is_refused() {
    let f = fixture();
    let reply = run(
        &f,
        vec![bind(&f.allowed_host, SID, true), sign_request(&f, SID)],
    );
    assert_eq!(reply, AgentResponse::Failure);
    assert!(f.events.decisions()[0].1.contains("forwarded session"));
}

#[test]
fn a_good_bind_signs_the_sessions_user_authentication_only() {
    let f = fixture();
    let reply = run(
        &f,
        vec![bind(&f.allowed_host, SID, false), sign_request(&f, SID)],
    );
    let AgentResponse::Signature(sig) = reply else {
        panic!("expected a signature, got {reply:?}");
    };
    verify(
        f.user.public_key().key_data(),
        &userauth(SID, &f.user),
        &sig,
    )
    .expect("a signature by the secret's key");
    let events = f.events.0.lock().unwrap().clone();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].decision, BrokerDecision::Signed);
    assert_eq!(
        events[0].host,
        f.allowed_host
            .public_key()
            .fingerprint(HashAlg::Sha256)
            .to_string()
    );
    assert_eq!(
        (events[0].sandbox_id.as_str(), events[0].secret.as_str()),
        ("sb-1", "deploy")
    );

    // Bound, but data of another session, data that is no user authentication, another key,
    // or a second bind: refused.
    let other_session = AgentRequest::Sign {
        key: f.user.public_key().key_data().clone(),
        data: userauth(b"another-session", &f.user),
    };
    let not_userauth = AgentRequest::Sign {
        key: f.user.public_key().key_data().clone(),
        data: b"arbitrary challenge".to_vec(),
    };
    let other_key = AgentRequest::Sign {
        key: f.other_host.public_key().key_data().clone(),
        data: userauth(SID, &f.user),
    };
    for bad in [other_session, not_userauth, other_key] {
        let reply = run(&f, vec![bind(&f.allowed_host, SID, false), bad]);
        assert_eq!(reply, AgentResponse::Failure);
    }
    let twice = run(
        &f,
        vec![
            bind(&f.allowed_host, SID, false),
            bind(&f.allowed_host, SID, false),
            sign_request(&f, SID),
        ],
    );
    assert_eq!(twice, AgentResponse::Failure);
}

/// A `session-bind@openssh.com` captured from OpenSSH (ssh-agent-lib's test vector, its
/// body after the extension name): an Ed25519 host key, a 32-byte session id, a signature.
const OPENSSH_BIND: &[u8] = &[
    0, 0, 0, 51, 0, 0, 0, 11, 115, 115, 104, 45, 101, 100, 50, 53, 53, 49, 57, 0, 0, 0, 32, 177,
    185, 198, 92, 165, 45, 127, 95, 202, 195, 226, 63, 6, 115, 10, 104, 18, 137, 172, 240, 153,
    154, 174, 74, 83, 7, 1, 204, 14, 177, 153, 40, 0, 0, 0, 32, 138, 165, 196, 144, 149, 107, 183,
    188, 222, 182, 34, 173, 59, 118, 9, 35, 186, 147, 114, 114, 50, 106, 41, 182, 196, 119, 226,
    82, 233, 148, 236, 135, 0, 0, 0, 83, 0, 0, 0, 11, 115, 115, 104, 45, 101, 100, 50, 53, 53, 49,
    57, 0, 0, 0, 64, 95, 212, 52, 189, 8, 162, 17, 3, 15, 218, 2, 4, 136, 7, 47, 57, 121, 6, 194,
    165, 221, 27, 175, 241, 6, 57, 84, 141, 77, 55, 235, 9, 77, 160, 32, 76, 11, 227, 240, 235,
    122, 178, 80, 133, 183, 91, 89, 89, 142, 115, 145, 15, 78, 112, 139, 28, 201, 8, 197, 222, 117,
    141, 88, 5, 0,
];

#[test]
fn a_bind_captured_from_openssh_parses_and_verifies() {
    let mut body = vec![EXTENSION];
    SESSION_BIND.encode(&mut body).unwrap();
    body.extend_from_slice(OPENSSH_BIND);
    let Some(AgentRequest::Bind(b)) = AgentRequest::parse(&body) else {
        panic!("not parsed as a bind");
    };
    assert!(!b.is_forwarding);
    assert_eq!(b.session_id.len(), 32);
    verify(&b.host_key, &b.session_id, &b.signature).expect("OpenSSH's own signature");
    let mut tampered = b.session_id.clone();
    tampered[0] ^= 1;
    assert!(verify(&b.host_key, &tampered, &b.signature).is_err());
    // A trailing byte makes it malformed.
    body.push(0);
    assert_eq!(AgentRequest::parse(&body), None);
}

#[test]
fn keys_are_checked_when_set() {
    let user = key(1);
    assert!(parse_private_key(&value_of(&user)).is_ok());
    assert!(parse_private_key(&SecretValue::new(b"not a key".to_vec())).is_err());
    // A key file whose public half is another key's.
    let KeypairData::Ed25519(pair) = user.key_data() else {
        unreachable!()
    };
    let mut bytes = pair.to_bytes();
    bytes[32..].copy_from_slice(&key(2).public_key().key_data().ed25519().unwrap().0);
    let mismatched = PrivateKey::new(
        KeypairData::Ed25519(Ed25519Keypair::from_bytes(&bytes).unwrap()),
        "",
    )
    .unwrap();
    assert!(parse_private_key(&value_of(&mismatched)).is_err());
    let line = format!("{} host.example", public_key_line(&key(2)));
    let canonical = canonical_host_key(&line).unwrap();
    assert!(canonical.starts_with("ssh-ed25519 AAAA") && !canonical.contains("host.example"));
    assert!(canonical_host_key("ssh-ed25519 not-base64").is_err());
    let events: Arc<dyn EventSink> = Arc::new(Events::default());
    assert!(SshAgentKey::new("sb", "k", &value_of(&user), &[], events).is_err());
}

#[tokio::test]
async fn the_agent_serves_framed_messages_and_drops_an_oversized_one() {
    let f = Arc::new(fixture());
    let agent = Arc::new(
        SshAgentKey::new(
            "sb-1",
            "deploy",
            &value_of(&f.user),
            &[public_key_line(&f.allowed_host)],
            f.events.clone(),
        )
        .unwrap(),
    );
    let (mut client, server) = tokio::io::duplex(1 << 16);
    let serving = tokio::spawn(agent.serve(server));
    let mut ask = AgentRequest::Identities.encode();
    ask.splice(0..0, (ask.len() as u32).to_be_bytes());
    client.write_all(&ask).await.unwrap();
    let mut len = [0u8; 4];
    client.read_exact(&mut len).await.unwrap();
    let mut answer = vec![0u8; u32::from_be_bytes(len) as usize];
    client.read_exact(&mut answer).await.unwrap();
    assert_eq!(answer[0], IDENTITIES_ANSWER);
    // A length beyond the agent's bound ends the connection without buffering it.
    client
        .write_all(&(MAX_AGENT_MESSAGE as u32 + 1).to_be_bytes())
        .await
        .unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), serving)
        .await
        .expect("the agent must hang up")
        .unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
}
