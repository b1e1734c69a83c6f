//! Socket mode (`routing = "socket"`): the daemon binds the public sockets, hands each worker its
//! band's, and an eBPF program steers each connection — no NAT rule, no worker port. Proven with
//! real clients: stickiness, what the worker sees, deploys and rollbacks under load, a worker
//! killed with connections queued on its socket, retired workers reaped with theirs, daemon
//! restarts and crashes, and a host without bpffs.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpStream},
    sync::LazyLock,
    time::Duration,
};

use ipcluster_e2e::{
    Sandbox, assert_all_ok,
    bus::live_by_band,
    client::{self, Load, loopback_sources},
    cluster,
    fixture::Demo,
    journal_with, netns, text, wait_for,
};

/// The app most scenarios here deploy.
static WEB: LazyLock<String> =
    LazyLock::new(|| Demo::new(4).listen(&["0.0.0.0:80", "[::]:8080"]).socket().ready_timeout("10s").toml());

const PUBLIC: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 80);
const SECOND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080);

/// `n` loopback sources whose address falls in `band` of 4.
fn sources_of_band(band: u8, n: u8) -> Vec<Ipv4Addr> {
    (0..n).map(|i| Ipv4Addr::new(127, 0, 1, i * 4 + band)).collect()
}

/// Opens a connection from each source and sends one request on it, without reading the answer:
/// with the worker stopped, the connections and their requests wait in its socket's queue.
fn queue_requests(sb: &Sandbox, sources: Vec<Ipv4Addr>) -> Vec<TcpStream> {
    sb.in_netns(move || {
        sources
            .into_iter()
            .map(|src| {
                let mut s = client::connect(src, PUBLIC).expect("the kernel completes the handshake");
                s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").unwrap();
                s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
                s
            })
            .collect()
    })
    .unwrap()
}

/// (generation, band, pid) of the answer on each connection, or why there was none.
fn answers(streams: Vec<TcpStream>) -> Vec<Result<(u64, u32, u32), String>> {
    streams
        .into_iter()
        .map(|mut s| {
            let mut body = String::new();
            s.read_to_string(&mut body).map_err(|e| e.to_string())?;
            let get = |k: &str| {
                body.split_whitespace().find_map(|kv| kv.strip_prefix(k)).and_then(|v| v.parse().ok())
            };
            match (get("generation="), get("band="), get("pid=")) {
                (Some(g), Some(b), Some(p)) => Ok((g, b as u32, p as u32)),
                _ => Err(format!("no answer: {body:?}")),
            }
        })
        .collect()
}

/// What the kernel and the daemon said about queued connections, for a failure message: the
/// migration and listen-queue counters of the sandbox's namespace and the daemon's last lines.
fn why_lost(sb: &Sandbox) -> String {
    let counters = sb
        .check([
            "nstat",
            "-asz",
            "TcpExtTCPMigrateReq*",
            "TcpExtListen*",
            "TcpExtSyncookies*",
            "TcpExtTCPAbort*",
        ])
        .unwrap_or_else(|e| e.to_string());
    let journal = sb
        .check(["journalctl", "-u", "ipclusterd", "-o", "cat", "--no-pager", "-n", "30"])
        .unwrap_or_default();
    format!("kernel counters:\n{counters}\nthe daemon's last lines:\n{journal}")
}

fn signal(sb: &Sandbox, sig: &str, pid: u32) {
    sb.check(["kill", &format!("-{sig}"), &pid.to_string()]).unwrap();
}

/// Stops `pid` and waits until every thread of it is stopped. A signal is delivered
/// asynchronously, and each thread stops on its own: the demo worker's accept thread, woken in
/// `accept()` by the stop, takes a connection that arrived before it got the CPU (the kernel
/// looks at the queue before the pending signal) and stops with it accepted, where no other
/// socket can take it over. Waiting for the main thread alone lost "queued connection 0" to
/// a reset on a loaded CI machine.
fn stop(sb: &Sandbox, pid: u32) {
    signal(sb, "STOP", pid);
    wait_for("every thread of the worker to stop", Duration::from_secs(5), || {
        let tasks = std::fs::read_dir(sb.host_path(format!("/proc/{pid}/task"))).ok()?;
        let mut states = Vec::new();
        for t in tasks {
            let stat = std::fs::read_to_string(t.ok()?.path().join("stat")).ok()?;
            states.push(stat.rsplit_once(") ")?.1.starts_with('T'));
        }
        (!states.is_empty() && states.iter().all(|s| *s)).then_some(())
    });
}

