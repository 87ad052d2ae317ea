//! A task's attestation: an [in-toto Statement v1] about what the task produced (the
//! changeset, the workspace it started from and, for a git workspace, its base commit), whose
//! predicate says what ran, in which image, under which network policy and with which
//! verdict, plus the sandbox journal's checkpoint at the end, carried in a [DSSE] envelope
//! signed by the sandbox's identity key (certified by the host key in the sandbox's journal,
//! destroyed at its seal: so the envelope is signed at the task's end, before its sandbox goes)
//! and by the host key. [`verify`] checks all of it and names every flaw.
//!
//! [in-toto Statement v1]: https://github.com/in-toto/attestation/blob/main/spec/v1/statement.md
//! [DSSE]: https://github.com/secure-systems-lab/dsse/blob/master/protocol.md

use std::collections::{BTreeMap, BTreeSet};

use base64::{engine::general_purpose::STANDARD, Engine};
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use hutch_types::NetworkPolicy;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{baseline::sha256_hex, Limits, TaskRecord, Verdict};

/// The statement's `_type`.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// The envelope's `payloadType`.
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// The predicate type of a Hutch task.
pub const PREDICATE_TYPE: &str = "https://hutch.dev/attestation/task/v1";
/// The subject naming the changeset stream (`changeset.bin`), digest `sha256`.
pub const CHANGESET_SUBJECT: &str = "changeset.bin";
/// The subject naming the workspace archive the task started from, digest `sha256`.
pub const WORKSPACE_SUBJECT: &str = "workspace.tar";
/// The subject naming the workspace's git `HEAD` commit, digest `gitCommit`.
pub const BASE_SUBJECT: &str = "base";

/// One subject of a statement: a name and its digests (algorithm → lowercase hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Subject {
    /// What it names.
    pub name: String,
    /// Digests by algorithm (`sha256`, `gitCommit`).
    pub digest: BTreeMap<String, String>,
}

impl Subject {
    fn new(name: &str, algorithm: &str, digest: String) -> Subject {
        Subject {
            name: name.into(),
            digest: [(algorithm.to_string(), digest)].into(),
        }
    }
}

/// The sandbox whose identity key signed, as its journal's first record certifies it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxIdentity {
    /// The sandbox id.
    pub id: String,
    /// Its identity key (Ed25519, hex).
    pub public_key: String,
    /// The host key's certificate of that key (hex; see `hutch_journal::key`).
    pub certificate: String,
}

/// The image the task's sandbox ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImageRef {
    /// Its name.
    pub name: String,
    /// The template the sandbox was restored from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Its digest, when the host knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// How the agent's command ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Exit {
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Signal, when it was killed.
    pub signal: Option<i32>,
    /// Whether the task's timeout killed it.
    pub timed_out: bool,
}

/// What changes were allowed: the allowlist and the limits `apply` validates with again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AttestedPolicy {
    /// Globs the changed paths had to match.
    pub allow: Vec<String>,
    /// Size and count limits.
    pub limits: Limits,
}

/// The predicate of a Hutch task statement ([`PREDICATE_TYPE`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskPredicate {
    /// The task id.
    pub task: String,
    /// The sandbox that ran it, and its certified identity key.
    pub sandbox: SandboxIdentity,
    /// The host key (Ed25519, hex) that certified the sandbox key and co-signs.
    pub host_key: String,
    /// What ran (argv).
    pub command: Vec<String>,
    /// In which image.
    pub image: ImageRef,
    /// Under which network policy.
    #[schema(value_type = Object)]
    pub network: NetworkPolicy,
    /// What the changes could touch.
    pub policy: AttestedPolicy,
    /// How the command ended (none when it never started).
    pub exit: Option<Exit>,
    /// The host's verdict on its changes (with every refusal's reason).
    pub verdict: Verdict,
    /// SHA-256 of the host's baseline manifest of the workspace.
    pub baseline_digest: String,
    /// The sandbox journal's latest checkpoint (a signed note) when the task ended.
    pub journal_checkpoint: Option<String>,
    /// When the statement was made, milliseconds since the epoch.
    pub finished_ms: i64,
}

