//! The Debian package (`cargo xtask deb`) as a Debian administrator uses it, on a sandboxed host
//! without ipclusterd: `apt-get install ./ipclusterd_*.deb`, an app from the shipped example,
//! an upgrade to a higher version under load, remove, reinstall, purge; D-Bus activation; and
//! lintian on the package.
//!
//! The sandbox's /usr/sbin/policy-rc.d (this machine's image forbids starting services) is
//! removed inside it, so the maintainer scripts start and stop services as on a real host.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    process::Command,
    time::Duration,
};

use ipcluster_e2e::{
    Sandbox, bare_host, build_deb,
    bus::{Bus, WorkerRow},
    client::{Load, loopback_sources},
    journal_with, nat_rules, text, wait_for,
};

const PUBLIC: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 80);
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `apt-get ARGS` inside, non-interactively; its output. Fails the test unless it succeeds.
fn apt(sb: &Sandbox, args: &[&str]) -> String {
    let out = sb
        .command(["apt-get", "-y", "-q"].iter().chain(args))
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .unwrap();
    assert!(out.status.success(), "apt-get {args:?} failed: {}", text(&out));
    text(&out)
}

fn unit_property(sb: &Sandbox, unit: &str, property: &str) -> String {
    sb.check(["systemctl", "show", "-p", property, "--value", unit]).unwrap().trim().to_owned()
}

/// A ListWorkers row without RSS, CPU time and nice (which move on their own): app, generation,
/// band, pid, state, ports, start time.
type StableRow = (String, u64, u32, u32, String, Vec<(u16, u16)>, u64);

fn stable(rows: Vec<WorkerRow>) -> Vec<StableRow> {
    let mut v: Vec<_> = rows
        .into_iter()
        .map(|w| (w.app, w.generation, w.band, w.pid, w.state, w.ports, w.start_usec))
        .collect();
    v.sort();
    v
}

fn installed_version(sb: &Sandbox) -> String {
    sb.check(["dpkg-query", "-W", "-f", "${Version} ${db:Status-Abbrev}", "ipclusterd"]).unwrap()
}

