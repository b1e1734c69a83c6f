//! Keeping a cluster healthy for weeks: sampling, the memory policies (per worker and per
//! cluster), the watchdog, `retire_timeout`, and the paced reaping of retired workers
//! (`reap_interval`) and spawning of new ones (`spawn_interval`).
//!
//! The decisions are [`ipcluster_core::policy`]'s; this module gathers their inputs and applies
//! their outputs. A live worker is only ever retired after its replacement is ready, exactly like
//! a one-band deploy; memory and health retirements are rate-limited by `retire_rate`.

use std::time::{Duration, Instant, SystemTime};

use ipcluster_core::{
    model::{GenState, WorkerState},
    name::AppName,
    policy::{MemState, MemWorker, RateLimiter, cluster_memory},
};
use tracing::{info, warn};

use super::{BusSignal, Event, Supervisor, usec};
use crate::{netfilter::Router, process, sampler, scopes::Scopes};

impl<S: Scopes + Clone + 'static, R: Router + 'static> Supervisor<S, R> {
    /// Starts a sampling round on a blocking thread; its result arrives as [`Event::Samples`].
    pub(super) fn start_sampling(&mut self) {
        let targets: Vec<(u64, u32)> = self.workers.iter().map(|(id, w)| (*id, w.pid)).collect();
        // The scopes' cgroups (systemd puts ipcluster-<app>.slice under ipcluster.slice).
        let scopes: Vec<std::path::PathBuf> = self
            .apps
            .iter()
            .flat_map(|(name, a)| {
                a.generations.values().filter(|g| g.state.is_running()).map(move |g| {
                    std::path::Path::new("/sys/fs/cgroup/ipcluster.slice")
                        .join(ipcluster_core::model::slice_name(name))
                        .join(&g.scope)
                })
            })
            .collect();
        let tx = self.events_tx.clone();
        tokio::task::spawn_blocking(move || {
            let _ = tx.send(Event::Samples(sampler::sample(&scopes, &targets)));
        });
    }

    /// Stores a round's numbers and applies the policies.
    pub(super) async fn apply_samples(&mut self, samples: Vec<(u64, sampler::Sample)>) {
        for (id, s) in samples {
            if let Some(w) = self.workers.get_mut(&id) {
                w.sample = s;
            }
        }
        let apps: Vec<AppName> = self.apps.keys().cloned().collect();
        for app in apps {
            self.worker_memory(&app).await;
            self.cluster_memory(&app);
            self.watchdog(&app).await;
            self.retire_timeout(&app);
        }
    }

    pub(super) fn gen_config(
        &self,
        app: &AppName,
        g: u64,
    ) -> Option<std::sync::Arc<ipcluster_core::config::AppConfig>> {
        self.apps.get(app).and_then(|a| a.generations.get(&g)).map(|x| x.config.clone())
    }

    /// Whether the app's retire_rate allows one more memory or health retirement now.
    fn retirement_allowed(&mut self, app: &AppName, rate: (u32, Duration)) -> bool {
        let now = self.clock.elapsed();
        let a = self.apps.entry(app.clone()).or_default();
        let limit = a.retire_limit.get_or_insert_with(|| RateLimiter::new(rate.0, rate.1));
        limit.set_limit(rate.0, rate.1);
        limit.try_take(now)
    }

    /// Live workers over `worker_memory_max` are replaced (then retired), rate-limited.
    async fn worker_memory(&mut self, app: &AppName) {
        let candidates: Vec<(u64, u64, u32, u32, u64)> = self
            .workers
            .iter()
            .filter(|(_, w)| &w.app == app && w.state == WorkerState::Live)
            .filter_map(|(id, w)| {
                let max = self.gen_config(app, w.generation)?.worker_memory_max?;
                (w.sample.rss > max && !self.being_replaced(*id)).then_some((
                    *id,
                    w.generation,
                    w.band,
                    w.pid,
                    w.sample.rss,
                ))
            })
            .collect();
        for (id, g, band, pid, rss) in candidates {
            let Some(config) = self.gen_config(app, g) else { continue };
            let why = format!(
                "RSS {} MiB over worker_memory_max {} MiB",
                rss >> 20,
                config.worker_memory_max.unwrap_or(0) >> 20
            );
            if self.retirement_allowed(app, config.retire_rate) {
                info!(app = %app, generation = g, band, pid, "{app}: band {band} pid {pid}: {why}; replacing it");
                self.replace_band(app, g, band, id, "memory").await;
            } else {
                self.held_back(app, g, band, pid, format!("{why}; retirement held back by retire_rate"));
            }
        }
    }