/// An in-toto Statement v1 about a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Statement {
    /// [`STATEMENT_TYPE`].
    #[serde(rename = "_type")]
    pub statement_type: String,
    /// What it is about.
    pub subject: Vec<Subject>,
    /// [`PREDICATE_TYPE`].
    #[serde(rename = "predicateType")]
    pub predicate_type: String,
    /// What it says.
    pub predicate: TaskPredicate,
}

impl Statement {
    /// The statement about a task that started from the workspace archive whose SHA-256 is
    /// `workspace` (its git `HEAD`, if any, being `base`) and produced the changeset stream
    /// whose SHA-256 is `changeset` (none when it was not accepted).
    pub fn new(
        predicate: TaskPredicate,
        changeset: Option<String>,
        workspace: String,
        base: Option<String>,
    ) -> Statement {
        let changeset = changeset.map(|c| Subject::new(CHANGESET_SUBJECT, "sha256", c));
        let workspace = Subject::new(WORKSPACE_SUBJECT, "sha256", workspace);
        let base = base.map(|c| Subject::new(BASE_SUBJECT, "gitCommit", c));
        Statement {
            statement_type: STATEMENT_TYPE.into(),
            subject: changeset
                .into_iter()
                .chain([workspace])
                .chain(base)
                .collect(),
            predicate_type: PREDICATE_TYPE.into(),
            predicate,
        }
    }

    /// The `sha256` of the subject named `name`, if there is one.
    pub fn digest(&self, name: &str, algorithm: &str) -> Option<&str> {
        self.subject
            .iter()
            .find(|s| s.name == name)
            .and_then(|s| s.digest.get(algorithm))
            .map(String::as_str)
    }
}

/// One signature of an envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EnvelopeSignature {
    /// Which key: [`keyid`] of its public key.
    pub keyid: String,
    /// The Ed25519 signature over the PAE, standard base64.
    pub sig: String,
}

/// A DSSE envelope (JSON form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Envelope {
    /// The serialized statement, standard base64.
    pub payload: String,
    /// [`PAYLOAD_TYPE`].
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    /// The signatures.
    pub signatures: Vec<EnvelopeSignature>,
}

/// DSSE's pre-authentication encoding of `payload` of type `payload_type`: what is signed.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// A key's id in an envelope: the lowercase hex SHA-256 of its 32 raw public key bytes.
pub fn keyid(public: &[u8; 32]) -> String {
    hex::encode(Sha256::digest(public))
}

impl Envelope {
    /// An unsigned envelope around `statement`.
    pub fn new(statement: &Statement) -> Envelope {
        let payload = serde_json::to_vec(statement).expect("a statement serialises");
        Envelope {
            payload: STANDARD.encode(payload),
            payload_type: PAYLOAD_TYPE.into(),
            signatures: vec![],
        }
    }

    /// What each signer signs: the PAE of the payload (empty if it is not base64).
    pub fn pae(&self) -> Vec<u8> {
        pae(
            &self.payload_type,
            &STANDARD.decode(&self.payload).unwrap_or_default(),
        )
    }

    /// Adds the signature `sig` by the key `public`.
    pub fn add_signature(&mut self, public: &[u8; 32], sig: &[u8; 64]) {
        self.signatures.push(EnvelopeSignature {
            keyid: keyid(public),
            sig: STANDARD.encode(sig),
        });
    }
}

