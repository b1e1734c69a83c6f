//! `org.ipcluster1.Manager`: a thin adapter. It converts D-Bus types, sends a command to the
//! supervisor and maps the answer back; it holds no state of its own.

use crate::supervisor::Handle;

/// The D-Bus object at `/org/ipcluster1`.
#[derive(Debug)]
pub struct Manager {
    #[allow(dead_code, reason = "used by the methods that follow")]
    handle: Handle,
}

impl Manager {
    /// An adapter forwarding to the supervisor behind `handle`.
    pub fn new(handle: Handle) -> Self {
        Self { handle }
    }
}

#[zbus::interface(name = "org.ipcluster1.Manager")]
impl Manager {
    /// The version of the running daemon.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        ipcluster_core::VERSION.to_owned()
    }
}