    fn held_back(&mut self, app: &AppName, generation: u64, band: u32, pid: u32, reason: String) {
        warn!(app = %app, generation, band, pid, "{app}: band {band} pid {pid}: {reason}");
        self.signal(BusSignal::PolicyHeldBack { app: app.to_string(), generation, band, pid, reason });
    }

    fn being_replaced(&self, id: u64) -> bool {
        self.workers.values().any(|w| w.replaces == Some(id))
    }

    /// The watermarks of `cluster_memory_max` over all the app's workers.
    fn cluster_memory(&mut self, app: &AppName) {
        let Some(budget) = self
            .apps
            .get(app)
            .and_then(|a| a.live())
            .and_then(|g| self.gen_config(app, g))
            .and_then(|c| c.cluster_memory_max)
        else {
            return;
        };
        // Below the low watermark nothing happens: skip counting connections (see sampler.rs).
        let total: u64 = self.workers.values().filter(|w| &w.app == app).map(|w| w.sample.rss).sum();
        if total <= budget / 100 * 80 {
            let live: u64 = self
                .workers
                .values()
                .filter(|w| &w.app == app && w.state == WorkerState::Live)
                .map(|w| w.sample.rss)
                .sum();
            if live <= budget {
                if let Some(a) = self.apps.get_mut(app) {
                    a.live_over_budget = false;
                }
                return;
            }
        }
        let candidates: Vec<(u64, u32)> = self
            .workers
            .iter()
            .filter(|(_, w)| &w.app == app && matches!(w.state, WorkerState::Retired | WorkerState::Stopping))
            .map(|(id, w)| (*id, w.pid))
            .collect();
        let connections: std::collections::HashMap<u64, u32> =
            sampler::connections(&candidates).into_iter().collect();
        let mem: Vec<MemWorker> = self
            .workers
            .iter()
            .filter(|(_, w)| &w.app == app)
            .map(|(id, w)| MemWorker {
                id: *id,
                rss: w.sample.rss,
                connections: connections.get(id).copied().unwrap_or(0),
                started: usec(w.started),
                state: match w.state {
                    WorkerState::Live | WorkerState::Starting => MemState::Live,
                    WorkerState::Retired => MemState::Retired,
                    WorkerState::Stopping => MemState::Stopping,
                },
            })
            .collect();
        let verdict = cluster_memory(&mem, budget);
        for id in &verdict.kill {
            if let Some(w) = self.workers.get_mut(id) {
                warn!(app = %app, pid = w.pid, "{app}: cluster RSS {} MiB over 95 % of {} MiB; SIGKILL to retired pid {}", total >> 20, budget >> 20, w.pid);
                w.state = WorkerState::Stopping;
                w.stop_reason = Some("memory");
                let _ = process::signal(&w.pidfd, libc::SIGKILL);
            }
        }
        for id in &verdict.stop {
            if let Some(w) = self.workers.get(id) {
                info!(app = %app, pid = w.pid, "{app}: cluster RSS {} MiB over 80 % of {} MiB; stopping retired pid {}", total >> 20, budget >> 20, w.pid);
            }
            self.stop_worker(*id, "memory");
        }
        let over = verdict.live_over_budget;
        let was = self.apps.get(app).is_some_and(|a| a.live_over_budget);
        if over != was {
            if let Some(a) = self.apps.get_mut(app) {
                a.live_over_budget = over;
            }
            if over {
                let live = self.apps.get(app).and_then(|a| a.live()).unwrap_or(0);
                self.held_back(app, live, 0, 0, format!("live workers alone use more than cluster_memory_max ({} MiB); live workers are never killed for it", budget >> 20));
            }
        }
    }

