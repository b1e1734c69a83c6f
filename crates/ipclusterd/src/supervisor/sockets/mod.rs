//! Socket mode (`routing = "socket"`): the daemon binds the public sockets and a steering
//! program picks each connection's band (see [`crate::steering`]).
//!
//! - Each `listen` entry of an app is one *group*: the reuseport group of its sockets, steered
//!   by one program. Each worker gets a socket of every group of its app, bound by the daemon
//!   and handed to it at fd 3 on (sd_listen_fds(3)).
//! - Each running generation has a *slot* (0..8, [`super::model::Generation::slot`]) and, in it,
//!   one *table* per group: band → that band's worker's socket. The table is put in its slot
//!   when the deploy starts (the slow part); a worker's sockets join it when the worker is ready,
//!   and the daemon then closes its own copies, so a worker's sockets close when it ends and the
//!   kernel moves what was queued on them to another band (no connection is refused).
//! - The cutover is one update of the group's live slot. A retired generation keeps its slot
//!   while slots are free, so a rollback is the same update back; a generation that needs a slot
//!   when none is free takes the oldest retired generation's (a rollback to that one puts its
//!   table back first).
//! - Session affinity: the program records each client with the slot that served it; a draining
//!   generation keeps its slot while records count, and giving the slot up (its sessions cut)
//!   sends its clients to the live generation at once. A canary: band overrides to its slot.
//! - A band without a worker (crashed, not respawned yet) has an empty entry: the program sends
//!   its clients to a neighbour band, the one the NAT rules would pick ([`with_failover`]).
//!
//! [`with_failover`]: ipcluster_core::routing::with_failover

mod adopt;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    os::fd::OwnedFd,
    time::Duration,
};

use ipcluster_core::{
    config::{AppConfig, Routing},
    model::GenState,
    name::AppName,
};
use tracing::{debug, error, info, warn};

use super::{
    Error, Supervisor,
    model::{Plumbing, WorkerId},
};
use crate::{
    processes::Inspector,
    steering::{Attachment, SESSIONS, SMALL_SESSIONS, Steer},
    world::World,
};

/// The steering the supervisor holds: groups and tables.
#[derive(Debug)]
pub(super) struct Groups<T: Steer> {
    /// One per (app, listen entry).
    groups: BTreeMap<(AppName, SocketAddr), T::Group>,
    /// One per group, in `listen` order, for each running generation.
    tables: BTreeMap<(AppName, u64), Vec<T::Table>>,
    /// The groups this daemon attached its program to since it opened them (a group opened
    /// with a replaced program says so as long as it is held).
    attached: BTreeSet<(AppName, SocketAddr)>,
}

impl<T: Steer> Default for Groups<T> {
    fn default() -> Self {
        Self { groups: BTreeMap::new(), tables: BTreeMap::new(), attached: BTreeSet::new() }
    }
}

/// A group's steering before a change: (listen entry, live slot and bands, overrides, session
/// timeout).
type Restore = (SocketAddr, Option<(u8, u32)>, Vec<(u32, u8)>, Duration);

/// One new worker's sockets: the daemon's copies and what goes to the worker.
#[derive(Debug, Default)]
pub(super) struct BandSockets {
    /// Kept until the worker is ready (see [`super::model::Plumbing::Socket`]).
    pub kept: Vec<OwnedFd>,
    /// Duplicates handed to the worker.
    pub handed: Vec<OwnedFd>,
    pub cookies: Vec<u64>,
}

impl<W: World> Supervisor<W> {
    /// The group of `app`'s listen entry `listen`, loaded (or re-opened from its pins) once,
    /// with room for `sessions` records (re-opened larger when a generation needs more). A
    /// group whose program was replaced (an upgrade, a resize) is attached at once through one
    /// of its sockets, if one is open.
    fn group(&mut self, app: &AppName, listen: SocketAddr, sessions: u32) -> Result<(), String> {
        let key = (app.clone(), listen);
        let have = self.groups.groups.get(&key).map(|g| self.deps.steer.sessions_capacity(g));
        if have.is_some_and(|n| n >= sessions) {
            return Ok(());
        }
        let group = self.deps.steer.group(app, listen, have.map_or(sessions, |n| n.max(sessions)))?;
        self.groups.groups.insert(key.clone(), group);
        self.groups.attached.remove(&key);
        if self.deps.steer.needs_attach(&self.groups.groups[&key]) {
            match self.group_socket(app, listen) {
                Some(socket) => {
                    self.deps.steer.attach(&self.groups.groups[&key], &socket)?;
                    self.groups.attached.insert(key.clone());
                    info!(app = %app, "{app}: the steering program of {listen} was replaced (a new version, or a larger sessions map); attached");
                }
                None => {
                    debug!(app = %app, "{app}: no socket of {listen} open yet to attach its new program through")
                }
            }
        }
        Ok(())
    }

