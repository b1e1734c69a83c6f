//! What the supervisor knows: apps, their generations and every worker, with the lookups the
//! rest of the supervisor shares ("the workers of generation g", "the live generation"). Plain
//! data: changing it is the other modules' business; effects never happen here.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::SocketAddr,
    os::fd::OwnedFd,
    sync::Arc,
    time::SystemTime,
};

use ipcluster_core::{
    config::{AppConfig, ConfigError},
    model::{GenState, WorkerState},
    name::AppName,
    policy::RateLimiter,
};
use tokio::task::AbortHandle;

use super::api::{Error, Reply};
use crate::sampler::Sample;

/// The supervisor's own name for a worker (PIDs can be reused; these are not).
pub type WorkerId = u64;

/// One worker process (the top of its process tree).
#[derive(Debug)]
pub struct Worker<H> {
    pub app: AppName,
    pub generation: u64,
    pub band: u32,
    pub pid: u32,
    /// How its band's connections reach it: its routing mode's part.
    pub plumbing: Plumbing,
    pub state: WorkerState,
    pub started: SystemTime,
    /// How the supervisor holds it (a pidfd).
    pub handle: H,
    /// Its own cgroup below its scope's (`…/worker-<pid>`): it and everything it forks. `None`
    /// for a worker adopted from a daemon that did not isolate workers.
    pub cgroup: Option<String>,
    /// Its nice value, as the daemon set it.
    pub nice: i32,
    pub ready: bool,
    /// The readiness probe, while it runs.
    pub probe: Option<AbortHandle>,
    /// Last sample.
    pub sample: Sample,
    /// Last WATCHDOG=1 (or readiness), for `watchdog`.
    pub last_ping: tokio::time::Instant,
    /// Why the daemon stopped (or retired) it: memory, watchdog, reaped.
    pub stop_reason: Option<&'static str>,
    /// For a replacement spawned while this band's worker still serves: the worker it replaces.
    pub replaces: Option<WorkerId>,
    /// Waiting in the app's reap queue (reap_interval).
    pub reap_queued: bool,
    /// When it was retired on its own (a memory or health replacement), not with its generation.
    pub retired_at: Option<SystemTime>,
    /// Its health checks (`health_path`).
    pub health: WorkerHealth,
}

/// A worker's health checks.
#[derive(Debug, Clone, Default)]
pub struct WorkerHealth {
    /// Failed checks in a row.
    pub failures: u32,
    /// The last check's outcome, and when it came back.
    pub last: Option<(ipcluster_core::checks::Outcome, SystemTime)>,
    /// A check of it is running.
    pub in_flight: bool,
    /// `ready = "http"`: it holds its ports (or sent READY=1) and waits for a check to pass.
    pub waiting: bool,
    /// `ready = "http"`: a check passed before it was ready.
    pub passed: bool,
    /// What happened to its band before it (a health replacement), for `ipclusterctl status`.
    pub note: Option<String>,
}

impl<H> Worker<H> {
    /// Its worker ports, in `listen` order (none in socket mode).
    pub fn worker_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.plumbing.ports().iter().map(|p| p.1)
    }
}

/// How a worker's connections reach it, by routing mode: a NAT worker holds no socket of the
/// daemon's, a socket-mode worker has no port of its own.
#[derive(Debug)]
pub enum Plumbing {
    /// NAT: the worker listens on ports of its own, and the rules redirect its band to them.
    Nat {
        /// (public address, worker port), in `listen` order.
        ports: Vec<(SocketAddr, u16)>,
        /// Duplicates of its listening sockets, taken when it became ready: a crashed worker's
        /// queued connections are relayed from them (see orphan.rs).
        listeners: Vec<(u16, OwnedFd)>,
    },
    /// Socket mode: the daemon bound its sockets and handed them over.
    Socket {
        /// The daemon's copies of the sockets it handed the worker, in `listen` order, until
        /// they join its generation's tables (when it is ready). Then only the worker holds
        /// them, so they close when it ends and their queued connections move to another band.
        sockets: Vec<OwnedFd>,
        /// The cookies of its sockets, in `listen` order (how a table names them).
        cookies: Vec<u64>,
    },
}

impl Plumbing {
    /// A NAT worker on `ports`, before it is ready.
    pub fn nat(ports: Vec<(SocketAddr, u16)>) -> Self {
        Plumbing::Nat { ports, listeners: Vec::new() }
    }

    /// (public address, worker port), in `listen` order; none in socket mode.
    pub fn ports(&self) -> &[(SocketAddr, u16)] {
        match self {
            Plumbing::Nat { ports, .. } => ports,
            Plumbing::Socket { .. } => &[],
        }
    }