#[test]
fn install_deploy_upgrade_under_load_remove_reinstall_purge() {
    let sb = bare_host();
    let v1 = build_deb(&sb, VERSION);
    let v2 = build_deb(&sb, &format!("{VERSION}+upgrade1"));

    // Install: enabled, started, where Debian puts things.
    apt(&sb, &["install", &v1]);
    assert_eq!(installed_version(&sb), format!("{VERSION} ii "));
    assert_eq!(sb.check(["systemctl", "is-enabled", "ipclusterd"]).unwrap().trim(), "enabled");
    assert_eq!(sb.check(["systemctl", "is-active", "ipclusterd"]).unwrap().trim(), "active");
    assert_eq!(unit_property(&sb, "ipclusterd", "FragmentPath"), "/lib/systemd/system/ipclusterd.service");
    let main_pid = sb.main_pid("ipclusterd").unwrap();
    let exe = std::fs::read_link(sb.host_path(format!("/proc/{main_pid}/exe"))).unwrap();
    assert_eq!(exe, Path::new("/usr/libexec/ipclusterd"));
    assert!(unit_property(&sb, "ipclusterd", "Names").contains("dbus-org.ipcluster1.service"));
    for f in [
        "/usr/bin/ipclusterctl",
        "/usr/bin/ipcluster-demo",
        "/usr/share/man/man8/ipclusterd.8.gz",
        "/usr/share/man/man1/ipclusterctl.1.gz",
        "/usr/share/bash-completion/completions/ipclusterctl",
        "/usr/share/zsh/vendor-completions/_ipclusterctl",
        "/usr/share/fish/vendor_completions.d/ipclusterctl.fish",
        "/usr/share/polkit-1/actions/org.ipcluster1.policy",
        "/usr/share/dbus-1/system.d/org.ipcluster1.conf",
        "/usr/share/dbus-1/system-services/org.ipcluster1.service",
    ] {
        assert!(sb.host_path(f).exists(), "{f} not installed");
    }
    // Every shipped unit is clean for systemd-analyze (it also checks the man pages exist).
    let verify = sb.run(["systemd-analyze", "verify", "ipclusterd.service", "ipcluster.slice"]).unwrap();
    assert!(verify.status.success() && text(&verify).trim().is_empty(), "{}", text(&verify));
    let tree = sb.run(["busctl", "tree", "org.ipcluster1"]).unwrap();
    assert!(tree.status.success() && tree.stderr.is_empty(), "{}", text(&tree));

    // The example is not an app until it is given an app file name; then it runs as it is.
    assert_eq!(ipcluster_e2e::manager_property(&sb, "Apps"), "as 0");
    let example = sb.read_file("/etc/ipcluster/apps/example.toml.disabled").unwrap();
    assert!(example.contains("command = [\"/usr/bin/ipcluster-demo\"]"), "{example}");
    let check = sb.run(["ipclusterctl", "check-config"]).unwrap();
    assert!(check.status.success(), "{}", text(&check));
    sb.check(["cp", "/etc/ipcluster/apps/example.toml.disabled", "/etc/ipcluster/apps/web.toml"]).unwrap();
    sb.check(["systemctl", "reload", "ipclusterd"]).unwrap();
    let bus = Bus::connect(&sb);
    wait_for("the example app to autostart", Duration::from_secs(15), || {
        (bus.list_workers("web").iter().filter(|w| w.generation == 1 && w.state == "live").count() == 4)
            .then_some(())
    });
    let out = sb.run(["ipclusterctl", "deploy", "web"]).unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "web: generation 2 is live");

    // Upgrade under load: not one request fails, the same workers serve, the new daemon adopts
    // both generations.
    let before = stable(bus.list_workers(""));
    assert_eq!(before.len(), 8);
    let old_pid = sb.main_pid("ipclusterd").unwrap();
    let load = Load::start(&sb, loopback_sources(16), PUBLIC);
    std::thread::sleep(Duration::from_millis(300));
    apt(&sb, &["install", &v2]);
    std::thread::sleep(Duration::from_millis(300));
    let outcomes = load.finish();
    assert_eq!(installed_version(&sb), format!("{VERSION}+upgrade1 ii "));
    let new_pid = sb.main_pid("ipclusterd").unwrap();
    assert!(new_pid != 0 && new_pid != old_pid, "the upgrade restarted the daemon ({old_pid} -> {new_pid})");
    let failures: Vec<_> = outcomes.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(outcomes.len() > 100, "the load ran ({} requests)", outcomes.len());
    assert!(
        failures.is_empty(),
        "{} of {} failed: {:?}",
        failures.len(),
        outcomes.len(),
        &failures[..5.min(failures.len())]
    );
    let serving: BTreeSet<u32> = outcomes.iter().map(|(_, r)| r.as_ref().unwrap().pid).collect();
    let live2: BTreeSet<u32> = before.iter().filter(|w| w.1 == 2).map(|w| w.3).collect();
    assert_eq!(serving, live2, "generation 2's workers served throughout");
    assert_eq!(stable(bus.list_workers("")), before, "every worker adopted as it was");
    journal_with(&sb, "ipclusterd", "adopted 2 generations with 8 workers");
    let out = sb.run(["ipclusterctl", "deploy", "web"]).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "web: generation 3 is live", "{}", text(&out));

    // Remove: the daemon and every app stop, rules go, configuration and state stay.
    let workers: Vec<u32> = bus.list_workers("").iter().map(|w| w.pid).collect();
    apt(&sb, &["remove", "ipclusterd"]);
    assert_eq!(installed_version(&sb), format!("{VERSION}+upgrade1 rc "));
    assert_eq!(sb.run(["systemctl", "is-active", "ipclusterd"]).unwrap().status.code(), Some(3));
    let patterns = ["ipclusterd.service", "ipcluster.slice", "ipcluster-*.slice", "ipcluster-*.scope"];
    let mut argv = vec!["systemctl", "list-units", "--no-legend", "--plain"];
    argv.extend(patterns);
    let units = sb.check(argv).unwrap();
    assert!(units.trim().is_empty(), "units left: {units}");
    for pid in &workers {
        assert!(!sb.host_path(format!("/proc/{pid}")).exists(), "worker {pid} still runs");
    }
    let rules = nat_rules(&sb);
    assert!(!rules.contains("IPCLUSTER") && !rules.contains("IPC-"), "{rules}");
    for kept in [
        "/etc/ipcluster/apps/web.toml",
        "/etc/ipcluster/apps/example.toml.disabled",
        "/var/lib/ipcluster/state.json",
    ] {
        assert!(sb.host_path(kept).exists(), "{kept} removed");
    }
    for gone in ["/usr/libexec/ipclusterd", "/usr/share/dbus-1/system-services/org.ipcluster1.service"] {
        assert!(!sb.host_path(gone).exists(), "{gone} left");
    }
    // Nothing answers for the name any more, and nothing brings the daemon back.
    let call = sb
        .run([
            "busctl",
            "call",
            "org.ipcluster1",
            "/org/ipcluster1",
            "org.ipcluster1.Manager",
            "ListGenerations",
            "s",
            "",
        ])
        .unwrap();
    assert!(!call.status.success(), "{}", text(&call));

    // Reinstall: the app was not stopped for good, it starts again and numbers go on.
    apt(&sb, &["install", &v2]);
    let bus = Bus::connect(&sb);
    let live = wait_for("the app to start again", Duration::from_secs(15), || {
        let rows = bus.list_workers("web");
        (rows.iter().filter(|w| w.state == "live").count() == 4).then_some(rows)
    });
    assert!(live.iter().all(|w| w.generation > 3), "generation numbers go on: {live:?}");

    // Purge: state and the shipped example go; the administrator's app file stays.
    apt(&sb, &["purge", "ipclusterd"]);
    let out = sb.run(["dpkg-query", "-W", "ipclusterd"]).unwrap();
    assert!(!out.status.success(), "still known to dpkg: {}", text(&out));
    for gone in [
        "/var/lib/ipcluster",
        "/etc/ipcluster/apps/example.toml.disabled",
        "/etc/systemd/system/multi-user.target.wants/ipclusterd.service",
        "/etc/systemd/system/dbus-org.ipcluster1.service",
    ] {
        assert!(!sb.host_path(gone).exists(), "{gone} left after purge");
    }
    assert!(
        sb.host_path("/etc/ipcluster/apps/web.toml").exists(),
        "the administrator's app file was removed"
    );
    let rules = nat_rules(&sb);
    assert!(!rules.contains("IPCLUSTER"), "{rules}");
}

