//! Worker lifecycle: memory limits, crash respawn, watchdog, paced reaping — what keeps a
//! cluster healthy for weeks without an operator.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use ipcluster_e2e::{
    Sandbox,
    bus::{Bus, opt},
    client::{self, Load},
    journal_until, journal_with, wait_for,
};

const PUBLIC: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 80);

fn app(extra: &str) -> String {
    format!(
        "command = [\"/usr/local/bin/ipcluster-demo\"]\nworkers = 4\nlisten = [\"0.0.0.0:80\"]\nautostart = false\nstop_timeout = \"2s\"\nready_timeout = \"5s\"\n{extra}"
    )
}

/// A cluster sampling every 200 ms.
fn fast_cluster(web: &str) -> (Sandbox, Bus) {
    let sb = ipcluster_e2e::installed_sandbox();
    sb.write_file("/etc/ipcluster/ipclusterd.toml", "sample_interval = \"200ms\"\n", 0o644).unwrap();
    sb.write_file("/etc/ipcluster/apps/web.toml", web, 0o644).unwrap();
    sb.check(["systemctl", "start", "ipclusterd"]).unwrap();
    let bus = Bus::connect(&sb);
    (sb, bus)
}

/// Makes the worker behind `port` allocate `mb` MiB (straight to its port: no NAT).
fn alloc(sb: &Sandbox, port: u16, mb: u32) {
    let r = sb
        .in_netns(move || {
            let mut s = client::connect(Ipv4Addr::LOCALHOST, SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))?;
            std::io::Write::write_all(
                &mut s,
                format!("GET /alloc/{mb} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes(),
            )
            .map_err(|e| client::Failure::Other(e.to_string()))?;
            let mut buf = [0u8; 512];
            std::io::Read::read(&mut s, &mut buf).map_err(|e| client::Failure::Other(e.to_string()))?;
            Ok::<_, client::Failure>(())
        })
        .unwrap();
    r.unwrap();
}

fn journal(sb: &Sandbox) -> String {
    sb.check(["journalctl", "-u", "ipclusterd", "-o", "cat", "--no-pager"]).unwrap()
}

fn no_failed_units(sb: &Sandbox) {
    let failed = sb.check(["systemctl", "list-units", "--failed", "--no-legend", "--plain"]).unwrap();
    assert!(failed.trim().is_empty(), "failed units left: {failed}");
}

#[test]
fn a_worker_over_worker_memory_max_is_replaced_without_a_failed_request() {
    let (sb, bus) = fast_cluster(&app("worker_memory_max = \"40M\"\n"));
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    let old = bus.list_workers("web").into_iter().find(|w| w.band == 2).unwrap();
    let load = Load::start(&sb, vec![Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 6)], PUBLIC);
    std::thread::sleep(Duration::from_millis(300));
    alloc(&sb, old.ports[0].1, 64);
    let new = wait_for("band 2 to be replaced", Duration::from_secs(15), || {
        bus.list_workers("web").into_iter().find(|w| w.band == 2 && w.state == "live" && w.pid != old.pid)
    });
    std::thread::sleep(Duration::from_millis(300));
    let outcomes = load.finish();
    assert!(outcomes.iter().all(|(_, r)| r.is_ok()), "{:?}", outcomes.iter().find(|(_, r)| r.is_err()));
    let pids: Vec<u32> = outcomes.iter().map(|(_, r)| r.as_ref().unwrap().pid).collect();
    assert_eq!(pids.first(), Some(&old.pid), "served by the old worker first");
    assert_eq!(pids.last(), Some(&new.pid), "then by its replacement");
    assert_eq!(new.generation, 1, "the replacement joins the same generation");
    let rows = bus.list_workers("web");
    let retired = rows.iter().find(|w| w.pid == old.pid).expect("the old worker is still there, retired");
    assert_eq!((retired.state.as_str(), retired.nice), ("retired", 5));
    journal_with(&sb, "ipclusterd", "over worker_memory_max 40 MiB; replacing it");
    assert_eq!(
        ipcluster_e2e::cgroup_of(&sb, new.pid),
        ipcluster_e2e::worker_cgroup("web", 1, new.pid),
        "replacement in the generation's scope"
    );
    no_failed_units(&sb);
}

