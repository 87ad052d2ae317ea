//! Ordinary lifecycles through the fakes.

use hutch_core::CoreError;
use hutch_net::Policy;
use hutch_protocol::{ExitStatus, ReadFileRequest, WriteFileRequest};
use hutch_types::{NetworkPolicy, SandboxState};

use crate::world::{clone_of, sh, spec, template, World};

#[tokio::test]
async fn create_exec_files_destroy() {
    let w = World::new().await;
    let (info, created) = w
        .manager
        .create(spec(NetworkPolicy::None), None)
        .await
        .unwrap();
    assert!(created);
    assert_eq!(info.state, SandboxState::Running);
    assert_eq!(w.vmm.running().len(), 1);
    assert!(w.net.networks().is_empty(), "no network was asked for");

    let channel = w.manager.channel(&info.id).await.unwrap();
    assert_eq!(
        sh(&channel, "echo $((6 * 7))").await,
        ("42\n".into(), ExitStatus::Code(0))
    );
    let path = w.dir.path().join("file");
    let req = WriteFileRequest {
        path: path.to_string_lossy().into(),
        mode: 0o600,
        make_parents: false,
    };
    channel.write_file(req, &b"hello"[..]).await.unwrap();
    let mut back = Vec::new();
    let req = ReadFileRequest {
        path: path.to_string_lossy().into(),
        max_bytes: 1024,
    };
    channel.read_file(req, &mut back).await.unwrap();
    assert_eq!(back, b"hello");
    assert_eq!(
        w.manager.inspect(&info.id).await.unwrap().state,
        SandboxState::Running
    );

    let gone = w.manager.destroy(&info.id).await.unwrap();
    assert_eq!(gone.state, SandboxState::Destroyed);
    assert!(matches!(
        w.manager.channel(&info.id).await,
        Err(CoreError::Illegal(_))
    ));
    w.assert_nothing_left();
}

#[tokio::test]
async fn idempotent_creates_make_one_sandbox() {
    let w = World::new().await;
    let (a, created) = w
        .manager
        .create(spec(NetworkPolicy::None), Some("k"))
        .await
        .unwrap();
    let (b, again) = w
        .manager
        .create(spec(NetworkPolicy::None), Some("k"))
        .await
        .unwrap();
    assert!(created && !again);
    assert_eq!(a.id, b.id);
    assert_eq!(w.vmm.running().len(), 1);
    w.manager.destroy(&a.id).await.unwrap();
    w.assert_nothing_left();
}

#[tokio::test]
async fn networks_policies_and_ports_follow_the_sandbox() {
    let w = World::new().await;
    let (info, _) = w
        .manager
        .create(spec(NetworkPolicy::Open), None)
        .await
        .unwrap();
    let id = info.id;
    assert_eq!(w.net.networks(), vec![id.clone()]);
    assert_eq!(w.net.policy(&id), Some(Policy::Open));

    let p = w.manager.publish_port(&id, 8080, None).await.unwrap();
    assert_eq!(w.manager.published_ports(&id).await.unwrap(), vec![p]);
    let none = NetworkPolicy::Allow {
        cidrs: vec![],
        ports: vec![],
        domains: vec![],
    };
    w.manager.set_network(&id, none).await.unwrap();
    assert!(matches!(w.net.policy(&id), Some(Policy::Allow { .. })));

    w.manager.destroy(&id).await.unwrap();
    w.assert_nothing_left();
}

#[tokio::test]
async fn pause_resume_stop_start() {
    let w = World::new().await;
    let (info, _) = w
        .manager
        .create(spec(NetworkPolicy::Open), None)
        .await
        .unwrap();
    let id = info.id;
    assert_eq!(
        w.manager.pause(&id).await.unwrap().state,
        SandboxState::Paused
    );
    // A paused sandbox is healthy, but not usable.
    assert_eq!(
        w.manager.inspect(&id).await.unwrap().state,
        SandboxState::Paused
    );
    assert!(matches!(
        w.manager.channel(&id).await,
        Err(CoreError::Illegal(_))
    ));
    assert_eq!(
        w.manager.resume(&id).await.unwrap().state,
        SandboxState::Running
    );
    let channel = w.manager.channel(&id).await.unwrap();
    assert_eq!(sh(&channel, "echo up").await.0, "up\n");

    assert_eq!(
        w.manager.stop(&id).await.unwrap().state,
        SandboxState::Stopped
    );
    assert!(w.vmm.running().is_empty());
    assert!(w.net.networks().is_empty());
    assert_eq!(
        w.manager.start(&id).await.unwrap().state,
        SandboxState::Running
    );
    let channel = w.manager.channel(&id).await.unwrap();
    assert_eq!(sh(&channel, "echo again").await.0, "again\n");
    w.manager.destroy(&id).await.unwrap();
    w.assert_nothing_left();
}

