//! `hutch-bench`'s command line.

use clap::{Args, Parser, Subcommand};
use hutch_daemon::VmArgs;

/// Hutch's benchmarks: each prints its figures (and ratios) from one run.
#[derive(Debug, Parser)]
#[command(name = "hutch-bench", version)]
pub struct Cli {
    /// What to measure.
    #[command(subcommand)]
    pub command: BenchCommand,
}

/// `hutch-bench …`.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Boot time (process start → agent ready) and exec round trip, p50/p95.
    Boot(BenchBootArgs),
    /// Exec round trip through a daemon vs straight over the channel; parallel creates.
    Daemon(BenchDaemonArgs),
    /// Firecracker: process start → API ready, snapshot create, snapshot restore.
    Firecracker(crate::firecracker::BenchFirecrackerArgs),
    /// Templates: restore vs cold boot, the VMM's own restore, pool hand-outs, parallel
    /// clones, memory per idle clone.
    Clone(crate::clone::BenchCloneArgs),
    /// Agent tasks: workspace copy-in and changeset copy-out throughput, task overhead.
    Task(crate::task::BenchTaskArgs),
    /// Exec round trip through the daemon's MCP server vs its HTTP API, same sandbox.
    Mcp(crate::mcp::BenchMcpArgs),
    /// Exec round trip through E2B's Python SDK on the daemon's E2B-compatible API vs its
    /// HTTP API, same sandbox.
    E2b(crate::e2b::BenchE2bArgs),
    /// The secret broker from a namespace stand-in of a guest: substituted vs spliced vs
    /// direct, small-request latency (kept alive, new connection) and bulk throughput.
    Secrets(crate::secrets::BenchSecretsArgs),
}

/// `hutch-bench boot`.
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

/// `hutch-bench daemon`.
#[derive(Debug, Args)]
pub struct BenchDaemonArgs {
    /// VM shape of the exec sandboxes.
    #[command(flatten)]
    pub vm: VmArgs,
    /// Exec round trips per way (direct, JSON through the daemon, streaming through it).
    #[arg(long, default_value_t = 50)]
    pub execs: usize,
    /// Sandboxes created at once through the daemon.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=32))]
    pub parallel: u16,
}
