//! The listening sockets of crashed workers.
//!
//! The daemon holds a duplicate of every ready worker's listening sockets (see
//! [`crate::process::grab_listeners`]). When a live worker dies, its sockets stay open in the
//! daemon, so a client whose connection arrives between the crash and the rule change that moves
//! the band to a neighbour is queued rather than refused. Those few queued connections are then
//! accepted here and relayed to the worker now serving the band; once nothing arrives for a
//! while, the socket is closed. This is the only time a byte of traffic passes through the daemon.

use std::{net::SocketAddrV4, os::fd::OwnedFd, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

/// How long an orphaned socket is kept after its last connection.
pub const LINGER: Duration = Duration::from_secs(2);

/// Drains `listener` (a dead worker's socket for `port`) into `target`, in the background.
pub fn drain(app: String, port: u16, listener: OwnedFd, target: SocketAddrV4) {
    tokio::spawn(async move {
        let std_listener = std::net::TcpListener::from(listener);
        if let Err(e) = std_listener.set_nonblocking(true) {
            warn!("{app}: cannot drain port {port}: {e}");
            return;
        }
        let Ok(listener) = TcpListener::from_std(std_listener) else { return };
        let mut relayed = 0u32;
        while let Ok(Ok((mut client, _))) = tokio::time::timeout(LINGER, listener.accept()).await {
            relayed += 1;
            tokio::spawn(async move {
                if let Ok(mut upstream) = TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
        if relayed > 0 {
            info!(
                "{app}: relayed {relayed} connections that reached the crashed worker's port {port} to {target}"
            );
        }
    });
}
