//! The journal of a real sandbox: a scripted session (exec, upload, download, an allowed and
//! a denied connection, a PTY shell with a resize) is recorded in order with OpenTelemetry
//! attributes; the daemon is killed with SIGKILL mid-session and a torn last line left behind;
//! the next daemon verifies up to the last checkpoint, records the torn tail and continues
//! (`hutch audit --follow` printing its execs until the seal); a task's sandbox journals the
//! agent's command like any exec, then the changeset, the attestation's signing and the seal;
//! after the destroy, `hutch audit verify` (through the daemon and offline) says ok, and
//! copies of the journal edited, cut, reordered or re-hashed are each caught and named.

use std::{
    io::Write,
    path::Path,
    process::{Child, Output, Stdio},
    time::{Duration, Instant},
};

use hutch_api::client::Client;
use hutch_journal::{
    attr, chain, kinds, verify_dir, Failure, Record, Report, Status, CHECKPOINT_FILE, JOURNAL_FILE,
};
use hutch_task::{attest, TaskSpec, Verdict};
use hutch_types::NetworkPolicy;
use libtest_mimic::Failed;
use serde_json::json;

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

/// The value of `key` among `r`'s attributes (null when it has none).
fn at<'a>(r: &'a Record, key: &str) -> &'a serde_json::Value {
    r.attrs.get(key).unwrap_or(&serde_json::Value::Null)
}

/// The output of `child` once it exits by itself, within `limit` (killed and refused after).
fn exited(mut child: Child, limit: Duration) -> Result<Output> {
    let start = Instant::now();
    while child.try_wait()?.is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("still running after {limit:?}").into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(child.wait_with_output()?)
}

/// Checks the PTY session's records among `all`: its `exec.start` (a terminal, the shell)
/// and `exec.end` (exit 3, a recording), whose recording holds the resize.
async fn pty_records(client: &Client, id: &str, all: &[Record]) -> Result {
    let start = all
        .iter()
        .find(|r| r.kind == "exec.start" && at(r, attr::PROCESS_TTY) == true)
        .ok_or("no exec.start with a terminal")?;
    check(
        at(start, attr::PROCESS_COMMAND_ARGS) == &json!(["/bin/sh"])
            && at(start, attr::OPERATION) == "exec_stream",
        format!("PTY exec.start: {:?}", start.attrs),
    )?;
    let exec = at(start, attr::EXEC_ID).as_str().unwrap_or_default();
    let end = all
        .iter()
        .find(|r| r.kind == "exec.end" && at(r, attr::EXEC_ID) == exec)
        .ok_or("no exec.end of the PTY session")?;
    check(
        end.seq > start.seq
            && at(end, attr::PROCESS_EXIT_CODE) == 3
            && at(end, attr::RECORDING_DIGEST).is_string(),
        format!("PTY exec.end: {:?}", end.attrs),
    )?;
    let cast = client
        .recording(id, exec)
        .await
        .map_err(|e| e.to_string())?;
    check(
        String::from_utf8_lossy(&cast).contains("\"r\", \"100x40\""),
        "the resize is not in the session's recording",
    )
}

