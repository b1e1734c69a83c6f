//! Adoption: a daemon that starts (after a restart, a crash or an upgrade) takes over the
//! generations that are still running, without touching a serving worker.
//!
//! Reality first: the `ipcluster-*.scope` units systemd has, the processes in them and their
//! `IPCLUSTER_*` environment (app, generation, band, ports), and which worker ports the kernel's
//! rules route to. The saved state adds what reality cannot tell. What becomes of each generation
//! is [`ipcluster_core::adoption::decide`]'s pure decision; this module gathers the witnesses and
//! carries the verdicts out. The rules are then reconciled with the adopted live workers.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use ipcluster_core::{
    adoption::{self, Found, Verdict},
    config::AppConfig,
    model::{GenState, WorkerState, parse_scope_name},
    name::AppName,
    policy::Backoff,
    saved::SavedApp,
};
use tracing::{info, warn};

use super::{Supervisor, model::Generation};
use crate::{clock::from_usec, netfilter::Router, processes::Processes, scopes::Scopes};

/// One worker found in a scope.
#[derive(Debug)]
struct FoundWorker {
    band: u32,
    pid: u32,
    /// (public port, worker port) in `listen` order.
    ports: Vec<(u16, u16)>,
}

/// One generation found in systemd.
#[derive(Debug)]
struct FoundGen {
    unit: String,
    bands: u32,
    workers: Vec<FoundWorker>,
}

fn env_get<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
    env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn parse_ports(s: &str) -> Option<Vec<(u16, u16)>> {
    s.split(',')
        .map(|pair| {
            let (p, w) = pair.split_once(':')?;
            Some((p.parse().ok()?, w.parse().ok()?))
        })
        .collect()
}

impl<S: Scopes + Clone + 'static, R: Router + 'static, P: Processes> Supervisor<S, R, P> {
    /// Takes over every running generation (see the module docs).
    pub(super) async fn adopt(&mut self) {
        let found = self.find_running().await;
        let routed = match self.deps.router.current().await {
            Ok(existing) => existing.routed_ports(),
            Err(e) => {
                warn!("cannot read the NAT rules: {e}");
                BTreeSet::new()
            }
        };
        // What the previous daemon saved, as it was: saving as we go rewrites `self.saved`.
        let saved_apps = self.saved.apps.clone();
        let (mut generations, mut workers) = (0, 0);
        for (app, gens) in found {
            let saved_app = saved_apps.get(&app).cloned().unwrap_or_default();
            let saved = &saved_app.generations;
            let witnesses: Vec<Found> = gens
                .iter()
                .map(|(g, fg)| Found {
                    generation: *g,
                    complete: fg.workers.iter().map(|w| w.band).collect::<BTreeSet<_>>().len() as u32
                        == fg.bands,
                    routed: fg.workers.iter().any(|w| w.ports.iter().any(|p| routed.contains(&p.1))),
                })
                .collect();
            let verdicts = adoption::decide(&witnesses, saved);
            for (g, fg) in gens {
                match verdicts[&g] {
                    Verdict::Stop => {
                        warn!(app = %app, generation = g, "{app}: generation {g} was still starting when the previous daemon stopped; stopping it");
                        self.stop_unit_in_background(fg.unit);
                    }
                    verdict => {
                        workers += fg.workers.len();
                        generations += 1;
                        self.adopt_generation(&app, g, fg, verdict, &saved_app);
                    }
                }
            }
        }
        self.finish_stops(&saved_apps);
        if generations > 0 {
            info!("adopted {generations} generations with {workers} workers");
        }
        self.persist();
        self.reconcile().await;
    }