    /// The groups of `config`'s app, each with room for its sessions.
    fn groups_of(&mut self, config: &AppConfig) -> Result<(), String> {
        let sessions = if config.session_affinity.is_some() { SESSIONS } else { SMALL_SESSIONS };
        for &listen in &config.listen {
            self.group(&config.name, listen, sessions)?;
        }
        Ok(())
    }

    /// Generation `g`'s tables, created empty the first time.
    fn tables(&mut self, app: &AppName, g: u64, groups: usize) -> Result<(), String> {
        let key = (app.clone(), g);
        if !self.groups.tables.contains_key(&key) {
            let tables = (0..groups).map(|_| self.deps.steer.table()).collect::<Result<Vec<_>, _>>()?;
            self.groups.tables.insert(key, tables);
        }
        Ok(())
    }

    /// A new worker's sockets (socket mode; none otherwise): one per listen entry, bound in
    /// its group.
    pub(super) fn bind_band(&mut self, config: &AppConfig) -> Result<BandSockets, String> {
        let mut out = BandSockets::default();
        if config.routing != Routing::Socket {
            return Ok(out);
        }
        self.groups_of(config)?;
        for &listen in &config.listen {
            let group = &self.groups.groups[&(config.name.clone(), listen)];
            let socket = self.deps.steer.bind(group, listen)?;
            out.cookies.push(self.deps.steer.cookie(&socket)?);
            out.handed.push(socket.try_clone().map_err(|e| format!("cannot duplicate a socket: {e}"))?);
            out.kept.push(socket);
        }
        Ok(out)
    }

    /// A worker is ready: its sockets take its band's entry in its generation's tables (for a
    /// live generation, new connections of the band reach it from now on), and the daemon's
    /// copies close. Nothing to do in NAT mode.
    pub(super) fn steer_to(&mut self, id: WorkerId) -> Result<(), String> {
        let Some(w) = self.m.workers.get_mut(&id) else { return Ok(()) };
        let Plumbing::Socket { sockets, .. } = &mut w.plumbing else { return Ok(()) };
        if sockets.is_empty() {
            return Ok(());
        }
        let sockets = std::mem::take(sockets);
        let (app, g, band) = (w.app.clone(), w.generation, w.band);
        // A worker ready after its generation failed or stopped joins nothing (its tables are
        // gone); its sockets close with it.
        if !self.m.gen_state(&app, g).is_some_and(GenState::is_running) {
            return Ok(());
        }
        self.tables(&app, g, sockets.len())?;
        for (table, socket) in self.groups.tables[&(app.clone(), g)].iter().zip(&sockets) {
            self.deps.steer.insert(table, band, socket)?;
        }
        // A canary's own band, respawned: its override comes back (see `unsteer`).
        self.canary_override(&app, g, band, true);
        Ok(())
    }

    /// Sets (or clears) the override of band `band` to canary generation `g`'s slot in each of
    /// its groups, when `g` is a canary (cut over) and `band` one of its bands.
    fn canary_override(&mut self, app: &AppName, g: u64, band: u32, on: bool) {
        if self.m.gen_state(app, g) != Some(GenState::Canary) || !self.is_canary_band(app, g, band) {
            return;
        }
        let Some(config) = self.m.config(app, g) else { return };
        let Some(slot) = self.m.generation(app, g).and_then(|x| x.slot) else { return };
        for listen in &config.listen {
            let Some(group) = self.groups.groups.get(&(app.clone(), *listen)) else { continue };
            if let Err(e) = self.deps.steer.set_override(group, band, on.then_some(slot)) {
                warn!(app = %app, generation = g, band, "{app}: cannot change band {band}'s override of {listen}: {e}");
            }
        }
    }

