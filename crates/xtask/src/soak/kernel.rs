//! What the kernel and systemd hold for ipclusterd, read once a second in one command inside
//! the sandbox ([`SCRIPT`]) and parsed here without I/O: the NAT routes, the worker-port guard,
//! the session sets and the scopes; and the listening TCP ports of `/proc/net/tcp{,6}`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, Ipv6Addr},
};

/// Prints each part, separated by a line `@@`.
pub const SCRIPT: &str = "iptables-save -t nat; echo @@; ip6tables-save -t nat; echo @@; \
    iptables-save -t filter; echo @@; ip6tables-save -t filter; echo @@; ipset list -n; echo @@; \
    systemctl list-units --all --plain --no-legend --no-pager 'ipcluster-*.scope'";

/// The parts of [`SCRIPT`]'s output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    /// `iptables-save -t nat`, then IPv6's.
    pub nat: [String; 2],
    /// `iptables-save -t filter`, then IPv6's.
    pub filter: [String; 2],
    pub sets: String,
    pub scopes: String,
}

impl State {
    pub fn parse(out: &str) -> Option<State> {
        let parts: Vec<&str> = out.split("@@\n").collect();
        let [n4, n6, f4, f6, sets, scopes] = parts.as_slice() else { return None };
        Some(State {
            nat: [(*n4).into(), (*n6).into()],
            filter: [(*f4).into(), (*f6).into()],
            sets: (*sets).into(),
            scopes: (*scopes).into(),
        })
    }
}

/// The value after `flag` in an iptables-save rule.
fn value<'a>(rule: &'a str, flag: &str) -> Option<&'a str> {
    let mut words = rule.split_whitespace();
    words.by_ref().find(|w| *w == flag)?;
    words.next()
}

/// The low 32 bits of an address (IPv4, or IPv6's last 32 bits).
fn low_bits(addr: &str) -> Option<u32> {
    if let Ok(a) = addr.parse::<Ipv4Addr>() {
        return Some(u32::from(a));
    }
    addr.parse::<Ipv6Addr>().ok().map(|a| u128::from(a) as u32)
}

/// The live routes of `app` in one family's nat table: band → the worker ports its REDIRECT
/// rules name (the rules that match no session set: draining generations' rules do).
pub fn live_routes(save: &str, app: &str, workers: u32) -> BTreeMap<u32, BTreeSet<u16>> {
    let chain = format!("-A IPC-{app} ");
    let mut out: BTreeMap<u32, BTreeSet<u16>> = BTreeMap::new();
    for rule in save.lines().filter(|l| l.starts_with(&chain) && !l.contains("--match-set")) {
        let Some(port) = value(rule, "--to-ports").and_then(|p| p.parse().ok()) else { continue };
        let band = match value(rule, "-s") {
            Some(s) => match low_bits(s.split('/').next().unwrap_or(s)) {
                Some(b) => b & (workers - 1),
                None => continue,
            },
            None => 0,
        };
        out.entry(band).or_default().insert(port);
    }
    out
}

/// Every port a nat REDIRECT rule of ipclusterd's chains names.
pub fn nat_ports(save: &str) -> BTreeSet<u16> {
    save.lines()
        .filter(|l| l.starts_with("-A IPC-"))
        .filter_map(|l| value(l, "--to-ports")?.parse().ok())
        .collect()
}

/// Every port the filter table's guard (`IPCLUSTER`: `--dports a:b,c -j DROP`) lists.
pub fn guard_ports(save: &str) -> BTreeSet<u16> {
    let mut out = BTreeSet::new();
    for rule in save.lines().filter(|l| l.starts_with("-A IPCLUSTER ")) {
        for item in value(rule, "--dports").unwrap_or("").split(',') {
            let (lo, hi) = item.split_once(':').unwrap_or((item, item));
            if let (Ok(lo), Ok(hi)) = (lo.parse::<u16>(), hi.parse::<u16>()) {
                out.extend(lo..=hi);
            }
        }
    }
    out
}

/// ipclusterd's session sets (`ipc4-<app>-<slot>`, `ipc6-…`) in `ipset list -n`: (app, set).
pub fn sets(list: &str) -> Vec<(String, String)> {
    list.lines()
        .map(str::trim)
        .filter_map(|name| {
            let rest = name.strip_prefix("ipc4-").or_else(|| name.strip_prefix("ipc6-"))?;
            let (app, _) = rest.rsplit_once('-')?;
            Some((app.to_owned(), name.to_owned()))
        })
        .collect()
}

