//! A fleet (docs/fleet.md): three hosts, each a sandbox running sshd and ipclusterd, behind
//! HAProxy with `balance source`, driven as an operator would with `ipclusterctl -H` and
//! `ipclusterctl deploy --hosts`.
//!
//! ```text
//!  netns cli (in lb)      sandbox lb: HAProxy, the operator            sandboxes h1, h2, h3
//!  10.9.1.32..63 ─veth─ 10.9.1.1:80 (HAProxy)   br0 10.9.0.1 ─veth─ 10.9.0.11 sshd, ipclusterd
//!  (the clients)                                              ─veth─ 10.9.0.12
//!                                                             ─veth─ 10.9.0.13
//! ```
//!
//! HAProxy's configuration and the balancer's routing are read from docs/fleet.md, so the doc's
//! example is the one that runs. HAProxy connects to the hosts from each client's own address
//! (transparent proxying); the hosts route replies through the balancer. The answers of the demo
//! worker say which generation, band and pid served a client, and the address it saw; each host
//! allocates pids from its own range ([`pid_base`]), so the pid also says which host.
//!
//! ssh's keys, `known_hosts` and both sides' configuration are made here, in each sandbox's own
//! /etc; the sandboxes' /root (the machine's own) is covered by an empty tmpfs, so neither side
//! reads or writes the machine's ~/.ssh.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4},
    os::unix::net::UnixStream,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use ipcluster_e2e::{
    Sandbox,
    bus::{Bus, live_by_band},
    client::{self, Answer, Failure},
    installed_sandbox, text, wait_for,
};

const WEB: &str = r#"
command = ["/usr/local/bin/ipcluster-demo"]
workers = 4
listen = ["0.0.0.0:80"]
autostart = false
ready_timeout = "5s"
stop_timeout = "2s"
"#;

/// The balancer's address on the hosts' link (the hosts' default route).
const BALANCER: &str = "10.9.0.1";
/// The hosts' addresses, as docs/fleet.md's HAProxy configuration names them.
const HOSTS: [&str; 3] = ["10.9.0.11", "10.9.0.12", "10.9.0.13"];
/// HAProxy's server names for them.
const SERVERS: [&str; 3] = ["h1", "h2", "h3"];
/// Where the clients connect: HAProxy's frontend.
const FRONTEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 9, 1, 1), 80);
/// The clients' addresses (in netns `cli`): 32 addresses, 8 in each of the 4 bands.
const CLIENTS: std::ops::RangeInclusive<u8> = 32..=63;
/// Where the test's ssh material lives, in each sandbox's own /etc.
const SSH_DIR: &str = "/etc/ssh/ipcluster-test";
/// A file whose presence makes `ipcluster-demo --armed-by` workers crash (on h2 only).
const CRASH: &str = "/etc/ipcluster/fleet-test-crash";

fn clients() -> Vec<Ipv4Addr> {
    CLIENTS.map(|i| Ipv4Addr::new(10, 9, 1, i)).collect()
}

/// The first pid of host `i`'s range: its pid namespace's counter is moved there before the
/// daemon starts, so a worker's pid says which host it is on.
fn pid_base(i: usize) -> u32 {
    (i as u32 + 1) * 10_000
}

/// The host a pid belongs to.
fn host_of(pid: u32) -> usize {
    let i = (pid / 10_000) as usize;
    assert!((1..=HOSTS.len()).contains(&i), "pid {pid} is in no host's range");
    i - 1
}

/// A fenced block of docs/fleet.md, the one after `<!-- fleet-test: NAME -->`.
fn doc_block(name: &str) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/fleet.md");
    let doc = std::fs::read_to_string(path).expect("docs/fleet.md");
    let marker = format!("<!-- fleet-test: {name} -->");
    let after = doc.split_once(&marker).unwrap_or_else(|| panic!("no {marker} in docs/fleet.md")).1;
    let fenced = after.trim_start().strip_prefix("```").expect("a fenced block after the marker");
    let body = fenced.split_once('\n').expect("the fence's line").1;
    let (block, _) = body.split_once("\n```").expect("the fence's end");
    format!("{block}\n")
}

