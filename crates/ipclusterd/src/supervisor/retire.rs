//! Ending things: retiring a generation (renice, retire signal), the RetireGeneration and
//! KillRetired commands, stopping a worker (stop signal, SIGKILL after `stop_timeout`), the
//! paced reap queue (`reap_interval`), and StopApp.

use ipcluster_core::{
    config::Overrides,
    model::{GenState, WorkerState},
    name::AppName,
};
use tracing::{info, warn};

use super::{
    Authorized, Error, Reply, ScopeJob, Supervisor,
    model::{Stopping, Waiter, WorkerId},
    timers::TimerKey,
};
use crate::{processes::Spawner, world::World};

impl<W: World> Supervisor<W> {
    /// RetireGeneration: idempotent for a generation that is no longer live; a live one is
    /// replaced first (a band is never left without a worker on purpose): a deploy from the
    /// current config, whose cutover retires it and answers the call.
    pub(super) async fn retire(&mut self, app: &str, generation: u64, reply: Reply<()>) {
        let name = match self.app_name(app) {
            Ok(n) => n,
            Err(e) => {
                self.reply(reply, Err(e));
                return;
            }
        };
        match self.m.gen_state(&name, generation) {
            None => {
                let _ = reply
                    .send(Err(Error::NoSuchGeneration(format!("{name} has no generation {generation}"))));
            }
            Some(GenState::Starting) => {
                let _ = reply
                    .send(Err(Error::Busy(format!("{name} generation {generation} is still deploying"))));
            }
            Some(GenState::Canary) => {
                let _ = reply.send(Err(Error::Busy(format!(
                    "{name} generation {generation} is a canary: promote it (Promote) or roll it back (Rollback)"
                ))));
            }
            Some(GenState::Retired | GenState::Stopped | GenState::Failed) => {
                self.reply(reply, Ok(()));
            }
            // Its clients go to the live generation now; its workers keep their connections.
            Some(GenState::Draining) => {
                self.cut_sessions(&name, generation, "RetireGeneration");
                self.sync_rules().await;
                self.reply(reply, Ok(()));
            }
            Some(GenState::Live) => {
                self.deploy(
                    name.as_str(),
                    super::deploy::Source::File(&Overrides::default()),
                    Waiter::Retire(reply),
                )
                .await;
            }
        }
    }

    /// A generation's clients no longer stick to it (draining → retired): the next rule change
    /// sends them to the live generation, and its session set goes. Its workers keep the
    /// connections they have.
    pub(super) fn cut_sessions(&mut self, app: &AppName, g: u64, why: &str) {
        if self.m.gen_state(app, g) != Some(GenState::Draining) {
            return;
        }
        let records = self.sessions.get(&(app.clone(), g)).copied().unwrap_or(0);
        info!(app = %app, generation = g, "{app}: generation {g} no longer keeps its clients ({why}; {records} sessions go to the live generation)");
        // Socket mode: its slot goes now, and with it what its records count (before the state
        // change, which saves the state: a restart must not find the slot still its).
        self.give_up_slot(app, g);
        self.enter(app, g, GenState::Retired);
        self.sessions.remove(&(app.clone(), g));
        // The rules stop sending them there (and its set goes) shortly.
        self.ports_changed();
    }

    /// At most `max_draining` (the live generation's) generations of `app` drain: the oldest
    /// beyond it are retired at once, their clients sent to the live one.
    pub(super) fn limit_draining(&mut self, app: &AppName) {
        let Some(a) = self.m.apps.get(app) else { return };
        let max = a.live().and_then(|g| self.m.config(app, g)).map_or(0, |c| c.max_draining) as usize;
        let over: Vec<u64> = a.draining().into_iter().skip(max).collect();
        for g in over {
            self.cut_sessions(app, g, &format!("more than max_draining = {max} generations drain"));
        }
    }

