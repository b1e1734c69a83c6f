//! [`FakeProcesses`]: processes that exist only in memory, and the [`Spawner`] side of them
//! (fork at the gate, release, signals, renice). How a fake worker behaves is read from its
//! command (`argv[0]`):
//! - `serve`: listens as soon as it is released (its readiness probe succeeds);
//! - `hang`: never listens;
//! - `exit N`: exits with status N as soon as it is released;
//! - `stubborn`: like `serve`, but ignores SIGTERM (SIGKILL still ends it);
//! - anything else: like `hang` (a `ready = "notify"` worker is made ready by a notification).
//!
//! Its [`crate::processes::Inspector`] side is in `inspect.rs`, its
//! [`crate::processes::Sampler`] side in `sample.rs`.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    os::fd::OwnedFd,
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::sync::watch;

use super::lock;
use crate::{
    clock::{Clock, usec},
    process::{Exit, SpawnSpec},
    processes::{Gated, Spawner},
};

/// One fake process.
#[derive(Debug)]
pub struct FakeProc {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub parent: Option<u32>,
    /// Its cgroup: the scope's until it is isolated.
    pub cgroup: String,
    pub start_usec: u64,
    pub nice: i32,
    /// How long it was to wait after its release.
    pub delay: std::time::Duration,
    pub rss: u64,
    pub connections: u32,
    pub released: bool,
    /// The sockets it was handed (socket mode), in `listen` order.
    pub(super) sockets: Vec<OwnedFd>,
    pub(super) listening: watch::Sender<bool>,
    pub(super) exit: watch::Sender<Option<Exit>>,
}

impl FakeProc {
    fn new(argv: Vec<String>, env: Vec<(String, String)>, start_usec: u64) -> Self {
        Self {
            argv,
            env,
            parent: None,
            cgroup: "/fake.scope".into(),
            start_usec,
            nice: 0,
            delay: std::time::Duration::ZERO,
            rss: 10 << 20,
            connections: 0,
            released: false,
            sockets: Vec::new(),
            listening: watch::channel(false).0,
            exit: watch::channel(None).0,
        }
    }

    pub(super) fn behaviour(&self) -> &str {
        self.argv.first().map_or("", String::as_str)
    }
}

#[derive(Debug)]
pub(super) struct ProcWorld {
    pub(super) clock: Arc<dyn Clock>,
    pub(super) next_pid: u32,
    pub(super) procs: BTreeMap<u32, FakeProc>,
    pub(super) spawned: Vec<(u32, tokio::time::Instant)>,
    pub(super) signals: Vec<(u32, i32)>,
    pub(super) busy_ports: BTreeSet<u16>,
}

/// Processes that exist only in memory; see the module docs for how a command behaves.
#[derive(Debug, Clone)]
pub struct FakeProcesses {
    world: Arc<Mutex<ProcWorld>>,
}

