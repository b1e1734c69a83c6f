//! Another host reaches an app only through its public addresses: a client in a second network
//! namespace, over a veth pair, gets answers on the public port (the worker sees its real
//! address) but cannot connect to any worker's own port, live or retired; local clients still
//! can (readiness probes and local tools use them).

use std::time::{Duration, Instant};

use ipcluster_e2e::{Sandbox, cluster, text};

const WEB: &str = r#"
command = ["/usr/local/bin/ipcluster-demo"]
workers = 4
listen = ["0.0.0.0:80"]
autostart = false
ready_timeout = "5s"
stop_timeout = "2s"
"#;

/// The sandbox's address on the link to the client namespace.
const SERVER: &str = "10.9.0.1";
/// The client's addresses: one per band (the band is the address's low two bits).
const CLIENTS: [&str; 4] = ["10.9.0.4", "10.9.0.5", "10.9.0.6", "10.9.0.7"];

/// A second network namespace `cli` inside the sandbox, linked to it by a veth pair.
fn client_namespace(sb: &Sandbox) {
    let mut steps: Vec<Vec<&str>> = vec![
        vec!["ip", "netns", "add", "cli"],
        vec!["ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", "cli"],
        vec!["ip", "addr", "add", "10.9.0.1/24", "dev", "veth0"],
        vec!["ip", "link", "set", "veth0", "up"],
        vec!["ip", "netns", "exec", "cli", "ip", "link", "set", "lo", "up"],
        vec!["ip", "netns", "exec", "cli", "ip", "link", "set", "veth1", "up"],
    ];
    // With the prefix length, so the client has a route to the link.
    let prefixed: Vec<String> = CLIENTS.iter().map(|c| format!("{c}/24")).collect();
    for c in &prefixed {
        steps.push(vec!["ip", "netns", "exec", "cli", "ip", "addr", "add", c, "dev", "veth1"]);
    }
    for step in steps {
        sb.check(&step).unwrap();
    }
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
    let (sb, bus) = cluster(&[("web", WEB)]);
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
        let (err, took) = get(&sb, true, src, &url).expect_err(&format!("{src} reached {url}"));
        assert!(took < Duration::from_secs(4), "{url} took {took:?} to fail: {err}");
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
