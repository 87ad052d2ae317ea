//! `hutch secret`: secrets the guest never holds. A value goes to the daemon once (from an
//! environment variable, a file or stdin, never the command line) and never comes back; a
//! sandbox that has it attached (`--secret NAME`) sees only a placeholder.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use hutch_api::{client::Client, SetSecretBody};
use hutch_types::{BrokerEvent, SandboxId, SecretBinding, SecretInfo, SecretLocation};

use crate::{args::ConnArgs, error::CliError};

/// `hutch secret …`.
#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Set a secret, or rotate one (same placeholders in every sandbox, new value, live).
    Set(Box<SetArgs>),
    /// List secrets: names, variables, bindings and labels; never values.
    Ls {
        /// Daemon connection.
        #[command(flatten)]
        conn: ConnArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a secret no sandbox has attached.
    Rm {
        /// Daemon connection.
        #[command(flatten)]
        conn: ConnArgs,
        /// The secret.
        name: String,
    },
    /// What the broker did with a sandbox's secrets: each substitution, refusal, violation
    /// and scrub (never a value or a placeholder).
    Log {
        /// Daemon connection.
        #[command(flatten)]
        conn: ConnArgs,
        /// The sandbox.
        id: SandboxId,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

impl SecretCommand {
    /// The daemon connection the command names.
    pub fn conn(&self) -> ConnArgs {
        match self {
            SecretCommand::Set(a) => ConnArgs {
                host: a.daemon.clone(),
                token: a.token.clone(),
            },
            SecretCommand::Ls { conn, .. }
            | SecretCommand::Rm { conn, .. }
            | SecretCommand::Log { conn, .. } => conn.clone(),
        }
    }
}

/// `hutch secret set`. `--host` names the binding's destination here; the daemon's address
/// is `--daemon` (or `HUTCH_HOST`).
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["from_env", "from_file", "stdin", "ssh_key"])))]
pub struct SetArgs {
    /// The secret's name (`[A-Za-z0-9_.-]`, starting with a letter or digit).
    pub name: String,
    /// Read the value from this environment variable of `hutch`.
    #[arg(long, value_name = "VAR")]
    pub from_env: Option<String>,
    /// Read the value from this file (one trailing newline dropped).
    #[arg(long, value_name = "FILE")]
    pub from_file: Option<PathBuf>,
    /// Read the value from stdin (one trailing newline dropped).
    #[arg(long)]
    pub stdin: bool,
    /// Make it an SSH key: this unencrypted OpenSSH private key file (Ed25519 or ECDSA). The
    /// guest gets `SSH_AUTH_SOCK`, never the key; it signs only for an allowed host key.
    #[arg(long, value_name = "FILE", requires = "ssh_allow_host_key")]
    pub ssh_key: Option<PathBuf>,
    /// With --ssh-key: a server host key it may sign for (`ssh-ed25519 AAAA...`, as in
    /// `/etc/ssh/ssh_host_ed25519_key.pub`; repeatable). Alone: a new list for an SSH key.
    #[arg(long, value_name = "KEY")]
    pub ssh_allow_host_key: Vec<String>,
    /// The variable the guest sees, holding the placeholder.
    #[arg(long, value_name = "VAR")]
    pub env: Option<String>,
    /// One binding: the destination host (exact DNS name).
    #[arg(long = "host", value_name = "HOST")]
    pub bind_host: Option<String>,
    /// With --host: the destination port.
    #[arg(
        long,
        value_name = "PORT",
        requires = "bind_host",
        default_value_t = 443
    )]
    pub port: u16,
    /// With --host: the path pattern (`*` within a segment, `**` across).
    #[arg(long, value_name = "GLOB", requires = "bind_host")]
    pub path: Option<String>,
    /// With --host: an allowed method (repeatable; any but TRACE/TRACK if none).
    #[arg(long = "method", value_name = "METHOD", requires = "bind_host")]
    pub methods: Vec<String>,
    /// With --host: where the value goes: header:NAME, bearer, basic-password or query:NAME.
    #[arg(long, value_name = "LOCATION", requires = "bind_host")]
    pub at: Option<SecretLocation>,
    /// With --host: git fetches only, pushes refused.
    #[arg(long, requires = "bind_host")]
    pub fetch_only: bool,
    /// More bindings: `host=H,at=LOCATION[,port=P][,path=GLOB][,method=M]...[,fetch-only]`
    /// (repeatable). Without any binding, an existing secret keeps its own.
    #[arg(long = "bind", value_name = "SPEC", value_parser = parse_binding)]
    pub bind: Vec<SecretBinding>,
    /// Label (repeatable); without any, an existing secret keeps its own.
    #[arg(long = "label", short = 'l', value_name = "K=V", value_parser = crate::args::parse_label)]
    pub labels: Vec<(String, String)>,
    /// Daemon address over TCP (`host:port`); the local Unix socket otherwise.
    #[arg(long = "daemon", env = "HUTCH_HOST", value_name = "ADDR")]
    pub daemon: Option<String>,
    /// Bearer token for TCP.
    #[arg(long, env = "HUTCH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the secret as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Parses `--bind host=H,at=L[,port=P][,path=G][,method=M]...[,fetch-only]`.
