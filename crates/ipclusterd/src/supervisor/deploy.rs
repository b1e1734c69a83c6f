//! Deploys: starting a generation (numbers, ports, launchers held at their gates, the scope),
//! waiting for every band to be ready, the cutover, and a failed deploy's clean-up.
//!
//! A failed deploy changes nothing a user sees: the generation's scope is stopped, its workers
//! leave ListWorkers, no rule ever named it, and only then is `DeployFailed` answered.

use std::{collections::BTreeSet, net::SocketAddr, os::fd::OwnedFd, path::PathBuf, sync::Arc};

use ipcluster_core::{
    config::{AppConfig, Overrides, Ready, Routing},
    model::{GenState, WorkerIdentity, WorkerState, scope_name, slice_name},
    name::AppName,
    saved::SavedGeneration,
};
use tracing::{info, warn};

use super::{
    BusSignal, Error, Supervisor,
    model::{Generation, HeldBand, Waiter, WorkerId},
    sockets::BandSockets,
    timers::TimerKey,
};
use crate::{
    clock::usec,
    netfilter::Router,
    process::SpawnSpec,
    processes::{Gated, Processes},
    scopes::{ScopeSpec, Scopes},
    state,
    steering::Steer,
};

/// What a new generation runs.
#[derive(Debug)]
pub(super) enum Source<'a> {
    /// The app file, with a Deploy's overrides.
    File(&'a Overrides),
    /// A config as it is (a rollback redeploys what an earlier generation ran).
    Config(Arc<AppConfig>),
}

/// A launcher held at its gate, with the daemon's copies of its sockets (socket mode).
#[derive(Debug)]
pub(super) struct Spawned<G> {
    pub gated: G,
    pub sockets: Vec<OwnedFd>,
    pub cookies: Vec<u64>,
}

/// Who a generation's workers run as and where they send notifications.
#[derive(Debug, Clone)]
pub(super) struct Launch {
    user: Option<(u32, u32)>,
    notify_socket: Option<String>,
    launcher: PathBuf,
}

/// The spec of a new scope for generation `g` of `config`'s app around `pids`.
pub(super) fn scope_spec(config: &AppConfig, g: u64, pids: Vec<u32>) -> ScopeSpec {
    ScopeSpec {
        unit: scope_name(&config.name, g),
        slice: slice_name(&config.name),
        description: format!("ipcluster {} generation {g}", config.name),
        pids,
        kill_signal: config.stop_signal.number(),
        stop_timeout: config.stop_timeout,
    }
}

