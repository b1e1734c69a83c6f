//! What `ipclusterctl top` shows, without a terminal: the generations and workers as the last
//! `ListGenerations`/`ListWorkers` said, changed at once by the signals that arrived since
//! ([`View::signal`]), each worker's CPU % from the movement of its `cpu_usec`, the recent
//! events, and the frame drawn from all that for a given terminal size ([`View::render`]).
//!
//! Signals and the replies of a refresh race (zbus hands them over separately, and a reply may
//! have been computed before a signal that is handled first), so a refresh replays on top of its
//! reply every signal that arrived while it was in flight: a reply never undoes a newer signal,
//! and an older signal replayed onto a newer reply is followed by the signals that came after it.

use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, Instant},
};

use ipcluster_bus::{GenerationRow, SessionRow, WorkerRow};

use super::table::{Cell, Col, Table, bytes, cut, plural, printable, seconds, shown};
pub use super::table::{Line, Span, Style};
use crate::output::{age_at, rank};

/// How many recent events the view keeps (and shows, when there is room).
const EVENTS: usize = 8;
/// The widest the APP column grows (app names are at most 24 characters).
const APP_WIDTH: usize = 16;

/// A moment, as both clocks tell it: the monotonic one for rates, the wall clock for ages.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub at: Instant,
    /// µs since the epoch, the unit of the rows' `start_usec`.
    pub usec: u64,
}

impl Now {
    pub fn current() -> Self {
        Self { at: Instant::now(), usec: crate::output::now_usec() }
    }

    /// `d` later on both clocks.
    #[cfg(test)]
    pub fn after(self, d: Duration) -> Self {
        Self { at: self.at + d, usec: self.usec + d.as_micros() as u64 }
    }
}

/// A signal of `org.ipcluster1.Manager`, as the view uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    State { app: String, generation: u64, state: String },
    Ready { app: String, generation: u64, band: u32, pid: u32 },
    Exited { app: String, generation: u64, band: u32, pid: u32, reason: String },
    HeldBack { app: String, generation: u64, band: u32, pid: u32, reason: String },
}

impl Signal {
    fn app(&self) -> &str {
        match self {
            Signal::State { app, .. }
            | Signal::Ready { app, .. }
            | Signal::Exited { app, .. }
            | Signal::HeldBack { app, .. } => app,
        }
    }

    /// The line in the events list; `None` for what the tables show well enough alone (a band
    /// ready: a deploy of 64 workers would push every other event out).
    fn event(&self) -> Option<String> {
        match self {
            Signal::State { app, generation, state } => {
                Some(format!("{app}: generation {generation} {state}"))
            }
            Signal::Ready { .. } => None,
            Signal::Exited { app, generation, band, pid, reason } => Some(format!(
                "{app}: generation {generation} band {band}: pid {pid} exited: {}",
                printable(reason)
            )),
            Signal::HeldBack { app, generation, band, pid, reason } => Some(format!(
                "{app}: generation {generation} band {band}: pid {pid} held back: {}",
                printable(reason)
            )),
        }
    }
}

/// A worker's CPU %, from the movement of its `cpu_usec`.
///
/// The daemon samples every `sample_interval` (1 s by default), not when it is asked, so two
/// refreshes may see the same sample, or a refresh may see two samples' worth. The rate is
/// therefore taken between the last two *distinct* values, each timed when this client first saw
/// it (both at the same phase of the refresh, so their distance is the daemon's): a refresh that
/// sees nothing new neither halves nor doubles it. A value that has not moved for longer than
/// `settle` (and half again the last span, for a daemon that samples slowly) means idle: 0 %.
#[derive(Debug, Clone)]
pub struct Cpu {
    /// The latest distinct value and when it was first seen.
    last: (u64, Instant),
    /// The one before it.
    before: Option<(u64, Instant)>,
    /// The average since the worker started, until a rate can be measured.
    first: Option<f64>,
}

impl Cpu {
    pub fn new(cpu_usec: u64, start_usec: u64, now: Now) -> Self {
        let age = now.usec.saturating_sub(start_usec);
        let first = (start_usec > 0 && age > 0).then(|| cpu_usec as f64 * 100.0 / age as f64);
        Self { last: (cpu_usec, now.at), before: None, first }
    }

