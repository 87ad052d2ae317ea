//! `hutch port`: publish a sandbox's guest TCP port on a host loopback port, list, unpublish.

use clap::Args;
use hutch_api::{client::Client, PortMapping};

use crate::{args::ConnArgs, error::CliError};

/// `hutch port ID [GUEST_PORT] [--host-port P | --remove]`.
#[derive(Debug, Args)]
pub struct PortArgs {
    /// Daemon connection.
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Sandbox id.
    pub id: hutch_types::SandboxId,
    /// Guest TCP port to publish (or, with --remove, to unpublish); none: list.
    pub guest_port: Option<u16>,
    /// Host port on 127.0.0.1 (default: any free port).
    #[arg(long, requires = "guest_port", conflicts_with = "remove")]
    pub host_port: Option<u16>,
    /// Stop publishing GUEST_PORT.
    #[arg(long, requires = "guest_port")]
    pub remove: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn print(ports: &[PortMapping], json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(ports).expect("serializable")
        );
        return;
    }
    for p in ports {
        println!("{} -> {}:{}", p.guest_port, p.host_addr, p.host_port);
    }
}

/// Runs `hutch port`.
pub async fn run(client: &Client, args: PortArgs) -> Result<i32, CliError> {
    let ports = match args.guest_port {
        None => client.ports(args.id.as_str()).await?,
        Some(g) if args.remove => client.unpublish_port(args.id.as_str(), g).await?,
        Some(g) => {
            let p = client
                .publish_port(args.id.as_str(), g, args.host_port)
                .await?;
            if args.json {
                print(&[p], true);
            } else {
                println!("{}:{}", p.host_addr, p.host_port);
            }
            return Ok(0);
        }
    };
    print(&ports, args.json);
    Ok(0)
}