/// RSS of a worker as ListWorkers reports it (the last sample).
fn rss_of(bus: &Bus, pid: u32) -> Option<u64> {
    bus.list_workers("web").into_iter().find(|w| w.pid == pid).map(|w| w.rss)
}

const MIB: u64 = 1 << 20;

#[test]
fn cluster_watermarks_stop_then_kill_retired_workers_most_killable_first() {
    // Deterministic by construction: memory grows while the budget is far above it, so no policy
    // acts during the growth; then one deploy brings a budget measured from the workers' sampled
    // RSS. At that cutover the whole picture changes at once, and the next sample sees it settled:
    // no verdict depends on how fast a worker allocates or how the sampler interleaves with it.
    let (sb, bus) = fast_cluster(&app("cluster_memory_max = \"64G\"\n"));
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    assert_eq!(bus.deploy_plain("web"), Ok(2));
    let rows = bus.list_workers("web");
    let by = |g: u64, band: u32| rows.iter().find(|w| w.generation == g && w.band == band).unwrap().clone();
    // Retired workers of generation 1: `big` (no connection, largest) is to be killed at 95 %;
    // `held` is larger than `mid` but holds a connection, so `mid` is stopped at 80 % before it.
    let (big, held, mid) = (by(1, 0), by(1, 1), by(1, 2));
    let port = held.ports[0].1;
    let _connection = sb
        .in_netns(move || {
            client::connect(Ipv4Addr::LOCALHOST, SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).unwrap()
        })
        .unwrap();
    alloc(&sb, big.ports[0].1, 500);
    alloc(&sb, held.ports[0].1, 200);
    alloc(&sb, mid.ports[0].1, 150);
    wait_for("samples with the allocations", Duration::from_secs(10), || {
        let grown = |pid, mib| rss_of(&bus, pid).is_some_and(|r| r >= mib * MIB);
        (grown(big.pid, 500) && grown(held.pid, 200) && grown(mid.pid, 150)).then_some(())
    });
    let rows = bus.list_workers("web");
    assert_eq!(rows.len(), 8, "no policy acted during the growth: {rows:?}");
    let rss = |pid: u32| rows.iter().find(|w| w.pid == pid).unwrap().rss;
    // Generation 3 will weigh what generation 2 (the same program, as young) weighs now.
    let next: u64 = rows.iter().filter(|w| w.generation == 2).map(|w| w.rss).sum();
    let total: u64 = rows.iter().map(|w| w.rss).sum::<u64>() + next;
    let after_kill = total - rss(big.pid);
    let after_stop = after_kill - rss(mid.pid);
    // A budget that puts `after_kill` midway between the watermarks (80 % and 95 %).
    let budget = after_kill * 1000 / 875 / MIB * MIB;
    let (low, high) = (budget / 100 * 80, budget / 100 * 95);
    let margin = 15 * MIB;
    assert!(
        total > high + margin
            && after_kill > low + margin
            && after_kill + margin < high
            && after_stop + margin < low,
        "test setup: total {total} after kill {after_kill} after stop {after_stop} vs {low}..{high}"
    );
    sb.write_file(
        "/etc/ipcluster/apps/web.toml",
        app(&format!("cluster_memory_max = \"{}M\"\n", budget / MIB)),
        0o644,
    )
    .unwrap();
    sb.check(["systemctl", "reload", "ipclusterd"]).unwrap();
    assert_eq!(bus.deploy_plain("web"), Ok(3));

    wait_for("the watermarks to act", Duration::from_secs(10), || {
        let rows = bus.list_workers("web");
        (!rows.iter().any(|w| w.pid == big.pid || w.pid == mid.pid)).then_some(())
    });
    // Nothing more than needed: once the projected total is under 80 %, the rest stay.
    std::thread::sleep(Duration::from_millis(600));
    let rows = bus.list_workers("web");
    assert!(
        rows.iter().any(|w| w.pid == held.pid && w.state == "retired"),
        "held (a connection) survives: {rows:?}"
    );
    assert_eq!(
        rows.iter().filter(|w| w.generation == 1).count(),
        2,
        "generation 1 keeps held and band 3: {rows:?}"
    );
    assert_eq!(rows.iter().filter(|w| w.generation == 2 && w.state == "retired").count(), 4, "{rows:?}");
    assert_eq!(
        rows.iter().filter(|w| w.generation == 3 && w.state == "live").count(),
        4,
        "live workers untouched"
    );
    let wanted = [
        format!("SIGKILL to retired pid {}", big.pid),
        format!("pid {} (stopping): memory (killed by signal SIGKILL)", big.pid),
        format!("stopping retired pid {}", mid.pid),
        format!("pid {} (stopping): memory (killed by signal SIGTERM)", mid.pid),
    ];
    let j =
        journal_until(&sb, "ipclusterd", &format!("{wanted:?}"), |j| wanted.iter().all(|w| j.contains(w)));
    assert!(!j.contains(&format!("retired pid {}", held.pid)), "{j}");
    no_failed_units(&sb);
}

