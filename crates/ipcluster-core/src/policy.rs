//! Policies over time: the respawn backoff of a crashing band.

use std::time::Duration;

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
    /// A backoff between `min` and `max` (the seed's defaults: 100 ms to 30 s).
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
        Self::new(Duration::from_millis(100), Duration::from_secs(30))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
