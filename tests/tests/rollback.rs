//! Rollback: back to the generation that was live before — the same workers in one
//! transaction while they run, else what it ran as a new generation.

use std::{
    collections::{BTreeSet, HashMap},
    net::{Ipv4Addr, SocketAddrV4},
    sync::LazyLock,
    time::Duration,
};

use ipcluster_e2e::{
    bus::opt,
    client::{self, Load, loopback_sources},
    cluster,
    fixture::Demo,
    text, wait_for,
};

/// The app most scenarios here deploy.
static WEB: LazyLock<String> = LazyLock::new(|| Demo::new(4).ready_timeout("10s").toml());

const PUBLIC: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 80);

#[test]
fn a_rollback_under_load_is_instant_with_the_same_workers_and_fails_no_request() {
    let (sb, bus) = cluster(&[("web", WEB.as_str())]);
    let none: Result<u64, _> = bus.call("Rollback", &("web", 0u64));
    assert_eq!(none.unwrap_err().name, "org.ipcluster1.Error.NoSuchGeneration", "nothing to roll back to");
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    let first: BTreeSet<u32> = bus.list_workers("web").iter().map(|w| w.pid).collect();
    // A long-lived connection to generation 1, kept across both cutovers.
    let mut held = sb.in_netns(|| client::connect(Ipv4Addr::new(127, 0, 0, 3), PUBLIC).unwrap()).unwrap();
    let held_pid = client::request(&mut held).unwrap().pid;
    assert!(first.contains(&held_pid));
    assert_eq!(bus.deploy_plain("web"), Ok(2));
    let load = Load::start(&sb, loopback_sources(16), PUBLIC);
    std::thread::sleep(Duration::from_millis(300));
    let out = sb.run(["ipclusterctl", "rollback", "web"]).unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("web: generation 1 is live again (rolled back: the same workers)"),
        "{}",
        text(&out)
    );
    std::thread::sleep(Duration::from_millis(300));
    let outcomes = load.finish();
    assert!(outcomes.iter().all(|(_, r)| r.is_ok()), "{:?}", outcomes.iter().find(|(_, r)| r.is_err()));
    let rows = bus.list_workers("web");
    let live: BTreeSet<u32> = rows.iter().filter(|w| w.state == "live").map(|w| w.pid).collect();
    assert_eq!(live, first, "the same processes serve again");
    assert!(rows.iter().filter(|w| w.generation == 1).all(|w| w.nice == 0), "their nice value is back");
    assert!(rows.iter().filter(|w| w.generation == 2).all(|w| w.state == "retired"), "{rows:?}");
    let last = outcomes.iter().rev().take(16).map(|(_, r)| r.as_ref().unwrap().pid).collect::<BTreeSet<_>>();
    assert!(last.is_subset(&first), "new connections reach generation 1 again: {last:?}");
    assert_eq!(client::request(&mut held).unwrap().pid, held_pid, "the long-lived connection is untouched");
    let gens = bus.list_generations("web");
    let states: Vec<(u64, &str)> = gens.iter().map(|g| (g.generation, g.state.as_str())).collect();
    assert_eq!(states, [(1, "live"), (2, "retired")]);
}

#[test]
fn a_rollback_after_the_workers_were_reaped_redeploys_what_that_generation_ran() {
    let (sb, bus) = cluster(&[("web", WEB.as_str())]);
    let marked =
        HashMap::from([("command", opt(vec!["/usr/local/bin/ipcluster-demo", "--delay-ready", "1"]))]);
    assert_eq!(bus.deploy("web", marked), Ok(1));
    assert_eq!(bus.deploy_plain("web"), Ok(2));
    assert_eq!(bus.kill_retired("web"), Ok(4));
    wait_for("generation 1 to stop", Duration::from_secs(15), || {
        bus.list_workers("web").iter().all(|w| w.generation == 2).then_some(())
    });
    // Across a restart too: the daemon keeps what finished generations ran.
    sb.check(["systemctl", "restart", "ipclusterd"]).unwrap();
    let out = sb.run(["ipclusterctl", "rollback", "web", "1"]).unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("web: generation 3 starting") && text(&out).contains("web: generation 3 is live"),
        "{}",
        text(&out)
    );
    for w in bus.list_workers("web").iter().filter(|w| w.generation == 3) {
        let cmdline = sb.read_file(format!("/proc/{}/cmdline", w.pid)).unwrap().replace('\0', " ");
        assert!(cmdline.contains("--delay-ready 1"), "generation 1's command, override included: {cmdline}");
    }
    // Nothing to roll back to is said, and changes nothing.
    let out = sb.run(["ipclusterctl", "rollback", "web", "9"]).unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("no such generation"), "{}", text(&out));
}
