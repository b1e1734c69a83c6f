//! ipclusterctl against the real daemon, as an operator uses it.

use std::{sync::LazyLock, time::Duration};

use ipcluster_e2e::{bus::live_by_band, cluster, fixture::Demo, nat_rules, text, wait_for};

/// The app most scenarios here deploy.
static WEB: LazyLock<String> =
    LazyLock::new(|| Demo::new(4).args(&["--log-requests"]).ready_timeout("3s").toml());

/// A field of a JSON value, as a test would read it.
fn field<'a>(v: &'a serde_json::Value, k: &str) -> &'a serde_json::Value {
    v.get(k).unwrap_or_else(|| panic!("no {k} in {v}"))
}

#[test]
fn every_command_works_against_the_daemon() {
    let (sb, bus) = cluster(&[("web", WEB.as_str())]);
    let ctl = |args: &[&str]| {
        let mut argv = vec!["ipclusterctl"];
        argv.extend_from_slice(args);
        sb.run(argv).unwrap()
    };

    // deploy: progress on stderr, the generation on stdout.
    let out = ctl(&["deploy", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "web: generation 1 is live");
    // Progress is complete and in order: starting, then each band once, counting up.
    let progress = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = progress.lines().collect();
    assert_eq!(lines.first(), Some(&"web: generation 1 starting"), "{progress}");
    let mut bands: Vec<&str> = Vec::new();
    for (i, line) in lines[1..].iter().enumerate() {
        let band = line.strip_prefix("web: generation 1: band ").and_then(|r| r.split(' ').next());
        assert!(line.ends_with(&format!(", {} ready", i + 1)), "{progress}");
        bands.push(band.unwrap_or_else(|| panic!("not a band line: {progress}")));
    }
    bands.sort_unstable();
    assert_eq!(bands, ["0", "1", "2", "3"], "{progress}");

    // --json output matches ListWorkers.
    let out = ctl(&["--json", "workers", "web"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("workers --json is JSON");
    let rows = bus.list_workers("web");
    let arr = json.as_array().unwrap();
    assert_eq!(arr.len(), rows.len());
    for w in &rows {
        let j = arr.iter().find(|j| field(j, "pid") == w.pid).expect("every worker listed");
        assert_eq!(
            (field(j, "band"), field(j, "state"), field(j, "generation")),
            (&w.band.into(), &w.state.clone().into(), &w.generation.into())
        );
        assert_eq!(field(&field(j, "ports")[0], "worker"), &serde_json::Value::from(w.ports[0].1));
        assert_eq!(field(j, "scope"), "ipcluster-web-1.scope");
    }
    let out = ctl(&["--json", "generations"]);
    let gens: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(field(&gens[0], "state"), "live");

    // deploy --no-block returns at once with the number; the deploy goes on.
    let out = ctl(&["--json", "deploy", "web", "--no-block", "--workers", "2", "--env", "MODE=x"]);
    assert!(out.status.success(), "{}", text(&out));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (field(&j, "generation"), field(&j, "state")),
        (&serde_json::Value::from(2), &serde_json::Value::from("starting"))
    );
    wait_for("generation 2 to go live", Duration::from_secs(15), || {
        bus.list_generations("web").iter().any(|g| g.generation == 2 && g.state == "live").then_some(())
    });
    assert_eq!(live_by_band(&bus.list_workers("web")).len(), 2, "--workers 2 applied");

    // status: live first, table with the columns.
    let out = ctl(&["status", "web"]);
    let status = String::from_utf8_lossy(&out.stdout);
    for col in ["GEN", "STATE", "BAND", "PID", "PORTS", "RSS", "CPU", "NICE", "AGE"] {
        assert!(status.contains(col), "{col} missing: {status}");
    }
    assert!(!status.contains('\x1b'), "no colors when not on a terminal");
    let worker_lines: Vec<&str> = status.lines().skip_while(|l| !l.contains("BAND")).skip(1).collect();
    assert!(worker_lines[0].contains("live") && worker_lines.last().unwrap().contains("retired"), "{status}");

    // A failing deploy exits 1 with the daemon's message.
    let out = ctl(&["deploy", "web", "--command", "/usr/local/bin/ipcluster-demo", "--exit-at-start", "4"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("deploy failed: web generation 3: band") && text(&out).contains("status 4"),
        "{}",
        text(&out)
    );
    let out = ctl(&["deploy", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("no such app"), "{}", text(&out));
    // With --json, the same failures as the D-Bus error name and the daemon's message, on stdout.
    let json_error = |args: &[&str], name: &str, message: &str| {
        let out = ctl(args);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(out.stderr.is_empty(), "{}", text(&out));
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON error");
        assert_eq!(field(&j, "error"), name, "{j}");
        assert!(field(&j, "message").as_str().unwrap().starts_with(message), "{j}");
    };
    json_error(&["--json", "deploy", "nope"], "org.ipcluster1.Error.NoSuchApp", "no app \"nope\"");
    json_error(
        &["--json", "deploy", "web", "--workers", "3"],
        "org.freedesktop.DBus.Error.InvalidArgs",
        "Deploy options: workers: 3: must be a power of two",
    );
    json_error(
        &["--json", "deploy", "web", "--command", "/usr/local/bin/ipcluster-demo", "--exit-at-start", "4"],
        "org.ipcluster1.Error.DeployFailed",
        "web generation 4: band",
    );

    // retire, kill-retired, generations.
    let out = ctl(&["retire", "web", "2"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = ctl(&["--json", "kill-retired"]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(field(&j, "stopping"), &serde_json::Value::from(6), "4 of generation 1 and 2 of generation 2");
    let out = ctl(&["generations", "web"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("ipcluster-web-5.scope"));

    // logs: the workers' journal.
    sb.in_netns(|| {
        ipcluster_e2e::client::get(
            std::net::Ipv4Addr::new(127, 0, 0, 5),
            "127.0.0.1:80".parse::<std::net::SocketAddr>().unwrap(),
        )
    })
    .unwrap()
    .unwrap();
    // The worker's line reaches the journal a moment after the answer.
    wait_for("the request in the workers' journal", Duration::from_secs(10), || {
        text(&ctl(&["logs", "web", "5"])).contains("request from 127.0.0.5").then_some(())
    });
    let out = ctl(&["logs", "../x"]);
    assert_eq!(out.status.code(), Some(2));

    // reload and version.
    assert!(ctl(&["reload"]).status.success());
    assert_eq!(String::from_utf8_lossy(&ctl(&["version"]).stdout).trim(), env!("CARGO_PKG_VERSION"));

    // stop: no workers, no rules, and it stays stopped across a daemon restart.
    let out = ctl(&["stop", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(bus.list_workers("web").is_empty());
    assert!(!nat_rules(&sb).contains("IPC-web"), "{}", nat_rules(&sb));
    let units = sb.check(["systemctl", "list-units", "--no-legend", "ipcluster-web-*"]).unwrap();
    assert!(units.trim().is_empty(), "{units}");
    sb.write_file("/etc/ipcluster/apps/web.toml", WEB.replace("autostart = false\n", ""), 0o644).unwrap();
    sb.check(["systemctl", "restart", "ipclusterd"]).unwrap();
    assert!(bus.list_workers("web").is_empty(), "a stopped app does not autostart");
    assert!(ctl(&["deploy", "web"]).status.success(), "the next deploy starts it again");
    assert_eq!(bus.list_workers("web").len(), 4);

    // Completions and man page were installed.
    for f in [
        "/usr/local/share/man/man1/ipclusterctl.1",
        "/usr/local/share/man/man8/ipclusterd.8",
        "/usr/local/share/bash-completion/completions/ipclusterctl",
    ] {
        assert!(sb.read_file(f).is_ok_and(|t| !t.is_empty()), "{f} not installed");
    }
}

#[test]
fn check_config_reports_every_invalid_value_with_its_location() {
    let sb = ipcluster_e2e::installed_sandbox();
    let cases = [
        ("good", "command = [\"/x\"]\nlisten = [\"0.0.0.0:80\"]\n", None),
        (
            "a",
            "command = [\"/x\"]\nlisten = [\"0.0.0.0:80\"]\nworkers = 3\n",
            Some("a.toml:3:11: workers: 3: must be a power of two"),
        ),
        (
            "b",
            "command = [\"/x\"]\nlisten = [\"0.0.0.0:80\"]\nready = \"https\"\n",
            Some("b.toml:3:9: ready: \"https\": must be \"tcp\", \"notify\" or \"http\""),
        ),
        (
            "c",
            "command = [\"/x\"]\nlisten = [\"localhost:80\"]\n",
            Some("c.toml:2:10: listen: \"localhost:80\" is not \"address:port\""),
        ),
        (
            "d",
            "command = [\"/x\"]\nlisten = [\"0.0.0.0:80\"]\nstop_timeout = \"soon\"\n",
            Some("d.toml:3:16: stop_timeout: \"soon\" is not a duration"),
        ),
        (
            "e",
            "command = [\"/x\"]\nlisten = [\"0.0.0.0:80\"]\nretire_nice = 25\n",
            Some("e.toml:3:15: retire_nice: 25: must be 0..=19"),
        ),
        (
            "f",
            "command = [\"/x\"]\nlisten = [\"0.0.0.0:80\"]\nfoo = 1\n",
            Some("f.toml:3:1: foo: unknown key `foo`"),
        ),
        (
            "Bad-Name",
            "command = [\"/x\"]\nlisten = [\"0.0.0.0:80\"]\n",
            Some("Bad-Name.toml: the file name gives the app name"),
        ),
    ];
    for (name, body, _) in &cases {
        sb.write_file(format!("/etc/ipcluster/apps/{name}.toml"), body, 0o644).unwrap();
    }
    let out = sb.run(["ipclusterctl", "check-config"]).unwrap();
    assert_eq!(out.status.code(), Some(1));
    let all = text(&out);
    for (name, _, expected) in &cases {
        match expected {
            None => assert!(all.contains(&format!("/etc/ipcluster/apps/{name}.toml: ok")), "{all}"),
            Some(e) => assert!(all.contains(e), "expected {e:?} in:\n{all}"),
        }
    }
    let good = sb.run(["ipclusterctl", "check-config", "/etc/ipcluster/apps/good.toml"]).unwrap();
    assert!(good.status.success(), "{}", text(&good));
    let json = sb.run(["ipclusterctl", "--json", "check-config", "/etc/ipcluster/apps/a.toml"]).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(field(&v[0], "ok"), false);
}
