//! Property tests of every parser in this crate that reads text from outside: app files, the
//! daemon's file, the units inside them, `iptables-save` output and the saved state. Each runs
//! a bounded number of cases (a few seconds in all, as ordinary `#[test]`s of
//! `cargo xtask test`) and writes no persistence files.
//!
//! Properties: no input makes a parser panic; errors are well-formed (the `file:line:column: `
//! prefix where the input has lines, bounded length, no raw control characters); valid inputs
//! mean what they say, and what a renderer writes parses back to what it rendered.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use proptest::{prelude::*, test_runner::Config};

use crate::{
    config::{AppConfig, DaemonConfig, MAX_MESSAGE},
    model::GenState,
    name::AppName,
    routing::{self, AppRoute, Existing, Family, Rule, Tables},
    saved::{SavedApp, SavedGeneration, SavedState},
    units::{self, MAX_DURATION, MAX_SIZE, Signal},
};

/// `cases` cases, and no failure persistence file (it would be written beside the sources).
fn config(cases: u32) -> Config {
    Config { cases, failure_persistence: None, ..Config::default() }
}

const FILE: &str = "/etc/ipcluster/apps/chat.toml";

/// The checks every configuration error must pass.
fn well_formed(e: &crate::config::ConfigError, file: &str, text: &str) -> Result<(), TestCaseError> {
    let shown = e.to_string();
    let prefix = match e.location {
        Some((line, col)) => {
            prop_assert!(line >= 1 && col >= 1 && line <= text.lines().count() + 1, "{e:?}");
            format!("{file}:{line}:{col}: ")
        }
        None => format!("{file}: "),
    };
    prop_assert!(shown.starts_with(&prefix), "{shown}");
    prop_assert!(!shown.chars().any(char::is_control), "{shown:?}");
    prop_assert!(e.message.chars().count() <= MAX_MESSAGE + 1, "{} chars", e.message.chars().count());
    prop_assert!(e.key.as_ref().is_none_or(|k| k.chars().count() <= 65), "{:?}", e.key);
    Ok(())
}

/// Text that looks like an app file: known and unknown keys with values of every TOML shape,
/// some valid, most not, with control characters and long strings mixed in.
fn toml_like() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        proptest::sample::select([&crate::config::KEYS[..], &crate::config::DAEMON_KEYS[..]].concat())
            .prop_map(str::to_owned),
        "[a-z_]{1,12}",
        "\"[\\x00-\\x7f]{0,8}\"",
    ];
    let value = prop_oneof![
        "\"[0-9a-zA-Z:./ _-]{0,20}\"",
        "\"[0-9]{1,12}(us|ms|s|min|h|d|K|M|G|T)?\"",
        "\"[0-9]{1,5}-[0-9]{1,5}\"",
        "\"\\[?[0-9a-f.:]{0,20}\\]?:[0-9]{0,6}\"",
        "\"[0-9]{1,3}/[0-9]{1,3}(s|min)\"",
        "\"(SIG)?(TERM|INT|HUP|FOO)\"",
        "-?[0-9]{1,20}",
        "(true|false)",
        "\\[(\"[^\"\\\\]{0,10}\", ?){0,3}\\]",
        "\"\\\\u00[01][0-9a-f]\"",
        "\\{ ?[A-Z]{1,4} = \"[a-z]{0,4}\" ?\\}",
        any::<String>().prop_map(|s| format!("{s:?}")),
    ];
    let line = prop_oneof![
        8 => (key, value).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => any::<String>(),
        1 => Just("[table]".to_owned()),
    ];
    prop::collection::vec(line, 0..12).prop_map(|lines| lines.join("\n"))
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn app_files_never_panic_and_errors_are_well_formed(text in toml_like()) {
        if let Err(e) = AppConfig::parse(FILE, "chat", &text) {
            well_formed(&e, FILE, &text)?;
        }
    }

    #[test]
    fn arbitrary_text_as_an_app_file(text in any::<String>()) {
        if let Err(e) = AppConfig::parse(FILE, "chat", &text) {
            well_formed(&e, FILE, &text)?;
        }
    }

    #[test]
    fn the_daemons_file_never_panics(text in toml_like()) {
        let file = "/etc/ipcluster/ipclusterd.toml";
        match DaemonConfig::parse(file, &text) {
            Ok(c) => {
                prop_assert!(c.sample_interval >= Duration::from_millis(100) && c.sample_interval <= MAX_DURATION);
                prop_assert!(c.metrics_listen.is_none_or(|a| a.port() != 0));
            }
            Err(e) => well_formed(&e, file, &text)?,
        }
    }

    #[test]
    fn units_never_panic_and_say_why_briefly(s in prop_oneof![any::<String>(), "[0-9 ]{0,30}[a-zA-Z]{0,3}[-/]?[0-9a-z ]{0,10}"]) {
        let errors = [
            units::parse_duration(&s).map(|d| assert!(d <= MAX_DURATION)).err(),
            units::parse_size(&s).map(|n| assert!(n <= MAX_SIZE)).err(),
            units::parse_rate(&s).map(|(n, d)| assert!(n >= 1 && !d.is_zero() && d <= MAX_DURATION)).err(),
            units::parse_duration_range(&s).map(|(a, b)| assert!(!a.is_zero() && a <= b && b <= MAX_DURATION)).err(),
            units::parse_port_range(&s).map(|(a, b)| assert!(1024 <= a && a <= b)).err(),
            Signal::parse(&s).map(|_| ()).err(),
            crate::ports::parse_ephemeral(&s).map(|(a, b)| assert!(a <= b)).err(),
        ];
        for e in errors.into_iter().flatten() {
            prop_assert!(e.chars().count() < 400, "{e}");
            prop_assert!(!e.chars().any(char::is_control), "{e:?}");
        }
    }
}

