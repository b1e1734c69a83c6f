//! The ipsets behind session affinity in NAT mode: their names, the sets a set of routes needs,
//! and reading what `ipset list -t` prints. One `hash:ip` set with timeouts per generation with
//! session affinity and per address family (`ipc4-<app>-<slot>`, `ipc6-<app>-<slot>`): a client
//! in it has a session with that generation until its record times out.

use std::collections::BTreeMap;

use super::{AppRoute, Family, served};
use crate::name::AppName;

/// Prefix of every ipset ipclusterd owns (`ipc4-` and `ipc6-`); sets named otherwise are never
/// touched.
pub const SET_PREFIX: &str = "ipc";
/// Slots of sets per app: the live generation, a staged or canary one, and at most 6 draining.
pub const SET_SLOTS: u8 = 8;
/// Records a set holds at most (ipset's default `maxelem`): a client that finds its
/// generation's set full is not recorded and goes to the live generation.
pub const SET_MAXELEM: u32 = 65_536;

/// The ipset of `app`'s generation in `slot`, in `family` (`ipc4-web-0`, `ipc6-web-0`): at most
/// 31 characters (app names are at most 24), ipset's limit.
pub fn set_name(family: Family, app: &AppName, slot: u8) -> String {
    let f = match family {
        Family::V4 => 4,
        Family::V6 => 6,
    };
    format!("{SET_PREFIX}{f}-{app}-{slot}")
}

/// The family, app and slot of one of our set names.
pub fn parse_set_name(name: &str) -> Option<(Family, AppName, u8)> {
    let rest = name.strip_prefix(SET_PREFIX)?;
    let (family, rest) = match rest.split_at_checked(2)? {
        ("4-", r) => (Family::V4, r),
        ("6-", r) => (Family::V6, r),
        _ => return None,
    };
    let (app, slot) = rest.rsplit_once('-')?;
    let slot: u8 = slot.parse().ok().filter(|s| *s < SET_SLOTS)?;
    let app = AppName::new(app).ok()?;
    // Only the name [`set_name`] gives: `ipc4-web-07` or `ipc4-web-+7` is another's set.
    (set_name(family, &app, slot) == name).then_some((family, app, slot))
}

/// Every set `routes` name in `family`, with its timeout (seconds): what must exist before the
/// rules that name it are written.
pub fn sets(family: Family, routes: &[AppRoute]) -> BTreeMap<String, u32> {
    served(family, routes)
        .into_iter()
        .filter_map(|r| r.sessions.as_ref().map(|s| (r, s)))
        .flat_map(|(r, s)| {
            s.record
                .iter()
                .copied()
                .chain(s.draining.iter().map(|d| d.slot))
                .map(move |slot| (set_name(family, &r.app, slot), s.timeout))
        })
        .collect()
}

/// The `ipset restore -exist` input that creates `sets` (name → family, timeout) where they do
/// not exist yet.
pub fn create_input(sets: &BTreeMap<String, (Family, u32)>) -> String {
    let mut out = String::new();
    for (name, (family, timeout)) in sets {
        let family = match family {
            Family::V4 => "inet",
            Family::V6 => "inet6",
        };
        out.push_str(&format!(
            "create {name} hash:ip family {family} timeout {timeout} maxelem {SET_MAXELEM}\n"
        ));
    }
    out
}

/// Our sets in what `ipset list -t` (or `-terse`) printed, with their number of entries (the
/// kernel counts only records that have not timed out). Never fails: what it does not
/// understand it skips; a set without a count counts 0.
pub fn parse_list(text: &str) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("Name: ") {
            let name = name.trim();
            current = parse_set_name(name).map(|_| name.to_owned());
            if let Some(n) = &current {
                out.insert(n.clone(), 0);
            }
        } else if let (Some(n), Some(count)) = (&current, line.strip_prefix("Number of entries: ")) {
            out.insert(n.clone(), count.trim().parse().unwrap_or(0));
        }
    }
    out
}

/// The records of each (app, slot) in `list` ([`parse_list`]), both families summed.
pub fn records(list: &BTreeMap<String, u32>) -> BTreeMap<(AppName, u8), u32> {
    let mut out: BTreeMap<(AppName, u8), u32> = BTreeMap::new();
    for (name, n) in list {
        if let Some((_, app, slot)) = parse_set_name(name) {
            let sum = out.entry((app, slot)).or_default();
            *sum = sum.saturating_add(*n);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_ipset_and_read_back() {
        let app = AppName::new(&"a".repeat(24)).unwrap();
        for family in Family::ALL {
            for slot in 0..SET_SLOTS {
                let name = set_name(family, &app, slot);
                assert!(name.len() <= 31, "{name}");
                assert_eq!(parse_set_name(&name), Some((family, app.clone(), slot)));
            }
        }
        for other in ["ipc4-web", "ipc4-web-8", "ipc5-web-0", "ipc4-Web-0", "mine", "ipc4--0"] {
            assert_eq!(parse_set_name(other), None, "{other}");
        }
    }

    /// What ipset 7.17 printed (Debian 12) for two of ours, one with an expired record, and
    /// another tool's set.
    #[test]
    fn ipset_list_terse_is_read_for_our_sets_only() {
        let text = "Name: ipc4-web-0\nType: hash:ip\nRevision: 6\nHeader: family inet hashsize 1024 maxelem 65536 timeout 60 bucketsize 12 initval 0x982c8a22\nSize in memory: 280\nReferences: 6\nNumber of entries: 3\n\nName: ipc6-web-0\nType: hash:ip\nRevision: 6\nHeader: family inet6 hashsize 1024 maxelem 65536 timeout 60\nSize in memory: 224\nReferences: 2\nNumber of entries: 2\n\nName: blocklist\nType: hash:net\nNumber of entries: 500\n\nName: ipc4-web-1\nNumber of entries: 0\n";
        let list = parse_list(text);
        assert_eq!(list.len(), 3);
        let web = AppName::new("web").unwrap();
        assert_eq!(records(&list), BTreeMap::from([((web.clone(), 0), 5), ((web, 1), 0)]));
    }

    #[test]
    fn the_create_input_makes_sets_of_the_right_family_and_timeout() {
        let sets = BTreeMap::from([
            ("ipc4-web-0".to_owned(), (Family::V4, 90)),
            ("ipc6-web-0".to_owned(), (Family::V6, 90)),
        ]);
        assert_eq!(
            create_input(&sets),
            "create ipc4-web-0 hash:ip family inet timeout 90 maxelem 65536\ncreate ipc6-web-0 hash:ip family inet6 timeout 90 maxelem 65536\n"
        );
    }
}