impl FakeProcesses {
    /// No processes yet; start times come from `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        let world = ProcWorld {
            clock,
            next_pid: 1000,
            procs: BTreeMap::new(),
            spawned: Vec::new(),
            signals: Vec::new(),
            busy_ports: BTreeSet::new(),
        };
        Self { world: Arc::new(Mutex::new(world)) }
    }

    pub(super) fn world(&self) -> MutexGuard<'_, ProcWorld> {
        lock(&self.world)
    }

    /// A process that was already running (a worker a previous daemon started), released.
    pub fn existing(&self, argv: &[&str], env: &[(&str, String)]) -> u32 {
        let mut w = self.world();
        let pid = w.next_pid;
        w.next_pid += 1;
        let now = usec(w.clock.wall());
        let env = env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
        let mut p = FakeProc::new(argv.iter().map(|a| (*a).to_owned()).collect(), env, now);
        p.released = true;
        p.listening.send_replace(true);
        w.procs.insert(pid, p);
        pid
    }

    /// Ends `pid` with `exit` (nothing happens if it already ended).
    pub fn exit(&self, pid: u32, exit: Exit) {
        if let Some(p) = self.world().procs.get_mut(&pid) {
            // A process that ends closes what it held.
            p.sockets.clear();
            p.exit.send_if_modified(|e| e.is_none() && e.replace(exit).is_none());
        }
    }

    /// The environment `pid` was started with.
    pub fn env(&self, pid: u32) -> Vec<(String, String)> {
        self.world().procs.get(&pid).map(|p| p.env.clone()).unwrap_or_default()
    }

    /// The cookies of the sockets `pid` was handed (socket mode), in `listen` order.
    pub fn socket_cookies(&self, pid: u32) -> Vec<u64> {
        let w = self.world();
        let Some(p) = w.procs.get(&pid) else { return Vec::new() };
        p.sockets.iter().map(|s| rustix::fs::fstat(s).map_or(0, |st| st.st_ino)).collect()
    }

    /// A child of `pid` in the same cgroup (a worker's helper process), running, ignoring SIGTERM.
    pub fn fork(&self, pid: u32) -> u32 {
        let mut w = self.world();
        let child = w.next_pid;
        w.next_pid += 1;
        let Some(parent) = w.procs.get(&pid) else { return child };
        // It ignores SIGTERM: only stopping its worker's whole cgroup ends it.
        let mut p = FakeProc::new(vec!["stubborn".into()], parent.env.clone(), parent.start_usec);
        (p.parent, p.cgroup, p.released) = (Some(pid), parent.cgroup.clone(), true);
        w.procs.insert(child, p);
        child
    }

    /// Rewrites what `pid` says about itself (a worker that re-execs with a forged environment).
    pub fn set_env(&self, pid: u32, env: &[(&str, String)]) {
        if let Some(p) = self.world().procs.get_mut(&pid) {
            p.env = env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
        }
    }

    /// Puts an existing process in `cgroup` (a worker a previous daemon isolated).
    pub fn set_cgroup(&self, pid: u32, cgroup: &str) {
        if let Some(p) = self.world().procs.get_mut(&pid) {
            p.cgroup = cgroup.to_owned();
        }
    }

    /// The running processes of `cgroup`.
    pub(super) fn in_cgroup(&self, cgroup: &str) -> Vec<u32> {
        let w = self.world();
        w.procs
            .iter()
            .filter(|(_, p)| p.cgroup == cgroup && p.exit.borrow().is_none())
            .map(|(pid, _)| *pid)
            .collect()
    }

    /// The cgroup of `pid`.
    pub fn cgroup(&self, pid: u32) -> String {
        self.world().procs.get(&pid).map(|p| p.cgroup.clone()).unwrap_or_default()
    }

    /// Every process ever spawned through the gate: pid and when.
    pub fn spawned(&self) -> Vec<(u32, tokio::time::Instant)> {
        self.world().spawned.clone()
    }

    /// Every signal sent: pid and signal number.
    pub fn signals(&self) -> Vec<(u32, i32)> {
        self.world().signals.clone()
    }

    /// How long `pid` was to wait after its release.
    pub fn delay(&self, pid: u32) -> std::time::Duration {
        self.world().procs.get(&pid).map_or(std::time::Duration::ZERO, |p| p.delay)
    }

    /// The nice value of `pid`.
    pub fn nice(&self, pid: u32) -> i32 {
        self.world().procs.get(&pid).map_or(0, |p| p.nice)
    }

    /// The argv `pid` was started with.
    pub fn argv(&self, pid: u32) -> Vec<String> {
        self.world().procs.get(&pid).map(|p| p.argv.clone()).unwrap_or_default()
    }

    /// Whether `pid` is still running.
    pub fn alive(&self, pid: u32) -> bool {
        self.world().procs.get(&pid).is_some_and(|p| p.exit.borrow().is_none())
    }

    fn release(&self, pid: u32) -> io::Result<u32> {
        let mut w = self.world();
        let p = w.procs.get_mut(&pid).ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
        p.released = true;
        match p.behaviour() {
            // A notify worker listens too (on its ports, in NAT mode); "notify-late" only later.
            "serve" | "stubborn" | "notify" => {
                p.listening.send_replace(true);
            }
            "exit" => {
                let code = p.argv.get(1).and_then(|c| c.parse().ok()).unwrap_or(1);
                p.exit.send_replace(Some(Exit::Code(code)));
            }
            _ => {}
        }
        Ok(pid)
    }
}

