//! The one task that owns all state: apps, generations and workers (see docs/ARCHITECTURE.md).
//!
//! Inputs arrive as messages: [`Command`]s from the D-Bus adapter and the signal handlers (each
//! with its reply channel) and [`Event`]s from small helper tasks (process exits, readiness
//! probes, notify datagrams, timers, background jobs, samples). The supervisor decides with the
//! pure rules of [`ipcluster_core`] and acts through narrow traits, named together by
//! `World` (world.rs): `Scopes` (systemd), `Router` (netfilter), `Steer` (socket mode's
//! eBPF), `Spawner`, `Inspector` and `Sampler` (fork, pidfds, /proc, cgroups), `Files`, the
//! `Store` of state.json, the `Notifier`, the `Relay` of crashed workers' sockets and the
//! `Checker` of HTTP health checks; and a `Clock` (beside them, in `Deps`).
//!
//! A deploy, step by step ([`deploy`]):
//! 1. allocate generation `g` (saved first, so numbers never repeat) and worker ports;
//! 2. fork one child per band, held at its gate; create `ipcluster-<app>-<g>.scope` around
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
mod canary;
mod checks;
mod deploy;
mod health;
mod launch;
mod model;
mod record;
mod respawn;
mod retire;
mod rollback;
mod sessions;
mod snapshot;
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
    Authorized, BusSignal, CUTOVER_BUCKETS, CanaryRequest, Command, Deploys, Error, GenerationInfo, Handle,
    HealthInfo, Histogram, Mailbox, Metrics, PolicyAction, Reply, RollbackHow, RollbackPlan, SessionInfo,
    Snapshot, WorkerInfo, channel,
};
use ipcluster_core::{name::AppName, policy::Backoff, ports::PortAllocator, saved::SavedState};
use model::{Model, WorkerId};
use timers::{TimerKey, Timers};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::{
    clock::Clock,
    netfilter::{Applied, Router},
    notify,
    process::Exit,
    processes::Spawner,
    sampler::Sample,
    scopes::Scopes,
    state::Store,
    status::Notifier,
    world::{ProcHandle, World},
};

/// What the supervisor needs from outside: the seams of its world (see [`crate::world`]), and
/// the settings it runs with.
#[derive(Debug)]
pub struct Deps<W: World> {
    pub scopes: W::Scopes,
    pub router: W::Router,
    pub spawner: W::Spawner,
    pub inspector: W::Inspector,
    pub sampler: W::Sampler,
    /// Socket mode's kernel side.
    pub steer: W::Steer,
    pub files: W::Files,
    pub store: W::Store,
    pub notifier: W::Notifier,
    pub relay: W::Relay,
    /// HTTP health checks.
    pub checker: W::Checker,
    pub clock: Arc<dyn Clock>,
    /// Where app files live (for messages: the files are read through `files`).
    pub config_dir: PathBuf,
    /// Datagrams of the workers' notify socket, from processes in our scopes.
    pub notify: Option<mpsc::Receiver<notify::Notification>>,
    /// The notify socket's path, for workers' `NOTIFY_SOCKET` (`None`: not available).
    pub notify_socket: Option<PathBuf>,
    pub signals: mpsc::UnboundedSender<BusSignal>,
    /// How often workers are sampled and the memory and watchdog policies run.
    pub sample_interval: Duration,
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
    /// A crashed worker's socket for `port` was drained and closed.
    Drained { app: AppName, port: u16 },
    /// A draining generation's established connections, counted (see sessions.rs).
    DrainCheck { app: AppName, generation: u64, connections: u32 },
    /// A health check of a worker came back (see checks.rs).
    Checked { id: WorkerId, outcome: ipcluster_core::checks::Outcome },
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
pub struct Supervisor<W: World> {
    deps: Deps<W>,
    commands: mpsc::Receiver<Command>,
    events_tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
    m: Model<ProcHandle<W>>,
    timers: Timers,
    ports: PortAllocator,
    saved: SavedState,
    last_status: String,
    /// The last worker the previous sampling round took (see [`crate::sampler::next_share`]).
    sample_cursor: WorkerId,
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
    groups: sockets::Groups<W::Steer>,
    /// Live session records of each generation with session affinity (its set in NAT mode,
    /// its slot in socket mode), as last counted.
    sessions: BTreeMap<(AppName, u64), u32>,
    /// Draining generations whose connections are being counted.
    drain_checks: std::collections::BTreeSet<(AppName, u64)>,
    /// State saved in the background (its writer thread may not have written it yet) since
    /// the last write made before answering.
    unsaved: bool,
    /// Ports of NAT workers that exited while not live: once a rule change is in force (no
    /// rule names them any more), the connections they reset are forgotten (see
    /// netfilter/conntrack.rs).
    forget_after_sync: Vec<u16>,
}

/// Answers waiting for the end of the supervisor's turn.
#[derive(Default)]
struct Outbox(Vec<Box<dyn FnOnce() + Send>>);

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Outbox({} answers)", self.0.len())
    }
}

