//! NAT rules: which worker port each (public address, band) goes to, rendered as one
//! `iptables-restore --noflush` transaction that rewrites only ipclusterd's own chains.
//!
//! Layout in the nat table:
//!
//! ```text
//! PREROUTING -m addrtype --dst-type LOCAL -j IPCLUSTER   (traffic from other hosts)
//! OUTPUT     -m addrtype --dst-type LOCAL -j IPCLUSTER   (locally generated, locally destined only)
//! IPCLUSTER  -j IPC-<app>                                (one jump per app)
//! IPC-<app>  -p tcp [-d ip] --dport P -s b/mask -j REDIRECT --to-ports W   (one per listen × band)
//! ```
//!
//! A client with IPv4 source `s` is in band `s & (bands - 1)`; `-s b/(bands-1)` matches exactly
//! those addresses. Declaring a chain in a `--noflush` restore flushes and refills it, and the
//! whole file is one kernel transaction: there is no instant where a public port has no rule.
//! Rules of other software are never named, so never touched.

use std::{collections::BTreeSet, fmt::Write, net::Ipv4Addr, net::SocketAddrV4};

use crate::name::AppName;

/// The top chain, jumped to from PREROUTING and OUTPUT.
pub const TOP_CHAIN: &str = "IPCLUSTER";
/// Prefix of per-app chains.
pub const APP_CHAIN_PREFIX: &str = "IPC-";
/// The jump rule (without `-A CHAIN`) placed in PREROUTING and OUTPUT.
pub const JUMP: &str = "-m addrtype --dst-type LOCAL -j IPCLUSTER";

/// The band of a client address among `bands` (a power of two).
pub fn band_of(addr: Ipv4Addr, bands: u32) -> u32 {
    u32::from(addr) & (bands - 1)
}

/// Where one app's traffic goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppRoute {
    pub app: AppName,
    /// Public addresses, in `listen` order.
    pub listen: Vec<SocketAddrV4>,
    /// For each band, the worker port for each `listen` entry (same order). Its length is the
    /// number of bands, a power of two.
    pub bands: Vec<Vec<u16>>,
}

/// Band failover: each band's worker ports are those of its own live worker, or, when it has
/// none (crashed, not yet replaced), those of the next band (cyclically) that has one:
/// stickiness yields to availability. `None` when no band has a live worker.
pub fn with_failover(by_band: &[Option<Vec<u16>>]) -> Option<Vec<Vec<u16>>> {
    let n = by_band.len();
    if by_band.iter().all(Option::is_none) {
        return None;
    }
    Some((0..n).map(|b| (0..n).find_map(|k| by_band[(b + k) % n].clone()).unwrap_or_default()).collect())
}

/// The name of an app's chain.
pub fn app_chain(app: &AppName) -> String {
    format!("{APP_CHAIN_PREFIX}{app}")
}

/// What of ours is in the kernel now, parsed from `iptables-save -t nat`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Existing {
    /// Our chains (`IPCLUSTER` and `IPC-*`).
    pub chains: BTreeSet<String>,
    pub prerouting_jump: bool,
    pub output_jump: bool,
    /// Our chains' rules, exactly as iptables-save prints them (for comparing with the desired).
    pub rules: Vec<String>,
}

fn ours(chain: &str) -> bool {
    chain == TOP_CHAIN || chain.starts_with(APP_CHAIN_PREFIX)
}

impl Existing {
    /// Worker ports our rules currently redirect to (what the kernel says is live).
    pub fn routed_ports(&self) -> BTreeSet<u16> {
        self.rules
            .iter()
            .filter_map(|r| {
                r.split_once("--to-ports ").and_then(|(_, p)| p.split_whitespace().next()?.parse().ok())
            })
            .collect()
    }
}

