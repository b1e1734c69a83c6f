//! The rendering of a hand-made snapshot, line by line, in both formats.

use std::{collections::BTreeSet, sync::Arc};

use ipcluster_core::{
    model::{GenState, WorkerState},
    name::AppName,
};

use super::{Format, render};
use crate::supervisor::{
    Deploys, GenerationInfo, Histogram, PolicyAction, SessionInfo, Snapshot, WorkerInfo,
};

fn worker(
    app: &str,
    generation: u64,
    band: u32,
    pid: u32,
    state: WorkerState,
    rss: u64,
    cpu_usec: u64,
) -> WorkerInfo {
    WorkerInfo {
        app: app.into(),
        generation,
        band,
        pid,
        state,
        ports: vec![(80, 20000 + band as u16)],
        rss,
        cpu_usec,
        start_usec: 0,
        nice: 0,
        scope: format!("ipcluster-{app}-{generation}.scope"),
    }
}

fn generation(app: &str, generation: u64, state: GenState) -> GenerationInfo {
    GenerationInfo {
        app: app.into(),
        generation,
        state,
        workers: 2,
        start_usec: 0,
        scope: format!("ipcluster-{app}-{generation}.scope"),
    }
}

/// web: generation 2 live (bands 0, 1), generation 1 retired (band 0 and a second, retired
/// worker of band 0 left by a memory replacement), generation 3 failed; a crash of band 1; two
/// deploys ok, one failed; cutovers of 0.5 ms, 3 ms, 3 ms, 200 ms and 2 s; policy actions.
/// old: no file any more, nothing running, but counted before (it must not be shown).
/// idle: a valid file, never deployed.
fn fixture() -> Arc<Snapshot> {
    let mut s = Snapshot {
        generations: vec![
            generation("web", 1, GenState::Retired),
            generation("web", 2, GenState::Live),
            generation("web", 3, GenState::Failed),
            generation("old", 7, GenState::Stopped),
        ],
        known: ["web", "old", "idle"].iter().map(|a| AppName::new(a).unwrap()).collect::<BTreeSet<_>>(),
        valid: vec!["idle".into(), "web".into()],
        config_dir: "/etc/ipcluster/apps".into(),
        ..Snapshot::with_workers(vec![
            worker("web", 2, 0, 101, WorkerState::Live, 10 << 20, 1_500_000),
            worker("web", 2, 1, 102, WorkerState::Live, 11 << 20, 250_000),
            worker("web", 1, 0, 91, WorkerState::Retired, 3 << 20, 1_000_000),
            worker("web", 1, 0, 95, WorkerState::Retired, 4 << 20, 500_000),
        ])
    };
    let m = &mut s.metrics;
    m.deploys.insert("web".into(), Deploys { ok: 2, failed: 1, promoted: 1, rolled_back: 0 });
    m.deploys.insert("old".into(), Deploys { ok: 5, ..Deploys::default() });
    m.restarts.insert(("web".into(), 1), 3);
    m.restarts.insert(("old".into(), 0), 9);
    m.policy_actions.insert(("web".into(), PolicyAction::MemoryReplacement), 1);
    m.policy_actions.insert(("web".into(), PolicyAction::HeldBack), 2);
    m.policy_actions.insert(("old".into(), PolicyAction::Watchdog), 4);
    let mut h = Histogram::default();
    for seconds in [0.0005, 0.003, 0.003, 0.2, 2.0] {
        h.observe(seconds);
    }
    m.cutover.insert("web".into(), h);
    m.cutover.insert("old".into(), Histogram::default());
    Arc::new(s)
}

fn lines(text: &str) -> Vec<&str> {
    text.lines().collect()
}

/// Every line of `expected` is a line of `text`.
fn assert_has(text: &str, expected: &[&str]) {
    let have = lines(text);
    for line in expected {
        assert!(have.contains(line), "missing line {line:?} in:\n{text}");
    }
}

const FAMILIES: [(&str, &str); 9] = [
    ("ipcluster_build_info", "gauge"),
    ("ipcluster_generation_info", "gauge"),
    ("ipcluster_generation_sessions", "gauge"),
    ("ipcluster_worker_resident_memory_bytes", "gauge"),
    ("ipcluster_worker_cpu_seconds_total", "counter"),
    ("ipcluster_worker_restarts_total", "counter"),
    ("ipcluster_deploys_total", "counter"),
    ("ipcluster_cutover_duration_seconds", "histogram"),
    ("ipcluster_policy_actions_total", "counter"),
];

