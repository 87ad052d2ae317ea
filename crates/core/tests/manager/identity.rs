//! Workload identity through the manager: each sandbox's guest gets tokens that name that
//! sandbox (the issuer is bound to its channel when it goes live), signed by the key the JWKS
//! publishes; the metrics count creates and tokens.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use hutch_core::{
    identity::{IdentityConfig, Issuer},
    metrics::CreatePath,
};
use hutch_protocol::ExitStatus;
use hutch_types::NetworkPolicy;

use crate::world::{sh, spec, World};

/// The token a guest process of sandbox `id` gets for `audience`, through the agent's
/// socket and the `hutch-identity` client.
async fn guest_token(w: &World, id: &str, audience: &str) -> String {
    let client = w.dir.path().join("hutch-identity");
    if !client.exists() {
        std::os::unix::fs::symlink(hutch_testkit::agent_binary(), &client).unwrap();
    }
    let socket = w.runs_dir().join(id).join(hutch_testkit::IDENTITY_SOCKET);
    let script = format!(
        "for i in $(seq 100); do [ -S {s} ] && break; sleep 0.05; done; \
         HUTCH_IDENTITY_SOCKET={s} {c} token --audience {audience}",
        s = socket.display(),
        c = client.display()
    );
    let channel = w.manager.channel(id).await.unwrap();
    let (out, status) = sh(&channel, &script).await;
    assert_eq!(status, ExitStatus::Code(0), "no token for {id}");
    out.trim().to_string()
}

/// The claims of `token`, after checking its signature against the issuer's JWKS key.
fn verified_claims(issuer: &Issuer, token: &str) -> serde_json::Value {
    let parts: Vec<&str> = token.split('.').collect();
    let jwk = &issuer.jwks()["keys"][0];
    let x = URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap();
    let key = VerifyingKey::from_bytes(&x.try_into().unwrap()).unwrap();
    let sig = Signature::from_slice(&URL_SAFE_NO_PAD.decode(parts[2]).unwrap()).unwrap();
    key.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
        .expect("signed by the published key");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap()
}

#[tokio::test]
async fn each_guest_gets_tokens_naming_its_own_sandbox() {
    let w = World::new().await;
    let cfg = IdentityConfig {
        issuer: "http://hutch.test".into(),
        lifetime: Duration::from_secs(60),
    };
    let issuer = Arc::new(Issuer::load_or_create(&w.dir.path().join("id.key"), cfg).unwrap());
    w.manager.set_identity(issuer.clone());
    let mut labelled = spec(NetworkPolicy::None);
    labelled.labels.insert("team".into(), "y".into());
    let (a, _) = w.manager.create(labelled, None).await.unwrap();
    let (b, _) = w
        .manager
        .create(spec(NetworkPolicy::None), None)
        .await
        .unwrap();

    let claims_a = verified_claims(&issuer, &guest_token(&w, &a.id, "svc").await);
    let claims_b = verified_claims(&issuer, &guest_token(&w, &b.id, "svc").await);
    assert_eq!(claims_a["sub"], a.id.as_str());
    assert_eq!(claims_b["sub"], b.id.as_str());
    assert_eq!(claims_a["labels"]["team"], "y");
    assert!(claims_b["labels"].get("team").is_none());
    assert_eq!(claims_a["iss"], "http://hutch.test");
    assert_eq!(claims_a["aud"], "svc");

    let metrics = w.manager.metrics();
    assert_eq!(metrics.creates(CreatePath::Cold), 2);
    assert_eq!(metrics.tokens_issued.get(), 2);
    let text = metrics.render(&BTreeMap::new());
    assert!(
        text.contains("hutch_identity_tokens_issued_total 2\n"),
        "{text}"
    );

    for id in [a.id, b.id] {
        w.manager.destroy(&id).await.unwrap();
    }
    w.assert_nothing_left();
}
