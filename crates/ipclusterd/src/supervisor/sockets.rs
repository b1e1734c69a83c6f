//! Socket mode (`routing = "socket"`): the daemon binds the public sockets and a steering
//! program picks each connection's band (see [`crate::steering`]).
//!
//! - Each `listen` entry of an app is one *group*: the reuseport group of its sockets, steered
//!   by one program. Each worker gets a socket of every group of its app, bound by the daemon
//!   and handed to it at fd 3 on (sd_listen_fds(3)).
//! - Each generation has one *table* per group: band → that band's worker's socket. A worker's
//!   sockets join its generation's tables when it is ready; the daemon then closes its own
//!   copies, so a worker's sockets close when it ends, and the kernel moves what was queued on
//!   them to another band (no connection is refused).
//! - The cutover is one map update per group: the program reads the new generation's table
//!   from then on. A retired generation keeps its tables, so a rollback is the same switch back.
//! - A band without a worker (crashed, not respawned yet) has an empty slot: the program sends
//!   its clients to a neighbour band, the one the NAT rules would pick ([`with_failover`]).
//!
//! [`with_failover`]: ipcluster_core::routing::with_failover

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    os::fd::OwnedFd,
};

use ipcluster_core::{
    config::{AppConfig, Routing},
    model::GenState,
    name::AppName,
};
use tracing::{error, warn};

use super::{Supervisor, model::WorkerId};
use crate::{netfilter::Router, processes::Processes, scopes::Scopes, steering::Steer};

/// The steering the supervisor holds: groups and tables.
#[derive(Debug)]
pub(super) struct Groups<T: Steer> {
    /// One per (app, listen entry).
    groups: BTreeMap<(AppName, SocketAddr), T::Group>,
    /// One per group, in `listen` order, for each running generation.
    tables: BTreeMap<(AppName, u64), Vec<T::Table>>,
}

impl<T: Steer> Default for Groups<T> {
    fn default() -> Self {
        Self { groups: BTreeMap::new(), tables: BTreeMap::new() }
    }
}

impl<T: Steer> Groups<T> {
    /// The group of `app`'s listen entry `listen`, loaded (or re-opened from its pins) once.
    fn group(&mut self, steer: &T, app: &AppName, listen: SocketAddr) -> Result<&T::Group, String> {
        let key = (app.clone(), listen);
        if !self.groups.contains_key(&key) {
            let group = steer.group(app, listen)?;
            self.groups.insert(key.clone(), group);
        }
        Ok(&self.groups[&key])
    }

    /// Generation `g`'s tables, created empty the first time.
    fn tables(&mut self, steer: &T, app: &AppName, g: u64, groups: usize) -> Result<&Vec<T::Table>, String> {
        let key = (app.clone(), g);
        if !self.tables.contains_key(&key) {
            let tables = (0..groups).map(|_| steer.table()).collect::<Result<Vec<_>, _>>()?;
            self.tables.insert(key.clone(), tables);
        }
        Ok(&self.tables[&key])
    }
}

/// One new worker's sockets: the daemon's copies and what goes to the worker.
#[derive(Debug, Default)]
pub(super) struct BandSockets {
    /// Kept until the worker is ready (see [`super::model::Worker::sockets`]).
    pub kept: Vec<OwnedFd>,
    /// Duplicates handed to the worker.
    pub handed: Vec<OwnedFd>,
    pub cookies: Vec<u64>,
}

impl<S: Scopes + Clone + 'static, R: Router + 'static, P: Processes, T: Steer> Supervisor<S, R, P, T> {
    /// A new worker's sockets (socket mode; none otherwise): one per listen entry, bound in
    /// its group.
    pub(super) fn bind_band(&mut self, config: &AppConfig) -> Result<BandSockets, String> {
        let mut out = BandSockets::default();
        if config.routing != Routing::Socket {
            return Ok(out);
        }
        for &listen in &config.listen {
            let group = self.groups.group(&self.deps.steer, &config.name, listen)?;
            let socket = self.deps.steer.bind(group, listen)?;
            out.cookies.push(self.deps.steer.cookie(&socket)?);
            out.handed.push(socket.try_clone().map_err(|e| format!("cannot duplicate a socket: {e}"))?);
            out.kept.push(socket);
        }
        Ok(out)
    }