    pub fn observe(&mut self, cpu_usec: u64, at: Instant) {
        if cpu_usec > self.last.0 {
            self.before = Some(self.last);
            self.last = (cpu_usec, at);
        } else if cpu_usec < self.last.0 {
            // A process of the worker's tree exited and took its CPU time along: start over.
            *self = Self { last: (cpu_usec, at), before: None, first: None };
        }
    }

    pub fn percent(&self, at: Instant, settle: Duration) -> Option<f64> {
        let quiet = at.saturating_duration_since(self.last.1);
        let Some((cpu0, t0)) = self.before else {
            return if quiet > settle { Some(0.0) } else { self.first };
        };
        let span = self.last.1.saturating_duration_since(t0);
        if quiet > settle.max(span * 3 / 2) {
            return Some(0.0);
        }
        (!span.is_zero()).then(|| (self.last.0 - cpu0) as f64 * 100.0 / span.as_micros() as f64)
    }
}

#[derive(Debug, Clone)]
struct Gen {
    state: String,
    workers: u32,
    start_usec: Option<u64>,
    /// Session records (an app with session affinity), as of the last refresh.
    sessions: Option<u32>,
}

#[derive(Debug, Clone)]
struct Worker {
    app: String,
    generation: u64,
    band: u32,
    state: String,
    ports: Vec<(u16, u16)>,
    rss: Option<u64>,
    start_usec: Option<u64>,
    nice: Option<i32>,
    cpu: Option<Cpu>,
}

/// The live view's model.
#[derive(Debug)]
pub struct View {
    /// The app shown ("" = every app).
    app: String,
    /// How long a `cpu_usec` that does not move means idle (see [`Cpu`]).
    settle: Duration,
    interval: Duration,
    gens: BTreeMap<(String, u64), Gen>,
    /// By pid: one worker per pid at a time.
    workers: BTreeMap<u32, Worker>,
    /// (when, text), oldest first.
    events: VecDeque<(u64, String)>,
    /// Signals that arrived since the refresh in flight was sent, to replay onto its reply.
    in_flight: Option<Vec<Signal>>,
    /// Why the last refresh failed, and since when refreshes fail.
    error: Option<(String, u64)>,
    updated_usec: Option<u64>,
}

impl View {
    pub fn new(app: &str, interval: Duration) -> Self {
        Self {
            app: app.to_owned(),
            // The daemon samples every second by default: a value unmoved for two refreshes
            // beyond that is idle.
            settle: interval * 2 + Duration::from_secs(1),
            interval,
            gens: BTreeMap::new(),
            workers: BTreeMap::new(),
            events: VecDeque::new(),
            in_flight: None,
            error: None,
            updated_usec: None,
        }
    }

    /// A refresh was sent: signals from now on are replayed onto its reply.
    pub fn begin_refresh(&mut self) {
        self.in_flight = Some(Vec::new());
    }

    /// A refresh's reply: the rows replace what the view had, then the signals that arrived
    /// meanwhile are applied again.
    pub fn refreshed(&mut self, gens: Vec<GenerationRow>, workers: Vec<WorkerRow>, now: Now) {
        self.gens = gens
            .into_iter()
            .map(|g| {
                let gen_ = Gen {
                    state: g.state,
                    workers: g.workers,
                    start_usec: Some(g.start_usec),
                    sessions: None,
                };
                ((g.app, g.generation), gen_)
            })
            .collect();
        let mut old = std::mem::take(&mut self.workers);
        for w in workers {
            // The same process (a pid is reused only by another process, which starts later).
            let cpu = match old.remove(&w.pid) {
                Some(Worker { cpu: Some(mut cpu), start_usec: Some(s), .. }) if s == w.start_usec => {
                    cpu.observe(w.cpu_usec, now.at);
                    cpu
                }
                _ => Cpu::new(w.cpu_usec, w.start_usec, now),
            };
            let worker = Worker {
                app: w.app,
                generation: w.generation,
                band: w.band,
                state: w.state,
                ports: w.ports,
                rss: Some(w.rss),
                start_usec: Some(w.start_usec),
                nice: Some(w.nice),
                cpu: Some(cpu),
            };
            self.workers.insert(w.pid, worker);
        }
        for s in self.in_flight.take().unwrap_or_default() {
            self.apply(&s, now);
        }
        self.error = None;
        self.updated_usec = Some(now.usec);
    }

