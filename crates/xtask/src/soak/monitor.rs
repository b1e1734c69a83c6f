//! The checks, once a second and at the end: every outcome of the load is tallied per second
//! and every failure attributed to a by-design cause (or reported); in quiet periods every band
//! of every app must be routed to a running worker of its live generation (by the daemon's
//! lists, by the NAT rules, and by who answered the load); nothing may stay behind a generation
//! that is gone (scopes, cgroups, rules, sets, pins, listening ports) for [`LEFTOVER_AFTER`];
//! the daemon's RSS and descriptors are sampled; its journal is read for panics.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    sync::{Arc, mpsc::Receiver},
    time::Instant,
};

use ipcluster_bus::{GenerationRow, WorkerRow};
use serde::Serialize;

use super::{
    account::{self, Cause, Failure, Load, Secs, World},
    bus::Bus,
    host::{self, APPS, Host, Role},
    kernel::{self, State},
    load::{Done, Event},
    record::Shared,
};

/// An invariant that does not hold: (invariant, key, detail).
type Finding = (&'static str, String, String);

/// How long something left by a gone generation may stay before it is a violation.
pub const LEFTOVER_AFTER: Secs = 10.0;
/// Failures are attributed this long after they ended (the faults around them are known then).
const ATTRIBUTE_AFTER: Secs = 15.0;

/// One second of the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Second {
    /// Open-loop requests answered and failed (by when they ended).
    pub ok: u32,
    pub failed: u32,
    pub keepalive_ok: u32,
    pub keepalive_failed: u32,
    /// Session ticks acknowledged, sessions lost.
    pub ticks: u64,
    pub sessions_lost: u32,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub rss_mib: Option<f64>,
    pub fds: Option<u32>,
    /// Workers the daemon listed.
    pub workers: Option<u32>,
    #[serde(skip)]
    pub latencies: Vec<f64>,
}

/// Counts over the whole run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    pub open_ok: u64,
    pub open_failed: u64,
    pub keepalive_ok: u64,
    pub keepalive_failed: u64,
    pub sessions_started: u64,
    pub sessions_ended: u64,
    pub sessions_lost: u64,
    pub session_ticks: u64,
    /// Open-loop answers checked against the live worker of their band in quiet periods.
    pub routed_checked: u64,
}

#[derive(Debug)]
pub struct Monitor {
    host: Arc<Host>,
    bus: Arc<Bus>,
    shared: Arc<Shared>,
    events: Receiver<Event>,
    pub world: World,
    /// Every failure and, once attributed, its cause.
    pub failures: Vec<(Failure, Option<Cause>)>,
    pub seconds: BTreeMap<u64, Second>,
    pub totals: Totals,
    /// Open-loop answers since the last snapshot.
    recent: VecDeque<Done>,
    /// The last worker that held each port: (app, generation).
    owners: HashMap<u16, (String, u64)>,
    /// What looks left behind, since when.
    suspects: HashMap<String, (Secs, String)>,
    /// The daemon: (its pid on this machine, time, RSS in KiB, open descriptors, workers).
    pub daemon: Vec<(u32, Secs, f64, f64, f64)>,
    /// How many workers the last snapshot listed.
    workers: usize,
    journal_cursor: Option<String>,
    last_journal: Option<Instant>,
    pub journal: Vec<(Secs, String)>,
}

impl Monitor {
    pub fn new(host: Arc<Host>, bus: Arc<Bus>, shared: Arc<Shared>, events: Receiver<Event>) -> Self {
        let nat_apps = APPS.iter().filter(|a| a.role != Role::Socket).map(|a| a.name.to_owned()).collect();
        Monitor {
            host,
            bus,
            shared,
            events,
            world: World { nat_apps, ..World::default() },
            failures: Vec::new(),
            seconds: BTreeMap::new(),
            totals: Totals::default(),
            recent: VecDeque::new(),
            owners: HashMap::new(),
            suspects: HashMap::new(),
            daemon: Vec::new(),
            workers: 0,
            journal_cursor: None,
            last_journal: None,
            journal: Vec::new(),
        }
    }

