//! Tests of app and daemon file parsing.

use super::*;

fn parse(text: &str) -> Result<AppConfig, ConfigError> {
    AppConfig::parse("/etc/ipcluster/apps/chat.toml", "chat", text)
}

const MIN: &str = "command = [\"/usr/bin/srv\"]\nlisten = [\"0.0.0.0:80\"]\n";

#[test]
fn defaults() {
    let c = parse(MIN).unwrap();
    assert_eq!(c.name.as_str(), "chat");
    assert_eq!(c.workers, 4);
    assert_eq!(c.port_range, (20000, 29999));
    assert_eq!(c.ready, Ready::Tcp);
    assert_eq!(c.ready_timeout, Duration::from_secs(30));
    assert_eq!(c.working_directory, PathBuf::from("/"));
    assert_eq!(c.user, None);
    assert_eq!(c.stop_signal, Signal::Term);
    assert_eq!(c.stop_timeout, Duration::from_secs(5));
    assert_eq!(c.retire_signal, None);
    assert_eq!(c.retire_nice, 5);
    assert!(c.autostart);
    assert_eq!(
        (c.worker_memory_max, c.cluster_memory_max, c.retire_timeout, c.watchdog),
        (None, None, None, None)
    );
    assert_eq!(c.retire_rate, (10, Duration::from_secs(120)));
    assert_eq!((c.reap_interval, c.spawn_interval), (Duration::ZERO, Duration::ZERO));
    assert_eq!(c.restart_backoff, (Duration::from_millis(100), Duration::from_secs(30)));
}

#[test]
fn every_key() {
    let c = parse(
        r#"
command = ["/usr/bin/srv", "--flag"]
workers = 8
listen = ["0.0.0.0:80", "127.0.0.1:8443"]
port_range = "30000-30100"
ready = "notify"
ready_timeout = "2min"
working_directory = "/srv"
user = "www-data"
environment = { MODE = "prod" }
stop_signal = "SIGINT"
stop_timeout = "10s"
retire_signal = "USR2"
retire_nice = 10
autostart = false
worker_memory_max = "448M"
cluster_memory_max = "2G"
retire_rate = "5/1min"
retire_timeout = "1h"
reap_interval = "500ms"
spawn_interval = "100ms"
watchdog = "10s"
restart_backoff = "1s-1min"
"#,
    )
    .unwrap();
    assert_eq!(c.workers, 8);
    assert_eq!(c.listen.len(), 2);
    assert_eq!(c.ready, Ready::Notify);
    assert_eq!(c.user.as_deref(), Some("www-data"));
    assert_eq!(c.environment["MODE"], "prod");
    assert_eq!(c.stop_signal, Signal::Int);
    assert_eq!(c.retire_signal, Some(Signal::Usr2));
    assert_eq!(c.retire_nice, 10);
    assert!(!c.autostart);
    assert_eq!(c.worker_memory_max, Some(448 << 20));
    assert_eq!(c.cluster_memory_max, Some(2 << 30));
    assert_eq!(c.retire_rate, (5, Duration::from_secs(60)));
    assert_eq!(c.retire_timeout, Some(Duration::from_secs(3600)));
    assert_eq!((c.reap_interval, c.spawn_interval), (Duration::from_millis(500), Duration::from_millis(100)));
    assert_eq!(c.watchdog, Some(Duration::from_secs(10)));
    assert_eq!(c.restart_backoff, (Duration::from_secs(1), Duration::from_secs(60)));
}

/// KEYS (which the docs test checks against the reference) is exactly what the parser takes.
#[test]
fn keys_lists_every_accepted_key() {
    for key in KEYS {
        let text = format!("{MIN}{key} = 0\n");
        if key == "command" || key == "listen" {
            continue;
        }
        if let Err(e) = parse(&text) {
            assert!(!e.message.contains("unknown key"), "{key} is in KEYS but not accepted: {e}");
        }
    }
    // The parser refuses every key KEYS lacks (the struct it fills denies unknown fields), and
    // says which keys there are.
    let e = parse(&format!("{MIN}nonsense = 0\n")).unwrap_err();
    assert!(e.message.starts_with("unknown key `nonsense`; the keys are "), "{e}");
    for key in KEYS {
        assert!(e.message.contains(key), "{key} missing from {e}");
    }
}

