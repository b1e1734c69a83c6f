//! Workers from spawn to exit: following a new process, its readiness (TCP probe or `READY=1`),
//! its watchdog pings, its exit and what an exit means for its generation, the routes the live
//! workers make, and the lists callers read.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, SystemTime},
};

use ipcluster_core::{
    config::Routing,
    model::{GenState, WorkerState, scope_name},
    name::AppName,
    routing::{AppRoute, with_failover},
    units::Signal,
};
use tracing::{info, warn};

use super::{
    BusSignal, Event, GenerationInfo, Supervisor, WorkerInfo,
    model::{Worker, WorkerId},
    timers::TimerKey,
};
use crate::{
    clock::usec, netfilter::Router, notify, process::Exit, processes::Processes, scopes::Scopes,
    steering::Steer,
};

impl<S: Scopes + Clone + 'static, R: Router + 'static, P: Processes, T: Steer> Supervisor<S, R, P, T> {
    /// Starts following a worker: its exit arrives as [`Event::Exited`].
    #[allow(clippy::too_many_arguments, reason = "one worker's identity, gathered in one place")]
    pub(super) fn add_worker(
        &mut self,
        app: &AppName,
        generation: u64,
        band: u32,
        pid: u32,
        ports: Vec<(SocketAddr, u16)>,
        handle: P::Handle,
        cgroup: Option<String>,
        started: SystemTime,
    ) -> WorkerId {
        let id = self.m.new_worker_id();
        // The kernel's start time, so ListWorkers says the same before and after a restart.
        let started = self.deps.processes.start_time_usec(pid).map_or(started, crate::clock::from_usec);
        let exited = self.deps.processes.wait(&handle);
        let tx = self.events_tx.clone();
        tokio::spawn(async move {
            let exit = exited.await;
            let _ = tx.send(Event::Exited { id, exit });
        });
        self.m.workers.insert(
            id,
            Worker {
                app: app.clone(),
                generation,
                band,
                pid,
                ports,
                state: WorkerState::Starting,
                started,
                handle,
                cgroup,
                nice: self.base_nice,
                ready: false,
                probe: None,
                sample: Default::default(),
                last_ping: tokio::time::Instant::now(),
                stop_reason: None,
                replaces: None,
                reap_queued: false,
                retired_at: None,
                listeners: Vec::new(),
                sockets: Vec::new(),
                cookies: Vec::new(),
            },
        );
        id
    }

    /// TCP readiness: the worker is ready once its own processes listen on each of its ports.
    pub(super) fn start_probe(&mut self, id: WorkerId) {
        let Some(w) = self.m.workers.get_mut(&id) else { return };
        let probe = self.deps.processes.probe(w.pid, w.cgroup.clone(), w.worker_ports());
        let tx = self.events_tx.clone();
        let task = tokio::spawn(async move {
            probe.await;
            let _ = tx.send(Event::Ready { id });
        });
        w.probe = Some(task.abort_handle());
    }

    /// A notify datagram: `WATCHDOG=1` and `READY=1` of a worker, or of a process it forked
    /// (found by the sender's cgroup: a worker's own, or one below it).
    pub(super) async fn notified(&mut self, n: notify::Notification) {
        let notify::Notification { pid, cgroup, message } = n;
        if !message.watchdog && !message.ready {
            return;
        }
        let id = self
            .m
            .workers
            .iter()
            .find(|(_, w)| match &w.cgroup {
                Some(c) => {
                    cgroup == *c || cgroup.strip_prefix(c.as_str()).is_some_and(|r| r.starts_with('/'))
                }
                // A worker adopted from a daemon that did not isolate workers.
                None => w.pid == pid,
            })
            .map(|(id, _)| *id);
        let Some(id) = id else {
            if message.ready {
                warn!(pid, "READY=1 from a process that is not a worker ({cgroup}); ignored");
            }
            return;
        };
        if let Some(w) = self.m.workers.get_mut(&id) {
            w.last_ping = tokio::time::Instant::now();
        }
        if message.ready {
            self.worker_ready(id).await;
        }
    }

