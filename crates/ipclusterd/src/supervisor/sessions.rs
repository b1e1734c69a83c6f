//! Session affinity: a client keeps reaching the generation that holds its session until it
//! goes idle (`session_affinity`). The records live in the kernel (an ipset per generation in
//! NAT mode, the steering program's map in socket mode), so a restart of the daemon loses none;
//! this module counts them (every reconcile, while a generation keeps sessions), publishes the
//! counts (ListSessions, the metrics, the lists), and stops a draining generation once it is
//! drained: no record left and no established connection.

use std::collections::BTreeMap;

use ipcluster_core::{config::Routing, model::GenState, name::AppName};
use tracing::{info, warn};

use super::{Event, SessionInfo, Supervisor, model::WorkerId};
use crate::{netfilter::Router, processes::Sampler, world::World};

impl<W: World> Supervisor<W> {
    /// Whether a running generation keeps sessions (then they are counted).
    pub(super) fn keeps_sessions(&self) -> bool {
        self.m.apps.values().any(|a| {
            a.generations
                .values()
                .any(|g| g.state.is_running() && g.slot.is_some() && g.config.session_affinity.is_some())
        })
    }

    /// Counts every generation's records, and checks the draining ones that have none left.
    pub(super) async fn count_sessions(&mut self) {
        // NAT mode's records are in the session sets; when they cannot be read this time, NAT
        // generations keep their last counts and none counts as drained.
        let (mut by_slot, nat_read): (BTreeMap<(AppName, u8), u32>, bool) =
            match self.deps.router.sessions().await {
                Ok(s) => (s, true),
                Err(e) => {
                    warn!("cannot count the session records of NAT mode: {e}");
                    (BTreeMap::new(), false)
                }
            };
        // Socket mode's records are in the steering program's map (an app routes one way, so
        // the two never name the same (app, slot)).
        by_slot.extend(self.socket_sessions());
        let mut counts = BTreeMap::new();
        let mut empty = Vec::new();
        for (name, a) in &self.m.apps {
            for (g, x) in a.generations.iter().filter(|(_, x)| x.state.is_running()) {
                let Some(slot) = x.slot.filter(|_| x.config.session_affinity.is_some()) else { continue };
                let key = (name.clone(), *g);
                if x.config.routing == Routing::Nat && !nat_read {
                    if let Some(n) = self.sessions.get(&key) {
                        counts.insert(key, *n);
                    }
                    continue;
                }
                let n = by_slot.get(&(name.clone(), slot)).copied().unwrap_or(0);
                counts.insert(key, n);
                if x.state == GenState::Draining && n == 0 {
                    empty.push((name.clone(), *g));
                }
            }
        }
        self.sessions = counts;
        for (app, g) in empty {
            self.check_drained(app, g);
        }
    }

    /// A draining generation has no record left: are its connections over too? Counted on a
    /// blocking thread; the answer comes back as [`Event::DrainCheck`].
    fn check_drained(&mut self, app: AppName, g: u64) {
        if !self.drain_checks.insert((app.clone(), g)) {
            return;
        }
        let workers: Vec<(WorkerId, u32)> = self.m.workers_of(&app, g).map(|(id, w)| (id, w.pid)).collect();
        let (sampler, tx) = (self.deps.sampler.clone(), self.events_tx.clone());
        tokio::task::spawn_blocking(move || {
            let connections = sampler.connections(&workers).into_iter().map(|(_, n)| n).sum();
            let _ = tx.send(Event::DrainCheck { app, generation: g, connections });
        });
    }

    /// The answer of [`Self::check_drained`]: a generation still draining, with no record and no
    /// connection, is drained: its workers are stopped, and it stops with the last of them.
    pub(super) fn drain_checked(&mut self, app: &AppName, g: u64, connections: u32) {
        self.drain_checks.remove(&(app.clone(), g));
        let records = self.sessions.get(&(app.clone(), g)).copied();
        if self.m.gen_state(app, g) != Some(GenState::Draining) || records != Some(0) || connections > 0 {
            return;
        }
        info!(app = %app, generation = g, "{app}: generation {g} is drained (no session, no connection left); stopping it");
        for id in self.m.ids_of(app, g) {
            self.stop_worker(id, "drained");
        }
    }

    /// ListSessions: every generation with session affinity that runs, with its records.
    pub(super) fn session_rows(&self) -> Vec<SessionInfo> {
        self.sessions
            .iter()
            .map(|((app, g), n)| SessionInfo { app: app.to_string(), generation: *g, records: *n })
            .collect()
    }
}