/// Each bad file is rejected with the key, its line, and what is allowed.
#[test]
fn errors_name_file_line_key_and_allowed_values() {
    let cases: &[(&str, &str, (usize, usize), &str)] = &[
        ("workers = 6\n", "workers", (3, 11), "power of two"),
        ("workers = 0\n", "workers", (3, 11), "power of two"),
        ("workers = 2048\n", "workers", (3, 11), "1024"),
        ("workers = \"4\"\n", "workers", (3, 11), "invalid type"),
        ("ready = \"https\"\n", "ready", (3, 9), "\"tcp\", \"notify\" or \"http\""),
        ("ready = \"http\"\n", "ready", (3, 9), "needs health_path"),
        ("health_path = \"healthz\"\n", "health_path", (3, 15), "must start with /"),
        ("health_path = \"/a b\"\n", "health_path", (3, 15), "visible ASCII"),
        ("health_path = \"/a\\r\\nX: y\"\n", "health_path", (3, 15), "visible ASCII"),
        ("health_interval = \"10s\"\n", "health_interval", (3, 19), "needs health_path"),
        ("health_path = \"/h\"\nhealth_failures = 0\n", "health_failures", (4, 19), "1..=100"),
        ("health_path = \"/h\"\nhealth_interval = \"1ms\"\n", "health_interval", (4, 19), "at least 100ms"),
        ("health_path = \"/h\"\nhealth_timeout = \"10s\"\n", "health_timeout", (4, 18), "not be longer"),
        ("health_path = \"/h\"\nready = \"http\"\nwatchdog = \"5s\"\n", "watchdog", (5, 12), "needs ready"),
        ("ready_timeout = \"soon\"\n", "ready_timeout", (3, 17), "not a duration"),
        ("port_range = \"10-20\"\n", "port_range", (3, 14), "lo-hi"),
        ("port_range = \"20000-20001\"\n", "port_range", (3, 14), "need at least 8"),
        ("stop_signal = \"SIGFOO\"\n", "stop_signal", (3, 15), "SIGTERM"),
        ("retire_nice = 20\n", "retire_nice", (3, 15), "0..=19"),
        ("user = \"root;rm\"\n", "user", (3, 8), "not a user name"),
        ("working_directory = \"srv\"\n", "working_directory", (3, 21), "absolute"),
        ("environment = { PORT = \"1\" }\n", "environment", (3, 15), "set by ipclusterd"),
        ("environment = { \"A-B\" = \"1\" }\n", "environment", (3, 15), "variable name"),
        ("colour = \"blue\"\n", "colour", (3, 1), "unknown key `colour`"),
        ("autostart = \"yes\"\n", "autostart", (3, 13), "invalid type"),
        ("worker_memory_max = \"lots\"\n", "worker_memory_max", (3, 21), "M = MiB"),
        ("cluster_memory_max = \"0\"\n", "cluster_memory_max", (3, 22), "more than 0"),
        ("retire_rate = \"10\"\n", "retire_rate", (3, 15), "N/duration"),
        ("retire_timeout = \"0\"\n", "retire_timeout", (3, 18), "more than 0"),
        ("reap_interval = \"x\"\n", "reap_interval", (3, 17), "not a duration"),
        ("watchdog = \"10s\"\n", "watchdog", (3, 12), "needs ready = \"notify\""),
        ("restart_backoff = \"30s-1s\"\n", "restart_backoff", (3, 19), "min-max"),
        ("routing = \"ebpf\"\n", "routing", (3, 11), "must be \"nat\" or \"socket\""),
        ("routing = 1\n", "routing", (3, 11), "invalid type"),
        ("ready = \"tcp\"\nrouting = \"socket\"\n", "ready", (3, 9), "use ready = \"notify\""),
    ];
    for (extra, key, loc, allowed) in cases {
        let e = parse(&format!("{MIN}{extra}")).expect_err(extra);
        assert_eq!(e.key.as_deref(), Some(*key), "{extra}: {e}");
        assert_eq!(e.location, Some(*loc), "{extra}: {e}");
        assert!(e.message.contains(allowed), "{extra}: {e}");
        assert!(e.to_string().starts_with(&format!("/etc/ipcluster/apps/chat.toml:{}:", loc.0)), "{e}");
    }
}

