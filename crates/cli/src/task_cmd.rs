//! `hutch task run|ls|show|diff|apply|verify|attest`: agent tasks through the daemon. The
//! workspace is packed here and sent; the agent's output streams back while it runs; the
//! changeset comes back checked by the daemon and is checked again here against the task's
//! attestation (both its signatures, with a host key this command knows rather than one the
//! daemon names: `--host-key` or the one pinned for the daemon, [`crate::host_keys`]; the
//! baseline and changeset served against its digests) before `apply` writes a byte.

use std::{
    io::{IsTerminal, Write},
    path::PathBuf,
};

use clap::{Args, Subcommand};
use hutch_api::client::Client;
use hutch_task::{
    apply,
    attest::{self, Envelope},
    changeset::validate,
    diff::escape_terminal,
    model::FRAME_STDOUT,
    Baseline, Limits, Policy, TaskRecord, TaskSpec, Verdict,
};

use crate::{
    args::{ConnArgs, NetArgs},
    error::CliError,
    host_keys::{self, Pinned, Pins},
};

/// `hutch task …`.
#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Run an agent command on a copy of a workspace in a fresh sandbox and keep its checked
    /// changeset (the workspace itself is never changed).
    Run(TaskRunArgs),
    /// Run the tasks of a TOML file concurrently, in rounds given by their `after` lists;
    /// each round starts from the workspace with the earlier rounds' changesets applied (in a
    /// temporary copy: the workspace itself is never changed).
    RunMany {
        /// Daemon connection.
        #[command(flatten)]
        conn: ConnArgs,
        /// The TOML file (see `hutch_task::many`).
        file: PathBuf,
        /// The workspace.
        #[arg(long, default_value = ".")]
        workspace: PathBuf,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List tasks.
    Ls {
        /// Daemon connection.
        #[command(flatten)]
        conn: ConnArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a task's record (JSON), then whether its attestation holds (on stderr).
    Show(TaskIdArgs),
    /// Check a stored task against its attestation (its signatures; the baseline, changeset
    /// and the record's attested facts against it), on the daemon.
    Verify(TaskIdArgs),
    /// Write a task's attestation: an in-toto statement (the changeset and the workspace's
    /// base commit; what ran, in which image, under which network policy, with which verdict,
    /// and the sandbox journal's checkpoint) in a DSSE envelope signed by the task sandbox's
    /// identity key and the host key.
    Attest {
        /// The task.
        #[command(flatten)]
        task: TaskIdArgs,
        /// Write it to this file instead of standard output.
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Print a task's changeset as a unified diff (control characters escaped on a terminal).
    Diff(TaskIdArgs),
    /// Apply a task's changeset to the workspace (a clean git tree, and every touched path as
    /// in the task's baseline), or commit it on a new branch without touching the work tree;
    /// refused when the task's attestation does not verify against the host key.
    Apply {
        /// The task.
        #[command(flatten)]
        task: TaskIdArgs,
        /// The daemon's host key (64 hex digits, or a file of them): attestations must be
        /// signed by it. Without it, the key pinned for this daemon (`$HUTCH_HOST_KEYS`, by
        /// default `~/.config/hutch/host-keys`); the first apply from a daemon pins the key
        /// it names.
        #[arg(long, value_name = "KEY")]
        host_key: Option<String>,
        /// The workspace to apply to.
        #[arg(long, default_value = ".")]
        workspace: PathBuf,
        /// Commit on this new branch (from HEAD) instead of changing the work tree.
        #[arg(long)]
        branch: Option<String>,
    },
}

/// A task id and the daemon connection.
#[derive(Debug, Args)]
pub struct TaskIdArgs {
    /// Daemon connection.
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Task id.
    pub id: String,
}

/// `hutch task run`.
#[derive(Debug, Args)]
pub struct TaskRunArgs {
    /// Daemon connection.
    #[command(flatten)]
    pub conn: ConnArgs,
    /// The workspace: a git repository (tracked plus untracked-but-not-ignored files, and
    /// `.git`) or a plain directory.
    #[arg(long, default_value = ".")]
    pub workspace: PathBuf,
    /// Restore the sandboxes from this template.
    #[arg(long)]
    pub template: Option<String>,
    /// The agent's network: none, open, or allow (only --net-allow targets).
    #[arg(long = "net", default_value = "none", value_parser = ["none", "open", "allow"])]
    pub net: String,
    /// With --net allow: a CIDR, an address or a domain (repeatable).
    #[arg(long = "net-allow", value_name = "TARGET")]
    pub net_allow: Vec<String>,
    /// Environment for the agent (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Attach a secret to the agent's sandbox (repeatable): the agent sees its placeholder,
    /// never its value.
    #[arg(long = "secret", value_name = "NAME")]
    pub secrets: Vec<String>,
    /// Kill the agent after this long (`90`, `90s`, `10m`, `2h`).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub timeout: u64,
    /// Only paths matching these globs may change (repeatable; default: all but `.git`).
    #[arg(long = "allow", value_name = "GLOB")]
    pub allow: Vec<String>,
    /// Apply the changeset in a fresh sandbox without a network and run this shell command.
    #[arg(long)]
    pub verify: Option<String>,
    /// Largest changed file, in bytes.
    #[arg(long, default_value_t = Limits::default().max_file_bytes)]
    pub max_file_bytes: u64,
    /// Most changed paths.
    #[arg(long, default_value_t = Limits::default().max_files)]
    pub max_files: u64,
    /// Print the record as JSON instead of the agent's output and a summary.
    #[arg(long)]
    pub json: bool,
    /// The agent command.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not K=V"))?;
    if !hutch_types::valid_env_name(k) || v.contains('\0') {
        return Err(format!(
            "{k:?} is not a valid variable name (or the value has NUL)"
        ));
    }
    Ok((k.to_string(), v.to_string()))
}

/// Seconds from `90`, `90s`, `10m` or `2h`.
fn parse_duration(s: &str) -> Result<u64, String> {
    let (num, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("{s:?}: the unit must be s, m or h")),
    };
    Ok(n.saturating_mul(mult))
}

pub(crate) fn usage(e: impl std::fmt::Display) -> CliError {
    CliError::Usage(e.to_string())
}

impl TaskCommand {
    /// The daemon connection of any subcommand.
    pub fn conn(&self) -> &ConnArgs {
        match self {
            TaskCommand::Run(a) => &a.conn,
            TaskCommand::RunMany { conn, .. } | TaskCommand::Ls { conn, .. } => conn,
            TaskCommand::Show(a) | TaskCommand::Diff(a) | TaskCommand::Verify(a) => &a.conn,
            TaskCommand::Apply { task, .. } | TaskCommand::Attest { task, .. } => &task.conn,
        }
    }
}

/// Runs `hutch task …` through `client`, to the daemon named `daemon` (where its host key is
/// pinned).
pub async fn run(client: &Client, daemon: &str, cmd: TaskCommand) -> Result<i32, CliError> {
    match cmd {
        TaskCommand::Run(a) => run_task(client, a).await,
        TaskCommand::RunMany {
            file,
            workspace,
            json,
            ..
        } => crate::task_many::run_many(client, &file, &workspace, json).await,
        TaskCommand::Ls { json, .. } => {
            let tasks = client.tasks().await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&tasks).expect("serializable")
                );
            } else {
                println!(
                    "{:<16} {:<18} {:<8} {:<8} COMMAND",
                    "ID", "VERDICT", "EXIT", "VERIFY"
                );
                for t in tasks {
                    println!(
                        "{:<16} {:<18} {:<8} {:<8} {}",
                        t.id,
                        verdict_word(&t.verdict),
                        t.agent
                            .as_ref()
                            .and_then(|a| a.exit_code)
                            .map_or("-".into(), |c| c.to_string()),
                        t.verify
                            .as_ref()
                            .map_or("-", |v| if v.passed { "pass" } else { "fail" }),
                        t.spec
                            .command
                            .join(" ")
                            .chars()
                            .take(60)
                            .collect::<String>()
                    );
                }
            }
            Ok(0)
        }
        TaskCommand::Show(a) => {
            let t = client.task(&a.id).await?;
            println!(
                "{}",
                serde_json::to_string_pretty(&t).expect("serializable")
            );
            let check = client.task_signature(&a.id).await?;
            eprintln!("attestation: {check}");
            Ok(if check.is_ok() { 0 } else { 1 })
        }
        TaskCommand::Verify(a) => {
            let check = client.task_signature(&a.id).await?;
            println!("attestation: {check}");
            Ok(if check.is_ok() { 0 } else { 1 })
        }
        TaskCommand::Attest { task, output } => {
            let envelope = client.task_attestation(&task.id).await?;
            let mut json = serde_json::to_string_pretty(&envelope).expect("serializable");
            json.push('\n');
            match output {
                Some(path) => std::fs::write(&path, json)
                    .map_err(|e| usage(format!("writing {}: {e}", path.display())))?,
                None => print!("{json}"),
            }
            Ok(0)
        }
        TaskCommand::Diff(a) => {
            let diff = client.task_diff(&a.id).await?;
            if std::io::stdout().is_terminal() {
                print!("{}", escape_terminal(&diff));
            } else {
                print!("{diff}");
            }
            Ok(0)
        }
        TaskCommand::Apply {
            task,
            workspace,
            branch,
            host_key,
        } => {
            let record = client.task(&task.id).await?;
            if !matches!(record.verdict, Verdict::Accepted { .. }) {
                return Err(usage(format!(
                    "task {} has no accepted changeset ({})",
                    task.id,
                    verdict_word(&record.verdict)
                )));
            }
            let envelope = client.task_attestation(&task.id).await?;
            let baseline = client.task_baseline(&task.id).await?;
            let stream = client.task_changeset(&task.id).await?;
            let policy = attested_policy(
                &envelope,
                daemon,
                host_key.as_deref(),
                &record,
                &baseline,
                &stream,
            )?;
            let cs = validate(&stream, &baseline, &policy).map_err(|r| {
                usage(format!(
                    "the changeset does not validate: {}",
                    r.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                ))
            })?;
            match branch {
                Some(b) => {
                    let msg = format!(
                        "hutch task {}\n\n{}",
                        record.id,
                        record.spec.command.join(" ")
                    );
                    let commit = apply::apply_to_branch(&workspace, &b, &cs, &baseline, &msg)
                        .map_err(|e| usage(crate::error::chain(&e)))?;
                    println!("{b} {commit}");
                    for c in cs.changes.iter().filter(|c| c.is_dir()) {
                        eprintln!(
                            "note: git records no empty directories; not in the commit: {:?}",
                            c.paths()
                        );
                    }
                }
                None => {
                    apply::apply_to_work_tree(&workspace, &cs, &baseline)
                        .map_err(|e| usage(crate::error::chain(&e)))?;
                    println!(
                        "applied {} change(s) to {}",
                        cs.changes.len(),
                        workspace.display()
                    );
                }
            }
            Ok(0)
        }
    }
}

