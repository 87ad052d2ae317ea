//! The journal of a real sandbox: a scripted session (exec, upload, download, an allowed and
//! a denied connection) is recorded in order with OpenTelemetry attributes; the daemon is
//! killed with SIGKILL mid-session and a torn last line left behind; the next daemon verifies
//! up to the last checkpoint, records the torn tail and continues; after the destroy,
//! `hutch audit verify` (through the daemon and offline) says ok.

use std::{io::Write, time::Duration};

use hutch_api::client::Client;
use hutch_journal::{attr, kinds, Record, Status};
use hutch_types::NetworkPolicy;
use libtest_mimic::Failed;

use crate::*;

/// Every record but checkpoints.
async fn records(client: &Client, id: &str) -> Result<Vec<Record>> {
    let log = client
        .audit(id, 0, None)
        .await
        .map_err(|e| format!("audit {id}: {e}"))?;
    Ok(log
        .records
        .into_iter()
        .filter(|r| r.kind != kinds::CHECKPOINT)
        .collect())
}

/// Waits until the journal holds a `network.flow` with `verdict` towards `dst`.
async fn flow(client: &Client, id: &str, verdict: &str, dst: &str) -> Result<Record> {
    for _ in 0..100 {
        let found = records(client, id).await?.into_iter().find(|r| {
            r.kind == "network.flow"
                && r.attrs[attr::NETWORK_VERDICT] == verdict
                && r.attrs[attr::DESTINATION_ADDRESS] == dst
        });
        if let Some(r) = found {
            return Ok(r);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("no {verdict} flow to {dst} in the journal").into())
}

/// The kinds of `records`, in order, that are among `wanted`.
fn kinds_among<'a>(records: &'a [Record], wanted: &[&str]) -> Vec<&'a str> {
    records
        .iter()
        .map(|r| r.kind.as_str())
        .filter(|k| wanted.contains(k))
        .collect()
}

