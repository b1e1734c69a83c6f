//! The supervisor's interface to the rest of the daemon: the [`Command`]s it answers (each with
//! its reply channel), the [`Error`]s it answers with, the [`Snapshot`] it publishes for readers,
//! the [`BusSignal`]s it emits, and the [`Handle`] the adapters hold.
//!
//! Reads never reach the supervisor: it publishes a [`Snapshot`] at the end of every turn of its
//! loop, before the answers of that turn leave, and readers (ListWorkers, ListGenerations, the
//! Apps property) read the latest one. A flood of reads costs the supervisor nothing, and a
//! caller who reads right after an answer sees what the answer did.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use ipcluster_core::{
    config::Overrides,
    model::{GenState, WorkerState},
    name::AppName,
};
use tokio::sync::{mpsc, oneshot, watch};

/// Errors the supervisor answers with; the D-Bus adapter maps each to a bus error name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    NoSuchApp(String),
    #[error("{0}")]
    NoSuchGeneration(String),
    #[error("{0}")]
    DeployFailed(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    InvalidConfig(String),
    #[error("{0}")]
    InvalidArgs(String),
    #[error("{0}")]
    StopFailed(String),
    #[error("the supervisor is not running (ipclusterd is stopping)")]
    Gone,
}

/// Where a command's answer goes.
pub type Reply<T> = oneshot::Sender<Result<T, Error>>;

/// A request to the supervisor. Each carries the sender of its reply; the supervisor answers
/// every one itself, at once or when the event that completes it arrives.
#[derive(Debug)]
pub enum Command {
    /// A new generation of `app`; answered with its number once it is live.
    Deploy { app: String, overrides: Overrides, reply: Reply<u64> },
    /// Retire a generation; a live one is replaced first (answered once the replacement is live).
    Retire { app: String, generation: u64, reply: Reply<()> },
    /// Go back to an earlier generation (0: the newest that was live before the live one):
    /// answered with the generation now live (the same, or a new one running its config).
    Rollback { app: String, generation: u64, reply: Reply<u64> },
    /// Stop the retired workers of `app` ("" = every app); answered with how many.
    KillRetired { app: String, reply: Reply<u32> },
    /// Re-read the app files.
    Reload { reply: Reply<()> },
    /// Stop every generation of `app` and remove its rules; answered once every scope is gone.
    StopApp { app: String, reply: Reply<()> },
}

/// One row of ListWorkers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    pub app: String,
    pub generation: u64,
    pub band: u32,
    pub pid: u32,
    pub state: WorkerState,
    /// (public port, worker port), in `listen` order.
    pub ports: Vec<(u16, u16)>,
    pub rss: u64,
    pub cpu_usec: u64,
    pub start_usec: u64,
    pub nice: i32,
    pub scope: String,
}

/// One row of ListGenerations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationInfo {
    pub app: String,
    pub generation: u64,
    pub state: GenState,
    pub workers: u32,
    pub start_usec: u64,
    pub scope: String,
}

/// Signals for the bus, emitted by the D-Bus adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusSignal {
    GenerationStateChanged {
        app: String,
        generation: u64,
        state: GenState,
    },
    WorkerExited {
        app: String,
        generation: u64,
        band: u32,
        pid: u32,
        reason: String,
    },
    WorkerReady {
        app: String,
        generation: u64,
        band: u32,
        pid: u32,
    },
    /// A memory or health retirement was held back by retire_rate, or live workers alone are
    /// over cluster_memory_max.
    PolicyHeldBack {
        app: String,
        generation: u64,
        band: u32,
        pid: u32,
        reason: String,
    },
}

/// Buckets (upper bounds, seconds) of the cutover duration histogram.
pub const CUTOVER_BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// A histogram with fixed buckets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// Observations at most each of [`CUTOVER_BUCKETS`] (cumulative, as Prometheus counts).
    pub cumulative: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        if self.cumulative.len() != CUTOVER_BUCKETS.len() {
            self.cumulative = vec![0; CUTOVER_BUCKETS.len()];
        }
        for (bound, n) in CUTOVER_BUCKETS.iter().zip(&mut self.cumulative) {
            if seconds <= *bound {
                *n += 1;
            }
        }
        self.sum += seconds;
        self.count += 1;
    }
}

/// What the memory and health policies did, by name (`ipcluster_policy_actions_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyAction {
    /// A live worker over `worker_memory_max` replaced.
    MemoryReplacement,
    /// A retired worker stopped over 80 % of `cluster_memory_max`.
    WatermarkStop,
    /// A retired worker killed over 95 % of `cluster_memory_max`.
    WatermarkKill,
    /// A hung worker replaced or stopped.
    Watchdog,
    /// An action held back by `retire_rate`, or live workers alone over budget.
    HeldBack,
}

