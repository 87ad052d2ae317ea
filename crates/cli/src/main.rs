//! `hutch`: give every coding agent its own disposable microVM.

#![forbid(unsafe_code)]

mod agent_bin;
mod args;
mod audit_cmd;
mod doctor;
mod error;
mod fleet_cmd;
mod host_keys;
mod image_cmd;
mod launch;
mod mcp_cmd;
mod port_cmd;
mod remote;
mod replay_cmd;
mod run;
mod secret_cmd;
mod setup_cmd;
mod task_cmd;
mod task_many;
mod template_cmd;
mod token;
mod wg_conf;

use clap::Parser;

fn main() {
    let cli = args::Cli::parse();
    hutch_daemon::process::run_main("hutch", dispatch(cli))
}

async fn dispatch(cli: args::Cli) -> Result<i32, error::CliError> {
    let home = hutch_daemon::Home::from_env()?;
    match cli.command {
        args::Command::Run(a) => run::run(&home, a).await,
        args::Command::Image(args::ImageCommand::Build(a)) => image_cmd::build(&home, a).await,
        args::Command::Image(args::ImageCommand::Ls { json }) => image_cmd::list(&home, json),
        args::Command::Image(args::ImageCommand::Kernel(a)) => image_cmd::kernel(&home, a).await,
        args::Command::Doctor => doctor::doctor(&home).await,
        args::Command::Setup(c) => setup_cmd::run(&home, c).await,
        args::Command::Daemon(a) => {
            let stop = hutch_daemon::signal::interrupted();
            hutch_daemon::run(&home, a, async move {
                stop.await;
            })
            .await?;
            Ok(0)
        }
        args::Command::Gateway(a) => {
            let stop = hutch_daemon::signal::interrupted();
            hutch_daemon::gateway::run(a, async move {
                stop.await;
            })
            .await?;
            Ok(0)
        }
        args::Command::FleetToken(a) => {
            let (token, id) = hutch_daemon::gateway::create_token(a).await?;
            eprintln!("{id}");
            println!("{token}");
            Ok(0)
        }
        args::Command::Fleet(c) => {
            let client = remote::client(&home, c.conn());
            fleet_cmd::run(&client, c).await
        }
        args::Command::Create(a) => remote::create(&remote::client(&home, &a.conn), a).await,
        args::Command::Ls(a) => remote::list(&remote::client(&home, &a.conn), a).await,
        args::Command::Inspect(a) => {
            remote::inspect(&remote::client(&home, &a.conn), a.id.as_str(), a.json).await
        }
        args::Command::Exec(a) => {
            let tty = a.tty;
            remote::exec(&remote::client(&home, &a.conn), a, tty).await
        }
        args::Command::Shell(a) => {
            let exec = args::ExecArgs {
                conn: a.conn,
                id: a.id,
                env: vec![],
                workdir: None,
                timeout: None,
                tty: true,
                command: vec!["/bin/bash".into(), "-l".into()],
            };
            remote::exec(&remote::client(&home, &exec.conn), exec, true).await
        }
        args::Command::Cp(a) => remote::cp(&remote::client(&home, &a.conn), a).await,
        args::Command::Logs(a) => {
            remote::logs(&remote::client(&home, &a.conn), a.id.as_str(), a.follow).await
        }
        args::Command::Pause(a) => {
            remote::lifecycle(
                &remote::client(&home, &a.conn),
                a.id.as_str(),
                "pause",
                a.json,
            )
            .await
        }
        args::Command::Resume(a) => {
            remote::lifecycle(
                &remote::client(&home, &a.conn),
                a.id.as_str(),
                "resume",
                a.json,
            )
            .await
        }
        args::Command::Suspend(a) => {
            remote::lifecycle(
                &remote::client(&home, &a.conn),
                a.id.as_str(),
                "suspend",
                a.json,
            )
            .await
        }
        args::Command::Fork(a) => template_cmd::fork(&remote::client(&home, &a.conn), a).await,
        args::Command::Template(c) => {
            let conn = match &c {
                template_cmd::TemplateCommand::Create(a) => a.conn.clone(),
                template_cmd::TemplateCommand::Ls { conn, .. }
                | template_cmd::TemplateCommand::Rm { conn, .. }
                | template_cmd::TemplateCommand::Pool { conn, .. } => conn.clone(),
            };
            template_cmd::template(&remote::client(&home, &conn), c).await
        }
        args::Command::Task(c) => {
            let client = remote::client(&home, c.conn());
            let daemon = remote::daemon_name(&home, c.conn());
            task_cmd::run(&client, &daemon, c).await
        }
        args::Command::Start(a) => {
            remote::lifecycle(
                &remote::client(&home, &a.conn),
                a.id.as_str(),
                "start",
                a.json,
            )
            .await
        }
        args::Command::Stop(a) => {
            remote::lifecycle(
                &remote::client(&home, &a.conn),
                a.id.as_str(),
                "stop",
                a.json,
            )
            .await
        }
        args::Command::Rm(a) => {
            remote::remove(&remote::client(&home, &a.conn), &a.ids, a.json).await
        }
        args::Command::Net(args::NetCommand::Set { conn, id, net }) => {
            remote::net_set(&remote::client(&home, &conn), id.as_str(), &net).await
        }
        args::Command::Net(args::NetCommand::Log(a)) => {
            remote::net_log(&remote::client(&home, &a.conn), a.id.as_str(), a.json).await
        }
        args::Command::Port(a) => port_cmd::run(&remote::client(&home, &a.conn), a).await,
        args::Command::Secret(c) => secret_cmd::run(&remote::client(&home, &c.conn()), c).await,
        args::Command::Token(c) => token::run(&home, c),
        args::Command::Mcp(a) => mcp_cmd::run(&remote::client(&home, &a.conn)).await,
        args::Command::Audit(a) => audit_cmd::run(&home, a).await,
        args::Command::Replay(a) => replay_cmd::run(&home, a).await,
        args::Command::Completions { shell } => {
            let mut cmd = <args::Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "hutch", &mut std::io::stdout());
            Ok(0)
        }
    }
}
