//! Workload identity: short-lived JWTs the host signs for a sandbox, on its guest's request.
//!
//! A process in the guest asks its agent (`hutch-identity token --audience X`); the agent asks
//! over the sandbox's channel (`GuestMsg::TokenRequest`); the channel answers through the
//! [`TokenIssuer`] the manager bound to it when the sandbox went live ([`SandboxTokens`]), so
//! the token's `sub` is the sandbox the channel belongs to and nothing in the request can
//! change that. Tokens are EdDSA (Ed25519) JWTs signed with the daemon's identity key (in its
//! home, mode 0600, never sent to a guest); the daemon serves the public key as a JWKS and an
//! OpenID-style discovery document, so any service can verify a token the way it verifies a
//! CI provider's OIDC token: signature by `kid`, then `iss`, `aud` and `exp`.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, Weak},
    time::{Duration, SystemTime},
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use hutch_protocol::{host::TokenFuture, host::TokenIssuer, ErrorCode, OpError};
use hutch_task::sign::{HostKey, KeyError};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::Manager;

/// The longest lifetime a token may be given.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(600);

/// The label that names the task a sandbox runs for (its token's `task_id`).
const TASK_LABEL: &str = "hutch.task";

/// Where the discovery document and the key set are served, below the issuer URL.
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
/// See [`DISCOVERY_PATH`].
pub const JWKS_PATH: &str = "/.well-known/jwks.json";

/// Who signs tokens, as whom, and for how long they hold.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// The `iss` claim: the daemon's base URL, below which [`JWKS_PATH`] is served.
    pub issuer: String,
    /// How long a token holds (at most [`MAX_TOKEN_LIFETIME`]).
    pub lifetime: Duration,
}

/// The claims of one token.
#[derive(Debug, Clone, Serialize)]
pub struct Claims {
    /// The daemon's issuer URL.
    pub iss: String,
    /// The sandbox id.
    pub sub: String,
    /// Who the token is for, as the guest asked.
    pub aud: String,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Not before, Unix seconds (= `iat`).
    pub nbf: u64,
    /// Expires, Unix seconds.
    pub exp: u64,
    /// A random id, unique per token.
    pub jti: String,
    /// The sandbox's labels (a team, a project: what a service authorises on).
    pub labels: BTreeMap<String, String>,
    /// The task the sandbox runs for, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// The guest image's name.
    pub image: String,
    /// The guest image's digest.
    pub image_digest: String,
}

/// Signs tokens with the daemon's identity key.
pub struct Issuer {
    key: HostKey,
    kid: String,
    cfg: IdentityConfig,
}

impl Issuer {
    /// Loads the key at `path` (or makes one there, mode 0600) for `cfg`; a lifetime over
    /// [`MAX_TOKEN_LIFETIME`] is cut to it.
    pub fn load_or_create(path: &Path, mut cfg: IdentityConfig) -> Result<Issuer, KeyError> {
        let key = HostKey::load_or_create(path)?;
        cfg.lifetime = cfg.lifetime.min(MAX_TOKEN_LIFETIME);
        cfg.issuer = cfg.issuer.trim_end_matches('/').to_string();
        Ok(Issuer {
            kid: thumbprint(&key.public_bytes()),
            key,
            cfg,
        })
    }

    /// The `iss` claim.
    pub fn issuer(&self) -> &str {
        &self.cfg.issuer
    }

    /// The key id: the key's RFC 7638 thumbprint.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// How long tokens hold.
    pub fn lifetime(&self) -> Duration {
        self.cfg.lifetime
    }

    /// Signs `claims` as a compact JWS (`header.payload.signature`).
    pub fn sign(&self, claims: &Claims) -> String {
        let header = serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": self.kid});
        let signing_input = format!(
            "{}.{}",
            b64_json(&header),
            b64_json(&serde_json::to_value(claims).expect("claims serialise"))
        );
        let sig = self.key.sign_bytes(signing_input.as_bytes());
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    /// Claims for sandbox `sub` and `audience`, valid from now for the configured lifetime.
    fn claims(&self, sub: &str, audience: String, sandbox: &SandboxFacts) -> Claims {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut jti = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut jti);
        Claims {
            iss: self.cfg.issuer.clone(),
            sub: sub.to_string(),
            aud: audience,
            iat: now,
            nbf: now,
            exp: now + self.cfg.lifetime.as_secs(),
            jti: hex::encode(jti),
            labels: sandbox.labels.clone(),
            task_id: sandbox.labels.get(TASK_LABEL).cloned(),
            image: sandbox.image.clone(),
            image_digest: sandbox.image_digest.clone(),
        }
    }

    /// The public key set (RFC 7517; the key an OKP JWK, RFC 8037).
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({"keys": [{
            "kty": "OKP",
            "crv": "Ed25519",
            "x": URL_SAFE_NO_PAD.encode(self.key.public_bytes()),
            "kid": self.kid,
            "alg": "EdDSA",
            "use": "sig",
        }]})
    }

    /// The OpenID-style discovery document: where the keys are and what tokens hold.
    pub fn discovery(&self) -> serde_json::Value {
        serde_json::json!({
            "issuer": self.cfg.issuer,
            "jwks_uri": format!("{}{JWKS_PATH}", self.cfg.issuer),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["EdDSA"],
            "claims_supported": [
                "iss", "sub", "aud", "iat", "nbf", "exp", "jti",
                "labels", "task_id", "image", "image_digest",
            ],
        })
    }
}

