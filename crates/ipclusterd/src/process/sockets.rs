//! The sockets of workers, read from /proc: their listening sockets duplicated into the daemon
//! (pidfd_getfd), which address families they listen in, whether a port is free and who holds
//! it.

use std::{collections::HashSet, fs, os::fd::OwnedFd};

use super::adopt;

/// Duplicates into this process the listening sockets on `ports` held by `pids` (pidfd_getfd,
/// Linux 5.6). Held by the daemon, a listening socket outlives a crashed worker: connections
/// that arrive before the rules move its band queue there instead of being refused.
pub fn grab_listeners(pids: &[u32], ports: &[u16]) -> Vec<(u16, OwnedFd)> {
    let mut out: Vec<(u16, OwnedFd)> = Vec::new();
    grab_listening(pids, |addr, dup| {
        if ports.contains(&addr.port()) && !out.iter().any(|(p, _)| *p == addr.port()) {
            out.push((addr.port(), dup));
        }
    });
    out
}

/// Duplicates into this process the listening sockets bound to exactly `addrs` held by `pids`
/// (socket mode: the sockets the daemon handed a worker), one per address.
pub fn grab_bound(pids: &[u32], addrs: &[std::net::SocketAddr]) -> Vec<(std::net::SocketAddr, OwnedFd)> {
    let mut out: Vec<(std::net::SocketAddr, OwnedFd)> = Vec::new();
    grab_listening(pids, |addr, dup| {
        if addrs.contains(&addr) && !out.iter().any(|(a, _)| *a == addr) {
            out.push((addr, dup));
        }
    });
    out
}

/// The most descriptors one scan of a worker's processes reads, in all and per process (issue
/// 21, item 6): a worker holding half a million sockets costs a scan no more than this. A
/// worker's listening sockets come first among its descriptors (they are opened at start).
pub const SCAN_FDS: usize = 16_384;
pub const SCAN_FDS_PER_PROCESS: usize = 4096;

/// Calls `take` with a duplicate of every listening TCP socket `pids` hold, and its address,
/// among the first [`SCAN_FDS_PER_PROCESS`] descriptors of each and [`SCAN_FDS`] in all.
fn grab_listening(pids: &[u32], mut take: impl FnMut(std::net::SocketAddr, OwnedFd)) {
    // Each socket is duplicated and asked directly (SO_ACCEPTCONN, getsockname): cheaper than
    // /proc/net/tcp, which walks the kernel's whole TCP hash table.
    let mut budget = SCAN_FDS;
    for &p in pids {
        if budget == 0 {
            break;
        }
        let Ok(fds) = fs::read_dir(format!("/proc/{p}/fd")) else { continue };
        let Ok(pidfd) = adopt(p) else { continue };
        let quota = budget.min(SCAN_FDS_PER_PROCESS);
        let mut read = 0;
        for fd in fds.flatten().take(quota) {
            read += 1;
            let is_socket =
                fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:["));
            let Some(num) = fd.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
            if !is_socket {
                continue;
            }
            let Ok(dup) =
                rustix::process::pidfd_getfd(&pidfd, num, rustix::process::PidfdGetfdFlags::empty())
            else {
                continue;
            };
            let listening = rustix::net::sockopt::socket_acceptconn(&dup).unwrap_or(false);
            let addr = rustix::net::getsockname(&dup).ok().and_then(|a| {
                use rustix::net::SocketAddrAny;
                let a: SocketAddrAny = a;
                std::net::SocketAddr::try_from(a).ok()
            });
            if let Some(addr) = addr.filter(|_| listening) {
                take(addr, dup);
            }
        }
        budget -= read;
    }
}

/// Which address families the listening sockets `pids` hold on each of `ports` take (issue 21,
/// item 4): an IPv4 socket takes IPv4; an IPv6 one IPv6, and IPv4 too unless `IPV6_V6ONLY`
/// (an IPv4-mapped address takes IPv4 only).
pub fn coverage(pids: &[u32], ports: &[u16]) -> std::collections::BTreeMap<u16, Families> {
    let mut out: std::collections::BTreeMap<u16, Families> = std::collections::BTreeMap::new();
    grab_listening(pids, |addr, dup| {
        if !ports.contains(&addr.port()) {
            return;
        }
        let f = out.entry(addr.port()).or_default();
        match addr {
            std::net::SocketAddr::V4(_) => f.v4 = true,
            std::net::SocketAddr::V6(a) if a.ip().to_ipv4_mapped().is_some() => f.v4 = true,
            std::net::SocketAddr::V6(_) => {
                f.v6 = true;
                f.v4 |= !rustix::net::sockopt::ipv6_v6only(&dup).unwrap_or(true);
            }
        }
    });
    out
}

/// Address families: which a listener takes, or which an app routes to a port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Families {
    pub v4: bool,
    pub v6: bool,
}

