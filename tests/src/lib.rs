//! Helpers shared by the end-to-end scenarios in `tests/tests/`.
//!
//! Each scenario boots its own sandbox, installs the build with `cargo xtask install` inside it
//! and drives it the way an operator would: `systemctl`, `busctl`, `journalctl`, `iptables`, and
//! real TCP clients whose sockets live in the sandbox's network namespace.

pub mod bus;
pub mod fixture;
pub mod fleet;
pub mod netns;

pub use ipcluster_load as client;

use std::time::{Duration, Instant};

pub use ipcluster_sandbox::Sandbox;

/// Boots a sandbox with the build installed. Panics with the reason if this machine cannot run
/// end-to-end tests (not root, no systemd): a skipped end-to-end test must never look like a pass.
/// (`cargo xtask test` leaves these tests out, loudly, when they cannot run.)
pub fn installed_sandbox() -> Sandbox {
    installed_sandbox_with(Vec::new())
}

/// [`installed_sandbox`] that also sees the host directories `share` (read-only, at
/// [`Sandbox::inside`]).
pub fn installed_sandbox_with(share: Vec<std::path::PathBuf>) -> Sandbox {
    if let Some(why) = ipcluster_sandbox::unavailable_reason() {
        panic!("end-to-end test cannot run: {why}");
    }
    let options = ipcluster_sandbox::Options { share, ..Default::default() };
    let sandbox = Sandbox::boot_with(options).expect("sandbox boots");
    sandbox.install().expect("cargo xtask install succeeds inside the sandbox");
    sandbox
}

/// A booted sandbox that is a host without ipclusterd, whatever this machine has installed from
/// source (the overlay keeps the machine's own files), and without policy-rc.d.
pub fn bare_host() -> Sandbox {
    bare_host_with(Vec::new())
}

/// [`bare_host`] that also sees the host directories `share` (read-only, at [`Sandbox::inside`]).
pub fn bare_host_with(share: Vec<std::path::PathBuf>) -> Sandbox {
    if let Some(why) = ipcluster_sandbox::unavailable_reason() {
        panic!("end-to-end test cannot run: {why}");
    }
    let sb = Sandbox::boot_with(ipcluster_sandbox::Options { share, ..Default::default() })
        .expect("sandbox boots");
    let out = sb.run(["dpkg-query", "-W", "ipclusterd"]).unwrap();
    assert!(!out.status.success(), "ipclusterd is installed on this machine: {}", text(&out));
    sb.without_source_install().unwrap();
    sb
}

/// Builds the package of version `version` from the release binaries into the sandbox's
/// /tmp/debs with `xtask deb` (run on the host); returns its path inside.
pub fn build_deb(sb: &Sandbox, version: &str) -> String {
    use std::process::Command;
    let build = sb.build().expect("the build");
    let out = Command::new(&build.xtask)
        .args(["deb", "--no-build", "--no-lintian", "--version", version, "--bin-dir"])
        .arg(&build.bin_dir)
        .arg("--out")
        .arg(sb.host_path("/tmp/debs"))
        .output()
        .expect("xtask deb runs");
    assert!(out.status.success(), "xtask deb failed: {}", text(&out));
    let arch =
        String::from_utf8(Command::new("dpkg").arg("--print-architecture").output().unwrap().stdout).unwrap();
    let inside = format!("/tmp/debs/ipclusterd_{version}_{}.deb", arch.trim());
    assert!(sb.host_path(&inside).exists(), "{inside} not built: {}", text(&out));
    inside
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

/// The journal of `unit` (`journalctl -u UNIT -o cat`) once `ready` holds for it, polled every
/// 100 ms for up to 10 s; panics naming `what`, with its last 40 lines, otherwise. A line
/// reaches the journal a moment after it was written (journald reads its sockets in its own
/// time, later still on a loaded machine): a test that reads the journal once, right after the
/// action that logs, races journald and fails now and then for nothing.
pub fn journal_until(sb: &Sandbox, unit: &str, what: &str, ready: impl Fn(&str) -> bool) -> String {
    journal_waiting(sb, unit, ready).unwrap_or_else(|j| {
        let tail: Vec<&str> = j.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        panic!("the journal of {unit} did not show {what} within 10 s; its last lines:\n{}", tail.join("\n"))
    })
}

/// The journal of `unit` once `ready` holds for it (`Ok`), or as it is after 10 s (`Err`):
/// for a test that reports what it saw rather than stop at the first miss. A `journalctl`
/// that fails is reported in the journal's place.
pub fn journal_waiting(sb: &Sandbox, unit: &str, ready: impl Fn(&str) -> bool) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let j = sb
            .check(["journalctl", "-u", unit, "-o", "cat", "--no-pager"])
            .unwrap_or_else(|e| format!("(journalctl failed: {e:#})"));
        if ready(&j) {
            return Ok(j);
        }
        if Instant::now() >= deadline {
            return Err(j);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// [`journal_until`] the journal of `unit` contains `line`.
pub fn journal_with(sb: &Sandbox, unit: &str, line: &str) -> String {
    journal_until(sb, unit, &format!("{line:?}"), |j| j.contains(line))
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
