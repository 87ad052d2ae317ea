//! The store's behaviour; written against the `Store` trait so a Postgres store can reuse it.

use hutch_store::{HostObject, ListFilter, ObjectKind, SqliteStore, Store, TokenScope, TokenUse};
use hutch_types::{SandboxSpec, SandboxState};

fn store() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("state.db")).unwrap();
    (dir, s)
}

fn labelled(k: &str, v: &str) -> SandboxSpec {
    SandboxSpec {
        labels: [(k.to_string(), v.to_string())].into(),
        ..Default::default()
    }
}

#[test]
fn sandboxes_round_trip_and_filter() {
    let (_d, s) = store();
    s.insert_sandbox("sb-1", &labelled("team", "a"), None, 1_000)
        .unwrap();
    s.insert_sandbox("sb-2", &labelled("team", "b"), None, 2_000)
        .unwrap();
    s.set_state("sb-2", &SandboxState::Failed("boot".into()), 3_000)
        .unwrap();
    let one = s.get("sb-1").unwrap().unwrap();
    assert_eq!(one.state, SandboxState::Creating);
    assert_eq!(one.spec.labels["team"], "a");
    let failed = s.get("sb-2").unwrap().unwrap();
    assert_eq!(failed.state, SandboxState::Failed("boot".into()));
    assert_eq!(failed.updated_at_ms, 3_000);
    let team_b = ListFilter {
        labels: vec![("team".into(), "b".into())],
        ..Default::default()
    };
    assert_eq!(s.list(&team_b).unwrap().len(), 1);
    s.set_state("sb-1", &SandboxState::Destroyed, 4_000)
        .unwrap();
    assert_eq!(s.list(&ListFilter::default()).unwrap().len(), 1);
    let all = ListFilter {
        include_destroyed: true,
        ..Default::default()
    };
    assert_eq!(s.list(&all).unwrap().len(), 2);
    assert!(s.get("sb-none").unwrap().is_none());
}

#[test]
fn idempotency_key_returns_the_first_sandbox() {
    let (_d, s) = store();
    assert_eq!(
        s.insert_sandbox("sb-1", &SandboxSpec::default(), Some("k"), 1)
            .unwrap(),
        ("sb-1".into(), true)
    );
    assert_eq!(
        s.insert_sandbox("sb-2", &SandboxSpec::default(), Some("k"), 2)
            .unwrap(),
        ("sb-1".into(), false)
    );
    assert!(s.get("sb-2").unwrap().is_none());
}

#[test]
fn ttl_expiry_is_durable_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    {
        let s = SqliteStore::open(&path).unwrap();
        let spec = SandboxSpec {
            ttl_secs: Some(5),
            ..Default::default()
        };
        s.insert_sandbox("sb-1", &spec, None, 10_000).unwrap();
        s.insert_sandbox("sb-2", &SandboxSpec::default(), None, 10_000)
            .unwrap();
    }
    let s = SqliteStore::open(&path).unwrap();
    assert!(s.expired(14_999).unwrap().is_empty());
    assert_eq!(s.expired(15_000).unwrap(), vec!["sb-1".to_string()]);
    s.set_state("sb-1", &SandboxState::Destroyed, 15_001)
        .unwrap();
    assert!(s.expired(99_999).unwrap().is_empty());
}

#[test]
fn a_new_expiry_replaces_the_ttl_and_none_removes_it() {
    let (_dir, s) = store();
    s.insert_sandbox("sb-1", &SandboxSpec::default(), None, 10_000)
        .unwrap();
    assert!(s.expired(99_999).unwrap().is_empty());
    s.set_expiry("sb-1", Some(20_000), 11_000).unwrap();
    assert_eq!(s.get("sb-1").unwrap().unwrap().expires_at_ms, Some(20_000));
    assert!(s.expired(19_999).unwrap().is_empty());
    assert_eq!(s.expired(20_000).unwrap(), vec!["sb-1".to_string()]);
    s.set_expiry("sb-1", None, 12_000).unwrap();
    assert!(s.expired(99_999).unwrap().is_empty());
}