/// The balancer, the hosts, and a bus connection to each host's daemon.
#[derive(Debug)]
struct Fleet {
    lb: Sandbox,
    hosts: Vec<Sandbox>,
    buses: Vec<Bus>,
}

impl Fleet {
    /// Boots and connects everything; each host has generation 1 of `web` live.
    fn new() -> Self {
        // Booting is mostly waiting for systemd: the four boot at once.
        let mut all: Vec<Sandbox> = thread::scope(|s| {
            let booting: Vec<_> = (0..4).map(|_| s.spawn(installed_sandbox)).collect();
            booting.into_iter().map(|b| b.join().expect("a sandbox boots and installs")).collect()
        });
        let lb = all.remove(0);
        let hosts = all;
        for sb in hosts.iter().chain([&lb]) {
            // The machine's /root (and its ~/.ssh) stays out of reach of ssh, sshd and the shell.
            sb.check(["mount", "-t", "tmpfs", "-o", "mode=0700", "tmpfs", "/root"]).unwrap();
            sb.check(["mkdir", "-p", "-m", "0700", SSH_DIR]).unwrap();
        }
        link(&lb, &hosts);
        ssh(&lb, &hosts);
        let mut buses = Vec::new();
        for (i, sb) in hosts.iter().enumerate() {
            sb.write_file("/etc/ipcluster/apps/web.toml", WEB, 0o644).unwrap();
            let pids = format!("echo {} > /proc/sys/kernel/ns_last_pid", pid_base(i));
            sb.check(["sh", "-c", &pids]).unwrap();
            sb.check(["systemctl", "start", "ipclusterd"]).unwrap();
            let bus = Bus::connect(sb);
            assert_eq!(bus.deploy_plain("web"), Ok(1));
            buses.push(bus);
        }
        balancer(&lb);
        Fleet { lb, hosts, buses }
    }

    /// `ipclusterctl ARGS…` on the balancer, where the operator is.
    fn ctl(&self, args: &[&str]) -> std::process::Output {
        let mut argv = vec!["ipclusterctl"];
        argv.extend_from_slice(args);
        self.lb.run(argv).unwrap()
    }

    /// Host `i`'s live generation.
    fn live(&self, i: usize) -> u64 {
        let gens = self.buses[i].list_generations("web");
        gens.iter().find(|g| g.state == "live").map(|g| g.generation).expect("a live generation")
    }

    /// Host `i`'s generations and their states.
    fn generations(&self, i: usize) -> Vec<(u64, String)> {
        self.buses[i].list_generations("web").into_iter().map(|g| (g.generation, g.state)).collect()
    }

    /// Host `i`'s live workers, band → pid.
    fn live_workers(&self, i: usize) -> BTreeMap<u32, u32> {
        live_by_band(&self.buses[i].list_workers("web"))
    }
}

/// The links, from the machine (only it sees both namespaces): a bridge in the balancer with a
/// veth pair to each host, and the clients' namespace behind the balancer.
fn link(lb: &Sandbox, hosts: &[Sandbox]) {
    lb.check(["ip", "link", "add", "br0", "type", "bridge"]).unwrap();
    for (i, h) in hosts.iter().enumerate() {
        let port = format!("fl{i}");
        let (lb_pid, h_pid) = (lb.init_pid().to_string(), h.init_pid().to_string());
        let argv =
            ["link", "add", &port, "netns", &lb_pid, "type", "veth", "peer", "name", "eth0", "netns", &h_pid];
        let out = Command::new("/usr/sbin/ip").args(argv).output().unwrap();
        assert!(out.status.success(), "ip {argv:?}: {}", text(&out));
        lb.check(["ip", "link", "set", &port, "master", "br0", "up"]).unwrap();
        let address = format!("{}/24", HOSTS[i]);
        h.check(["ip", "addr", "add", &address, "dev", "eth0"]).unwrap();
        h.check(["ip", "link", "set", "eth0", "up"]).unwrap();
        // Replies to clients go back through the balancer, which proxies their connections.
        h.check(["ip", "route", "add", "default", "via", BALANCER]).unwrap();
    }
    let balancer = format!(
        "addr add {BALANCER}/24 dev br0\nlink set br0 up\nnetns add cli\n\
         link add cl0 type veth peer name cl1 netns cli\naddr add {}/24 dev cl0\nlink set cl0 up\n",
        FRONTEND.ip()
    );
    lb.write_file("/tmp/links", balancer, 0o644).unwrap();
    lb.check(["ip", "-batch", "/tmp/links"]).unwrap();
    let mut cli = vec!["link set lo up".to_owned(), "link set cl1 up".to_owned()];
    cli.extend(clients().iter().map(|c| format!("addr add {c}/24 dev cl1")));
    lb.write_file("/tmp/clients", cli.join("\n") + "\n", 0o644).unwrap();
    lb.check(["ip", "-n", "cli", "-batch", "/tmp/clients"]).unwrap();
}

