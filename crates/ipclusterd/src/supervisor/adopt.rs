//! Adoption: a daemon that starts (after a restart, a crash or an upgrade) takes over the
//! generations that are still running, without touching a serving worker.
//!
//! Reality first, checked against the daemon's own word:
//! - which processes are workers: systemd lists each scope's processes with their cgroups; a
//!   worker is the process its own cgroup (`<scope>/worker-<pid>`) is named after, so what it
//!   forked is never taken for a worker (a scope from a daemon that did not isolate workers:
//!   the top of each tree);
//! - who each worker is: the saved state (root-only) is the authority; the worker's
//!   `IPCLUSTER_*` environment, which it controls, is a hint that must agree with it
//!   ([`ipcluster_core::adoption::check_claim`]). A process whose claim disagrees is reported and
//!   not adopted: nothing routes to it, and its band is respawned;
//! - which generation is live: [`ipcluster_core::adoption::decide`], from the rules, the saved
//!   state and completeness.
//!
//! Each process is held by pidfd before its /proc files are read, and its start time is checked
//! after, so a recycled PID is never adopted for the process it replaced. The rules are then
//! reconciled with the adopted live workers.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    os::fd::OwnedFd,
    sync::Arc,
    time::Duration,
};

use ipcluster_core::{
    adoption::{self, Claim, Expected, Found, Verdict},
    config::{AppConfig, Routing},
    model::{GenState, WorkerState, parse_scope_name},
    name::AppName,
    policy::Backoff,
    saved::{SavedApp, SavedGeneration},
};
use tracing::{info, warn};

use super::{
    Supervisor,
    model::{Canary, Generation, Plumbing, WorkerId},
};
use crate::{
    clock::from_usec,
    netfilter::Router,
    process::worker_cgroup_name,
    processes::{Inspected, Inspector, Spawner},
    scopes::Scopes,
    steering::Steer,
    world::{ProcHandle, World},
};

/// One worker found in a scope, its claim accepted.
#[derive(Debug)]
struct FoundWorker<H> {
    band: u32,
    pid: u32,
    /// Worker ports, in `listen` order.
    ports: Vec<u16>,
    handle: H,
    cgroup: Option<String>,
    /// Socket mode: its sockets, taken back from it, and their cookies (`listen` order).
    sockets: Vec<OwnedFd>,
    cookies: Vec<u64>,
}

/// One generation found in systemd.
#[derive(Debug)]
struct FoundGen<H> {
    unit: String,
    bands: u32,
    listen: Vec<SocketAddr>,
    routing: Routing,
    workers: Vec<FoundWorker<H>>,
}

/// Why a process in a scope is not a worker, or not one to adopt.
enum Refused {
    /// Not a worker's main process (what a worker forked, a child at its gate): no report.
    NotAWorker,
    /// It claims to be one, but the claim disagrees with what the daemon knows: reported.
    Claim(String),
}

