//! Policies: the respawn backoff of a crashing band, the rate limit on memory and health
//! retirements, and the cluster memory watermarks (docs/ARCHITECTURE.md, "Memory and health").
//!
//! Time is passed in as a `Duration` since any fixed origin (the daemon uses a monotonic clock),
//! so tests drive these with a fake clock.

use std::{collections::VecDeque, time::Duration};

/// How long a worker must have been up for its band's backoff to start over.
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(60);

/// Respawn delays of one band: `min`, doubling on each crash up to `max`, back to `min` once a
/// worker stayed up for [`BACKOFF_RESET_AFTER`]. A crash loop never spins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    last: Option<Duration>,
}

impl Backoff {
    /// A backoff between `min` and `max` (`restart_backoff`).
    pub fn new(min: Duration, max: Duration) -> Self {
        Self { min, max: max.max(min), last: None }
    }

    /// The delay before respawning after a crash of a worker that was up for `up_for`.
    pub fn on_crash(&mut self, up_for: Duration) -> Duration {
        if up_for >= BACKOFF_RESET_AFTER {
            self.last = None;
        }
        let next = match self.last {
            None => self.min,
            Some(d) => (d * 2).min(self.max),
        };
        self.last = Some(next);
        next
    }

    /// A backoff that resumes where a previous one (of a previous daemon) stopped.
    pub fn resumed(min: Duration, max: Duration, last: Duration) -> Self {
        Self { last: Some(last.clamp(min, max.max(min))), ..Self::new(min, max) }
    }

    /// The delay chosen for the last crash, if any.
    pub fn current(&self) -> Option<Duration> {
        self.last
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(crate::config::defaults::RESTART_BACKOFF.0, crate::config::defaults::RESTART_BACKOFF.1)
    }
}

/// At most `max` events per sliding `window`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimiter {
    max: u32,
    window: Duration,
    events: VecDeque<Duration>,
}

impl RateLimiter {
    /// `max` events per `window` (`retire_rate`).
    pub fn new(max: u32, window: Duration) -> Self {
        Self { max, window, events: VecDeque::new() }
    }

    /// Takes one event at `now` if the limit allows it; returns whether it did.
    pub fn try_take(&mut self, now: Duration) -> bool {
        while self.events.front().is_some_and(|t| now.saturating_sub(*t) >= self.window) {
            self.events.pop_front();
        }
        if self.events.len() as u32 >= self.max {
            return false;
        }
        self.events.push_back(now);
        true
    }

    /// Changes the limit (the app file changed), keeping the events already taken.
    pub fn set_limit(&mut self, max: u32, window: Duration) {
        self.max = max;
        self.window = window;
    }
}

/// One of an app's workers, as the cluster memory policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemWorker {
    pub id: u64,
    pub rss: u64,
    /// Session records its generation holds (session affinity; fewer = more killable: fewer
    /// clients lose theirs). 0 for a generation without sessions.
    pub sessions: u32,
    /// Open connections (fewer = more killable).
    pub connections: u32,
    /// Start time (earlier = older = more killable at equal connections and RSS).
    pub started: u64,
    pub state: MemState,
}

/// What the policy may do with a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemState {
    /// Never stopped or killed for cluster pressure.
    Live,
    /// May be stopped (stop signal) over 80 % and killed over 95 %.
    Retired,
    /// Already asked to stop: its memory counts as leaving; may be killed over 95 %.
    Stopping,
}

/// What to do about cluster memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemVerdict {
    /// Retired workers to send the stop signal, in order.
    pub stop: Vec<u64>,
    /// Retired or stopping workers to SIGKILL, in order.
    pub kill: Vec<u64>,
    /// Live workers alone exceed the budget (reported, never acted on).
    pub live_over_budget: bool,
}

