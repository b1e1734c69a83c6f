//! What the supervisor records: the one way a generation changes state ([`Supervisor::enter`]),
//! what is saved for a restarted daemon ([`Supervisor::persist`]), and the history and counters
//! it keeps bounded.

use std::collections::BTreeMap;

use ipcluster_core::{
    model::GenState,
    name::AppName,
    saved::{SavedGeneration, SavedWorker},
};
use tracing::{error, info};

use super::{BusSignal, HISTORY, ScopeJob, Supervisor};
use crate::{clock::usec, state::Store, world::World};

impl<W: World> Supervisor<W> {
    /// The one way a generation changes state: checked against the legal transitions
    /// ([`GenState::can_become`]), logged, saved, and signalled on the bus. An illegal transition
    /// is refused (the generation keeps its state): a bug, which the journal names and debug
    /// builds (every test) turn into a panic.
    pub(super) fn enter(&mut self, app: &AppName, g: u64, state: GenState) {
        let now = self.now();
        let Some(gen_) = self.m.generation_mut(app, g) else { return };
        if gen_.state == state && state != GenState::Starting {
            return;
        }
        if gen_.state != state && !gen_.state.can_become(state) {
            error!(app = %app, generation = g, "refused an illegal transition {} -> {state} (a bug)", gen_.state);
            debug_assert!(false, "{app} generation {g}: illegal transition {} -> {state}", gen_.state);
            return;
        }
        let was = std::mem::replace(&mut gen_.state, state);
        // Retired from when it left live (draining counts: retire_timeout runs from there).
        if state.is_retired() && !was.is_retired() {
            gen_.retired_at = Some(now);
        }
        match state {
            GenState::Starting => {
                info!(app = %app, generation = g, "{app}: deploying generation {g} ({} workers) in {}", gen_.config.workers, gen_.scope)
            }
            _ => info!(app = %app, generation = g, "{app}: generation {g} is {state}"),
        }
        self.persist();
        self.signal(BusSignal::GenerationStateChanged { app: app.to_string(), generation: g, state });
        if state == GenState::Stopped {
            // Its workers are gone; whatever they left behind goes with the scope.
            self.scope_job(app, g, ScopeJob::Stop);
        }
        if !state.is_running() {
            self.drop_tables(app, g);
        }
        if !state.is_running() {
            self.trim_history(app);
        }
    }

    /// Saves what reality cannot tell a restarted daemon: generation counters, the state of
    /// every running generation, crash backoffs, stopped apps. A failure is logged: the daemon
    /// keeps serving, and adoption trusts reality (scopes, processes, rules) first anyway.
    pub(super) fn persist(&mut self) {
        self.saved.apps.clear();
        for ((name, band), b) in &self.backoff {
            if let Some(last) = b.current() {
                let ms = u64::try_from(last.as_millis()).unwrap_or(u64::MAX);
                self.saved.apps.entry(name.clone()).or_default().backoff_ms.insert(*band, ms);
            }
        }
        for (name, app) in &self.m.apps {
            if app.stopped {
                self.saved.apps.entry(name.clone()).or_default().stopped = true;
            }
            // Every generation in the history, finished ones too: a rollback after a restart still
            // knows what they ran.
            for (g, x) in &app.generations {
                let mut record = SavedGeneration::of(x.state, usec(x.started), &x.config);
                record.retired_usec = x.retired_at.map(usec);
                record.session_slot = x.slot;
                record.canary = x.canary.as_ref().filter(|_| x.state == GenState::Canary).map(|c| {
                    ipcluster_core::saved::SavedCanary {
                        bands: c.bands.clone(),
                        deadline_usec: c.deadline.map(usec),
                        canary_for_secs: c.canary_for.map(|d| d.as_secs()),
                    }
                });
                record.processes = self
                    .m
                    .workers_of(name, *g)
                    .map(|(_, w)| SavedWorker {
                        pid: w.pid,
                        start_usec: usec(w.started),
                        band: w.band,
                        ports: w.worker_ports().collect(),
                    })
                    .collect();
                self.saved.apps.entry(name.clone()).or_default().generations.insert(*g, record);
            }
        }
        self.deps.store.save(&self.saved);
        self.unsaved = true;
    }

    /// Counters of apps that are gone (no valid file, nothing running) and of bands an app no
    /// longer has are dropped: the maps stay as small as what the daemon runs, however many
    /// apps and band counts came and went. (/metrics shows the same apps: see metrics/render.rs.)
    pub(super) fn prune_metrics(&mut self) {
        let mut bands: BTreeMap<String, u32> = BTreeMap::new();
        for (name, a) in &self.m.apps {
            let file = match &a.config {
                Some(Ok(c)) => c.workers,
                _ => 0,
            };
            let running = a.generations.values().filter(|g| g.state.is_running()).map(|g| g.config.workers);
            let most = running.chain([file]).max().unwrap_or(0);
            if most > 0 || self.m.workers_of_app(name).next().is_some() {
                bands.insert(name.to_string(), most);
            }
        }
        let m = &mut self.metrics;
        m.deploys.retain(|app, _| bands.contains_key(app));
        m.cutover.retain(|app, _| bands.contains_key(app));
        m.policy_actions.retain(|(app, _), _| bands.contains_key(app));
        m.restarts.retain(|(app, band), _| bands.get(app).is_some_and(|n| band < n));
    }

    pub(super) fn trim_history(&mut self, app: &AppName) {
        let Some(a) = self.m.apps.get_mut(app) else { return };
        let finished: Vec<u64> = a
            .generations
            .iter()
            .filter(|(_, g)| !g.state.is_running() && g.waiting.is_empty())
            .map(|(n, _)| *n)
            .collect();
        for n in finished.iter().take(finished.len().saturating_sub(HISTORY)) {
            a.generations.remove(n);
        }
        self.prune_metrics();
    }
}
