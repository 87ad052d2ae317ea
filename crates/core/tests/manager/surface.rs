//! The request surface ([`SandboxApi`]) over the fakes: scope, validation, capped exec and
//! file and archive transfers, as every front end gets them.

use std::sync::Arc;

use hutch_core::{
    service::{ByteStream, Caller, Command, Create, Lifecycle, LocalApi, SandboxApi},
    task::Tasks,
};
use hutch_store::{ListFilter, TokenScope};
use hutch_types::{ErrorCode, NetworkPolicy, SandboxId, SandboxInfo};
use tokio::io::AsyncReadExt;

use crate::world::{spec, World};

/// The surface over the world's manager.
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

async fn create(api: &LocalApi, caller: &Caller) -> SandboxInfo {
    let req = Create {
        spec: spec(NetworkPolicy::None),
        idempotency_key: None,
    };
    api.create(caller, req).await.unwrap().0
}

fn sh(script: &str) -> Command {
    Command {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..Command::default()
    }
}

/// The code of a failed call.
fn code<T: std::fmt::Debug>(r: hutch_core::service::Result<T>) -> ErrorCode {
    r.expect_err("refused").code()
}

/// A stream of `data` in 100-byte chunks.
fn body(data: Vec<u8>) -> ByteStream {
    let chunks: Vec<std::io::Result<bytes::Bytes>> = data
        .chunks(100)
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
        .collect();
    Box::pin(futures::stream::iter(chunks))
}

/// What a download call writes into its pipe, and its result.
async fn download<F, Fut>(call: F) -> (Vec<u8>, hutch_core::service::Result<()>)
where
    F: FnOnce(tokio::io::DuplexStream) -> Fut,
    Fut: std::future::Future<Output = hutch_core::service::Result<()>>,
{
    let (sink, mut source) = tokio::io::duplex(64 << 10);
    let reading = tokio::spawn(async move {
        let mut out = Vec::new();
        source.read_to_end(&mut out).await.unwrap();
        out
    });
    let result = call(sink).await;
    (reading.await.unwrap(), result)
}

#[tokio::test]
async fn a_scoped_caller_sees_and_touches_only_its_label() {
    let w = World::new().await;
    let api = surface(&w);
    let (a, b) = (team("a"), team("b"));
    let mine = create(&api, &a).await;
    assert_eq!(mine.spec.labels.get("team").map(String::as_str), Some("a"));
    let theirs = create(&api, &b).await;
    let (mine_id, theirs_id): (SandboxId, SandboxId) =
        (mine.id.parse().unwrap(), theirs.id.parse().unwrap());

    let listed = api.list(&a, ListFilter::default()).await.unwrap();
    assert_eq!(
        listed.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        [mine.id.as_str()]
    );
    assert_eq!(code(api.get(&a, &theirs_id).await), ErrorCode::Forbidden);
    assert_eq!(
        code(api.exec(&a, &theirs_id, sh("true"), None, 10).await),
        ErrorCode::Forbidden
    );
    let (_, read) = download(|sink| api.read_file(&a, &theirs_id, "/etc/hostname", sink)).await;
    assert_eq!(code(read), ErrorCode::Forbidden);
    assert_eq!(
        code(api.lifecycle(&a, &theirs_id, Lifecycle::Destroy).await),
        ErrorCode::Forbidden
    );
    let mut labelled = spec(NetworkPolicy::None);
    labelled.labels.insert("team".into(), "b".into());
    let req = Create {
        spec: labelled,
        idempotency_key: None,
    };
    assert_eq!(code(api.create(&a, req).await), ErrorCode::Forbidden);
    let template = crate::world::template("t");
    assert_eq!(
        code(api.create_template(&a, template).await),
        ErrorCode::Forbidden
    );
    assert_eq!(code(api.tasks(&a).await), ErrorCode::Forbidden);

    for (caller, id) in [(&a, &mine_id), (&Caller::admin(), &theirs_id)] {
        api.lifecycle(caller, id, Lifecycle::Destroy).await.unwrap();
    }
    w.assert_nothing_left();
}

