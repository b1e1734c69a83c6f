//! The ipclusterd daemon: wires the domain ([`ipcluster_core`]) to systemd, D-Bus and netfilter.
//!
//! [`run`] takes everything from outside (config directory, which bus, which name, a shutdown
//! future) so tests can run a daemon on a private bus.

pub mod dbus;
pub mod logging;
pub mod supervisor;

use std::{future::Future, path::PathBuf};

use anyhow::Context;
use tracing::info;

/// The well-known bus name the daemon owns.
pub const BUS_NAME: &str = "org.ipcluster1";
/// The object path of the manager.
pub const OBJECT_PATH: &str = "/org/ipcluster1";

/// Which message bus to serve on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BusKind {
    /// The system bus (production).
    System,
    /// The session bus of the caller (development and tests).
    Session,
}

/// Everything [`run`] needs from outside.
#[derive(Debug, Clone)]
pub struct Options {
    /// Directory of app files.
    pub config_dir: PathBuf,
    /// Bus to serve on.
    pub bus: BusKind,
    /// Well-known name to own; never taken over from an existing owner.
    pub bus_name: String,
}

/// Resolves when the daemon should stop: SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        // Without signal handlers the default action (terminate) still applies.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received, stopping"),
        _ = int.recv() => info!("SIGINT received, stopping"),
    }
}

/// Runs the daemon until `shutdown` resolves.
///
/// Fails if the bus name is already owned: a second daemon must never steal the name (and with it
/// the cluster) from a running one.
pub async fn run(options: Options, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let (supervisor, handle) = supervisor::Supervisor::new(options.config_dir.clone());
    let builder = match options.bus {
        BusKind::System => zbus::connection::Builder::system(),
        BusKind::Session => zbus::connection::Builder::session(),
    };
    let _connection = builder
        .name(options.bus_name.as_str())
        .allow_name_replacements(false)
        .replace_existing_names(false)
        .serve_at(OBJECT_PATH, dbus::Manager::new(handle.clone()))
        .build()
        .await
        .with_context(|| {
            format!("cannot own bus name {} (is another ipclusterd running?)", options.bus_name)
        })?;
    info!(bus_name = %options.bus_name, version = ipcluster_core::VERSION, "serving on the bus");

    let supervisor_task = tokio::spawn(supervisor.run());
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&handle.status_line().await.unwrap_or_default()),
    ]);

    shutdown.await;
    notify(&[sd_notify::NotifyState::Stopping]);
    drop(handle);
    supervisor_task.abort();
    info!("stopped");
    Ok(())
}

/// Sends a notification to systemd; harmless when not started by systemd.
fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!("sd_notify failed: {e}");
    }
}
