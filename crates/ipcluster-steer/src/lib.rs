//! Socket mode's kernel part: an `sk_reuseport` eBPF program that sends each new TCP connection
//! of a reuseport group (one public address, one `SO_REUSEPORT` socket per band per generation)
//! to the socket of its client's band — in the live generation, in a band's override (a
//! canary), or, with session affinity, in the generation that holds the client's session —
//! loaded with `bpf(2)` directly (no ELF, no build tools).
//!
//! # The band rule
//! The client's *address word* ([`addr_word`]) is its IPv4 address as a number, or the last 32
//! bits of its IPv6 address (big-endian; a v4 client of a dual-stack socket, `::ffff:a.b.c.d`,
//! counts as `a.b.c.d`). Its band among `N` bands (a power of two ≤ [`MAX_BANDS`]) is
//! `word & (N-1)`: NAT mode's rule (`ipcluster_core::routing::band_of_ip`, the one definition
//! of bands, which this crate's tests check the program against), so a client lands on the same
//! band in both modes. A *client*, for sessions, is its whole address ([`session_key`]).
//!
//! # Kernel objects, per group (pinned under `<base_dir>/<name>/`; see [`Steering`])
//! - `prog`: the program (`BPF_PROG_TYPE_SK_REUSEPORT`, loaded with expected attach type
//!   `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE`), attached to the group with
//!   `SO_ATTACH_REUSEPORT_EBPF` ([`Steering::attach`]). It is called for every SYN reaching the
//!   group and for every connection that must leave a closing socket of the group.
//! - `slots`: a `BPF_MAP_TYPE_ARRAY_OF_MAPS` of [`SLOTS`] (8) entries, each one generation's
//!   [`SockArray`] (a `BPF_MAP_TYPE_REUSEPORT_SOCKARRAY` of [`MAX_BANDS`] entries, socket by
//!   band) or nothing: the live generation, a staged or canary one, up to six draining ones.
//! - `control`: one `u32`, the live slot (bits 0..7; 255 = none) and the live generation's band
//!   count as log2 (bits 8..11). One 4-byte update of it is the cutover, every band at once.
//! - `slot_info`: per slot a `u32`, the band count put with its table (log2, bits 0..3) and an
//!   *epoch* (bits 4..31) that changes each time a table is put in the slot or it is cleared.
//! - `overrides`: per band a `u32`, 0 or `s + 1`: new clients of the band go to slot `s`.
//! - `sessions`: a `BPF_MAP_TYPE_LRU_HASH`, client (16 bytes) → {slot, the slot's epoch then,
//!   last seen (ns, `bpf_ktime_get_ns`)}; `max_entries` chosen by [`Options`] (a pinned map
//!   of another size is replaced, with its most recent records).
//! - `config`: one `u64`, the session timeout in ns; 0 = session affinity off.
//!
//! # What the program selects
//! 242 instructions, listed in `src/program.rs`; [`model`] says the same in Rust, and the tests
//! hold the kernel to it.
//! 1. The client's address: for a new connection from its SYN's network header
//!    (`bpf_skb_load_bytes_relative`: the IPv4 source at offset 12, the IPv6 one at 8, by
//!    `ctx->eth_protocol`); for a migrating connection from `ctx->migrating_sk` (`dst_ip4`, or
//!    `dst_ip6` for an `AF_INET6` socket), because the kernel then often has no packet.
//! 2. A **probe** — an IPv4 source in `127.253.0.0/16` ([`probe_source`]) — goes to the socket
//!    of the slot (address bits 10..12) and band (bits 0..9) it names, exactly: refused when
//!    that socket is missing, no session looked up or recorded. The daemon's health checks use
//!    it to reach a starting generation's worker, which no ordinary client can reach.
//! 3. With a session timeout: a record whose epoch is its slot's and whose last-seen time is
//!    within the timeout sends the client to that slot's table, band `word & (its bands - 1)`,
//!    exactly; the record's last-seen time is refreshed in place. If that socket is missing (the
//!    worker died), or the record is stale, the client goes on as a new client.
//! 4. A new client: band `word & (live bands - 1)`; the slot is the band's override if it has
//!    one and that slot holds a table, else the live slot; in that table
//!    `bpf_sk_select_reuseport` with keys `word & mask`, `& mask/2`, …, `& 0`, then the lowest
//!    filled key ([`select_in`]): a band whose socket is missing falls to a neighbour, band `b`
//!    to `b & (N/2-1)`, else `b & (N/4-1)`, …, else band 0, else the lowest filled band. With a
//!    timeout the client is recorded `{slot, its epoch, now}` (`bpf_map_update_elem`,
//!    `BPF_ANY`), replacing a stale record.
//! 5. Nothing selectable → `SK_DROP`, which the kernel turns into a reset (the client sees
//!    "connection refused"). The program never returns `SK_PASS` without a selection: the
//!    kernel would then pick a socket of the group by hash — maybe a retired generation's, or a
//!    stranger's (any socket bound by the same uid with `SO_REUSEPORT` joins the group).
//!
//! # Deploys: put, then go live
//! The kernel waits for an RCU grace period after every update of a map of maps, so that when
//! the syscall returns no program still uses the old inner map: 5–20 ms measured here, far
//! above the 1 ms cutover budget. So a switch has two steps: [`Steering::put`] puts the new
//! generation's table in a free slot (slow, no effect on traffic; do it while the new workers
//! boot); [`Steering::set_live`] then writes the control word, a 4-byte array update (~5 µs at
//! 256 bands here), atomic for the program: each new connection sees one generation or the
//! other. Going back to a generation still in its slot is one update too. Established
//! connections are not affected; connections queued on an old generation's socket stay there
//! for its worker to accept. A canary: put its table (only its bands filled) in a slot, then
//! [`Steering::set_override`] for each of its bands; promoted: `set_live`, then
//! [`Steering::clear_overrides`]; rolled back: `clear_overrides`, then
//! [`Steering::clear_slot`].
//!
//! # Sessions
//! [`Steering::set_session_timeout`] turns session affinity on (or off with zero). A retired
//! generation stays in its slot while it holds sessions ([`Steering::session_counts`]: records
//! per slot that still count); its clients keep reaching their band's worker in it. Putting a
//! new table in a slot or clearing it changes its epoch: its records stop counting at once, no
//! scan needed, and their clients go to the live generation. When the sessions map is full the
//! kernel evicts the records used least recently.
//!
//! # Retiring and crashing workers: migration
//! When a listening socket closes (its last descriptor), the kernel removes it from its
//! sockarray slot and, for a group whose program was loaded with
//! `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE`, calls the program for each connection in its accept
//! queue and each handshake in progress (`migrating_sk` set); the program picks as for a new
//! connection (steps 1–4: the client's session is on the closed socket's generation, whose
//! socket is gone, so it goes to the live one and its record moves there), so nothing queued
//! is refused. With such a program this happens even with `net.ipv4.tcp_migrate_req = 0`
//! (verified); [`enable_migration`] sets it anyway, as the issue pins, which also covers a
//! group without a program.
//!
//! The daemon must keep in mind that a slot empties by itself only when the socket's *last*
//! descriptor closes. If the daemon keeps duplicates of the workers' sockets, a crashed
//! worker's socket stays open and in its slot, and new connections keep queueing on it: on the
//! worker's exit call [`SockArray::remove`] (its band falls back to the neighbour at once), then
//! either hand the same socket to the replacement worker (the queued connections wait for it)
//! and [`SockArray::insert`] it again when it is ready, or close the daemon's copy (the queue
//! migrates to the neighbour).
//!
//! # Restarts: adoption, and the upgrade from the first version
//! The pins keep the program and maps alive without any process. A restarted daemon calls
//! [`Steering::open`] with the same base directory and name: it re-opens the maps (sessions
//! included), keeps the pinned program when it has the same code, and [`Steering::live`],
//! [`Steering::slots`] and [`Steering::slot_table`] give back each generation's table (map id →
//! `BPF_MAP_GET_FD_BY_ID`). [`SockArray::entries`] gives each filled band's socket cookie,
//! which [`socket_cookie`] of the workers' sockets (taken back with `pidfd_getfd`) matches. A
//! group pinned by the first version (two slots, `outer` and `active`) is upgraded: its tables
//! go to slots 0 and 1 with 1,024 bands (that version's selection, exactly) and the one in
//! force is made live; its program keeps steering until [`Steering::attach`] replaces it, which
//! then removes the old pins ([`Steering::upgrade_pending`]). The first version's calls
//! ([`Steering::stage`], [`Steering::switch_to`], [`Steering::current`],
//! [`Steering::standby`], [`Steering::clear`]) still work, over slots 0 and 1.
//!
//! # What the integrator must know
//! - Privileges: loading needs `CAP_BPF` and `CAP_NET_ADMIN` (root has them); mounting bpffs
//!   needs `CAP_SYS_ADMIN`. Since Linux 5.11 BPF memory is charged to the memory cgroup, not
//!   `RLIMIT_MEMLOCK`: a sockarray is about 8 KiB, a group's sessions map about 96 bytes a
//!   record, allocated whole at creation (6.0 MiB for the default 65,536).
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
//! - Until a slot is live every connection without an override is refused. Make a generation
//!   live as soon as its sockets are in its table, even before its workers are ready, when
//!   connections should queue rather than be refused.
//! - A socket sits in at most one slot of all sockarrays ([`SteerError::SocketBusy`]). A
//!   dropped [`SockArray`] that nothing references is freed asynchronously (microseconds to
//!   milliseconds here); remove a socket explicitly before inserting it elsewhere.
//! - Probes ([`probe_source`]) need IPv4: a group on a specific IPv6 address has none.
//! - One [`Steering`] per group; changes of one group must not run concurrently.
//! - Cleanup: [`Steering::unpin`] when an app is stopped; groups still open keep working
//!   until their last socket closes, then the kernel frees everything.
//!
//! # Costs measured here (kernel 6.18, 2 shared cores, `tests/cost.rs`, `tests/slots.rs`)
//! Loading and verifying the program: 11 ms on a quiet machine, 15–25 ms under load (the
//! verifier walks the fallback loops out: about 34,000 instructions processed, limit
//! 1,000,000; the first version: 11,500 and 8 ms). [`Steering::open`] verifies it every time
//! (10–13 ms). Cutover at 256 bands ([`Steering::switch_to`] of a generation in a slot, which
//! reads the slots first, then the one update): 1.8 µs median, 5 µs p99. [`Steering::put`] of
//! another table: 5–20 ms.
//!
//! The program's own time per connection (`run_time_ns / run_cnt` over 2,000 connections each,
//! two runs on a quiet machine; the first version: 65 ns at 8 bands). It grows with the band
//! count even on the one-lookup paths: each connection touches a socket that is cold in the
//! cache when there are many. Under heavy load (other builds on both cores) add up to a third.
//!
//! | path | 8 bands | 64 bands | 1,024 bands |
//! |---|---|---|---|
//! | sessions off | 52–54 ns | 73–90 ns | 151–181 ns |
//! | sessions on, a new client (recorded) | 212–266 ns | 313–318 ns | 474–494 ns |
//! | sessions on, a returning client (refreshed) | 143–158 ns | 205–226 ns | 402–418 ns |
//! | a probe | 52–57 ns | 73–76 ns | 151–167 ns |
//!
//! [`Steering::session_counts`] of 65,536 records: 8 ms with `BPF_MAP_LOOKUP_BATCH` on a quiet
//! machine (16 calls, 2 MiB copied; up to 70 ms under load), 50–330 ms key by key (kernels
//! before 5.6).

