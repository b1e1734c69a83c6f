//! Socket mode's kernel part: an `sk_reuseport` eBPF program that sends each new TCP connection
//! of a reuseport group (one public address, one `SO_REUSEPORT` socket per band per generation)
//! to the socket of its client's band, loaded with `bpf(2)` directly (no ELF, no build tools).
//!
//! # The band rule
//! The client's *address word* ([`addr_word`]) is its IPv4 address as a number, or the last 32
//! bits of its IPv6 address (big-endian; a v4 client of a dual-stack socket, `::ffff:a.b.c.d`,
//! counts as `a.b.c.d`). Its band among `N` bands (a power of two ≤ [`MAX_BANDS`]) is
//! `word & (N-1)`: [`band_of_v4`] is NAT mode's rule, so a client lands on the same band in both
//! modes.
//!
//! # Kernel objects, per group (pinned under `<base_dir>/<name>/`)
//! - `prog`: the program (`BPF_PROG_TYPE_SK_REUSEPORT`, loaded with expected attach type
//!   `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE`), attached to the group with
//!   `SO_ATTACH_REUSEPORT_EBPF` ([`Steering::attach`]). It is called for every SYN reaching the
//!   group and for every connection that must leave a closing socket of the group.
//! - `outer`: a `BPF_MAP_TYPE_ARRAY_OF_MAPS` with two slots; each holds one generation's
//!   [`SockArray`] (a `BPF_MAP_TYPE_REUSEPORT_SOCKARRAY` of [`MAX_BANDS`] entries, socket by
//!   band) or nothing.
//! - `active`: a one-entry `BPF_MAP_TYPE_ARRAY` holding the slot the program uses (0 or 1; 2 =
//!   none).
//!
//! # What the program selects (66 instructions, 68 slots; listing in `src/program.rs`)
//! 1. The generation: `outer[active[0]]`; none → `SK_DROP`.
//! 2. The address word: for a new connection from its SYN's network header
//!    (`bpf_skb_load_bytes_relative`, offset 12 for IPv4, 20 for the last word of an IPv6
//!    source, by `ctx->eth_protocol`); for a migrating connection from `ctx->migrating_sk`
//!    (`dst_ip4`, or `dst_ip6[3]` for an `AF_INET6` socket), because the kernel then often has
//!    no packet (it passes an empty one).
//! 3. `bpf_sk_select_reuseport(ctx, generation, &key, 0)` with `key = word & 1023`, `& 511`,
//!    …, `& 1`, `& 0`, stopping at the first that succeeds. A generation of `N` bands fills
//!    entries `0..N`, so the first success is exactly `word & (N-1)`: the band count is not
//!    stored anywhere and generations with different `N` switch with one update.
//! 4. A band whose entry is empty (its worker crashed, or its socket closed) falls through to
//!    the next smaller mask: band `b` goes to `b & (N/2-1)`, else `b & (N/4-1)`, …, else band
//!    0; when band 0 is empty too, the lowest filled band. Deterministic: all clients of a
//!    missing band share one neighbour until the band's entry is filled again. [`select`] is
//!    this in Rust, and the tests hold the kernel to it.
//! 5. Nothing selectable → `SK_DROP`, which the kernel turns into a reset (the client sees
//!    "connection refused") for a SYN and into a reset for a migrating connection. The
//!    program never returns `SK_PASS` without a selection: the kernel would then pick a socket
//!    of the group by hash — maybe a retired generation's, or a stranger's (any socket bound by
//!    the same uid with `SO_REUSEPORT` joins the group).
//!
//! # Deploys: stage, then cut over
//! The kernel waits for an RCU grace period after every update of a map of maps, so that when
//! the syscall returns no program still uses the old inner map: 5–20 ms measured here, far
//! above the 1 ms cutover budget. So a switch has two steps. [`Steering::stage`] puts the new
//! generation in the inactive slot (slow, no effect on traffic; do it while the new workers
//! boot); [`Steering::switch_to`] then flips `active`, a 4-byte array update (~5 µs at 256
//! bands here), atomic for the program: each new connection sees one generation or the other.
//! Switching back to the previous generation is a flip too while it still sits in its slot.
//! Established connections are not affected; connections queued on an old generation's socket
//! stay there for its worker to accept.
//!
//! # Retiring and crashing workers: migration
//! When a listening socket closes (its last descriptor), the kernel removes it from its
//! sockarray slot and, for a group whose program was loaded with
//! `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE`, calls the program for each connection in its accept
//! queue and each handshake in progress (`migrating_sk` set); the program picks the current
//! generation's socket of the connection's band (steps 2–4), so nothing queued is refused. With
//! such a program this happens even with `net.ipv4.tcp_migrate_req = 0` (verified);
//! [`enable_migration`] sets it anyway, as the issue pins, which also covers a group without a
//! program.
//!
//! The daemon must keep in mind that a slot empties by itself only when the socket's *last*
//! descriptor closes. If the daemon keeps duplicates of the workers' sockets, a crashed
//! worker's socket stays open and in its slot, and new connections keep queueing on it: on the
//! worker's exit call [`SockArray::remove`] (its band falls back to the neighbour at once), then
//! either hand the same socket to the replacement worker (the queued connections wait for it)
//! and [`SockArray::insert`] it again when it is ready, or close the daemon's copy (the queue
//! migrates to the neighbour).
//!
//! # Restarts: adoption
//! The pins keep the program and maps alive without any process. A restarted daemon calls
//! [`Steering::load`] with the same base directory and name: it re-opens the maps, keeps the
//! pinned program when it has the same code, and [`Steering::current`] / [`Steering::standby`]
//! re-open the generations through the outer map's entries (map id →
//! `BPF_MAP_GET_FD_BY_ID`). [`SockArray::entries`] gives each filled band's socket cookie,
//! which [`socket_cookie`] of the workers' sockets (taken back with `pidfd_getfd`) matches.
//!
//! # What the integrator must know
//! - Privileges: loading needs `CAP_BPF` and `CAP_NET_ADMIN` (root has them); mounting bpffs
//!   needs `CAP_SYS_ADMIN`. Since Linux 5.11 BPF memory is charged to the memory cgroup, not
//!   `RLIMIT_MEMLOCK` (a sockarray is about 8 KiB).
//! - bpffs: `/sys/fs/bpf` is not always mounted (it is not on this machine):
//!   [`mount_bpffs_if_absent`] it, then use [`DEFAULT_BASE_DIR`]. Names may not contain `.`
//!   (bpffs answers `EPERM`): use [`group_name`].
//! - One reuseport group = one exact bind address and port, family, `IPV6_V6ONLY` setting and
//!   effective uid: every socket of a group must be bound by the same euid (the daemon's), or
//!   `bind` fails with `EADDRINUSE`. Workers running as other users can use the sockets they
//!   are given but cannot join the group themselves.
//! - [`bind_reuseport`] returns a blocking, close-on-exec descriptor, as systemd hands out:
//!   `O_NONBLOCK` lives in the open file description shared by every holder, and each worker
//!   runtime sets it as it needs. `dup2` onto fd 3… for the worker clears close-on-exec.
//! - A program cannot be attached between `bind` and `listen` of a socket joining an existing
//!   group (the socket would get a group of its own and `listen` fails with `EADDRINUSE`), so
//!   [`Steering::listen`] attaches after `listen`: the first socket of a brand-new group is
//!   reachable by hash for the microseconds until then (it is the only socket of the group).
//! - Until the first [`Steering::switch_to`] every connection is refused. Switch to a
//!   generation as soon as its sockets are in its sockarray, even before its workers are
//!   ready, when connections should queue rather than be refused.
//! - A socket sits in at most one slot of all sockarrays ([`SteerError::SocketBusy`]). A
//!   dropped [`SockArray`] that nothing references is freed asynchronously (microseconds to
//!   milliseconds here); remove a socket explicitly before inserting it elsewhere.
//! - One [`Steering`] per group; switches of one group must not run concurrently.
//! - Cleanup: [`Steering::unpin`] when an app is stopped; groups still open keep working
//!   until their last socket closes, then the kernel frees everything.
//!
//! # Costs measured here (kernel 6.18, 2 shared cores)
//! Loading and verifying the program: about 8 ms (the verifier walks the fallback loop out:
//! ~11,500 instructions processed, limit 1,000,000). [`Steering::load`], which verifies it
//! every time: 10–35 ms. Cutover at 256 bands: ~5 µs median. Staging: 5–20 ms.