/// Why an attestation does not vouch for a changeset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Flaw {
    /// The envelope is not of the in-toto payload type.
    #[error("the payload type is {0:?}, not {PAYLOAD_TYPE}")]
    PayloadType(String),
    /// The payload is not base64, or not a statement of this kind.
    #[error("the payload is not a Hutch task statement: {0}")]
    Payload(String),
    /// No signature by this key.
    #[error("no signature by the {who} key ({keyid:.16}…)")]
    MissingSignature {
        /// `host` or `sandbox`.
        who: &'static str,
        /// Its keyid.
        keyid: String,
    },
    /// A signature by this key does not verify.
    #[error("the {who} key's signature does not match the payload")]
    BadSignature {
        /// `host` or `sandbox`.
        who: &'static str,
    },
    /// The statement names another host key than the one checked against.
    #[error("the statement names host key {0:.16}…, not this host's")]
    HostKey(String),
    /// The sandbox key is not certified by the host key.
    #[error("the sandbox key of {0} is not certified by the host key")]
    Uncertified(String),
    /// The statement names no changeset.
    #[error("the statement names no changeset")]
    NoChangeset,
    /// The changeset is not the attested one.
    #[error("the changeset's sha256 is {actual:.16}…, the attested one {attested:.16}…")]
    ChangesetDigest {
        /// Its digest.
        actual: String,
        /// The statement's.
        attested: String,
    },
}

/// Checks `envelope` against the host key `host`: its payload is a Hutch task statement; it
/// carries a valid signature by the host key and one by the sandbox key the statement names,
/// that key being certified by the host key; and, given `changeset`, that the stream's
/// SHA-256 is the attested subject's. The statement, or every flaw found.
pub fn verify(
    envelope: &Envelope,
    host: &[u8; 32],
    changeset: Option<&[u8]>,
) -> Result<Statement, Vec<Flaw>> {
    let mut flaws = vec![];
    if envelope.payload_type != PAYLOAD_TYPE {
        flaws.push(Flaw::PayloadType(envelope.payload_type.clone()));
    }
    let pae = envelope.pae();
    if let Some(flaw) = check_signature(envelope, "host", host, &pae) {
        flaws.push(flaw);
    }
    let statement = match statement(envelope) {
        Ok(s) => s,
        Err(flaw) => {
            flaws.push(flaw);
            return Err(flaws);
        }
    };
    let p = &statement.predicate;
    if p.host_key != hex::encode(host) {
        flaws.push(Flaw::HostKey(p.host_key.clone()));
    }
    match sandbox_key(&p.sandbox, host) {
        Some(key) => flaws.extend(check_signature(envelope, "sandbox", &key, &pae)),
        None => flaws.push(Flaw::Uncertified(p.sandbox.id.clone())),
    }
    if let Some(stream) = changeset {
        match statement.digest(CHANGESET_SUBJECT, "sha256") {
            None => flaws.push(Flaw::NoChangeset),
            Some(attested) => {
                let actual = sha256_hex(stream);
                if actual != attested {
                    flaws.push(Flaw::ChangesetDigest {
                        actual,
                        attested: attested.into(),
                    });
                }
            }
        }
    }
    if flaws.is_empty() {
        Ok(statement)
    } else {
        Err(flaws)
    }
}

/// Why a task whose record an older hutch signed is refused.
pub const LEGACY_RECORD: &str = "the task was stored by a hutch from before attestations (a \
     host-signed record only, no longer accepted: its sandbox key is gone, so it cannot be \
     attested now); run the task again";

/// Checks a stored task against its attestation `envelope` (`None`: it has none), with the
/// host key `host`: the envelope verifies (both signatures, the sandbox key certified, and the
/// `changeset` stream, if one is stored, its attested subject; an attested changeset must be
/// there); it is about `record`'s task; `baseline_digest` (the stored baseline's) is the
/// attested one; and what the record says of the attested facts (command, exit, verdict,
/// baseline and changeset digests) is what the statement says. The rest of the record
/// (output, timings, the verify run) is not attested. The statement, or every reason.
pub fn check_task(
    envelope: Option<&Envelope>,
    host: &[u8; 32],
    record: &TaskRecord,
    baseline_digest: &str,
    changeset: Option<&[u8]>,
) -> Result<Statement, Vec<String>> {
    let Some(envelope) = envelope else {
        let why = match record.signature {
            Some(_) => LEGACY_RECORD.to_string(),
            None => "the task has no attestation (it ended before its sandbox attested it)".into(),
        };
        return Err(vec![why]);
    };
    let statement = verify(envelope, host, changeset)
        .map_err(|flaws| flaws.iter().map(ToString::to_string).collect::<Vec<_>>())?;
    let p = &statement.predicate;
    let mut reasons = vec![];
    let mut differs = |what: &str, same: bool| {
        if !same {
            reasons.push(format!("{what} is not the attested one"));
        }
    };
    differs("the task", p.task == record.id);
    differs("the stored baseline", p.baseline_digest == baseline_digest);
    differs(
        "the record's baseline digest",
        p.baseline_digest == record.baseline_digest,
    );
    let attested = statement.digest(CHANGESET_SUBJECT, "sha256");
    differs(
        "the record's changeset digest",
        attested == record.changeset_digest.as_deref(),
    );
    differs("the record's command", p.command == record.spec.command);
    differs("the record's verdict", p.verdict == record.verdict);
    let exit = record.agent.as_ref().map(|a| Exit {
        code: a.exit_code,
        signal: a.signal,
        timed_out: a.timed_out,
    });
    differs("the record's exit", p.exit == exit);
    if attested.is_some() && changeset.is_none() {
        reasons.push("the attested changeset is not stored".into());
    }
    if reasons.is_empty() {
        Ok(statement)
    } else {
        Err(reasons)
    }
}