#[test]
fn clients_stick_to_their_band_with_no_nat_rule_and_no_worker_port() {
    let (sb, bus) = cluster(&[("web", WEB.as_str())]);
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    let rows = bus.list_workers("web");
    let by_band = live_by_band(&rows);
    assert!(rows.iter().all(|w| w.ports.is_empty()), "no worker port: {rows:?}");
    let answers = sb
        .in_netns(|| {
            let mut out = Vec::new();
            for src in loopback_sources(32) {
                for dst in [PUBLIC, SECOND] {
                    out.push((src, dst, client::get(src, dst)));
                }
            }
            out
        })
        .unwrap();
    for (src, dst, answer) in answers {
        let a = answer.unwrap_or_else(|e| panic!("request from {src} to {dst} failed: {e:?}"));
        let band = u32::from(src) & 3;
        assert_eq!((a.band, a.pid), (band, by_band[&band]), "{src} → {dst} reached the wrong worker");
        assert_eq!(a.peer, src.to_string(), "the worker sees the client's own address");
    }
    let nat = ipcluster_e2e::nat_rules(&sb);
    assert!(!nat.contains("REDIRECT"), "no NAT rule: {nat}");
    // Every listening socket of the workers is a public one, handed at fd 3 and 4.
    let listening = sb.check(["ss", "-Htlnp"]).unwrap();
    let demo: Vec<&str> = listening.lines().filter(|l| l.contains("ipcluster-demo")).collect();
    assert_eq!(demo.len(), 8, "{listening}");
    for l in demo {
        assert!(
            (l.contains("0.0.0.0:80 ") && l.contains("fd=3"))
                || (l.contains("*:8080 ") && l.contains("fd=4")),
            "{l}"
        );
    }
    let env = ipcluster_e2e::environ(&sb, by_band[&0]);
    assert!(env.contains(&"LISTEN_FDS=2".to_owned()), "{env:?}");
    assert!(env.contains(&"LISTEN_FDNAMES=0.0.0.0_80:[__]_8080".to_owned()), "{env:?}");
    assert!(env.contains(&format!("LISTEN_PID={}", by_band[&0])), "{env:?}");
}

/// Another host over a veth pair (IPv4 and IPv6 sources) and IPv6 sources on the sandbox
/// itself, against one dual-stack entry: each client lands on its band's worker (an IPv6
/// source's band is the low bits of its last 32 bits), which sees the client's own address.
#[test]
fn clients_of_another_host_and_ipv6_clients_stick_to_their_band() {
    let dual = WEB.replace("[\"0.0.0.0:80\", \"[::]:8080\"]", "[\"[::]:80\"]");
    let (sb, bus) = cluster(&[("web", &dual)]);
    let v4: Vec<String> = (4..12).map(|i| format!("10.9.0.{i}")).collect();
    let v6: Vec<String> = (4..12).map(|i| format!("fd09::{i:x}")).collect();
    let clients: Vec<&str> = v4.iter().chain(&v6).map(String::as_str).collect();
    netns::client_namespace(&sb, &["fd09::1"], &clients);
    let local: Vec<Ipv6Addr> = client::ipv6_sources("fd00::7:0:0".parse().unwrap(), 16);
    netns::add_addresses(&sb, false, "lo", &local.iter().map(|a| format!("{a}/128")).collect::<Vec<_>>());
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    let by_band = live_by_band(&bus.list_workers("web"));
    let band_of = |ip: IpAddr| match ip {
        IpAddr::V4(a) => u32::from(a) & 3,
        IpAddr::V6(a) => (u128::from(a) as u32) & 3,
    };
    for src in &clients {
        let url = if src.contains(':') {
            "http://[fd09::1]/".to_owned()
        } else {
            format!("http://{}/", netns::SERVER_V4)
        };
        let body = netns::curl(&sb, src, &url).unwrap_or_else(|e| panic!("{src} → {url}: {e:?}"));
        let band = band_of(src.parse().unwrap());
        assert_eq!(netns::field(&body, "band"), band.to_string(), "{src}: {body}");
        assert_eq!(netns::field(&body, "pid"), by_band[&band].to_string(), "{src}: {body}");
        assert_eq!(netns::field(&body, "peer"), *src, "the worker sees the client's own address");
    }
    let answers = sb
        .in_netns(move || {
            local
                .iter()
                .map(|s| (*s, client::get(*s, SocketAddr::from((Ipv6Addr::LOCALHOST, 80)))))
                .collect::<Vec<_>>()
        })
        .unwrap();
    for (src, answer) in answers {
        let a = answer.unwrap_or_else(|e| panic!("request from {src} failed: {e:?}"));
        let band = band_of(src.into());
        assert_eq!((a.band, a.pid), (band, by_band[&band]), "{src}");
        assert_eq!(a.peer, src.to_string());
    }
}

