//! [`Steering`]: the program and maps of one reuseport group, pinned in bpffs — loading or
//! re-opening them (and upgrading the first version's pins), attaching the program, the slots,
//! the live generation, overrides, sessions, and what a restarted daemon reads back.

use std::{
    fmt, fs, io,
    net::{Ipv4Addr, SocketAddr},
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, AtomicU32, Ordering},
};

use crate::{
    MAX_BANDS, SLOTS, SockArray, SteerError, check_band, create_sockarray,
    program::{self, CONTROL_NONE},
    socket, sys, v1,
};

mod legacy;
mod pins;
mod sessions;
mod slots;

use pins::{
    ALL_MAPS, CONFIG_MAP, CONTROL_MAP, OVERRIDES_MAP, PROG_NEW_PIN, PROG_PIN, SESSIONS_MAP, SESSIONS_NEW_PIN,
    SLOT_INFO_MAP, SLOTS_MAP, prepare_base,
};
pub(crate) use pins::{MapSpec, check_shape, open_map, open_pinned};
use sessions::resize_sessions;
pub use sessions::{Session, monotonic_now};

/// The sessions map's size when [`Options`] does not say: 65,536 clients.
pub const DEFAULT_SESSIONS: u32 = 65_536;
/// The largest sessions map [`Steering::open`] creates (about 380 MiB of kernel memory).
pub const MAX_SESSIONS: u32 = 1 << 22;

/// How [`Steering::open`] creates what is not pinned yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// The sessions map's `max_entries` (`1..=`[`MAX_SESSIONS`]): an `LRU_HASH` map is
    /// allocated whole at creation, about 96 bytes a record (6.0 MiB for 65,536: `memlock` in
    /// the map's fdinfo), so an app without session affinity can ask for few. When the map is
    /// full the kernel evicts the records used least recently.
    ///
    /// A pinned map of another size is replaced by one of this size holding its records (the
    /// most recently seen when they do not all fit), and so is the program that names it
    /// ([`Steering::program_replaced`]): attach it at once, since until then the group runs the
    /// previous program, which records in the previous map (those records are lost).
    pub sessions: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self { sessions: DEFAULT_SESSIONS }
    }
}

/// The steering of one reuseport group (one public address), pinned under `<base_dir>/<name>/`:
///
/// | pin | map | what |
/// |---|---|---|
/// | `prog` | | the program |
/// | `slots` | `ARRAY_OF_MAPS`, [`SLOTS`] entries | a [`SockArray`] per slot, or nothing |
/// | `control` | `ARRAY`, 1 `u32` | the live slot and its band count (log2) |
/// | `slot_info` | `ARRAY`, [`SLOTS`] `u32` | per slot its band count (log2) and epoch |
/// | `overrides` | `ARRAY`, [`MAX_BANDS`] `u32` | per band: 0, or `s + 1` for slot `s` |
/// | `sessions` | `LRU_HASH`, 16-byte keys and values | client → {slot, epoch, last seen} |
/// | `config` | `ARRAY`, 1 `u64` | the session timeout in ns (0: off) |
///
/// The program attached to the group is not the pinned one but a copy of it that nothing else
/// holds ([`Steering::attach`]): it exists only while the group uses it, so
/// [`Steering::attachment`] can tell whether someone holding a socket of the group detached or
/// replaced it (the kernel has no interface that reports a reuseport group's program).
///
/// Changes of one group must not run concurrently (the daemon's supervisor owns each
/// `Steering`); reads may.
pub struct Steering {
    dir: PathBuf,
    prog: OwnedFd,
    prog_id: u32,
    maps: MapSet,
    sessions_max: u32,
    replaced: bool,
    /// The first version's pins are still there: removed once this program is attached.
    upgrade_pending: AtomicBool,
    /// The id of the copy of the program this handle attached last (0: none yet).
    attached: AtomicU32,
}