impl Families {
    /// The families a public `listen` address is routed in (`[::]` both; see
    /// `ipcluster_core::routing::served_by`).
    pub fn routed(public: &std::net::SocketAddr) -> Self {
        use ipcluster_core::routing::{Family, served_by};
        Self { v4: served_by(Family::V4, public).is_some(), v6: served_by(Family::V6, public).is_some() }
    }

    /// Whether `self` takes everything `want` needs.
    pub fn covers(&self, want: Families) -> bool {
        (self.v4 || !want.v4) && (self.v6 || !want.v6)
    }
}

/// Whether nothing holds `port` in either family (issue 21, item 4: a user who holds only the
/// IPv6 half of a port would make a worker that binds `[::]:$PORT` fail). IPv6 is not tested on
/// a host without it.
pub fn port_is_free(port: u16) -> bool {
    use std::net::{Ipv4Addr, Ipv6Addr};
    if std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_err() {
        return false;
    }
    match std::net::TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)) {
        Ok(_) => true,
        Err(e) => matches!(e.raw_os_error(), Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)),
    }
}

/// Listening TCP sockets on `ports` (this network namespace, both families) that are not among
/// `pids`' own descriptors: "`[::]:30001` (uid 999, ipcsquat)", for messages that say who holds
/// a worker's port. Reads /proc/net/tcp and tcp6 (costly: on failures only).
pub fn port_holders(pids: &[u32], ports: &[u16]) -> Vec<String> {
    let mut own: HashSet<u64> = HashSet::new();
    let mut budget = SCAN_FDS;
    for &p in pids {
        let Ok(fds) = fs::read_dir(format!("/proc/{p}/fd")) else { continue };
        for fd in fds.flatten().take(budget.min(SCAN_FDS_PER_PROCESS)) {
            budget = budget.saturating_sub(1);
            let link = fs::read_link(fd.path()).unwrap_or_default();
            let link = link.to_string_lossy();
            if let Some(inode) = link.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                own.extend(inode.parse::<u64>().ok());
            }
        }
    }
    let ports: HashSet<u16> = ports.iter().copied().collect();
    let mut out = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = fs::read_to_string(file) else { continue };
        for (addr, uid, inode) in text.lines().skip(1).filter_map(parse_listener) {
            if ports.contains(&addr.port()) && !own.contains(&inode) {
                let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                    .ok()
                    .flatten()
                    .map(|u| format!(", {}", u.name))
                    .unwrap_or_default();
                out.push(format!("{addr} (uid {uid}{name})"));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// One line of /proc/net/tcp or tcp6, if it is a listening socket: its address, uid and inode.
fn parse_listener(line: &str) -> Option<(std::net::SocketAddr, u32, u64)> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.get(3) != Some(&"0A") {
        return None;
    }
    let (ip, port) = f.get(1)?.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip: std::net::IpAddr = match ip.len() {
        8 => std::net::Ipv4Addr::from(u32::from_be(u32::from_str_radix(ip, 16).ok()?)).into(),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, word) in bytes.chunks_mut(4).enumerate() {
                let w = u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).ok()?;
                word.copy_from_slice(&w.to_ne_bytes());
            }
            std::net::Ipv6Addr::from(bytes).into()
        }
        _ => return None,
    };
    Some((std::net::SocketAddr::new(ip, port), f.get(7)?.parse().ok()?, f.get(9)?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grabs_only_listening_sockets_on_the_given_ports() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(other.local_addr().unwrap()).unwrap();
        let grabbed = grab_listeners(&[std::process::id()], &[port]);
        assert_eq!(grabbed.len(), 1, "{grabbed:?}");
        assert_eq!(grabbed[0].0, port);
        // The duplicate is the same listening socket: it accepts what was queued for the original.
        drop(listener);
        let _c =
            std::net::TcpStream::connect(("127.0.0.1", port)).expect("still listening through the duplicate");
        let dup = std::net::TcpListener::from(grabbed.into_iter().next().unwrap().1);
        assert!(dup.accept().is_ok());
    }

    #[test]
    fn grabs_the_listening_sockets_bound_to_exactly_the_given_addresses() {
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let v6 = std::net::TcpListener::bind("[::1]:0").unwrap();
        let (a4, a6) = (v4.local_addr().unwrap(), v6.local_addr().unwrap());
        let other: std::net::SocketAddr = format!("127.0.0.2:{}", a4.port()).parse().unwrap();
        let grabbed = grab_bound(&[std::process::id()], &[a6, other, a4]);
        let mut addrs: Vec<_> = grabbed.iter().map(|(a, _)| *a).collect();
        addrs.sort();
        let mut want = vec![a4, a6];
        want.sort();
        assert_eq!(addrs, want, "the same port on another address is not taken");
    }

    /// Issue 21, item 4: which families a worker's own listeners take, whether a port is free in
    /// both, and who else holds one.

    #[test]
    fn families_taken_ports_free_in_both_and_who_holds_them() {
        use std::net::TcpListener;
        let v4 = TcpListener::bind("0.0.0.0:0").unwrap();
        let p4 = v4.local_addr().unwrap().port();
        let dual = TcpListener::bind("[::]:0").unwrap();
        let pd = dual.local_addr().unwrap().port();
        let only6 =
            rustix::net::socket(rustix::net::AddressFamily::INET6, rustix::net::SocketType::STREAM, None)
                .unwrap();
        rustix::net::sockopt::set_ipv6_v6only(&only6, true).unwrap();
        rustix::net::bind(&only6, &std::net::SocketAddr::from(([0u16; 8], 0))).unwrap();
        rustix::net::listen(&only6, 8).unwrap();
        let p6 = std::net::SocketAddr::try_from(rustix::net::getsockname(&only6).unwrap()).unwrap().port();
        let me = [std::process::id()];
        let got = coverage(&me, &[p4, pd, p6]);
        assert_eq!(got[&p4], Families { v4: true, v6: false });
        assert_eq!(got[&pd], Families { v4: true, v6: true }, "dual-stack");
        assert_eq!(got[&p6], Families { v4: false, v6: true }, "IPV6_V6ONLY");
        let any: std::net::SocketAddr = "[::]:80".parse().unwrap();
        let four: std::net::SocketAddr = "0.0.0.0:80".parse().unwrap();
        assert!(got[&pd].covers(Families::routed(&any)) && !got[&p4].covers(Families::routed(&any)));
        assert!(got[&p4].covers(Families::routed(&four)) && !got[&p6].covers(Families::routed(&four)));
        // Held in one family only: not free.
        assert!(!port_is_free(p4) && !port_is_free(p6) && !port_is_free(pd));
        // Who holds them, from another process's point of view (this one holds all three).
        assert!(port_holders(&me, &[p4, pd, p6]).is_empty(), "our own listeners are not strangers");
        let held = port_holders(&[], &[p6]);
        let uid = rustix::process::geteuid().as_raw();
        assert!(held.len() == 1 && held[0].starts_with(&format!("[::]:{p6} (uid {uid}")), "{held:?}");
        drop((v4, dual, only6));
    }
}
