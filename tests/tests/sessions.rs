//! Sessions that survive deploys (issue 23), with Socket.IO's own server and client from npm:
//! long-polling clients, every request on a new TCP connection from the client's own address,
//! keep the worker that holds their session through deploys, a daemon restart and a `kill -9`
//! of the daemon, until they go idle; clients that arrive after a deploy go to the new
//! generation; an old generation stops by itself once its clients are gone. In NAT mode the
//! records are ipsets; in socket mode the steering program's map.
//!
//! The npm packages come from `cargo xtask test` (`$IPCLUSTER_NODE_MODULES`); the app and the
//! clients are `tests/node/`. Both are shown read-only inside the sandbox.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use ipcluster_e2e::{Sandbox, bus::Bus, installed_sandbox_with, netns, text, wait_for};
use serde::Deserialize;

/// How long a client's session outlives its last connection.
const AFFINITY_SECS: u64 = 6;

fn node_modules() -> PathBuf {
    std::env::var_os("IPCLUSTER_NODE_MODULES").map(PathBuf::from).unwrap_or_else(|| {
        panic!("$IPCLUSTER_NODE_MODULES is not set: run the tests with cargo xtask test (it installs Socket.IO from npm)")
    })
}

fn scripts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("node")
}

/// What one client saw (`tests/node/clients.js`).
#[derive(Debug, Deserialize)]
struct Client {
    src: String,
    connects: u32,
    ticks: u32,
    failed: Vec<String>,
    pids: Vec<u32>,
    generations: Vec<u64>,
}

struct Sticky {
    sb: Sandbox,
    bus: Bus,
    modules: PathBuf,
    clients_js: PathBuf,
}

/// A sandbox running the Socket.IO app `web` (4 workers, `session_affinity`, on `listen`,
/// `routing`), not deployed yet.
fn sticky(listen: &str, routing: &str) -> Sticky {
    let sb = installed_sandbox_with(vec![node_modules(), scripts()]);
    let modules = sb.inside(node_modules()).unwrap();
    let server = sb.inside(scripts().join("server.js")).unwrap();
    let clients_js = sb.inside(scripts().join("clients.js")).unwrap();
    let app = format!(
        "command = [\"/usr/bin/node\", {server:?}]\nworkers = 4\nlisten = [{listen}]\nrouting = \"{routing}\"\n\
         session_affinity = \"{AFFINITY_SECS}s\"\nenvironment = {{ NODE_PATH = {modules:?} }}\n\
         autostart = false\nready_timeout = \"30s\"\nstop_timeout = \"2s\"\n"
    );
    sb.write_file("/etc/ipcluster/apps/web.toml", app, 0o644).unwrap();
    sb.check(["systemctl", "start", "ipclusterd"]).unwrap();
    let bus = Bus::connect(&sb);
    Sticky { sb, bus, modules, clients_js }
}

impl Sticky {
    /// Starts clients from `sources` (in the client namespace with `netns`) against `url` for
    /// `seconds`.
    fn clients(&self, netns: bool, url: &str, seconds: u64, sources: &[String]) -> Child {
        let mut argv: Vec<String> =
            if netns { ["ip", "netns", "exec", "cli"].map(String::from).to_vec() } else { vec![] };
        argv.extend(["env".into(), format!("NODE_PATH={}", self.modules.display()), "node".into()]);
        argv.push(self.clients_js.display().to_string());
        argv.extend([url.to_owned(), seconds.to_string()]);
        argv.extend(sources.iter().cloned());
        self.sb.command(&argv).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    }

    fn state(&self, g: u64) -> String {
        self.bus
            .list_generations("web")
            .into_iter()
            .find(|x| x.generation == g)
            .map(|x| x.state)
            .unwrap_or_default()
    }

    fn sessions(&self, g: u64) -> Option<u32> {
        let rows: Vec<(String, u64, u32)> = self.bus.call("ListSessions", &("web",)).unwrap();
        rows.into_iter().find(|r| r.1 == g).map(|r| r.2)
    }
}

fn results(child: Child) -> Vec<Client> {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "clients failed: {}", text(&out));
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
}

/// Every client kept one session on one worker of `generation` the whole time.
fn all_kept(clients: &[Client], generation: u64) {
    let sources: BTreeSet<&str> = clients.iter().map(|c| c.src.as_str()).collect();
    assert_eq!(sources.len(), clients.len(), "one client per source address");
    for c in clients {
        assert!(c.failed.is_empty() && c.connects == 1, "{c:?}");
        assert!(c.ticks > 5, "it really ticked: {c:?}");
        assert_eq!((c.pids.len(), c.generations.as_slice()), (1, &[generation][..]), "{c:?}");
    }
}

fn loopback(range: std::ops::RangeInclusive<u8>) -> Vec<String> {
    range.map(|i| format!("127.0.0.{i}")).collect()
}

#[test]
fn nat_sessions_survive_deploys_a_restart_and_a_killed_daemon() {
    survive("nat");
}

#[test]
fn socket_mode_sessions_survive_deploys_a_restart_and_a_killed_daemon() {
    survive("socket");
}

