//! HTTP health checks (issue 24): every `health_interval`, each worker of a generation with a
//! `health_path` — starting ones included — is checked once (see [`crate::checker`]); the
//! outcome comes back as [`Event::Checked`].
//!
//! - `ready = "http"`: a worker that holds its ports (or sent `READY=1`) is ready only once a
//!   check passes; until then it is checked again every half second at most (within
//!   `ready_timeout`, as any readiness).
//! - A live worker that fails `health_failures` checks in a row is replaced as a hung one is: a
//!   replacement starts, its band moves once it is ready, the old one is retired
//!   (`retire_rate` applies). At most one band of an app is replaced for health at a time, and
//!   none while more than half of its live workers fail at once — a shared cause, reported
//!   instead ([`ipcluster_core::checks::decide`]).
//! - A canary's worker failing one check rolls the canary back when it has `canary_for`.
//!
//! Where a check goes: in NAT mode the worker's own port on the loopback address of its first
//! `listen` entry's family; in socket mode the public address from the steering program's probe
//! source for the worker's generation and band (the kernel hands the connection to that very
//! socket, whatever table is in force; the probe is never recorded as a session).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use ipcluster_core::{
    checks::{Checked, Decision, Outcome, decide},
    config::{Ready, Routing},
    model::{GenState, WorkerState},
    name::AppName,
};
use tracing::{info, warn};

use super::{Event, PolicyAction, Supervisor, model::WorkerId, timers::TimerKey};
use crate::{
    checker::{Checker, Target},
    world::World,
};

/// The longest pause between two readiness checks of a `ready = "http"` worker.
const READY_RETRY: Duration = Duration::from_millis(500);

impl<W: World> Supervisor<W> {
    /// Starts the health rounds of generation `g`, if its app checks health.
    pub(super) fn start_health(&mut self, app: &AppName, g: u64) {
        if let Some(h) = self.m.config(app, g).and_then(|c| c.health.clone()) {
            self.timers.set(TimerKey::HealthRound { app: app.clone(), generation: g }, h.interval);
        }
    }

    /// A round: every starting or serving worker of `g` is checked; the next round is set while
    /// the generation serves.
    pub(super) fn health_round(&mut self, app: &AppName, g: u64) {
        let Some(gen_) = self.m.generation(app, g) else { return };
        if !matches!(gen_.state, GenState::Starting | GenState::Live | GenState::Canary) {
            return;
        }
        let Some(h) = gen_.config.health.clone() else { return };
        let ids: Vec<WorkerId> = self
            .m
            .workers_of(app, g)
            .filter(|(_, w)| matches!(w.state, WorkerState::Starting | WorkerState::Live))
            .map(|(id, _)| id)
            .collect();
        for id in ids {
            self.check_worker(id);
        }
        self.timers.set(TimerKey::HealthRound { app: app.clone(), generation: g }, h.interval);
    }

    /// Starts one check of a worker (none while one is running).
    pub(super) fn check_worker(&mut self, id: WorkerId) {
        let Some(w) = self.m.workers.get(&id) else { return };
        if w.health.in_flight {
            return;
        }
        let Some(config) = self.m.config(&w.app, w.generation) else { return };
        let Some(h) = config.health.clone() else { return };
        let target = match self.check_target(id) {
            Ok(t) => t,
            Err(why) => {
                let tx = self.events_tx.clone();
                let _ = tx.send(Event::Checked { id, outcome: Outcome::Failed(why) });
                return;
            }
        };
        if let Some(w) = self.m.workers.get_mut(&id) {
            w.health.in_flight = true;
        }
        let check = self.deps.checker.check(target, h.path, h.timeout);
        let tx = self.events_tx.clone();
        tokio::spawn(async move {
            let outcome = check.await;
            let _ = tx.send(Event::Checked { id, outcome });
        });
    }

    /// Where a check of worker `id` goes (see the module's doc).
    fn check_target(&self, id: WorkerId) -> Result<Target, String> {
        let w = self.m.workers.get(&id).ok_or("no such worker")?;
        let config = self.m.config(&w.app, w.generation).ok_or("no such generation")?;
        match config.routing {
            Routing::Nat => {
                let (public, port) = *w.plumbing.ports().first().ok_or("the worker has no port")?;
                let ip: IpAddr =
                    if public.is_ipv4() { Ipv4Addr::LOCALHOST.into() } else { Ipv6Addr::LOCALHOST.into() };
                Ok(Target { addr: SocketAddr::new(ip, port), source: None })
            }
            Routing::Socket => {
                let public = config.listen[0];
                let ip: IpAddr = match public.ip() {
                    ip if ip.is_unspecified() => Ipv4Addr::LOCALHOST.into(),
                    ip => ip,
                };
                let source = self.probe_source(&w.app, w.generation, w.band)?;
                Ok(Target { addr: SocketAddr::new(ip, public.port()), source: Some(source) })
            }
        }
    }

