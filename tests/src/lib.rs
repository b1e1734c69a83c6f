//! Helpers shared by the end-to-end scenarios in `tests/tests/`.
//!
//! Each scenario boots its own sandbox, installs the build with `cargo xtask install` inside it
//! and drives it the way an operator would: `systemctl`, `busctl`, `journalctl`, `iptables`, and
//! real TCP clients whose sockets live in the sandbox's network namespace.

pub mod bus;
pub mod netns;

pub use ipcluster_load as client;

use std::time::{Duration, Instant};

pub use ipcluster_sandbox::Sandbox;

/// Boots a sandbox with the build installed. Panics with the reason if this machine cannot run
/// end-to-end tests (not root, no systemd): a skipped end-to-end test must never look like a pass.
/// (`cargo xtask test` leaves these tests out, loudly, when they cannot run.)
pub fn installed_sandbox() -> Sandbox {
    if let Some(why) = ipcluster_sandbox::unavailable_reason() {
        panic!("end-to-end test cannot run: {why}");
    }
    let sandbox = Sandbox::boot().expect("sandbox boots");
    sandbox.install().expect("cargo xtask install succeeds inside the sandbox");
    sandbox
}

/// A sandbox with the build installed, the given app files in /etc/ipcluster/apps, and
/// ipclusterd started with `systemctl start`.
pub fn cluster(apps: &[(&str, &str)]) -> (Sandbox, bus::Bus) {
    let sb = installed_sandbox();
    for (name, text) in apps {
        sb.write_file(format!("/etc/ipcluster/apps/{name}.toml"), text, 0o644).unwrap();
    }
    sb.check(["systemctl", "start", "ipclusterd"]).unwrap();
    let bus = bus::Bus::connect(&sb);
    (sb, bus)
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `timeout` naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Panics, showing the first few, unless every request of a load succeeded.
pub fn assert_all_ok<A: std::fmt::Debug>(outcomes: &[(A, Result<client::Answer, client::Failure>)]) {
    let failures: Vec<_> = outcomes.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed, the first: {:?}",
        failures.len(),
        outcomes.len(),
        &failures[..failures.len().min(5)]
    );
}

/// Output of a command as text.
pub fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The nat table as `iptables -t nat -S` prints it inside the sandbox.
pub fn nat_rules(sb: &Sandbox) -> String {
    sb.check(["iptables", "-t", "nat", "-S"]).unwrap()
}

/// A property of org.ipcluster1.Manager read with `busctl get-property` inside the sandbox, as
/// busctl prints it (`s "0.1.0"`).
pub fn manager_property(sb: &Sandbox, name: &str) -> String {
    let out = sb.check([
        "busctl",
        "get-property",
        "org.ipcluster1",
        "/org/ipcluster1",
        "org.ipcluster1.Manager",
        name,
    ]);
    out.unwrap().trim().to_owned()
}

/// Nice values of every thread of `pid` (field 19 of /proc/<pid>/task/<tid>/stat).
pub fn thread_nices(sb: &Sandbox, pid: u32) -> Vec<i32> {
    let dir = sb.host_path(format!("/proc/{pid}/task"));
    let mut out = Vec::new();
    for t in std::fs::read_dir(dir).unwrap().flatten() {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r.to_owned()) {
            let f: Vec<&str> = rest.split_whitespace().collect();
            out.push(f[16].parse().unwrap());
        }
    }
    out
}

/// The environment of a process inside the sandbox.
pub fn environ(sb: &Sandbox, pid: u32) -> Vec<String> {
    let raw = std::fs::read(sb.host_path(format!("/proc/{pid}/environ"))).unwrap_or_default();
    raw.split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// The cgroup of a process inside the sandbox (`/ipcluster.slice/…/ipcluster-web-1.scope/worker-42`),
/// as the sandbox sees it (a cgroup path depends on the reader's cgroup namespace).
pub fn cgroup_of(sb: &Sandbox, pid: u32) -> String {
    let text = sb.check(["cat", &format!("/proc/{pid}/cgroup")]).unwrap_or_default();
    text.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or_default().to_owned()
}

/// Where a worker of generation `g` of `app` lives: a cgroup of its own below its scope's.
pub fn worker_cgroup(app: &str, g: u64, pid: u32) -> String {
    format!("/ipcluster.slice/ipcluster-{app}.slice/ipcluster-{app}-{g}.scope/worker-{pid}")
}
