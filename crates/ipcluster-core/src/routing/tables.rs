//! What of ours is in the kernel's tables, as `iptables-save` and `ip6tables-save` print it:
//! our chains, their rules (canonical), our jumps, and chains that only look like ours.

use std::collections::{BTreeMap, BTreeSet};

use super::{APP_CHAIN_PREFIX, AppRoute, FILTER_HOOK, Family, JUMP, NAT_HOOKS, Rule, TOP_CHAIN, render};

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
    pub(super) fn is_empty(&self) -> bool {
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

    /// Worker ports our nat rules here redirect to (the live bands' and the draining ones').
    pub fn routed_ports(&self) -> BTreeSet<u16> {
        self.nat.rules.values().flatten().filter_map(Rule::redirect_port).collect()
    }

    /// Worker ports our nat rules redirect every client of a band to (not only those a set
    /// recorded): the live generation's.
    pub fn live_ports(&self) -> BTreeSet<u16> {
        let live = |r: &&Rule| r.match_set().is_none();
        self.nat.rules.values().flatten().filter(live).filter_map(Rule::redirect_port).collect()
    }

    /// The session slot of each worker port our nat rules redirect to (a port of a generation
    /// with session affinity): the slot of the set a draining rule matches, or of the set the
    /// live rules before it record new clients in.
    pub fn session_slots(&self, family: Family) -> BTreeMap<u16, u8> {
        let mut out = BTreeMap::new();
        for rules in self.nat.rules.values() {
            let mut recording = None;
            for r in rules {
                let slot =
                    |name: &str| super::parse_set_name(name).filter(|(f, ..)| *f == family).map(|(.., s)| s);
                match (r.match_set(), r.set_target(), r.redirect_port()) {
                    (None, Some(set), None) => recording = slot(set),
                    (Some(set), _, Some(port)) => {
                        if let Some(s) = slot(set) {
                            out.insert(port, s);
                        }
                    }
                    (None, _, Some(port)) => {
                        if let Some(s) = recording {
                            out.insert(port, s);
                        }
                    }
                    _ => {}
                }
            }
        }
        out
    }

    /// Worker ports our nat rules redirect the clients recorded in a set to: the draining
    /// generations', by set.
    pub fn draining_ports(&self) -> BTreeMap<String, BTreeSet<u16>> {
        let mut out: BTreeMap<String, BTreeSet<u16>> = BTreeMap::new();
        for r in self.nat.rules.values().flatten() {
            if let (Some(set), Some(port)) = (r.match_set(), r.redirect_port()) {
                out.entry(set.to_owned()).or_default().insert(port);
            }
        }
        out
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

    /// The live generations' worker ports, in either family ([`Tables::live_ports`]).
    pub fn live_ports(&self) -> BTreeSet<u16> {
        let mut ports = self.v4.live_ports();
        ports.extend(self.v6.iter().flat_map(Tables::live_ports));
        ports
    }

    /// The session slot of each routed worker port, in either family ([`Tables::session_slots`]).
    pub fn session_slots(&self) -> BTreeMap<u16, u8> {
        let mut out = self.v4.session_slots(Family::V4);
        out.extend(self.v6.iter().flat_map(|t| t.session_slots(Family::V6)));
        out
    }

    /// The draining generations' worker ports, in either family ([`Tables::draining_ports`]).
    pub fn draining_ports(&self) -> BTreeSet<u16> {
        let all = self
            .v4
            .draining_ports()
            .into_values()
            .chain(self.v6.iter().flat_map(|t| t.draining_ports().into_values()));
        all.flatten().collect()
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