    /// The cookies of a socket-mode worker's sockets; none in NAT mode.
    pub fn cookies(&self) -> &[u64] {
        match self {
            Plumbing::Nat { .. } => &[],
            Plumbing::Socket { cookies, .. } => cookies,
        }
    }
}

/// Someone waiting for a starting generation to go live (or fail).
#[derive(Debug)]
pub enum Waiter {
    /// A Deploy call: answered with the generation's number.
    Deploy(Reply<u64>),
    /// A RetireGeneration call of the generation this one replaces.
    Retire(Reply<()>),
}

impl Waiter {
    pub fn answer(self, result: Result<u64, Error>) {
        match self {
            Waiter::Deploy(r) => {
                let _ = r.send(result);
            }
            Waiter::Retire(r) => {
                let _ = r.send(result.map(|_| ()));
            }
        }
    }
}

/// A band of a paced generation waiting for its turn (spawn_interval).
#[derive(Debug)]
pub struct HeldBand {
    pub band: u32,
    /// Its worker ports (none in socket mode).
    pub ports: Vec<(SocketAddr, u16)>,
}

/// One generation of an app.
#[derive(Debug)]
pub struct Generation {
    pub state: GenState,
    /// The effective config it runs with (the file's, plus Deploy overrides).
    pub config: Arc<AppConfig>,
    pub started: SystemTime,
    pub retired_at: Option<SystemTime>,
    pub scope: String,
    /// Callers waiting for the cutover (or the failure).
    pub waiting: Vec<Waiter>,
    /// Why the deploy failed, once it has.
    pub failure: Option<String>,
    /// Bands not started yet (spawn_interval), in order.
    pub held: VecDeque<HeldBand>,
    /// Its slot while it runs: in NAT mode with session affinity, among the app's session sets
    /// (`ipc4-<app>-<slot>`); in socket mode, always, among its groups' eight slots (its
    /// tables). `None` otherwise, or once a socket-mode generation gave its slot up.
    pub slot: Option<u8>,
    /// A canary deploy's split (issue 24): the bands it serves while it is a canary.
    pub canary: Option<Canary>,
}

/// A canary generation's split: it serves `bands`, the live generation the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Canary {
    /// The bands it serves, ascending.
    pub bands: Vec<u32>,
    /// `canary_for`: how long it runs before it promotes itself, if nothing goes wrong.
    pub canary_for: Option<std::time::Duration>,
    /// When it promotes itself (set at its cutover; kept across daemon restarts).
    pub deadline: Option<SystemTime>,
    /// Promote was asked: its other bands are starting (answered in `waiting` at the cutover).
    pub promoting: bool,
}

/// A StopApp call waiting for the app's scopes to be gone.
#[derive(Debug)]
pub struct Stopping {
    pub scopes: BTreeSet<u64>,
    pub errors: Vec<String>,
    pub replies: Vec<Reply<()>>,
}

/// One app.
#[derive(Debug, Default)]
pub struct App {
    /// The app file as last read: `None` when the file is gone.
    pub config: Option<Result<Arc<AppConfig>, ConfigError>>,
    pub generations: BTreeMap<u64, Generation>,
    /// Stopped by StopApp: no rules, no autostart, until the next Deploy (persisted).
    pub stopped: bool,
    /// Memory and health retirements (retire_rate).
    pub retire_limit: Option<RateLimiter>,
    /// Retired workers waiting to be stopped, one every reap_interval.
    pub reap_queue: VecDeque<WorkerId>,
    /// Over cluster_memory_max's low watermark at the last sample: the next round counts
    /// connections (costly) so the policy can order the retired workers.
    pub memory_pressure: bool,
    /// Live workers alone were over cluster_memory_max at the last sample (reported once).
    pub live_over_budget: bool,
    /// A StopApp in progress.
    pub stopping: Option<Stopping>,
    /// Worker ports of workers about to run (not yet in the model's workers): guarded
    /// before any of them can listen.
    pub launching: Vec<u16>,
    /// Ports of crashed workers whose sockets the daemon still drains (see orphan.rs): guarded
    /// until the drain has closed them. `Some` until the drain is told to finish.
    pub draining: BTreeMap<u16, Option<crate::relay::Drain>>,
    /// More than half of its live workers fail their health checks at once (reported once).
    pub health_shared: bool,
}

impl App {
    /// The live generation.
    pub fn live(&self) -> Option<u64> {
        self.generations.iter().rev().find(|(_, g)| g.state == GenState::Live).map(|(n, _)| *n)
    }

    /// The live generations other than `g` (the ones a cutover to `g` retires).
    pub fn live_except(&self, g: u64) -> Vec<u64> {
        self.generations
            .iter()
            .filter(|(n, x)| **n != g && x.state == GenState::Live)
            .map(|(n, _)| *n)
            .collect()
    }

