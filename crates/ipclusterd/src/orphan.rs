//! The listening sockets of crashed workers.
//!
//! The daemon holds a duplicate of every ready NAT worker's listening sockets (see
//! [`crate::process::grab_listeners`]). When a live worker dies, its sockets stay open in the
//! daemon, so a client whose connection arrives between the crash and the rule change that moves
//! the band to a neighbour is queued rather than refused. Those queued connections are accepted
//! here and relayed to the worker now serving the band. This is the only time a byte of traffic
//! passes through the daemon, so it is bounded:
//!
//! 1. the drain starts at the crash, before the rules change (a queued client waits for
//!    nothing but this accept);
//! 2. it accepts until the supervisor says the rules no longer send anything here
//!    ([`Drain::finish`]), then takes what is queued at that moment once more, and closes the
//!    socket; it never lingers on its own, so nothing can keep it open by connecting;
//! 3. at most [`MAX_RELAYS`] connections and [`MAX_ACCEPTING`] of accepting, whatever happens;
//!    each relayed connection at most [`MAX_RELAY_TIME`].
//!
//! While a drain holds a port, the supervisor keeps the port guarded from other hosts: only
//! connections the rules redirected (or this host's own) can reach it, never another host
//! connecting to the port directly.

use std::{net::SocketAddrV4, os::fd::OwnedFd, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::oneshot,
};
use tracing::{info, warn};

/// Most connections one drain relays.
pub const MAX_RELAYS: u32 = 1024;
/// Longest a drain accepts, even if it is never told to finish.
pub const MAX_ACCEPTING: Duration = Duration::from_secs(10);
/// Longest one relayed connection lives.
pub const MAX_RELAY_TIME: Duration = Duration::from_secs(300);

/// A drain in progress; dropping it finishes it too.
#[derive(Debug)]
pub struct Drain {
    finish: Option<oneshot::Sender<()>>,
}

impl Drain {
    /// A drain and what it is told through (for a relay that is not this module's: a fake).
    pub fn new() -> (Self, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        (Self { finish: Some(tx) }, rx)
    }

    /// Nothing new reaches the socket any more (the rules changed): what is queued now is
    /// relayed, then the socket closes.
    pub fn finish(mut self) {
        if let Some(tx) = self.finish.take() {
            let _ = tx.send(());
        }
    }
}

/// Starts draining `listener` (a dead worker's socket for `port`) into `target`, in the
/// background; `done` gets how many connections were relayed once the socket is closed.
pub fn drain(
    app: String,
    port: u16,
    listener: OwnedFd,
    target: SocketAddrV4,
    done: impl FnOnce(u32) + Send + 'static,
) -> Drain {
    let (handle, mut finish) = Drain::new();
    tokio::spawn(async move {
        let relayed = run(&app, port, listener, target, &mut finish).await;
        if relayed > 0 {
            info!(
                "{app}: relayed {relayed} connections that reached the crashed worker's port {port} to {target}"
            );
        }
        done(relayed);
    });
    handle
}

async fn run(
    app: &str,
    port: u16,
    listener: OwnedFd,
    target: SocketAddrV4,
    finish: &mut oneshot::Receiver<()>,
) -> u32 {
    let std_listener = std::net::TcpListener::from(listener);
    if let Err(e) = std_listener.set_nonblocking(true) {
        warn!("{app}: cannot drain port {port}: {e}");
        return 0;
    }
    let Ok(listener) = TcpListener::from_std(std_listener) else { return 0 };
    let mut relayed = 0u32;
    let deadline = tokio::time::sleep(MAX_ACCEPTING);
    tokio::pin!(deadline);
    // Accept until told to finish (or the bounds), relaying each connection.
    while relayed < MAX_RELAYS {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    relayed += 1;
                    relay(client, target);
                }
                Err(_) => break,
            },
            _ = &mut *finish => break,
            () = &mut deadline => {
                warn!("{app}: stopped draining port {port} after {MAX_ACCEPTING:?} (the rules did not change in time)");
                break;
            }
        }
    }
    // Once more: what was queued when the rules changed.
    while relayed < MAX_RELAYS {
        match std::future::poll_fn(|cx| match listener.poll_accept(cx) {
            std::task::Poll::Pending => std::task::Poll::Ready(None),
            std::task::Poll::Ready(r) => std::task::Poll::Ready(Some(r)),
        })
        .await
        {
            Some(Ok((client, _))) => {
                relayed += 1;
                relay(client, target);
            }
            _ => break,
        }
    }
    if relayed >= MAX_RELAYS {
        warn!("{app}: stopped draining port {port} after {MAX_RELAYS} connections");
    }
    relayed
}

/// Relays one connection to `target`, for at most [`MAX_RELAY_TIME`].
fn relay(mut client: TcpStream, target: SocketAddrV4) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(MAX_RELAY_TIME, async {
            if let Ok(mut upstream) = TcpStream::connect(target).await {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            }
        })
        .await;
    });
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// What queued before the drain started, and what arrives while it runs, is relayed; once
    /// finished, the socket is closed (a new connection is refused) and the count reported.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_drain_relays_what_queued_then_closes_when_finished() {
        let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = match upstream.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            other => panic!("{other}"),
        };
        std::thread::spawn(move || {
            for mut c in upstream.incoming().flatten() {
                let _ = c.write_all(b"upstream");
            }
        });
        let orphan = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = orphan.local_addr().unwrap();
        // Queued before the drain starts: the crashed worker's backlog.
        let queued = std::net::TcpStream::connect(addr).unwrap();
        let (tx, rx) = oneshot::channel();
        let d = drain("t".into(), addr.port(), OwnedFd::from(orphan), target, move |n| {
            let _ = tx.send(n);
        });
        let during = std::net::TcpStream::connect(addr).unwrap();
        for mut c in [queued, during] {
            let mut buf = String::new();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            c.read_to_string(&mut buf).unwrap();
            assert_eq!(buf, "upstream");
        }
        d.finish();
        assert_eq!(tokio::time::timeout(Duration::from_secs(5), rx).await.unwrap().unwrap(), 2);
        assert!(std::net::TcpStream::connect(addr).is_err(), "the orphaned socket is closed");
    }
}
