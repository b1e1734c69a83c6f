//! New workers for one band of a live generation, in the generation's own scope:
//!
//! - after a crash: the band is served by a neighbour band's worker (the rules say so at once)
//!   and a replacement is spawned after the band's backoff (`restart_backoff`); when it is ready
//!   the band switches back;
//! - for a memory or health retirement: the replacement is spawned while the old worker still
//!   serves; when it is ready, one rule change moves the band and the old worker is retired.

use std::time::Duration;

use ipcluster_core::{
    config::Routing,
    model::{GenState, WorkerState},
    name::AppName,
    policy::Backoff,
};
use tracing::{info, warn};

use super::{Supervisor, model::WorkerId, timers::TimerKey};
use crate::{processes::Spawner, world::World};

impl<W: World> Supervisor<W> {
    /// Schedules a respawn of `band` after its backoff delay (the generation's
    /// `restart_backoff`, doubling while it keeps crashing).
    pub(super) fn schedule_respawn(&mut self, app: &AppName, generation: u64, band: u32, up_for: Duration) {
        let Some(config) = self.m.config(app, generation) else { return };
        let (min, max) = config.restart_backoff;
        let delay = self
            .backoff
            .entry((app.clone(), band))
            .or_insert_with(|| Backoff::new(min, max))
            .on_crash(up_for);
        info!(app = %app, generation, band, "{app}: respawning band {band} in {delay:?}");
        *self.metrics.restarts.entry((app.to_string(), band)).or_default() += 1;
        self.persist();
        self.timers.set(TimerKey::Respawn { app: app.clone(), generation, band }, delay);
    }

    /// The backoff timer of a crashed band fired: spawn its replacement (unless one exists).
    pub(super) async fn respawn(&mut self, app: AppName, generation: u64, band: u32) {
        let occupied = self
            .m
            .workers_of(&app, generation)
            .any(|(_, w)| w.band == band && matches!(w.state, WorkerState::Live | WorkerState::Starting));
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
        old: WorkerId,
        reason: &'static str,
    ) {
        let why = format!("band {band} needed a replacement ({reason})");
        if self.canary_trouble(app, generation, why).await {
            return;
        }
        if let Some(w) = self.m.workers.get_mut(&old) {
            w.stop_reason = Some(reason);
        }
        if let Err(e) = self.spawn_for_band(app, generation, band, Some(old)).await {
            warn!(app = %app, generation, band, "{app}: cannot start a replacement for band {band}: {e}");
        }
    }

    /// Spawns one worker for `band` into the live generation's scope; killed if it is not ready
    /// within `ready_timeout`.
    async fn spawn_for_band(
        &mut self,
        app: &AppName,
        generation: u64,
        band: u32,
        replaces: Option<WorkerId>,
    ) -> Result<(), String> {
        let Some(gen_) = self.m.generation(app, generation) else { return Err("no such generation".into()) };
        if !matches!(gen_.state, GenState::Live | GenState::Canary) {
            return Err(format!("generation {generation} is {}", gen_.state));
        }
        let config = gen_.config.clone();
        let ports = self.allocate_ports(&config, 1).map_err(|e| e.to_string())?.remove(0);
        let id = self.launch_into_scope(app, generation, band, ports).await?;
        if let Some(w) = self.m.workers.get_mut(&id) {
            w.replaces = replaces;
        }
        self.timers.set(TimerKey::RespawnTimeout(id), config.ready_timeout);
        // Who it is is the daemon's word after a restart.
        self.persist();
        Ok(())
    }

    /// A respawned worker is not ready in time: kill it (its exit schedules the next try).
    pub(super) fn respawn_timeout(&mut self, id: WorkerId) {
        let Some(w) = self.m.workers.get(&id) else { return };
        warn!(app = %w.app, band = w.band, pid = w.pid, "{}: respawned worker of band {} not ready in time; killing it", w.app, w.band);
        self.kill_worker(id);
    }

    /// A respawned worker is ready: its band switches to it; the worker it replaces (if any)
    /// leaves the rules in the same transaction, then is retired.
    pub(super) async fn respawned_ready(&mut self, id: WorkerId) {
        let Some(w) = self.m.workers.get_mut(&id) else { return };
        if w.state != WorkerState::Starting {
            return;
        }
        w.state = WorkerState::Live;
        let (app, band, pid, g, replaces) = (w.app.clone(), w.band, w.pid, w.generation, w.replaces.take());
        self.timers.cancel(&TimerKey::RespawnTimeout(id));
        let now = self.now();
        if let Some(old) = replaces.and_then(|o| self.m.workers.get_mut(&o)) {
            old.state = WorkerState::Retired;
            old.retired_at = Some(now);
        }
        // NAT: the rules now name it (socket mode: its sockets took the band's slot when it was
        // ready).
        if self.m.config(&app, g).is_some_and(|c| c.routing == Routing::Nat) {
            self.sync_rules().await;
        }
        let Some(old) = replaces.and_then(|o| self.m.workers.get(&o)) else {
            info!(app = %app, band, pid, "{app}: band {band} is served by its own worker again (pid {pid})");
            return;
        };
        info!(app = %app, band, pid, "{app}: band {band} moved from pid {} to pid {pid}; pid {} retired ({})", old.pid, old.pid, old.stop_reason.unwrap_or("replaced"));
        let (old_id, old_pid) = (replaces.unwrap_or_default(), old.pid);
        if let Some(config) = self.m.config(&app, g) {
            let nice = self.base_nice + config.retire_nice;
            if let Err(e) = self.deps.spawner.renice_tree(old_pid, nice) {
                warn!(app = %app, pid = old_pid, "cannot renice: {e}");
            }
            if let Some(sig) = config.retire_signal {
                let _ = self.deps.spawner.signal(&old.handle, sig.number());
            }
            if let Some(w) = self.m.workers.get_mut(&old_id) {
                w.nice = nice;
            }
        }
    }
}
