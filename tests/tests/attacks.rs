//! The second security audit's attacks (issue 21), performed: a worker, a local user or a file
//! writer tries to get more than docs/security.md grants it, and each attempt fails in a way a
//! user can see.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use ipcluster_e2e::{
    Sandbox,
    bus::{Bus, live_by_band},
    client::{self, loopback_sources},
    installed_sandbox, journal_waiting, journal_with, text, wait_for,
};

const PUBLIC: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 80);

fn journal(sb: &Sandbox, unit: &str) -> String {
    sb.run(["journalctl", "-u", unit, "-o", "cat", "--no-pager"]).map(|o| text(&o)).unwrap_or_default()
}

fn as_user<'a>(user: &'a str, argv: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["setpriv", "--reuid", user, "--regid", user, "--clear-groups", "--"];
    v.extend_from_slice(argv);
    v
}

/// A sandbox with the build installed, `files` written (mode 0644), and ipclusterd started.
fn started(files: &[(&str, &str)]) -> (Sandbox, Bus) {
    let sb = installed_sandbox();
    for (path, text) in files {
        sb.write_file(path, text, 0o644).unwrap();
    }
    sb.check(["systemctl", "start", "ipclusterd"]).unwrap();
    let bus = Bus::connect(&sb);
    (sb, bus)
}

