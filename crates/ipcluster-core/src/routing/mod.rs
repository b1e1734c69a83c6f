//! Netfilter rules: which worker port each (public address, band) goes to, and which worker
//! ports other hosts may not reach directly, rendered for each address family as one
//! `iptables-restore --noflush` (IPv4) or `ip6tables-restore --noflush` (IPv6) input that
//! rewrites only ipclusterd's own chains.
//!
//! Layout, the same in both families' tables:
//!
//! ```text
//! nat    PREROUTING -m addrtype --dst-type LOCAL -j IPCLUSTER   (traffic from other hosts)
//! nat    OUTPUT     -m addrtype --dst-type LOCAL -j IPCLUSTER   (locally generated, locally destined only)
//! nat    IPCLUSTER  -j IPC-<app>                                (one jump per app the family serves)
//! nat    IPC-<app>  -p tcp [-d ip] --dport P -s b/mask -j REDIRECT --to-ports W   (one per listen × band)
//! filter INPUT      -p tcp -m conntrack --ctstate NEW -m conntrack ! --ctstate DNAT
//!                   -m addrtype ! --src-type LOCAL -j IPCLUSTER  (IPv4: new, not redirected, from elsewhere)
//! filter INPUT      ! -i lo -p tcp -m conntrack --ctstate NEW -m conntrack ! --ctstate DNAT
//!                   -j IPCLUSTER                                 (IPv6: the same, by interface)
//! filter IPCLUSTER  -p tcp -m multiport --dports W1:W2,W5,… -j DROP  (every worker port, ≤ 15 slots a rule)
//! ```
//!
//! **Bands.** A client with IPv4 source `s` is in band `s & (bands - 1)`; `-s b/(bands-1)`
//! (`-s 0.0.0.2/0.0.0.3`) matches exactly those addresses. An IPv6 source is in the band of
//! the low bits of its last 32 bits ([`band_of_v6`], socket mode's rule too), matched by
//! `-s ::b/::(bands-1)` (`-s ::2/::3`): ip6tables takes a non-contiguous mask, and
//! ip6tables-save prints it back in that form. Declaring a chain in a `--noflush` restore
//! flushes and refills it.
//!
//! **Families.** Which table serves a `listen` entry ([`served_by`]): an IPv4 address the
//! IPv4 table (`-d ip/32`, or no `-d` for `0.0.0.0`); an IPv6 address the IPv6 table
//! (`-d ip/128`); `[::]` both, without `-d`, as a dual-stack socket on `[::]` would serve both;
//! an IPv4-mapped `[::ffff:a.b.c.d]` the IPv4 table as `a.b.c.d`, since only IPv4 packets ever
//! reach it. An app gets a chain in a family's nat table only when it has an entry that family
//! serves. Workers listen dual-stack (`[::]:$PORT`), so the guard of every worker port is in
//! both filter tables, whatever the app's entries.
//!
//! **The guard.** Workers listen on the wildcard address, so without it any host could connect
//! to a worker port directly, retired generations included. A connection our REDIRECT rules
//! sent has conntrack state `DNAT` and never enters the filter chain; neither does a connection
//! from this host (readiness probes, local clients) nor a packet of an established connection.
//! What is left, a new connection from another host straight to a worker port, is dropped. In
//! IPv4 "from this host" is `--src-type LOCAL`: the kernel refuses packets from outside that
//! claim a local source address (martian source), so it cannot be forged. IPv6 has no such
//! check (verified on 6.18: a SYN from another host with the server's own address as its
//! source reaches INPUT and passes `! --src-type LOCAL`), so the IPv6 guard asks where the
//! packet came in instead: this host's connections to itself, to any of its addresses, arrive
//! on `lo`, and a packet from outside never does.
//!
//! **Transactions.** `iptables-restore` commits each table at its `COMMIT` (verified with
//! iptables-nft 1.8.9: a failing filter section leaves a committed nat section in place). Each
//! table therefore changes atomically on its own, and the two tables are independent by design:
//! the filter decides nothing about routing (redirected connections bypass it), and its content
//! is the set of ports workers hold, not which of them is live. The filter section comes first:
//! if it fails, nothing changed; if the nat section fails after it, routing is as it was and the
//! guard already describes the ports the workers hold. The two families are two more separate
//! transactions; keeping routing as it was in both when one fails and the other did not is the
//! caller's ([`render_undo`] gives it the input that takes a family's nat table back).
//!
//! **Ownership.** Rules of other software are never named, so never touched. A chain is ours
//! when it is the top chain `IPCLUSTER`, or an `IPC-*` chain the nat top chain jumps to (every
//! change is one transaction per table, so an app chain is always reached from the top chain).
//! A chain that only looks like ours (`IPC-backup`, made by another tool) is never flushed or
//! deleted; an app whose chain name is taken by such a chain with rules in it is refused
//! ([`Conflict`]).

