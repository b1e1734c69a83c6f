//! Test doubles of the supervisor's seams: [`FakeScopes`], [`FakeRouter`] and [`FakeProcesses`].
//! They record what the supervisor asked for and let a test play the world's part (a worker
//! that becomes ready, exits, grows, stops sending WATCHDOG=1). The sandboxed end-to-end tests
//! prove the real implementations; these make the supervisor's rules testable in milliseconds,
//! without root and without real processes, under tokio's paused time.
//!
//! [`FakeProcesses`] reads a worker's behaviour from its command (`argv[0]`):
//! - `serve`: listens as soon as it is released (its readiness probe succeeds);
//! - `hang`: never listens;
//! - `exit N`: exits with status N as soon as it is released;
//! - `stubborn`: like `serve`, but ignores SIGTERM (SIGKILL still ends it);
//! - anything else: like `hang` (a `ready = "notify"` worker is made ready by a notification).

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    os::fd::OwnedFd,
    sync::{Arc, Mutex, MutexGuard},
};

use ipcluster_core::routing::{AppRoute, Existing};
use tokio::sync::watch;

use crate::{
    clock::{Clock, usec},
    netfilter::{Applied, Router, RouterError},
    process::{Exit, SpawnSpec},
    processes::{Gated, Inspected, Processes},
    sampler::Sample,
    scopes::{ScopeError, ScopeSpec, Scopes},
};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Scopes kept in memory. Stopping one ends its processes, as systemd would; when the scopes
/// hold real processes (pidfds given with [`FakeScopes::with_pidfds`]), they are SIGKILLed.
#[derive(Debug, Clone, Default)]
pub struct FakeScopes {
    pub units: Arc<Mutex<BTreeMap<String, Vec<u32>>>>,
    pub stopped: Arc<Mutex<Vec<String>>>,
    pub cpu_weights: Arc<Mutex<Vec<(String, u64)>>>,
    /// When set, stopping a scope ends its processes through this.
    pub processes: Option<FakeProcesses>,
    real: Arc<Mutex<BTreeMap<String, Vec<OwnedFd>>>>,
    kill_real: bool,
}

impl FakeScopes {
    /// Scopes whose processes are real: their pidfds are taken when they join, and stopping
    /// the scope SIGKILLs them (tests run side by side; a PID may be reused meanwhile).
    pub fn with_pidfds() -> Self {
        Self { kill_real: true, ..Self::default() }
    }

    /// Scopes of fake processes: stopping one makes them exit.
    pub fn of(processes: &FakeProcesses) -> Self {
        Self { processes: Some(processes.clone()), ..Self::default() }
    }

    fn joined(&self, unit: &str, pids: &[u32]) {
        lock(&self.units).entry(unit.to_owned()).or_default().extend(pids);
        if let Some(p) = &self.processes {
            for pid in pids {
                p.set_cgroup(*pid, &format!("/ipcluster.slice/{unit}"));
            }
        }
        if self.kill_real {
            let fds = pids.iter().filter_map(|p| crate::process::adopt(*p).ok());
            lock(&self.real).entry(unit.to_owned()).or_default().extend(fds);
        }
    }

    /// The names of the scopes that exist now.
    pub fn names(&self) -> Vec<String> {
        lock(&self.units).keys().cloned().collect()
    }
}