    fn second(&mut self, t: Secs) -> &mut Second {
        self.seconds.entry(t.max(0.0) as u64).or_default()
    }

    /// Takes in what the load did since the last call.
    fn drain(&mut self) {
        while let Ok(event) = self.events.try_recv() {
            match event {
                Event::Done(d) => self.done(d),
                Event::Session(t, line) => self.session(t, line),
            }
        }
    }

    fn done(&mut self, d: Done) {
        let app = APPS[d.app].name;
        match (&d.answer, d.load) {
            (Ok(_), Load::Open) => {
                self.totals.open_ok += 1;
                let s = self.second(d.end);
                s.ok += 1;
                s.latencies.push((d.end - d.start) * 1e3);
                self.recent.push_back(d);
            }
            (Ok(_), _) => {
                self.totals.keepalive_ok += 1;
                self.second(d.end).keepalive_ok += 1;
            }
            (Err(what), load) => {
                if load == Load::Open {
                    self.totals.open_failed += 1;
                    self.second(d.end).failed += 1;
                } else {
                    self.totals.keepalive_failed += 1;
                    self.second(d.end).keepalive_failed += 1;
                }
                let f = Failure {
                    load,
                    app: app.into(),
                    band: d.band,
                    worker: d.worker,
                    start: d.start,
                    end: d.end,
                    what: what.clone(),
                };
                self.failures.push((f, None));
            }
        }
    }

    fn session(&mut self, t: Secs, line: super::load::SessionLine) {
        match line.ev.as_str() {
            "start" => self.totals.sessions_started += 1,
            "end" => self.totals.sessions_ended += 1,
            "ticks" => {
                let n = line.n.unwrap_or(0);
                self.totals.session_ticks += n;
                self.second(t).ticks += n;
            }
            "lost" => {
                self.totals.sessions_lost += 1;
                self.second(t).sessions_lost += 1;
                let chat = APPS.iter().find(|a| a.role == Role::Sessions).expect("a session app");
                let band = line
                    .src
                    .as_deref()
                    .and_then(|s| s.parse().ok())
                    .map_or(0, |a| host::band_of(a, chat.workers));
                let f = Failure {
                    load: Load::Session,
                    app: chat.name.into(),
                    band,
                    worker: line.pid.zip(line.generation),
                    start: t,
                    end: t,
                    what: format!("{}: {}", line.src.unwrap_or_default(), line.reason.unwrap_or_default()),
                };
                self.failures.push((f, None));
            }
            _ => {}
        }
    }

    /// One round of checks.
    pub fn tick(&mut self) {
        self.drain();
        let t = self.shared.now();
        self.sample_daemon(t);
        let snapshot = self.bus.list_workers().and_then(|w| Ok((w, self.bus.list_generations()?)));
        let state = self
            .host
            .sb
            .run(["sh", "-c", kernel::SCRIPT])
            .ok()
            .and_then(|o| State::parse(&String::from_utf8_lossy(&o.stdout)));
        let (mut routing, mut checked) = (Vec::new(), 0);
        match &snapshot {
            Ok((workers, generations)) => {
                self.note(t, workers, generations);
                (routing, checked) = self.check_routing(t, workers, generations, state.as_ref());
                if let Some(state) = &state {
                    self.check_leftovers(t, workers, generations, state);
                }
            }
            Err(e) => routing.push(("daemon", "unreachable".into(), format!("ListWorkers: {e}"))),
        }
        // Quiet from before the snapshot to after the checks: a fault that began meanwhile (a
        // worker killed between ListWorkers and the look at its process) explains what was seen.
        let faults = self.shared.timeline();
        if account::quiet(t, &faults) && account::quiet(self.shared.now(), &faults) {
            self.totals.routed_checked += checked;
            for (invariant, key, detail) in routing {
                self.shared.violate(t, invariant, key, detail);
            }
        }
        self.recent.clear();
        self.attribute(t - ATTRIBUTE_AFTER);
        if self.last_journal.is_none_or(|l| l.elapsed().as_secs() >= 5) {
            self.read_journal();
        }
    }

