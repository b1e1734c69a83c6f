//! Property tests of app files and the daemon's file beyond those of [`crate::props`]: files
//! with every key (the health checks, `ready = "http"`, `session_affinity`, `max_draining`),
//! mostly valid, and near misses of them. Whatever is accepted keeps the documented invariants
//! and renders back ([`render`]) as a file that parses to the same config; whatever is refused
//! gets a well-formed error.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use proptest::prelude::*;

use super::{
    AppConfig, DaemonConfig, MAX_ARG_LEN, MAX_ARGS, MAX_LISTEN, MAX_WORKERS, OVERRIDE_KEYS, Overrides, Ready,
    Routing, defaults,
    health::{self, HealthCheck},
};
use crate::{
    prop_config::{config, mutated},
    props::{FILE, show_duration, show_size, well_formed},
    units::{MAX_DURATION, MAX_RATE, MAX_SIZE, Signal},
};

/// `c` as an app file that says every key (the parser's defaults written out).
fn render(c: &AppConfig) -> String {
    use toml::Value;
    let s = |v: &str| Value::String(v.to_owned());
    let d = |d: Duration| Value::String(show_duration(d));
    let mut t = toml::Table::new();
    t.insert("command".into(), Value::Array(c.command.iter().map(|a| s(a)).collect()));
    t.insert("workers".into(), Value::Integer(c.workers.into()));
    t.insert("listen".into(), Value::Array(c.listen.iter().map(|l| s(&l.to_string())).collect()));
    t.insert("routing".into(), s(c.routing.as_str()));
    t.insert("port_range".into(), s(&format!("{}-{}", c.port_range.0, c.port_range.1)));
    let ready = match c.ready {
        Ready::Tcp => "tcp",
        Ready::Notify => "notify",
        Ready::Http => "http",
    };
    t.insert("ready".into(), s(ready));
    t.insert("ready_timeout".into(), d(c.ready_timeout));
    let dir = c.working_directory.to_str().expect("a directory read from a file is UTF-8");
    t.insert("working_directory".into(), s(dir));
    if let Some(u) = &c.user {
        t.insert("user".into(), s(u));
    }
    let env = c.environment.iter().map(|(k, v)| (k.clone(), s(v))).collect();
    t.insert("environment".into(), Value::Table(env));
    t.insert("stop_signal".into(), s(c.stop_signal.name()));
    t.insert("stop_timeout".into(), d(c.stop_timeout));
    if let Some(sig) = c.retire_signal {
        t.insert("retire_signal".into(), s(sig.name()));
    }
    t.insert("retire_nice".into(), Value::Integer(c.retire_nice.into()));
    t.insert("autostart".into(), Value::Boolean(c.autostart));
    for (key, size) in
        [("worker_memory_max", c.worker_memory_max), ("cluster_memory_max", c.cluster_memory_max)]
    {
        if let Some(n) = size {
            t.insert(key.into(), s(&show_size(n)));
        }
    }
    t.insert("retire_rate".into(), s(&format!("{}/{}", c.retire_rate.0, show_duration(c.retire_rate.1))));
    for (key, v) in [("retire_timeout", c.retire_timeout), ("watchdog", c.watchdog)] {
        if let Some(v) = v {
            t.insert(key.into(), d(v));
        }
    }
    t.insert("reap_interval".into(), d(c.reap_interval));
    t.insert("spawn_interval".into(), d(c.spawn_interval));
    let (lo, hi) = c.restart_backoff;
    t.insert("restart_backoff".into(), s(&format!("{}-{}", show_duration(lo), show_duration(hi))));
    t.insert("session_affinity".into(), d(c.session_affinity.unwrap_or_default()));
    t.insert("max_draining".into(), Value::Integer(c.max_draining.into()));
    if let Some(h) = &c.health {
        t.insert("health_path".into(), s(&h.path));
        t.insert("health_interval".into(), d(h.interval));
        t.insert("health_timeout".into(), d(h.timeout));
        t.insert("health_failures".into(), Value::Integer(h.failures.into()));
    }
    toml::to_string(&t).expect("a table of plain values renders")
}