    /// Retires every live worker of a generation: renice (every thread), `retire_signal`, a low
    /// CPU weight for its scope. With session affinity it is draining (its recorded clients
    /// still reach it) rather than retired.
    pub(super) fn retire_generation(&mut self, app: &AppName, g: u64) {
        let Some(config) = self.m.config(app, g) else { return };
        let keeps_sessions =
            config.session_affinity.is_some() && self.m.generation(app, g).is_some_and(|x| x.slot.is_some());
        for id in self.m.ids_of(app, g) {
            let Some(w) = self.m.workers.get_mut(&id).filter(|w| w.state == WorkerState::Live) else {
                continue;
            };
            w.state = WorkerState::Retired;
            let (pid, nice) = (w.pid, self.base_nice + config.retire_nice);
            w.nice = nice;
            if let Err(e) = self.deps.spawner.renice_tree(pid, nice) {
                warn!(app = %app, generation = g, pid, "cannot renice: {e}");
            }
            if let Some(sig) = config.retire_signal
                && let Err(e) = self.deps.spawner.signal(&w.handle, sig.number())
            {
                warn!(app = %app, generation = g, pid, "cannot send {sig}: {e}");
            }
        }
        self.enter(app, g, if keeps_sessions { GenState::Draining } else { GenState::Retired });
        // Retired generations yield the CPU to the live one.
        self.scope_job(app, g, ScopeJob::CpuWeight(super::RETIRED_CPU_WEIGHT));
        if self.m.workers_of(app, g).next().is_none() {
            self.enter(app, g, GenState::Stopped);
        }
    }

    /// KillRetired: queues every retired worker of `app` ("" = all) for stopping. A draining
    /// generation's clients are sent to the live one first, in one rule change made before any
    /// of its workers is told to stop: none of them reaches a worker that is going away.
    pub(super) async fn kill_retired(&mut self, app: &str, auth: &Authorized) -> Result<u32, Error> {
        let apps = self.apps_matching(app)?;
        let draining: Vec<(AppName, u64)> = apps
            .iter()
            .filter_map(|a| self.m.apps.get(a).map(|x| (a, x.draining())))
            .flat_map(|(a, gens)| gens.into_iter().map(move |g| (a.clone(), g)))
            .collect();
        for (a, g) in &draining {
            self.cut_sessions(a, *g, "KillRetired");
        }
        // The rules first: a worker told to stop before its clients are sent elsewhere would
        // refuse the new connections they open meanwhile (seen in the soak).
        if !draining.is_empty() {
            self.sync_rules().await;
        }
        let ids: Vec<WorkerId> = self
            .m
            .workers
            .iter()
            .filter(|(_, w)| w.state == WorkerState::Retired && !w.reap_queued && apps.contains(&w.app))
            .map(|(id, _)| *id)
            .collect();
        for id in &ids {
            self.queue_reap(*id, "reaped");
        }
        if !ids.is_empty() {
            let which = if app.is_empty() { "all apps" } else { app };
            info!(app, "stopping {} retired workers of {which} (asked by {})", ids.len(), auth.caller());
        }
        Ok(ids.len() as u32)
    }

    /// Puts a retired worker in its app's reap queue; the queue stops one every `reap_interval`.
    pub(super) fn queue_reap(&mut self, id: WorkerId, reason: &'static str) {
        let Some(w) = self.m.workers.get_mut(&id) else { return };
        if w.reap_queued || w.state != WorkerState::Retired {
            return;
        }
        w.reap_queued = true;
        w.stop_reason = Some(reason);
        let app = w.app.clone();
        self.m.apps.entry(app.clone()).or_default().reap_queue.push_back(id);
        if !self.timers.is_set(&TimerKey::ReapNext(app.clone())) {
            self.reap_next(&app);
        }
    }

    /// Stops the next queued worker of `app`, and sets the timer for the one after.
    pub(super) fn reap_next(&mut self, app: &AppName) {
        while let Some(id) = self.m.apps.get_mut(app).and_then(|a| a.reap_queue.pop_front()) {
            let Some(w) = self.m.workers.get(&id) else { continue };
            let reason = w.stop_reason.unwrap_or("reaped");
            let interval = self.m.config(app, w.generation).map(|c| c.reap_interval).unwrap_or_default();
            info!(app = %app, generation = w.generation, band = w.band, pid = w.pid, "{app}: stopping retired pid {} of generation {} band {} ({reason})", w.pid, w.generation, w.band);
            self.stop_worker(id, reason);
            if !interval.is_zero() {
                self.timers.set(TimerKey::ReapNext(app.clone()), interval);
                return;
            }
        }
    }