    /// A worker is ready: its sockets take its band's slot in its generation's tables (for a
    /// live generation, new connections of the band reach it from now on), and the daemon's
    /// copies close. Nothing to do in NAT mode.
    pub(super) fn steer_to(&mut self, id: WorkerId) -> Result<(), String> {
        let Some(w) = self.m.workers.get_mut(&id) else { return Ok(()) };
        if w.sockets.is_empty() {
            return Ok(());
        }
        let (app, g, band) = (w.app.clone(), w.generation, w.band);
        let sockets = std::mem::take(&mut w.sockets);
        // A worker ready after its generation failed or stopped joins nothing (its tables are
        // gone); its sockets close with it.
        if !self.m.gen_state(&app, g).is_some_and(GenState::is_running) {
            return Ok(());
        }
        let tables = self.groups.tables(&self.deps.steer, &app, g, sockets.len())?;
        for (table, socket) in tables.iter().zip(&sockets) {
            self.deps.steer.insert(table, band, socket)?;
        }
        Ok(())
    }

    /// A worker left: its band's slots are emptied where they still hold its sockets (a
    /// replacement's are left alone), so the band's clients go to a neighbour at once.
    pub(super) fn unsteer(&mut self, app: &AppName, g: u64, band: u32, cookies: &[u64]) {
        let Some(tables) = self.groups.tables.get(&(app.clone(), g)) else { return };
        for (table, cookie) in tables.iter().zip(cookies) {
            let holds = self.deps.steer.entries(table).is_ok_and(|e| e.contains(&(band, *cookie)));
            if holds && let Err(e) = self.deps.steer.remove(table, band) {
                warn!(app = %app, generation = g, band, "{app}: cannot empty band {band}'s slot: {e}");
            }
        }
    }

    /// Prepares the cutover to generation `g` (its tables, empty until its workers are ready,
    /// put where the steering can switch to them). This is the slow part (milliseconds: the
    /// kernel waits for readers of the slot it replaces), so a deploy does it when it starts.
    /// Idempotent, and cheap once done.
    pub(super) fn stage(&mut self, app: &AppName, g: u64) -> Result<(), String> {
        let Some(config) = self.m.config(app, g) else { return Err("no such generation".into()) };
        let steer = &self.deps.steer;
        for &listen in &config.listen {
            self.groups.group(steer, app, listen)?;
        }
        self.groups.tables(steer, app, g, config.listen.len())?;
        let tables = &self.groups.tables[&(app.clone(), g)];
        for (listen, table) in config.listen.iter().zip(tables) {
            steer.stage(&self.groups.groups[&(app.clone(), *listen)], table)?;
        }
        Ok(())
    }

    /// The cutover of a socket-mode app: every group reads generation `g`'s tables from now on,
    /// each with one atomic 4-byte map update (microseconds once [`Self::stage`] is done).
    pub(super) fn switch_to(&mut self, app: &AppName, g: u64) -> Result<(), String> {
        self.stage(app, g)?;
        let config = self.m.config(app, g).expect("staged above");
        let tables = &self.groups.tables[&(app.clone(), g)];
        for (listen, table) in config.listen.iter().zip(tables) {
            self.deps.steer.switch(&self.groups.groups[&(app.clone(), *listen)], table)?;
        }
        Ok(())
    }

    /// The cookies in the table `app`'s group `listen` reads now (none: no table in force).
    pub(super) fn steering_now(&mut self, app: &AppName, listen: SocketAddr) -> Result<Vec<u64>, String> {
        let steer = &self.deps.steer;
        let group = self.groups.group(steer, app, listen)?;
        match steer.current(group)? {
            Some(table) => Ok(steer.entries(&table)?.into_iter().map(|(_, c)| c).collect()),
            None => Ok(Vec::new()),
        }
    }

