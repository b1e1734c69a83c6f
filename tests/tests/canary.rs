//! Canary deploys and HTTP health checks (issue 24), end to end: a canary of 1 of 8 bands
//! serves exactly the clients of that band while the rest stay on the live generation, with no
//! failed request; promote moves the rest; a canary whose workers answer 500 to the health path
//! rolls itself back, and one that crashes too; `--canary-for` promotes a healthy one, and a
//! `kill -9` of the daemon keeps the split and the deadline; a live worker that starts answering
//! 500 is replaced after `health_failures` checks.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use ipcluster_e2e::{
    Sandbox,
    bus::Bus,
    client::{self, Load, loopback_sources},
    cluster,
    fixture::{DEMO, Demo},
    journal_with, text, wait_for,
};

const PUBLIC: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 80);

/// 8 bands of the demo worker with health checks every second.
fn web(routing_socket: bool) -> String {
    let d = Demo::new(8)
        .args(&["--unhealthy-if", "/run/sick"])
        .ready_timeout("10s")
        .with("health_path = \"/healthz\"")
        .with("health_interval = \"1s\"")
        .with("health_failures = 3");
    if routing_socket { d.socket().toml() } else { d.toml() }
}

/// One request from each of `sources`: the generation that answered, by source.
fn generations(sb: &Sandbox, sources: &[Ipv4Addr]) -> BTreeMap<Ipv4Addr, u64> {
    let sources = sources.to_vec();
    sb.in_netns(move || {
        sources.iter().map(|s| (*s, client::get(*s, PUBLIC).map(|a| a.generation).unwrap_or(0))).collect()
    })
    .unwrap()
}

/// Generation `g`'s state ("" while the daemon does not answer: restarting).
fn state(bus: &Bus, g: u64) -> String {
    let rows: Result<Vec<ipcluster_bus::GenerationRow>, _> = bus.call("ListGenerations", &("web",));
    rows.ok().and_then(|r| r.into_iter().find(|x| x.generation == g)).map(|x| x.state).unwrap_or_default()
}

fn ctl(sb: &Sandbox, args: &[&str]) -> (Option<i32>, String) {
    let out = sb.run(std::iter::once("ipclusterctl").chain(args.iter().copied())).unwrap();
    (out.status.code(), text(&out))
}

fn split(routing_socket: bool) {
    let (sb, bus) = cluster(&[("web", &web(routing_socket))]);
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    let sources = loopback_sources(32);
    let load = Load::start(&sb, sources.clone(), PUBLIC);
    std::thread::sleep(Duration::from_millis(300));
    let (code, out) = ctl(&sb, &["deploy", "web", "--canary", "1"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("web: generation 2 is a canary on 1 bands"), "{out}");
    assert_eq!(state(&bus, 2), "canary");
    assert_eq!(state(&bus, 1), "live");
    let seen = generations(&sb, &sources);
    for (src, g) in &seen {
        let band = u32::from(src.octets()[3]) & 7;
        assert_eq!(*g, if band == 0 { 2 } else { 1 }, "{src} (band {band}): {seen:?}");
    }
    let canary_workers: Vec<u32> =
        bus.list_workers("web").iter().filter(|w| w.generation == 2).map(|w| w.band).collect();
    assert_eq!(canary_workers, [0], "only band 0 started");
    let (code, out) = ctl(&sb, &["promote", "web"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("web: generation 2 is live (promoted)"), "{out}");
    std::thread::sleep(Duration::from_millis(300));
    let outcomes = load.finish();
    let failed: Vec<_> = outcomes.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        outcomes.len(),
        failed.first()
    );
    assert!(generations(&sb, &sources).values().all(|g| *g == 2));
    assert_eq!(state(&bus, 1), "retired");
    println!(
        "{} requests from 32 sources, none failed, through a canary of 1 of 8 bands and its promotion",
        outcomes.len()
    );
}

#[test]
fn a_canary_of_one_band_serves_exactly_its_clients_and_promote_moves_the_rest() {
    split(false);
}

#[test]
fn in_socket_mode_a_canary_of_one_band_serves_exactly_its_clients_and_promote_moves_the_rest() {
    split(true);
}

#[test]
fn a_canary_answering_500_or_crashing_rolls_back_by_itself() {
    rolls_back(false);
}

/// Socket mode: the checks reach the canary's own workers through the probe path (the public
/// address would reach the live generation's, which answer 200).
#[test]
fn in_socket_mode_a_canary_answering_500_or_crashing_rolls_back_by_itself() {
    rolls_back(true);
}

fn rolls_back(routing_socket: bool) {
    let (sb, bus) = cluster(&[("web", &web(routing_socket))]);
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    // The canary's workers answer 500 to the health path (its own --unhealthy-if names a file
    // that exists): rolled back at its first failed check, long before canary_for.
    let sick = ["--command", DEMO, "--unhealthy-if", "/"];
    let started = Instant::now();
    let (code, out) =
        ctl(&sb, &[&["deploy", "web", "--canary", "2", "--canary-for", "10min"][..], &sick].concat());
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("web: generation 2 is a canary on 2 bands"), "{out}");
    assert!(out.contains("the canary was rolled back") && out.contains("HTTP 500"), "{out}");
    assert!(started.elapsed() < Duration::from_secs(30));
    wait_for("generation 2 to stop", Duration::from_secs(10), || (state(&bus, 2) == "stopped").then_some(()));
    assert!(generations(&sb, &loopback_sources(16)).values().all(|g| *g == 1));
    // One that crashes 1.5 s after it is ready.
    let crash = ["--command", DEMO, "--exit-after", "1500"];
    let (code, out) =
        ctl(&sb, &[&["deploy", "web", "--canary", "1", "--canary-for", "10min"][..], &crash].concat());
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("the canary was rolled back") && out.contains("exited"), "{out}");
    assert!(generations(&sb, &loopback_sources(16)).values().all(|g| *g == 1));
    journal_with(&sb, "ipclusterd", "canary generation 2 rolled back (rolled back by itself");
}

