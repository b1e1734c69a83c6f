//! The one task that owns all state: apps, generations and workers (see docs/ARCHITECTURE.md).
//!
//! Inputs arrive as messages: [`Command`]s from the D-Bus adapter and the signal handlers (each
//! with its reply channel) and [`Event`]s from small helper tasks (process exits, readiness
//! probes, notify datagrams, timers, background jobs, samples). The supervisor decides with the
//! pure rules of [`ipcluster_core`] and acts through narrow traits: [`Scopes`] (systemd),
//! [`Router`] (netfilter), [`Processes`] (fork, pidfds, /proc) and a [`Clock`].
//!
//! A deploy, step by step ([`deploy`]):
//! 1. allocate generation `g` (saved first, so numbers never repeat) and worker ports;
//! 2. fork one launcher per band, held at its gate; create `ipcluster-<app>-<g>.scope` around
//!    them; release them;
//! 3. wait for every band to be ready (TCP probe or `READY=1`), or fail on the first exit or at
//!    `ready_timeout`: then stop the scope, and only once it is gone answer `DeployFailed`;
//! 4. cutover: one router transaction points every band at the new workers; only once it is
//!    applied are they marked live;
//! 5. retire the previous live generation (renice every thread, `retire_signal`), answer `g`.
//!
//! Around that: [`adopt`] takes over the generations a previous daemon left running, [`workers`]
//! follows each worker from spawn to exit, [`respawn`] replaces crashed or unhealthy live workers,
//! [`retire`] stops what is no longer wanted, [`health`] samples and applies the memory and
//! watchdog policies, and the rules are reconciled with the live workers every
//! [`RECONCILE_EVERY`] (another tool may have flushed them).
//!
//! Rules that keep this readable:
//! - every state change of a generation goes through [`Supervisor::enter`] (log, save, signal);
//! - every delay is a [`timers`] timer, cancelled when its subject changes;
//! - scope calls the next step depends on (start, attach) are awaited inline; the others (stop,
//!   CPU weight) run in the background and report back as [`Event::ScopeJob`];
//! - every command is answered by the supervisor itself: at once, or from the event that
//!   completes it (a cutover, a failure, the last scope stopped), never from a spawned task.

mod adopt;
mod api;
mod apps;
mod deploy;
mod health;
mod model;
mod respawn;
mod retire;
mod rollback;
mod sockets;
#[cfg(test)]
mod tests;
mod timers;
mod workers;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

pub use api::{
    BusSignal, CUTOVER_BUCKETS, Command, Error, GenerationInfo, Handle, Histogram, Mailbox, Metrics,
    PolicyAction, Reply, Snapshot, WorkerInfo, channel,
};
use ipcluster_core::{
    model::GenState,
    name::AppName,
    policy::Backoff,
    ports::PortAllocator,
    saved::{SavedGeneration, SavedState, SavedWorker},
};
use model::{Model, WorkerId};
use timers::{TimerKey, Timers};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::{
    clock::{Clock, usec},
    netfilter::{Applied, Router},
    notify,
    process::Exit,
    processes::Processes,
    sampler::Sample,
    scopes::Scopes,
    state,
    steering::Steer,
};

/// What the supervisor needs from outside.
#[derive(Debug)]
pub struct Deps<S, R, P, T> {
    pub scopes: S,
    pub router: R,
    pub processes: P,
    /// Socket mode's kernel side.
    pub steer: T,
    pub clock: Arc<dyn Clock>,
    pub config_dir: PathBuf,
    pub state_file: PathBuf,
    /// Datagrams of the workers' notify socket, from processes in our scopes.
    pub notify: Option<mpsc::Receiver<notify::Notification>>,
    /// The notify socket's path, for workers' `NOTIFY_SOCKET` (`None`: not available).
    pub notify_socket: Option<PathBuf>,
    pub signals: mpsc::UnboundedSender<BusSignal>,
    /// How often workers are sampled and the memory and watchdog policies run.
    pub sample_interval: Duration,
    /// The ipclusterd binary workers are launched through (`/proc/self/exe` in the daemon,
    /// which stays valid even after the file is replaced by an upgrade).
    pub launcher: PathBuf,
}

/// A background scope call that came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopeJob {
    Stop,
    /// Sets `CPUWeight=` (retired generations yield the CPU; a generation live again gets the
    /// default back).
    CpuWeight(u64),
}

