//! The sd_notify receiver for workers with `ready = "notify"`.
//!
//! One datagram socket for all workers (`$RUNTIME_DIRECTORY/notify`, kept across daemon restarts
//! by `RuntimeDirectoryPreserve=yes`). `SO_PASSCRED` makes the kernel attach the sender's PID to
//! every datagram, so a worker cannot speak for another: the PID is the kernel's, not the
//! message's. See sd_notify(3) for the protocol: newline-separated `KEY=VALUE` assignments.
//!
//! The socket is writable by every local user (workers may run as any user), so [`forward`]
//! drops a datagram whose sender is in no ipcluster scope after one cheap lookup (its cgroup),
//! logging at most one line per [`DROP_LOG_EVERY`], and passes the others on with the sender's
//! cgroup, by which the supervisor finds the worker.

use std::{
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};

/// Largest datagram accepted (systemd uses the same bound for its own notify socket).
const MAX_DATAGRAM: usize = 4096;
/// Descriptors read (and closed) from one datagram; more are closed by the kernel.
const MAX_FDS: usize = 8;
/// At most one line about dropped datagrams this often.
pub const DROP_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// Notifications waiting for the supervisor; beyond this a flood from a worker is dropped.
const QUEUE: usize = 1024;
/// Where every scope of ours lives in the cgroup hierarchy.
const OUR_SLICE: &str = "/ipcluster.slice/";

/// A notification from a process in one of our scopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The sender, as the kernel says.
    pub pid: u32,
    /// The sender's cgroup (below `ipcluster.slice`).
    pub cgroup: String,
    pub message: Message,
}

/// What a worker said that the daemon acts on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    /// `READY=1`.
    pub ready: bool,
    /// `WATCHDOG=1`.
    pub watchdog: bool,
}

/// Parses a notification datagram. Other assignments (`STATUS=`, `MAINPID=`, …) are ignored,
/// as are lines that are not assignments.
pub fn parse(datagram: &[u8]) -> Message {
    let mut m = Message::default();
    for line in datagram.split(|b| *b == b'\n') {
        match line {
            b"READY=1" => m.ready = true,
            b"WATCHDOG=1" => m.watchdog = true,
            _ => {}
        }
    }
    m
}

/// The bound receiving socket (blocking: [`forward`] reads it on a thread of its own).
#[derive(Debug)]
pub struct Receiver {
    socket: std::os::unix::net::UnixDatagram,
    path: PathBuf,
}

impl Receiver {
    /// Binds `path` (replacing a stale socket file), writable by workers of any user.
    pub fn bind(path: &Path) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(path);
        let socket = std::os::unix::net::UnixDatagram::bind(path)?;
        rustix::net::sockopt::set_socket_passcred(&socket, true)?;
        // Workers may run as other users; the sender's cgroup, not the file mode, decides who counts.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
        Ok(Self { socket, path: path.to_owned() })
    }

    /// The socket's path, for `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the next datagram and returns it with its sender's PID (datagrams without
    /// credentials are dropped). Descriptors a sender passes are closed at once: sd_notify's
    /// `BARRIER=1` (systemd-notify(1) sends one after `READY=1` and waits for it to close); a
    /// sender passing more than fit is truncated by the kernel, which closes the rest.
    pub fn recv(&self) -> io::Result<(u32, Message)> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut space = [std::mem::MaybeUninit::<u8>::uninit();
            rustix::cmsg_space!(ScmCredentials(1), ScmRights(MAX_FDS))];
        loop {
            let mut iov = [io::IoSliceMut::new(&mut buf)];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let msg = rustix::net::recvmsg(&self.socket, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)?;
            let n = msg.bytes.min(MAX_DATAGRAM);
            let mut pid = None;
            for c in control.drain() {
                match c {
                    RecvAncillaryMessage::ScmCredentials(cred) => {
                        pid = u32::try_from(cred.pid.as_raw_nonzero().get()).ok()
                    }
                    // Dropping the descriptors closes them.
                    RecvAncillaryMessage::ScmRights(fds) => fds.for_each(drop),
                    _ => {}
                }
            }
            if let Some(pid) = pid {
                return Ok((pid, parse(&buf[..n])));
            }
        }
    }
}