mod insn;
pub mod model;
mod program;
mod socket;
mod steering;
mod sys;
mod v1;

use std::{
    fmt, io,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::PathBuf,
    time::Duration,
};

/// Loads `insns` as an `sk_reuseport` program that may select or migrate (`ipc_steer`); a
/// verifier rejection is [`SteerError::Verifier`], with the verifier's log.
fn load_steering(insns: &[insn::Insn]) -> Result<std::os::fd::OwnedFd, SteerError> {
    sys::prog_load(
        sys::BPF_PROG_TYPE_SK_REUSEPORT,
        sys::BPF_SK_REUSEPORT_SELECT_OR_MIGRATE,
        insns,
        "Apache-2.0",
        "ipc_steer",
    )
    .map_err(|e| SteerError::Verifier { error: e.error, log: e.log })
}

pub use program::{select, select_in};
pub use socket::{
    DEFAULT_BACKLOG, bind_reuseport, enable_migration, is_bpffs, migration_enabled, mount_bpffs_if_absent,
    socket_cookie,
};
pub use steering::{
    Attachment, DEFAULT_SESSIONS, MAX_SESSIONS, Options, ProgramStats, Session, SlotState, Steering,
    enable_run_time_stats, group_name, monotonic_now, probe_source,
};
#[doc(hidden)]
pub use v1::Legacy;