pub fn parse_binding(s: &str) -> Result<SecretBinding, String> {
    let (mut host, mut at, mut port, mut path) = (None, None, 443, None);
    let (mut methods, mut fetch_only) = (Vec::new(), false);
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("host", v)) => host = Some(v.to_string()),
            Some(("at", v)) => at = Some(v.parse::<SecretLocation>().map_err(|e| e.to_string())?),
            Some(("port", v)) => port = v.parse().map_err(|_| format!("port {v:?}"))?,
            Some(("path", v)) => path = Some(v.to_string()),
            Some(("method", v)) => methods.push(v.to_string()),
            None if part == "fetch-only" => fetch_only = true,
            _ => {
                return Err(format!(
                    "{part:?}: expected host=, at=, port=, path=, method= or fetch-only"
                ))
            }
        }
    }
    SecretBinding {
        host: host.ok_or("a binding needs host=")?,
        port,
        path,
        methods,
        at: at.ok_or("a binding needs at=")?,
        fetch_only,
    }
    .normalised()
    .map_err(|e| e.to_string())
}

/// Runs `hutch secret …`.
pub async fn run(client: &Client, cmd: SecretCommand) -> Result<i32, CliError> {
    match cmd {
        SecretCommand::Set(a) => set(client, *a).await,
        SecretCommand::Ls { json, .. } => {
            let all = client.secrets().await?;
            if json {
                print_json(&all);
            } else {
                print_table(&all);
            }
            Ok(0)
        }
        SecretCommand::Rm { name, .. } => {
            client.remove_secret(&name).await?;
            println!("{name}");
            Ok(0)
        }
        SecretCommand::Log { id, json, .. } => {
            let events = client.secret_log(id.as_str()).await?;
            if json {
                print_json(&events);
            } else {
                events.iter().for_each(|e| println!("{}", log_line(e)));
            }
            Ok(0)
        }
    }
}

async fn set(client: &Client, a: SetArgs) -> Result<i32, CliError> {
    let value = read_value(&a)?;
    let mut bindings = a.bind.clone();
    if let Some(host) = &a.bind_host {
        let at =
            a.at.clone()
                .ok_or_else(|| CliError::Usage("--host needs --at LOCATION".into()))?;
        let one = SecretBinding {
            host: host.clone(),
            port: a.port,
            path: a.path.clone(),
            methods: a.methods.clone(),
            at,
            fetch_only: a.fetch_only,
        };
        bindings.insert(0, one);
    }
    let body = SetSecretBody {
        value,
        env: a.env,
        bindings: (!bindings.is_empty()).then_some(bindings),
        labels: a.labels.into_iter().collect(),
        ssh_allowed_host_keys: (!a.ssh_allow_host_key.is_empty()).then_some(a.ssh_allow_host_key),
    };
    let info = client.set_secret(&a.name, &body).await?;
    if a.json {
        print_json(&info);
    } else {
        println!("{}", info.name);
    }
    Ok(0)
}

