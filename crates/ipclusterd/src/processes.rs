//! [`Processes`]: the host's processes and ports, as the supervisor uses them — forking workers
//! through the launcher's gate, holding them by pidfd, signals, renice, reading /proc, the
//! readiness probe and sampling. [`Host`] is the real implementation (on [`crate::process`] and
//! [`crate::sampler`]); the supervisor's unit tests use a fake, so its rules (adoption, respawn,
//! the memory and watchdog policies, paced spawning) are tested without root or real processes.

use std::{
    future::Future,
    io,
    net::{Ipv4Addr, SocketAddr},
    os::fd::OwnedFd,
    sync::Arc,
    time::Duration,
};

use crate::{
    process::{self, Exit, SpawnSpec},
    sampler::{self, Sample},
};

/// A launcher forked and held at its gate (see `launcher.rs`): it runs nothing until released,
/// and dropping it unreleased makes it exit.
pub trait Gated: Send + std::fmt::Debug {
    /// A handle to the running process.
    type Handle;
    fn pid(&self) -> u32;
    /// Lets it run the worker's command.
    fn release(self) -> io::Result<Self::Handle>;
}

/// What the supervisor needs of the host's processes. Everything about a process goes through
/// its [`Processes::Handle`] (a pidfd), so a recycled PID is never signalled by mistake; reads
/// by PID (`/proc`) are for display and adoption only.
pub trait Processes: Clone + Send + Sync + std::fmt::Debug + 'static {
    /// A process the supervisor holds (the real one: a pidfd).
    type Handle: Clone + Send + Sync + std::fmt::Debug + 'static;
    type Gated: Gated<Handle = Self::Handle>;

    /// Forks the launcher for `spec`, held at its gate.
    fn spawn(&self, spec: &SpawnSpec) -> io::Result<Self::Gated>;
    /// Takes hold of a process the daemon did not start (adoption).
    fn adopt(&self, pid: u32) -> io::Result<Self::Handle>;
    /// Resolves when the process ends (reaping it if it is our child).
    fn wait(&self, process: &Self::Handle) -> impl Future<Output = Exit> + Send + 'static;
    /// Sends signal `sig`; a process that is already gone is not an error.
    fn signal(&self, process: &Self::Handle, sig: i32) -> io::Result<()>;
    /// Sets the nice value of every thread of `pid`'s tree. Idempotent.
    fn renice_tree(&self, pid: u32, nice: i32) -> io::Result<()>;
    /// The daemon's own nice value (workers start with it).
    fn own_nice(&self) -> i32;
    /// The nice value of `pid`'s main thread.
    fn nice_of(&self, pid: u32) -> Option<i32>;
    /// When `pid` started, µs since the epoch (the kernel's answer: the same after a restart).
    fn start_time_usec(&self, pid: u32) -> Option<u64>;
    /// Takes hold of `pid` and reads what it says about itself, in an order that cannot mix two
    /// processes: the handle first, then /proc, then a check that the start time did not change
    /// (so a PID recycled meanwhile is never taken for the process it replaced).
    fn inspect(&self, pid: u32) -> Option<(Self::Handle, Inspected)>;
    /// Moves a gated launcher into a cgroup of its own below its scope; returns its path.
    fn isolate(&self, pid: u32) -> io::Result<String>;
    /// Sends `sig` to every process of a worker: its cgroup's, or (a worker adopted from a daemon
    /// that did not isolate workers) its main process alone.
    fn signal_all(&self, process: &Self::Handle, cgroup: Option<&str>, sig: i32);
    /// SIGKILLs every process left in a worker's cgroup and removes it.
    fn kill_cgroup(&self, cgroup: &str);
    /// RSS (bytes) and CPU time (µs) of `pid`'s tree, read now.
    fn usage(&self, pid: u32) -> (u64, u64);
    /// Duplicates of the listening sockets on `ports` held by the worker's processes (its
    /// cgroup's, else `pid`'s tree).
    fn listeners(&self, pid: u32, cgroup: Option<&str>, ports: &[u16]) -> Vec<(u16, OwnedFd)>;
    /// Duplicates of the listening sockets bound to exactly `addrs` held by the worker's
    /// processes (socket mode: the sockets the daemon handed it, taken back after a restart).
    fn sockets(&self, pid: u32, cgroup: Option<&str>, addrs: &[SocketAddr]) -> Vec<(SocketAddr, OwnedFd)>;
    /// uid and primary gid of a user.
    fn user(&self, name: &str) -> Result<(u32, u32), String>;
    /// Whether nothing holds `port` (a worker must be able to bind it).
    fn port_is_free(&self, port: u16) -> bool;
    /// Resolves once the worker's own processes listen on every one of `ports` (TCP readiness).
    /// A listener of anyone else on those ports never makes a worker ready.
    fn probe(
        &self,
        pid: u32,
        cgroup: Option<String>,
        ports: Vec<u16>,
    ) -> impl Future<Output = ()> + Send + 'static;
    /// One sampling round (blocking: it reads many small files): RSS and CPU of each `(id, pid)`
    /// tree; `scopes` are the (slice, scope) units whose processes to read.
    fn sample(&self, scopes: &[(String, String)], workers: &[(u64, u32)]) -> Vec<(u64, Sample)>;
    /// Established connections of each `(id, pid)` tree (blocking, costly: on demand only).
    fn connections(&self, workers: &[(u64, u32)]) -> Vec<(u64, u32)>;
}

