//! Crashed live workers: a band whose live worker exits is served by a neighbour band's worker
//! (the rules say so at once), and a replacement is spawned into the same generation's scope
//! after the band's backoff delay. When the replacement is ready the band switches back.

use std::time::Duration;

use ipcluster_core::{
    config::Ready,
    model::{GenState, WorkerState, slice_name},
    name::AppName,
};
use tracing::{info, warn};

use super::{Event, Supervisor, spawn_band};
use crate::{
    netfilter::Router,
    scopes::{ScopeSpec, Scopes},
};

impl<S: Scopes + Clone + 'static, R: Router + 'static> Supervisor<S, R> {
    /// Schedules a respawn of `band` after its backoff delay.
    pub(super) fn schedule_respawn(&mut self, app: &AppName, generation: u64, band: u32, up_for: Duration) {
        let delay = self.backoff.entry((app.clone(), band)).or_default().on_crash(up_for);
        info!(app = %app, generation, band, "{app}: respawning band {band} in {delay:?}");
        self.persist();
        let tx = self.events_tx.clone();
        let app = app.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(Event::Respawn { app, generation, band });
        });
    }

    /// Spawns a replacement for `band` of the live generation `generation`, inside its scope.
    pub(super) async fn respawn(&mut self, app: AppName, generation: u64, band: u32) {
        let Some(gen_) = self.apps.get(&app).and_then(|a| a.generations.get(&generation)) else { return };
        if gen_.state != GenState::Live {
            return;
        }
        let occupied = self.workers.values().any(|w| {
            w.app == app
                && w.generation == generation
                && w.band == band
                && matches!(w.state, WorkerState::Live | WorkerState::Starting)
        });
        if occupied {
            return;
        }
        let config = gen_.config.clone();
        let scope = gen_.scope.clone();
        let spawned = async {
            let launch = self.launch_context(&config).map_err(|e| e.to_string())?;
            let ports = self.allocate_ports(&config, 1).map_err(|e| e.to_string())?.remove(0);
            let gated = spawn_band(&config, generation, band, &ports, &launch).map_err(|e| e.to_string())?;
            // Into the generation's scope before it runs; if every worker died, systemd removed
            // the scope: create it again.
            if let Err(e) = self.deps.scopes.attach(&scope, &[gated.pid]).await {
                let spec = ScopeSpec {
                    unit: scope.clone(),
                    slice: slice_name(&app),
                    description: format!("ipcluster {app} generation {generation}"),
                    pids: vec![gated.pid],
                    kill_signal: config.stop_signal.number(),
                    stop_timeout: config.stop_timeout,
                };
                self.deps.scopes.start(&spec).await.map_err(|e2| format!("{e}; {e2}"))?;
            }
            let pid = gated.pid;
            let pidfd = gated.release().map_err(|e| e.to_string())?;
            Ok::<_, String>((pid, ports, pidfd))
        }
        .await;
        match spawned {
            Ok((pid, ports, pidfd)) => {
                let id =
                    self.add_worker(&app, generation, band, pid, ports, pidfd, std::time::SystemTime::now());
                info!(app = %app, generation, band, pid, "{app}: respawned band {band} of generation {generation} as pid {pid}");
                if config.ready == Ready::Tcp {
                    self.start_probe(id);
                }
                let tx = self.events_tx.clone();
                let timeout = config.ready_timeout;
                tokio::spawn(async move {
                    tokio::time::sleep(timeout).await;
                    let _ = tx.send(Event::RespawnTimeout { id });
                });
            }
            Err(e) => {
                warn!(app = %app, generation, band, "{app}: cannot respawn band {band}: {e}");
                self.schedule_respawn(&app, generation, band, Duration::ZERO);
            }
        }
    }

    /// A respawned worker is ready: its band switches back to it.
    pub(super) async fn respawned_ready(&mut self, id: u64) {
        let Some(w) = self.workers.get_mut(&id) else { return };
        if w.state != WorkerState::Starting {
            return;
        }
        w.state = WorkerState::Live;
        if let Some(p) = w.probe.take() {
            p.abort();
        }
        let (app, band, pid) = (w.app.clone(), w.band, w.pid);
        info!(app = %app, band, pid, "{app}: band {band} is served by its own worker again (pid {pid})");
        self.reconcile().await;
    }
}
