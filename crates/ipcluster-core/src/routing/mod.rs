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
//! A table with nothing to do (no app served in this family's nat table, no worker port to
//! guard) holds nothing of ours: no chain, no jump. [`render`] deletes them (jumps first) when
//! the last app goes, rather than leaving an empty chain that would count as up to date.
//!
//! **The guard keeps conntrack.** A network namespace tracks connections only while some rule
//! needs conntrack (the kernel registers its hooks on demand), and an established REDIRECTed
//! connection keeps its translation only while connections are tracked: verified on 6.18 with
//! iptables-nft 1.8.9, removing the last REDIRECT rule of a namespace with no other conntrack
//! user resets a loopback connection it had redirected. The guard's jump matches `--ctstate`,
//! and it is there exactly while some worker holds a port, which every NAT'd connection ends
//! at (every worker of every app, routed or not: [`AppRoute::guarded`]), so established
//! connections of a retired NAT generation keep working after the app's last rule goes.
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

mod family;
#[cfg(test)]
mod props;
mod rule;
mod sets;
mod tables;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

pub use family::{Family, band_of, band_of_ip, band_of_v6, served_by};
pub use rule::Rule;
pub use sets::{
    SET_MAXELEM, SET_PREFIX, SET_SLOTS, create_input, parse_list, parse_set_name, records, set_name, sets,
};
pub use tables::{Existing, Table, Tables};

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

