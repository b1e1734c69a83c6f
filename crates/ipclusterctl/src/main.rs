//! `ipclusterctl`: a thin client of `org.ipcluster1.Manager` on the system bus, in the
//! conventions of systemctl and busctl.
//!
//! Exit status: 0 success; 1 the daemon refused or failed the request, or a config file is
//! invalid (the message says why); 2 usage error; 3 the daemon is not reachable.

mod check;
mod output;
mod progress;
mod top;

use std::{collections::HashMap, process::ExitCode};

use clap::{CommandFactory, Parser, Subcommand};
use ipcluster_bus::{ErrorName, ManagerProxy, option};
use zbus::wire::{OwnedVariant, Variant};

/// Control ipclusterd: deploy apps, inspect workers, reap retired generations.
#[derive(Debug, Parser)]
#[command(
    name = "ipclusterctl",
    version,
    about,
    after_help = "Exit status: 0 success; 1 refused or failed (message printed); 2 usage; 3 ipclusterd not reachable."
)]
struct Args {
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
    /// Talk to a daemon on the session bus instead of the system bus.
    #[arg(long, global = true, hide = true)]
    user: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Apps, generations and workers (live first).
    Status { app: Option<String> },
    /// Start a new generation of APP; waits until it serves (or fails).
    Deploy {
        app: String,
        /// Number of workers (a power of two) for this generation.
        #[arg(long)]
        workers: Option<u32>,
        /// The worker's argv for this generation (the rest of the line).
        #[arg(long, num_args = 1.., allow_hyphen_values = true, value_name = "ARG")]
        command: Option<Vec<String>>,
        /// Extra environment K=V for this generation (repeatable).
        #[arg(long = "env", value_name = "K=V")]
        env: Vec<String>,
        /// Working directory for this generation.
        #[arg(long)]
        workdir: Option<String>,
        /// Return as soon as the generation has a number, without waiting for it to serve.
        #[arg(long)]
        no_block: bool,
    },
    /// Go back to an earlier generation (default: the one live before): the same workers at
    /// once when they still run, else a new generation running what it ran.
    Rollback { app: String, generation: Option<u64> },
    /// Retire a generation (a live one is replaced first).
    Retire { app: String, generation: u64 },
    /// Stop every retired worker of APP (of every app without APP).
    KillRetired { app: Option<String> },
    /// List workers.
    Workers { app: Option<String> },
    /// List generations.
    Generations { app: Option<String> },
    /// Re-read /etc/ipcluster/apps/.
    Reload,
    /// Stop every generation of APP and remove its rules, until the next deploy.
    Stop { app: String },
    /// A live view of generations and workers (state, RSS, CPU %), refreshed until q.
    Top(top::TopArgs),
    /// Show the workers' journal (journalctl for their scopes).
    Logs {
        app: String,
        generation: Option<u64>,
        /// Follow new lines.
        #[arg(short, long)]
        follow: bool,
    },
    /// Validate app files offline (default: /etc/ipcluster/apps/*.toml).
    CheckConfig { files: Vec<std::path::PathBuf> },
    /// Print the daemon's version.
    Version,
    /// Print the man page (roff).
    #[command(name = "__man", hide = true)]
    Man,
    /// Print shell completions.
    #[command(name = "__completions", hide = true)]
    Completions { shell: clap_complete::Shell },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Cmd::Man => {
            let _ = clap_mangen::Man::new(Args::command()).render(&mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Args::command(), "ipclusterctl", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Cmd::CheckConfig { ref files } => return output::check_config(files, args.json),
        Cmd::Logs { ref app, generation, follow } => return logs(app, generation, follow),
        _ => {}
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ipclusterctl: {e}");
            return ExitCode::from(3);
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let (code, text) = describe(&e);
            eprintln!("ipclusterctl: {text}");
            ExitCode::from(code)
        }
    }
}

/// A failed call as an exit status and a message for people.
fn describe(e: &zbus::Error) -> (u8, String) {
    match e {
        zbus::Error::MethodError(name, message, _) => {
            describe_named(name.as_str(), message.as_deref().unwrap_or(""))
        }
        zbus::Error::FDO(f) => describe_named(
            &zbus::DBusError::name(&**f).to_string(),
            zbus::DBusError::description(&**f).unwrap_or(""),
        ),
        other => (3, format!("cannot reach ipclusterd: {other}")),
    }
}