    /// A refresh failed: what the view shows stays, marked as old, with the reason.
    pub fn refresh_failed(&mut self, message: String, now: Now) {
        self.in_flight = None;
        let since = self.error.as_ref().map_or(now.usec, |(_, since)| *since);
        self.error = Some((message, since));
    }

    /// A signal: shown at once, and kept for the refresh in flight.
    pub fn signal(&mut self, s: Signal, now: Now) {
        if !self.app.is_empty() && s.app() != self.app {
            return;
        }
        if let Some(text) = s.event() {
            if self.events.len() == EVENTS {
                self.events.pop_front();
            }
            self.events.push_back((now.usec, text));
        }
        self.apply(&s, now);
        if let Some(pending) = &mut self.in_flight {
            pending.push(s);
        }
    }

    /// ListSessions' reply, with the refresh's: each generation's records.
    pub fn sessions(&mut self, rows: &[SessionRow]) {
        for r in rows {
            if let Some(g) = self.gens.get_mut(&(r.app.clone(), r.generation)) {
                g.sessions = Some(r.records);
            }
        }
    }

    /// The effect of a signal on the rows: what the daemon did to its own model when it sent it.
    fn apply(&mut self, s: &Signal, now: Now) {
        match s {
            Signal::State { app, generation, state } => {
                let key = (app.clone(), *generation);
                let gen_ = self.gens.entry(key).or_insert_with(|| Gen {
                    state: state.clone(),
                    workers: 0,
                    // A generation first heard of as starting starts now.
                    start_usec: (state == "starting").then_some(now.usec),
                    sessions: None,
                });
                gen_.state = state.clone();
                let of_gen = |w: &Worker| w.app == *app && w.generation == *generation;
                match state.as_str() {
                    // The cutover: every worker of the generation was ready.
                    "live" => self.set_states(of_gen, &["starting"], "live"),
                    // A canary's cutover: its bands' workers serve.
                    "canary" => self.set_states(of_gen, &["starting"], "live"),
                    "retired" | "draining" => self.set_states(of_gen, &["live", "starting"], "retired"),
                    // A failed generation's workers are being stopped.
                    "failed" => self.set_states(of_gen, &["live", "starting", "retired"], "stopping"),
                    // Sent once the generation's last worker left.
                    "stopped" => self.workers.retain(|_, w| !of_gen(w)),
                    _ => {}
                }
                self.count(app, *generation);
            }
            Signal::Ready { app, generation, band, pid } => {
                let live = self.gens.get(&(app.clone(), *generation)).is_some_and(|g| g.state == "live");
                if live {
                    // A replacement in a live generation takes its band over; the worker it
                    // replaced (if still there) is retired, as the daemon does.
                    for w in self.workers.values_mut() {
                        if w.app == *app
                            && w.generation == *generation
                            && w.band == *band
                            && w.state == "live"
                        {
                            w.state = "retired".into();
                        }
                    }
                }
                // Ready in a starting generation: still starting until the cutover.
                let state = if live { "live" } else { "starting" };
                let known =
                    self.workers.get(pid).is_some_and(|w| w.app == *app && w.generation == *generation);
                if known {
                    if let Some(w) = self.workers.get_mut(pid) {
                        w.state = state.into();
                    }
                } else {
                    let w = Worker {
                        app: app.clone(),
                        generation: *generation,
                        band: *band,
                        state: state.into(),
                        ports: Vec::new(),
                        rss: None,
                        start_usec: None,
                        nice: None,
                        cpu: None,
                    };
                    self.workers.insert(*pid, w);
                }
                self.count(app, *generation);
            }
            Signal::Exited { app, generation, pid, .. } => {
                if self.workers.get(pid).is_some_and(|w| w.app == *app && w.generation == *generation) {
                    self.workers.remove(pid);
                }
                self.count(app, *generation);
            }
            Signal::HeldBack { .. } => {}
        }
    }