/// The policy a changeset is validated with again, once `envelope` vouches for `stream` as
/// `record`'s changeset from `baseline` (checked here with the host key `given`, else the one
/// pinned for `daemon`, else the one the envelope names, pinned once it verifies); every
/// reason otherwise.
fn attested_policy(
    envelope: &Envelope,
    daemon: &str,
    given: Option<&str>,
    record: &TaskRecord,
    baseline: &Baseline,
    stream: &[u8],
) -> Result<Policy, CliError> {
    let refuse = |reasons: Vec<String>, whose: &str| {
        usage(format!(
            "task {}: the attestation does not verify against {whose} ({}); refusing to apply it",
            record.id,
            reasons.join("; ")
        ))
    };
    let named = attest::statement(envelope)
        .ok()
        .and_then(|s| hex::decode(s.predicate.host_key).ok())
        .and_then(|k| <[u8; 32]>::try_from(k).ok());
    let (host, whose, pin) = match given {
        Some(k) => (host_keys::parse(k)?, "the host key given".to_string(), None),
        None => {
            let pins = host_keys::default_file()
                .map(Pins::new)
                .ok_or_else(|| usage("no place to pin host keys ($HOME unset): pass --host-key"))?;
            let named = named
                .ok_or_else(|| refuse(vec!["it names no host key".into()], "the key it names"))?;
            match pins.lookup(daemon, named)? {
                Pinned::Known(k) => {
                    let whose = format!(
                        "the host key pinned for {daemon} in {}",
                        pins.file().display()
                    );
                    (k, whose, None)
                }
                Pinned::New(k) => (k, format!("the host key {daemon} names"), Some(pins)),
            }
        }
    };
    let statement = attest::check_task(
        Some(envelope),
        &host,
        record,
        &baseline.digest(),
        Some(stream),
    )
    .map_err(|reasons| refuse(reasons, &whose))?;
    let p = &statement.predicate;
    if !matches!(p.verdict, Verdict::Accepted { .. }) {
        let why = format!("its verdict is {}", verdict_word(&p.verdict));
        return Err(refuse(vec![why], &whose));
    }
    if let Some(pins) = pin {
        pins.pin(daemon, &host)?;
        eprintln!(
            "note: pinned host key {}… for {daemon} in {}; later applies refuse another",
            &hex::encode(host)[..16],
            pins.file().display()
        );
    }
    Ok(Policy {
        allow: p.policy.allow.clone(),
        limits: p.policy.limits,
    })
}

