//! Time, as the supervisor reads it.
//!
//! Monotonic time is tokio's (`tokio::time::Instant`, `sleep`): tests pause and advance it. Wall
//! time (start and retirement times, which the saved state carries across restarts) comes from a
//! [`Clock`], so a test can move it together with tokio's paused time.

use std::time::{Duration, SystemTime};

/// Wall-clock time. Implementations: [`SystemClock`]; [`PausedClock`] in tests.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// Now, by the wall clock.
    fn wall(&self) -> SystemTime;
}

/// The system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A wall clock that advances with tokio's (pausable) monotonic clock, from a fixed origin.
#[derive(Debug, Clone, Copy)]
pub struct PausedClock {
    origin: SystemTime,
    start: tokio::time::Instant,
}

impl PausedClock {
    /// A clock reading `origin` now; call from inside a tokio runtime.
    pub fn new(origin: SystemTime) -> Self {
        Self { origin, start: tokio::time::Instant::now() }
    }
}

impl Clock for PausedClock {
    fn wall(&self) -> SystemTime {
        self.origin + self.start.elapsed()
    }
}

/// µs since the epoch (0 before it).
pub fn usec(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The time `us` µs after the epoch.
pub fn from_usec(us: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_micros(us)
}