#[test]
fn canary_for_promotes_a_healthy_canary_and_a_killed_daemon_keeps_the_split_and_the_deadline() {
    let (sb, bus) = cluster(&[("web", &web(false))]);
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    let options = std::collections::HashMap::from([
        ("canary", ipcluster_e2e::bus::opt(2u32)),
        ("canary_for", ipcluster_e2e::bus::opt(8u64)),
    ]);
    assert_eq!(bus.deploy("web", options), Ok(2));
    let cut = Instant::now();
    sb.check(["systemctl", "kill", "--kill-whom=main", "-s", "KILL", "ipclusterd"]).unwrap();
    let bus = Bus::connect(&sb);
    wait_for("the daemon to come back with the canary", Duration::from_secs(15), || {
        let active = sb.check(["systemctl", "is-active", "ipclusterd"]).ok()?;
        (active.trim() == "active" && state(&bus, 2) == "canary").then_some(())
    });
    let sources = loopback_sources(16);
    let seen = generations(&sb, &sources);
    for (src, g) in &seen {
        let band = u32::from(src.octets()[3]) & 7;
        assert_eq!(*g, if band == 0 || band == 4 { 2 } else { 1 }, "{src}: the split survived: {seen:?}");
    }
    wait_for("the canary to promote itself", Duration::from_secs(20), || {
        (state(&bus, 2) == "live").then_some(())
    });
    let took = cut.elapsed();
    assert!(
        took < Duration::from_secs(8 + 5),
        "the deadline was kept across the kill, not restarted: {took:?}"
    );
    assert!(took >= Duration::from_secs(7), "not before its time: {took:?}");
    assert!(generations(&sb, &sources).values().all(|g| *g == 2));
    println!("canary_for 8s: promoted {took:.1?} after its cutover, across a kill -9 of the daemon");
}

#[test]
fn a_live_worker_answering_500_is_replaced_after_health_failures_checks() {
    let (sb, bus) = cluster(&[("web", &web(false))]);
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    let before = bus.list_workers("web");
    let sick = before.iter().find(|w| w.band == 3).unwrap().pid;
    let load = Load::start(&sb, loopback_sources(32), PUBLIC);
    sb.write_file(format!("/run/sick.{sick}"), "", 0o644).unwrap();
    let started = Instant::now();
    let replaced = wait_for("band 3's worker to be replaced", Duration::from_secs(20), || {
        let rows = bus.list_workers("web");
        let old_retired = rows.iter().any(|w| w.pid == sick && w.state == "retired");
        let new = rows.iter().find(|w| w.band == 3 && w.state == "live" && w.pid != sick)?;
        old_retired.then_some(new.pid)
    });
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(2), "not before 3 checks a second apart: {took:?}");
    let outcomes = load.finish();
    assert!(outcomes.iter().all(|(_, r)| r.is_ok()), "{:?}", outcomes.iter().find(|(_, r)| r.is_err()));
    let others: BTreeSet<u32> =
        bus.list_workers("web").iter().filter(|w| w.state == "live" && w.band != 3).map(|w| w.pid).collect();
    let before_others: BTreeSet<u32> = before.iter().filter(|w| w.band != 3).map(|w| w.pid).collect();
    assert_eq!(others, before_others, "the other bands were left alone");
    let (code, out) = ctl(&sb, &["status", "web"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!(
            "pid {replaced}: replaced pid {sick}: 3 failed health checks in a row (HTTP 500)"
        )),
        "{out}"
    );
    println!(
        "a worker answering 500 replaced {took:.1?} after it turned sick (health_interval 1s, health_failures 3)"
    );
}
