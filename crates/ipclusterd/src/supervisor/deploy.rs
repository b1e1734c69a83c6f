//! Deploys: starting a generation (numbers, ports, workers forked and held at their gates, the scope),
//! waiting for every band to be ready, the cutover, and a failed deploy's clean-up.
//!
//! A failed deploy changes nothing a user sees: the generation's scope is stopped, its workers
//! leave ListWorkers, no rule ever named it, and only then is `DeployFailed` answered.

use std::{collections::BTreeSet, sync::Arc};

use ipcluster_core::{
    config::{AppConfig, Overrides, Routing},
    model::{GenState, WorkerState},
    name::AppName,
    saved::SavedGeneration,
};
use tracing::{info, warn};

use super::{
    BusSignal, CanaryRequest, Error, Supervisor,
    launch::{release_delay, scope_spec},
    model::{Generation, HeldBand, Waiter, WorkerId},
    timers::TimerKey,
};
use crate::{
    clock::usec,
    netfilter::Router,
    processes::{Gated as _, Inspector},
    scopes::Scopes,
    state::Store,
    world::World,
};

/// What a new generation runs.
#[derive(Debug)]
pub(super) enum Source<'a> {
    /// The app file, with a Deploy's overrides.
    File(&'a Overrides),
    /// A config as it is (a rollback redeploys what an earlier generation ran).
    Config(Arc<AppConfig>),
}

impl<W: World> Supervisor<W> {
    /// Starts a deploy; `waiter` is answered at the cutover or once a failure is cleaned up.
    pub(super) async fn deploy(&mut self, app: &str, source: Source<'_>, waiter: Waiter) {
        self.deploy_with(app, source, None, waiter).await;
    }

    /// Starts a deploy, of a canary with `canary`; `waiter` is answered at the (canary's)
    /// cutover or once a failure is cleaned up.
    pub(super) async fn deploy_with(
        &mut self,
        app: &str,
        source: Source<'_>,
        canary: Option<CanaryRequest>,
        waiter: Waiter,
    ) {
        match self.start_generation(app, source, canary).await {
            Ok((name, g)) => {
                if let Some(gen_) = self.m.generation_mut(&name, g) {
                    gen_.waiting.push(waiter);
                }
            }
            Err(e) => {
                // A deploy that could not start (no process ran) is in the journal too.
                if let Error::DeployFailed(why) = &e {
                    warn!(app, "{app}: deploy failed: {why}");
                }
                self.answer(waiter, Err(e));
            }
        }
    }

