//! Command-line grammar.

use clap::{Args, Parser, Subcommand};

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
    /// Measure performance.
    #[command(subcommand)]
    Bench(BenchCommand),
}

/// VM shape shared by commands that boot one.
#[derive(Debug, Args, Clone)]
pub struct VmArgs {
    /// Guest image to boot.
    #[arg(long, default_value = "default")]
    pub image: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=64))]
    pub cpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(128..=262144))]
    pub memory: u32,
    /// Size of the guest's writable disk in MiB.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(16..=1048576))]
    pub disk: u64,
    /// Seconds to wait for the guest agent to come up.
    #[arg(long, default_value_t = 120)]
    pub boot_timeout: u64,
}

/// `hutch run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// VM shape.
    #[command(flatten)]
    pub vm: VmArgs,
    /// Environment variable for the command (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Working directory inside the guest.
    #[arg(long, short = 'w', value_name = "DIR")]
    pub workdir: Option<String>,
    /// Kill the command after this many seconds.
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
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
    Ls,
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
    /// Packages to install in the rootfs (repeatable; replaces the default list).
    #[arg(long = "package", short = 'p', value_name = "PKG")]
    pub packages: Vec<String>,
    /// The guest agent binary (default: next to `hutch`, or $HUTCH_AGENT).
    #[arg(long, value_name = "PATH")]
    pub agent: Option<std::path::PathBuf>,
}

/// `hutch bench …`.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Boot time (process start → agent ready) and exec round trip, p50/p95.
    Boot(BenchBootArgs),
}

/// `hutch bench boot`.
#[derive(Debug, Args)]
pub struct BenchBootArgs {
    /// VM shape.
    #[command(flatten)]
    pub vm: VmArgs,
    /// Number of boots.
    #[arg(long, default_value_t = 5)]
    pub boots: usize,
    /// Exec round trips per boot.
    #[arg(long, default_value_t = 50)]
    pub execs: usize,
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
