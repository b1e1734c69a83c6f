//! `cargo xtask`: the project's own commands.
//!
//! - `install [--root DIR]`: build release binaries and install them with the unit files, the bus
//!   policy and `/etc/ipcluster/apps/`; reload systemd and the bus when installing into a running
//!   system. Sandboxes install themselves with this same command (`--no-build`).
//! - `demo`: a throwaway systemd host running ipclusterd.
//! - `deb`: the Debian package, `target/debian/ipclusterd_<version>_<arch>.deb`, checked by lintian.
//! - `test`: everything CI checks: packages, formatting, lints, unit and end-to-end tests.
//! - `ansible [--sanity]`: the Ansible collection (`ansible/`) built and installed under the
//!   target directory's `ansible/`, with Ansible from PyPI; `--sanity` runs `ansible-test sanity`.
//! - `props [--cases N] [--seed S]`: random exploration of the property tests (CI runs them
//!   from a fixed seed); prints its seed so that a failure can be replayed.
//! - `soak [--minutes N] [--seed S]`: the chaos soak: faults at random times from a seed under
//!   load, every invariant checked all along (`soak/`).

mod ansible;
mod bench;
mod dbus_xml;
mod deb;
mod demo;
#[cfg(test)]
mod docs_check;
mod install;
mod npm;
mod packages;
mod props;
mod soak;
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
        /// Only these sections (repeatable); prints their numbers, writes no report.
        #[arg(long, value_enum)]
        only: Vec<bench::Section>,
        /// Only the data-path cells whose label (`MODE vs CONTROL`) contains this text
        /// (repeatable); prints their numbers, writes no report.
        #[arg(long)]
        cell: Vec<String>,
    },
    /// (Run inside a benchmark sandbox.) Detaches the steering program from the reuseport group
    /// of the socket process PID holds at fd 3.
    #[command(hide = true)]
    BenchDetach { pid: u32 },
    /// (Inside a bench sandbox.) Writes `records` session records of `app`'s group on `listen`
    /// to the live slot, as the steering program would.
    #[command(hide = true)]
    BenchSessions { app: String, listen: std::net::SocketAddr, records: u32 },
    /// Explore the property tests from a random (printed) or given seed with many cases.
    Props(props::PropsArgs),
    /// Build the Ansible collection into the target directory's ansible/ (Ansible from PyPI in a
    /// virtual environment there).
    Ansible(ansible::AnsibleArgs),
    /// Regenerate dbus/org.ipcluster1.Manager.xml from the live daemon's introspection.
    DbusXml,
    /// The chaos soak: faults at random times from a seed (printed) under load, every invariant
    /// checked every second; writes soak/seed-<seed>/ in the target directory.
    Soak(soak::SoakArgs),
    /// Install missing system packages, check formatting and lints, run every test.
    Test {
        /// Only unit and adapter tests (no sandboxes, no soak).
        #[arg(long)]
        unit_only: bool,
        /// Without the 3-minute chaos soak (it runs after the tests otherwise).
        #[arg(long)]
        no_soak: bool,
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
        Cmd::Props(a) => props::run(&a),
        Cmd::Soak(a) => soak::run(&a),
        Cmd::Ansible(a) => ansible::run(&a),
        Cmd::Bench { quick, only, cell } => bench::run(quick, &only, &cell),
        Cmd::BenchDetach { pid } => bench::system::detach(pid),
        Cmd::BenchSessions { app, listen, records } => bench::system::fill_sessions(&app, listen, records),
        Cmd::Test { unit_only, no_soak, nextest_args } => test::run(unit_only, no_soak, &nextest_args),
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

/// The target directory, where cargo builds (`cargo metadata`'s, asked once): it need not be
/// `target/` in the checkout (`CARGO_TARGET_DIR`).
fn target() -> PathBuf {
    ipcluster_sandbox::target_dir()
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