impl<S: Scopes + Clone + 'static, R: Router + 'static, P: Processes, T: Steer> Supervisor<S, R, P, T> {
    /// Starts a deploy; `waiter` is answered at the cutover or once a failure is cleaned up.
    pub(super) async fn deploy(&mut self, app: &str, source: Source<'_>, waiter: Waiter) {
        match self.start_generation(app, source).await {
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
    async fn start_generation(&mut self, app: &str, source: Source<'_>) -> Result<(AppName, u64), Error> {
        let name = self.app_name(app)?;
        let a = &self.m.apps[&name];
        if let Some(g) = a.deploying() {
            return Err(Error::Busy(format!("{name} is already deploying generation {g}")));
        }
        let config = match source {
            Source::File(overrides) => Arc::new(
                a.file_config(&name)?
                    .with_overrides(overrides)
                    .map_err(|e| Error::InvalidArgs(e.to_string()))?,
            ),
            Source::Config(c) => c,
        };
        let launch = self.launch_context(&config)?;
        // A generation that could never be routed is not started (socket mode needs no rules:
        // its steering is loaded with the first socket, and a failure there fails the deploy).
        if config.routing == Routing::Nat {
            self.deps.router.check().map_err(|e| Error::DeployFailed(format!("cannot route {name}: {e}")))?;
        }
        let mut ports = self.allocate_ports(&config, config.workers as usize)?.into_iter();

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
        if let Err(e) = state::save(&self.deps.state_file, &self.saved) {
            self.forget_start(&name, g);
            return Err(Error::DeployFailed(format!("cannot save the generation counter: {e}")));
        }

        // Fork every band's launcher, held at its gate; with spawn_interval only the first band
        // now, the others one by one into the scope later.
        let first = if config.spawn_interval.is_zero() { config.workers } else { 1 };
        let mut gated = Vec::new();
        for (band, my_ports) in (0..first).zip(ports.by_ref()) {
            match self.spawn_band(&config, g, band, &my_ports, &launch) {
                Ok(p) => gated.push((band, my_ports, p)),
                // Dropping `gated` closes every gate: the launchers exit without running anything.
                Err(e) => {
                    self.forget_start(&name, g);
                    return Err(Error::DeployFailed(format!("band {band}: cannot start: {e}")));
                }
            }
        }
        let spec = scope_spec(&config, g, gated.iter().map(|(_, _, p)| p.gated.pid()).collect());
        if let Err(e) = self.deps.scopes.start(&spec).await {
            self.forget_start(&name, g);
            return Err(Error::DeployFailed(format!("cannot create scope {}: {e}", spec.unit)));
        }

        let held = (first..config.workers).zip(ports).map(|(band, ports)| HeldBand { band, ports }).collect();
        let generation = Generation {
            state: GenState::Starting,
            config: config.clone(),
            started: self.now(),
            retired_at: None,
            scope: spec.unit,
            waiting: vec![],
            failure: None,
            held,
        };
        self.m.apps.get_mut(&name).expect("checked above").generations.insert(g, generation);
        self.enter(&name, g, GenState::Starting);

        let mut failure = None;
        if config.routing == Routing::Socket
            && let Err(e) = self.stage(&name, g)
        {
            failure = Some(format!("cannot prepare the steering: {e}"));
        }
        for (band, my_ports, p) in gated {
            if let Err(e) = self.release(&name, g, band, my_ports, p, &config) {
                failure.get_or_insert(e);
            }
        }
        if !config.spawn_interval.is_zero() && config.workers > 1 {
            self.timers
                .set(TimerKey::ReleaseNext { app: name.clone(), generation: g }, config.spawn_interval);
        }
        // Every band gets ready_timeout from its own start.
        let timeout = config.ready_timeout + config.spawn_interval * config.workers.saturating_sub(1);
        self.timers.set(TimerKey::ReadyTimeout { app: name.clone(), generation: g }, timeout);
        if let Some(reason) = failure {
            self.fail(&name, g, reason);
        }
        Ok((name, g))
    }

    /// Undoes step 1 of a start that went no further.
    fn forget_start(&mut self, app: &AppName, g: u64) {
        if let Some(a) = self.saved.apps.get_mut(app) {
            a.generations.remove(&g);
        }
        if let Err(e) = state::save(&self.deps.state_file, &self.saved) {
            warn!("cannot write {}: {e}", self.deps.state_file.display());
        }
    }

    /// Who workers run as and where they notify: resolved once per generation.
    pub(super) fn launch_context(&self, config: &AppConfig) -> Result<Launch, Error> {
        let user = match &config.user {
            Some(u) => Some(self.deps.processes.user(u).map_err(Error::InvalidConfig)?),
            None => None,
        };
        let notify_socket = match config.ready {
            Ready::Notify => Some(
                self.deps
                    .notify_socket
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
    /// and free on the host. One list per worker, in `listen` order (empty in socket mode).
    pub(super) fn allocate_ports(
        &mut self,
        config: &AppConfig,
        workers: usize,
    ) -> Result<Vec<Vec<(SocketAddr, u16)>>, Error> {
        if config.routing == Routing::Socket {
            return Ok(vec![Vec::new(); workers]);
        }
        let held: BTreeSet<u16> = self.m.workers.values().flat_map(|w| w.ports.iter().map(|p| p.1)).collect();
        let per = config.listen.len();
        let processes = &self.deps.processes;
        let ports = self
            .ports
            .allocate(config.port_range, workers * per, &held, |p| processes.port_is_free(p))
            .ok_or_else(|| {
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

    /// Forks the launcher of one worker, held at its gate (in socket mode with its sockets,
    /// bound here).
    pub(super) fn spawn_band(
        &mut self,
        config: &AppConfig,
        generation: u64,
        band: u32,
        ports: &[(SocketAddr, u16)],
        launch: &Launch,
    ) -> Result<Spawned<P::Gated>, String> {
        let BandSockets { kept, handed, cookies } = self.bind_band(config)?;
        let identity = WorkerIdentity {
            app: config.name.clone(),
            generation,
            band,
            bands: config.workers,
            ports: ports.to_vec(),
        };
        let gated = self
            .deps
            .processes
            .spawn(&SpawnSpec {
                argv: config.command.clone(),
                env: identity.environment(config, launch.notify_socket.as_deref()),
                cwd: config.working_directory.clone(),
                user: launch.user,
                identifier: config.name.to_string(),
                unit: scope_name(&config.name, generation),
                launcher: launch.launcher.clone(),
                fds: handed,
            })
            .map_err(|e| e.to_string())?;
        Ok(Spawned { gated, sockets: kept, cookies })
    }

    /// Lets a held launcher (already in its scope) run, in a cgroup of its own, and starts
    /// following it (and probing it, for `ready = "tcp"`).
    pub(super) fn release(
        &mut self,
        app: &AppName,
        g: u64,
        band: u32,
        ports: Vec<(SocketAddr, u16)>,
        spawned: Spawned<P::Gated>,
        config: &AppConfig,
    ) -> Result<WorkerId, String> {
        let Spawned { gated, sockets, cookies } = spawned;
        let pid = gated.pid();
        let cgroup = match self.deps.processes.isolate(pid) {
            Ok(c) => Some(c),
            Err(e) => {
                warn!(app = %app, generation = g, band, pid, "cannot give the worker a cgroup of its own ({e}); stopping it will not reach what it forks");
                None
            }
        };
        let handle = gated.release().map_err(|e| format!("band {band}: cannot start: {e}"))?;
        let id = self.add_worker(app, g, band, pid, ports, handle, cgroup, self.now());
        if let Some(w) = self.m.workers.get_mut(&id) {
            (w.sockets, w.cookies) = (sockets, cookies);
        }
        self.ports_changed();
        if config.ready == Ready::Tcp {
            self.start_probe(id);
        }
        Ok(id)
    }

    /// Starts one worker of an existing generation inside its scope: forked at its gate, moved
    /// into the scope (created again if every worker died and systemd removed it), released.
    pub(super) async fn launch_into_scope(
        &mut self,
        app: &AppName,
        generation: u64,
        band: u32,
        ports: Vec<(SocketAddr, u16)>,
    ) -> Result<WorkerId, String> {
        let Some(gen_) = self.m.generation(app, generation) else { return Err("no such generation".into()) };
        let (config, scope) = (gen_.config.clone(), gen_.scope.clone());
        let launch = self.launch_context(&config).map_err(|e| e.to_string())?;
        let spawned = self.spawn_band(&config, generation, band, &ports, &launch)?;
        let pid = spawned.gated.pid();
        if let Err(e) = self.deps.scopes.attach(&scope, &[pid]).await {
            let spec = scope_spec(&config, generation, vec![pid]);
            self.deps.scopes.start(&spec).await.map_err(|e2| format!("{e}; {e2}"))?;
        }
        let id = self.release(app, generation, band, ports, spawned, &config)?;
        let pid = self.m.workers.get(&id).map_or(0, |w| w.pid);
        info!(app = %app, generation, band, pid, "{app}: started pid {pid} for band {band} of generation {generation}");
        Ok(id)
    }

    /// Starts the next held band of a paced generation (spawn_interval).
    pub(super) async fn release_next(&mut self, app: &AppName, generation: u64) {
        let Some(gen_) = self.m.generation_mut(app, generation) else { return };
        let Some(HeldBand { band, ports }) = gen_.held.pop_front() else { return };
        let (more, interval) = (!gen_.held.is_empty(), gen_.config.spawn_interval);
        if let Err(e) = self.launch_into_scope(app, generation, band, ports).await {
            self.fail(app, generation, format!("band {band}: cannot start: {e}"));
            return;
        }
        if more {
            self.timers.set(TimerKey::ReleaseNext { app: app.clone(), generation }, interval);
        }
    }

    /// When every band of a starting generation is ready: cutover.
    pub(super) async fn check_ready(&mut self, app: &AppName, g: u64) {
        let Some(gen_) = self.m.generation(app, g) else { return };
        if gen_.state != GenState::Starting {
            return;
        }
        let bands = gen_.config.workers as usize;
        if self.m.workers_of(app, g).filter(|(_, w)| w.ready).count() == bands {
            self.cutover(app, g).await;
        }
    }

    /// Steps 4–5: one transaction switches every band to generation `g`; once it is applied,
    /// `g`'s workers are live and the previous live generation is retired.
    async fn cutover(&mut self, app: &AppName, g: u64) {
        let previous = self.m.apps[app].live_except(g);
        let started = tokio::time::Instant::now();
        if let Err(e) = self.route_to(app, g).await {
            self.fail(app, g, format!("cutover failed: {e}"));
            return;
        }
        info!(app = %app, generation = g, "{app}: cutover to generation {g} in {:.3} ms", started.elapsed().as_secs_f64() * 1e3);
        self.metrics.cutover.entry(app.to_string()).or_default().observe(started.elapsed().as_secs_f64());
        self.metrics.deploys.entry(app.to_string()).or_default().0 += 1;
        self.timers.cancel(&TimerKey::ReadyTimeout { app: app.clone(), generation: g });
        for id in self.m.ids_of(app, g) {
            if let Some(w) = self.m.workers.get_mut(&id) {
                w.state = WorkerState::Live;
            }
        }
        if let Some(a) = self.m.apps.get_mut(app) {
            a.stopped = false;
        }
        self.enter(app, g, GenState::Live);
        for p in previous {
            self.retire_generation(app, p);
        }
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
                let own: Vec<u16> = self
                    .deps
                    .processes
                    .listeners(w.pid, w.cgroup.as_deref(), &w.worker_ports())
                    .into_iter()
                    .map(|(p, _)| p)
                    .collect();
                format!(
                    "band {}: not ready after {timeout:?}{}",
                    w.band,
                    self.ports_taken(&w.worker_ports(), &own)
                )
            }
            None => format!("not ready after {timeout:?}"),
        };
        self.fail(app, g, reason);
    }

    /// A starting generation failed: stop its scope; the callers are answered once it is gone.
    pub(super) fn fail(&mut self, app: &AppName, g: u64, reason: String) {
        let Some(gen_) = self.m.generation_mut(app, g) else { return };
        if gen_.state != GenState::Starting {
            return;
        }
        warn!(app = %app, generation = g, "{app}: deploy of generation {g} failed: {reason}");
        self.metrics.deploys.entry(app.to_string()).or_default().1 += 1;
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