mod rule;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

pub use rule::Rule;

use crate::name::AppName;

/// The top chain, in both tables: jumped to from nat PREROUTING and OUTPUT and filter INPUT.
pub const TOP_CHAIN: &str = "IPCLUSTER";
/// Prefix of per-app chains (nat).
pub const APP_CHAIN_PREFIX: &str = "IPC-";
/// The nat jump rule (without `-A CHAIN`) placed in PREROUTING and OUTPUT.
pub const JUMP: &str = "-m addrtype --dst-type LOCAL -j IPCLUSTER";
/// The IPv4 filter jump rule placed in INPUT: new TCP connections that our rules did not
/// redirect, from addresses that are not local.
pub const GUARD_JUMP: &str = "-p tcp -m conntrack --ctstate NEW -m conntrack ! --ctstate DNAT -m addrtype ! --src-type LOCAL -j IPCLUSTER";
/// The IPv6 filter jump rule: the same, for connections that did not come in on `lo` (an
/// IPv6 source address can claim to be local, see the module docs).
pub const GUARD_JUMP_V6: &str =
    "! -i lo -p tcp -m conntrack --ctstate NEW -m conntrack ! --ctstate DNAT -j IPCLUSTER";
/// Built-in chains holding our nat jump.
const NAT_HOOKS: [&str; 2] = ["PREROUTING", "OUTPUT"];
/// Built-in chain holding our filter jump.
const FILTER_HOOK: &str = "INPUT";
/// `-m multiport` takes at most 15 ports per rule; a range `a:b` counts as two.
const MULTIPORT_SLOTS: usize = 15;

/// An address family: each has its own nat and filter tables, written by its own programs
/// (`iptables-restore`, `ip6tables-restore`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// Both, IPv4 first.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The command-line program of this family (`iptables`, `ip6tables`); `-save` and
    /// `-restore` are appended for the others.
    pub fn program(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    /// The filter jump rule of this family.
    pub fn guard_jump(self) -> &'static str {
        match self {
            Family::V4 => GUARD_JUMP,
            Family::V6 => GUARD_JUMP_V6,
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// The band of an IPv4 client address among `bands` (a power of two): its low bits.
pub fn band_of(addr: Ipv4Addr, bands: u32) -> u32 {
    u32::from(addr) & bands.wrapping_sub(1)
}

/// The band of an IPv6 client address among `bands` (a power of two): the low bits of its last
/// 32 bits, so `::ffff:a.b.c.d` (an IPv4 client of a dual-stack socket) is in `a.b.c.d`'s band.
pub fn band_of_v6(addr: Ipv6Addr, bands: u32) -> u32 {
    (u128::from(addr) as u32) & bands.wrapping_sub(1)
}

/// Where `family`'s table finds the connections of the `listen` entry `public`: `None` when
/// that family never carries them; `Some(None)` on every local address; `Some(Some(ip))` on
/// that address (of this family). See "Families" in the module docs.
pub fn served_by(family: Family, public: &SocketAddr) -> Option<Option<IpAddr>> {
    match (family, public.ip()) {
        (Family::V4, IpAddr::V4(ip)) => Some((!ip.is_unspecified()).then_some(IpAddr::V4(ip))),
        (Family::V4, IpAddr::V6(ip)) if ip.is_unspecified() => Some(None),
        (Family::V4, IpAddr::V6(ip)) => {
            ip.to_ipv4_mapped().map(|v4| (!v4.is_unspecified()).then_some(IpAddr::V4(v4)))
        }
        (Family::V6, IpAddr::V4(_)) => None,
        (Family::V6, IpAddr::V6(ip)) if ip.is_unspecified() => Some(None),
        (Family::V6, IpAddr::V6(ip)) => ip.to_ipv4_mapped().is_none().then_some(Some(IpAddr::V6(ip))),
    }
}

/// The first `listen` entry of `routes` (with its app) that `family` serves, and, with
/// `only`, that no other family serves (a specific IPv6 address, not `[::]`).
pub fn first_entry(routes: &[AppRoute], family: Family, only: bool) -> Option<(&AppName, SocketAddr)> {
    routes.iter().find_map(|r| {
        r.listen
            .iter()
            .find(|l| {
                served_by(family, l).is_some()
                    && !(only && Family::ALL.iter().any(|f| *f != family && served_by(*f, l).is_some()))
            })
            .map(|l| (&r.app, *l))
    })
}

/// Where one app's traffic goes, and which ports its workers hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppRoute {
    pub app: AppName,
    /// Public addresses, in `listen` order, of either family ([`served_by`] says which table
    /// serves each).
    pub listen: Vec<SocketAddr>,
    /// For each band, the worker port for each `listen` entry (same order). Its length is the
    /// number of bands, a power of two.
    pub bands: Vec<Vec<u16>>,
    /// Every port the app's workers hold (live, retired, starting): other hosts may reach them
    /// only through the public addresses.
    pub guarded: Vec<u16>,
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

/// What of ours is in one table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    /// Our chains: the top chain, and (nat) the `IPC-*` chains it jumps to.
    pub chains: BTreeSet<String>,
    /// Chains named like ours that the top chain does not reach: another tool's, never
    /// touched. Name → number of rules.
    pub foreign: BTreeMap<String, usize>,
    /// Built-in chains that hold our jump.
    pub hooks: BTreeSet<String>,
    /// The rules of our chains, in order, canonical.
    pub rules: BTreeMap<String, Vec<Rule>>,
}

impl Table {
    fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.hooks.is_empty()
    }
}

