//! [`Steer`]: socket mode's kernel side, as the supervisor uses it — one reuseport group per
//! public address of an app, the band → socket table of each generation, the cutover, and what
//! a restarted daemon reads back. [`Kernel`] implements it with [`ipcluster_steer`] (an
//! `sk_reuseport` eBPF program pinned in bpffs); the supervisor's unit tests use a fake.

use std::{fmt::Debug, net::SocketAddr, os::fd::OwnedFd, path::Path, sync::OnceLock, time::Duration};

use ipcluster_core::name::AppName;
pub use ipcluster_steer::Attachment;
use ipcluster_steer::{SockArray, Steering};

/// Connections queued per socket before the kernel refuses more (the worker accepts them).
const BACKLOG: i32 = ipcluster_steer::DEFAULT_BACKLOG;
/// Where bpffs is mounted (by systemd, at boot).
pub const BPFFS: &str = "/sys/fs/bpf";

/// What socket mode needs of the kernel. Every error is a sentence for `DeployFailed` and the
/// journal (a program the verifier refuses comes with the verifier's log).
///
/// A group has eight *slots*, each one generation's band → socket table (or nothing), and a
/// *live* slot: new clients go to the live slot's table, unless their band has an *override*
/// (a canary's slot) or they hold a *session* recorded with another slot (session affinity).
/// Putting a table in a slot is slow (the kernel waits for a grace period); making a slot live
/// is one 4-byte update.
pub trait Steer: Clone + Send + Sync + Debug + 'static {
    /// The steering of one group: one public address of one app.
    type Group: Send + Sync + Debug + 'static;
    /// One generation's band → socket table for one group.
    type Table: Send + Sync + Debug + 'static;

    /// Loads the steering of `app`'s group `listen`, or re-opens it (after a restart: the pins
    /// keep it), with room for `sessions` records. Idempotent.
    fn group(&self, app: &AppName, listen: SocketAddr, sessions: u32) -> Result<Self::Group, String>;
    /// How many session records the group has room for.
    fn sessions_capacity(&self, group: &Self::Group) -> u32;
    /// Whether the group must be attached at once through one of its sockets: its program was
    /// replaced (a new version, a resized sessions map) or the first version's pins await their
    /// upgrade. Until then the previous program steers, and no change reaches traffic.
    fn needs_attach(&self, group: &Self::Group) -> bool;
    /// A new listening socket of the group (`SO_REUSEPORT`, bound, listening, steered).
    fn bind(&self, group: &Self::Group, listen: SocketAddr) -> Result<OwnedFd, String>;
    /// An empty table.
    fn table(&self) -> Result<Self::Table, String>;
    /// Puts `socket` in `band`'s slot (replacing what was there). Idempotent. A socket can be in
    /// one slot of one table at most (the kernel refuses a second).
    fn insert(&self, table: &Self::Table, band: u32, socket: &OwnedFd) -> Result<(), String>;
    /// Empties `band`'s slot: its clients go to a neighbour band. Idempotent.
    fn remove(&self, table: &Self::Table, band: u32) -> Result<(), String>;
    /// Puts `table` (of a generation of `bands` bands) in `slot` (the slow part; changes no
    /// traffic unless the slot is live or overridden). The records of the slot stop counting
    /// when the table is another one.
    fn put(&self, group: &Self::Group, slot: u8, table: &Self::Table, bands: u32) -> Result<(), String>;
    /// Empties `slot` (refused for the live slot): its clients' records stop counting.
    fn clear_slot(&self, group: &Self::Group, slot: u8) -> Result<(), String>;
    /// The cutover: new clients go by `slot`'s table from now on (one atomic update).
    fn set_live(&self, group: &Self::Group, slot: u8, bands: u32) -> Result<(), String>;
    /// The live slot and its band count, if any.
    fn live(&self, group: &Self::Group) -> Result<Option<(u8, u32)>, String>;
    /// What each slot holds.
    fn slots(&self, group: &Self::Group) -> Result<Vec<(u8, Self::Table)>, String>;
    /// New clients of `band` go to `slot` (a canary), or back to the live slot (`None`).
    fn set_override(&self, group: &Self::Group, band: u32, slot: Option<u8>) -> Result<(), String>;
    /// The bands with an override, and their slot.
    fn overrides(&self, group: &Self::Group) -> Result<Vec<(u32, u8)>, String>;
    /// Session affinity: a client's record counts for `timeout` after its last connection
    /// (zero: off).
    fn set_session_timeout(&self, group: &Self::Group, timeout: Duration) -> Result<(), String>;
    /// The session timeout in force.
    fn session_timeout(&self, group: &Self::Group) -> Result<Duration, String>;
    /// The records that count, per slot.
    fn session_counts(&self, group: &Self::Group) -> Result<[u32; 8], String>;
    /// Whether two handles are the same table.
    fn same(&self, a: &Self::Table, b: &Self::Table) -> bool;
    /// The filled slots: band and the socket's cookie.
    fn entries(&self, table: &Self::Table) -> Result<Vec<(u32, u64)>, String>;
    /// A socket's cookie (what [`Steer::entries`] names it by).
    fn cookie(&self, socket: &OwnedFd) -> Result<u64, String>;
    /// Whether the group still runs the program the daemon attached: `Gone` when a holder of
    /// one of its sockets detached or replaced it (or the group ended); `Unknown` when this
    /// daemon attached none yet (after a restart). Cheap: one system call.
    fn attachment(&self, group: &Self::Group) -> Result<Attachment, String>;
    /// Attaches the group's program again through `socket` (any socket of the group); atomic
    /// for traffic, idempotent.
    fn attach(&self, group: &Self::Group, socket: &OwnedFd) -> Result<(), String>;
    /// Stops steering the group (connections to it are refused) and forgets its pins.
    fn forget(&self, app: &AppName, listen: SocketAddr, group: Self::Group) -> Result<(), String>;
}