#[test]
fn a_crash_looping_band_backs_off_and_the_daemon_stays_responsive() {
    let (sb, bus) = fast_cluster(&app(""));
    // Workers exit 200 ms after they are ready, but only once the test arms them: the deploy
    // itself never races the first exits.
    let looping = std::collections::HashMap::from([(
        "command",
        opt(vec!["/usr/local/bin/ipcluster-demo", "--exit-after", "200", "--armed-by", "/run/crash"]),
    )]);
    assert_eq!(bus.deploy("web", looping), Ok(1));
    let pid =
        sb.check(["systemctl", "show", "-p", "MainPID", "--value", "ipclusterd"]).unwrap().trim().to_owned();
    let cpu = || {
        let stat = sb.read_file(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<u64> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|x| x.parse().unwrap())
            .collect();
        f[0] + f[1]
    };
    let respawns = |j: &str| -> Vec<Duration> {
        j.lines()
            .filter_map(|l| l.strip_prefix("web: respawning band 0 in "))
            .map(|d| {
                if let Some(ms) = d.strip_suffix("ms") {
                    Duration::from_millis(ms.parse().unwrap())
                } else {
                    Duration::from_secs_f64(d.trim_end_matches('s').parse().unwrap())
                }
            })
            .collect()
    };
    let (cpu0, t0) = (cpu(), Instant::now());
    sb.write_file("/run/crash", "", 0o644).unwrap();
    // Delays of band 0 grow: 100ms, 200ms, 400ms, 800ms, ... while ListWorkers keeps answering.
    wait_for("four respawns of band 0", Duration::from_secs(30), || {
        assert!(
            !bus.list_workers("web").is_empty() || bus.list_generations("web").len() == 1,
            "ListWorkers answers"
        );
        std::thread::sleep(Duration::from_millis(200));
        (respawns(&journal(&sb)).len() >= 4).then_some(())
    });
    let used = Duration::from_millis((cpu() - cpu0) * 10);
    assert!(used < t0.elapsed() / 10, "the daemon used {used:?} of CPU in {:?}", t0.elapsed());
    let j = journal(&sb);
    let delays = respawns(&j);
    assert!(delays.windows(2).all(|w| w[1] == w[0] * 2), "delays double: {delays:?}\n{j}");
    // A deploy still works, and ends the loop.
    sb.check(["rm", "/run/crash"]).unwrap();
    assert_eq!(bus.deploy_plain("web"), Ok(2));
    assert_eq!(bus.list_workers("web").iter().filter(|w| w.generation == 2 && w.state == "live").count(), 4);
    no_failed_units(&sb);
}

