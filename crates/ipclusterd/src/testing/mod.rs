//! Test doubles of the supervisor's seams, one small file each, and [`Fake`], the world made of
//! them. They record what the supervisor asked for and let a test play the world's part (a
//! worker that becomes ready, exits, grows, stops sending WATCHDOG=1; an app file that changes;
//! a disk that fails). The sandboxed end-to-end tests prove the real implementations; these
//! make the supervisor's rules testable in milliseconds, without root and without real
//! processes, under tokio's paused time.
//!
//! Compiled for this crate's tests and with the `testing` feature (which only the
//! dev-dependency of this crate's integration tests enables): never in the daemon.

mod checker;
mod host;
mod inspect;
mod processes;
mod router;
mod sample;
mod scopes;
mod steer;

use std::sync::{Mutex, MutexGuard};

pub use checker::FakeChecker;
pub use host::{FakeFiles, FakeNotifier, FakeRelay, FakeStore};
pub use processes::{FakeGated, FakeProc, FakeProcesses};
pub use router::FakeRouter;
pub use scopes::FakeScopes;
pub use steer::{FakeGroup, FakeSteer, FakeTable};

use crate::world::World;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The world of the supervisor's unit tests: every seam a fake.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fake;

impl World for Fake {
    type Scopes = FakeScopes;
    type Router = FakeRouter;
    type Spawner = FakeProcesses;
    type Inspector = FakeProcesses;
    type Sampler = FakeProcesses;
    type Steer = FakeSteer;
    type Files = FakeFiles;
    type Store = FakeStore;
    type Notifier = FakeNotifier;
    type Relay = FakeRelay;
    type Checker = FakeChecker;
}
