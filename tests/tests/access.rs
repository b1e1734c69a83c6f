//! Access control: reading is open, changing needs root or polkit's org.ipcluster1.manage,
//! and bad or oversized arguments are refused without changing anything.

use std::{collections::HashMap, sync::LazyLock};

use ipcluster_e2e::{
    bus::{busctl, opt},
    cluster,
    fixture::Demo,
    nat_rules, text,
};

/// The app most scenarios here deploy.
static WEB: LazyLock<String> = LazyLock::new(|| Demo::new(2).toml());

fn as_user<'a>(user: &'a str, argv: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["setpriv", "--reuid", user, "--regid", user, "--clear-groups", "--"];
    v.extend_from_slice(argv);
    v
}

#[test]
fn unprivileged_callers_can_read_but_not_change() {
    let (sb, bus) = cluster(&[("web", WEB.as_str())]);
    sb.check(["useradd", "--system", "--user-group", "ipcreader"]).unwrap();
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    let before = (bus.list_generations(""), nat_rules(&sb));
    let deploy = ipcluster_e2e::bus::busctl_deploy("web");
    let out = sb.run(as_user("ipcreader", &deploy)).unwrap();
    assert!(!out.status.success());
    // busctl prints the standard error's meaning ("Access denied"); the daemon's journal says why.
    assert!(text(&out).contains("Access denied"), "{}", text(&out));
    for method in [vec!["KillRetired", "s", ""], vec!["RetireGeneration", "st", "web", "1"], vec!["Reload"]] {
        let mut argv = busctl(method[0]);
        argv.extend(method[1..].iter().copied());
        let out = sb.run(as_user("ipcreader", &argv)).unwrap();
        assert!(!out.status.success(), "{method:?} allowed: {}", text(&out));
        assert!(text(&out).contains("Access denied"), "{method:?}: {}", text(&out));
    }
    // Reading works.
    let mut list = busctl("ListWorkers");
    list.extend(["s", "web"]);
    let out = sb.run(as_user("ipcreader", &list)).unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let ctl = sb.run(as_user("ipcreader", &["ipclusterctl", "workers", "web"])).unwrap();
    assert!(ctl.status.success() && text(&ctl).contains("live"), "{}", text(&ctl));
    let ctl = sb.run(as_user("ipcreader", &["ipclusterctl", "deploy", "web"])).unwrap();
    assert_eq!(ctl.status.code(), Some(1), "{}", text(&ctl));
    assert!(text(&ctl).contains("access denied"), "{}", text(&ctl));
    // Owning the name is refused by the bus policy.
    let own = sb.run(as_user("ipcreader", &["/usr/local/bin/ipclusterd"])).unwrap();
    assert!(!own.status.success() && text(&own).contains("cannot own bus name"), "{}", text(&own));
    assert_eq!((bus.list_generations(""), nat_rules(&sb)), before, "a refused call changed something");
}

#[test]
fn a_polkit_rule_lets_a_user_deploy() {
    let (sb, bus) = cluster(&[("web", WEB.as_str())]);
    sb.check(["useradd", "--system", "--user-group", "ipcdeployer"]).unwrap();
    sb.write_file(
        "/etc/polkit-1/rules.d/50-ipcluster-test.rules",
        "polkit.addRule(function(action, subject) {\n  if (action.id == \"org.ipcluster1.manage\" && subject.user == \"ipcdeployer\")\n    return polkit.Result.YES;\n});\n",
        0o644,
    )
    .unwrap();
    let out = sb.run(as_user("ipcdeployer", &["ipclusterctl", "deploy", "web"])).unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("generation 1 is live"), "{}", text(&out));
    assert_eq!(bus.list_generations("web")[0].state, "live");
}

#[test]
fn oversized_and_malformed_arguments_are_refused_and_the_daemon_stays_responsive() {
    let (sb, bus) = cluster(&[("web", WEB.as_str())]);
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    let before = (bus.list_generations(""), nat_rules(&sb));
    let long = "a".repeat(10_000);
    assert_eq!(bus.deploy_plain(&long).unwrap_err().name, "org.freedesktop.DBus.Error.InvalidArgs");
    let many: HashMap<String, zbus::wire::OwnedVariant> =
        (0..1000).map(|i| (format!("k{i}"), opt(1u32))).collect();
    let r: Result<u64, _> = bus.call("Deploy", &("web", many));
    assert_eq!(r.unwrap_err().name, "org.freedesktop.DBus.Error.InvalidArgs");
    // 100 000 options, from another D-Bus implementation (python-dbus, as a local user would).
    let script = "import dbus\n\
        m = dbus.Interface(dbus.SystemBus().get_object('org.ipcluster1', '/org/ipcluster1'), 'org.ipcluster1.Manager')\n\
        opts = dbus.Dictionary({'k%d' % i: dbus.UInt32(1, variant_level=1) for i in range(100000)}, signature='sv')\n\
        try:\n    m.Deploy('web', opts)\nexcept dbus.DBusException as e:\n    print(e.get_dbus_name())\n";
    let out = sb.check(["python3", "-c", script]).unwrap();
    assert_eq!(out.trim(), "org.freedesktop.DBus.Error.InvalidArgs");
    // D-Bus strings cannot hold NUL: the bus itself drops a connection that sends one. The
    // daemon never sees it and keeps serving everyone else.
    let nul_sender = ipcluster_e2e::bus::Bus::connect(&sb);
    let nul = HashMap::from([("command", opt(vec!["/usr/local/bin/ipcluster-demo\0--x"]))]);
    let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| nul_sender.deploy("web", nul)));
    assert!(!matches!(refused, Ok(Ok(_))), "a NUL byte was accepted");
    // In app files (TOML allows \u0000), NUL is refused by the parser with the key named.
    sb.write_file(
        "/etc/ipcluster/apps/nul.toml",
        "command = [\"/bin/x\\u0000y\"]\nlisten = [\"0.0.0.0:81\"]\n",
        0o644,
    )
    .unwrap();
    sb.check(["systemctl", "reload", "ipclusterd"]).unwrap();
    let e = bus.deploy_plain("nul").unwrap_err();
    assert_eq!(e.name, "org.ipcluster1.Error.InvalidConfig");
    assert!(e.message.contains("command") && e.message.contains("NUL"), "{e:?}");
    let huge_argv = HashMap::from([("command", opt(vec!["x"; 10_000]))]);
    assert_eq!(bus.deploy("web", huge_argv).unwrap_err().name, "org.freedesktop.DBus.Error.InvalidArgs");
    let huge_env: Vec<String> = (0..10_000).map(|i| format!("V{i}=x")).collect();
    let huge_env = HashMap::from([("environment", opt(huge_env))]);
    assert_eq!(bus.deploy("web", huge_env).unwrap_err().name, "org.freedesktop.DBus.Error.InvalidArgs");
    let r: Result<(), _> = bus.call("RetireGeneration", &("web", "one"));
    assert_eq!(r.unwrap_err().name, "org.freedesktop.DBus.Error.InvalidArgs");
    let r: Result<u32, _> = bus.call("KillRetired", &(7u32,));
    assert_eq!(r.unwrap_err().name, "org.freedesktop.DBus.Error.InvalidArgs");
    assert_eq!((bus.list_generations(""), nat_rules(&sb)), before);
    assert_eq!(bus.deploy_plain("web"), Ok(2), "still responsive");
}