/// Whether the group still runs the program a [`Steering`] attached ([`Steering::attachment`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attachment {
    /// This handle attached nothing yet (a restarted daemon: the previous one attached it).
    Unknown,
    /// The copy it attached last still exists: nothing but the group holds it, so the group
    /// still runs it.
    Intact,
    /// The copy is gone: detached or replaced through a socket of the group, or the group ended
    /// (its last socket closed).
    Gone,
}

/// One slot's state ([`Steering::slots`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotState {
    /// The kernel id of the table in the slot ([`SockArray::id`]), if any.
    pub table: Option<u32>,
    /// The band count given when the table was put there (1 for a slot never used).
    pub bands: u32,
    /// Changes each time a table is put in the slot or the slot is cleared (modulo 2^28).
    pub epoch: u32,
}

/// How often the program ran and for how long ([`Steering::program_stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramStats {
    /// Runs counted while run-time statistics were on ([`enable_run_time_stats`]).
    pub run_cnt: u64,
    /// Their total time, ns.
    pub run_time_ns: u64,
}

impl fmt::Debug for Steering {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Steering")
            .field("dir", &self.dir)
            .field("prog_id", &self.prog_id)
            .field("slots_id", &self.maps.slots.1)
            .field("sessions_max", &self.sessions_max)
            .finish()
    }
}

/// The six maps, each with its kernel id.
struct MapSet {
    slots: (OwnedFd, u32),
    control: (OwnedFd, u32),
    slot_info: (OwnedFd, u32),
    overrides: (OwnedFd, u32),
    sessions: (OwnedFd, u32),
    config: (OwnedFd, u32),
}

impl MapSet {
    fn program(&self) -> program::Maps<'_> {
        program::Maps {
            slots: self.slots.0.as_fd(),
            control: self.control.0.as_fd(),
            slot_info: self.slot_info.0.as_fd(),
            overrides: self.overrides.0.as_fd(),
            sessions: self.sessions.0.as_fd(),
            config: self.config.0.as_fd(),
        }
    }

    fn ids(&self) -> Vec<u32> {
        let mut ids = vec![
            self.slots.1,
            self.control.1,
            self.slot_info.1,
            self.overrides.1,
            self.sessions.1,
            self.config.1,
        ];
        ids.sort_unstable();
        ids
    }
}

impl Steering {
    /// [`Steering::open`] with the default [`Options`].
    pub fn load(base_dir: &Path, name: &str) -> Result<Self, SteerError> {
        Self::open(base_dir, name, &Options::default())
    }