    /// A worker left: its band's entries are emptied where they still hold its sockets (a
    /// replacement's are left alone), so the band's clients go to a neighbour at once.
    ///
    /// A canary's band whose table entry empties goes back to the live generation until its
    /// respawn is ready (an override to an empty entry would send its clients to another of the
    /// canary's bands, and a canary of one band has none: they would be refused).
    pub(super) fn unsteer(&mut self, app: &AppName, g: u64, band: u32, cookies: &[u64]) {
        let Some(tables) = self.groups.tables.get(&(app.clone(), g)) else { return };
        let mut emptied = false;
        for (table, cookie) in tables.iter().zip(cookies) {
            let holds = self.deps.steer.entries(table).is_ok_and(|e| e.contains(&(band, *cookie)));
            if holds {
                match self.deps.steer.remove(table, band) {
                    Ok(()) => emptied = true,
                    Err(e) => {
                        warn!(app = %app, generation = g, band, "{app}: cannot empty band {band}'s entry: {e}")
                    }
                }
            }
        }
        if emptied {
            self.canary_override(app, g, band, false);
        }
    }

    /// A slot for a new socket-mode generation of `app`: a free one, else the one of its oldest
    /// generation that is merely retired (no sessions, not live, not a canary), which gives it
    /// up (a rollback to that one puts its table back).
    pub(super) fn socket_slot(&mut self, app: &AppName) -> Result<u8, Error> {
        // Never a slot a group of the app still sends new clients to, whatever the model says
        // (a cutover that failed halfway).
        let mut busy = BTreeSet::new();
        for ((a, _), group) in self.groups.groups.iter().filter(|((a, _), _)| a == app) {
            debug_assert_eq!(a, app);
            if let Ok(Some((s, _))) = self.deps.steer.live(group) {
                busy.insert(s);
            }
            busy.extend(self.deps.steer.overrides(group).unwrap_or_default().into_iter().map(|(_, s)| s));
        }
        let a = &self.m.apps[app];
        if let Some(s) = a.free_slot_but(&busy) {
            return Ok(s);
        }
        let oldest = a
            .generations
            .iter()
            .find(|(_, x)| {
                x.state == GenState::Retired && x.slot.is_some() && x.config.routing == Routing::Socket
            })
            .map(|(g, x)| (*g, x.slot.expect("filtered")));
        let Some((g, slot)) = oldest else {
            return Err(Error::Busy(format!(
                "{app}: every steering slot is held by a live, starting, canary or draining generation; reap one (KillRetired)"
            )));
        };
        self.give_up_slot(app, g);
        debug!(app = %app, generation = g, "{app}: retired generation {g} gave its steering slot {slot} up");
        Ok(slot)
    }

    /// Generation `g` leaves its slot (its table stays with the daemon): its clients' records
    /// stop counting, so they go to the live generation. Never a slot a group has live or
    /// overrides a band to, and never one the kernel could not empty: the generation keeps it
    /// then (the next give-up tries again), so that no other generation is given a slot the
    /// kernel still steers to.
    pub(super) fn give_up_slot(&mut self, app: &AppName, g: u64) {
        let Some(config) = self.m.config(app, g).filter(|c| c.routing == Routing::Socket) else { return };
        let Some(slot) = self.m.generation(app, g).and_then(|x| x.slot) else { return };
        let mut kept = false;
        for listen in &config.listen {
            let Some(group) = self.groups.groups.get(&(app.clone(), *listen)) else { continue };
            let steer = &self.deps.steer;
            let live = steer.live(group).ok().flatten().is_some_and(|(s, _)| s == slot);
            let overridden = steer.overrides(group).unwrap_or_default().iter().any(|(_, s)| *s == slot);
            if live || overridden {
                warn!(app = %app, generation = g, "{app}: generation {g}'s steering slot {slot} of {listen} still takes new clients; it keeps it");
                kept = true;
                continue;
            }
            if let Err(e) = steer.clear_slot(group, slot) {
                warn!(app = %app, generation = g, "{app}: cannot empty steering slot {slot} of {listen}: {e}");
                kept = true;
            }
        }
        if !kept && let Some(x) = self.m.generation_mut(app, g) {
            x.slot = None;
        }
    }

