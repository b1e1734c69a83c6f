//! [`Steering`]: the program and maps of one reuseport group, pinned in bpffs — loading or
//! re-opening them, attaching the program, staging a generation and switching to it (the
//! cutover), and what a restarted daemon reads back.

use std::{
    fmt, fs, io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use crate::{SockArray, SteerError, create_sockarray, is_bpffs, program, socket, sys};

/// The steering of one reuseport group (one public address): the program, its outer map
/// (`BPF_MAP_TYPE_ARRAY_OF_MAPS`, two slots, each holding a generation's [`SockArray`] or
/// nothing) and its `active` map (`BPF_MAP_TYPE_ARRAY`, one `u32`: which slot the program uses),
/// pinned under `<base_dir>/<name>/` as `prog`, `outer` and `active`.
///
/// Switches of one group must not run concurrently (the daemon's supervisor owns each
/// `Steering`); everything else may.
pub struct Steering {
    dir: PathBuf,
    prog: OwnedFd,
    outer: OwnedFd,
    active: OwnedFd,
    prog_id: u32,
    outer_id: u32,
    active_id: u32,
    replaced: bool,
}

impl fmt::Debug for Steering {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Steering")
            .field("dir", &self.dir)
            .field("prog_id", &self.prog_id)
            .field("outer_id", &self.outer_id)
            .field("active_id", &self.active_id)
            .finish()
    }
}

/// The outer map's slots; [`CLEARED`] in `active` names none (the lookup fails: refuse).
const SLOTS: u32 = 2;
const CLEARED: u32 = SLOTS;