#[test]
fn the_text_format_has_help_type_and_the_values_of_the_snapshot() {
    let text = render(&fixture(), Format::Prometheus).unwrap();
    for (name, kind) in FAMILIES {
        assert_eq!(text.matches(&format!("# TYPE {name} {kind}\n")).count(), 1, "{name}:\n{text}");
        let help = text.lines().find(|l| l.starts_with(&format!("# HELP {name} ")));
        assert!(help.is_some_and(|l| l.len() > name.len() + 12), "{name} has no help:\n{text}");
    }
    assert_has(
        &text,
        &[
            &format!("ipcluster_build_info{{version=\"{}\"}} 1", ipcluster_core::VERSION),
            "ipcluster_generation_info{app=\"web\",generation=\"1\",state=\"retired\"} 1",
            "ipcluster_generation_info{app=\"web\",generation=\"2\",state=\"live\"} 1",
            "ipcluster_generation_info{app=\"web\",generation=\"3\",state=\"failed\"} 1",
            "ipcluster_worker_resident_memory_bytes{app=\"web\",generation=\"2\",band=\"0\",state=\"live\"} 10485760",
            "ipcluster_worker_resident_memory_bytes{app=\"web\",generation=\"2\",band=\"1\",state=\"live\"} 11534336",
            "ipcluster_worker_cpu_seconds_total{app=\"web\",generation=\"2\",band=\"0\",state=\"live\"} 1.5",
            "ipcluster_worker_cpu_seconds_total{app=\"web\",generation=\"2\",band=\"1\",state=\"live\"} 0.25",
            "ipcluster_worker_restarts_total{app=\"web\",band=\"0\"} 0",
            "ipcluster_worker_restarts_total{app=\"web\",band=\"1\"} 3",
            "ipcluster_deploys_total{app=\"web\",result=\"ok\"} 2",
            "ipcluster_deploys_total{app=\"web\",result=\"failed\"} 1",
            "ipcluster_deploys_total{app=\"web\",result=\"promoted\"} 1",
            "ipcluster_deploys_total{app=\"web\",result=\"rolled_back\"} 0",
            "ipcluster_policy_actions_total{app=\"web\",action=\"memory_replacement\"} 1",
            "ipcluster_policy_actions_total{app=\"web\",action=\"held_back\"} 2",
            "ipcluster_policy_actions_total{app=\"web\",action=\"watchdog\"} 0",
        ],
    );
    // A generation that stopped is still listed (bounded history, as ListGenerations).
    assert_has(&text, &["ipcluster_generation_info{app=\"old\",generation=\"7\",state=\"stopped\"} 1"]);
    // Every sample line belongs to the family declared above it.
    let mut family = "";
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            family = rest.split(' ').next().unwrap();
        } else if !line.starts_with('#') {
            assert!(line.starts_with(family) && family.starts_with("ipcluster_"), "{line} outside {family}");
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok() || value == "+Inf", "{line}");
        }
    }
    assert!(!text.contains("# EOF"), "no OpenMetrics terminator in the text format");
    assert!(text.ends_with('\n'));
}

#[test]
fn openmetrics_declares_families_by_their_base_name_with_units_and_ends_with_eof() {
    let text = render(&fixture(), Format::OpenMetrics).unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert_has(
        &text,
        &[
            "# TYPE ipcluster_build info",
            "# TYPE ipcluster_generation info",
            "# TYPE ipcluster_worker_resident_memory_bytes gauge",
            "# UNIT ipcluster_worker_resident_memory_bytes bytes",
            "# TYPE ipcluster_worker_cpu_seconds counter",
            "# UNIT ipcluster_worker_cpu_seconds seconds",
            "# TYPE ipcluster_worker_restarts counter",
            "# TYPE ipcluster_deploys counter",
            "# TYPE ipcluster_cutover_duration_seconds histogram",
            "# UNIT ipcluster_cutover_duration_seconds seconds",
            "# TYPE ipcluster_policy_actions counter",
            &format!("ipcluster_build_info{{version=\"{}\"}} 1", ipcluster_core::VERSION),
            "ipcluster_generation_info{app=\"web\",generation=\"2\",state=\"live\"} 1",
            "ipcluster_worker_resident_memory_bytes{app=\"web\",generation=\"2\",band=\"0\",state=\"live\"} 10485760",
            "ipcluster_worker_cpu_seconds_total{app=\"web\",generation=\"2\",band=\"0\",state=\"live\"} 1.5",
            "ipcluster_deploys_total{app=\"web\",result=\"ok\"} 2",
            "ipcluster_worker_restarts_total{app=\"web\",band=\"1\"} 3",
        ],
    );
    for base in
        ["ipcluster_build", "ipcluster_worker_cpu_seconds", "ipcluster_deploys", "ipcluster_policy_actions"]
    {
        assert_eq!(text.matches(&format!("# HELP {base} ")).count(), 1, "{base}:\n{text}");
    }
}

