//! Rules and `iptables-save` output: no text makes the reader panic, a canonical rule prints
//! back as itself, and what the renderer writes reads back as up to date.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr, SocketAddr},
};

use proptest::prelude::*;

use crate::{
    name::AppName,
    prop_config::config,
    routing::{self, AppRoute, DrainingRoute, Existing, Family, Rule, SET_SLOTS, Sessions, Tables},
};

/// A `listen` address of either family: IPv4 specific or `0.0.0.0`, IPv6 specific or `[::]`,
/// and IPv4-mapped IPv6.
fn listen_ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(IpAddr::from),
        Just(IpAddr::from([0u8; 4])),
        any::<[u8; 16]>().prop_map(IpAddr::from),
        Just(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        any::<[u8; 4]>().prop_map(|ip| IpAddr::V6(std::net::Ipv4Addr::from(ip).to_ipv6_mapped())),
    ]
}

/// Routes of every shape a supervisor can produce (routed apps, and apps only guarded: no band),
/// and some it cannot.
pub(crate) fn routes() -> impl Strategy<Value = Vec<AppRoute>> {
    let app = (proptest::sample::select(vec!["web", "api", "chat", "x1", "long_name_here"]), 0u8..4)
        .prop_map(|(n, i)| AppName::new(&format!("{n}{i}")).unwrap());
    let one = (app, prop::collection::vec((listen_ip(), 1u16..=u16::MAX), 1..4), 0u32..8, 1024u16..=u16::MAX)
        .prop_flat_map(|(app, listen, k, base)| {
            let listen: Vec<SocketAddr> = listen.into_iter().map(SocketAddr::from).collect();
            // k = 7: not routed (no live worker, stopped, socket mode), its ports guarded only.
            let (bands, per) = (if k == 7 { 0 } else { 1usize << k }, listen.len());
            let ports = prop::collection::vec(prop::collection::vec(1024u16..=u16::MAX, per), bands);
            let guarded = prop_oneof![
                prop::collection::vec(1024u16..=u16::MAX, 0..200),
                (0u16..3000).prop_map(move |n| (0..n).map(|i| base.saturating_add(i)).collect()),
            ];
            // Session affinity: one generation recording every band, or one per band (a canary),
            // and up to three draining generations of any size, some of their bands gone.
            let draining = (0u8..SET_SLOTS, 0u32..7).prop_flat_map(move |(slot, k)| {
                let band = prop::option::of(prop::collection::vec(1024u16..=u16::MAX, per));
                prop::collection::vec(band, 1usize << k).prop_map(move |bands| DrainingRoute { slot, bands })
            });
            let record = prop_oneof![
                (0u8..SET_SLOTS).prop_map(move |s| vec![s; bands]),
                prop::collection::vec(0u8..SET_SLOTS, bands),
            ];
            let sessions = prop::option::of(
                (1u32..=86_400, record, prop::collection::vec(draining, 0..3))
                    .prop_map(|(timeout, record, draining)| Sessions { timeout, record, draining }),
            );
            (Just(app), Just(listen), ports, guarded, sessions)
        })
        .prop_map(|(app, listen, bands, guarded, sessions)| AppRoute {
            app,
            listen,
            bands,
            guarded,
            sessions,
        });
    prop::collection::vec(one, 0..4).prop_map(|mut v| {
        // One route per app, as the supervisor makes them.
        let mut seen = std::collections::BTreeSet::new();
        v.retain(|r| seen.insert(r.app.clone()));
        v
    })
}

