//! `ipclusterctl`: a thin client of `org.ipcluster1.Manager` on the system bus, in the
//! conventions of systemctl and busctl.
//!
//! Exit status: 0 success; 1 the daemon refused or failed the request, or a config file is
//! invalid (the message says why); 2 usage error; 3 the daemon is not reachable.
//!
//! `-H [USER@]HOST[:PORT]` talks to another host's daemon over ssh ([`remote`]);
//! `deploy --hosts` rolls a deploy across hosts ([`fleet`]).

mod check;
mod fleet;
mod output;
mod progress;
mod remote;
mod top;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use ipcluster_bus::{ErrorName, ManagerProxy};

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
    /// Operate on the ipclusterd of HOST, over ssh (as systemctl -H does).
    #[arg(short = 'H', long, global = true, value_name = "[USER@]HOST[:PORT]")]
    host: Option<remote::Destination>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Apps, generations and workers (live first).
    Status { app: Option<String> },
    /// Start a new generation of APP; waits until it serves (or fails). With --hosts, on each
    /// host in turn.
    Deploy {
        app: String,
        #[command(flatten)]
        options: fleet::DeployOptions,
        /// Return as soon as the generation has a number, without waiting for it to serve.
        #[arg(long)]
        no_block: bool,
        #[command(flatten)]
        roll: fleet::Roll,
    },
    /// Go back to an earlier generation (default: the one live before): the same workers at
    /// once when they still run, else a new generation running what it ran.
    Rollback { app: String, generation: Option<u64> },
    /// Promote APP's canary: its other bands start, then every band moves to it.
    Promote { app: String },
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
    /// Show the workers' journal (journalctl for their scopes; on this host only).
    Logs {
        app: String,
        generation: Option<u64>,
        /// Follow new lines.
        #[arg(short, long)]
        follow: bool,
    },
    /// Validate app files offline (default: /etc/ipcluster/apps/*.toml; on this host only).
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
    if let Some(host) = &args.host
        && matches!(args.command, Cmd::CheckConfig { .. } | Cmd::Logs { .. })
    {
        return local_only(&args.command, host);
    }
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
    let rolling = matches!(&args.command, Cmd::Deploy { roll, .. } if !roll.hosts.is_empty());
    if let Cmd::Deploy { options, .. } = &args.command
        && rolling
        && options.canary.is_some()
    {
        Args::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--canary cannot be used with --hosts (a canary is split by band on one host: deploy it there with -H)",
            )
            .exit();
    }
    if args.host.is_some() && (args.user || rolling) {
        let other = if args.user { "--user" } else { "--hosts" };
        Args::command()
            .error(clap::error::ErrorKind::ArgumentConflict, format!("-H/--host cannot be used with {other}"))
            .exit();
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ipclusterctl: {e}");
            return ExitCode::from(3);
        }
    };
    if let Cmd::Deploy { app, options, roll, .. } = &args.command
        && rolling
    {
        return rt.block_on(fleet::deploy(app, options, roll, args.json));
    }
    let json = args.json;
    match rt.block_on(session(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if json {
                println!("{}", serde_json::json!({"error": f.name, "message": f.message}));
            } else {
                eprintln!("ipclusterctl: {}", f.text);
            }
            ExitCode::from(f.code)
        }
    }
}

/// `logs` and `check-config` read this host's journal and files: with -H they say so, and what to
/// run on HOST instead, rather than show this host's. (ssh would run that command line in a
/// shell: it is not run from here.)
fn local_only(command: &Cmd, host: &remote::Destination) -> ExitCode {
    let (what, there) = match command {
        Cmd::Logs { app, generation, .. } => {
            if let Err(e) = ipcluster_core::name::AppName::new(app) {
                eprintln!("ipclusterctl: {e}");
                return ExitCode::from(2);
            }
            let unit = match generation {
                Some(g) => format!("ipcluster-{app}-{g}.scope"),
                None => format!("'ipcluster-{app}-*.scope'"),
            };
            ("logs reads this host's journal", format!("journalctl -u {unit}"))
        }
        _ => ("check-config reads this host's files", "ipclusterctl check-config".to_owned()),
    };
    eprintln!("ipclusterctl: {what}, not {host}'s: run `{there}` on {host}");
    ExitCode::from(2)
}

/// A command that failed: its exit status, the message for people, and what `--json` prints
/// instead, `{"error": <D-Bus error name>, "message": <the daemon's message>}`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Failure {
    code: u8,
    text: String,
    /// The D-Bus error name; where the daemon was not reached, the standard name for that
    /// (`org.freedesktop.DBus.Error.NoServer`, or `…Disconnected` when the connection broke).
    name: String,
    message: String,
}