#[test]
fn histogram_buckets_are_cumulative_and_end_with_inf_in_both_formats() {
    // Observations 0.5 ms, 3 ms, 3 ms, 200 ms, 2 s; the bounds are CUTOVER_BUCKETS.
    let expected = [
        ("0.001", 1),
        ("0.0025", 1),
        ("0.005", 3),
        ("0.01", 3),
        ("0.025", 3),
        ("0.05", 3),
        ("0.1", 3),
        ("0.25", 4),
        ("0.5", 4),
        ("1", 4),
        ("+Inf", 5),
    ];
    for format in [Format::Prometheus, Format::OpenMetrics] {
        let text = render(&fixture(), format).unwrap();
        // OpenMetrics puts `le` first, the text format last.
        let buckets: Vec<(String, u64)> = text
            .lines()
            .filter(|l| {
                l.starts_with("ipcluster_cutover_duration_seconds_bucket{") && l.contains("app=\"web\"")
            })
            .map(|l| {
                let le = l.split("le=\"").nth(1).unwrap().split('"').next().unwrap();
                (le.to_owned(), l.rsplit(' ').next().unwrap().parse().unwrap())
            })
            .collect();
        let got: Vec<(&str, u64)> =
            buckets.iter().map(|(le, n)| (le.strip_suffix(".0").unwrap_or(le), *n)).collect();
        assert_eq!(got, expected, "{format:?}:\n{text}");
        assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "cumulative");
        assert_has(
            &text,
            &[
                "ipcluster_cutover_duration_seconds_count{app=\"web\"} 5",
                "ipcluster_cutover_duration_seconds_sum{app=\"web\"} 2.2065",
                "ipcluster_cutover_duration_seconds_count{app=\"idle\"} 0",
            ],
        );
        // An app never cut over has an empty histogram, +Inf included.
        let idle_inf = text.lines().filter(|l| {
            l.starts_with("ipcluster_cutover_duration_seconds_bucket{")
                && l.contains("app=\"idle\"")
                && l.contains("le=\"+Inf\"")
        });
        assert_eq!(idle_inf.map(|l| l.rsplit(' ').next().unwrap()).collect::<Vec<_>>(), ["0"], "{text}");
    }
}

#[test]
fn workers_sharing_labels_are_summed_and_no_pid_is_a_label() {
    for format in [Format::Prometheus, Format::OpenMetrics] {
        let text = render(&fixture(), format).unwrap();
        // Pids 91 and 95: both retired workers of band 0 in generation 1.
        let retired = "{app=\"web\",generation=\"1\",band=\"0\",state=\"retired\"}";
        assert_has(
            &text,
            &[
                &format!("ipcluster_worker_resident_memory_bytes{retired} 7340032"),
                &format!("ipcluster_worker_cpu_seconds_total{retired} 1.5"),
            ],
        );
        assert_eq!(text.matches(retired).count(), 2, "one series per family:\n{text}");
        assert!(!text.contains("pid"), "{text}");
        for pid in ["101", "102", "\"91\"", "\"95\""] {
            assert!(!text.contains(&format!("=\"{pid}\"")) && !text.contains(&format!("={pid}")), "{pid}");
        }
    }
}