/// Parses the `*nat` table of `iptables-save` output.
pub fn parse_existing(save: &str) -> Existing {
    let mut ex = Existing::default();
    let mut in_nat = false;
    for line in save.lines() {
        let line = line.trim();
        if let Some(table) = line.strip_prefix('*') {
            in_nat = table == "nat";
            continue;
        }
        if !in_nat {
            continue;
        }
        if let Some(decl) = line.strip_prefix(':') {
            if let Some(chain) = decl.split_whitespace().next().filter(|c| ours(c)) {
                ex.chains.insert(chain.to_owned());
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let (chain, spec) = rule.split_once(' ').unwrap_or((rule, ""));
            if spec == JUMP {
                ex.prerouting_jump |= chain == "PREROUTING";
                ex.output_jump |= chain == "OUTPUT";
            }
            if ours(chain) {
                ex.rules.push(line.to_owned());
            }
        }
    }
    ex
}

/// The rules of our chains as `iptables-save` would print them, in order.
pub fn desired_rules(routes: &[AppRoute]) -> Vec<String> {
    let mut rules = Vec::new();
    for r in routes {
        rules.push(format!("-A {TOP_CHAIN} -j {}", app_chain(&r.app)));
    }
    for r in routes {
        let chain = app_chain(&r.app);
        let n = r.bands.len() as u32;
        for (i, public) in r.listen.iter().enumerate() {
            for (band, ports) in r.bands.iter().enumerate() {
                let mut rule = format!("-A {chain}");
                if !public.ip().is_unspecified() {
                    let _ = write!(rule, " -d {}/32", public.ip());
                }
                if n > 1 {
                    let _ = write!(rule, " -s {}/{}", Ipv4Addr::from(band as u32), Ipv4Addr::from(n - 1));
                }
                let _ = write!(
                    rule,
                    " -p tcp -m tcp --dport {} -j REDIRECT --to-ports {}",
                    public.port(),
                    ports[i]
                );
                rules.push(rule);
            }
        }
    }
    rules
}

/// Whether the kernel already has exactly the desired rules and jumps.
pub fn up_to_date(existing: &Existing, routes: &[AppRoute]) -> bool {
    // Nothing to route and nothing of ours installed: leave the nat table alone.
    if routes.is_empty() && existing.chains.is_empty() && !existing.prerouting_jump && !existing.output_jump {
        return true;
    }
    let wanted: BTreeSet<String> =
        std::iter::once(TOP_CHAIN.to_owned()).chain(routes.iter().map(|r| app_chain(&r.app))).collect();
    existing.prerouting_jump
        && existing.output_jump
        && existing.chains == wanted
        && by_chain(&existing.rules) == by_chain(&desired_rules(routes))
}

/// Rules grouped by chain, keeping their order within each chain (iptables-save prints chains in
/// its own order, not ours).
fn by_chain(rules: &[String]) -> std::collections::BTreeMap<&str, Vec<&str>> {
    let mut map: std::collections::BTreeMap<&str, Vec<&str>> = std::collections::BTreeMap::new();
    for r in rules {
        let chain = r.split_whitespace().nth(1).unwrap_or("");
        map.entry(chain).or_default().push(r);
    }
    map
}

/// The one `iptables-restore --noflush` transaction that makes the kernel match `routes`:
/// our chains declared (so flushed) and refilled, chains of removed apps deleted, and the jumps
/// from PREROUTING and OUTPUT inserted when missing.
pub fn render(existing: &Existing, routes: &[AppRoute]) -> String {
    let mut out = String::from("*nat\n");
    let wanted: BTreeSet<String> = routes.iter().map(|r| app_chain(&r.app)).collect();
    let _ = writeln!(out, ":{TOP_CHAIN} - [0:0]");
    for chain in
        wanted.iter().chain(existing.chains.iter().filter(|c| *c != TOP_CHAIN && !wanted.contains(*c)))
    {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    for rule in desired_rules(routes) {
        out.push_str(&rule);
        out.push('\n');
    }
    for stale in existing.chains.iter().filter(|c| *c != TOP_CHAIN && !wanted.contains(*c)) {
        let _ = writeln!(out, "-X {stale}");
    }
    if !existing.prerouting_jump {
        let _ = writeln!(out, "-I PREROUTING 1 {JUMP}");
    }
    if !existing.output_jump {
        let _ = writeln!(out, "-I OUTPUT 1 {JUMP}");
    }
    out.push_str("COMMIT\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(app: &str, listen: &[&str], bands: &[&[u16]]) -> AppRoute {
        AppRoute {
            app: AppName::new(app).unwrap(),
            listen: listen.iter().map(|l| l.parse().unwrap()).collect(),
            bands: bands.iter().map(|b| b.to_vec()).collect(),
        }
    }

    #[test]
    fn band_is_the_low_bits_of_the_source() {
        assert_eq!(band_of(Ipv4Addr::new(127, 0, 0, 7), 4), 3);
        assert_eq!(band_of(Ipv4Addr::new(10, 1, 2, 8), 4), 0);
        assert_eq!(band_of(Ipv4Addr::new(10, 1, 2, 8), 1), 0);
        assert_eq!(band_of(Ipv4Addr::new(10, 1, 2, 255), 1024), 0x2ff);
    }

    #[test]
    fn renders_one_rule_per_band_and_listen_entry() {
        let r = route("chat", &["0.0.0.0:80", "192.0.2.1:443"], &[&[20000, 20001], &[20002, 20003]]);
        let text = render(&Existing::default(), &[r]);
        assert_eq!(
            text,
            "*nat\n:IPCLUSTER - [0:0]\n:IPC-chat - [0:0]\n\
             -A IPCLUSTER -j IPC-chat\n\
             -A IPC-chat -s 0.0.0.0/0.0.0.1 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 20000\n\
             -A IPC-chat -s 0.0.0.1/0.0.0.1 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 20002\n\
             -A IPC-chat -d 192.0.2.1/32 -s 0.0.0.0/0.0.0.1 -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 20001\n\
             -A IPC-chat -d 192.0.2.1/32 -s 0.0.0.1/0.0.0.1 -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 20003\n\
             -I PREROUTING 1 -m addrtype --dst-type LOCAL -j IPCLUSTER\n\
             -I OUTPUT 1 -m addrtype --dst-type LOCAL -j IPCLUSTER\n\
             COMMIT\n"
        );
    }

    /// Outbound traffic (to non-local addresses) is never redirected: every path into our chains
    /// requires a local destination, and no rule of ours sits anywhere else.
    #[test]
    fn only_locally_destined_traffic_enters_our_chains() {
        let r = route("web", &["0.0.0.0:80"], &[&[20000]]);
        let text = render(&Existing::default(), &[r]);
        for line in text.lines().filter(|l| l.starts_with("-I ") || l.starts_with("-A ")) {
            let chain = line.split_whitespace().nth(1).unwrap();
            if chain == "PREROUTING" || chain == "OUTPUT" {
                assert!(line.ends_with("-m addrtype --dst-type LOCAL -j IPCLUSTER"), "{line}");
            } else {
                assert!(ours(chain), "rule outside our chains: {line}");
            }
        }
        // One band: no source match at all.
        assert!(text.contains("-A IPC-web -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 20000\n"));
    }

    #[test]
    fn a_band_without_a_worker_borrows_the_next_ones() {
        let p = |x: u16| Some(vec![x]);
        assert_eq!(with_failover(&[p(1), p(2), p(3), p(4)]).unwrap(), [[1], [2], [3], [4]]);
        assert_eq!(with_failover(&[p(1), None, None, p(4)]).unwrap(), [[1], [4], [4], [4]]);
        assert_eq!(with_failover(&[None, p(2), p(3), None]).unwrap(), [[2], [2], [3], [2]]);
        assert_eq!(with_failover(&[None, None]), None);
    }

    #[test]
    fn removed_apps_chains_are_deleted_and_jumps_not_duplicated() {
        let save = "# Generated\n*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j IPC-fake\nCOMMIT\n*nat\n\
            :PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:IPCLUSTER - [0:0]\n:IPC-old - [0:0]\n:OTHER - [0:0]\n\
            -A PREROUTING -m addrtype --dst-type LOCAL -j IPCLUSTER\n-A PREROUTING -j OTHER\n\
            -A OUTPUT -m addrtype --dst-type LOCAL -j IPCLUSTER\n-A IPCLUSTER -j IPC-old\nCOMMIT\n";
        let ex = parse_existing(save);
        assert!(ex.prerouting_jump && ex.output_jump);
        assert_eq!(ex.chains.iter().cloned().collect::<Vec<_>>(), ["IPC-old", "IPCLUSTER"]);
        assert_eq!(ex.rules, ["-A IPCLUSTER -j IPC-old"]);
        assert!(ex.routed_ports().is_empty());
        let r = route("new", &["0.0.0.0:80"], &[&[20000]]);
        let text = render(&ex, std::slice::from_ref(&r));
        assert!(text.contains(":IPC-old - [0:0]\n") && text.contains("-X IPC-old\n"), "{text}");
        assert!(
            !text.contains("PREROUTING") && !text.contains("OUTPUT") && !text.contains("OTHER"),
            "{text}"
        );
        assert!(!up_to_date(&ex, &[r]));
    }

    #[test]
    fn no_apps_installs_nothing() {
        assert!(up_to_date(&Existing::default(), &[]));
        let ours = parse_existing("*nat\n:IPCLUSTER - [0:0]\nCOMMIT\n");
        assert!(!up_to_date(&ours, &[]), "an empty chain of ours is still reconciled");
    }

    #[test]
    fn up_to_date_compares_with_what_iptables_save_prints() {
        let r = route("web", &["0.0.0.0:80"], &[&[20000], &[20001]]);
        let mut save = String::from(
            "*nat\n:IPCLUSTER - [0:0]\n:IPC-web - [0:0]\n-A PREROUTING -m addrtype --dst-type LOCAL -j IPCLUSTER\n\
             -A OUTPUT -m addrtype --dst-type LOCAL -j IPCLUSTER\n",
        );
        // iptables-save prints IPC-web's rules before IPCLUSTER's.
        let mut rules = desired_rules(std::slice::from_ref(&r));
        rules.rotate_left(1);
        for rule in rules {
            save.push_str(&rule);
            save.push('\n');
        }
        save.push_str("COMMIT\n");
        assert!(up_to_date(&parse_existing(&save), std::slice::from_ref(&r)));
        assert_eq!(parse_existing(&save).routed_ports(), BTreeSet::from([20000, 20001]));
        let other = route("web", &["0.0.0.0:80"], &[&[20000], &[20002]]);
        assert!(!up_to_date(&parse_existing(&save), &[other]));
    }
}