    fn set_states(&mut self, of_gen: impl Fn(&Worker) -> bool, from: &[&str], to: &str) {
        for w in self.workers.values_mut().filter(|w| of_gen(w)) {
            if from.contains(&w.state.as_str()) {
                w.state = to.into();
            }
        }
    }

    /// A generation's worker count, after a signal changed its workers.
    fn count(&mut self, app: &str, generation: u64) {
        let n = self.workers.values().filter(|w| w.app == app && w.generation == generation).count();
        if let Some(g) = self.gens.get_mut(&(app.to_owned(), generation)) {
            g.workers = n as u32;
        }
    }

    /// Workers in the order `status` lists them: live first, then by app, newest generation,
    /// band.
    fn sorted_workers(&self) -> Vec<(u32, &Worker)> {
        let mut rows: Vec<(u32, &Worker)> = self.workers.iter().map(|(pid, w)| (*pid, w)).collect();
        rows.sort_by(|(pa, a), (pb, b)| {
            (rank(&a.state), &a.app, std::cmp::Reverse(a.generation), a.band, pa).cmp(&(
                rank(&b.state),
                &b.app,
                std::cmp::Reverse(b.generation),
                b.band,
                pb,
            ))
        });
        rows
    }

    /// Generations in the order `status` lists them: by app, live first, newest first.
    fn sorted_gens(&self) -> Vec<(&(String, u64), &Gen)> {
        let mut rows: Vec<_> = self.gens.iter().collect();
        rows.sort_by(|(ka, a), (kb, b)| {
            (&ka.0, rank(&a.state), std::cmp::Reverse(ka.1)).cmp(&(
                &kb.0,
                rank(&b.state),
                std::cmp::Reverse(kb.1),
            ))
        });
        rows
    }

    /// The frame: with `size` (columns, rows), the live view fitted to the terminal (title, the
    /// tables, the events); without, the tables alone, whole (a snapshot for a pipe).
    pub fn render(&self, size: Option<(usize, usize)>, now: Now) -> Vec<Line> {
        let (g, w) = (self.gens.len(), self.workers.len());
        let Some((width, height)) = size else {
            let mut out = self.gens_table(now, None, g).lines();
            out.push(Line::default());
            out.extend(self.workers_table(now, None, w).lines());
            return out;
        };
        let mut out = vec![self.title(width)];
        if let Some((message, since)) = &self.error {
            let last = self
                .updated_usec
                .map_or_else(String::new, |u| format!(" (last update {} ago)", age_at(u, now.usec)));
            let failing = if now.usec.saturating_sub(*since) >= 1_000_000 {
                format!(", for {}", age_at(*since, now.usec))
            } else {
                String::new()
            };
            out.push(Line::one(format!("{message}{failing}{last}"), Style::Error));
        }
        out.push(Line::default());
        // Rows for the tables: what is left after the title, their headers and the line between.
        let budget = height.saturating_sub(out.len() + 3);
        // The workers come first; generations get what they leave, and at least a third.
        let g_rows = g.min(budget.saturating_sub(w).max(budget / 3));
        let w_rows = w.min(budget - g_rows);
        // Only the rows shown are formatted (and size their columns): a frame of 1024 workers
        // costs what a frame of 40 does.
        out.extend(self.gens_table(now, Some(width), g_rows).lines());
        out.push(Line::default());
        out.extend(self.workers_table(now, Some(width), w_rows).lines());
        // The events, newest last, where there is room below.
        let room = height.saturating_sub(out.len() + 2);
        if room > 0 && !self.events.is_empty() {
            out.push(Line::default());
            out.push(Line::one("EVENTS", Style::Header));
            let shown = self.events.len().min(room);
            for (at, text) in self.events.iter().skip(self.events.len() - shown) {
                let age = age_at(*at, now.usec);
                out.push(Line(vec![
                    Span::new(format!("{age:>5} ago  "), Style::Dim),
                    Span::new(text.clone(), Style::Plain),
                ]));
            }
        }
        out.truncate(height);
        out.into_iter().map(|l| l.cut(width)).collect()
    }