    /// Sends the worker its stop signal, and SIGKILL after `stop_timeout` if it is still there.
    pub(super) fn stop_worker(&mut self, id: WorkerId, reason: &'static str) {
        let Some(w) = self.m.workers.get(&id) else { return };
        if w.state == WorkerState::Stopping {
            return;
        }
        let Some(config) = self.m.config(&w.app, w.generation) else { return };
        let w = self.m.workers.get_mut(&id).expect("checked above");
        w.stop_reason = w.stop_reason.or(Some(reason));
        w.state = WorkerState::Stopping;
        // Every process of the worker gets the stop signal (as systemd's KillMode=control-group).
        self.deps.spawner.signal_all(&w.handle, w.cgroup.as_deref(), config.stop_signal.number());
        self.timers.set(TimerKey::StopTimeout(id), config.stop_timeout);
    }

    /// SIGKILLs a worker and everything it forked.
    pub(super) fn kill_worker(&self, id: WorkerId) {
        let Some(w) = self.m.workers.get(&id) else { return };
        match &w.cgroup {
            Some(c) => self.deps.spawner.kill_cgroup(c),
            None => {
                let _ = self.deps.spawner.signal(&w.handle, libc::SIGKILL);
            }
        }
    }

    /// `stop_timeout` passed and the worker is still there.
    pub(super) fn stop_timeout(&mut self, id: WorkerId) {
        let Some(w) = self.m.workers.get(&id) else { return };
        warn!(app = %w.app, generation = w.generation, band = w.band, pid = w.pid, "{}: pid {} still running after stop_timeout; sending SIGKILL", w.app, w.pid);
        self.kill_worker(id);
    }

    /// StopApp: the rules first (nothing new reaches the app), then every scope; the call is
    /// answered once every scope is gone. The app stays stopped (across restarts too) until the
    /// next Deploy.
    pub(super) async fn stop_app(&mut self, app: &str, reply: Reply<()>) {
        let name = match self.app_name(app) {
            Ok(n) => n,
            Err(e) => {
                self.reply(reply, Err(e));
                return;
            }
        };
        if let Some(g) = self.m.apps[&name].deploying() {
            self.reply(reply, Err(Error::Busy(format!("{name} is deploying generation {g}"))));
            return;
        }
        self.m.apps.get_mut(&name).expect("checked").stopped = true;
        self.persist();
        self.sync_rules().await;
        self.forget_groups(&name);
        let ids: Vec<WorkerId> = self.m.workers_of_app(&name).map(|(id, _)| id).collect();
        for id in ids {
            if let Some(w) = self.m.workers.get_mut(&id) {
                w.state = WorkerState::Stopping;
                if let Some(p) = w.probe.take() {
                    p.abort();
                }
            }
        }
        let running: Vec<u64> = self.m.apps[&name]
            .generations
            .iter()
            .filter(|(_, g)| g.state.is_running())
            .map(|(n, _)| *n)
            .collect();
        info!(app = %name, "{name}: stopping the app ({} generations)", running.len());
        if running.is_empty() {
            self.reply(reply, Ok(()));
            return;
        }
        let a = self.m.apps.get_mut(&name).expect("checked");
        let stopping = a.stopping.get_or_insert_with(|| Stopping {
            scopes: Default::default(),
            errors: Vec::new(),
            replies: Vec::new(),
        });
        stopping.replies.push(reply);
        let fresh: Vec<u64> = running.into_iter().filter(|g| stopping.scopes.insert(*g)).collect();
        for g in fresh {
            self.scope_job(&name, g, ScopeJob::Stop);
        }
    }

    /// A scope stopped: one less for a StopApp in progress; the last answers it.
    pub(super) fn app_scope_stopped(&mut self, app: &AppName, g: u64, error: Option<String>) {
        let Some(a) = self.m.apps.get_mut(app) else { return };
        let Some(stopping) = a.stopping.as_mut() else { return };
        if !stopping.scopes.remove(&g) {
            return;
        }
        if let Some(e) = error {
            stopping.errors.push(e);
        }
        if !stopping.scopes.is_empty() {
            return;
        }
        let done = a.stopping.take().expect("checked above");
        let result =
            if done.errors.is_empty() { Ok(()) } else { Err(Error::StopFailed(done.errors.join("; "))) };
        for r in done.replies {
            self.reply(r, result.clone());
        }
    }
}
