//! Another host for the end-to-end tests: a second network namespace `cli` inside the sandbox,
//! linked to it by a veth pair (`veth0` on the sandbox's side, `veth1` in `cli`), and curl
//! run from there with a chosen source address.

use std::time::{Duration, Instant};

use crate::{Sandbox, text};

/// The sandbox's IPv4 address on the link (the client has 10.9.0.x/24 too).
pub const SERVER_V4: &str = "10.9.0.1";

/// Adds `addrs` (with their prefix length) to `dev`, in `cli` with `netns`; IPv6 ones usable at
/// once (`nodad` skips duplicate address detection, which keeps a new address tentative, so
/// unusable, for a second or more).
pub fn add_addresses(sb: &Sandbox, netns: bool, dev: &str, addrs: &[String]) {
    for a in addrs {
        let mut argv = if netns { vec!["ip", "netns", "exec", "cli"] } else { vec![] };
        if a.contains(':') {
            argv.extend(["ip", "-6", "addr", "add", a, "dev", dev, "nodad"]);
        } else {
            argv.extend(["ip", "addr", "add", a, "dev", dev]);
        }
        sb.check(&argv).unwrap();
    }
}

/// Creates `cli` and the link: [`SERVER_V4`]/24 and `server_v6` (/64) on the sandbox's end,
/// `clients` (IPv4 as /24, IPv6 as /64) on the client's.
pub fn client_namespace(sb: &Sandbox, server_v6: &[&str], clients: &[&str]) {
    for step in [
        vec!["ip", "netns", "add", "cli"],
        vec!["ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", "cli"],
        vec!["ip", "link", "set", "veth0", "up"],
        vec!["ip", "netns", "exec", "cli", "ip", "link", "set", "lo", "up"],
        vec!["ip", "netns", "exec", "cli", "ip", "link", "set", "veth1", "up"],
    ] {
        sb.check(&step).unwrap();
    }
    // With the prefix length, so each side has a route to the link.
    let server: Vec<String> = std::iter::once(format!("{SERVER_V4}/24"))
        .chain(server_v6.iter().map(|a| format!("{a}/64")))
        .collect();
    add_addresses(sb, false, "veth0", &server);
    let clients: Vec<String> =
        clients.iter().map(|a| if a.contains(':') { format!("{a}/64") } else { format!("{a}/24") }).collect();
    add_addresses(sb, true, "veth1", &clients);
}

/// An HTTP GET of `url` from `src` in `cli`, with a 2 s connect timeout: the body, or curl's
/// error and how long it took to fail.
pub fn curl(sb: &Sandbox, src: &str, url: &str) -> Result<String, (String, Duration)> {
    let argv = [
        "ip",
        "netns",
        "exec",
        "cli",
        "curl",
        "-sS",
        "-g",
        "--interface",
        src,
        "--connect-timeout",
        "2",
        "-m",
        "5",
        url,
    ];
    let started = Instant::now();
    let out = sb.run(argv).unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err((text(&out), started.elapsed()))
    }
}

/// A `key=value` field of a demo worker's answer.
pub fn field<'a>(body: &'a str, key: &str) -> &'a str {
    body.split_whitespace().find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')).unwrap_or("")
}