    /// Puts generation `g`'s tables (empty until its workers are ready) in its slot, where a
    /// cutover or an override can name them. This is the slow part (milliseconds: the kernel
    /// waits for readers of the slot it replaces), so a deploy does it when it starts.
    /// Idempotent. A generation that gave its slot up takes one again.
    pub(super) fn stage(&mut self, app: &AppName, g: u64) -> Result<(), String> {
        let Some(config) = self.m.config(app, g) else { return Err("no such generation".into()) };
        self.groups_of(&config)?;
        self.tables(app, g, config.listen.len())?;
        let slot = match self.m.generation(app, g).and_then(|x| x.slot) {
            Some(s) => s,
            None => {
                let s = self.socket_slot(app).map_err(|e| e.to_string())?;
                if let Some(x) = self.m.generation_mut(app, g) {
                    x.slot = Some(s);
                }
                s
            }
        };
        let tables = &self.groups.tables[&(app.clone(), g)];
        for (listen, table) in config.listen.iter().zip(tables) {
            let group = &self.groups.groups[&(app.clone(), *listen)];
            self.deps.steer.put(group, slot, table, config.workers)?;
        }
        Ok(())
    }

    /// The cutover of a socket-mode app: every group sends new clients to generation `g`'s slot
    /// from now on, each with one atomic 4-byte update (microseconds once [`Self::stage`] is
    /// done). The session timeout is the longest of `g`'s and the draining generations'
    /// ([`Self::session_timeout`]); a canary's band overrides go, since every band is `g`'s now.
    ///
    /// All or nothing: when a group fails, the groups switched before it get their live slot,
    /// overrides and timeout back.
    pub(super) fn switch_to(&mut self, app: &AppName, g: u64) -> Result<(), String> {
        self.stage(app, g)?;
        let config = self.m.config(app, g).expect("staged above");
        let slot = self.m.generation(app, g).and_then(|x| x.slot).expect("staged above");
        let timeout = self.session_timeout(app, g);
        self.change_groups(app, &config.listen, |steer, group, overrides| {
            steer.set_session_timeout(group, timeout)?;
            steer.set_live(group, slot, config.workers)?;
            overrides.iter().try_for_each(|(band, _)| steer.set_override(group, *band, None))
        })
    }

    /// Applies `change` to each of `app`'s groups of `listen` (given each one's overrides now),
    /// all or nothing: when one fails, the groups changed before it get their live slot,
    /// overrides and session timeout back.
    fn change_groups(
        &mut self,
        app: &AppName,
        listen: &[SocketAddr],
        change: impl Fn(&W::Steer, &<W::Steer as Steer>::Group, &[(u32, u8)]) -> Result<(), String>,
    ) -> Result<(), String> {
        let mut done = Vec::new();
        for listen in listen {
            let group = &self.groups.groups[&(app.clone(), *listen)];
            let steer = &self.deps.steer;
            let Some(before) = Self::steering_now(steer, group, *listen) else {
                self.restore_steering(app, done);
                return Err(format!("cannot read the steering of {listen}"));
            };
            let changed = change(steer, group, &before.2);
            done.push(before);
            if let Err(e) = changed {
                self.restore_steering(app, done);
                return Err(e);
            }
        }
        Ok(())
    }

    /// A group's steering now, to put back if a change fails halfway.
    fn steering_now(
        steer: &W::Steer,
        group: &<W::Steer as Steer>::Group,
        listen: SocketAddr,
    ) -> Option<Restore> {
        let live = steer.live(group).ok()?;
        Some((listen, live, steer.overrides(group).ok()?, steer.session_timeout(group).ok()?))
    }

