use std::os::unix::fs::PermissionsExt;

use hutch_types::SecretLocation;

use super::*;

const VALUE: &[u8] = b"sk-live-VERY-secret-4f1c2b";

fn binding(host: &str) -> SecretBinding {
    SecretBinding {
        host: host.into(),
        port: 443,
        path: Some("/v1/**".into()),
        methods: vec![],
        at: SecretLocation::Header {
            name: "x-api-key".into(),
        },
        fetch_only: false,
    }
}

fn new_secret(name: &str, value: &[u8]) -> SetSecret {
    SetSecret {
        name: name.into(),
        value: SecretValue::new(value.to_vec()),
        env: Some("API_KEY".into()),
        bindings: Some(vec![binding("API.Example.test")]),
        labels: Labels::new(),
        ssh_allowed_host_keys: None,
    }
}

fn team(t: &str) -> TokenScope {
    TokenScope::Label {
        key: "team".into(),
        value: t.into(),
    }
}

/// Every file under `dir`, with its bytes.
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn values_are_sealed_at_rest_and_open_again() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("secrets");
    let store = SecretStore::open(&dir).unwrap();
    let info = store
        .set(&TokenScope::Admin, new_secret("api", VALUE))
        .unwrap();
    assert_eq!(
        info.bindings[0].host, "api.example.test",
        "bindings are normalised"
    );
    let on_disk = files(&dir);
    assert_eq!(on_disk.len(), 2, "the key and one value file: {on_disk:?}");
    for (path, bytes) in &on_disk {
        assert!(!contains(bytes, VALUE), "{path:?} holds the value");
        assert!(!contains(bytes, hex::encode(VALUE).as_bytes()), "{path:?}");
        let mode = std::fs::metadata(path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{path:?} is readable by others");
    }
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    drop(store);
    let again = SecretStore::open(&dir).unwrap();
    assert_eq!(again.value("api").unwrap().expose(), VALUE);
    assert_eq!(again.list(&TokenScope::Admin), vec![info]);
}

#[test]
fn a_wrong_key_or_a_moved_file_fails_clearly() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("secrets");
    let store = SecretStore::open(&dir).unwrap();
    store
        .set(&TokenScope::Admin, new_secret("api", VALUE))
        .unwrap();
    drop(store);
    // Another key of the right size and mode.
    let key = dir.join("key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    let e = SecretStore::open(&dir).unwrap_err();
    assert!(
        matches!(e, SecretError::Decrypt(ref n) if n == "api"),
        "{e}"
    );
    assert!(e.to_string().contains("secrets key"), "{e}");
    // A key others may read is refused before it is used.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = SecretStore::open(&dir).unwrap_err();
    assert!(matches!(e, SecretError::KeyFile { .. }), "{e}");
    // No key at all, with sealed values present.
    std::fs::remove_file(&key).unwrap();
    assert!(matches!(
        SecretStore::open(&dir).unwrap_err(),
        SecretError::KeyFile { .. }
    ));
}

#[test]
fn a_value_file_renamed_to_another_secret_does_not_open() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("secrets");
    let store = SecretStore::open(&dir).unwrap();
    store
        .set(&TokenScope::Admin, new_secret("api", VALUE))
        .unwrap();
    drop(store);
    let values = dir.join("values");
    let mut stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(values.join("api.json")).unwrap()).unwrap();
    stored["info"]["name"] = "other".into();
    std::fs::remove_file(values.join("api.json")).unwrap();
    std::fs::write(values.join("other.json"), stored.to_string()).unwrap();
    let e = SecretStore::open(&dir).unwrap_err();
    assert!(
        matches!(e, SecretError::Decrypt(ref n) if n == "other"),
        "{e}"
    );
}