impl Scopes for FakeScopes {
    async fn start(&self, spec: &ScopeSpec) -> Result<(), ScopeError> {
        self.joined(&spec.unit, &spec.pids);
        Ok(())
    }
    async fn stop(&self, unit: &str) -> Result<(), ScopeError> {
        lock(&self.stopped).push(unit.to_owned());
        let pids = lock(&self.units).remove(unit).unwrap_or_default();
        for fd in lock(&self.real).remove(unit).unwrap_or_default() {
            let _ = crate::process::signal(&fd, libc::SIGKILL);
        }
        if let Some(p) = &self.processes {
            for pid in pids {
                p.exit(pid, Exit::Signal(libc::SIGKILL));
            }
        }
        Ok(())
    }
    async fn list(&self) -> Result<Vec<String>, ScopeError> {
        Ok(self.names())
    }
    async fn processes(&self, unit: &str) -> Result<Vec<(u32, String)>, ScopeError> {
        let pids = lock(&self.units).get(unit).cloned().unwrap_or_default();
        Ok(pids
            .into_iter()
            .map(|pid| (pid, self.processes.as_ref().map_or_else(|| "/fake.scope".into(), |p| p.cgroup(pid))))
            .collect())
    }
    async fn attach(&self, unit: &str, pids: &[u32]) -> Result<(), ScopeError> {
        self.joined(unit, pids);
        Ok(())
    }
    async fn set_cpu_weight(&self, unit: &str, weight: u64) -> Result<(), ScopeError> {
        lock(&self.cpu_weights).push((unit.to_owned(), weight));
        Ok(())
    }
}

/// Records every set of routes applied; [`Router::current`] answers with the last one, as the
/// kernel would. [`FakeRouter::unusable`] plays a host where netfilter cannot be used: `check`
/// and every call fail with that reason.
#[derive(Debug, Clone, Default)]
pub struct FakeRouter {
    pub applied: Arc<Mutex<Vec<Vec<AppRoute>>>>,
    pub unusable: Arc<Mutex<Option<String>>>,
}

impl FakeRouter {
    /// The routes now in force.
    pub fn last(&self) -> Vec<AppRoute> {
        lock(&self.applied).last().cloned().unwrap_or_default()
    }
}

impl Router for FakeRouter {
    async fn apply(&self, routes: &[AppRoute]) -> Result<Applied, RouterError> {
        self.check()?;
        let mut applied = lock(&self.applied);
        if applied.last().map(Vec::as_slice).unwrap_or_default() == routes {
            return Ok(Applied::Unchanged);
        }
        applied.push(routes.to_vec());
        Ok(Applied::Changed)
    }
    async fn current(&self) -> Result<Existing, RouterError> {
        self.check()?;
        Ok(Existing::after(&self.last()))
    }
    fn check(&self) -> Result<(), RouterError> {
        lock(&self.unusable).clone().map_or(Ok(()), |why| Err(RouterError(why)))
    }
}

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
    pub rss: u64,
    pub connections: u32,
    pub released: bool,
    /// The sockets it was handed (socket mode), in `listen` order.
    sockets: Vec<OwnedFd>,
    listening: watch::Sender<bool>,
    exit: watch::Sender<Option<Exit>>,
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
            rss: 10 << 20,
            connections: 0,
            released: false,
            sockets: Vec::new(),
            listening: watch::channel(false).0,
            exit: watch::channel(None).0,
        }
    }

    fn behaviour(&self) -> &str {
        self.argv.first().map_or("", String::as_str)
    }
}

#[derive(Debug)]
struct World {
    clock: Arc<dyn Clock>,
    next_pid: u32,
    procs: BTreeMap<u32, FakeProc>,
    spawned: Vec<(u32, tokio::time::Instant)>,
    signals: Vec<(u32, i32)>,
    busy_ports: BTreeSet<u16>,
}

/// Processes that exist only in memory; see the module docs for how a command behaves.
#[derive(Debug, Clone)]
pub struct FakeProcesses {
    world: Arc<Mutex<World>>,
}