#[test]
fn health_checks_have_defaults_and_ready_http_holds_ports_or_notifies_by_mode() {
    let c = parse(&format!("{MIN}health_path = \"/healthz?x=1\"\nready = \"http\"\n")).unwrap();
    let h = c.health.clone().unwrap();
    assert_eq!(
        (h.path.as_str(), h.interval, h.timeout, h.failures),
        ("/healthz?x=1", Duration::from_secs(5), Duration::from_secs(2), 3)
    );
    assert_eq!(c.ready, Ready::Http);
    assert!(c.ready.holds_ports(c.routing) && !c.ready.notifies(c.routing), "NAT: its ports, then the check");
    let s = parse(&format!(
        "{MIN}routing = \"socket\"\nhealth_path = \"/h\"\nready = \"http\"\nwatchdog = \"5s\"\n"
    ))
    .unwrap();
    assert!(
        s.ready.notifies(s.routing) && !s.ready.holds_ports(s.routing),
        "socket mode: READY=1, then the check"
    );
    assert_eq!(parse(MIN).unwrap().health, None, "no health_path, no checks");
    // Socket mode checks through the public socket from an IPv4 loopback source.
    let v6 = "command = [\"/bin/true\"]\nlisten = [\"[fd00::1]:80\"]\nrouting = \"socket\"\nhealth_path = \"/h\"\n";
    let e = parse(v6).unwrap_err();
    assert!(e.message.contains("must take IPv4"), "{e}");
    let dual =
        "command = [\"/bin/true\"]\nlisten = [\"[::]:80\"]\nrouting = \"socket\"\nhealth_path = \"/h\"\n";
    assert!(parse(dual).is_ok());
}

#[test]
fn routing_decides_how_clients_reach_workers_and_socket_mode_implies_notify() {
    let nat = parse(MIN).unwrap();
    assert_eq!((nat.routing, nat.ready), (Routing::Nat, Ready::Tcp), "the defaults");
    let socket = parse(&format!("{MIN}routing = \"socket\"\n")).unwrap();
    assert_eq!((socket.routing, socket.ready), (Routing::Socket, Ready::Notify));
    let explicit = parse(&format!("{MIN}routing = \"socket\"\nready = \"notify\"\n")).unwrap();
    assert_eq!(explicit.ready, Ready::Notify);
    let v6 = parse("command = [\"/x\"]\nlisten = [\"[::]:80\", \"10.0.0.5:443\"]\nrouting = \"socket\"\n")
        .unwrap();
    assert_eq!(v6.listen, ["[::]:80".parse().unwrap(), "10.0.0.5:443".parse().unwrap()]);
}

#[test]
fn listen_and_command_errors() {
    let bad = [
        ("command = []\nlisten = [\"0.0.0.0:80\"]\n", "command"),
        ("command = [\"/x\"]\nlisten = []\n", "listen"),
        ("command = [\"/x\"]\nlisten = [\"localhost:80\"]\n", "listen"),
        ("command = [\"/x\"]\nlisten = [\"0.0.0.0:0\"]\n", "listen"),
        ("command = [\"/x\"]\nlisten = [\"0.0.0.0:80\", \"127.0.0.1:80\"]\n", "listen"),
        ("command = [\"/x\"]\nlisten = [\"0.0.0.0:20001\"]\n", "listen"),
        ("command = [\"/x\"]\n", "listen"),
    ];
    for (text, key) in bad {
        let e = parse(text).expect_err(text);
        assert!(e.key.as_deref() == Some(key) || e.message.contains(key), "{text}: {e}");
    }
    let e = AppConfig::parse("x/../A.toml", "../A", MIN).unwrap_err();
    assert!(e.message.contains("app name"), "{e}");
}

/// An IPv4-mapped IPv6 address is the IPv4 address it maps: `[::ffff:a.b.c.d]:p` overlaps
/// `a.b.c.d:p` and `0.0.0.0:p`, in either order (issue 21, "Also").
#[test]
fn an_ipv4_mapped_address_overlaps_the_address_it_maps() {
    for pair in [
        ["[::ffff:127.0.0.1]:80", "127.0.0.1:80"],
        ["127.0.0.1:80", "[::ffff:127.0.0.1]:80"],
        ["0.0.0.0:80", "[::ffff:10.0.0.5]:80"],
        ["[::ffff:0.0.0.0]:80", "10.0.0.5:80"],
    ] {
        let text = format!("command = [\"/x\"]\nlisten = [\"{}\", \"{}\"]\n", pair[0], pair[1]);
        let e = parse(&text).expect_err(&text);
        assert!(e.message.contains("overlaps"), "{text}: {e}");
    }
    let distinct = "command = [\"/x\"]\nlisten = [\"[::ffff:127.0.0.1]:80\", \"127.0.0.2:80\"]\n";
    assert!(parse(distinct).is_ok(), "another address, no overlap");
}

