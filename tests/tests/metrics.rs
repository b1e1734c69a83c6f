//! `/metrics` end to end: `metrics_listen` in ipclusterd.toml, both exposition formats as curl
//! and promtool see them, and a real Prometheus (Debian's package) inside the sandbox scraping
//! the daemon every second, whose query API follows the live workers and the deploy counter.

use std::{
    sync::LazyLock,
    time::{Duration, Instant},
};

use ipcluster_e2e::{Sandbox, fixture::Demo, installed_sandbox, journal_with, text};

/// The app most scenarios here deploy.
static WEB: LazyLock<String> = LazyLock::new(|| Demo::new(4).toml());

const DAEMON_FILE: &str = "/etc/ipcluster/ipclusterd.toml";
const METRICS: &str = "http://127.0.0.1:9464/metrics";

/// Prometheus scraping the daemon every second; its TSDB in the sandbox's own /tmp.
const PROMETHEUS_YML: &str = "\
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: ipclusterd
    scrape_timeout: 1s
    static_configs:
      - targets: ['127.0.0.1:9464']
";

fn journal(sb: &Sandbox, unit: &str) -> String {
    sb.run(["journalctl", "-u", unit, "-o", "cat", "--no-pager"]).map(|o| text(&o)).unwrap_or_default()
}

/// What listens on TCP port 9464, as `ss` shows it (with the owning processes).
fn listening_on_9464(sb: &Sandbox) -> String {
    sb.check(["ss", "-Hltnp", "sport = :9464"]).unwrap()
}

/// `curl -i` of `/metrics` inside the sandbox, with extra arguments: (status line and headers
/// in lower case, body).
fn curl(sb: &Sandbox, extra: &[&str]) -> (String, String) {
    let mut argv = vec!["curl", "-sS", "-i", "--max-time", "5"];
    argv.extend_from_slice(extra);
    argv.push(METRICS);
    let out = sb.check(&argv).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP head: {out}"));
    (head.to_ascii_lowercase(), body.to_owned())
}

/// The value of a PromQL query that returns one sample, from Prometheus' HTTP API inside the
/// sandbox; `None` while it returns none (or Prometheus is not up yet).
fn query(sb: &Sandbox, promql: &str) -> Option<f64> {
    let out = sb
        .run([
            "curl",
            "-sS",
            "--max-time",
            "2",
            "-G",
            "http://127.0.0.1:9090/api/v1/query",
            "--data-urlencode",
            &format!("query={promql}"),
        ])
        .ok()?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    assert_eq!(json["status"], "success", "{promql}: {json}");
    let result = json["data"]["result"].as_array()?;
    assert!(result.len() <= 1, "{promql} returned several series: {json}");
    result.first()?["value"][1].as_str()?.parse().ok()
}

/// Waits until `promql` evaluates to `expected`.
fn wait_query(sb: &Sandbox, promql: &str, expected: f64, timeout: Duration) {
    wait_query_for(sb, promql, &format!("= {expected}"), |v| v == expected, timeout);
}

