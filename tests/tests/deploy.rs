//! Deploys: generations in transient scopes, sticky NAT routing, atomic zero-downtime cutover,
//! retirement and reaping, failed deploys, and bad input. Each test runs its own sandbox.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{Ipv4Addr, SocketAddrV4},
    sync::LazyLock,
    time::{Duration, Instant},
};

use ipcluster_e2e::{
    bus::{Bus, live_by_band, opt},
    client::{self, Load, loopback_sources},
    cluster, environ,
    fixture::Demo,
    journal_with, nat_rules, text, thread_nices, wait_for,
};

/// The app most scenarios here deploy.
static WEB: LazyLock<String> = LazyLock::new(|| Demo::new(4).ready_timeout("3s").toml());

const PUBLIC: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 80);

fn pids(rows: &[ipcluster_e2e::bus::WorkerRow], generation: u64) -> BTreeSet<u32> {
    rows.iter().filter(|w| w.generation == generation).map(|w| w.pid).collect()
}

#[test]
fn deploy_runs_one_worker_per_band_in_its_own_scope() {
    let (sb, bus) = cluster(&[("web", WEB.as_str())]);
    assert_eq!(bus.deploy_plain("web"), Ok(1));

    let workers = bus.list_workers("web");
    assert_eq!(workers.len(), 4, "{workers:?}");
    let bands: BTreeSet<u32> = workers.iter().map(|w| w.band).collect();
    assert_eq!(bands, BTreeSet::from([0, 1, 2, 3]));
    let mut ports = BTreeSet::new();
    for w in &workers {
        assert_eq!(
            (w.app.as_str(), w.generation, w.state.as_str(), w.scope.as_str()),
            ("web", 1, "live", "ipcluster-web-1.scope")
        );
        assert_eq!(w.ports.len(), 1);
        assert_eq!(w.ports[0].0, 80);
        assert!(ports.insert(w.ports[0].1), "port {} reused", w.ports[0].1);
        assert!(w.rss > 0, "RSS of {} is 0", w.pid);
        assert_eq!(w.nice, 0, "live workers are not reniced");
        // Identity and hygiene of the environment.
        let env = environ(&sb, w.pid);
        for expected in [
            "IPCLUSTER_APP=web".to_owned(),
            "IPCLUSTER_GENERATION=1".to_owned(),
            format!("IPCLUSTER_BAND={}", w.band),
            "IPCLUSTER_BANDS=4".to_owned(),
            format!("PORT={}", w.ports[0].1),
            format!("IPCLUSTER_PORTS=80:{}", w.ports[0].1),
        ] {
            assert!(env.contains(&expected), "{expected} missing in {env:?}");
        }
        for leaked in ["NOTIFY_SOCKET=", "WATCHDOG_", "LISTEN_", "INVOCATION_ID=", "JOURNAL_STREAM="] {
            assert!(!env.iter().any(|e| e.starts_with(leaked)), "{leaked} leaked into {env:?}");
        }
    }

    // The workers are exactly the processes of the generation's scope, in the app's slice.
    // Read inside: cgroup.procs shows PIDs of the reader's PID namespace.
    // Every worker is in the generation's scope, in a cgroup of its own (so stopping it stops
    // whatever it forks).
    let in_scope: BTreeSet<u32> = pids(&workers, 1)
        .into_iter()
        .filter(|p| ipcluster_e2e::cgroup_of(&sb, *p) == ipcluster_e2e::worker_cgroup("web", 1, *p))
        .collect();
    assert_eq!(in_scope, pids(&workers, 1));
    let status = sb.check(["systemctl", "status", "--no-pager", "ipcluster-web-1.scope"]).unwrap();
    assert!(status.contains("active (running)"), "{status}");
    for pid in &in_scope {
        assert!(status.contains(&pid.to_string()), "pid {pid} not in {status}");
    }
    assert_eq!(
        bus.list_generations("web")
            .into_iter()
            .map(|g| (g.app, g.generation, g.state, g.workers, g.scope))
            .collect::<Vec<_>>(),
        [("web".to_owned(), 1, "live".to_owned(), 4, "ipcluster-web-1.scope".to_owned())]
    );

    // Worker output reaches the journal under the scope's unit, not through the daemon.
    wait_for("worker lines in the scope's journal", Duration::from_secs(15), || {
        let j = sb.check(["journalctl", "-u", "ipcluster-web-1.scope", "-o", "cat", "--no-pager"]).ok()?;
        (j.matches("listening on").count() == 4).then_some(())
    });
    let ident = sb.check(["journalctl", "-t", "web", "-o", "cat", "--no-pager"]).unwrap();
    assert!(ident.contains("listening on"), "identifier is the app name: {ident}");

    // STATUS= summarises.
    let status = sb.check(["systemctl", "show", "-p", "StatusText", "--value", "ipclusterd"]).unwrap();
    assert_eq!(status.trim(), "1 apps, 4 live workers, 0 retired workers");
    let apps = ipcluster_e2e::manager_property(&sb, "Apps");
    assert_eq!(apps, "as 1 \"web\"");
}