/// The statement an envelope carries (unchecked).
pub fn statement(envelope: &Envelope) -> Result<Statement, Flaw> {
    let payload = STANDARD
        .decode(&envelope.payload)
        .map_err(|e| Flaw::Payload(format!("not base64: {e}")))?;
    let statement: Statement =
        serde_json::from_slice(&payload).map_err(|e| Flaw::Payload(e.to_string()))?;
    if statement.statement_type != STATEMENT_TYPE || statement.predicate_type != PREDICATE_TYPE {
        return Err(Flaw::Payload(format!(
            "type {} / predicate {}",
            statement.statement_type, statement.predicate_type
        )));
    }
    Ok(statement)
}

/// The sandbox's identity key, if the host key `host` certifies it.
fn sandbox_key(sandbox: &SandboxIdentity, host: &[u8; 32]) -> Option<[u8; 32]> {
    let key: [u8; 32] = hex::decode(&sandbox.public_key).ok()?.try_into().ok()?;
    hutch_journal::key::certified(host, &sandbox.id, &key, &sandbox.certificate).then_some(key)
}

/// The flaw of `envelope`'s signature by `key` over `pae`, if it has no valid one.
fn check_signature(
    envelope: &Envelope,
    who: &'static str,
    key: &[u8; 32],
    pae: &[u8],
) -> Option<Flaw> {
    let id = keyid(key);
    let ours: Vec<_> = envelope
        .signatures
        .iter()
        .filter(|s| s.keyid == id)
        .collect();
    if ours.is_empty() {
        return Some(Flaw::MissingSignature { who, keyid: id });
    }
    let verifying = VerifyingKey::from_bytes(key).ok()?;
    let valid = ours.iter().any(|s| {
        STANDARD
            .decode(&s.sig)
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
            .is_some_and(|sig| verifying.verify(pae, &Signature::from_bytes(&sig)).is_ok())
    });
    (!valid).then_some(Flaw::BadSignature { who })
}

/// The commit a workspace archive's `.git/HEAD` names (directly, through a loose ref or
/// `packed-refs`), if it is a git workspace with a commit.
pub fn base_commit(workspace_tar: &[u8]) -> Option<String> {
    let read = |wanted: &[&str]| {
        let wanted: BTreeSet<String> = wanted.iter().map(|s| s.to_string()).collect();
        crate::baseline::tar_files(workspace_tar, &wanted).ok()
    };
    let files = read(&[".git/HEAD", ".git/packed-refs"])?;
    let head = String::from_utf8(files.get(".git/HEAD")?.clone()).ok()?;
    let head = head.trim();
    let Some(name) = head.strip_prefix("ref: ") else {
        return object_id(head);
    };
    let safe = name.starts_with("refs/")
        && !name
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if !safe {
        return None;
    }
    let loose = format!(".git/{name}");
    if let Some(id) = read(&[&loose])?.get(&loose) {
        return object_id(String::from_utf8_lossy(id).trim());
    }
    let packed = String::from_utf8_lossy(files.get(".git/packed-refs")?).into_owned();
    packed
        .lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(_, r)| *r == name)
        .and_then(|(id, _)| object_id(id))
}

