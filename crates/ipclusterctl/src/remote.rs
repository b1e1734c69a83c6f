//! `ipclusterctl -H [USER@]HOST[:PORT]`: the D-Bus connection to another host's ipclusterd,
//! carried over ssh the way `systemctl -H` and `busctl -H` carry theirs.
//!
//! ssh runs `systemd-stdio-bridge` on the far side, which connects to that host's system bus and
//! relays messages between it and its own stdin and stdout. Here, one end of a socket pair is
//! ssh's stdin and stdout and the other end is an ordinary bus connection for zbus: it
//! authenticates and sends `Hello` like any bus client, and the bridge passes everything on. So
//! every call, reply, error and signal is exactly what a local client gets, and the far side
//! authorizes the calls as the user ssh logs in as (root, or a user polkit grants).
//!
//! ssh's command line holds only fixed words and the validated destination, after `--`:
//! `ssh -xT [-p PORT] [-l USER] -- HOST systemd-stdio-bridge` (the remote side runs that line in
//! a shell, so nothing a caller typed may reach it). ssh's stderr is captured: when the host
//! cannot be reached, or the connection breaks, its reason is the error's.

use std::{
    fmt,
    io::Read,
    net::Ipv6Addr,
    os::fd::OwnedFd,
    os::unix::net::UnixStream,
    process::{Child, Command, Stdio},
    str::FromStr,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

/// The program ssh runs on the far side: relays its stdio to that host's system bus.
pub const BRIDGE: &str = "systemd-stdio-bridge";
/// Longest user name accepted (POSIX's portable names are shorter in practice).
const MAX_USER: usize = 32;
/// Longest host name accepted (DNS).
const MAX_HOST: usize = 253;
/// How long ssh gets to exit once its connection is over, before it is killed.
const SSH_EXIT_GRACE: Duration = Duration::from_secs(3);
/// How long the rest of ssh's stderr may take to arrive once ssh has exited.
const STDERR_GRACE: Duration = Duration::from_millis(500);

/// Where a remote ipclusterd is: `[USER@]HOST[:PORT]`, with an IPv6 address in brackets
/// (`[2001:db8::1]:2222`). Parsing validates every part, so what ssh gets can never be taken
/// for an option or a shell word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub user: Option<String>,
    /// A host name, an IPv4 address, or an IPv6 address (without brackets).
    pub host: String,
    pub port: Option<u16>,
}

/// Why a string is not a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidDestination(String);

impl fmt::Display for InvalidDestination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidDestination {}

impl FromStr for Destination {
    type Err = InvalidDestination;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let shown: String = s.chars().take(64).collect();
        let invalid = |why: &str| {
            InvalidDestination(format!("invalid host {shown:?}: {why} (expected [USER@]HOST[:PORT])"))
        };
        if s.is_empty() {
            return Err(invalid("empty"));
        }
        if s.starts_with('-') {
            return Err(invalid("must not start with '-'"));
        }
        let (user, rest) = match s.split_once('@') {
            Some((user, rest)) => (Some(user), rest),
            None => (None, s),
        };
        if let Some(user) = user {
            let mut chars = user.chars();
            let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
            let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
            if !first_ok || !rest_ok || user.len() > MAX_USER {
                return Err(invalid("a user is letters, digits, '_', '.' and '-', not first '-' or '.'"));
            }
        }
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            let (addr, after) =
                bracketed.split_once(']').ok_or_else(|| invalid("no ']' after an IPv6 address"))?;
            if addr.parse::<Ipv6Addr>().is_err() {
                return Err(invalid("not an IPv6 address in brackets"));
            }
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| invalid("':PORT' may follow ']'"))?),
            };
            (addr, port)
        } else {
            match rest.split_once(':') {
                Some((_, p)) if p.contains(':') => {
                    return Err(invalid("an IPv6 address goes in brackets: [ADDRESS]:PORT"));
                }
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        if !rest.starts_with('[') {
            let mut chars = host.chars();
            let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
            let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
            if !first_ok || !rest_ok || host.len() > MAX_HOST {
                return Err(invalid(
                    "a host is a name or address: letters, digits, '.', '-' and '_', first a letter or digit",
                ));
            }
        }
        let port = match port {
            None => None,
            Some(p) => {
                let n = p
                    .parse::<u16>()
                    .ok()
                    .filter(|n| *n > 0 && p.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| invalid("a port is a number 1..65535"))?;
                Some(n)
            }
        };
        Ok(Destination { user: user.map(str::to_owned), host: host.to_owned(), port })
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(user) = &self.user {
            write!(f, "{user}@")?;
        }
        let v6 = self.host.contains(':');
        match (v6, self.port) {
            (true, Some(port)) => write!(f, "[{}]:{port}", self.host),
            (true, None) => write!(f, "[{}]", self.host),
            (false, Some(port)) => write!(f, "{}:{port}", self.host),
            (false, None) => f.write_str(&self.host),
        }
    }
}

