//! What readers see: the [`super::Snapshot`] the supervisor publishes at the end of a turn,
//! built from its memory alone (no /proc read, no system call).

use std::collections::BTreeMap;

use ipcluster_core::{model::scope_name, name::AppName};

use super::{GenerationInfo, HealthInfo, Supervisor, WorkerInfo, model::Worker};
use crate::{clock::usec, world::World};

impl<W: World> Supervisor<W> {
    /// What readers see now (see [`super::api::Snapshot`]): built from memory alone, no /proc.
    pub(super) fn build_snapshot(&self) -> super::Snapshot {
        let before = self.snapshot.borrow().as_ref().map(|s| s.rows.clone());
        let rows = match before {
            Some(rows) if self.rows_current(&rows) => rows,
            _ => self.m.workers.values().map(row).collect(),
        };
        // Each generation's workers, counted in one pass (not one pass a generation).
        let mut counts: BTreeMap<(&AppName, u64), u32> = BTreeMap::new();
        for w in self.m.workers.values() {
            *counts.entry((&w.app, w.generation)).or_default() += 1;
        }
        let generations = self
            .m
            .apps
            .iter()
            .flat_map(|(name, a)| {
                let counts = &counts;
                a.generations.iter().map(move |(n, g)| GenerationInfo {
                    app: name.to_string(),
                    generation: *n,
                    state: g.state,
                    workers: counts.get(&(name, *n)).copied().unwrap_or(0),
                    start_usec: usec(g.started),
                    scope: g.scope.clone(),
                })
            })
            .collect();
        super::Snapshot {
            rows,
            usage: self.m.workers.values().map(|w| w.sample).collect(),
            generations,
            sessions: self.session_rows(),
            health: self.health_rows(),
            metrics: self.metrics.clone(),
            known: self.m.apps.keys().cloned().collect(),
            valid: self.valid_apps(),
            config_dir: self.deps.config_dir.display().to_string(),
        }
    }

    /// Whether `rows` are still the workers' rows (every field but the numbers, which the
    /// snapshot's `usage` holds): compared in place, without building a row.
    fn rows_current(&self, rows: &[WorkerInfo]) -> bool {
        rows.len() == self.m.workers.len()
            && rows.iter().zip(self.m.workers.values()).all(|(r, w)| {
                r.pid == w.pid
                    && r.app == w.app.as_str()
                    && (r.generation, r.band, r.state, r.nice) == (w.generation, w.band, w.state, w.nice)
                    && r.start_usec == usec(w.started)
                    && r.ports.iter().copied().eq(public_ports(w))
            })
    }

    /// ListHealth: the workers of generations with health checks.
    fn health_rows(&self) -> Vec<HealthInfo> {
        if !self.m.apps.keys().any(|a| self.m.any_config(a, |c| c.health.is_some())) {
            return Vec::new();
        }
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

/// A worker's row, its numbers left at 0 (the snapshot's `usage` holds them).
fn row<H>(w: &Worker<H>) -> WorkerInfo {
    WorkerInfo {
        app: w.app.to_string(),
        generation: w.generation,
        band: w.band,
        pid: w.pid,
        state: w.state,
        ports: public_ports(w).collect(),
        rss: 0,
        cpu_usec: 0,
        start_usec: usec(w.started),
        nice: w.nice,
        scope: scope_name(&w.app, w.generation),
    }
}

/// (public port, worker port) of each of a worker's ports, in `listen` order.
fn public_ports<H>(w: &Worker<H>) -> impl Iterator<Item = (u16, u16)> + '_ {
    w.plumbing.ports().iter().map(|(public, port)| (public.port(), *port))
}