#[test]
fn rotation_keeps_identity_and_changes_the_value() {
    let home = tempfile::tempdir().unwrap();
    let store = SecretStore::open(home.path()).unwrap();
    let first = store
        .set(&TokenScope::Admin, new_secret("api", VALUE))
        .unwrap();
    let rotated = store
        .set(
            &TokenScope::Admin,
            SetSecret {
                env: None,
                bindings: None,
                ..new_secret("api", b"new-value")
            },
        )
        .unwrap();
    assert_eq!(rotated.created_at, first.created_at);
    assert_eq!(rotated.bindings, first.bindings);
    assert_eq!(rotated.env.as_deref(), Some("API_KEY"));
    assert_eq!(store.value("api").unwrap().expose(), b"new-value");
    let reopened = SecretStore::open(home.path()).unwrap();
    assert_eq!(reopened.value("api").unwrap().expose(), b"new-value");
    // A new secret needs a binding.
    let unbound = SetSecret {
        bindings: None,
        ..new_secret("other", VALUE)
    };
    assert!(matches!(
        store.set(&TokenScope::Admin, unbound),
        Err(SecretError::BadRequest(_))
    ));
}

#[test]
fn a_scoped_caller_sees_sets_and_removes_only_its_own() {
    let home = tempfile::tempdir().unwrap();
    let store = SecretStore::open(home.path()).unwrap();
    let a = store.set(&team("a"), new_secret("a-key", VALUE)).unwrap();
    assert_eq!(a.labels.get("team").map(String::as_str), Some("a"));
    store.set(&team("b"), new_secret("b-key", VALUE)).unwrap();
    let names =
        |s: &TokenScope| -> Vec<String> { store.list(s).into_iter().map(|i| i.name).collect() };
    assert_eq!(names(&team("a")), ["a-key"]);
    assert_eq!(names(&TokenScope::Admin), ["a-key", "b-key"]);
    for refused in [
        store.get(&team("a"), "b-key").map(drop),
        store.remove(&team("a"), "b-key").map(drop),
        store
            .set(&team("a"), new_secret("b-key", b"hijack"))
            .map(drop),
    ] {
        assert!(
            matches!(refused, Err(SecretError::Forbidden(_))),
            "{refused:?}"
        );
    }
    assert_eq!(store.value("b-key").unwrap().expose(), VALUE);
    // A scoped caller cannot label its secret into another scope.
    let mut other = new_secret("c-key", VALUE);
    other.labels.insert("team".into(), "b".into());
    assert!(matches!(
        store.set(&team("a"), other),
        Err(SecretError::Forbidden(_))
    ));
    store.remove(&team("b"), "b-key").unwrap();
    assert!(matches!(
        store.get(&TokenScope::Admin, "b-key"),
        Err(SecretError::NotFound(_))
    ));
    assert!(!home.path().join("values/b-key.json").exists());
}

#[test]
fn values_never_print() {
    let v = SecretValue::new(VALUE.to_vec());
    let shown = format!(
        "{v:?} {:?}",
        SetSecret {
            ..new_secret("x", VALUE)
        }
    );
    assert!(!shown.contains("VERY-secret"), "{shown}");
}