impl Steering {
    /// Opens the steering pinned under `<base_dir>/<name>/`, or creates and pins it.
    ///
    /// `base_dir` must be on a bpf filesystem, or not exist yet below a directory that is (see
    /// [`mount_bpffs_if_absent`]); it and `<name>` are created as needed. `name` is one path
    /// component of `[A-Za-z0-9_-]` (bpffs refuses names with a dot; see [`group_name`]).
    ///
    /// Pinned maps are re-opened, so the current generation survives a daemon restart; a
    /// missing map pin is recovered from the pinned program, which names its maps. The program
    /// is loaded (verified) on every call: a pinned program with the same code (kernel tag) and
    /// the same maps is kept, otherwise the new one replaces the pin
    /// ([`Steering::program_replaced`]) and must then be attached ([`Steering::attach`]) to
    /// groups that already exist. Idempotent.
    ///
    /// On failure nothing that was pinned before the call is changed; maps created by the
    /// failing call may stay pinned (empty, harmless, reused by the next call). A verifier
    /// rejection is [`SteerError::Verifier`], with the verifier's log.
    pub fn load(base_dir: &Path, name: &str) -> Result<Self, SteerError> {
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
        if name.is_empty() || !name.chars().all(valid) {
            return Err(SteerError::InvalidName(name.to_owned()));
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
        let outer = open_map(&dir.join(OUTER_PIN), OUTER_SHAPE, &prog_maps, || {
            // The inner-map template: every generation's sockarray must have its shape.
            let template = create_sockarray("ipc_template")?;
            sys::map_create(sys::BPF_MAP_TYPE_ARRAY_OF_MAPS, 4, 4, SLOTS, Some(template.as_fd()), "ipc_outer")
        })?;
        let active = open_map(&dir.join(ACTIVE_PIN), ACTIVE_SHAPE, &prog_maps, || {
            sys::map_create(sys::BPF_MAP_TYPE_ARRAY, 4, 4, 1, None, "ipc_active")
        })?;
        let (outer_id, active_id) = (outer.1, active.1);
        let (outer, active) = (outer.0, active.0);

        let insns = program::steering_program(active.as_fd(), outer.as_fd());
        let prog = sys::prog_load(
            sys::BPF_PROG_TYPE_SK_REUSEPORT,
            sys::BPF_SK_REUSEPORT_SELECT_OR_MIGRATE,
            &insns,
            "Apache-2.0",
            "ipc_steer",
        )
        .map_err(|e| SteerError::Verifier { error: e.error, log: e.log })?;
        let info = sys::prog_info(prog.as_fd()).map_err(sys("read the program's info"))?;

        let prog_path = dir.join(PROG_PIN);
        let ours = |mut ids: Vec<u32>| {
            ids.sort_unstable();
            let mut want = vec![outer_id, active_id];
            want.sort_unstable();
            ids == want
        };
        let mut steering =
            Self { dir, prog, outer, active, prog_id: info.id, outer_id, active_id, replaced: true };
        if let Some(old) = pinned_prog {
            let old_info = sys::prog_info(old.as_fd()).map_err(sys("read the pinned program's info"))?;
            if old_info.prog_type == info.prog_type && old_info.tag == info.tag && ours(old_info.map_ids) {
                steering.prog = old;
                steering.prog_id = old_info.id;
                steering.replaced = false;
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

    /// Removes `<base_dir>/<name>/` and its pins (when an app is stopped or leaves socket mode).
    /// Idempotent. Groups that still exist keep their program and generations (the kernel
    /// holds them) until their last socket closes; a later [`Steering::load`] starts afresh.
    pub fn unpin(base_dir: &Path, name: &str) -> io::Result<()> {
        let dir = base_dir.join(name);
        for f in [PROG_PIN, OUTER_PIN, ACTIVE_PIN, PROG_NEW_PIN] {
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

    /// The program's kernel id (as `bpftool prog` shows it).
    pub fn program_id(&self) -> u32 {
        self.prog_id
    }

    /// The outer map's kernel id.
    pub fn outer_map_id(&self) -> u32 {
        self.outer_id
    }

    /// Whether [`Steering::load`] pinned a new program (none was pinned, or the pinned one had
    /// other code or other maps): groups that exist run the old one until [`Steering::attach`].
    pub fn program_replaced(&self) -> bool {
        self.replaced
    }

    /// Makes this program the selector of `socket`'s reuseport group (`SO_ATTACH_REUSEPORT_EBPF`
    /// on any one socket of the group; atomic for traffic). Idempotent. The group keeps the
    /// program until its last socket closes.
    pub fn attach(&self, socket: impl AsFd) -> Result<(), SteerError> {
        socket::attach_program(socket.as_fd(), self.prog.as_fd()).map_err(sys("SO_ATTACH_REUSEPORT_EBPF"))
    }

    /// [`bind_reuseport`], then [`Steering::attach`] on the new socket. Not idempotent: each
    /// call creates a socket.
    pub fn listen(&self, addr: SocketAddr, backlog: i32) -> Result<OwnedFd, SteerError> {
        socket::bind_listener(addr, backlog, Some(self.prog.as_fd()))
            .map_err(sys(format!("listen on {addr}")))
    }

    /// Puts `generation` in the outer map's inactive slot, ready for [`Steering::switch_to`],
    /// without changing where any connection goes. Slow: the kernel waits for an RCU grace
    /// period after every update of a map of maps (milliseconds), which is why the cutover
    /// itself is a separate step. Idempotent (a no-op when `generation` is in a slot already).
    /// Replaces the generation that was in the inactive slot, if any; on failure the slots are
    /// unchanged.
    pub fn stage(&self, generation: &SockArray) -> Result<(), SteerError> {
        self.stage_slot(generation).map(drop)
    }

    fn stage_slot(&self, generation: &SockArray) -> Result<u32, SteerError> {
        for slot in 0..SLOTS {
            if self.slot_id(slot)? == Some(generation.id) {
                return Ok(slot);
            }
        }
        let slot = if self.active_slot()? == 0 { 1 } else { 0 };
        let fd = generation.fd.as_raw_fd() as u32;
        sys::map_update(self.outer.as_fd(), slot, &fd, sys::BPF_ANY)
            .map_err(sys(format!("put the generation in outer slot {slot}")))?;
        Ok(slot)
    }

    /// Makes `generation` the current one: [`Steering::stage`] (when not staged yet), then the
    /// cutover, one 4-byte update of the `active` map: atomic for the program (a new connection
    /// is steered by one generation or the other, never a mix) and microseconds long. Every new
    /// connection after it returns is steered by `generation`; connections already queued on
    /// the previous generation's sockets stay there. Idempotent; switching back to the previous
    /// generation needs no staging while it is still in its slot. On failure the previous
    /// generation stays current.
    pub fn switch_to(&self, generation: &SockArray) -> Result<(), SteerError> {
        let slot = self.stage_slot(generation)?;
        if self.active_slot()? != slot {
            sys::map_update(self.active.as_fd(), 0, &slot, sys::BPF_ANY)
                .map_err(sys("switch the active slot"))?;
        }
        Ok(())
    }

    /// The current generation, re-opened from the kernel (after a daemon restart this is how
    /// the live generation's sockarray is adopted); `None` before the first switch or after
    /// [`Steering::clear`].
    pub fn current(&self) -> Result<Option<SockArray>, SteerError> {
        let slot = self.active_slot()?;
        if slot >= SLOTS {
            return Ok(None);
        }
        self.open_slot(slot)
    }

    /// The generation in the inactive slot (the previous one after a switch, or a staged one).
    pub fn standby(&self) -> Result<Option<SockArray>, SteerError> {
        match self.active_slot()? {
            CLEARED => Ok(None),
            slot => self.open_slot(1 - slot.min(1)),
        }
    }

    /// Stops steering: every new connection is refused (reset) until the next
    /// [`Steering::switch_to`]; both slots are emptied, releasing their generations' maps.
    /// Returns whether a generation was current. Idempotent.
    pub fn clear(&self) -> Result<bool, SteerError> {
        let was = self.current()?.is_some();
        sys::map_update(self.active.as_fd(), 0, &CLEARED, sys::BPF_ANY)
            .map_err(sys("clear the active slot"))?;
        for slot in 0..SLOTS {
            sys::map_delete(self.outer.as_fd(), slot).map_err(sys(format!("empty outer slot {slot}")))?;
        }
        Ok(was)
    }

    fn active_slot(&self) -> Result<u32, SteerError> {
        Ok(sys::map_lookup::<u32>(self.active.as_fd(), 0).map_err(sys("read the active slot"))?.unwrap_or(0))
    }

    fn slot_id(&self, slot: u32) -> Result<Option<u32>, SteerError> {
        sys::map_lookup::<u32>(self.outer.as_fd(), slot).map_err(sys(format!("read outer slot {slot}")))
    }

    fn open_slot(&self, slot: u32) -> Result<Option<SockArray>, SteerError> {
        // The slot may be refilled between the lookup and the open: look again then.
        for _ in 0..3 {
            let Some(id) = self.slot_id(slot)? else { return Ok(None) };
            match sys::map_get_fd_by_id(id) {
                Ok(fd) => return SockArray::from_fd(fd).map(Some),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => return Err(sys(format!("open map id {id}"))(e)),
            }
        }
        Err(SteerError::Sys {
            op: format!("open outer slot {slot}"),
            source: io::Error::other("it kept changing"),
        })
    }
}

/// A name for [`Steering::load`] from an app name and one of its `listen` addresses, e.g.
/// `chat-0_0_0_0-80` or `chat-__-443` for `[::]:443` (bpffs names may not contain dots).
pub fn group_name(app: &str, listen: SocketAddr) -> String {
    let ip = listen.ip().to_string().replace(['.', ':'], "_");
    format!("{app}-{ip}-{}", listen.port())
}

const OUTER_PIN: &str = "outer";
const ACTIVE_PIN: &str = "active";
const PROG_PIN: &str = "prog";
/// Where a replacement program is pinned before it is renamed over `prog` (no dot: bpffs
/// refuses names with dots, with EPERM).
const PROG_NEW_PIN: &str = "prog_new";

/// (map type, key size, value size, max entries) of a map this crate creates.
type Shape = (u32, u32, u32, u32);
const OUTER_SHAPE: Shape = (sys::BPF_MAP_TYPE_ARRAY_OF_MAPS, 4, 4, SLOTS);
const ACTIVE_SHAPE: Shape = (sys::BPF_MAP_TYPE_ARRAY, 4, 4, 1);

/// Checks that `base_dir` is (or will be created) on a bpffs, then creates it.
fn prepare_base(base_dir: &Path) -> Result<(), SteerError> {
    let mut existing = base_dir;
    while !existing.exists() {
        existing = existing.parent().ok_or_else(|| SteerError::NotBpffs(base_dir.to_owned()))?;
    }
    let on_bpffs = is_bpffs(existing).map_err(sys(format!("statfs {}", existing.display())))?;
    if !on_bpffs {
        return Err(SteerError::NotBpffs(base_dir.to_owned()));
    }
    fs::create_dir_all(base_dir).map_err(sys(format!("mkdir {}", base_dir.display())))
}

fn open_pinned(path: &Path) -> Result<Option<OwnedFd>, SteerError> {
    match sys::obj_get(path) {
        Ok(fd) => Ok(Some(fd)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(sys(format!("open pinned {}", path.display()))(e)),
    }
}

/// The map pinned at `path`; else the map of that shape among the pinned program's (re-pinned);
/// else a new one from `create` (pinned). Returns it with its id.
fn open_map(
    path: &Path,
    shape: Shape,
    prog_maps: &[u32],
    create: impl FnOnce() -> io::Result<OwnedFd>,
) -> Result<(OwnedFd, u32), SteerError> {
    if let Some(fd) = open_pinned(path)? {
        let id =
            check_shape(&fd, shape).map_err(|why| SteerError::Inconsistent { path: path.to_owned(), why })?;
        return Ok((fd, id));
    }
    let mut found = None;
    for &id in prog_maps {
        let fd = sys::map_get_fd_by_id(id).map_err(sys(format!("open map id {id}")))?;
        if check_shape(&fd, shape).is_ok() {
            found = Some(fd);
            break;
        }
    }
    let fd = match found {
        Some(fd) => fd,
        None => create().map_err(sys(format!("create the map for {}", path.display())))?,
    };
    let id =
        check_shape(&fd, shape).map_err(|why| SteerError::Inconsistent { path: path.to_owned(), why })?;
    sys::obj_pin(fd.as_fd(), path).map_err(sys(format!("pin {}", path.display())))?;
    Ok((fd, id))
}

/// The map's id when it has `shape`, else why not.
fn check_shape(fd: &OwnedFd, shape: Shape) -> Result<u32, String> {
    let info = sys::map_info(fd.as_fd()).map_err(|e| format!("map info: {e}"))?;
    if (info.map_type, info.key_size, info.value_size, info.max_entries) == shape {
        Ok(info.id)
    } else {
        Err(format!("not a map of the expected shape {shape:?}: {info:?}"))
    }
}
