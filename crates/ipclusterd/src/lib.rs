//! The ipclusterd daemon: wires the domain ([`ipcluster_core`]) to systemd, D-Bus and netfilter.
//!
//! The supervisor is generic over one [`world::World`] that names every seam; [`run`] wires
//! the real one, [`world::System`], and takes everything else from outside (config directory,
//! which bus, which name, a shutdown future) so tests can run a daemon on a private bus.
//!
//! ```text
//! D-Bus (dbus/)   ──Command──▶  supervisor/  ──▶ Scopes (scopes.rs: systemd)
//! signals (SIGUSR1, SIGHUP) ─▶   owns all     ──▶ Router (netfilter/: iptables-restore)
//! exits, probes, notify ─Event▶   state       ──▶ Spawner, Inspector, Sampler (processes.rs:
//!                                             │     fork, pidfds, /proc, probes, sampling)
//!                                             ──▶ Steer (steering.rs: socket mode's eBPF)
//!                                             ──▶ Files (files.rs: app files), Store (state.rs)
//!                                             ──▶ Notifier (status.rs: sd_notify), Relay (relay.rs),
//!                                                 Checker (checker.rs: HTTP health checks)
//!                                             ──▶ Clock (clock.rs)
//! ```
//!
//! docs/ARCHITECTURE.md describes the parts and how a deploy, an adoption and a crash flow
//! through them.

pub mod auth;
pub mod checker;
pub mod clock;
pub mod confine;
pub mod dbus;
pub mod files;
pub mod journal;
pub mod logging;
pub mod metrics;
pub mod netfilter;
pub mod nftgen;
pub mod notify;
pub mod orphan;
pub mod process;
pub mod processes;
pub mod relay;
pub mod sampler;
pub mod scopes;
pub mod state;
pub mod status;
pub mod steering;
pub mod supervisor;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod trusted;
pub mod world;

use std::{future::Future, path::PathBuf};

use anyhow::Context;
use tracing::{info, warn};

pub use ipcluster_bus::{BUS_NAME, OBJECT_PATH};

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

/// `$RUNTIME_DIRECTORY` (set by systemd from `RuntimeDirectory=`), else /run/ipcluster.
fn runtime_dir() -> PathBuf {
    std::env::var_os("RUNTIME_DIRECTORY").map_or_else(|| PathBuf::from("/run/ipcluster"), PathBuf::from)
}

/// `$STATE_DIRECTORY` (set by systemd from `StateDirectory=`), else /var/lib/ipcluster.
fn state_dir() -> PathBuf {
    std::env::var_os("STATE_DIRECTORY").map_or_else(|| PathBuf::from("/var/lib/ipcluster"), PathBuf::from)
}

/// The workers' notify socket: stable across daemon restarts.
pub fn notify_socket_path() -> PathBuf {
    runtime_dir().join("notify")
}

/// Runs the daemon until `shutdown` resolves.
///
/// Fails if the bus name is already owned: a second daemon must never steal the name (and with it
/// the cluster) from a running one. Stopping the daemon never stops workers or removes rules.
pub async fn run(options: Options, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let (handle, mailbox) = supervisor::channel();
    let builder = match options.bus {
        BusKind::System => zbus::connection::Builder::system(),
        BusKind::Session => zbus::connection::Builder::session(),
    };
    let connection = builder
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

    let system = match options.bus {
        BusKind::System => connection.clone(),
        BusKind::Session => zbus::Connection::system().await.context("cannot connect to the system bus")?,
    };
    let scopes = scopes::Systemd::new(&system).await.context("cannot talk to systemd")?;
    let (notify, notify_socket) = match notify::Receiver::bind(&notify_socket_path()) {
        Ok(receiver) => {
            let path = receiver.path().to_owned();
            (Some(notify::forward(receiver)), Some(path))
        }
        Err(e) => {
            warn!("cannot bind the workers' notify socket: {e}; ready = \"notify\" apps cannot deploy");
            (None, None)
        }
    };
    let (signals_tx, signals_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(dbus::forward_signals(connection.clone(), OBJECT_PATH, signals_rx));
    #[cfg(target_env = "gnu")]
    tokio::spawn(return_freed_memory());
    let daemon_config = load_daemon_config(&options.config_dir);
    let store = state::StateFile::new(state_dir().join("state.json"));
    let deps = supervisor::Deps::<world::System> {
        sample_interval: daemon_config.sample_interval,
        scopes,
        router: netfilter::Iptables::new(),
        spawner: processes::Host,
        inspector: processes::Host,
        sampler: processes::Host,
        steer: steering::Kernel,
        files: files::Disk::new(&options.config_dir),
        store: store.clone(),
        notifier: status::Systemd,
        relay: relay::Orphans,
        checker: checker::Http,
        clock: std::sync::Arc::new(clock::SystemClock),
        config_dir: options.config_dir.clone(),
        notify,
        notify_socket,
        signals: signals_tx,
    };
    if let Some(addr) = daemon_config.metrics_listen {
        // A port that cannot be bound costs the metrics, never the cluster.
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                info!("serving /metrics on http://{addr}/metrics");
                tokio::spawn(metrics::serve(listener, handle.clone(), metrics::Limits::default()));
            }
            Err(e) => tracing::error!("metrics_listen: cannot listen on {addr}: {e}; no /metrics"),
        }
    }
    let supervisor = supervisor::Supervisor::new(mailbox, deps);
    let supervisor_task = tokio::spawn(supervisor.run());
    tokio::spawn(unix_signals(handle.clone()));

    shutdown.await;
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    drop(handle);
    supervisor_task.abort();
    // Once the supervisor is gone (no save can follow), what it saved last is written before
    // the process ends: the writer thread may not have run yet (a loaded host), and a restart
    // right after a cutover must find the generations as they were (a draining one with no
    // record left is known only from the file).
    if let Err(e) = supervisor_task.await
        && e.is_panic()
    {
        tracing::error!("the supervisor had stopped: it panicked (its message is above)");
    }
    store.flush();
    info!("stopped; workers and rules stay in place");
    Ok(())
}

