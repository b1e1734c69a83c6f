//! The load, all the time: open-loop HTTP requests at a fixed rate over new connections from 64
//! source addresses (loopback and `cli`, IPv4 and IPv6) to the NAT and the socket-mode app,
//! long-lived keep-alive connections to both, and Socket.IO long-polling sessions
//! (`tests/node/soak-sessions.js`) with the session app. Every outcome goes to one channel as
//! an [`Event`]; nothing here judges it.
//!
//! The HTTP clients are ipcluster-load's `connect` and `request` (3 s to connect, 5 s to
//! answer); their threads live in the network namespace of their side.

use std::{
    io::BufRead,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::{Child, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc::{Receiver, Sender, channel},
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use ipcluster_load::{Answer, connect, request};
use serde::Deserialize;

use super::{
    account::{Load, Secs},
    host::{self, APPS, Host, Side},
};

/// A request that finished.
#[derive(Debug, Clone)]
pub struct Done {
    pub load: Load,
    /// Index in [`APPS`].
    pub app: usize,
    /// The band of its source.
    pub band: u32,
    /// When it was due (open loop) or sent.
    pub start: Secs,
    pub end: Secs,
    pub answer: Result<Answer, String>,
    /// The worker (pid, generation) its keep-alive connection was on, if one answered on it.
    pub worker: Option<(u32, u64)>,
}

/// What the session clients say (`tests/node/soak-sessions.js`), times in ms since the epoch.
#[derive(Debug, Clone, Deserialize)]
pub struct SessionLine {
    pub ev: String,
    pub t: f64,
    #[serde(default)]
    pub src: Option<String>,
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub generation: Option<u64>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub n: Option<u64>,
}

#[derive(Debug, Clone)]
pub enum Event {
    Done(Done),
    /// A session client's line, its time converted to [`Secs`].
    Session(Secs, SessionLine),
}

/// The clock of the run: [`Secs`] since the load started, also from a wall-clock time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub start: Instant,
    wall: SystemTime,
}

impl Clock {
    pub fn new() -> Self {
        Clock { start: Instant::now(), wall: SystemTime::now() }
    }

    pub fn now(&self) -> Secs {
        self.start.elapsed().as_secs_f64()
    }

    /// A wall-clock time in ms since the epoch, as [`Secs`] of the run.
    pub fn at_epoch_ms(&self, ms: f64) -> Secs {
        let wall = self.wall.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        ms / 1000.0 - wall
    }
}

/// How much load.
#[derive(Debug, Clone, Copy)]
pub struct Rates {
    /// Open-loop requests per second, over both HTTP apps.
    pub open_per_sec: u32,
    /// Long-lived keep-alive connections.
    pub keepalive: usize,
}

/// A session client process and its pid inside the sandbox (once it said it).
type SessionClient = (Child, Arc<Mutex<Option<u32>>>);

/// The running load; [`Running::stop`] ends it.
#[derive(Debug)]
pub struct Running {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    sessions: Vec<SessionClient>,
}

struct Target {
    side: Side,
    src: IpAddr,
    dst: SocketAddr,
    app: usize,
    band: u32,
}

fn targets() -> Vec<Target> {
    let mut out = Vec::new();
    for (side, src) in host::http_sources() {
        for (app, a) in host::http_apps() {
            out.push(Target {
                side,
                src,
                dst: host::destination(side, src, a.port),
                app,
                band: host::band_of(src, a.workers),
            });
        }
    }
    out
}

/// Starts a thread in the network namespace at `ns` (a file of a namespace).
fn spawn_in(ns: &PathBuf, name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    let file = std::fs::File::open(ns).with_context(|| format!("cannot open {}", ns.display()))?;
    let (tx, rx) = channel();
    let handle = std::thread::Builder::new().name(name.into()).spawn(move || {
        let entered = nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET);
        let _ = tx.send(entered.map_err(|e| e.to_string()));
        drop(file);
        if entered.is_err() {
            // Never run a client in this machine's own namespace.
            std::process::abort();
        }
        f();
    })?;
    match rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => anyhow::bail!("cannot enter {}: {e}", ns.display()),
        Err(_) => anyhow::bail!("cannot enter {}", ns.display()),
    }
}