/// What a process says about itself (adoption reads it, and checks it against the saved state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspected {
    pub env: Vec<(String, String)>,
    /// Its cgroup2 path.
    pub cgroup: String,
    pub parent: Option<u32>,
    pub start_usec: u64,
}

/// The real host: fork, pidfds, /proc, TCP.
#[derive(Debug, Clone, Copy, Default)]
pub struct Host;

impl Gated for process::Gated {
    type Handle = Arc<OwnedFd>;
    fn pid(&self) -> u32 {
        self.pid
    }
    fn release(self) -> io::Result<Arc<OwnedFd>> {
        process::Gated::release(self).map(Arc::new)
    }
}

impl Processes for Host {
    type Handle = Arc<OwnedFd>;
    type Gated = process::Gated;

    fn spawn(&self, spec: &SpawnSpec) -> io::Result<process::Gated> {
        process::spawn_gated(spec)
    }
    fn adopt(&self, pid: u32) -> io::Result<Arc<OwnedFd>> {
        process::adopt(pid).map(Arc::new)
    }
    fn wait(&self, process: &Arc<OwnedFd>) -> impl Future<Output = Exit> + Send + 'static {
        process::wait_exit(process.clone())
    }
    fn signal(&self, process: &Arc<OwnedFd>, sig: i32) -> io::Result<()> {
        process::signal(process, sig)
    }
    fn renice_tree(&self, pid: u32, nice: i32) -> io::Result<()> {
        process::renice_tree(pid, nice)
    }
    fn own_nice(&self) -> i32 {
        process::own_nice()
    }
    fn nice_of(&self, pid: u32) -> Option<i32> {
        process::nice_of(pid)
    }
    fn start_time_usec(&self, pid: u32) -> Option<u64> {
        process::start_time_usec(pid)
    }
    fn inspect(&self, pid: u32) -> Option<(Arc<OwnedFd>, Inspected)> {
        let handle = process::adopt(pid).ok()?;
        let start_usec = process::start_time_usec(pid)?;
        let inspected = Inspected {
            env: process::environ(pid)?,
            cgroup: process::cgroup_of(pid)?,
            parent: process::parent(pid),
            start_usec,
        };
        // Still the same process: alive (the handle says) and started when it did.
        if !process::alive(&handle) {
            return None;
        }
        (process::start_time_usec(pid)? == start_usec).then(|| (Arc::new(handle), inspected))
    }
    fn isolate(&self, pid: u32) -> io::Result<String> {
        process::isolate(pid)
    }
    fn signal_all(&self, process: &Arc<OwnedFd>, cgroup: Option<&str>, sig: i32) {
        match cgroup {
            Some(c) => process::signal_cgroup(c, sig),
            None => {
                let _ = process::signal(process, sig);
            }
        }
    }
    fn kill_cgroup(&self, cgroup: &str) {
        process::kill_cgroup(cgroup);
    }
    fn usage(&self, pid: u32) -> (u64, u64) {
        process::usage_of_tree(pid)
    }
    fn listeners(&self, pid: u32, cgroup: Option<&str>, ports: &[u16]) -> Vec<(u16, OwnedFd)> {
        let pids = match cgroup {
            Some(c) => process::cgroup_procs(c),
            None => process::process_tree(pid),
        };
        process::grab_listeners(&pids, ports)
    }
    fn sockets(&self, pid: u32, cgroup: Option<&str>, addrs: &[SocketAddr]) -> Vec<(SocketAddr, OwnedFd)> {
        let pids = match cgroup {
            Some(c) => process::cgroup_procs(c),
            None => process::process_tree(pid),
        };
        process::grab_bound(&pids, addrs)
    }
    fn user(&self, name: &str) -> Result<(u32, u32), String> {
        process::lookup_user(name)
    }
    fn port_is_free(&self, port: u16) -> bool {
        std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok()
    }
    #[allow(
        clippy::manual_async_fn,
        reason = "the future must not borrow self: it runs in a task of its own"
    )]
    fn probe(
        &self,
        pid: u32,
        cgroup: Option<String>,
        ports: Vec<u16>,
    ) -> impl Future<Output = ()> + Send + 'static {
        // Ownership, not a connection: a program that bound the port first would accept a
        // connection too, and a connect can reach itself (simultaneous open) on a free port.
        async move {
            while Host.listeners(pid, cgroup.as_deref(), &ports).len() < ports.len() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    fn sample(&self, scopes: &[(String, String)], workers: &[(u64, u32)]) -> Vec<(u64, Sample)> {
        let dirs: Vec<std::path::PathBuf> = scopes
            .iter()
            // systemd puts ipcluster-<app>.slice below ipcluster.slice.
            .map(|(slice, scope)| process::cgroup_dir(&format!("/ipcluster.slice/{slice}/{scope}")))
            .collect();
        sampler::sample(&dirs, workers)
    }
    fn connections(&self, workers: &[(u64, u32)]) -> Vec<(u64, u32)> {
        sampler::connections(workers)
    }
}
