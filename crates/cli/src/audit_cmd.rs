//! `hutch audit`: a sandbox's journal as a timeline, and its verification (through the daemon,
//! or offline from the journal's files and the host's public key).

use std::{path::PathBuf, time::Duration};

use clap::{Args, Subcommand};
use hutch_api::client::Client;
use hutch_daemon::Home;
use hutch_journal::{kinds, Record, Report, Status};
use hutch_types::SandboxId;

use crate::{args::ConnArgs, error::CliError, remote};

/// `hutch audit ID [--json] [--kind K] [--follow]` or `hutch audit verify …`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AuditArgs {
    /// Verify instead of printing.
    #[command(subcommand)]
    pub command: Option<AuditCommand>,
    /// Daemon connection.
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Sandbox id.
    pub id: Option<SandboxId>,
    /// Print each record as its JSON line.
    #[arg(long)]
    pub json: bool,
    /// Only records of this kind, or below it (`exec` takes `exec.start` and `exec.end`).
    #[arg(long)]
    pub kind: Option<String>,
    /// Keep printing records as they are written, until the journal is sealed.
    #[arg(long, short = 'f')]
    pub follow: bool,
}

/// `hutch audit verify`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check a journal's chain, checkpoints and seal; exit 0 when intact and sealed, 2 when
    /// intact but unsealed, 1 when something was changed (each failure named).
    Verify(VerifyArgs),
}

/// `hutch audit verify ID` or `hutch audit verify --offline DIR --host-key KEY`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Daemon connection.
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Sandbox id (asks the daemon).
    #[arg(required_unless_present = "offline", conflicts_with = "offline")]
    pub id: Option<SandboxId>,
    /// A journal directory (`$HUTCH_HOME/journal/ID`, or a copy): verify without a daemon.
    #[arg(long, value_name = "DIR", requires = "host_key")]
    pub offline: Option<PathBuf>,
    /// The host's public key (64 hex digits, or a file holding them), as `hutch audit ID
    /// --json` or the journal's API answer name it.
    #[arg(long, value_name = "KEY")]
    pub host_key: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `hutch audit`.
pub async fn run(home: &Home, args: AuditArgs) -> Result<i32, CliError> {
    match args.command {
        Some(AuditCommand::Verify(v)) => verify(home, v).await,
        None => {
            let id = args
                .id
                .ok_or_else(|| CliError::Usage("hutch audit needs a sandbox id".into()))?;
            let client = remote::client(home, &args.conn);
            timeline(
                &client,
                id.as_str(),
                args.kind.as_deref(),
                args.json,
                args.follow,
            )
            .await
        }
    }
}

/// How often `--follow` asks for more.
const FOLLOW_EVERY: Duration = Duration::from_millis(500);

/// Prints the journal, and with `follow` what comes, until the seal's checkpoint.
async fn timeline(
    client: &Client,
    id: &str,
    kind: Option<&str>,
    json: bool,
    follow: bool,
) -> Result<i32, CliError> {
    let mut from = 0;
    let mut sealed = false;
    loop {
        // Unfiltered when following, to see the seal; filtered here.
        let log = client
            .audit(id, from, if follow { None } else { kind })
            .await?;
        for record in &log.records {
            from = record.seq + 1;
            sealed |= record.kind == kinds::SEAL;
            if kind.is_none_or(|k| record.kind == k || record.kind.starts_with(&format!("{k}."))) {
                print_record(record, json);
            }
        }
        if !follow
            || (sealed
                && log
                    .records
                    .last()
                    .is_some_and(|r| r.kind == kinds::CHECKPOINT))
        {
            return Ok(0);
        }
        tokio::time::sleep(FOLLOW_EVERY).await;
    }
}

/// One record: its JSON line, or `time seq kind actor attrs`.
fn print_record(record: &Record, json: bool) {
    if json {
        println!("{}", serde_json::to_string(record).expect("serialisable"));
        return;
    }
    let actor = record
        .actor
        .as_ref()
        .map(|a| a.principal.as_str())
        .unwrap_or("-");
    let attrs: Vec<String> = record
        .attrs
        .iter()
        .map(|(k, v)| match (k.as_str(), v) {
            // A note spans lines: its size line says what it covers.
            (hutch_journal::attr::CHECKPOINT_NOTE, serde_json::Value::String(note)) => {
                format!("covers={}", note.lines().nth(1).unwrap_or("?"))
            }
            // JSON escapes control characters, so guest-influenced text cannot drive the terminal.
            _ => format!("{k}={v}"),
        })
        .collect();
    println!(
        "{} {:>6} {:<22} {:<12} {}",
        record.time,
        record.seq,
        record.kind,
        actor,
        attrs.join(" ")
    );
}

/// Verifies through the daemon or offline; the exit code says the verdict.
async fn verify(home: &Home, args: VerifyArgs) -> Result<i32, CliError> {
    let report = match (&args.offline, &args.id) {
        (Some(dir), _) => {
            let key = crate::host_keys::parse(args.host_key.as_deref().unwrap_or_default())?;
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || hutch_journal::verify_dir(&dir, &key))
                .await
                .map_err(|_| CliError::Interrupted)??
        }
        (None, Some(id)) => {
            remote::client(home, &args.conn)
                .audit_verify(id.as_str())
                .await?
        }
        (None, None) => return Err(CliError::Usage("a sandbox id or --offline DIR".into())),
    };
    print_report(&report, args.json);
    Ok(match report.status {
        Status::Ok => 0,
        Status::Failed => 1,
        Status::Unsealed => 2,
    })
}

fn print_report(report: &Report, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(report).expect("serialisable")
        );
    } else {
        println!("{report}");
    }
}
