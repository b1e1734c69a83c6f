//! Canary deploys (issue 24): a new generation takes some bands first, beside the live one,
//! and is promoted (its other bands start, then one cutover moves them) or rolled back (its
//! bands go back to the live generation, which never stopped serving them, and its workers
//! stop).
//!
//! - **Start.** A Deploy with `canary = k` starts the new generation's workers for `k` bands
//!   spread over the band space ([`ipcluster_core::canary::bands`]); once they are ready, one
//!   rule transaction (NAT) or one map update per group (socket mode) sends those bands to it.
//!   Its state is `canary`; the Deploy call returns its number then.
//! - **Promote.** Its other bands start; once every band is ready, the usual cutover makes it
//!   live and retires (or drains) the generation it shared the bands with.
//! - **Roll back.** Its bands go back to the live generation in one change, then its workers are
//!   stopped at once.
//! - **`canary_for`.** It promotes itself after that long, and rolls itself back at the first
//!   trouble: a worker of its that crashes, is replaced (memory, watchdog, health), fails a
//!   health check or grows past `worker_memory_max`. Without it a canary only changes when asked.
//! - **One at a time.** A Deploy during a canary is refused unless it is a canary itself, which
//!   replaces it: at the new canary's cutover the old one's bands go to the new canary or back to
//!   the live generation, and the old one's workers stop.

use ipcluster_core::{
    config::{AppConfig, Routing},
    model::{GenState, WorkerState},
    name::AppName,
};
use tracing::{info, warn};

use super::{
    BusSignal, CanaryRequest, Error, Reply, Supervisor,
    model::{Canary, Waiter, WorkerId},
    timers::TimerKey,
};
use crate::{clock::usec, netfilter::Router, world::World};

impl<W: World> Supervisor<W> {
    /// Checks a canary request against the live generation; the split it makes.
    pub(super) fn canary_split(
        &self,
        app: &AppName,
        config: &AppConfig,
        req: CanaryRequest,
    ) -> Result<Canary, Error> {
        let a = &self.m.apps[app];
        let live = a.live().and_then(|g| a.generations.get(&g));
        let bands = ipcluster_core::canary::check(req.bands, config.workers, live.map(|l| l.config.workers))
            .map_err(|e| Error::InvalidArgs(format!("{app}: {e}")))?;
        let live = live.expect("checked: a canary needs a live generation");
        if live.config.routing != config.routing {
            return Err(Error::InvalidArgs(format!(
                "{app}: a canary must route as the live generation does (routing = \"{}\"; the new one has \"{}\")",
                live.config.routing.as_str(),
                config.routing.as_str()
            )));
        }
        if live.config.session_affinity.is_some() != config.session_affinity.is_some() {
            return Err(Error::InvalidArgs(format!(
                "{app}: a canary must keep the live generation's session affinity (on or off): deploy the change without canary"
            )));
        }
        Ok(Canary { bands, canary_for: req.canary_for, deadline: None, promoting: false })
    }

    /// A canary's bands are ready: one change sends them to it (a canary it replaces gives its
    /// bands up in the same change, and stops).
    pub(super) async fn canary_cutover(&mut self, app: &AppName, g: u64) {
        let replaced = self.m.apps.get(app).and_then(|a| a.canary());
        let started = tokio::time::Instant::now();
        if let Err(e) = self.route_canary(app, g).await {
            self.fail(app, g, format!("the canary's cutover failed: {e}"));
            return;
        }
        let took = started.elapsed().as_secs_f64();
        self.metrics.cutover.entry(app.to_string()).or_default().observe(took);
        self.timers.cancel(&TimerKey::ReadyTimeout { app: app.clone(), generation: g });
        for id in self.m.ids_of(app, g) {
            if let Some(w) = self.m.workers.get_mut(&id) {
                w.state = WorkerState::Live;
            }
        }
        let now = self.now();
        let Some(gen_) = self.m.generation_mut(app, g) else { return };
        let Some(c) = gen_.canary.as_mut() else { return };
        c.deadline = c.canary_for.map(|d| now + d);
        let (bands, canary_for) = (c.bands.clone(), c.canary_for);
        info!(app = %app, generation = g, "{app}: generation {g} is a canary on bands {bands:?} (cut over in {:.3} ms){}", took * 1e3,
            canary_for.map_or_else(String::new, |d| format!("; it promotes itself in {d:?} unless something goes wrong")));
        self.enter(app, g, GenState::Canary);
        if let Some(d) = canary_for {
            self.timers.set(TimerKey::CanaryDeadline { app: app.clone(), generation: g }, d);
        }
        if let Some(old) = replaced {
            self.end_canary(app, old, format!("replaced by canary generation {g}"));
        }
        let waiting: Vec<Waiter> =
            self.m.generation_mut(app, g).map(|x| x.waiting.drain(..).collect()).unwrap_or_default();
        for w in waiting {
            self.answer(w, Ok(g));
        }
    }

