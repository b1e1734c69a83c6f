//! `ipclusterctl`: a thin client of `org.ipcluster1.Manager` on the system bus.
//!
//! Exit status: 0 success, 1 the daemon refused or failed the request (its message is printed),
//! 2 usage error, 3 the daemon is not reachable.

use std::{collections::HashMap, process::ExitCode, time::SystemTime};

use clap::{Parser, Subcommand};
use zbus::wire::{OwnedVariant, Variant};

/// ListWorkers row.
type WorkerRow = (String, u64, u32, u32, String, Vec<(u16, u16)>, u64, u64, u64, i32, String);
/// ListGenerations row.
type GenerationRow = (String, u64, String, u32, u64, String);

#[zbus::proxy(
    interface = "org.ipcluster1.Manager",
    default_service = "org.ipcluster1",
    default_path = "/org/ipcluster1"
)]
trait Manager {
    fn deploy(&self, app: &str, options: HashMap<&str, OwnedVariant>) -> zbus::Result<u64>;
    fn retire_generation(&self, app: &str, generation: u64) -> zbus::Result<()>;
    fn kill_retired(&self, app: &str) -> zbus::Result<u32>;
    fn list_workers(&self, app: &str) -> zbus::Result<Vec<WorkerRow>>;
    fn list_generations(&self, app: &str) -> zbus::Result<Vec<GenerationRow>>;
    fn reload(&self) -> zbus::Result<()>;
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
    /// Start a new generation of APP; returns once it serves.
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
    },
    /// Retire a generation (a live one is replaced first).
    Retire { app: String, generation: u64 },
    /// Stop every retired worker of APP (all apps without APP).
    KillRetired { app: Option<String> },
    /// List workers.
    Workers { app: Option<String> },
    /// List generations.
    Generations { app: Option<String> },
    /// Re-read /etc/ipcluster/apps/.
    Reload,
}

fn main() -> ExitCode {
    let args = Args::parse();
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
    let meaning = match name {
        "org.ipcluster1.Error.NoSuchApp" => "no such app",
        "org.ipcluster1.Error.NoSuchGeneration" => "no such generation",
        "org.ipcluster1.Error.DeployFailed" => "deploy failed",
        "org.ipcluster1.Error.Busy" => "busy",
        "org.ipcluster1.Error.InvalidConfig" => "invalid app configuration",
        "org.freedesktop.DBus.Error.InvalidArgs" => "invalid arguments",
        "org.freedesktop.DBus.Error.AccessDenied" => "access denied",
        "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired" => {
            "access denied (authentication required)"
        }
        "org.freedesktop.DBus.Error.ServiceUnknown" | "org.freedesktop.DBus.Error.NameHasNoOwner" => {
            return (3, "ipclusterd is not running (systemctl start ipclusterd)".into());
        }
        other => other,
    };
    (1, format!("{meaning}: {message}"))
}

fn opt<'a>(v: impl Into<Variant<'a>>) -> zbus::Result<OwnedVariant> {
    v.into().try_to_owned()
}

async fn run(args: Args) -> zbus::Result<()> {
    let conn =
        if args.user { zbus::Connection::session().await? } else { zbus::Connection::system().await? };
    let manager = ManagerProxy::new(&conn).await?;
    match args.command {
        Cmd::Version => println!("{}", manager.version().await?),
        Cmd::Deploy { app, workers, command, env, workdir } => {
            let mut options = HashMap::new();
            if let Some(w) = workers {
                options.insert("workers", opt(w)?);
            }
            if let Some(c) = command {
                options.insert("command", opt(c)?);
            }
            if !env.is_empty() {
                options.insert("environment", opt(env)?);
            }
            if let Some(d) = workdir {
                options.insert("working_directory", opt(d)?);
            }
            let g = manager.deploy(&app, options).await?;
            println!("{app}: generation {g} is live");
        }
        Cmd::Retire { app, generation } => manager.retire_generation(&app, generation).await?,
        Cmd::KillRetired { app } => {
            let n = manager.kill_retired(app.as_deref().unwrap_or("")).await?;
            println!("stopping {n} retired workers");
        }
        Cmd::Workers { app } => print_workers(&manager.list_workers(app.as_deref().unwrap_or("")).await?),
        Cmd::Generations { app } => {
            print_generations(&manager.list_generations(app.as_deref().unwrap_or("")).await?)
        }
        Cmd::Reload => manager.reload().await?,
    }
    Ok(())
}

fn age(start_usec: u64) -> String {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
    let s = now.saturating_sub(start_usec) / 1_000_000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}min", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

fn print_workers(rows: &[WorkerRow]) {
    let mut rows = rows.to_vec();
    // Live first, then by app, generation, band.
    rows.sort_by_key(|w| (w.4 != "live", w.0.clone(), std::cmp::Reverse(w.1), w.2));
    println!(
        "{:<12} {:>4} {:<9} {:>5} {:>8} {:<15} {:>9} {:>8} {:>4} {:>6}",
        "APP", "GEN", "STATE", "BAND", "PID", "PORTS", "RSS", "CPU", "NICE", "AGE"
    );
    for w in rows {
        let ports: Vec<String> = w.5.iter().map(|(p, q)| format!("{p}->{q}")).collect();
        println!(
            "{:<12} {:>4} {:<9} {:>5} {:>8} {:<15} {:>8}K {:>7}s {:>4} {:>6}",
            w.0,
            w.1,
            w.4,
            w.2,
            w.3,
            ports.join(","),
            w.6 / 1024,
            w.7 / 1_000_000,
            w.9,
            age(w.8)
        );
    }
}

fn print_generations(rows: &[GenerationRow]) {
    println!("{:<12} {:>4} {:<9} {:>7} {:>6}  SCOPE", "APP", "GEN", "STATE", "WORKERS", "AGE");
    for g in rows {
        println!("{:<12} {:>4} {:<9} {:>7} {:>6}  {}", g.0, g.1, g.2, g.3, age(g.4), g.5);
    }
}
