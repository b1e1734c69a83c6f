//! The host's processes and ports, as the supervisor uses them, split by what callers need:
//! [`Spawner`] (forking workers held at a gate, holding them by pidfd, signals,
//! renice), [`Inspector`] (what a process holds and says: adoption, the readiness probe, port
//! checks) and [`Sampler`] (memory and CPU). [`Host`] is the real implementation of all three
//! (on [`crate::process`] and [`crate::sampler`]); the supervisor's unit tests use fakes, so
//! its rules (adoption, respawn, the memory and watchdog policies, paced spawning) are tested
//! without root or real processes.

use std::{future::Future, io, net::SocketAddr, os::fd::OwnedFd, sync::Arc, time::Duration};

use crate::{
    process::{self, Exit, SpawnSpec},
    sampler::{self, Sample},
};

/// A worker forked and held at its gate (see `process/spawn.rs`): it runs nothing until released,
/// and dropping it unreleased makes it exit.
pub trait Gated: Send + std::fmt::Debug {
    /// A handle to the running process.
    type Handle;
    fn pid(&self) -> u32;
    /// Lets it run the worker's command.
    fn release(self) -> io::Result<Self::Handle>;
}

/// Starting and holding workers: forking through the gate, pidfds, signals, renice. Everything
/// about a process goes through its [`Spawner::Handle`] (a pidfd), so a recycled PID is never
/// signalled by mistake.
pub trait Spawner: Clone + Send + Sync + std::fmt::Debug + 'static {
    /// A process the supervisor holds (the real one: a pidfd).
    type Handle: Clone + Send + Sync + std::fmt::Debug + 'static;
    type Gated: Gated<Handle = Self::Handle>;

    /// Forks the worker for `spec`, held at its gate.
    fn spawn(&self, spec: &SpawnSpec) -> io::Result<Self::Gated>;
    /// Moves a gated child into a cgroup of its own below its scope; returns its path.
    fn isolate(&self, pid: u32) -> io::Result<String>;
    /// uid and primary gid of a user.
    fn user(&self, name: &str) -> Result<(u32, u32), String>;
    /// Takes hold of a process the daemon did not start (adoption).
    fn adopt(&self, pid: u32) -> io::Result<Self::Handle>;
    /// Resolves when the process ends (reaping it if it is our child).
    fn wait(&self, process: &Self::Handle) -> impl Future<Output = Exit> + Send + 'static;
    /// Sends signal `sig`; a process that is already gone is not an error.
    fn signal(&self, process: &Self::Handle, sig: i32) -> io::Result<()>;
    /// Sends `sig` to every process of a worker: its cgroup's, or (a worker adopted from a daemon
    /// that did not isolate workers) its main process alone.
    fn signal_all(&self, process: &Self::Handle, cgroup: Option<&str>, sig: i32);
    /// SIGKILLs every process left in a worker's cgroup and removes it.
    fn kill_cgroup(&self, cgroup: &str);
    /// Sets the nice value of every thread of `pid`'s tree. Idempotent.
    fn renice_tree(&self, pid: u32, nice: i32) -> io::Result<()>;
    /// The daemon's own nice value (workers start with it).
    fn own_nice(&self) -> i32;
}

/// Reading what a process holds and says about itself: adoption, readiness, port checks. Reads
/// by PID (`/proc`) are for display and adoption only; [`Inspector::inspect`] takes the handle
/// first so a recycled PID is never taken for the process it replaced.
pub trait Inspector: Clone + Send + Sync + std::fmt::Debug + 'static {
    /// The handle [`Inspector::inspect`] takes (the [`Spawner`]'s).
    type Handle;

    /// Takes hold of `pid` and reads what it says about itself, in an order that cannot mix two
    /// processes: the handle first, then /proc, then a check that the start time did not change
    /// (so a PID recycled meanwhile is never taken for the process it replaced).
    fn inspect(&self, pid: u32) -> Option<(Self::Handle, Inspected)>;
    /// When `pid` started, µs since the epoch (the kernel's answer: the same after a restart).
    fn start_time_usec(&self, pid: u32) -> Option<u64>;
    /// The nice value of `pid`'s main thread.
    fn nice_of(&self, pid: u32) -> Option<i32>;
    /// Duplicates of the listening sockets on `ports` held by the worker's processes (its
    /// cgroup's, else `pid`'s tree).
    fn listeners(&self, pid: u32, cgroup: Option<&str>, ports: &[u16]) -> Vec<(u16, OwnedFd)>;
    /// Duplicates of the listening sockets bound to exactly `addrs` held by the worker's
    /// processes (socket mode: the sockets the daemon handed it, taken back after a restart).
    fn sockets(&self, pid: u32, cgroup: Option<&str>, addrs: &[SocketAddr]) -> Vec<(SocketAddr, OwnedFd)>;
    /// Whether nothing holds `port`, in either address family (a worker must be able to bind it).
    fn port_is_free(&self, port: u16) -> bool;
    /// Who else listens on `ports` (not the processes of `worker`, a pid and its cgroup, when
    /// given): "`[::]:30001` (uid 999, ipcsquat)", for the messages of a failed deploy.
    fn port_holders(&self, worker: Option<(u32, Option<&str>)>, ports: &[u16]) -> Vec<String>;
    /// Resolves once the worker's own processes listen on every one of its `ports` (public
    /// address, worker port), each in every address family the app routes to it (TCP
    /// readiness). A listener of anyone else on those ports never makes a worker ready. Each
    /// check runs off the caller's thread and reads a bounded number of descriptors.
    fn probe(
        &self,
        pid: u32,
        cgroup: Option<String>,
        ports: Vec<(SocketAddr, u16)>,
    ) -> impl Future<Output = ()> + Send + 'static;
}