/// The namespace files of each side.
fn namespace(host: &Host, side: Side) -> PathBuf {
    match side {
        Side::Loopback => PathBuf::from(format!("/proc/{}/ns/net", host.sb.init_pid())),
        Side::Client => host.sb.host_path("/run/netns/cli"),
    }
}

/// Starts every load; events go to `events`.
pub fn start(host: &Host, clock: Clock, rates: Rates, events: Sender<Event>) -> Result<Running> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    let targets = Arc::new(targets());

    // Open loop: a schedule thread hands due requests to a pool per side (64 threads each, so
    // that requests stuck on a stopped worker do not hold the others back; a late request's
    // latency still counts from when it was due).
    let mut pools: Vec<(Side, Sender<(Secs, usize)>)> = Vec::new();
    for side in [Side::Loopback, Side::Client] {
        let (tx, rx) = channel::<(Secs, usize)>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..64 {
            let (rx, targets, events) = (rx.clone(), targets.clone(), events.clone());
            threads.push(spawn_in(&namespace(host, side), &format!("open-{side:?}-{i}"), move || {
                open_worker(&rx, &targets, &events, clock)
            })?);
        }
        pools.push((side, tx));
    }
    let interval = 1.0 / f64::from(rates.open_per_sec.max(1));
    let (flag, order) = (stop.clone(), targets.clone());
    threads.push(std::thread::Builder::new().name("open-schedule".into()).spawn(move || {
        let mut n: u64 = 0;
        while !flag.load(Ordering::Relaxed) {
            let due = n as f64 * interval;
            let wait = due - clock.now();
            if wait > 0.0 {
                std::thread::sleep(Duration::from_secs_f64(wait));
            }
            // Stride through the targets so that consecutive requests differ in app, side,
            // family and band.
            let i = (n as usize).wrapping_mul(37) % order.len();
            if let Some((_, tx)) = pools.iter().find(|(s, _)| *s == order[i].side) {
                let _ = tx.send((due, i));
            }
            n += 1;
        }
    })?);

    // Keep-alive connections, half on each side, over both apps and families.
    let keepers: Vec<usize> = (0..rates.keepalive).map(|k| (k * 29) % targets.len()).collect();
    for (k, i) in keepers.into_iter().enumerate() {
        let (flag, targets, events) = (stop.clone(), targets.clone(), events.clone());
        let side = targets[i].side;
        threads.push(spawn_in(&namespace(host, side), &format!("keepalive-{k}"), move || {
            keepalive_worker(k, &targets[i], &flag, &events, clock)
        })?);
    }

    let sessions = start_sessions(host, clock, &events, &mut threads)?;
    Ok(Running { stop, threads, sessions })
}

fn open_worker(
    rx: &Mutex<Receiver<(Secs, usize)>>,
    targets: &[Target],
    events: &Sender<Event>,
    clock: Clock,
) {
    loop {
        // Held only to take the next due request.
        let next = rx.lock().map(|r| r.recv());
        let Ok(Ok((due, i))) = next else { return };
        let t = &targets[i];
        let answer = connect(t.src, t.dst).and_then(|mut s| request(&mut s)).map_err(|e| format!("{e:?}"));
        let done = Done {
            load: Load::Open,
            app: t.app,
            band: t.band,
            start: due,
            end: clock.now(),
            answer,
            worker: None,
        };
        if events.send(Event::Done(done)).is_err() {
            return;
        }
    }
}

