//! Worker processes: forked and held at a gate (spawn.rs), pidfds, signals, renice, and /proc.
//!
//! Every signal goes through a pidfd, so a PID recycled after a worker exited can never receive
//! a signal meant for that worker.

use std::{
    collections::HashSet,
    fs, io,
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
};

use rustix::process::{Pid, PidfdFlags, Signal, WaitId, WaitIdOptions};

/// Default PATH of workers (nothing of the daemon's environment reaches them).
pub const WORKER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What to run for one worker.
#[derive(Debug)]
pub struct SpawnSpec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    /// (uid, gid) to run as; `None` = root.
    pub user: Option<(u32, u32)>,
    /// journald identifier (the app name).
    pub identifier: String,
    /// The scope unit, as a fallback for journald.
    pub unit: String,
    /// Sockets handed to the worker from fd 3 (socket activation, sd_listen_fds(3)).
    pub fds: Vec<OwnedFd>,
    /// How long the child waits, once released, before it runs the worker's command.
    pub delay: std::time::Duration,
}

/// The soft limit on open files the daemon started with, restored for workers: the daemon
/// raises its own to the hard limit (it holds a pidfd per worker), but programs that use
/// select(2) break above 1024, so workers get what they would have had.
static WORKER_NOFILE: std::sync::OnceLock<libc::rlimit> = std::sync::OnceLock::new();

/// Raises the daemon's soft limit on open files to its hard limit; remembers the original for
/// workers.
pub fn raise_nofile_limit() -> io::Result<()> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let _ = WORKER_NOFILE.set(lim);
    let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn pid_of(pid: u32) -> io::Result<Pid> {
    i32::try_from(pid).ok().and_then(Pid::from_raw).ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))
}

/// How a worker ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Exited with this status.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
    /// Gone, status unknown (not our child: adopted).
    Unknown,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exited {c}"),
            Exit::Signal(s) => write!(f, "killed by signal {}", ipcluster_core::units::Signal::describe(*s)),
            Exit::Unknown => f.write_str("exited"),
        }
    }
}

/// Waits (asynchronously) until the process behind `pidfd` ends, then reaps it if it is our child.
pub async fn wait_exit(pidfd: std::sync::Arc<OwnedFd>) -> Exit {
    // A pidfd becomes readable when its process exits. Registered once, without a dup: one fd
    // per worker, not two.
    // SAFETY: the Arc keeps the fd open for as long as the AsyncFd (which holds a clone of it)
    // lives; only this task registers it, and the registration ends before the clone is dropped.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(pidfd.clone(), tokio::io::Interest::READABLE)
    };
    if let Ok(afd) = registered {
        let _ = afd.readable().await;
    }
    match rustix::process::waitid(WaitId::PidFd(pidfd.as_fd()), WaitIdOptions::EXITED | WaitIdOptions::NOHANG)
    {
        Ok(Some(status)) => {
            if let Some(sig) = status.terminating_signal() {
                Exit::Signal(sig)
            } else if let Some(code) = status.exit_status() {
                Exit::Code(code)
            } else {
                Exit::Unknown
            }
        }
        _ => Exit::Unknown,
    }
}

/// Sends signal number `sig` through `pidfd`. Sending to a process that has already exited is
/// not an error (`ESRCH` is ignored): the result is the same.
pub fn signal(pidfd: &OwnedFd, sig: i32) -> io::Result<()> {
    let Some(sig) = Signal::from_named_raw(sig) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    match rustix::process::pidfd_send_signal(pidfd, sig) {
        Err(e) if e == rustix::io::Errno::SRCH => Ok(()),
        other => Ok(other?),
    }
}

/// Whether the process behind `pidfd` still runs (a pidfd becomes readable when it exits).
pub fn alive(pidfd: &OwnedFd) -> bool {
    let mut fds = [rustix::event::PollFd::new(pidfd, rustix::event::PollFlags::IN)];
    matches!(rustix::event::poll(&mut fds, Some(&rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 })), Ok(0))
}

/// PIDs of `pid` and all its descendants (from /proc/<pid>/task/*/children).
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut seen: HashSet<u32> = HashSet::from([pid]);
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        i += 1;
        let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) else { continue };
        for t in tasks.flatten() {
            let Ok(children) = fs::read_to_string(t.path().join("children")) else { continue };
            for c in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
                if seen.insert(c) {
                    out.push(c);
                }
            }
        }
    }
    out
}

/// Every thread of every process in `pid`'s tree.
pub fn threads_of_tree(pid: u32) -> Vec<u32> {
    let mut tids = Vec::new();
    for p in process_tree(pid) {
        let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) else { continue };
        tids.extend(tasks.flatten().filter_map(|t| t.file_name().to_str()?.parse::<u32>().ok()));
    }
    tids
}