/// sshd on every host with a host key of its own, the balancer's key authorized for root; the
/// balancer's client configuration and known_hosts.
fn ssh(lb: &Sandbox, hosts: &[Sandbox]) {
    let keygen = |sb: &Sandbox, file: &str, comment: &str| {
        let path = format!("{SSH_DIR}/{file}");
        sb.check(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", &path]).unwrap();
        sb.read_file(format!("{path}.pub")).unwrap()
    };
    let operator = keygen(lb, "id_ed25519", "ipcluster-fleet-test");
    let mut known_hosts = String::new();
    for (i, h) in hosts.iter().enumerate() {
        let host_key = keygen(h, "host_ed25519", SERVERS[i]);
        let key: Vec<&str> = host_key.split_whitespace().take(2).collect();
        known_hosts.push_str(&format!("{} {}\n", HOSTS[i], key.join(" ")));
        h.write_file(format!("{SSH_DIR}/authorized_keys"), &operator, 0o600).unwrap();
        let sshd = format!(
            "HostKey {SSH_DIR}/host_ed25519\nAuthorizedKeysFile {SSH_DIR}/authorized_keys\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\nUsePAM no\nPermitUserRC no\n"
        );
        h.write_file("/etc/ssh/sshd_config.d/ipcluster-test.conf", sshd, 0o644).unwrap();
        h.check(["systemctl", "start", "ssh"]).unwrap();
    }
    lb.write_file(format!("{SSH_DIR}/known_hosts"), known_hosts, 0o644).unwrap();
    let client = format!(
        "Host 10.9.0.*\n    User root\n    IdentityFile {SSH_DIR}/id_ed25519\n    IdentitiesOnly yes\n    \
         UserKnownHostsFile {SSH_DIR}/known_hosts\n    StrictHostKeyChecking yes\n    BatchMode yes\n    \
         ConnectTimeout 5\n    GSSAPIAuthentication no\n"
    );
    lb.write_file("/etc/ssh/ssh_config.d/ipcluster-test.conf", client, 0o644).unwrap();
}

/// HAProxy as docs/fleet.md configures it, with the doc's routing for transparent proxying;
/// returns once every server is up.
fn balancer(lb: &Sandbox) {
    lb.check(["sh", "-ec", &doc_block("balancer.sh")]).unwrap();
    lb.write_file("/etc/haproxy/haproxy.cfg", doc_block("haproxy.cfg"), 0o644).unwrap();
    lb.check(["systemctl", "restart", "haproxy"]).unwrap();
    wait_for("HAProxy's servers to be up", Duration::from_secs(20), || {
        let states = servers(lb);
        SERVERS.iter().all(|s| states.get(*s).is_some_and(|st| st == "UP")).then_some(())
    });
}

/// A command to HAProxy's runtime API (its stats socket); the answer.
fn haproxy(lb: &Sandbox, command: &str) -> String {
    let mut s = UnixStream::connect(lb.host_path("/run/haproxy/admin.sock")).expect("HAProxy's stats socket");
    s.write_all(format!("{command}\n").as_bytes()).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
}

/// The status of each server of the `ipcluster` backend (`UP`, `DRAIN`, `DOWN`…).
fn servers(lb: &Sandbox) -> BTreeMap<String, String> {
    let csv = haproxy(lb, "show stat");
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().trim_start_matches("# ").split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap_or_else(|| panic!("{name}: {csv}"));
    let (px, sv, status) = (col("pxname"), col("svname"), col("status"));
    lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f.len() > status && f[px] == "ipcluster" && SERVERS.contains(&f[sv]))
        .map(|f| (f[sv].to_owned(), f[status].to_owned()))
        .collect()
}

