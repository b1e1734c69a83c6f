//! Launching workers: who they run as and where they notify, their ports (guarded before any of
//! them runs), their workers forked and held at their gates (in socket mode with their
//! sockets), put in their generation's scope and released; bands started later (a paced
//! generation's, a respawn's, a promotion's).

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use ipcluster_core::{
    config::{AppConfig, Routing},
    model::{WorkerIdentity, scope_name, slice_name},
    name::AppName,
};
use tracing::{info, warn};

use super::{
    Error, Supervisor,
    model::{HeldBand, Plumbing, WorkerId},
    sockets::BandSockets,
    timers::TimerKey,
};
use crate::{
    process::SpawnSpec,
    processes::{Gated as _, Inspector, Spawner},
    scopes::{ScopeSpec, Scopes},
    world::{Gated, World},
};

/// A worker held at its gate, with its ports (NAT) or the daemon's copies of its sockets
/// (socket mode).
#[derive(Debug)]
pub(super) struct Spawned<G> {
    pub gated: G,
    pub plumbing: Plumbing,
}

/// Who a generation's workers run as and where they send notifications.
#[derive(Debug, Clone)]
pub(super) struct Launch {
    user: Option<(u32, u32)>,
    notify_socket: Option<String>,
}

/// Between two workers released together, what the later one waits before it runs.
///
/// Released at once, a generation's workers start at once: each runs about a millisecond
/// without yielding (its journal stream, which journald answers, the exec, the program's own
/// start), and a deploy of 8 held the serving generation's requests behind them for 10 ms — the
/// p99.9 of every deploy window (2–3 × the steady p99.9). Neither the new workers' priority
/// (nice 5 or 19 from the fork) nor the launcher's cost was the cause; spacing the starts was
/// (the bench, with 5 ms: 1.04 ×).
pub(super) const RELEASE_SPACING: Duration = Duration::from_millis(4);
/// The most a batch's spacing may add to a deploy, whatever its size.
pub(super) const RELEASE_SPREAD_MAX: Duration = Duration::from_secs(1);

