//! Templates, clones, forks, pools and pause to disk across a daemon restart.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use hutch_api::{client::Client, CreateSandbox};
use hutch_types::{ErrorCode, NetworkPolicy, SandboxInfo, SandboxSpec, SandboxState};
use libtest_mimic::Failed;

use crate::*;

pub(crate) fn templates_clones_forks_and_pause_to_disk_survive_a_restart() -> Result {
    let world = hutch_net::testbed::World::new("tpl");
    let net_args = ["--net-host-netns", world.host.as_str()];
    let mut daemon = Daemon::start_with(common::private_home(), &net_args);
    let home = daemon.home.path().to_path_buf();
    let client = daemon.client();
    let result = on_rt(clone_scenario(client.clone(), home.clone()));
    if result.is_err() {
        // Detached VMs outlive the daemon: remove them here, or a failure leaks them.
        let _ = on_rt(async move {
            let _ = destroy_all(&client).await;
            client.remove_template("tpl").await
        });
    }
    sigterm(&mut daemon);
    let result = result.and_then(|suspended| {
        // Saves a crash cut off from their sandboxes: a fork that made no child, and a pause
        // to disk of a sandbox that no longer exists.
        let stale = ["fork-sb-00000000ff-1", "suspend-sb-00000000ff-1"]
            .map(|d| home.join("snapshots").join(d));
        for dir in &stale {
            std::fs::create_dir_all(dir)?;
            std::fs::write(dir.join("snapshot.json"), "{}")?;
        }
        // A new daemon on the same home: the template and the paused-to-disk sandbox remain.
        let restarted = Daemon::start_with(daemon.home, &net_args);
        let client = restarted.client();
        let after = check(
            stale.iter().all(|d| !d.exists()),
            "a restart leaves saves no sandbox uses",
        )
        .and_then(|()| on_rt(after_restart(client.clone(), suspended)));
        let cleanup = on_rt(async move {
            destroy_all(&client).await?;
            client
                .remove_template("tpl")
                .await
                .map_err(|e| format!("template rm: {e}"))?;
            Ok::<_, String>(())
        });
        let mut restarted = restarted;
        sigterm(&mut restarted);
        after.and(cleanup.map_err(Failed::from))
    });
    reap_orphans();
    let mut leaks = common::leaks(&home);
    for dir in ["snapshots", "templates/cas"] {
        for e in std::fs::read_dir(home.join(dir))
            .into_iter()
            .flatten()
            .flatten()
        {
            leaks.push(format!("{}", e.path().display()));
        }
    }
    check(leaks.is_empty(), format!("left behind: {leaks:?}"))?;
    result
}

