//! `hutch template create|ls|rm`, `hutch fork` and `hutch suspend`: sandboxes from snapshots,
//! through the daemon.

use clap::{Args, Subcommand};
use hutch_api::client::Client;
use hutch_types::{TemplateInfo, TemplateSpec};

use crate::{
    args::{ConnArgs, NetArgs},
    error::CliError,
};

/// `hutch template …`.
#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// Boot a VM, run a provisioning script in it, and save it as a template that
    /// `hutch create --template NAME` restores in a fraction of a boot.
    Create(TemplateCreateArgs),
    /// List templates.
    Ls {
        /// Daemon connection.
        #[command(flatten)]
        conn: ConnArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Keep SIZE restored clones of a template ready, so creates from it are hand-outs
    /// (0 turns the pool off).
    Pool {
        /// Daemon connection.
        #[command(flatten)]
        conn: ConnArgs,
        /// Template name.
        name: String,
        /// How many clones to keep ready.
        #[arg(value_parser = clap::value_parser!(u32).range(0..=hutch_core::MAX_POOL as i64))]
        size: u32,
    },
    /// Remove a template (refused while sandboxes use it).
    Rm {
        /// Daemon connection.
        #[command(flatten)]
        conn: ConnArgs,
        /// Template name.
        name: String,
    },
}

/// `hutch template create`.
#[derive(Debug, Args)]
pub struct TemplateCreateArgs {
    /// Template name.
    pub name: String,
    /// VM shape (every sandbox restored from the template has it).
    #[command(flatten)]
    pub vm: hutch_daemon::VmArgs,
    /// Daemon connection.
    #[command(flatten)]
    pub conn: ConnArgs,
    /// A shell script file run as root in the VM before it is saved (`-` for stdin); it must
    /// exit 0.
    #[arg(long, value_name = "SCRIPT")]
    pub provision: Option<String>,
    /// What provisioning may reach (e.g. --net open to install packages).
    #[command(flatten)]
    pub net: NetArgs,
    /// Print the template as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `hutch fork ID [--count N]`.
#[derive(Debug, Args)]
pub struct ForkArgs {
    /// Daemon connection.
    #[command(flatten)]
    pub conn: ConnArgs,
    /// The sandbox to fork.
    pub id: hutch_types::SandboxId,
    /// How many children.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=hutch_core::MAX_FORK as i64))]
    pub count: u32,
    /// Print the children as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs a `hutch template` command.
pub async fn template(client: &Client, cmd: TemplateCommand) -> Result<i32, CliError> {
    match cmd {
        TemplateCommand::Create(a) => {
            let provision = a.provision.as_deref().map(read_script).transpose()?;
            let spec = TemplateSpec {
                name: a.name,
                image: a.vm.image,
                cpus: a.vm.cpus,
                memory_mib: a.vm.memory,
                disk_mib: a.vm.disk,
                provision,
                network: crate::remote::policy(&a.net)?,
            };
            let info = client.create_template(&spec).await?;
            if a.json {
                print_json(&info);
            } else {
                print_table(&[info]);
            }
        }
        TemplateCommand::Ls { json: true, .. } => print_json(&client.templates().await?),
        TemplateCommand::Ls { json: false, .. } => print_table(&client.templates().await?),
        TemplateCommand::Rm { name, .. } => {
            client.remove_template(&name).await?;
        }
        TemplateCommand::Pool { name, size, .. } => {
            client.set_pool(&name, size).await?;
        }
    }
    Ok(0)
}

/// Runs `hutch fork`: prints the children's ids, one per line.
pub async fn fork(client: &Client, a: ForkArgs) -> Result<i32, CliError> {
    let children = client.fork(a.id.as_str(), a.count).await?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&children).expect("serializable")
        );
    } else {
        for c in children {
            println!("{}", c.id);
        }
    }
    Ok(0)
}

fn read_script(path: &str) -> Result<String, CliError> {
    let read = if path == "-" {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(path)
    };
    read.map_err(|source| CliError::ReadInput {
        path: path.into(),
        source,
    })
}

/// JSON of one shape per command: `template create` an object, `template ls` an array (also
/// of one).
fn print_json<T: serde::Serialize + ?Sized>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}

fn print_table(templates: &[TemplateInfo]) {
    for t in templates {
        let s = &t.spec;
        println!(
            "{:<20} {:<12} {} vCPU {:>6} MiB  nic={}  pool={}/{}  {}  built in {:.1}s",
            s.name,
            s.image,
            s.cpus,
            s.memory_mib,
            t.has_nic,
            t.pool_ready,
            t.pool_size,
            &t.digest[..t.digest.len().min(19)],
            t.build_ms as f64 / 1000.0
        );
    }
}