impl Failure {
    /// A failed call to the daemon on `host` (None: this host's).
    fn of(e: &zbus::Error, host: Option<&remote::Destination>) -> Self {
        let (code, text) = describe_at(e, host);
        let (name, message) = match e {
            zbus::Error::MethodError(name, message, _) => {
                (name.to_string(), message.clone().unwrap_or_default())
            }
            zbus::Error::FDO(f) => (
                zbus::DBusError::name(&**f).to_string(),
                zbus::DBusError::description(&**f).unwrap_or("").to_owned(),
            ),
            _ => (NO_SERVER.to_owned(), text.clone()),
        };
        Failure { code, text, name, message }
    }

    /// The daemon could not be reached (exit status 3).
    fn unreachable(name: &str, text: String) -> Self {
        Failure { code: 3, name: name.to_owned(), message: text.clone(), text }
    }
}

/// The standard D-Bus error names for a daemon not reached, and a connection that broke.
const NO_SERVER: &str = "org.freedesktop.DBus.Error.NoServer";
const DISCONNECTED: &str = "org.freedesktop.DBus.Error.Disconnected";

/// Runs the command against the local daemon, or over ssh against HOST's.
async fn session(args: Args) -> Result<(), Failure> {
    let Some(dest) = args.host.clone() else {
        let conn =
            if args.user { zbus::Connection::session().await } else { zbus::Connection::system().await };
        let conn = conn.map_err(|e| Failure::of(&e, None))?;
        return run(args, &conn).await.map_err(|e| Failure::of(&e, None));
    };
    let (conn, mut tunnel) =
        remote::connect(&dest).await.map_err(|e| Failure::unreachable(NO_SERVER, e.to_string()))?;
    match run(args, &conn).await {
        Ok(()) => Ok(()),
        // The connection broke: ssh says why.
        Err(e) if is_transport(&e) => Err(Failure::unreachable(
            DISCONNECTED,
            format!("lost the connection to ipclusterd on {dest}: {}", tunnel.reason(&e.to_string())),
        )),
        Err(e) => Err(Failure::of(&e, Some(&dest))),
    }
}

/// A failed call as an exit status and a message for people.
fn describe(e: &zbus::Error) -> (u8, String) {
    describe_at(e, None)
}

/// A failed call to the daemon on `host` (None: this host's) as an exit status and a message.
fn describe_at(e: &zbus::Error, host: Option<&remote::Destination>) -> (u8, String) {
    match e {
        zbus::Error::MethodError(name, message, _) => {
            describe_named(name.as_str(), message.as_deref().unwrap_or(""), host)
        }
        zbus::Error::FDO(f) => describe_named(
            &zbus::DBusError::name(&**f).to_string(),
            zbus::DBusError::description(&**f).unwrap_or(""),
            host,
        ),
        // An outcome this client found (a canary rolled back while it waited), named like the
        // daemon's errors.
        zbus::Error::Failure(m)
            if let Some((name, message)) = m.split_once(": ")
                && ErrorName::parse(name).is_some() =>
        {
            describe_named(name, message, host)
        }
        other => match host {
            None => (3, format!("cannot reach ipclusterd: {other}")),
            Some(h) => (3, format!("cannot reach ipclusterd on {h}: {other}")),
        },
    }
}

/// The meaning of a D-Bus error name, with the daemon's message.
fn describe_named(name: &str, message: &str, host: Option<&remote::Destination>) -> (u8, String) {
    match ErrorName::parse(name) {
        Some(e @ ErrorName::NoServer) => (3, format!("{}: {message}", e.meaning())),
        Some(e) => (1, format!("{}: {message}", e.meaning())),
        None if matches!(
            name,
            "org.freedesktop.DBus.Error.ServiceUnknown" | "org.freedesktop.DBus.Error.NameHasNoOwner"
        ) =>
        {
            match host {
                None => (3, "ipclusterd is not running (systemctl start ipclusterd)".into()),
                Some(h) => {
                    (3, format!("ipclusterd is not running on {h} (systemctl -H {h} start ipclusterd)"))
                }
            }
        }
        // D-Bus activation of a masked unit: the daemon cannot be reached, as when it is stopped.
        None if name == "org.freedesktop.systemd1.UnitMasked" => match host {
            None => (3, "ipclusterd is masked, so it cannot start (systemctl unmask ipclusterd)".into()),
            Some(h) => (
                3,
                format!(
                    "ipclusterd is masked on {h}, so it cannot start (systemctl -H {h} unmask ipclusterd)"
                ),
            ),
        },
        None => (1, format!("{name}: {message}")),
    }
}