#[test]
fn a_worker_that_stops_sending_watchdog_is_replaced() {
    let web = app("ready = \"notify\"\nwatchdog = \"1s\"\n").replace(
        "[\"/usr/local/bin/ipcluster-demo\"]",
        "[\"/usr/local/bin/ipcluster-demo\", \"--stop-watchdog-after\", \"1500\"]",
    );
    let (sb, bus) = fast_cluster(&web);
    let env_ok = {
        assert_eq!(bus.deploy_plain("web"), Ok(1));
        let w = bus.list_workers("web").into_iter().next().unwrap();
        let env = ipcluster_e2e::environ(&sb, w.pid);
        env.contains(&"WATCHDOG_USEC=1000000".to_owned()) && env.contains(&format!("WATCHDOG_PID={}", w.pid))
    };
    assert!(env_ok, "WATCHDOG_USEC and WATCHDOG_PID are set");
    let old = bus.list_workers("web").into_iter().find(|w| w.band == 0).unwrap();
    let new = wait_for("band 0 to be replaced", Duration::from_secs(15), || {
        bus.list_workers("web").into_iter().find(|w| w.band == 0 && w.state == "live" && w.pid != old.pid)
    });
    // The old worker pinged until 1.5 s after it was ready (at least every 333 ms), and the
    // watchdog allows 1 s of silence: its replacement cannot have started sooner than 2.1 s
    // after it (start times from the kernel, at 10 ms resolution).
    assert!(
        new.start_usec >= old.start_usec + 2_000_000,
        "replaced {} ms after it started",
        (new.start_usec - old.start_usec) / 1000
    );
    journal_with(&sb, "ipclusterd", "is hung (no WATCHDOG=1 for more than 1s); replacing it");
    // The hung worker, now retired and still silent, is stopped.
    wait_for("the hung retired worker to be stopped", Duration::from_secs(15), || {
        journal(&sb).contains(&format!("pid {} (stopping): watchdog", old.pid)).then_some(())
    });
    no_failed_units(&sb);
}

#[test]
fn retire_timeout_and_reap_interval_show_in_the_timestamps() {
    let (sb, bus) = fast_cluster(&app("retire_timeout = \"2s\"\nreap_interval = \"500ms\"\n"));
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    assert_eq!(bus.deploy_plain("web"), Ok(2));
    wait_for("generation 1 to be reaped", Duration::from_secs(20), || {
        bus.list_workers("web").iter().all(|w| w.generation == 2).then_some(())
    });
    let asked = |l: &str| l.contains("web: stopping retired pid") && l.contains("of generation 1 band");
    // Every line logged before the last exit, once journald has read them all.
    let j = wait_for("the four stop lines in the journal", Duration::from_secs(10), || {
        let j = sb.check(["journalctl", "-u", "ipclusterd", "-o", "short-monotonic", "--no-pager"]).ok()?;
        (j.lines().filter(|l| asked(l)).count() >= 4).then_some(j)
    });
    let at =
        |l: &str| -> f64 { l.trim_start_matches('[').split(']').next().unwrap().trim().parse().unwrap() };
    let retired = j.lines().find(|l| l.contains("generation 1 is retired")).map(at).unwrap();
    // When each was asked to stop (its exit is read afterwards, whenever the daemon gets to it).
    let reaped: Vec<f64> = j.lines().filter(|l| asked(l)).map(at).collect();
    assert_eq!(reaped.len(), 4, "{j}");
    assert!(reaped[0] - retired >= 1.9, "first reaped {:.2}s after retirement", reaped[0] - retired);
    for w in reaped.windows(2) {
        assert!(w[1] - w[0] >= 0.4, "reaped {:.2}s apart (reap_interval 500ms): {reaped:?}", w[1] - w[0]);
    }
    no_failed_units(&sb);
}