/// 32 IPv4 clients of this host and 4 IPv6 clients of another keep their sessions through 3
/// deploys, a restart and a `kill -9` of the daemon; newcomers go to the live generation; the
/// old generations stop by themselves once their clients are idle.
fn survive(routing: &str) {
    let s = sticky("\"[::]:80\"", routing);
    netns::client_namespace(&s.sb, &["fd09::1"], &["fd09::20", "fd09::21", "fd09::22", "fd09::23"]);
    assert_eq!(s.bus.deploy_plain("web"), Ok(1));
    let started = Instant::now();
    let v4 = s.clients(false, "http://127.0.0.1/", 22, &loopback(32..=63));
    let v6_sources: Vec<String> = (0x20..=0x23).map(|i| format!("fd09::{i:x}")).collect();
    let v6 = s.clients(true, "http://[fd09::1]/", 22, &v6_sources);
    wait_for("the clients' sessions", Duration::from_secs(10), || (s.sessions(1) >= Some(36)).then_some(()));
    // Three deploys, a restart and a kill -9 of the daemon while the sessions go on.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(s.bus.deploy_plain("web"), Ok(2));
    assert_eq!(s.state(1), "draining");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(s.bus.deploy_plain("web"), Ok(3));
    s.sb.check(["systemctl", "restart", "ipclusterd"]).unwrap();
    assert_eq!(s.state(1), "draining", "adopted as draining");
    std::thread::sleep(Duration::from_secs(2));
    let old = s.sb.main_pid("ipclusterd").unwrap();
    s.sb.check(["systemctl", "kill", "--kill-whom=main", "-s", "KILL", "ipclusterd"]).unwrap();
    // Until systemd saw it die, the unit is still active and the dying process may still own
    // the bus name (a call then gets NoReply): wait for its successor's pid.
    wait_for("the daemon to come back", Duration::from_secs(15), || {
        let pid = s.sb.main_pid("ipclusterd").ok()?;
        s.sb.check(["systemctl", "is-active", "ipclusterd"]).ok().filter(|o| o.trim() == "active")?;
        (pid != 0 && pid != old).then_some(())
    });
    assert_eq!(s.state(1), "draining", "adopted as draining after the kill");
    assert_eq!(s.bus.deploy_plain("web"), Ok(4));
    // Newcomers go to the live generation.
    let late = s.clients(false, "http://127.0.0.1/", 4, &loopback(64..=71));
    all_kept(&results(late), 4);
    let (v4, v6) = (results(v4), results(v6));
    all_kept(&v4, 1);
    all_kept(&v6, 1);
    let pids: BTreeSet<u32> = v4.iter().flat_map(|c| c.pids.iter().copied()).collect();
    assert_eq!(pids.len(), 4, "each band's worker served its own clients: {pids:?}");
    // Every generation but the live one is idle now: they stop by themselves.
    let idle = Instant::now();
    let stopped = || (1..=3).all(|g| s.state(g) == "stopped");
    while !stopped() && idle.elapsed() < Duration::from_secs(AFFINITY_SECS + 10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    if !stopped() {
        let states: Vec<(u64, String, Option<u32>)> =
            (1..=4).map(|g| (g, s.state(g), s.sessions(g))).collect();
        let journal =
            s.sb.check(["journalctl", "-u", "ipclusterd", "-o", "cat", "--no-pager"]).unwrap_or_default();
        panic!(
            "the old generations did not stop within {AFFINITY_SECS}s + 10 s: (generation, state, records) {states:?}\n{journal}"
        );
    }
    println!(
        "{routing}: {} + {} clients kept their sessions for {:.0?} through 3 deploys, a restart and a kill -9; the old generations stopped {:.1?} after the clients went idle (session_affinity {AFFINITY_SECS}s)",
        v4.len(),
        v6.len(),
        idle - started,
        idle.elapsed()
    );
    assert_eq!(s.state(4), "live");
    if routing != "nat" {
        return;
    }
    // The rules of the last one to stop go shortly after it (with the next rule sync).
    wait_for("only the live generation's sets to be left", Duration::from_secs(5), || {
        let sets = s.sb.check(["ipset", "list", "-n"]).unwrap();
        (sets.lines().filter(|l| l.starts_with("ipc")).count() == 2).then_some(())
    });
}

#[test]
fn kill_retired_sends_a_draining_generations_clients_to_the_live_one() {
    kill_retired("nat");
}

#[test]
fn in_socket_mode_kill_retired_sends_a_draining_generations_clients_to_the_live_one() {
    kill_retired("socket");
}

fn kill_retired(routing: &str) {
    let s = sticky("\"0.0.0.0:80\"", routing);
    assert_eq!(s.bus.deploy_plain("web"), Ok(1));
    let who = |src: &str| -> u64 {
        let out =
            s.sb.check(["curl", "-sS", "--interface", src, "-m", "5", "http://127.0.0.1/who"])
                .unwrap_or_else(|e| {
                    let rules = s.sb.check(["iptables-save"]).unwrap_or_default();
                    let sets = s.sb.check(["ipset", "list"]).unwrap_or_default();
                    let ss = s.sb.check(["ss", "-ltnp"]).unwrap_or_default();
                    panic!("{e}\n{rules}\n{sets}\n{ss}")
                });
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["generation"].as_u64().unwrap()
    };
    assert_eq!(who("127.0.0.9"), 1, "recorded in generation 1");
    assert_eq!(s.bus.deploy_plain("web"), Ok(2));
    assert_eq!((who("127.0.0.9"), who("127.0.0.10")), (1, 2), "the old client sticks, a new one goes to 2");
    assert_eq!(s.bus.kill_retired("web").map(|n| n > 0), Ok(true));
    wait_for("generation 1 to stop", Duration::from_secs(10), || (s.state(1) == "stopped").then_some(()));
    assert_eq!(who("127.0.0.9"), 2, "its client now goes to the live generation");
}
