//! The seccomp filter every worker runs under: no worker — root included — can change the
//! steering of its reuseport group (issue 21, item 1).
//!
//! The kernel checks no capability for `SO_ATTACH_REUSEPORT_CBPF`, `SO_ATTACH_REUSEPORT_EBPF`
//! and `SO_DETACH_REUSEPORT_BPF`, and `SO_LOCK_FILTER` does not cover them: any process holding a
//! socket of a group can replace or remove the program that picks the group's socket for each
//! connection. In socket mode every worker holds one (the daemon hands it at fd 3), so the
//! filter refuses, with `EPERM`:
//!
//! - for every worker, `setsockopt(_, SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF |
//!   SO_ATTACH_REUSEPORT_EBPF | SO_DETACH_REUSEPORT_BPF, …)` (a worker in NAT mode holds no
//!   group socket of ours, but it could take one from a socket-mode worker of the same user);
//! - for a worker that is handed sockets (socket mode), also `setsockopt(_, SOL_SOCKET,
//!   SO_REUSEPORT, …)` (turning it off on a group's socket makes the daemon's next bind in the
//!   group fail) and `io_uring_setup`, `io_uring_enter` and `io_uring_register`: since Linux 6.7
//!   an io_uring can issue the same `setsockopt` (`SOCKET_URING_OP_SETSOCKOPT`) without passing
//!   through this filter. Runtimes that try io_uring (libuv, tokio-uring) fall back to threads
//!   on an error.
//!
//! The x32 spellings of those system calls are refused too; other architectures' are killed
//! (the filter, like the unit's `SystemCallArchitectures=native`, admits the native one only).
//!
//! The filter is installed in the forked child while it is still root, *before* it drops to the
//! worker's user, and without `PR_SET_NO_NEW_PRIVS` (workers may run setuid tools; installing a
//! filter without it needs `CAP_SYS_ADMIN`, which root has). It is inherited by everything the
//! worker runs and forks, and nothing can remove it.

use std::io;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

/// `SO_ATTACH_REUSEPORT_CBPF`, `SO_ATTACH_REUSEPORT_EBPF`, `SO_DETACH_REUSEPORT_BPF`
/// (asm-generic/socket.h: the same numbers on every architecture but alpha, mips, parisc, sparc).
pub const REUSEPORT_PROGRAM_OPTIONS: [i32; 3] =
    [libc::SO_ATTACH_REUSEPORT_CBPF, libc::SO_ATTACH_REUSEPORT_EBPF, libc::SO_DETACH_REUSEPORT_BPF];

/// The x32 ABI's bit in a system call number (x86_64 only).
#[cfg(target_arch = "x86_64")]
const X32: i64 = 0x4000_0000;
/// x32's own number of `setsockopt` (arch/x86/entry/syscalls/syscall_64.tbl).
#[cfg(target_arch = "x86_64")]
const X32_SETSOCKOPT: i64 = X32 + 541;

/// The filter for a worker (`socket_mode`: it is handed sockets of a reuseport group), compiled
/// for this architecture. Built before the fork: the child may not allocate.
pub fn worker_filter(socket_mode: bool) -> io::Result<BpfProgram> {
    let mut options: Vec<i32> = REUSEPORT_PROGRAM_OPTIONS.to_vec();
    if socket_mode {
        options.push(libc::SO_REUSEPORT);
    }
    let setsockopt_rules = || -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
        options
            .iter()
            .map(|opt| {
                SeccompRule::new(vec![
                    SeccompCondition::new(
                        1,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::Eq,
                        libc::SOL_SOCKET as u64,
                    )?,
                    SeccompCondition::new(2, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, *opt as u64)?,
                ])
            })
            .collect()
    };
    let err = |e: seccompiler::BackendError| io::Error::other(format!("seccomp filter: {e}"));
    let mut rules = vec![(libc::SYS_setsockopt, setsockopt_rules().map_err(err)?)];
    #[cfg(target_arch = "x86_64")]
    rules.push((X32_SETSOCKOPT, setsockopt_rules().map_err(err)?));
    if socket_mode {
        for nr in [libc::SYS_io_uring_setup, libc::SYS_io_uring_enter, libc::SYS_io_uring_register] {
            rules.push((nr, Vec::new()));
            #[cfg(target_arch = "x86_64")]
            rules.push((nr | X32, Vec::new()));
        }
    }
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| io::Error::other(format!("seccomp filter for {}: {e}", std::env::consts::ARCH)))?;
    let filter = SeccompFilter::new(
        rules.into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(err)?;
    BpfProgram::try_from(filter).map_err(err)
}