#[tokio::test]
async fn exec_is_validated_merged_and_capped() {
    let w = World::new().await;
    let api = surface(&w);
    let admin = Caller::admin();
    let mut with_env = spec(NetworkPolicy::None);
    with_env.env.insert("FROM_SPEC".into(), "spec".into());
    with_env.env.insert("BOTH".into(), "spec".into());
    let req = Create {
        spec: with_env,
        idempotency_key: None,
    };
    let id: SandboxId = api.create(&admin, req).await.unwrap().0.id.parse().unwrap();

    let mut cmd = sh("echo $FROM_SPEC $BOTH; cat");
    cmd.env.insert("BOTH".into(), "command".into());
    let out = api
        .exec(&admin, &id, cmd, Some(b"fed".to_vec()), 1024)
        .await
        .unwrap();
    assert_eq!(out.stdout, b"spec command\nfed");
    assert!(!out.truncated());

    let out = api
        .exec(&admin, &id, sh("head -c 5000 /dev/zero; exit 3"), None, 100)
        .await
        .unwrap();
    assert_eq!(out.stdout.len(), 100, "kept up to the cap");
    assert_eq!(out.dropped, [4900, 0]);
    assert_eq!(out.status, hutch_protocol::ExitStatus::Code(3));

    let empty = Command::default();
    assert_eq!(
        code(api.exec(&admin, &id, empty, None, 10).await),
        ErrorCode::BadRequest
    );
    let mut bad_env = sh("true");
    bad_env.env.insert("1BAD".into(), "x".into());
    assert_eq!(
        code(api.exec(&admin, &id, bad_env, None, 10).await),
        ErrorCode::BadRequest
    );
    let missing = Command {
        argv: vec!["no-such-command-xyz".into()],
        ..Command::default()
    };
    assert_eq!(
        code(api.exec(&admin, &id, missing.clone(), None, 10).await),
        ErrorCode::CommandNotFound
    );
    assert_eq!(
        code(api.exec_stream(&admin, &id, missing, None).await.map(drop)),
        ErrorCode::CommandNotFound
    );
    api.lifecycle(&admin, &id, Lifecycle::Destroy)
        .await
        .unwrap();
    w.assert_nothing_left();
}

#[tokio::test]
async fn files_and_archives_round_trip_and_a_climbing_archive_is_refused() {
    let w = World::new().await;
    let api = surface(&w);
    let admin = Caller::admin();
    let id: SandboxId = create(&api, &admin).await.id.parse().unwrap();
    // The fake guest is a host process: guest paths are host paths.
    let root = w.dir.path().join("guest");
    let root_s = root.to_string_lossy().to_string();

    let file = format!("{root_s}/a/b/file");
    api.write_file(&admin, &id, &file, 0o600, body(b"hello".to_vec()))
        .await
        .unwrap();
    let (back, read) = download(|sink| api.read_file(&admin, &id, &file, sink)).await;
    read.unwrap();
    assert_eq!(back, b"hello");
    let climbing = format!("{root_s}/../etc");
    assert_eq!(
        code(
            api.write_file(&admin, &id, &climbing, 0o600, body(vec![]))
                .await
        ),
        ErrorCode::UnsafePath
    );

    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(3);
    h.set_mode(0o644);
    b.append_data(&mut h, "dir/x", &b"xyz"[..]).unwrap();
    let good = b.into_inner().unwrap();
    let unpacked = format!("{root_s}/unpacked");
    api.put_archive(&admin, &id, &unpacked, body(good))
        .await
        .unwrap();
    assert_eq!(std::fs::read(root.join("unpacked/dir/x")).unwrap(), b"xyz");
    let (tar, packed) = download(|sink| api.get_archive(&admin, &id, &unpacked, sink)).await;
    packed.unwrap();
    let mut names: Vec<String> = tar::Archive::new(&tar[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["./", "./dir/", "./dir/x"]);

    // The second entry writes through the symlink the first one made.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    b.append_link(&mut h, "up", &root_s).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(4);
    h.set_mode(0o644);
    b.append_data(&mut h, "up/evil", &b"evil"[..]).unwrap();
    let evil = b.into_inner().unwrap();
    let target = format!("{root_s}/evil-target");
    assert_eq!(
        code(api.put_archive(&admin, &id, &target, body(evil)).await),
        ErrorCode::UnsafePath
    );
    assert!(
        !root.join("evil").exists(),
        "the climbing entry was written"
    );

    api.lifecycle(&admin, &id, Lifecycle::Destroy)
        .await
        .unwrap();
    assert_eq!(
        code(api.exec(&admin, &id, sh("true"), None, 1).await),
        ErrorCode::Conflict
    );
    w.assert_nothing_left();
}

/// Sends `signal` (`-STOP`, `-CONT`) to `pid`.
async fn signal(pid: u32, signal: &str) {
    let status = tokio::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .await
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn recorded_leaves_the_guest_alone_and_get_checks_its_health() {
    let w = World::new().await;
    let api = surface(&w);
    let admin = Caller::admin();
    let id: SandboxId = create(&api, &admin).await.id.parse().unwrap();
    let agent = w.vmm.running()[0];
    signal(agent, "-STOP").await;
    let recorded = api.recorded(&admin, &id).await.unwrap();
    assert_eq!(recorded.state, hutch_types::SandboxState::Running);
    let checked = api.get(&admin, &id).await.unwrap();
    assert!(
        matches!(checked.state, hutch_types::SandboxState::Failed(_)),
        "a guest that does not answer is {:?}",
        checked.state
    );
    signal(agent, "-CONT").await;
    api.lifecycle(&admin, &id, Lifecycle::Destroy)
        .await
        .unwrap();
    w.assert_nothing_left();
}