    /// Puts back what [`Self::switch_to`] or [`Self::steer_canary`] changed in each group of
    /// `done` (listen entry, live slot, overrides, session timeout before), as far as the kernel
    /// lets it.
    fn restore_steering(&mut self, app: &AppName, done: Vec<Restore>) {
        for (listen, live, overrides, timeout) in done {
            let Some(group) = self.groups.groups.get(&(app.clone(), listen)) else { continue };
            let steer = &self.deps.steer;
            let restored = steer
                .set_session_timeout(group, timeout)
                .and_then(|()| match live {
                    Some((slot, bands)) => steer.set_live(group, slot, bands),
                    None => Ok(()),
                })
                .and_then(|()| {
                    let now = steer.overrides(group)?;
                    for (band, _) in now.iter().filter(|(b, _)| !overrides.iter().any(|(o, _)| o == b)) {
                        steer.set_override(group, *band, None)?;
                    }
                    overrides
                        .iter()
                        .try_for_each(|(band, slot)| steer.set_override(group, *band, Some(*slot)))
                });
            if let Err(e) = restored {
                error!(app = %app, "{app}: cannot put the steering of {listen} back as it was: {e}");
            }
        }
    }

    /// The session timeout `app`'s groups keep with generation `live` live: the longest
    /// `session_affinity` of it and of the generations that still drain (their records must
    /// outlive a cutover to a generation with a shorter one, or none).
    pub(super) fn session_timeout(&self, app: &AppName, live: u64) -> Duration {
        let Some(a) = self.m.apps.get(app) else { return Duration::ZERO };
        a.generations
            .iter()
            .filter(|(g, x)| **g == live || x.state == GenState::Draining)
            .filter_map(|(_, x)| x.config.session_affinity)
            .max()
            .unwrap_or(Duration::ZERO)
    }

    /// A canary's cutover in socket mode: its bands' new clients go to its slot (one override
    /// per band and group). Its table is in its slot since the deploy started.
    /// The session timeout stays the live generation's (the canary's `session_affinity` is on
    /// or off as the live one's). All or nothing, as [`Self::switch_to`].
    pub(super) fn steer_canary(&mut self, app: &AppName, g: u64) -> Result<(), String> {
        self.stage(app, g)?;
        let config = self.m.config(app, g).expect("staged above");
        let slot = self.m.generation(app, g).and_then(|x| x.slot).expect("staged above");
        let bands =
            self.m.generation(app, g).and_then(|x| x.canary.clone()).map(|c| c.bands).unwrap_or_default();
        self.change_groups(app, &config.listen, |steer, group, overrides| {
            // A canary it replaces gives its bands up in the same pass.
            overrides
                .iter()
                .filter(|(band, other)| *other != slot && !bands.contains(band))
                .try_for_each(|(band, _)| steer.set_override(group, *band, None))?;
            bands.iter().try_for_each(|band| steer.set_override(group, *band, Some(slot)))
        })
    }

    /// A canary rolled back in socket mode: its bands' overrides go, then its slot (its
    /// clients' records stop counting: they go to the live generation).
    pub(super) fn unsteer_canary(&mut self, app: &AppName, g: u64) {
        let Some(config) = self.m.config(app, g) else { return };
        let Some(slot) = self.m.generation(app, g).and_then(|x| x.slot) else { return };
        for listen in &config.listen {
            let Some(group) = self.groups.groups.get(&(app.clone(), *listen)) else { continue };
            let ours: Vec<u32> = self
                .deps
                .steer
                .overrides(group)
                .unwrap_or_default()
                .into_iter()
                .filter(|(_, s)| *s == slot)
                .map(|(b, _)| b)
                .collect();
            for band in ours {
                if let Err(e) = self.deps.steer.set_override(group, band, None) {
                    error!(app = %app, generation = g, "{app}: cannot send band {band} of {listen} back to the live generation: {e}");
                }
            }
        }
        self.give_up_slot(app, g);
    }

    /// Socket mode's session records that count, per (app, slot): the most any group of the
    /// app holds (a client of two listen entries is one client).
    pub(super) fn socket_sessions(&self) -> BTreeMap<(AppName, u8), u32> {
        let mut out: BTreeMap<(AppName, u8), u32> = BTreeMap::new();
        for ((app, listen), group) in &self.groups.groups {
            match self.deps.steer.session_counts(group) {
                Ok(counts) => {
                    for (slot, n) in counts.iter().enumerate().filter(|(_, n)| **n > 0) {
                        let e = out.entry((app.clone(), slot as u8)).or_default();
                        *e = (*e).max(*n);
                    }
                }
                Err(e) => warn!(app = %app, "{app}: cannot count the session records of {listen}: {e}"),
            }
        }
        out
    }

