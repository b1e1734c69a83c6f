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
mod steering;
mod sys;

use std::{
    fmt, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::PathBuf,
};

pub use program::select;
pub use socket::{
    DEFAULT_BACKLOG, bind_reuseport, enable_migration, is_bpffs, migration_enabled, mount_bpffs_if_absent,
    socket_cookie,
};
pub use steering::{Steering, group_name};

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