/// RFC 7638 thumbprint of an Ed25519 public key: base64url SHA-256 of its required members
/// in lexicographic order, no whitespace (RFC 8037 §2).
fn thumbprint(public: &[u8; 32]) -> String {
    let canonical = format!(
        r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
        URL_SAFE_NO_PAD.encode(public)
    );
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

fn b64_json(v: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).expect("json serialises"))
}

/// What a token says about its sandbox besides its id.
struct SandboxFacts {
    labels: BTreeMap<String, String>,
    image: String,
    image_digest: String,
}

/// The [`TokenIssuer`] bound to one sandbox's channel: every token it issues names that
/// sandbox. Facts (labels, image) are read when a token is asked for, so a pooled clone handed
/// to a client answers with the labels it has then.
pub(crate) struct SandboxTokens {
    pub(crate) manager: Weak<Manager>,
    pub(crate) issuer: Arc<Issuer>,
    pub(crate) id: String,
}

impl TokenIssuer for SandboxTokens {
    fn issue(&self, audience: String) -> TokenFuture {
        let (manager, issuer, id) = (self.manager.clone(), self.issuer.clone(), self.id.clone());
        Box::pin(async move {
            let manager = manager
                .upgrade()
                .ok_or_else(|| unavailable("the daemon is stopping"))?;
            let info = manager
                .get(&id)
                .await
                .map_err(|e| unavailable(&crate::chain(&e)))?;
            let image_digest = manager
                .image(&info.spec.image)
                .map(|i| i.digest)
                .unwrap_or_default();
            let facts = SandboxFacts {
                labels: info.spec.labels.clone(),
                image: info.spec.image.clone(),
                image_digest,
            };
            let claims = issuer.claims(&id, audience, &facts);
            let token = issuer.sign(&claims);
            manager.metrics().tokens_issued.inc();
            if let Some(feed) = manager.guest_feed() {
                feed.record(&id, token_event(&claims));
            }
            Ok(token)
        })
    }
}

/// The journal record of a token issued for a sandbox: its audience, `jti` and expiry, never
/// the token itself (the guest asks for tokens, so it goes through the bounded
/// [`GuestFeed`](crate::audit::GuestFeed)).
pub fn token_event(claims: &Claims) -> hutch_journal::Event {
    use hutch_journal::attr;
    hutch_journal::Event::new("identity.token_issued")
        .attr(attr::IDENTITY_AUDIENCE, claims.aud.clone())
        .attr(attr::IDENTITY_TOKEN_ID, claims.jti.clone())
        .attr(attr::IDENTITY_EXPIRES, claims.exp)
}

fn unavailable(message: &str) -> OpError {
    OpError {
        code: ErrorCode::Io,
        message: message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signature, Verifier, VerifyingKey};

    fn issuer(dir: &Path, lifetime: Duration) -> Issuer {
        let cfg = IdentityConfig {
            issuer: "http://127.0.0.1:9/".into(),
            lifetime,
        };
        Issuer::load_or_create(&dir.join("identity/signing.key"), cfg).unwrap()
    }

    fn decode(part: &str) -> serde_json::Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    #[test]
    fn tokens_verify_against_the_jwks_key_and_carry_the_sandbox() {
        let dir = tempfile::tempdir().unwrap();
        let issuer = issuer(dir.path(), Duration::from_secs(3600));
        assert_eq!(
            issuer.lifetime(),
            MAX_TOKEN_LIFETIME,
            "capped at ten minutes"
        );
        let facts = SandboxFacts {
            labels: BTreeMap::from([
                ("team".into(), "y".into()),
                (TASK_LABEL.into(), "t1".into()),
            ]),
            image: "default".into(),
            image_digest: "sha256:ab".into(),
        };
        let token = issuer.sign(&issuer.claims("sb1", "svc".into(), &facts));
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header = decode(parts[0]);
        assert_eq!(header["alg"], "EdDSA");
        assert_eq!(header["kid"], issuer.kid());
        let claims = decode(parts[1]);
        assert_eq!(
            claims["iss"], "http://127.0.0.1:9",
            "trailing slash dropped"
        );
        assert_eq!(claims["sub"], "sb1");
        assert_eq!(claims["aud"], "svc");
        assert_eq!(claims["task_id"], "t1");
        assert_eq!(claims["labels"]["team"], "y");
        assert_eq!(claims["image_digest"], "sha256:ab");
        assert_eq!(
            claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
            600
        );
        let jwk = &issuer.jwks()["keys"][0];
        let x: [u8; 32] = URL_SAFE_NO_PAD
            .decode(jwk["x"].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap();
        let key = VerifyingKey::from_bytes(&x).unwrap();
        let sig = Signature::from_slice(&URL_SAFE_NO_PAD.decode(parts[2]).unwrap()).unwrap();
        let input = format!("{}.{}", parts[0], parts[1]);
        key.verify(input.as_bytes(), &sig).unwrap();
        let mut tampered = input.into_bytes();
        tampered[5] ^= 1;
        assert!(key.verify(&tampered, &sig).is_err());
        // The same key file gives the same key id.
        let again = super::tests::issuer(dir.path(), Duration::from_secs(60));
        assert_eq!(again.kid(), issuer.kid());
        assert_eq!(
            issuer.discovery()["jwks_uri"],
            "http://127.0.0.1:9/.well-known/jwks.json"
        );
    }

    #[test]
    fn the_key_id_is_the_rfc7638_thumbprint() {
        // RFC 8037 appendix A.3: the thumbprint of its example Ed25519 key.
        let x = URL_SAFE_NO_PAD
            .decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")
            .unwrap();
        assert_eq!(
            thumbprint(&x.try_into().unwrap()),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
    }
}