/// The daemon's own file, `ipclusterd.toml` beside the apps directory; missing is the defaults,
/// invalid is reported and the defaults are used.
fn load_daemon_config(config_dir: &std::path::Path) -> ipcluster_core::config::DaemonConfig {
    let path = config_dir.parent().unwrap_or(config_dir).join("ipclusterd.toml");
    // Root's word only (as app files: see trusted.rs).
    match trusted::read(&path, trusted::Kind::DaemonFile) {
        Ok(Some(text)) => ipcluster_core::config::DaemonConfig::parse(&path.display().to_string(), &text)
            .unwrap_or_else(|e| {
                tracing::error!("{e}; using the defaults");
                ipcluster_core::config::DaemonConfig::default()
            }),
        Ok(None) => ipcluster_core::config::DaemonConfig::default(),
        Err(e) => {
            tracing::error!("cannot read {}: {e}; using the defaults", path.display());
            ipcluster_core::config::DaemonConfig::default()
        }
    }
}

/// SIGUSR1 stops every retired worker (as the original project did); SIGHUP reloads the apps.
async fn unix_signals(handle: supervisor::Handle) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut usr1), Ok(mut hup)) = (signal(SignalKind::user_defined1()), signal(SignalKind::hangup()))
    else {
        warn!("cannot install SIGUSR1/SIGHUP handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = usr1.recv() => {
                let auth = auth::Authorized::daemon("SIGUSR1");
                match handle.call(|reply| supervisor::Command::KillRetired { app: String::new(), auth, reply }).await {
                    Ok(n) => info!(count = n, "SIGUSR1 received: {n} retired workers asked to stop"),
                    Err(e) => warn!("SIGUSR1: {e}"),
                }
            }
            _ = hup.recv() => {
                let auth = auth::Authorized::daemon("SIGHUP");
                if let Err(e) = handle.call(|reply| supervisor::Command::Reload { auth, reply }).await {
                    warn!("SIGHUP: {e}");
                }
            }
        }
    }
}

/// Sends a notification to systemd; harmless when not started by systemd.
pub fn notify_systemd(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!("sd_notify failed: {e}");
    }
}

/// A fresh directory for a unit test, under the workspace's target directory (tests never
/// touch the host's /tmp).
#[cfg(test)]
pub(crate) fn test_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/unit-tmp")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("test dir");
    dir
}

/// How often [`return_freed_memory`] gives freed heap back to the kernel.
#[cfg(target_env = "gnu")]
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Gives the kernel back, every [`TRIM_EVERY`], the heap pages glibc's allocator keeps free.
///
/// A deploy briefly holds two generations' workers (and a canary, or a soak's sessions, more):
/// the heap's high-water mark rises, and glibc returns only the free space at the top of each
/// arena (the blocking pool's and the notify thread's arenas included), so the daemon's RSS
/// stayed at each new high-water mark and read as growth (the chaos soak's RSS slope).
/// `malloc_trim(0)` also releases free pages in the middle of every arena (`MADV_DONTNEED`), so
/// the RSS follows the heap in use. It takes well under a millisecond for this daemon's few MiB
/// of heap, on the runtime thread (measured with glibc 2.36 on a 25 MiB heap: 0.07 ms the first
/// time, 0.005 ms after). glibc only: other C libraries' allocators have no such call.
#[cfg(target_env = "gnu")]
async fn return_freed_memory() {
    let mut every = tokio::time::interval(TRIM_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        // SAFETY: malloc_trim only walks and trims the allocator's own arenas, under their locks.
        unsafe { libc::malloc_trim(0) };
    }
}