/// The daemon's file that says `c`.
fn render_daemon(c: &DaemonConfig) -> String {
    let mut text = format!("sample_interval = \"{}\"\n", show_duration(c.sample_interval));
    if let Some(a) = c.metrics_listen {
        text.push_str(&format!("metrics_listen = \"{a}\"\n"));
    }
    text
}

/// The invariants the reference (docs/config.md) and the parser's doc promise of every accepted
/// app.
fn keeps_the_invariants(c: &AppConfig) -> Result<(), TestCaseError> {
    let whole_us = |d: Duration| d <= MAX_DURATION && d == Duration::from_micros(d.as_micros() as u64);
    prop_assert_eq!(c.name.as_str(), "chat");
    prop_assert!(!c.command.is_empty() && !c.command[0].is_empty() && c.command.len() <= MAX_ARGS);
    prop_assert!(c.command.iter().all(|a| a.len() <= MAX_ARG_LEN && !a.contains('\0')));
    prop_assert!(c.workers.is_power_of_two() && c.workers <= MAX_WORKERS);
    prop_assert!(!c.listen.is_empty() && c.listen.len() <= MAX_LISTEN);
    let (lo, hi) = c.port_range;
    prop_assert!(1024 <= lo && lo <= hi);
    for (i, a) in c.listen.iter().enumerate() {
        prop_assert!(a.port() != 0 && !(lo..=hi).contains(&a.port()), "{a}");
        for b in &c.listen[..i] {
            let (x, y) = (a.ip().to_canonical(), b.ip().to_canonical());
            let overlap = a.port() == b.port() && (x == y || x.is_unspecified() || y.is_unspecified());
            prop_assert!(!overlap, "{a} overlaps {b}");
        }
    }
    prop_assert!(c.ready_timeout >= Duration::from_millis(1));
    for d in [c.ready_timeout, c.stop_timeout, c.reap_interval, c.spawn_interval, c.retire_rate.1] {
        prop_assert!(whole_us(d), "{d:?}");
    }
    prop_assert!(c.working_directory.is_absolute());
    let user_ok = |u: &String| {
        u.len() <= 32
            && u.starts_with(|ch: char| ch.is_ascii_lowercase() || ch == '_')
            && u.chars().all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_' || ch == '-')
    };
    prop_assert!(c.user.as_ref().is_none_or(user_ok), "{:?}", c.user);
    for (k, v) in &c.environment {
        prop_assert!(!k.is_empty() && k.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_'), "{k}");
        prop_assert!(!k.starts_with(|ch: char| ch.is_ascii_digit()) && k != "PORT", "{k}");
        prop_assert!(!k.starts_with("IPCLUSTER_") && !v.contains('\0'), "{k}");
    }
    prop_assert!((0..=19).contains(&c.retire_nice));
    for n in [c.worker_memory_max, c.cluster_memory_max].into_iter().flatten() {
        prop_assert!(n > 0 && n <= MAX_SIZE);
    }
    prop_assert!((1..=MAX_RATE).contains(&c.retire_rate.0) && !c.retire_rate.1.is_zero());
    for d in [c.retire_timeout, c.watchdog].into_iter().flatten() {
        prop_assert!(!d.is_zero() && whole_us(d));
    }
    prop_assert!(c.watchdog.is_none() || c.ready.notifies(c.routing), "a watchdog needs READY=1");
    let (a, b) = c.restart_backoff;
    prop_assert!(!a.is_zero() && a <= b && whole_us(a) && whole_us(b));
    if let Some(s) = c.session_affinity {
        prop_assert!(
            s >= Duration::from_secs(1) && s <= defaults::MAX_SESSION_AFFINITY && s.subsec_nanos() == 0
        );
    }
    prop_assert!((1..=defaults::MAX_DRAINING_LIMIT).contains(&c.max_draining));
    prop_assert!(c.routing != Routing::Socket || c.ready != Ready::Tcp);
    prop_assert!(c.ready != Ready::Http || c.health.is_some(), "ready = http needs a health_path");
    if let Some(HealthCheck { path, interval, timeout, failures }) = &c.health {
        prop_assert_eq!(health::check_path(path), Ok(path.clone()));
        prop_assert!(*interval >= health::MIN_INTERVAL && whole_us(*interval));
        prop_assert!(*timeout >= health::MIN_INTERVAL && timeout <= interval);
        prop_assert!((1..=health::MAX_FAILURES).contains(failures));
        if c.routing == Routing::Socket {
            let takes_ipv4 = match c.listen[0] {
                SocketAddr::V4(_) => true,
                SocketAddr::V6(a) => a.ip().is_unspecified(),
            };
            prop_assert!(takes_ipv4, "{}", c.listen[0]);
        }
    }
    if c.routing == Routing::Nat {
        let needed = u64::from(c.generations_held()) * u64::from(c.workers) * c.listen.len() as u64;
        prop_assert!(u64::from(hi - lo) + 1 >= needed, "{needed} worker ports in {lo}-{hi}");
    }
    Ok(())
}

/// A duration as text: `lo..hi` milliseconds mostly, now and then anything up to past the
/// longest accepted, or text that is nearly one.
fn duration_text(lo: u64, hi: u64) -> impl Strategy<Value = String> {
    prop_oneof![
        16 => (lo..hi).prop_map(|ms| show_duration(Duration::from_millis(ms))),
        1 => (0u64..=MAX_DURATION.as_micros() as u64 + 2).prop_map(|us| show_duration(Duration::from_micros(us))),
        1 => "[0-9]{1,4}(us|ms|s|sec|m|min|h|hr|d|x)?( [0-9]{1,3}(ms|s))?",
    ]
}

/// A TOML string.
fn quoted(s: impl Strategy<Value = String>) -> impl Strategy<Value = String> {
    s.prop_map(|s| toml::Value::String(s).to_string())
}

/// One of `names`, as a TOML string.
fn one_of(names: &[&'static str]) -> impl Strategy<Value = String> + use<> {
    prop::sample::select(names.to_vec()).prop_map(|s| toml::Value::String(s.to_owned()).to_string())
}

/// One `listen` entry: either family, wildcards, IPv4-mapped; ports mostly below the worker
/// ports, a few shared (so entries overlap), some anywhere; now and then no address at all.
fn listen_entry() -> impl Strategy<Value = String> {
    let ip = prop_oneof![
        Just(IpAddr::from([0u8; 4])),
        Just(IpAddr::from([0u16; 8])),
        any::<[u8; 4]>().prop_map(IpAddr::from),
        any::<[u8; 16]>().prop_map(IpAddr::from),
        any::<[u8; 4]>().prop_map(|a| IpAddr::V6(std::net::Ipv4Addr::from(a).to_ipv6_mapped())),
    ];
    let port = prop_oneof![
        4 => 1u16..1024,
        2 => prop::sample::select(vec![80u16, 443, 8080]),
        1 => any::<u16>(),
    ];
    prop_oneof![
        30 => (ip, port).prop_map(|(ip, port)| SocketAddr::new(ip, port).to_string()),
        1 => "[0-9a-f:.\\[\\]]{0,24}",
    ]
}

/// A value of `key` as TOML text, valid nine times in ten.
fn value(key: &'static str) -> BoxedStrategy<String> {
    let int = |valid: Vec<i64>, invalid: Vec<i64>| {
        prop_oneof![9 => prop::sample::select(valid), 1 => prop::sample::select(invalid)]
            .prop_map(|n| n.to_string())
            .boxed()
    };
    let signals = ["SIGTERM", "INT", "HUP", "USR1", "SIGUSR2", "KILL", "WINCH", "QUIT", "ALRM", "CONT"];
    let either = |valid: BoxedStrategy<String>, invalid: BoxedStrategy<String>| {
        prop_oneof![9 => valid, 1 => invalid].boxed()
    };
    let duration = |lo: u64, hi: u64| duration_text(lo, hi).prop_map(|d| format!("\"{d}\"")).boxed();
    match key {
        "command" => prop::collection::vec(quoted("[ -~]{0,12}"), 0..4)
            .prop_map(|a| format!("[\"/usr/bin/srv\"{}]", a.iter().map(|a| format!(", {a}")).collect::<String>()))
            .boxed(),
        "workers" => int(vec![1, 2, 4, 8, 16, 1, 2, 4, 8, 16, 64, 1024], vec![0, 3, -4, 2048]),
        "listen" => prop::collection::vec(quoted(listen_entry()), 1..4).prop_map(|l| format!("[{}]", l.join(", "))).boxed(),
        "routing" => either(one_of(&["nat", "socket"]).boxed(), one_of(&["NAT", "", "bpf"]).boxed()),
        "ready" => either(one_of(&["tcp", "notify", "http"]).boxed(), one_of(&["udp", "HTTP"]).boxed()),
        "port_range" => (prop_oneof![9 => 1024u16..50000, 1 => 0u16..1024], 0u16..16000)
            .prop_map(|(lo, n)| format!("\"{lo}-{}\"", lo.saturating_add(n)))
            .boxed(),
        "working_directory" => either(one_of(&["/srv", "/", "/srv/my app"]).boxed(), one_of(&["srv", ""]).boxed()),
        "user" => either(one_of(&["www-data", "_svc", "u1"]).boxed(), one_of(&["Root", "-x", ""]).boxed()),
        "environment" => {
            let name = prop_oneof![9 => "[A-Za-z_][A-Za-z0-9_]{0,6}", 1 => "PORT|IPCLUSTER_X|LISTEN_FDS|1X|A-B"];
            prop::collection::btree_map(name, "[ -~]{0,8}", 0..4)
                .prop_map(|env| {
                    let pairs: Vec<String> =
                        env.iter().map(|(k, v)| format!("{k:?} = {}", toml::Value::String(v.clone()))).collect();
                    format!("{{ {} }}", pairs.join(", "))
                })
                .boxed()
        }
        "stop_signal" | "retire_signal" => either(one_of(&signals).boxed(), one_of(&["FOO", "sigterm", "SIG"]).boxed()),
        "retire_nice" => int((0..=19).collect(), vec![-1, 20]),
        "autostart" => any::<bool>().prop_map(|b| b.to_string()).boxed(),
        "worker_memory_max" | "cluster_memory_max" => prop_oneof![
            9 => (1u64..=2048, 0u32..5).prop_map(|(n, s)| show_size(n << (10 * s))),
            1 => (0u64..=MAX_SIZE + 1).prop_map(|n| n.to_string()),
        ]
        .prop_map(|s| format!("\"{s}\""))
        .boxed(),
        "retire_rate" => (prop_oneof![9 => 1u32..=MAX_RATE, 1 => Just(0)], duration_text(1, 600_000))
            .prop_map(|(n, d)| format!("\"{n}/{d}\""))
            .boxed(),
        "restart_backoff" => (duration_text(1, 1000), duration_text(1000, 60_000))
            .prop_map(|(a, b)| format!("\"{a}-{b}\""))
            .boxed(),
        "session_affinity" => prop_oneof![
            1 => Just("\"0\"".to_owned()),
            9 => (0u64..=90_000_000).prop_map(|ms| format!("\"{}\"", show_duration(Duration::from_millis(ms)))),
        ]
        .boxed(),
        "max_draining" => int(vec![1, 2, 3, 6], vec![0, 7]),
        "health_failures" => int(vec![1, 2, 3, 100], vec![0, 101]),
        "health_path" => either(
            prop_oneof![one_of(&["/healthz", "/", "/h?deep=1&x=%20"]), quoted("/[!-~]{0,300}")].boxed(),
            one_of(&["healthz", "/a b", "/é", "/x\r\nHost: evil", "/\t"]).boxed(),
        ),
        "health_interval" => duration(2000, 30_000),
        "health_timeout" => duration(100, 2000),
        "ready_timeout" => duration(1, 60_000),
        // stop_timeout, retire_timeout, reap_interval, spawn_interval, watchdog.
        _ => duration(0, 60_000),
    }
}

/// A line `key = value`.
fn line(key: &'static str) -> BoxedStrategy<String> {
    value(key).prop_map(move |v| format!("{key} = {v}")).boxed()
}

/// An app file: `command` and `listen` nearly always, each other key now and then (the health
/// check's as a group, `watchdog` mostly with `ready = "notify"`), in any order.
fn app_file() -> impl Strategy<Value = String> {
    let sometimes =
        |key: &'static str, one_in: u32| prop_oneof![1 => line(key).prop_map(Some), one_in - 1 => Just(None)];
    let grouped =
        |k: &str| matches!(k, "command" | "listen" | "ready" | "watchdog") || k.starts_with("health_");
    let others: Vec<_> = super::KEYS.iter().filter(|k| !grouped(k)).map(|&k| sometimes(k, 4)).collect();
    let health = prop::option::weighted(
        0.4,
        (
            line("health_path"),
            [
                sometimes("health_interval", 2),
                sometimes("health_timeout", 2),
                sometimes("health_failures", 2),
            ],
        ),
    );
    let ready = prop_oneof![
        2 => Just(vec![]),
        2 => Just(vec!["ready = \"http\"".to_owned()]),
        1 => Just(vec!["ready = \"notify\"".to_owned()]),
        1 => (Just("ready = \"notify\"".to_owned()), line("watchdog")).prop_map(|(r, w)| vec![r, w]),
        1 => line("ready").prop_map(|r| vec![r]),
        1 => line("watchdog").prop_map(|w| vec![w]),
    ];
    let core = [
        prop_oneof![19 => line("command").prop_map(Some), 1 => Just(None)],
        prop_oneof![19 => line("listen").prop_map(Some), 1 => Just(None)],
    ];
    (core, others, health, ready)
        .prop_flat_map(|(core, others, health, ready)| {
            let mut lines: Vec<String> = core.into_iter().chain(others).flatten().chain(ready).collect();
            if let Some((path, rest)) = health {
                lines.push(path);
                lines.extend(rest.into_iter().flatten());
            }
            Just(lines).prop_shuffle()
        })
        .prop_map(|lines| lines.join("\n"))
}

/// The daemon's file: either key, valid or not.
fn daemon_file() -> impl Strategy<Value = String> {
    (duration_text(0, 10_000), prop::option::of(listen_entry())).prop_map(|(d, l)| {
        let mut text = format!("sample_interval = \"{d}\"\n");
        if let Some(l) = l {
            text.push_str(&format!("metrics_listen = \"{l}\"\n"));
        }
        text
    })
}

/// Parses `text` as an app file: an accepted one keeps the invariants and renders back as a
/// file that parses to the same config; a refused one has a well-formed error.
fn parsed_and_rendered_back(text: &str) -> Result<Option<AppConfig>, TestCaseError> {
    match AppConfig::parse(FILE, "chat", text) {
        Ok(c) => {
            keeps_the_invariants(&c)?;
            let again = render(&c);
            let back = AppConfig::parse(FILE, "chat", &again);
            prop_assert_eq!(back.as_ref(), Ok(&c), "{}\nrendered:\n{}", text, again);
            Ok(Some(c))
        }
        Err(e) => {
            well_formed(&e, FILE, text)?;
            Ok(None)
        }
    }
}

proptest! {
    #![proptest_config(config(512))]

    /// Files with any of the keys, mostly valid values: accepted ones keep the invariants and
    /// round-trip, refused ones say where and why.
    #[test]
    fn app_files_with_every_key_round_trip(text in app_file()) {
        parsed_and_rendered_back(&text)?;
        // A file without a key it must have is refused naming that key (type errors come
        // first, and these files have none).
        let lacks: Vec<&str> =
            ["command", "listen"].into_iter().filter(|k| !text.lines().any(|l| l.starts_with(&format!("{k} = ")))).collect();
        if !lacks.is_empty() {
            let e = AppConfig::parse(FILE, "chat", &text).unwrap_err();
            prop_assert!(e.key.as_deref().is_some_and(|k| lacks.contains(&k)) && e.location.is_none(), "{}\n{}", e, text);
        }
    }

    /// Near misses of those files (characters deleted, inserted, repeated, lines swapped, the
    /// file cut short): never a panic, the same properties.
    #[test]
    fn near_miss_app_files_round_trip_or_say_why(text in mutated(app_file())) {
        parsed_and_rendered_back(&text)?;
    }

    /// Any file name and app name (the stem of the file): no panic, a refusal without a
    /// location that names the file.
    #[test]
    fn any_app_name_is_checked_first(name in prop_oneof!["[a-z][a-z0-9_]{0,30}", any::<String>()], file in any::<String>()) {
        let text = "command = [\"/usr/bin/srv\"]\nlisten = [\"0.0.0.0:80\"]\n";
        match AppConfig::parse(&file, &name, text) {
            Ok(c) => prop_assert_eq!(c.name.as_str(), name.as_str()),
            Err(e) => {
                let prefix = format!("{file}: ");
                prop_assert!(e.location.is_none() && e.to_string().starts_with(&prefix), "{}", e);
                prop_assert!(e.message.chars().count() < 400 && !e.message.chars().any(char::is_control), "{}", e.message);
            }
        }
    }

    /// The daemon's file: what it accepts keeps its bounds and renders back; near misses of a
    /// valid file never panic and are refused with a well-formed error.
    #[test]
    fn the_daemons_file_round_trips(text in prop_oneof![daemon_file(), mutated(daemon_file())]) {
        let file = "/etc/ipcluster/ipclusterd.toml";
        match DaemonConfig::parse(file, &text) {
            Ok(c) => {
                prop_assert!(c.sample_interval >= Duration::from_millis(100) && c.sample_interval <= MAX_DURATION);
                prop_assert!(c.metrics_listen.is_none_or(|a| a.port() != 0));
                prop_assert_eq!(DaemonConfig::parse(file, &render_daemon(&c)), Ok(c));
            }
            Err(e) => well_formed(&e, file, &text)?,
        }
    }
}

/// Found by `app_files_with_every_key_round_trip`: a file without `listen` was refused as
/// `chat.toml:1:1: command: missing field `listen`` (the key on line 1 taken for the one at
/// fault); it now names the key it lacks, at no line.
#[test]
fn regression_a_missing_key_is_named_not_the_key_on_line_1() {
    for (text, missing) in [
        ("command = [\"/usr/bin/srv\"]\nautostart = false\n", "listen"),
        ("autostart = true\nlisten = [\"0.0.0.0:80\"]\n", "command"),
    ] {
        let e = AppConfig::parse(FILE, "chat", text).unwrap_err();
        assert_eq!((e.key.as_deref(), e.location), (Some(missing), None), "{e}");
        assert_eq!(e.to_string(), format!("{FILE}: {missing}: missing field `{missing}`"));
    }
}

/// Deploy overrides as a caller may send them (D-Bus `workers`, `command`, `environment`,
/// `working_directory`): mostly valid, some not, a few long.
fn overrides() -> impl Strategy<Value = Overrides> {
    // Long values by their length, so that a failing case shrinks quickly.
    let long = |lo: usize, hi: usize, prefix: &'static str| {
        (lo..hi).prop_map(move |n| format!("{prefix}{}", "x".repeat(n)))
    };
    let arg = prop_oneof![8 => "[ -~]{0,12}".boxed(), 1 => "[^\\x00]{0,8}\\x00".boxed(), 1 => long(4090, 4100, "").boxed()];
    let env = prop_oneof![
        8 => "[A-Z_][A-Z0-9_]{0,6}=[ -~]{0,8}".boxed(),
        1 => "PORT=1|IPCLUSTER_X=1|1X=1|A-B=1|=|".boxed(),
        1 => long(100, 70_000, "").boxed(),
        1 => long(4090, 4100, "A=").boxed(),
    ];
    (
        prop::option::of(prop_oneof![(0u32..12).prop_map(|k| 1 << k), any::<u32>()]),
        prop::option::of(prop::collection::vec(arg, 0..4)),
        prop::option::of(prop::collection::vec(env, 0..4)),
        prop::option::of(prop_oneof!["/[ -~]{0,12}", "[^\\x00]{0,8}"]),
    )
        .prop_map(|(workers, command, environment, working_directory)| Overrides {
            workers,
            command,
            environment,
            working_directory,
        })
}

proptest! {
    #![proptest_config(config(256))]

    /// Deploy overrides over any accepted app: the result keeps the invariants of an app file
    /// and renders back as one; a refusal names the key and says why briefly and printably.
    #[test]
    fn overrides_keep_the_invariants_or_say_why_briefly(text in app_file(), o in overrides()) {
        let Ok(base) = AppConfig::parse(FILE, "chat", &text) else { return Ok(()) };
        match base.with_overrides(&o) {
            Ok(c) => {
                keeps_the_invariants(&c)?;
                let back = AppConfig::parse(FILE, "chat", &render(&c));
                prop_assert_eq!(back.as_ref(), Ok(&c));
            }
            Err(e) => {
                let key = e.key.as_deref().unwrap_or_default();
                let keys = ["workers", "listen", "port_range"];
                prop_assert!(OVERRIDE_KEYS.contains(&key) || keys.contains(&key), "{}", e);
                prop_assert!(e.message.chars().count() <= 600, "{} characters", e.message.chars().count());
                prop_assert!(!e.message.chars().any(char::is_control), "{:?}", e.message);
            }
        }
    }
}

/// Found by `overrides_keep_the_invariants_or_say_why_briefly`: an `environment` override
/// without `=` was quoted whole in the refusal (a Deploy's 64 KiB option, 44722 characters in
/// the case found); it is quoted like every other value now, at most 64 characters.
#[test]
fn regression_an_environment_override_without_equals_is_quoted_briefly() {
    let base = AppConfig::parse(FILE, "chat", "command = [\"/srv\"]\nlisten = [\"0.0.0.0:80\"]\n").unwrap();
    let o = Overrides { environment: Some(vec!["x".repeat(44_722)]), ..Overrides::default() };
    let e = base.with_overrides(&o).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("environment"));
    assert!(e.message.ends_with("\"… is not K=V") && e.message.chars().count() < 100, "{}", e.message);
}

