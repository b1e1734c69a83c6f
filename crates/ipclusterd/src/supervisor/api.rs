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
    time::Duration,
};

use ipcluster_core::{
    config::Overrides,
    model::{GenState, WorkerState},
    name::AppName,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::sampler::Sample;

pub use crate::auth::Authorized;

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
/// every one itself, at once or when the event that completes it arrives. Every command that
/// changes something carries the proof that it was authorized ([`Authorized`]), which only the
/// authorization check makes.
#[derive(Debug)]
pub enum Command {
    /// A new generation of `app`; answered with its number once it is live.
    Deploy { app: String, overrides: Overrides, auth: Authorized, reply: Reply<u64> },
    /// A canary generation of `app` on some bands; answered with its number once those bands
    /// are cut over to it.
    DeployCanary {
        app: String,
        overrides: Overrides,
        canary: CanaryRequest,
        auth: Authorized,
        reply: Reply<u64>,
    },
    /// Starts the canary's other bands and cuts them over; answered with its number once live.
    Promote { app: String, auth: Authorized, reply: Reply<u64> },
    /// Retire a generation; a live one is replaced first (answered once the replacement is live).
    Retire { app: String, generation: u64, auth: Authorized, reply: Reply<()> },
    /// What a Rollback of `app` to `generation` would do (changes nothing): the D-Bus adapter
    /// authorizes a Rollback by its plan.
    PlanRollback { app: String, generation: u64, reply: Reply<RollbackPlan> },
    /// Go back to an earlier generation (0: the newest that was live before the live one), as
    /// `plan` says: answered with the generation now live (the same, or a new one running its
    /// config). Refused if the plan changed since it was authorized.
    Rollback { app: String, generation: u64, plan: RollbackPlan, auth: Authorized, reply: Reply<u64> },
    /// Stop the retired workers of `app` ("" = every app); answered with how many.
    KillRetired { app: String, auth: Authorized, reply: Reply<u32> },
    /// Re-read the app files.
    Reload { auth: Authorized, reply: Reply<()> },
    /// Stop every generation of `app` and remove its rules; answered once every scope is gone.
    StopApp { app: String, auth: Authorized, reply: Reply<()> },
}

/// The `canary` and `canary_for` options of a Deploy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CanaryRequest {
    /// How many bands the canary takes.
    pub bands: u32,
    /// Promote by itself after this long if nothing went wrong (roll back at the first thing
    /// that does).
    pub canary_for: Option<Duration>,
}

/// What a Rollback would do. An instant rollback runs nothing new; a redeploy runs what the
/// target generation ran, which is an override where it differs from the app file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackPlan {
    /// The generation that will be live.
    pub target: u64,
    pub how: RollbackHow,
}

/// How a Rollback reaches its target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RollbackHow {
    /// The target is live already: nothing changes.
    AlreadyLive,
    /// Its workers still run: they are live again in one cutover.
    Instant,
    /// Its workers are gone: a new generation runs what it ran. `overrides` are the keys in
    /// which that differs from the app file ([`ipcluster_core::config::AppConfig::override_keys`]).
    Redeploy { overrides: Vec<&'static str> },
    /// The canary `canary` is rolled back: its bands go back to the live generation (the
    /// target), which never stopped serving; the canary's workers stop.
    Canary { canary: u64 },
}

impl RollbackPlan {
    /// The keys that make this rollback an override (none: what a plain Deploy could do).
    pub fn overrides(&self) -> &[&'static str] {
        match &self.how {
            RollbackHow::Redeploy { overrides } => overrides,
            RollbackHow::AlreadyLive | RollbackHow::Instant | RollbackHow::Canary { .. } => &[],
        }
    }
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

/// One row of ListSessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub app: String,
    pub generation: u64,
    /// Live records: clients whose next connection goes to this generation.
    pub records: u32,
}

/// One row of ListHealth: a worker of a generation with health checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthInfo {
    pub app: String,
    pub generation: u64,
    pub band: u32,
    pub pid: u32,
    /// Failed checks in a row.
    pub failures: u32,
    /// The last check's outcome (`HTTP 200`, `cannot connect: …`), "" before the first.
    pub last: String,
    /// When it came back (µs since the epoch), 0 before the first.
    pub last_usec: u64,
    /// What happened to its band before it (`replaced pid 812: 3 failed health checks in a
    /// row (HTTP 500)`), or "".
    pub note: String,
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
    /// A canary ended: `promoted` or `rolled_back`, and why.
    CanaryEnded {
        app: String,
        generation: u64,
        result: &'static str,
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
    /// A live worker that failed `health_failures` checks in a row replaced.
    Health,
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
            PolicyAction::Health => "health",
            PolicyAction::HeldBack => "held_back",
        }
    }
}