    /// Workers that stopped sending WATCHDOG=1: a live one is replaced (rate-limited), a retired
    /// one is stopped.
    async fn watchdog(&mut self, app: &AppName) {
        let now = Instant::now();
        let silent: Vec<(u64, u64, u32, u32, WorkerState)> = self
            .workers
            .iter()
            .filter(|(_, w)| {
                &w.app == app && w.ready && matches!(w.state, WorkerState::Live | WorkerState::Retired)
            })
            .filter_map(|(id, w)| {
                let limit = self.gen_config(app, w.generation)?.watchdog?;
                (now.duration_since(w.last_ping) > limit && !self.being_replaced(*id)).then_some((
                    *id,
                    w.generation,
                    w.band,
                    w.pid,
                    w.state,
                ))
            })
            .collect();
        for (id, g, band, pid, state) in silent {
            let Some(config) = self.gen_config(app, g) else { continue };
            let why = format!("no WATCHDOG=1 for more than {:?}", config.watchdog.unwrap_or_default());
            if state == WorkerState::Retired {
                warn!(app = %app, pid, "{app}: retired pid {pid} is hung ({why}); stopping it");
                self.stop_worker(id, "watchdog");
            } else if self.retirement_allowed(app, config.retire_rate) {
                warn!(app = %app, generation = g, band, pid, "{app}: band {band} pid {pid} is hung ({why}); replacing it");
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

    /// Retired workers older than `retire_timeout` are stopped.
    fn retire_timeout(&mut self, app: &AppName) {
        let now = SystemTime::now();
        let due: Vec<u64> = self
            .workers
            .iter()
            .filter(|(_, w)| &w.app == app && w.state == WorkerState::Retired && !w.reap_queued)
            .filter(|(_, w)| {
                let Some(gen_) = self.apps.get(app).and_then(|a| a.generations.get(&w.generation)) else {
                    return false;
                };
                let (Some(timeout), Some(at)) =
                    (gen_.config.retire_timeout, w.retired_at.or(gen_.retired_at))
                else {
                    return false;
                };
                now.duration_since(at).unwrap_or_default() >= timeout
            })
            .map(|(id, _)| *id)
            .collect();
        if !due.is_empty() {
            info!(app = %app, "{app}: {} retired workers reached retire_timeout; stopping them", due.len());
        }
        for id in due {
            self.queue_reap(id, "reaped");
        }
    }

    /// Puts a retired worker in its app's reap queue; the queue stops one every `reap_interval`.
    pub(super) fn queue_reap(&mut self, id: u64, reason: &'static str) {
        let Some(w) = self.workers.get_mut(&id) else { return };
        if w.reap_queued || w.state != WorkerState::Retired {
            return;
        }
        w.reap_queued = true;
        w.stop_reason = Some(reason);
        let app = w.app.clone();
        let a = self.apps.entry(app.clone()).or_default();
        a.reap_queue.push_back(id);
        if !a.reaping {
            a.reaping = true;
            self.reap_next(&app);
        }
    }

    /// Stops the next queued worker of `app` and schedules the one after.
    pub(super) fn reap_next(&mut self, app: &AppName) {
        loop {
            let Some(a) = self.apps.get_mut(app) else { return };
            let Some(id) = a.reap_queue.pop_front() else {
                a.reaping = false;
                return;
            };
            let Some(w) = self.workers.get(&id) else { continue };
            let reason = w.stop_reason.unwrap_or("reaped");
            let interval = self.gen_config(app, w.generation).map(|c| c.reap_interval).unwrap_or_default();
            self.stop_worker(id, reason);
            if interval.is_zero() {
                continue;
            }
            let tx = self.events_tx.clone();
            let app = app.clone();
            tokio::spawn(async move {
                tokio::time::sleep(interval).await;
                let _ = tx.send(Event::ReapNext { app });
            });
            return;
        }
    }

    /// Starts the next band of a paced generation (spawn_interval).
    pub(super) async fn release_next(&mut self, app: &AppName, generation: u64) {
        let Some(a) = self.apps.get_mut(app) else { return };
        let Some(pos) = a.pending_release.iter().position(|p| p.2 == generation) else { return };
        let (band, ports, _) = a.pending_release.remove(pos);
        let more = a.pending_release.iter().any(|p| p.2 == generation);
        let starting = a.generations.get(&generation).is_some_and(|g| g.state == GenState::Starting);
        let Some(config) = self.gen_config(app, generation) else { return };
        if !starting {
            // The deploy failed meanwhile.
            if let Some(a) = self.apps.get_mut(app) {
                a.pending_release.retain(|p| p.2 != generation);
            }
            return;
        }
        if let Err(e) = self.launch_into_scope(app, generation, band, ports).await {
            self.fail(app, generation, format!("band {band}: cannot start: {e}"));
            return;
        }
        if more {
            let tx = self.events_tx.clone();
            let app = app.clone();
            let interval = config.spawn_interval;
            tokio::spawn(async move {
                tokio::time::sleep(interval).await;
                let _ = tx.send(Event::ReleaseNext { app, generation });
            });
        }
    }
}