/// The renderer itself says every key of a full config, and the signals and environment it
/// writes read back (a check of the test's own tool, with values the strategies rarely draw).
#[test]
fn a_config_with_everything_set_renders_back() {
    let text = "command = [\"/usr/bin/srv\", \"a \\\"b\\\"\", \"\\u0007\"]\nworkers = 8\nlisten = [\"[::]:80\", \"10.0.0.1:443\"]\nrouting = \"socket\"\nready = \"http\"\nhealth_path = \"/healthz?x=1\"\nhealth_interval = \"1s\"\nhealth_timeout = \"250ms\"\nhealth_failures = 5\nsession_affinity = \"1500ms\"\nmax_draining = 6\nretire_signal = \"USR2\"\nwatchdog = \"10s\"\nenvironment = { A = \"1\", B_2 = \"\" }\nuser = \"www-data\"\nworker_memory_max = \"448M\"\ncluster_memory_max = \"1025K\"\nretire_timeout = \"1d 1us\"\n";
    let c = AppConfig::parse(FILE, "chat", text).unwrap();
    assert_eq!(c.session_affinity, Some(Duration::from_secs(2)), "a fraction counts as a second");
    assert_eq!(c.health.as_ref().map(|h| h.failures), Some(5));
    let again = render(&c);
    assert_eq!(AppConfig::parse(FILE, "chat", &again), Ok(c.clone()), "{again}");
    let keys: BTreeMap<String, toml::Value> = toml::from_str(&again).unwrap();
    assert_eq!(keys.len(), super::KEYS.len(), "every key said: {again}");
    assert_eq!(Signal::parse(c.stop_signal.name()), Ok(c.stop_signal));
}
