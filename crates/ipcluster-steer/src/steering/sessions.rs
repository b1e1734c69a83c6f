//! Sessions: the timeout, the records, their counts, and resizing the map.

use std::{
    fs, io,
    net::{IpAddr, Ipv6Addr},
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::Path,
    time::Duration,
};

use super::{
    Steering,
    pins::{SESSIONS_MAP, SESSIONS_NEW_PIN, check_shape},
};
use crate::{SLOTS, SteerError, session_key, sys};

/// A client's session record ([`Steering::session`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    /// The slot the client was sent to.
    pub slot: u32,
    /// That slot's epoch then: the record counts only while the slot's epoch is the same.
    pub epoch: u32,
    /// When the client last opened a connection, on `CLOCK_MONOTONIC` ([`monotonic_now`]),
    /// the clock of the program's `bpf_ktime_get_ns`.
    pub last_seen: Duration,
}

/// The sessions map's value, as the program reads and writes it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Record {
    slot: u32,
    epoch: u32,
    last_seen_ns: u64,
}

impl Steering {
    /// Turns session affinity on with this idle timeout (whole nanoseconds), or off with zero:
    /// one 8-byte update, atomic for the program. Off, the program neither looks up nor records
    /// a session (the records stay, and count again if it is turned back on within their
    /// timeout). Idempotent.
    pub fn set_session_timeout(&self, timeout: Duration) -> Result<(), SteerError> {
        let ns = u64::try_from(timeout.as_nanos()).map_err(|_| SteerError::InvalidTimeout(timeout))?;
        sys::map_update(self.maps.config.0.as_fd(), 0, &ns, sys::BPF_ANY)
            .map_err(sys("write the session timeout"))
    }

    /// The session timeout; zero when session affinity is off.
    pub fn session_timeout(&self) -> Result<Duration, SteerError> {
        let ns = sys::map_lookup::<u64>(self.maps.config.0.as_fd(), 0)
            .map_err(sys("read the session timeout"))?
            .unwrap_or(0);
        Ok(Duration::from_nanos(ns))
    }

    /// `client`'s session record, valid or not (a v4-mapped IPv6 address is its IPv4 client).
    pub fn session(&self, client: IpAddr) -> Result<Option<Session>, SteerError> {
        let rec = sys::map_lookup_key::<[u8; 16], Record>(self.maps.sessions.0.as_fd(), &session_key(client))
            .map_err(sys("read a session"))?;
        Ok(rec.map(Session::from))
    }

    /// Removes `client`'s session record; returns whether it had one. Its next connection goes
    /// where a new client's would.
    pub fn forget_session(&self, client: IpAddr) -> Result<bool, SteerError> {
        sys::map_delete_key(self.maps.sessions.0.as_fd(), &session_key(client))
            .map_err(sys("remove a session"))
    }

    /// Writes `client`'s record as the program would (for tests and benchmarks: filling the
    /// map without that many connections).
    #[doc(hidden)]
    pub fn insert_session(&self, client: IpAddr, session: Session) -> Result<(), SteerError> {
        let rec = Record {
            slot: session.slot,
            epoch: session.epoch,
            last_seen_ns: session.last_seen.as_nanos() as u64,
        };
        sys::map_update_key(self.maps.sessions.0.as_fd(), &session_key(client), &rec, sys::BPF_ANY)
            .map_err(sys("write a session"))
    }

    /// Every session record, valid or not, by client (IPv4 clients as IPv4). Not a snapshot:
    /// records the program writes meanwhile may be seen in either state or not at all.
    pub fn sessions(&self) -> Result<Vec<(IpAddr, Session)>, SteerError> {
        Ok(self.records()?.into_iter().map(|(k, r)| (client_of(k), Session::from(r))).collect())
    }

    /// Per slot, the records that still count: their slot holds a table of their epoch and
    /// they were seen within the session timeout (none when sessions are off). Exact when no
    /// connection arrives meanwhile.
    ///
    /// Reads the whole sessions map with `BPF_MAP_LOOKUP_BATCH` (4,096 records a call) where
    /// the kernel has it for LRU hash maps (Linux 5.6), else one `GET_NEXT_KEY` and one lookup
    /// per record. 65,536 records: 16 calls, 2 MiB copied, 8 ms here on a quiet machine (see
    /// the crate docs); reading them does not refresh them.
    pub fn session_counts(&self) -> Result<[u32; SLOTS as usize], SteerError> {
        self.count(self.records()?)
    }

