//! Invariant accounting, without I/O: the fault timeline, which failures a fault explains
//! (the by-design causes, each with its bound) and which it does not, quiet periods,
//! the daemon's RSS and descriptor slope, the journal's repeated lines, percentiles.
//!
//! Times are seconds since the load started ([`Secs`]).

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::faults::Fault;

pub type Secs = f64;

/// After a fault's effect ends, this long before every band must be routed again.
pub const SETTLE: Secs = 5.0;
/// The longest a `iptables -t nat -F` may stay unrepaired (the bound).
pub const NAT_REPAIR_BOUND: Secs = 5.0;
/// The longest a SIGSTOPped live worker may stay live: the soak app's `watchdog` (2 s), a sample
/// (500 ms) and the replacement's start, with room for a loaded machine.
pub const STOP_BOUND: Secs = 10.0;
/// `max_draining` of the soak's session app.
pub const MAX_DRAINING: usize = 2;
/// A journal line may appear this often in one minute, no more.
pub const MAX_REPEATS_PER_MINUTE: usize = 20;

/// What a fault hit and how it went.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Hit {
    pub app: Option<String>,
    pub band: Option<u32>,
    pub pid: Option<u32>,
    pub generation: Option<u64>,
    /// What happened, in words.
    pub outcome: String,
    /// Whether it went as the daemon promises (a refusal it documents counts as ok).
    pub ok: bool,
}

impl Hit {
    pub fn ok(outcome: impl Into<String>) -> Self {
        Hit { outcome: outcome.into(), ok: true, ..Hit::default() }
    }

    pub fn failed(outcome: impl Into<String>) -> Self {
        Hit { outcome: outcome.into(), ok: false, ..Hit::default() }
    }

    pub fn on(mut self, app: &str, band: u32, pid: u32, generation: u64) -> Self {
        (self.app, self.band, self.pid, self.generation) =
            (Some(app.into()), Some(band), Some(pid), Some(generation));
        self
    }
}

/// One injected fault: from when it started to when its effect ended (`None` while it lasts).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultEvent {
    pub fault: Fault,
    pub start: Secs,
    pub end: Option<Secs>,
    #[serde(flatten)]
    pub hit: Hit,
}

impl FaultEvent {
    /// One line: `  12.3 s  deploy chat: generation 5 is live`.
    pub fn line(&self) -> String {
        let on = self.hit.app.as_deref().map(|a| format!(" {a}")).unwrap_or_default();
        format!("{:7.1} s  {}{on}: {}", self.start, self.fault.name(), self.hit.outcome)
    }

    fn until(&self, now: Secs) -> Secs {
        self.end.unwrap_or(now.max(self.start))
    }
}

/// Whether `t` is quiet: no fault lasts at `t`, and none ended within [`SETTLE`] before it.
pub fn quiet(t: Secs, faults: &[FaultEvent]) -> bool {
    faults.iter().all(|f| f.start > t || f.end.is_some_and(|e| e + SETTLE < t))
}

/// The last `n` faults that started before `t`, as lines.
pub fn last_faults(t: Secs, faults: &[FaultEvent], n: usize) -> Vec<String> {
    let before: Vec<&FaultEvent> = faults.iter().filter(|f| f.start <= t).collect();
    before[before.len().saturating_sub(n)..].iter().map(|f| f.line()).collect()
}

/// Which load saw a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Load {
    /// Open-loop requests, a new connection each.
    Open,
    /// A request on a long-lived keep-alive connection (or the connection's first).
    KeepAlive,
    /// A Socket.IO long-polling session.
    Session,
}

impl Load {
    pub fn name(self) -> &'static str {
        match self {
            Load::Open => "open loop",
            Load::KeepAlive => "keep-alive",
            Load::Session => "sessions",
        }
    }
}

/// A failed request, or a lost session.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Failure {
    pub load: Load,
    pub app: String,
    /// The band of its source address.
    pub band: u32,
    /// The worker its connection or session was on, if one had answered on it.
    pub worker: Option<(u32, u64)>,
    pub start: Secs,
    pub end: Secs,
    pub what: String,
}

/// Why a failure happened: one of the by-design causes, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cause {
    /// In flight to (or a session on) a worker the soak killed with `kill -9`.
    KilledWorker,
    /// A new NAT connection between `iptables -t nat -F` and the repair (bound: 5 s).
    NatFlush,
    /// To a SIGSTOPped worker until the watchdog replaced it.
    StoppedWorker,
    /// On a retired (or draining) worker that KillRetired or SIGUSR1 stopped.
    RetiredStopped,
    /// A session of the oldest draining generation, ended at once by a deploy beyond
    /// `max_draining`.
    DrainingLimit,
    /// None of the above: an invariant violation.
    Unexplained,
}