#[test]
fn deploys_and_rollbacks_under_load_fail_no_request_and_keep_established_connections() {
    // The app starts in NAT mode: the first socket-mode cutover also removes its rules.
    let nat = WEB.replace("routing = \"socket\"", "routing = \"nat\"").replace(", \"[::]:8080\"", "");
    let (sb, bus) = cluster(&[("web", &nat)]);
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    let mut held = sb.in_netns(|| client::connect(Ipv4Addr::new(127, 0, 0, 41), PUBLIC).unwrap()).unwrap();
    let first = client::request(&mut held).unwrap();
    // Changed settings apply to the next generation after a reload.
    sb.write_file("/etc/ipcluster/apps/web.toml", WEB.as_str(), 0o644).unwrap();
    sb.check(["systemctl", "reload", "ipclusterd"]).unwrap();
    let load = Load::start(&sb, loopback_sources(16), PUBLIC);
    std::thread::sleep(Duration::from_millis(300));
    for expected in 2..=4u64 {
        assert_eq!(bus.deploy_plain("web"), Ok(expected));
        let fresh = sb.in_netns(|| client::get(Ipv4Addr::new(127, 0, 0, 9), PUBLIC)).unwrap().unwrap();
        assert_eq!(fresh.generation, expected, "new connections reach the new generation at once");
        let again = client::request(&mut held).expect("the established connection is still served");
        assert_eq!((again.pid, again.generation), (first.pid, 1));
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(!ipcluster_e2e::nat_rules(&sb).contains("REDIRECT"), "the NAT generation's rules are gone");
    let out = sb.run(["ipclusterctl", "rollback", "web"]).unwrap();
    assert!(text(&out).contains("generation 3 is live again"), "{}", text(&out));
    std::thread::sleep(Duration::from_millis(300));
    let outcomes = load.finish();
    assert!(outcomes.len() > 100, "the load ran ({} requests)", outcomes.len());
    assert_all_ok(&outcomes);
    let last: BTreeSet<u64> =
        outcomes.iter().rev().take(16).map(|(_, r)| r.as_ref().unwrap().generation).collect();
    assert_eq!(last, BTreeSet::from([3]), "after the rollback, generation 3 serves");
    // The cutover is logged with its duration; how long it takes (< 1 ms in socket mode) is a
    // speed target, judged by `cargo xtask bench`, not by a timed test.
    journal_with(&sb, "ipclusterd", "web: cutover to generation 4 in ");
}

#[test]
fn a_killed_worker_hands_its_queued_connections_to_a_neighbour_and_refuses_none() {
    let (sb, bus) = cluster(&[("web", WEB.as_str())]);
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    let by_band = live_by_band(&bus.list_workers("web"));
    let victim = by_band[&2];
    // Stopped, it accepts nothing: twelve connections of its band wait on its socket.
    stop(&sb, victim);
    let queued = queue_requests(&sb, sources_of_band(2, 12));
    signal(&sb, "KILL", victim);
    for (i, a) in answers(queued).into_iter().enumerate() {
        let (g, band, pid) =
            a.unwrap_or_else(|e| panic!("queued connection {i} was lost: {e}\n{}", why_lost(&sb)));
        // Band 2 of 4 falls back to band 0, as the NAT rules would send it.
        assert_eq!((g, band, pid), (1, 0, by_band[&0]), "queued connection {i}");
    }
    let respawned = wait_for("band 2 to be respawned", Duration::from_secs(15), || {
        let rows = bus.list_workers("web");
        rows.iter().find(|w| w.band == 2 && w.state == "live" && w.pid != victim).map(|w| w.pid)
    });
    let back = wait_for("band 2 to be steered to its new worker", Duration::from_secs(5), || {
        let a = sb.in_netns(|| client::get(Ipv4Addr::new(127, 0, 1, 2), PUBLIC)).unwrap().ok()?;
        (a.pid == respawned).then_some(a)
    });
    assert_eq!(back.band, 2);
}

#[test]
fn reaped_retired_workers_hand_their_queued_connections_to_the_live_generation() {
    let (sb, bus) = cluster(&[("web", WEB.as_str())]);
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    let old = live_by_band(&bus.list_workers("web"))[&3];
    stop(&sb, old);
    let queued = queue_requests(&sb, sources_of_band(3, 12));
    assert_eq!(bus.deploy_plain("web"), Ok(2));
    let new = live_by_band(&bus.list_workers("web"))[&3];
    // Stopped, it ignores SIGTERM: SIGKILL after stop_timeout closes its socket.
    assert_eq!(bus.kill_retired("web"), Ok(4));
    for (i, a) in answers(queued).into_iter().enumerate() {
        let got = a.unwrap_or_else(|e| panic!("queued connection {i} was lost: {e}\n{}", why_lost(&sb)));
        assert_eq!(got, (2, 3, new), "queued connection {i} is served by generation 2's band 3");
    }
}

#[test]
fn restarts_and_crashes_of_the_daemon_keep_the_steering_and_every_request() {
    let (sb, bus) = cluster(&[("web", WEB.as_str())]);
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    assert_eq!(bus.deploy_plain("web"), Ok(2));
    let before = bus.list_workers("web");
    let load = Load::start(&sb, loopback_sources(16), PUBLIC);
    for round in 0..3 {
        let old = sb.main_pid("ipclusterd").unwrap();
        if round == 1 {
            sb.check(["systemctl", "kill", "--kill-whom=main", "-s", "KILL", "ipclusterd"]).unwrap();
        } else {
            sb.check(["systemctl", "restart", "ipclusterd"]).unwrap();
        }
        wait_for("the daemon to come back", Duration::from_secs(15), || {
            let pid = sb.main_pid("ipclusterd").ok()?;
            let active = sb.check(["systemctl", "is-active", "ipclusterd"]).ok()?;
            (pid != 0 && pid != old && active.trim() == "active").then_some(())
        });
        let pids = |rows: &[ipcluster_e2e::bus::WorkerRow]| {
            rows.iter().map(|w| (w.generation, w.band, w.pid, w.state.clone())).collect::<BTreeSet<_>>()
        };
        assert_eq!(pids(&bus.list_workers("web")), pids(&before), "round {round}: every worker adopted");
        std::thread::sleep(Duration::from_millis(300));
    }
    // Still managed: the rollback is the same switch, the next deploy a new generation.
    assert_eq!(bus.call::<_, u64>("Rollback", &("web", 0u64)), Ok(1));
    assert_eq!(bus.deploy_plain("web"), Ok(3));
    std::thread::sleep(Duration::from_millis(300));
    let outcomes = load.finish();
    assert_all_ok(&outcomes);
    let gens: BTreeMap<u64, u64> =
        outcomes.iter().filter_map(|(_, r)| r.as_ref().ok()).fold(BTreeMap::new(), |mut m, a| {
            *m.entry(a.generation).or_default() += 1;
            m
        });
    assert!(gens.keys().all(|g| [1, 2, 3].contains(g)), "{gens:?}");
}

#[test]
fn the_unit_mounts_a_missing_bpffs_and_a_program_that_cannot_load_changes_nothing() {
    let nat = WEB.replace("routing = \"socket\"", "routing = \"nat\"").replace(", \"[::]:8080\"", "");
    let (sb, bus) = cluster(&[("web", WEB.as_str()), ("other", &nat.replace(":80\"", ":81\""))]);
    // A host where systemd did not mount bpffs (a container): the unit mounts it before the daemon.
    sb.check(["umount", "/sys/fs/bpf"]).unwrap();
    sb.check(["systemctl", "restart", "ipclusterd"]).unwrap();
    let fs = sb.check(["stat", "-f", "-c", "%T", "/sys/fs/bpf"]).unwrap();
    assert_eq!(fs.trim(), "bpf_fs", "mounted where every later daemon sees it");
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    assert_eq!(bus.call::<_, ()>("StopApp", &("web",)), Ok(()));

    // A kernel that will not load the program (here: bpf(2) denied to the daemon).
    sb.write_file(
        "/etc/systemd/system/ipclusterd.service.d/no-bpf.conf",
        "[Service]\nSystemCallFilter=~bpf\nSystemCallErrorNumber=EPERM\n",
        0o644,
    )
    .unwrap();
    sb.check(["systemctl", "daemon-reload"]).unwrap();
    sb.check(["systemctl", "restart", "ipclusterd"]).unwrap();
    let before = bus.list_generations("web");
    let e = bus.deploy_plain("web").unwrap_err();
    assert_eq!(e.name, "org.ipcluster1.Error.DeployFailed");
    assert!(e.message.contains("cannot load the steering program for 0.0.0.0:80"), "{}", e.message);
    assert_eq!(bus.list_generations("web"), before, "no generation was added");
    assert!(bus.list_workers("web").is_empty());
    let units = sb.check(["systemctl", "list-units", "--no-legend", "ipcluster-web-*"]).unwrap();
    assert!(units.trim().is_empty(), "no scope: {units}");
    journal_with(&sb, "ipclusterd", "cannot load the steering program");
    // NAT mode does not need it.
    assert_eq!(bus.deploy_plain("other"), Ok(1));
}