/// Whether a call failed because the connection broke (zbus fails the calls pending on a closed
/// socket with an I/O error), rather than with an answer.
fn is_transport(e: &zbus::Error) -> bool {
    matches!(e, zbus::Error::InputOutput(_))
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

/// What the bus answers a method the daemon does not have.
pub(crate) const UNKNOWN_METHOD: &str = "org.freedesktop.DBus.Error.UnknownMethod";

/// ListSessions of `app`; none from a daemon older than the method (its apps keep no sessions).
async fn sessions(manager: &ManagerProxy<'_>, app: &str) -> zbus::Result<Vec<ipcluster_bus::SessionRow>> {
    match manager.list_sessions(app).await {
        Err(zbus::Error::MethodError(name, _, _)) if name.as_str() == UNKNOWN_METHOD => Ok(Vec::new()),
        other => other,
    }
}

async fn run(args: Args, conn: &zbus::Connection) -> zbus::Result<()> {
    let manager = ManagerProxy::new(conn).await?;
    let all = |a: &Option<String>| a.clone().unwrap_or_default();
    let json = args.json;
    match args.command {
        Cmd::Version => output::print_value(json, "version", manager.version().await?),
        Cmd::Status { app } => {
            let app = all(&app);
            let (gens, workers) = (manager.list_generations(&app).await?, manager.list_workers(&app).await?);
            let health = match manager.list_health(&app).await {
                Err(zbus::Error::MethodError(name, _, _)) if name.as_str() == UNKNOWN_METHOD => Vec::new(),
                other => other?,
            };
            output::status(json, &gens, &sessions(&manager, &app).await?, &workers, &health);
        }
        Cmd::Deploy { app, options, no_block, .. } => {
            progress::deploy(&manager, &app, options.to_bus()?, no_block, json).await?;
        }
        Cmd::Rollback { app, generation } => {
            progress::rollback(&manager, &app, generation.unwrap_or(0), json).await?;
        }
        Cmd::Promote { app } => progress::promote(&manager, &app, json).await?,
        Cmd::Retire { app, generation } => {
            manager.retire_generation(&app, generation).await?;
            output::print_value(json, "retired", format!("{app} generation {generation}"));
        }
        Cmd::KillRetired { app } => {
            let n = manager.kill_retired(&all(&app)).await?;
            output::print_value(json, "stopping", n);
        }
        Cmd::Workers { app } => output::workers(json, &manager.list_workers(&all(&app)).await?),
        Cmd::Generations { app } => {
            let app = all(&app);
            output::generations(
                json,
                &manager.list_generations(&app).await?,
                &sessions(&manager, &app).await?,
            );
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// D-Bus activation of a masked ipclusterd fails with systemd's `UnitMasked`: the daemon is
    /// not reachable (exit 3), like a stopped one, and the message says how to undo it.
    #[test]
    fn a_masked_daemon_is_not_reachable() {
        let masked = "org.freedesktop.systemd1.UnitMasked";
        let (code, message) = describe_named(masked, "Unit dbus-org.ipcluster1.service is masked.", None);
        assert_eq!(code, 3, "{message}");
        assert!(message.contains("systemctl unmask ipclusterd"), "{message}");
        assert_eq!(describe_named("org.freedesktop.DBus.Error.ServiceUnknown", "", None).0, 3);
        assert_eq!(describe_named("org.example.Other", "x", None).0, 1, "a refusal is exit 1");
    }

    /// The error the daemon (or the bus) answers a call with, as zbus hands it to us.
    fn reply(name: &str, message: &str) -> zbus::Error {
        let call = zbus::Message::method_call("/org/ipcluster1", "Deploy").build(&()).unwrap();
        zbus::Message::error(&call.header(), name).build(&message).unwrap().into()
    }

    #[test]
    fn json_errors_name_the_d_bus_error_and_keep_the_exit_status() {
        let cases = [
            ("org.ipcluster1.Error.NoSuchApp", "no app \"nope\"", 1),
            ("org.ipcluster1.Error.DeployFailed", "web generation 3: band 0: exited", 1),
            ("org.freedesktop.DBus.Error.InvalidArgs", "workers: 3: must be a power of two", 1),
            ("org.freedesktop.DBus.Error.AccessDenied", "not authorized", 1),
            ("org.freedesktop.DBus.Error.NoServer", "ipclusterd is stopping", 3),
            ("org.freedesktop.DBus.Error.ServiceUnknown", "The name is not activatable", 3),
        ];
        for (name, message, code) in cases {
            let f = Failure::of(&reply(name, message), None);
            assert_eq!((f.name.as_str(), f.message.as_str(), f.code), (name, message, code), "{f:?}");
            // People get the same exit status and message as before.
            assert_eq!((f.code, f.text.clone()), describe(&reply(name, message)));
        }
        let f = Failure::of(&zbus::Error::InputOutput(std::io::Error::other("gone").into()), None);
        assert_eq!((f.code, f.name.as_str()), (3, NO_SERVER), "{f:?}");
        assert!(f.message.starts_with("cannot reach ipclusterd: "), "{f:?}");
    }
}