#[test]
fn daemon_file() {
    assert_eq!(DaemonConfig::parse("d", "").unwrap(), DaemonConfig::default());
    assert_eq!(
        DaemonConfig::parse("d", "sample_interval = \"250ms\"\n").unwrap().sample_interval,
        Duration::from_millis(250)
    );
    let e =
        DaemonConfig::parse("/etc/ipcluster/ipclusterd.toml", "sample_interval = \"10ms\"\n").unwrap_err();
    assert_eq!(e.to_string(), "/etc/ipcluster/ipclusterd.toml:1:19: sample_interval: must be at least 100ms");
    assert!(DaemonConfig::parse("d", "samples = 1\n").unwrap_err().message.contains("unknown key `samples`"));
}

#[test]
fn metrics_listen_is_an_address_and_a_port() {
    assert_eq!(DaemonConfig::default().metrics_listen, None, "absent: no listener");
    for (text, addr) in [
        ("metrics_listen = \"127.0.0.1:9464\"\n", "127.0.0.1:9464"),
        ("metrics_listen = \"0.0.0.0:9464\"\n", "0.0.0.0:9464"),
        ("metrics_listen = \"[::1]:9100\"\n", "[::1]:9100"),
    ] {
        let c = DaemonConfig::parse("d", text).unwrap();
        assert_eq!(c.metrics_listen, Some(addr.parse().unwrap()), "{text}");
        assert_eq!(c.sample_interval, DaemonConfig::default().sample_interval);
    }
    let file = "/etc/ipcluster/ipclusterd.toml";
    for (text, expected) in [
        (
            "metrics_listen = \"localhost:9464\"\n",
            "/etc/ipcluster/ipclusterd.toml:1:18: metrics_listen: \"localhost:9464\" is not \"address:port\"",
        ),
        ("metrics_listen = \"127.0.0.1\"\n", ":1:18: metrics_listen: \"127.0.0.1\" is not \"address:port\""),
        (
            "sample_interval = \"1s\"\nmetrics_listen = \"127.0.0.1:0\"\n",
            ":2:18: metrics_listen: \"127.0.0.1:0\": port must be 1..=65535",
        ),
        ("metrics_listen = \"127.0.0.1:65536\"\n", ":1:18: metrics_listen: \"127.0.0.1:65536\" is not"),
        ("metrics_listen = \"::1:9464\"\n", ":1:18: metrics_listen: \"::1:9464\" is not"),
        ("metrics_listen = 9464\n", ":1:18: invalid type: integer `9464`, expected a string"),
    ] {
        let e = DaemonConfig::parse(file, text).unwrap_err().to_string();
        assert!(e.contains(expected), "{text}: {e}");
    }
}

#[test]
fn overrides() {
    let c = parse(MIN).unwrap();
    let o = Overrides {
        workers: Some(2),
        command: Some(vec!["/bin/other".into()]),
        environment: Some(vec!["A=1".into(), "B=x=y".into()]),
        working_directory: Some("/tmp".into()),
    };
    let d = c.with_overrides(&o).unwrap();
    assert_eq!(d.workers, 2);
    assert_eq!(d.command, ["/bin/other"]);
    assert_eq!(d.environment["B"], "x=y");
    assert_eq!(d.working_directory, PathBuf::from("/tmp"));
    for bad in [
        Overrides { workers: Some(3), ..Default::default() },
        Overrides { command: Some(vec![]), ..Default::default() },
        Overrides { environment: Some(vec!["NOEQUALS".into()]), ..Default::default() },
        Overrides { environment: Some(vec!["IPCLUSTER_BAND=1".into()]), ..Default::default() },
        Overrides { working_directory: Some("relative".into()), ..Default::default() },
        Overrides { command: Some(vec!["a\0b".into()]), ..Default::default() },
    ] {
        let e = c.with_overrides(&bad).unwrap_err();
        assert_eq!(e.file, "Deploy options", "{e}");
    }
}