    /// The source address a health check of band `band` of generation `g` connects from (the
    /// steering program's probe path to that generation's slot).
    pub(super) fn probe_source(&self, app: &AppName, g: u64, band: u32) -> Result<IpAddr, String> {
        let slot = self
            .m
            .generation(app, g)
            .and_then(|x| x.slot)
            .ok_or_else(|| format!("{app} generation {g} holds no steering slot"))?;
        crate::steering::probe_source(slot, band)
    }

    /// The periodic check of the steering (with the rules' reconcile): a group whose program is
    /// not the one the daemon attached — detached or replaced through one of its sockets by a
    /// process outside the workers' seccomp filter (see `confine.rs`) — gets it back through a
    /// socket of the group, with a journal line and a count in /metrics. After a restart the
    /// daemon does not know the program a previous one attached: it attaches its own, quietly.
    pub(super) fn guard_steering(&mut self) {
        let keys: Vec<(AppName, SocketAddr)> = self.groups.groups.keys().cloned().collect();
        for (app, listen) in keys {
            let key = (app.clone(), listen);
            let group = &self.groups.groups[&key];
            let pending = self.deps.steer.needs_attach(group) && !self.groups.attached.contains(&key);
            let state = match self.deps.steer.attachment(group) {
                Ok(Attachment::Intact) if !pending => continue,
                Ok(state) => state,
                Err(e) => {
                    warn!(app = %app, "{app}: cannot check the steering of {listen}: {e}");
                    continue;
                }
            };
            // No socket of the group is open: nothing to steer (it ended with its workers).
            let Some(socket) = self.group_socket(&app, listen) else { continue };
            let attached = self.deps.steer.attach(&self.groups.groups[&key], &socket);
            if attached.is_ok() {
                self.groups.attached.insert(key.clone());
            }
            match attached {
                Ok(()) if state == Attachment::Gone => {
                    warn!(app = %app, "{app}: the steering program of {listen} had been detached or replaced through one of its sockets; attached again");
                    *self.metrics.steering_restored.entry(app.to_string()).or_default() += 1;
                }
                Ok(()) => debug!(app = %app, "{app}: steering program of {listen} attached"),
                Err(e) => error!(app = %app, "{app}: cannot attach the steering program of {listen}: {e}"),
            }
        }
    }

    /// A socket of `app`'s group `listen`: a copy the daemon still holds, else one a worker holds
    /// (taken with pidfd_getfd, and only if its cookie is one the daemon bound).
    fn group_socket(&self, app: &AppName, listen: SocketAddr) -> Option<OwnedFd> {
        for w in self.m.workers.values().filter(|w| &w.app == app) {
            let config = self.m.config(app, w.generation)?;
            let Some(i) = config.listen.iter().position(|l| *l == listen) else { continue };
            let Plumbing::Socket { sockets, cookies } = &w.plumbing else { continue };
            let Some(cookie) = cookies.get(i) else { continue };
            if let Some(s) = sockets.get(i).and_then(|s| s.try_clone().ok()) {
                return Some(s);
            }
            let held = self.deps.inspector.sockets(w.pid, w.cgroup.as_deref(), &[listen]);
            if let Some((_, s)) =
                held.into_iter().find(|(_, s)| self.deps.steer.cookie(s).ok() == Some(*cookie))
            {
                return Some(s);
            }
        }
        None
    }

    /// A generation ended: its slot is given up and its tables go (its sockets are closed
    /// already).
    pub(super) fn drop_tables(&mut self, app: &AppName, g: u64) {
        self.give_up_slot(app, g);
        self.groups.tables.remove(&(app.clone(), g));
    }

    /// StopApp of a socket-mode app: its groups stop steering (new connections are refused, as
    /// with no rule), and their pins go.
    pub(super) fn forget_groups(&mut self, app: &AppName) {
        let keys: Vec<(AppName, SocketAddr)> =
            self.groups.groups.keys().filter(|(a, _)| a == app).cloned().collect();
        for key in keys {
            let group = self.groups.groups.remove(&key).expect("listed above");
            if let Err(e) = self.deps.steer.forget(app, key.1, group) {
                warn!(app = %app, "{app}: cannot stop steering {}: {e}", key.1);
            }
        }
        self.groups.tables.retain(|(a, _), _| a != app);
        self.groups.attached.retain(|(a, _)| a != app);
    }
}