impl PolicyAction {
    pub const fn as_str(self) -> &'static str {
        match self {
            PolicyAction::MemoryReplacement => "memory_replacement",
            PolicyAction::WatermarkStop => "watermark_stop",
            PolicyAction::WatermarkKill => "watermark_kill",
            PolicyAction::Watchdog => "watchdog",
            PolicyAction::HeldBack => "held_back",
        }
    }
}

/// Counters since the daemon started, for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    /// Per app: deploys that went live, deploys that failed.
    pub deploys: BTreeMap<String, (u64, u64)>,
    /// Respawns of crashed workers, per (app, band).
    pub restarts: BTreeMap<(String, u32), u64>,
    /// Policy actions, per (app, action).
    pub policy_actions: BTreeMap<(String, PolicyAction), u64>,
    /// Cutover durations, per app.
    pub cutover: BTreeMap<String, Histogram>,
}

/// What readers see: the state as of the supervisor's last turn.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub workers: Vec<WorkerInfo>,
    pub generations: Vec<GenerationInfo>,
    /// Counters since the daemon started.
    pub metrics: Metrics,
    /// Every app the supervisor knows (with a file, valid or not, or with running generations).
    pub known: BTreeSet<AppName>,
    /// The apps with a valid file.
    pub valid: Vec<String>,
    /// Where app files live (for "no such app" messages).
    pub config_dir: String,
}

impl Snapshot {
    /// Resolves a caller's app filter: "" is every app; malformed → InvalidArgs, unknown →
    /// NoSuchApp.
    pub fn matching(&self, app: &str) -> Result<Option<AppName>, Error> {
        if app.is_empty() {
            return Ok(None);
        }
        let name = AppName::new(app).map_err(|e| Error::InvalidArgs(e.to_string()))?;
        if !self.known.contains(&name) {
            return Err(Error::NoSuchApp(format!(
                "no app \"{name}\" (no file {}/{name}.toml)",
                self.config_dir
            )));
        }
        Ok(Some(name))
    }

    /// ListWorkers.
    pub fn workers_of(&self, app: &str) -> Result<Vec<WorkerInfo>, Error> {
        let filter = self.matching(app)?;
        Ok(self
            .workers
            .iter()
            .filter(|w| filter.as_ref().is_none_or(|a| a.as_str() == w.app))
            .cloned()
            .collect())
    }

    /// ListGenerations.
    pub fn generations_of(&self, app: &str) -> Result<Vec<GenerationInfo>, Error> {
        let filter = self.matching(app)?;
        Ok(self
            .generations
            .iter()
            .filter(|g| filter.as_ref().is_none_or(|a| a.as_str() == g.app))
            .cloned()
            .collect())
    }
}

/// A cheap, clonable handle for sending commands to the supervisor and reading its snapshot.
#[derive(Debug, Clone)]
pub struct Handle {
    tx: mpsc::Sender<Command>,
    /// `None` until the supervisor has adopted what it found and published its first one.
    snapshot: watch::Receiver<Option<Arc<Snapshot>>>,
}

impl Handle {
    /// Sends a command built around a fresh reply channel and awaits the answer.
    pub async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| Error::Gone)?;
        rx.await.map_err(|_| Error::Gone)
    }

    /// Like [`Handle::ask`] for commands whose answer is itself a `Result`.
    pub async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, Error> {
        self.ask(make).await?
    }

    /// The supervisor's latest snapshot; waits for the first (a daemon that just started
    /// answers reads only once it knows what runs). `Gone` if the supervisor stopped first.
    pub async fn snapshot(&self) -> Result<Arc<Snapshot>, Error> {
        let mut rx = self.snapshot.clone();
        let s = rx.wait_for(Option::is_some).await.map_err(|_| Error::Gone)?;
        s.clone().ok_or(Error::Gone)
    }
}

/// What the supervisor receives: commands, and where it publishes its snapshot.
#[derive(Debug)]
pub struct Mailbox {
    pub(super) commands: mpsc::Receiver<Command>,
    pub(super) snapshot: watch::Sender<Option<Arc<Snapshot>>>,
}

impl Mailbox {
    /// The next command (`None` once every handle is gone).
    pub async fn recv(&mut self) -> Option<Command> {
        self.commands.recv().await
    }

    /// Publishes what readers see.
    pub fn publish(&self, snapshot: Snapshot) {
        self.snapshot.send_replace(Some(Arc::new(snapshot)));
    }
}

/// Creates the channels: the handle for the adapters, the mailbox for the supervisor.
pub fn channel() -> (Handle, Mailbox) {
    let (tx, commands) = mpsc::channel(256);
    let (snapshot, rx) = watch::channel(None);
    (Handle { tx, snapshot: rx }, Mailbox { commands, snapshot })
}