/// How long the `i`-th of `n` workers released together waits after its release.
pub(super) fn release_delay(i: usize, n: usize) -> Duration {
    let n = u32::try_from(n.max(1)).unwrap_or(u32::MAX);
    let spacing = RELEASE_SPACING.min(RELEASE_SPREAD_MAX / n);
    spacing * u32::try_from(i).unwrap_or(u32::MAX).min(n)
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

impl<W: World> Supervisor<W> {
    /// Guards `ports` (of workers about to run) now, in one rule transaction: a worker's
    /// ports are guarded before its first instruction. Their guard then follows the workers
    /// (and held bands) that hold them.
    pub(super) async fn guard_before_launch(&mut self, app: &AppName, ports: &[Vec<(SocketAddr, u16)>]) {
        let new: Vec<u16> = ports.iter().flatten().map(|p| p.1).collect();
        if new.is_empty() {
            return;
        }
        self.m.apps.entry(app.clone()).or_default().launching = new;
        self.sync_rules().await;
    }

    /// The workers [`Self::guard_before_launch`] guarded run now (or never will): their
    /// ports' guard follows the workers from here.
    pub(super) fn launched(&mut self, app: &AppName) {
        if let Some(a) = self.m.apps.get_mut(app) {
            a.launching.clear();
        }
        self.ports_changed();
    }

    /// Who workers run as and where they notify: resolved once per generation.
    pub(super) fn launch_context(&self, config: &AppConfig) -> Result<Launch, Error> {
        let user = match &config.user {
            Some(u) => Some(self.deps.spawner.user(u).map_err(Error::InvalidConfig)?),
            None => None,
        };
        let notify_socket = if config.ready.notifies(config.routing) {
            Some(
                self.deps
                    .notify_socket
                    .as_ref()
                    .ok_or_else(|| {
                        Error::DeployFailed(
                            "readiness needs READY=1, but the notify socket is not available".into(),
                        )
                    })?
                    .display()
                    .to_string(),
            )
        } else {
            None
        };
        Ok(Launch { user, notify_socket })
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
        let draining = self.m.apps.values().flat_map(|a| a.draining.keys().copied());
        let held: BTreeSet<u16> =
            self.m.workers.values().flat_map(|w| w.worker_ports()).chain(draining).collect();
        let per = config.listen.len();
        let inspector = &self.deps.inspector;
        let ports = self
            .ports
            .allocate(config.port_range, workers * per, &held, |p| inspector.port_is_free(p))
            .ok_or_else(|| {
                // Who holds the others (a local user can bind a whole range): named, up to a few.
                let (lo, hi) = config.port_range;
                let range: Vec<u16> = (lo..=hi).filter(|p| !held.contains(p)).collect();
                let holders = inspector.port_holders(None, &range);
                let by = match holders.len() {
                    0 => String::new(),
                    n if n <= 4 => format!("; held by other programs: {}", holders.join(", ")),
                    n => format!("; held by other programs: {}, and {} more", holders[..4].join(", "), n - 4),
                };
                Error::DeployFailed(format!("not enough free ports in {lo}-{hi} for {workers} workers{by}"))
            })?;
        Ok(ports
            .chunks(per)
            .map(|c| config.listen.iter().copied().zip(c.iter().copied()).collect())
            .collect())
    }

    /// Forks one worker, held at its gate, to run `delay` after its release (in socket mode with
    /// its sockets, bound here).
    pub(super) fn spawn_band(
        &mut self,
        config: &AppConfig,
        generation: u64,
        band: u32,
        ports: &[(SocketAddr, u16)],
        launch: &Launch,
        delay: Duration,
    ) -> Result<Spawned<Gated<W>>, String> {
        let BandSockets { kept, handed, cookies } = self.bind_band(config)?;
        let plumbing = match config.routing {
            Routing::Nat => Plumbing::nat(ports.to_vec()),
            Routing::Socket => Plumbing::Socket { sockets: kept, cookies },
        };
        let identity = WorkerIdentity {
            app: config.name.clone(),
            generation,
            band,
            bands: config.workers,
            ports: ports.to_vec(),
        };
        let gated = self
            .deps
            .spawner
            .spawn(&SpawnSpec {
                argv: config.command.clone(),
                env: identity.environment(config, launch.notify_socket.as_deref()),
                cwd: config.working_directory.clone(),
                user: launch.user,
                identifier: config.name.to_string(),
                unit: scope_name(&config.name, generation),
                fds: handed,
                delay,
            })
            .map_err(|e| e.to_string())?;
        Ok(Spawned { gated, plumbing })
    }

    /// Lets a held worker (already in its scope) run, in a cgroup of its own, and starts
    /// following it (and probing it, for `ready = "tcp"`).
    pub(super) fn release(
        &mut self,
        app: &AppName,
        g: u64,
        band: u32,
        spawned: Spawned<Gated<W>>,
        config: &AppConfig,
    ) -> Result<WorkerId, String> {
        let Spawned { gated, plumbing } = spawned;
        let pid = gated.pid();
        let cgroup = match self.deps.spawner.isolate(pid) {
            Ok(c) => Some(c),
            Err(e) => {
                warn!(app = %app, generation = g, band, pid, "cannot give the worker a cgroup of its own ({e}); stopping it will not reach what it forks");
                None
            }
        };
        let handle = gated.release().map_err(|e| format!("band {band}: cannot start: {e}"))?;
        let id = self.add_worker(app, g, band, pid, plumbing, handle, cgroup, self.now());
        self.ports_changed();
        if config.ready.holds_ports(config.routing) {
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
        self.guard_before_launch(app, std::slice::from_ref(&ports)).await;
        let released = self.spawn_into_scope(app, generation, band, &ports, &config, &scope, &launch).await;
        self.launched(app);
        let id = released?;
        let pid = self.m.workers.get(&id).map_or(0, |w| w.pid);
        info!(app = %app, generation, band, pid, "{app}: started pid {pid} for band {band} of generation {generation}");
        Ok(id)
    }

    /// Forks one worker at its gate, puts it in its generation's scope (made again if systemd
    /// removed it) and releases it.
    #[allow(clippy::too_many_arguments, reason = "one worker's launch, gathered in one place")]
    pub(super) async fn spawn_into_scope(
        &mut self,
        app: &AppName,
        generation: u64,
        band: u32,
        ports: &[(SocketAddr, u16)],
        config: &AppConfig,
        scope: &str,
        launch: &Launch,
    ) -> Result<WorkerId, String> {
        let spawned = self.spawn_band(config, generation, band, ports, launch, Duration::ZERO)?;
        let pid = spawned.gated.pid();
        if let Err(e) = self.deps.scopes.attach(scope, &[pid]).await {
            let spec = scope_spec(config, generation, vec![pid]);
            self.deps.scopes.start(&spec).await.map_err(|e2| format!("{e}; {e2}"))?;
        }
        self.release(app, generation, band, spawned, config)
    }

    /// Starts `bands` of an existing generation at once (a canary's promotion): their ports
    /// guarded in one rule change, their workers forked at their gates, put in the
    /// generation's scope together (made again if systemd removed it) and released.
    pub(super) async fn start_bands(&mut self, app: &AppName, g: u64, bands: &[u32]) -> Result<(), String> {
        if bands.is_empty() {
            return Ok(());
        }
        let Some(gen_) = self.m.generation(app, g) else { return Err("no such generation".into()) };
        let (config, scope) = (gen_.config.clone(), gen_.scope.clone());
        let launch = self.launch_context(&config).map_err(|e| e.to_string())?;
        let ports = self.allocate_ports(&config, bands.len()).map_err(|e| e.to_string())?;
        self.guard_before_launch(app, &ports).await;
        let mut gated = Vec::new();
        for (i, (band, my_ports)) in bands.iter().copied().zip(&ports).enumerate() {
            match self.spawn_band(&config, g, band, my_ports, &launch, release_delay(i, bands.len())) {
                Ok(p) => gated.push((band, p)),
                Err(e) => {
                    self.launched(app);
                    return Err(format!("band {band}: {e}"));
                }
            }
        }
        let pids: Vec<u32> = gated.iter().map(|(_, p)| p.gated.pid()).collect();
        if let Err(e) = self.deps.scopes.attach(&scope, &pids).await {
            let spec = scope_spec(&config, g, pids);
            if let Err(e2) = self.deps.scopes.start(&spec).await {
                self.launched(app);
                return Err(format!("cannot put them in {scope}: {e}; {e2}"));
            }
        }
        let mut failure = None;
        for (band, p) in gated {
            if let Err(e) = self.release(app, g, band, p, &config) {
                failure.get_or_insert(e);
            }
        }
        self.launched(app);
        failure.map_or(Ok(()), Err)
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
}