#[test]
fn an_app_without_a_file_and_with_nothing_running_has_no_series_and_a_new_one_starts_at_zero() {
    let text = render(&fixture(), Format::Prometheus).unwrap();
    // old: its file is gone and its last generation stopped; only the generation's history row
    // remains (as in ListGenerations).
    let old: Vec<&str> = text.lines().filter(|l| l.contains("app=\"old\"")).collect();
    assert_eq!(old, ["ipcluster_generation_info{app=\"old\",generation=\"7\",state=\"stopped\"} 1"]);
    // idle: a valid file, never deployed: every counter at zero, so the first deploy is an
    // increase Prometheus sees.
    assert_has(
        &text,
        &[
            "ipcluster_deploys_total{app=\"idle\",result=\"ok\"} 0",
            "ipcluster_deploys_total{app=\"idle\",result=\"failed\"} 0",
            "ipcluster_policy_actions_total{app=\"idle\",action=\"memory_replacement\"} 0",
            "ipcluster_policy_actions_total{app=\"idle\",action=\"watermark_stop\"} 0",
            "ipcluster_policy_actions_total{app=\"idle\",action=\"watermark_kill\"} 0",
            "ipcluster_policy_actions_total{app=\"idle\",action=\"watchdog\"} 0",
            "ipcluster_policy_actions_total{app=\"idle\",action=\"held_back\"} 0",
        ],
    );
    // An app whose file was removed while a generation still runs is still shown, counters
    // included.
    let mut s = (*fixture()).clone();
    s.valid.retain(|a| a != "web");
    let text = render(&Arc::new(s), Format::Prometheus).unwrap();
    assert_has(&text, &["ipcluster_deploys_total{app=\"web\",result=\"ok\"} 2"]);
    // An empty snapshot (a daemon with no app) still says what runs.
    let text = render(&Arc::new(Snapshot::default()), Format::Prometheus).unwrap();
    let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(samples, [format!("ipcluster_build_info{{version=\"{}\"}} 1", ipcluster_core::VERSION)]);
}

#[test]
fn label_values_are_escaped_in_both_formats() {
    // App names are [a-z][a-z0-9_]*, but the encoder must not trust that.
    let mut s = Snapshot::default();
    s.generations.push(generation("a\"b\\c\nd", 1, GenState::Live));
    let s = Arc::new(s);
    for format in [Format::Prometheus, Format::OpenMetrics] {
        let text = render(&s, format).unwrap();
        assert_has(
            &text,
            &["ipcluster_generation_info{app=\"a\\\"b\\\\c\\nd\",generation=\"1\",state=\"live\"} 1"],
        );
        assert!(text.lines().all(|l| l.starts_with('#') || l.starts_with("ipcluster_")), "{text}");
    }
}

#[test]
fn the_accept_header_chooses_openmetrics_only_when_preferred() {
    use Format::{OpenMetrics, Prometheus};
    let cases = [
        (None, Prometheus),
        (Some(""), Prometheus),
        (Some("*/*"), Prometheus),
        (Some("text/plain"), Prometheus),
        (Some("text/html,application/xhtml+xml,*/*;q=0.8"), Prometheus),
        (Some("application/openmetrics-text"), OpenMetrics),
        (Some("Application/OpenMetrics-Text; version=1.0.0"), OpenMetrics),
        // What Prometheus 2.42 sends.
        (
            Some(
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,\
                 text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
            ),
            OpenMetrics,
        ),
        (Some("text/plain;version=0.0.4,application/openmetrics-text;q=0.5"), Prometheus),
        (Some("application/openmetrics-text;q=0"), Prometheus),
        (Some("application/openmetrics-text;q=bogus"), Prometheus),
        (Some("application/openmetrics-text, text/plain"), OpenMetrics),
    ];
    for (accept, expected) in cases {
        assert_eq!(Format::negotiate(accept), expected, "{accept:?}");
    }
    assert_eq!(Prometheus.content_type(), "text/plain; version=0.0.4; charset=utf-8");
    assert!(OpenMetrics.content_type().starts_with("application/openmetrics-text; version=1.0.0"));
}

#[test]
fn a_draining_generation_and_the_session_records_of_each_generation_are_shown() {
    let mut s = (*fixture()).clone();
    s.generations.push(generation("chat", 4, GenState::Draining));
    s.generations.push(generation("chat", 5, GenState::Live));
    s.sessions = vec![
        SessionInfo { app: "chat".into(), generation: 4, records: 17 },
        SessionInfo { app: "chat".into(), generation: 5, records: 3 },
    ];
    for format in [Format::Prometheus, Format::OpenMetrics] {
        let text = render(&Arc::new(s.clone()), format).unwrap();
        assert_has(
            &text,
            &[
                "ipcluster_generation_info{app=\"chat\",generation=\"4\",state=\"draining\"} 1",
                "ipcluster_generation_sessions{app=\"chat\",generation=\"4\"} 17",
                "ipcluster_generation_sessions{app=\"chat\",generation=\"5\"} 3",
            ],
        );
        assert!(
            !text.contains("ipcluster_generation_sessions{app=\"web\""),
            "web keeps no sessions:\n{text}"
        );
    }
}
