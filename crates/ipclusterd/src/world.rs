//! [`World`]: every seam the supervisor acts through, named once.
//!
//! The supervisor is generic over one type, `Supervisor<W: World>`, instead of one parameter
//! per seam: adding a seam is one associated type here, one field in
//! [`crate::supervisor::Deps`], its real implementation in [`System`] and its fake in
//! `testing::Fake`. Each seam is a narrow trait that says, method by method, what is
//! idempotent and what a failure leaves behind.

use crate::{
    checker::Checker,
    files::Files,
    netfilter::Router,
    processes::{Inspector, Sampler, Spawner},
    relay::Relay,
    scopes::Scopes,
    state::Store,
    status::Notifier,
    steering::Steer,
};

/// The seams of one world: the real host ([`System`]) or the fakes of the supervisor's tests.
pub trait World: Send + Sync + Sized + std::fmt::Debug + 'static {
    /// systemd: transient scopes.
    type Scopes: Scopes;
    /// netfilter: NAT rules and the guard of worker ports.
    type Router: Router;
    /// Forking, holding and signalling workers.
    type Spawner: Spawner;
    /// Reading what a process holds and says (adoption, readiness, port checks).
    type Inspector: Inspector<Handle = ProcHandle<Self>>;
    /// Memory and CPU sampling.
    type Sampler: Sampler;
    /// Socket mode's kernel side.
    type Steer: Steer;
    /// The app files and the kernel settings the config depends on.
    type Files: Files;
    /// The saved state.
    type Store: Store;
    /// The service manager's notifications (`READY=1`, `STATUS=`, the watchdog).
    type Notifier: Notifier;
    /// Relays of what queued on a crashed worker's sockets.
    type Relay: Relay;
    /// HTTP health checks of workers.
    type Checker: Checker;
}

/// How the supervisor holds a worker process in world `W` (a pidfd on the real host).
pub type ProcHandle<W> = <<W as World>::Spawner as Spawner>::Handle;
/// A worker forked and held at its gate in world `W`.
pub type Gated<W> = <<W as World>::Spawner as Spawner>::Gated;

/// The real host.
#[derive(Debug, Clone, Copy, Default)]
pub struct System;

impl World for System {
    type Scopes = crate::scopes::Systemd;
    type Router = crate::netfilter::Iptables;
    type Spawner = crate::processes::Host;
    type Inspector = crate::processes::Host;
    type Sampler = crate::processes::Host;
    type Steer = crate::steering::Kernel;
    type Files = crate::files::Disk;
    type Store = crate::state::StateFile;
    type Notifier = crate::status::Systemd;
    type Relay = crate::relay::Orphans;
    type Checker = crate::checker::Http;
}