/// The meaning of a D-Bus error name, with the daemon's message.
fn describe_named(name: &str, message: &str) -> (u8, String) {
    match ErrorName::parse(name) {
        Some(e @ ErrorName::NoServer) => (3, format!("{}: {message}", e.meaning())),
        Some(e) => (1, format!("{}: {message}", e.meaning())),
        None if matches!(
            name,
            "org.freedesktop.DBus.Error.ServiceUnknown" | "org.freedesktop.DBus.Error.NameHasNoOwner"
        ) =>
        {
            (3, "ipclusterd is not running (systemctl start ipclusterd)".into())
        }
        None => (1, format!("{name}: {message}")),
    }
}

fn opt<'a>(v: impl Into<Variant<'a>>) -> zbus::Result<OwnedVariant> {
    v.into().try_to_owned()
}

/// `journalctl` for the app's scopes, replacing this process.
fn logs(app: &str, generation: Option<u64>, follow: bool) -> ExitCode {
    use std::os::unix::process::CommandExt;
    // Validated locally: the name becomes part of a unit pattern.
    if let Err(e) = ipcluster_core::name::AppName::new(app) {
        eprintln!("ipclusterctl: {e}");
        return ExitCode::from(2);
    }
    let unit = match generation {
        Some(g) => format!("ipcluster-{app}-{g}.scope"),
        None => format!("ipcluster-{app}-*.scope"),
    };
    let mut cmd = std::process::Command::new("journalctl");
    cmd.arg("-u").arg(unit);
    if follow {
        cmd.arg("-f");
    }
    let err = cmd.exec();
    eprintln!("ipclusterctl: cannot run journalctl: {err}");
    ExitCode::from(3)
}

async fn run(args: Args) -> zbus::Result<()> {
    let conn =
        if args.user { zbus::Connection::session().await? } else { zbus::Connection::system().await? };
    let manager = ManagerProxy::new(&conn).await?;
    let all = |a: &Option<String>| a.clone().unwrap_or_default();
    let json = args.json;
    match args.command {
        Cmd::Version => output::print_value(json, "version", manager.version().await?),
        Cmd::Status { app } => {
            let app = all(&app);
            let (gens, workers) = (manager.list_generations(&app).await?, manager.list_workers(&app).await?);
            output::status(json, &gens, &workers);
        }
        Cmd::Deploy { app, workers, command, env, workdir, no_block } => {
            let mut options = HashMap::new();
            if let Some(w) = workers {
                options.insert(option::WORKERS, opt(w)?);
            }
            if let Some(c) = command {
                options.insert(option::COMMAND, opt(c)?);
            }
            if !env.is_empty() {
                options.insert(option::ENVIRONMENT, opt(env)?);
            }
            if let Some(d) = workdir {
                options.insert(option::WORKING_DIRECTORY, opt(d)?);
            }
            progress::deploy(&manager, &app, options, no_block, json).await?;
        }
        Cmd::Rollback { app, generation } => {
            progress::rollback(&manager, &app, generation.unwrap_or(0), json).await?;
        }
        Cmd::Retire { app, generation } => {
            manager.retire_generation(&app, generation).await?;
            output::print_value(json, "retired", format!("{app} generation {generation}"));
        }
        Cmd::KillRetired { app } => {
            let n = manager.kill_retired(&all(&app)).await?;
            output::print_value(json, "stopping", n);
        }
        Cmd::Workers { app } => output::workers(json, &manager.list_workers(&all(&app)).await?),
        Cmd::Generations { app } => output::generations(json, &manager.list_generations(&all(&app)).await?),
        Cmd::Reload => {
            manager.reload().await?;
            output::print_value(json, "reloaded", true);
        }
        Cmd::Stop { app } => {
            manager.stop_app(&app).await?;
            output::print_value(json, "stopped", app);
        }
        Cmd::Top(top) => top::run(&manager, top, json).await?,
        Cmd::Man | Cmd::Completions { .. } | Cmd::CheckConfig { .. } | Cmd::Logs { .. } => {}
    }
    Ok(())
}