    /// A worker is ready (once): it is announced, its listening sockets are held (see orphan.rs),
    /// and its generation cuts over once every band is ready — or, for a live generation, its
    /// band switches to it.
    pub(super) async fn worker_ready(&mut self, id: WorkerId) {
        let Some(w) = self.m.workers.get_mut(&id) else { return };
        if w.ready {
            return;
        }
        w.ready = true;
        w.probe = None;
        w.last_ping = tokio::time::Instant::now();
        let (pid, ports, app, g) = (w.pid, w.worker_ports(), w.app.clone(), w.generation);
        let listeners = self.deps.processes.listeners(pid, w.cgroup.as_deref(), &ports);
        // A first sample now: the lists show a ready worker's memory at once.
        let (rss, cpu_usec) = self.deps.processes.usage(pid);
        if let Some(w) = self.m.workers.get_mut(&id) {
            w.listeners = listeners;
            if w.sample.rss == 0 {
                w.sample = crate::sampler::Sample { rss, cpu_usec };
            }
        }
        // Socket mode: its band's slot in its generation's tables takes its sockets.
        if let Err(e) = self.steer_to(id) {
            let why = format!("cannot steer connections to it: {e}");
            if self.m.gen_state(&app, g) == Some(GenState::Starting) {
                let band = self.m.workers.get(&id).map_or(0, |w| w.band);
                self.fail(&app, g, format!("band {band}: {why}"));
            } else {
                warn!(app = %app, generation = g, pid, "{app}: pid {pid} is ready but {why}; stopping it");
                self.kill_worker(id);
            }
            return;
        }
        self.announce_ready(id);
        match self.m.gen_state(&app, g) {
            Some(GenState::Live) => self.respawned_ready(id).await,
            Some(GenState::Starting) => self.check_ready(&app, g).await,
            _ => {}
        }
    }

    /// Removes a worker from the model: its timers and probe end, and the bus hears why it left.
    pub(super) fn forget_worker(&mut self, id: WorkerId, reason: String) -> Option<Worker<P::Handle>> {
        let w = self.m.workers.remove(&id)?;
        if let Some(p) = &w.probe {
            p.abort();
        }
        self.timers.cancel(&TimerKey::StopTimeout(id));
        self.timers.cancel(&TimerKey::RespawnTimeout(id));
        self.signal(BusSignal::WorkerExited {
            app: w.app.to_string(),
            generation: w.generation,
            band: w.band,
            pid: w.pid,
            reason,
        });
        Some(w)
    }

    /// A worker's process ended. What it means depends on its generation: a starting one fails;
    /// a live one's band falls back to a neighbour and is respawned; a generation whose last
    /// worker left is stopped.
    pub(super) async fn worker_exited(&mut self, id: WorkerId, exit: Exit) {
        let Some(w) = self.m.workers.get(&id) else { return };
        let reason = match (w.stop_reason, w.state) {
            (Some(why), _) => format!("{why} ({exit})"),
            (None, WorkerState::Stopping) => format!("reaped ({exit})"),
            (None, _) => exit.to_string(),
        };
        info!(app = %w.app, generation = w.generation, band = w.band, pid = w.pid, "{}: generation {} band {} pid {} ({}): {reason}", w.app, w.generation, w.band, w.pid, w.state);
        let Some(w) = self.forget_worker(id, reason) else { return };
        self.ports_changed();
        if !w.cookies.is_empty() {
            self.unsteer(&w.app, w.generation, w.band, &w.cookies);
        }
        // Whatever it left behind (children it forked) goes with it.
        if let Some(c) = &w.cgroup {
            self.deps.processes.kill_cgroup(c);
        }
        let gen_state = self.m.gen_state(&w.app, w.generation);
        let remaining = self.m.workers_of(&w.app, w.generation).next().is_some();
        match gen_state {
            Some(GenState::Starting) => {
                let why = match exit {
                    Exit::Code(c) => format!("band {}: exited with status {c} before it was ready", w.band),
                    Exit::Signal(s) => {
                        format!(
                            "band {}: killed by signal {} before it was ready",
                            w.band,
                            Signal::describe(s)
                        )
                    }
                    Exit::Unknown => format!("band {}: exited before it was ready", w.band),
                };
                let why = why + &self.ports_taken(&w.worker_ports(), &[]);
                self.fail(&w.app, w.generation, why);
            }
            Some(GenState::Live) if matches!(w.state, WorkerState::Live | WorkerState::Starting) => {
                // Until a replacement is ready, the band's new connections go to a neighbour.
                if w.state == WorkerState::Live {
                    warn!(app = %w.app, generation = w.generation, band = w.band, "{}: live worker of band {} gone; the band falls back to a neighbour", w.app, w.band);
                    if w.cookies.is_empty() {
                        self.sync_rules().await;
                    }
                }
                self.drain_orphans(&w);
                let up_for = if w.state == WorkerState::Live {
                    self.now().duration_since(w.started).unwrap_or_default()
                } else {
                    Duration::ZERO
                };
                self.schedule_respawn(&w.app, w.generation, w.band, up_for);
            }
            Some(GenState::Retired | GenState::Live) if !remaining => {
                self.enter(&w.app, w.generation, GenState::Stopped);
            }
            _ => {}
        }
    }