    /// Sends the canary's bands to it: the rules (NAT) or the steering's band overrides (socket
    /// mode).
    async fn route_canary(&mut self, app: &AppName, g: u64) -> Result<(), String> {
        let routing = self.m.config(app, g).map_or(Routing::Nat, |c| c.routing);
        if routing == Routing::Socket {
            return self.steer_canary(app, g);
        }
        self.deps.router.apply(&self.routes(Some((app, g)))).await.map(|_| ()).map_err(|e| e.to_string())
    }

    /// Promote(app): the canary's other bands start, and every band moves once they are ready.
    pub(super) async fn promote(&mut self, app: &str, reply: Reply<u64>) {
        let name = match self.app_name(app) {
            Ok(n) => n,
            Err(e) => return self.reply(reply, Err(e)),
        };
        let Some(g) = self.m.apps.get(&name).and_then(|a| a.canary()) else {
            let live = self.m.apps.get(&name).and_then(|a| a.live());
            let why = match live {
                Some(l) => format!("{name} has no canary (generation {l} is live)"),
                None => format!("{name} has no canary"),
            };
            return self.reply(reply, Err(Error::NoSuchGeneration(why)));
        };
        self.start_promotion(&name, g, Some(Waiter::Deploy(reply)), "Promote").await;
    }

    /// Starts the bands a canary does not serve yet; the cutover follows when they are ready.
    async fn start_promotion(&mut self, app: &AppName, g: u64, waiter: Option<Waiter>, why: &str) {
        let Some(gen_) = self.m.generation_mut(app, g) else { return };
        gen_.waiting.extend(waiter);
        let Some(c) = gen_.canary.as_mut() else { return };
        if c.promoting {
            return;
        }
        c.promoting = true;
        self.timers.cancel(&TimerKey::CanaryDeadline { app: app.clone(), generation: g });
        let config = gen_.config.clone();
        let have: std::collections::BTreeSet<u32> = self.m.workers_of(app, g).map(|(_, w)| w.band).collect();
        let others: Vec<u32> = (0..config.workers).filter(|b| !have.contains(b)).collect();
        info!(app = %app, generation = g, "{app}: promoting canary generation {g} ({why}): starting its other {} bands", others.len());
        if let Err(e) = self.start_bands(app, g, &others).await {
            self.promotion_failed(app, g, format!("cannot start its other bands: {e}"));
            return;
        }
        // Every band gets ready_timeout from its own start (the last one released after its wait).
        let spread = super::launch::release_delay(others.len().saturating_sub(1), others.len());
        self.timers
            .set(TimerKey::ReadyTimeout { app: app.clone(), generation: g }, config.ready_timeout + spread);
        // Nothing to start (every band has a worker already): the cutover now.
        self.check_ready(app, g).await;
    }

    /// A promotion could not finish (a band did not start or become ready): the bands it started
    /// stop, the canary stays a canary, and whoever asked hears why.
    pub(super) fn promotion_failed(&mut self, app: &AppName, g: u64, reason: String) {
        let Some(gen_) = self.m.generation_mut(app, g) else { return };
        let Some(c) = gen_.canary.as_mut().filter(|c| c.promoting) else { return };
        c.promoting = false;
        let bands = c.bands.clone();
        let waiting: Vec<Waiter> = gen_.waiting.drain(..).collect();
        warn!(app = %app, generation = g, "{app}: promotion of canary generation {g} failed: {reason}; it stays a canary");
        self.timers.cancel(&TimerKey::ReadyTimeout { app: app.clone(), generation: g });
        let extra: Vec<WorkerId> = self
            .m
            .workers_of(app, g)
            .filter(|(_, w)| !bands.contains(&w.band) && w.state == WorkerState::Starting)
            .map(|(id, _)| id)
            .collect();
        for id in extra {
            self.stop_worker(id, "promotion failed");
        }
        let msg = format!("{app} generation {g}: promotion failed: {reason}; it is still a canary");
        for w in waiting {
            self.answer(w, Err(Error::DeployFailed(msg.clone())));
        }
    }