#[test]
fn killing_a_live_worker_under_load_refuses_no_connection() {
    let (sb, bus) = fast_cluster(&app(""));
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    // Continuous load from every band (sources .1 to .8: two per band), from three clients.
    let loads: Vec<Load> = (0..3).map(|_| Load::start(&sb, client::loopback_sources(8), PUBLIC)).collect();
    std::thread::sleep(Duration::from_millis(500));
    let victim = bus.list_workers("web").into_iter().find(|w| w.band == 1).unwrap();
    sb.check(["kill", "-9", &victim.pid.to_string()]).unwrap();
    let replacement = wait_for("band 1's replacement", Duration::from_secs(15), || {
        bus.list_workers("web").into_iter().find(|w| w.band == 1 && w.state == "live" && w.pid != victim.pid)
    });
    std::thread::sleep(Duration::from_millis(500));
    let outcomes: Vec<_> = loads.into_iter().flat_map(Load::finish).collect();
    // No connection is refused (or left hanging). The only failures allowed are requests that
    // were in flight on the killed worker's own connections (at most one per client).
    let refused: Vec<_> =
        outcomes.iter().filter(|(_, r)| !matches!(r, Ok(_) | Err(client::Failure::Reset))).collect();
    assert!(refused.is_empty(), "{} of {} refused or timed out: {refused:?}", refused.len(), outcomes.len());
    let resets = outcomes.iter().filter(|(_, r)| r.is_err()).count();
    assert!(resets <= 3, "{resets} resets: more than the requests in flight on the killed worker");
    let outcomes: Vec<_> = outcomes.into_iter().filter(|(_, r)| r.is_ok()).collect();
    // Band 1 (sources .1 and .5): its worker, then a neighbour, then its replacement.
    let band1: Vec<u32> = outcomes
        .iter()
        .filter(|(s, _)| u32::from(*s) & 3 == 1)
        .map(|(_, r)| r.as_ref().unwrap().pid)
        .collect();
    assert!(band1.contains(&victim.pid) && band1.contains(&replacement.pid));
    assert!(
        band1.iter().any(|p| *p != victim.pid && *p != replacement.pid),
        "a neighbour served band 1 meanwhile"
    );
    no_failed_units(&sb);
}

#[test]
fn spawn_interval_paces_a_generation_and_retired_scopes_get_a_low_cpu_weight() {
    let (sb, bus) = fast_cluster(&app("spawn_interval = \"300ms\"\n"));
    let start = Instant::now();
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    assert!(start.elapsed() >= Duration::from_millis(900), "4 workers 300 ms apart: {:?}", start.elapsed());
    let mut starts: Vec<u64> = bus.list_workers("web").iter().map(|w| w.start_usec).collect();
    starts.sort();
    for w in starts.windows(2) {
        assert!(w[1] - w[0] >= 250_000, "workers started {} µs apart", w[1] - w[0]);
    }
    assert_eq!(
        sb.check(["systemctl", "show", "-p", "CPUWeight", "--value", "ipcluster-web-1.scope"])
            .unwrap()
            .trim(),
        "[not set]"
    );
    assert_eq!(bus.deploy_plain("web"), Ok(2));
    wait_for("the retired scope's CPUWeight", Duration::from_secs(15), || {
        let w =
            sb.check(["systemctl", "show", "-p", "CPUWeight", "--value", "ipcluster-web-1.scope"]).ok()?;
        (w.trim() == "10").then_some(())
    });
    no_failed_units(&sb);
}

/// A worker that never reads what it is sent: stopped, it resets its connections (a socket
/// closed with unread data sends RST). It greets each connection with its generation.
const SILENT_PY: &str = r#"import os, socket
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(os.environ["PORT"])))
s.listen(64)
held = []
while True:
    c, _ = s.accept()
    c.sendall(os.environ["IPCLUSTER_GENERATION"].encode() + b"\n")
    held.append(c)