/// Something that happened, reported by a helper task.
#[derive(Debug)]
pub enum Event {
    /// A worker's process ended.
    Exited { id: WorkerId, exit: Exit },
    /// A worker's TCP probe succeeded.
    Ready { id: WorkerId },
    /// A datagram on the notify socket.
    Notify(notify::Notification),
    /// A timer fired (see [`timers`]).
    Timer { key: TimerKey, token: u64 },
    /// A background scope call finished.
    ScopeJob { app: AppName, generation: u64, job: ScopeJob, result: Result<(), String> },
    /// A sampling round finished: samples, and connections where they were asked for.
    Samples { samples: Vec<(WorkerId, Sample)>, connections: Vec<(WorkerId, u32)> },
}

/// Finished generations kept for ListGenerations, per app.
const HISTORY: usize = 16;
/// `CPUWeight=` of retired generations' scopes.
pub const RETIRED_CPU_WEIGHT: u64 = 10;
/// systemd's default `CPUWeight=`, given back to a generation that is live again.
pub const DEFAULT_CPU_WEIGHT: u64 = 100;
/// How often the rules are compared with the live workers (and repaired).
pub const RECONCILE_EVERY: Duration = Duration::from_secs(2);

/// Owner of all state.
#[derive(Debug)]
pub struct Supervisor<S, R, P: Processes, T: Steer> {
    deps: Deps<S, R, P, T>,
    commands: mpsc::Receiver<Command>,
    events_tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
    m: Model<P::Handle>,
    timers: Timers,
    ports: PortAllocator,
    saved: SavedState,
    last_status: String,
    /// Nice value workers start with (the daemon's own); retired ones get this + `retire_nice`.
    base_nice: i32,
    /// Respawn delays of crashing bands.
    backoff: BTreeMap<(AppName, u32), Backoff>,
    /// Origin of the rate limiters' clock.
    started: tokio::time::Instant,
    /// Where the snapshot for readers is published.
    snapshot: tokio::sync::watch::Sender<Option<Arc<api::Snapshot>>>,
    /// Answers of this turn: they leave after the snapshot that shows their effect.
    outbox: Outbox,
    /// Counters for /metrics.
    metrics: api::Metrics,
    /// Socket mode's groups and tables.
    groups: sockets::Groups<T>,
}

/// Answers waiting for the end of the supervisor's turn.
#[derive(Default)]
struct Outbox(Vec<Box<dyn FnOnce() + Send>>);

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Outbox({} answers)", self.0.len())
    }
}

impl<S: Scopes + Clone + 'static, R: Router + 'static, P: Processes, T: Steer> Supervisor<S, R, P, T> {
    /// A supervisor serving `mailbox` with `deps`.
    pub fn new(mailbox: api::Mailbox, deps: Deps<S, R, P, T>) -> Self {
        let api::Mailbox { commands, snapshot } = mailbox;
        let (events_tx, events) = mpsc::unbounded_channel();
        let saved = state::load(&deps.state_file).unwrap_or_else(|e| {
            warn!("state file {}: {e}; rebuilding from reality", deps.state_file.display());
            SavedState::default()
        });
        let base_nice = deps.processes.own_nice();
        Self {
            timers: Timers::new(events_tx.clone()),
            deps,
            commands,
            events_tx,
            events,
            m: Model::default(),
            ports: PortAllocator::default(),
            saved,
            last_status: String::new(),
            base_nice,
            backoff: BTreeMap::new(),
            started: tokio::time::Instant::now(),
            snapshot,
            outbox: Outbox::default(),
            metrics: api::Metrics::default(),
            groups: sockets::Groups::default(),
        }
    }