impl FakeProcesses {
    /// No processes yet; start times come from `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        let world = World {
            clock,
            next_pid: 1000,
            procs: BTreeMap::new(),
            spawned: Vec::new(),
            signals: Vec::new(),
            busy_ports: BTreeSet::new(),
        };
        Self { world: Arc::new(Mutex::new(world)) }
    }

    fn world(&self) -> MutexGuard<'_, World> {
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
    fn in_cgroup(&self, cgroup: &str) -> Vec<u32> {
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

    /// Makes `pid` listen on its ports (its readiness probe succeeds).
    pub fn listen(&self, pid: u32) {
        if let Some(p) = self.world().procs.get(&pid) {
            p.listening.send_replace(true);
        }
    }

    /// Sets the resident memory `pid` samples as.
    pub fn set_rss(&self, pid: u32, rss: u64) {
        if let Some(p) = self.world().procs.get_mut(&pid) {
            p.rss = rss;
        }
    }

    /// Sets how many established connections `pid` has.
    pub fn set_connections(&self, pid: u32, n: u32) {
        if let Some(p) = self.world().procs.get_mut(&pid) {
            p.connections = n;
        }
    }

    /// Marks `port` as held by another program.
    pub fn occupy(&self, port: u16) {
        self.world().busy_ports.insert(port);
    }

    /// Every process ever spawned through the gate: pid and when.
    pub fn spawned(&self) -> Vec<(u32, tokio::time::Instant)> {
        self.world().spawned.clone()
    }

    /// Every signal sent: pid and signal number.
    pub fn signals(&self) -> Vec<(u32, i32)> {
        self.world().signals.clone()
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
            "serve" | "stubborn" => {
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

/// A fake launcher at its gate.
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
    /// Never released: the launcher exits without running anything, as the real one does.
    fn drop(&mut self) {
        if !self.released {
            self.processes.exit(self.pid, Exit::Code(127));
        }
    }
}

impl Processes for FakeProcesses {
    type Handle = u32;
    type Gated = FakeGated;

    fn spawn(&self, spec: &SpawnSpec) -> io::Result<FakeGated> {
        let mut w = self.world();
        let pid = w.next_pid;
        w.next_pid += 1;
        let now = usec(w.clock.wall());
        let mut p = FakeProc::new(spec.argv.clone(), spec.env.clone(), now);
        p.sockets = spec.fds.iter().map(OwnedFd::try_clone).collect::<io::Result<_>>()?;
        w.procs.insert(pid, p);
        w.spawned.push((pid, tokio::time::Instant::now()));
        Ok(FakeGated { pid, processes: self.clone(), released: false })
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
    fn renice_tree(&self, pid: u32, nice: i32) -> io::Result<()> {
        let mut w = self.world();
        let p = w.procs.get_mut(&pid).ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
        p.nice = nice;
        Ok(())
    }
    fn own_nice(&self) -> i32 {
        0
    }
    fn nice_of(&self, pid: u32) -> Option<i32> {
        self.world().procs.get(&pid).map(|p| p.nice)
    }
    fn start_time_usec(&self, pid: u32) -> Option<u64> {
        self.world().procs.get(&pid).map(|p| p.start_usec)
    }
    fn inspect(&self, pid: u32) -> Option<(u32, Inspected)> {
        let w = self.world();
        let p = w.procs.get(&pid).filter(|p| p.exit.borrow().is_none())?;
        let inspected = Inspected {
            env: p.env.clone(),
            cgroup: p.cgroup.clone(),
            parent: p.parent,
            start_usec: p.start_usec,
        };
        Some((pid, inspected))
    }
    fn isolate(&self, pid: u32) -> io::Result<String> {
        let mut w = self.world();
        let p = w.procs.get_mut(&pid).ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
        p.cgroup = format!("{}/worker-{pid}", p.cgroup);
        Ok(p.cgroup.clone())
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
    fn usage(&self, pid: u32) -> (u64, u64) {
        self.world().procs.get(&pid).map_or((0, 0), |p| (p.rss, 0))
    }
    fn listeners(&self, _pid: u32, _cgroup: Option<&str>, _ports: &[u16]) -> Vec<(u16, OwnedFd)> {
        Vec::new()
    }
    fn sockets(
        &self,
        pid: u32,
        _cgroup: Option<&str>,
        addrs: &[std::net::SocketAddr],
    ) -> Vec<(std::net::SocketAddr, OwnedFd)> {
        let w = self.world();
        let Some(p) = w.procs.get(&pid).filter(|p| p.exit.borrow().is_none()) else { return Vec::new() };
        addrs.iter().zip(&p.sockets).filter_map(|(a, s)| Some((*a, s.try_clone().ok()?))).collect()
    }
    fn user(&self, name: &str) -> Result<(u32, u32), String> {
        if name == "app" { Ok((1000, 1000)) } else { Err(format!("user {name:?} does not exist")) }
    }
    fn port_is_free(&self, port: u16) -> bool {
        !self.world().busy_ports.contains(&port)
    }
    fn probe(
        &self,
        pid: u32,
        _cgroup: Option<String>,
        _ports: Vec<u16>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let rx = self.world().procs.get(&pid).map(|p| p.listening.subscribe());
        async move {
            match rx {
                Some(mut rx) => {
                    if rx.wait_for(|l| *l).await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        }
    }
    fn sample(&self, _scopes: &[(String, String)], workers: &[(u64, u32)]) -> Vec<(u64, Sample)> {
        let w = self.world();
        workers
            .iter()
            .map(|(id, pid)| (*id, Sample { rss: w.procs.get(pid).map_or(0, |p| p.rss), cpu_usec: 0 }))
            .collect()
    }
    fn connections(&self, workers: &[(u64, u32)]) -> Vec<(u64, u32)> {
        let w = self.world();
        workers.iter().map(|(id, pid)| (*id, w.procs.get(pid).map_or(0, |p| p.connections))).collect()
    }
}

/// Socket mode's kernel side, in memory, with the kernel's rules that matter to the supervisor:
/// two slots per group (the table in force and the standby one), a table lives while a handle
/// or a slot holds it, and a socket sits in one slot of one live table at most. Sockets are
/// pipes (each has an inode of its own: its cookie). [`FakeSteer::refuse`] plays a kernel that
/// refuses the program (a verifier error).
#[derive(Debug, Clone, Default)]
pub struct FakeSteer {
    world: Arc<Mutex<SteerWorld>>,
}

#[derive(Debug, Default)]
struct SteerWorld {
    next_table: u64,
    /// Group name → (table in force, standby table).
    slots: BTreeMap<String, (Option<u64>, Option<u64>)>,
    /// Band → socket cookie, per table.
    tables: BTreeMap<u64, BTreeMap<u32, u64>>,
    /// The handles of each table: it lives while one does (or a slot holds it).
    handles: BTreeMap<u64, std::sync::Weak<()>>,
    /// (group, table) of every switch, in order.
    switches: Vec<(String, u64)>,
    refuse: Option<String>,
}

impl SteerWorld {
    fn alive(&self, table: u64) -> bool {
        self.handles.get(&table).is_some_and(|h| h.strong_count() > 0)
            || self.slots.values().any(|(c, s)| *c == Some(table) || *s == Some(table))
    }

    fn handle(&mut self, id: u64) -> FakeTable {
        let alive = self.handles.get(&id).and_then(std::sync::Weak::upgrade).unwrap_or_default();
        self.handles.insert(id, Arc::downgrade(&alive));
        FakeTable { id, _alive: alive }
    }
}

/// A fake group: its name.
#[derive(Debug)]
pub struct FakeGroup(pub String);

/// A handle of a fake table.
#[derive(Debug)]
pub struct FakeTable {
    pub id: u64,
    _alive: Arc<()>,
}

impl FakeSteer {
    fn world(&self) -> MutexGuard<'_, SteerWorld> {
        lock(&self.world)
    }

    /// Makes every group load fail with `why` (as a verifier rejection would).
    pub fn refuse(&self, why: &str) {
        self.world().refuse = Some(why.to_owned());
    }

    /// The bands → socket cookies of the table `group` uses now.
    pub fn routed(&self, group: &str) -> BTreeMap<u32, u64> {
        let w = self.world();
        w.slots.get(group).and_then(|(c, _)| *c).and_then(|t| w.tables.get(&t)).cloned().unwrap_or_default()
    }

    /// How many switches happened.
    pub fn switches(&self) -> usize {
        self.world().switches.len()
    }

    /// The name `group` keys an app's listen entry by.
    pub fn name(app: &str, listen: &str) -> String {
        ipcluster_steer::group_name(app, listen.parse().expect("an address"))
    }
}

impl crate::steering::Steer for FakeSteer {
    type Group = FakeGroup;
    type Table = FakeTable;

    fn group(
        &self,
        app: &ipcluster_core::name::AppName,
        listen: std::net::SocketAddr,
    ) -> Result<FakeGroup, String> {
        match &self.world().refuse {
            Some(why) => Err(why.clone()),
            None => Ok(FakeGroup(ipcluster_steer::group_name(app.as_str(), listen))),
        }
    }
    fn bind(&self, _group: &FakeGroup, _listen: std::net::SocketAddr) -> Result<OwnedFd, String> {
        let (r, _w) = rustix::pipe::pipe().map_err(|e| e.to_string())?;
        Ok(r)
    }
    fn table(&self) -> Result<FakeTable, String> {
        let mut w = self.world();
        w.next_table += 1;
        let id = w.next_table;
        w.tables.insert(id, BTreeMap::new());
        Ok(w.handle(id))
    }
    fn insert(&self, table: &FakeTable, band: u32, socket: &OwnedFd) -> Result<(), String> {
        let cookie = self.cookie(socket)?;
        let mut w = self.world();
        let elsewhere = w.tables.iter().any(|(t, slots)| {
            slots.iter().any(|(b, c)| *c == cookie && (*t, *b) != (table.id, band)) && w.alive(*t)
        });
        if elsewhere {
            return Err(format!("band {band}: the socket is already in a sockarray slot"));
        }
        w.tables.entry(table.id).or_default().insert(band, cookie);
        Ok(())
    }
    fn remove(&self, table: &FakeTable, band: u32) -> Result<(), String> {
        self.world().tables.entry(table.id).or_default().remove(&band);
        Ok(())
    }
    fn stage(&self, group: &FakeGroup, table: &FakeTable) -> Result<(), String> {
        let mut w = self.world();
        let slots = w.slots.entry(group.0.clone()).or_default();
        if slots.0 != Some(table.id) {
            slots.1 = Some(table.id);
        }
        Ok(())
    }
    fn switch(&self, group: &FakeGroup, table: &FakeTable) -> Result<(), String> {
        self.stage(group, table)?;
        let mut w = self.world();
        let slots = w.slots.entry(group.0.clone()).or_default();
        if slots.0 != Some(table.id) {
            *slots = (slots.1, slots.0);
        }
        w.switches.push((group.0.clone(), table.id));
        Ok(())
    }
    fn current(&self, group: &FakeGroup) -> Result<Option<FakeTable>, String> {
        let mut w = self.world();
        let id = w.slots.get(&group.0).and_then(|s| s.0);
        Ok(id.map(|id| w.handle(id)))
    }
    fn standby(&self, group: &FakeGroup) -> Result<Option<FakeTable>, String> {
        let mut w = self.world();
        let id = w.slots.get(&group.0).and_then(|s| s.1);
        Ok(id.map(|id| w.handle(id)))
    }
    fn same(&self, a: &FakeTable, b: &FakeTable) -> bool {
        a.id == b.id
    }
    fn entries(&self, table: &FakeTable) -> Result<Vec<(u32, u64)>, String> {
        Ok(self
            .world()
            .tables
            .get(&table.id)
            .map(|t| t.iter().map(|(b, c)| (*b, *c)).collect())
            .unwrap_or_default())
    }
    fn cookie(&self, socket: &OwnedFd) -> Result<u64, String> {
        rustix::fs::fstat(socket).map(|s| s.st_ino).map_err(|e| e.to_string())
    }
    fn forget(
        &self,
        _app: &ipcluster_core::name::AppName,
        _listen: std::net::SocketAddr,
        group: FakeGroup,
    ) -> Result<(), String> {
        self.world().slots.remove(&group.0);
        Ok(())
    }
}