/// Sets the nice value of every thread of `pid`'s tree to `nice` (niceness is per thread on
/// Linux, so renicing only the main thread would leave the others at full priority). Idempotent.
pub fn renice_tree(pid: u32, nice: i32) -> io::Result<()> {
    let mut reniced_main = false;
    for tid in threads_of_tree(pid) {
        let Ok(p) = pid_of(tid) else { continue };
        // A thread that exited meanwhile is not an error.
        match rustix::process::setpriority_process(Some(p), nice.clamp(-20, 19)) {
            Ok(()) => reniced_main |= tid == pid,
            Err(e) if e == rustix::io::Errno::SRCH => continue,
            Err(e) => return Err(e.into()),
        }
    }
    if reniced_main { Ok(()) } else { Err(io::Error::from_raw_os_error(libc::ESRCH)) }
}

/// This process's own nice value: workers start with it.
pub fn own_nice() -> i32 {
    rustix::process::getpriority_process(None).unwrap_or(0)
}

/// Opens a pidfd for a process the daemon did not start (adoption after a restart).
pub fn adopt(pid: u32) -> io::Result<OwnedFd> {
    Ok(rustix::process::pidfd_open(pid_of(pid)?, PidfdFlags::empty())?)
}

/// When `pid` started, in µs since the epoch (from /proc: the same answer before and after a
/// daemon restart, at clock-tick resolution).
pub fn start_time_usec(pid: u32) -> Option<u64> {
    static BOOT_USEC: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let boot = (*BOOT_USEC.get_or_init(|| {
        let stat = fs::read_to_string("/proc/stat").ok()?;
        let secs: u64 = stat.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()?;
        Some(secs * 1_000_000)
    }))?;
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    // Field 22 (starttime) is the 20th after the command.
    let ticks: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    Some(boot + ticks * 10_000)
}

/// The parent PID of `pid`.
pub fn parent(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// The environment `pid` was started with.
pub fn environ(pid: u32) -> Option<Vec<(String, String)>> {
    let raw = fs::read(format!("/proc/{pid}/environ")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter_map(|kv| {
                let kv = std::str::from_utf8(kv).ok()?;
                let (k, v) = kv.split_once('=')?;
                Some((k.to_owned(), v.to_owned()))
            })
            .collect(),
    )
}

/// The nice value of `pid` (its main thread).
pub fn nice_of(pid: u32) -> Option<i32> {
    rustix::process::getpriority_process(Some(pid_of(pid).ok()?)).ok()
}

/// Resident memory (bytes) and CPU time (µs) of `pid`'s whole tree, from /proc.
pub fn usage_of_tree(pid: u32) -> (u64, u64) {
    usage_of_pids(&process_tree(pid))
}

/// Resident memory (bytes) and CPU time (µs) of `pids` together, from /proc.
pub fn usage_of_pids(pids: &[u32]) -> (u64, u64) {
    let page = rustix::param::page_size() as u64;
    let ticks = 100u64; // USER_HZ is 100 on Linux for every architecture's /proc interface.
    let mut rss = 0;
    let mut cpu = 0;
    for &p in pids {
        if let Ok(statm) = fs::read_to_string(format!("/proc/{p}/statm")) {
            rss += statm.split_whitespace().nth(1).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0) * page;
        }
        if let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) {
            // Fields after the command (which may contain spaces) start after the last ')'.
            if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
                let f: Vec<&str> = rest.split_whitespace().collect();
                let utime: u64 = f.get(11).and_then(|s| s.parse().ok()).unwrap_or(0);
                let stime: u64 = f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
                cpu += (utime + stime) * 1_000_000 / ticks;
            }
        }
    }
    (rss, cpu)
}

/// Looks up a user's uid and primary gid.
pub fn lookup_user(name: &str) -> Result<(u32, u32), String> {
    match nix::unistd::User::from_name(name) {
        Ok(Some(u)) => Ok((u.uid.as_raw(), u.gid.as_raw())),
        Ok(None) => Err(format!("user {name:?} does not exist")),
        Err(e) => Err(format!("cannot look up user {name:?}: {e}")),
    }
}

mod cgroups;
mod sockets;
mod spawn;

pub use cgroups::*;
pub use sockets::*;
pub use spawn::*;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pidfd_tells_whether_its_process_still_runs() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let fd = adopt(child.id()).unwrap();
        assert!(alive(&fd));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!alive(&fd), "a reaped process is not alive");
        let me = adopt(std::process::id()).unwrap();
        assert!(alive(&me));
    }

    #[test]
    fn start_time_and_environ_of_this_process() {
        let me = std::process::id();
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as u64;
        let started = start_time_usec(me).unwrap();
        assert!(started <= now + 20_000 && now - started < 3_600_000_000, "{started} vs {now}");
        assert!(environ(me).unwrap().iter().any(|(k, _)| k == "PATH"));
        assert_eq!(parent(me), Some(std::os::unix::process::parent_id()));
    }
}