    fn sample_daemon(&mut self, t: Secs) {
        let Some(pid) = self.host.daemon_host_pid() else { return };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok());
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).ok();
        if let (Some(rss), Some(fds)) = (rss, fds) {
            self.daemon.push((pid, t, rss, fds as f64, self.workers as f64));
            let workers = self.workers as u32;
            let s = self.second(t);
            (s.rss_mib, s.fds, s.workers) = (Some(rss / 1024.0), Some(fds as u32), Some(workers));
        }
    }

    fn note(&mut self, t: Secs, workers: &[WorkerRow], generations: &[GenerationRow]) {
        self.workers = workers.len();
        self.world.workers.note(t, workers.iter().map(|w| (w.pid, w.generation, w.state.as_str())));
        for g in generations.iter().filter(|g| g.state == "draining") {
            self.world.note_draining(&g.app, g.generation, t);
        }
        for w in workers {
            for &(_, port) in &w.ports {
                self.owners.insert(port, (w.app.clone(), w.generation));
            }
        }
    }

    /// What is not routed as it should be, (invariant, key, detail), and how many answers of
    /// the load were checked.
    fn check_routing(
        &self,
        t: Secs,
        workers: &[WorkerRow],
        generations: &[GenerationRow],
        state: Option<&State>,
    ) -> (Vec<Finding>, u64) {
        let mut out: Vec<Finding> = Vec::new();
        let mut checked = 0;
        for app in &APPS {
            let mut violate = |key: String, detail: String| out.push(("routing", key, detail));
            let live: Vec<u64> = generations
                .iter()
                .filter(|g| g.app == app.name && g.state == "live")
                .map(|g| g.generation)
                .collect();
            let [g] = live[..] else {
                violate(format!("{} live generations", app.name), format!("live: {live:?}"));
                continue;
            };
            let by_band: BTreeMap<u32, &WorkerRow> = workers
                .iter()
                .filter(|w| w.app == app.name && w.generation == g && w.state == "live")
                .map(|w| (w.band, w))
                .collect();
            for band in 0..app.workers {
                let key = format!("{} band {band}", app.name);
                match by_band.get(&band) {
                    None => violate(key, format!("no live worker of generation {g}")),
                    Some(w) if !self.host.sb.host_path(format!("/proc/{}", w.pid)).exists() => {
                        violate(key, format!("live worker pid {} is not running", w.pid))
                    }
                    Some(_) => {}
                }
            }
            if let (Some(state), true) = (state, app.role != Role::Socket) {
                let want: BTreeMap<u32, BTreeSet<u16>> =
                    by_band.iter().filter_map(|(b, w)| Some((*b, [w.ports.first()?.1].into()))).collect();
                for (family, save) in ["IPv4", "IPv6"].iter().zip(&state.nat) {
                    let rules = kernel::live_routes(save, app.name, app.workers);
                    if rules != want {
                        let detail = format!("the rules route {rules:?}, the live workers hold {want:?}");
                        violate(format!("{} {family} rules", app.name), detail);
                    }
                }
            }
            let answers =
                self.recent.iter().filter(|d| APPS[d.app].name == app.name && d.start >= t - account::SETTLE);
            for (d, a) in answers.filter_map(|d| Some((d, d.answer.as_ref().ok()?))) {
                checked += 1;
                let expected = by_band.get(&d.band);
                if a.app != app.name
                    || expected.is_none_or(|w| (w.pid, w.generation) != (a.pid, a.generation))
                {
                    let want = expected.map_or("a live worker".into(), |w| {
                        format!("pid {} of generation {}", w.pid, w.generation)
                    });
                    let detail = format!(
                        "a request from band {} was answered by {} pid {} of generation {} (band {}), not {want}",
                        d.band, a.app, a.pid, a.generation, a.band
                    );
                    violate(format!("{} band {} answers", app.name, d.band), detail);
                }
            }
        }
        (out, checked)
    }

    fn check_leftovers(
        &mut self,
        t: Secs,
        workers: &[WorkerRow],
        generations: &[GenerationRow],
        state: &State,
    ) {
        let running: BTreeSet<(String, u64)> = generations
            .iter()
            .filter(|g| !matches!(g.state.as_str(), "stopped" | "failed"))
            .map(|g| (g.app.clone(), g.generation))
            .collect();
        let held: BTreeSet<u16> = workers.iter().flat_map(|w| w.ports.iter().map(|p| p.1)).collect();
        let pids: BTreeSet<u32> = workers.iter().map(|w| w.pid).collect();
        let mut now: Vec<(String, String)> = Vec::new();
        for (app, g) in kernel::scopes(&state.scopes) {
            if !running.contains(&(app.clone(), g)) {
                now.push((
                    format!("scope ipcluster-{app}-{g}.scope"),
                    "systemd still has the scope of a gone generation".into(),
                ));
            }
        }
        let slice = self.host.sb.host_path("/sys/fs/cgroup/ipcluster.slice");
        for app in std::fs::read_dir(&slice).into_iter().flatten().flatten().filter(|e| e.path().is_dir()) {
            for scope in std::fs::read_dir(app.path()).into_iter().flatten().flatten() {
                let name = scope.file_name().to_string_lossy().into_owned();
                let Some((a, g)) = kernel::scope_name(&name) else { continue };
                if !running.contains(&(a, g)) {
                    now.push((format!("cgroup {name}"), "the cgroup of a gone generation".into()));
                    continue;
                }
                for w in std::fs::read_dir(scope.path()).into_iter().flatten().flatten() {
                    let dir = w.file_name().to_string_lossy().into_owned();
                    let Some(pid) = dir.strip_prefix("worker-").and_then(|p| p.parse::<u32>().ok()) else {
                        continue;
                    };
                    if !pids.contains(&pid) {
                        now.push((
                            format!("cgroup {name}/{dir}"),
                            "the cgroup of a worker the daemon no longer lists".into(),
                        ));
                    }
                }
            }
        }
        let gone_port =
            |p: &u16| !held.contains(p) && self.owners.get(p).is_none_or(|o| !running.contains(o));
        let nat: BTreeSet<u16> = state.nat.iter().flat_map(|s| kernel::nat_ports(s)).collect();
        let guard: BTreeSet<u16> = state.filter.iter().flat_map(|s| kernel::guard_ports(s)).collect();
        let listening: BTreeSet<u16> = ["net/tcp", "net/tcp6"]
            .iter()
            .flat_map(|f| {
                kernel::listening(&self.host.sb.read_file(format!("/proc/1/{f}")).unwrap_or_default())
            })
            .filter(|p| (20000..=29999).contains(p))
            .collect();
        for (what, ports) in [("nat rule to", nat), ("guard of", guard), ("listening socket on", listening)] {
            for p in ports.iter().filter(|p| gone_port(p)) {
                now.push((format!("{what} port {p}"), format!("{:?} held it last", self.owners.get(p))));
            }
        }
        let mut per_app: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (app, set) in kernel::sets(&state.sets) {
            per_app.entry(app).or_default().push(set);
        }
        for (app, sets) in per_app {
            let gens = running.iter().filter(|(a, _)| *a == app).count();
            if sets.len() > 2 * gens {
                now.push((format!("sets of {app}"), format!("{sets:?} for {gens} running generations")));
            }
        }
        let socket_apps: Vec<&str> = APPS.iter().filter(|a| a.role == Role::Socket).map(|a| a.name).collect();
        for pin in
            std::fs::read_dir(self.host.sb.host_path("/sys/fs/bpf/ipcluster")).into_iter().flatten().flatten()
        {
            let name = pin.file_name().to_string_lossy().into_owned();
            if !socket_apps.iter().any(|a| name.starts_with(&format!("{a}-"))) {
                now.push((format!("pin {name}"), "a steering pin of no socket-mode app".into()));
            }
        }
        let seen: BTreeSet<String> = now.iter().map(|(k, _)| k.clone()).collect();
        self.suspects.retain(|k, _| seen.contains(k));
        for (key, detail) in now {
            let since = self.suspects.entry(key.clone()).or_insert((t, detail)).0;
            if t - since >= LEFTOVER_AFTER {
                let detail = format!("{} (for {:.0} s)", self.suspects[&key].1, t - since);
                self.shared.violate(since, "leftover", key, detail);
            }
        }
    }

    /// Attributes the failures that ended before `until`; an unexplained one is a violation.
    pub fn attribute(&mut self, until: Secs) {
        let faults = self.shared.timeline();
        for (f, cause) in self.failures.iter_mut().filter(|(f, c)| c.is_none() && f.end < until) {
            let c = account::attribute(f, &faults, &self.world);
            *cause = Some(c);
            if c == Cause::Unexplained {
                let key = format!("{:?} {}", f.load, f.app);
                let worker =
                    f.worker.map(|(p, g)| format!(", on pid {p} of generation {g}")).unwrap_or_default();
                let detail = format!("failed at {:.1} s (band {}{worker}): {}", f.end, f.band, f.what);
                self.shared.violate(f.end, "request", key, detail);
            }
        }
    }

    /// Reads the daemon's journal since the last read.
    pub fn read_journal(&mut self) {
        self.last_journal = Some(Instant::now());
        let mut argv = vec![
            "journalctl".to_owned(),
            "-u".into(),
            "ipclusterd".into(),
            "-o".into(),
            "json".into(),
            "--no-pager".into(),
        ];
        if let Some(c) = &self.journal_cursor {
            argv.push(format!("--after-cursor={c}"));
        }
        let Ok(out) = self.host.sb.run(&argv) else { return };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Ok(entry) = serde_json::from_str::<serde_json::Value>(line) else { continue };
            if let Some(c) = entry["__CURSOR"].as_str() {
                self.journal_cursor = Some(c.to_owned());
            }
            // journalctl writes a message with control characters as an array of its bytes.
            let message = match &entry["MESSAGE"] {
                serde_json::Value::String(m) => m.clone(),
                serde_json::Value::Array(bytes) => {
                    let bytes: Vec<u8> = bytes.iter().filter_map(|b| b.as_u64()).map(|b| b as u8).collect();
                    String::from_utf8_lossy(&bytes).into_owned()
                }
                _ => continue,
            };
            let message = message.as_str();
            let us: f64 = entry["__REALTIME_TIMESTAMP"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0.0);
            let t = self.shared.clock.at_epoch_ms(us / 1000.0);
            if let Some(why) = account::raw_input(message) {
                let shown: String = message.chars().take(120).collect();
                self.shared.violate(
                    t,
                    "journal",
                    "a caller's bad input written raw",
                    format!("{why}: {shown:?}…"),
                );
            }
            if account::is_panic(message) {
                self.shared.violate(t, "journal", "panic", message.chars().take(300).collect::<String>());
            }
            if t >= 0.0 {
                self.journal.push((t, message.to_owned()));
            }
        }
    }

    /// The last round, once the load has stopped: everything left is taken in and attributed.
    pub fn finish(&mut self) {
        self.tick();
        self.drain();
        self.attribute(f64::MAX);
        self.read_journal();
        for s in self.seconds.values_mut() {
            s.p50_ms = account::percentile(&mut s.latencies, 50.0);
            s.p99_ms = account::percentile(&mut s.latencies, 99.0);
        }
    }

    /// Latencies (ms) of every successful open-loop request.
    pub fn latencies(&self) -> Vec<f64> {
        self.seconds.values().flat_map(|s| s.latencies.iter().copied()).collect()
    }
}