/// Reads `receiver` on a thread of its own (so a flood costs that thread, not the daemon's
/// runtime) and forwards each datagram from a process in one of our scopes (see the module
/// docs); the rest are dropped.
pub fn forward(receiver: Receiver) -> tokio::sync::mpsc::Receiver<Notification> {
    let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
    let spawned = std::thread::Builder::new().name("notify".into()).spawn(move || {
        let mut dropped = DropLog::default();
        loop {
            let (pid, message) = match receiver.recv() {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!("notify socket: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                }
            };
            match crate::process::cgroup_of(pid).filter(|c| c.starts_with(OUR_SLICE)) {
                Some(cgroup) => match tx.try_send(Notification { pid, cgroup, message }) {
                    Ok(()) => {}
                    Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => return,
                    Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                        dropped.note(pid, "the queue is full")
                    }
                },
                None => dropped.note(pid, "not in an ipcluster scope"),
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!("cannot start the notify thread: {e}; ready = \"notify\" workers will not be seen");
    }
    rx
}

/// Counts dropped datagrams and says so at most once per [`DROP_LOG_EVERY`].
#[derive(Debug, Default)]
struct DropLog {
    count: u64,
    last_log: Option<std::time::Instant>,
}

impl DropLog {
    fn note(&mut self, pid: u32, why: &str) {
        self.count += 1;
        if self.last_log.is_none_or(|t| t.elapsed() >= DROP_LOG_EVERY) {
            tracing::warn!(
                pid,
                "notify socket: dropped {} datagrams (the last from pid {pid}: {why})",
                self.count
            );
            self.count = 0;
            self.last_log = Some(std::time::Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_assignments() {
        let m = parse(b"READY=1\nSTATUS=serving 3 clients\nMAINPID=4\n");
        assert!(m.ready && !m.watchdog);
        assert!(parse(b"WATCHDOG=1").watchdog);
        assert!(!parse(b"READY=0").ready);
        assert_eq!(parse(b"\xff\xfe garbage"), Message::default());
    }

    mod props {
        use proptest::{prelude::*, test_runner::Config};

        use super::super::{MAX_DATAGRAM, parse};

        const LINES: [&[u8]; 7] =
            [b"READY=1", b"WATCHDOG=1", b"READY=0", b"READY=1 ", b"\n", b"\xff", b"STATUS=x"];

        proptest! {
            #![proptest_config(Config { cases: 1024, failure_persistence: None, ..Config::default() })]

            /// Any datagram (at most MAX_DATAGRAM bytes, as recv reads them): no panic, and
            /// exactly the lines `READY=1` and `WATCHDOG=1` count.
            #[test]
            fn any_datagram_is_parsed_without_panicking(bytes in prop_oneof![
                prop::collection::vec(any::<u8>(), 0..MAX_DATAGRAM),
                prop::collection::vec(prop::sample::select(LINES.to_vec()), 0..20).prop_map(|p| p.concat()),
            ]) {
                let m = parse(&bytes);
                let lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
                prop_assert_eq!(m.ready, lines.contains(&&b"READY=1"[..]));
                prop_assert_eq!(m.watchdog, lines.contains(&&b"WATCHDOG=1"[..]));
            }
        }
    }

    #[test]
    fn kernel_supplies_the_sender_pid() {
        let dir = crate::test_dir("notify");
        let path = dir.join("notify");
        let rx = Receiver::bind(&path).unwrap();
        let tx = std::os::unix::net::UnixDatagram::unbound().unwrap();
        tx.send_to(b"READY=1\n", &path).unwrap();
        let (pid, msg) = rx.recv().unwrap();
        assert_eq!(pid, std::process::id());
        assert!(msg.ready);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// systemd-notify(1) follows `READY=1` with `BARRIER=1` carrying a pipe and waits until the
    /// receiver closes it; a sender may also pass more descriptors than are read. Either way the
    /// datagram is read, and every descriptor is closed.
    #[test]
    fn passed_descriptors_are_closed_and_the_datagram_still_read() {
        use std::os::fd::AsFd;

        use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
        let dir = crate::test_dir("notify-fds");
        let path = dir.join("notify");
        let rx = Receiver::bind(&path).unwrap();
        let tx = std::os::unix::net::UnixDatagram::unbound().unwrap();
        tx.connect(&path).unwrap();
        for count in [1, MAX_FDS + 5] {
            let pipes: Vec<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> =
                (0..count).map(|_| rustix::pipe::pipe().unwrap()).collect();
            let writers: Vec<std::os::fd::BorrowedFd<'_>> = pipes.iter().map(|(_, w)| w.as_fd()).collect();
            let mut space =
                vec![std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(count))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            assert!(control.push(SendAncillaryMessage::ScmRights(&writers)));
            rustix::net::sendmsg(&tx, &[io::IoSlice::new(b"BARRIER=1")], &mut control, SendFlags::empty())
                .unwrap();
            drop(writers);
            let readers: Vec<std::os::fd::OwnedFd> = pipes.into_iter().map(|(r, _)| r).collect();
            // Our own write ends are closed now: only the receiver's copies keep the pipes open.
            let (pid, _) = rx.recv().unwrap();
            assert_eq!(pid, std::process::id());
            for r in &readers {
                let mut b = [0u8; 1];
                assert_eq!(rustix::io::read(r, &mut b).unwrap(), 0, "{count} fds: every copy is closed");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