    /// Every generation systemd runs for us: its scope's top-level processes whose environment
    /// names the scope's app and generation. Generation numbers stay above every one seen.
    async fn find_running(&mut self) -> BTreeMap<AppName, BTreeMap<u64, FoundGen>> {
        let mut found: BTreeMap<AppName, BTreeMap<u64, FoundGen>> = BTreeMap::new();
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
            let pids = match self.deps.scopes.processes(&unit).await {
                Ok(p) => p,
                Err(e) => {
                    warn!("cannot list the processes of {unit}: {e}");
                    continue;
                }
            };
            let in_scope: BTreeSet<u32> = pids.iter().copied().collect();
            let mut fg = FoundGen { unit: unit.clone(), bands: 0, workers: Vec::new() };
            let p = &self.deps.processes;
            for pid in pids {
                // A worker's own children inherit its environment: only the top of each tree is
                // the worker.
                if p.parent(pid).is_some_and(|pp| in_scope.contains(&pp)) {
                    continue;
                }
                let Some(env) = p.environ(pid) else { continue };
                let g_env = env_get(&env, "IPCLUSTER_GENERATION").and_then(|v| v.parse::<u64>().ok());
                if env_get(&env, "IPCLUSTER_APP") != Some(app.as_str()) || g_env != Some(g) {
                    continue;
                }
                let band = env_get(&env, "IPCLUSTER_BAND").and_then(|v| v.parse().ok());
                let bands = env_get(&env, "IPCLUSTER_BANDS").and_then(|v| v.parse().ok());
                let ports = env_get(&env, "IPCLUSTER_PORTS").and_then(parse_ports);
                let (Some(band), Some(bands), Some(ports)) = (band, bands, ports) else { continue };
                fg.bands = bands;
                fg.workers.push(FoundWorker { band, pid, ports });
            }
            if fg.workers.is_empty() {
                warn!("{unit} has no worker of ours; left alone");
                continue;
            }
            found.entry(app).or_default().insert(g, fg);
        }
        found
    }

    fn stop_unit_in_background(&self, unit: String) {
        let scopes = self.deps.scopes.clone();
        tokio::spawn(async move {
            if let Err(e) = scopes.stop(&unit).await {
                warn!("cannot stop {unit}: {e}");
            }
        });
    }

    /// Apps stopped with StopApp stay stopped; a stop a crash interrupted is finished.
    fn finish_stops(&mut self, saved: &BTreeMap<AppName, SavedApp>) {
        let stopped: Vec<AppName> = saved.iter().filter(|(_, a)| a.stopped).map(|(n, _)| n.clone()).collect();
        for name in stopped {
            let a = self.m.apps.entry(name.clone()).or_default();
            a.stopped = true;
            let units: Vec<String> =
                a.generations.values().filter(|g| g.state.is_running()).map(|g| g.scope.clone()).collect();
            for unit in units {
                warn!(app = %name, "{name}: was being stopped when the previous daemon stopped; stopping {unit}");
                self.stop_unit_in_background(unit);
            }
            let ids: Vec<_> = self.m.workers_of_app(&name).map(|(id, _)| id).collect();
            for id in ids {
                if let Some(w) = self.m.workers.get_mut(&id) {
                    w.state = WorkerState::Stopping;
                }
            }
        }
    }

    fn adopt_generation(
        &mut self,
        app: &AppName,
        g: u64,
        fg: FoundGen,
        verdict: Verdict,
        saved_app: &SavedApp,
    ) {
        let saved = saved_app.generations.get(&g);
        let from_file = self.m.apps.get(app).and_then(|a| a.config.clone()).and_then(Result::ok);
        // Public addresses: remembered, else the app file's entries for the same ports.
        let public_ports: Vec<u16> = fg.workers[0].ports.iter().map(|p| p.0).collect();
        let listen: Vec<SocketAddrV4> =
            saved.map(|s| s.listen.clone()).filter(|l| l.len() == public_ports.len()).unwrap_or_else(|| {
                public_ports
                    .iter()
                    .map(|p| {
                        from_file
                            .as_ref()
                            .and_then(|c| c.listen.iter().find(|l| l.port() == *p).copied())
                            .unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, *p))
                    })
                    .collect()
            });
        let mut config = match &from_file {
            Some(c) => (**c).clone(),
            None => AppConfig::fallback(app.clone(), fg.bands, listen.clone()),
        };
        config.workers = fg.bands;
        config.listen = listen.clone();
        let config = Arc::new(config);
        let p = self.deps.processes.clone();
        let first_start = fg.workers.iter().filter_map(|w| p.start_time_usec(w.pid)).min();
        let started = saved.map(|s| s.started_usec).or(first_start).map_or_else(|| self.now(), from_usec);
        let (state, finish_retirement) = match verdict {
            Verdict::Live => (GenState::Live, false),
            Verdict::Retired { finish } => (GenState::Retired, finish),
            Verdict::Stop => return,
        };
        let retired_at = (state == GenState::Retired)
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
            },
        );
        for w in fg.workers {
            let handle = match p.adopt(w.pid) {
                Ok(h) => h,
                Err(e) => {
                    warn!(app = %app, pid = w.pid, "cannot adopt pid {}: {e}", w.pid);
                    continue;
                }
            };
            let ports = listen.iter().copied().zip(w.ports.iter().map(|p| p.1)).collect();
            let id = self.add_worker(app, g, w.band, w.pid, ports, handle, started);
            let worker_ports = self.m.workers[&id].worker_ports();
            let listeners = p.listeners(w.pid, &worker_ports);
            let worker = self.m.workers.get_mut(&id).expect("just added");
            worker.state = if state == GenState::Live { WorkerState::Live } else { WorkerState::Retired };
            worker.ready = true;
            worker.listeners = listeners;
            if finish_retirement {
                if let Err(e) = p.renice_tree(w.pid, self.base_nice + config.retire_nice) {
                    warn!(app = %app, pid = w.pid, "cannot renice: {e}");
                }
                if let Some(sig) = config.retire_signal {
                    let _ = p.signal(&worker.handle, sig.number());
                }
            }
        }
        info!(app = %app, generation = g, "{app}: adopted generation {g} ({state}) from {}", fg.unit);
        if state != GenState::Live {
            return;
        }
        // Crash loops stay slow across restarts, at this generation's own restart_backoff.
        let (min, max) = config.restart_backoff;
        for (band, ms) in &saved_app.backoff_ms {
            self.backoff.insert((app.clone(), *band), Backoff::resumed(min, max, Duration::from_millis(*ms)));
        }
        // Bands whose worker died while no daemon watched: respawn.
        for band in 0..config.workers {
            if !self.m.workers_of(app, g).any(|(_, w)| w.band == band) {
                self.schedule_respawn(app, g, band, Duration::ZERO);
            }
        }
    }
}