pub(crate) fn a_session_is_journalled_and_survives_a_kill9_with_a_torn_tail() -> Result {
    use hutch_net::testbed::{World, INET, LAN};
    let world = World::new("aud");
    // No spare networks: the first daemon is killed while its refill may be under way.
    let args = [
        "--net-host-netns",
        world.host.as_str(),
        NO_SPARES[0],
        NO_SPARES[1],
    ];
    let mut daemon = Daemon::start_with(common::private_home(), &args);
    let home = daemon.home.path().to_path_buf();
    let client = daemon.client();
    let session = on_rt(async move {
        let mut req = spec(&[]);
        req.spec.network = NetworkPolicy::Allow {
            cidrs: vec![format!("{INET}/32")],
            ports: vec![8080],
            domains: vec![],
        };
        let id = client.create(&req).await.map_err(|e| e.to_string())?.id;
        check(sh(&client, &id, "echo hi").await? == "hi", "exec")?;
        client
            .put_file(&id, "/tmp/up", 0o644, b"uploaded".to_vec())
            .await
            .map_err(|e| e.to_string())?;
        let down = client
            .get_file(&id, "/tmp/up")
            .await
            .map_err(|e| e.to_string())?;
        check(down == b"uploaded", "download")?;
        let inet = format!("http://{INET}:8080/");
        check(
            curl(&client, &id, &inet).await? == ("inet".into(), 0),
            "allowed",
        )?;
        let lan = format!("http://{LAN}:8080/");
        check(curl(&client, &id, &lan).await?.1 == 7, "denied")?;

        let allowed = flow(&client, &id, "allow", INET).await?;
        check(
            allowed.attrs[attr::DESTINATION_PORT] == 8080
                && allowed.attrs[attr::NETWORK_TRANSPORT] == "tcp"
                && allowed.attrs[attr::NETWORK_RULE] == "allow_cidr",
            format!("allowed flow's attributes: {:?}", allowed.attrs),
        )?;
        let denied = flow(&client, &id, "deny", LAN).await?;
        check(
            denied.attrs[attr::DESTINATION_PORT] == 8080,
            format!("denied flow's attributes: {:?}", denied.attrs),
        )?;
        let all = records(&client, &id).await?;
        let api = [
            "sandbox.create",
            "exec.start",
            "exec.end",
            "file.write",
            "file.read",
        ];
        check(
            kinds_among(&all, &api)[..5] == api,
            format!("order: {:?}", kinds_among(&all, &api)),
        )?;
        let first_exec = all.iter().find(|r| r.kind == "exec.start").unwrap();
        check(
            first_exec.attrs[attr::PROCESS_COMMAND_ARGS]
                == serde_json::json!(["sh", "-c", "echo hi"]),
            format!("exec.start: {:?}", first_exec.attrs),
        )?;
        let write = all.iter().find(|r| r.kind == "file.write").unwrap();
        check(
            write.attrs[attr::FILE_PATH] == "/tmp/up"
                && write.attrs[attr::FILE_SIZE] == 8
                && write.attrs[attr::FILE_DIGEST] == blake3::hash(b"uploaded").to_hex().as_str(),
            format!("file.write: {:?}", write.attrs),
        )?;
        // The two connections come after the first exec (the curls), each as asked.
        let (allow_at, deny_at) = (allowed.seq, denied.seq);
        check(
            allow_at > first_exec.seq && deny_at > allow_at,
            "network decisions out of order",
        )?;
        let verdict = client.audit_verify(&id).await.map_err(|e| e.to_string())?;
        check(
            verdict.status == Status::Unsealed && verdict.failures.is_empty(),
            format!("a live journal: {verdict:?}"),
        )?;
        Ok::<_, Failed>(id)
    });
    let id = match session {
        Ok(id) => id,
        Err(e) => {
            sigterm(&mut daemon);
            return Err(e);
        }
    };

    // SIGKILL mid-session, as if it died halfway through writing a line.
    daemon.kill9();
    let journal = home.join("journal").join(&id).join("journal.jsonl");
    let torn = br#"{"v":1,"seq":99999,"prev":"ab"#;
    std::fs::OpenOptions::new()
        .append(true)
        .open(journal)?
        .write_all(torn)?;
    let mut restarted = Daemon::start_with(daemon.home, &args);
    let client = restarted.client();
    let after = on_rt({
        let id = id.clone();
        async move {
            check(
                sh(&client, &id, "echo again").await? == "again",
                "exec after restart",
            )?;
            let all = records(&client, &id).await?;
            let tail = [kinds::TORN_TAIL, kinds::REOPEN, "exec.start", "exec.end"];
            let seen = kinds_among(&all, &tail);
            check(
                seen.ends_with(&tail),
                format!("after the restart: {seen:?}"),
            )?;
            let cut = all.iter().find(|r| r.kind == kinds::TORN_TAIL).unwrap();
            check(
                cut.attrs[attr::TORN_BYTES] == torn.len(),
                format!("torn tail: {:?}", cut.attrs),
            )?;
            let log = client
                .audit(&id, 0, None)
                .await
                .map_err(|e| e.to_string())?;
            client.destroy(&id).await.map_err(|e| e.to_string())?;
            let verdict = client.audit_verify(&id).await.map_err(|e| e.to_string())?;
            check(
                verdict.status == Status::Ok && verdict.sealed,
                format!("after destroy: {verdict:?}"),
            )?;
            Ok::<_, Failed>(log.host_key)
        }
    });
    let verified = after.and_then(|host_key| {
        let out = common::hutch(restarted.home.path())
            .args(["audit", "verify", &id])
            .output()?;
        check(
            out.status.success(),
            format!(
                "hutch audit verify: {}",
                String::from_utf8_lossy(&out.stdout)
            ),
        )?;
        let dir = restarted.home.path().join("journal").join(&id);
        let out = common::hutch(restarted.home.path())
            .args(["audit", "verify", "--offline"])
            .arg(dir)
            .args(["--host-key", &host_key])
            .output()?;
        check(
            out.status.success(),
            format!(
                "hutch audit verify --offline: {}",
                String::from_utf8_lossy(&out.stdout)
            ),
        )
    });
    sigterm(&mut restarted);
    check(
        common::leaks(restarted.home.path()).is_empty(),
        "left behind after the audit case",
    )?;
    verified
}