pub(crate) fn verdict_word(v: &Verdict) -> &'static str {
    match v {
        Verdict::Accepted { .. } => "accepted",
        Verdict::Empty => "empty",
        Verdict::Rejected { .. } => "rejected",
        Verdict::ExtractionFailed { .. } => "extraction-failed",
    }
}

async fn run_task(client: &Client, a: TaskRunArgs) -> Result<i32, CliError> {
    let tar =
        hutch_task::workspace::pack(&a.workspace).map_err(|e| usage(crate::error::chain(&e)))?;
    let net = NetArgs {
        mode: a.net,
        allow: a.net_allow,
        ports: vec![],
    };
    let spec = TaskSpec {
        command: a.command,
        template: a.template,
        network: crate::remote::policy(&net)?,
        env: a.env.into_iter().collect(),
        secrets: a.secrets,
        timeout_secs: a.timeout,
        allow: a.allow,
        verify: a.verify,
        limits: Limits {
            max_file_bytes: a.max_file_bytes,
            max_files: a.max_files,
            ..Limits::default()
        },
    };
    let record = if a.json {
        client.run_task(&spec, &tar).await?
    } else {
        // The agent's output as it comes (like `hutch exec`); the record keeps a capped copy.
        client
            .run_task_streaming(&spec, &tar, |kind, data| {
                let _ = if kind == FRAME_STDOUT {
                    std::io::stdout().write_all(data)
                } else {
                    std::io::stderr().write_all(data)
                };
            })
            .await?
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&record).expect("serializable")
        );
    } else {
        summary(&record);
    }
    let ok = matches!(record.verdict, Verdict::Accepted { .. } | Verdict::Empty)
        && record.agent.as_ref().is_some_and(|a| a.succeeded())
        && record.verify.as_ref().is_none_or(|v| v.passed)
        && record.error.is_none();
    Ok(if ok { 0 } else { 1 })
}