/// The value from the one source named (never a command-line argument: those are visible
/// to every user of the host in `ps`).
fn read_value(a: &SetArgs) -> Result<String, CliError> {
    let raw = if let Some(var) = &a.from_env {
        std::env::var(var)
            .map_err(|_| CliError::Usage(format!("--from-env: {var} is not set (or not UTF-8)")))?
    } else if let Some(file) = a.from_file.as_ref().or(a.ssh_key.as_ref()) {
        std::fs::read_to_string(file)
            .map_err(|e| CliError::Usage(format!("--from-file {}: {e}", file.display())))?
    } else {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| CliError::Usage(format!("--stdin: {e}")))?;
        s
    };
    let value = raw
        .strip_suffix("\r\n")
        .or_else(|| raw.strip_suffix('\n'))
        .unwrap_or(&raw);
    if value.is_empty() {
        return Err(CliError::Usage("the secret's value is empty".into()));
    }
    Ok(value.to_string())
}

/// `host:port/path method,method at`.
fn binding_text(b: &SecretBinding) -> String {
    let mut s = format!("{}:{}{}", b.host, b.port, b.path.as_deref().unwrap_or(""));
    if !b.methods.is_empty() {
        s.push_str(&format!(" {}", b.methods.join(",")));
    }
    s.push_str(&format!(" {}", b.at));
    if b.fetch_only {
        s.push_str(" fetch-only");
    }
    s
}

fn print_table(all: &[SecretInfo]) {
    println!("{:<20} {:<24} {:<20} BINDINGS", "NAME", "ENV", "UPDATED");
    for s in all {
        let mut bindings: Vec<String> = s.bindings.iter().map(binding_text).collect();
        if let Some(ssh) = &s.ssh {
            bindings.push(format!(
                "ssh-agent ({} host key{})",
                ssh.allowed_host_keys.len(),
                if ssh.allowed_host_keys.len() == 1 {
                    ""
                } else {
                    "s"
                }
            ));
        }
        println!(
            "{:<20} {:<24} {:<20} {}",
            s.name,
            s.env.as_deref().unwrap_or("-"),
            s.updated_at,
            bindings.join("; ")
        );
    }
}

/// One event: time, decision, secret, method, destination and path, and why.
fn log_line(e: &BrokerEvent) -> String {
    let decision = serde_json::to_value(e.decision)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default();
    let mut line = format!(
        "{} {:<11} {:<16} {:<7} {}:{}{}",
        e.time,
        decision,
        e.secret,
        e.method.as_deref().unwrap_or("-"),
        e.host,
        e.port,
        e.path.as_deref().unwrap_or("")
    );
    if let Some(reason) = &e.reason {
        line.push_str(&format!(" ({reason})"));
    }
    line
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bindings_parse_from_the_bind_form() {
        let b = parse_binding(
            "host=API.Example.test,at=header:X-Api-Key,port=8443,path=/v1/**,method=POST,method=GET",
        )
        .unwrap();
        assert_eq!(b.host, "api.example.test");
        assert_eq!(b.port, 8443);
        assert_eq!(b.path.as_deref(), Some("/v1/**"));
        assert_eq!(b.methods, ["POST", "GET"]);
        assert_eq!(b.at.to_string(), "header:x-api-key");
        assert!(!b.fetch_only);
        let git = parse_binding("host=git.example.test,at=basic-password,fetch-only").unwrap();
        assert!(git.fetch_only);
        assert_eq!(
            binding_text(&git),
            "git.example.test:443 basic-password fetch-only"
        );
        for bad in [
            "at=bearer",
            "host=a.test",
            "host=a.test,at=header:user-agent",
            "host=1.2.3.4,at=bearer",
            "host=a.test,at=bearer,method=TRACE",
            "host=a.test,at=bearer,colour=red",
        ] {
            assert!(parse_binding(bad).is_err(), "{bad}");
        }
    }
}