/// A restarted daemon adopts the sandboxes whose VMs still run, fails those whose VM died
/// meanwhile, and removes what the dead ones left.
#[tokio::test]
async fn a_restart_adopts_the_living_and_fails_the_dead() {
    let mut w = World::new().await;
    let (alive, _) = w
        .manager
        .create(spec(NetworkPolicy::Open), None)
        .await
        .unwrap();
    let (dead, _) = w
        .manager
        .create(spec(NetworkPolicy::Open), None)
        .await
        .unwrap();
    let (paused, _) = w
        .manager
        .create(spec(NetworkPolicy::None), None)
        .await
        .unwrap();
    w.manager.pause(&paused.id).await.unwrap();
    // The daemon dies; so does one VM while it is down.
    let objects = hutch_store::Store::objects(w.store.as_ref()).unwrap();
    let vm = objects
        .iter()
        .find(|o| o.sandbox_id == dead.id && o.kind == hutch_store::ObjectKind::VmProcess)
        .unwrap();
    let (pid, start) = (vm.name.parse().unwrap(), vm.detail.parse().unwrap());
    assert!(hutch_vmm::kill_recorded(pid, start).unwrap());
    let report = w.restart().await;
    let mut adopted = report.adopted.clone();
    adopted.sort();
    let mut expected = vec![alive.id.clone(), paused.id.clone()];
    expected.sort();
    assert_eq!(adopted, expected);
    assert_eq!(report.failed, vec![dead.id.clone()]);
    assert!(matches!(w.state(&dead.id).await, SandboxState::Failed(_)));
    assert_eq!(w.state(&paused.id).await, SandboxState::Paused);
    assert_eq!(w.net.networks(), vec![alive.id.clone()]);

    let channel = w.manager.channel(&alive.id).await.unwrap();
    assert_eq!(sh(&channel, "echo adopted").await.0, "adopted\n");
    assert_eq!(
        w.manager.resume(&paused.id).await.unwrap().state,
        SandboxState::Running
    );
    for id in [&alive.id, &dead.id, &paused.id] {
        w.manager.destroy(id).await.unwrap();
    }
    w.assert_nothing_left();
}

#[tokio::test]
async fn forks_and_pauses_to_disk() {
    let w = World::new().await;
    let (parent, _) = w
        .manager
        .create(spec(NetworkPolicy::Open), None)
        .await
        .unwrap();
    let children = w.manager.fork(&parent.id, 2).await.unwrap();
    assert_eq!(children.len(), 2);
    for child in &children {
        assert_eq!(child.state, SandboxState::Running);
        let channel = w.manager.channel(&child.id).await.unwrap();
        assert_eq!(sh(&channel, "echo child").await.0, "child\n");
    }
    assert_eq!(w.net.networks().len(), 3);

    let suspended = w.manager.suspend(&parent.id).await.unwrap();
    assert_eq!(suspended.state, SandboxState::Suspended);
    assert_eq!(w.vmm.running().len(), 2, "the parent's VM is gone");
    assert!(!w.net.networks().contains(&parent.id));
    assert_eq!(
        w.manager.resume(&parent.id).await.unwrap().state,
        SandboxState::Running
    );
    let channel = w.manager.channel(&parent.id).await.unwrap();
    assert_eq!(sh(&channel, "echo back").await.0, "back\n");

    for id in children.iter().map(|c| &c.id).chain([&parent.id]) {
        w.manager.destroy(id).await.unwrap();
    }
    w.assert_nothing_left();
}

#[tokio::test]
async fn templates_clones_and_pools() {
    let w = World::new().await;
    let t = w.manager.create_template(template("t")).await.unwrap();
    assert!(t.has_nic);
    assert!(
        w.vmm.running().is_empty(),
        "the template's VM is gone once saved"
    );
    assert!(w.net.networks().is_empty(), "so is its network");

    let (restored, _) = w.manager.create(clone_of("t"), None).await.unwrap();
    let channel = w.manager.channel(&restored.id).await.unwrap();
    assert_eq!(sh(&channel, "echo clone").await.0, "clone\n");

    w.manager.set_pool_size("t", 1).await.unwrap();
    w.pool_ready("t", 1).await;
    let (pooled, _) = w.manager.create(clone_of("t"), None).await.unwrap();
    assert_eq!(pooled.state, SandboxState::Running);
    let channel = w.manager.channel(&pooled.id).await.unwrap();
    assert_eq!(sh(&channel, "echo pooled").await.0, "pooled\n");
    w.pool_ready("t", 1).await;

    for id in [&restored.id, &pooled.id] {
        w.manager.destroy(id).await.unwrap();
    }
    w.manager.remove_template("t").await.unwrap();
    w.assert_nothing_left();
}