/// A fake worker at its gate.
#[derive(Debug)]
pub struct FakeGated {
    pid: u32,
    processes: FakeProcesses,
    released: bool,
}

impl Gated for FakeGated {
    type Handle = u32;
    fn pid(&self) -> u32 {
        self.pid
    }
    fn release(mut self) -> io::Result<u32> {
        self.released = true;
        self.processes.release(self.pid)
    }
}

impl Drop for FakeGated {
    /// Never released: the child exits without running anything, as the real one does.
    fn drop(&mut self) {
        if !self.released {
            self.processes.exit(self.pid, Exit::Code(127));
        }
    }
}

impl Spawner for FakeProcesses {
    type Handle = u32;
    type Gated = FakeGated;

    fn spawn(&self, spec: &SpawnSpec) -> io::Result<FakeGated> {
        let mut w = self.world();
        let pid = w.next_pid;
        w.next_pid += 1;
        let now = usec(w.clock.wall());
        let mut p = FakeProc::new(spec.argv.clone(), spec.env.clone(), now);
        p.delay = spec.delay;
        p.sockets = spec.fds.iter().map(OwnedFd::try_clone).collect::<io::Result<_>>()?;
        w.procs.insert(pid, p);
        w.spawned.push((pid, tokio::time::Instant::now()));
        Ok(FakeGated { pid, processes: self.clone(), released: false })
    }
    fn isolate(&self, pid: u32) -> io::Result<String> {
        let mut w = self.world();
        let p = w.procs.get_mut(&pid).ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
        p.cgroup = format!("{}/worker-{pid}", p.cgroup);
        Ok(p.cgroup.clone())
    }
    fn user(&self, name: &str) -> Result<(u32, u32), String> {
        if name == "app" { Ok((1000, 1000)) } else { Err(format!("user {name:?} does not exist")) }
    }
    fn adopt(&self, pid: u32) -> io::Result<u32> {
        if self.alive(pid) { Ok(pid) } else { Err(io::Error::from_raw_os_error(libc::ESRCH)) }
    }
    fn wait(&self, process: &u32) -> impl std::future::Future<Output = Exit> + Send + 'static {
        let rx = self.world().procs.get(process).map(|p| p.exit.subscribe());
        async move {
            let Some(mut rx) = rx else { return Exit::Unknown };
            match rx.wait_for(Option::is_some).await {
                Ok(e) => e.clone().unwrap_or(Exit::Unknown),
                Err(_) => Exit::Unknown,
            }
        }
    }
    fn signal(&self, process: &u32, sig: i32) -> io::Result<()> {
        let stubborn = {
            let mut w = self.world();
            w.signals.push((*process, sig));
            w.procs.get(process).is_some_and(|p| p.behaviour() == "stubborn")
        };
        let ends = sig == libc::SIGKILL || (matches!(sig, libc::SIGTERM | libc::SIGINT) && !stubborn);
        if ends {
            self.exit(*process, Exit::Signal(sig));
        }
        Ok(())
    }
    fn signal_all(&self, process: &u32, cgroup: Option<&str>, sig: i32) {
        let pids: Vec<u32> = match cgroup {
            Some(c) => self.in_cgroup(c),
            None => vec![*process],
        };
        for pid in pids {
            let _ = self.signal(&pid, sig);
        }
    }
    fn kill_cgroup(&self, cgroup: &str) {
        for pid in self.in_cgroup(cgroup) {
            let _ = self.signal(&pid, libc::SIGKILL);
        }
    }
    fn renice_tree(&self, pid: u32, nice: i32) -> io::Result<()> {
        let mut w = self.world();
        let p = w.procs.get_mut(&pid).ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
        p.nice = nice;
        Ok(())
    }
    fn own_nice(&self) -> i32 {
        0
    }
}
