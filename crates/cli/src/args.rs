//! Command-line grammar.

use clap::{Args, Parser, Subcommand};
use hutch_types::SandboxId;

/// Give every coding agent its own disposable microVM.
#[derive(Debug, Parser)]
#[command(name = "hutch", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a fresh VM, run one command in it, and remove the VM again.
    Run(RunArgs),
    /// Build and list guest images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Check what this host has and lacks for running sandboxes.
    Doctor,
    /// Install optional host components (Firecracker).
    #[command(subcommand)]
    Setup(crate::setup_cmd::SetupCommand),
    /// Serve the sandbox API on a Unix socket (and optionally TCP with tokens).
    Daemon(hutch_daemon::DaemonArgs),
    /// Serve the sandbox API in front of a fleet of hosts (stateless; run as many as wanted).
    Gateway(hutch_daemon::GatewayArgs),
    /// Fleet-wide tokens, accepted by every gateway and host of a fleet.
    FleetToken(hutch_daemon::gateway::FleetTokenArgs),
    /// A fleet's hosts and sandboxes, through a gateway: hosts, drain, undrain, ls.
    #[command(subcommand)]
    Fleet(crate::fleet_cmd::FleetCommand),
    /// Create a sandbox through the daemon and print its id.
    Create(CreateArgs),
    /// List sandboxes.
    Ls(ListArgs),
    /// Show one sandbox.
    Inspect(IdArgs),
    /// Run a command in a sandbox, stdio attached.
    Exec(ExecArgs),
    /// Open an interactive shell (a PTY) in a sandbox.
    Shell(ShellArgs),
    /// Copy a file or directory tree into or out of a sandbox (`ID:/path` names the guest side).
    Cp(CpArgs),
    /// Print a sandbox's console log (`-f`: and follow it).
    Logs(LogsArgs),
    /// Freeze a sandbox's vCPUs.
    Pause(IdArgs),
    /// Thaw a paused sandbox, or restore one paused to disk.
    Resume(IdArgs),
    /// Pause a sandbox to disk: save its memory and disk and stop its VMM (resume restores it,
    /// also after a daemon restart).
    Suspend(IdArgs),
    /// Snapshot a sandbox and restore children from it (they inherit its files and policy,
    /// not its identity or secrets).
    Fork(crate::template_cmd::ForkArgs),
    /// Create, list and remove templates (saved, provisioned VMs that sandboxes restore from).
    #[command(subcommand)]
    Template(crate::template_cmd::TemplateCommand),
    /// Run coding agents on a copy of a workspace and review, diff and apply their changes.
    #[command(subcommand)]
    Task(crate::task_cmd::TaskCommand),
    /// Print a sandbox's journal (`--follow`: and what comes), or verify it (`audit verify`).
    Audit(crate::audit_cmd::AuditArgs),
    /// Play an exec's session recording back in this terminal (`--speed`, `--idle-limit`).
    Replay(crate::replay_cmd::ReplayArgs),
    /// Power a sandbox off, keeping its record.
    Stop(IdArgs),
    /// Boot a stopped sandbox again (same id and spec; a fresh disk).
    Start(IdArgs),
    /// Destroy sandboxes and everything they own.
    Rm(RmArgs),
    /// Show or change a sandbox's network policy and decisions.
    #[command(subcommand)]
    Net(NetCommand),
    /// Publish a sandbox's guest TCP port on a host loopback port (127.0.0.1), list
    /// published ports, or unpublish one (`--remove`).
    Port(crate::port_cmd::PortArgs),
    /// Secrets the guest never holds: set, list and remove them, and see what the broker did
    /// with a sandbox's (`hutch create|run|task run --secret NAME` attaches one).
    #[command(subcommand)]
    Secret(crate::secret_cmd::SecretCommand),
    /// Manage API tokens for TCP access.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Serve MCP (Model Context Protocol) on stdin/stdout for an MCP client that starts its
    /// servers as processes: a bridge to the daemon's `/mcp` endpoint.
    Mcp(McpArgs),
    /// Print shell completions.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// How to reach the daemon.
#[derive(Debug, Args, Clone)]
pub struct ConnArgs {
    /// Daemon address over TCP (`host:port`); the local Unix socket otherwise.
    #[arg(long, env = "HUTCH_HOST", global = true)]
    pub host: Option<String>,
    /// Bearer token for TCP.
    #[arg(long, env = "HUTCH_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
}

/// A network policy on the command line.
#[derive(Debug, Args, Clone)]
pub struct NetArgs {
    /// Network: none (no NIC), open (every public address) or allow (only --allow targets).
    #[arg(long = "net", default_value = "none", value_parser = ["none", "open", "allow"])]
    pub mode: String,
    /// With --net allow: a CIDR, an address or a domain (`*.suffix` for every name below it).
    #[arg(long = "allow", value_name = "TARGET")]
    pub allow: Vec<String>,
    /// With --net allow: only these destination ports (repeatable; any if none given).
    #[arg(long = "port", value_name = "PORT")]
    pub ports: Vec<u16>,
}