    /// Steps 1–2 of a deploy. On error nothing is left behind: no generation, no process, no
    /// scope, no saved record.
    async fn start_generation(
        &mut self,
        app: &str,
        source: Source<'_>,
        canary: Option<CanaryRequest>,
    ) -> Result<(AppName, u64), Error> {
        let name = self.app_name(app)?;
        let a = &self.m.apps[&name];
        if let Some(g) = a.deploying() {
            return Err(Error::Busy(format!("{name} is already deploying generation {g}")));
        }
        if let Some(c) = a.canary()
            && canary.is_none()
        {
            return Err(Error::Busy(format!(
                "{name} generation {c} is a canary: promote it (ipclusterctl promote {name}), roll it back (ipclusterctl rollback {name}), or deploy a new canary (--canary K), which replaces it"
            )));
        }
        let config = match source {
            Source::File(overrides) => Arc::new(
                a.file_config(&name)?
                    .with_overrides(overrides)
                    .map_err(|e| Error::InvalidArgs(e.to_string()))?,
            ),
            Source::Config(c) => c,
        };
        let split = match canary {
            Some(req) => Some(self.canary_split(&name, &config, req)?),
            None => None,
        };
        // The bands it starts with: a canary's, or every band.
        let bands: Vec<u32> = match &split {
            Some(c) => c.bands.clone(),
            None => (0..config.workers).collect(),
        };
        let a = &self.m.apps[&name];
        let launch = self.launch_context(&config)?;
        // A generation that could never be routed is not started (socket mode needs no rules:
        // its steering is loaded with the first socket, and a failure there fails the deploy).
        if config.routing == Routing::Nat {
            self.deps.router.check().map_err(|e| Error::DeployFailed(format!("cannot route {name}: {e}")))?;
        }
        // Its slot: in socket mode always (its tables), in NAT mode with session affinity (its
        // session sets). The live generation, this one and at most max_draining ≤ 6 draining
        // ones leave one free; in socket mode a merely retired generation gives its slot up.
        let slot = if config.routing == Routing::Socket {
            Some(self.socket_slot(&name)?)
        } else if config.session_affinity.is_some() {
            Some(a.free_slot().ok_or_else(|| {
                Error::Busy(format!(
                    "{name}: every session slot is held by a running generation; reap one (KillRetired)"
                ))
            })?)
        } else {
            None
        };
        let ports = self.allocate_ports(&config, bands.len())?;
        // Other hosts must never reach a worker port, not even in the moment a new worker
        // listens before the rules say so: its ports are guarded before it can run.
        self.guard_before_launch(&name, &ports).await;
        let mut ports = ports.into_iter();

        // Saved as starting before any process exists: a daemon killed from here on finds it on
        // restart and stops it. A number that could not be saved is never used.
        let g = self.saved.next_generation(&name);
        let now = self.now();
        self.saved
            .apps
            .entry(name.clone())
            .or_default()
            .generations
            .insert(g, SavedGeneration::of(GenState::Starting, usec(now), &config));
        if let Err(e) = self.deps.store.save_now(&self.saved) {
            self.forget_start(&name, g);
            return Err(Error::DeployFailed(format!("cannot save the generation counter: {e}")));
        }

        // Fork every band's worker, held at its gate; with spawn_interval only the first band
        // now, the others one by one into the scope later.
        let first = if config.spawn_interval.is_zero() { bands.len() } else { 1 };
        let mut gated = Vec::new();
        for (i, (band, my_ports)) in bands[..first].iter().copied().zip(ports.by_ref()).enumerate() {
            match self.spawn_band(&config, g, band, &my_ports, &launch, release_delay(i, first)) {
                Ok(p) => gated.push((band, p)),
                // Dropping `gated` closes every gate: the children exit without running anything.
                Err(e) => {
                    self.forget_start(&name, g);
                    return Err(Error::DeployFailed(format!("band {band}: cannot start: {e}")));
                }
            }
        }
        let spec = scope_spec(&config, g, gated.iter().map(|(_, p)| p.gated.pid()).collect());
        if let Err(e) = self.deps.scopes.start(&spec).await {
            self.forget_start(&name, g);
            return Err(Error::DeployFailed(format!("cannot create scope {}: {e}", spec.unit)));
        }

        let held =
            bands[first..].iter().copied().zip(ports).map(|(band, ports)| HeldBand { band, ports }).collect();
        let generation = Generation {
            state: GenState::Starting,
            config: config.clone(),
            started: self.now(),
            retired_at: None,
            scope: spec.unit,
            waiting: vec![],
            failure: None,
            held,
            slot,
            canary: split,
        };
        self.m.apps.get_mut(&name).expect("checked above").generations.insert(g, generation);
        self.enter(&name, g, GenState::Starting);
        self.start_health(&name, g);

        let mut failure = None;
        if config.routing == Routing::Socket
            && let Err(e) = self.stage(&name, g)
        {
            failure = Some(format!("cannot prepare the steering: {e}"));
        }
        for (band, p) in gated {
            if let Err(e) = self.release(&name, g, band, p, &config) {
                failure.get_or_insert(e);
            }
        }
        self.launched(&name);
        if !config.spawn_interval.is_zero() && bands.len() > 1 {
            self.timers
                .set(TimerKey::ReleaseNext { app: name.clone(), generation: g }, config.spawn_interval);
        }
        // Every band gets ready_timeout from its own start (paced by spawn_interval, or the
        // last of those released together after its wait).
        let timeout = config.ready_timeout
            + config.spawn_interval * (bands.len() as u32).saturating_sub(1)
            + release_delay(first.saturating_sub(1), first);
        self.timers.set(TimerKey::ReadyTimeout { app: name.clone(), generation: g }, timeout);
        if let Some(reason) = failure {
            self.fail(&name, g, reason);
        }
        Ok((name, g))
    }