/// Memory and CPU of workers' process trees.
pub trait Sampler: Clone + Send + Sync + std::fmt::Debug + 'static {
    /// One sampling round (blocking: it reads many small files): RSS and CPU of each `(id, pid)`
    /// tree; `scopes` are the (slice, scope) units whose processes to read.
    fn sample(&self, scopes: &[(String, String)], workers: &[(u64, u32)]) -> Vec<(u64, Sample)>;
    /// Established connections of each `(id, pid)` tree (blocking, costly: on demand only).
    fn connections(&self, workers: &[(u64, u32)]) -> Vec<(u64, u32)>;
    /// RSS (bytes) and CPU time (µs) of `pid`'s tree, read now.
    fn usage(&self, pid: u32) -> (u64, u64);
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

/// Readiness scans running at once, each on a blocking thread.
static PROBE_SCANS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

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

impl Spawner for Host {
    type Handle = Arc<OwnedFd>;
    type Gated = process::Gated;

    fn spawn(&self, spec: &SpawnSpec) -> io::Result<process::Gated> {
        process::spawn_gated(spec)
    }
    fn isolate(&self, pid: u32) -> io::Result<String> {
        process::isolate(pid)
    }
    fn user(&self, name: &str) -> Result<(u32, u32), String> {
        process::lookup_user(name)
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
    fn renice_tree(&self, pid: u32, nice: i32) -> io::Result<()> {
        process::renice_tree(pid, nice)
    }
    fn own_nice(&self) -> i32 {
        process::own_nice()
    }
}

impl Inspector for Host {
    type Handle = Arc<OwnedFd>;

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
    fn start_time_usec(&self, pid: u32) -> Option<u64> {
        process::start_time_usec(pid)
    }
    fn nice_of(&self, pid: u32) -> Option<i32> {
        process::nice_of(pid)
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
    fn port_is_free(&self, port: u16) -> bool {
        process::port_is_free(port)
    }
    fn port_holders(&self, worker: Option<(u32, Option<&str>)>, ports: &[u16]) -> Vec<String> {
        let pids = match worker {
            Some((_, Some(c))) => process::cgroup_procs(c),
            Some((pid, None)) => process::process_tree(pid),
            None => Vec::new(),
        };
        process::port_holders(&pids, ports)
    }
    #[allow(
        clippy::manual_async_fn,
        reason = "the future must not borrow self: it runs in a task of its own"
    )]
    fn probe(
        &self,
        pid: u32,
        cgroup: Option<String>,
        ports: Vec<(SocketAddr, u16)>,
    ) -> impl Future<Output = ()> + Send + 'static {
        // Ownership, not a connection: a program that bound the port first would accept a
        // connection too, and a connect can reach itself (simultaneous open) on a free port.
        // Each family the app routes to a port must be taken by the worker's own listener: a
        // user holding the other half (`[::]:P` with IPV6_V6ONLY beside the worker's
        // `0.0.0.0:P`) would otherwise get that family's clients.
        let want: Vec<(u16, process::Families)> =
            ports.iter().map(|(public, port)| (*port, process::Families::routed(public))).collect();
        let numbers: Vec<u16> = want.iter().map(|(p, _)| *p).collect();
        async move {
            loop {
                // Off the runtime's thread: /proc reads of a worker's descriptors (bounded), at
                // most PROBE_SCANS at a time (a deploy of 1024 workers starts 1024 probes).
                let have = {
                    let Ok(_permit) = PROBE_SCANS.acquire().await else { return };
                    let (cgroup2, numbers2) = (cgroup.clone(), numbers.clone());
                    tokio::task::spawn_blocking(move || {
                        let pids = match &cgroup2 {
                            Some(c) => process::cgroup_procs(c),
                            None => process::process_tree(pid),
                        };
                        process::coverage(&pids, &numbers2)
                    })
                    .await
                };
                if let Ok(have) = have
                    && want.iter().all(|(p, f)| have.get(p).is_some_and(|h| h.covers(*f)))
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

impl Sampler for Host {
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
    fn usage(&self, pid: u32) -> (u64, u64) {
        process::usage_of_tree(pid)
    }
}