/// Template → 4 clones → a fork → a pause to disk; returns the suspended sandbox's id.
pub(crate) async fn clone_scenario(client: Client, home: PathBuf) -> Result<String> {
    let spec = hutch_types::TemplateSpec {
        name: "tpl".into(),
        image: "default".into(),
        cpus: 1,
        memory_mib: 256,
        disk_mib: 256,
        provision: Some("echo provisioned > /root/p".into()),
        network: NetworkPolicy::None,
    };
    let t = client
        .create_template(&spec)
        .await
        .map_err(|e| format!("template create: {e}"))?;
    check(t.spec.name == "tpl", "template name")?;
    check(
        api_code(client.create_template(&spec).await) == Some(ErrorCode::Conflict),
        "a second template of the same name is refused",
    )?;
    let from_template = CreateSandbox {
        spec: SandboxSpec {
            template: Some("tpl".into()),
            ..Default::default()
        },
        idempotency_key: None,
    };
    // A pool of 2: clones wait, restored, with run dirs no sandbox owns yet; a create hands
    // one of them out. (A run dir appears when a restore starts: wait for `pool_ready`.)
    client
        .set_pool("tpl", 2)
        .await
        .map_err(|e| format!("pool: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let pooled = loop {
        let ready = client.templates().await.map_err(|e| e.to_string())?[0].pool_ready;
        let pooled = unowned_run_dirs(&client, &home).await?;
        if ready == 2 && pooled.len() == 2 {
            break pooled;
        }
        check(Instant::now() < deadline, format!("pool holds {pooled:?}"))?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Handed out with `open`: its network, which reached nothing while pooled, follows.
    let mut open_clone = from_template.clone();
    open_clone.spec.network = NetworkPolicy::Open;
    let handed = client
        .create(&open_clone)
        .await
        .map_err(|e| format!("create from a pool: {e}"))?;
    check(
        pooled.contains(&handed.id),
        format!("{} is not one of the pooled {pooled:?}", handed.id),
    )?;
    check(
        sh(&client, &handed.id, "cat /root/p").await? == "provisioned",
        "pooled clone",
    )?;
    check(
        sh(&client, &handed.id, "hostname").await? == handed.id,
        "pooled hostname",
    )?;
    let inet = format!("http://{}:8080/", hutch_net::testbed::INET);
    check(
        curl(&client, &handed.id, &inet).await? == ("inet".into(), 0),
        "a handed-out open clone cannot reach the internet",
    )?;
    client
        .destroy(&handed.id)
        .await
        .map_err(|e| format!("rm: {e}"))?;
    let creates = (0..4).map(|_| client.create(&from_template));
    let clones: Vec<SandboxInfo> = futures::future::join_all(creates)
        .await
        .into_iter()
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| format!("clone: {e}"))?;
    let ids: Vec<String> = clones.iter().map(|c| c.id.clone()).collect();
    for c in &clones {
        let origin = c.spec.origin.as_ref().ok_or("a clone without an origin")?;
        check(
            origin.template.as_deref() == Some("tpl"),
            "origin names the template",
        )?;
        check(c.spec.memory_mib == 256, "a clone has the template's shape")?;
    }
    let mut seen = Vec::new();
    for id in &ids {
        check(
            sh(&client, id, "cat /root/p").await? == "provisioned",
            "template file",
        )?;
        check(
            sh(&client, id, "hostname").await? == *id,
            "hostname is the id",
        )?;
        let clock: i64 = sh(&client, id, "date +%s")
            .await?
            .parse()
            .map_err(|_| "date")?;
        let host = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        check(
            (clock - host).abs() <= 2,
            format!("clock {clock} vs host {host}"),
        )?;
        let unique = sh(
            &client,
            id,
            "head -c 32 /dev/urandom | od -An -tx1; cat /etc/machine-id",
        )
        .await?;
        check(
            !seen.contains(&unique),
            "two clones share random bytes or a machine-id",
        )?;
        seen.push(unique);
    }
    // The same guest address in every clone, each behind its own namespace: `none` reaches
    // nothing.
    check(
        curl(&client, &ids[2], &inet).await?.1 == 7,
        "a clone with policy none reached the internet",
    )?;
    sh(&client, &ids[0], "echo mine > /root/a && sync").await?;
    for other in &ids[1..] {
        check(
            sh(&client, other, "test -e /root/a && echo yes || echo no").await? == "no",
            "a clone sees another clone's file",
        )?;
    }
    // A fork of clone 0: the children have its file from before the fork only.
    let children = client
        .fork(&ids[0], 2)
        .await
        .map_err(|e| format!("fork: {e}"))?;
    check(children.len() == 2, "two children")?;
    sh(&client, &ids[0], "echo later > /root/later && sync").await?;
    for child in &children {
        let origin = child
            .spec
            .origin
            .as_ref()
            .ok_or("a child without an origin")?;
        check(
            origin.parent.as_deref() == Some(ids[0].as_str()),
            "lineage names the parent",
        )?;
        check(
            origin.template.as_deref() == Some("tpl"),
            "lineage names the template",
        )?;
        check(
            sh(&client, &child.id, "cat /root/a").await? == "mine",
            "fork lost a file",
        )?;
        check(
            sh(
                &client,
                &child.id,
                "test -e /root/later && echo yes || echo no",
            )
            .await?
                == "no",
            "a child sees its parent's later write",
        )?;
        check(
            sh(&client, &child.id, "hostname").await? == child.id,
            "child hostname",
        )?;
    }
    // Pause clone 1 to disk: its VMM goes, its state stays.
    sh(&client, &ids[1], "echo kept > /root/kept && sync").await?;
    let s = client
        .lifecycle(&ids[1], "suspend")
        .await
        .map_err(|e| format!("suspend: {e}"))?;
    check(
        s.state == SandboxState::Suspended,
        format!("state {:?}", s.state),
    )?;
    let marker = format!("hutch-{} ", ids[1]);
    check(
        !common::vmm_processes()
            .iter()
            .any(|(_, c)| c.contains(&marker)),
        "a suspended sandbox still has a VMM",
    )?;
    check(
        api_code(client.remove_template("tpl").await) == Some(ErrorCode::Conflict),
        "a template in use was removed",
    )?;
    Ok(ids[1].clone())
}

/// Run dirs of VMs no listed sandbox owns (a pool's clones).
pub(crate) async fn unowned_run_dirs(client: &Client, home: &Path) -> Result<Vec<String>> {
    let listed: Vec<String> = client
        .list(None, &[])
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|s| s.id)
        .collect();
    Ok(std::fs::read_dir(home.join("vms"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|d| !listed.contains(d))
        .collect())
}

pub(crate) async fn after_restart(client: Client, suspended: String) -> Result {
    let templates = client.templates().await.map_err(|e| e.to_string())?;
    check(
        templates.len() == 1,
        format!("{} templates after a restart", templates.len()),
    )?;
    let info = client
        .inspect(&suspended)
        .await
        .map_err(|e| e.to_string())?;
    check(
        info.state == SandboxState::Suspended,
        format!("state {:?}", info.state),
    )?;
    let resumed = client
        .lifecycle(&suspended, "resume")
        .await
        .map_err(|e| format!("resume from disk: {e}"))?;
    check(resumed.state == SandboxState::Running, "resumed")?;
    check(
        sh(&client, &suspended, "cat /root/kept").await? == "kept",
        "lost a file",
    )?;
    // A clone made after the restart still comes from the template.
    let c = client
        .create(&CreateSandbox {
            spec: SandboxSpec {
                template: Some("tpl".into()),
                ..Default::default()
            },
            idempotency_key: None,
        })
        .await
        .map_err(|e| format!("clone after restart: {e}"))?;
    check(
        sh(&client, &c.id, "cat /root/p").await? == "provisioned",
        "template file",
    )?;
    check(
        sh(&client, &c.id, "test -e /root/a && echo yes || echo no").await? == "no",
        "a clone's write reached the template",
    )?;
    Ok(())
}
