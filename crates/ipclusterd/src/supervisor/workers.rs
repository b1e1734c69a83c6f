//! Workers from spawn to exit: following a new process, its readiness (TCP probe or `READY=1`),
//! its watchdog pings, its exit and what an exit means for its generation, the routes the live
//! workers make, and the lists callers read.

use std::{
    net::Ipv4Addr,
    time::{Duration, SystemTime},
};

use ipcluster_core::{
    config::Routing,
    model::{GenState, WorkerState},
    name::AppName,
    routing::{AppRoute, DrainingRoute, Sessions, with_failover},
    units::Signal,
};
use tracing::{info, warn};

use super::{
    BusSignal, Event, Supervisor,
    model::{Plumbing, Worker, WorkerId},
    timers::TimerKey,
};
use crate::{
    notify,
    process::Exit,
    processes::{Inspector, Sampler, Spawner},
    relay::Relay,
    world::{ProcHandle, World},
};

impl<W: World> Supervisor<W> {
    /// Starts following a worker: its exit arrives as [`Event::Exited`].
    #[allow(clippy::too_many_arguments, reason = "one worker's identity, gathered in one place")]
    pub(super) fn add_worker(
        &mut self,
        app: &AppName,
        generation: u64,
        band: u32,
        pid: u32,
        plumbing: Plumbing,
        handle: ProcHandle<W>,
        cgroup: Option<String>,
        started: SystemTime,
    ) -> WorkerId {
        let id = self.m.new_worker_id();
        // The kernel's start time, so ListWorkers says the same before and after a restart.
        let started = self.deps.inspector.start_time_usec(pid).map_or(started, crate::clock::from_usec);
        let exited = self.deps.spawner.wait(&handle);
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
                plumbing,
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
                health: Default::default(),
            },
        );
        id
    }

    /// TCP readiness: the worker is ready once its own processes listen on each of its ports.
    pub(super) fn start_probe(&mut self, id: WorkerId) {
        let Some(w) = self.m.workers.get_mut(&id) else { return };
        let probe = self.deps.inspector.probe(w.pid, w.cgroup.clone(), w.plumbing.ports().to_vec());
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
        let Some(w) = self.m.workers.get_mut(&id) else { return };
        w.last_ping = tokio::time::Instant::now();
        // A worker with ports of its own (NAT mode) is ready once it also listens on them in
        // every family the app routes (the probe), so that READY=1 beside a local user's
        // listener on the other family's half of its port routes nobody to that user.
        let probe_first = !w.ready && !w.plumbing.ports().is_empty();
        if message.ready && probe_first {
            if w.probe.is_none() {
                self.start_probe(id);
            }
        } else if message.ready {
            self.worker_ready(id).await;
        }
    }

    /// A worker is ready (once): it is announced, its listening sockets are held (see orphan.rs),
    /// and its generation cuts over once every band is ready — or, for a live generation, its
    /// band switches to it.
    pub(super) async fn worker_ready(&mut self, id: WorkerId) {
        if self.m.workers.get(&id).is_none_or(|w| w.ready) || !self.ready_after_check(id) {
            return;
        }
        let Some(w) = self.m.workers.get_mut(&id) else { return };
        w.ready = true;
        w.probe = None;
        w.last_ping = tokio::time::Instant::now();
        // Checks that failed before it was ready (it could not answer yet) do not count.
        w.health.failures = 0;
        let (pid, ports, app, g) =
            (w.pid, w.worker_ports().collect::<Vec<u16>>(), w.app.clone(), w.generation);
        if let Plumbing::Nat { listeners, .. } = &mut w.plumbing {
            *listeners = self.deps.inspector.listeners(pid, w.cgroup.as_deref(), &ports);
        }
        // A first sample now: the lists show a ready worker's memory at once.
        let (rss, cpu_usec) = self.deps.sampler.usage(pid);
        if let Some(w) = self.m.workers.get_mut(&id).filter(|w| w.sample.rss == 0) {
            w.sample = crate::sampler::Sample { rss, cpu_usec };
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
            // A canary's own band (a respawn or replacement), or a band its promotion started.
            Some(GenState::Canary) => {
                let band = self.m.workers.get(&id).map_or(0, |w| w.band);
                if self.is_canary_band(&app, g, band) {
                    self.respawned_ready(id).await;
                } else {
                    self.check_ready(&app, g).await;
                }
            }
            _ => {}
        }
    }

    /// Removes a worker from the model: its timers and probe end, the bus hears why it left, and
    /// the guard of its ports goes shortly.
    pub(super) fn forget_worker(&mut self, id: WorkerId, reason: String) -> Option<Worker<ProcHandle<W>>> {
        let w = self.m.workers.remove(&id)?;
        self.ports_changed();
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
        if let Plumbing::Socket { cookies, .. } = &w.plumbing {
            self.unsteer(&w.app, w.generation, w.band, cookies);
        }
        // Whatever it left behind (children it forked) goes with it.
        if let Some(c) = &w.cgroup {
            self.deps.spawner.kill_cgroup(c);
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
                let why = why + &self.ports_taken(&w.worker_ports().collect::<Vec<u16>>(), None);
                self.fail(&w.app, w.generation, why);
            }
            // A band a canary's promotion started: the promotion failed.
            Some(GenState::Canary) if !self.is_canary_band(&w.app, w.generation, w.band) => {
                let why = format!("band {}: its new worker exited ({exit}) before it was ready", w.band);
                self.promotion_failed(&w.app, w.generation, why);
            }
            // A canary's worker that crashes rolls it back when it has canary_for.
            Some(GenState::Canary)
                if w.state == WorkerState::Live
                    && w.stop_reason.is_none()
                    && self
                        .canary_trouble(
                            &w.app,
                            w.generation,
                            format!("band {} pid {} exited ({exit})", w.band, w.pid),
                        )
                        .await => {}
            Some(GenState::Live | GenState::Canary)
                if matches!(w.state, WorkerState::Live | WorkerState::Starting) =>
            {
                // Until a replacement is ready, the band's new connections go to a neighbour.
                if w.state == WorkerState::Live {
                    warn!(app = %w.app, generation = w.generation, band = w.band, "{}: live worker of band {} gone; the band falls back to a neighbour", w.app, w.band);
                    if matches!(w.plumbing, Plumbing::Nat { .. }) {
                        // What queued on its sockets is relayed from now, not once the rules
                        // changed; then the rules change, and the drains take what is left.
                        self.drain_orphans(&w);
                        self.sync_rules().await;
                        self.finish_drains(&w.app, &w.worker_ports().collect::<Vec<u16>>());
                    }
                }
                let up_for = if w.state == WorkerState::Live {
                    self.now().duration_since(w.started).unwrap_or_default()
                } else {
                    Duration::ZERO
                };
                self.schedule_respawn(&w.app, w.generation, w.band, up_for);
            }
            Some(GenState::Retired | GenState::Draining | GenState::Live) if !remaining => {
                self.enter(&w.app, w.generation, GenState::Stopped);
            }
            _ => {}
        }
        // A NAT worker that was not live (reaped, stopped, draining): the connections it reset
        // must not send their clients' next ones to its port, once no rule sends clients there.
        // (A live worker's crash leaves its port to the drain relay, which takes them.) A rule
        // may still name it (a draining generation's session rules, or a generation whose
        // sessions were cut an instant ago): they are forgotten after the next rule change in
        // force, the one `forget_worker` asked for, which serves every exit of the moment at
        // once (64 workers reaped together cost one rule change, not 64 in this loop).
        if matches!(w.plumbing, Plumbing::Nat { .. }) && w.state != WorkerState::Live {
            self.forget_after_sync.extend(w.worker_ports());
        }
    }

    /// Why a worker may not have become ready: who else listens on its ports (another program
    /// that bound them first, in either address family: not `worker`'s own processes), or "".
    pub(super) fn ports_taken(&self, ports: &[u16], worker: Option<(u32, Option<&str>)>) -> String {
        let held = self.deps.inspector.port_holders(worker, ports);
        match held.len() {
            0 => String::new(),
            1 => format!(" (its port is held by another program: {})", held[0]),
            _ => format!(" (its ports are held by another program: {})", held.join(", ")),
        }
    }

    /// Hands a crashed live worker's listening sockets to the relay ([`crate::orphan`]), which
    /// relays what queues on them to the worker the band falls back to. The ports stay guarded
    /// until each drain is over ([`Self::drained`]).
    fn drain_orphans(&mut self, w: &Worker<ProcHandle<W>>) {
        let Plumbing::Nat { ports: own, listeners } = &w.plumbing else { return };
        if listeners.is_empty() {
            return;
        }
        let routes = self.routes(None);
        let Some(ports) = routes.iter().find(|r| r.app == w.app).and_then(|r| r.bands.get(w.band as usize))
        else {
            return;
        };
        for (port, fd) in listeners {
            let Some(i) = own.iter().position(|p| p.1 == *port) else { continue };
            let Some(target) = ports.get(i) else { continue };
            let Ok(dup) = fd.try_clone() else { continue };
            let (tx, app, port) = (self.events_tx.clone(), w.app.clone(), *port);
            let done = Box::new(move |_relayed: u32| {
                let _ = tx.send(Event::Drained { app, port });
            });
            let target = std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, *target);
            let drain = self.deps.relay.drain(&w.app, port, dup, target, done);
            self.m.apps.entry(w.app.clone()).or_default().draining.insert(port, Some(drain));
        }
    }

    /// The rules no longer send anything to `ports` (a crashed worker's): their drains take
    /// what is queued and close the sockets.
    fn finish_drains(&mut self, app: &AppName, ports: &[u16]) {
        let Some(a) = self.m.apps.get_mut(app) else { return };
        for p in ports {
            if let Some(drain) = a.draining.get_mut(p).and_then(Option::take) {
                drain.finish();
            }
        }
    }

    /// A crashed worker's socket is drained and closed: its port's guard goes shortly.
    pub(super) fn drained(&mut self, app: &AppName, port: u16) {
        if let Some(a) = self.m.apps.get_mut(app) {
            a.draining.remove(&port);
        }
        self.ports_changed();
    }

    /// The routes of every app: the bands of its live generation, or — for `extra` — of the
    /// generation about to go live, whose ready workers count as live; bands without a live
    /// worker borrow a neighbour's ([`with_failover`]). An app that is not routed (stopped, not
    /// deployed yet, every band down, socket mode) has no band. Every app's route guards every
    /// port its workers hold, routed or not (see [`AppRoute::guarded`]).
    pub(super) fn routes(&self, extra: Option<(&AppName, u64)>) -> Vec<AppRoute> {
        let mut out = Vec::new();
        for (name, app) in &self.m.apps {
            // Every port the app's workers hold, the ports of bands held back (spawn_interval),
            // of workers about to run and of crashed workers whose sockets are still drained.
            let held = app
                .generations
                .values()
                .flat_map(|g| g.held.iter().flat_map(|h| h.ports.iter().map(|p| p.1)));
            let guarded: Vec<u16> = self
                .m
                .workers_of_app(name)
                .flat_map(|(_, w)| w.worker_ports())
                .chain(held)
                .chain(app.launching.iter().copied())
                .chain(app.draining.keys().copied())
                .collect();
            let candidate = extra.filter(|(a, _)| *a == name).map(|(_, g)| g);
            // A canary about to take its bands (its cutover) lays them over the live generation;
            // any other candidate takes every band (a deploy, a rollback, a promotion).
            let starting_canary = candidate.filter(|g| {
                app.generations.get(g).is_some_and(|x| x.state == GenState::Starting && x.canary.is_some())
            });
            let main = match candidate.filter(|_| starting_canary.is_none()) {
                Some(g) => Some(g),
                None => app.live().filter(|_| !app.stopped),
            };
            let overlay = starting_canary.or_else(|| app.canary()).filter(|_| !app.stopped);
            let routed = main
                .and_then(|g| app.generations.get(&g).map(|gen_| (g, gen_)))
                // Socket mode has no rules: its steering program routes.
                .filter(|(_, gen_)| gen_.config.routing == Routing::Nat);
            let (listen, bands, sessions) = match routed {
                Some((g, gen_)) => {
                    let mut by_band = self.serving(name, g, candidate == Some(g), gen_.config.workers);
                    // The canary's bands: its serving workers (a band whose canary worker is gone
                    // keeps the live generation's).
                    let mut canary_bands = Vec::new();
                    if let Some(c) = overlay.and_then(|c| app.generations.get(&c).map(|x| (c, x))) {
                        let theirs = self.serving(name, c.0, candidate == Some(c.0), c.1.config.workers);
                        for b in c.1.canary.iter().flat_map(|x| &x.bands) {
                            if let (Some(slot), Some(Some(ports))) =
                                (by_band.get_mut(*b as usize), theirs.get(*b as usize))
                            {
                                *slot = Some(ports.clone());
                                canary_bands.push((*b, c.1.slot));
                            }
                        }
                    }
                    let bands = with_failover(&by_band).unwrap_or_default();
                    let mut sessions = self.sessions_route(
                        name,
                        g,
                        candidate.is_some() && starting_canary.is_none(),
                        bands.len(),
                    );
                    if let Some(s) = sessions.as_mut() {
                        self.canary_sessions(name, g, &canary_bands, s);
                    }
                    (gen_.config.listen.clone(), bands, sessions)
                }
                None => (Vec::new(), Vec::new(), None),
            };
            if !bands.is_empty() || !guarded.is_empty() {
                out.push(AppRoute { app: name.clone(), listen, bands, guarded, sessions });
            }
        }
        out
    }

    /// The ports of generation `g`'s serving worker of each band (`None`: none serves it): its
    /// live workers, and — for a generation about to be routed (`lending`) — its ready workers
    /// that are neither stopping nor queued to be.
    fn serving(&self, app: &AppName, g: u64, lending: bool, workers: u32) -> Vec<Option<Vec<u16>>> {
        let mut by_band: Vec<Option<Vec<u16>>> = vec![None; workers as usize];
        for (_, w) in self.m.workers_of(app, g) {
            let lent = lending
                && w.ready
                && !w.reap_queued
                && matches!(w.state, WorkerState::Starting | WorkerState::Retired);
            let live = w.state == WorkerState::Live || lent;
            if let Some(slot) = by_band.get_mut(w.band as usize).filter(|_| live) {
                *slot = Some(w.worker_ports().collect());
            }
        }
        by_band
    }

    /// Sessions while a canary serves `canary_bands` (band, its session slot) beside live
    /// generation `live`: the canary records the new clients of its bands, and the clients the
    /// live generation holds records of keep reaching its worker of those bands (as if it drained
    /// there).
    fn canary_sessions(
        &self,
        app: &AppName,
        live: u64,
        canary_bands: &[(u32, Option<u8>)],
        s: &mut Sessions,
    ) {
        let Some(live_gen) = self.m.generation(app, live) else { return };
        let Some(live_slot) = live_gen.slot else { return };
        let theirs = self.serving(app, live, false, live_gen.config.workers);
        let mut kept: Vec<Option<Vec<u16>>> = vec![None; s.record.len()];
        for (b, slot) in canary_bands {
            let Some(slot) = slot else { continue };
            if let Some(r) = s.record.get_mut(*b as usize) {
                *r = *slot;
            }
            if let (Some(k), Some(Some(ports))) = (kept.get_mut(*b as usize), theirs.get(*b as usize)) {
                *k = Some(ports.clone());
            }
        }
        if kept.iter().any(Option::is_some) {
            // Newest first, as the draining ones are: the live generation is newer than them.
            s.draining.insert(0, DrainingRoute { slot: live_slot, bands: kept });
        }
    }

    /// Session affinity of `app`'s rules while generation `g` is routed (`cutover`: about to go
    /// live, so the live one it replaces counts as draining already, in the same transaction):
    /// new clients recorded in `g`'s set; the draining NAT generations, newest first, at most
    /// `max_draining`, each with its bands' ready workers (a band whose worker is gone, stopping
    /// or queued to stop drops its clients' records). `None` when `g` has no session affinity.
    fn sessions_route(&self, app: &AppName, g: u64, cutover: bool, bands: usize) -> Option<Sessions> {
        let a = self.m.apps.get(app)?;
        let gen_ = a.generations.get(&g)?;
        let (timeout, slot) = (gen_.config.session_affinity?, gen_.slot?);
        let leaving = a.live_except(g).into_iter().filter(|_| cutover).filter(|p| {
            let x = &a.generations[p];
            x.config.session_affinity.is_some() && x.slot.is_some()
        });
        let mut older: Vec<u64> = leaving.chain(a.draining().into_iter().filter(|d| *d != g)).collect();
        older.sort_unstable_by(|x, y| y.cmp(x));
        older.dedup();
        let draining = older
            .into_iter()
            .filter_map(|d| {
                let x = &a.generations[&d];
                let slot = x.slot?;
                if x.config.routing != Routing::Nat {
                    return None;
                }
                let mut by_band: Vec<Option<Vec<u16>>> = vec![None; x.config.workers as usize];
                for (_, w) in self.m.workers_of(app, d) {
                    let serving = w.ready && !w.reap_queued && w.state != WorkerState::Stopping;
                    if let Some(b) = by_band.get_mut(w.band as usize).filter(|_| serving) {
                        *b = Some(w.worker_ports().collect());
                    }
                }
                Some(DrainingRoute { slot, bands: by_band })
            })
            .take(gen_.config.max_draining as usize)
            .collect();
        let timeout = u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX);
        Some(Sessions { timeout, record: vec![slot; bands], draining })
    }
}
