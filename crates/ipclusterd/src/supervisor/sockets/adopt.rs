//! Socket mode after a restart: what the steering says about the generations found running
//! (which slot holds each one's sockets, which slot is live, which bands are overridden to a
//! canary's, which slots hold sessions), and each adopted generation's tables taken back.
//!
//! Tables are re-opened, never rebuilt: the kernel lets a socket sit in one table at most, so a
//! table that still exists in a slot is the generation's; only a generation whose table is gone
//! (it had given its slot up) gets a new one, put in a slot when it needs one again.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use ipcluster_core::{
    config::Routing,
    model::{GenState, WorkerState},
    name::AppName,
};
use tracing::{error, warn};

use super::super::{
    Supervisor,
    model::{Plumbing, WorkerId},
};
use crate::{steering::Steer, world::World};

/// What the steering of an app's groups says, as adoption reads it.
#[derive(Debug, Default)]
pub(in crate::supervisor) struct Steered {
    /// (app, socket cookie) → the slot whose table holds the socket.
    pub slot_of: BTreeMap<(AppName, u64), u8>,
    /// The live slot, per app.
    pub live: BTreeMap<AppName, u8>,
    /// Per (app, slot): the bands overridden to it (a canary's).
    pub overridden: BTreeMap<(AppName, u8), BTreeSet<u32>>,
    /// Per (app, slot): session records that count.
    pub sessions: BTreeMap<(AppName, u8), u32>,
}

impl Steered {
    /// The slot of a generation whose workers' sockets have `cookies`.
    pub fn slot(&self, app: &AppName, cookies: impl IntoIterator<Item = u64>) -> Option<u8> {
        cookies.into_iter().find_map(|c| self.slot_of.get(&(app.clone(), c)).copied())
    }

    /// Whether new clients of some band go to `slot` (live, or a canary's overrides).
    pub fn routed(&self, app: &AppName, slot: u8) -> bool {
        self.live.get(app) == Some(&slot) || self.overridden.contains_key(&(app.clone(), slot))
    }

    /// Whether only recorded clients go to `slot` (a draining generation's): it holds records,
    /// or it was saved as draining (with none left, it is drained: adopted as draining, it is
    /// stopped at the first count). A merely retired generation of an app with session
    /// affinity gave its slot up; one of an app without keeps it for an instant rollback, and
    /// is never saved as draining.
    pub fn draining(&self, app: &AppName, slot: u8, saved_draining: bool) -> bool {
        !self.routed(app, slot)
            && (saved_draining || self.sessions.get(&(app.clone(), slot)).is_some_and(|n| *n > 0))
    }
}

impl<W: World> Supervisor<W> {
    /// Reads the steering of every group of `entries` ((app, listen entry, room for sessions)).
    pub(in crate::supervisor) fn steered(
        &mut self,
        entries: &BTreeSet<(AppName, SocketAddr, u32)>,
    ) -> Steered {
        let mut out = Steered::default();
        for (app, listen, sessions) in entries {
            if let Err(e) = self.group(app, *listen, *sessions) {
                warn!(app = %app, "{app}: cannot read the steering of {listen}: {e}");
                continue;
            }
            let group = &self.groups.groups[&(app.clone(), *listen)];
            let steer = &self.deps.steer;
            match steer.live(group) {
                Ok(Some((slot, _))) => {
                    out.live.entry(app.clone()).or_insert(slot);
                }
                Ok(None) => {}
                Err(e) => warn!(app = %app, "{app}: cannot read the live slot of {listen}: {e}"),
            }
            for (band, slot) in steer.overrides(group).unwrap_or_default() {
                out.overridden.entry((app.clone(), slot)).or_default().insert(band);
            }
            for (slot, table) in steer.slots(group).unwrap_or_default() {
                for (_, cookie) in steer.entries(&table).unwrap_or_default() {
                    out.slot_of.insert((app.clone(), cookie), slot);
                }
            }
            if let Ok(counts) = steer.session_counts(group) {
                for (slot, n) in counts.iter().enumerate().filter(|(_, n)| **n > 0) {
                    let e = out.sessions.entry((app.clone(), slot as u8)).or_default();
                    *e = (*e).max(*n);
                }
            }
        }
        out
    }