    /// The cutover of a promotion went through: the canary is over (its state becomes live).
    pub(super) fn canary_promoted(&mut self, app: &AppName, g: u64) {
        self.timers.cancel(&TimerKey::CanaryDeadline { app: app.clone(), generation: g });
        let Some(c) = self.m.generation_mut(app, g).and_then(|x| x.canary.take()) else { return };
        let reason = match c.deadline {
            Some(at) if self.now() >= at => {
                format!("canary_for {:?} passed with no trouble", c.canary_for.unwrap_or_default())
            }
            _ => "promoted".to_owned(),
        };
        info!(app = %app, generation = g, "{app}: canary generation {g} promoted ({reason})");
        self.signal(BusSignal::CanaryEnded {
            app: app.to_string(),
            generation: g,
            result: "promoted",
            reason,
        });
    }

    /// Rolls a canary back: its bands go back to the live generation (one change, made before
    /// this returns), then its workers stop.
    pub(super) async fn roll_back_canary(&mut self, app: &AppName, g: u64, reason: String) {
        if self.m.gen_state(app, g) != Some(GenState::Canary) {
            return;
        }
        let socket = self.m.config(app, g).is_some_and(|c| c.routing == Routing::Socket);
        if socket {
            // Its overrides and its slot go before the state change saves the state.
            self.unsteer_canary(app, g);
            self.enter(app, g, GenState::Retired);
        } else {
            // Retired first: the routes then leave it out.
            self.enter(app, g, GenState::Retired);
            self.sync_rules().await;
        }
        self.end_canary(app, g, reason);
    }

    /// A canary that no longer routes anything ends: its workers stop, its callers and the bus
    /// hear why, and the metrics count it rolled back.
    fn end_canary(&mut self, app: &AppName, g: u64, reason: String) {
        if self.m.gen_state(app, g) == Some(GenState::Canary) {
            self.enter(app, g, GenState::Retired);
        }
        self.timers.cancel(&TimerKey::CanaryDeadline { app: app.clone(), generation: g });
        self.timers.cancel(&TimerKey::ReadyTimeout { app: app.clone(), generation: g });
        let waiting: Vec<Waiter> = match self.m.generation_mut(app, g) {
            Some(x) => {
                x.canary = None;
                x.waiting.drain(..).collect()
            }
            None => Vec::new(),
        };
        warn!(app = %app, generation = g, "{app}: canary generation {g} rolled back ({reason}); its bands are back on the live generation");
        self.metrics.deploys.entry(app.to_string()).or_default().rolled_back += 1;
        for id in self.m.ids_of(app, g) {
            self.stop_worker(id, "rolled back");
        }
        let msg = format!("{app} generation {g}: the canary was rolled back: {reason}");
        for w in waiting {
            self.answer(w, Err(Error::DeployFailed(msg.clone())));
        }
        self.signal(BusSignal::CanaryEnded {
            app: app.to_string(),
            generation: g,
            result: "rolled_back",
            reason,
        });
    }

    /// Something went wrong with a canary's worker. With `canary_for` the canary rolls itself
    /// back (true: handled); without, the trouble is handled as for any live worker (false).
    pub(super) async fn canary_trouble(&mut self, app: &AppName, g: u64, why: String) -> bool {
        let Some(gen_) = self.m.generation(app, g) else { return false };
        if gen_.state != GenState::Canary || gen_.canary.as_ref().is_none_or(|c| c.canary_for.is_none()) {
            return false;
        }
        self.roll_back_canary(app, g, format!("rolled back by itself: {why}")).await;
        true
    }

    /// `canary_for` passed: a canary with no trouble promotes itself.
    pub(super) async fn canary_deadline(&mut self, app: &AppName, g: u64) {
        if self.m.gen_state(app, g) != Some(GenState::Canary) {
            return;
        }
        self.start_promotion(app, g, None, "canary_for passed with no trouble").await;
    }

    /// The canary timer of an adopted canary: what is left of its `canary_for` (at once if its
    /// deadline passed while no daemon ran).
    pub(super) fn resume_canary(&mut self, app: &AppName, g: u64) {
        let Some(deadline) =
            self.m.generation(app, g).and_then(|x| x.canary.as_ref()).and_then(|c| c.deadline)
        else {
            return;
        };
        let left = deadline.duration_since(self.now()).unwrap_or_default();
        info!(app = %app, generation = g, "{app}: canary generation {g} promotes itself in {left:?} (deadline {} µs)", usec(deadline));
        self.timers.set(TimerKey::CanaryDeadline { app: app.clone(), generation: g }, left);
    }

    /// Whether `band` of generation `g` is one a canary serves.
    pub(super) fn is_canary_band(&self, app: &AppName, g: u64, band: u32) -> bool {
        self.m.generation(app, g).and_then(|x| x.canary.as_ref()).is_some_and(|c| c.bands.contains(&band))
    }
}
