//! Failure injection: each failing host side effect leaves nothing behind and the sandbox in
//! a truthful state (failed, absent, or as it was, as the lifecycle table says).

use hutch_core::CoreError;
use hutch_testkit::{NetStep, StoreOp, VmmStep};
use hutch_types::{NetworkPolicy, SandboxState};

use crate::world::{clone_of, sh, spec, template, World};

/// Asserts that `state` is failed, saying why with `because`.
fn assert_failed(state: &SandboxState, because: &str) {
    match state {
        SandboxState::Failed(why) => assert!(why.contains(because), "{why:?} lacks {because:?}"),
        other => panic!("{other:?} is not failed"),
    }
}

/// A failed create: the sandbox is recorded failed, and its destroy succeeds and leaves
/// nothing.
async fn assert_create_failed(w: &World, because: &str) {
    let info = w.only_sandbox();
    assert_failed(&info.state, because);
    assert_eq!(w.vmm.running(), Vec::<u32>::new(), "agent processes left");
    assert!(w.net.networks().is_empty(), "networks left");
    w.manager.destroy(&info.id).await.unwrap();
    w.assert_nothing_left();
}

#[tokio::test]
async fn a_vmm_that_cannot_start() {
    let w = World::new().await;
    w.failing.fail_at(VmmStep::Start);
    let err = w
        .manager
        .create(spec(NetworkPolicy::Open), None)
        .await
        .unwrap_err();
    assert!(matches!(err, CoreError::Sandbox(_)), "{err:?}");
    assert_create_failed(&w, "injected failure at Start").await;
}

#[tokio::test]
async fn a_vmm_that_dies_during_boot() {
    let w = World::new().await;
    w.failing.fail_at(VmmStep::DieDuringBoot);
    let err = w
        .manager
        .create(spec(NetworkPolicy::Open), None)
        .await
        .unwrap_err();
    assert!(matches!(err, CoreError::Sandbox(_)), "{err:?}");
    assert_create_failed(&w, "the VM stopped during boot").await;
}

#[tokio::test]
async fn an_agent_that_never_answers() {
    let w = World::new().await;
    w.failing.fail_at(VmmStep::Ready);
    let err = w
        .manager
        .create(spec(NetworkPolicy::Open), None)
        .await
        .unwrap_err();
    assert!(matches!(err, CoreError::Sandbox(_)), "{err:?}");
    assert_create_failed(&w, "did not answer within").await;
}

#[tokio::test]
async fn a_network_that_fails_to_be_created() {
    let w = World::new().await;
    w.net.fail_at(NetStep::Create);
    let err = w
        .manager
        .create(spec(NetworkPolicy::Open), None)
        .await
        .unwrap_err();
    assert!(matches!(err, CoreError::Net(_)), "{err:?}");
    assert_create_failed(&w, "sandbox network failed").await;
}

/// The network exists when handing out its TAP fails: it must go again.
#[tokio::test]
async fn a_network_setup_that_fails_halfway() {
    let w = World::new().await;
    w.net.fail_at(NetStep::Tap);
    let err = w
        .manager
        .create(spec(NetworkPolicy::Open), None)
        .await
        .unwrap_err();
    assert!(matches!(err, CoreError::Net(_)), "{err:?}");
    assert_create_failed(&w, "injected failure at Tap").await;
}

/// The store refuses the sandbox's record: nothing is made, nothing recorded.
#[tokio::test]
async fn a_store_that_cannot_record_the_sandbox() {
    let w = World::new().await;
    w.store.fail_at(StoreOp::InsertSandbox, 0);
    let err = w
        .manager
        .create(spec(NetworkPolicy::Open), None)
        .await
        .unwrap_err();
    assert!(matches!(err, CoreError::Store(_)), "{err:?}");
    let all = hutch_store::Store::list(w.store.as_ref(), &Default::default()).unwrap();
    assert!(all.is_empty(), "{all:?}");
    w.assert_nothing_left();
}

/// The store fails while recording what the create is about to make: the sandbox is failed
/// (not left `creating`, which nothing could end), and nothing is made.
#[tokio::test]
async fn a_store_that_cannot_record_an_intent() {
    for skip in [0, 1] {
        let w = World::new().await;
        w.store.fail_at(StoreOp::IntendObject, skip);
        let err = w
            .manager
            .create(spec(NetworkPolicy::Open), None)
            .await
            .unwrap_err();
        assert!(matches!(err, CoreError::Store(_)), "{err:?}");
        assert_create_failed(&w, "state store failed").await;
    }
}

/// The store fails while recording what was made (the network, the run dir, the VM process,
/// then the state `running`): what was made goes again and the sandbox is failed.
#[tokio::test]
async fn a_store_write_that_fails_after_the_vm_runs() {
    for (op, skip) in [
        (StoreOp::ConfirmObject, 0),
        (StoreOp::ConfirmObject, 1),
        (StoreOp::ConfirmObject, 2),
        (StoreOp::SetState, 0),
    ] {
        let w = World::new().await;
        w.store.fail_at(op, skip);
        let err = w
            .manager
            .create(spec(NetworkPolicy::Open), None)
            .await
            .unwrap_err();
        assert!(matches!(err, CoreError::Store(_)), "{op:?} {skip}: {err:?}");
        assert!(!w.store.armed());
        assert_create_failed(&w, "state store failed").await;
    }
}