    /// The canary generation (serving some bands beside the live one).
    pub fn canary(&self) -> Option<u64> {
        self.generations.iter().rev().find(|(_, g)| g.state == GenState::Canary).map(|(n, _)| *n)
    }

    /// The draining generations, newest first.
    pub fn draining(&self) -> Vec<u64> {
        self.generations
            .iter()
            .rev()
            .filter(|(_, g)| g.state == GenState::Draining)
            .map(|(n, _)| *n)
            .collect()
    }

    /// A slot no running generation of the app holds.
    pub fn free_slot(&self) -> Option<u8> {
        self.free_slot_but(&BTreeSet::new())
    }

    /// [`Self::free_slot`], `busy` excepted (slots the kernel still steers to).
    pub fn free_slot_but(&self, busy: &BTreeSet<u8>) -> Option<u8> {
        let taken: BTreeSet<u8> =
            self.generations.values().filter(|g| g.state.is_running()).filter_map(|g| g.slot).collect();
        (0..ipcluster_core::routing::SET_SLOTS).find(|s| !taken.contains(s) && !busy.contains(s))
    }

    /// The generation being deployed.
    pub fn deploying(&self) -> Option<u64> {
        self.generations.iter().find(|(_, g)| g.state == GenState::Starting).map(|(n, _)| *n)
    }

    /// The app file's config, or why there is none.
    pub fn file_config(&self, name: &AppName) -> Result<Arc<AppConfig>, Error> {
        match &self.config {
            Some(Ok(c)) => Ok(c.clone()),
            Some(Err(e)) => Err(Error::InvalidConfig(e.to_string())),
            None => Err(Error::NoSuchApp(format!("the app file of \"{name}\" was removed"))),
        }
    }
}

/// Every app and worker.
#[derive(Debug)]
pub struct Model<H> {
    pub apps: BTreeMap<AppName, App>,
    pub workers: BTreeMap<WorkerId, Worker<H>>,
    next_worker: WorkerId,
}

impl<H> Default for Model<H> {
    fn default() -> Self {
        Self { apps: BTreeMap::new(), workers: BTreeMap::new(), next_worker: 1 }
    }
}

impl<H> Model<H> {
    /// A fresh worker id.
    pub fn new_worker_id(&mut self) -> WorkerId {
        let id = self.next_worker;
        self.next_worker += 1;
        id
    }

    pub fn generation(&self, app: &AppName, g: u64) -> Option<&Generation> {
        self.apps.get(app).and_then(|a| a.generations.get(&g))
    }

    pub fn generation_mut(&mut self, app: &AppName, g: u64) -> Option<&mut Generation> {
        self.apps.get_mut(app).and_then(|a| a.generations.get_mut(&g))
    }

    /// Whether some generation of `app` has a config that `f` holds for (a policy's scan of
    /// the app's workers runs only then).
    pub fn any_config(&self, app: &AppName, f: impl Fn(&AppConfig) -> bool) -> bool {
        self.apps.get(app).is_some_and(|a| a.generations.values().any(|g| f(&g.config)))
    }

    /// The effective config of generation `g`.
    pub fn config(&self, app: &AppName, g: u64) -> Option<Arc<AppConfig>> {
        self.generation(app, g).map(|x| x.config.clone())
    }

    /// The state of generation `g`.
    pub fn gen_state(&self, app: &AppName, g: u64) -> Option<GenState> {
        self.generation(app, g).map(|x| x.state)
    }

    /// The workers of generation `g` of `app`.
    pub fn workers_of<'a>(
        &'a self,
        app: &'a AppName,
        g: u64,
    ) -> impl Iterator<Item = (WorkerId, &'a Worker<H>)> + 'a {
        self.workers.iter().filter(move |(_, w)| &w.app == app && w.generation == g).map(|(id, w)| (*id, w))
    }

    /// Ids of the workers of generation `g` of `app`.
    pub fn ids_of(&self, app: &AppName, g: u64) -> Vec<WorkerId> {
        self.workers_of(app, g).map(|(id, _)| id).collect()
    }

    /// The workers of `app`, every generation.
    pub fn workers_of_app<'a>(
        &'a self,
        app: &'a AppName,
    ) -> impl Iterator<Item = (WorkerId, &'a Worker<H>)> + 'a {
        self.workers.iter().filter(move |(_, w)| &w.app == app).map(|(id, w)| (*id, w))
    }

    /// Whether some worker is a replacement in progress for `id`.
    pub fn being_replaced(&self, id: WorkerId) -> bool {
        self.workers.values().any(|w| w.replaces == Some(id))
    }
}
