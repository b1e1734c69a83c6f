//! [`FakeSteer`]: socket mode's kernel side, in memory.

use std::{
    collections::BTreeMap,
    os::fd::OwnedFd,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use super::lock;
use crate::steering::Attachment;

/// Socket mode's kernel side, in memory, with the kernel's rules that matter to the supervisor:
/// eight slots per group, a live slot, band overrides, a table lives while a handle or a slot
/// holds it, a socket sits in one slot of one live table at most, and the live slot cannot be
/// cleared. Sockets are pipes (each has an inode of its own: its cookie).
/// [`FakeSteer::refuse`] plays a kernel that refuses the program (a verifier error);
/// [`FakeSteer::set_sessions`] plays the records the program keeps.
#[derive(Debug, Clone, Default)]
pub struct FakeSteer {
    world: Arc<Mutex<SteerWorld>>,
}

#[derive(Debug, Default)]
struct SteerWorld {
    next_table: u64,
    groups: BTreeMap<String, FakeGroupState>,
    /// Band → socket cookie, per table.
    tables: BTreeMap<u64, BTreeMap<u32, u64>>,
    /// The handles of each table: it lives while one does (or a slot holds it).
    handles: BTreeMap<u64, std::sync::Weak<()>>,
    /// (group, slot) of every `set_live`, in order.
    switches: Vec<(String, u8)>,
    refuse: Option<String>,
    /// Per group: whether it runs the program the daemon attached, and how often it was attached
    /// through [`crate::steering::Steer::attach`].
    attached: BTreeMap<String, (Attachment, usize)>,
}

/// One group's maps.
#[derive(Debug, Default, Clone)]
struct FakeGroupState {
    slots: [Option<u64>; 8],
    live: Option<(u8, u32)>,
    overrides: BTreeMap<u32, u8>,
    timeout: Duration,
    sessions: [u32; 8],
    capacity: u32,
    needs_attach: bool,
}

impl SteerWorld {
    fn alive(&self, table: u64) -> bool {
        self.handles.get(&table).is_some_and(|h| h.strong_count() > 0)
            || self.groups.values().any(|g| g.slots.contains(&Some(table)))
    }

    fn handle(&mut self, id: u64) -> FakeTable {
        let alive = self.handles.get(&id).and_then(std::sync::Weak::upgrade).unwrap_or_default();
        self.handles.insert(id, Arc::downgrade(&alive));
        FakeTable { id, _alive: alive }
    }

    fn group(&mut self, name: &str) -> &mut FakeGroupState {
        self.groups.entry(name.to_owned()).or_default()
    }
}

/// A fake group: its name.
#[derive(Debug)]
pub struct FakeGroup(pub String);

/// A handle of a fake table.
#[derive(Debug)]
pub struct FakeTable {
    pub id: u64,
    _alive: Arc<()>,
}

impl FakeSteer {
    fn world(&self) -> MutexGuard<'_, SteerWorld> {
        lock(&self.world)
    }

    /// Makes every group load fail with `why` (as a verifier rejection would).
    pub fn refuse(&self, why: &str) {
        self.world().refuse = Some(why.to_owned());
    }

    /// Where each band's new clients go now (override, else the live slot): band → cookie.
    pub fn routed(&self, group: &str) -> BTreeMap<u32, u64> {
        let w = self.world();
        let Some(g) = w.groups.get(group) else { return BTreeMap::new() };
        let table =
            |slot: u8| g.slots[slot as usize].and_then(|t| w.tables.get(&t)).cloned().unwrap_or_default();
        let mut out = g.live.map(|(s, _)| table(s)).unwrap_or_default();
        for (band, slot) in &g.overrides {
            match table(*slot).get(band) {
                Some(c) => out.insert(*band, *c),
                None => out.remove(band),
            };
        }
        out
    }

    /// The live slot of `group`.
    pub fn live_slot(&self, group: &str) -> Option<u8> {
        self.world().groups.get(group).and_then(|g| g.live).map(|l| l.0)
    }

    /// The slots of `group` that hold a table.
    pub fn filled_slots(&self, group: &str) -> Vec<u8> {
        let w = self.world();
        w.groups
            .get(group)
            .map_or_else(Vec::new, |g| (0..8u8).filter(|s| g.slots[*s as usize].is_some()).collect())
    }

    /// The overrides of `group`: band → slot.
    pub fn overridden(&self, group: &str) -> BTreeMap<u32, u8> {
        self.world().groups.get(group).map(|g| g.overrides.clone()).unwrap_or_default()
    }

    /// The session timeout of `group`.
    pub fn timeout(&self, group: &str) -> Duration {
        self.world().groups.get(group).map(|g| g.timeout).unwrap_or_default()
    }

    /// Plays the records the program keeps: `counts[slot]` in `group`.
    pub fn set_sessions(&self, group: &str, counts: [u32; 8]) {
        self.world().group(group).sessions = counts;
    }

    /// How many cutovers (`set_live`) happened.
    pub fn switches(&self) -> usize {
        self.world().switches.len()
    }

    /// Plays a worker that detached or replaced `group`'s program through its socket.
    pub fn tamper(&self, group: &str) {
        self.world().attached.entry(group.to_owned()).or_insert((Attachment::Unknown, 0)).0 =
            Attachment::Gone;
    }

    /// Plays a program replaced by the next load (an upgrade): it needs attaching.
    pub fn replace_program(&self, group: &str) {
        self.world().group(group).needs_attach = true;
    }

    /// Whether `group` runs the daemon's program, and how often it was attached again.
    pub fn attached(&self, group: &str) -> (Attachment, usize) {
        self.world().attached.get(group).copied().unwrap_or((Attachment::Unknown, 0))
    }

    /// Whether a connection from the probe source `source` reaches a socket: the table in the
    /// slot it names has a socket in the band it names, in some group.
    pub fn probe_reaches(&self, source: std::net::IpAddr) -> bool {
        let w = self.world();
        let named = (0..8u8).find_map(|slot| {
            (0..1024u32)
                .find(|band| crate::steering::probe_source(slot, *band) == Ok(source))
                .map(|b| (slot, b))
        });
        let Some((slot, band)) = named else { return false };
        w.groups.values().any(|g| {
            g.slots[slot as usize].and_then(|t| w.tables.get(&t)).is_some_and(|t| t.contains_key(&band))
        })
    }

    /// The name `group` keys an app's listen entry by.
    pub fn name(app: &str, listen: &str) -> String {
        ipcluster_steer::group_name(app, listen.parse().expect("an address"))
    }
}