/// The source address a health check connects from to reach band `band` of the table in
/// `slot` through the group's public address, whatever is live (the program's probe path).
pub fn probe_source(slot: u8, band: u32) -> Result<std::net::IpAddr, String> {
    ipcluster_steer::probe_source(u32::from(slot), band).map(std::net::IpAddr::V4).map_err(|e| e.to_string())
}

/// Records a group without session affinity keeps room for (a sessions map is allocated whole:
/// about 96 bytes a record).
pub const SMALL_SESSIONS: u32 = 1024;
/// Records a group with session affinity keeps room for (6 MiB; the least recently seen are
/// evicted first when it is full).
pub const SESSIONS: u32 = ipcluster_steer::DEFAULT_SESSIONS;

/// [`Steer`] with the kernel: pins under `/sys/fs/bpf/ipcluster`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Kernel;

impl Kernel {
    fn base() -> &'static Path {
        Path::new(ipcluster_steer::DEFAULT_BASE_DIR)
    }
}

/// Once per daemon: request migration on (queued connections of a closing socket move to
/// another of its group, rather than being reset), or why not. The program the groups use
/// migrates by itself; the sysctl covers a group that momentarily has none.
fn enable_migration() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        if ipcluster_steer::migration_enabled().unwrap_or(false) {
            return;
        }
        if let Err(e) = ipcluster_steer::enable_migration() {
            tracing::warn!("cannot set net.ipv4.tcp_migrate_req = 1: {e}; the steering program migrates queued connections itself");
        }
    });
}

impl Steer for Kernel {
    type Group = Steering;
    type Table = SockArray;