impl Cause {
    pub fn about(self) -> &'static str {
        match self {
            Cause::KilledWorker => "in flight to (or a session on) a worker the soak killed (kill -9)",
            Cause::NatFlush => "new NAT connections between iptables -t nat -F and the repair (<= 5 s)",
            Cause::StoppedWorker => "to a SIGSTOPped worker until the watchdog replaced it",
            Cause::RetiredStopped => "on retired or draining workers that KillRetired or SIGUSR1 stopped",
            Cause::DrainingLimit => "sessions of a draining generation ended by a deploy beyond max_draining",
            Cause::Unexplained => "unexplained: an invariant violation",
        }
    }
}

/// What the per-second snapshots saw of each worker, by (pid, generation): pids are reused.
#[derive(Debug, Clone, Default)]
pub struct Workers {
    seen: HashMap<(u32, u64), Seen>,
}

#[derive(Debug, Clone)]
struct Seen {
    /// The first snapshot that showed it other than starting or live.
    retired: Option<Secs>,
    last: Secs,
}

impl Workers {
    /// Notes a snapshot at `t`: each worker's pid, generation and state.
    pub fn note<'a>(&mut self, t: Secs, rows: impl IntoIterator<Item = (u32, u64, &'a str)>) {
        for (pid, generation, state) in rows {
            let seen = self.seen.entry((pid, generation)).or_insert(Seen { retired: None, last: t });
            seen.last = t;
            if !matches!(state, "live" | "starting") && seen.retired.is_none() {
                seen.retired = Some(t);
            }
        }
    }

    /// When `worker` was first seen retired, draining or stopping.
    pub fn retired_at(&self, worker: (u32, u64)) -> Option<Secs> {
        self.seen.get(&worker).and_then(|s| s.retired)
    }
}

/// Apps routed by NAT rules (flushes touch them) and generations seen draining.
#[derive(Debug, Clone, Default)]
pub struct World {
    pub nat_apps: Vec<String>,
    pub workers: Workers,
    /// (app, generation) → the first and last snapshot that showed it draining.
    pub draining: BTreeMap<(String, u64), (Secs, Secs)>,
}

impl World {
    /// Notes that generation `g` of `app` was draining at `t`.
    pub fn note_draining(&mut self, app: &str, g: u64, t: Secs) {
        let seen = self.draining.entry((app.to_owned(), g)).or_insert((t, t));
        seen.1 = t;
    }

    /// The oldest generation of `app` draining at a cutover at `t`, if `max_draining` were
    /// draining then (so that the cutover ended the oldest one's sessions).
    fn cut_by_limit(&self, app: &str, t: Secs) -> Option<u64> {
        let before: Vec<u64> = self
            .draining
            .iter()
            .filter(|((a, _), (first, last))| a == app && *first <= t && *last >= t - 2.0)
            .map(|((_, g), _)| *g)
            .collect();
        (before.len() >= MAX_DRAINING).then(|| before.iter().copied().min()).flatten()
    }
}

/// The by-design cause of `f`, if one fault explains it.
pub fn attribute(f: &Failure, faults: &[FaultEvent], world: &World) -> Cause {
    let overlaps = |e: &FaultEvent, before: Secs, after: Secs| {
        f.end >= e.start - before && f.start <= e.until(f.end) + after
    };
    let same_worker = |e: &FaultEvent| f.worker.is_some() && f.worker == e.hit.pid.zip(e.hit.generation);
    let same_band = |e: &FaultEvent| e.hit.app.as_deref() == Some(&f.app) && e.hit.band == Some(f.band);
    let session = f.load == Load::Session;
    for e in faults {
        let hits_it = if f.worker.is_some() { same_worker(e) } else { same_band(e) };
        match e.fault {
            // A kill ends its worker's connections and sessions at once; a new connection to
            // its band is in danger only while in flight at the kill.
            Fault::WorkerKill
                if hits_it && f.end >= e.start && (f.worker.is_some() || f.start <= e.start + 1.0) =>
            {
                return Cause::KilledWorker;
            }
            Fault::WorkerStop if hits_it && overlaps(e, 0.0, 1.0) => return Cause::StoppedWorker,
            Fault::NatFlush if world.nat_apps.contains(&f.app) => {
                // Socket.IO notices a refused poll at once, a lost session a little later.
                let grace = if session { 6.0 } else { 0.5 };
                if f.end >= e.start - 0.2 && f.end <= e.until(f.end) + grace {
                    return Cause::NatFlush;
                }
            }
            Fault::KillRetired | Fault::Sigusr1 => {
                let retired = f.worker.and_then(|w| world.workers.retired_at(w));
                let draining =
                    f.worker.and_then(|(_, g)| world.draining.get(&(f.app.clone(), g)).map(|d| d.0));
                let before = retired.into_iter().chain(draining).fold(f64::MAX, f64::min);
                // A snapshot a second apart may see the retirement just after the fault began.
                if before <= e.start + 1.5 && f.end >= e.start && f.end <= e.until(f.end) + 10.0 {
                    return Cause::RetiredStopped;
                }
            }
            Fault::Deploy | Fault::Rollback if session && e.hit.app.as_deref() == Some(&f.app) => {
                let ended = e.until(f.end);
                let oldest = world.cut_by_limit(&f.app, ended);
                if f.worker.is_some_and(|(_, g)| oldest == Some(g))
                    && f.end >= ended - 1.0
                    && f.end <= ended + 10.0
                {
                    return Cause::DrainingLimit;
                }
            }
            _ => {}
        }
    }
    Cause::Unexplained
}

