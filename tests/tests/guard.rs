//! Another host reaches an app only through its public addresses: a client in a second network
//! namespace, over a veth pair, gets answers on the public port (the worker sees its real
//! address) but cannot connect to any worker's own port, live or retired; local clients still
//! can (readiness probes and local tools use them).

use std::{
    sync::LazyLock,
    time::{Duration, Instant},
};

use ipcluster_e2e::{Sandbox, cluster, fixture::Demo, text, wait_for};

/// The app most scenarios here deploy.
static WEB: LazyLock<String> = LazyLock::new(|| Demo::new(4).toml());

/// The sandbox's address on the link to the client namespace.
const SERVER: &str = "10.9.0.1";
/// The client's addresses: one per band (the band is the address's low two bits).
const CLIENTS: [&str; 4] = ["10.9.0.4", "10.9.0.5", "10.9.0.6", "10.9.0.7"];

/// A second network namespace `cli` inside the sandbox, linked to it by a veth pair.
fn client_namespace(sb: &Sandbox) {
    ipcluster_e2e::netns::client_namespace(sb, &[], &CLIENTS);
}

/// An HTTP GET of `url` from `src`, with a 2 s connect timeout: the body, or curl's error and
/// how long it took to fail. `netns` runs it in the client namespace.
fn get(sb: &Sandbox, netns: bool, src: &str, url: &str) -> Result<String, (String, Duration)> {
    let mut argv = if netns { vec!["ip", "netns", "exec", "cli"] } else { vec![] };
    argv.extend(["curl", "-sS", "--interface", src, "--connect-timeout", "2", "-m", "5", url]);
    let started = Instant::now();
    let out = sb.run(&argv).unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err((text(&out), started.elapsed()))
    }
}

/// What a failure message shows: the rules with their counters, the listening sockets and the
/// link.
fn diagnose(sb: &Sandbox) -> String {
    let show = |argv: &[&str]| sb.run(argv).map(|o| text(&o)).unwrap_or_default();
    format!(
        "{}\n{}\n{}",
        show(&["iptables-save", "-c"]),
        show(&["ss", "-ltn"]),
        show(&["ip", "netns", "exec", "cli", "ip", "addr"])
    )
}

fn field<'a>(body: &'a str, key: &str) -> &'a str {
    body.split_whitespace().find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')).unwrap_or("")
}

#[test]
fn other_hosts_reach_the_public_port_but_no_worker_port() {
    let (sb, bus) = cluster(&[("web", WEB.as_str())]);
    client_namespace(&sb);
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    assert_eq!(bus.deploy_plain("web"), Ok(2));
    let workers = bus.list_workers("web");
    let port = |generation: u64, band: u32| {
        workers.iter().find(|w| w.generation == generation && w.band == band).unwrap().ports[0].1
    };
    let (retired, live) = (port(1, 1), port(2, 2));
    let filter = sb.check(["iptables", "-S"]).unwrap();
    assert!(filter.contains("-A IPCLUSTER -p tcp -m multiport --dports"), "{filter}");

    // The public port: each client its band's live worker, which sees the client's address.
    for (i, src) in CLIENTS.iter().enumerate() {
        let body = get(&sb, true, src, &format!("http://{SERVER}/"))
            .unwrap_or_else(|e| panic!("{src}: {e:?}\n{}", diagnose(&sb)));
        assert_eq!(field(&body, "peer"), *src, "{body}");
        assert_eq!(field(&body, "generation"), "2", "{body}");
        assert_eq!(field(&body, "band"), i.to_string(), "10.9.0.{} is in band {i}: {body}", 4 + i);
    }
    // Worker ports, live and retired, from the same clients: nothing answers, quickly.
    for (src, port) in [(CLIENTS[0], live), (CLIENTS[1], retired), (CLIENTS[2], live)] {
        let url = format!("http://{SERVER}:{port}/");
        // Dropped (a connect timeout) or refused, never answered.
        let (err, _) = get(&sb, true, src, &url).expect_err(&format!("{src} reached {url}"));
        assert!(
            err.contains("Timeout") || err.contains("refused") || err.contains("connect"),
            "{url}: {err}"
        );
        let public = get(&sb, true, src, &format!("http://{SERVER}/"));
        assert!(public.is_ok(), "the public port from {src} right after: {public:?}");
    }
    // Local clients still reach worker ports: the daemon's probes and local tools use them.
    for (src, port) in [("127.0.0.1", live), ("127.0.0.3", retired), (SERVER, live)] {
        let body = get(&sb, false, src, &format!("http://{SERVER}:{port}/"))
            .or_else(|_| get(&sb, false, src, &format!("http://127.0.0.1:{port}/")))
            .unwrap_or_else(|e| panic!("{src} → {port}: {e:?}"));
        assert!(body.contains("app=web"), "{body}");
    }
}