/// What of ours is in one family's tables, parsed from `iptables-save` or `ip6tables-save`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tables {
    pub nat: Table,
    pub filter: Table,
}

impl Tables {
    /// Parses `iptables-save` or `ip6tables-save` output of `family` (the nat and filter
    /// tables; others are ignored). Also reads a rendered transaction (`-I CHAIN 1 spec`
    /// lines), so that what [`render`] wrote can be read back. Never fails: lines it does not
    /// understand are skipped.
    pub fn parse(family: Family, save: &str) -> Tables {
        #[derive(Default)]
        struct Raw {
            declared: BTreeSet<String>,
            rules: BTreeMap<String, Vec<Rule>>,
        }
        let (mut nat, mut filter) = (Raw::default(), Raw::default());
        let mut table: Option<&mut Raw> = None;
        for line in save.lines() {
            let line = line.trim();
            if let Some(name) = line.strip_prefix('*') {
                table = match name.trim() {
                    "nat" => Some(&mut nat),
                    "filter" => Some(&mut filter),
                    _ => None,
                };
                continue;
            }
            let Some(t) = table.as_deref_mut() else { continue };
            if let Some(decl) = line.strip_prefix(':') {
                if let Some(chain) = decl.split_whitespace().next() {
                    t.declared.insert(chain.to_owned());
                }
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
                t.rules.entry(chain.to_owned()).or_default().push(Rule::parse(spec));
            } else if let Some(rest) = line.strip_prefix("-I ") {
                let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
                let spec = spec.strip_prefix("1 ").unwrap_or(spec);
                t.rules.entry(chain.to_owned()).or_default().insert(0, Rule::parse(spec));
            }
        }
        let finish = |raw: Raw, hooks: &[&str], jump: &str, sub_chains: bool| {
            let jump = Rule::parse(jump);
            let mut t = Table::default();
            if raw.declared.contains(TOP_CHAIN) {
                t.chains.insert(TOP_CHAIN.to_owned());
                if sub_chains {
                    for r in raw.rules.get(TOP_CHAIN).into_iter().flatten() {
                        if let Some(to) = r
                            .jumps_to()
                            .filter(|c| c.starts_with(APP_CHAIN_PREFIX) && raw.declared.contains(*c))
                        {
                            t.chains.insert(to.to_owned());
                        }
                    }
                }
            }
            for c in raw.declared.iter().filter(|c| c.starts_with(APP_CHAIN_PREFIX) && !t.chains.contains(*c))
            {
                t.foreign.insert(c.clone(), raw.rules.get(c).map_or(0, Vec::len));
            }
            for h in hooks {
                if raw.rules.get(*h).is_some_and(|rs| rs.contains(&jump)) {
                    t.hooks.insert((*h).to_owned());
                }
            }
            for c in &t.chains {
                t.rules.insert(c.clone(), raw.rules.get(c).cloned().unwrap_or_default());
            }
            t
        };
        Tables {
            nat: finish(nat, &NAT_HOOKS, JUMP, true),
            filter: finish(filter, &[FILTER_HOOK], family.guard_jump(), false),
        }
    }