impl<W: World> Supervisor<W> {
    /// Takes over every running generation (see the module docs).
    pub(super) async fn adopt(&mut self) {
        // What the previous daemon saved, as it was: saving as we go rewrites `self.saved`.
        let saved_apps = self.saved.apps.clone();
        let found = self.find_running(&saved_apps).await;
        let (routed, draining, slots) = match self.deps.router.current().await {
            Ok(existing) => (existing.live_ports(), existing.draining_ports(), existing.session_slots()),
            Err(e) => {
                warn!("cannot read the NAT rules: {e}");
                Default::default()
            }
        };
        let steered = self.steered(&steer_entries(&found, &saved_apps));
        let (mut generations, mut workers) = (0, 0);
        for (app, gens) in found {
            let saved_app = saved_apps.get(&app).cloned().unwrap_or_default();
            // Socket mode: the slot holding each generation's sockets.
            let slot_of = |fg: &FoundGen<ProcHandle<W>>| {
                steered.slot(&app, fg.workers.iter().flat_map(|w| w.cookies.clone()))
            };
            let witnesses: Vec<Found> = gens
                .iter()
                .map(|(g, fg)| Found {
                    generation: *g,
                    complete: fg.workers.iter().map(|w| w.band).collect::<BTreeSet<_>>().len() as u32
                        == fg.bands,
                    routed: fg.workers.iter().any(|w| w.ports.iter().any(|p| routed.contains(p)))
                        || slot_of(fg).is_some_and(|s| steered.routed(&app, s)),
                    draining: fg.workers.iter().any(|w| w.ports.iter().any(|p| draining.contains(p)))
                        || slot_of(fg).is_some_and(|s| {
                            let saved =
                                saved_app.generations.get(g).is_some_and(|r| r.state == GenState::Draining);
                            steered.draining(&app, s, saved)
                        }),
                })
                .collect();
            let verdicts = adoption::decide(&witnesses, &saved_app.generations);
            for (g, fg) in gens {
                match verdicts[&g] {
                    Verdict::Stop => {
                        warn!(app = %app, generation = g, "{app}: generation {g} was still starting when the previous daemon stopped; stopping it");
                        self.unit_job(&app, g, fg.unit, super::ScopeJob::Stop);
                    }
                    verdict => {
                        workers += fg.workers.len();
                        generations += 1;
                        // Its slot: the one the rules name beside its ports, or the steering's
                        // slot holding its sockets (else the saved one).
                        let slot = fg
                            .workers
                            .iter()
                            .flat_map(|w| &w.ports)
                            .find_map(|p| slots.get(p).copied())
                            .or_else(|| slot_of(&fg));
                        // A canary's bands: the ones the rules route to it (or the steering
                        // overrides to its slot), else the saved ones.
                        let mut canary_bands: Vec<u32> = fg
                            .workers
                            .iter()
                            .filter(|w| w.ports.iter().any(|p| routed.contains(p)))
                            .map(|w| w.band)
                            .collect();
                        if let Some(bands) = slot.and_then(|s| steered.overridden.get(&(app.clone(), s))) {
                            canary_bands.extend(bands.iter().copied());
                        }
                        canary_bands.sort_unstable();
                        canary_bands.dedup();
                        let saved_canary = saved_app.generations.get(&g).and_then(|s| s.canary.clone());
                        if canary_bands.is_empty() {
                            canary_bands = saved_canary.as_ref().map(|c| c.bands.clone()).unwrap_or_default();
                        }
                        let canary = (verdict == Verdict::Canary).then(|| Canary {
                            bands: canary_bands,
                            canary_for: saved_canary
                                .as_ref()
                                .and_then(|c| c.canary_for_secs)
                                .map(Duration::from_secs),
                            deadline: saved_canary.as_ref().and_then(|c| c.deadline_usec).map(from_usec),
                            promoting: false,
                        });
                        self.adopt_generation(&app, g, fg, verdict, &saved_app, slot, canary);
                    }
                }
            }
        }
        self.restore_history(&saved_apps);
        self.finish_stops(&saved_apps);
        if generations > 0 {
            info!("adopted {generations} generations with {workers} workers");
        }
        self.persist();
        self.sync_rules().await;
    }

    /// Every generation systemd runs for us, with the workers whose claims agree with what the
    /// daemon knows. Generation numbers stay above every one seen.
    async fn find_running(
        &mut self,
        saved: &BTreeMap<AppName, SavedApp>,
    ) -> BTreeMap<AppName, BTreeMap<u64, FoundGen<ProcHandle<W>>>> {
        let mut found: BTreeMap<AppName, BTreeMap<u64, FoundGen<ProcHandle<W>>>> = BTreeMap::new();
        let units = match self.deps.scopes.list().await {
            Ok(u) => u,
            Err(e) => {
                warn!("cannot list scopes to adopt: {e}");
                return found;
            }
        };
        for unit in units {
            let Some((app, g)) = parse_scope_name(&unit) else { continue };
            self.saved.saw_generation(&app, g);
            let procs = match self.deps.scopes.processes(&unit).await {
                Ok(p) => p,
                Err(e) => {
                    warn!("cannot list the processes of {unit}: {e}");
                    continue;
                }
            };
            let record = saved.get(&app).and_then(|a| a.generations.get(&g));
            let file = self.m.apps.get(&app).and_then(|a| a.config.clone()).and_then(Result::ok);
            // The generation's shape: saved, else the app file's; neither, nothing to check against.
            let shape = record
                .map(|r| (r.workers, r.listen.clone(), r.port_range, r.routing.unwrap_or(Routing::Nat)))
                .or_else(|| {
                    file.as_ref().map(|c| (c.workers, c.listen.clone(), Some(c.port_range), c.routing))
                });
            let Some((bands, listen, port_range, routing)) = shape else {
                warn!(app = %app, "{unit}: no saved state and no app file to check its workers against; left alone");
                continue;
            };
            // A record from a daemon that did not save its range (an upgrade): any unprivileged
            // port, since the file's range may have changed after those workers started.
            let port_range = port_range.unwrap_or((1024, u16::MAX));
            let in_scope: BTreeSet<u32> = procs.iter().map(|(p, _)| *p).collect();
            let mut fg =
                FoundGen { unit: unit.clone(), bands, listen: listen.clone(), routing, workers: Vec::new() };
            for (pid, cgroup) in procs {
                let listen_ports: Vec<u16> = match routing {
                    Routing::Nat => listen.iter().map(SocketAddr::port).collect(),
                    Routing::Socket => Vec::new(),
                };
                match self.identify(
                    &unit,
                    &app,
                    g,
                    pid,
                    &cgroup,
                    &in_scope,
                    record,
                    bands,
                    listen_ports,
                    port_range,
                ) {
                    Ok(mut w) => {
                        if routing == Routing::Socket {
                            self.take_sockets(&app, g, &listen, &mut w);
                        }
                        fg.workers.push(w);
                    }
                    Err(Refused::NotAWorker) => {}
                    Err(Refused::Claim(why)) => {
                        // It sits in a cgroup of ours but will not be managed: it goes.
                        warn!(app = %app, generation = g, pid, "{app}: pid {pid} in {unit} is not adopted: it {why}; stopping it");
                        self.deps.spawner.kill_cgroup(&cgroup);
                    }
                }
            }
            // A saved generation is adopted even when none of its processes is (their bands are
            // respawned); one the daemon never recorded, with nothing of ours in it, is left alone.
            if fg.workers.is_empty() && record.is_none() {
                warn!("{unit} has no worker of ours; left alone");
                continue;
            }
            found.entry(app).or_default().insert(g, fg);
        }
        found
    }