mod insn;
mod program;
mod socket;
mod sys;

use std::{
    fmt, fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

pub use program::select;
pub use socket::{
    DEFAULT_BACKLOG, bind_reuseport, enable_migration, is_bpffs, migration_enabled, mount_bpffs_if_absent,
    socket_cookie,
};

/// The most bands a generation can have, and the size of every generation's sockarray.
pub const MAX_BANDS: u32 = 1024;

/// Where the daemon pins its objects in production; [`Steering::load`] takes the base directory
/// as a parameter so tests can use a private bpffs.
pub const DEFAULT_BASE_DIR: &str = "/sys/fs/bpf/ipcluster";

/// The 32 bits of a client address that decide its band: an IPv4 address as a number, the last
/// 32 bits of an IPv6 address (big-endian), so `::ffff:a.b.c.d` counts as `a.b.c.d`.
pub fn addr_word(addr: IpAddr) -> u32 {
    match addr {
        IpAddr::V4(a) => u32::from(a),
        IpAddr::V6(a) => {
            let o = a.octets();
            u32::from_be_bytes([o[12], o[13], o[14], o[15]])
        }
    }
}

/// The band of an IPv4 client among `bands` (a power of two): `s & (bands - 1)`, as NAT mode.
pub fn band_of_v4(addr: Ipv4Addr, bands: u32) -> u32 {
    debug_assert!(bands.is_power_of_two() && bands <= MAX_BANDS);
    addr_word(addr.into()) & (bands - 1)
}

/// The band of an IPv6 client among `bands` (a power of two): the low bits of its last 32 bits.
pub fn band_of_v6(addr: Ipv6Addr, bands: u32) -> u32 {
    debug_assert!(bands.is_power_of_two() && bands <= MAX_BANDS);
    addr_word(addr.into()) & (bands - 1)
}

/// [`band_of_v4`] or [`band_of_v6`].
pub fn band_of(addr: IpAddr, bands: u32) -> u32 {
    match addr {
        IpAddr::V4(a) => band_of_v4(a, bands),
        IpAddr::V6(a) => band_of_v6(a, bands),
    }
}

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    /// A system call failed.
    #[error("{op}: {source}")]
    Sys {
        op: String,
        #[source]
        source: io::Error,
    },
    /// The kernel refused the program; `log` is the verifier's explanation (empty when the
    /// refusal came before verification, e.g. `EPERM`).
    #[error("the kernel rejected the steering program ({error}); verifier log:\n{log}")]
    Verifier { error: io::Error, log: String },
    /// The base directory is not on a bpf filesystem.
    #[error("{0} is not on a bpf filesystem (mount one first, e.g. with mount_bpffs_if_absent)")]
    NotBpffs(PathBuf),
    /// A group name that is not a non-empty `[A-Za-z0-9_-]+` (bpffs refuses names with dots).
    #[error("invalid steering name {0:?}: want [A-Za-z0-9_-]+ (bpffs refuses dots; see group_name)")]
    InvalidName(String),
    /// A band at or beyond [`MAX_BANDS`].
    #[error("band {0} is out of range (at most {MAX_BANDS} bands)")]
    BandOutOfRange(u32),
    /// The socket already sits in a sockarray slot (this one at another band, or another
    /// generation's): the kernel keeps one slot per socket.
    #[error("band {band}: the socket is already in a sockarray slot (a socket can be in one slot at most)")]
    SocketBusy { band: u32 },
    /// Pinned objects that are not what this crate pins.
    #[error("{path}: {why}")]
    Inconsistent { path: PathBuf, why: String },
}