    /// What `family`'s tables hold after `routes` were applied to tables with nothing of ours
    /// (for fakes and tests).
    pub fn after(family: Family, routes: &[AppRoute]) -> Tables {
        Tables::parse(family, &render(family, &Tables::default(), routes).unwrap_or_default())
    }

    /// Whether nothing of ours is here: no chain, no jump.
    pub fn is_empty(&self) -> bool {
        self.nat.is_empty() && self.filter.is_empty()
    }

    /// Worker ports our nat rules here redirect to.
    pub fn routed_ports(&self) -> BTreeSet<u16> {
        self.nat.rules.values().flatten().filter_map(Rule::redirect_port).collect()
    }
}

/// What of ours is in the kernel now, in both families.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Existing {
    pub v4: Tables,
    /// `None` when the IPv6 tables were not read: this host has no IPv6, or ip6tables cannot
    /// be used (nothing of ours can be there, or nothing can be known of it).
    pub v6: Option<Tables>,
}

impl Existing {
    /// Worker ports our rules currently redirect to, in either family (what the kernel says
    /// is live).
    pub fn routed_ports(&self) -> BTreeSet<u16> {
        let mut ports = self.v4.routed_ports();
        ports.extend(self.v6.iter().flat_map(Tables::routed_ports));
        ports
    }

    /// What the kernel holds after `routes` were applied to a kernel with nothing of ours, in
    /// both families (for fakes and tests).
    pub fn after(routes: &[AppRoute]) -> Existing {
        Existing { v4: Tables::after(Family::V4, routes), v6: Some(Tables::after(Family::V6, routes)) }
    }

    /// The tables of `family`, when they were read.
    pub fn family(&self, family: Family) -> Option<&Tables> {
        match family {
            Family::V4 => Some(&self.v4),
            Family::V6 => self.v6.as_ref(),
        }
    }
}

/// The routes with an entry `family` serves: those that get a chain in its nat table.
fn served(family: Family, routes: &[AppRoute]) -> Vec<&AppRoute> {
    routes.iter().filter(|r| r.listen.iter().any(|l| served_by(family, l).is_some())).collect()
}

/// `-s` of a band among `n` bands (`n > 1`): the band in the low bits, the mask `n - 1`.
fn band_source(family: Family, band: u32, n: u32) -> String {
    match family {
        Family::V4 => format!("-s {}/{} ", Ipv4Addr::from(band), Ipv4Addr::from(n - 1)),
        Family::V6 => {
            format!("-s {}/{} ", Ipv6Addr::from(u128::from(band)), Ipv6Addr::from(u128::from(n - 1)))
        }
    }
}

/// The nat rules of `routes` in `family`'s table as `-A CHAIN spec` lines, in order.
fn nat_rules(family: Family, routes: &[AppRoute]) -> Vec<(String, String)> {
    let routes = served(family, routes);
    let mut rules = Vec::new();
    for r in &routes {
        rules.push((TOP_CHAIN.to_owned(), format!("-j {}", app_chain(&r.app))));
    }
    for r in &routes {
        let chain = app_chain(&r.app);
        // A band count that is not a power of two (never produced by a valid config) still
        // renders without panicking; the mask is then what the low bits make of it.
        let n = u32::try_from(r.bands.len()).unwrap_or(u32::MAX);
        for (i, public) in r.listen.iter().enumerate() {
            let Some(dest) = served_by(family, public) else { continue };
            for (band, ports) in r.bands.iter().enumerate() {
                // A band without a port for this entry gets no rule (its clients are refused)
                // rather than a panic.
                let Some(port) = ports.get(i) else { continue };
                let mut rule = String::new();
                match dest {
                    Some(IpAddr::V4(ip)) => {
                        let _ = write!(rule, "-d {ip}/32 ");
                    }
                    Some(IpAddr::V6(ip)) => {
                        let _ = write!(rule, "-d {ip}/128 ");
                    }
                    None => {}
                }
                if n > 1 {
                    rule.push_str(&band_source(family, u32::try_from(band).unwrap_or(u32::MAX), n));
                }
                let _ = write!(rule, "-p tcp -m tcp --dport {} -j REDIRECT --to-ports {port}", public.port());
                rules.push((chain.clone(), rule));
            }
        }
    }
    rules
}