impl Destination {
    /// ssh's arguments, as `systemctl -H` gives them: no X11 forwarding, no terminal (`-xT`),
    /// the port and user as options, then `--` and the host, so neither can be read as an
    /// option, and last the one fixed word the far side runs.
    pub fn ssh_args(&self) -> Vec<String> {
        let mut args = vec!["-xT".to_owned()];
        if let Some(port) = self.port {
            args.extend(["-p".to_owned(), port.to_string()]);
        }
        if let Some(user) = &self.user {
            args.extend(["-l".to_owned(), user.clone()]);
        }
        args.extend(["--".to_owned(), self.host.clone(), BRIDGE.to_owned()]);
        args
    }
}

/// A host whose ipclusterd could not be reached, with ssh's reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreachable {
    pub host: String,
    pub reason: String,
}

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot reach ipclusterd on {}: {}", self.host, self.reason)
    }
}

/// The ssh process that carries a connection. Dropping it ends ssh.
#[derive(Debug)]
pub struct Tunnel {
    host: String,
    child: Child,
    /// What ssh wrote to stderr so far (a thread reads it as it comes).
    stderr: Arc<Mutex<Vec<u8>>>,
    /// The reading thread: finished once every writer of the pipe is gone.
    reader: Option<thread::JoinHandle<()>>,
}