    /// Decides whether `pid` (in `cgroup`, in the scope `unit`) is a worker of generation `g`,
    /// and which one.
    #[allow(clippy::too_many_arguments, reason = "the witnesses of one decision")]
    fn identify(
        &self,
        unit: &str,
        app: &AppName,
        g: u64,
        pid: u32,
        cgroup: &str,
        in_scope: &BTreeSet<u32>,
        record: Option<&SavedGeneration>,
        bands: u32,
        listen_ports: Vec<u16>,
        port_range: (u16, u16),
    ) -> Result<FoundWorker<ProcHandle<W>>, Refused> {
        let own = cgroup.strip_suffix(&format!("/{}", worker_cgroup_name(pid)));
        let isolated = own.is_some_and(|scope| scope.ends_with(&format!("/{unit}")));
        let in_scope_root = cgroup.ends_with(&format!("/{unit}"));
        if !isolated && !in_scope_root {
            return Err(Refused::NotAWorker);
        }
        let (handle, Inspected { env, cgroup: now_in, parent, start_usec }) =
            self.deps.inspector.inspect(pid).ok_or(Refused::NotAWorker)?;
        if now_in != cgroup {
            return Err(Refused::NotAWorker);
        }
        // A scope of a daemon that did not isolate workers: only the top of each tree.
        if in_scope_root && parent.is_some_and(|pp| in_scope.contains(&pp)) {
            return Err(Refused::NotAWorker);
        }
        let get = |key: &str| env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        if get("IPCLUSTER_APP") != Some(app.as_str()) || get("IPCLUSTER_GENERATION") != Some(&g.to_string()) {
            // A child still at its gate has the daemon's environment, not a worker's; anything
            // else here claiming nothing is not a worker.
            return Err(if isolated {
                Refused::Claim("does not say it is one".into())
            } else {
                Refused::NotAWorker
            });
        }
        let claim = Claim::from_env(&env).ok_or_else(|| Refused::Claim("makes no readable claim".into()))?;
        // Within 10 ms: the kernel's start time has clock-tick resolution.
        let worker = record.and_then(|r| {
            r.processes.iter().find(|w| w.pid == pid && w.start_usec.abs_diff(start_usec) < 10_000)
        });
        let expected = Expected { bands, listen_ports, port_range, worker };
        let (band, ports) = adoption::check_claim(&claim, &expected).map_err(Refused::Claim)?;
        Ok(FoundWorker {
            band,
            pid,
            ports,
            handle,
            cgroup: isolated.then(|| cgroup.to_owned()),
            sockets: Vec::new(),
            cookies: Vec::new(),
        })
    }

