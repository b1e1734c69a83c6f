//! Adoption: a daemon that starts (after a restart, a crash or an upgrade) takes over the
//! generations that are still running, without touching them.
//!
//! Reality first: the `ipcluster-*.scope` units systemd has, the processes in them and their
//! `IPCLUSTER_*` environment (app, generation, band, ports), and which worker ports the kernel's
//! rules point at (that generation is live: a cutover is one atomic transaction, so the rules say
//! either the old or the new one). The persisted state adds what reality cannot tell: which
//! generations were retired and when, and which were still starting.
//!
//! A generation that was still starting when the daemon died is stopped (it was never live); a
//! generation that the rules make live but whose predecessor was not yet retired completes that
//! retirement. The rules are then reconciled with the adopted live workers.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
    time::{Duration, SystemTime},
};

use ipcluster_core::{
    config::AppConfig,
    model::{GenState, WorkerState, parse_scope_name},
    name::AppName,
};
use tracing::{info, warn};

use super::{Generation, Supervisor};
use crate::{netfilter::Router, process, scopes::Scopes};

/// One worker found in a scope.
#[derive(Debug)]
struct Found {
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
    workers: Vec<Found>,
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

impl<S: Scopes + Clone + 'static, R: Router + 'static> Supervisor<S, R> {
    /// Takes over every running generation (see the module docs).
    pub(super) async fn adopt(&mut self) {
        let units = match self.deps.scopes.list().await {
            Ok(u) => u,
            Err(e) => {
                warn!("cannot list scopes to adopt: {e}");
                return;
            }
        };
        let routed = match self.deps.router.current().await {
            Ok(existing) => existing.routed_ports(),
            Err(e) => {
                warn!("cannot read the NAT rules: {e}");
                BTreeSet::new()
            }
        };
        let mut found: BTreeMap<AppName, BTreeMap<u64, FoundGen>> = BTreeMap::new();
        for unit in units {
            let Some((app, g)) = parse_scope_name(&unit) else { continue };
            let pids = match self.deps.scopes.processes(&unit).await {
                Ok(p) => p,
                Err(e) => {
                    warn!("cannot list the processes of {unit}: {e}");
                    continue;
                }
            };
            let in_scope: BTreeSet<u32> = pids.iter().copied().collect();
            let mut fg = FoundGen { unit: unit.clone(), bands: 0, workers: Vec::new() };
            for pid in pids {
                // A worker's own children inherit its environment: only the top of each tree is
                // the worker.
                if process::parent(pid).is_some_and(|pp| in_scope.contains(&pp)) {
                    continue;
                }
                let Some(env) = process::environ(pid) else { continue };
                let g_env = env_get(&env, "IPCLUSTER_GENERATION").and_then(|v| v.parse::<u64>().ok());
                if env_get(&env, "IPCLUSTER_APP") != Some(app.as_str()) || g_env != Some(g) {
                    continue;
                }
                let band = env_get(&env, "IPCLUSTER_BAND").and_then(|v| v.parse().ok());
                let bands = env_get(&env, "IPCLUSTER_BANDS").and_then(|v| v.parse().ok());
                let ports = env_get(&env, "IPCLUSTER_PORTS").and_then(parse_ports);
                let (Some(band), Some(bands), Some(ports)) = (band, bands, ports) else { continue };
                fg.bands = bands;
                fg.workers.push(Found { band, pid, ports });
            }
            if fg.workers.is_empty() {
                warn!("{unit} has no worker of ours; left alone");
                continue;
            }
            found.entry(app).or_default().insert(g, fg);
        }

        // Crash loops stay slow across restarts.
        for (app, record) in &self.persisted.apps {
            let Ok(name) = AppName::new(app) else { continue };
            for (band, ms) in &record.backoff_ms {
                self.backoff.insert(
                    (name.clone(), *band),
                    ipcluster_core::policy::Backoff::resumed(
                        Duration::from_millis(100),
                        Duration::from_secs(30),
                        Duration::from_millis(*ms),
                    ),
                );
            }
        }
        let mut adopted = (0, 0);
        for (app, gens) in found {
            let records =
                self.persisted.apps.get(app.as_str()).map(|a| a.generations.clone()).unwrap_or_default();
            let routed_gen = gens
                .iter()
                .rev()
                .find(|(_, fg)| fg.workers.iter().any(|w| w.ports.iter().any(|p| routed.contains(&p.1))))
                .map(|(g, _)| *g);
            let recorded_live = records
                .iter()
                .rev()
                .find(|(g, r)| r.state == "live" && gens.contains_key(g))
                .map(|(g, _)| *g);
            let complete = |fg: &FoundGen| {
                fg.workers.iter().map(|w| w.band).collect::<BTreeSet<_>>().len() as u32 == fg.bands
            };
            let newest_complete = gens.iter().rev().find(|(_, fg)| complete(fg)).map(|(g, _)| *g);
            let live =
                routed_gen.or(recorded_live).or(if records.is_empty() { newest_complete } else { None });

            for (g, fg) in gens {
                let record = records.get(&g);
                let half_started = match record {
                    Some(r) => r.state == "starting" && Some(g) != live,
                    // No record (a lost state file): newer than the live one means never live.
                    None => live.is_some_and(|l| g > l),
                };
                if half_started {
                    warn!(app = %app, generation = g, "{app}: generation {g} was still starting when the previous daemon stopped; stopping it");
                    let scopes = self.deps.scopes.clone();
                    let unit = fg.unit.clone();
                    tokio::spawn(async move {
                        if let Err(e) = scopes.stop(&unit).await {
                            warn!("cannot stop {unit}: {e}");
                        }
                    });
                    continue;
                }
                let state = if Some(g) == live { GenState::Live } else { GenState::Retired };
                self.adopt_generation(&app, g, fg, state, record);
                adopted.0 += 1;
            }
        }
        adopted.1 = self.workers.len();
        // Apps stopped with StopApp stay stopped; finish a stop a crash interrupted.
        for (app, record) in &self.persisted.apps {
            let Ok(name) = AppName::new(app) else { continue };
            if !record.stopped {
                continue;
            }
            let a = self.apps.entry(name.clone()).or_default();
            a.stopped = true;
            for g in a.generations.values().filter(|g| g.state.is_running()) {
                warn!(app = %name, "{name}: was being stopped when the previous daemon stopped; stopping {}", g.scope);
                let scopes = self.deps.scopes.clone();
                let unit = g.scope.clone();
                tokio::spawn(async move {
                    let _ = scopes.stop(&unit).await;
                });
            }
        }
        for w in self.workers.values_mut() {
            if self.apps.get(&w.app).is_some_and(|a| a.stopped) {
                w.state = WorkerState::Stopping;
            }
        }
        if adopted.0 > 0 {
            info!("adopted {} generations with {} workers", adopted.0, adopted.1);
        }
        self.persist();
        self.reconcile().await;
    }

