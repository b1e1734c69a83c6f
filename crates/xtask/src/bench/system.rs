//! What the benchmark asks of the kernel: CPU pinning of a sandbox's processes, the steering
//! program's own run time (BPF statistics), a plain reuseport group made from socket mode's
//! (its program detached), and the machine's description (kernel, CPU, load, steal time).

use std::{
    fs,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{Context, Result, bail};
use ipcluster_sandbox::Sandbox;

/// The CPUs the load generator and the servers run on: with 2 CPUs or more, clients on the
/// first and servers (workers, daemon, fronts) on the second; `None` on a 1-CPU machine (then
/// nothing is pinned, and the report says so).
pub fn cpus() -> Option<(usize, usize)> {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    (n >= 2).then_some((0, 1))
}

/// Sets the CPU affinity of every thread of every process of `sb` (its systemd and everything
/// below it: whatever they start later inherits it). Two passes, for a process forked during
/// the first.
pub fn pin_sandbox(sb: &Sandbox, cpus: &[usize]) -> Result<usize> {
    let mut set = nix::sched::CpuSet::new();
    for &c in cpus {
        set.set(c)?;
    }
    let ns = fs::read_link(format!("/proc/{}/ns/pid", sb.init_pid())).context("the sandbox's pid ns")?;
    let mut pinned = 0;
    for _ in 0..2 {
        pinned = 0;
        for entry in fs::read_dir("/proc")?.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else { continue };
            if fs::read_link(format!("/proc/{pid}/ns/pid")).ok().as_ref() != Some(&ns) {
                continue;
            }
            let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else { continue };
            for t in tasks.flatten() {
                if let Some(tid) = t.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) {
                    // A thread that ended meanwhile is no error.
                    let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set);
                }
            }
            pinned += 1;
        }
    }
    if pinned == 0 {
        bail!("no process of sandbox {} found to pin", sb.name());
    }
    Ok(pinned)
}

/// Turns on the kernel's run-time statistics of BPF programs for as long as the returned
/// descriptor is open (`BPF_ENABLE_STATS`, the scoped form of `kernel.bpf_stats_enabled`: they
/// are off again when the benchmark ends, however it ends).
pub fn bpf_stats() -> Result<OwnedFd> {
    /// `BPF_ENABLE_STATS` and `BPF_STATS_RUN_TIME` (linux/bpf.h).
    const BPF_ENABLE_STATS: libc::c_long = 32;
    let attr: [u32; 1] = [0];
    // SAFETY: bpf(2) reads `size_of_val(&attr)` bytes of `attr`, a live, initialised array; it
    // writes nothing there and returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_ENABLE_STATS, attr.as_ptr(), std::mem::size_of_val(&attr) as u32)
    };
    if fd < 0 {
        bail!("BPF_ENABLE_STATS: {}", std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `(run_time_ns, run_cnt)` summed over every `sk_reuseport` program loaded in the kernel (the
/// counters move only while [`bpf_stats`] is on). The steering runs as a copy of the pinned
/// program that nobody holds (so that a detach is seen), so the programs are found by id
/// (`BPF_PROG_GET_NEXT_ID`), not among a process's descriptors; during a cell only the mode's
/// groups run one (its control's was detached, and the other cells' sandboxes are gone).
pub fn program_runs() -> Result<(u64, u64)> {
    /// linux/bpf.h.
    const BPF_PROG_GET_NEXT_ID: libc::c_long = 11;
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    const SK_REUSEPORT: u64 = 21;
    let (mut ns, mut cnt, mut progs) = (0, 0, 0);
    let mut id: u32 = 0;
    loop {
        // { start_id, next_id } for the next id; { prog_id } to open one.
        let mut attr: [u32; 4] = [id, 0, 0, 0];
        // SAFETY: bpf(2) reads and writes at most `size_of_val(&attr)` bytes of `attr`, a live,
        // initialised array.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_GET_NEXT_ID,
                attr.as_mut_ptr(),
                std::mem::size_of_val(&attr) as u32,
            )
        };
        if r < 0 {
            break;
        }
        id = attr[1];
        let open: [u32; 4] = [id, 0, 0, 0];
        // SAFETY: as above; it returns a new descriptor or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_GET_FD_BY_ID,
                open.as_ptr(),
                std::mem::size_of_val(&open) as u32,
            )
        };
        if fd < 0 {
            continue;
        }
        // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let Ok(text) = fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())) else { continue };
        let field =
            |k: &str| text.lines().find_map(|l| l.strip_prefix(k)?.trim().parse::<u64>().ok()).unwrap_or(0);
        if field("prog_type:") != SK_REUSEPORT {
            continue;
        }
        progs += 1;
        ns += field("run_time_ns:");
        cnt += field("run_cnt:");
    }
    if progs == 0 {
        bail!("no sk_reuseport program is loaded");
    }
    Ok((ns, cnt))
}

