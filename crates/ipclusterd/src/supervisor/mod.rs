//! The one task that owns all state: apps, generations and workers.
//!
//! Inputs arrive as messages: [`Command`]s from the D-Bus adapter and signal handlers (each with
//! a reply channel), and [`Event`]s from small helper tasks (process exits, readiness probes,
//! notify datagrams, timers). The supervisor decides, with the pure rules of
//! [`ipcluster_core`], and acts through narrow traits: [`Scopes`] (systemd) and [`Router`]
//! (netfilter); processes are forked through [`crate::process`].
//!
//! A deploy, step by step (shared/DESIGN.md §3):
//! 1. allocate generation `g` (persisted first, so numbers never repeat) and worker ports;
//! 2. fork one launcher per band, held at its gate; create `ipcluster-<app>-<g>.scope` around
//!    them; release them;
//! 3. wait for every band to be ready (TCP probe or `READY=1`), or fail on the first exit or at
//!    `ready_timeout`: then stop the scope, and only once it is gone answer `DeployFailed`;
//! 4. cutover: one router transaction points every band at the new workers;
//! 5. retire the previous live generation (renice every thread, `retire_signal`), answer `g`.
//!
//! Around that: [`adopt`] takes over the generations a previous daemon left running, [`respawn`]
//! replaces crashed live workers, and the rules are reconciled with the live workers every
//! [`RECONCILE_EVERY`] (another tool may have flushed them).

mod adopt;
mod health;
mod respawn;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::OwnedFd,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use ipcluster_core::{
    config::{AppConfig, ConfigError, Overrides, Ready},
    model::{GenState, WorkerIdentity, WorkerState, scope_name, slice_name},
    name::AppName,
    policy::Backoff,
    ports::PortAllocator,
    routing::AppRoute,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::{
    netfilter::{Applied, Router},
    notify,
    process::{self, Exit, SpawnSpec},
    scopes::{ScopeSpec, Scopes},
    state::{self, GenRecord, PersistedState},
};

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

type Reply<T> = oneshot::Sender<Result<T, Error>>;

/// A request to the supervisor. Each carries the sender of its reply.
#[derive(Debug)]
pub enum Command {
    StatusLine(oneshot::Sender<String>),
    Apps(oneshot::Sender<Vec<String>>),
    Deploy { app: String, overrides: Overrides, reply: Reply<u64> },
    Retire { app: String, generation: u64, reply: Reply<()> },
    KillRetired { app: String, reply: Reply<u32> },
    ListWorkers { app: String, reply: Reply<Vec<WorkerInfo>> },
    ListGenerations { app: String, reply: Reply<Vec<GenerationInfo>> },
    Reload { reply: Reply<()> },
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

/// Something that happened, reported by a helper task.
#[derive(Debug)]
pub enum Event {
    Exited {
        id: u64,
        exit: Exit,
    },
    Ready {
        id: u64,
    },
    Notify {
        pid: u32,
        message: notify::Message,
    },
    ReadyTimeout {
        app: AppName,
        generation: u64,
    },
    StopTimeout {
        id: u64,
    },
    ScopeStopped {
        app: AppName,
        generation: u64,
        error: Option<String>,
    },
    /// Time to respawn a crashed band of a live generation.
    Respawn {
        app: AppName,
        generation: u64,
        band: u32,
    },
    /// A respawned worker did not become ready in time.
    RespawnTimeout {
        id: u64,
    },
    /// A sampling round finished.
    Samples(Vec<(u64, crate::sampler::Sample)>),
    /// Time to stop the next worker in an app's reap queue.
    ReapNext {
        app: AppName,
    },
    /// Time to release the next launcher of a generation (spawn_interval).
    ReleaseNext {
        app: AppName,
        generation: u64,
    },
}

/// A cheap, clonable handle for sending commands to the supervisor.
#[derive(Debug, Clone)]
pub struct Handle {
    tx: mpsc::Sender<Command>,
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

    /// The summary line for `STATUS=`.
    pub async fn status_line(&self) -> Result<String, Error> {
        self.ask(Command::StatusLine).await
    }
}

/// Creates the command channel: the handle for the adapters, the receiver for [`Supervisor::new`].
pub fn channel() -> (Handle, mpsc::Receiver<Command>) {
    let (tx, rx) = mpsc::channel(256);
    (Handle { tx }, rx)
}

/// What the supervisor needs from outside.
#[derive(Debug)]
pub struct Deps<S, R> {
    pub scopes: S,
    pub router: R,
    pub config_dir: PathBuf,
    pub state_file: PathBuf,
    /// The workers' notify socket, if it could be bound.
    pub notify: Option<notify::Receiver>,
    pub signals: mpsc::UnboundedSender<BusSignal>,
    /// How often workers are sampled and the memory and watchdog policies run.
    pub sample_interval: Duration,
    /// The ipclusterd binary workers are launched through (`/proc/self/exe` in the daemon,
    /// which stays valid even after the file is replaced by an upgrade).
    pub launcher: PathBuf,
}

#[derive(Debug)]
struct Worker {
    app: AppName,
    generation: u64,
    band: u32,
    pid: u32,
    ports: Vec<(SocketAddrV4, u16)>,
    state: WorkerState,
    started: SystemTime,
    pidfd: Arc<OwnedFd>,
    ready: bool,
    probe: Option<tokio::task::AbortHandle>,
    /// Last sample (RSS bytes, CPU µs, established connections).
    sample: crate::sampler::Sample,
    /// Last WATCHDOG=1 (or readiness), for `watchdog`.
    last_ping: std::time::Instant,
    /// Why the daemon stopped (or retired) it: memory, watchdog, reaped, cluster memory.
    stop_reason: Option<&'static str>,
    /// For a replacement spawned while this band's worker still serves: the worker it replaces.
    replaces: Option<u64>,
    /// Waiting in the app's reap queue (reap_interval).
    reap_queued: bool,
    /// When it was retired on its own (a memory or health replacement), not with its generation.
    retired_at: Option<SystemTime>,
    /// Duplicates of its listening sockets, taken when it became ready (see orphan.rs).
    listeners: Vec<(u16, OwnedFd)>,
}

#[derive(Debug)]
struct Generation {
    state: GenState,
    config: Arc<AppConfig>,
    started: SystemTime,
    retired_at: Option<SystemTime>,
    scope: String,
    /// Deploy callers waiting for the cutover (or the failure).
    waiting: Vec<Reply<u64>>,
    /// Why the deploy failed, once it has.
    failure: Option<String>,
}

/// A band of a paced generation waiting for its turn (spawn_interval): band, ports, generation.
type HeldLauncher = (u32, Vec<(SocketAddrV4, u16)>, u64);

#[derive(Debug, Default)]
struct App {
    /// The app file as last read: `None` when the file is gone.
    config: Option<Result<Arc<AppConfig>, ConfigError>>,
    generations: BTreeMap<u64, Generation>,
    /// Stopped by StopApp: no rules, no autostart, until the next Deploy (persisted).
    stopped: bool,
    /// Memory and health retirements (retire_rate).
    retire_limit: Option<ipcluster_core::policy::RateLimiter>,
    /// Retired workers waiting to be stopped, one every reap_interval.
    reap_queue: std::collections::VecDeque<u64>,
    reaping: bool,
    /// Live workers alone were over cluster_memory_max at the last sample (reported once).
    live_over_budget: bool,
    /// Launchers of a generation released one every spawn_interval.
    pending_release: Vec<HeldLauncher>,
}

impl App {
    fn live(&self) -> Option<u64> {
        self.generations.iter().rev().find(|(_, g)| g.state == GenState::Live).map(|(n, _)| *n)
    }

