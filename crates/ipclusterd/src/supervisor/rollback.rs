//! Rollback: going back to an earlier generation.
//!
//! A retired generation still runs, so going back to it needs no new process, only a cutover:
//! when every band still has a retired worker (none stopping or queued to be reaped) and the
//! generation was not sent a `retire_signal` (which cannot be taken back), one router
//! transaction makes it live again; its workers get their nice value and their scope its CPU
//! weight back, and the generation that was live is retired. Otherwise (reaped, or told to wind
//! down) the rollback is a deploy of the effective config that generation ran with — its command
//! and environment, overrides included — as a new generation.
//!
//! During a canary, a rollback (to generation 0, or to the live generation) rolls the canary
//! back (see canary.rs): its bands go back to the live generation, which never stopped serving.
//!
//! A Rollback is authorized by what it will do: the D-Bus adapter asks for the plan
//! ([`RollbackPlan`]) first, then authorizes it: `org.ipcluster1.manage` for an instant rollback
//! or a redeploy of what the app file says, `org.ipcluster1.override` for a redeploy that runs
//! another command, environment, user or working directory (an earlier Deploy's overrides,
//! replayed). The rollback itself plans again and refuses if the plan changed in between, so no
//! window lets a manage-only caller replay an override.

use ipcluster_core::{
    model::{GenState, WorkerState},
    name::AppName,
};
use tracing::{info, warn};

use super::{
    Authorized, DEFAULT_CPU_WEIGHT, Error, Reply, RollbackHow, RollbackPlan, ScopeJob, Supervisor,
    deploy::Source,
    model::{Waiter, WorkerId},
};
use crate::{auth::Action, processes::Spawner, world::World};

impl<W: World> Supervisor<W> {
    /// What Rollback(app, generation) would do: `generation` 0 is the newest generation, other
    /// than the live one, that was live before (retired or reaped since). Changes nothing.
    pub(super) fn plan_rollback(&self, app: &str, generation: u64) -> Result<(AppName, RollbackPlan), Error> {
        let name = self.app_name(app)?;
        let a = &self.m.apps[&name];
        if let Some(g) = a.deploying() {
            return Err(Error::Busy(format!("{name} is deploying generation {g}")));
        }
        let live = a.live();
        // During a canary, a rollback rolls the canary back: its bands go back to the live
        // generation.
        if let Some(c) = a.canary() {
            return match (generation, live) {
                (0, Some(l)) => {
                    Ok((name, RollbackPlan { target: l, how: RollbackHow::Canary { canary: c } }))
                }
                (g, Some(l)) if g == l => {
                    Ok((name, RollbackPlan { target: l, how: RollbackHow::Canary { canary: c } }))
                }
                (g, _) if g == c => Err(Error::InvalidArgs(format!(
                    "{name} generation {c} is the canary: Rollback with generation 0 rolls it back"
                ))),
                _ => Err(Error::Busy(format!(
                    "{name} generation {c} is a canary: roll it back (Rollback with generation 0) or promote it first"
                ))),
            };
        }
        let was_live = |s: GenState| matches!(s, GenState::Retired | GenState::Draining | GenState::Stopped);
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
                return Ok((name, RollbackPlan { target: g, how: RollbackHow::AlreadyLive }));
            }
            (Some(g), Some(s)) if was_live(s) => g,
            (Some(g), Some(s)) => {
                return Err(Error::NoSuchGeneration(format!(
                    "{name} generation {g} is {s}: only a generation that was live can be rolled back to"
                )));
            }
            (Some(g), None) => return Err(Error::NoSuchGeneration(format!("{name} has no generation {g}"))),
            (None, _) => {
                return Err(Error::NoSuchGeneration(format!(
                    "{name} has no earlier generation to roll back to"
                )));
            }
        };
        let how = if self.instant_workers(&name, target).is_some() {
            RollbackHow::Instant
        } else {
            let ran = self.m.config(&name, target).expect("checked above");
            let file = a.file_config(&name).ok();
            RollbackHow::Redeploy { overrides: ran.override_keys(file.as_deref()) }
        };
        Ok((name, RollbackPlan { target, how }))
    }

    /// Rollback(app, generation) as `plan` says, which the caller was authorized for (`auth`);
    /// refused when the plan changed in between (its workers were reaped, the app file changed)
    /// or needs more than the caller was authorized for.
    pub(super) async fn rollback(
        &mut self,
        app: &str,
        generation: u64,
        plan: &RollbackPlan,
        auth: &Authorized,
        reply: Reply<u64>,
    ) {
        let (name, now) = match self.plan_rollback(app, generation) {
            Ok(p) => p,
            Err(e) => return self.reply(reply, Err(e)),
        };
        if now != *plan {
            let why = format!(
                "{name}: what the rollback would do changed while it was being authorized ({plan:?}, now {now:?}); nothing changed, call again"
            );
            return self.reply(reply, Err(Error::Busy(why)));
        }
        if !now.overrides().is_empty() && auth.action() != Action::Override {
            let why = format!(
                "{name}: rolling back to generation {} runs another {} than the app file: that needs {}",
                now.target,
                now.overrides().join(", "),
                Action::Override.id()
            );
            return self.reply(reply, Err(Error::InvalidArgs(why)));
        }
        let target = now.target;
        info!(app = %name, generation = target, "{name}: rollback to generation {target} by {}", auth.caller());
        match now.how {
            RollbackHow::AlreadyLive => {
                info!(app = %name, generation = target, "{name}: rollback to generation {target}: it is live already");
                self.reply(reply, Ok(target));
            }
            RollbackHow::Instant => {
                let workers = self.instant_workers(&name, target).expect("planned as instant");
                self.roll_back_instantly(&name, target, workers, reply).await;
            }
            RollbackHow::Canary { canary } => {
                let why = format!("Rollback by {}", auth.caller());
                self.roll_back_canary(&name, canary, why).await;
                self.reply(reply, Ok(target));
            }
            RollbackHow::Redeploy { .. } => {
                let config = self.m.config(&name, target).expect("checked above");
                info!(app = %name, generation = target, "{name}: rollback to generation {target}: its workers are gone; deploying what it ran");
                self.deploy(name.as_str(), Source::Config(config), Waiter::Deploy(reply)).await;
            }
        }
    }

    /// The worker of each band that can serve again at once, if every band has one.
    fn instant_workers(&self, app: &AppName, g: u64) -> Option<Vec<WorkerId>> {
        let gen_ = self.m.generation(app, g)?;
        if !gen_.state.is_retired() || gen_.config.retire_signal.is_some() {
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
            if let Err(e) = self.deps.spawner.renice_tree(w.pid, self.base_nice) {
                warn!(app = %app, pid = w.pid, "cannot renice: {e}");
            }
        }
        if let Some(a) = self.m.apps.get_mut(app) {
            a.stopped = false;
        }
        if let Some(gen_) = self.m.generation_mut(app, g) {
            gen_.retired_at = None;
        }
        self.sessions.remove(&(app.clone(), g));
        self.enter(app, g, GenState::Live);
        self.scope_job(app, g, ScopeJob::CpuWeight(DEFAULT_CPU_WEIGHT));
        for p in previous {
            self.retire_generation(app, p);
        }
        self.limit_draining(app);
        self.reply(reply, Ok(g));
    }
}