    /// Socket mode: takes back duplicates of the sockets a found worker holds, one per listen
    /// entry. A worker that no longer holds every one is adopted without them (its band's
    /// clients go to a neighbour) and said so.
    fn take_sockets(&self, app: &AppName, g: u64, listen: &[SocketAddr], w: &mut FoundWorker<ProcHandle<W>>) {
        let mut taken = self.deps.inspector.sockets(w.pid, w.cgroup.as_deref(), listen);
        let mut sockets = Vec::new();
        for l in listen {
            match taken.iter().position(|(a, _)| a == l) {
                Some(i) => sockets.push(taken.swap_remove(i).1),
                None => {
                    warn!(app = %app, generation = g, pid = w.pid, "{app}: pid {} no longer holds its socket for {l}; no connection reaches it", w.pid);
                    return;
                }
            }
        }
        let cookies: Result<Vec<u64>, String> = sockets.iter().map(|s| self.deps.steer.cookie(s)).collect();
        match cookies {
            Ok(c) => (w.sockets, w.cookies) = (sockets, c),
            Err(e) => warn!(app = %app, pid = w.pid, "{app}: cannot identify pid {}'s sockets: {e}", w.pid),
        }
    }

    /// Generations the previous daemon knew that no longer run join the history as finished
    /// (ListGenerations shows them; a rollback can redeploy what they ran).
    fn restore_history(&mut self, saved: &BTreeMap<AppName, SavedApp>) {
        for (app, record) in saved {
            let base = self.m.apps.get(app).and_then(|a| a.config.clone()).and_then(Result::ok);
            for (g, s) in &record.generations {
                if self.m.generation(app, *g).is_some() {
                    continue;
                }
                let config = match &base {
                    Some(c) => s.effective((**c).clone()),
                    None => s.effective(AppConfig::fallback(app.clone(), s.workers, s.listen.clone())),
                };
                let state = match s.state {
                    GenState::Failed | GenState::Starting => GenState::Failed,
                    _ => GenState::Stopped,
                };
                self.m.apps.entry(app.clone()).or_default().generations.insert(
                    *g,
                    Generation {
                        state,
                        config: Arc::new(config),
                        started: from_usec(s.started_usec),
                        retired_at: s.retired_usec.map(from_usec),
                        scope: ipcluster_core::model::scope_name(app, *g),
                        waiting: vec![],
                        failure: None,
                        held: Default::default(),
                        slot: None,
                        canary: None,
                    },
                );
            }
            self.trim_history(app);
        }
    }

