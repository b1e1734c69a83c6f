//! [`Relay`]: what becomes of the connections that queued on a crashed worker's listening
//! socket. [`Orphans`] accepts them and relays each to the worker now serving the band (see
//! [`crate::orphan`], which says how it is bounded); the supervisor's tests record what was
//! handed over.

use std::{net::SocketAddrV4, os::fd::OwnedFd};

use ipcluster_core::name::AppName;

pub use crate::orphan::Drain;

/// Relays for crashed workers' sockets. Runs in the background; never blocks the caller.
pub trait Relay: Send + Sync + std::fmt::Debug + 'static {
    /// Starts accepting what queues on `listener` (a dead worker's socket for its port `port`)
    /// and relaying each connection to `target`, until the returned [`Drain`] is finished (or
    /// dropped) and what was queued then is taken; then the socket is closed and `done` is
    /// called with how many connections were relayed.
    fn drain(
        &self,
        app: &AppName,
        port: u16,
        listener: OwnedFd,
        target: SocketAddrV4,
        done: Box<dyn FnOnce(u32) + Send>,
    ) -> Drain;
}

/// The real relays, on the daemon's runtime.
#[derive(Debug, Clone, Copy, Default)]
pub struct Orphans;

impl Relay for Orphans {
    fn drain(
        &self,
        app: &AppName,
        port: u16,
        listener: OwnedFd,
        target: SocketAddrV4,
        done: Box<dyn FnOnce(u32) + Send>,
    ) -> Drain {
        crate::orphan::drain(app.to_string(), port, listener, target, done)
    }
}