/// The filter rules: one DROP per at most 15 multiport slots of the guarded ports (sorted,
/// consecutive ports as ranges). The same in both families.
fn filter_rules(routes: &[AppRoute]) -> Vec<(String, String)> {
    let ports: BTreeSet<u16> = routes.iter().flat_map(|r| r.guarded.iter().copied()).collect();
    let mut ranges: Vec<(u16, u16)> = Vec::new();
    for p in ports {
        match ranges.last_mut() {
            Some((_, hi)) if hi.checked_add(1) == Some(p) => *hi = p,
            _ => ranges.push((p, p)),
        }
    }
    let mut rules = Vec::new();
    let (mut items, mut slots) = (Vec::new(), 0);
    let mut flush = |items: &mut Vec<String>| {
        if !items.is_empty() {
            rules.push((
                TOP_CHAIN.to_owned(),
                format!("-p tcp -m multiport --dports {} -j DROP", items.join(",")),
            ));
            items.clear();
        }
    };
    for (lo, hi) in ranges {
        let (item, cost) = if lo == hi { (lo.to_string(), 1) } else { (format!("{lo}:{hi}"), 2) };
        if slots + cost > MULTIPORT_SLOTS {
            flush(&mut items);
            slots = 0;
        }
        items.push(item);
        slots += cost;
    }
    flush(&mut items);
    rules
}

/// Rules grouped by chain, canonical, keeping their order within each chain (iptables-save
/// prints chains in its own order, not ours).
fn canonical(rules: &[(String, String)]) -> BTreeMap<String, Vec<Rule>> {
    let mut map: BTreeMap<String, Vec<Rule>> = BTreeMap::new();
    for (chain, spec) in rules {
        map.entry(chain.clone()).or_default().push(Rule::parse(spec));
    }
    map
}

fn nat_wanted(family: Family, routes: &[AppRoute]) -> BTreeSet<String> {
    std::iter::once(TOP_CHAIN.to_owned())
        .chain(served(family, routes).iter().map(|r| app_chain(&r.app)))
        .collect()
}

/// Whether one table holds exactly what is wanted: our chains, their rules (canonical, in
/// order) and our jumps. Nothing to do in it (`any` false) and nothing of ours there: left
/// alone, up to date.
fn table_up_to_date(
    t: &Table,
    any: bool,
    wanted: &BTreeSet<String>,
    rules: &[(String, String)],
    hooks: &[&str],
) -> bool {
    if !any && t.is_empty() {
        return true;
    }
    let mut have = t.rules.clone();
    have.retain(|_, v| !v.is_empty());
    hooks.iter().all(|h| t.hooks.contains(*h)) && t.chains == *wanted && have == canonical(rules)
}

fn nat_up_to_date(family: Family, t: &Tables, routes: &[AppRoute]) -> bool {
    let any = !served(family, routes).is_empty();
    table_up_to_date(&t.nat, any, &nat_wanted(family, routes), &nat_rules(family, routes), &NAT_HOOKS)
}

fn filter_up_to_date(t: &Tables, routes: &[AppRoute]) -> bool {
    let wanted = BTreeSet::from([TOP_CHAIN.to_owned()]);
    table_up_to_date(&t.filter, !routes.is_empty(), &wanted, &filter_rules(routes), &[FILTER_HOOK])
}

/// Whether `family`'s tables already hold exactly the desired rules and jumps.
pub fn family_up_to_date(family: Family, t: &Tables, routes: &[AppRoute]) -> bool {
    nat_up_to_date(family, t, routes) && filter_up_to_date(t, routes)
}

/// Whether the kernel already has exactly the desired rules and jumps, in both tables of both
/// families (of IPv6 when it was read).
pub fn up_to_date(existing: &Existing, routes: &[AppRoute]) -> bool {
    family_up_to_date(Family::V4, &existing.v4, routes)
        && existing.v6.as_ref().is_none_or(|t| family_up_to_date(Family::V6, t, routes))
}