/// The most bands a generation can have, and the size of every generation's sockarray.
pub const MAX_BANDS: u32 = 1024;

/// The slots of a group: the live generation, a staged or canary one, and up to six draining
/// ones.
pub const SLOTS: u32 = 8;

/// Where the daemon pins its objects in production; [`Steering::open`] takes the base directory
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

/// A client's key in the sessions map: its 16-byte address, an IPv4 one as `::ffff:a.b.c.d`
/// (so an IPv4 client of a dual-stack socket is the same client as over an IPv4 socket).
pub fn session_key(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
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
    /// A band count that is not a power of two in `1..=MAX_BANDS`.
    #[error("{0} bands: want a power of two from 1 to {MAX_BANDS}")]
    InvalidBands(u32),
    /// A slot at or beyond [`SLOTS`].
    #[error("slot {0} is out of range (a group has {SLOTS} slots)")]
    SlotOutOfRange(u32),
    /// `set_live` of a slot that holds no table.
    #[error("slot {0} holds no table: put one there before making it live")]
    EmptySlot(u32),
    /// `set_live` with a band count other than the one the slot's table was put with.
    #[error("slot {slot}'s table was put with {has} bands, not {asked}: put it again with {asked} first")]
    BandsMismatch { slot: u32, has: u32, asked: u32 },
    /// `clear_slot` of the live slot.
    #[error("slot {0} is live: make another slot live (or clear the live slot) before emptying it")]
    SlotLive(u32),
    /// A sessions map size outside `1..=MAX_SESSIONS`.
    #[error("a sessions map of {0} records: want 1 to {MAX_SESSIONS}")]
    InvalidSessions(u32),
    /// A session timeout that does not fit in 64 bits of nanoseconds.
    #[error("a session timeout of {0:?} does not fit the program's 64-bit nanoseconds")]
    InvalidTimeout(Duration),
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
    /// An empty sockarray. Dropping the value frees the map unless a slot ([`Steering::put`],
    /// [`Steering::stage`]) or another descriptor still holds it;
    /// the kernel frees it asynchronously, which clears its sockets' slots.
    pub fn new() -> Result<Self, SteerError> {
        let fd = create_sockarray("ipc_gen").map_err(sys("create the generation's sockarray"))?;
        Self::from_fd(fd)
    }

    pub(crate) fn from_fd(fd: OwnedFd) -> Result<Self, SteerError> {
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

pub(crate) fn check_band(band: u32) -> Result<(), SteerError> {
    if band < MAX_BANDS { Ok(()) } else { Err(SteerError::BandOutOfRange(band)) }
}

pub(crate) fn create_sockarray(name: &str) -> io::Result<OwnedFd> {
    sys::map_create(sys::BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, MAX_BANDS, None, name)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn the_address_word_is_the_low_32_bits_the_bands_come_from() {
        let v6: Ipv6Addr = "fd00::1:2:0304:0507".parse().unwrap();
        assert_eq!(addr_word(v6.into()), 0x0304_0507);
        let v4 = Ipv4Addr::new(10, 1, 2, 3);
        assert_eq!(addr_word(v4.into()), u32::from(v4));
        assert_eq!(
            addr_word(v4.to_ipv6_mapped().into()),
            u32::from(v4),
            "a v4 client of a dual-stack socket"
        );
        for bands in [1u32, 4, 256, 1024] {
            assert_eq!(addr_word(v6.into()) & (bands - 1), ipcluster_core::routing::band_of_v6(v6, bands));
        }
    }
}