/// Installs `filter` on the calling thread, without `PR_SET_NO_NEW_PRIVS` (the caller must be
/// root, or hold `CAP_SYS_ADMIN`). Async-signal-safe: one system call, no allocation, so it may
/// run between fork and exec.
pub fn install(filter: &BpfProgram) -> io::Result<()> {
    let prog = libc::sock_fprog {
        len: u16::try_from(filter.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
        // The kernel only reads the instructions (copy_from_user); seccompiler's sock_filter has
        // the kernel's layout, as libc's does.
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `prog` points at `filter`'s instructions, alive for the call; the kernel copies them.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0 as libc::c_ulong,
            &prog as *const libc::sock_fprog,
        )
    };
    if ret == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    fn setsockopt_int(fd: i32, opt: i32, value: i32) -> io::Result<()> {
        // SAFETY: a live c_int of the given size.
        let ret = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                &value as *const i32 as *const libc::c_void,
                size_of::<i32>() as libc::socklen_t,
            )
        };
        if ret == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    }

    /// In a forked child (the filter would stay on the test process otherwise): the options
    /// that change a group's program are refused, the others are not, and io_uring is closed in
    /// socket mode only. Needs root (a filter without no_new_privs needs CAP_SYS_ADMIN).
    #[test]
    #[ignore = "needs root: cargo xtask test runs it as root with --run-ignored"]
    fn the_filter_refuses_what_changes_a_groups_steering_and_nothing_else() {
        for socket_mode in [false, true] {
            let filter = worker_filter(socket_mode).unwrap();
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let fd = listener.as_raw_fd();
            // SAFETY: the child only makes system calls and exits; it never returns here.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                let code = (|| {
                    install(&filter).map_err(|_| 10)?;
                    // Still able to gain privileges: no_new_privs is not set.
                    // SAFETY: prctl with no pointers.
                    if unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) } != 0 {
                        return Err(11);
                    }
                    for opt in REUSEPORT_PROGRAM_OPTIONS {
                        match setsockopt_int(fd, opt, 0) {
                            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
                            _ => return Err(12),
                        }
                    }
                    let reuseport = setsockopt_int(fd, libc::SO_REUSEPORT, 1);
                    match (socket_mode, reuseport.map_err(|e| e.raw_os_error())) {
                        (true, Err(Some(libc::EPERM))) | (false, Ok(())) => {}
                        _ => return Err(13),
                    }
                    setsockopt_int(fd, libc::SO_KEEPALIVE, 1).map_err(|_| 14)?;
                    let mut params = [0u8; 120];
                    // SAFETY: io_uring_setup writes at most sizeof(io_uring_params) = 120 bytes.
                    let ring = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1, params.as_mut_ptr()) };
                    let errno = io::Error::last_os_error().raw_os_error();
                    match (socket_mode, ring, errno) {
                        (true, -1, Some(libc::EPERM)) => {}
                        (false, r, _) if r >= 0 => {}
                        // A kernel without io_uring (or with it disabled by sysctl).
                        (false, -1, Some(libc::ENOSYS | libc::EPERM)) => {}
                        _ => return Err(15),
                    }
                    Ok(())
                })();
                // SAFETY: exits the child at once.
                unsafe { libc::_exit(code.err().unwrap_or(0)) };
            }
            let mut status = 0;
            // SAFETY: waits for our own child.
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            assert!(libc::WIFEXITED(status), "socket mode {socket_mode}: {status:#x}");
            assert_eq!(libc::WEXITSTATUS(status), 0, "socket mode {socket_mode}: which check failed");
        }
    }
}