/// Waits until `promql` evaluates to a value that satisfies `ok` (described as `what`); on
/// timeout, panics with what Prometheus said and saw.
fn wait_query_for(sb: &Sandbox, promql: &str, what: &str, ok: impl Fn(f64) -> bool, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while Instant::now() < deadline {
        last = query(sb, promql);
        if last.is_some_and(&ok) {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let targets = sb.run(["curl", "-sS", "http://127.0.0.1:9090/api/v1/targets"]).map(|o| text(&o));
    panic!(
        "{promql} is {last:?}, not {what}, after {timeout:?}\ntargets: {targets:?}\nprometheus:\n{}",
        journal(sb, "ipcluster-test-prometheus")
    );
}

#[test]
fn prometheus_scrapes_the_live_workers_and_sees_the_deploy_counter_move() {
    let sb = installed_sandbox();
    sb.write_file("/etc/ipcluster/apps/web.toml", WEB.as_str(), 0o644).unwrap();

    // Without metrics_listen, no listener.
    sb.check(["systemctl", "start", "ipclusterd"]).unwrap();
    sb.check(["ipclusterctl", "deploy", "web"]).unwrap();
    assert_eq!(listening_on_9464(&sb).trim(), "", "no metrics_listen: nothing listens");

    // An invalid value is reported with its place, and nothing listens.
    sb.write_file(DAEMON_FILE, "metrics_listen = \"localhost:9464\"\n", 0o644).unwrap();
    sb.check(["systemctl", "restart", "ipclusterd"]).unwrap();
    journal_with(
        &sb,
        "ipclusterd",
        &format!("{DAEMON_FILE}:1:18: metrics_listen: \"localhost:9464\" is not \"address:port\""),
    );
    assert_eq!(listening_on_9464(&sb).trim(), "");

    // The daemon listens, and only the daemon: workers forked since do not hold its socket.
    sb.write_file(DAEMON_FILE, "metrics_listen = \"127.0.0.1:9464\"\n", 0o644).unwrap();
    sb.check(["systemctl", "restart", "ipclusterd"]).unwrap();
    sb.check(["ipclusterctl", "deploy", "web"]).unwrap();
    let listeners = listening_on_9464(&sb);
    assert!(listeners.contains("127.0.0.1:9464") && listeners.contains("\"ipclusterd\""), "{listeners}");
    assert!(!listeners.contains("ipcluster-demo"), "a worker holds the metrics socket: {listeners}");

    // The text format, as curl gets it by default, passes promtool's checks (Prometheus' own
    // parser and linter).
    let (head, body) = curl(&sb, &[]);
    assert!(head.starts_with("http/1.1 200 ok"), "{head}");
    assert!(head.contains("content-type: text/plain; version=0.0.4; charset=utf-8"), "{head}");
    for line in [
        "ipcluster_deploys_total{app=\"web\",result=\"ok\"} 1",
        "ipcluster_deploys_total{app=\"web\",result=\"failed\"} 0",
        "ipcluster_generation_info{app=\"web\",generation=\"2\",state=\"live\"} 1",
        "ipcluster_generation_info{app=\"web\",generation=\"1\",state=\"retired\"} 1",
        &format!("ipcluster_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION")),
    ] {
        assert!(body.lines().any(|l| l == line), "no {line:?} in:\n{body}");
    }
    let live_rss = body
        .lines()
        .filter(|l| l.starts_with("ipcluster_worker_resident_memory_bytes{") && l.contains("state=\"live\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .collect::<Vec<_>>();
    assert_eq!(live_rss.len(), 4, "{body}");
    assert!(live_rss.iter().all(|rss| *rss > 100_000.0), "sampled RSS of real workers: {live_rss:?}");
    sb.write_file("/tmp/metrics.txt", &body, 0o644).unwrap();
    let lint = sb.run(["sh", "-c", "promtool check metrics < /tmp/metrics.txt"]).unwrap();
    assert!(lint.status.success() && text(&lint).trim().is_empty(), "promtool: {}", text(&lint));

    // OpenMetrics when asked for.
    let (head, body) = curl(&sb, &["-H", "Accept: application/openmetrics-text"]);
    assert!(
        head.contains("content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n") && body.contains("# TYPE ipcluster_deploys counter\n"), "{body}");
    assert!(body.contains("# UNIT ipcluster_worker_resident_memory_bytes bytes\n"), "{body}");
    // Anything but GET /metrics is refused.
    let post =
        sb.check(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", METRICS]).unwrap();
    assert_eq!(post, "405");
    let other =
        sb.check(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:9464/"]).unwrap();
    assert_eq!(other, "404");

    // A real Prometheus, in the sandbox (its own network and /tmp), scraping every second. It
    // asks for OpenMetrics first, so its parser reads that format.
    sb.write_file("/tmp/prometheus/prometheus.yml", PROMETHEUS_YML, 0o644).unwrap();
    sb.check([
        "systemd-run",
        "--unit=ipcluster-test-prometheus",
        "--",
        "/usr/bin/prometheus",
        "--config.file=/tmp/prometheus/prometheus.yml",
        "--storage.tsdb.path=/tmp/prometheus/data",
        "--web.listen-address=127.0.0.1:9090",
    ])
    .unwrap();
    let timeout = Duration::from_secs(30);
    wait_query(&sb, "up{job=\"ipclusterd\"}", 1.0, timeout);
    wait_query(&sb, "count(ipcluster_worker_resident_memory_bytes{state=\"live\"})", 4.0, timeout);
    wait_query(&sb, "sum(ipcluster_generation_info{app=\"web\",state=\"live\"})", 1.0, timeout);
    wait_query(&sb, "ipcluster_deploys_total{app=\"web\",result=\"ok\"}", 1.0, timeout);
    wait_query(&sb, "count(ipcluster_build_info)", 1.0, timeout);
    // Prometheus negotiated OpenMetrics: it knows the families by their OpenMetrics names
    // (`ipcluster_deploys`, not the text format's `ipcluster_deploys_total`) and types.
    let metadata = sb.check(["curl", "-sS", "http://127.0.0.1:9090/api/v1/metadata"]).unwrap();
    let metadata: serde_json::Value = serde_json::from_str(&metadata).unwrap();
    for (family, kind) in [
        ("ipcluster_deploys", "counter"),
        ("ipcluster_build", "info"),
        ("ipcluster_cutover_duration_seconds", "histogram"),
        ("ipcluster_worker_resident_memory_bytes", "gauge"),
    ] {
        assert_eq!(metadata["data"][family][0]["type"], kind, "{family}: {metadata}");
    }

    // A deploy: the counter moves, generation 3 is the live one, and generation 2's workers
    // are counted as retired, not live (their old series went stale).
    let started = Instant::now();
    sb.check(["ipclusterctl", "deploy", "web"]).unwrap();
    wait_query(&sb, "ipcluster_deploys_total{app=\"web\",result=\"ok\"}", 2.0, timeout);
    wait_query(
        &sb,
        "count(ipcluster_worker_resident_memory_bytes{state=\"live\",generation=\"3\"})",
        4.0,
        timeout,
    );
    // The README's first example query.
    wait_query(&sb, "count by (app) (ipcluster_worker_resident_memory_bytes{state=\"live\"})", 4.0, timeout);
    wait_query(
        &sb,
        "count(ipcluster_worker_cpu_seconds_total{state=\"retired\",generation=\"2\"})",
        4.0,
        timeout,
    );
    wait_query(&sb, "sum(ipcluster_generation_info{app=\"web\",state=\"live\"})", 1.0, timeout);
    wait_query(&sb, "ipcluster_cutover_duration_seconds_count{app=\"web\"}", 2.0, timeout);
    // A failed deploy counts as failed.
    let failed = sb.run([
        "ipclusterctl",
        "deploy",
        "web",
        "--command",
        "/usr/local/bin/ipcluster-demo",
        "--exit-at-start",
        "3",
    ]);
    assert_eq!(failed.unwrap().status.code(), Some(1));
    wait_query(&sb, "ipcluster_deploys_total{app=\"web\",result=\"failed\"}", 1.0, timeout);
    // The README's second one (increase() extrapolates, so at least 1).
    let failed_per_hour = "sum by (app) (increase(ipcluster_deploys_total{result=\"failed\"}[1h]))";
    wait_query_for(&sb, failed_per_hour, ">= 1", |v| v >= 1.0, timeout);
    eprintln!("Prometheus followed a deploy and a failed deploy in {:?}", started.elapsed());

    // An app removed (stopped, its file gone): its series leave /metrics, its history row stays.
    sb.check(["ipclusterctl", "stop", "web"]).unwrap();
    sb.check(["rm", "/etc/ipcluster/apps/web.toml"]).unwrap();
    sb.check(["systemctl", "reload", "ipclusterd"]).unwrap();
    let (_, body) = curl(&sb, &[]);
    let web: Vec<&str> = body.lines().filter(|l| l.contains("app=\"web\"")).collect();
    assert!(!web.is_empty() && web.iter().all(|l| l.starts_with("ipcluster_generation_info{")), "{web:#?}");
}
