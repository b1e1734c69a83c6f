//! Rollback: going back to an earlier generation.
//!
//! A retired generation still runs, so going back to it needs no new process, only a cutover:
//! when every band still has a retired worker (none stopping or queued to be reaped) and the
//! generation was not sent a `retire_signal` (which cannot be taken back), one router
//! transaction makes it live again; its workers get their nice value and their scope its CPU
//! weight back, and the generation that was live is retired. Otherwise (reaped, or told to wind
//! down) the rollback is a deploy of the effective config that generation ran with — its command
//! and environment, overrides included — as a new generation.

use ipcluster_core::{
    model::{GenState, WorkerState},
    name::AppName,
};
use tracing::{info, warn};

use super::{
    DEFAULT_CPU_WEIGHT, Error, Reply, ScopeJob, Supervisor,
    deploy::Source,
    model::{Waiter, WorkerId},
};
use crate::{netfilter::Router, processes::Processes, scopes::Scopes, steering::Steer};

impl<S: Scopes + Clone + 'static, R: Router + 'static, P: Processes, T: Steer> Supervisor<S, R, P, T> {
    /// Rollback(app, generation): `generation` 0 is the newest generation, other than the live
    /// one, that was live before (retired or reaped since).
    pub(super) async fn rollback(&mut self, app: &str, generation: u64, reply: Reply<u64>) {
        let name = match self.app_name(app) {
            Ok(n) => n,
            Err(e) => return self.reply(reply, Err(e)),
        };
        let a = &self.m.apps[&name];
        if let Some(g) = a.deploying() {
            return self.reply(reply, Err(Error::Busy(format!("{name} is deploying generation {g}"))));
        }
        let live = a.live();
        let was_live = |s: GenState| matches!(s, GenState::Retired | GenState::Stopped);
        let target = match generation {
            0 => a
                .generations
                .iter()
                .rev()
                .find(|(n, g)| Some(**n) != live && was_live(g.state))
                .map(|(n, _)| *n),
            g => Some(g),
        };
        let state = target.and_then(|g| a.generations.get(&g)).map(|g| g.state);
        let target = match (target, state) {
            (Some(g), Some(GenState::Live)) => {
                info!(app = %name, generation = g, "{name}: rollback to generation {g}: it is live already");
                return self.reply(reply, Ok(g));
            }
            (Some(g), Some(s)) if was_live(s) => g,
            (Some(g), Some(s)) => {
                let why = format!(
                    "{name} generation {g} is {s}: only a generation that was live can be rolled back to"
                );
                return self.reply(reply, Err(Error::NoSuchGeneration(why)));
            }
            (Some(g), None) => {
                return self
                    .reply(reply, Err(Error::NoSuchGeneration(format!("{name} has no generation {g}"))));
            }
            (None, _) => {
                let why = format!("{name} has no earlier generation to roll back to");
                return self.reply(reply, Err(Error::NoSuchGeneration(why)));
            }
        };
        match self.instant_workers(&name, target) {
            Some(workers) => self.roll_back_instantly(&name, target, workers, reply).await,
            None => {
                let config = self.m.config(&name, target).expect("checked above");
                info!(app = %name, generation = target, "{name}: rollback to generation {target}: its workers are gone; deploying what it ran");
                self.deploy(name.as_str(), Source::Config(config), Waiter::Deploy(reply)).await;
            }
        }
    }

    /// The worker of each band that can serve again at once, if every band has one.
    fn instant_workers(&self, app: &AppName, g: u64) -> Option<Vec<WorkerId>> {
        let gen_ = self.m.generation(app, g)?;
        if gen_.state != GenState::Retired || gen_.config.retire_signal.is_some() {
            return None;
        }
        (0..gen_.config.workers)
            .map(|band| {
                // The newest worker of the band (a memory replacement's, if there was one).
                self.m
                    .workers_of(app, g)
                    .filter(|(_, w)| {
                        w.band == band && w.state == WorkerState::Retired && !w.reap_queued && w.ready
                    })
                    .map(|(id, _)| id)
                    .max()
            })
            .collect()
    }

    /// One transaction makes generation `g` live again with `workers`; the live one is retired.
    async fn roll_back_instantly(
        &mut self,
        app: &AppName,
        g: u64,
        workers: Vec<WorkerId>,
        reply: Reply<u64>,
    ) {
        let previous = self.m.apps[app].live_except(g);
        let started = tokio::time::Instant::now();
        if let Err(e) = self.route_to(app, g).await {
            warn!(app = %app, generation = g, "{app}: rollback to generation {g} failed: {e}");
            let why = format!("{app}: rollback to generation {g} failed, nothing changed: {e}");
            return self.reply(reply, Err(Error::DeployFailed(why)));
        }
        let elapsed = started.elapsed();
        info!(app = %app, generation = g, "{app}: rolled back to generation {g} in {:.3} ms (the same workers, live again)", elapsed.as_secs_f64() * 1e3);
        self.metrics.cutover.entry(app.to_string()).or_default().observe(elapsed.as_secs_f64());
        for id in workers {
            let Some(w) = self.m.workers.get_mut(&id) else { continue };
            w.state = WorkerState::Live;
            w.retired_at = None;
            w.nice = self.base_nice;
            if let Err(e) = self.deps.processes.renice_tree(w.pid, self.base_nice) {
                warn!(app = %app, pid = w.pid, "cannot renice: {e}");
            }
        }
        if let Some(a) = self.m.apps.get_mut(app) {
            a.stopped = false;
        }
        if let Some(gen_) = self.m.generation_mut(app, g) {
            gen_.retired_at = None;
        }
        self.enter(app, g, GenState::Live);
        self.scope_job(app, g, ScopeJob::CpuWeight(DEFAULT_CPU_WEIGHT));
        for p in previous {
            self.retire_generation(app, p);
        }
        self.reply(reply, Ok(g));
    }
}
