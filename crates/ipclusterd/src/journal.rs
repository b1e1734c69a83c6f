//! journald stdout streams for workers.
//!
//! A worker's stdout and stderr are a stream socket connected to journald, opened by the
//! worker's own launcher after it is inside its scope: journald attributes the stream to the
//! connecting process's cgroup, so `journalctl -u ipcluster-<app>-<g>.scope` shows the lines,
//! and the stream does not pass through (or depend on) the daemon.
//!
//! The protocol is what systemd itself uses for `StandardOutput=journal` (journald-stream.c):
//! after connecting, the client sends a header of seven newline-terminated fields, then its output.

use std::{io::Write, os::unix::net::UnixStream, path::Path};

/// journald's stdout-stream socket.
pub const STDOUT_SOCKET: &str = "/run/systemd/journal/stdout";

/// The header that opens a stdout stream: identifier, unit id (a fallback journald uses if it
/// cannot read the sender's cgroup), priority (6 = info), level prefix (`<N>` at line start
/// sets a line's priority), and no forwarding to syslog, kmsg or console.
pub fn stream_header(identifier: &str, unit: &str) -> String {
    format!("{identifier}\n{unit}\n6\n1\n0\n0\n0\n")
}

/// Connects a stdout stream to journald at `socket`.
pub fn connect(socket: &Path, identifier: &str, unit: &str) -> std::io::Result<UnixStream> {
    let mut stream = UnixStream::connect(socket)?;
    stream.shutdown(std::net::Shutdown::Read)?;
    stream.write_all(stream_header(identifier, unit).as_bytes())?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{io::Read, os::unix::net::UnixListener};

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
        let mut client = connect(&path, "web", "u.scope").unwrap();
        client.write_all(b"hello\n").unwrap();
        drop(client);
        let (mut server, _) = listener.accept().unwrap();
        let mut got = String::new();
        server.read_to_string(&mut got).unwrap();
        assert_eq!(got, "web\nu.scope\n6\n1\n0\n0\n0\nhello\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
