//! A fleet (docs/fleet.md): three hosts, each a sandbox running sshd and ipclusterd, behind
//! HAProxy with `balance source` on a fourth, where the operator is; the clients in a network
//! namespace of their own behind the balancer. Used by `tests/tests/fleet.rs` (`ipclusterctl -H`,
//! `deploy --hosts`) and `tests/tests/ansible.rs` (the Ansible collection).
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
    collections::BTreeMap,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4},
    os::unix::net::UnixStream,
    path::PathBuf,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

use crate::{
    Sandbox,
    bus::{Bus, live_by_band},
    client::{self, Answer, Failure},
    installed_sandbox_with, text, wait_for,
};

/// The balancer's address on the hosts' link (the hosts' default route).
pub const BALANCER: &str = "10.9.0.1";
/// The hosts' addresses, as docs/fleet.md's HAProxy configuration names them.
pub const HOSTS: [&str; 3] = ["10.9.0.11", "10.9.0.12", "10.9.0.13"];
/// HAProxy's server names for them.
pub const SERVERS: [&str; 3] = ["h1", "h2", "h3"];
/// Where the clients connect: HAProxy's frontend.
pub const FRONTEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 9, 1, 1), 80);
/// The clients' addresses (in netns `cli`): 32 addresses, 8 in each of the 4 bands.
const CLIENTS: std::ops::RangeInclusive<u8> = 32..=63;
/// Where the test's ssh material lives, in each sandbox's own /etc.
const SSH_DIR: &str = "/etc/ssh/ipcluster-test";
/// HAProxy's runtime API (docs/fleet.md's `stats socket`).
pub const HAPROXY_SOCKET: &str = "/run/haproxy/admin.sock";

pub fn clients() -> Vec<Ipv4Addr> {
    CLIENTS.map(|i| Ipv4Addr::new(10, 9, 1, i)).collect()
}

/// The first pid of host `i`'s range: its pid namespace's counter is moved there before the
/// daemon starts, so a worker's pid says which host it is on.
pub fn pid_base(i: usize) -> u32 {
    (i as u32 + 1) * 10_000
}

/// The host a pid belongs to.
pub fn host_of(pid: u32) -> usize {
    let i = (pid / 10_000) as usize;
    assert!((1..=HOSTS.len()).contains(&i), "pid {pid} is in no host's range");
    i - 1
}

/// docs/fleet.md.
pub fn fleet_doc() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/fleet.md");
    std::fs::read_to_string(path).expect("docs/fleet.md")
}

/// A fenced block of docs/fleet.md, the one after `<!-- fleet-test: NAME -->`.
pub fn doc_block(name: &str) -> String {
    let doc = fleet_doc();
    let marker = format!("<!-- fleet-test: {name} -->");
    let after = doc.split_once(&marker).unwrap_or_else(|| panic!("no {marker} in docs/fleet.md")).1;
    let fenced = after.trim_start().strip_prefix("```").expect("a fenced block after the marker");
    let body = fenced.split_once('\n').expect("the fence's line").1;
    let (block, _) = body.split_once("\n```").expect("the fence's end");
    format!("{block}\n")
}

/// The balancer, the hosts, and a bus connection to each host's daemon.
#[derive(Debug)]
pub struct Fleet {
    pub lb: Sandbox,
    pub hosts: Vec<Sandbox>,
    pub buses: Vec<Bus>,
    /// The app each host serves.
    pub app: String,
}

impl Fleet {
    /// Boots and connects everything; each host has generation 1 of `app` live, from the app
    /// file `text`. The balancer also sees the host directories `share` (read-only).
    pub fn new(app: &str, text: &str, share: Vec<PathBuf>) -> Self {
        // Booting is mostly waiting for systemd: the four boot at once.
        let mut all: Vec<Sandbox> = thread::scope(|s| {
            let lb_share = share.clone();
            let booting: Vec<_> = (0..4)
                .map(|i| {
                    let share = if i == 0 { lb_share.clone() } else { Vec::new() };
                    s.spawn(move || installed_sandbox_with(share))
                })
                .collect();
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
            sb.write_file(format!("/etc/ipcluster/apps/{app}.toml"), text, 0o644).unwrap();
            let pids = format!("echo {} > /proc/sys/kernel/ns_last_pid", pid_base(i));
            sb.check(["sh", "-c", &pids]).unwrap();
            sb.check(["systemctl", "start", "ipclusterd"]).unwrap();
            let bus = Bus::connect(sb);
            assert_eq!(bus.deploy_plain(app), Ok(1));
            buses.push(bus);
        }
        balancer(&lb);
        Fleet { lb, hosts, buses, app: app.to_owned() }
    }

    /// `ipclusterctl ARGS…` on the balancer, where the operator is.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        let mut argv = vec!["ipclusterctl"];
        argv.extend_from_slice(args);
        self.lb.run(argv).unwrap()
    }