    /// An adopted socket-mode generation gets its tables back: the one in force or the standby
    /// one of each group, whichever names its workers' sockets (a socket sits in one table at
    /// most, so a table that still exists must be re-opened, not rebuilt); a new one for a
    /// generation whose table is gone (an older retired one). Slots a worker should hold and
    /// does not are filled, and a live generation whose table is not in force (the pins were
    /// lost) is switched to.
    pub(super) fn adopt_steering(&mut self, app: &AppName, g: u64, state: GenState) {
        let Some(config) = self.m.config(app, g).filter(|c| c.routing == Routing::Socket) else { return };
        if let Err(e) = self.reopen_tables(app, g, &config.listen) {
            error!(app = %app, generation = g, "{app}: cannot take back the steering of generation {g}: {e}");
            return;
        }
        // What the tables hold already (the kernel refuses a socket a second time, even in its
        // own slot).
        let tables = &self.groups.tables[&(app.clone(), g)];
        let have: Vec<BTreeSet<(u32, u64)>> = tables
            .iter()
            .map(|t| self.deps.steer.entries(t).unwrap_or_default().into_iter().collect())
            .collect();
        let ids: Vec<WorkerId> =
            self.m.workers_of(app, g).filter(|(_, w)| !w.sockets.is_empty()).map(|(id, _)| id).collect();
        for id in ids {
            let w = self.m.workers.get_mut(&id).expect("listed above");
            let (band, pid, sockets) = (w.band, w.pid, std::mem::take(&mut w.sockets));
            for (i, (socket, cookie)) in sockets.iter().zip(&w.cookies).enumerate() {
                if have[i].contains(&(band, *cookie)) {
                    continue;
                }
                let table = &self.groups.tables[&(app.clone(), g)][i];
                if let Err(e) = self.deps.steer.insert(table, band, socket) {
                    warn!(app = %app, generation = g, pid, "{app}: cannot steer band {band} to pid {pid}: {e}");
                }
            }
        }
        let in_force = config.listen.iter().enumerate().all(|(i, listen)| {
            let group = &self.groups.groups[&(app.clone(), *listen)];
            let table = &self.groups.tables[&(app.clone(), g)][i];
            matches!(self.deps.steer.current(group), Ok(Some(c)) if self.deps.steer.same(&c, table))
        });
        if state == GenState::Live && !in_force {
            warn!(app = %app, generation = g, "{app}: the steering did not name generation {g}; switching to it");
            if let Err(e) = self.switch_to(app, g) {
                error!(app = %app, generation = g, "{app}: cannot steer connections to generation {g}: {e}");
            }
        }
    }

    /// Generation `g`'s tables after a restart: per group, the table in force or the standby one
    /// if it names one of `g`'s workers' sockets, else a new one.
    fn reopen_tables(&mut self, app: &AppName, g: u64, listen: &[SocketAddr]) -> Result<(), String> {
        let cookies: Vec<Vec<u64>> = (0..listen.len())
            .map(|i| self.m.workers_of(app, g).filter_map(|(_, w)| w.cookies.get(i).copied()).collect())
            .collect();
        let steer = &self.deps.steer;
        let mut tables = Vec::new();
        for (i, &l) in listen.iter().enumerate() {
            let group = self.groups.group(steer, app, l)?;
            let mut found = None;
            for table in [steer.current(group)?, steer.standby(group)?].into_iter().flatten() {
                if steer.entries(&table)?.iter().any(|(_, c)| cookies[i].contains(c)) {
                    found = Some(table);
                    break;
                }
            }
            tables.push(match found {
                Some(t) => t,
                None => steer.table()?,
            });
        }
        self.groups.tables.insert((app.clone(), g), tables);
        Ok(())
    }

    /// A generation ended: its tables go (its sockets are closed already).
    pub(super) fn drop_tables(&mut self, app: &AppName, g: u64) {
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
    }
}