#[test]
fn each_client_address_sticks_to_the_worker_of_its_band() {
    let (sb, bus) = cluster(&[("web", WEB.as_str())]);
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    let by_band = live_by_band(&bus.list_workers("web"));
    let answers = sb
        .in_netns(|| {
            let mut out = Vec::new();
            for src in loopback_sources(32) {
                for _ in 0..3 {
                    out.push((src, client::get(src, PUBLIC)));
                }
            }
            out
        })
        .unwrap();
    let mut seen: BTreeMap<Ipv4Addr, BTreeSet<u32>> = BTreeMap::new();
    for (src, answer) in answers {
        let a = answer.unwrap_or_else(|e| panic!("request from {src} failed: {e:?}"));
        let band = u32::from(src) & 3;
        assert_eq!(a.band, band, "{src} reached band {} instead of {band}", a.band);
        assert_eq!(a.pid, by_band[&band], "{src} reached pid {} instead of band {band}'s", a.pid);
        assert_eq!(a.peer, src.to_string(), "the worker sees the client's own address");
        seen.entry(src).or_default().insert(a.pid);
    }
    assert!(seen.values().all(|p| p.len() == 1), "a source reached two workers: {seen:?}");
    let used: BTreeSet<u32> = seen.values().flatten().copied().collect();
    assert_eq!(used.len(), 4, "all four workers serve");
}

