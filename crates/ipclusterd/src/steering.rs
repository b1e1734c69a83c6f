//! [`Steer`]: socket mode's kernel side, as the supervisor uses it — one reuseport group per
//! public address of an app, the band → socket table of each generation, the cutover, and what
//! a restarted daemon reads back. [`Kernel`] implements it with [`ipcluster_steer`] (an
//! `sk_reuseport` eBPF program pinned in bpffs); the supervisor's unit tests use a fake.

use std::{fmt::Debug, net::SocketAddr, os::fd::OwnedFd, path::Path, sync::OnceLock};

use ipcluster_core::name::AppName;
use ipcluster_steer::{SockArray, Steering};

/// Connections queued per socket before the kernel refuses more (the worker accepts them).
const BACKLOG: i32 = ipcluster_steer::DEFAULT_BACKLOG;
/// Where bpffs is mounted (by systemd, at boot).
pub const BPFFS: &str = "/sys/fs/bpf";

/// What socket mode needs of the kernel. Every error is a sentence for `DeployFailed` and the
/// journal (a program the verifier refuses comes with the verifier's log).
pub trait Steer: Clone + Send + Sync + Debug + 'static {
    /// The steering of one group: one public address of one app.
    type Group: Send + Sync + Debug + 'static;
    /// One generation's band → socket table for one group.
    type Table: Send + Sync + Debug + 'static;

    /// Loads the steering of `app`'s group `listen`, or re-opens it (after a restart: the pins
    /// keep it). Idempotent.
    fn group(&self, app: &AppName, listen: SocketAddr) -> Result<Self::Group, String>;
    /// A new listening socket of the group (`SO_REUSEPORT`, bound, listening, steered).
    fn bind(&self, group: &Self::Group, listen: SocketAddr) -> Result<OwnedFd, String>;
    /// An empty table.
    fn table(&self) -> Result<Self::Table, String>;
    /// Puts `socket` in `band`'s slot (replacing what was there). Idempotent. A socket can be in
    /// one slot of one table at most (the kernel refuses a second).
    fn insert(&self, table: &Self::Table, band: u32, socket: &OwnedFd) -> Result<(), String>;
    /// Empties `band`'s slot: its clients go to a neighbour band. Idempotent.
    fn remove(&self, table: &Self::Table, band: u32) -> Result<(), String>;
    /// Prepares a switch to `table` (the slow part; changes no traffic).
    fn stage(&self, group: &Self::Group, table: &Self::Table) -> Result<(), String>;
    /// The cutover: new connections go by `table` from now on (one atomic update).
    fn switch(&self, group: &Self::Group, table: &Self::Table) -> Result<(), String>;
    /// The table in force, if any.
    fn current(&self, group: &Self::Group) -> Result<Option<Self::Table>, String>;
    /// The table switched from last (or staged), if any: the previous generation's, which a
    /// rollback switches back to.
    fn standby(&self, group: &Self::Group) -> Result<Option<Self::Table>, String>;
    /// Whether two handles are the same table.
    fn same(&self, a: &Self::Table, b: &Self::Table) -> bool;
    /// The filled slots: band and the socket's cookie.
    fn entries(&self, table: &Self::Table) -> Result<Vec<(u32, u64)>, String>;
    /// A socket's cookie (what [`Steer::entries`] names it by).
    fn cookie(&self, socket: &OwnedFd) -> Result<u64, String>;
    /// Stops steering the group (connections to it are refused) and forgets its pins.
    fn forget(&self, app: &AppName, listen: SocketAddr, group: Self::Group) -> Result<(), String>;
}

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

    fn group(&self, app: &AppName, listen: SocketAddr) -> Result<Steering, String> {
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
        enable_migration();
        let name = ipcluster_steer::group_name(app.as_str(), listen);
        Steering::load(Self::base(), &name)
            .map_err(|e| format!("cannot load the steering program for {listen}: {e}"))
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
    fn stage(&self, group: &Steering, table: &SockArray) -> Result<(), String> {
        group.stage(table).map_err(|e| e.to_string())
    }
    fn switch(&self, group: &Steering, table: &SockArray) -> Result<(), String> {
        group.switch_to(table).map_err(|e| e.to_string())
    }
    fn current(&self, group: &Steering) -> Result<Option<SockArray>, String> {
        group.current().map_err(|e| e.to_string())
    }
    fn standby(&self, group: &Steering) -> Result<Option<SockArray>, String> {
        group.standby().map_err(|e| e.to_string())
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
