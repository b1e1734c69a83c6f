//! Keeping a cluster healthy for weeks: sampling, the memory policies (per worker and per
//! cluster), the watchdog and `retire_timeout`.
//!
//! The decisions are [`ipcluster_core::policy`]'s; this module gathers their inputs and applies
//! their outputs. A live worker is only ever retired after its replacement is ready, exactly like
//! a one-band deploy; memory and health retirements are rate-limited by `retire_rate`.
//!
//! Sampling runs on a blocking thread ([`Processes::sample`]) and comes back as
//! [`Event::Samples`](super::Event::Samples). Counting connections is costly, so a round counts
//! them only for the retired workers of apps that were over their low memory watermark in the
//! previous round: the cluster policy acts one round after the pressure appears, with fresh
//! numbers.

use std::{collections::HashMap, time::Duration};

use ipcluster_core::{
    model::WorkerState,
    name::AppName,
    policy::{MemState, MemWorker, RateLimiter, cluster_memory},
};
use tracing::{info, warn};

use super::{BusSignal, Event, PolicyAction, Supervisor, model::WorkerId};
use crate::{clock::usec, processes::Sampler, sampler::Sample, world::World};

/// Which workers a policy may act on, by state.
fn mem_state(s: WorkerState) -> MemState {
    match s {
        WorkerState::Live | WorkerState::Starting => MemState::Live,
        WorkerState::Retired => MemState::Retired,
        WorkerState::Stopping => MemState::Stopping,
    }
}

impl<W: World> Supervisor<W> {
    /// Starts a sampling round on a blocking thread.
    pub(super) fn start_sampling(&mut self) {
        // A share of the workers per round (sampler::next_share), and every round those a
        // memory policy watches.
        let share = crate::sampler::next_share(&self.m.workers, self.sample_cursor);
        self.sample_cursor = share.last().map_or(0, |(id, _)| *id);
        let mut targets: Vec<(WorkerId, u32)> = share.iter().map(|(id, w)| (*id, w.pid)).collect();
        // worker_memory_max watches its generation's workers; cluster_memory_max sums every
        // worker of the app, whichever generation.
        let watched: Vec<(&AppName, u64)> = (self.m.apps.iter())
            .flat_map(|(name, a)| {
                let cluster = a.generations.values().any(|x| x.config.cluster_memory_max.is_some());
                (a.generations.iter())
                    .filter(move |(_, x)| cluster || x.config.worker_memory_max.is_some())
                    .map(move |(g, _)| (name, *g))
            })
            .collect();
        if !watched.is_empty() {
            let chosen: std::collections::HashSet<WorkerId> = targets.iter().map(|t| t.0).collect();
            targets.extend(
                (self.m.workers.iter())
                    .filter(|(id, w)| {
                        !chosen.contains(id)
                            && watched.iter().any(|(a, g)| *g == w.generation && **a == w.app)
                    })
                    .map(|(id, w)| (*id, w.pid)),
            );
        }
        // Connections are counted only for the retired workers of apps under memory pressure.
        let pressured: Vec<(WorkerId, u32)> = if self.m.apps.values().any(|a| a.memory_pressure) {
            (self.m.workers.iter())
                .filter(|(_, w)| matches!(w.state, WorkerState::Retired | WorkerState::Stopping))
                .filter(|(_, w)| self.m.apps.get(&w.app).is_some_and(|a| a.memory_pressure))
                .map(|(id, w)| (*id, w.pid))
                .collect()
        } else {
            Vec::new()
        };
        let scopes: Vec<(String, String)> = self
            .m
            .apps
            .iter()
            .flat_map(|(name, a)| {
                let slice = ipcluster_core::model::slice_name(name);
                a.generations
                    .values()
                    .filter(|g| g.state.is_running())
                    .map(move |g| (slice.clone(), g.scope.clone()))
            })
            .collect();
        let (sampler, tx) = (self.deps.sampler.clone(), self.events_tx.clone());
        tokio::task::spawn_blocking(move || {
            let samples = sampler.sample(&scopes, &targets);
            let connections = if pressured.is_empty() { Vec::new() } else { sampler.connections(&pressured) };
            let _ = tx.send(Event::Samples { samples, connections });
        });
    }