/// Runs a task on `client`'s daemon; its sandbox's journal holds, in order, the create, the
/// agent's command as an exec (argv, exit, output digests, recording), the changeset, the
/// task's end, the attestation's signing and the seal, and verifies sealed.
async fn task_records(client: &Client) -> Result {
    let ws = tempfile::tempdir()?;
    std::fs::write(ws.path().join("a.txt"), "one\n")?;
    let tar = hutch_task::workspace::pack(ws.path()).map_err(|e| e.to_string())?;
    let argv = ["sh", "-c", "echo task-ran; echo two > a.txt"];
    let spec: TaskSpec = serde_json::from_value(json!({"command": argv, "timeout_secs": 300}))?;
    let t = client
        .run_task(&spec, &tar)
        .await
        .map_err(|e| e.to_string())?;
    check(
        t.verdict == Verdict::Accepted { changes: 1 },
        format!("task verdict {:?} {:?}", t.verdict, t.error),
    )?;
    let envelope = client
        .task_attestation(&t.id)
        .await
        .map_err(|e| e.to_string())?;
    let sandbox = attest::statement(&envelope)
        .map_err(|e| e.to_string())?
        .predicate
        .sandbox
        .id;
    let all = records(client, &sandbox).await?;
    let wanted = [
        "sandbox.create",
        "exec.start",
        "exec.end",
        "task.changeset",
        "task.end",
        kinds::ATTESTATION_SIGN,
        kinds::SEAL,
    ];
    check(
        kinds_among(&all, &wanted) == wanted,
        format!("task sandbox: {:?}", kinds_among(&all, &wanted)),
    )?;
    let start = all.iter().find(|r| r.kind == "exec.start").unwrap();
    let end = all.iter().find(|r| r.kind == "exec.end").unwrap();
    check(
        at(start, attr::PROCESS_COMMAND_ARGS) == &json!(argv)
            && at(start, attr::OPERATION) == "task.agent"
            && at(start, attr::PROCESS_WORKING_DIRECTORY) == "/workspace"
            && start
                .actor
                .as_ref()
                .is_some_and(|a| a.principal == "daemon"),
        format!(
            "the agent's exec.start: {:?} {:?}",
            start.attrs, start.actor
        ),
    )?;
    check(
        at(end, attr::EXEC_ID) == at(start, attr::EXEC_ID)
            && at(end, attr::PROCESS_EXIT_CODE) == 0
            && at(end, attr::STDOUT_BYTES) == "task-ran\n".len()
            && at(end, attr::STDOUT_DIGEST) == blake3::hash(b"task-ran\n").to_hex().as_str(),
        format!("the agent's exec.end: {:?}", end.attrs),
    )?;
    let exec = at(end, attr::EXEC_ID).as_str().unwrap_or_default();
    let cast = client
        .recording(&sandbox, exec)
        .await
        .map_err(|e| e.to_string())?;
    check(
        String::from_utf8_lossy(&cast).contains("task-ran"),
        "the agent's session recording",
    )?;
    let verdict = client
        .audit_verify(&sandbox)
        .await
        .map_err(|e| e.to_string())?;
    check(
        verdict.status == Status::Ok && verdict.sealed,
        format!("the task sandbox's journal: {verdict:?}"),
    )
}