/// Deploys of an app by result (`ipcluster_deploys_total{result}`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deploys {
    /// Went live (a plain deploy, or a rollback's redeploy).
    pub ok: u64,
    /// Failed before going live (canaries included).
    pub failed: u64,
    /// Canaries promoted (live).
    pub promoted: u64,
    /// Canaries rolled back, by hand or by themselves.
    pub rolled_back: u64,
}

impl Deploys {
    /// (result label, count), in the order /metrics shows them.
    pub fn by_result(&self) -> [(&'static str, u64); 4] {
        [
            ("ok", self.ok),
            ("failed", self.failed),
            ("promoted", self.promoted),
            ("rolled_back", self.rolled_back),
        ]
    }
}

/// Counters since the daemon started, for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    /// Per app: deploys by result.
    pub deploys: BTreeMap<String, Deploys>,
    /// Respawns of crashed workers, per (app, band).
    pub restarts: BTreeMap<(String, u32), u64>,
    /// Policy actions, per (app, action).
    pub policy_actions: BTreeMap<(String, PolicyAction), u64>,
    /// Cutover durations, per app.
    pub cutover: BTreeMap<String, Histogram>,
    /// Socket mode: steering programs found detached or replaced and attached again, per app.
    pub steering_restored: BTreeMap<String, u64>,
}

/// What readers see: the state as of the supervisor's last turn.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// The workers' rows, their `rss` and `cpu_usec` left at 0: [`Self::workers`] reads each
    /// row with its numbers from `usage`. A sampling round changes only `usage`, so a snapshot
    /// shares the rows of the one before unless a row changed: at 1,024 workers, building
    /// every row again each second (three small allocations a row) was most of an idle
    /// daemon's CPU.
    pub rows: Arc<[WorkerInfo]>,
    /// Each row's last sample, in `rows` order.
    pub usage: Vec<Sample>,
    pub generations: Vec<GenerationInfo>,
    /// Session records of the generations with session affinity.
    pub sessions: Vec<SessionInfo>,
    /// The health checks of the workers of generations with a `health_path`.
    pub health: Vec<HealthInfo>,
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
    /// The rows of `app` ("" = every app) among `rows`, whose app `app_of` says.
    fn rows_of<T: Clone>(&self, app: &str, rows: &[T], app_of: impl Fn(&T) -> &str) -> Result<Vec<T>, Error> {
        let filter = self.matching(app)?;
        Ok(rows.iter().filter(|r| filter.as_ref().is_none_or(|a| a.as_str() == app_of(r))).cloned().collect())
    }

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

    /// A snapshot of these workers (their numbers move to `usage`), for tests.
    #[cfg(test)]
    pub fn with_workers(workers: Vec<WorkerInfo>) -> Self {
        let usage = workers.iter().map(|w| Sample { rss: w.rss, cpu_usec: w.cpu_usec }).collect();
        let rows = workers.into_iter().map(|w| WorkerInfo { rss: 0, cpu_usec: 0, ..w }).collect();
        Snapshot { rows, usage, ..Snapshot::default() }
    }

    /// Each worker's row and its last numbers.
    pub fn workers(&self) -> impl Iterator<Item = (&WorkerInfo, Sample)> + '_ {
        self.rows.iter().zip(self.usage.iter().copied())
    }

    /// ListWorkers.
    pub fn workers_of(&self, app: &str) -> Result<Vec<WorkerInfo>, Error> {
        let filter = self.matching(app)?;
        Ok(self
            .workers()
            .filter(|(w, _)| filter.as_ref().is_none_or(|a| a.as_str() == w.app))
            .map(|(w, u)| WorkerInfo { rss: u.rss, cpu_usec: u.cpu_usec, ..w.clone() })
            .collect())
    }

    /// ListSessions.
    pub fn sessions_of(&self, app: &str) -> Result<Vec<SessionInfo>, Error> {
        self.rows_of(app, &self.sessions, |s| &s.app)
    }

    /// ListHealth.
    pub fn health_of(&self, app: &str) -> Result<Vec<HealthInfo>, Error> {
        self.rows_of(app, &self.health, |h| &h.app)
    }

    /// ListGenerations.
    pub fn generations_of(&self, app: &str) -> Result<Vec<GenerationInfo>, Error> {
        self.rows_of(app, &self.generations, |g| &g.app)
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