    /// Stores a round's numbers and applies the policies.
    pub(super) async fn apply_samples(
        &mut self,
        samples: Vec<(WorkerId, Sample)>,
        connections: Vec<(WorkerId, u32)>,
    ) {
        for (id, s) in samples {
            if let Some(w) = self.m.workers.get_mut(&id) {
                w.sample = s;
            }
        }
        let connections: HashMap<WorkerId, u32> = connections.into_iter().collect();
        let apps: Vec<AppName> = self.m.apps.keys().cloned().collect();
        for app in apps {
            self.worker_memory(&app).await;
            self.cluster_memory(&app, &connections);
            self.watchdog(&app).await;
            self.retire_timeout(&app);
        }
    }

    /// Whether the app's retire_rate allows one more memory or health retirement now.
    pub(super) fn retirement_allowed(&mut self, app: &AppName, rate: (u32, Duration)) -> bool {
        let now = tokio::time::Instant::now();
        let a = self.m.apps.entry(app.clone()).or_default();
        let limit = a.retire_limit.get_or_insert_with(|| RateLimiter::new(rate.0, rate.1));
        limit.set_limit(rate.0, rate.1);
        limit.try_take(now.into_std().duration_since(self.started.into_std()))
    }

    /// Counts a policy action for /metrics.
    pub(super) fn count(&mut self, app: &AppName, action: PolicyAction) {
        *self.metrics.policy_actions.entry((app.to_string(), action)).or_default() += 1;
    }

    pub(super) fn held_back(&mut self, app: &AppName, generation: u64, band: u32, pid: u32, reason: String) {
        self.count(app, PolicyAction::HeldBack);
        warn!(app = %app, generation, band, pid, "{app}: band {band} pid {pid}: {reason}");
        self.signal(BusSignal::PolicyHeldBack { app: app.to_string(), generation, band, pid, reason });
    }

    /// Live workers over `worker_memory_max` are replaced (then retired), rate-limited.
    async fn worker_memory(&mut self, app: &AppName) {
        if !self.m.any_config(app, |c| c.worker_memory_max.is_some()) {
            return;
        }
        let over: Vec<(WorkerId, u64, u32, u32, u64, u64)> = self
            .m
            .workers_of_app(app)
            .filter(|(_, w)| w.state == WorkerState::Live)
            .filter_map(|(id, w)| {
                let max = self.m.config(app, w.generation)?.worker_memory_max?;
                (w.sample.rss > max && !self.m.being_replaced(id)).then_some((
                    id,
                    w.generation,
                    w.band,
                    w.pid,
                    w.sample.rss,
                    max,
                ))
            })
            .collect();
        for (id, g, band, pid, rss, max) in over {
            let Some(config) = self.m.config(app, g) else { continue };
            let why = format!("RSS {} MiB over worker_memory_max {} MiB", rss >> 20, max >> 20);
            if self.retirement_allowed(app, config.retire_rate) {
                info!(app = %app, generation = g, band, pid, "{app}: band {band} pid {pid}: {why}; replacing it");
                self.count(app, PolicyAction::MemoryReplacement);
                self.replace_band(app, g, band, id, "memory").await;
            } else {
                self.held_back(app, g, band, pid, format!("{why}; retirement held back by retire_rate"));
            }
        }
    }