/// The value of `series` (exact, with its labels) in the daemon's /metrics.
fn metric(sb: &Sandbox, series: &str) -> Option<f64> {
    let out = sb.check(["curl", "-sS", "--max-time", "5", "http://127.0.0.1:9464/metrics"]).ok()?;
    out.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Which worker (pid) answered each of 32 loopback sources.
fn answered_by(sb: &Sandbox) -> Vec<(Ipv4Addr, u32, u32)> {
    sb.in_netns(|| {
        loopback_sources(32)
            .into_iter()
            .map(|src| {
                let a = client::get(src, PUBLIC).unwrap_or_else(|e| panic!("request from {src}: {e:?}"));
                (src, a.band, a.pid)
            })
            .collect()
    })
    .unwrap()
}

/// A socket-mode worker, as `nobody`, that first tries to take over its reuseport group through
/// the socket it was handed (fd 3), then becomes the demo worker (exec: same process, same fd).
/// It prints what each attempt gave.
const TAMPER_PY: &str = r#"
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
SOL_SOCKET, SO_REUSEPORT, SO_ATTACH_REUSEPORT_CBPF, SO_DETACH_REUSEPORT_BPF = 1, 15, 51, 68
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
def result(r):
    return "ok" if r >= 0 else os.strerror(ctypes.get_errno())
def opt(name, value):
    return result(libc.setsockopt(3, SOL_SOCKET, name, ctypes.byref(value), ctypes.sizeof(value)))
ret0 = ctypes.create_string_buffer(b"\x06\x00\x00\x00\x00\x00\x00\x00", 8)
prog = Fprog(1, ctypes.cast(ret0, ctypes.c_void_p))
detach = opt(SO_DETACH_REUSEPORT_BPF, ctypes.c_int(0))
cbpf = opt(SO_ATTACH_REUSEPORT_CBPF, prog)
reuseport = opt(SO_REUSEPORT, ctypes.c_int(1))
libc.syscall.restype = ctypes.c_long
params = ctypes.create_string_buffer(120)
uring = result(libc.syscall(ctypes.c_long(425), ctypes.c_uint(1), params))
status = open("/proc/self/status").read().split("\n")
seccomp = [l for l in status if l.startswith(("Seccomp:", "NoNewPrivs:"))]
print(f"tamper uid={os.getuid()} detach={detach} cbpf={cbpf} reuseport={reuseport} io_uring={uring} {' '.join(seccomp)}", flush=True)
os.execv("/usr/local/bin/ipcluster-demo", ["ipcluster-demo"])
"#;

/// Issue 21, item 1: a socket-mode worker running as `nobody` detaches its group's steering
/// program and attaches a classic one that sends every client to the group's first socket. The
/// worker's seccomp filter refuses each of those calls (and io_uring, which can issue the same
/// setsockopt): every client still reaches its band. A process outside the filter (root, here)
/// that does it through a worker's socket is undone at the next reconcile, with a journal line
/// and `ipcluster_steering_restored_total`.
#[test]
fn a_socket_mode_worker_cannot_re_steer_its_group_and_a_tampering_from_outside_is_undone() {
    let web = r#"
command = ["/usr/bin/python3", "/usr/local/lib/tamper.py"]
user = "nobody"
workers = 4
listen = ["0.0.0.0:80"]
routing = "socket"
autostart = false
ready_timeout = "10s"
stop_timeout = "2s"
"#;
    let (sb, bus) = started(&[
        ("/usr/local/lib/tamper.py", TAMPER_PY),
        ("/etc/ipcluster/apps/web.toml", web),
        ("/etc/ipcluster/ipclusterd.toml", "metrics_listen = \"127.0.0.1:9464\"\n"),
    ]);
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    let by_band = live_by_band(&bus.list_workers("web"));
    let lines: Vec<String> = wait_for("every worker's report", Duration::from_secs(10), || {
        let j = journal(&sb, "ipcluster-web-1.scope");
        let lines: Vec<String> = j.lines().filter(|l| l.starts_with("tamper ")).map(str::to_owned).collect();
        (lines.len() == 4).then_some(lines)
    });
    println!("{}", lines.join("\n"));
    let answers = answered_by(&sb);
    let own = answers.iter().filter(|(src, band, _)| *band == u32::from(*src) & 3).count();
    println!("after the workers' attempts, {own} of 32 clients reached their own band");
    for l in &lines {
        assert!(!l.contains("uid=0 "), "the worker runs as nobody: {l}");
        assert!(
            l.contains("Seccomp:\t2") && l.contains("NoNewPrivs:\t0"),
            "filtered, setuid still works: {l}"
        );
        for refused in ["detach=", "cbpf=", "reuseport=", "io_uring="] {
            assert!(l.contains(&format!("{refused}Operation not permitted")), "{refused} is refused: {l}");
        }
    }
    for (src, band, pid) in answers {
        let want = u32::from(src) & 3;
        assert_eq!((band, pid), (want, by_band[&want]), "{src} reached its own band's worker");
    }

    // Root, outside every filter, does the same through band 2's socket (pidfd_getfd).
    let outside = format!(
        "import ctypes, os\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         libc.syscall.restype = ctypes.c_long\n\
         pidfd = os.pidfd_open({})\n\
         fd = libc.syscall(ctypes.c_long(438), ctypes.c_int(pidfd), ctypes.c_int(3), ctypes.c_uint(0))\n\
         assert fd >= 0, os.strerror(ctypes.get_errno())\n\
         r = libc.setsockopt(fd, 1, 68, ctypes.byref(ctypes.c_int(0)), 4)\n\
         assert r == 0, os.strerror(ctypes.get_errno())\n\
         print('detached', flush=True)\n",
        by_band[&2]
    );
    let out = sb.check(["python3", "-c", &outside]).unwrap();
    assert_eq!(out.trim(), "detached");
    let line = "web: the steering program of 0.0.0.0:80 had been detached or replaced through one of its sockets; attached again";
    wait_for("the daemon to restore the program", Duration::from_secs(10), || {
        journal(&sb, "ipclusterd").contains(line).then_some(())
    });
    // The line is logged during the supervisor's turn; /metrics shows the snapshot published at its end.
    let series = "ipcluster_steering_restored_total{app=\"web\"}";
    wait_for("the restore to be counted", Duration::from_secs(5), || {
        (metric(&sb, series)? > 0.0).then_some(())
    });
    assert_eq!(metric(&sb, series), Some(1.0));
    for (src, band, pid) in answered_by(&sb) {
        let want = u32::from(src) & 3;
        assert_eq!((band, pid), (want, by_band[&want]), "{src} reached its own band's worker again");
    }
    // Restored once: the next reconciles find it intact.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(journal_with(&sb, "ipclusterd", line).matches(line).count(), 1);
}

/// Issue 21, item 8: what the daemon takes as root's word — app files, its own file, the
/// directory it pins steering in — on a path that someone else can change. Each is refused,
/// and said so with the path at fault and the fix; the rest keeps working.
#[test]
fn configuration_that_others_could_change_is_refused_with_the_path_and_the_fix() {
    let web = r#"
command = ["/usr/local/bin/ipcluster-demo"]
workers = 2
listen = ["0.0.0.0:80"]
routing = "socket"
autostart = false
ready_timeout = "10s"
stop_timeout = "2s"
"#;
    let sb = installed_sandbox();
    sb.write_file("/etc/ipcluster/apps/web.toml", web, 0o644).unwrap();
    // The daemon's own file, writable by everyone: it would open a metrics listener.
    sb.write_file("/etc/ipcluster/ipclusterd.toml", "metrics_listen = \"127.0.0.1:9464\"\n", 0o666).unwrap();
    sb.check(["chmod", "666", "/etc/ipcluster/ipclusterd.toml"]).unwrap();
    // The pin directory, made by another user before the daemon's first socket-mode deploy.
    sb.check(["useradd", "--system", "--user-group", "ipcevil"]).unwrap();
    sb.check(["mkdir", "-p", "/sys/fs/bpf/ipcluster"]).unwrap();
    sb.check(["chown", "ipcevil:ipcevil", "/sys/fs/bpf/ipcluster"]).unwrap();
    sb.check(["systemctl", "start", "ipclusterd"]).unwrap();
    let bus = Bus::connect(&sb);
    let mut seen = Vec::new();

    let j = journal_waiting(&sb, "ipclusterd", |j| {
        j.contains("/etc/ipcluster/ipclusterd.toml: refused: the daemon's file is writable")
    })
    .unwrap_or_else(|j| j);
    let metrics = sb.check(["ss", "-Hltn", "sport = :9464"]).unwrap();
    seen.push((
        "the daemon's file writable by others is refused, and the defaults used",
        j.contains("/etc/ipcluster/ipclusterd.toml: refused: the daemon's file is writable by its group and by others")
            && j.contains("chmod go-w /etc/ipcluster/ipclusterd.toml")
            && metrics.trim().is_empty(),
        format!("listening on 9464: {metrics:?}"),
    ));
    let pinned = bus.deploy_plain("web");
    seen.push((
        "a pin directory of another user fails the socket-mode deploy",
        matches!(&pinned, Err(e) if e.name == "org.ipcluster1.Error.DeployFailed"
            && e.message.contains("/sys/fs/bpf/ipcluster: refused: the pin directory is owned by uid")),
        format!("{pinned:?}"),
    ));
    sb.check(["chown", "root:root", "/sys/fs/bpf/ipcluster"]).unwrap();
    let fixed = bus.deploy_plain("web");
    seen.push((
        "once root's again, the deploy works",
        fixed == Ok(1) || fixed == Ok(2),
        format!("{fixed:?}"),
    ));

    // A directory on the way (/etc/ipcluster) that anyone can write: whoever can swap the apps
    // directory under the daemon between its check and its read.
    sb.check(["chmod", "777", "/etc/ipcluster"]).unwrap();
    sb.check(["systemctl", "reload", "ipclusterd"]).unwrap();
    let parent = bus.deploy_plain("web");
    seen.push((
        "an app file below a directory others can write is refused",
        matches!(&parent, Err(e) if e.name == "org.ipcluster1.Error.InvalidConfig"
            && e.message.contains("/etc/ipcluster: refused: the directory is writable by its group and by others")
            && e.message.contains("chmod go-w /etc/ipcluster")),
        format!("{parent:?}"),
    ));
    sb.check(["chmod", "755", "/etc/ipcluster"]).unwrap();

    // The app file a symbolic link (to a root-owned file): read only through O_NOFOLLOW.
    sb.write_file("/etc/ipcluster/web.toml.real", web, 0o644).unwrap();
    sb.check(["ln", "-sf", "/etc/ipcluster/web.toml.real", "/etc/ipcluster/apps/web.toml"]).unwrap();
    sb.check(["systemctl", "reload", "ipclusterd"]).unwrap();
    let link = bus.deploy_plain("web");
    seen.push((
        "an app file that is a symbolic link is refused",
        matches!(&link, Err(e) if e.name == "org.ipcluster1.Error.InvalidConfig" && e.message.contains("symbolic link")),
        format!("{link:?}"),
    ));
    sb.check(["rm", "/etc/ipcluster/apps/web.toml"]).unwrap();
    sb.write_file("/etc/ipcluster/apps/web.toml", web, 0o644).unwrap();
    sb.check(["systemctl", "reload", "ipclusterd"]).unwrap();
    let back = bus.deploy_plain("web");
    seen.push(("a plain root-owned file works again", back.is_ok(), format!("{back:?}")));

    for (what, ok, detail) in &seen {
        println!("{} {what}: {detail}", if *ok { "held:" } else { "BROKEN:" });
    }
    assert!(seen.iter().all(|(_, ok, _)| *ok), "see the lines above");
}

/// Issue 21, item 5: app A's worker floods the notify socket from 8 processes (its own
/// WATCHDOG=1, and STATUS= lines the daemon does not use) while app B, 64 workers with
/// `watchdog = "5s"`, deploys: B becomes ready, and no worker of B is taken for hung.
#[test]
fn a_notify_flood_from_one_app_delays_neither_readiness_nor_watchdog_of_another() {
    let flood = r#"
command = ["/bin/sh", "-c", "python3 /usr/local/lib/flood.py & exec /usr/local/bin/ipcluster-demo"]
workers = 1
listen = ["0.0.0.0:81"]
ready = "notify"
autostart = false
ready_timeout = "10s"
stop_timeout = "2s"
"#;
    let b = r#"
command = ["/usr/local/bin/ipcluster-demo"]
workers = 64
listen = ["0.0.0.0:80"]
ready = "notify"
watchdog = "5s"
autostart = false
ready_timeout = "20s"
stop_timeout = "2s"
"#;
    let flooder = "import os, socket, time\n\
        for _ in range(8):\n    if os.fork() == 0:\n        break\n\
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
        end = time.time() + 25\n\
        n = 0\n\
        while time.time() < end:\n    s.sendto(b'WATCHDOG=1' if n % 2 else b'STATUS=busy', os.environ['NOTIFY_SOCKET'])\n    n += 1\n\
        print('flood', os.getpid(), n, flush=True)\n";
    let (sb, bus) = started(&[
        ("/usr/local/lib/flood.py", flooder),
        ("/etc/ipcluster/apps/flood.toml", flood),
        ("/etc/ipcluster/apps/b.toml", b),
        ("/etc/ipcluster/ipclusterd.toml", "metrics_listen = \"127.0.0.1:9464\"\n"),
    ]);
    assert_eq!(bus.deploy_plain("flood"), Ok(1));
    std::thread::sleep(Duration::from_secs(1));
    let started_at = std::time::Instant::now();
    let deployed = bus.deploy_plain("b");
    let took = started_at.elapsed();
    println!("B's deploy during the flood: {deployed:?} in {took:?}");
    assert_eq!(deployed, Ok(1), "B became ready during the flood");
    let first: Vec<u32> = bus.list_workers("b").iter().map(|w| w.pid).collect();
    assert_eq!(first.len(), 64);
    // Longer than B's watchdog, with the flood going on.
    std::thread::sleep(Duration::from_secs(12));
    let floods = journal(&sb, "ipcluster-flood-1.scope").lines().filter(|l| l.starts_with("flood ")).count();
    let later: Vec<u32> = bus.list_workers("b").iter().map(|w| w.pid).collect();
    let watchdog = metric(&sb, "ipcluster_policy_actions_total{app=\"b\",action=\"watchdog\"}");
    println!(
        "after 12 s more: {} of B's 64 workers unchanged, watchdog actions {watchdog:?}, {floods} flooders done",
        later.iter().filter(|p| first.contains(p)).count()
    );
    assert_eq!(later, first, "no worker of B was replaced");
    assert_eq!(watchdog, Some(0.0), "no worker of B was taken for hung");
    assert!(bus.list_workers("flood").iter().all(|w| w.state == "live"), "A is served as well");
    // The flood really ran all along: each of its 9 senders says how much it sent at its end.
    let sent: Vec<u64> = wait_for("the flood's end", Duration::from_secs(30), || {
        let j = journal(&sb, "ipcluster-flood-1.scope");
        let counts: Vec<u64> = j
            .lines()
            .filter_map(|l| l.strip_prefix("flood ")?.split_whitespace().nth(1)?.parse().ok())
            .collect();
        (counts.len() == 9).then_some(counts)
    });
    let total: u64 = sent.iter().sum();
    println!("the flood: {total} datagrams from 9 processes in 25 s");
    assert!(total > 100_000, "the flood ran: {sent:?}");
}

/// A worker that listens on IPv4 only (`0.0.0.0:$PORT`), for an app whose entry routes IPv6 too.
const V4_ONLY: &str = r#"["/bin/sh", "-c", "exec python3 -m http.server --bind 0.0.0.0 $PORT"]"#;

/// Issue 21, item 4: a local user binds the IPv6 half of a worker's port (`[::]:P` with
/// `IPV6_V6ONLY`) next to a worker that listens on `0.0.0.0:P`: the worker never counts as ready
/// for an app that routes IPv6, and no IPv6 client reaches the squatter. A user who holds the
/// IPv6 half of the whole port range: the deploy says at once that there are no free ports, and
/// which user holds them.
#[test]
fn a_local_user_cannot_take_a_workers_other_family_nor_block_deploys_unnamed() {
    let web = format!(
        "command = {V4_ONLY}\nworkers = 1\nlisten = [\"[::]:80\"]\nautostart = false\nready_timeout = \"5s\"\nstop_timeout = \"2s\"\nport_range = \"30000-30007\"\n"
    );
    let (sb, bus) = started(&[("/etc/ipcluster/apps/web.toml", &web)]);
    sb.check(["useradd", "--system", "--user-group", "ipcsquat"]).unwrap();
    let deployer = {
        let address = sb.system_bus_address();
        std::thread::spawn(move || Bus::connect_to(&address).deploy_plain("web"))
    };
    let port = wait_for("the worker's port", Duration::from_secs(10), || {
        bus.list_workers("web").first().and_then(|w| w.ports.first().map(|p| p.1))
    });
    let squat = format!(
        "import socket, time\n\
         s = socket.socket(socket.AF_INET6)\n\
         s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)\n\
         s.bind(('::', {port})); s.listen()\n\
         print('bound', flush=True)\n\
         s.settimeout(8)\n\
         try:\n    c, a = s.accept(); print('stolen', a[0], flush=True); c.sendall(b'HTTP/1.0 200 OK\\r\\n\\r\\nsquatter'); c.close()\n\
         except socket.timeout:\n    print('nothing', flush=True)\n"
    );
    let squatter = sb
        .command(as_user("ipcsquat", &["python3", "-c", &squat]))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deployed = deployer.join().unwrap();
    // An IPv6 client of the public port, whatever the deploy said.
    let client = sb.run(["curl", "-sS", "--max-time", "3", "http://[::1]:80/"]).unwrap();
    let stolen = String::from_utf8_lossy(&squatter.wait_with_output().unwrap().stdout).into_owned();
    println!("deploy: {deployed:?}\nIPv6 client: {}\nsquatter: {stolen}", text(&client));
    assert!(!stolen.contains("stolen"), "the squatter got an IPv6 client: {stolen}");
    let e = deployed.unwrap_err();
    assert_eq!(e.name, "org.ipcluster1.Error.DeployFailed", "{e:?}");
    assert!(
        e.message.contains(&format!("[::]:{port}")) && e.message.contains("ipcsquat"),
        "says why and who: {e:?}"
    );

    // The IPv6 half of every port of the range.
    let hog = "import socket, time\nss = []\nfor p in range(30000, 30008):\n    s = socket.socket(socket.AF_INET6); s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1); s.bind(('::', p)); s.listen(); ss.append(s)\nprint('bound', flush=True)\ntime.sleep(30)\n";
    let mut hog = sb
        .command(as_user("ipcsquat", &["python3", "-c", hog]))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let demo = web.replace(V4_ONLY, "[\"/usr/local/bin/ipcluster-demo\"]");
    sb.write_file("/etc/ipcluster/apps/web.toml", &demo, 0o644).unwrap();
    sb.check(["systemctl", "reload", "ipclusterd"]).unwrap();
    let t = std::time::Instant::now();
    let e = bus.deploy_plain("web").unwrap_err();
    println!("with the range's IPv6 half held: {e:?} after {:?}", t.elapsed());
    assert_eq!(e.name, "org.ipcluster1.Error.DeployFailed", "{e:?}");
    assert!(e.message.contains("not enough free ports in 30000-30007"), "{e:?}");
    assert!(e.message.contains("ipcsquat"), "says which user holds them: {e:?}");
    let _ = hog.kill();
    let _ = hog.wait();
}

/// Issue 21, item 6 (the readiness probe): a worker that holds 500,000 duplicated sockets and
/// never listens. Its probe runs off the supervisor's loop and reads a bounded number of
/// descriptors: `ListWorkers` of another app stays under 50 ms at p99 meanwhile.
#[test]
fn a_worker_with_half_a_million_descriptors_does_not_stall_the_daemon() {
    let fds = "import os, resource, socket, time\n\
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n\
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))\n\
        s = socket.socket()\n\
        n = min(500000, hard - 64)\n\
        for _ in range(n):\n    os.dup(s.fileno())\n\
        print('holding', n, flush=True)\n\
        time.sleep(120)\n";
    let heavy = r#"
command = ["/usr/bin/python3", "/usr/local/lib/fds.py"]
workers = 1
listen = ["0.0.0.0:81"]
autostart = false
ready_timeout = "40s"
stop_timeout = "2s"
"#;
    let web = r#"
command = ["/usr/local/bin/ipcluster-demo"]
workers = 4
listen = ["0.0.0.0:80"]
autostart = false
ready_timeout = "10s"
stop_timeout = "2s"
"#;
    let (sb, bus) = started(&[
        ("/usr/local/lib/fds.py", fds),
        ("/etc/ipcluster/apps/heavy.toml", heavy),
        ("/etc/ipcluster/apps/web.toml", web),
    ]);
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    let started = sb.run(["ipclusterctl", "deploy", "heavy", "--no-block"]).unwrap();
    assert!(started.status.success(), "{}", text(&started));
    let holding = wait_for("the worker to hold its descriptors", Duration::from_secs(30), || {
        let j = journal(&sb, "ipcluster-heavy-1.scope");
        j.lines().find(|l| l.starts_with("holding ")).map(str::to_owned)
    });
    println!("{holding}");
    let mut latencies = Vec::new();
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        let t = std::time::Instant::now();
        assert_eq!(bus.list_workers("web").len(), 4);
        latencies.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(10));
    }
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    let max = *latencies.last().unwrap();
    println!(
        "ListWorkers of another app meanwhile: p50 {:?} p99 {p99:?} max {max:?} ({} calls)",
        latencies[latencies.len() / 2],
        latencies.len()
    );
    // A stall is what this guards against (805 ms p99 before the fix; ~17 ms after, on a quiet
    // machine): the bound leaves room for a machine shared with builds, and `cargo xtask bench`
    // measures the latency itself.
    assert!(p99 < Duration::from_millis(400), "p99 {p99:?}");
}