impl<W: World> Supervisor<W> {
    /// A supervisor serving `mailbox` with `deps`.
    pub fn new(mailbox: api::Mailbox, deps: Deps<W>) -> Self {
        let api::Mailbox { commands, snapshot } = mailbox;
        let (events_tx, events) = mpsc::unbounded_channel();
        let saved = deps.store.load().unwrap_or_else(|e| {
            warn!("{e}; rebuilding from reality");
            SavedState::default()
        });
        let base_nice = deps.spawner.own_nice();
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
            sample_cursor: 0,
            base_nice,
            backoff: BTreeMap::new(),
            started: tokio::time::Instant::now(),
            snapshot,
            outbox: Outbox::default(),
            metrics: api::Metrics::default(),
            groups: sockets::Groups::default(),
            sessions: BTreeMap::new(),
            drain_checks: Default::default(),
            unsaved: false,
            forget_after_sync: Vec::new(),
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

    /// Ends a turn that changed something: the snapshot for readers, the status line, then the
    /// answers.
    fn end_turn(&mut self) {
        self.snapshot.send_replace(Some(Arc::new(self.build_snapshot())));
        self.update_status();
        self.end_quiet_turn();
    }

    /// Ends a turn that changed nothing readers see (a sampling round started, the rules
    /// checked): the snapshot stays as it is (rebuilding it costs more than the rest at 1024
    /// workers).
    fn end_quiet_turn(&mut self) {
        // An answer leaves once the state its call made is on disk: a daemon killed right
        // after a Deploy, a Rollback or a Promote returned finds on restart what the caller was
        // told (a canary's deadline, a draining generation with no record left, and the like,
        // which reality cannot show). Turns that answer nobody leave it to the writer thread.
        if self.unsaved && !self.outbox.0.is_empty() {
            self.unsaved = false;
            if let Err(e) = self.deps.store.save_now(&self.saved) {
                // The answers still leave (what they report happened); the writer thread and
                // the stop retry the write.
                error!("cannot save the state: {e}");
                self.deps.store.save(&self.saved);
            }
        }
        for send in self.outbox.0.drain(..) {
            send();
        }
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
        let notifier = self.deps.notifier.clone();
        tokio::spawn(async move {
            for rx in pending {
                let _ = rx.await;
            }
            notifier.ready();
        });
        let watchdog =
            self.deps.notifier.watchdog_timeout().map(|d| d / 2).unwrap_or(Duration::from_secs(3600));
        let mut tick = tokio::time::interval(watchdog);
        let mut reconcile = tokio::time::interval(RECONCILE_EVERY);
        reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sample = tokio::time::interval(self.deps.sample_interval);
        sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sampling = false;
        let mut quiet = false;
        loop {
            tokio::select! {
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => {
                        // Asked before the caller is authorized (a plan): any local user can
                        // ask, so it costs no snapshot.
                        quiet = matches!(cmd, Command::PlanRollback { .. });
                        self.command(cmd).await
                    }
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
                    quiet = true;
                }
                _ = tick.tick() => {
                    self.deps.notifier.watchdog();
                    quiet = true;
                }
                _ = reconcile.tick() => {
                    self.reconcile().await;
                    // Session counts are published (ListSessions, /metrics).
                    quiet = !self.keeps_sessions();
                }
            }
            if std::mem::take(&mut quiet) { self.end_quiet_turn() } else { self.end_turn() }
        }
    }

