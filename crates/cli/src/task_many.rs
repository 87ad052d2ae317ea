//! `hutch task run-many FILE`: the tasks of a TOML file, concurrently, round by round. Each
//! round runs on a pack of a private working copy; its accepted changesets are then applied to
//! that copy (in file order, conflicts refused) before the next round starts.

use std::path::Path;

use futures::StreamExt;
use hutch_api::client::Client;
use hutch_task::{apply, changeset::validate, many::ManyFile, TaskRecord, Verdict};
use serde::Serialize;

use crate::{
    error::{chain, CliError},
    task_cmd::{usage, verdict_word},
};

/// How one task of the file ended.
#[derive(Debug, Serialize)]
struct Outcome {
    name: String,
    round: usize,
    id: Option<String>,
    /// accepted, empty, rejected, extraction-failed, agent-failed, verify-failed, conflict,
    /// error, or skipped (a task it is after did not succeed).
    status: String,
    detail: Option<String>,
}

fn status(r: &TaskRecord) -> (String, Option<String>) {
    if let Some(e) = &r.error {
        return ("error".into(), Some(e.clone()));
    }
    if let Some(a) = r.agent.as_ref().filter(|a| !a.succeeded()) {
        return (
            "agent-failed".into(),
            Some(format!("exit {:?} signal {:?}", a.exit_code, a.signal)),
        );
    }
    if r.verify.as_ref().is_some_and(|v| !v.passed) {
        return ("verify-failed".into(), None);
    }
    (verdict_word(&r.verdict).into(), None)
}

/// Copies the workspace (as `hutch task run` would send it) into `dst`.
fn unpack(tar: &[u8], dst: &Path) -> Result<(), CliError> {
    let mut a = tar::Archive::new(tar);
    a.set_preserve_permissions(true);
    a.unpack(dst)
        .map_err(|e| usage(format!("copying the workspace: {e}")))
}

/// Runs the file's tasks; exit 0 when every task succeeded.
pub async fn run_many(
    client: &Client,
    file: &Path,
    workspace: &Path,
    json: bool,
) -> Result<i32, CliError> {
    let text = std::fs::read_to_string(file).map_err(|source| CliError::ReadInput {
        path: file.display().to_string(),
        source,
    })?;
    let many = ManyFile::parse(&text).map_err(|e| usage(chain(&e)))?;
    let rounds = many.rounds().map_err(|e| usage(chain(&e)))?;
    let work = tempfile::Builder::new()
        .prefix("hutch-run-many")
        .tempdir()
        .map_err(CliError::Io)?;
    let pack = |dir: &Path| hutch_task::workspace::pack(dir).map_err(|e| usage(chain(&e)));
    unpack(&pack(workspace)?, work.path())?;
    let mut outcomes: Vec<Option<Outcome>> = many.tasks.iter().map(|_| None).collect();
    for (round_no, round) in rounds.iter().enumerate() {
        let ok = |name: &str, outcomes: &[Option<Outcome>]| {
            outcomes
                .iter()
                .flatten()
                .any(|o| o.name == name && matches!(o.status.as_str(), "accepted" | "empty"))
        };
        let mut runnable = Vec::new();
        for &i in round {
            let t = &many.tasks[i];
            if t.after.iter().all(|a| ok(a, &outcomes)) {
                runnable.push(i);
            } else {
                outcomes[i] = Some(Outcome {
                    name: t.name.clone(),
                    round: round_no + 1,
                    id: None,
                    status: "skipped".into(),
                    detail: Some(format!("after {:?}", t.after)),
                });
            }
        }
        let tar = pack(work.path())?;
        let runs = runnable.iter().map(|&i| {
            let spec = many.tasks[i].spec();
            let tar = &tar;
            async move {
                let r = match spec {
                    Ok(spec) => client.run_task(&spec, tar).await.map_err(|e| chain(&e)),
                    Err(e) => Err(chain(&e)),
                };
                (i, r)
            }
        });
        let mut done: Vec<_> = futures::stream::iter(runs)
            .buffer_unordered(many.concurrency)
            .collect()
            .await;
        done.sort_by_key(|(i, _)| *i);
        for (i, r) in done {
            let name = many.tasks[i].name.clone();
            let mut o = Outcome {
                name,
                round: round_no + 1,
                id: None,
                status: "error".into(),
                detail: None,
            };
            match r {
                Err(e) => o.detail = Some(e),
                Ok(rec) => {
                    o.id = Some(rec.id.clone());
                    (o.status, o.detail) = status(&rec);
                    if o.status == "accepted" {
                        if let Err(e) = apply_to_copy(client, &rec, work.path()).await {
                            o.status = "conflict".into();
                            o.detail = Some(e);
                        }
                    }
                }
            }
            if !json {
                eprintln!(
                    "round {} {:<16} {:<16} {}{}",
                    o.round,
                    o.name,
                    o.id.as_deref().unwrap_or("-"),
                    o.status,
                    o.detail
                        .as_deref()
                        .map(|d| format!(": {d}"))
                        .unwrap_or_default()
                );
            }
            outcomes[i] = Some(o);
        }
    }
    let outcomes: Vec<Outcome> = outcomes.into_iter().flatten().collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&outcomes).expect("serializable")
        );
    }
    let all_ok = outcomes
        .iter()
        .all(|o| matches!(o.status.as_str(), "accepted" | "empty"));
    Ok(if all_ok { 0 } else { 1 })
}

/// Applies an accepted task's changeset to the working copy.
async fn apply_to_copy(client: &Client, rec: &TaskRecord, dir: &Path) -> Result<(), String> {
    if !matches!(rec.verdict, Verdict::Accepted { .. }) {
        return Ok(());
    }
    let baseline = client.task_baseline(&rec.id).await.map_err(|e| chain(&e))?;
    let stream = client
        .task_changeset(&rec.id)
        .await
        .map_err(|e| chain(&e))?;
    let cs = validate(&stream, &baseline, &rec.spec.policy())
        .map_err(|r| format!("the changeset does not validate: {}", r[0]))?;
    apply::apply_to_dir(dir, &cs, &baseline).map_err(|e| chain(&e))
}