    /// Sends an answer at the end of this turn.
    fn reply<V: Send + 'static>(&mut self, tx: tokio::sync::oneshot::Sender<V>, value: V) {
        self.outbox.0.push(Box::new(move || {
            let _ = tx.send(value);
        }));
    }

    /// Answers a waiter at the end of this turn.
    fn answer(&mut self, waiter: model::Waiter, result: Result<u64, Error>) {
        self.outbox.0.push(Box::new(move || waiter.answer(result)));
    }

    /// Ends a turn: the snapshot for readers, then the answers, then the status line.
    fn end_turn(&mut self) {
        self.snapshot.send_replace(Some(Arc::new(self.build_snapshot())));
        for send in self.outbox.0.drain(..) {
            send();
        }
        self.update_status();
    }

    /// Loads the apps, adopts what a previous daemon left running, starts the autostart apps,
    /// then serves until every handle is dropped. Sends `READY=1` once the autostart deploys
    /// have finished (or failed).
    pub async fn run(mut self) {
        if let Err(e) = self.deps.router.check() {
            error!("cannot route: {e}; deploys will fail until it is fixed");
        }
        self.load_configs();
        self.adopt().await;
        if let Some(mut rx) = self.deps.notify.take() {
            let tx = self.events_tx.clone();
            tokio::spawn(async move {
                while let Some(n) = rx.recv().await {
                    if tx.send(Event::Notify(n)).is_err() {
                        return;
                    }
                }
            });
        }
        let pending = self.autostart().await;
        self.end_turn();
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
                    if matches!(ev, Event::Samples { .. }) {
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
            self.end_turn();
        }
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Deploy { app, overrides, reply } => {
                self.deploy(&app, deploy::Source::File(&overrides), model::Waiter::Deploy(reply)).await;
            }
            Command::Retire { app, generation, reply } => self.retire(&app, generation, reply).await,
            Command::Rollback { app, generation, reply } => self.rollback(&app, generation, reply).await,
            Command::KillRetired { app, reply } => {
                let n = self.kill_retired(&app);
                self.reply(reply, n);
            }
            Command::StopApp { app, reply } => self.stop_app(&app, reply).await,
            Command::Reload { reply } => {
                self.load_configs();
                self.sync_rules().await;
                let _ = self.autostart().await;
                info!("configuration reloaded");
                self.reply(reply, Ok(()));
            }
        }
    }

    async fn event(&mut self, ev: Event) {
        match ev {
            Event::Ready { id } => self.worker_ready(id).await,
            Event::Notify(n) => self.notified(n).await,
            Event::Exited { id, exit } => self.worker_exited(id, exit).await,
            Event::Timer { key, token } => {
                if self.timers.take(&key, token) {
                    self.timer(key).await;
                }
            }
            Event::ScopeJob { app, generation, job, result } => {
                self.scope_job_done(app, generation, job, result)
            }
            Event::Samples { samples, connections } => self.apply_samples(samples, connections).await,
        }
    }

    async fn timer(&mut self, key: TimerKey) {
        match key {
            TimerKey::ReadyTimeout { app, generation } => self.ready_timeout(&app, generation),
            TimerKey::ReleaseNext { app, generation } => self.release_next(&app, generation).await,
            TimerKey::StopTimeout(id) => self.stop_timeout(id),
            TimerKey::Respawn { app, generation, band } => self.respawn(app, generation, band).await,
            TimerKey::RespawnTimeout(id) => self.respawn_timeout(id),
            TimerKey::ReapNext(app) => self.reap_next(&app),
            TimerKey::SyncRules => self.sync_rules().await,
        }
    }

    fn update_status(&mut self) {
        use ipcluster_core::model::WorkerState as W;
        let apps = self.valid_apps().len();
        let live = self.m.workers.values().filter(|w| w.state == W::Live).count();
        let retired = self.m.workers.values().filter(|w| matches!(w.state, W::Retired | W::Stopping)).count();
        let mut line = format!("{apps} apps, {live} live workers, {retired} retired workers");
        if let Err(e) = self.deps.router.check() {
            line.push_str(&format!("; cannot route: {e}"));
        }
        if line != self.last_status {
            crate::notify_systemd(&[sd_notify::NotifyState::Status(&line)]);
            self.last_status = line;
        }
    }

    fn signal(&self, s: BusSignal) {
        let _ = self.deps.signals.send(s);
    }

    fn now(&self) -> SystemTime {
        self.deps.clock.wall()
    }

    /// The one way a generation changes state: checked against the legal transitions, logged,
    /// saved, and signalled on the bus.
    fn enter(&mut self, app: &AppName, g: u64, state: GenState) {
        let now = self.now();
        let Some(gen_) = self.m.generation_mut(app, g) else { return };
        if gen_.state == state && state != GenState::Starting {
            return;
        }
        if gen_.state != state && !gen_.state.can_become(state) {
            warn!(app = %app, generation = g, "unexpected transition {} -> {}", gen_.state, state);
        }
        gen_.state = state;
        if state == GenState::Retired {
            gen_.retired_at = Some(now);
        }
        match state {
            GenState::Starting => {
                info!(app = %app, generation = g, "{app}: deploying generation {g} ({} workers) in {}", gen_.config.workers, gen_.scope)
            }
            _ => info!(app = %app, generation = g, "{app}: generation {g} is {state}"),
        }
        self.persist();
        self.signal(BusSignal::GenerationStateChanged { app: app.to_string(), generation: g, state });
        if state == GenState::Stopped {
            // Its workers are gone; whatever they left behind goes with the scope.
            self.scope_job(app, g, ScopeJob::Stop);
        }
        if !state.is_running() {
            self.drop_tables(app, g);
        }
        if !state.is_running() {
            self.trim_history(app);
        }
    }

    /// Saves what reality cannot tell a restarted daemon: generation counters, the state of
    /// every running generation, crash backoffs, stopped apps. A failure is logged: the daemon
    /// keeps serving, and adoption trusts reality (scopes, processes, rules) first anyway.
    fn persist(&mut self) {
        self.saved.apps.clear();
        for ((name, band), b) in &self.backoff {
            if let Some(last) = b.current() {
                let ms = u64::try_from(last.as_millis()).unwrap_or(u64::MAX);
                self.saved.apps.entry(name.clone()).or_default().backoff_ms.insert(*band, ms);
            }
        }
        for (name, app) in &self.m.apps {
            if app.stopped {
                self.saved.apps.entry(name.clone()).or_default().stopped = true;
            }
            // Every generation in the history, finished ones too: a rollback after a restart still
            // knows what they ran.
            for (g, x) in &app.generations {
                let mut record = SavedGeneration::of(x.state, usec(x.started), &x.config);
                record.retired_usec = x.retired_at.map(usec);
                record.processes = self
                    .m
                    .workers_of(name, *g)
                    .map(|(_, w)| SavedWorker {
                        pid: w.pid,
                        start_usec: usec(w.started),
                        band: w.band,
                        ports: w.worker_ports(),
                    })
                    .collect();
                self.saved.apps.entry(name.clone()).or_default().generations.insert(*g, record);
            }
        }
        if let Err(e) = state::save(&self.deps.state_file, &self.saved) {
            error!("cannot write {}: {e}", self.deps.state_file.display());
        }
    }

    /// The ports workers hold changed (a worker started or left): the rules that guard them are
    /// refreshed shortly, once for however many changes happen meanwhile.
    fn ports_changed(&mut self) {
        if !self.timers.is_set(&TimerKey::SyncRules) {
            self.timers.set(TimerKey::SyncRules, Duration::from_millis(100));
        }
    }

    /// Brings the kernel's rules up to date after a change the supervisor made itself (a
    /// worker started or left, a band moved, an app stopped).
    async fn sync_rules(&mut self) {
        match self.deps.router.apply(&self.routes(None)).await {
            Ok(Applied::Changed) => tracing::debug!("rules updated"),
            Ok(Applied::Unchanged) => {}
            Err(e) => error!("cannot change the NAT rules: {e}"),
        }
    }

    /// The periodic check: makes the kernel's rules match the live workers, and says so when
    /// something else had changed them.
    async fn reconcile(&mut self) {
        match self.deps.router.apply(&self.routes(None)).await {
            Ok(Applied::Changed) => warn!(
                "NAT rules did not match the live workers (flushed or changed by another tool?); repaired in one transaction"
            ),
            Ok(Applied::Unchanged) => {}
            Err(e) => error!("cannot check the NAT rules: {e}"),
        }
    }

    fn trim_history(&mut self, app: &AppName) {
        let Some(a) = self.m.apps.get_mut(app) else { return };
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

    /// Runs a scope call in the background; its outcome comes back as [`Event::ScopeJob`].
    fn scope_job(&self, app: &AppName, generation: u64, job: ScopeJob) {
        let Some(unit) = self.m.generation(app, generation).map(|g| g.scope.clone()) else { return };
        let (scopes, tx, app) = (self.deps.scopes.clone(), self.events_tx.clone(), app.clone());
        tokio::spawn(async move {
            let result = match job {
                ScopeJob::Stop => scopes.stop(&unit).await,
                ScopeJob::CpuWeight(w) => scopes.set_cpu_weight(&unit, w).await,
            };
            let _ =
                tx.send(Event::ScopeJob { app, generation, job, result: result.map_err(|e| e.to_string()) });
        });
    }

    /// A background scope call finished: log a failure; a stop completes a failed deploy or a
    /// StopApp.
    fn scope_job_done(&mut self, app: AppName, generation: u64, job: ScopeJob, result: Result<(), String>) {
        if let Err(e) = &result {
            let unit = ipcluster_core::model::scope_name(&app, generation);
            warn!(app = %app, generation, "{job:?} of {unit} failed: {e}");
        }
        if job == ScopeJob::Stop {
            self.failed_scope_stopped(&app, generation, result.as_ref().err().cloned());
            self.app_scope_stopped(&app, generation, result.err());
        }
    }
}