fn sys(op: impl Into<String>) -> impl FnOnce(io::Error) -> SteerError {
    let op = op.into();
    move |source| SteerError::Sys { op, source }
}

/// One generation's sockets by band: a `BPF_MAP_TYPE_REUSEPORT_SOCKARRAY` with [`MAX_BANDS`]
/// entries, `u32` keys and `u64` values (a socket fd going in, its cookie coming out).
pub struct SockArray {
    fd: OwnedFd,
    id: u32,
}

impl fmt::Debug for SockArray {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SockArray").field("id", &self.id).field("fd", &self.fd.as_raw_fd()).finish()
    }
}

impl SockArray {
    /// An empty sockarray. Dropping the value frees the map unless an outer-map slot
    /// ([`Steering::stage`], [`Steering::switch_to`]) or another descriptor still holds it;
    /// the kernel frees it asynchronously, which clears its sockets' slots.
    pub fn new() -> Result<Self, SteerError> {
        let fd = create_sockarray("ipc_gen").map_err(sys("create the generation's sockarray"))?;
        Self::from_fd(fd)
    }

    fn from_fd(fd: OwnedFd) -> Result<Self, SteerError> {
        let info = sys::map_info(fd.as_fd()).map_err(sys("read the sockarray's info"))?;
        Ok(Self { fd, id: info.id })
    }

