//! `hutch fleet hosts|drain|undrain|ls`: a fleet's hosts and sandboxes, through a gateway
//! (`--host`/`HUTCH_HOST` naming it, with an admin fleet token for hosts and drains).

use clap::Subcommand;
use hutch_api::{client::Client, ApiError};
use hutch_daemon::gateway::{FleetHost, FleetSandbox};
use hyper::Method;
use serde::de::DeserializeOwned;

use crate::{args::ConnArgs, error::CliError};

/// `hutch fleet …`.
#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// List the fleet's hosts: health, drained, incarnation, capacity, bookings.
    Hosts {
        /// Gateway connection.
        #[command(flatten)]
        conn: ConnArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop placing new sandboxes on a host; those there run on to their TTL.
    Drain {
        /// Gateway connection.
        #[command(flatten)]
        conn: ConnArgs,
        /// The host's name in the fleet (as `hutch fleet hosts` shows it).
        #[arg(value_name = "HOST")]
        name: String,
    },
    /// Let a drained host take new sandboxes again.
    Undrain {
        /// Gateway connection.
        #[command(flatten)]
        conn: ConnArgs,
        /// The host's name in the fleet.
        #[arg(value_name = "HOST")]
        name: String,
    },
    /// List every sandbox of the fleet with its host (`unreachable`/`lost` while it is away).
    Ls {
        /// Gateway connection.
        #[command(flatten)]
        conn: ConnArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

impl FleetCommand {
    /// The gateway connection the command uses.
    pub fn conn(&self) -> &ConnArgs {
        match self {
            FleetCommand::Hosts { conn, .. }
            | FleetCommand::Drain { conn, .. }
            | FleetCommand::Undrain { conn, .. }
            | FleetCommand::Ls { conn, .. } => conn,
        }
    }
}

/// Runs a `hutch fleet` command against the gateway `client` talks to.
pub async fn run(client: &Client, cmd: FleetCommand) -> Result<i32, CliError> {
    match cmd {
        FleetCommand::Hosts { json, .. } => {
            let hosts: Vec<FleetHost> = call(client, Method::GET, "/v1/fleet/hosts").await?;
            if json {
                print_json(&hosts);
            } else {
                print_hosts(&hosts);
            }
        }
        FleetCommand::Drain { name, .. } => drain(client, Method::PUT, &name).await?,
        FleetCommand::Undrain { name, .. } => drain(client, Method::DELETE, &name).await?,
        FleetCommand::Ls { json, .. } => {
            let all: Vec<FleetSandbox> = call(client, Method::GET, "/v1/fleet/sandboxes").await?;
            if json {
                print_json(&all);
            } else {
                print_sandboxes(&all);
            }
        }
    }
    Ok(0)
}

/// Drains (`PUT`) or undrains (`DELETE`) `host` and prints where it stands.
async fn drain(client: &Client, method: Method, host: &str) -> Result<(), CliError> {
    let path = format!("/v1/fleet/hosts/{}/drain", hutch_api::client::encode(host));
    let host: FleetHost = call(client, method, &path).await?;
    print_hosts(std::slice::from_ref(&host));
    Ok(())
}

/// One request to the gateway and its JSON answer (or the API error).
async fn call<T: DeserializeOwned>(
    client: &Client,
    method: Method,
    path: &str,
) -> Result<T, CliError> {
    let (status, body) = client.raw(method, path, vec![]).await?;
    if !status.is_success() {
        let error: ApiError =
            serde_json::from_slice(&body).map_err(hutch_api::client::ClientError::Decode)?;
        return Err(hutch_api::client::ClientError::Api {
            status: status.as_u16(),
            error,
        }
        .into());
    }
    Ok(serde_json::from_slice(&body).map_err(hutch_api::client::ClientError::Decode)?)
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}

fn print_hosts(hosts: &[FleetHost]) {
    println!(
        "{:<24} {:<12} {:>5} {:<10} {:>5} {:>11} {:>12}  SANDBOXES",
        "HOST", "HEALTH", "INC", "BACKEND", "CPUS", "SLOTS", "FREE MEM"
    );
    for h in hosts {
        let health = if h.drained {
            format!("{},drained", h.health)
        } else {
            h.health.clone()
        };
        let sandboxes: Vec<String> = h
            .placements
            .iter()
            .map(|(state, n)| format!("{n} {state}"))
            .collect();
        println!(
            "{:<24} {:<12} {:>5} {:<10} {:>5} {:>11} {:>11}M  {}",
            h.host,
            health,
            h.incarnation,
            h.backend,
            h.vcpus,
            format!("{}/{} bkd", h.booked, h.slots),
            h.free_memory_mib,
            sandboxes.join(", ")
        );
    }
}

fn print_sandboxes(all: &[FleetSandbox]) {
    println!(
        "{:<16} {:<24} {:<12} {:<10} {:>4} {:>7}",
        "ID", "HOST", "STATE", "IMAGE", "CPUS", "MEM"
    );
    for s in all {
        println!(
            "{:<16} {:<24} {:<12} {:<10} {:>4} {:>6}M",
            s.sandbox.id,
            s.host,
            s.sandbox.state.name(),
            s.sandbox.spec.image,
            s.sandbox.spec.cpus,
            s.sandbox.spec.memory_mib
        );
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::FleetCommand;
    use crate::args::{Cli, Command};

    #[test]
    fn fleet_commands_parse_beside_the_gateway_connection() {
        let cli = Cli::try_parse_from([
            "hutch",
            "fleet",
            "drain",
            "--host",
            "127.0.0.1:7000",
            "127.0.0.1:7001",
        ])
        .unwrap();
        let Command::Fleet(FleetCommand::Drain { conn, name }) = cli.command else {
            panic!("not a drain");
        };
        assert_eq!(
            (conn.host.as_deref(), name.as_str()),
            (Some("127.0.0.1:7000"), "127.0.0.1:7001")
        );
        for args in [
            &["hutch", "fleet", "hosts", "--json"][..],
            &["hutch", "fleet", "undrain", "h1"],
            &["hutch", "fleet", "ls"],
        ] {
            assert!(Cli::try_parse_from(args).is_ok(), "{args:?}");
        }
    }
}