    /// Undoes step 1 of a start that went no further.
    fn forget_start(&mut self, app: &AppName, g: u64) {
        self.launched(app);
        if let Some(a) = self.saved.apps.get_mut(app) {
            a.generations.remove(&g);
        }
        self.deps.store.save(&self.saved);
        self.unsaved = true;
    }

    /// When every band of a starting generation is ready: cutover (of a canary's bands, for a
    /// canary; of every band, for a canary being promoted).
    pub(super) async fn check_ready(&mut self, app: &AppName, g: u64) {
        let Some(gen_) = self.m.generation(app, g) else { return };
        let needed = match (&gen_.canary, gen_.state) {
            (Some(c), GenState::Starting) => c.bands.len(),
            (Some(c), GenState::Canary) if c.promoting => gen_.config.workers as usize,
            (None, GenState::Starting) => gen_.config.workers as usize,
            _ => return,
        };
        let canary_start = gen_.state == GenState::Starting && gen_.canary.is_some();
        let ready: BTreeSet<u32> =
            self.m.workers_of(app, g).filter(|(_, w)| w.ready).map(|(_, w)| w.band).collect();
        if ready.len() < needed {
            return;
        }
        if canary_start {
            self.canary_cutover(app, g).await;
        } else {
            self.cutover(app, g).await;
        }
    }

    /// Steps 4–5: one transaction switches every band to generation `g`; once it is applied,
    /// `g`'s workers are live and the previous live generation is retired. A canary's cutover
    /// here is its promotion.
    async fn cutover(&mut self, app: &AppName, g: u64) {
        let previous = self.m.apps[app].live_except(g);
        let promoted = self.m.gen_state(app, g) == Some(GenState::Canary);
        let started = tokio::time::Instant::now();
        if let Err(e) = self.route_to(app, g).await {
            self.fail(app, g, format!("cutover failed: {e}"));
            return;
        }
        info!(app = %app, generation = g, "{app}: cutover to generation {g} in {:.3} ms", started.elapsed().as_secs_f64() * 1e3);
        self.metrics.cutover.entry(app.to_string()).or_default().observe(started.elapsed().as_secs_f64());
        let counts = self.metrics.deploys.entry(app.to_string()).or_default();
        if promoted {
            counts.promoted += 1
        } else {
            counts.ok += 1
        }
        self.timers.cancel(&TimerKey::ReadyTimeout { app: app.clone(), generation: g });
        for id in self.m.ids_of(app, g) {
            if let Some(w) = self.m.workers.get_mut(&id) {
                w.state = WorkerState::Live;
            }
        }
        if let Some(a) = self.m.apps.get_mut(app) {
            a.stopped = false;
        }
        if promoted {
            self.canary_promoted(app, g);
        }
        self.enter(app, g, GenState::Live);
        for p in previous {
            self.retire_generation(app, p);
        }
        self.limit_draining(app);
        let waiting: Vec<Waiter> =
            self.m.generation_mut(app, g).map(|x| x.waiting.drain(..).collect()).unwrap_or_default();
        for w in waiting {
            self.answer(w, Ok(g));
        }
    }

    /// Sends `app`'s new connections to generation `g`: one rule transaction (NAT), or one map
    /// update per listen entry (socket mode; then the rules an earlier NAT generation of the
    /// app had go).
    pub(super) async fn route_to(&mut self, app: &AppName, g: u64) -> Result<(), String> {
        let routing = self.m.config(app, g).map_or(Routing::Nat, |c| c.routing);
        let others_nat = self.m.apps[app]
            .generations
            .iter()
            .any(|(n, x)| *n != g && x.state == GenState::Live && x.config.routing == Routing::Nat);
        if routing == Routing::Socket {
            self.switch_to(app, g)?;
            if !others_nat {
                return Ok(());
            }
        }
        self.deps.router.apply(&self.routes(Some((app, g)))).await.map(|_| ()).map_err(|e| e.to_string())
    }

