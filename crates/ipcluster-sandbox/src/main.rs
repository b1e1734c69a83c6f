//! `ipcluster-sandbox`: boot a throwaway systemd host by hand.
//!
//! `ipcluster-sandbox run [--install] [--share DIR]... -- CMD...` boots, optionally installs the
//! build, runs CMD inside (default: an interactive shell), then tears down. Shared host
//! directories appear read-only under /run/ipcluster-sandbox/host/<host path>.
//! `ipcluster-sandbox gc` removes sandboxes left by killed processes.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ipcluster_sandbox::Sandbox;

#[derive(Debug, Parser)]
#[command(version, about = "Boot a throwaway systemd host in fresh namespaces")]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Boot a sandbox, run a command inside, tear it down.
    Run {
        /// Install the build (`xtask install --no-build`) before running the command.
        #[arg(long)]
        install: bool,
        /// Show this host directory inside, read-only, at /run/ipcluster-sandbox/host/<its path>.
        #[arg(long, value_name = "DIR")]
        share: Vec<std::path::PathBuf>,
        /// The command (default: /bin/bash).
        #[arg(last = true)]
        argv: Vec<String>,
    },
    /// Remove sandboxes whose owner process is gone.
    Gc,
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ipcluster-sandbox: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<ExitCode> {
    match Args::parse().command {
        Cmd::Gc => {
            ipcluster_sandbox::collect_stale();
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run { install, share, mut argv } => {
            if argv.is_empty() {
                argv.push("/bin/bash".into());
            }
            let sandbox = Sandbox::boot_with(ipcluster_sandbox::Options { share, ..Default::default() })?;
            eprintln!("sandbox {} booted (PID 1 = host pid {})", sandbox.name(), sandbox.init_pid());
            if install {
                sandbox.install()?;
            }
            let status = sandbox
                .command(&argv)
                .stdin(std::process::Stdio::inherit())
                .status()
                .context("cannot run the command")?;
            sandbox.teardown()?;
            Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
    }
}