    /// Opens the steering pinned under `<base_dir>/<name>/`, or creates and pins it.
    ///
    /// `base_dir` must be on a bpf filesystem, or not exist yet below a directory that is (see
    /// [`mount_bpffs_if_absent`]); it and `<name>` are created as needed. `name` is one path
    /// component of `[A-Za-z0-9_-]` (bpffs refuses names with a dot; see [`group_name`]).
    ///
    /// Pinned maps are re-opened, so the slots, the live generation, overrides and sessions
    /// survive a daemon restart; a missing map pin is recovered from the pinned program, which
    /// names its maps. The program is loaded (verified) on every call: a pinned program with the
    /// same code (kernel tag) and the same maps is kept, otherwise the new one replaces the pin
    /// ([`Steering::program_replaced`]) and must then be attached ([`Steering::attach`]) to
    /// groups that already exist. Idempotent.
    ///
    /// **Upgrade.** When the group was pinned by the first version of this crate (two slots:
    /// pins `outer` and `active`), its tables are put in the same slots here (0 and 1) with
    /// [`MAX_BANDS`] bands, and the one in force is made live: the new program then selects
    /// exactly what the old one did for every client, so traffic is unchanged when it is
    /// attached. The old program keeps steering with the old maps until [`Steering::attach`]
    /// replaces it, which also removes the old pins ([`Steering::upgrade_pending`] until
    /// then). Attach at once: until then changes to the live slot reach no connection. Until
    /// the old pins are gone every `open` copies them again (they are what traffic follows).
    /// The daemon, which knows each generation's band count, then gives it with
    /// [`Steering::put`] (the same table: no grace period) and [`Steering::set_live`].
    ///
    /// On failure nothing that was pinned before the call is changed, except during an upgrade
    /// (slots 0 and 1 and the live slot may already hold the old tables) or a resize of the
    /// sessions map ([`Options::sessions`]: the new map may be pinned already, which the next
    /// call keeps); maps created by the failing call may stay pinned (empty, harmless, reused
    /// by the next call). A verifier rejection is [`SteerError::Verifier`], with the verifier's
    /// log.
    ///
    /// [`mount_bpffs_if_absent`]: crate::mount_bpffs_if_absent
    pub fn open(base_dir: &Path, name: &str, options: &Options) -> Result<Self, SteerError> {
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
        if name.is_empty() || !name.chars().all(valid) {
            return Err(SteerError::InvalidName(name.to_owned()));
        }
        if !(1..=MAX_SESSIONS).contains(&options.sessions) {
            return Err(SteerError::InvalidSessions(options.sessions));
        }
        prepare_base(base_dir)?;
        let dir = base_dir.join(name);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(sys(format!("mkdir {}", dir.display()))(e)),
        }
        let pinned_prog = open_pinned(&dir.join(PROG_PIN))?;
        let prog_maps = match &pinned_prog {
            Some(p) => sys::prog_info(p.as_fd()).map_err(sys("read the pinned program's info"))?.map_ids,
            None => Vec::new(),
        };
        // The first version's maps, which traffic follows until this program is attached.
        let old = v1::find(&dir, &prog_maps)?;

        let template = create_sockarray("ipc_template").map_err(sys("create the inner-map template"))?;
        let sessions = options.sessions;
        let mut maps = MapSet {
            slots: open_map(&dir, &SLOTS_MAP, &prog_maps, |s| {
                sys::map_create(sys::BPF_MAP_TYPE_ARRAY_OF_MAPS, 4, 4, SLOTS, Some(template.as_fd()), s.name)
            })?,
            control: open_map(&dir, &CONTROL_MAP, &prog_maps, |s| {
                let fd = sys::map_create(sys::BPF_MAP_TYPE_ARRAY, 4, 4, 1, None, s.name)?;
                sys::map_update(fd.as_fd(), 0, &CONTROL_NONE, sys::BPF_ANY)?;
                Ok(fd)
            })?,
            slot_info: open_map(&dir, &SLOT_INFO_MAP, &prog_maps, |s| {
                sys::map_create(sys::BPF_MAP_TYPE_ARRAY, 4, 4, SLOTS, None, s.name)
            })?,
            overrides: open_map(&dir, &OVERRIDES_MAP, &prog_maps, |s| {
                sys::map_create(sys::BPF_MAP_TYPE_ARRAY, 4, 4, MAX_BANDS, None, s.name)
            })?,
            sessions: open_map(&dir, &SESSIONS_MAP, &prog_maps, |s| {
                sys::map_create(sys::BPF_MAP_TYPE_LRU_HASH, 16, 16, sessions, None, s.name)
            })?,
            config: open_map(&dir, &CONFIG_MAP, &prog_maps, |s| {
                sys::map_create(sys::BPF_MAP_TYPE_ARRAY, 4, 8, 1, None, s.name)
            })?,
        };
        drop(template);
        let pinned_max =
            sys::map_info(maps.sessions.0.as_fd()).map_err(sys("read the sessions map's info"))?.max_entries;
        if pinned_max != sessions {
            maps.sessions = resize_sessions(&dir, maps.sessions.0.as_fd(), pinned_max, sessions)?;
        }
        let sessions_max = sessions;

        let insns = program::steering_program(&maps.program());
        let prog = crate::load_steering(&insns)?;
        let info = sys::prog_info(prog.as_fd()).map_err(sys("read the program's info"))?;