fn keepalive_worker(k: usize, t: &Target, stop: &AtomicBool, events: &Sender<Event>, clock: Clock) {
    let mut round: usize = 0;
    while !stop.load(Ordering::Relaxed) {
        // Each connection lives 30 to 90 s, then the client opens a new one.
        round += 1;
        let life = 30.0 + ((k * 17 + round * 29) % 60) as f64;
        let opened = clock.now();
        let mut conn = None;
        let mut worker: Option<(u32, u64)> = None;
        while !stop.load(Ordering::Relaxed) && clock.now() - opened < life {
            let start = clock.now();
            let stream = match conn.take() {
                Some(s) => Ok(s),
                None => connect(t.src, t.dst),
            };
            let result = stream.and_then(|mut s| request(&mut s).map(|a| (a, s)));
            let answer = match result {
                Ok((a, s)) => {
                    conn = Some(s);
                    Ok(a)
                }
                Err(e) => Err(format!("{e:?}")),
            };
            let failed = answer.is_err();
            let seen = answer.as_ref().ok().map(|a| (a.pid, a.generation));
            let done = Done {
                load: Load::KeepAlive,
                app: t.app,
                band: t.band,
                start,
                end: clock.now(),
                answer,
                worker,
            };
            if events.send(Event::Done(done)).is_err() {
                return;
            }
            if failed {
                break;
            }
            worker = seen;
            std::thread::sleep(Duration::from_millis(200));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The session clients: one Node.js process on loopback (IPv4), one in `cli` (IPv6).
fn start_sessions(
    host: &Host,
    clock: Clock,
    events: &Sender<Event>,
    threads: &mut Vec<JoinHandle<()>>,
) -> Result<Vec<SessionClient>> {
    let chat = APPS.iter().find(|a| a.role == host::Role::Sessions).context("a session app")?;
    let (lo, cli) = host::session_sources();
    let script = host.scripts.join("soak-sessions.js").display().to_string();
    let mut out = Vec::new();
    for (side, sources) in [(Side::Loopback, lo), (Side::Client, cli)] {
        let url = match host::destination(side, sources[0], chat.port) {
            SocketAddr::V4(a) => format!("http://{a}/"),
            SocketAddr::V6(a) => format!("http://[{}]:{}/", a.ip(), a.port()),
        };
        let mut argv: Vec<String> = if side == Side::Client {
            ["ip", "netns", "exec", "cli"].map(String::from).to_vec()
        } else {
            vec![]
        };
        argv.extend([
            "env".into(),
            format!("NODE_PATH={}", host.modules.display()),
            "node".into(),
            script.clone(),
        ]);
        argv.extend([url, host::AFFINITY_SECS.to_string()]);
        argv.extend(sources.iter().map(IpAddr::to_string));
        let mut child = host.sb.command(&argv).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
        let stdout = child.stdout.take().context("the session clients' stdout")?;
        let (events, pid) = (events.clone(), Arc::new(Mutex::new(None)));
        let seen_pid = pid.clone();
        threads.push(std::thread::Builder::new().name(format!("sessions-{side:?}")).spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                let Ok(parsed) = serde_json::from_str::<SessionLine>(&line) else { continue };
                if parsed.ev == "hello" {
                    *seen_pid.lock().expect("not poisoned") = parsed.pid;
                    continue;
                }
                if events.send(Event::Session(clock.at_epoch_ms(parsed.t), parsed)).is_err() {
                    return;
                }
            }
        })?);
        out.push((child, pid));
    }
    Ok(out)
}

impl Running {
    /// Ends the load: the HTTP clients finish what they are doing, the session clients are
    /// killed (by their pid, inside the sandbox).
    pub fn stop(self, host: &Host) {
        self.stop.store(true, Ordering::Relaxed);
        for (mut child, pid) in self.sessions {
            if let Some(pid) = *pid.lock().expect("not poisoned") {
                let _ = host.sb.run(["kill", &pid.to_string()]);
            }
            let _ = child.wait();
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}