    fn deploying(&self) -> Option<u64> {
        self.generations.iter().find(|(_, g)| g.state == GenState::Starting).map(|(n, _)| *n)
    }
}

/// Finished generations kept for ListGenerations, per app.
const HISTORY: usize = 16;
/// `CPUWeight=` of retired generations' scopes (the default is 100).
pub const RETIRED_CPU_WEIGHT: u64 = 10;
/// How often the rules are compared with the live workers (and repaired).
pub const RECONCILE_EVERY: Duration = Duration::from_secs(2);

/// Owner of all state.
#[derive(Debug)]
pub struct Supervisor<S, R> {
    deps: Deps<S, R>,
    commands: mpsc::Receiver<Command>,
    events_tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
    apps: BTreeMap<AppName, App>,
    workers: BTreeMap<u64, Worker>,
    next_worker: u64,
    ports: PortAllocator,
    persisted: PersistedState,
    last_status: String,
    /// Nice value workers start with (the daemon's own); retired ones get this + `retire_nice`.
    base_nice: i32,
    /// Respawn delays of crashing bands.
    backoff: BTreeMap<(AppName, u32), Backoff>,
    /// The workers' notify socket, when it is bound (from the receiver itself).
    notify_path: Option<PathBuf>,
    /// Monotonic origin of the policies' clock.
    clock: std::time::Instant,
}

fn usec(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

impl<S: Scopes + Clone + 'static, R: Router + 'static> Supervisor<S, R> {
    /// A supervisor serving `commands` with `deps`.
    pub fn new(commands: mpsc::Receiver<Command>, deps: Deps<S, R>) -> Self {
        let (events_tx, events) = mpsc::unbounded_channel();
        let persisted = match state::load(&deps.state_file) {
            Ok(s) => s,
            Err(e) => {
                warn!("state file {}: {e}; rebuilding from reality", deps.state_file.display());
                PersistedState::default()
            }
        };
        Self {
            deps,
            commands,
            events_tx,
            events,
            apps: BTreeMap::new(),
            workers: BTreeMap::new(),
            next_worker: 1,
            ports: PortAllocator::default(),
            persisted,
            last_status: String::new(),
            base_nice: process::own_nice(),
            backoff: BTreeMap::new(),
            notify_path: None,
            clock: std::time::Instant::now(),
        }
    }

    /// Loads the apps, starts the autostart ones, then serves until every handle is dropped.
    /// Sends `READY=1` once the autostart deploys have finished (or failed).
    pub async fn run(mut self) {
        self.load_configs();
        self.bump_counters_from_scopes().await;
        self.adopt().await;
        self.notify_path = self.deps.notify.as_ref().map(|r| r.path().to_owned());
        if let Some(rx) = self.deps.notify.take() {
            let tx = self.events_tx.clone();
            tokio::spawn(async move {
                loop {
                    match rx.recv().await {
                        Ok((pid, message)) => {
                            if tx.send(Event::Notify { pid, message }).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            warn!("notify socket: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            });
        }
        let pending = self.autostart().await;
        tokio::spawn(async move {
            for rx in pending {
                let _ = rx.await;
            }
            crate::notify_systemd(&[sd_notify::NotifyState::Ready]);
        });
        let watchdog = sd_notify::watchdog_enabled().map(|d| d / 2).unwrap_or(Duration::from_secs(3600));
        let mut tick = tokio::time::interval(watchdog);
        let mut reconcile = tokio::time::interval(RECONCILE_EVERY);
        reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sample = tokio::time::interval(self.deps.sample_interval);
        sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sampling = false;
        loop {
            tokio::select! {
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.command(cmd).await,
                    None => break,
                },
                Some(ev) = self.events.recv() => {
                    if matches!(ev, Event::Samples(_)) {
                        sampling = false;
                    }
                    self.event(ev).await;
                }
                _ = sample.tick(), if !sampling => {
                    sampling = true;
                    self.start_sampling();
                }
                _ = tick.tick() => crate::notify_systemd(&[sd_notify::NotifyState::Watchdog]),
                _ = reconcile.tick() => self.reconcile().await,
            }
            self.update_status();
        }
    }

    fn update_status(&mut self) {
        let line = self.status_line();
        if line != self.last_status {
            crate::notify_systemd(&[sd_notify::NotifyState::Status(&line)]);
            self.last_status = line;
        }
    }

    fn status_line(&self) -> String {
        let apps = self.apps.values().filter(|a| matches!(a.config, Some(Ok(_)))).count();
        let live = self.workers.values().filter(|w| w.state == WorkerState::Live).count();
        let retired = self
            .workers
            .values()
            .filter(|w| matches!(w.state, WorkerState::Retired | WorkerState::Stopping))
            .count();
        format!("{apps} apps, {live} live workers, {retired} retired workers")
    }

    fn signal(&self, s: BusSignal) {
        let _ = self.deps.signals.send(s);
    }

    fn set_gen_state(&mut self, app: &AppName, g: u64, state: GenState) {
        let Some(gen_) = self.apps.get_mut(app).and_then(|a| a.generations.get_mut(&g)) else { return };
        if gen_.state == state {
            return;
        }
        if !gen_.state.can_become(state) {
            warn!(app = %app, generation = g, "unexpected transition {} -> {}", gen_.state, state);
        }
        gen_.state = state;
        if state == GenState::Retired {
            gen_.retired_at = Some(SystemTime::now());
        }
        info!(app = %app, generation = g, "{app}: generation {g} is {state}");
        self.persist();
        self.signal(BusSignal::GenerationStateChanged { app: app.to_string(), generation: g, state });
        if !state.is_running() {
            self.trim_history(app);
        }
    }

    /// Writes what reality cannot tell a restarted daemon: generation counters and the state of
    /// every running generation. A failure is logged: the daemon keeps serving, and adoption
    /// trusts reality (scopes, processes, rules) first anyway.
    fn persist(&mut self) {
        let mut apps: BTreeMap<String, state::AppRecord> = BTreeMap::new();
        for ((name, band), b) in &self.backoff {
            if let Some(last) = b.current() {
                apps.entry(name.to_string()).or_default().backoff_ms.insert(*band, last.as_millis() as u64);
            }
        }
        for (name, app) in &self.apps {
            if app.stopped {
                apps.entry(name.to_string()).or_default().stopped = true;
            }
            for (g, x) in app.generations.iter().filter(|(_, x)| x.state.is_running()) {
                apps.entry(name.to_string()).or_default().generations.insert(
                    *g,
                    GenRecord {
                        state: x.state.as_str().to_owned(),
                        started_usec: usec(x.started),
                        retired_usec: x.retired_at.map(usec),
                        workers: x.config.workers,
                        listen: x.config.listen.iter().map(ToString::to_string).collect(),
                    },
                );
            }
        }
        self.persisted.apps = apps;
        if let Err(e) = state::save(&self.deps.state_file, &self.persisted) {
            error!("cannot write {}: {e}", self.deps.state_file.display());
        }
    }

    /// Makes the kernel's rules match the live workers; says so when it had to change them.
    async fn reconcile(&mut self) {
        match self.deps.router.apply(&self.routes(None)).await {
            Ok(Applied::Changed) => {
                warn!(
                    "NAT rules did not match the live workers (flushed or changed by another tool?); repaired in one transaction"
                )
            }
            Ok(Applied::Unchanged) => {}
            Err(e) => error!("cannot check the NAT rules: {e}"),
        }
    }

    fn trim_history(&mut self, app: &AppName) {
        let Some(a) = self.apps.get_mut(app) else { return };
        let finished: Vec<u64> = a
            .generations
            .iter()
            .filter(|(_, g)| !g.state.is_running() && g.waiting.is_empty())
            .map(|(n, _)| *n)
            .collect();
        for n in finished.iter().take(finished.len().saturating_sub(HISTORY)) {
            a.generations.remove(n);
        }
    }

    // ---- configuration -------------------------------------------------------------------

    /// (Re)reads every app file. Invalid files are logged and kept as errors (Deploy answers
    /// InvalidConfig); the others are unaffected.
    fn load_configs(&mut self) {
        let dir = &self.deps.config_dir;
        let mut seen = BTreeSet::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e.flatten().collect::<Vec<_>>(),
            Err(e) => {
                warn!("cannot read {}: {e}", dir.display());
                Vec::new()
            }
        };
        for entry in entries {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else { continue };
            let file = path.display().to_string();
            let Ok(name) = AppName::new(stem) else {
                warn!("{file}: ignored: {}", AppName::new(stem).unwrap_err());
                continue;
            };
            let parsed = match std::fs::read_to_string(&path) {
                Ok(text) => AppConfig::parse(&file, stem, &text).map(Arc::new),
                Err(e) => {
                    Err(ConfigError { file: file.clone(), location: None, key: None, message: e.to_string() })
                }
            };
            if let Err(e) = &parsed {
                error!(app = %name, "invalid app file, skipped: {e}");
            }
            seen.insert(name.clone());
            self.apps.entry(name).or_default().config = Some(parsed);
        }
        for (name, app) in &mut self.apps {
            if !seen.contains(name) && app.config.is_some() {
                info!(app = %name, "app file removed; running generations keep running");
                app.config = None;
            }
        }
    }

    /// Generation numbers must never repeat: start above any scope systemd still has.
    async fn bump_counters_from_scopes(&mut self) {
        match self.deps.scopes.list().await {
            Ok(units) => {
                for unit in units {
                    if let Some((app, g)) = ipcluster_core::model::parse_scope_name(&unit) {
                        let last = self.persisted.last_generation.entry(app.to_string()).or_insert(0);
                        *last = (*last).max(g);
                    }
                }
            }
            Err(e) => warn!("cannot list scopes: {e}"),
        }
    }

    async fn autostart(&mut self) -> Vec<oneshot::Receiver<Result<u64, Error>>> {
        let names: Vec<AppName> = self
            .apps
            .iter()
            .filter(|(_, a)| {
                matches!(&a.config, Some(Ok(c)) if c.autostart) && a.live().is_none() && !a.stopped
            })
            .map(|(n, _)| n.clone())
            .collect();
        let mut pending = Vec::new();
        for name in names {
            let (tx, rx) = oneshot::channel();
            info!(app = %name, "{name}: autostart");
            self.deploy(name.as_str(), &Overrides::default(), tx).await;
            pending.push(rx);
        }
        pending
    }

    // ---- commands ------------------------------------------------------------------------

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::StatusLine(reply) => {
                let _ = reply.send(self.status_line());
            }
            Command::Apps(reply) => {
                let apps = self
                    .apps
                    .iter()
                    .filter(|(_, a)| matches!(a.config, Some(Ok(_))))
                    .map(|(n, _)| n.to_string())
                    .collect();
                let _ = reply.send(apps);
            }
            Command::Deploy { app, overrides, reply } => self.deploy(&app, &overrides, reply).await,
            Command::Retire { app, generation, reply } => self.retire(&app, generation, reply).await,
            Command::KillRetired { app, reply } => {
                let _ = reply.send(self.kill_retired(&app));
            }
            Command::ListWorkers { app, reply } => {
                let _ = reply.send(self.list_workers(&app));
            }
            Command::ListGenerations { app, reply } => {
                let _ = reply.send(self.list_generations(&app));
            }
            Command::StopApp { app, reply } => self.stop_app(&app, reply).await,
            Command::Reload { reply } => {
                self.load_configs();
                self.reconcile().await;
                let _ = self.autostart().await;
                info!("configuration reloaded");
                let _ = reply.send(Ok(()));
            }
        }
    }

    /// Resolves a caller's app name: malformed → InvalidArgs, unknown → NoSuchApp.
    fn app_name(&self, app: &str) -> Result<AppName, Error> {
        let name = AppName::new(app).map_err(|e| Error::InvalidArgs(e.to_string()))?;
        if !self.apps.contains_key(&name) {
            return Err(Error::NoSuchApp(format!(
                "no app \"{name}\" (no file {}/{name}.toml)",
                self.deps.config_dir.display()
            )));
        }
        Ok(name)
    }

    fn apps_matching(&self, app: &str) -> Result<Vec<AppName>, Error> {
        if app.is_empty() { Ok(self.apps.keys().cloned().collect()) } else { Ok(vec![self.app_name(app)?]) }
    }

    async fn deploy(&mut self, app: &str, overrides: &Overrides, reply: Reply<u64>) {
        match self.start_generation(app, overrides).await {
            Ok((name, g)) => {
                if let Some(gen_) = self.apps.get_mut(&name).and_then(|a| a.generations.get_mut(&g)) {
                    gen_.waiting.push(reply);
                }
                // Workers that are ready at once may already have reported.
                self.check_ready(&name, g).await;
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Steps 1–2 of a deploy. On error nothing is left behind: no generation, no process, no scope.
    async fn start_generation(&mut self, app: &str, overrides: &Overrides) -> Result<(AppName, u64), Error> {
        let name = self.app_name(app)?;
        let a = &self.apps[&name];
        let config = match &a.config {
            Some(Ok(c)) => c.clone(),
            Some(Err(e)) => return Err(Error::InvalidConfig(e.to_string())),
            None => return Err(Error::NoSuchApp(format!("the app file of \"{name}\" was removed"))),
        };
        if let Some(g) = a.deploying() {
            return Err(Error::Busy(format!("{name} is already deploying generation {g}")));
        }
        let config =
            Arc::new(config.with_overrides(overrides).map_err(|e| Error::InvalidArgs(e.to_string()))?);
        let launch = self.launch_context(&config)?;
        let ports = self.allocate_ports(&config, config.workers as usize)?;

        let g = self.persisted.last_generation.get(name.as_str()).copied().unwrap_or(0) + 1;
        self.persisted.last_generation.insert(name.to_string(), g);
        // Remember the generation as starting before any process exists: a daemon killed from
        // here on finds it on restart and cleans it up.
        self.persisted.apps.entry(name.to_string()).or_default().generations.insert(
            g,
            GenRecord {
                state: GenState::Starting.as_str().to_owned(),
                started_usec: usec(SystemTime::now()),
                retired_usec: None,
                workers: config.workers,
                listen: config.listen.iter().map(ToString::to_string).collect(),
            },
        );
        if let Err(e) = state::save(&self.deps.state_file, &self.persisted) {
            // Numbers must never repeat: refuse rather than risk it.
            return Err(Error::DeployFailed(format!("cannot persist the generation counter: {e}")));
        }
        let scope = scope_name(&name, g);

        // Fork every band's launcher, held at its gate; with spawn_interval only the first band
        // now, the others one by one into the scope later.
        let paced = !config.spawn_interval.is_zero();
        let mut ports = ports.into_iter();
        let first = if paced { 1 } else { config.workers };
        let mut gated = Vec::new();
        for (band, my_ports) in (0..first).zip(ports.by_ref()) {
            match spawn_band(&config, g, band, &my_ports, &launch) {
                Ok(p) => gated.push((band, my_ports, p)),
                // Dropping `gated` closes every gate: the launchers exit without running anything.
                Err(e) => {
                    self.persist();
                    return Err(Error::DeployFailed(format!("band {band}: cannot start: {e}")));
                }
            }
        }
        let spec = ScopeSpec {
            unit: scope.clone(),
            slice: slice_name(&name),
            description: format!("ipcluster {name} generation {g}"),
            pids: gated.iter().map(|(_, _, p)| p.pid).collect(),
            kill_signal: config.stop_signal.number(),
            stop_timeout: config.stop_timeout,
        };
        if let Err(e) = self.deps.scopes.start(&spec).await {
            self.persist();
            return Err(Error::DeployFailed(format!("cannot create scope {scope}: {e}")));
        }

        let now = SystemTime::now();
        self.apps.get_mut(&name).expect("checked above").generations.insert(
            g,
            Generation {
                state: GenState::Starting,
                config: config.clone(),
                started: now,
                retired_at: None,
                scope: scope.clone(),
                waiting: vec![],
                failure: None,
            },
        );
        self.signal(BusSignal::GenerationStateChanged {
            app: name.to_string(),
            generation: g,
            state: GenState::Starting,
        });
        info!(app = %name, generation = g, "{name}: deploying generation {g} ({} workers) in {scope}", config.workers);

        let mut release_error = None;
        for (band, my_ports, p) in gated {
            if let Err(e) = self.release_worker(&name, g, band, my_ports, p, config.ready == Ready::Tcp) {
                release_error = Some(e);
            }
        }
        let rest: Vec<_> = (first..config.workers).zip(ports).map(|(band, ports)| (band, ports, g)).collect();
        if !rest.is_empty() {
            self.apps.get_mut(&name).expect("checked above").pending_release.extend(rest);
            let tx = self.events_tx.clone();
            let (app2, interval) = (name.clone(), config.spawn_interval);
            tokio::spawn(async move {
                tokio::time::sleep(interval).await;
                let _ = tx.send(Event::ReleaseNext { app: app2, generation: g });
            });
        }
        let tx = self.events_tx.clone();
        // Every band gets ready_timeout from its own start.
        let timeout = config.ready_timeout + config.spawn_interval * config.workers.saturating_sub(1);
        let app2 = name.clone();
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let _ = tx.send(Event::ReadyTimeout { app: app2, generation: g });
        });
        if let Some(reason) = release_error {
            self.fail(&name, g, reason);
        }
        Ok((name, g))
    }

    /// Lets a held launcher run and starts watching it (and probing it, for `ready = "tcp"`).
    fn release_worker(
        &mut self,
        app: &AppName,
        g: u64,
        band: u32,
        ports: Vec<(SocketAddrV4, u16)>,
        gated: process::Gated,
        probe: bool,
    ) -> Result<u64, String> {
        let pid = gated.pid;
        let pidfd = gated.release().map_err(|e| format!("band {band}: cannot start: {e}"))?;
        let id = self.add_worker(app, g, band, pid, ports, pidfd, SystemTime::now());
        if probe {
            self.start_probe(id);
        }
        Ok(id)
    }

    /// Who workers run as and where they notify: resolved once per generation.
    fn launch_context(&self, config: &AppConfig) -> Result<Launch, Error> {
        let user = match &config.user {
            Some(u) => Some(process::lookup_user(u).map_err(Error::InvalidConfig)?),
            None => None,
        };
        let notify_socket = match config.ready {
            Ready::Notify => Some(
                self.notify_path
                    .as_ref()
                    .ok_or_else(|| {
                        Error::DeployFailed(
                            "ready = \"notify\" but the notify socket is not available".into(),
                        )
                    })?
                    .display()
                    .to_string(),
            ),
            Ready::Tcp => None,
        };
        Ok(Launch { user, notify_socket, launcher: self.deps.launcher.clone() })
    }

    /// Worker ports for `workers` workers: distinct from every port a worker of any app holds,
    /// and free on the host. One list per worker, in `listen` order.
    fn allocate_ports(
        &mut self,
        config: &AppConfig,
        workers: usize,
    ) -> Result<Vec<Vec<(SocketAddrV4, u16)>>, Error> {
        let held: BTreeSet<u16> = self.workers.values().flat_map(|w| w.ports.iter().map(|p| p.1)).collect();
        let per = config.listen.len();
        let ports =
            self.ports.allocate(config.port_range, workers * per, &held, port_is_free).ok_or_else(|| {
                Error::DeployFailed(format!(
                    "not enough free ports in {}-{} for {workers} workers",
                    config.port_range.0, config.port_range.1
                ))
            })?;
        Ok(ports
            .chunks(per)
            .map(|c| config.listen.iter().copied().zip(c.iter().copied()).collect())
            .collect())
    }

    #[allow(clippy::too_many_arguments, reason = "one worker's identity, gathered in one place")]
    fn add_worker(
        &mut self,
        app: &AppName,
        generation: u64,
        band: u32,
        pid: u32,
        ports: Vec<(SocketAddrV4, u16)>,
        pidfd: OwnedFd,
        started: SystemTime,
    ) -> u64 {
        let id = self.next_worker;
        self.next_worker += 1;
        // The kernel's start time, so ListWorkers says the same before and after a restart.
        let started = process::start_time_usec(pid)
            .map_or(started, |us| SystemTime::UNIX_EPOCH + Duration::from_micros(us));
        let pidfd = Arc::new(pidfd);
        let tx = self.events_tx.clone();
        let fd = pidfd.clone();
        tokio::spawn(async move {
            let exit = process::wait_exit(fd).await;
            let _ = tx.send(Event::Exited { id, exit });
        });
        self.workers.insert(
            id,
            Worker {
                app: app.clone(),
                generation,
                band,
                pid,
                ports,
                state: WorkerState::Starting,
                started,
                pidfd,
                ready: false,
                probe: None,
                sample: crate::sampler::Sample::default(),
                last_ping: std::time::Instant::now(),
                stop_reason: None,
                replaces: None,
                reap_queued: false,
                retired_at: None,
                listeners: Vec::new(),
            },
        );
        id
    }

    /// TCP readiness: connect to 127.0.0.1:<port> for each of the worker's ports until all accept.
    fn start_probe(&mut self, id: u64) {
        let Some(w) = self.workers.get_mut(&id) else { return };
        let ports: Vec<u16> = w.ports.iter().map(|p| p.1).collect();
        let tx = self.events_tx.clone();
        let task = tokio::spawn(async move {
            let mut pending = ports;
            loop {
                let mut still = Vec::new();
                for p in pending {
                    if tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, p)).await.is_err() {
                        still.push(p);
                    }
                }
                if still.is_empty() {
                    let _ = tx.send(Event::Ready { id });
                    return;
                }
                pending = still;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        w.probe = Some(task.abort_handle());
    }

    async fn retire(&mut self, app: &str, generation: u64, reply: Reply<()>) {
        let name = match self.app_name(app) {
            Ok(n) => n,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let state = self.apps[&name].generations.get(&generation).map(|g| g.state);
        match state {
            None => {
                let _ = reply
                    .send(Err(Error::NoSuchGeneration(format!("{name} has no generation {generation}"))));
            }
            Some(GenState::Starting) => {
                let _ = reply
                    .send(Err(Error::Busy(format!("{name} generation {generation} is still deploying"))));
            }
            Some(GenState::Retired | GenState::Stopped | GenState::Failed) => {
                let _ = reply.send(Ok(()));
            }
            Some(GenState::Live) => {
                // A band is never left without a worker on purpose: deploy a replacement from the
                // current config; its cutover retires this generation.
                let (tx, rx) = oneshot::channel();
                self.deploy(name.as_str(), &Overrides::default(), tx).await;
                tokio::spawn(async move {
                    let result = match rx.await {
                        Ok(r) => r.map(|_| ()),
                        Err(_) => Err(Error::Gone),
                    };
                    let _ = reply.send(result);
                });
            }
        }
    }

    /// Stops every generation of `app` and removes its rules; it stays stopped (across daemon
    /// restarts too) until the next Deploy. Answers once every scope is gone.
    async fn stop_app(&mut self, app: &str, reply: Reply<()>) {
        let name = match self.app_name(app) {
            Ok(n) => n,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        if let Some(g) = self.apps[&name].deploying() {
            let _ = reply.send(Err(Error::Busy(format!("{name} is deploying generation {g}"))));
            return;
        }
        self.apps.get_mut(&name).expect("checked").stopped = true;
        self.persist();
        // Rules first: from now on nothing new reaches the app.
        self.reconcile().await;
        for w in self.workers.values_mut().filter(|w| w.app == name) {
            w.state = WorkerState::Stopping;
            if let Some(p) = w.probe.take() {
                p.abort();
            }
        }
        let scopes: Vec<String> = self.apps[&name]
            .generations
            .values()
            .filter(|g| g.state.is_running())
            .map(|g| g.scope.clone())
            .collect();
        info!(app = %name, "{name}: stopping the app ({} generations)", scopes.len());
        let systemd = self.deps.scopes.clone();
        tokio::spawn(async move {
            let mut errors = Vec::new();
            for scope in scopes {
                if let Err(e) = systemd.stop(&scope).await {
                    errors.push(e.to_string());
                }
            }
            let _ = reply.send(if errors.is_empty() {
                Ok(())
            } else {
                Err(Error::StopFailed(errors.join("; ")))
            });
        });
    }

    fn kill_retired(&mut self, app: &str) -> Result<u32, Error> {
        let apps = self.apps_matching(app)?;
        let ids: Vec<u64> = self
            .workers
            .iter()
            .filter(|(_, w)| w.state == WorkerState::Retired && !w.reap_queued && apps.contains(&w.app))
            .map(|(id, _)| *id)
            .collect();
        for id in &ids {
            self.queue_reap(*id, "reaped");
        }
        if !ids.is_empty() {
            info!(
                app = app,
                "stopping {} retired workers of {}",
                ids.len(),
                if app.is_empty() { "all apps" } else { app }
            );
        }
        Ok(ids.len() as u32)
    }

    /// Sends the worker its stop signal, and SIGKILL after `stop_timeout` if it is still there.
    fn stop_worker(&mut self, id: u64, reason: &'static str) {
        let Some(w) = self.workers.get_mut(&id) else { return };
        if w.state == WorkerState::Stopping {
            return;
        }
        w.stop_reason = w.stop_reason.or(Some(reason));
        let Some(config) =
            self.apps.get(&w.app).and_then(|a| a.generations.get(&w.generation)).map(|g| g.config.clone())
        else {
            return;
        };
        w.state = WorkerState::Stopping;
        if let Err(e) = process::signal(&w.pidfd, config.stop_signal.number()) {
            warn!(app = %w.app, pid = w.pid, "cannot send {}: {e}", config.stop_signal);
        }
        let tx = self.events_tx.clone();
        let timeout = config.stop_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let _ = tx.send(Event::StopTimeout { id });
        });
    }

    fn list_workers(&self, app: &str) -> Result<Vec<WorkerInfo>, Error> {
        let apps = self.apps_matching(app)?;
        Ok(self
            .workers
            .values()
            .filter(|w| apps.contains(&w.app))
            .map(|w| {
                // The last sample; a worker younger than one round is read now.
                let (rss, cpu_usec) = if w.sample.rss > 0 {
                    (w.sample.rss, w.sample.cpu_usec)
                } else {
                    process::usage_of_tree(w.pid)
                };
                WorkerInfo {
                    app: w.app.to_string(),
                    generation: w.generation,
                    band: w.band,
                    pid: w.pid,
                    state: w.state,
                    ports: w.ports.iter().map(|(public, port)| (public.port(), *port)).collect(),
                    rss,
                    cpu_usec,
                    start_usec: usec(w.started),
                    nice: process::nice_of(w.pid).unwrap_or(0),
                    scope: scope_name(&w.app, w.generation),
                }
            })
            .collect())
    }

    fn list_generations(&self, app: &str) -> Result<Vec<GenerationInfo>, Error> {
        let apps = self.apps_matching(app)?;
        let mut out = Vec::new();
        for name in apps {
            for (n, g) in &self.apps[&name].generations {
                out.push(GenerationInfo {
                    app: name.to_string(),
                    generation: *n,
                    state: g.state,
                    workers: self.workers.values().filter(|w| w.app == name && w.generation == *n).count()
                        as u32,
                    start_usec: usec(g.started),
                    scope: g.scope.clone(),
                });
            }
        }
        Ok(out)
    }

    // ---- events --------------------------------------------------------------------------

    async fn event(&mut self, ev: Event) {
        match ev {
            Event::Ready { id } => self.worker_ready(id).await,
            Event::Notify { pid, message } => {
                if message.watchdog || message.ready {
                    let now = std::time::Instant::now();
                    for w in self.workers.values_mut().filter(|w| w.pid == pid) {
                        w.last_ping = now;
                    }
                }
                if message.ready {
                    let id = self.workers.iter().find(|(_, w)| w.pid == pid).map(|(id, _)| *id);
                    let id = id.or_else(|| {
                        // A helper process of the worker may speak for it: find the worker
                        // whose process tree holds the sender.
                        self.workers
                            .iter()
                            .find(|(_, w)| process::process_tree(w.pid).contains(&pid))
                            .map(|(id, _)| *id)
                    });
                    match id {
                        Some(id) => self.worker_ready(id).await,
                        None => warn!(pid, "READY=1 from a process that is not a worker; ignored"),
                    }
                }
            }
            Event::Exited { id, exit } => self.worker_exited(id, exit).await,
            Event::ReadyTimeout { app, generation } => {
                let Some(g) = self.apps.get(&app).and_then(|a| a.generations.get(&generation)) else {
                    return;
                };
                if g.state != GenState::Starting {
                    return;
                }
                let timeout = g.config.ready_timeout;
                let band = self
                    .workers
                    .values()
                    .filter(|w| w.app == app && w.generation == generation && !w.ready)
                    .map(|w| w.band)
                    .min();
                let reason = match band {
                    Some(b) => format!("band {b}: not ready after {timeout:?}"),
                    None => format!("not ready after {timeout:?}"),
                };
                self.fail(&app, generation, reason);
            }
            Event::StopTimeout { id } => {
                if let Some(w) = self.workers.get(&id).filter(|w| w.state == WorkerState::Stopping) {
                    warn!(app = %w.app, generation = w.generation, band = w.band, pid = w.pid, "{}: pid {} still running after stop_timeout; sending SIGKILL", w.app, w.pid);
                    let _ = process::signal(&w.pidfd, libc::SIGKILL);
                }
            }
            Event::Respawn { app, generation, band } => self.respawn(app, generation, band).await,
            Event::Samples(samples) => self.apply_samples(samples).await,
            Event::ReapNext { app } => self.reap_next(&app),
            Event::ReleaseNext { app, generation } => self.release_next(&app, generation).await,
            Event::RespawnTimeout { id } => {
                if let Some(w) =
                    self.workers.get(&id).filter(|w| w.state == WorkerState::Starting && !w.ready)
                {
                    let live = self
                        .apps
                        .get(&w.app)
                        .and_then(|a| a.generations.get(&w.generation))
                        .is_some_and(|g| g.state == GenState::Live);
                    if live {
                        warn!(app = %w.app, band = w.band, pid = w.pid, "{}: respawned worker of band {} not ready in time; killing it", w.app, w.band);
                        let _ = process::signal(&w.pidfd, libc::SIGKILL);
                    }
                }
            }
            Event::ScopeStopped { app, generation, error } => {
                let Some(g) = self.apps.get_mut(&app).and_then(|a| a.generations.get_mut(&generation)) else {
                    return;
                };
                let mut reason = g.failure.clone().unwrap_or_else(|| "failed".into());
                if let Some(e) = error {
                    reason.push_str(&format!(" (and stopping its scope failed: {e})"));
                }
                let msg =
                    format!("{app} generation {generation}: {reason}; the previous generation keeps serving");
                let waiting: Vec<_> = g.waiting.drain(..).collect();
                // The scope is gone, so are its processes: forget them now rather than when
                // their exits are read, so no caller sees a worker of a failed generation after
                // DeployFailed. (Their watchers still reap them.)
                let gone: Vec<u64> = self
                    .workers
                    .iter()
                    .filter(|(_, w)| w.app == app && w.generation == generation)
                    .map(|(id, _)| *id)
                    .collect();
                for id in gone {
                    if let Some(w) = self.workers.remove(&id) {
                        self.signal(BusSignal::WorkerExited {
                            app: app.to_string(),
                            generation,
                            band: w.band,
                            pid: w.pid,
                            reason: "stopped (deploy failed)".into(),
                        });
                    }
                }
                for r in waiting {
                    let _ = r.send(Err(Error::DeployFailed(msg.clone())));
                }
                self.trim_history(&app);
            }
        }
    }

    async fn worker_ready(&mut self, id: u64) {
        let Some(w) = self.workers.get_mut(&id) else { return };
        if w.ready {
            return;
        }
        w.ready = true;
        w.last_ping = std::time::Instant::now();
        let ports: Vec<u16> = w.ports.iter().map(|p| p.1).collect();
        w.listeners = process::grab_listeners(w.pid, &ports);
        let (app, g) = (w.app.clone(), w.generation);
        let ready = BusSignal::WorkerReady { app: app.to_string(), generation: g, band: w.band, pid: w.pid };
        self.signal(ready);
        let live_gen = self
            .apps
            .get(&app)
            .and_then(|a| a.generations.get(&g))
            .is_some_and(|x| x.state == GenState::Live);
        if live_gen {
            self.respawned_ready(id).await;
        } else {
            self.check_ready(&app, g).await;
        }
    }

    /// When every band of a starting generation is ready: cutover.
    async fn check_ready(&mut self, app: &AppName, g: u64) {
        let Some(gen_) = self.apps.get(app).and_then(|a| a.generations.get(&g)) else { return };
        if gen_.state != GenState::Starting {
            return;
        }
        let bands = gen_.config.workers as usize;
        let ready = self.workers.values().filter(|w| &w.app == app && w.generation == g && w.ready).count();
        if ready == bands {
            self.cutover(app, g).await;
        }
    }

    /// Step 4–5: one transaction switches every band to generation `g`; the previous live
    /// generation is retired.
    async fn cutover(&mut self, app: &AppName, g: u64) {
        let previous: Vec<u64> = self.apps[app]
            .generations
            .iter()
            .filter(|(n, x)| **n != g && x.state == GenState::Live)
            .map(|(n, _)| *n)
            .collect();
        for w in self.workers.values_mut().filter(|w| &w.app == app && w.generation == g) {
            w.state = WorkerState::Live;
        }
        let routes = self.routes(Some((app, g)));
        let started = std::time::Instant::now();
        match self.deps.router.apply(&routes).await {
            Ok(_) => {}
            Err(e) => {
                for w in self.workers.values_mut().filter(|w| &w.app == app && w.generation == g) {
                    w.state = WorkerState::Starting;
                }
                self.fail(app, g, format!("cutover failed: {e}"));
                return;
            }
        }
        info!(app = %app, generation = g, "{app}: cutover to generation {g} in {} ms", started.elapsed().as_millis());
        if let Some(a) = self.apps.get_mut(app) {
            a.stopped = false;
        }
        self.set_gen_state(app, g, GenState::Live);
        for p in previous {
            self.retire_generation(app, p);
        }
        if let Some(gen_) = self.apps.get_mut(app).and_then(|a| a.generations.get_mut(&g)) {
            for r in gen_.waiting.drain(..) {
                let _ = r.send(Ok(g));
            }
        }
    }

    /// Retires every worker of a generation: renice (every thread), `retire_signal`.
    fn retire_generation(&mut self, app: &AppName, g: u64) {
        let Some(config) = self.apps.get(app).and_then(|a| a.generations.get(&g)).map(|x| x.config.clone())
        else {
            return;
        };
        for w in self.workers.values_mut().filter(|w| &w.app == app && w.generation == g) {
            if w.state != WorkerState::Live {
                continue;
            }
            w.state = WorkerState::Retired;
            if let Err(e) = process::renice_tree(w.pid, self.base_nice + config.retire_nice) {
                warn!(app = %app, generation = g, pid = w.pid, "cannot renice: {e}");
            }
            if let Some(sig) = config.retire_signal
                && let Err(e) = process::signal(&w.pidfd, sig.number())
            {
                warn!(app = %app, generation = g, pid = w.pid, "cannot send {sig}: {e}");
            }
        }
        let empty = !self.workers.values().any(|w| &w.app == app && w.generation == g);
        self.set_gen_state(app, g, GenState::Retired);
        // Retired generations yield the CPU to the live one.
        if let Some(scope) = self.apps.get(app).and_then(|a| a.generations.get(&g)).map(|x| x.scope.clone()) {
            let scopes = self.deps.scopes.clone();
            tokio::spawn(async move {
                if let Err(e) = scopes.set_cpu_weight(&scope, RETIRED_CPU_WEIGHT).await {
                    warn!("cannot lower the CPU weight of {scope}: {e}");
                }
            });
        }
        if empty {
            self.set_gen_state(app, g, GenState::Stopped);
        }
    }

    /// A starting generation failed: stop its scope; answer the callers once it is gone.
    fn fail(&mut self, app: &AppName, g: u64, reason: String) {
        let Some(gen_) = self.apps.get_mut(app).and_then(|a| a.generations.get_mut(&g)) else { return };
        if gen_.state != GenState::Starting {
            return;
        }
        warn!(app = %app, generation = g, "{app}: deploy of generation {g} failed: {reason}");
        gen_.failure = Some(reason);
        let scope = gen_.scope.clone();
        self.set_gen_state(app, g, GenState::Failed);
        for w in self.workers.values_mut().filter(|w| &w.app == app && w.generation == g) {
            if let Some(p) = w.probe.take() {
                p.abort();
            }
            w.state = WorkerState::Stopping;
        }
        let scopes = self.deps.scopes.clone();
        let tx = self.events_tx.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let error = scopes.stop(&scope).await.err().map(|e| e.to_string());
            let _ = tx.send(Event::ScopeStopped { app, generation: g, error });
        });
    }

    async fn worker_exited(&mut self, id: u64, exit: Exit) {
        let Some(w) = self.workers.remove(&id) else { return };
        if let Some(p) = &w.probe {
            p.abort();
        }
        let reason = match (w.stop_reason, w.state) {
            (Some(why), _) => format!("{why} ({exit})"),
            (None, WorkerState::Stopping) => format!("reaped ({exit})"),
            (None, _) => exit.to_string(),
        };
        info!(app = %w.app, generation = w.generation, band = w.band, pid = w.pid, "{}: generation {} band {} pid {} ({}): {reason}", w.app, w.generation, w.band, w.pid, w.state);
        self.signal(BusSignal::WorkerExited {
            app: w.app.to_string(),
            generation: w.generation,
            band: w.band,
            pid: w.pid,
            reason: reason.clone(),
        });
        let gen_state = self.apps.get(&w.app).and_then(|a| a.generations.get(&w.generation)).map(|g| g.state);
        let remaining = self.workers.values().any(|x| x.app == w.app && x.generation == w.generation);
        match gen_state {
            Some(GenState::Starting) => {
                let why = match exit {
                    Exit::Code(c) => format!("band {}: exited with status {c} before it was ready", w.band),
                    Exit::Signal(s) => format!(
                        "band {}: killed by signal {} before it was ready",
                        w.band,
                        ipcluster_core::units::Signal::describe(s)
                    ),
                    Exit::Unknown => format!("band {}: exited before it was ready", w.band),
                };
                self.fail(&w.app, w.generation, why);
            }
            Some(GenState::Live) if matches!(w.state, WorkerState::Live | WorkerState::Starting) => {
                // Until a replacement is ready, the band's new connections go to a neighbour.
                if w.state == WorkerState::Live {
                    warn!(app = %w.app, generation = w.generation, band = w.band, "{}: live worker of band {} gone; the band falls back to a neighbour", w.app, w.band);
                    self.reconcile().await;
                }
                self.drain_orphans(&w);
                let up_for = if w.state == WorkerState::Live {
                    SystemTime::now().duration_since(w.started).unwrap_or_default()
                } else {
                    Duration::ZERO
                };
                self.schedule_respawn(&w.app, w.generation, w.band, up_for);
            }
            Some(GenState::Retired | GenState::Live) if !remaining => {
                self.set_gen_state(&w.app, w.generation, GenState::Stopped);
            }
            _ => {}
        }
    }

    /// Hands a crashed live worker's listening sockets to [`crate::orphan::drain`], relaying to
    /// the worker the rules now send its band to.
    fn drain_orphans(&self, w: &Worker) {
        if w.listeners.is_empty() {
            return;
        }
        let routes = self.routes(None);
        let Some(route) = routes.iter().find(|r| r.app == w.app) else { return };
        let Some(ports) = route.bands.get(w.band as usize) else { return };
        for (port, fd) in &w.listeners {
            let Some(i) = w.ports.iter().position(|p| p.1 == *port) else { continue };
            let Some(target) = ports.get(i) else { continue };
            let Ok(dup) = fd.try_clone() else { continue };
            crate::orphan::drain(
                w.app.to_string(),
                *port,
                dup,
                SocketAddrV4::new(Ipv4Addr::LOCALHOST, *target),
            );
        }
    }

    /// The routes of every app with a live generation (plus `extra`, a generation about to go
    /// live). A band without a live worker borrows the next band's that has one: stickiness
    /// yields to availability.
    fn routes(&self, extra: Option<(&AppName, u64)>) -> Vec<AppRoute> {
        let mut out = Vec::new();
        for (name, app) in &self.apps {
            if app.stopped && extra.is_none_or(|(a, _)| a != name) {
                continue;
            }
            let g = match extra {
                Some((a, g)) if a == name => Some(g),
                _ => app.live(),
            };
            let Some(g) = g else { continue };
            let Some(gen_) = app.generations.get(&g) else { continue };
            let n = gen_.config.workers as usize;
            let mut by_band: Vec<Option<Vec<u16>>> = vec![None; n];
            for w in self
                .workers
                .values()
                .filter(|w| &w.app == name && w.generation == g && w.state == WorkerState::Live)
            {
                if let Some(slot) = by_band.get_mut(w.band as usize) {
                    *slot = Some(w.ports.iter().map(|p| p.1).collect());
                }
            }
            if by_band.iter().all(Option::is_none) {
                continue;
            }
            let bands = (0..n)
                .map(|b| (0..n).find_map(|k| by_band[(b + k) % n].clone()).unwrap_or_default())
                .collect();
            out.push(AppRoute { app: name.clone(), listen: gen_.config.listen.clone(), bands });
        }
        out
    }
}

/// Who a generation's workers run as and where they send notifications.
#[derive(Debug, Clone)]
struct Launch {
    user: Option<(u32, u32)>,
    notify_socket: Option<String>,
    launcher: PathBuf,
}

/// Forks the launcher of one worker, held at its gate.
fn spawn_band(
    config: &AppConfig,
    generation: u64,
    band: u32,
    ports: &[(SocketAddrV4, u16)],
    launch: &Launch,
) -> std::io::Result<process::Gated> {
    let identity = WorkerIdentity {
        app: config.name.clone(),
        generation,
        band,
        bands: config.workers,
        ports: ports.to_vec(),
    };
    process::spawn_gated(&SpawnSpec {
        argv: config.command.clone(),
        env: identity.environment(config, launch.notify_socket.as_deref()),
        cwd: config.working_directory.clone(),
        user: launch.user,
        identifier: config.name.to_string(),
        unit: scope_name(&config.name, generation),
        launcher: launch.launcher.clone(),
    })
}

/// Whether no other program holds `port` (a worker must be able to bind it).
fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok()
}
