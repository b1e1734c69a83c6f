//! `cargo xtask`: the project's own commands.
//!
//! - `install [--root DIR]`: build release binaries and install them with the unit files, the bus
//!   policy and `/etc/ipcluster/apps/`; reload systemd and the bus when installing into a running
//!   system. Sandboxes install themselves with this same command (`--no-build`).
//! - `demo`: a throwaway systemd host running ipclusterd.
//! - `deb`: the Debian package, `target/debian/ipclusterd_<version>_<arch>.deb`, checked by lintian.
//! - `test`: everything CI checks: packages, formatting, lints, unit and end-to-end tests.

mod bench;
mod dbus_xml;
mod deb;
mod demo;
#[cfg(test)]
mod docs_check;
mod install;
mod packages;
mod test;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "ipclusterd's project commands")]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build and install ipclusterd, ipclusterctl, unit files and bus policy.
    Install(install::InstallArgs),
    /// Boot a sandboxed systemd host, install ipclusterd, show it working, tear down.
    Demo,
    /// Build the Debian package target/debian/ipclusterd_<version>_<arch>.deb and run lintian.
    Deb(deb::DebArgs),
    /// Benchmarks against the alternatives (needs root); writes docs/bench/REPORT.md.
    Bench {
        /// A reduced run (< 3 min) for iteration; writes docs/bench/quick/.
        #[arg(long)]
        quick: bool,
    },
    /// Regenerate dbus/org.ipcluster1.Manager.xml from the live daemon's introspection.
    DbusXml,
    /// Install missing system packages, check formatting and lints, run every test.
    Test {
        /// Only unit and adapter tests (no sandboxes).
        #[arg(long)]
        unit_only: bool,
        /// Extra arguments passed to cargo nextest (e.g. a test filter).
        #[arg(last = true)]
        nextest_args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Cmd::Install(a) => install::run(&a),
        Cmd::Demo => demo::run(),
        Cmd::Deb(a) => deb::run(&a),
        Cmd::DbusXml => dbus_xml::run(),
        Cmd::Bench { quick } => bench::run(quick),
        Cmd::Test { unit_only, nextest_args } => test::run(unit_only, &nextest_args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root.
fn root() -> PathBuf {
    ipcluster_sandbox::workspace_dir()
}

/// Runs a command from the workspace root, echoing it; fails unless it succeeds.
///
/// Inside a sandbox (`xtask install` there) the workspace may not exist: a checkout under /tmp
/// is covered by the sandbox's own /tmp. Commands then run from the current directory.
fn sh(cmd: &mut std::process::Command) -> anyhow::Result<()> {
    eprintln!("+ {}", show(cmd));
    let root = root();
    if root.is_dir() {
        cmd.current_dir(root);
    }
    let status = cmd.status().map_err(|e| anyhow::anyhow!("cannot run {}: {e}", show(cmd)))?;
    if !status.success() {
        anyhow::bail!("{} failed ({status})", show(cmd));
    }
    Ok(())
}

fn show(cmd: &std::process::Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}