/// Item 13 of issue 12: every duration, size and rate is bounded at parse time, so the largest
/// values a file can hold make no sum the daemon computes overflow.
#[test]
fn huge_values_are_refused_and_the_largest_accepted_ones_cannot_overflow() {
    let cases: &[(&str, &str, &str)] = &[
        ("ready_timeout = \"366d\"\n", "ready_timeout", "365d"),
        ("stop_timeout = \"99999999999999999999d\"\n", "stop_timeout", "not a duration"),
        ("stop_timeout = \"18446744073709551615s\"\n", "stop_timeout", "365d"),
        ("spawn_interval = \"8761h\"\n", "spawn_interval", "365d"),
        ("reap_interval = \"365d 1s\"\n", "reap_interval", "365d"),
        ("retire_timeout = \"1000d\"\n", "retire_timeout", "365d"),
        ("restart_backoff = \"1s-400d\"\n", "restart_backoff", "365d"),
        ("retire_rate = \"10/500d\"\n", "retire_rate", "365d"),
        ("retire_rate = \"4294967295/1s\"\n", "retire_rate", "1000000"),
        ("worker_memory_max = \"2048T\"\n", "worker_memory_max", "1 PiB"),
        ("cluster_memory_max = \"18446744073709551615\"\n", "cluster_memory_max", "1 PiB"),
    ];
    for (extra, key, bound) in cases {
        let e = parse(&format!("{MIN}{extra}")).expect_err(extra);
        assert_eq!(e.key.as_deref(), Some(*key), "{extra}: {e}");
        assert!(e.message.contains(bound), "{extra}: {e}");
    }
    let c = parse(
        "command = [\"/x\"]\nlisten = [\"0.0.0.0:80\"]\nworkers = 1024\nready = \"notify\"\n\
         ready_timeout = \"365d\"\nspawn_interval = \"365d\"\nstop_timeout = \"365d\"\nwatchdog = \"365d\"\n\
         restart_backoff = \"365d-365d\"\nretire_rate = \"1000000/365d\"\nworker_memory_max = \"1024T\"\n",
    )
    .unwrap();
    // What the supervisor computes from them.
    let all_bands = c.ready_timeout + c.spawn_interval * c.workers.saturating_sub(1);
    let _ = std::time::Instant::now() + all_bands + c.stop_timeout + c.restart_backoff.1 * 2;
    assert!(u64::try_from(c.watchdog.unwrap().as_micros()).is_ok(), "WATCHDOG_USEC fits");
    assert!(c.worker_memory_max.unwrap().checked_mul(100).is_some());
    let e = DaemonConfig::parse("d", "sample_interval = \"400d\"\n").unwrap_err();
    assert!(e.message.contains("365d"), "{e}");
}

/// The default port range holds two generations of the default app, and of 1024 workers with
/// four listen entries; a fifth needs a wider range, and the message says so.
#[test]
fn the_default_port_range_holds_two_generations() {
    assert!(parse(MIN).is_ok());
    let listen = |n: u16| (0..n).map(|i| format!("\"0.0.0.0:{}\"", 80 + i)).collect::<Vec<_>>().join(", ");
    let big = |n| format!("command = [\"/x\"]\nworkers = 1024\nlisten = [{}]\n", listen(n));
    assert!(parse(&big(4)).is_ok());
    let e = parse(&big(5)).unwrap_err();
    assert!(e.message.contains("10000 ports") && e.message.contains("10240"), "{e}");
}

/// Errors never carry the file's text raw: control characters escaped, length bounded.
#[test]
fn errors_are_bounded_and_escaped() {
    let long_key = "k".repeat(10_000);
    for text in [
        format!("{MIN}\"\\u0007bell\\u001b[31m\" = 1\n"),
        format!("{MIN}{long_key} = 1\n"),
        format!("{MIN}ready = \"{}\\u0000\"\n", "x".repeat(10_000)),
        format!("command = [\"/x\"]\nlisten = [\"{}\\u0007\"]\n", "1".repeat(10_000)),
    ] {
        let e = parse(&text).unwrap_err();
        let shown = e.to_string();
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert!(shown.chars().count() < 600, "{} chars: {shown}", shown.chars().count());
    }
}

#[test]
fn override_keys_are_what_runs_differently_from_the_file() {
    let file = AppConfig::parse(
        "/etc/ipcluster/apps/chat.toml",
        "chat",
        "command = [\"/srv/a\"]\nworkers = 2\nlisten = [\"0.0.0.0:80\"]\n",
    )
    .unwrap();
    assert!(file.override_keys(Some(&file)).is_empty());
    let mut ran = file.clone();
    ran.workers = 8;
    ran.stop_timeout = std::time::Duration::from_secs(9);
    assert!(ran.override_keys(Some(&file)).is_empty(), "sizes and timings run the same code");
    ran.environment.insert("LD_PRELOAD".into(), "/tmp/x.so".into());
    ran.command = vec!["/srv/b".into()];
    assert_eq!(ran.override_keys(Some(&file)), ["command", "environment"]);
    ran.user = Some("nobody".into());
    ran.working_directory = "/tmp".into();
    assert_eq!(ran.override_keys(Some(&file)), OVERRIDE_KEYS);
    assert_eq!(file.override_keys(None), OVERRIDE_KEYS, "no file: a plain Deploy runs nothing");
}