    /// An adopted socket-mode generation gets its tables back (the ones in its slot, which name
    /// its workers' sockets), the entries a worker should hold and does not are filled, and the
    /// steering is made to say what the verdict says: a live generation live with its real band
    /// count (the first version's pins come back with 1024), a canary's bands overridden.
    pub(in crate::supervisor) fn adopt_steering(&mut self, app: &AppName, g: u64, state: GenState) {
        let Some(config) = self.m.config(app, g).filter(|c| c.routing == Routing::Socket) else { return };
        if let Err(e) = self.reopen_tables(app, g, &config.listen) {
            error!(app = %app, generation = g, "{app}: cannot take back the steering of generation {g}: {e}");
            return;
        }
        // What the tables hold already (the kernel refuses a socket a second time, even in its
        // own entry).
        let tables = &self.groups.tables[&(app.clone(), g)];
        let have: Vec<BTreeSet<(u32, u64)>> = tables
            .iter()
            .map(|t| self.deps.steer.entries(t).unwrap_or_default().into_iter().collect())
            .collect();
        // Only an empty entry is filled, and by the band's newest worker that is not retired
        // (a replaced worker stays in its generation, retired: its socket must not take its
        // replacement's entry back), else its newest retired one (a retired generation's
        // table, kept for an instant rollback).
        let mut ids: Vec<(bool, std::cmp::Reverse<std::time::SystemTime>, WorkerId)> = self
            .m
            .workers_of(app, g)
            .map(|(id, w)| (w.state == WorkerState::Retired, std::cmp::Reverse(w.started), id))
            .collect();
        ids.sort_unstable();
        let mut filled: Vec<BTreeSet<u32>> =
            have.iter().map(|h| h.iter().map(|(band, _)| *band).collect()).collect();
        for (_, _, id) in ids {
            let w = self.m.workers.get_mut(&id).expect("listed above");
            let (band, pid) = (w.band, w.pid);
            let Plumbing::Socket { sockets, .. } = &mut w.plumbing else { continue };
            let sockets = std::mem::take(sockets);
            for (i, socket) in sockets.iter().enumerate() {
                if !filled[i].insert(band) {
                    continue;
                }
                let table = &self.groups.tables[&(app.clone(), g)][i];
                if let Err(e) = self.deps.steer.insert(table, band, socket) {
                    warn!(app = %app, generation = g, pid, "{app}: cannot steer band {band} to pid {pid}: {e}");
                }
            }
        }
        // Live as it should be: each group's live slot is `g`'s, with its band count, and holds
        // `g`'s table (not one the kernel no longer reads: its workers all gone while no daemon
        // ran, their sockets taken back from none).
        let slot = self.m.generation(app, g).and_then(|x| x.slot);
        let tables = &self.groups.tables[&(app.clone(), g)];
        let live_ok = config.listen.iter().zip(tables).all(|(listen, ours)| {
            let group = &self.groups.groups[&(app.clone(), *listen)];
            let steer = &self.deps.steer;
            let Some(s) = slot else { return false };
            let named = matches!(steer.live(group), Ok(Some(l)) if l == (s, config.workers));
            let holds = steer
                .slots(group)
                .unwrap_or_default()
                .iter()
                .any(|(t_slot, t)| *t_slot == s && steer.same(t, ours));
            named && holds
        });
        match state {
            GenState::Live if !live_ok => {
                warn!(app = %app, generation = g, "{app}: the steering did not name generation {g} with its {} bands; making it live", config.workers);
                if let Err(e) = self.switch_to(app, g) {
                    error!(app = %app, generation = g, "{app}: cannot steer connections to generation {g}: {e}");
                }
            }
            GenState::Live => {
                // The session timeout of the generations that run now (a previous daemon may
                // have stopped between a cutover and its timeout, or run another version).
                let timeout = self.session_timeout(app, g);
                for listen in &config.listen {
                    let group = &self.groups.groups[&(app.clone(), *listen)];
                    if self.deps.steer.session_timeout(group).ok() != Some(timeout)
                        && let Err(e) = self.deps.steer.set_session_timeout(group, timeout)
                    {
                        warn!(app = %app, "{app}: cannot set the session timeout of {listen}: {e}");
                    }
                }
            }
            GenState::Canary => {
                if let Err(e) = self.steer_canary(app, g) {
                    error!(app = %app, generation = g, "{app}: cannot steer canary generation {g}'s bands to it: {e}");
                }
            }
            _ => {}
        }
    }

    /// Generation `g`'s tables after a restart: per group, the table in its slot if it names one
    /// of `g`'s workers' sockets (and the slot becomes `g`'s), else a new one (put in a slot when
    /// `g` needs one).
    fn reopen_tables(&mut self, app: &AppName, g: u64, listen: &[SocketAddr]) -> Result<(), String> {
        let cookies: Vec<Vec<u64>> = (0..listen.len())
            .map(|i| {
                self.m.workers_of(app, g).filter_map(|(_, w)| w.plumbing.cookies().get(i).copied()).collect()
            })
            .collect();
        let mut tables = Vec::new();
        let mut found_slot = None;
        for (i, &l) in listen.iter().enumerate() {
            let group = &self.groups.groups[&(app.clone(), l)];
            let mut found = None;
            for (slot, table) in self.deps.steer.slots(group)? {
                if self.deps.steer.entries(&table)?.iter().any(|(_, c)| cookies[i].contains(c)) {
                    found = Some(table);
                    found_slot.get_or_insert(slot);
                    break;
                }
            }
            tables.push(match found {
                Some(t) => t,
                None => self.deps.steer.table()?,
            });
        }
        self.groups.tables.insert((app.clone(), g), tables);
        if let (Some(s), Some(x)) = (found_slot, self.m.generation_mut(app, g)) {
            x.slot = Some(s);
        }
        Ok(())
    }
}