    /// `ready = "http"`: a worker that holds its ports (or sent `READY=1`) waits for a passing
    /// check. True when it may be ready now.
    ///
    /// Socket mode: a check reaches a worker through its generation's table (the probe path),
    /// so a worker whose band that table does not route yet (a starting generation, a band a
    /// canary's promotion started) joins it first. A worker of a band its table routes (a
    /// respawn or replacement in a live generation, a canary's own band) would take clients the
    /// moment it joined, and until it joins the probe reaches its predecessor: it is ready at
    /// `READY=1`, as with `notify`, and checked from then on (a failing one is replaced after
    /// `health_failures` checks).
    pub(super) fn ready_after_check(&mut self, id: WorkerId) -> bool {
        let Some(w) = self.m.workers.get(&id) else { return false };
        let Some(config) = self.m.config(&w.app, w.generation) else { return false };
        if config.ready != Ready::Http || w.health.passed {
            return true;
        }
        if config.routing == Routing::Socket {
            let (app, g, band) = (w.app.clone(), w.generation, w.band);
            let routed = match self.m.gen_state(&app, g) {
                Some(GenState::Starting) => false,
                Some(GenState::Canary) => self.is_canary_band(&app, g, band),
                _ => true,
            };
            if routed {
                return true;
            }
            if let Err(e) = self.steer_to(id) {
                // Ready now: worker_ready steers to it again and fails it, saying why.
                warn!(app = %app, generation = g, band, "{app}: cannot put band {band}'s new worker in its table to check it: {e}");
                return true;
            }
        }
        if let Some(w) = self.m.workers.get_mut(&id) {
            w.health.waiting = true;
            w.probe = None;
        }
        self.check_worker(id);
        false
    }

    /// A check came back.
    pub(super) async fn checked(&mut self, id: WorkerId, outcome: Outcome) {
        let now = self.now();
        let Some(w) = self.m.workers.get_mut(&id) else { return };
        w.health.in_flight = false;
        let passed = outcome.passed();
        w.health.failures = if passed { 0 } else { w.health.failures.saturating_add(1) };
        w.health.last = Some((outcome.clone(), now));
        let (app, g, band, pid, state, ready) =
            (w.app.clone(), w.generation, w.band, w.pid, w.state, w.ready);
        if !ready {
            if !w.health.waiting {
                return;
            }
            if passed {
                w.health.passed = true;
                w.health.waiting = false;
                self.worker_ready(id).await;
            } else {
                let retry = self
                    .m
                    .config(&app, g)
                    .and_then(|c| c.health.as_ref().map(|h| h.interval))
                    .unwrap_or(READY_RETRY);
                self.timers.set(TimerKey::ReadyCheck(id), retry.min(READY_RETRY));
            }
            return;
        }
        if passed || state != WorkerState::Live {
            if passed {
                self.health_recovered(&app);
            }
            return;
        }
        if self.m.gen_state(&app, g) == Some(GenState::Canary) {
            let why = format!("band {band} pid {pid} failed a health check ({outcome})");
            if self.canary_trouble(&app, g, why).await {
                return;
            }
        }
        self.health_policy(&app).await;
    }

    /// Replaces the app's unhealthy live worker, if one may be replaced now (see the module's
    /// doc).
    async fn health_policy(&mut self, app: &AppName) {
        let live: Vec<(Checked, u64, u32, u32)> = self
            .m
            .workers_of_app(app)
            .filter(|(_, w)| w.state == WorkerState::Live && w.ready)
            .filter_map(|(id, w)| {
                let h = self.m.config(app, w.generation)?.health.clone()?;
                Some((
                    Checked { id, band: w.band, failures: w.health.failures },
                    w.generation,
                    w.pid,
                    h.failures,
                ))
            })
            .collect();
        let Some(threshold) = live.iter().map(|x| x.3).min() else { return };
        let under_way = self.m.workers_of_app(app).any(|(_, w)| {
            w.replaces
                .and_then(|o| self.m.workers.get(&o))
                .is_some_and(|old| old.stop_reason == Some("health"))
        });
        let checked: Vec<Checked> = live.iter().map(|x| x.0).collect();
        match decide(&checked, threshold, under_way) {
            Decision::Wait => {}
            Decision::Shared { unhealthy, live: all } => {
                let a = self.m.apps.entry(app.clone()).or_default();
                if !std::mem::replace(&mut a.health_shared, true) {
                    let why = format!(
                        "{unhealthy} of {all} live workers fail their health checks at once: a shared cause (a dependency down?) is likely; none is replaced until fewer fail"
                    );
                    self.held_back(app, 0, 0, 0, why);
                }
            }
            Decision::Replace(id) => {
                let Some((c, g, pid, _)) = live.iter().find(|x| x.0.id == id).copied() else { return };
                let Some(config) = self.m.config(app, g) else { return };
                let last = self
                    .m
                    .workers
                    .get(&id)
                    .and_then(|w| w.health.last.clone())
                    .map(|(o, _)| o.to_string())
                    .unwrap_or_default();
                let why = format!("{} failed health checks in a row ({last})", c.failures);
                if !self.retirement_allowed(app, config.retire_rate) {
                    self.held_back(
                        app,
                        g,
                        c.band,
                        pid,
                        format!("{why}; retirement held back by retire_rate"),
                    );
                    return;
                }
                warn!(app = %app, generation = g, band = c.band, pid, "{app}: band {} pid {pid}: {why}; replacing it", c.band);
                self.count(app, PolicyAction::Health);
                self.replace_band(app, g, c.band, id, "health").await;
                let note = format!("replaced pid {pid}: {why}");
                if let Some(new) = self.m.workers.values_mut().find(|w| w.replaces == Some(id)) {
                    new.health.note = Some(note);
                }
            }
        }
    }

    /// A check passed: a shared failure reported before is over when no live worker fails now.
    fn health_recovered(&mut self, app: &AppName) {
        let failing =
            self.m.workers_of_app(app).any(|(_, w)| w.state == WorkerState::Live && w.health.failures > 0);
        let Some(a) = self.m.apps.get_mut(app) else { return };
        if a.health_shared && !failing {
            a.health_shared = false;
            info!(app = %app, "{app}: every live worker passes its health checks again");
        }
    }
}