    /// Why a worker may not have become ready: its ports that something else holds (another
    /// program that bound them first), or "".
    pub(super) fn ports_taken(&self, ports: &[u16], own: &[u16]) -> String {
        let taken: Vec<String> = ports
            .iter()
            .filter(|p| !own.contains(p) && !self.deps.processes.port_is_free(**p))
            .map(u16::to_string)
            .collect();
        match taken.len() {
            0 => String::new(),
            1 => format!(" (its port {} is held by another program)", taken[0]),
            _ => format!(" (its ports {} are held by another program)", taken.join(", ")),
        }
    }

    /// Hands a crashed live worker's listening sockets to [`crate::orphan::drain`], relaying to
    /// the worker the rules now send its band to.
    fn drain_orphans(&self, w: &Worker<P::Handle>) {
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
                std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, *target),
            );
        }
    }

    /// The routes of every app with a live generation, or — for `extra` — the generation about
    /// to go live, whose ready workers count as live. Bands without a live worker borrow a
    /// neighbour's ([`with_failover`]); stopped apps have none.
    pub(super) fn routes(&self, extra: Option<(&AppName, u64)>) -> Vec<AppRoute> {
        let mut out = Vec::new();
        for (name, app) in &self.m.apps {
            let candidate = extra.filter(|(a, _)| *a == name).map(|(_, g)| g);
            if app.stopped && candidate.is_none() {
                continue;
            }
            let Some(g) = candidate.or_else(|| app.live()) else { continue };
            let Some(gen_) = app.generations.get(&g) else { continue };
            // Socket mode has no rules: its steering program routes.
            if gen_.config.routing == Routing::Socket {
                continue;
            }
            let mut by_band: Vec<Option<Vec<u16>>> = vec![None; gen_.config.workers as usize];
            for (_, w) in self.m.workers_of(name, g) {
                // A generation about to go live (deployed, or rolled back to) lends its ready workers
                // that are neither stopping nor queued to be.
                let lent = candidate.is_some()
                    && w.ready
                    && !w.reap_queued
                    && matches!(w.state, WorkerState::Starting | WorkerState::Retired);
                let live = w.state == WorkerState::Live || lent;
                if let Some(slot) = by_band.get_mut(w.band as usize).filter(|_| live) {
                    *slot = Some(w.worker_ports());
                }
            }
            if let Some(bands) = with_failover(&by_band) {
                out.push(AppRoute {
                    app: name.clone(),
                    listen: gen_.config.listen.clone(),
                    bands,
                    // Every port a worker of the app holds: live, retired, starting.
                    guarded: self
                        .m
                        .workers
                        .values()
                        .filter(|w| w.app == *name)
                        .flat_map(|w| w.worker_ports())
                        .collect(),
                });
            }
        }
        out
    }

    /// What readers see now (see [`super::api::Snapshot`]): built from memory alone, no /proc.
    pub(super) fn build_snapshot(&self) -> super::Snapshot {
        let workers = self
            .m
            .workers
            .values()
            .map(|w| WorkerInfo {
                app: w.app.to_string(),
                generation: w.generation,
                band: w.band,
                pid: w.pid,
                state: w.state,
                ports: w.ports.iter().map(|(public, port)| (public.port(), *port)).collect(),
                rss: w.sample.rss,
                cpu_usec: w.sample.cpu_usec,
                start_usec: usec(w.started),
                nice: w.nice,
                scope: scope_name(&w.app, w.generation),
            })
            .collect();
        let generations = self
            .m
            .apps
            .iter()
            .flat_map(|(name, a)| {
                a.generations.iter().map(move |(n, g)| GenerationInfo {
                    app: name.to_string(),
                    generation: *n,
                    state: g.state,
                    workers: self.m.workers_of(name, *n).count() as u32,
                    start_usec: usec(g.started),
                    scope: g.scope.clone(),
                })
            })
            .collect();
        super::Snapshot {
            workers,
            generations,
            metrics: self.metrics.clone(),
            known: self.m.apps.keys().cloned().collect(),
            valid: self.valid_apps(),
            config_dir: self.deps.config_dir.display().to_string(),
        }
    }
}