#[test]
fn each_sandbox_gets_its_own_ca_with_the_key_kept_private() {
    let home = tempfile::tempdir().unwrap();
    let store = SecretStore::open(home.path()).unwrap();
    let a = store.sandbox_ca("sb-0000000001").unwrap();
    let b = store.sandbox_ca("sb-0000000002").unwrap();
    assert_ne!(a.cert_pem, b.cert_pem);
    assert!(a.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    assert_eq!(
        store.sandbox_ca("sb-0000000001").unwrap().cert_pem,
        a.cert_pem
    );
    let key = home.path().join("sandboxes/sb-0000000001/ca.key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(!format!("{a:?}").contains("PRIVATE KEY"));
    // What the guest gets passes the agent's own check.
    let trust = hutch_protocol::GuestTrust {
        ca_pem: a.cert_pem.clone(),
        git: vec![],
    };
    assert_eq!(trust.validate(), Ok(()));
    store.forget_sandbox("sb-0000000001");
    assert!(!key.exists());
    store.sandbox_ca("sb-0000000003").unwrap();
    assert_eq!(store.sweep_sandboxes(&["sb-0000000003".into()]), 1);
    assert!(home.path().join("sandboxes/sb-0000000003/ca.key").exists());
    assert!(!home.path().join("sandboxes/sb-0000000002").exists());
}

/// A throwaway Ed25519 key made by `ssh-keygen` for these tests only.
const SSH_KEY: &str = "-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
QyNTUxOQAAACAQvLx7f/XuqawieH9CX2F0vV6rx4NNPrlJnO3tVrKhjQAAAJB2T0Cudk9A
rgAAAAtzc2gtZWQyNTUxOQAAACAQvLx7f/XuqawieH9CX2F0vV6rx4NNPrlJnO3tVrKhjQ
AAAEAOvKbCVSf5JmvsEBEQm3p+raMTIpg54YqCg3U9ivxTzxC8vHt/9e6prCJ4f0JfYXS9
XqvHg00+uUmc7e1WsqGNAAAACXRlc3QtdXNlcgECAwQ=
-----END OPENSSH PRIVATE KEY-----
";
const SSH_PUBLIC: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBC8vHt/9e6prCJ4f0JfYXS9XqvHg00+uUmc7e1WsqGN";
const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPwObcOvWj7ML3pxqBNwgGTh2IgtRjuFnTU8WHuIqzjd";

fn ssh_secret(name: &str, value: &str, allowed: Option<Vec<String>>) -> SetSecret {
    SetSecret {
        name: name.into(),
        value: SecretValue::new(value.as_bytes().to_vec()),
        env: None,
        bindings: None,
        labels: Labels::new(),
        ssh_allowed_host_keys: allowed,
    }
}

#[test]
fn an_ssh_key_is_a_secret_with_an_allow_list_and_no_bindings() {
    let home = tempfile::tempdir().unwrap();
    let store = SecretStore::open(home.path()).unwrap();
    let admin = TokenScope::Admin;
    let allowed = Some(vec![format!("{HOST_KEY} host.example.test")]);
    let info = store
        .set(&admin, ssh_secret("deploy", SSH_KEY, allowed.clone()))
        .unwrap();
    let ssh = info.ssh.clone().expect("an SSH key");
    assert_eq!(ssh.public_key, SSH_PUBLIC);
    assert_eq!(ssh.allowed_host_keys, [HOST_KEY], "canonical: no comment");
    assert!(info.bindings.is_empty());
    // Sealed like any value: the key's body is not on disk in the clear.
    let body = SSH_KEY.lines().nth(2).unwrap();
    for (path, bytes) in files(home.path()) {
        assert!(!contains(&bytes, body.as_bytes()), "{}", path.display());
    }
    // Rotation keeps the list, and the value must stay a key.
    let rotated = store
        .set(&admin, ssh_secret("deploy", SSH_KEY, None))
        .unwrap();
    assert_eq!(rotated.ssh, Some(ssh));
    for bad in [
        ssh_secret("deploy", "not a key", None),
        ssh_secret("new", "not a key", allowed.clone()),
        ssh_secret("new", SSH_KEY, Some(vec![])),
        ssh_secret("new", SSH_KEY, Some(vec!["ssh-ed25519 nope".into()])),
        SetSecret {
            bindings: Some(vec![binding("api.example.test")]),
            ..ssh_secret("new", SSH_KEY, allowed.clone())
        },
    ] {
        let e = store.set(&admin, bad).unwrap_err();
        assert_eq!(e.code(), ErrorCode::BadRequest, "{e}");
    }
    assert!(store.info("new").is_none());

    // A sandbox with it gets SSH_AUTH_SOCK and an agent; two keys are refused.
    let mut spec = hutch_types::SandboxSpec {
        secrets: vec!["deploy".into()],
        ..Default::default()
    };
    store.check_attachable(&spec).unwrap();
    spec.placeholders = placeholders_for(&spec.secrets);
    assert!(store
        .placeholder_env(&spec)
        .contains(&("SSH_AUTH_SOCK".into(), hutch_protocol::SSH_AUTH_SOCK.into())));
    assert!(store
        .ssh_agent("sb-1", &spec, store.log().clone())
        .is_some());
    store
        .set(&admin, ssh_secret("deploy2", SSH_KEY, allowed))
        .unwrap();
    let two = hutch_types::SandboxSpec {
        secrets: vec!["deploy".into(), "deploy2".into()],
        ..Default::default()
    };
    assert!(store.check_attachable(&two).is_err());
}
