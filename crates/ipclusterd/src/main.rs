//! `ipclusterd`: arguments, logging, then [`ipclusterd::run`].

use std::process::ExitCode;

use clap::Parser;
use ipclusterd::{BusKind, Options};

/// Runs multi-process network services with sticky sessions and zero-downtime deploys.
///
/// Started by systemd (ipclusterd.service); controlled over D-Bus (org.ipcluster1) and with
/// ipclusterctl(1). App files: /etc/ipcluster/apps/<app>.toml. SIGUSR1 stops retired workers;
/// SIGHUP reloads the app files. With metrics_listen in /etc/ipcluster/ipclusterd.toml, serves
/// GET /metrics for Prometheus.
#[derive(Debug, Parser)]
#[command(name = "ipclusterd", version, about, long_about)]
struct Args {
    /// Directory of app files (`<app>.toml`).
    #[arg(long, default_value = "/etc/ipcluster/apps")]
    config_dir: std::path::PathBuf,
    /// Which bus to serve on.
    #[arg(long, value_enum, default_value_t = BusKind::System)]
    bus: BusKind,
    /// Well-known bus name to own.
    #[arg(long, default_value = ipclusterd::BUS_NAME)]
    bus_name: String,
    /// Prepare the host for socket mode and exit: bpffs at /sys/fs/bpf, net.ipv4.tcp_migrate_req=1
    /// (ipclusterd.service runs this before the daemon, outside the daemon's sandbox).
    #[arg(long)]
    prepare_host: bool,
    /// Print the man page (roff) and exit.
    #[arg(long, hide = true)]
    print_man: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.print_man {
        use clap::CommandFactory;
        let man = clap_mangen::Man::new(Args::command()).section("8");
        return match man.render(&mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        };
    }
    if args.prepare_host {
        ipclusterd::steering::prepare_host();
        return ExitCode::SUCCESS;
    }
    ipclusterd::logging::init();
    if let Err(e) = ipclusterd::process::raise_nofile_limit() {
        tracing::warn!("cannot raise the open-files limit: {e}");
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let options = Options { config_dir: args.config_dir, bus: args.bus, bus_name: args.bus_name };
    match runtime.block_on(ipclusterd::run(options, ipclusterd::shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