    /// Host `i`'s live generation.
    pub fn live(&self, i: usize) -> u64 {
        let gens = self.buses[i].list_generations(&self.app);
        gens.iter().find(|g| g.state == "live").map(|g| g.generation).expect("a live generation")
    }

    /// Host `i`'s generations and their states.
    pub fn generations(&self, i: usize) -> Vec<(u64, String)> {
        self.buses[i].list_generations(&self.app).into_iter().map(|g| (g.generation, g.state)).collect()
    }

    /// When host `i`'s generation `g` started (wall clock).
    pub fn started(&self, i: usize, g: u64) -> SystemTime {
        let gens = self.buses[i].list_generations(&self.app);
        let usec = gens.iter().find(|r| r.generation == g).map(|r| r.start_usec).expect("the generation");
        SystemTime::UNIX_EPOCH + Duration::from_micros(usec)
    }

    /// Host `i`'s live workers, band → pid.
    pub fn live_workers(&self, i: usize) -> BTreeMap<u32, u32> {
        live_by_band(&self.buses[i].list_workers(&self.app))
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
        SERVERS.iter().all(|s| states.get(*s).is_some_and(|st| st.status == "UP")).then_some(())
    });
}

/// A command to HAProxy's runtime API (its stats socket); the answer.
pub fn haproxy(lb: &Sandbox, command: &str) -> String {
    let mut s = UnixStream::connect(lb.host_path(HAPROXY_SOCKET)).expect("HAProxy's stats socket");
    s.write_all(format!("{command}\n").as_bytes()).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
}

/// A server of the `ipcluster` backend as HAProxy's stats show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// `UP`, `DRAIN`, `DOWN`, `MAINT`…
    pub status: String,
    /// Its current sessions.
    pub sessions: u64,
}

/// Each server of the `ipcluster` backend.
pub fn servers(lb: &Sandbox) -> BTreeMap<String, Server> {
    servers_at(&lb.host_path(HAPROXY_SOCKET)).expect("HAProxy's stats")
}