/// Issue 21, item 7: the guard covers every port a worker holds, not only a routed app's: while
/// the first generation of an app is still starting (its workers listen, nothing routes to
/// them yet), and while StopApp waits for workers that linger after their stop signal, another
/// host cannot reach a worker port; local clients still can (the workers are really there).
#[test]
fn worker_ports_are_guarded_while_nothing_routes_to_them() {
    let slow = Demo::new(4)
        .args(&["--delay-notify", "6000", "--ignore-sigterm"])
        .with("ready = \"notify\"")
        .ready_timeout("20s")
        .stop_timeout("8s")
        .toml();
    let (sb, bus) = cluster(&[("web", &slow)]);
    client_namespace(&sb);
    let check_guarded = |what: &str| {
        let starting = wait_for(&format!("{what}: workers that listen"), Duration::from_secs(10), || {
            let rows = bus.list_workers("web");
            let port = rows.first()?.ports.first()?.1;
            get(&sb, false, "127.0.0.1", &format!("http://127.0.0.1:{port}/")).ok().map(|_| rows)
        });
        for w in &starting {
            let port = w.ports[0].1;
            let url = format!("http://{SERVER}:{port}/");
            let got = get(&sb, true, CLIENTS[0], &url);
            assert!(
                got.is_err(),
                "{what}: another host reached worker port {port} ({}): {got:?}\n{}",
                w.state,
                diagnose(&sb)
            );
        }
    };
    // The first deploy: the workers listen for 6 s before READY=1, and nothing routes to them.
    let deploying = std::thread::scope(|s| {
        let deploy = s.spawn(|| bus.deploy_plain("web"));
        check_guarded("during the first deploy");
        deploy.join().unwrap()
    });
    assert_eq!(deploying, Ok(1));
    // StopApp: the rules go first, then the workers, which ignore SIGTERM for up to 8 s.
    std::thread::scope(|s| {
        let stop = s.spawn(|| sb.run(["ipclusterctl", "stop", "web"]).unwrap());
        std::thread::sleep(Duration::from_millis(500));
        assert!(!ipcluster_e2e::nat_rules(&sb).contains("REDIRECT"), "nothing routes to a stopping app");
        check_guarded("during StopApp");
        let out = stop.join().unwrap();
        assert!(out.status.success(), "{}", text(&out));
    });
}

/// Issue 21, item 3: after a `kill -9` of a live worker, its port answers no other host: the
/// daemon relays what queued on the dead worker's socket to the band's neighbour, but only what
/// the rules sent there, and the port stays guarded until that socket is closed. (Before the
/// fix, another host connecting to the dead worker's port straight away was answered by the
/// neighbour band, for seconds.) Through the public address the band is served throughout.
#[test]
fn a_killed_workers_port_answers_no_other_host() {
    let (sb, bus) = cluster(&[("web", WEB.as_str())]);
    client_namespace(&sb);
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    let victim = bus.list_workers("web").into_iter().find(|w| w.band == 0).unwrap();
    let port = victim.ports[0].1;
    let url = format!("http://{SERVER}:{port}/");
    assert!(get(&sb, true, CLIENTS[1], &url).is_err(), "guarded before the crash");
    sb.check(["kill", "-9", &victim.pid.to_string()]).unwrap();
    let started = Instant::now();
    let mut attempts = 0;
    while started.elapsed() < Duration::from_secs(6) {
        attempts += 1;
        let got = get(&sb, true, CLIENTS[1], &url);
        assert!(
            got.is_err(),
            "attempt {attempts}: another host reached the dead worker's port {port}: {got:?}"
        );
        let public = get(&sb, true, CLIENTS[0], &format!("http://{SERVER}/"));
        assert!(public.is_ok(), "band 0 through the public address: {public:?}\n{}", diagnose(&sb));
    }
    assert!(attempts >= 3, "only {attempts} attempts in 6 s");
}
