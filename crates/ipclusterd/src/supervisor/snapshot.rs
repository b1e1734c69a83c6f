//! What readers see: the [`super::Snapshot`] the supervisor publishes at the end of a turn,
//! built from its memory alone (no /proc read, no system call).

use ipcluster_core::model::scope_name;

use super::{GenerationInfo, HealthInfo, Supervisor, WorkerInfo};
use crate::{clock::usec, world::World};

impl<W: World> Supervisor<W> {
    /// What readers see now (see [`super::api::Snapshot`]): built from memory alone, no /proc.
    pub(super) fn build_snapshot(&self) -> super::Snapshot {
        let workers = self
            .m
            .workers
            .values()
            .map(|w| WorkerInfo {
                app: w.app.to_string(),
                generation: w.generation,
                band: w.band,
                pid: w.pid,
                state: w.state,
                ports: w.plumbing.ports().iter().map(|(public, port)| (public.port(), *port)).collect(),
                rss: w.sample.rss,
                cpu_usec: w.sample.cpu_usec,
                start_usec: usec(w.started),
                nice: w.nice,
                scope: scope_name(&w.app, w.generation),
            })
            .collect();
        let generations = self
            .m
            .apps
            .iter()
            .flat_map(|(name, a)| {
                a.generations.iter().map(move |(n, g)| GenerationInfo {
                    app: name.to_string(),
                    generation: *n,
                    state: g.state,
                    workers: self.m.workers_of(name, *n).count() as u32,
                    start_usec: usec(g.started),
                    scope: g.scope.clone(),
                })
            })
            .collect();
        super::Snapshot {
            workers,
            generations,
            sessions: self.session_rows(),
            health: self.health_rows(),
            metrics: self.metrics.clone(),
            known: self.m.apps.keys().cloned().collect(),
            valid: self.valid_apps(),
            config_dir: self.deps.config_dir.display().to_string(),
        }
    }

    /// ListHealth: the workers of generations with health checks.
    fn health_rows(&self) -> Vec<HealthInfo> {
        self.m
            .workers
            .values()
            .filter(|w| self.m.config(&w.app, w.generation).is_some_and(|c| c.health.is_some()))
            .map(|w| HealthInfo {
                app: w.app.to_string(),
                generation: w.generation,
                band: w.band,
                pid: w.pid,
                failures: w.health.failures,
                last: w.health.last.as_ref().map(|(o, _)| o.to_string()).unwrap_or_default(),
                last_usec: w.health.last.as_ref().map_or(0, |(_, at)| usec(*at)),
                note: w.health.note.clone().unwrap_or_default(),
            })
            .collect()
    }
}