    /// The D-Bus adapter refuses malformed app names before they get here; names are still
    /// logged quoted (`{app:?}`), so no caller's string is ever a raw journal line.
    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Deploy { app, overrides, auth, reply } => {
                info!(app, "Deploy of {app:?} by {}", auth.caller());
                self.deploy(&app, deploy::Source::File(&overrides), model::Waiter::Deploy(reply)).await;
            }
            Command::DeployCanary { app, overrides, canary, auth, reply } => {
                info!(app, "Deploy of a canary of {app:?} on {} bands by {}", canary.bands, auth.caller());
                let source = deploy::Source::File(&overrides);
                self.deploy_with(&app, source, Some(canary), model::Waiter::Deploy(reply)).await;
            }
            Command::Promote { app, auth, reply } => {
                info!(app, "Promote of {app:?} by {}", auth.caller());
                self.promote(&app, reply).await;
            }
            Command::Retire { app, generation, auth, reply } => {
                info!(
                    app,
                    generation,
                    "RetireGeneration of {app:?} generation {generation} by {}",
                    auth.caller()
                );
                self.retire(&app, generation, reply).await;
            }
            Command::PlanRollback { app, generation, reply } => {
                let plan = self.plan_rollback(&app, generation).map(|(_, plan)| plan);
                self.reply(reply, plan);
            }
            Command::Rollback { app, generation, plan, auth, reply } => {
                self.rollback(&app, generation, &plan, &auth, reply).await;
            }
            Command::KillRetired { app, auth, reply } => {
                let n = self.kill_retired(&app, &auth).await;
                self.reply(reply, n);
            }
            Command::StopApp { app, auth, reply } => {
                info!(app, "StopApp of {app:?} by {}", auth.caller());
                self.stop_app(&app, reply).await;
            }
            Command::Reload { auth, reply } => {
                self.load_configs();
                self.sync_rules().await;
                let _ = self.autostart().await;
                info!("configuration reloaded (by {})", auth.caller());
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
            Event::Drained { app, port } => self.drained(&app, port),
            Event::DrainCheck { app, generation, connections } => {
                self.drain_checked(&app, generation, connections);
            }
            Event::Checked { id, outcome } => self.checked(id, outcome).await,
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
            TimerKey::CanaryDeadline { app, generation } => self.canary_deadline(&app, generation).await,
            TimerKey::HealthRound { app, generation } => self.health_round(&app, generation),
            TimerKey::ReadyCheck(id) => self.check_worker(id),
        }
    }

    fn update_status(&mut self) {
        use ipcluster_core::model::WorkerState as W;
        let apps = self.valid_apps().len();
        let (mut live, mut retired) = (0, 0);
        for w in self.m.workers.values() {
            match w.state {
                W::Live => live += 1,
                W::Retired | W::Stopping => retired += 1,
                _ => {}
            }
        }
        let mut line = format!("{apps} apps, {live} live workers, {retired} retired workers");
        if let Err(e) = self.deps.router.check() {
            line.push_str(&format!("; cannot route: {e}"));
        }
        if line != self.last_status {
            self.deps.notifier.status(&line);
            self.last_status = line;
        }
    }

    fn signal(&self, s: BusSignal) {
        let _ = self.deps.signals.send(s);
    }

    fn now(&self) -> SystemTime {
        self.deps.clock.wall()
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
            Err(e) => {
                error!("cannot change the NAT rules: {e}");
                return;
            }
        }
        self.rules_in_force();
    }

    /// The rules match the model: the ports of workers that left are named by none, so what
    /// their connections left in connection tracking can go.
    fn rules_in_force(&mut self) {
        if !self.forget_after_sync.is_empty() {
            let ports = std::mem::take(&mut self.forget_after_sync);
            self.deps.router.forget(&ports);
        }
    }

    /// The periodic check: makes the kernel's rules match the live workers, and says so when
    /// something else had changed them.
    async fn reconcile(&mut self) {
        match self.deps.router.apply(&self.routes(None)).await {
            Ok(applied) => {
                if applied == Applied::Changed {
                    warn!(
                        "NAT rules did not match the live workers (flushed or changed by another tool?); repaired in one transaction"
                    );
                }
                self.rules_in_force();
            }
            Err(e) => error!("cannot check the NAT rules: {e}"),
        }
        self.guard_steering();
        if self.keeps_sessions() {
            self.count_sessions().await;
        }
    }

    /// Runs a scope call on a generation's scope in the background; its outcome comes back as
    /// [`Event::ScopeJob`].
    fn scope_job(&self, app: &AppName, generation: u64, job: ScopeJob) {
        let Some(unit) = self.m.generation(app, generation).map(|g| g.scope.clone()) else { return };
        self.unit_job(app, generation, unit, job);
    }

    /// [`Self::scope_job`] on `unit`, which may belong to a generation the model does not hold
    /// (one adoption stops without taking it over).
    fn unit_job(&self, app: &AppName, generation: u64, unit: String, job: ScopeJob) {
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
