//! `ipclusterctl`: a thin client of `org.ipcluster1.Manager`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[zbus::proxy(
    interface = "org.ipcluster1.Manager",
    default_service = "org.ipcluster1",
    default_path = "/org/ipcluster1"
)]
trait Manager {
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
}

/// Control ipclusterd.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Talk to the daemon on the session bus instead of the system bus.
    #[arg(long, global = true)]
    user: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Print the daemon's version.
    Version,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ipclusterctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ipclusterctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let conn =
        if args.user { zbus::Connection::session().await? } else { zbus::Connection::system().await? };
    let manager = ManagerProxy::new(&conn).await?;
    match args.command {
        Cmd::Version => println!("{}", manager.version().await?),
    }
    Ok(())
}