"#;

/// A TCP connection from exactly `src` (address and port) to `dst`.
fn connect_from(src: SocketAddrV4, dst: SocketAddrV4) -> std::io::Result<std::net::TcpStream> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, setsockopt, socket, sockopt,
    };
    use std::os::fd::AsRawFd;
    let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(src))?;
    connect(fd.as_raw_fd(), &SockaddrIn::from(dst))?;
    let s = std::net::TcpStream::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(s)
}

/// The generation that greeted `s`.
fn greeting(s: &mut std::net::TcpStream) -> std::io::Result<String> {
    let mut buf = [0u8; 16];
    let n = std::io::Read::read(s, &mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
}

/// A connection that a stopped worker reset stays in the kernel's connection tracking, in state
/// CLOSE, with its NAT mapping to the dead worker's port, for 10 s; and the kernel does not
/// reopen such an entry for a new SYN from the same address and port (it does when the client
/// reset or a FIN was seen), so that connection went to the dead port and was refused, although
/// the rules sent it to the live generation. The soak found it (a Socket.IO client binds its
/// address, so its ports are random and come back): the daemon now forgets those entries once
/// the worker has exited and the rules no longer name its port.
#[test]
fn a_client_reset_by_a_reaped_worker_reaches_the_live_generation_from_the_same_port() {
    let (sb, bus) = fast_cluster(
        "command = [\"/usr/bin/python3\", \"/usr/local/lib/silent.py\"]\nworkers = 1\nlisten = [\"0.0.0.0:80\"]\n\
         autostart = false\nstop_timeout = \"2s\"\nready_timeout = \"10s\"\n",
    );
    sb.write_file("/usr/local/lib/silent.py", SILENT_PY, 0o644).unwrap();
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    let old_port = bus.list_workers("web")[0].ports[0].1;
    let src = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 9), 40_009);
    // Connected to generation 1, with bytes it will never read.
    let mut first = sb
        .in_netns(move || -> std::io::Result<std::net::TcpStream> {
            let mut s = connect_from(src, PUBLIC)?;
            assert_eq!(greeting(&mut s)?, "1");
            std::io::Write::write_all(&mut s, b"never read")?;
            Ok(s)
        })
        .unwrap()
        .unwrap();
    assert_eq!(bus.deploy_plain("web"), Ok(2));
    assert_eq!(bus.kill_retired("web"), Ok(1));
    // Generation 1's worker resets the connection as it goes.
    let mut buf = [0u8; 8];
    let reset = std::io::Read::read(&mut first, &mut buf);
    assert_eq!(
        reset.as_ref().map_err(std::io::Error::kind).err(),
        Some(std::io::ErrorKind::ConnectionReset),
        "generation 1's worker reset the connection: {reset:?}"
    );
    drop(first);
    wait_for("generation 1 to stop", Duration::from_secs(10), || {
        bus.list_generations("web").iter().any(|g| g.generation == 1 && g.state == "stopped").then_some(())
    });
    // What the kernel keeps of it, once the daemon had the time to forget it.
    let closed = || {
        sb.run([
            "conntrack",
            "-L",
            "-p",
            "tcp",
            "--state",
            "CLOSE",
            "--reply-port-src",
            &old_port.to_string(),
        ])
        .map(|o| ipcluster_e2e::text(&o))
        .unwrap_or_default()
    };
    let until = Instant::now() + Duration::from_secs(3);
    while closed().contains("sport=40009") && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    // The same address and port again, within the 10 s: to generation 2.
    let again = sb.in_netns(move || connect_from(src, PUBLIC).and_then(|mut s| greeting(&mut s))).unwrap();
    assert_eq!(
        again.as_deref().map_err(|e| e.to_string()),
        Ok("2"),
        "the same client address and port reach the live generation (the kernel kept: {})",
        closed()
    );
}