/// The cluster memory watermarks: over 95 % of `budget`, retired (and stopping) workers are
/// killed, most killable first, until the total is at most 95 %; then, while the projected total
/// (without workers already leaving) is over 80 %, retired workers are asked to stop. Most
/// killable first = fewest session records (a draining generation's), then fewest open
/// connections, then largest RSS, then oldest.
pub fn cluster_memory(workers: &[MemWorker], budget: u64) -> MemVerdict {
    let high = budget / 100 * 95 + budget % 100 * 95 / 100;
    let low = budget / 100 * 80 + budget % 100 * 80 / 100;
    let mut order: Vec<&MemWorker> = workers.iter().filter(|w| w.state != MemState::Live).collect();
    order.sort_by(|a, b| {
        a.sessions
            .cmp(&b.sessions)
            .then(a.connections.cmp(&b.connections))
            .then(b.rss.cmp(&a.rss))
            .then(a.started.cmp(&b.started))
            .then(a.id.cmp(&b.id))
    });
    let total: u64 = workers.iter().map(|w| w.rss).sum();
    let mut verdict = MemVerdict {
        live_over_budget: workers.iter().filter(|w| w.state == MemState::Live).map(|w| w.rss).sum::<u64>()
            > budget,
        ..MemVerdict::default()
    };
    let mut now = total;
    for w in &order {
        if now <= high {
            break;
        }
        verdict.kill.push(w.id);
        now -= w.rss;
    }
    let leaving: u64 = order
        .iter()
        .filter(|w| w.state == MemState::Stopping && !verdict.kill.contains(&w.id))
        .map(|w| w.rss)
        .sum();
    let mut projected = now - leaving;
    for w in order.iter().filter(|w| w.state == MemState::Retired && !verdict.kill.contains(&w.id)) {
        if projected <= low {
            break;
        }
        verdict.stop.push(w.id);
        projected -= w.rss;
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    fn w(id: u64, rss_mb: u64, connections: u32, started: u64, state: MemState) -> MemWorker {
        MemWorker { id, rss: rss_mb * MB, sessions: 0, connections, started, state }
    }

    #[test]
    fn the_11th_retirement_in_the_window_is_held_back() {
        let mut r = RateLimiter::new(10, Duration::from_secs(120));
        let t = |s: u64| Duration::from_secs(s);
        for i in 0..10 {
            assert!(r.try_take(t(i)), "retirement {} allowed", i + 1);
        }
        assert!(!r.try_take(t(60)), "the 11th inside the window is held back");
        assert!(!r.try_take(t(119)));
        assert!(r.try_take(t(120)), "the first one left the window");
        assert!(!r.try_take(t(120)));
    }

    #[test]
    fn under_80_percent_nothing_happens() {
        let ws = [w(1, 300, 0, 0, MemState::Live), w(2, 100, 0, 0, MemState::Retired)];
        assert_eq!(cluster_memory(&ws, 512 * MB), MemVerdict::default());
    }

    #[test]
    fn over_80_percent_retired_workers_stop_most_killable_first() {
        // Budget 1000 MB: 80 % = 800 MB, 95 % = 950 MB. Total 900 MB.
        let ws = [
            w(1, 500, 9, 0, MemState::Live),
            w(2, 100, 3, 10, MemState::Retired), // more connections: last
            w(3, 100, 0, 20, MemState::Retired), // fewest connections, equal RSS, younger
            w(4, 100, 0, 10, MemState::Retired), // fewest connections, equal RSS, older: first
            w(5, 100, 0, 30, MemState::Retired),
        ];
        let v = cluster_memory(&ws, 1000 * MB);
        assert_eq!(v.stop, [4], "one 100 MB worker takes 900 down to 800");
        assert!(v.kill.is_empty() && !v.live_over_budget);
        // Larger RSS goes before smaller at equal connections.
        let ws = [
            w(1, 700, 0, 0, MemState::Live),
            w(2, 100, 0, 0, MemState::Retired),
            w(3, 150, 0, 9, MemState::Retired),
        ];
        assert_eq!(cluster_memory(&ws, 1000 * MB).stop, [3]);
    }

    #[test]
    fn over_95_percent_retired_workers_are_killed_then_stopped() {
        // Total 1000 of 1000: kill until <= 950, then stop until projected <= 800.
        let ws = [
            w(1, 600, 5, 0, MemState::Live),
            w(2, 100, 0, 1, MemState::Retired),
            w(3, 200, 1, 2, MemState::Stopping),
            w(4, 100, 2, 3, MemState::Retired),
        ];
        let v = cluster_memory(&ws, 1000 * MB);
        assert_eq!(v.kill, [2], "100 MB killed: 1000 -> 900 <= 950");
        // Projected without the stopping one: 900 - 200 = 700 <= 800: nobody else is stopped.
        assert!(v.stop.is_empty(), "{v:?}");
    }

    #[test]
    fn a_draining_generation_with_sessions_is_killed_after_one_without() {
        // Total 1000 of 1000: one kill takes it to 900 <= 950. Worker 2 has no connection but
        // its generation holds 40 session records; worker 3 has connections and no record.
        let mut ws = [
            w(1, 600, 5, 0, MemState::Live),
            w(2, 200, 0, 1, MemState::Retired),
            w(3, 200, 4, 2, MemState::Retired),
        ];
        ws[1].sessions = 40;
        let v = cluster_memory(&ws, 1000 * MB);
        assert_eq!(v.kill, [3], "the one whose clients keep no session goes first: {v:?}");
        assert!(v.stop.is_empty(), "900 - 200 = 800 is not over 80 %: {v:?}");
    }

    #[test]
    fn live_workers_are_never_touched_but_reported() {
        let ws = [w(1, 700, 0, 0, MemState::Live), w(2, 400, 0, 0, MemState::Live)];
        let v = cluster_memory(&ws, 1000 * MB);
        assert!(v.stop.is_empty() && v.kill.is_empty());
        assert!(v.live_over_budget);
    }

    #[test]
    fn doubles_to_the_maximum_and_resets_after_a_minute_up() {
        let mut b = Backoff::default();
        let quick = Duration::from_millis(10);
        let delays: Vec<u128> = (0..12).map(|_| b.on_crash(quick).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000, 30000]);
        assert_eq!(b.on_crash(Duration::from_secs(61)), Duration::from_millis(100));
        assert_eq!(b.on_crash(quick), Duration::from_millis(200));
    }

    #[test]
    fn resumes_after_a_restart() {
        let mut b =
            Backoff::resumed(Duration::from_millis(100), Duration::from_secs(30), Duration::from_secs(8));
        assert_eq!(b.on_crash(Duration::ZERO), Duration::from_secs(16));
        assert_eq!(b.current(), Some(Duration::from_secs(16)));
    }
}