/// A stop or destroy whose network cannot be removed: the VM is gone, so the sandbox is
/// failed (not `running` or `stopping`), and destroying it again removes everything.
#[tokio::test]
async fn a_teardown_that_fails_can_be_retried() {
    let w = World::new().await;
    for stop in [true, false] {
        let (info, _) = w
            .manager
            .create(spec(NetworkPolicy::Open), None)
            .await
            .unwrap();
        w.net.fail_at(NetStep::Destroy);
        let err = match stop {
            true => w.manager.stop(&info.id).await.unwrap_err(),
            false => w.manager.destroy(&info.id).await.unwrap_err(),
        };
        assert!(matches!(err, CoreError::Net(_)), "{err:?}");
        assert_failed(&w.state(&info.id).await, "teardown incomplete");
        assert!(w.vmm.running().is_empty(), "the VM still runs");
        assert_eq!(w.net.networks(), vec![info.id.clone()]);
        w.manager.destroy(&info.id).await.unwrap();
        w.assert_nothing_left();
    }
}

/// Resuming a sandbox paused to disk, whose restore fails once its network exists: the
/// network goes, the sandbox stays paused to disk, and a second resume works.
#[tokio::test]
async fn a_restore_that_fails_after_the_network_exists() {
    let w = World::new().await;
    let (info, _) = w
        .manager
        .create(spec(NetworkPolicy::Open), None)
        .await
        .unwrap();
    let id = info.id;
    w.manager.suspend(&id).await.unwrap();
    for step in [VmmStep::Restore, VmmStep::DieDuringBoot] {
        w.failing.fail_at(step);
        let err = w.manager.resume(&id).await.unwrap_err();
        assert!(matches!(err, CoreError::Sandbox(_)), "{step:?}: {err:?}");
        assert_eq!(w.state(&id).await, SandboxState::Suspended);
        assert!(w.vmm.running().is_empty(), "{step:?}: agent processes left");
        assert!(w.net.networks().is_empty(), "{step:?}: networks left");
        assert!(
            hutch_store::Store::objects(w.store.as_ref())
                .unwrap()
                .is_empty(),
            "{step:?}: host objects left"
        );
    }
    w.manager.resume(&id).await.unwrap();
    let channel = w.manager.channel(&id).await.unwrap();
    assert_eq!(sh(&channel, "echo resumed").await.0, "resumed\n");
    w.manager.destroy(&id).await.unwrap();
    w.assert_nothing_left();
}

/// A fork whose children cannot be restored: they are failed, their networks gone, the
/// parent runs on, and the fork's snapshot is removed.
#[tokio::test]
async fn a_fork_whose_restore_fails() {
    let w = World::new().await;
    let (parent, _) = w
        .manager
        .create(spec(NetworkPolicy::Open), None)
        .await
        .unwrap();
    w.failing.fail_at(VmmStep::Restore);
    let err = w.manager.fork(&parent.id, 1).await.unwrap_err();
    assert!(matches!(err, CoreError::Sandbox(_)), "{err:?}");
    assert_eq!(w.state(&parent.id).await, SandboxState::Running);
    assert_eq!(w.net.networks(), vec![parent.id.clone()]);
    assert_eq!(w.vmm.running().len(), 1);
    let all = hutch_store::Store::list(w.store.as_ref(), &Default::default()).unwrap();
    let child = all.iter().find(|s| s.id != parent.id).unwrap();
    assert_failed(&child.state, "injected failure at Restore");

    // A save that fails leaves the parent running.
    w.failing.fail_at(VmmStep::Snapshot);
    w.manager.fork(&parent.id, 1).await.unwrap_err();
    assert_eq!(w.state(&parent.id).await, SandboxState::Running);
    let channel = w.manager.channel(&parent.id).await.unwrap();
    assert_eq!(sh(&channel, "echo parent").await.0, "parent\n");

    for id in [&child.id, &parent.id] {
        w.manager.destroy(id).await.unwrap();
    }
    w.assert_nothing_left();
}

/// An adopt that fails after a restart: the sandbox is failed and what its VM left removed.
#[tokio::test]
async fn an_adopt_that_fails() {
    let mut w = World::new().await;
    let (info, _) = w
        .manager
        .create(spec(NetworkPolicy::Open), None)
        .await
        .unwrap();
    w.failing.fail_at(VmmStep::Adopt);
    let report = w.restart().await;
    assert_eq!(report.failed, vec![info.id.clone()]);
    assert_failed(&w.state(&info.id).await, "VM lost across a daemon restart");
    assert!(w.vmm.running().is_empty(), "the unadopted VM still runs");
    assert!(w.net.networks().is_empty(), "its network is left");
    w.manager.destroy(&info.id).await.unwrap();
    w.assert_nothing_left();
}

/// The store fails while recording a pooled clone being handed out: the clone goes, with its
/// network, and the sandbox is failed.
#[tokio::test]
async fn a_store_write_that_fails_during_a_pool_handout() {
    let w = World::new().await;
    w.manager.create_template(template("t")).await.unwrap();
    w.manager.set_pool_size("t", 1).await.unwrap();
    w.pool_ready("t", 1).await;
    // Confirmed in turn: the network, the run dir, the VM process.
    w.store.fail_at(StoreOp::ConfirmObject, 1);
    let err = w.manager.create(clone_of("t"), None).await.unwrap_err();
    assert!(matches!(err, CoreError::Store(_)), "{err:?}");
    assert!(!w.store.armed());
    // The pool's refill goes with the daemon.
    w.manager.drain_pools().await;
    assert_create_failed(&w, "state store failed").await;
    w.manager.remove_template("t").await.unwrap();
}