    fn adopt_generation(
        &mut self,
        app: &AppName,
        g: u64,
        fg: FoundGen,
        state: GenState,
        record: Option<&crate::state::GenRecord>,
    ) {
        let from_file = match self.apps.get(app).and_then(|a| a.config.clone()) {
            Some(Ok(c)) => Some(c),
            _ => None,
        };
        // Public addresses: remembered, else the app file's entries for the same ports.
        let public_ports: Vec<u16> = fg.workers[0].ports.iter().map(|p| p.0).collect();
        let listen: Vec<SocketAddrV4> = record
            .and_then(|r| r.listen.iter().map(|l| l.parse().ok()).collect::<Option<Vec<_>>>())
            .filter(|l: &Vec<SocketAddrV4>| l.len() == public_ports.len())
            .unwrap_or_else(|| {
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
        let at = |us: u64| SystemTime::UNIX_EPOCH + Duration::from_micros(us);
        let first_start = fg.workers.iter().filter_map(|w| process::start_time_usec(w.pid)).min();
        let started = record.map(|r| r.started_usec).or(first_start).map_or_else(SystemTime::now, at);
        let was_live = record.is_some_and(|r| r.state == "live");
        let retired_at = match state {
            GenState::Retired => Some(record.and_then(|r| r.retired_usec).map_or_else(SystemTime::now, at)),
            _ => None,
        };
        self.apps.entry(app.clone()).or_default().generations.insert(
            g,
            Generation {
                state,
                config: config.clone(),
                started,
                retired_at,
                scope: fg.unit.clone(),
                waiting: vec![],
                failure: None,
            },
        );
        for w in fg.workers {
            let pidfd = match process::adopt(w.pid) {
                Ok(fd) => fd,
                Err(e) => {
                    warn!(app = %app, pid = w.pid, "cannot adopt pid {}: {e}", w.pid);
                    continue;
                }
            };
            let ports = listen.iter().copied().zip(w.ports.iter().map(|p| p.1)).collect();
            let id = self.add_worker(app, g, w.band, w.pid, ports, pidfd, started);
            let wstate = if state == GenState::Live { WorkerState::Live } else { WorkerState::Retired };
            if let Some(worker) = self.workers.get_mut(&id) {
                worker.state = wstate;
                worker.ready = true;
                let ports: Vec<u16> = worker.ports.iter().map(|p| p.1).collect();
                worker.listeners = process::grab_listeners(worker.pid, &ports);
            }
            // The rules went live with a newer generation but this one was not retired yet.
            if state == GenState::Retired && was_live {
                if let Err(e) = process::renice_tree(w.pid, self.base_nice + config.retire_nice) {
                    warn!(app = %app, pid = w.pid, "cannot renice: {e}");
                }
                if let Some(sig) = config.retire_signal
                    && let Some(worker) = self.workers.get(&id)
                {
                    let _ = process::signal(&worker.pidfd, sig.number());
                }
            }
        }
        info!(app = %app, generation = g, "{app}: adopted generation {g} ({state}) from {}", fg.unit);
        // Bands of the live generation whose worker died while no daemon watched: respawn.
        if state == GenState::Live {
            for band in 0..config.workers {
                if !self.workers.values().any(|w| &w.app == app && w.generation == g && w.band == band) {
                    self.schedule_respawn(app, g, band, Duration::ZERO);
                }
            }
        }
    }
}