/// An app's chain name is taken by another tool's chain that has rules in it: flushing it
/// would destroy them, so the routes are not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub family: Family,
    pub chain: String,
    pub rules: usize,
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} nat chain {} exists with {} rules but is not ipclusterd's ({TOP_CHAIN} does not jump to it): another tool made it; rename or delete that chain, or rename the app",
            self.family.program(),
            self.chain,
            self.rules
        )
    }
}

impl std::error::Error for Conflict {}

/// The `iptables-restore --noflush` (or `ip6tables-restore`) input that makes `family`'s
/// tables, holding `existing`, match `routes`: for each table that is not up to date (filter
/// first, see the module docs), our chains declared (so flushed) and refilled, chains of
/// removed apps deleted, and missing jumps inserted. Empty when both tables are up to date.
pub fn render(family: Family, existing: &Tables, routes: &[AppRoute]) -> Result<String, Conflict> {
    let mut out = String::new();
    if !filter_up_to_date(existing, routes) {
        out.push_str("*filter\n");
        let _ = writeln!(out, ":{TOP_CHAIN} - [0:0]");
        for (chain, spec) in filter_rules(routes) {
            let _ = writeln!(out, "-A {chain} {spec}");
        }
        if !existing.filter.hooks.contains(FILTER_HOOK) {
            let _ = writeln!(out, "-I {FILTER_HOOK} 1 {}", family.guard_jump());
        }
        out.push_str("COMMIT\n");
    }
    if !nat_up_to_date(family, existing, routes) {
        let wanted = nat_wanted(family, routes);
        // An empty chain of another tool that has an app's name is taken over (flushing it
        // destroys nothing); one with rules is not ours to flush.
        if let Some((chain, rules)) =
            existing.nat.foreign.iter().find(|(c, n)| wanted.contains(*c) && **n > 0)
        {
            return Err(Conflict { family, chain: chain.clone(), rules: *rules });
        }
        let stale: Vec<&String> = existing.nat.chains.iter().filter(|c| !wanted.contains(*c)).collect();
        out.push_str("*nat\n");
        for chain in
            wanted.iter().filter(|c| *c == TOP_CHAIN).chain(wanted.iter().filter(|c| *c != TOP_CHAIN))
        {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        for chain in &stale {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        for (chain, spec) in nat_rules(family, routes) {
            let _ = writeln!(out, "-A {chain} {spec}");
        }
        for chain in &stale {
            let _ = writeln!(out, "-X {chain}");
        }
        for hook in NAT_HOOKS {
            if !existing.nat.hooks.contains(hook) {
                let _ = writeln!(out, "-I {hook} 1 {JUMP}");
            }
        }
        out.push_str("COMMIT\n");
    }
    Ok(out)
}

/// The input that takes `family`'s nat table back to `before` after [`render`]`(family,
/// before, routes)` was applied: for when the other family's transaction then failed, so
/// that routing stays as it was in both. Our chains of either state are declared (flushed),
/// `before`'s rules written back, the jumps that were inserted deleted, and the chains that
/// were created deleted (an empty chain of another tool that was taken over is left, empty,
/// as it was). `None` when the nat table was up to date (nothing was changed there).
pub fn render_undo(family: Family, before: &Tables, routes: &[AppRoute]) -> Option<String> {
    if nat_up_to_date(family, before, routes) {
        return None;
    }
    let was = &before.nat;
    let wanted = nat_wanted(family, routes);
    let all: BTreeSet<&String> = was.chains.iter().chain(&wanted).collect();
    let mut out = String::from("*nat\n");
    for chain in &all {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    for (chain, rules) in &was.rules {
        for rule in rules {
            let _ = writeln!(out, "-A {chain} {rule}");
        }
    }
    for hook in NAT_HOOKS.iter().filter(|h| !was.hooks.contains(**h)) {
        let _ = writeln!(out, "-D {hook} {JUMP}");
    }
    for chain in all.iter().filter(|c| !was.chains.contains(**c) && !was.foreign.contains_key(**c)) {
        let _ = writeln!(out, "-X {chain}");
    }
    out.push_str("COMMIT\n");
    Some(out)
}