    /// The kernel's id of the map (as `bpftool map` shows it).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Puts `socket` (a listening TCP socket bound with `SO_REUSEPORT`) in slot `band`,
    /// replacing the slot's previous socket. Idempotent: inserting the socket that is already
    /// in that slot succeeds. Fails with [`SteerError::SocketBusy`] when the socket is in
    /// another slot (remove it there first); on failure the slot is unchanged.
    pub fn insert(&self, band: u32, socket: impl AsFd) -> Result<(), SteerError> {
        check_band(band)?;
        let socket = socket.as_fd();
        let value = socket.as_raw_fd() as u64;
        match sys::map_update(self.fd.as_fd(), band, &value, sys::BPF_ANY) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                let cookie = socket_cookie(socket).map_err(sys("SO_COOKIE"))?;
                if self.cookie(band)? == Some(cookie) { Ok(()) } else { Err(SteerError::SocketBusy { band }) }
            }
            Err(e) => Err(sys(format!("put a socket in band {band}'s slot"))(e)),
        }
    }

    /// Empties slot `band`; returns whether it held a socket. Idempotent. The socket itself is
    /// untouched (it stays in the reuseport group and keeps its queue).
    pub fn remove(&self, band: u32) -> Result<bool, SteerError> {
        check_band(band)?;
        sys::map_delete(self.fd.as_fd(), band).map_err(sys(format!("empty band {band}'s slot")))
    }

    /// The cookie ([`socket_cookie`]) of the socket in slot `band`, if any.
    pub fn cookie(&self, band: u32) -> Result<Option<u64>, SteerError> {
        check_band(band)?;
        sys::map_lookup::<u64>(self.fd.as_fd(), band).map_err(sys(format!("read band {band}'s slot")))
    }

    /// Every filled slot as `(band, cookie)`, in band order ([`MAX_BANDS`] lookups).
    pub fn entries(&self) -> Result<Vec<(u32, u64)>, SteerError> {
        let mut out = Vec::new();
        for band in 0..MAX_BANDS {
            if let Some(c) = self.cookie(band)? {
                out.push((band, c));
            }
        }
        Ok(out)
    }
}

impl AsFd for SockArray {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn check_band(band: u32) -> Result<(), SteerError> {
    if band < MAX_BANDS { Ok(()) } else { Err(SteerError::BandOutOfRange(band)) }
}

fn create_sockarray(name: &str) -> io::Result<OwnedFd> {
    sys::map_create(sys::BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, MAX_BANDS, None, name)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_match_the_nat_rule() {
        for bands in [1u32, 2, 4, 8, 64, 256, 1024] {
            for last in 0..=255u8 {
                for a in [Ipv4Addr::new(127, 0, 0, last), Ipv4Addr::new(10, 1, last, 255 - last)] {
                    assert_eq!(band_of_v4(a, bands), ipcluster_core::routing::band_of(a, bands));
                    // A v4 client of a dual-stack socket shows as ::ffff:a.b.c.d: same band.
                    assert_eq!(band_of_v6(a.to_ipv6_mapped(), bands), band_of_v4(a, bands));
                }
            }
        }
        let v6: Ipv6Addr = "fd00::1:2:0304:0507".parse().unwrap();
        assert_eq!(addr_word(v6.into()), 0x0304_0507);
        assert_eq!(band_of_v6(v6, 256), 7);
        assert_eq!(band_of_v6(v6, 1024), 0x107);
        assert_eq!(band_of(IpAddr::V6(v6), 1), 0);
    }
}