/// A duration written in parts of random units.
fn duration_parts() -> impl Strategy<Value = Vec<(u64, &'static str)>> {
    let unit = proptest::sample::select(vec!["us", "ms", "s", "sec", "m", "min", "h", "hr", "d"]);
    prop::collection::vec((0u64..400, unit), 1..4)
}

fn unit_value(n: u64, unit: &str) -> Duration {
    match unit {
        "us" => Duration::from_micros(n),
        "ms" => Duration::from_millis(n),
        "s" | "sec" => Duration::from_secs(n),
        "m" | "min" => Duration::from_secs(n * 60),
        "h" | "hr" => Duration::from_secs(n * 3600),
        _ => Duration::from_secs(n * 86400),
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn durations_mean_what_they_say(parts in duration_parts(), spaced in any::<bool>()) {
        let text = parts.iter().map(|(n, u)| format!("{n}{u}")).collect::<Vec<_>>().join(if spaced { " " } else { "" });
        let want: Duration = parts.iter().map(|(n, u)| unit_value(*n, u)).sum();
        match units::parse_duration(&text) {
            Ok(d) => prop_assert_eq!(d, want),
            Err(e) => {
                prop_assert!(want > MAX_DURATION, "{text}: {e}");
                prop_assert!(e.contains("365d"), "{e}");
            }
        }
    }

    #[test]
    fn sizes_rates_ranges_and_signals_round_trip(
        n in 0u64..5000, shift in 0usize..5, count in 1u32..2_000_000, lo in 0u16..=u16::MAX, hi in 0u16..=u16::MAX,
        sig in proptest::sample::select(vec!["HUP", "INT", "QUIT", "KILL", "USR1", "USR2", "ALRM", "TERM", "CONT", "WINCH"]),
    ) {
        let unit = ["", "K", "M", "G", "T"][shift];
        let size = n << (10 * shift);
        prop_assert_eq!(units::parse_size(&format!("{n}{unit}")).ok(), (size <= MAX_SIZE).then_some(size));
        let rate = units::parse_rate(&format!("{count}/2min")).ok();
        prop_assert_eq!(rate, (count <= units::MAX_RATE).then_some((count, Duration::from_secs(120))));
        let range = units::parse_port_range(&format!("{lo}-{hi}")).ok();
        prop_assert_eq!(range, (1024 <= lo && lo <= hi).then_some((lo, hi)));
        let s = Signal::parse(sig).unwrap();
        prop_assert_eq!(Signal::parse(s.name()), Ok(s));
        prop_assert_eq!(Signal::describe(s.number()), s.name());
    }
}

/// A valid app and the file that says it.
fn valid_app() -> impl Strategy<Value = (String, u32, Vec<SocketAddrV4>, Duration, Duration, Option<u64>)> {
    let listen = prop::collection::btree_set(1u16..20000, 1..5).prop_flat_map(|ports| {
        let n = ports.len();
        (Just(ports), prop::collection::vec(prop_oneof![Just([0u8, 0, 0, 0]), any::<[u8; 4]>()], n))
    });
    (0u32..=10, listen, duration_parts(), duration_parts(), prop::option::of(1u64..(1 << 40))).prop_map(
        |(k, (ports, ips), ready, stop, mem)| {
            let listen: Vec<SocketAddrV4> =
                ports.iter().zip(&ips).map(|(p, ip)| SocketAddrV4::new((*ip).into(), *p)).collect();
            let show = |parts: &[(u64, &str)]| {
                parts.iter().map(|(n, u)| format!("{n}{u}")).collect::<Vec<_>>().join(" ")
            };
            let sum = |parts: &[(u64, &str)]| parts.iter().map(|(n, u)| unit_value(*n, u)).sum::<Duration>();
            let mut text = format!(
                "command = [\"/usr/bin/srv\", \"--x\"]\nworkers = {}\nlisten = [{}]\nstop_timeout = \"{}\"\n",
                1u32 << k,
                listen.iter().map(|l| format!("\"{l}\"")).collect::<Vec<_>>().join(", "),
                show(&stop),
            );
            let ready_timeout = sum(&ready);
            if !ready_timeout.is_zero() {
                text.push_str(&format!("ready_timeout = \"{}\"\n", show(&ready)));
            }
            if let Some(m) = mem {
                text.push_str(&format!("worker_memory_max = \"{m}\"\n"));
            }
            (
                text,
                1u32 << k,
                listen,
                if ready_timeout.is_zero() { crate::config::defaults::READY_TIMEOUT } else { ready_timeout },
                sum(&stop),
                mem,
            )
        },
    )
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn valid_app_files_mean_what_they_say((text, workers, listen, ready, stop, mem) in valid_app()) {
        let fits = ready >= Duration::from_millis(1)
            && ready <= MAX_DURATION && stop <= MAX_DURATION
            && 2 * workers as usize * listen.len() <= 10_000
            && !listen.iter().any(|l| (20000..=29999).contains(&l.port()));
        // Distinct ports, so no two entries overlap, whatever their addresses.
        match AppConfig::parse(FILE, "chat", &text) {
            Ok(c) => {
                prop_assert!(fits, "{text}");
                prop_assert_eq!(c.workers, workers);
                prop_assert_eq!(c.listen, listen.iter().map(|l| std::net::SocketAddr::V4(*l)).collect::<Vec<_>>());
                prop_assert_eq!((c.ready_timeout, c.stop_timeout), (ready, stop));
                prop_assert_eq!(c.worker_memory_max, mem);
            }
            Err(e) => {
                prop_assert!(!fits, "{text}\n{e}");
                well_formed(&e, FILE, &text)?;
            }
        }
    }
}

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

/// Routes of every shape a supervisor can produce, and some it cannot.
fn routes() -> impl Strategy<Value = Vec<AppRoute>> {
    let app = (proptest::sample::select(vec!["web", "api", "chat", "x1", "long_name_here"]), 0u8..4)
        .prop_map(|(n, i)| AppName::new(&format!("{n}{i}")).unwrap());
    let one = (app, prop::collection::vec((listen_ip(), 1u16..=u16::MAX), 1..4), 0u32..7, 1024u16..=u16::MAX)
        .prop_flat_map(|(app, listen, k, base)| {
            let listen: Vec<SocketAddr> = listen.into_iter().map(SocketAddr::from).collect();
            let (bands, per) = (1usize << k, listen.len());
            let ports = prop::collection::vec(prop::collection::vec(1024u16..=u16::MAX, per), bands);
            let guarded = prop_oneof![
                prop::collection::vec(1024u16..=u16::MAX, 0..200),
                (0u16..3000).prop_map(move |n| (0..n).map(|i| base.saturating_add(i)).collect()),
            ];
            (Just(app), Just(listen), ports, guarded)
        })
        .prop_map(|(app, listen, bands, guarded)| AppRoute { app, listen, bands, guarded });
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
fn as_saved(render: &str) -> String {
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
        for family in Family::ALL {
            let text = routing::render(family, &Tables::default(), &routes).unwrap();
            let saved = Tables::parse(family, &as_saved(&text));
            prop_assert!(routing::family_up_to_date(family, &saved, &routes), "{text}");
            prop_assert_eq!(routing::render(family, &saved, &routes).unwrap(), "");
            prop_assert_eq!(&saved, &Tables::after(family, &routes));
            let live: std::collections::BTreeSet<u16> = routes
                .iter()
                .flat_map(|r| {
                    r.bands.iter().flat_map(|b| {
                        b.iter()
                            .zip(&r.listen)
                            .filter(|(_, l)| routing::served_by(family, l).is_some())
                            .map(|(p, _)| *p)
                    })
                })
                .collect();
            prop_assert_eq!(saved.routed_ports(), live);
            // Other routes: up to date exactly when they render the same rules.
            let same = routing::render(family, &Tables::default(), &other).unwrap() == text;
            prop_assert_eq!(routing::family_up_to_date(family, &saved, &other), same);
            if !same {
                // And there is something to change.
                let change = routing::render(family, &saved, &other).unwrap();
                prop_assert!(!change.is_empty());
                // Which, once applied, can be undone: the nat table as it was.
                let changed = apply(family, &saved, &change);
                prop_assert!(routing::family_up_to_date(family, &changed, &other), "{change}");
                if let Some(undo) = routing::render_undo(family, &saved, &other) {
                    let back = apply(family, &changed, &undo);
                    prop_assert_eq!(&back.nat, &saved.nat, "{}", undo);
                } else {
                    prop_assert_eq!(&changed.nat, &saved.nat);
                }
            }
        }
        let both = Existing::after(&routes);
        prop_assert!(routing::up_to_date(&both, &routes));
        let v4 = both.v4.routed_ports();
        prop_assert!(both.routed_ports().is_superset(&v4));
    }

    /// A canonical rule prints as a spec that parses back to itself. Specs are well-formed
    /// (every value follows a flag, as iptables-save prints them); a stray value after a
    /// flag's values cannot be told from one more value, so no printer could keep it apart.
    #[test]
    fn canonical_rules_print_back_as_themselves(spec in
        "((! )?(-s|-d|-p|-i|--dport|-m|-j|-g|--to-ports|--ctstate|--comment)( ([a-zA-Z0-9.:/][a-zA-Z0-9.:/!]{0,7}|\"[ a-z!\\\\-]{0,6}\")){0,2} ?){0,8}",
    ) {
        let rule = Rule::parse(&spec);
        prop_assert_eq!(Rule::parse(&rule.to_string()), rule.clone(), "{}", rule);
    }
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

fn saved_state() -> impl Strategy<Value = SavedState> {
    let name = "[a-z][a-z0-9_]{0,23}".prop_map(|n| AppName::new(&n).unwrap());
    let state = proptest::sample::select(vec![
        GenState::Starting,
        GenState::Live,
        GenState::Retired,
        GenState::Failed,
        GenState::Stopped,
    ]);
    let worker =
        (any::<u32>(), any::<u64>(), any::<u32>(), prop::collection::vec(any::<u16>(), 0..3)).prop_map(
            |(pid, start_usec, band, ports)| crate::saved::SavedWorker { pid, start_usec, band, ports },
        );
    let generation = (
        (
            state,
            any::<u64>(),
            prop::option::of(any::<u64>()),
            any::<u32>(),
            prop::collection::vec(any::<SocketAddrV4>(), 0..3),
        ),
        (
            prop::collection::vec(".{0,8}", 0..3),
            prop::collection::btree_map("[A-Z]{1,4}", ".{0,8}", 0..3),
            prop::option::of("[a-z]{1,8}"),
            prop::option::of(any::<(u16, u16)>()),
            prop::collection::vec(worker, 0..3),
        ),
    )
        .prop_map(
            |(
                (state, started_usec, retired_usec, workers, listen),
                (command, environment, user, port_range, processes),
            )| {
                SavedGeneration {
                    state,
                    started_usec,
                    retired_usec,
                    workers,
                    listen: listen.into_iter().map(std::net::SocketAddr::V4).collect(),
                    routing: None,
                    command,
                    environment,
                    user,
                    working_directory: Some("/srv".into()),
                    port_range,
                    processes,
                }
            },
        );
    let app = (
        prop::collection::btree_map(any::<u64>(), generation, 0..3),
        prop::collection::btree_map(any::<u32>(), any::<u64>(), 0..3),
        any::<bool>(),
    )
        .prop_map(|(generations, backoff_ms, stopped)| SavedApp { generations, backoff_ms, stopped });
    (
        prop::collection::btree_map(name.clone(), any::<u64>(), 0..3),
        prop::collection::btree_map(name, app, 0..3),
    )
        .prop_map(|(last_generation, apps): (BTreeMap<_, _>, BTreeMap<_, _>)| SavedState {
            last_generation,
            apps,
        })
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn the_saved_state_never_panics_on_arbitrary_bytes(bytes in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        "[\\[\\]{}\":,0-9a-z ]{0,200}".prop_map(String::into_bytes),
        (0usize..5000).prop_map(|n| "[".repeat(n).into_bytes()),
    ]) {
        let _ = serde_json::from_slice::<SavedState>(&bytes);
    }

    #[test]
    fn the_saved_state_round_trips(s in saved_state()) {
        let json = serde_json::to_vec_pretty(&s).unwrap();
        prop_assert_eq!(serde_json::from_slice::<SavedState>(&json).unwrap(), s);
    }
}