/// The faults that broke their bound: a NAT flush repaired later than [`NAT_REPAIR_BOUND`], a
/// SIGSTOPped worker live longer than [`STOP_BOUND`]. (fault, how long, bound).
pub fn broken_bounds(faults: &[FaultEvent]) -> Vec<(&FaultEvent, Secs, Secs)> {
    faults
        .iter()
        .filter_map(|e| {
            let bound = match e.fault {
                Fault::NatFlush => NAT_REPAIR_BOUND,
                Fault::WorkerStop => STOP_BOUND,
                _ => return None,
            };
            let took = e.end? - e.start;
            (took > bound).then_some((e, took, bound))
        })
        .collect()
}

/// One sample of the daemon: its process (this machine's pid), the time, the value (RSS in KiB,
/// or open descriptors) and how many workers it managed then.
pub type DaemonSample = (u32, Secs, f64, f64);

/// How fast `samples` grow per minute within each daemon process, the number of workers it
/// manages held equal: the time coefficient of a least-squares fit `value = a(process) + b·t +
/// c·workers` (each process its own intercept, since a restart starts afresh). A daemon that
/// manages more generations needs more memory and descriptors for them; only growth that the
/// workers do not explain is a leak. `None` without two samples of one process.
pub fn slope_per_minute(samples: &[DaemonSample]) -> Option<f64> {
    let mut processes: BTreeMap<u32, Vec<(Secs, f64, f64)>> = BTreeMap::new();
    for &(pid, t, v, w) in samples {
        processes.entry(pid).or_default().push((t, v, w));
    }
    // Sums of products of the values centred on their process's means.
    let (mut tt, mut tw, mut ww, mut tv, mut wv) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for points in processes.values().filter(|p| p.len() >= 2) {
        let n = points.len() as f64;
        let mean = |f: fn(&(Secs, f64, f64)) -> f64| points.iter().map(f).sum::<f64>() / n;
        let (mt, mv, mw) = (mean(|p| p.0), mean(|p| p.1), mean(|p| p.2));
        for &(t, v, w) in points {
            let (t, v, w) = (t - mt, v - mv, w - mw);
            (tt, tw, ww, tv, wv) = (tt + t * t, tw + t * w, ww + w * w, tv + t * v, wv + w * v);
        }
    }
    if tt <= 0.0 {
        return None;
    }
    let det = tt * ww - tw * tw;
    // Without variation in the workers (or with workers following time exactly), time alone.
    let b = if ww <= 0.0 || det.abs() <= 1e-9 * tt * ww { tv / tt } else { (tv * ww - wv * tw) / det };
    Some(b * 60.0)
}

/// Journal lines (time, text) repeated more than `max` times within one minute of the run:
/// (minute, line, count).
pub fn repeated_lines(lines: &[(Secs, String)], max: usize) -> Vec<(u64, String, usize)> {
    let mut count: BTreeMap<(u64, &str), usize> = BTreeMap::new();
    for (t, line) in lines {
        *count.entry(((t.max(0.0) / 60.0) as u64, line.as_str())).or_default() += 1;
    }
    count.into_iter().filter(|(_, n)| *n > max).map(|((m, l), n)| (m, l.to_owned(), n)).collect()
}

/// Why a journal line shows a caller's malformed input as it was sent (the bad D-Bus input
/// fault's app names: 10 000 characters, a line break with a terminal escape), if it does.
/// The daemon should quote such input bounded and escaped, as it quotes bad app files.
pub fn raw_input(line: &str) -> Option<&'static str> {
    if line.contains(&"a".repeat(200)) || line.len() > 8192 {
        Some("a 10 000-character app name, or a line longer than 8 KiB")
    } else if line.contains("\u{1b}[31mforged") || line.contains("\nipclusterd: ") {
        Some("an app name with a line break and a terminal escape")
    } else {
        None
    }
}

/// Whether a journal line says the daemon panicked.
pub fn is_panic(line: &str) -> bool {
    line.contains("panicked at") || line.starts_with("thread '") && line.contains("panicked")
}

/// The `p`-th percentile (0..=100) of `values`, sorted here.
pub fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let i = ((p / 100.0) * (values.len() - 1) as f64).round() as usize;
    values[i.min(values.len() - 1)]
}

#[cfg(test)]
#[path = "account_tests.rs"]
mod tests;