/// The first `listen` entry of `routes` (with its app) that `family` serves, and, with
/// `only`, that no other family serves (a specific IPv6 address, not `[::]`).
pub fn first_entry(routes: &[AppRoute], family: Family, only: bool) -> Option<(&AppName, SocketAddr)> {
    routes.iter().filter(|r| !r.bands.is_empty()).find_map(|r| {
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
    /// number of bands, a power of two; empty when nothing routes to the app (no live worker,
    /// stopped, not deployed yet, socket mode): then its ports are guarded only.
    pub bands: Vec<Vec<u16>>,
    /// Every port the app's workers hold (live, retired, starting, stopping): other hosts may
    /// reach them only through the public addresses, whether or not the app is routed.
    pub guarded: Vec<u16>,
    /// Session affinity (`None`: off): where new clients are recorded, and the generations that
    /// keep their recorded clients. See "Sessions" in the module docs.
    pub sessions: Option<Sessions>,
}

/// Session affinity in one app's nat rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sessions {
    /// Seconds a record lives after its client's last new connection.
    pub timeout: u32,
    /// For each band of the route, the slot of the set its new clients are recorded in (the
    /// generation serving the band).
    pub record: Vec<u8>,
    /// The generations whose recorded clients still reach them (draining), newest first.
    pub draining: Vec<DrainingRoute>,
}

/// A draining generation in the rules: its set, and where its bands are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainingRoute {
    /// The slot of its set ([`set_name`]).
    pub slot: u8,
    /// For each of its bands, its worker's ports (`listen` order); `None` when that worker is
    /// gone: a client recorded there loses its record and goes on to the live generation.
    pub bands: Vec<Option<Vec<u16>>>,
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

/// The routed apps with an entry `family` serves: those that get a chain in its nat table (an
/// app with no band is guarded only).
fn served(family: Family, routes: &[AppRoute]) -> Vec<&AppRoute> {
    routes
        .iter()
        .filter(|r| !r.bands.is_empty() && r.listen.iter().any(|l| served_by(family, l).is_some()))
        .collect()
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

/// The match of one band's clients of one `listen` entry: `[-d ip] [-s band/mask] -p tcp
/// --dport P `, the band among `n` bands.
fn band_match(family: Family, dest: Option<IpAddr>, band: usize, n: usize, dport: u16) -> String {
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
    // A band count that is not a power of two (never produced by a valid config) still renders
    // without panicking; the mask is then what the low bits make of it.
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    if n > 1 {
        rule.push_str(&band_source(family, u32::try_from(band).unwrap_or(u32::MAX), n));
    }
    let _ = write!(rule, "-p tcp -m tcp --dport {dport} ");
    rule
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
        let mut push = |spec: String| rules.push((chain.clone(), spec));
        for (i, public) in r.listen.iter().enumerate() {
            let Some(dest) = served_by(family, public) else { continue };
            let dport = public.port();
            let set = |slot: u8| set_name(family, &r.app, slot);
            // Draining generations first: a recorded client goes to its generation's worker of
            // its band, and its record is refreshed; a band whose worker is gone drops the
            // record and lets the client on to the live generation.
            for d in r.sessions.iter().flat_map(|s| s.draining.iter().map(move |d| (s.timeout, d))) {
                let (timeout, d) = d;
                for (band, ports) in d.bands.iter().enumerate() {
                    let m = band_match(family, dest, band, d.bands.len(), dport);
                    let name = set(d.slot);
                    let matched = format!("{m}-m set --match-set {name} src ");
                    match ports.as_ref().and_then(|p| p.get(i)) {
                        Some(port) => {
                            push(format!("{matched}-j SET --add-set {name} src --exist --timeout {timeout}"));
                            push(format!("{matched}-j REDIRECT --to-ports {port}"));
                        }
                        None => push(format!("{matched}-j SET --del-set {name} src")),
                    }
                }
            }
            // The live bands: each new client is recorded in the set of the generation that
            // serves its band (one rule for them all when that is one generation).
            let record = r.sessions.as_ref().map(|s| (s.timeout, &s.record));
            if let Some((timeout, slots)) = record
                && let Some(first) = slots.first()
                && slots.iter().all(|s| s == first)
            {
                let m = band_match(family, dest, 0, 1, dport);
                push(format!("{m}-j SET --add-set {} src --exist --timeout {timeout}", set(*first)));
            }
            for (band, ports) in r.bands.iter().enumerate() {
                // A band without a port for this entry gets no rule (its clients are refused)
                // rather than a panic.
                let Some(port) = ports.get(i) else { continue };
                let m = band_match(family, dest, band, r.bands.len(), dport);
                if let Some((timeout, slots)) = record
                    && !slots.iter().all(|s| Some(s) == slots.first())
                    && let Some(slot) = slots.get(band)
                {
                    push(format!("{m}-j SET --add-set {} src --exist --timeout {timeout}", set(*slot)));
                }
                push(format!("{m}-j REDIRECT --to-ports {port}"));
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

/// Our chains `family`'s nat table should hold for `routes`: the top chain and a chain per app
/// it serves; none when it serves no app.
fn nat_wanted(family: Family, routes: &[AppRoute]) -> BTreeSet<String> {
    let apps = served(family, routes);
    if apps.is_empty() {
        return BTreeSet::new();
    }
    std::iter::once(TOP_CHAIN.to_owned()).chain(apps.iter().map(|r| app_chain(&r.app))).collect()
}

/// Whether one table holds exactly what is wanted: our chains, their rules (canonical, in
/// order) and our jumps. With nothing to do in it (`any` false), exactly when nothing of ours
/// is there: no chain, no jump (an empty chain and its jump left by the last app are removed,
/// not kept).
fn table_up_to_date(
    t: &Table,
    any: bool,
    wanted: &BTreeSet<String>,
    rules: &[(String, String)],
    hooks: &[&str],
) -> bool {
    if !any {
        return t.is_empty();
    }
    let mut have = t.rules.clone();
    have.retain(|_, v| !v.is_empty());
    hooks.iter().all(|h| t.hooks.contains(*h)) && t.chains == *wanted && have == canonical(rules)
}

/// Whether `family`'s nat table has anything to route: an app with an entry it serves.
fn nat_wanted_at_all(family: Family, routes: &[AppRoute]) -> bool {
    !served(family, routes).is_empty()
}

/// Whether the filter tables have anything to guard: a port some worker holds.
fn filter_wanted_at_all(routes: &[AppRoute]) -> bool {
    routes.iter().any(|r| !r.guarded.is_empty())
}

fn nat_up_to_date(family: Family, t: &Tables, routes: &[AppRoute]) -> bool {
    let any = nat_wanted_at_all(family, routes);
    table_up_to_date(&t.nat, any, &nat_wanted(family, routes), &nat_rules(family, routes), &NAT_HOOKS)
}

fn filter_up_to_date(t: &Tables, routes: &[AppRoute]) -> bool {
    let wanted = BTreeSet::from([TOP_CHAIN.to_owned()]);
    table_up_to_date(&t.filter, filter_wanted_at_all(routes), &wanted, &filter_rules(routes), &[FILTER_HOOK])
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
/// removed apps deleted, and missing jumps inserted. A table with nothing left to do (no app
/// served, no port guarded) loses our jumps and chains, so that nothing of ours stays behind.
/// Empty when both tables are up to date.
pub fn render(family: Family, existing: &Tables, routes: &[AppRoute]) -> Result<String, Conflict> {
    let mut out = String::new();
    if !filter_up_to_date(existing, routes) {
        out.push_str("*filter\n");
        let _ = writeln!(out, ":{TOP_CHAIN} - [0:0]");
        if filter_wanted_at_all(routes) {
            for (chain, spec) in filter_rules(routes) {
                let _ = writeln!(out, "-A {chain} {spec}");
            }
            if !existing.filter.hooks.contains(FILTER_HOOK) {
                let _ = writeln!(out, "-I {FILTER_HOOK} 1 {}", family.guard_jump());
            }
        } else {
            if existing.filter.hooks.contains(FILTER_HOOK) {
                let _ = writeln!(out, "-D {FILTER_HOOK} {}", family.guard_jump());
            }
            let _ = writeln!(out, "-X {TOP_CHAIN}");
        }
        out.push_str("COMMIT\n");
    }
    if !nat_up_to_date(family, existing, routes) {
        let any = nat_wanted_at_all(family, routes);
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
        // Jumps to the top chain go before it does (a chain something jumps to cannot be
        // deleted); a missing one is inserted while there is something to route.
        for hook in NAT_HOOKS {
            match (any, existing.nat.hooks.contains(hook)) {
                (true, false) => {
                    let _ = writeln!(out, "-I {hook} 1 {JUMP}");
                }
                (false, true) => {
                    let _ = writeln!(out, "-D {hook} {JUMP}");
                }
                _ => {}
            }
        }
        for chain in &stale {
            let _ = writeln!(out, "-X {chain}");
        }
        out.push_str("COMMIT\n");
    }
    Ok(out)
}

/// The input that takes `family`'s nat table back to `before` after [`render`]`(family,
/// before, routes)` was applied: for when the other family's transaction then failed, so
/// that routing stays as it was in both. Our chains of either state are declared (flushed or
/// made again), `before`'s rules written back, the jumps that were inserted deleted (or those
/// that were deleted inserted again), and the chains that were created deleted (an empty
/// chain of another tool that was taken over is left, empty, as it was). `None` when the nat
/// table was up to date (nothing was changed there).
pub fn render_undo(family: Family, before: &Tables, routes: &[AppRoute]) -> Option<String> {
    if nat_up_to_date(family, before, routes) {
        return None;
    }
    let was = &before.nat;
    let any = nat_wanted_at_all(family, routes);
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
    for hook in NAT_HOOKS {
        match (any, was.hooks.contains(hook)) {
            (true, false) => {
                let _ = writeln!(out, "-D {hook} {JUMP}");
            }
            (false, true) => {
                let _ = writeln!(out, "-I {hook} 1 {JUMP}");
            }
            _ => {}
        }
    }
    for chain in all.iter().filter(|c| !was.chains.contains(**c) && !was.foreign.contains_key(**c)) {
        let _ = writeln!(out, "-X {chain}");
    }
    out.push_str("COMMIT\n");
    Some(out)
}
