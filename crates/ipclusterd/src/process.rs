//! Worker processes: spawning through the launcher's gate, pidfds, signals, renice, and /proc.
//!
//! Every signal goes through a pidfd, so a PID recycled after a worker exited can never receive
//! a signal meant for that worker.

use std::{
    collections::HashSet,
    ffi::OsString,
    fs,
    io::{self, Write},
    os::{
        fd::{AsFd, AsRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::PathBuf,
    process::{Command, Stdio},
};

use rustix::process::{Pid, PidfdFlags, Signal, WaitId, WaitIdOptions};

/// Default PATH of workers (nothing of the daemon's environment reaches them).
pub const WORKER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What to run for one worker.
#[derive(Debug, Clone)]
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
    /// The launcher executable: an ipclusterd binary (`/proc/self/exe` in the daemon).
    pub launcher: PathBuf,
}

/// A launcher held at its gate: forked, not yet running the worker's command.
#[derive(Debug)]
pub struct Gated {
    pub pid: u32,
    /// `None` once released.
    pidfd: Option<OwnedFd>,
    gate: Option<OwnedFd>,
}

/// Forks the launcher for `spec`, held at its gate. Closing the [`Gated`] without
/// [`Gated::release`] makes the launcher exit without running anything.
pub fn spawn_gated(spec: &SpawnSpec) -> io::Result<Gated> {
    let (gate_r, gate_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    let mut cmd = Command::new(&spec.launcher);
    cmd.arg0("ipclusterd-launch")
        .arg(crate::launcher::ARG)
        .arg(&spec.identifier)
        .arg(&spec.unit)
        .arg("--")
        .args(spec.argv.iter().map(OsString::from))
        .env_clear()
        .env("PATH", WORKER_PATH)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some((uid, gid)) = spec.user {
        // std drops supplementary groups when it changes the uid as root.
        cmd.uid(uid).gid(gid);
    }
    let gate_raw = gate_r.as_raw_fd();
    let nofile = WORKER_NOFILE.get().copied();
    // SAFETY: only async-signal-safe calls between fork and exec: dup2, fcntl, setsid, setrlimit.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(lim) = &nofile {
                libc::setrlimit(libc::RLIMIT_NOFILE, lim);
            }
            // The gate's read end becomes fd 3. dup2 clears CLOEXEC on the copy, but when the
            // pipe already is fd 3, dup2 does nothing and the flag must be cleared by hand.
            if gate_raw == crate::launcher::GATE_FD {
                if libc::fcntl(gate_raw, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(gate_raw, crate::launcher::GATE_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            // Its own session: a worker never shares the daemon's process group or terminal.
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(gate_r);
    let pid = child.id();
    // The child cannot have been reaped (only we wait for it), so the PID is still ours.
    let pidfd = rustix::process::pidfd_open(pid_of(pid)?, PidfdFlags::empty())?;
    drop(child);
    Ok(Gated { pid, pidfd: Some(pidfd), gate: Some(gate_w) })
}

impl Gated {
    /// Lets the launcher go on to run the worker's command.
    pub fn release(mut self) -> io::Result<OwnedFd> {
        let gate = self.gate.take().ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))?;
        fs::File::from(gate).write_all(b"1")?;
        self.pidfd.take().ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))
    }
}

impl Drop for Gated {
    /// Not released: closing the gate makes the launcher exit at once (it is blocked reading
    /// it), and it is reaped here so no zombie is left behind.
    fn drop(&mut self) {
        drop(self.gate.take());
        if let Some(pidfd) = self.pidfd.take() {
            let _ = rustix::process::waitid(WaitId::PidFd(pidfd.as_fd()), WaitIdOptions::EXITED);
        }
    }
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

/// Duplicates into this process the listening sockets of `pid`'s tree on `ports` (pidfd_getfd,
/// Linux 5.6). Held by the daemon, a listening socket outlives a crashed worker: connections
/// that arrive before the rules move its band queue there instead of being refused.
pub fn grab_listeners(pid: u32, ports: &[u16]) -> Vec<(u16, OwnedFd)> {
    // Each socket is duplicated and asked directly (SO_ACCEPTCONN, getsockname): cheaper than
    // /proc/net/tcp, which walks the kernel's whole TCP hash table.
    let mut out: Vec<(u16, OwnedFd)> = Vec::new();
    for p in process_tree(pid) {
        let Ok(fds) = fs::read_dir(format!("/proc/{p}/fd")) else { continue };
        let Ok(pidfd) = adopt(p) else { continue };
        for fd in fds.flatten() {
            let is_socket =
                fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:["));
            let Some(num) = fd.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
            if !is_socket {
                continue;
            }
            let Ok(dup) =
                rustix::process::pidfd_getfd(&pidfd, num, rustix::process::PidfdGetfdFlags::empty())
            else {
                continue;
            };
            let listening = rustix::net::sockopt::socket_acceptconn(&dup).unwrap_or(false);
            let port = rustix::net::getsockname(&dup).ok().and_then(|a| {
                use rustix::net::SocketAddrAny;
                let a: SocketAddrAny = a;
                std::net::SocketAddr::try_from(a).ok().map(|a| a.port())
            });
            match port {
                Some(port) if listening && ports.contains(&port) && !out.iter().any(|(p, _)| *p == port) => {
                    out.push((port, dup));
                }
                _ => drop(dup),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grabs_only_listening_sockets_on_the_given_ports() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(other.local_addr().unwrap()).unwrap();
        let grabbed = grab_listeners(std::process::id(), &[port]);
        assert_eq!(grabbed.len(), 1, "{grabbed:?}");
        assert_eq!(grabbed[0].0, port);
        // The duplicate is the same listening socket: it accepts what was queued for the original.
        drop(listener);
        let _c =
            std::net::TcpStream::connect(("127.0.0.1", port)).expect("still listening through the duplicate");
        let dup = std::net::TcpListener::from(grabbed.into_iter().next().unwrap().1);
        assert!(dup.accept().is_ok());
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
