//! The sd_notify receiver for workers with `ready = "notify"`.
//!
//! One datagram socket for all workers (`$RUNTIME_DIRECTORY/notify`, kept across daemon restarts
//! by `RuntimeDirectoryPreserve=yes`). `SO_PASSCRED` makes the kernel attach the sender's PID to
//! every datagram, so a worker cannot speak for another: the PID is the kernel's, not the
//! message's. See sd_notify(3) for the protocol: newline-separated `KEY=VALUE` assignments.

use std::{
    io,
    os::{fd::AsRawFd, unix::fs::PermissionsExt},
    path::{Path, PathBuf},
};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, setsockopt, sockopt::PassCred};
use tokio::net::UnixDatagram;

/// Largest datagram accepted (systemd uses the same bound for its own notify socket).
const MAX_DATAGRAM: usize = 4096;

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

/// The bound receiving socket.
#[derive(Debug)]
pub struct Receiver {
    socket: UnixDatagram,
    path: PathBuf,
}

impl Receiver {
    /// Binds `path` (replacing a stale socket file), readable by workers of any user.
    pub fn bind(path: &Path) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(path);
        let socket = UnixDatagram::bind(path)?;
        setsockopt(&socket, PassCred, &true).map_err(io::Error::from)?;
        // Workers may run as other users; the PID check, not the file mode, decides who counts.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
        Ok(Self { socket, path: path.to_owned() })
    }

    /// The socket's path, for `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Receives the next datagram with its sender's PID (datagrams without credentials are dropped).
    pub async fn recv(&self) -> io::Result<(u32, Message)> {
        loop {
            self.socket.readable().await?;
            let mut buf = vec![0u8; MAX_DATAGRAM];
            let res = self.socket.try_io(tokio::io::Interest::READABLE, || {
                let mut iov = [io::IoSliceMut::new(&mut buf)];
                let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
                let msg =
                    recvmsg::<()>(self.socket.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_DONTWAIT)
                        .map_err(io::Error::from)?;
                let mut pid = None;
                for c in msg.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmCredentials(cred) = c {
                        pid = u32::try_from(cred.pid()).ok();
                    }
                }
                Ok((pid, msg.bytes))
            });
            match res {
                Ok((Some(pid), n)) => return Ok((pid, parse(&buf[..n]))),
                Ok((None, _)) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Reads `receiver` in a task of its own and forwards each datagram with its sender's PID.
pub fn forward(receiver: Receiver) -> tokio::sync::mpsc::UnboundedReceiver<(u32, Message)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match receiver.recv().await {
                Ok(m) => {
                    if tx.send(m).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!("notify socket: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    });
    rx
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

    #[tokio::test]
    async fn kernel_supplies_the_sender_pid() {
        let dir = crate::test_dir("notify");
        let path = dir.join("notify");
        let rx = Receiver::bind(&path).unwrap();
        let tx = std::os::unix::net::UnixDatagram::unbound().unwrap();
        tx.send_to(b"READY=1\n", &path).unwrap();
        let (pid, msg) = rx.recv().await.unwrap();
        assert_eq!(pid, std::process::id());
        assert!(msg.ready);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