/// `hutch create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// VM shape.
    #[command(flatten)]
    pub vm: hutch_daemon::VmArgs,
    /// Daemon connection.
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Environment for every command in the sandbox (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Label (repeatable).
    #[arg(long = "label", short = 'l', value_name = "K=V", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Destroy the sandbox after this many seconds.
    #[arg(long, value_name = "SECS")]
    pub ttl: Option<u64>,
    /// A repeated create with the same key returns the first sandbox.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Network policy.
    #[command(flatten)]
    pub net: NetArgs,
    /// Send all allowed egress through this WireGuard tunnel (a wg-quick file; fails closed).
    #[arg(long, value_name = "FILE")]
    pub wireguard: Option<String>,
    /// Restore from this template instead of booting (its image and shape are the
    /// sandbox's: --image, --cpus, --memory and --disk are refused with it).
    #[arg(long, value_name = "NAME", conflicts_with_all = ["image", "cpus", "memory", "disk"])]
    pub template: Option<String>,
    /// Attach a secret (repeatable): every command sees its placeholder, never its value.
    #[arg(long = "secret", value_name = "NAME")]
    pub secrets: Vec<String>,
    /// Shared folders.
    #[command(flatten)]
    pub shares: ShareArgs,
    /// Print the sandbox as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `hutch ls`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Daemon connection.
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Only this state.
    #[arg(long)]
    pub state: Option<String>,
    /// Only sandboxes with this label (repeatable).
    #[arg(long = "label", short = 'l', value_name = "K=V", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Commands that take one sandbox id.
#[derive(Debug, Args)]
pub struct IdArgs {
    /// Daemon connection.
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Sandbox id.
    pub id: SandboxId,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `hutch mcp`.
#[derive(Debug, Args)]
pub struct McpArgs {
    /// Daemon connection.
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// `hutch logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Daemon connection.
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Sandbox id.
    pub id: SandboxId,
    /// Keep printing what the guest writes, until the sandbox is gone or Ctrl-C.
    #[arg(long, short = 'f')]
    pub follow: bool,
}

/// `hutch rm`.
#[derive(Debug, Args)]
pub struct RmArgs {
    /// Daemon connection.
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Sandbox ids.
    #[arg(required = true)]
    pub ids: Vec<SandboxId>,
    /// Print the destroyed sandboxes as one JSON array.
    #[arg(long)]
    pub json: bool,
}

/// `hutch exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Daemon connection.
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Sandbox id.
    pub id: SandboxId,
    /// Environment variable (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Working directory in the guest.
    #[arg(long, short = 'w')]
    pub workdir: Option<String>,
    /// Kill the command after this many seconds.
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// Run under a pseudo-terminal.
    #[arg(long, short = 't')]
    pub tty: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// `hutch shell`.
#[derive(Debug, Args)]
pub struct ShellArgs {
    /// Daemon connection.
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Sandbox id.
    pub id: SandboxId,
}

/// `hutch cp`.
#[derive(Debug, Args)]
pub struct CpArgs {
    /// Daemon connection.
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Source: a host path, or `ID:/guest/path`.
    pub src: String,
    /// Destination: a host path, or `ID:/guest/path`.
    pub dst: String,
}

/// `hutch net …`.
#[derive(Debug, Subcommand)]
pub enum NetCommand {
    /// Change a running sandbox's policy; the next connection follows it.
    Set {
        /// Daemon connection.
        #[command(flatten)]
        conn: ConnArgs,
        /// Sandbox id.
        id: SandboxId,
        /// The new policy.
        #[command(flatten)]
        net: NetArgs,
    },
    /// Print the sandbox's allowed and denied flows and DNS decisions.
    Log(IdArgs),
}

/// `hutch token …`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it once (only its hash is stored); its id goes to stderr.
    Create {
        /// Limit the token to sandboxes with this label; admin otherwise.
        #[arg(long, value_name = "K=V", value_parser = parse_label)]
        label: Option<(String, String)>,
        /// Refuse the token (401) after this long: seconds, or a number with s, m, h or d.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        ttl: Option<u64>,
    },
    /// List tokens: id, scope, creation, expiry and last use (never the secret).
    Ls {
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Remove tokens: requests presenting them are refused from then on.
    Rm {
        /// Token ids (`tok-…`, from `hutch token ls`).
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

/// Most a token's TTL may be: ten years.
const MAX_TOKEN_TTL_SECS: u64 = 10 * 365 * 86_400;

/// A duration in seconds: `90`, `90s`, `15m`, `12h` or `30d`; at least 1 s, at most ten years.
fn parse_duration(s: &str) -> Result<u64, String> {
    let (digits, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let scale = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a number with s, m, h or d"))?;
    match n.checked_mul(scale) {
        Some(secs @ 1..=MAX_TOKEN_TTL_SECS) => Ok(secs),
        _ => Err(format!("{s:?} must be between 1s and 3650d")),
    }
}

/// `hutch run`: through the daemon when one answers (or `--host` is given), else locally.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// VM shape.
    #[command(flatten)]
    pub vm: hutch_daemon::VmArgs,
    /// Daemon connection.
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Boot the VM in this process, even when a daemon is running or `--host` names one.
    #[arg(long)]
    pub local: bool,
    /// Environment variable for the command (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Working directory inside the guest.
    #[arg(long, short = 'w', value_name = "DIR")]
    pub workdir: Option<String>,
    /// Kill the command after this many seconds.
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// Attach a secret (repeatable; through the daemon only): the command sees its
    /// placeholder, never its value.
    #[arg(long = "secret", value_name = "NAME")]
    pub secrets: Vec<String>,
    /// Shared folders.
    #[command(flatten)]
    pub shares: ShareArgs,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// `hutch image …`.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build (or reuse from cache) a guest image: kernel, initramfs with the agent, rootfs.
    Build(ImageBuildArgs),
    /// List built images.
    Ls {
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Build a minimal microVM kernel (vmlinux + bzImage) into the image cache.
    Kernel(crate::image_cmd::ImageKernelArgs),
}

/// `hutch image build`.
#[derive(Debug, Args)]
pub struct ImageBuildArgs {
    /// Name of the image.
    #[arg(long, default_value = "default")]
    pub name: String,
    /// Debian suite for the rootfs and kernel.
    #[arg(long, default_value = hutch_image::DEFAULT_SUITE)]
    pub suite: String,
    /// Debian mirror URL (default: the Debian archive in this host's apt sources).
    #[arg(long)]
    pub mirror: Option<String>,
    /// Packages to install in the rootfs besides the defaults (repeatable).
    #[arg(long = "package", short = 'p', value_name = "PKG")]
    pub packages: Vec<String>,
    /// Install only the --package packages, not the default ones
    /// (ca-certificates, git, python3, curl).
    #[arg(long)]
    pub no_default_packages: bool,
    /// The guest agent binary (default: next to `hutch`, or $HUTCH_AGENT).
    #[arg(long, value_name = "PATH")]
    pub agent: Option<std::path::PathBuf>,
}

/// `--share`: host directories mounted into the sandbox (QEMU only).
#[derive(Debug, Clone, Default, Args)]
pub struct ShareArgs {
    /// Share a host directory at GUEST_DIR (repeatable); read-only unless `:rw`. A relative
    /// HOST_DIR is taken from the current directory. A read-write share has no quota yet.
    #[arg(long = "share", value_name = "HOST_DIR:GUEST_DIR[:ro|:rw]", value_parser = parse_share)]
    pub shares: Vec<hutch_types::ShareSpec>,
}

fn parse_share(s: &str) -> Result<hutch_types::ShareSpec, String> {
    let (host, rest) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not HOST_DIR:GUEST_DIR[:ro|:rw]"))?;
    let host = std::path::absolute(host).map_err(|e| format!("{host:?}: {e}"))?;
    let host = host.to_str().ok_or("the host directory is not UTF-8")?;
    hutch_types::ShareSpec::parse(&format!("{host}:{rest}")).map_err(|e| e.to_string())
}

pub(crate) fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not K=V"))?;
    if !hutch_types::valid_label_key(k) {
        return Err(format!("{k:?} is not a valid label key"));
    }
    Ok((k.to_string(), v.to_string()))
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not K=V"))?;
    let valid = !k.is_empty()
        && !k.starts_with(|c: char| c.is_ascii_digit())
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!("{k:?} is not a valid variable name"));
    }
    if v.contains('\0') {
        return Err("values cannot contain NUL".into());
    }
    Ok((k.to_string(), v.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_unit_and_stay_in_range() {
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("15m"), Ok(900));
        assert_eq!(parse_duration("12h"), Ok(43_200));
        assert_eq!(parse_duration("30d"), Ok(2_592_000));
        for bad in ["", "0", "5w", "h", "-1d", "99999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sandbox_ids_are_parsed_where_they_come_in() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["hutch"][..], args].concat());
        for good in [
            &["inspect", "sb-0a"][..],
            &["rm", "sb-01", "sb-02"],
            &["exec", "sb-1", "--", "true"],
        ] {
            assert!(parse(good).is_ok(), "{good:?}");
        }
        for bad in [
            &["inspect", "sb-../x"][..],
            &["rm", "sb-01", "SB-02"],
            &["exec", "x", "--", "true"],
        ] {
            let err = parse(bad).unwrap_err();
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{bad:?}"
            );
        }
    }
}