    /// `ready_timeout` passed with bands not ready.
    pub(super) fn ready_timeout(&mut self, app: &AppName, g: u64) {
        let Some(gen_) = self.m.generation(app, g) else { return };
        let timeout = gen_.config.ready_timeout;
        let late =
            self.m.workers_of(app, g).filter(|(_, w)| !w.ready).min_by_key(|(_, w)| w.band).map(|(_, w)| w);
        let reason = match late {
            Some(w) => {
                let ports: Vec<u16> = w.worker_ports().collect();
                let mut why = self.ports_taken(&ports, Some((w.pid, w.cgroup.as_deref())));
                let own = self.deps.inspector.listeners(w.pid, w.cgroup.as_deref(), &ports);
                if why.is_empty() && !ports.is_empty() && own.len() == ports.len() {
                    why = " (it listens on its ports, but not in every address family the app routes to them: listen on [::]:$PORT)".into();
                }
                format!("band {}: not ready after {timeout:?}{why}", w.band)
            }
            None => format!("not ready after {timeout:?}"),
        };
        self.fail(app, g, reason);
    }

    /// A starting generation failed: stop its scope; the callers are answered once it is gone.
    pub(super) fn fail(&mut self, app: &AppName, g: u64, reason: String) {
        let Some(gen_) = self.m.generation_mut(app, g) else { return };
        if gen_.state == GenState::Canary {
            self.promotion_failed(app, g, reason);
            return;
        }
        if gen_.state != GenState::Starting {
            return;
        }
        warn!(app = %app, generation = g, "{app}: deploy of generation {g} failed: {reason}");
        self.metrics.deploys.entry(app.to_string()).or_default().failed += 1;
        gen_.failure = Some(reason);
        gen_.held.clear();
        self.timers.cancel(&TimerKey::ReadyTimeout { app: app.clone(), generation: g });
        self.timers.cancel(&TimerKey::ReleaseNext { app: app.clone(), generation: g });
        self.enter(app, g, GenState::Failed);
        for id in self.m.ids_of(app, g) {
            if let Some(w) = self.m.workers.get_mut(&id) {
                if let Some(p) = w.probe.take() {
                    p.abort();
                }
                w.state = WorkerState::Stopping;
            }
        }
        self.scope_job(app, g, super::ScopeJob::Stop);
    }

    /// The scope of a failed generation is gone: its workers leave the lists, and the callers
    /// get `DeployFailed`.
    pub(super) fn failed_scope_stopped(&mut self, app: &AppName, g: u64, error: Option<String>) {
        let Some(gen_) = self.m.generation_mut(app, g) else { return };
        if gen_.state != GenState::Failed {
            return;
        }
        // Taken once: a second stop of the same scope finds nothing to do.
        let Some(mut reason) = gen_.failure.take() else { return };
        if let Some(e) = error {
            reason.push_str(&format!(" (and stopping its scope failed: {e})"));
        }
        let msg = format!("{app} generation {g}: {reason}; the previous generation keeps serving");
        let waiting: Vec<Waiter> = gen_.waiting.drain(..).collect();
        // The scope is gone, so are its processes: forget them now rather than when their exits
        // are read, so no caller sees a worker of a failed generation after DeployFailed.
        for id in self.m.ids_of(app, g) {
            self.forget_worker(id, "stopped (deploy failed)".into());
        }
        for w in waiting {
            self.answer(w, Err(Error::DeployFailed(msg.clone())));
        }
        self.trim_history(app);
    }

    /// Announces a worker's readiness on the bus.
    pub(super) fn announce_ready(&self, id: WorkerId) {
        if let Some(w) = self.m.workers.get(&id) {
            self.signal(BusSignal::WorkerReady {
                app: w.app.to_string(),
                generation: w.generation,
                band: w.band,
                pid: w.pid,
            });
        }
    }
}