#[test]
fn host_objects_are_intended_then_confirmed_then_forgotten() {
    let (_d, s) = store();
    s.insert_sandbox("sb-1", &SandboxSpec::default(), None, 1)
        .unwrap();
    let mut obj = HostObject {
        sandbox_id: "sb-1".into(),
        kind: ObjectKind::RunDir,
        name: "/run/x".into(),
        detail: String::new(),
        confirmed: false,
    };
    s.intend_object(&obj).unwrap();
    assert_eq!(s.objects().unwrap(), vec![obj.clone()]);
    obj.confirmed = true;
    obj.detail = "started".into();
    s.confirm_object(&obj).unwrap();
    assert_eq!(s.objects().unwrap(), vec![obj.clone()]);
    s.forget_object("sb-1", ObjectKind::RunDir, "/run/x")
        .unwrap();
    assert!(s.objects().unwrap().is_empty());
}

#[test]
fn tokens_keep_their_scope() {
    let (_d, s) = store();
    s.insert_token("t1", "hash-a", &TokenScope::Admin, 1, None)
        .unwrap();
    let scope = TokenScope::Label {
        key: "team".into(),
        value: "a".into(),
    };
    s.insert_token("t2", "hash-b", &scope, 1, None).unwrap();
    assert_eq!(
        s.use_token("hash-a", 2).unwrap(),
        TokenUse::Valid(TokenScope::Admin)
    );
    assert_eq!(s.use_token("hash-b", 2).unwrap(), TokenUse::Valid(scope));
    assert_eq!(s.use_token("nope", 2).unwrap(), TokenUse::Unknown);
}

#[test]
fn tokens_expire_record_their_last_use_and_can_be_removed() {
    let (_d, s) = store();
    s.insert_token("t1", "hash-a", &TokenScope::Admin, 10, Some(100))
        .unwrap();
    s.insert_token("t2", "hash-b", &TokenScope::Admin, 20, None)
        .unwrap();
    let listed = s.tokens().unwrap();
    assert_eq!(
        listed.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
        ["t1", "t2"]
    );
    assert_eq!(listed[0].expires_at_ms, Some(100));
    assert_eq!(listed[0].last_used_at_ms, None);

    assert_eq!(
        s.use_token("hash-a", 99).unwrap(),
        TokenUse::Valid(TokenScope::Admin)
    );
    assert_eq!(s.tokens().unwrap()[0].last_used_at_ms, Some(99));
    assert_eq!(s.use_token("hash-a", 100).unwrap(), TokenUse::Expired);
    assert_eq!(
        s.tokens().unwrap()[0].last_used_at_ms,
        Some(99),
        "a refused use is not a use"
    );

    assert!(s.remove_token("t2").unwrap());
    assert!(!s.remove_token("t2").unwrap());
    assert_eq!(s.use_token("hash-b", 30).unwrap(), TokenUse::Unknown);
    assert_eq!(s.tokens().unwrap().len(), 1);
}

#[test]
fn a_version_1_database_gains_token_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let conn = rusqlite_conn(&path);
    conn.execute_batch(
        "CREATE TABLE tokens (id TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE,
            scope_key TEXT, scope_value TEXT, created_at INTEGER NOT NULL);
         CREATE TABLE sandboxes (id TEXT PRIMARY KEY);
         INSERT INTO tokens VALUES ('t0', 'hash-old', NULL, NULL, 5);
         PRAGMA user_version = 1;",
    )
    .unwrap();
    drop(conn);
    let s = SqliteStore::open(&path).unwrap();
    let old = &s.tokens().unwrap()[0];
    assert_eq!((old.id.as_str(), old.expires_at_ms), ("t0", None));
    assert_eq!(
        s.use_token("hash-old", 6).unwrap(),
        TokenUse::Valid(TokenScope::Admin)
    );
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    drop(SqliteStore::open(&path).unwrap());
    let conn = rusqlite_conn(&path);
    conn.execute_batch("PRAGMA user_version = 99").unwrap();
    drop(conn);
    assert!(matches!(
        SqliteStore::open(&path),
        Err(hutch_store::StoreError::TooNew { found: 99, .. })
    ));
}

fn rusqlite_conn(path: &std::path::Path) -> rusqlite::Connection {
    rusqlite::Connection::open(path).unwrap()
}