    fn group(&self, app: &AppName, listen: SocketAddr, sessions: u32) -> Result<Steering, String> {
        match ipcluster_steer::is_bpffs(Path::new(BPFFS)) {
            Ok(true) => {}
            _ => {
                return Err(format!(
                    "socket mode needs bpffs at {BPFFS}: systemd mounts it at boot, and `ipclusterd --prepare-host` (run by ipclusterd.service before the daemon) when systemd did not; the unit's journal says why it could not"
                ));
            }
        }
        std::fs::create_dir_all(Self::base())
            .map_err(|e| format!("cannot create {}: {e}", Self::base().display()))?;
        // Whoever could change the pin directory could replace the pinned program and maps.
        crate::trusted::check_dir(Self::base(), crate::trusted::Kind::PinDirectory)?;
        enable_migration();
        let name = ipcluster_steer::group_name(app.as_str(), listen);
        Steering::open(Self::base(), &name, &ipcluster_steer::Options { sessions })
            .map_err(|e| format!("cannot load the steering program for {listen}: {e}"))
    }
    fn sessions_capacity(&self, group: &Steering) -> u32 {
        group.sessions_capacity()
    }
    fn needs_attach(&self, group: &Steering) -> bool {
        group.program_replaced() || group.upgrade_pending()
    }
    fn bind(&self, group: &Steering, listen: SocketAddr) -> Result<OwnedFd, String> {
        group.listen(listen, BACKLOG).map_err(|e| format!("cannot listen on {listen}: {e}"))
    }
    fn table(&self) -> Result<SockArray, String> {
        SockArray::new().map_err(|e| e.to_string())
    }
    fn insert(&self, table: &SockArray, band: u32, socket: &OwnedFd) -> Result<(), String> {
        table.insert(band, socket).map_err(|e| e.to_string())
    }
    fn remove(&self, table: &SockArray, band: u32) -> Result<(), String> {
        table.remove(band).map(|_| ()).map_err(|e| e.to_string())
    }
    fn put(&self, group: &Steering, slot: u8, table: &SockArray, bands: u32) -> Result<(), String> {
        group.put(u32::from(slot), table, bands).map_err(|e| e.to_string())
    }
    fn clear_slot(&self, group: &Steering, slot: u8) -> Result<(), String> {
        group.clear_slot(u32::from(slot)).map(|_| ()).map_err(|e| e.to_string())
    }
    fn set_live(&self, group: &Steering, slot: u8, bands: u32) -> Result<(), String> {
        group.set_live(u32::from(slot), bands).map_err(|e| e.to_string())
    }
    fn live(&self, group: &Steering) -> Result<Option<(u8, u32)>, String> {
        let live = group.live().map_err(|e| e.to_string())?;
        Ok(live.and_then(|(s, b)| u8::try_from(s).ok().map(|s| (s, b))))
    }
    fn slots(&self, group: &Steering) -> Result<Vec<(u8, SockArray)>, String> {
        let mut out = Vec::new();
        for slot in 0..ipcluster_steer::SLOTS {
            if let Some(t) = group.slot_table(slot).map_err(|e| e.to_string())? {
                out.push((slot as u8, t));
            }
        }
        Ok(out)
    }
    fn set_override(&self, group: &Steering, band: u32, slot: Option<u8>) -> Result<(), String> {
        group.set_override(band, slot.map(u32::from)).map_err(|e| e.to_string())
    }
    fn overrides(&self, group: &Steering) -> Result<Vec<(u32, u8)>, String> {
        let o = group.overrides().map_err(|e| e.to_string())?;
        Ok(o.into_iter().filter_map(|(b, s)| u8::try_from(s).ok().map(|s| (b, s))).collect())
    }
    fn set_session_timeout(&self, group: &Steering, timeout: Duration) -> Result<(), String> {
        group.set_session_timeout(timeout).map_err(|e| e.to_string())
    }
    fn session_timeout(&self, group: &Steering) -> Result<Duration, String> {
        group.session_timeout().map_err(|e| e.to_string())
    }
    fn session_counts(&self, group: &Steering) -> Result<[u32; 8], String> {
        group.session_counts().map_err(|e| e.to_string())
    }
    fn same(&self, a: &SockArray, b: &SockArray) -> bool {
        a.id() == b.id()
    }
    fn entries(&self, table: &SockArray) -> Result<Vec<(u32, u64)>, String> {
        table.entries().map_err(|e| e.to_string())
    }
    fn cookie(&self, socket: &OwnedFd) -> Result<u64, String> {
        ipcluster_steer::socket_cookie(socket).map_err(|e| e.to_string())
    }
    fn attachment(&self, group: &Steering) -> Result<Attachment, String> {
        group.attachment().map_err(|e| e.to_string())
    }
    fn attach(&self, group: &Steering, socket: &OwnedFd) -> Result<(), String> {
        group.attach(socket).map_err(|e| e.to_string())
    }
    fn forget(&self, app: &AppName, listen: SocketAddr, group: Steering) -> Result<(), String> {
        group.clear().map_err(|e| e.to_string())?;
        drop(group);
        Steering::unpin(Self::base(), &ipcluster_steer::group_name(app.as_str(), listen))
            .map_err(|e| e.to_string())
    }
}

/// `ipclusterd --prepare-host`: what socket mode needs of the host that the daemon's sandbox
/// cannot do, run by the unit as `ExecStartPre=+…` before each start:
/// - bpffs at `/sys/fs/bpf` when systemd did not mount it (a container): mounted in PID 1's mount
///   namespace, the host's, which the daemon's own namespace is then made from. A `+` command
///   still runs in a mount namespace of its own, where a mount would vanish with it, and pins
///   must outlive every daemon;
/// - `net.ipv4.tcp_migrate_req = 1` (`/proc/sys` is read-only in the sandbox).
///
/// Idempotent, and never fails the unit: NAT mode needs neither, the steering program migrates
/// queued connections without the sysctl, and a socket-mode deploy without bpffs says why.
/// Must run before any thread is started (setns of a mount namespace needs a single thread).
pub fn prepare_host() {
    if !ipcluster_steer::is_bpffs(Path::new(BPFFS)).unwrap_or(false) {
        match mount_bpffs_in_host() {
            Ok(()) => eprintln!("mounted bpffs at {BPFFS}"),
            Err(e) => eprintln!("cannot mount bpffs at {BPFFS}: {e}; socket mode will not work"),
        }
    }
    if !ipcluster_steer::migration_enabled().unwrap_or(false)
        && let Err(e) = ipcluster_steer::enable_migration()
    {
        eprintln!("cannot set net.ipv4.tcp_migrate_req = 1: {e}");
    }
}

/// Mounts bpffs at [`BPFFS`] in PID 1's mount namespace (this process moves there for good:
/// it exits right after).
fn mount_bpffs_in_host() -> Result<(), String> {
    let ns = std::fs::File::open("/proc/1/ns/mnt").map_err(|e| format!("cannot open /proc/1/ns/mnt: {e}"))?;
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| format!("cannot enter PID 1's mount namespace: {e}"))?;
    ipcluster_steer::mount_bpffs_if_absent(Path::new(BPFFS)).map(drop).map_err(|e| e.to_string())
}
