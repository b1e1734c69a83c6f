//! The sockets of a reuseport group, the migration sysctl and the bpf filesystem.

use std::{
    fs, io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::Path,
};

use socket2::{Domain, Protocol, SockRef, Socket, Type};

/// A listen backlog for production sockets: `SOMAXCONN`'s value since Linux 5.4. The kernel
/// caps it at `net.core.somaxconn`.
pub const DEFAULT_BACKLOG: i32 = 4096;

/// Binds a TCP listening socket with `SO_REUSEPORT` (and `SO_REUSEADDR`) on `addr`, listening
/// with `backlog`; IPv6 sockets are dual-stack (`IPV6_V6ONLY` off), so `[::]:80` also takes IPv4
/// clients. The descriptor is close-on-exec and **blocking**, as systemd hands sockets to the
/// services it activates: `O_NONBLOCK` belongs to the open file description, which a worker
/// that gets this socket shares with every other holder, and each runtime sets the mode it
/// wants itself (Node.js, Go and tokio switch it on; a blocking Python server expects it off).
///
/// Every socket of one group must be bound by the same effective uid (the kernel's rule for
/// `SO_REUSEPORT`). Not idempotent: each call creates a new socket.
pub fn bind_reuseport(addr: SocketAddr, backlog: i32) -> io::Result<OwnedFd> {
    bind_listener(addr, backlog, None)
}

/// [`bind_reuseport`], then attaching `prog` to the socket's group.
///
/// The program cannot be attached between `bind` and `listen`: that gives the socket a
/// reuseport group of its own, and `listen` then refuses (`EADDRINUSE`) to join the existing
/// group on the same address. So the first socket of a new group is hashed (it is the only
/// one) until `attach` returns, microseconds later.
pub(crate) fn bind_listener(
    addr: SocketAddr,
    backlog: i32,
    prog: Option<BorrowedFd<'_>>,
) -> io::Result<OwnedFd> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    if let Some(prog) = prog {
        attach_program(socket.as_fd(), prog)?;
    }
    Ok(socket.into())
}

/// `setsockopt(SO_ATTACH_REUSEPORT_EBPF)`: makes `prog` the selector of `socket`'s group.
pub(crate) fn attach_program(socket: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let fd: libc::c_int = prog.as_raw_fd();
    // SAFETY: `socket` is an open descriptor; the option value is a live c_int of the given size.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_EBPF,
            &fd as *const libc::c_int as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// The kernel's cookie of a socket (`SO_COOKIE`): what a [`crate::SockArray`] entry reads back
/// as, so the daemon can tell which of its sockets sits in which slot.
pub fn socket_cookie(socket: impl AsFd) -> io::Result<u64> {
    SockRef::from(&socket.as_fd()).cookie()
}

const TCP_MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Sets `net.ipv4.tcp_migrate_req = 1` in the calling thread's network namespace. Idempotent.
///
/// With it, a closing listener of a reuseport group hands its queued connections (and
/// handshakes in progress) to another socket of the group instead of resetting them. The
/// steering program is loaded with `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE`, so the kernel asks it
/// which socket; with such a program the kernel migrates whatever this sysctl says (see the
/// crate docs), and the sysctl also covers a group that has no program.
pub fn enable_migration() -> io::Result<()> {
    fs::write(TCP_MIGRATE_REQ, "1\n")
}

/// Whether `net.ipv4.tcp_migrate_req` is on in the calling thread's network namespace.
pub fn migration_enabled() -> io::Result<bool> {
    Ok(fs::read_to_string(TCP_MIGRATE_REQ)?.trim() != "0")
}

/// Whether `path` is on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    Ok(nix::sys::statfs::statfs(path)?.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

/// Mounts a bpf filesystem on the existing directory `mountpoint` unless one is there already
/// (production: `/sys/fs/bpf`, which systemd normally mounts). Returns whether it mounted.
/// Idempotent. Needs `CAP_SYS_ADMIN`.
pub fn mount_bpffs_if_absent(mountpoint: &Path) -> io::Result<bool> {
    use nix::mount::{MsFlags, mount};
    if is_bpffs(mountpoint)? {
        return Ok(false);
    }
    mount(
        Some("bpf"),
        mountpoint,
        Some("bpf"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    )?;
    Ok(true)
}