    fn count(&self, records: Vec<([u8; 16], Record)>) -> Result<[u32; SLOTS as usize], SteerError> {
        let mut out = [0; SLOTS as usize];
        let timeout = self.session_timeout()?.as_nanos() as u64;
        if timeout == 0 {
            return Ok(out);
        }
        let slots = self.slots()?;
        let now = monotonic_now().as_nanos() as u64;
        for (_, rec) in records {
            if let Some(s) = slots.get(rec.slot as usize)
                && s.table.is_some()
                && s.epoch == rec.epoch
                && now.wrapping_sub(rec.last_seen_ns) <= timeout
            {
                out[rec.slot as usize] += 1;
            }
        }
        Ok(out)
    }

    fn records(&self) -> Result<Vec<([u8; 16], Record)>, SteerError> {
        let fd = self.maps.sessions.0.as_fd();
        match sys::map_lookup_batch::<[u8; 16], Record>(fd, SESSION_BATCH) {
            Ok(r) => Ok(r),
            Err(e) if no_batch(&e) => self.records_by_key(),
            Err(e) => Err(sys("read the sessions")(e)),
        }
    }

    /// [`Steering::session_counts`] without `BPF_MAP_LOOKUP_BATCH`, as on a kernel that lacks
    /// it (for the tests).
    #[doc(hidden)]
    pub fn session_counts_by_key(&self) -> Result<[u32; SLOTS as usize], SteerError> {
        self.count(self.records_by_key()?)
    }

    fn records_by_key(&self) -> Result<Vec<([u8; 16], Record)>, SteerError> {
        sys::map_entries_by_key(self.maps.sessions.0.as_fd(), self.sessions_max)
            .map_err(sys("read the sessions"))
    }
}

/// A new sessions map of `size` records, holding the records of `old` (the most recently seen
/// ones when they do not all fit), pinned over `old`'s pin. Returns it with its id.
pub(super) fn resize_sessions(
    dir: &Path,
    old: BorrowedFd<'_>,
    old_size: u32,
    size: u32,
) -> Result<(OwnedFd, u32), SteerError> {
    let mut records: Vec<([u8; 16], Record)> = match sys::map_lookup_batch(old, SESSION_BATCH) {
        Ok(r) => r,
        Err(e) if no_batch(&e) => sys::map_entries_by_key(old, old_size).map_err(sys("read the sessions"))?,
        Err(e) => return Err(sys("read the sessions")(e)),
    };
    records.sort_by_key(|(_, r)| std::cmp::Reverse(r.last_seen_ns));
    records.truncate(size as usize);
    let fd = sys::map_create(sys::BPF_MAP_TYPE_LRU_HASH, 16, 16, size, None, SESSIONS_MAP.name)
        .map_err(sys(format!("create a sessions map of {size} records")))?;
    // The oldest first: should the LRU evict any while they go in, it evicts those.
    for (key, rec) in records.iter().rev() {
        sys::map_update_key(fd.as_fd(), key, rec, sys::BPF_ANY).map_err(sys("copy a session"))?;
    }
    let path = dir.join(SESSIONS_MAP.pin);
    let id = check_shape(&fd, &SESSIONS_MAP)
        .map_err(|why| SteerError::Inconsistent { path: path.clone(), why })?;
    // Pin beside the old one, then rename over it: the path never disappears.
    let tmp = dir.join(SESSIONS_NEW_PIN);
    let _ = fs::remove_file(&tmp);
    sys::obj_pin(fd.as_fd(), &tmp).map_err(sys(format!("pin {}", tmp.display())))?;
    fs::rename(&tmp, &path).map_err(sys(format!("rename to {}", path.display())))?;
    Ok((fd, id))
}

impl From<Record> for Session {
    fn from(r: Record) -> Self {
        Self { slot: r.slot, epoch: r.epoch, last_seen: Duration::from_nanos(r.last_seen_ns) }
    }
}

/// The client a sessions key names (IPv4 for `::ffff:a.b.c.d`).
pub(super) fn client_of(key: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(key);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// Whether a batch operation failed because the kernel or map type has none.
pub(super) fn no_batch(e: &io::Error) -> bool {
    // ENOTSUPP (524) is the kernel's internal "not supported", which leaks to user space here.
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP | 524))
}

/// Records read per `BPF_MAP_LOOKUP_BATCH` call.
pub(super) const SESSION_BATCH: u32 = 4096;

/// `CLOCK_MONOTONIC` now: the clock of [`Session::last_seen`].
pub fn monotonic_now() -> Duration {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32)
}