/// `s` if it is a git object id (40 or 64 lowercase hex digits).
fn object_id(s: &str) -> Option<String> {
    let hex = s
        .chars()
        .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
    (hex && (s.len() == 40 || s.len() == 64)).then(|| s.to_string())
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::{Signer, SigningKey};

    use super::*;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    fn certify(host: &SigningKey, sandbox: &str, key: &SigningKey) -> String {
        let msg = hutch_journal::key::certificate_message(sandbox, &key.verifying_key().to_bytes());
        hex::encode(host.sign(&msg).to_bytes())
    }

    fn statement(host: &SigningKey, sandbox: &SigningKey, changeset: &[u8]) -> Statement {
        let predicate = TaskPredicate {
            task: "task-00000000aa".into(),
            sandbox: SandboxIdentity {
                id: "sb-1".into(),
                public_key: hex::encode(sandbox.verifying_key().to_bytes()),
                certificate: certify(host, "sb-1", sandbox),
            },
            host_key: hex::encode(host.verifying_key().to_bytes()),
            command: vec!["sh".into(), "-c".into(), "echo hi > a".into()],
            image: ImageRef {
                name: "default".into(),
                template: None,
                digest: Some("sha256:00".into()),
            },
            network: NetworkPolicy::None,
            policy: AttestedPolicy {
                allow: vec![],
                limits: Limits::default(),
            },
            exit: Some(Exit {
                code: Some(0),
                ..Exit::default()
            }),
            verdict: Verdict::Accepted { changes: 1 },
            baseline_digest: "ab".into(),
            journal_checkpoint: Some("note".into()),
            finished_ms: 1,
        };
        Statement::new(
            predicate,
            Some(sha256_hex(changeset)),
            sha256_hex(b"tar"),
            Some("a".repeat(40)),
        )
    }

    fn signed(statement: &Statement, signers: &[&SigningKey]) -> Envelope {
        let mut env = Envelope::new(statement);
        for k in signers {
            let sig = k.sign(&env.pae()).to_bytes();
            env.add_signature(&k.verifying_key().to_bytes(), &sig);
        }
        env
    }

    fn host_pub(k: &SigningKey) -> [u8; 32] {
        k.verifying_key().to_bytes()
    }

    #[test]
    fn pae_is_dsse_v1() {
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
        );
    }

    #[test]
    fn a_doubly_signed_statement_verifies_and_names_its_subjects() {
        let (host, sb) = (key(1), key(2));
        let env = signed(&statement(&host, &sb, b"stream"), &[&sb, &host]);
        let s = verify(&env, &host_pub(&host), Some(b"stream")).unwrap();
        assert_eq!(
            s.digest(CHANGESET_SUBJECT, "sha256"),
            Some(sha256_hex(b"stream").as_str())
        );
        assert_eq!(
            s.digest(BASE_SUBJECT, "gitCommit"),
            Some("a".repeat(40).as_str())
        );
        let json: serde_json::Value =
            serde_json::from_slice(&STANDARD.decode(&env.payload).unwrap()).unwrap();
        assert_eq!(json["_type"], STATEMENT_TYPE);
        assert_eq!(json["predicateType"], PREDICATE_TYPE);
    }

    #[test]
    fn a_tampered_payload_is_refused_by_both_signatures() {
        let (host, sb) = (key(1), key(2));
        let mut env = signed(&statement(&host, &sb, b"stream"), &[&sb, &host]);
        let mut s: Statement =
            serde_json::from_slice(&STANDARD.decode(&env.payload).unwrap()).unwrap();
        s.predicate.command = vec!["true".into()];
        env.payload = STANDARD.encode(serde_json::to_vec(&s).unwrap());
        let flaws = verify(&env, &host_pub(&host), Some(b"stream")).unwrap_err();
        assert_eq!(
            flaws,
            [
                Flaw::BadSignature { who: "host" },
                Flaw::BadSignature { who: "sandbox" }
            ]
        );
    }

    #[test]
    fn a_wrong_key_is_refused() {
        let (host, sb, other) = (key(1), key(2), key(3));
        // Signed by a key that is not the sandbox's certified one.
        let env = signed(&statement(&host, &sb, b"stream"), &[&other, &host]);
        let flaws = verify(&env, &host_pub(&host), None).unwrap_err();
        assert!(
            matches!(&flaws[..], [Flaw::MissingSignature { who: "sandbox", .. }]),
            "{flaws:?}"
        );
        // Checked against another host key: the host signature, the named host key and the
        // sandbox key's certificate all fail.
        let env = signed(&statement(&host, &sb, b"stream"), &[&sb, &host]);
        let flaws = verify(&env, &host_pub(&other), None).unwrap_err();
        assert!(
            matches!(
                &flaws[..],
                [
                    Flaw::MissingSignature { who: "host", .. },
                    Flaw::HostKey(_),
                    Flaw::Uncertified(_)
                ]
            ),
            "{flaws:?}"
        );
        // A signature under the right keyid made by another key.
        let mut env = signed(&statement(&host, &sb, b"stream"), &[&sb, &host]);
        env.signatures[0].sig = STANDARD.encode(other.sign(&env.pae()).to_bytes());
        let flaws = verify(&env, &host_pub(&host), None).unwrap_err();
        assert_eq!(flaws, [Flaw::BadSignature { who: "sandbox" }]);
    }

    #[test]
    fn a_missing_signature_is_refused() {
        let (host, sb) = (key(1), key(2));
        let s = statement(&host, &sb, b"stream");
        let flaws = verify(&signed(&s, &[&host]), &host_pub(&host), None).unwrap_err();
        assert!(matches!(
            &flaws[..],
            [Flaw::MissingSignature { who: "sandbox", .. }]
        ));
        let flaws = verify(&signed(&s, &[&sb]), &host_pub(&host), None).unwrap_err();
        assert!(matches!(
            &flaws[..],
            [Flaw::MissingSignature { who: "host", .. }]
        ));
        let flaws = verify(&signed(&s, &[]), &host_pub(&host), None).unwrap_err();
        assert_eq!(flaws.len(), 2, "{flaws:?}");
    }

    #[test]
    fn a_changeset_that_is_not_the_attested_one_is_refused() {
        let (host, sb) = (key(1), key(2));
        let env = signed(&statement(&host, &sb, b"stream"), &[&sb, &host]);
        let flaws = verify(&env, &host_pub(&host), Some(b"streaM")).unwrap_err();
        assert_eq!(
            flaws,
            [Flaw::ChangesetDigest {
                actual: sha256_hex(b"streaM"),
                attested: sha256_hex(b"stream"),
            }]
        );
        assert!(flaws[0].to_string().contains("sha256"));
        // A statement without a changeset vouches for none.
        let mut s = statement(&host, &sb, b"stream");
        s.subject.retain(|s| s.name != CHANGESET_SUBJECT);
        let flaws = verify(
            &signed(&s, &[&sb, &host]),
            &host_pub(&host),
            Some(b"stream"),
        );
        assert_eq!(flaws.unwrap_err(), [Flaw::NoChangeset]);
    }

    /// The record `statement` (by [`statement`]) is about.
    fn record_of(changeset: &[u8]) -> TaskRecord {
        TaskRecord {
            id: "task-00000000aa".into(),
            spec: serde_json::from_str(r#"{"command":["sh","-c","echo hi > a"]}"#).unwrap(),
            created_ms: 1,
            baseline_digest: "ab".into(),
            baseline_files: 1,
            agent: Some(crate::ProcessOutcome {
                exit_code: Some(0),
                signal: None,
                timed_out: false,
                stdout: String::new(),
                stderr: String::new(),
                truncated: false,
                millis: 1,
            }),
            verdict: Verdict::Accepted { changes: 1 },
            changes: vec![],
            not_carried: vec![],
            changeset_digest: Some(sha256_hex(changeset)),
            verify: None,
            timings: Default::default(),
            error: None,
            signature: None,
        }
    }

    #[test]
    fn a_stored_task_is_checked_against_its_attestation_only() {
        let (host, sb) = (key(1), key(2));
        let env = signed(&statement(&host, &sb, b"stream"), &[&sb, &host]);
        let record = record_of(b"stream");
        let check = |env: Option<&Envelope>, r: &TaskRecord, base: &str, cs: Option<&[u8]>| {
            check_task(env, &host_pub(&host), r, base, cs)
        };
        check(Some(&env), &record, "ab", Some(b"stream")).unwrap();
        // What the record says of attested facts must be what the statement says; the rest
        // (its output) is not attested.
        let mut edited = record.clone();
        edited.agent.as_mut().unwrap().exit_code = Some(3);
        edited.verdict = Verdict::Empty;
        edited.agent.as_mut().unwrap().stdout = "anything".into();
        assert_eq!(
            check(Some(&env), &edited, "ab", Some(b"stream")).unwrap_err(),
            [
                "the record's verdict is not the attested one",
                "the record's exit is not the attested one"
            ]
        );
        // Stored files that are not the attested ones, or missing.
        let reasons = check(Some(&env), &record, "cd", None).unwrap_err();
        assert_eq!(
            reasons,
            [
                "the stored baseline is not the attested one",
                "the attested changeset is not stored"
            ]
        );
        let reasons = check(Some(&env), &record, "ab", Some(b"other")).unwrap_err();
        assert!(reasons[0].contains("sha256"), "{reasons:?}");
        // No attestation: a record an older hutch signed is refused with the reason.
        let mut legacy = record.clone();
        legacy.signature = Some("00".repeat(64));
        assert_eq!(
            check(None, &legacy, "ab", Some(b"stream")).unwrap_err(),
            [LEGACY_RECORD]
        );
        let reasons = check(None, &record, "ab", None).unwrap_err();
        assert!(reasons[0].contains("no attestation"), "{reasons:?}");
    }

    #[test]
    fn a_payload_of_another_type_is_refused() {
        let (host, sb) = (key(1), key(2));
        let mut env = signed(&statement(&host, &sb, b"s"), &[&sb, &host]);
        env.payload_type = "text/plain".into();
        let flaws = verify(&env, &host_pub(&host), None).unwrap_err();
        assert_eq!(flaws[0], Flaw::PayloadType("text/plain".into()));
        // The type is signed too (PAE): both signatures fail with it.
        assert!(flaws.contains(&Flaw::BadSignature { who: "host" }));
    }

    #[test]
    fn the_base_commit_is_read_through_refs() {
        fn tar(entries: &[(&str, &str)]) -> Vec<u8> {
            let mut b = tar::Builder::new(Vec::new());
            for (path, data) in entries {
                let mut h = tar::Header::new_gnu();
                h.set_mode(0o644);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, path, data.as_bytes()).unwrap();
            }
            b.into_inner().unwrap()
        }
        let c = "0123456789abcdef0123456789abcdef01234567";
        let loose = tar(&[
            (".git/HEAD", "ref: refs/heads/main\n"),
            (".git/refs/heads/main", &format!("{c}\n")),
        ]);
        assert_eq!(base_commit(&loose).as_deref(), Some(c));
        let packed = tar(&[
            (".git/HEAD", "ref: refs/heads/main\n"),
            (
                ".git/packed-refs",
                &format!("# pack-refs\n{c} refs/heads/main\n"),
            ),
        ]);
        assert_eq!(base_commit(&packed).as_deref(), Some(c));
        let detached = tar(&[(".git/HEAD", c)]);
        assert_eq!(base_commit(&detached).as_deref(), Some(c));
        let unborn = tar(&[(".git/HEAD", "ref: refs/heads/main\n")]);
        assert_eq!(base_commit(&unborn), None);
        let escaping = tar(&[(".git/HEAD", "ref: refs/../../x\n"), ("x", c)]);
        assert_eq!(base_commit(&escaping), None);
        assert_eq!(base_commit(&tar(&[("a", "b")])), None);
    }
}