    /// The watermarks of `cluster_memory_max` over all the app's workers.
    fn cluster_memory(&mut self, app: &AppName, connections: &HashMap<WorkerId, u32>) {
        let Some(budget) = self
            .m
            .apps
            .get(app)
            .and_then(|a| a.live())
            .and_then(|g| self.m.config(app, g))
            .and_then(|c| c.cluster_memory_max)
        else {
            return;
        };
        let total: u64 = self.m.workers_of_app(app).map(|(_, w)| w.sample.rss).sum();
        let live: u64 = self
            .m
            .workers_of_app(app)
            .filter(|(_, w)| w.state == WorkerState::Live)
            .map(|(_, w)| w.sample.rss)
            .sum();
        let pressure = total > budget / 100 * 80;
        let Some(a) = self.m.apps.get_mut(app) else { return };
        let counted = std::mem::replace(&mut a.memory_pressure, pressure);
        if !pressure && live <= budget {
            a.live_over_budget = false;
            return;
        }
        if pressure && !counted {
            // The next round counts the retired workers' connections; the policy acts then.
            return;
        }
        let mem: Vec<MemWorker> = self
            .m
            .workers_of_app(app)
            .map(|(id, w)| MemWorker {
                id,
                rss: w.sample.rss,
                sessions: self.sessions.get(&(app.clone(), w.generation)).copied().unwrap_or(0),
                connections: connections.get(&id).copied().unwrap_or(0),
                started: usec(w.started),
                state: mem_state(w.state),
            })
            .collect();
        let verdict = cluster_memory(&mem, budget);
        for id in &verdict.kill {
            if let Some(w) = self.m.workers.get_mut(id) {
                warn!(app = %app, pid = w.pid, "{app}: cluster RSS {} MiB over 95 % of {} MiB; SIGKILL to retired pid {}", total >> 20, budget >> 20, w.pid);
                w.state = WorkerState::Stopping;
                w.stop_reason = Some("memory");
            }
            self.count(app, PolicyAction::WatermarkKill);
            self.kill_worker(*id);
        }
        for id in &verdict.stop {
            if let Some(w) = self.m.workers.get(id) {
                info!(app = %app, pid = w.pid, "{app}: cluster RSS {} MiB over 80 % of {} MiB; stopping retired pid {}", total >> 20, budget >> 20, w.pid);
            }
            self.count(app, PolicyAction::WatermarkStop);
            self.stop_worker(*id, "memory");
        }
        let over = verdict.live_over_budget;
        let Some(a) = self.m.apps.get_mut(app) else { return };
        if over != a.live_over_budget {
            a.live_over_budget = over;
            if over {
                let live_gen = a.live().unwrap_or(0);
                self.held_back(app, live_gen, 0, 0, format!("live workers alone use more than cluster_memory_max ({} MiB); live workers are never killed for it", budget >> 20));
            }
        }
    }

    /// Workers that stopped sending WATCHDOG=1: a live one is replaced (rate-limited), a retired
    /// one is stopped.
    async fn watchdog(&mut self, app: &AppName) {
        if !self.m.any_config(app, |c| c.watchdog.is_some()) {
            return;
        }
        let now = tokio::time::Instant::now();
        let silent: Vec<(WorkerId, u64, u32, u32, WorkerState)> = self
            .m
            .workers_of_app(app)
            .filter(|(_, w)| w.ready && matches!(w.state, WorkerState::Live | WorkerState::Retired))
            .filter_map(|(id, w)| {
                let limit = self.m.config(app, w.generation)?.watchdog?;
                (now.duration_since(w.last_ping) > limit && !self.m.being_replaced(id)).then_some((
                    id,
                    w.generation,
                    w.band,
                    w.pid,
                    w.state,
                ))
            })
            .collect();
        for (id, g, band, pid, state) in silent {
            let Some(config) = self.m.config(app, g) else { continue };
            let why = format!("no WATCHDOG=1 for more than {:?}", config.watchdog.unwrap_or_default());
            if state == WorkerState::Retired {
                warn!(app = %app, pid, "{app}: retired pid {pid} is hung ({why}); stopping it");
                self.count(app, PolicyAction::Watchdog);
                self.stop_worker(id, "watchdog");
            } else if self.retirement_allowed(app, config.retire_rate) {
                warn!(app = %app, generation = g, band, pid, "{app}: band {band} pid {pid} is hung ({why}); replacing it");
                self.count(app, PolicyAction::Watchdog);
                self.replace_band(app, g, band, id, "watchdog").await;
            } else {
                self.held_back(
                    app,
                    g,
                    band,
                    pid,
                    format!("hung ({why}); retirement held back by retire_rate"),
                );
            }
        }
    }

    /// Retired workers older than `retire_timeout` are stopped (through the reap queue).
    fn retire_timeout(&mut self, app: &AppName) {
        if !self.m.any_config(app, |c| c.retire_timeout.is_some()) {
            return;
        }
        let now = self.now();
        let due: Vec<WorkerId> = self
            .m
            .workers_of_app(app)
            .filter(|(_, w)| w.state == WorkerState::Retired && !w.reap_queued)
            .filter(|(_, w)| {
                let Some(gen_) = self.m.generation(app, w.generation) else { return false };
                let (Some(timeout), Some(at)) =
                    (gen_.config.retire_timeout, w.retired_at.or(gen_.retired_at))
                else {
                    return false;
                };
                now.duration_since(at).unwrap_or_default() >= timeout
            })
            .map(|(id, _)| id)
            .collect();
        if !due.is_empty() {
            info!(app = %app, "{app}: {} retired workers reached retire_timeout; stopping them", due.len());
        }
        for id in due {
            self.queue_reap(id, "reaped");
        }
    }
}