impl crate::steering::Steer for FakeSteer {
    type Group = FakeGroup;
    type Table = FakeTable;

    fn group(
        &self,
        app: &ipcluster_core::name::AppName,
        listen: std::net::SocketAddr,
        sessions: u32,
    ) -> Result<FakeGroup, String> {
        let mut w = self.world();
        if let Some(why) = &w.refuse {
            return Err(why.clone());
        }
        let name = ipcluster_steer::group_name(app.as_str(), listen);
        let g = w.group(&name);
        if g.capacity != 0 && g.capacity != sessions {
            g.needs_attach = true;
        }
        g.capacity = sessions;
        Ok(FakeGroup(name))
    }
    fn sessions_capacity(&self, group: &FakeGroup) -> u32 {
        self.world().group(&group.0).capacity
    }
    fn needs_attach(&self, group: &FakeGroup) -> bool {
        self.world().group(&group.0).needs_attach
    }
    fn bind(&self, group: &FakeGroup, _listen: std::net::SocketAddr) -> Result<OwnedFd, String> {
        let (r, _w) = rustix::pipe::pipe().map_err(|e| e.to_string())?;
        self.world().attached.entry(group.0.clone()).or_insert((Attachment::Unknown, 0)).0 =
            Attachment::Intact;
        Ok(r)
    }
    fn table(&self) -> Result<FakeTable, String> {
        let mut w = self.world();
        w.next_table += 1;
        let id = w.next_table;
        w.tables.insert(id, BTreeMap::new());
        Ok(w.handle(id))
    }
    fn insert(&self, table: &FakeTable, band: u32, socket: &OwnedFd) -> Result<(), String> {
        let cookie = self.cookie(socket)?;
        let mut w = self.world();
        let elsewhere = w.tables.iter().any(|(t, slots)| {
            slots.iter().any(|(b, c)| *c == cookie && (*t, *b) != (table.id, band)) && w.alive(*t)
        });
        if elsewhere {
            return Err(format!("band {band}: the socket is already in a sockarray slot"));
        }
        w.tables.entry(table.id).or_default().insert(band, cookie);
        Ok(())
    }
    fn remove(&self, table: &FakeTable, band: u32) -> Result<(), String> {
        self.world().tables.entry(table.id).or_default().remove(&band);
        Ok(())
    }
    fn put(&self, group: &FakeGroup, slot: u8, table: &FakeTable, _bands: u32) -> Result<(), String> {
        let mut w = self.world();
        let g = w.group(&group.0);
        if g.slots[slot as usize] != Some(table.id) {
            // Another table: the slot's records stop counting.
            g.sessions[slot as usize] = 0;
        }
        g.slots[slot as usize] = Some(table.id);
        Ok(())
    }
    fn clear_slot(&self, group: &FakeGroup, slot: u8) -> Result<(), String> {
        let mut w = self.world();
        let g = w.group(&group.0);
        if g.live.is_some_and(|l| l.0 == slot) {
            return Err(format!("slot {slot} is live"));
        }
        g.slots[slot as usize] = None;
        g.sessions[slot as usize] = 0;
        Ok(())
    }
    fn set_live(&self, group: &FakeGroup, slot: u8, bands: u32) -> Result<(), String> {
        let mut w = self.world();
        let g = w.group(&group.0);
        if g.slots[slot as usize].is_none() {
            return Err(format!("slot {slot} holds no table"));
        }
        g.live = Some((slot, bands));
        w.switches.push((group.0.clone(), slot));
        Ok(())
    }
    fn live(&self, group: &FakeGroup) -> Result<Option<(u8, u32)>, String> {
        Ok(self.world().group(&group.0).live)
    }
    fn slots(&self, group: &FakeGroup) -> Result<Vec<(u8, FakeTable)>, String> {
        let mut w = self.world();
        let ids: Vec<(u8, u64)> =
            w.group(&group.0).slots.iter().enumerate().filter_map(|(s, t)| t.map(|t| (s as u8, t))).collect();
        Ok(ids.into_iter().map(|(s, id)| (s, w.handle(id))).collect())
    }
    fn set_override(&self, group: &FakeGroup, band: u32, slot: Option<u8>) -> Result<(), String> {
        let mut w = self.world();
        let g = w.group(&group.0);
        match slot {
            Some(s) => g.overrides.insert(band, s),
            None => g.overrides.remove(&band),
        };
        Ok(())
    }
    fn overrides(&self, group: &FakeGroup) -> Result<Vec<(u32, u8)>, String> {
        Ok(self.world().group(&group.0).overrides.iter().map(|(b, s)| (*b, *s)).collect())
    }
    fn set_session_timeout(&self, group: &FakeGroup, timeout: Duration) -> Result<(), String> {
        self.world().group(&group.0).timeout = timeout;
        Ok(())
    }
    fn session_timeout(&self, group: &FakeGroup) -> Result<Duration, String> {
        Ok(self.world().group(&group.0).timeout)
    }
    fn session_counts(&self, group: &FakeGroup) -> Result<[u32; 8], String> {
        Ok(self.world().group(&group.0).sessions)
    }
    fn same(&self, a: &FakeTable, b: &FakeTable) -> bool {
        a.id == b.id
    }
    fn entries(&self, table: &FakeTable) -> Result<Vec<(u32, u64)>, String> {
        Ok(self
            .world()
            .tables
            .get(&table.id)
            .map(|t| t.iter().map(|(b, c)| (*b, *c)).collect())
            .unwrap_or_default())
    }
    fn cookie(&self, socket: &OwnedFd) -> Result<u64, String> {
        rustix::fs::fstat(socket).map(|s| s.st_ino).map_err(|e| e.to_string())
    }
    fn attachment(&self, group: &FakeGroup) -> Result<Attachment, String> {
        Ok(self.attached(&group.0).0)
    }
    fn attach(&self, group: &FakeGroup, _socket: &OwnedFd) -> Result<(), String> {
        // As the kernel's: a group opened with a replaced program says so for as long as it is
        // held (the supervisor remembers that it attached it).
        let mut w = self.world();
        let a = w.attached.entry(group.0.clone()).or_insert((Attachment::Unknown, 0));
        *a = (Attachment::Intact, a.1 + 1);
        Ok(())
    }
    fn forget(
        &self,
        _app: &ipcluster_core::name::AppName,
        _listen: std::net::SocketAddr,
        group: FakeGroup,
    ) -> Result<(), String> {
        self.world().groups.remove(&group.0);
        Ok(())
    }
}