    fn title(&self, width: usize) -> Line {
        let what = if self.app.is_empty() { "every app".to_owned() } else { self.app.clone() };
        let running = self
            .gens
            .values()
            .filter(|g| matches!(g.state.as_str(), "starting" | "live" | "canary" | "draining" | "retired"))
            .count();
        let live = self.workers.values().filter(|w| w.state == "live").count();
        let left = format!(
            "ipclusterctl top: {what}: {running} running generation{}, {} worker{} ({live} live)",
            plural(running),
            self.workers.len(),
            plural(self.workers.len())
        );
        let right = format!("every {} · q quits", seconds(self.interval));
        let used = left.chars().count() + right.chars().count();
        if used + 2 <= width {
            let pad = " ".repeat(width - used);
            Line(vec![
                Span::new(left, Style::Title),
                Span::new(pad, Style::Plain),
                Span::new(right, Style::Dim),
            ])
        } else {
            Line::one(left, Style::Title)
        }
    }

    /// The generations table in `lines` rows (the last saying how many more, when not all fit).
    fn gens_table(&self, now: Now, width: Option<usize>, lines: usize) -> Table {
        // SESSIONS only when an app keeps sessions.
        let sessions = self.gens.values().any(|g| g.sessions.is_some());
        let mut cols = vec![
            Col::left("APP", 9),
            Col::right("GEN", 9),
            Col::left("STATE", 10),
            Col::right("WORKERS", 6),
            Col::right("SESSIONS", 7),
            Col::right("AGE", 4),
            Col::left("SCOPE", 2),
        ];
        if !sessions {
            cols.remove(4);
        }
        let all = self.sorted_gens();
        let total = all.len();
        let rows = all
            .into_iter()
            .take(shown(lines, total))
            .map(|((app, n), g)| {
                let mut row = vec![
                    Cell::plain(cut(app, APP_WIDTH)),
                    Cell::plain(n.to_string()),
                    Cell::state(&g.state),
                    Cell::plain(g.workers.to_string()),
                    Cell::plain(g.sessions.map_or_else(|| "-".into(), |n| n.to_string())),
                    Cell::plain(g.start_usec.map_or_else(|| "-".into(), |s| age_at(s, now.usec))),
                    Cell::plain(format!("ipcluster-{app}-{n}.scope")),
                ];
                if !sessions {
                    row.remove(4);
                }
                row
            })
            .collect();
        Table::new(cols, rows, total, width, "generations")
    }

    /// The workers table in `lines` rows (the last saying how many more, when not all fit).
    fn workers_table(&self, now: Now, width: Option<usize>, lines: usize) -> Table {
        let cols = vec![
            Col::left("APP", 9),
            Col::right("GEN", 9),
            Col::right("BAND", 5),
            Col::right("PID", 8),
            Col::left("STATE", 10),
            Col::right("RSS", 6),
            Col::right("CPU%", 7),
            Col::right("NICE", 3),
            Col::right("AGE", 4),
            Col::left("PORTS", 2),
        ];
        let dash = || "-".to_owned();
        let all = self.sorted_workers();
        let total = all.len();
        let rows = all
            .into_iter()
            .take(shown(lines, total))
            .map(|(pid, w)| {
                let cpu = w.cpu.as_ref().and_then(|c| c.percent(now.at, self.settle));
                let ports: Vec<String> = w.ports.iter().map(|(p, q)| format!("{p}->{q}")).collect();
                vec![
                    Cell::plain(cut(&w.app, APP_WIDTH)),
                    Cell::plain(w.generation.to_string()),
                    Cell::plain(w.band.to_string()),
                    Cell::plain(pid.to_string()),
                    Cell::state(&w.state),
                    Cell::plain(w.rss.map_or_else(dash, bytes)),
                    Cell::plain(cpu.map_or_else(dash, |c| format!("{c:.1}"))),
                    Cell::plain(w.nice.map_or_else(dash, |n| n.to_string())),
                    Cell::plain(w.start_usec.map_or_else(dash, |s| age_at(s, now.usec))),
                    Cell::plain(if ports.is_empty() { dash() } else { ports.join(",") }),
                ]
            })
            .collect();
        Table::new(cols, rows, total, width, "workers")
    }
}

#[cfg(test)]
mod tests;