/// Runs `f` on a thread in the clients' namespace.
fn in_clients<T: Send + 'static>(
    lb: &Sandbox,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let ns = std::fs::File::open(lb.host_path("/run/netns/cli")).expect("the clients' namespace");
    thread::spawn(move || {
        // Only this thread moves; a failure panics before `f` could run in the machine's namespace.
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("enter the clients' namespace");
        f()
    })
}

/// One request from every client address, through HAProxy: who answered each.
fn ask_all(lb: &Sandbox) -> BTreeMap<Ipv4Addr, Answer> {
    let answers =
        in_clients(lb, || clients().into_iter().map(|c| (c, client::get(c, FRONTEND))).collect::<Vec<_>>());
    answers
        .join()
        .unwrap()
        .into_iter()
        .map(|(c, a)| (c, a.unwrap_or_else(|e| panic!("a request from {c} failed: {e:?}"))))
        .collect()
}

/// Clients sending requests through HAProxy, each on a new connection, cycling through every
/// client address, until finished.
#[derive(Debug)]
struct Load {
    stop: Arc<AtomicBool>,
    /// Requests answered or failed so far.
    done: Arc<AtomicUsize>,
    handle: thread::JoinHandle<Vec<(Ipv4Addr, Result<Answer, Failure>)>>,
}

impl Load {
    fn start(lb: &Sandbox) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let (flag, count) = (stop.clone(), done.clone());
        let handle = in_clients(lb, move || {
            let mut out = Vec::new();
            for c in clients().into_iter().cycle() {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                out.push((c, client::get(c, FRONTEND)));
                count.fetch_add(1, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(2));
            }
            out
        });
        Load { stop, done, handle }
    }

    /// Waits until every client address has sent `rounds` more requests.
    fn rounds(&self, rounds: usize) {
        let until = self.done.load(Ordering::Relaxed) + rounds * clients().len();
        wait_for("the load's requests", Duration::from_secs(30), || {
            (self.done.load(Ordering::Relaxed) >= until).then_some(())
        });
    }

    fn finish(self) -> Vec<(Ipv4Addr, Result<Answer, Failure>)> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

/// The band of a client address: its low bits (4 workers).
fn band(c: Ipv4Addr) -> u32 {
    u32::from(c) & 3
}

/// Every answer came from the client's own band, and the worker saw the client's own address.
fn assert_banded(c: Ipv4Addr, a: &Answer) {
    assert_eq!(a.peer, c.to_string(), "the worker sees the client's address, not the balancer's: {a:?}");
    assert_eq!(a.band, band(c), "{c} is in band {}: {a:?}", band(c));
}

#[test]
fn a_fleet_behind_haproxy_is_controlled_over_ssh_and_deployed_host_by_host() {
    let started = Instant::now();
    let fleet = Fleet::new();
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
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/fleet.md")).unwrap();
    assert!(doc.contains(drain) && doc.contains(ready), "docs/fleet.md drains with the commands tested here");
    assert_eq!(haproxy(&fleet.lb, drain).trim(), "");
    assert_eq!(servers(&fleet.lb)["h2"], "DRAIN");
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
    let broken = WEB.replace("/usr/local/bin/ipcluster-demo", "/usr/local/bin/ipcluster-missing");
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
    fleet.hosts[1].write_file("/etc/ipcluster/apps/web.toml", WEB, 0o644).unwrap();
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