fn summary(t: &TaskRecord) {
    let _ = std::io::stdout().flush();
    let exit = t.agent.as_ref().map_or("did not run".to_string(), |a| {
        match (a.exit_code, a.signal) {
            (Some(c), _) => format!("exit {c}{}", if a.timed_out { " (timed out)" } else { "" }),
            (_, Some(s)) => format!(
                "signal {s}{}",
                if a.timed_out { " (timed out)" } else { "" }
            ),
            _ => "unknown".into(),
        }
    });
    eprintln!(
        "task {}: agent {exit}; changeset {}",
        t.id,
        verdict_word(&t.verdict)
    );
    match &t.verdict {
        Verdict::Rejected { rejections } => {
            for r in rejections {
                eprintln!("  rejected: {r}");
            }
        }
        Verdict::ExtractionFailed { reason } => eprintln!("  {reason}"),
        Verdict::Accepted { changes } => eprintln!(
            "  {changes} change(s); `hutch task diff {}` shows them",
            t.id
        ),
        Verdict::Empty => {}
    }
    for r in &t.not_carried {
        eprintln!("  not carried: {r}");
    }
    if let Some(v) = &t.verify {
        eprintln!(
            "  verify `{}`: {}",
            v.command,
            if v.passed { "passed" } else { "FAILED" }
        );
    }
    if let Some(e) = &t.error {
        eprintln!("  error: {e}");
    }
}
