//! Secrets over the fakes: scope, attachment, placeholders in every exec (never the value),
//! rotation, the broker's view, and fresh placeholders and CAs for forks and pool hand-outs.

use std::sync::Arc;

use hutch_core::{
    secrets::SetSecret,
    service::{Caller, Command, Create, Lifecycle, LocalApi, SandboxApi},
    task::Tasks,
};
use hutch_store::{Store, TokenScope};
use hutch_types::{
    BrokerDecision, BrokerEvent, ErrorCode, NetworkPolicy, SandboxId, SandboxSpec, SecretBinding,
    SecretLocation, PLACEHOLDER_PREFIX,
};

use crate::world::{clone_of, spec, template, World};

const VALUE: &str = "sk-live-REAL-value-9f8e7d";

fn surface(w: &World) -> LocalApi {
    let tasks = Arc::new(Tasks::new(w.dir.path().join("tasks"), w.manager.clone()));
    LocalApi::new(w.manager.clone(), tasks)
}

fn team(value: &str) -> Caller {
    Caller::scoped(TokenScope::Label {
        key: "team".into(),
        value: value.into(),
    })
}

fn secret(name: &str, env: &str, value: &str, at: SecretLocation) -> SetSecret {
    SetSecret {
        name: name.into(),
        value: hutch_core::secrets::SecretValue::new(value.as_bytes().to_vec()),
        env: Some(env.into()),
        bindings: Some(vec![SecretBinding {
            host: "api.example.test".into(),
            port: 443,
            path: None,
            methods: vec![],
            at,
            fetch_only: false,
        }]),
        labels: Default::default(),
        ssh_allowed_host_keys: None,
    }
}

fn with_secrets(names: &[&str], base: SandboxSpec) -> Create {
    Create {
        spec: SandboxSpec {
            secrets: names.iter().map(|n| n.to_string()).collect(),
            ..base
        },
        idempotency_key: None,
    }
}

fn code<T: std::fmt::Debug>(r: hutch_core::service::Result<T>) -> ErrorCode {
    r.expect_err("refused").code()
}

/// The guest's whole environment for an exec in `id`.
async fn guest_env(api: &LocalApi, caller: &Caller, id: &SandboxId) -> String {
    let cmd = Command {
        argv: vec!["env".into()],
        ..Command::default()
    };
    let out = api.exec(caller, id, cmd, None, 1 << 20).await.unwrap();
    String::from_utf8(out.stdout).unwrap()
}

/// `NAME=value` of `env`.
fn var<'a>(env: &'a str, name: &str) -> Option<&'a str> {
    env.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
}

/// The placeholders recorded with `id` (the API never shows them).
fn recorded(w: &World, id: &str) -> std::collections::BTreeMap<String, String> {
    w.store.get(id).unwrap().unwrap().spec.placeholders
}