/// `ipcluster-<app>-<g>.scope` in a unit name: (app, g).
pub fn scope_name(name: &str) -> Option<(String, u64)> {
    let rest = name.strip_prefix("ipcluster-")?.strip_suffix(".scope")?;
    let (app, g) = rest.rsplit_once('-')?;
    Some((app.to_owned(), g.parse().ok()?))
}

/// The scopes systemd lists (`systemctl list-units --plain --no-legend`).
pub fn scopes(list: &str) -> Vec<(String, u64)> {
    list.lines().filter_map(|l| scope_name(l.split_whitespace().next()?)).collect()
}

/// The local ports of the listening sockets in `/proc/net/tcp` or `tcp6`.
pub fn listening(proc_net_tcp: &str) -> BTreeSet<u16> {
    proc_net_tcp
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(3) == Some(&"0A")).then(|| u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok())?
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAT4: &str = "\
*nat
:IPC-chat - [0:0]
:IPC-demo - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j IPCLUSTER
-A IPCLUSTER -j IPC-demo
-A IPC-chat -s 0.0.0.1/0.0.0.3 -p tcp -m tcp --dport 82 -m set --match-set ipc4-chat-0 src -j SET --add-set ipc4-chat-0 src --exist --timeout 8
-A IPC-chat -s 0.0.0.1/0.0.0.3 -p tcp -m tcp --dport 82 -m set --match-set ipc4-chat-0 src -j REDIRECT --to-ports 20011
-A IPC-chat -s 0.0.0.1/0.0.0.3 -p tcp -m tcp --dport 82 -j SET --add-set ipc4-chat-1 src --exist --timeout 8
-A IPC-chat -s 0.0.0.1/0.0.0.3 -p tcp -m tcp --dport 82 -j REDIRECT --to-ports 20021
-A IPC-demo -s 0.0.0.2/0.0.0.3 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 20006
-A IPC-demo -s 0.0.0.3/0.0.0.3 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 20007
COMMIT
";

    #[test]
    fn live_routes_are_the_redirects_that_match_no_session_set() {
        assert_eq!(live_routes(NAT4, "demo", 4), BTreeMap::from([(2, [20006].into()), (3, [20007].into())]));
        assert_eq!(live_routes(NAT4, "chat", 4), BTreeMap::from([(1, [20021].into())]));
        assert_eq!(nat_ports(NAT4), [20006, 20007, 20011, 20021].into());
        let nat6 = "-A IPC-demo -s ::2/::3 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 20006\n\
                    -A IPC-demo -s ::5/::255.255.255.255 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 20009\n";
        assert_eq!(live_routes(nat6, "demo", 4), BTreeMap::from([(1, [20009].into()), (2, [20006].into())]));
    }

    #[test]
    fn the_guard_lists_ranges_and_single_ports() {
        let filter = "-A INPUT -p tcp -j IPCLUSTER\n\
                      -A IPCLUSTER -p tcp -m multiport --dports 20000:20003,20010 -j DROP\n\
                      -A IPCLUSTER -p tcp -m multiport --dports 20012 -j DROP\n";
        assert_eq!(guard_ports(filter), [20000, 20001, 20002, 20003, 20010, 20012].into());
    }

    #[test]
    fn sets_scopes_and_listening_ports() {
        assert_eq!(
            sets("ipc4-chat-0\nipc6-chat-0\nother\nipc4-my_app-12\n"),
            [("chat", "ipc4-chat-0"), ("chat", "ipc6-chat-0"), ("my_app", "ipc4-my_app-12")]
                .map(|(a, s)| (a.to_owned(), s.to_owned()))
        );
        let units = "ipcluster-demo-3.scope loaded active running Scope\nipcluster-my-app-12.scope loaded active abandoned x\n";
        assert_eq!(scopes(units), [("demo".to_owned(), 3), ("my-app".to_owned(), 12)]);
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
                   0: 00000000000000000000000000000000:4E20 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1\n\
                   1: 0100007F:4E21 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 2\n";
        assert_eq!(listening(tcp), [20000].into());
        assert_eq!(
            State::parse("a\n@@\nb\n@@\nc\n@@\nd\n@@\ne\n@@\nf\n").map(|s| (s.nat, s.scopes)),
            Some((["a\n".into(), "b\n".into()], "f\n".into()))
        );
    }
}
