//! Every default of an app file that is a number, a duration, a signal or a path, in one place:
//! the parser, the fallback settings of a generation adopted without its file, and the policies
//! all take them from here. The defaults of the enums and switches (`routing = "nat"`, `ready =
//! "tcp"`, `autostart = true`) are in `AppConfig::with_defaults`, beside the type.

use std::time::Duration;

use crate::units::Signal;

/// `workers`.
pub const WORKERS: u32 = 4;
/// `port_range`: the workers' own ports. Below Linux's ephemeral range (32768-60999), so an
/// outgoing connection never takes a port a worker is about to listen on (and a probe never
/// connects to itself); below the Kubernetes NodePort range (30000-32767) too. 10000 ports hold
/// two generations of 1024 workers with four listen entries each.
pub const PORT_RANGE: (u16, u16) = (20000, 29999);
/// `ready_timeout`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// `working_directory`.
pub const WORKING_DIRECTORY: &str = "/";
/// `stop_signal`.
pub const STOP_SIGNAL: Signal = Signal::Term;
/// `stop_timeout`: SIGKILL after this.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// `retire_nice`: added to the daemon's own nice value for retired workers.
pub const RETIRE_NICE: i32 = 5;
/// `retire_rate`: at most 10 memory or health retirements per 2 minutes (the original
/// project's limit).
pub const RETIRE_RATE: (u32, Duration) = (10, Duration::from_secs(120));
/// `max_draining`: generations of an app whose clients still stick to them at once.
pub const MAX_DRAINING: u32 = 2;
/// The most `max_draining` may be: with the live generation and a staged one, the eight slots
/// socket mode's steering has per group.
pub const MAX_DRAINING_LIMIT: u32 = 6;
/// The longest `session_affinity`.
pub const MAX_SESSION_AFFINITY: Duration = Duration::from_secs(24 * 3600);
/// `restart_backoff`: a crashed band is respawned after 100 ms, doubling up to 30 s.
pub const RESTART_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(30));
/// `health_interval`: how often each worker's `health_path` is checked.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// `health_timeout`: a check that has no status line by then failed.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// `health_failures`: failed checks in a row that make a live worker unhealthy.
pub const HEALTH_FAILURES: u32 = 3;