#[tokio::test]
async fn secrets_are_scoped_and_reach_the_guest_only_as_placeholders() {
    let w = World::new().await;
    let api = surface(&w);
    let (a, b) = (team("a"), team("b"));
    let header = || SecretLocation::Header {
        name: "x-api-key".into(),
    };
    api.set_secret(&a, secret("a-key", "A_KEY", VALUE, header()))
        .await
        .unwrap();
    api.set_secret(&b, secret("b-key", "B_KEY", VALUE, header()))
        .await
        .unwrap();
    let names: Vec<String> = api
        .secrets(&a)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["a-key"]);

    // Attaching: only what the caller may see, and only what exists.
    let base = || spec(NetworkPolicy::None);
    assert_eq!(
        code(api.create(&a, with_secrets(&["b-key"], base())).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(api.create(&a, with_secrets(&["nope"], base())).await),
        ErrorCode::BadRequest
    );
    let mut clash = with_secrets(&["a-key"], base());
    clash.spec.env.insert("A_KEY".into(), "mine".into());
    assert_eq!(code(api.create(&a, clash).await), ErrorCode::BadRequest);
    let mut forged = with_secrets(&["a-key"], base());
    forged
        .spec
        .placeholders
        .insert("a-key".into(), "hutch_ph_mine".into());
    assert_eq!(code(api.create(&a, forged).await), ErrorCode::InvalidSpec);

    let one = api
        .create(&a, with_secrets(&["a-key"], base()))
        .await
        .unwrap()
        .0;
    let two = api
        .create(&a, with_secrets(&["a-key"], base()))
        .await
        .unwrap()
        .0;
    assert!(
        one.spec.placeholders.is_empty(),
        "the API shows no placeholder"
    );
    assert_eq!(one.spec.secrets, ["a-key"]);
    let (id1, id2): (SandboxId, SandboxId) = (one.id.parse().unwrap(), two.id.parse().unwrap());

    let env = guest_env(&api, &a, &id1).await;
    let placeholder = var(&env, "A_KEY").expect("the placeholder's variable");
    assert!(placeholder.starts_with(PLACEHOLDER_PREFIX), "{placeholder}");
    assert_eq!(
        Some(&placeholder.to_string()),
        recorded(&w, &one.id).get("a-key")
    );
    assert!(!env.contains(VALUE), "the value reached the guest: {env}");
    for ca_var in hutch_core::secrets::CA_BUNDLE_VARS {
        assert_eq!(
            var(&env, ca_var),
            Some(hutch_protocol::CA_BUNDLE),
            "{ca_var}"
        );
    }
    assert_eq!(
        var(&env, "GIT_CONFIG_SYSTEM"),
        Some(hutch_protocol::GIT_CONFIG)
    );
    let other = guest_env(&api, &a, &id2).await;
    assert_ne!(
        var(&other, "A_KEY"),
        Some(placeholder),
        "placeholders are per sandbox"
    );

    // Rotation: same placeholder, new value, seen by the broker at once.
    let rotated = SetSecret {
        env: None,
        bindings: None,
        ..secret("a-key", "A_KEY", "rotated-value", header())
    };
    api.set_secret(&a, rotated).await.unwrap();
    assert_eq!(
        var(&guest_env(&api, &a, &id1).await, "A_KEY"),
        Some(placeholder)
    );
    let attached = w.manager.attached_secrets(&one.id).await.unwrap();
    assert_eq!(attached.len(), 1);
    assert_eq!(attached[0].placeholder, placeholder);
    assert_eq!(attached[0].value.expose(), b"rotated-value");
    // A CA for each sandbox, its key on the host only.
    let ca = w.manager.secrets().unwrap().sandbox_ca(&one.id).unwrap();
    assert_ne!(
        ca.cert_pem,
        w.manager
            .secrets()
            .unwrap()
            .sandbox_ca(&two.id)
            .unwrap()
            .cert_pem
    );

    // The broker's log, by sandbox and scope.
    let event = BrokerEvent {
        time: "2026-01-01T00:00:00Z".into(),
        sandbox_id: one.id.clone(),
        secret: "a-key".into(),
        host: "api.example.test".into(),
        port: 443,
        method: Some("GET".into()),
        path: Some("/v1/models".into()),
        decision: BrokerDecision::Substituted,
        reason: None,
    };
    w.manager.secrets().unwrap().log().record(event.clone());
    assert_eq!(api.secret_log(&a, &id1).await.unwrap(), vec![event]);
    assert!(api.secret_log(&a, &id2).await.unwrap().is_empty());
    assert_eq!(code(api.secret_log(&b, &id1).await), ErrorCode::Forbidden);

    // Removal: not while attached, never across scopes.
    assert_eq!(
        code(api.remove_secret(&b, "a-key").await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(api.remove_secret(&a, "a-key").await),
        ErrorCode::Conflict
    );
    for id in [&id1, &id2] {
        api.lifecycle(&a, id, Lifecycle::Destroy).await.unwrap();
    }
    assert!(api
        .secret_log(&Caller::admin(), &id1)
        .await
        .unwrap()
        .is_empty());
    api.remove_secret(&a, "a-key").await.unwrap();
    assert!(api.secrets(&a).await.unwrap().is_empty());
    w.assert_nothing_left();
}

#[tokio::test]
async fn forks_and_pool_hand_outs_get_their_own_placeholders_and_cas() {
    let w = World::new().await;
    let api = surface(&w);
    let admin = Caller::admin();
    api.set_secret(
        &admin,
        secret("git", "GIT_TOKEN", VALUE, SecretLocation::BasicPassword),
    )
    .await
    .unwrap();
    let parent = api
        .create(&admin, with_secrets(&["git"], spec(NetworkPolicy::Open)))
        .await
        .unwrap()
        .0;
    let parent_id: SandboxId = parent.id.parse().unwrap();
    let children = api.fork(&admin, &parent_id, 2).await.unwrap();
    let secrets = w.manager.secrets().unwrap();
    let mut seen = vec![recorded(&w, &parent.id)["git"].clone()];
    let mut cas = vec![secrets.sandbox_ca(&parent.id).unwrap().cert_pem];
    for child in &children {
        let id: SandboxId = child.id.parse().unwrap();
        let env = guest_env(&api, &admin, &id).await;
        let ph = var(&env, "GIT_TOKEN").unwrap().to_string();
        assert_eq!(ph, recorded(&w, &child.id)["git"]);
        seen.push(ph);
        cas.push(secrets.sandbox_ca(&child.id).unwrap().cert_pem);
    }

    w.manager.create_template(template("t")).await.unwrap();
    w.manager.set_pool_size("t", 1).await.unwrap();
    w.pool_ready("t", 1).await;
    let clone = api
        .create(&admin, with_secrets(&["git"], clone_of("t")))
        .await
        .unwrap()
        .0;
    let clone_id: SandboxId = clone.id.parse().unwrap();
    let env = guest_env(&api, &admin, &clone_id).await;
    seen.push(var(&env, "GIT_TOKEN").unwrap().to_string());
    cas.push(secrets.sandbox_ca(&clone.id).unwrap().cert_pem);
    for list in [&mut seen, &mut cas] {
        let n = list.len();
        list.sort();
        list.dedup();
        assert_eq!(list.len(), n, "shared between sandboxes");
    }
    assert_eq!(seen.len(), 4, "parent, two children, one clone");

    w.manager.set_pool_size("t", 0).await.unwrap();
    let ids: Vec<String> = children
        .iter()
        .map(|c| c.id.clone())
        .chain([parent.id, clone.id])
        .collect();
    for id in ids {
        w.manager.destroy(&id).await.unwrap();
    }
    w.manager.remove_template("t").await.unwrap();
    w.assert_nothing_left();
}

/// Asks the broker listening at `addr` for an explicit proxy connection; its status line.
async fn proxy_status(addr: std::net::SocketAddr) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"CONNECT api.example.test:443 HTTP/1.1\r\nHost: api.example.test:443\r\n\r\n")
        .await?;
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("no answer"))??;
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    Ok(head.lines().next().unwrap_or_default().to_string())
}