impl Tunnel {
    /// Why the connection is over, from what ssh said: waits (briefly) for ssh to exit, killing
    /// it if it does not, and returns its last words, or `fallback` if it said nothing.
    pub fn reason(&mut self, fallback: &str) -> String {
        let deadline = Instant::now() + SSH_EXIT_GRACE;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = self.child.kill();
                    break self.child.wait().ok();
                }
            }
        };
        // What ssh started may hold its stderr open (a ProxyCommand): wait a little for the end
        // of what it wrote, not for ever.
        let deadline = Instant::now() + STDERR_GRACE;
        while self.reader.as_ref().is_some_and(|r| !r.is_finished()) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        let said = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
        let said = last_words(&String::from_utf8_lossy(&said));
        match (said.is_empty(), status) {
            (false, _) => said,
            (true, Some(status)) if !status.success() => format!("{fallback} (ssh: {status})"),
            _ => fallback.to_owned(),
        }
    }

    /// The destination as the user gave it.
    pub fn host(&self) -> &str {
        &self.host
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        // Every call is answered by now; ssh is only the transport, and nothing is left to flush.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// ssh's stderr as one line: its last few non-empty lines, trimmed.
fn last_words(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    lines[lines.len().saturating_sub(4)..].join("; ")
}

/// Connects to the system bus of `dest` over ssh. The connection is a normal bus client
/// connection (SASL, then `Hello`) whose socket's other end is ssh's stdin and stdout.
pub async fn connect(dest: &Destination) -> Result<(zbus::Connection, Tunnel), Unreachable> {
    let host = dest.to_string();
    let unreachable = |reason: String| Unreachable { host: host.clone(), reason };
    let (ours, theirs) =
        UnixStream::pair().map_err(|e| unreachable(format!("cannot create a socket: {e}")))?;
    let theirs_out = theirs.try_clone().map_err(|e| unreachable(format!("cannot create a socket: {e}")))?;
    let mut cmd = Command::new("ssh");
    cmd.args(dest.ssh_args())
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::from(OwnedFd::from(theirs_out)))
        .stderr(Stdio::piped());
    let spawned = cmd.spawn();
    // The command holds our copies of ssh's end: without this drop, the bus connection would
    // never see end-of-file when ssh exits.
    drop(cmd);
    let mut child = spawned.map_err(|e| unreachable(format!("cannot run ssh: {e}")))?;
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let reader = child.stderr.take().map(|mut pipe| {
        let said = stderr.clone();
        thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                // A std Mutex, held only to append.
                if let Ok(mut s) = said.lock() {
                    s.extend_from_slice(&chunk[..n]);
                }
            }
        })
    });
    let mut tunnel = Tunnel { host: host.clone(), child, stderr, reader };
    match zbus::connection::Builder::unix_stream(ours).build().await {
        Ok(conn) => Ok((conn, tunnel)),
        Err(e) => Err(unreachable(tunnel.reason(&e.to_string()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Destination, InvalidDestination> {
        s.parse()
    }

    #[test]
    fn destinations_parse_into_user_host_and_port() {
        let d = |user: Option<&str>, host: &str, port: Option<u16>| Destination {
            user: user.map(str::to_owned),
            host: host.to_owned(),
            port,
        };
        assert_eq!(parse("web1"), Ok(d(None, "web1", None)));
        assert_eq!(parse("deploy@web1.example.com"), Ok(d(Some("deploy"), "web1.example.com", None)));
        assert_eq!(parse("10.0.0.5:2222"), Ok(d(None, "10.0.0.5", Some(2222))));
        assert_eq!(parse("root@10.0.0.5:22"), Ok(d(Some("root"), "10.0.0.5", Some(22))));
        assert_eq!(parse("[2001:db8::1]"), Ok(d(None, "2001:db8::1", None)));
        assert_eq!(parse("ops@[::1]:65535"), Ok(d(Some("ops"), "::1", Some(65535))));
        assert_eq!(parse("_svc.x@h_1"), Ok(d(Some("_svc.x"), "h_1", None)));
        for s in ["web1", "deploy@web1.example.com", "10.0.0.5:2222", "[2001:db8::1]", "ops@[::1]:65535"] {
            assert_eq!(parse(s).unwrap().to_string(), s, "shown as given");
        }
    }

    #[test]
    fn nothing_that_could_be_an_option_or_a_shell_word_is_a_destination() {
        for s in [
            "",
            "-oProxyCommand=sh",
            "-p",
            "web1 -oProxyCommand=x",
            "web1;reboot",
            "web1|x",
            "$(reboot)",
            "`x`",
            "web1&",
            "a'b",
            "a\"b",
            "web1\n",
            "-l@web1",
            "root@-oProxyCommand=x",
            "@web1",
            "root@",
            "a@b@c",
            ".hidden",
            "web1:",
            "web1:0",
            "web1:65536",
            "web1:+22",
            "web1:22x",
            "web1:-1",
            "::1",
            "2001:db8::1:22",
            "[::1",
            "[not-v6]:22",
            "[::1]x",
            "[::1]:0",
            "web1/x",
            "wéb",
            "*",
            "web1,web2",
        ] {
            assert!(parse(s).is_err(), "{s:?} accepted as {:?}", parse(s));
        }
        let long_host = "h".repeat(MAX_HOST + 1);
        assert!(parse(&long_host).is_err());
        let long_user = format!("{}@h", "u".repeat(MAX_USER + 1));
        assert!(parse(&long_user).is_err());
        let e = parse("-oProxyCommand=sh").unwrap_err().to_string();
        assert!(e.contains("must not start with '-'") && e.contains("[USER@]HOST[:PORT]"), "{e}");
    }

    #[test]
    fn ssh_gets_fixed_words_options_then_double_dash_host_and_the_bridge() {
        let args = |s: &str| parse(s).unwrap().ssh_args();
        assert_eq!(args("web1"), ["-xT", "--", "web1", "systemd-stdio-bridge"]);
        assert_eq!(
            args("deploy@web1:2222"),
            ["-xT", "-p", "2222", "-l", "deploy", "--", "web1", "systemd-stdio-bridge"]
        );
        assert_eq!(args("[::1]:22"), ["-xT", "-p", "22", "--", "::1", "systemd-stdio-bridge"]);
    }

    #[test]
    fn ssh_reasons_are_its_last_lines_on_one_line() {
        assert_eq!(last_words(""), "");
        assert_eq!(
            last_words("ssh: connect to host 10.0.0.9 port 22: Connection refused\r\n"),
            "ssh: connect to host 10.0.0.9 port 22: Connection refused"
        );
        assert_eq!(last_words("1\n\n2\n3\n4\n5\n"), "2; 3; 4; 5");
    }
}

/// Property tests of `-H [USER@]HOST[:PORT]`: no string makes the parser panic; what it
/// accepts shows as text that parses back to it, and gives ssh only fixed words, options and a
/// host that no shell or option parser can misread; what it refuses says so briefly and
/// printably; `ipclusterctl -H` takes exactly what the parser takes.
#[cfg(test)]
pub(crate) mod props {
    use clap::Parser;
    use ipcluster_core::prop_config::{config, mutated};
    use proptest::prelude::*;

    use super::*;

    /// Destinations of every form, as people write them.
    pub(crate) fn destination() -> impl Strategy<Value = String> {
        let user = prop::option::of("[a-z_][a-z0-9_.-]{0,10}");
        let host = prop_oneof![
            "[a-z0-9][a-z0-9.-]{0,20}",
            any::<[u8; 4]>().prop_map(|a| std::net::Ipv4Addr::from(a).to_string()),
            any::<[u8; 16]>().prop_map(|a| format!("[{}]", Ipv6Addr::from(a))),
        ];
        let port = prop::option::of(prop_oneof![any::<u16>().prop_map(|p| p.to_string()), "[0-9+-]{0,6}"]);
        (user, host, port).prop_map(|(user, host, port)| {
            let user = user.map_or(String::new(), |u| format!("{u}@"));
            let port = port.map_or(String::new(), |p| format!(":{p}"));
            format!("{user}{host}{port}")
        })
    }

    /// Near misses: shell words, options, quotes, spaces, brackets.
    fn hostile() -> impl Strategy<Value = String> {
        "[-a-z0-9@:\\[\\]._ ;|&$`'\"\\\\*?<>(){}!#~=,/\n\t]{0,24}"
    }

    proptest! {
        #![proptest_config(config(1024))]

        #[test]
        fn host_strings_are_parsed_safely_or_refused_briefly(
            s in prop_oneof![destination(), mutated(destination()), hostile(), any::<String>()],
        ) {
            match s.parse::<Destination>() {
                Ok(d) => {
                    prop_assert_eq!(d.to_string().parse::<Destination>(), Ok(d.clone()), "{:?}", s);
                    let safe = |w: &str| {
                        !w.is_empty()
                            && !w.starts_with('-')
                            && w.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
                    };
                    prop_assert!(safe(&d.host), "{:?}", d);
                    prop_assert!(d.user.as_deref().is_none_or(safe), "{:?}", d);
                    prop_assert!(d.port.is_none_or(|p| p > 0));
                    let mut want = vec!["-xT".to_owned()];
                    if let Some(p) = d.port {
                        want.extend(["-p".to_owned(), p.to_string()]);
                    }
                    if let Some(u) = &d.user {
                        want.extend(["-l".to_owned(), u.clone()]);
                    }
                    want.extend(["--".to_owned(), d.host.clone(), BRIDGE.to_owned()]);
                    prop_assert_eq!(d.ssh_args(), want);
                }
                Err(e) => {
                    let e = e.to_string();
                    prop_assert!(e.chars().count() < 700, "{}", e);
                    prop_assert!(!e.chars().any(char::is_control), "{:?}", e);
                    prop_assert!(e.contains("[USER@]HOST[:PORT]"), "{}", e);
                }
            }
            // `ipclusterctl -H S status` takes S exactly when the parser does.
            let args = crate::Args::try_parse_from(["ipclusterctl", "-H", s.as_str(), "status"]);
            match (args, s.parse::<Destination>()) {
                (Ok(a), Ok(d)) => prop_assert_eq!(a.host, Some(d)),
                (Err(_), Err(_)) => {}
                (a, d) => prop_assert!(false, "{:?}: clap {:?}, parser {:?}", s, a.map(|a| a.host), d),
            }
        }
    }
}