        let mut steering = Self {
            dir,
            prog,
            prog_id: info.id,
            maps,
            sessions_max,
            replaced: true,
            upgrade_pending: AtomicBool::new(false),
            attached: AtomicU32::new(0),
        };
        if let Some(old) = &old {
            steering.copy_v1(old)?;
            steering.upgrade_pending.store(old.pinned, Ordering::Relaxed);
        }
        let prog_path = steering.dir.join(PROG_PIN);
        if let Some(pinned) = pinned_prog {
            let pinned_info =
                sys::prog_info(pinned.as_fd()).map_err(sys("read the pinned program's info"))?;
            let mut ids = pinned_info.map_ids.clone();
            ids.sort_unstable();
            if pinned_info.prog_type == info.prog_type
                && pinned_info.tag == info.tag
                && ids == steering.maps.ids()
            {
                steering.prog = pinned;
                steering.prog_id = pinned_info.id;
                steering.replaced = old.is_some();
                return Ok(steering);
            }
            // Pin beside it, then rename over it: the path never disappears.
            let tmp = steering.dir.join(PROG_NEW_PIN);
            let _ = fs::remove_file(&tmp);
            sys::obj_pin(steering.prog.as_fd(), &tmp).map_err(sys(format!("pin {}", tmp.display())))?;
            fs::rename(&tmp, &prog_path).map_err(sys(format!("rename to {}", prog_path.display())))?;
        } else {
            sys::obj_pin(steering.prog.as_fd(), &prog_path)
                .map_err(sys(format!("pin {}", prog_path.display())))?;
        }
        Ok(steering)
    }

    /// The first version's slots 0 and 1 into ours, with 1,024 bands (its selection exactly),
    /// and its slot in force made live.
    fn copy_v1(&self, old: &v1::Maps) -> Result<(), SteerError> {
        for slot in 0..2 {
            match old.table(slot)? {
                Some(table) => self.put(slot, &table, MAX_BANDS)?,
                None => {
                    self.clear_slot_unchecked(slot)?;
                }
            }
        }
        match old.active()? {
            Some(slot) if self.slot_id(slot)?.is_some() => {
                self.write_control(program::control_word(slot, MAX_BANDS.ilog2()))
            }
            _ => self.write_control(CONTROL_NONE),
        }
    }

    /// Removes `<base_dir>/<name>/` and its pins (when an app is stopped or leaves socket mode),
    /// the first version's too. Idempotent. Groups that still exist keep their program, tables
    /// and sessions (the kernel holds them) until their last socket closes; a later
    /// [`Steering::open`] starts afresh.
    pub fn unpin(base_dir: &Path, name: &str) -> io::Result<()> {
        let dir = base_dir.join(name);
        let pins = [PROG_PIN, PROG_NEW_PIN, SESSIONS_NEW_PIN]
            .into_iter()
            .chain(ALL_MAPS.iter().map(|s| s.pin))
            .chain(v1::PINS);
        for f in pins {
            match fs::remove_file(dir.join(f)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        match fs::remove_dir(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The directory holding the pins.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The pinned program's kernel id (as `bpftool prog` shows it).
    pub fn program_id(&self) -> u32 {
        self.prog_id
    }

    /// The kernel id of the slots map (the `ARRAY_OF_MAPS`).
    pub fn outer_map_id(&self) -> u32 {
        self.maps.slots.1
    }

    /// Whether [`Steering::open`] pinned a new program (none was pinned, the pinned one had
    /// other code or other maps — a resized sessions map, say — or the group is being upgraded
    /// from the first version): groups that exist run the old one until [`Steering::attach`].
    pub fn program_replaced(&self) -> bool {
        self.replaced
    }

    /// Whether the first version's pins are still there: the group may still run its program,
    /// until [`Steering::attach`] (which then removes them).
    pub fn upgrade_pending(&self) -> bool {
        self.upgrade_pending.load(Ordering::Relaxed)
    }

    /// The sessions map's `max_entries`.
    pub fn sessions_capacity(&self) -> u32 {
        self.sessions_max
    }

    /// Makes this program the selector of `socket`'s reuseport group (`SO_ATTACH_REUSEPORT_EBPF`
    /// on any one socket of the group; atomic for traffic). Idempotent. The group keeps the
    /// program until its last socket closes.
    ///
    /// What is attached is a copy of the pinned program that this process does not keep open
    /// (see [`Steering::attachment`]): the copy attached last when it still exists (a few
    /// microseconds), else a newly loaded one (verified: milliseconds). After an upgrade
    /// ([`Steering::upgrade_pending`]) the first version's pins are removed once attached; if
    /// that fails they stay, and the next attach tries again.
    pub fn attach(&self, socket: impl AsFd) -> Result<(), SteerError> {
        let last = self.attached.load(Ordering::Relaxed);
        let existing = match last {
            0 => None,
            id => sys::prog_get_fd_by_id(id).ok(),
        };
        let copy = match existing {
            Some(fd) => fd,
            None => self.load_copy()?,
        };
        socket::attach_program(socket.as_fd(), copy.as_fd()).map_err(sys("SO_ATTACH_REUSEPORT_EBPF"))?;
        let id = sys::prog_info(copy.as_fd()).map_err(sys("read the attached program's info"))?.id;
        self.attached.store(id, Ordering::Relaxed);
        if self.upgrade_pending() && v1::unpin(&self.dir).is_ok() {
            self.upgrade_pending.store(false, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Loads a new copy of the program (the same code and maps as the pinned one).
    fn load_copy(&self) -> Result<OwnedFd, SteerError> {
        let insns = program::steering_program(&self.maps.program());
        crate::load_steering(&insns)
    }

    /// Whether the group still runs the copy of the program this handle attached last. A copy
    /// nothing else holds exists exactly as long as a group uses it, so `Gone` means it was
    /// detached (`SO_DETACH_REUSEPORT_BPF`) or replaced (`SO_ATTACH_REUSEPORT_CBPF` /
    /// `_EBPF`) through a socket of the group — or that the group ended. One `bpf(2)` call.
    /// (A root process that opened the copy by its id keeps it existing: this cannot see past
    /// root.)
    pub fn attachment(&self) -> Result<Attachment, SteerError> {
        match self.attached.load(Ordering::Relaxed) {
            0 => Ok(Attachment::Unknown),
            id => match sys::prog_get_fd_by_id(id) {
                Ok(_) => Ok(Attachment::Intact),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(Attachment::Gone),
                Err(e) => Err(sys(format!("open program id {id}"))(e)),
            },
        }
    }

    /// How often the copy this handle attached last ran, and for how long, counted while
    /// run-time statistics were on ([`enable_run_time_stats`]); `None` when this handle
    /// attached none or the copy is gone. `run_time_ns / run_cnt` is the program's own cost per
    /// connection (SYNs and migrating requests).
    pub fn program_stats(&self) -> Result<Option<ProgramStats>, SteerError> {
        let id = self.attached.load(Ordering::Relaxed);
        if id == 0 {
            return Ok(None);
        }
        let fd = match sys::prog_get_fd_by_id(id) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(sys(format!("open program id {id}"))(e)),
        };
        let info = sys::prog_info(fd.as_fd()).map_err(sys("read the attached program's info"))?;
        Ok(Some(ProgramStats { run_cnt: info.run_cnt, run_time_ns: info.run_time_ns }))
    }

    /// Instructions the verifier processed to accept the program (its work, bounded by the
    /// kernel at 1,000,000); 0 on kernels before 5.16.
    pub fn verified_insns(&self) -> Result<u32, SteerError> {
        Ok(sys::prog_info(self.prog.as_fd()).map_err(sys("read the program's info"))?.verified_insns)
    }

    /// [`bind_reuseport`], then [`Steering::attach`] on the new socket. Not idempotent: each
    /// call creates a socket.
    ///
    /// [`bind_reuseport`]: crate::bind_reuseport
    pub fn listen(&self, addr: SocketAddr, backlog: i32) -> Result<OwnedFd, SteerError> {
        let socket = socket::bind_listener(addr, backlog, None).map_err(sys(format!("listen on {addr}")))?;
        self.attach(&socket)?;
        Ok(socket)
    }

    // ---- Helpers --------------------------------------------------------------------------

    fn info_word(&self, slot: u32) -> Result<u32, SteerError> {
        Ok(sys::map_lookup::<u32>(self.maps.slot_info.0.as_fd(), slot)
            .map_err(sys(format!("read slot {slot}'s info")))?
            .unwrap_or(0))
    }

    fn slot_id(&self, slot: u32) -> Result<Option<u32>, SteerError> {
        sys::map_lookup::<u32>(self.maps.slots.0.as_fd(), slot).map_err(sys(format!("read slot {slot}")))
    }

    fn open_slot(&self, slot: u32) -> Result<Option<SockArray>, SteerError> {
        open_table(self.maps.slots.0.as_fd(), slot)
    }
}

/// The table in `slot` of an `ARRAY_OF_MAPS`, opened by its id.
pub(crate) fn open_table(outer: BorrowedFd<'_>, slot: u32) -> Result<Option<SockArray>, SteerError> {
    // The slot may be refilled between the lookup and the open: look again then.
    for _ in 0..3 {
        let Some(id) = sys::map_lookup::<u32>(outer, slot).map_err(sys(format!("read slot {slot}")))? else {
            return Ok(None);
        };
        match sys::map_get_fd_by_id(id) {
            Ok(fd) => return SockArray::from_fd(fd).map(Some),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(sys(format!("open map id {id}"))(e)),
        }
    }
    Err(SteerError::Sys { op: format!("open slot {slot}"), source: io::Error::other("it kept changing") })
}

/// Turns on the kernel's run-time statistics of every program (`run_time_ns`, `run_cnt`, read
/// by [`Steering::program_stats`]) while the returned descriptor is open (`BPF_ENABLE_STATS`);
/// closing it restores what was (`kernel.bpf_stats_enabled` is not changed). They cost each
/// program run two clock reads. Needs `CAP_SYS_ADMIN`.
pub fn enable_run_time_stats() -> Result<OwnedFd, SteerError> {
    sys::enable_stats().map_err(sys("BPF_ENABLE_STATS"))
}

/// The source address of a probe connection to `band`'s socket in `slot`'s table:
/// `127.253.0.0 | slot << 10 | band`. A connection from it (bind it: every 127/8 address is
/// local) to any address of the group reaches exactly that socket, or is refused when there is
/// none: no fallback to another band, no session looked up or recorded. Only local processes
/// can use these sources (the kernel drops 127/8 sources from other hosts unless
/// `route_localnet` is set), and only over IPv4: an `[::]` group takes them on `127.0.0.1`.
pub fn probe_source(slot: u32, band: u32) -> Result<Ipv4Addr, SteerError> {
    check_slot(slot)?;
    check_band(band)?;
    Ok(Ipv4Addr::from(program::PROBE_PREFIX << 16 | slot << program::PROBE_SLOT_SHIFT | band))
}

fn check_slot(slot: u32) -> Result<(), SteerError> {
    if slot < SLOTS { Ok(()) } else { Err(SteerError::SlotOutOfRange(slot)) }
}

fn check_bands(bands: u32) -> Result<u32, SteerError> {
    program::log2_of(bands).ok_or(SteerError::InvalidBands(bands))
}

/// A name for [`Steering::open`] from an app name and one of its `listen` addresses, e.g.
/// `chat-0_0_0_0-80` or `chat-__-443` for `[::]:443` (bpffs names may not contain dots).
pub fn group_name(app: &str, listen: SocketAddr) -> String {
    let ip = listen.ip().to_string().replace(['.', ':'], "_");
    format!("{app}-{ip}-{}", listen.port())
}