#[tokio::test]
async fn a_sandbox_with_secrets_and_a_nic_gets_a_broker_that_goes_with_it() {
    let w = World::new().await;
    let api = surface(&w);
    let admin = Caller::admin();
    api.set_secret(
        &admin,
        secret("key", "API_KEY", VALUE, SecretLocation::Bearer),
    )
    .await
    .unwrap();
    // No NIC: nothing a secret could reach, no broker.
    let offline = api
        .create(&admin, with_secrets(&["key"], spec(NetworkPolicy::None)))
        .await
        .unwrap()
        .0;
    assert_eq!(w.net.broker(&offline.id), None);
    // A NIC: the broker answers on the intercepted listener. The fake resolver answered no
    // name, so a proxy request for one is refused, by the broker.
    let online = api
        .create(&admin, with_secrets(&["key"], spec(NetworkPolicy::Open)))
        .await
        .unwrap()
        .0;
    let addr = w.net.broker(&online.id).expect("a broker listener");
    let status = proxy_status(addr).await.unwrap();
    assert!(status.starts_with("HTTP/1.1 "), "{status:?}");
    assert!(!status.starts_with("HTTP/1.1 200"), "{status:?}");

    w.manager.destroy(&online.id).await.unwrap();
    let mut gone = false;
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            gone = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(gone, "the broker still listens after its sandbox went");
    w.manager.destroy(&offline.id).await.unwrap();
    w.assert_nothing_left();
}

#[tokio::test]
async fn a_sandbox_whose_broker_cannot_start_fails_and_leaves_nothing() {
    let w = World::new().await;
    let api = surface(&w);
    let admin = Caller::admin();
    api.set_secret(
        &admin,
        secret("key", "API_KEY", VALUE, SecretLocation::Bearer),
    )
    .await
    .unwrap();
    w.net.fail_at(hutch_testkit::NetStep::Intercept);
    let err = api
        .create(&admin, with_secrets(&["key"], spec(NetworkPolicy::Open)))
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("Intercept"), "{err:?}");
    let info = w.manager.list(&Default::default()).await.unwrap();
    assert_eq!(info.len(), 1);
    assert!(
        matches!(&info[0].state, hutch_types::SandboxState::Failed(_)),
        "{:?}",
        info[0].state
    );
    assert!(w.vmm.running().is_empty(), "agent processes left");
    assert!(w.net.networks().is_empty(), "networks left");
    w.manager.destroy(&info[0].id).await.unwrap();
    w.assert_nothing_left();
}

#[tokio::test]
async fn a_sandbox_whose_broker_the_guest_cannot_reach_fails_its_create() {
    let w = World::new().await;
    let api = surface(&w);
    let admin = Caller::admin();
    api.set_secret(
        &admin,
        secret("key", "API_KEY", VALUE, SecretLocation::Bearer),
    )
    .await
    .unwrap();
    // Wired (every other test here): the guest's self-test came back from the broker. Not
    // wired: the broker listens, but the guest's request never reaches it.
    w.net.unwire_brokers();
    let err = api
        .create(&admin, with_secrets(&["key"], spec(NetworkPolicy::Open)))
        .await
        .unwrap_err();
    let shown = hutch_core::chain(&err);
    assert!(shown.contains("failed its self-test"), "{shown}");
    assert!(shown.contains("Connection refused"), "{shown}");
    let info = w.manager.list(&Default::default()).await.unwrap();
    assert_eq!(info.len(), 1);
    assert!(
        matches!(&info[0].state, hutch_types::SandboxState::Failed(_)),
        "{:?}",
        info[0].state
    );
    assert!(w.vmm.running().is_empty(), "agent processes left");
    assert!(w.net.networks().is_empty(), "networks left");
    w.manager.destroy(&info[0].id).await.unwrap();
    w.assert_nothing_left();
}