/// Runs `f` on a thread in the clients' namespace.
pub fn in_clients<T: Send + 'static>(
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
pub fn ask_all(lb: &Sandbox) -> BTreeMap<Ipv4Addr, Answer> {
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
pub struct Load {
    stop: Arc<AtomicBool>,
    /// Requests answered or failed so far.
    done: Arc<AtomicUsize>,
    handle: thread::JoinHandle<Vec<(Ipv4Addr, Result<Answer, Failure>)>>,
}

impl Load {
    pub fn start(lb: &Sandbox) -> Self {
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
    pub fn rounds(&self, rounds: usize) {
        let until = self.done.load(Ordering::Relaxed) + rounds * clients().len();
        wait_for("the load's requests", Duration::from_secs(30), || {
            (self.done.load(Ordering::Relaxed) >= until).then_some(())
        });
    }

    pub fn finish(self) -> Vec<(Ipv4Addr, Result<Answer, Failure>)> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

/// One request of an [`OpenLoop`].
#[derive(Debug)]
pub struct Request {
    pub client: Ipv4Addr,
    /// When it was sent (wall clock), and how long after it was due.
    pub sent: SystemTime,
    pub late: Duration,
    pub result: Result<Answer, Failure>,
}

/// An open-loop load through HAProxy: requests due at a fixed rate, each on a new connection,
/// cycling through every client address, whatever the answers take (a slow answer does not
/// delay the next request), until finished.
#[derive(Debug)]
pub struct OpenLoop {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    scheduler: thread::JoinHandle<()>,
    clients: Vec<thread::JoinHandle<Vec<Request>>>,
}

impl OpenLoop {
    /// `rate` requests a second, served by `threads` client threads.
    pub fn start(lb: &Sandbox, rate: u32, threads: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel::<(Instant, Ipv4Addr)>();
        let rx = Arc::new(Mutex::new(rx));
        let clients = (0..threads)
            .map(|_| {
                let rx = rx.clone();
                in_clients(lb, move || {
                    let mut out = Vec::new();
                    loop {
                        // Held only to take the next request due.
                        let next = rx.lock().map(|r| r.recv());
                        let Ok(Ok((due, client))) = next else { return out };
                        let (sent, late) = (SystemTime::now(), due.elapsed());
                        let result = client::get(client, FRONTEND);
                        out.push(Request { client, sent, late, result });
                    }
                })
            })
            .collect();
        let (flag, count) = (stop.clone(), sent.clone());
        let scheduler = thread::spawn(move || {
            let start = Instant::now();
            let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
            for (n, client) in (0u32..).zip(crate::fleet::clients().into_iter().cycle()) {
                if flag.load(Ordering::Relaxed) {
                    return;
                }
                let due = start + interval * n;
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    thread::sleep(wait);
                }
                if tx.send((due, client)).is_err() {
                    return;
                }
                count.fetch_add(1, Ordering::Relaxed);
            }
        });
        OpenLoop { stop, sent, scheduler, clients }
    }

    /// Waits until `n` more requests were sent.
    pub fn requests(&self, n: usize) {
        let until = self.sent.load(Ordering::Relaxed) + n;
        wait_for("the load's requests", Duration::from_secs(30), || {
            (self.sent.load(Ordering::Relaxed) >= until).then_some(())
        });
    }

    /// Stops sending; every request sent, in the order they were sent.
    pub fn finish(self) -> Vec<Request> {
        self.stop.store(true, Ordering::Relaxed);
        self.scheduler.join().unwrap();
        let mut all: Vec<Request> = self.clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
        all.sort_by_key(|r| r.sent);
        all
    }
}

/// HAProxy's view of the servers, sampled every 50 ms until finished: when each server was in
/// which status.
#[derive(Debug)]
pub struct StatsSampler {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<Vec<(SystemTime, BTreeMap<String, Server>)>>,
}

impl StatsSampler {
    pub fn start(lb: &Sandbox) -> Self {
        // The socket is reached through /proc/<pid>/root: no namespace to enter.
        let socket = lb.host_path(HAPROXY_SOCKET);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = thread::spawn(move || {
            let mut samples = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let at = SystemTime::now();
                if let Some(s) = servers_at(&socket) {
                    samples.push((at, s));
                }
                thread::sleep(Duration::from_millis(50));
            }
            samples
        });
        StatsSampler { stop, handle }
    }

    /// The samples, oldest first.
    pub fn finish(self) -> Vec<(SystemTime, BTreeMap<String, Server>)> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

/// [`servers`] through the socket at `path` (None if HAProxy did not answer).
fn servers_at(path: &std::path::Path) -> Option<BTreeMap<String, Server>> {
    let mut s = UnixStream::connect(path).ok()?;
    s.write_all(b"show stat\n").ok()?;
    let mut csv = String::new();
    s.read_to_string(&mut csv).ok()?;
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next()?.trim_start_matches("# ").split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (px, sv, status, scur) = (col("pxname")?, col("svname")?, col("status")?, col("scur")?);
    Some(
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| f.len() > status.max(scur) && f[px] == "ipcluster" && SERVERS.contains(&f[sv]))
            .map(|f| {
                let server = Server { status: f[status].to_owned(), sessions: f[scur].parse().unwrap_or(0) };
                (f[sv].to_owned(), server)
            })
            .collect(),
    )
}

/// The band of a client address: its low bits (4 workers).
pub fn band(c: Ipv4Addr) -> u32 {
    u32::from(c) & 3
}

/// Every answer came from the client's own band, and the worker saw the client's own address.
pub fn assert_banded(c: Ipv4Addr, a: &Answer) {
    assert_eq!(a.peer, c.to_string(), "the worker sees the client's address, not the balancer's: {a:?}");
    assert_eq!(a.band, band(c), "{c} is in band {}: {a:?}", band(c));
}
