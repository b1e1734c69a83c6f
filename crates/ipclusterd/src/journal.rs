//! journald stdout streams for workers.
//!
//! A worker's stdout and stderr are a stream socket connected to journald, opened by the
//! worker's own process after it is inside its scope and before it runs the worker's command:
//! journald attributes the stream to the connecting process's cgroup, so
//! `journalctl -u ipcluster-<app>-<g>.scope` shows the lines, and the stream does not pass
//! through (or depend on) the daemon.
//!
//! The protocol is what systemd itself uses for `StandardOutput=journal` (journald-stream.c):
//! after connecting, the client sends a header of seven newline-terminated fields, then its output.
//!
//! The connection is made between fork and exec, where only async-signal-safe calls are allowed:
//! [`Stream::prepare`] builds the address and the header before the fork, and
//! [`Stream::connect`] makes system calls only.

use std::{io, os::unix::ffi::OsStrExt, path::Path};

/// journald's stdout-stream socket.
pub const STDOUT_SOCKET: &str = "/run/systemd/journal/stdout";

/// The header that opens a stdout stream: identifier, unit id (a fallback journald uses if it
/// cannot read the sender's cgroup), priority (6 = info), level prefix (`<N>` at line start
/// sets a line's priority), and no forwarding to syslog, kmsg or console.
pub fn stream_header(identifier: &str, unit: &str) -> String {
    format!("{identifier}\n{unit}\n6\n1\n0\n0\n0\n")
}

/// A stdout stream to journald, ready to be connected without allocating.
pub struct Stream {
    addr: libc::sockaddr_un,
    len: libc::socklen_t,
    header: Vec<u8>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("header", &String::from_utf8_lossy(&self.header))
            .finish_non_exhaustive()
    }
}

impl Stream {
    /// The stream to `socket`, opening with the header of `identifier` and `unit`.
    pub fn prepare(socket: &Path, identifier: &str, unit: &str) -> io::Result<Self> {
        // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let path = socket.as_os_str().as_bytes();
        // One byte stays 0: the path is NUL-terminated.
        if path.len() >= addr.sun_path.len() || path.contains(&0) {
            return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
        }
        for (d, s) in addr.sun_path.iter_mut().zip(path) {
            *d = *s as libc::c_char;
        }
        let len = (std::mem::offset_of!(libc::sockaddr_un, sun_path) + path.len() + 1) as libc::socklen_t;
        Ok(Self { addr, len, header: stream_header(identifier, unit).into_bytes() })
    }

    /// Connects the stream and sends its header; the connected socket's fd (close-on-exec), or
    /// `None`. Async-signal-safe: system calls only, no allocation.
    pub fn connect(&self) -> Option<i32> {
        // SAFETY: plain system calls on an fd this function owns, with the prepared address and
        // header, both alive for the calls.
        unsafe {
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return None;
            }
            let addr = &self.addr as *const libc::sockaddr_un as *const libc::sockaddr;
            // The header with MSG_NOSIGNAL: journald closing the stream at once (over its limit
            // of streams) must not raise a SIGPIPE, which would end the caller once it unblocks
            // signals; the worker then writes to /dev/null instead.
            let ok = libc::connect(fd, addr, self.len) == 0
                && libc::shutdown(fd, libc::SHUT_RD) == 0
                && send_all(fd, &self.header);
            if ok {
                Some(fd)
            } else {
                libc::close(fd);
                None
            }
        }
    }
}

/// Sends all of `bytes` on the socket `fd` without raising SIGPIPE. Async-signal-safe.
fn send_all(fd: i32, bytes: &[u8]) -> bool {
    // SAFETY: `b` is alive and its length is right.
    all_of(bytes, |b| unsafe { libc::send(fd, b.as_ptr().cast(), b.len(), libc::MSG_NOSIGNAL) })
}

/// Writes all of `bytes` to `fd`. Async-signal-safe.
pub fn write_all(fd: i32, bytes: &[u8]) -> bool {
    // SAFETY: `b` is alive and its length is right.
    all_of(bytes, |b| unsafe { libc::write(fd, b.as_ptr().cast(), b.len()) })
}

/// Passes what is left of `bytes` to `op` (one write or send: the bytes taken, or -1) until
/// all are taken, again after EINTR; false on another error. Async-signal-safe.
fn all_of(mut bytes: &[u8], op: impl Fn(&[u8]) -> isize) -> bool {
    while !bytes.is_empty() {
        let n = op(bytes);
        if n < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return false;
        }
        bytes = &bytes[n as usize..];
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{io::Read, os::unix::net::UnixListener};

    #[test]
    fn nothing_connects_where_nothing_listens_and_an_overlong_path_is_refused() {
        let dir = crate::test_dir("journal-none");
        let stream = Stream::prepare(&dir.join("absent"), "web", "u.scope").unwrap();
        assert_eq!(stream.connect(), None);
        let long = Path::new("/").join("x".repeat(200));
        assert!(Stream::prepare(&long, "web", "u.scope").is_err());
    }

    #[test]
    fn header_has_seven_fields_then_output() {
        let h = stream_header("chat", "ipcluster-chat-1.scope");
        assert_eq!(
            h.lines().collect::<Vec<_>>(),
            ["chat", "ipcluster-chat-1.scope", "6", "1", "0", "0", "0"]
        );
    }

    #[test]
    fn connect_sends_header_first() {
        let dir = crate::test_dir("journal");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stdout");
        let listener = UnixListener::bind(&path).unwrap();
        let stream = Stream::prepare(&path, "web", "u.scope").unwrap();
        let fd = stream.connect().unwrap();
        assert!(write_all(fd, b"hello\n"));
        // SAFETY: the fd connect returned is ours.
        unsafe { libc::close(fd) };
        let (mut server, _) = listener.accept().unwrap();
        let mut got = String::new();
        server.read_to_string(&mut got).unwrap();
        assert_eq!(got, "web\nu.scope\n6\n1\n0\n0\n0\nhello\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
