//! A fleet (docs/fleet.md): three hosts, each a sandbox running sshd and ipclusterd, behind
//! HAProxy with `balance source`, driven as an operator would with `ipclusterctl -H` and
//! `ipclusterctl deploy --hosts`. The fleet itself is built by [`ipcluster_e2e::fleet`].

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    process::Stdio,
    time::{Duration, Instant},
};

use ipcluster_e2e::{
    fixture::Demo,
    fleet::{Fleet, HOSTS, Load, ask_all, assert_banded, band, haproxy, host_of, servers},
    text, wait_for,
};

/// A file whose presence makes `ipcluster-demo --armed-by` workers crash (on h2 only).
const CRASH: &str = "/etc/ipcluster/fleet-test-crash";

#[test]
fn a_fleet_behind_haproxy_is_controlled_over_ssh_and_deployed_host_by_host() {
    let started = Instant::now();
    let fleet = Fleet::new("web", &Demo::new(4).toml(), Vec::new());
    eprintln!("fleet up in {:?}", started.elapsed());

    let homes = remote_control(&fleet);
    eprintln!("remote control done at {:?}", started.elapsed());
    rolling_deploy_under_load(&fleet, &homes);
    eprintln!("rolling deploy done at {:?}", started.elapsed());
    draining_a_host(&fleet, &homes);
    a_failed_deploy_stops_the_roll_and_the_hosts_done_roll_back(&fleet);
    eprintln!("failed deploy done at {:?}", started.elapsed());
    an_unhealthy_generation_fails_its_pause(&fleet);
    eprintln!("unhealthy pause done at {:?}", started.elapsed());

    // Through everything, each client address kept its host.
    let now: BTreeMap<Ipv4Addr, usize> =
        ask_all(&fleet.lb).iter().map(|(c, a)| (*c, host_of(a.pid))).collect();
    assert_eq!(now, homes, "every client is on the host it started on");
    a_connection_that_breaks_exits_3_with_what_ssh_said(&fleet);
}