/// Checks what `hutch audit ID --follow --json --kind exec` (`follow`) printed: once the
/// journal is sealed it ends by itself, having printed every exec record and nothing else, in
/// order, the exec run after it started included.
fn followed(follow: Child) -> Result {
    let out = exited(follow, Duration::from_secs(60))?;
    let printed = String::from_utf8_lossy(&out.stdout);
    check(
        out.status.success(),
        format!(
            "hutch audit --follow: {printed} {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    )?;
    let followed = printed
        .lines()
        .map(serde_json::from_str::<Record>)
        .collect::<std::result::Result<Vec<_>, _>>()?;
    check(
        followed.iter().all(|r| r.kind.starts_with("exec.")),
        "--kind exec printed other kinds",
    )?;
    let again = followed
        .iter()
        .position(|r| at(r, attr::PROCESS_COMMAND_ARGS) == &json!(["sh", "-c", "echo again"]));
    check(
        again.is_some_and(|i| followed[i + 1..].iter().any(|r| r.kind == "exec.end"))
            && followed[0].kind == "exec.start"
            && followed.windows(2).all(|w| w[0].seq < w[1].seq),
        format!("--follow printed {} records: {printed}", followed.len()),
    )
}

/// Tampering with copies of the real, sealed journal in `dir` (edit one byte, delete a line,
/// swap two, cut the tail, rewrite a record and re-hash the chain without the key) is each
/// detected and named, offline with the host key `host` (the edit through the CLI too).
fn tampering_is_named(dir: &Path, host: &str) -> Result {
    let key: [u8; 32] = hex::decode(host)?
        .try_into()
        .map_err(|_| "the host key is not 32 bytes")?;
    let text = std::fs::read_to_string(dir.join(JOURNAL_FILE))?;
    let lines: Vec<String> = text.lines().map(String::from).collect();
    let note = std::fs::read_to_string(dir.join(CHECKPOINT_FILE))?;
    let copy = tempfile::tempdir()?;
    let write = |lines: &[String]| -> Result {
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(copy.path().join(JOURNAL_FILE), text)?;
        Ok(std::fs::write(copy.path().join(CHECKPOINT_FILE), &note)?)
    };
    let verify = |lines: &[String]| -> Result<Report> {
        write(lines)?;
        Ok(verify_dir(copy.path(), &key)?)
    };
    let intact = verify(&lines)?;
    check(
        intact.status == Status::Ok,
        format!("the copy itself: {intact}"),
    )?;
    // The first exec's start: well before the seal's checkpoint.
    let target = lines
        .iter()
        .position(|l| l.contains("\"kind\":\"exec.start\""))
        .ok_or("no exec.start line")?;
    let seq = serde_json::from_str::<Record>(&lines[target])?.seq;
    let named = |what: &str, report: &Report, found: bool| {
        check(
            report.status == Status::Failed && found,
            format!("{what}: {report}"),
        )
    };

    let mut edited = lines.clone();
    edited[target] = edited[target].replacen("exec.start", "exec.stArt", 1);
    let report = verify(&edited)?;
    let failure = Failure::Edited { seq };
    named(
        "one byte edited",
        &report,
        report.failures.contains(&failure),
    )?;
    let out = common::hutch(copy.path())
        .args(["audit", "verify", "--offline"])
        .arg(copy.path())
        .args(["--host-key", host])
        .output()?;
    let said = String::from_utf8_lossy(&out.stdout);
    check(
        out.status.code() == Some(1) && said.contains(&failure.to_string()),
        format!("hutch audit verify --offline of an edited journal: {said}"),
    )?;

    let mut deleted = lines.clone();
    deleted.remove(target);
    let report = verify(&deleted)?;
    let failure = Failure::Deleted {
        first: seq,
        last: seq,
    };
    named(
        "a line deleted",
        &report,
        report.failures.contains(&failure),
    )?;

    let mut swapped = lines.clone();
    swapped.swap(target, target + 1);
    let report = verify(&swapped)?;
    let reordered = report
        .failures
        .iter()
        .any(|f| matches!(f, Failure::Reordered { .. }));
    named("two lines swapped", &report, reordered)?;

    let report = verify(&lines[..target])?;
    let cut = report
        .failures
        .iter()
        .any(|f| matches!(f, Failure::Truncated { .. }));
    named("the tail cut", &report, cut)?;

    let mut prev = chain::genesis(&serde_json::from_str::<Record>(&lines[0])?.sandbox);
    let mut rehashed = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let mut record: Record = serde_json::from_str(line)?;
        if i == target {
            record
                .attrs
                .insert(attr::PROCESS_COMMAND_ARGS.into(), json!(["innocent"]));
        }
        record.prev = hex::encode(prev);
        let text = serde_json::to_string(&record)?;
        prev = chain::line_hash(text.as_bytes());
        rehashed.push(text);
    }
    let report = verify(&rehashed)?;
    let all_rehashed = !report.failures.is_empty()
        && report
            .failures
            .iter()
            .all(|f| matches!(f, Failure::Rehashed { .. }));
    named("re-hashed without the key", &report, all_rehashed)
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
        crate::replay::pty_session(&client, &id).await?;

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
        pty_records(&client, &id, &all).await?;
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
    // `hutch audit --follow` from here on: it prints the exec records as they come, as JSON,
    // and ends by itself once the journal is sealed.
    let follow = common::hutch(restarted.home.path())
        .args(["audit", &id, "--follow", "--json", "--kind", "exec"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
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
            task_records(&client).await?;
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
    let after = match (after, follow) {
        (Ok(host_key), follow) => follow
            .map_err(Failed::from)
            .and_then(followed)
            .map(|()| host_key),
        (Err(e), follow) => {
            if let Ok(mut child) = follow {
                let _ = child.kill();
                let _ = child.wait();
            }
            Err(e)
        }
    };
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
            .arg(&dir)
            .args(["--host-key", &host_key])
            .output()?;
        check(
            out.status.success(),
            format!(
                "hutch audit verify --offline: {}",
                String::from_utf8_lossy(&out.stdout)
            ),
        )?;
        tampering_is_named(&dir, &host_key)
    });
    sigterm(&mut restarted);
    check(
        common::leaks(restarted.home.path()).is_empty(),
        "left behind after the audit case",
    )?;
    verified
}