/// Issue 21, "Also": the unit's exposure as `systemd-analyze security` scores it stays at most
/// 6.1, and every setting it still counts against the unit is explained in docs/security.md.
#[test]
fn the_units_exposure_stays_at_most_6_1_and_every_remaining_exposure_is_explained() {
    let sb = installed_sandbox();
    let out = sb.run(["systemd-analyze", "security", "--no-pager", "ipclusterd.service"]).unwrap();
    let report = text(&out);
    let overall = report
        .lines()
        .find_map(|l| l.split("Overall exposure level for ipclusterd.service: ").nth(1))
        .and_then(|r| r.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no overall level in:\n{report}"));
    println!("{report}\nsystemd-analyze security ipclusterd: {overall}");
    assert!(overall <= 6.1, "exposure {overall} > 6.1:\n{report}");
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/security.md")).unwrap();
    let section =
        doc.split("### What the unit still exposes").nth(1).expect("the section in docs/security.md");
    // A `|` inside a table cell is written `\|`.
    let section = section.replace("\\|", "|");
    // Lines systemd counts against the unit: "✗ Setting=   Description   0.2".
    let missing: Vec<&str> = report
        .lines()
        .filter(|l| l.trim_start().starts_with('✗'))
        .filter_map(|l| l.trim_start().trim_start_matches('✗').split_whitespace().next())
        .filter(|setting| !section.contains(&format!("`{setting}`")))
        .collect();
    assert!(missing.is_empty(), "not explained in docs/security.md: {missing:?}\n{report}");
}