#[test]
fn redeploys_under_load_drop_nothing_and_keep_established_connections() {
    let (sb, bus) = cluster(&[("web", WEB.as_str())]);
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    // Eight long-lived keep-alive connections, opened before any redeploy.
    let mut long_lived = sb
        .in_netns(|| {
            (40..48u8)
                .map(|i| {
                    let src = Ipv4Addr::new(127, 0, 0, i);
                    let mut s = client::connect(src, PUBLIC).expect("connect");
                    let first = client::request(&mut s).expect("first request");
                    (s, first)
                })
                .collect::<Vec<_>>()
        })
        .unwrap();
    let load = Load::start(&sb, loopback_sources(16), PUBLIC);
    std::thread::sleep(Duration::from_millis(300));
    for expected in 2..=4u64 {
        assert_eq!(bus.deploy_plain("web"), Ok(expected));
        // New connections reach the new generation as soon as Deploy returns.
        let fresh = sb.in_netns(|| client::get(Ipv4Addr::new(127, 0, 0, 9), PUBLIC)).unwrap().unwrap();
        assert_eq!(fresh.generation, expected);
        for (s, first) in &mut long_lived {
            let again = client::request(s).expect("established connection still served");
            assert_eq!((again.pid, again.generation), (first.pid, 1), "an established connection moved");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let outcomes = load.finish();
    let failures: Vec<_> = outcomes.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(outcomes.len() > 100, "the load ran ({} requests)", outcomes.len());
    assert!(failures.is_empty(), "{} of {} requests failed: {failures:?}", failures.len(), outcomes.len());
    let gens = bus.list_generations("web");
    let states: Vec<(u64, &str)> = gens.iter().map(|g| (g.generation, g.state.as_str())).collect();
    assert_eq!(states, [(1, "retired"), (2, "retired"), (3, "retired"), (4, "live")]);
}

#[test]
fn retired_workers_are_reniced_then_reaped_by_sigusr1_and_kill_retired() {
    let (sb, bus) = cluster(&[("web", WEB.as_str())]);
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    // Retiring the live generation first deploys its replacement.
    assert_eq!(bus.retire("web", 1), Ok(()));
    let rows = bus.list_workers("web");
    let (old, live) = (pids(&rows, 1), pids(&rows, 2));
    assert_eq!((old.len(), live.len()), (4, 4));
    for w in &rows {
        let expected = if w.generation == 1 { ("retired", 5) } else { ("live", 0) };
        assert_eq!((w.state.as_str(), w.nice), expected, "{w:?}");
        let nices = thread_nices(&sb, w.pid);
        assert!(
            !nices.is_empty() && nices.iter().all(|n| *n == expected.1),
            "pid {} threads: {nices:?}",
            w.pid
        );
    }
    // Retiring it again changes nothing.
    assert_eq!(bus.retire("web", 1), Ok(()));
    assert_eq!(pids(&bus.list_workers("web"), 1), old);

    sb.check(["systemctl", "kill", "-s", "USR1", "ipclusterd"]).unwrap();
    wait_for("retired workers to stop", Duration::from_secs(15), || {
        pids(&bus.list_workers("web"), 1).is_empty().then_some(())
    });
    for pid in &old {
        assert!(!sb.host_path(format!("/proc/{pid}")).exists(), "retired pid {pid} still runs");
    }
    assert_eq!(pids(&bus.list_workers("web"), 2), live, "live workers untouched");
    assert_eq!(sb.check(["systemctl", "is-active", "ipclusterd"]).unwrap().trim(), "active");
    wait_for("the empty scope to go", Duration::from_secs(15), || {
        let units =
            sb.check(["systemctl", "list-units", "--all", "--no-legend", "ipcluster-web-1.scope"]).ok()?;
        units.trim().is_empty().then_some(())
    });
    let gens = bus.list_generations("web");
    assert!(gens.iter().any(|g| g.generation == 1 && g.state == "stopped" && g.workers == 0), "{gens:?}");

    // A worker that ignores SIGTERM is SIGKILLed after stop_timeout (2 s).
    let stubborn =
        HashMap::from([("command", opt(vec!["/usr/local/bin/ipcluster-demo", "--ignore-sigterm"]))]);
    assert_eq!(bus.deploy("web", stubborn), Ok(3));
    assert_eq!(bus.deploy_plain("web"), Ok(4));
    let stubborn_pids = pids(&bus.list_workers("web"), 3);
    let start = Instant::now();
    assert_eq!(bus.kill_retired("web"), Ok(8), "generations 2 and 3 (4 workers each) are retired");
    // They ignore SIGTERM: still there, stopping, until stop_timeout (2 s from the signal).
    std::thread::sleep(Duration::from_millis(300));
    let still = pids(&bus.list_workers("web"), 3);
    assert_eq!(still, stubborn_pids, "SIGTERM-ignoring workers are still there before stop_timeout");
    assert!(bus.list_workers("web").iter().filter(|w| w.generation == 3).all(|w| w.state == "stopping"));
    wait_for("SIGKILL after stop_timeout", Duration::from_secs(15), || {
        pids(&bus.list_workers("web"), 3).is_empty().then_some(())
    });
    assert!(start.elapsed() >= Duration::from_secs(2), "killed before stop_timeout: {:?}", start.elapsed());
    journal_with(&sb, "ipclusterd", "reaped (killed by signal SIGKILL)");
    assert_eq!(bus.kill_retired(""), Ok(0), "nothing left to reap");
}

#[test]
fn failed_deploys_leave_the_previous_generation_serving_and_no_scope() {
    let (sb, bus) = cluster(&[("web", WEB.as_str())]);
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    let load = Load::start(&sb, loopback_sources(8), PUBLIC);

    let exits =
        HashMap::from([("command", opt(vec!["/usr/local/bin/ipcluster-demo", "--exit-at-start", "3"]))]);
    let e = bus.deploy("web", exits).unwrap_err();
    assert_eq!(e.name, "org.ipcluster1.Error.DeployFailed", "{e:?}");
    assert!(e.message.contains("band ") && e.message.contains("exited with status 3"), "{e:?}");

    let hangs = HashMap::from([("command", opt(vec!["/usr/local/bin/ipcluster-demo", "--never-ready"]))]);
    let start = Instant::now();
    let e = bus.deploy("web", hangs).unwrap_err();
    assert_eq!(e.name, "org.ipcluster1.Error.DeployFailed", "{e:?}");
    assert!(e.message.contains("band 0: not ready after 3s"), "{e:?}");
    assert!(start.elapsed() >= Duration::from_secs(3));

    let missing = HashMap::from([("command", opt(vec!["/nonexistent/program"]))]);
    let e = bus.deploy("web", missing).unwrap_err();
    assert_eq!(e.name, "org.ipcluster1.Error.DeployFailed", "{e:?}");
    assert!(e.message.contains("exited with status 127"), "{e:?}");

    let outcomes = load.finish();
    assert!(
        outcomes.iter().all(|(_, r)| matches!(r, Ok(a) if a.generation == 1)),
        "{:?}",
        outcomes.iter().find(|(_, r)| !matches!(r, Ok(a) if a.generation == 1))
    );
    let states: Vec<(u64, String)> =
        bus.list_generations("web").into_iter().map(|g| (g.generation, g.state)).collect();
    assert_eq!(
        states,
        [(1, "live".into()), (2, "failed".into()), (3, "failed".into()), (4, "failed".into())]
    );
    let units =
        sb.check(["systemctl", "list-units", "--all", "--no-legend", "--plain", "ipcluster-web-*"]).unwrap();
    let units: Vec<&str> = units.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(units, ["ipcluster-web-1.scope"], "no scope of a failed generation is left");
    assert_eq!(pids(&bus.list_workers("web"), 1).len(), 4);
    assert!(sb.check(["systemctl", "list-units", "--failed", "--no-legend"]).unwrap().trim().is_empty());
}

/// Workers (app, generation, band, pid, state, ports) and generations (app, generation, state,
/// workers): ListWorkers and ListGenerations without the numbers that move on their own.
type Snapshot = (Vec<(String, u64, u32, u32, String, Vec<(u16, u16)>)>, Vec<(String, u64, String, u32)>);

fn snapshot(bus: &Bus) -> Snapshot {
    (
        bus.list_workers("")
            .into_iter()
            .map(|w| (w.app, w.generation, w.band, w.pid, w.state, w.ports))
            .collect(),
        bus.list_generations("").into_iter().map(|g| (g.app, g.generation, g.state, g.workers)).collect(),
    )
}

#[test]
fn bad_input_gets_the_documented_error_and_changes_nothing() {
    let bad_file = "command = [\"/usr/local/bin/ipcluster-demo\"]\nlisten = [\"0.0.0.0:81\"]\nworkers = 6\n";
    let (sb, bus) = cluster(&[("web", WEB.as_str()), ("bad", bad_file)]);
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    let before = (snapshot(&bus), nat_rules(&sb));
    let err = |r: Result<u64, ipcluster_e2e::bus::CallError>| r.unwrap_err().name;

    assert_eq!(err(bus.deploy_plain("nope")), "org.ipcluster1.Error.NoSuchApp");
    assert_eq!(err(bus.deploy_plain("../x")), "org.freedesktop.DBus.Error.InvalidArgs");
    assert_eq!(err(bus.deploy_plain("web;reboot")), "org.freedesktop.DBus.Error.InvalidArgs");
    assert_eq!(err(bus.deploy_plain(&"a".repeat(10_000))), "org.freedesktop.DBus.Error.InvalidArgs");
    let invalid = bus.deploy_plain("bad").unwrap_err();
    assert_eq!(invalid.name, "org.ipcluster1.Error.InvalidConfig");
    assert!(
        invalid.message.contains("/etc/ipcluster/apps/bad.toml:3:11: workers: 6: must be a power of two"),
        "{invalid:?}"
    );
    for (key, value) in [
        ("workers", opt("4")),
        ("workers", opt(3u32)),
        ("command", opt("/bin/sh")),
        ("environment", opt(vec!["NOT_K_V"])),
        ("working_directory", opt(7u32)),
        ("colour", opt("blue")),
    ] {
        let e = bus.deploy("web", HashMap::from([(key, value)])).unwrap_err();
        assert_eq!(e.name, "org.freedesktop.DBus.Error.InvalidArgs", "{key}: {e:?}");
    }
    let wrong_sig: Result<u64, _> = bus.call("Deploy", &("web", "x"));
    assert_eq!(wrong_sig.unwrap_err().name, "org.freedesktop.DBus.Error.InvalidArgs");
    let e: Result<(), _> = bus.retire("web", 0);
    assert_eq!(e.unwrap_err().name, "org.ipcluster1.Error.NoSuchGeneration");
    assert_eq!(bus.retire("web", 99).unwrap_err().name, "org.ipcluster1.Error.NoSuchGeneration");
    assert_eq!(bus.retire("nope", 1).unwrap_err().name, "org.ipcluster1.Error.NoSuchApp");
    assert_eq!(bus.kill_retired("nope").unwrap_err().name, "org.ipcluster1.Error.NoSuchApp");
    let e: Result<Vec<ipcluster_e2e::bus::WorkerRow>, _> = bus.call("ListWorkers", &("../etc",));
    assert_eq!(e.unwrap_err().name, "org.freedesktop.DBus.Error.InvalidArgs");

    // A deploy while one is in progress is Busy.
    std::thread::scope(|s| {
        let slow = s.spawn(|| {
            bus.deploy(
                "web",
                HashMap::from([("command", opt(vec!["/usr/local/bin/ipcluster-demo", "--never-ready"]))]),
            )
        });
        wait_for("the slow deploy to start", Duration::from_secs(15), || {
            bus.list_generations("web").iter().any(|g| g.state == "starting").then_some(())
        });
        assert_eq!(err(bus.deploy_plain("web")), "org.ipcluster1.Error.Busy");
        assert_eq!(slow.join().unwrap().unwrap_err().name, "org.ipcluster1.Error.DeployFailed");
    });

    let (workers, gens) = snapshot(&bus);
    assert_eq!(workers, before.0.0, "workers changed");
    assert_eq!(gens.iter().filter(|g| g.2 != "failed").cloned().collect::<Vec<_>>(), before.0.1);
    assert_eq!(nat_rules(&sb), before.1, "rules changed");
    assert_eq!(sb.check(["systemctl", "is-active", "ipclusterd"]).unwrap().trim(), "active");
}

#[test]
fn only_ipclusterd_chains_change_and_other_rules_survive() {
    let sb = ipcluster_e2e::installed_sandbox();
    for rule in [
        vec!["-N", "FOREIGN"],
        vec!["-A", "FOREIGN", "-p", "tcp", "--dport", "9999", "-j", "RETURN"],
        vec!["-A", "PREROUTING", "-j", "FOREIGN"],
        vec!["-A", "OUTPUT", "-p", "tcp", "--dport", "9998", "-j", "ACCEPT"],
    ] {
        let mut argv = vec!["iptables", "-t", "nat"];
        argv.extend(rule);
        sb.check(argv).unwrap();
    }
    let before = nat_rules(&sb);
    sb.write_file("/etc/ipcluster/apps/web.toml", WEB.as_str(), 0o644).unwrap();
    sb.check(["systemctl", "start", "ipclusterd"]).unwrap();
    let bus = Bus::connect(&sb);
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    assert_eq!(bus.deploy_plain("web"), Ok(2));
    let after = nat_rules(&sb);
    for line in before.lines() {
        assert!(after.contains(line), "rule of other software lost: {line}\n{after}");
    }
    for line in after.lines().filter(|l| !before.contains(*l)) {
        assert!(line.contains("IPCLUSTER") || line.contains("IPC-web"), "unexpected rule: {line}");
    }
    let ours: Vec<&str> = after.lines().filter(|l| l.starts_with("-A IPC-web")).collect();
    let ports: BTreeSet<u16> =
        bus.list_workers("web").iter().filter(|w| w.generation == 2).map(|w| w.ports[0].1).collect();
    assert_eq!(ours.len(), 4, "{after}");
    for l in ours {
        let port: u16 = l.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(ports.contains(&port), "rule points at a port of generation 2: {l}");
    }
    // The daemon stopping leaves rules (and workers) in place.
    sb.check(["systemctl", "stop", "ipclusterd"]).unwrap();
    assert_eq!(nat_rules(&sb), after);
    let out = sb.in_netns(|| client::get(Ipv4Addr::new(127, 0, 0, 2), PUBLIC)).unwrap();
    assert_eq!(out.map(|a| a.generation), Ok(2), "still served without the daemon");
}

#[test]
fn introspection_matches_the_shipped_xml() {
    let (_sb, bus) = cluster(&[]);
    let live = bus.introspect();
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../dbus/org.ipcluster1.Manager.xml"))
            .unwrap();
    let iface = |xml: &str| -> String {
        let start = xml.find("<interface name=\"org.ipcluster1.Manager\">").expect("interface present");
        let end = xml[start..].find("</interface>").unwrap() + start;
        xml[start..end].split_whitespace().collect::<Vec<_>>().join(" ")
    };
    assert_eq!(
        iface(&live),
        iface(&shipped),
        "dbus/org.ipcluster1.Manager.xml is out of date (cargo xtask dbus-xml):\n{live}"
    );
    let _ = text;
}

#[test]
fn autostart_apps_are_live_when_start_returns_and_reload_picks_up_new_files() {
    let auto = WEB.replace("autostart = false\n", "");
    let (sb, bus) = cluster(&[("web", &auto)]);
    // Type=notify: `systemctl start` returned only after READY=1, sent once autostart finished.
    let rows = bus.list_workers("web");
    assert_eq!(rows.iter().filter(|w| w.generation == 1 && w.state == "live").count(), 4, "{rows:?}");

    // A new valid file and an invalid one; reload starts the valid one and skips the other.
    let api = auto.replace("0.0.0.0:80", "0.0.0.0:8080").replace("workers = 4", "workers = 2");
    sb.write_file("/etc/ipcluster/apps/api.toml", api, 0o644).unwrap();
    sb.write_file("/etc/ipcluster/apps/broken.toml", "command = \"not an array\"\n", 0o644).unwrap();
    sb.check(["systemctl", "reload", "ipclusterd"]).unwrap();
    wait_for("api to autostart", Duration::from_secs(15), || {
        (bus.list_workers("api").iter().filter(|w| w.state == "live").count() == 2).then_some(())
    });
    let answer = sb
        .in_netns(|| client::get(Ipv4Addr::new(127, 0, 0, 3), SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080)));
    assert_eq!(answer.unwrap().map(|a| (a.app, a.band)), Ok(("api".to_owned(), 1)));
    journal_with(&sb, "ipclusterd", "broken.toml:1:11: command: invalid type");
    assert_eq!(bus.deploy_plain("broken").unwrap_err().name, "org.ipcluster1.Error.InvalidConfig");
    assert_eq!(pids(&bus.list_workers("web"), 1).len(), 4, "web untouched by the reload");
    let apps = ipcluster_e2e::manager_property(&sb, "Apps");
    assert_eq!(apps, "as 2 \"api\" \"web\"");
}

#[test]
fn workers_run_as_the_configured_user_in_the_configured_directory() {
    let web = WEB.replace("autostart = false\n", "autostart = false\nuser = \"nobody\"\nworking_directory = \"/srv\"\nenvironment = { MODE = \"test\" }\n");
    let (sb, bus) = cluster(&[("web", &web)]);
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    let nobody = sb.check(["id", "-u", "nobody"]).unwrap().trim().to_owned();
    for w in bus.list_workers("web") {
        let status = sb.read_file(format!("/proc/{}/status", w.pid)).unwrap();
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned();
        assert_eq!(uid, nobody, "pid {} runs as uid {uid}", w.pid);
        let groups = status.lines().find_map(|l| l.strip_prefix("Groups:")).unwrap().trim().to_owned();
        assert!(groups.is_empty(), "supplementary groups dropped: {groups:?}");
        let cwd = std::fs::read_link(sb.host_path(format!("/proc/{}/cwd", w.pid))).unwrap();
        assert_eq!(cwd, std::path::Path::new("/srv"));
        assert!(environ(&sb, w.pid).contains(&"MODE=test".to_owned()));
    }
    // The workers' output still reaches the journal as an unprivileged user.
    wait_for("journal lines of the unprivileged workers", Duration::from_secs(15), || {
        let j = sb.check(["journalctl", "-u", "ipcluster-web-1.scope", "-o", "cat", "--no-pager"]).ok()?;
        j.contains("listening on").then_some(())
    });
    let unknown = WEB.replace("autostart = false\n", "autostart = false\nuser = \"nosuchuser\"\n");
    sb.write_file("/etc/ipcluster/apps/ghost.toml", unknown.replace("0.0.0.0:80", "0.0.0.0:81"), 0o644)
        .unwrap();
    sb.check(["systemctl", "reload", "ipclusterd"]).unwrap();
    let e = bus.deploy_plain("ghost").unwrap_err();
    assert_eq!(e.name, "org.ipcluster1.Error.InvalidConfig");
    assert!(e.message.contains("user \"nosuchuser\" does not exist"), "{e:?}");
}