/// What `iptables-save` would print for a rendered input: chains in its own order, `-I` as
/// `-A`, and in every rule the generic options moved to the front in its order (`-s` before
/// `-d`), which is exactly what differs from our rendering.
pub(crate) fn as_saved(render: &str) -> String {
    let mut out = String::new();
    for line in render.lines() {
        if let Some(rest) = line.strip_prefix("-I ") {
            let (chain, spec) = rest.split_once(" 1 ").unwrap();
            out.push_str(&format!("-A {chain} {}\n", reorder(spec)));
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let (chain, spec) = rest.split_once(' ').unwrap();
            out.push_str(&format!("-A {chain} {}\n", reorder(spec)));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn reorder(spec: &str) -> String {
    let toks: Vec<&str> = spec.split(' ').collect();
    let (mut front, mut rest) = (Vec::new(), Vec::new());
    let mut i = 0;
    while i < toks.len() {
        if matches!(toks[i], "-s" | "-d" | "-p") && i + 1 < toks.len() {
            front.push((toks[i], toks[i + 1]));
            i += 2;
        } else {
            rest.push(toks[i]);
            i += 1;
        }
    }
    front.sort_by_key(|(f, _)| ["-s", "-d", "-p"].iter().position(|x| x == f));
    front.iter().flat_map(|(f, v)| [*f, *v]).chain(rest).collect::<Vec<_>>().join(" ")
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn iptables_save_output_never_panics(text in prop_oneof![
        any::<String>(),
        prop::collection::vec(prop_oneof![
            Just("*nat".to_owned()), Just("*filter".to_owned()), Just("COMMIT".to_owned()),
            "(:|-A |-I )(IPCLUSTER|IPC-[a-z]{1,4}|PREROUTING|INPUT|OUTPUT)( [-!a-zA-Z0-9./:,\"]{0,12}){0,10}",
        ], 0..30).prop_map(|l| l.join("\n")),
    ]) {
        for family in Family::ALL {
            let t = Tables::parse(family, &text);
            let _ = t.routed_ports();
            let _ = routing::family_up_to_date(family, &t, &[]);
            let _ = routing::render(family, &t, &[]);
            let _ = routing::render_undo(family, &t, &[]);
        }
    }

    #[test]
    fn rendered_rules_read_back_as_up_to_date(routes in routes(), other in routes()) {
        rendered_rules_read_back(&routes, &other)?;
    }

    /// A canonical rule prints as a spec that parses back to itself. Specs are well-formed
    /// (every value follows a flag, as iptables-save prints them; a backslash in quotes is
    /// written escaped, or it would escape the closing quote); a stray value after a flag's
    /// values cannot be told from one more value, so no printer could keep it apart.
    #[test]
    fn canonical_rules_print_back_as_themselves(spec in
        "((! )?(-s|-d|-p|-i|--dport|-m|-j|-g|--to-ports|--ctstate|--comment)( ([a-zA-Z0-9.:/][a-zA-Z0-9.:/!]{0,7}|\"([ a-z!-]|\\\\\\\\){0,6}\")){0,2} ?){0,8}",
    ) {
        let rule = Rule::parse(&spec);
        prop_assert_eq!(Rule::parse(&rule.to_string()), rule.clone(), "{}", rule);
    }
}

/// Found by the property above from seed 2 at 50000 cases: its specs had a backslash right
/// before a closing quote, which escapes the quote (as a shell reads it), so the value ran on
/// and the spec was not the well-formed one drawn. The specs now write a backslash escaped.
#[test]
fn regression_a_backslash_before_the_closing_quote_escapes_it() {
    let r = Rule::parse(r#"-m comment --comment "a\" b" -j X"#);
    assert_eq!(r.to_string(), r#"-m comment --comment "a\" b" -j X"#);
    let r = Rule::parse(r#"-m comment --comment "a\\" -j X"#);
    assert_eq!(Rule::parse(&r.to_string()), r);
    let odd = Rule::parse(r#"-s! -m "\" " ! \ ""#);
    assert_ne!(Rule::parse(&odd.to_string()), odd, "a stray value: no printed form keeps it apart");
}

/// Found by `cargo xtask props --cases 10000 --seed 6816700798111251537`: a second target
/// after a match extension was kept among the match's options, printed before the real
/// target, and read back as the target. iptables refuses such a spec and iptables-save never
/// prints one, but a rule read from any text must print back as itself; the second target
/// is now one of the first's options.
#[test]
fn regression_a_second_target_after_a_match_prints_back_as_itself() {
    for spec in ["-s! -j . -s! -m A! -j 0", "-j 0 -m a! -s! -j A! -s"] {
        let rule = Rule::parse(spec);
        assert_eq!(Rule::parse(&rule.to_string()), rule, "{spec}");
        assert_eq!(
            rule.jumps_to(),
            Rule::parse(spec.split(" -m ").next().unwrap()).jumps_to(),
            "the first target"
        );
    }
}

/// What [`routing::render`] writes, as `iptables-save` prints it back, is up to date for
/// `routes` and routes exactly their live ports; `other` routes are up to date exactly when
/// they render the same rules, and otherwise the change to them can be applied and undone.
fn rendered_rules_read_back(routes: &[AppRoute], other: &[AppRoute]) -> Result<(), TestCaseError> {
    for family in Family::ALL {
        let text = routing::render(family, &Tables::default(), routes).unwrap();
        let saved = Tables::parse(family, &as_saved(&text));
        prop_assert!(routing::family_up_to_date(family, &saved, routes), "{text}");
        prop_assert_eq!(routing::render(family, &saved, routes).unwrap(), "");
        prop_assert_eq!(&saved, &Tables::after(family, routes));
        // The ports of `bands` for the entries this family serves.
        let ports = |r: &AppRoute, bands: Vec<&Vec<u16>>| -> Vec<u16> {
            bands
                .into_iter()
                .flat_map(|b| {
                    b.iter()
                        .zip(&r.listen)
                        .filter(|(_, l)| routing::served_by(family, l).is_some())
                        .map(|(p, _)| *p)
                })
                .collect()
        };
        let served = |r: &&AppRoute| !r.bands.is_empty();
        let live: BTreeSet<u16> =
            routes.iter().filter(served).flat_map(|r| ports(r, r.bands.iter().collect())).collect();
        let mut draining: BTreeMap<String, BTreeSet<u16>> = BTreeMap::new();
        for r in routes.iter().filter(served) {
            for d in r.sessions.iter().flat_map(|s| &s.draining) {
                let p = ports(r, d.bands.iter().flatten().collect());
                if !p.is_empty() {
                    draining.entry(routing::set_name(family, &r.app, d.slot)).or_default().extend(p);
                }
            }
        }
        prop_assert_eq!(saved.live_ports(), live.clone());
        prop_assert_eq!(saved.draining_ports(), draining.clone());
        prop_assert_eq!(
            saved.routed_ports(),
            live.into_iter().chain(draining.into_values().flatten()).collect::<BTreeSet<_>>()
        );
        // Every set the rules name is among those made first.
        let sets = routing::sets(family, routes);
        for r in saved.nat.rules.values().flatten() {
            for name in r.match_set().into_iter().chain(r.set_target()) {
                prop_assert!(sets.contains_key(name), "{name} is not made: {sets:?}");
            }
        }
        // Other routes: up to date exactly when they render the same rules.
        let same = routing::render(family, &Tables::default(), other).unwrap() == text;
        prop_assert_eq!(routing::family_up_to_date(family, &saved, other), same);
        if !same {
            // And there is something to change.
            let change = routing::render(family, &saved, other).unwrap();
            prop_assert!(!change.is_empty());
            // Which, once applied, can be undone: the nat table as it was.
            let changed = apply(family, &saved, &change);
            prop_assert!(routing::family_up_to_date(family, &changed, other), "{change}");
            if let Some(undo) = routing::render_undo(family, &saved, other) {
                let back = apply(family, &changed, &undo);
                prop_assert_eq!(&back.nat, &saved.nat, "{}", undo);
            } else {
                prop_assert_eq!(&changed.nat, &saved.nat);
            }
        }
    }
    let both = Existing::after(routes);
    prop_assert!(routing::up_to_date(&both, routes));
    let v4 = both.v4.routed_ports();
    prop_assert!(both.routed_ports().is_superset(&v4));
    Ok(())
}

/// Found by the property above (issue 20, one CI run in six before seeds were fixed): an
/// IPv4-only app guarding no port left, in the IPv6 filter table, an empty `IPCLUSTER` chain
/// and its jump, which then counted as up to date for no routes at all.
#[test]
fn regression_an_ipv4_only_route_guarding_nothing_then_no_routes() {
    let bands: Vec<Vec<u16>> =
        (0..64u16).map(|b| vec![if b % 2 == 0 || b == 63 { 1024 } else { 1231 + (b / 2) * 2021 }]).collect();
    assert_eq!(bands.iter().filter(|p| p[0] == 1024).count(), 33);
    let routes = [AppRoute {
        app: AppName::new("api3").unwrap(),
        listen: vec!["23.125.93.105:4717".parse().unwrap()],
        bands,
        guarded: vec![],
        sessions: None,
    }];
    rendered_rules_read_back(&routes, &[]).unwrap();
}

/// What `family`'s tables hold after `input` (a `--noflush` restore input) is applied to the
/// tables `t` describes, as ip(6)tables-restore would: declared chains flushed, rules
/// appended or inserted, chains and rules deleted.
fn apply(family: Family, t: &Tables, input: &str) -> Tables {
    // Rebuild a save of `t`, then edit it line by line.
    // Per table: its chains, and each chain's rules as text.
    type Chains = (std::collections::BTreeSet<String>, BTreeMap<String, Vec<String>>);
    let mut tables: BTreeMap<&str, Chains> = BTreeMap::new();
    for (name, table, hooks, jump) in [
        ("nat", &t.nat, &["PREROUTING", "OUTPUT"][..], routing::JUMP),
        ("filter", &t.filter, &["INPUT"][..], family.guard_jump()),
    ] {
        let (chains, rules) = tables.entry(name).or_default();
        chains.extend(table.chains.iter().cloned());
        chains.extend(table.foreign.keys().cloned());
        for (c, rs) in &table.rules {
            rules.insert(c.clone(), rs.iter().map(ToString::to_string).collect());
        }
        for h in hooks {
            if table.hooks.contains(*h) {
                rules.entry((*h).to_owned()).or_default().push(jump.to_owned());
            }
        }
        // Another tool's chain keeps its rule count (their content does not matter here).
        for (c, n) in &table.foreign {
            rules.insert(c.clone(), vec!["-j RETURN".to_owned(); *n]);
        }
    }
    let mut current = "";
    for line in input.lines() {
        if let Some(name) = line.strip_prefix('*') {
            current = if name == "nat" { "nat" } else { "filter" };
            continue;
        }
        let (chains, rules) = tables.entry(current).or_default();
        if let Some(decl) = line.strip_prefix(':') {
            let chain = decl.split(' ').next().unwrap().to_owned();
            chains.insert(chain.clone());
            rules.insert(chain, Vec::new());
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let (c, spec) = rest.split_once(' ').unwrap();
            rules.entry(c.to_owned()).or_default().push(spec.to_owned());
        } else if let Some(rest) = line.strip_prefix("-I ") {
            let (c, spec) = rest.split_once(" 1 ").unwrap();
            rules.entry(c.to_owned()).or_default().insert(0, spec.to_owned());
        } else if let Some(rest) = line.strip_prefix("-D ") {
            let (c, spec) = rest.split_once(' ').unwrap();
            let list = rules.entry(c.to_owned()).or_default();
            let pos = list
                .iter()
                .position(|r| Rule::parse(r) == Rule::parse(spec))
                .expect("-D of a rule that exists");
            list.remove(pos);
        } else if let Some(c) = line.strip_prefix("-X ") {
            assert!(rules.get(c).is_none_or(Vec::is_empty), "-X of a chain with rules: {c}");
            chains.remove(c);
            rules.remove(c);
        }
    }
    let mut save = String::new();
    for (name, (chains, rules)) in &tables {
        save.push_str(&format!("*{name}\n"));
        for c in chains {
            save.push_str(&format!(":{c} - [0:0]\n"));
        }
        for (c, rs) in rules {
            for r in rs {
                save.push_str(&format!("-A {c} {r}\n"));
            }
        }
        save.push_str("COMMIT\n");
    }
    Tables::parse(family, &save)
}