#[test]
fn a_call_to_the_bus_name_starts_the_stopped_daemon() {
    let sb = bare_host();
    let deb = build_deb(&sb, VERSION);
    apt(&sb, &["install", &deb]);
    sb.check(["systemctl", "stop", "ipclusterd"]).unwrap();
    assert_eq!(unit_property(&sb, "ipclusterd", "ActiveState"), "inactive");
    // Any local user may read; the call itself starts the daemon (D-Bus activation).
    sb.check(["useradd", "--system", "ipcreader"]).unwrap();
    let call = sb
        .run([
            "setpriv",
            "--reuid=ipcreader",
            "--regid=nogroup",
            "--clear-groups",
            "busctl",
            "call",
            "org.ipcluster1",
            "/org/ipcluster1",
            "org.ipcluster1.Manager",
            "ListGenerations",
            "s",
            "",
        ])
        .unwrap();
    assert!(call.status.success(), "{}", text(&call));
    assert_eq!(String::from_utf8_lossy(&call.stdout).trim(), "a(stsuts) 0");
    // The daemon answers once it owns the name and knows what runs; systemd calls it active
    // once it has said READY=1 (right after, with no app to start).
    ipcluster_e2e::wait_for("the activated daemon to be active", std::time::Duration::from_secs(15), || {
        (unit_property(&sb, "ipclusterd", "ActiveState") == "active").then_some(())
    });
    // Masked, it stays stopped.
    sb.check(["systemctl", "stop", "ipclusterd"]).unwrap();
    sb.check(["systemctl", "mask", "ipclusterd"]).unwrap();
    let call = sb.run(["ipclusterctl", "version"]).unwrap();
    assert_eq!(call.status.code(), Some(3), "not reachable: {}", text(&call));
    assert!(text(&call).contains("masked"), "{}", text(&call));
    assert_eq!(unit_property(&sb, "ipclusterd", "ActiveState"), "inactive");
}

#[test]
fn lintian_reports_no_error_on_the_package() {
    let build = ipcluster_sandbox::Build::locate().expect("the build");
    let out_dir = ipcluster_sandbox::target_dir().join(format!("e2e-lintian-{}", std::process::id()));
    let out = Command::new(&build.xtask)
        .args(["deb", "--no-build", "--bin-dir"])
        .arg(&build.bin_dir)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .expect("xtask deb runs");
    let _ = std::fs::remove_dir_all(&out_dir);
    // xtask deb runs lintian and fails on any error; it prints every tag.
    assert!(out.status.success(), "{}", text(&out));
    let report = text(&out);
    assert!(report.contains("lintian:"), "lintian did not run: {report}");
    assert!(!report.lines().any(|l| l.starts_with("E: ")), "{report}");
}