    /// Apps stopped with StopApp stay stopped; a stop a crash interrupted is finished.
    fn finish_stops(&mut self, saved: &BTreeMap<AppName, SavedApp>) {
        let stopped: Vec<AppName> = saved.iter().filter(|(_, a)| a.stopped).map(|(n, _)| n.clone()).collect();
        for name in stopped {
            let a = self.m.apps.entry(name.clone()).or_default();
            a.stopped = true;
            let running: Vec<(u64, String)> = a
                .generations
                .iter()
                .filter(|(_, g)| g.state.is_running())
                .map(|(n, g)| (*n, g.scope.clone()))
                .collect();
            for (g, unit) in running {
                warn!(app = %name, "{name}: was being stopped when the previous daemon stopped; stopping {unit}");
                self.scope_job(&name, g, super::ScopeJob::Stop);
            }
            let ids: Vec<_> = self.m.workers_of_app(&name).map(|(id, _)| id).collect();
            for id in ids {
                if let Some(w) = self.m.workers.get_mut(&id) {
                    w.state = WorkerState::Stopping;
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments, reason = "one generation's witnesses, gathered in one place")]
    fn adopt_generation(
        &mut self,
        app: &AppName,
        g: u64,
        fg: FoundGen<ProcHandle<W>>,
        verdict: Verdict,
        saved_app: &SavedApp,
        slot_in_rules: Option<u8>,
        canary: Option<Canary>,
    ) {
        let saved = saved_app.generations.get(&g);
        let from_file = self.m.apps.get(app).and_then(|a| a.config.clone()).and_then(Result::ok);
        let base = match &from_file {
            Some(c) => (**c).clone(),
            None => AppConfig::fallback(app.clone(), fg.bands, fg.listen.clone()),
        };
        // What the generation ran with (a Deploy override stays), else the file's.
        let mut config = match saved {
            Some(s) => s.effective(base),
            None => base,
        };
        config.workers = fg.bands;
        config.listen = fg.listen.clone();
        config.routing = fg.routing;
        let config = Arc::new(config);
        let (p, inspector) = (self.deps.spawner.clone(), self.deps.inspector.clone());
        let first_start = fg.workers.iter().filter_map(|w| inspector.start_time_usec(w.pid)).min();
        let started = saved.map(|s| s.started_usec).or(first_start).map_or_else(|| self.now(), from_usec);
        let (state, finish_retirement) = match verdict {
            Verdict::Live => (GenState::Live, false),
            Verdict::Retired { finish } => (GenState::Retired, finish),
            Verdict::Draining => (GenState::Draining, false),
            Verdict::Canary => (GenState::Canary, false),
            Verdict::Stop => return,
        };
        let retired_at = state
            .is_retired()
            .then(|| saved.and_then(|s| s.retired_usec).map_or_else(|| self.now(), from_usec));
        self.m.apps.entry(app.clone()).or_default().generations.insert(
            g,
            Generation {
                state,
                config: config.clone(),
                started,
                retired_at,
                scope: fg.unit.clone(),
                waiting: vec![],
                failure: None,
                held: Default::default(),
                slot: saved.and_then(|s| s.session_slot).or(slot_in_rules),
                canary: canary.clone(),
            },
        );
        let retired_nice = self.base_nice + config.retire_nice;
        for w in fg.workers {
            let plumbing = match fg.routing {
                Routing::Nat => Plumbing::Nat {
                    listeners: inspector.listeners(w.pid, w.cgroup.as_deref(), &w.ports),
                    ports: fg.listen.iter().copied().zip(w.ports.iter().copied()).collect(),
                },
                Routing::Socket => Plumbing::Socket { sockets: w.sockets, cookies: w.cookies },
            };
            let id = self.add_worker(app, g, w.band, w.pid, plumbing, w.handle, w.cgroup, started);
            let nice = inspector.nice_of(w.pid).unwrap_or(self.base_nice);
            let worker = self.m.workers.get_mut(&id).expect("just added");
            worker.state = match state {
                GenState::Live | GenState::Canary => WorkerState::Live,
                _ => WorkerState::Retired,
            };
            worker.ready = true;
            worker.nice = nice;
            if finish_retirement {
                worker.nice = retired_nice;
                if let Err(e) = p.renice_tree(w.pid, retired_nice) {
                    warn!(app = %app, pid = w.pid, "cannot renice: {e}");
                }
                if let Some(sig) = config.retire_signal {
                    let _ = p.signal(&worker.handle, sig.number());
                }
            }
        }
        info!(app = %app, generation = g, "{app}: adopted generation {g} ({state}) from {}", fg.unit);
        self.adopt_steering(app, g, state);
        self.start_health(app, g);
        if let Some(c) = &canary {
            // Workers of bands it does not serve: a promotion cut short by the restart (Promote
            // again, or canary_for does).
            let extra: Vec<WorkerId> = self
                .m
                .workers_of(app, g)
                .filter(|(_, w)| !c.bands.contains(&w.band))
                .map(|(id, _)| id)
                .collect();
            if !extra.is_empty() {
                warn!(app = %app, generation = g, "{app}: canary generation {g} was being promoted when the previous daemon stopped; stopping the {} workers of its other bands", extra.len());
            }
            for id in extra {
                self.stop_worker(id, "promotion cut short");
            }
            info!(app = %app, generation = g, "{app}: generation {g} is a canary on bands {:?}", c.bands);
            self.resume_canary(app, g);
        }
        if !matches!(state, GenState::Live | GenState::Canary) {
            return;
        }
        // Crash loops stay slow across restarts, at this generation's own restart_backoff.
        let (min, max) = config.restart_backoff;
        for (band, ms) in &saved_app.backoff_ms {
            self.backoff.insert((app.clone(), *band), Backoff::resumed(min, max, Duration::from_millis(*ms)));
        }
        // Bands whose worker died while no daemon watched, or whose process was refused: respawn.
        let bands: Vec<u32> = match &canary {
            Some(c) => c.bands.clone(),
            None => (0..config.workers).collect(),
        };
        for band in bands {
            if !self.m.workers_of(app, g).any(|(_, w)| w.band == band) {
                self.schedule_respawn(app, g, band, Duration::ZERO);
            }
        }
    }
}

/// The groups adoption reads: every listen entry of every socket-mode generation found, with
/// room for sessions if the app kept any (as the saved state says; with no saved state, room
/// for them all the same: opening a group with less room shrinks its pinned map, losing
/// records the kernel still steers by).
fn steer_entries<H>(
    found: &BTreeMap<AppName, BTreeMap<u64, FoundGen<H>>>,
    saved: &BTreeMap<AppName, SavedApp>,
) -> BTreeSet<(AppName, SocketAddr, u32)> {
    let mut out = BTreeSet::new();
    for (app, gens) in found {
        let sessions =
            saved.get(app).is_none_or(|a| a.generations.values().any(|g| g.session_affinity_secs.is_some()));
        let room = if sessions { crate::steering::SESSIONS } else { crate::steering::SMALL_SESSIONS };
        for fg in gens.values().filter(|fg| fg.routing == Routing::Socket) {
            out.extend(fg.listen.iter().map(|l| (app.clone(), *l, room)));
        }
    }
    out
}