/// `ipclusterctl -H` against one host at a time: the same answers, errors and exit codes as on
/// the host itself. Returns each client's host, as HAProxy picks it.
fn remote_control(fleet: &Fleet) -> BTreeMap<Ipv4Addr, usize> {
    let out = fleet.ctl(&["-H", HOSTS[1], "--json", "workers", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("workers --json is JSON");
    let listed: BTreeSet<u64> = json.as_array().unwrap().iter().map(|w| w["pid"].as_u64().unwrap()).collect();
    let local: BTreeSet<u64> = fleet.buses[1].list_workers("web").iter().map(|w| u64::from(w.pid)).collect();
    assert_eq!(listed, local, "h2's workers, as h2's daemon lists them");
    assert!(listed.iter().all(|p| host_of(*p as u32) == 1), "{listed:?}");

    let out = fleet.ctl(&["--host", &format!("root@{}:22", HOSTS[1]), "status", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(status.contains("ipcluster-web-1.scope") && status.contains("live"), "{status}");

    // A deploy on h3 alone, with deploy's progress, as on the host.
    let out = fleet.ctl(&["-H", HOSTS[2], "deploy", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "web: generation 2 is live");
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(progress.starts_with("web: generation 2 starting\n"), "{progress}");
    assert!(progress.contains(", 4 ready"), "{progress}");
    assert_eq!((fleet.live(0), fleet.live(1), fleet.live(2)), (1, 1, 2));

    // Errors and exit codes as on the host.
    let out = fleet.ctl(&["-H", HOSTS[2], "deploy", "nope"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("no such app"), "{}", text(&out));
    let out = fleet.ctl(&["-H", &format!("{}:2222", HOSTS[0]), "status"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        format!(
            "ipclusterctl: cannot reach ipclusterd on {0}:2222: ssh: connect to host {0} port 2222: Connection refused",
            HOSTS[0]
        )
    );
    let out = fleet.ctl(&["-H", "nohost.invalid", "version"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let expected =
        "cannot reach ipclusterd on nohost.invalid: ssh: Could not resolve hostname nohost.invalid";
    assert!(text(&out).contains(expected), "{}", text(&out));
    let out = fleet.ctl(&["-H", HOSTS[0], "logs", "web"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("logs reads this host's journal, not 10.9.0.11's"), "{}", text(&out));
    let out = fleet.ctl(&["--host=-oProxyCommand=touch /tmp/pwned", "status"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("must not start with '-'"), "{}", text(&out));
    assert!(fleet.lb.read_file("/tmp/pwned").is_err(), "no ssh ran it");
    // Every ssh ended with its command.
    let ssh = fleet.lb.run(["pgrep", "-x", "ssh"]).unwrap();
    assert_eq!(ssh.status.code(), Some(1), "ssh processes left behind: {}", text(&ssh));

    // Each client reaches its band's worker on one host, which sees the client's own address;
    // the balancer's hash and the bands are independent: every host serves several bands.
    let homes: BTreeMap<Ipv4Addr, usize> = ask_all(&fleet.lb)
        .iter()
        .map(|(c, a)| {
            assert_banded(*c, a);
            (*c, host_of(a.pid))
        })
        .collect();
    for i in 0..HOSTS.len() {
        let bands: BTreeSet<u32> = homes.iter().filter(|(_, h)| **h == i).map(|(c, _)| band(*c)).collect();
        assert!(bands.len() >= 2, "host {i} serves bands {bands:?} of its 4: {homes:?}");
    }
    homes
}

/// `deploy --hosts` across the three under load: host by host, each after the previous one's
/// generation stayed healthy for the pause; no request fails, and every client stays on its
/// host and its band.
fn rolling_deploy_under_load(fleet: &Fleet, homes: &BTreeMap<Ipv4Addr, usize>) {
    let load = Load::start(&fleet.lb);
    load.rounds(2);
    let hosts = HOSTS.join(",");
    let out = fleet.ctl(&["deploy", "web", "--hosts", &hosts, "--pause", "1s"]);
    load.rounds(2);
    let outcomes = load.finish();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "10.9.0.11: web generation 2 is live (was 1)",
            "10.9.0.12: web generation 2 is live (was 1)",
            "10.9.0.13: web generation 3 is live (was 2)",
            "web: deployed on all 3 hosts",
        ],
        "{}",
        text(&out)
    );
    // One host at a time: each started after the previous one's pause.
    let progress = String::from_utf8_lossy(&out.stderr);
    let at = |needle: &str| progress.find(needle).unwrap_or_else(|| panic!("{needle:?} not in {progress}"));
    assert!(at("10.9.0.11: watching generation 2 for 1s") < at("10.9.0.12: deploying web"), "{progress}");
    assert!(at("10.9.0.12: watching generation 2 for 1s") < at("10.9.0.13: deploying web"), "{progress}");
    let start = |i: usize, g: u64| {
        let gens = fleet.buses[i].list_generations("web");
        gens.iter().find(|r| r.generation == g).map(|r| r.start_usec).unwrap()
    };
    assert!(start(1, 2) >= start(0, 2) + 1_000_000, "h2's deploy began after h1's pause");
    assert!(start(2, 3) >= start(1, 2) + 1_000_000, "h3's deploy began after h2's pause");

    // Zero failed requests, each client on its host and band throughout; one worker per client
    // and generation, and the load saw the old and new generation of every host.
    let failed: Vec<_> = outcomes.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(failed.is_empty(), "{} of {} requests failed: {failed:?}", failed.len(), outcomes.len());
    assert!(outcomes.len() > 200, "only {} requests", outcomes.len());
    let mut workers: BTreeMap<(Ipv4Addr, u64), BTreeSet<u32>> = BTreeMap::new();
    let mut seen: BTreeSet<(usize, u64)> = BTreeSet::new();
    for (c, r) in &outcomes {
        let a = r.as_ref().unwrap();
        assert_banded(*c, a);
        assert_eq!(host_of(a.pid), homes[c], "{c} stays on its host: {a:?}");
        workers.entry((*c, a.generation)).or_default().insert(a.pid);
        seen.insert((homes[c], a.generation));
    }
    for ((c, g), pids) in &workers {
        assert_eq!(pids.len(), 1, "{c} reached one worker of generation {g}: {pids:?}");
    }
    let expected: BTreeSet<(usize, u64)> = [(0, 1), (0, 2), (1, 1), (1, 2), (2, 2), (2, 3)].into();
    assert_eq!(seen, expected, "every host served its old, then its new generation");
    assert_eq!((fleet.live(0), fleet.live(1), fleet.live(2)), (2, 2, 3));
}

/// Draining a host as docs/fleet.md says: HAProxy's runtime API takes it out of the hash; its
/// clients move to the others, and nobody else's client moves; back in, they return.
fn draining_a_host(fleet: &Fleet, homes: &BTreeMap<Ipv4Addr, usize>) {
    let drain = "set server ipcluster/h2 state drain";
    let ready = "set server ipcluster/h2 state ready";
    let doc = ipcluster_e2e::fleet::fleet_doc();
    assert!(doc.contains(drain) && doc.contains(ready), "docs/fleet.md drains with the commands tested here");
    assert_eq!(haproxy(&fleet.lb, drain).trim(), "");
    assert_eq!(servers(&fleet.lb)["h2"].status, "DRAIN");
    for (c, a) in ask_all(&fleet.lb) {
        assert_banded(c, &a);
        let host = host_of(a.pid);
        if homes[&c] == 1 {
            assert_ne!(host, 1, "{c} left the drained host");
        } else {
            assert_eq!(host, homes[&c], "{c} did not move");
        }
    }
    assert_eq!(haproxy(&fleet.lb, ready).trim(), "");
    let back: BTreeMap<Ipv4Addr, usize> =
        ask_all(&fleet.lb).iter().map(|(c, a)| (*c, host_of(a.pid))).collect();
    assert_eq!(&back, homes, "back in, each client returns to its host");
}

/// h2's app file names a missing program: its deploy fails, which stops the roll: h3 is not
/// contacted, and with --rollback-on-failure h1 returns to the generation it had (the same
/// workers). h2 keeps its generation, as after any failed deploy.
fn a_failed_deploy_stops_the_roll_and_the_hosts_done_roll_back(fleet: &Fleet) {
    let web = Demo::new(4).toml();
    let broken = web.replace("/usr/local/bin/ipcluster-demo", "/usr/local/bin/ipcluster-missing");
    fleet.hosts[1].write_file("/etc/ipcluster/apps/web.toml", broken, 0o644).unwrap();
    let out = fleet.ctl(&["-H", HOSTS[1], "reload"]);
    assert!(out.status.success(), "{}", text(&out));
    let h1_workers = fleet.live_workers(0);
    let (h2_workers, h3_generations) = (fleet.live_workers(1), fleet.generations(2));

    let hosts = HOSTS.join(",");
    let out = fleet.ctl(&["--json", "deploy", "web", "--hosts", &hosts, "--rollback-on-failure"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("deploy --hosts --json is JSON");
    assert_eq!(json["app"], "web");
    assert_eq!(json["ok"], false);
    let r = |i: usize, key: &str| json["hosts"][i][key].clone();
    assert_eq!(r(0, "host"), HOSTS[0]);
    assert_eq!(
        (r(0, "result"), r(0, "previous"), r(0, "generation"), r(0, "live")),
        ("rolled-back".into(), 2.into(), 3.into(), 2.into()),
        "{json}"
    );
    assert_eq!(
        (r(1, "result"), r(1, "previous"), r(1, "live")),
        ("failed".into(), 2.into(), 2.into()),
        "{json}"
    );
    let error = r(1, "error");
    let error = error.as_str().unwrap_or_default();
    assert!(error.starts_with("deploy failed: web generation 3: band"), "{json}");
    assert_eq!(r(0, "known"), true, "{json}");
    assert_eq!(r(1, "known"), true, "{json}");
    assert_eq!(
        (r(2, "result"), r(2, "live"), r(2, "known")),
        ("not-reached".into(), serde_json::Value::Null, false.into()),
        "{json}"
    );

    assert_eq!(fleet.live_workers(0), h1_workers, "h1 serves with the very workers it had");
    assert_eq!(fleet.generations(0).iter().find(|(g, _)| *g == 3).unwrap().1, "retired");
    assert_eq!(fleet.live_workers(1), h2_workers, "h2 never stopped serving generation 2");
    assert_eq!(fleet.generations(1).iter().find(|(g, _)| *g == 3).unwrap().1, "failed");
    assert_eq!(fleet.generations(2), h3_generations, "h3 was not touched");
    fleet.hosts[1].write_file("/etc/ipcluster/apps/web.toml", web, 0o644).unwrap();
    assert!(fleet.ctl(&["-H", HOSTS[1], "reload"]).status.success());
}

/// A generation that goes live but loses a worker within the pause fails its host (h2, where
/// the crash is armed), which returns to its previous generation; the roll stops there. Without
/// --rollback-on-failure, h1 keeps its new generation.
fn an_unhealthy_generation_fails_its_pause(fleet: &Fleet) {
    fleet.hosts[1].write_file(CRASH, "", 0o644).unwrap();
    let h2_workers = fleet.live_workers(1);
    let h3_generations = fleet.generations(2);
    let hosts = HOSTS.join(",");
    let crashing = ["/usr/local/bin/ipcluster-demo", "--exit-after", "700", "--armed-by", CRASH];
    let mut args = vec!["deploy", "web", "--hosts", &hosts, "--pause", "2s", "--command"];
    args.extend(crashing);
    let out = fleet.ctl(&args);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{}", text(&out));
    assert_eq!(lines[0], "10.9.0.11: web generation 4 is live (was 2)");
    assert!(
        lines[1].starts_with("10.9.0.12: failed: generation 4: band ")
            && lines[1].contains("exited within the pause (exited 1)")
            && lines[1].ends_with("; generation 2 is live"),
        "{}",
        text(&out)
    );
    assert_eq!(lines[2], "10.9.0.13: not reached, untouched");
    assert_eq!(lines[3], "web: failed on 10.9.0.12: 1 deployed, 1 failed, 1 not reached");
    assert_eq!(fleet.live(0), 4, "without --rollback-on-failure, h1 keeps its new generation");
    assert_eq!(fleet.live_workers(1), h2_workers, "h2 is back on generation 2's workers");
    assert_eq!(fleet.generations(2), h3_generations, "h3 was not touched");
}

/// A connection that breaks during a call (here the bridge on h3 is killed while a deploy waits
/// for its workers) fails the command with exit status 3 and what ssh said, as an unreachable
/// host does. (The deploy itself goes on, on h3.)
fn a_connection_that_breaks_exits_3_with_what_ssh_said(fleet: &Fleet) {
    let slow = ["/usr/local/bin/ipcluster-demo", "--delay-ready", "3000"];
    let mut argv = vec!["ipclusterctl", "-H", HOSTS[2], "deploy", "web", "--command"];
    argv.extend(slow);
    let ctl = fleet.lb.command(argv).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let h3 = &fleet.hosts[2];
    let bridge = wait_for("the deploy's generation to start on h3", Duration::from_secs(10), || {
        let starting = fleet.generations(2).iter().any(|(_, state)| state == "starting");
        let pgrep = h3.run(["pgrep", "-x", "-f", "systemd-stdio-bridge"]).unwrap();
        let pid = String::from_utf8_lossy(&pgrep.stdout).trim().to_owned();
        (starting && !pid.is_empty()).then_some(pid)
    });
    h3.check(["kill", &bridge]).unwrap();
    let out = ctl.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ipclusterctl: lost the connection to ipclusterd on 10.9.0.13: "), "{stderr}");
}
