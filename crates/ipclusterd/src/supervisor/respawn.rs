//! New workers for one band of a live generation, in the generation's own scope:
//!
//! - after a crash: the band is served by a neighbour band's worker (the rules say so at once)
//!   and a replacement is spawned after the band's backoff delay; when it is ready the band
//!   switches back;
//! - for a memory or health retirement: the replacement is spawned while the old worker still
//!   serves; when it is ready, one rule change moves the band and the old worker is retired.

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
        let (min, max) = self
            .apps
            .get(app)
            .and_then(|a| a.generations.get(&generation))
            .map_or((Duration::from_millis(100), Duration::from_secs(30)), |g| g.config.restart_backoff);
        let delay = self
            .backoff
            .entry((app.clone(), band))
            .or_insert_with(|| ipcluster_core::policy::Backoff::new(min, max))
            .on_crash(up_for);
        info!(app = %app, generation, band, "{app}: respawning band {band} in {delay:?}");
        self.persist();
        let tx = self.events_tx.clone();
        let app = app.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(Event::Respawn { app, generation, band });
        });
    }

    /// Spawns a replacement for `band` of the live generation `generation` after a crash.
    pub(super) async fn respawn(&mut self, app: AppName, generation: u64, band: u32) {
        let occupied = self.workers.values().any(|w| {
            w.app == app
                && w.generation == generation
                && w.band == band
                && matches!(w.state, WorkerState::Live | WorkerState::Starting)
        });
        if occupied {
            return;
        }
        if let Err(e) = self.spawn_for_band(&app, generation, band, None).await {
            warn!(app = %app, generation, band, "{app}: cannot respawn band {band}: {e}");
            self.schedule_respawn(&app, generation, band, Duration::ZERO);
        }
    }

    /// Replaces the live worker `old` of `band` (memory, watchdog): the old one keeps serving
    /// until the replacement is ready, then is retired.
    pub(super) async fn replace_band(
        &mut self,
        app: &AppName,
        generation: u64,
        band: u32,
        old: u64,
        reason: &'static str,
    ) {
        if let Some(w) = self.workers.get_mut(&old) {
            w.stop_reason = Some(reason);
        }
        if let Err(e) = self.spawn_for_band(app, generation, band, Some(old)).await {
            warn!(app = %app, generation, band, "{app}: cannot start a replacement for band {band}: {e}");
        }
    }

    /// Spawns one worker for `band` into the live generation's scope.
    async fn spawn_for_band(
        &mut self,
        app: &AppName,
        generation: u64,
        band: u32,
        replaces: Option<u64>,
    ) -> Result<(), String> {
        let Some(gen_) = self.apps.get(app).and_then(|a| a.generations.get(&generation)) else {
            return Err("no such generation".into());
        };
        if gen_.state != GenState::Live {
            return Err(format!("generation {generation} is {}", gen_.state));
        }
        let config = gen_.config.clone();
        let ports = self.allocate_ports(&config, 1).map_err(|e| e.to_string())?.remove(0);
        let id = self.launch_into_scope(app, generation, band, ports).await?;
        if let Some(w) = self.workers.get_mut(&id) {
            w.replaces = replaces;
        }
        let tx = self.events_tx.clone();
        let timeout = config.ready_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let _ = tx.send(Event::RespawnTimeout { id });
        });
        Ok(())
    }

    /// Starts one worker of an existing generation inside its scope: forked at its gate, moved
    /// into the scope (created again if every worker died and systemd removed it), released.
    pub(super) async fn launch_into_scope(
        &mut self,
        app: &AppName,
        generation: u64,
        band: u32,
        ports: Vec<(std::net::SocketAddrV4, u16)>,
    ) -> Result<u64, String> {
        let Some(gen_) = self.apps.get(app).and_then(|a| a.generations.get(&generation)) else {
            return Err("no such generation".into());
        };
        let config = gen_.config.clone();
        let scope = gen_.scope.clone();
        let launch = self.launch_context(&config).map_err(|e| e.to_string())?;
        let gated = spawn_band(&config, generation, band, &ports, &launch).map_err(|e| e.to_string())?;
        if let Err(e) = self.deps.scopes.attach(&scope, &[gated.pid]).await {
            let spec = ScopeSpec {
                unit: scope.clone(),
                slice: slice_name(app),
                description: format!("ipcluster {app} generation {generation}"),
                pids: vec![gated.pid],
                kill_signal: config.stop_signal.number(),
                stop_timeout: config.stop_timeout,
            };
            self.deps.scopes.start(&spec).await.map_err(|e2| format!("{e}; {e2}"))?;
        }
        let pid = gated.pid;
        let pidfd = gated.release().map_err(|e| e.to_string())?;
        let id = self.add_worker(app, generation, band, pid, ports, pidfd, std::time::SystemTime::now());
        info!(app = %app, generation, band, pid, "{app}: started pid {pid} for band {band} of generation {generation}");
        if config.ready == Ready::Tcp {
            self.start_probe(id);
        }
        Ok(id)
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
        let (app, band, pid, replaces) = (w.app.clone(), w.band, w.pid, w.replaces.take());
        // The replaced worker (if any) leaves the rules in the same transaction the new one
        // enters them, then is retired.
        let retire_nice =
            self.gen_config(&app, self.workers[&id].generation).map(|c| (c.retire_nice, c.retire_signal));
        if let Some(old) = replaces.and_then(|o| self.workers.get_mut(&o)) {
            old.state = WorkerState::Retired;
            old.retired_at = Some(std::time::SystemTime::now());
        }
        self.reconcile().await;
        match replaces.and_then(|o| self.workers.get(&o)) {
            Some(old) => {
                info!(app = %app, band, pid, "{app}: band {band} moved from pid {} to pid {pid}; pid {} retired ({})", old.pid, old.pid, old.stop_reason.unwrap_or("replaced"));
                if let Some((nice, sig)) = retire_nice {
                    if let Err(e) = crate::process::renice_tree(old.pid, self.base_nice + nice) {
                        warn!(app = %app, pid = old.pid, "cannot renice: {e}");
                    }
                    if let Some(sig) = sig {
                        let _ = crate::process::signal(&old.pidfd, sig.number());
                    }
                }
            }
            None => {
                info!(app = %app, band, pid, "{app}: band {band} is served by its own worker again (pid {pid})")
            }
        }
    }
}