/// `SO_DETACH_REUSEPORT_BPF` (asm-generic/socket.h).
const SO_DETACH_REUSEPORT_BPF: libc::c_int = 68;

/// `xtask bench-detach PID` (run inside a sandbox): detaches the program of the reuseport
/// group whose socket process `PID` holds at fd 3 (a socket-mode worker's), so that the group
/// picks by the kernel's hash, as a plain `SO_REUSEPORT` group does. The workers, their
/// confinement and their sockets stay exactly as ipclusterd made them.
pub fn detach(pid: u32) -> Result<()> {
    let pid = rustix::process::Pid::from_raw(pid as i32).context("pid 0")?;
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())?;
    let sock = rustix::process::pidfd_getfd(&pidfd, 3, rustix::process::PidfdGetfdFlags::empty())?;
    let zero: libc::c_int = 0;
    // SAFETY: setsockopt(2) on a descriptor we own, reading `size_of::<c_int>()` bytes of a
    // live local.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_DETACH_REUSEPORT_BPF,
            (&raw const zero).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        bail!("SO_DETACH_REUSEPORT_BPF: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Writes `records` session records (clients 10.0.0.0 on) of `app`'s group on `listen` to its
/// live slot, seen now: what that many clients' first connections would leave in the steering
/// program's map. Run inside a bench sandbox, as root.
pub fn fill_sessions(app: &str, listen: std::net::SocketAddr, records: u32) -> Result<()> {
    let name = ipcluster_steer::group_name(app, listen);
    let steering = ipcluster_steer::Steering::load(std::path::Path::new("/sys/fs/bpf/ipcluster"), &name)?;
    let (slot, _) = steering.live()?.context("no live slot")?;
    let epoch = steering.slots()?[slot as usize].epoch;
    let now = ipcluster_steer::monotonic_now();
    for i in 0..records {
        let client = std::net::Ipv4Addr::from(0x0a00_0000 + i);
        steering.insert_session(client.into(), ipcluster_steer::Session { slot, epoch, last_seen: now })?;
    }
    Ok(())
}

/// The machine as the report states it.
#[derive(Debug, Clone, Default)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub mem_gib: u64,
    pub kernel: String,
}

pub fn machine() -> Machine {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned()))
        .unwrap_or_default();
    let mem = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:").and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    Machine { cores, cpu, mem_gib: mem >> 20, kernel }
}

/// /proc/stat now (for [`super::stats::steal_share`]).
pub fn proc_stat() -> String {
    fs::read_to_string("/proc/stat").unwrap_or_default()
}

/// The 1-minute load average now.
pub fn load1() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// conntrack's drops, from /proc/net/stat/nf_conntrack: the `drop` (packets), `early_drop`
/// (entries evicted to make room) and
/// `insert_failed` columns (hexadecimal) summed over every CPU's row, found by the header's names.
pub fn conntrack_drops(stat: &str) -> u64 {
    let mut lines = stat.lines();
    let Some(header) = lines.next() else { return 0 };
    let wanted: Vec<usize> = header
        .split_whitespace()
        .enumerate()
        .filter(|(_, name)| matches!(*name, "drop" | "early_drop" | "insert_failed"))
        .map(|(i, _)| i)
        .collect();
    lines
        .map(|row| {
            let fields: Vec<&str> = row.split_whitespace().collect();
            wanted.iter().filter_map(|&i| u64::from_str_radix(fields.get(i)?, 16).ok()).sum::<u64>()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    #[test]
    fn conntrack_drops_sum_their_columns_over_every_cpu() {
        let stat = "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart\n\
            00000002  00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000001 0000000a 00000000 00000000  00000000 00000000 00000000 00000000\n\
            00000002  00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000010 00000002 00000000  00000000 00000000 00000000 00000000\n";
        assert_eq!(super::conntrack_drops(stat), 1 + 10 + 16 + 2);
        assert_eq!(super::conntrack_drops(""), 0);
    }
}
