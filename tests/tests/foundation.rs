//! The foundation: a sandboxed systemd host, the install path, and a daemon that owns its name.

use std::{
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use ipcluster_e2e::{Sandbox, installed_sandbox, text, wait_for};

#[test]
fn daemon_starts_under_systemd_owns_its_name_and_stops_cleanly() {
    let sb = installed_sandbox();
    // The units as installed from source are clean (the package's: tests/tests/package.rs).
    let verify = sb.run(["systemd-analyze", "verify", "ipclusterd.service", "ipcluster.slice"]).unwrap();
    assert!(verify.status.success() && text(&verify).trim().is_empty(), "{}", text(&verify));
    sb.check(["systemctl", "start", "ipclusterd"]).unwrap();
    assert_eq!(sb.check(["systemctl", "is-active", "ipclusterd"]).unwrap().trim(), "active");

    // Type=notify: systemd saw READY=1 and our STATUS= line.
    let status = sb.check(["systemctl", "show", "-p", "StatusText", "--value", "ipclusterd"]).unwrap();
    assert!(status.contains("apps"), "STATUS= not received: {status:?}");

    let introspect = sb.check(["busctl", "introspect", "org.ipcluster1", "/org/ipcluster1"]).unwrap();
    assert!(introspect.contains("org.ipcluster1.Manager"), "{introspect}");
    // busctl reads every object's introspection without a warning (it used to print
    // "Unexpected signal <arg> direction value 'in'." 34 times for `busctl tree`).
    let tree = sb.run(["busctl", "tree", "org.ipcluster1"]).unwrap();
    assert!(tree.status.success() && tree.stderr.is_empty(), "busctl tree: {}", text(&tree));
    let paths = sb.check(["busctl", "tree", "--list", "org.ipcluster1"]).unwrap();
    assert_eq!(paths.lines().collect::<Vec<_>>(), ["/", "/org", "/org/ipcluster1"]);
    for path in paths.lines() {
        let out = sb.run(["busctl", "introspect", "org.ipcluster1", path]).unwrap();
        assert!(out.status.success() && out.stderr.is_empty(), "busctl introspect {path}: {}", text(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains("org.freedesktop.DBus.Properties"));
    }
    let version = ipcluster_e2e::manager_property(&sb, "Version");
    assert_eq!(version, format!("s \"{}\"", env!("CARGO_PKG_VERSION")));
    assert_eq!(sb.check(["ipclusterctl", "version"]).unwrap().trim(), env!("CARGO_PKG_VERSION"));

    // The daemon logs to the journal (tracing-journald), visible per unit.
    wait_for("the daemon's journal lines", Duration::from_secs(15), || {
        let j = sb.check(["journalctl", "-u", "ipclusterd", "--no-pager", "-o", "cat"]).ok()?;
        j.contains("serving on the bus").then_some(())
    });

    // A second daemon must not take the name from the first.
    let second = sb.run(["timeout", "10", "/usr/local/bin/ipclusterd"]).unwrap();
    assert!(!second.status.success(), "second daemon ran: {}", text(&second));
    assert!(text(&second).contains("cannot own bus name org.ipcluster1"), "{}", text(&second));
    let owner = sb.check(["busctl", "status", "--no-pager", "org.ipcluster1"]).unwrap();
    let main_pid = sb.check(["systemctl", "show", "-p", "MainPID", "--value", "ipclusterd"]).unwrap();
    assert!(owner.contains(&format!("PID={}", main_pid.trim())), "name moved away from the service: {owner}");

    // Only root may own the name (bus policy).
    let nobody = sb
        .run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/local/bin/ipclusterd"])
        .unwrap();
    assert!(!nobody.status.success());
    assert!(text(&nobody).contains("cannot own bus name"), "{}", text(&nobody));

    let start = Instant::now();
    sb.check(["systemctl", "stop", "ipclusterd"]).unwrap();
    // Well inside TimeoutStopSec (10 s): the daemon exits on SIGTERM, it is not killed.
    assert!(start.elapsed() < Duration::from_secs(8), "stop took {:?}", start.elapsed());
    let result = sb.check(["systemctl", "show", "-p", "Result", "--value", "ipclusterd"]).unwrap();
    assert_eq!(result.trim(), "success", "the daemon did not exit cleanly on SIGTERM");
}

#[test]
fn sandboxes_are_isolated_from_each_other() {
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| Sandbox::boot().unwrap());
        let b = s.spawn(|| Sandbox::boot().unwrap());
        (a.join().unwrap(), b.join().unwrap())
    });
    a.check(["iptables", "-t", "nat", "-N", "IPC-ISOLATION"]).unwrap();
    a.check(["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "4242", "-j", "IPC-ISOLATION"])
        .unwrap();
    assert!(a.check(["iptables", "-t", "nat", "-S"]).unwrap().contains("IPC-ISOLATION"));
    assert!(!b.check(["iptables", "-t", "nat", "-S"]).unwrap().contains("IPC-ISOLATION"));
    a.write_file("/etc/isolation-probe", "a", 0o644).unwrap();
    assert!(b.read_file("/etc/isolation-probe").is_err());
    // Separate PID namespaces: each sees its own systemd as PID 1.
    assert_ne!(a.init_pid(), b.init_pid());
    assert_eq!(a.read_file("/proc/1/comm").unwrap().trim(), "systemd");
}

#[test]
fn the_host_is_untouched_by_a_sandbox() {
    let marker = Path::new("/tmp").join(format!("ipcluster-e2e-marker-{}", std::process::id()));
    fs::write(&marker, "host marker").unwrap();
    let rules_before = host_rules();
    let etc_probe = Path::new("/etc/ipcluster-sandbox-probe");
    let unit_on_host = Path::new("/etc/systemd/system/ipclusterd.service").exists();

    let sb = installed_sandbox();
    sb.check(["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "4243", "-j", "ACCEPT"])
        .unwrap();
    sb.write_file(etc_probe, "inside", 0o644).unwrap();
    sb.write_file("/tmp/inside-probe", "inside", 0o644).unwrap();
    // The sandbox has a private /tmp and cleans it as a booted host would.
    assert!(sb.read_file(&marker).is_err(), "the host's /tmp is visible inside the sandbox");
    sb.check(["systemd-tmpfiles", "--clean"]).unwrap();
    sb.check(["systemctl", "start", "ipclusterd"]).unwrap();
    let installed = sb.host_path("/usr/local/bin/ipclusterd");
    assert!(installed.exists());
    sb.teardown().unwrap();

    assert_eq!(host_rules(), rules_before, "the host's netfilter rules changed");
    assert!(!etc_probe.exists(), "a file written to the sandbox's /etc reached the host");
    assert_eq!(
        Path::new("/etc/systemd/system/ipclusterd.service").exists(),
        unit_on_host,
        "install reached the host"
    );
    assert!(!Path::new("/tmp/inside-probe").exists());
    assert_eq!(fs::read_to_string(&marker).unwrap(), "host marker", "the host's /tmp was cleaned");
    fs::remove_file(&marker).unwrap();
}

fn host_rules() -> String {
    let out = Command::new("iptables-save").output().expect("iptables-save runs on the host");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}
