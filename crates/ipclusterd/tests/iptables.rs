//! The real [`Iptables`] router against the kernel's netfilter, each test in a fresh network
//! namespace of its own thread (children spawned from that thread, iptables-save,
//! iptables-restore and their ip6tables twins, inherit it): apply → current → up to date, for
//! every shape of route in both families, what the rules do with other tools' chains, and how
//! a failed change is taken back. Needs root: every test is `#[ignore]`d, so a run as another
//! user reports each as skipped, and `cargo xtask test` runs them as root (`--run-ignored all`);
//! one run explicitly as another user fails, saying why.

use std::{
    io::Write,
    process::Command,
    time::{Duration, Instant},
};

use ipcluster_core::{
    name::AppName,
    routing::{self, AppRoute},
};
use ipclusterd::netfilter::{Applied, Iptables, Ipv6, Router, TIMEOUT, Tools};

/// Runs `f` with a router on a thread in a fresh network namespace. Fails when not root: the
/// tests are ignored unless asked for, and one asked for must run.
fn in_netns<R: Send + 'static>(test: &str, f: impl AsyncFnOnce(&Iptables) -> R + Send + 'static) -> R {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "{test} needs root (a network namespace, real iptables): it cannot run as this user"
    );
    let out = std::thread::spawn(move || {
        // Acts on this thread only; the host's rules are never in reach.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        let router = Iptables::new();
        router.check().expect("iptables is installed (cargo xtask test installs it)");
        // These tests are about both families: a host without IPv6 or ip6tables would let the
        // IPv6 half pass by doing nothing.
        match Ipv6::detect() {
            Ipv6::Present(Ok(_)) => {}
            other => panic!("IPv6 and ip6tables are needed here: {other:?}"),
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(f(&router))
    })
    .join();
    match out {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Runs the iptables command line (in the calling thread's namespace).
fn iptables(args: &[&str]) -> String {
    run("/usr/sbin/iptables", args)
}

/// Runs the ip6tables command line (in the calling thread's namespace).
fn ip6tables(args: &[&str]) -> String {
    run("/usr/sbin/ip6tables", args)
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Both families' rules, as iptables-save and ip6tables-save print them, without comments.
fn save() -> String {
    format!("{}\n# IPv6\n{}", save_of("iptables-save"), save_of("ip6tables-save"))
}

fn save_of(program: &str) -> String {
    let out = Command::new(format!("/usr/sbin/{program}")).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// An app with `bands` bands on `listen`, worker ports from `base` (one per band and entry),
/// guarding those and `retired` more.
fn route(app: &str, listen: &[&str], bands: usize, base: u16, retired: u16) -> AppRoute {
    let per = listen.len() as u16;
    let bands: Vec<Vec<u16>> =
        (0..bands as u16).map(|b| (0..per).map(|i| base + b * per + i).collect()).collect();
    let live: Vec<u16> = bands.iter().flatten().copied().collect();
    let top = live.iter().max().copied().unwrap_or(base);
    AppRoute {
        app: AppName::new(app).unwrap(),
        listen: listen.iter().map(|l| l.parse().unwrap()).collect(),
        bands,
        guarded: live.into_iter().chain((1..=retired).map(|i| top + i)).collect(),
        sessions: None,
    }
}

/// Applies `routes`: changed once, then the kernel's rules are up to date, and applying again
/// changes nothing. Returns how long the first apply took.
async fn settle(router: &Iptables, routes: &[AppRoute]) -> Duration {
    let started = Instant::now();
    let first = router.apply(routes).await.unwrap();
    let took = started.elapsed();
    let current = router.current().await.unwrap();
    assert!(
        routing::up_to_date(&current, routes),
        "not up to date after apply ({first:?}):\n{}\nwanted {routes:?}",
        save()
    );
    assert_eq!(router.apply(routes).await.unwrap(), Applied::Unchanged, "{}", save());
    let live: std::collections::BTreeSet<u16> =
        routes.iter().flat_map(|r| r.bands.iter().flatten().copied()).collect();
    assert_eq!(current.routed_ports(), live);
    took
}

#[test]
#[ignore = "needs root: cargo xtask test runs it as root with --run-ignored"]
fn every_shape_of_route_is_up_to_date_after_apply() {
    in_netns("every_shape_of_route_is_up_to_date_after_apply", async |router| {
        let shapes: Vec<Vec<AppRoute>> = vec![
            vec![route("one", &["0.0.0.0:80"], 1, 20000, 0)],
            vec![route("addr", &["127.0.0.1:8080"], 1, 20000, 0)],
            vec![route("two", &["192.0.2.1:443"], 2, 20000, 2)],
            vec![route("mixed", &["0.0.0.0:80", "192.0.2.1:443", "10.0.0.1:8443"], 2, 20000, 6)],
            vec![route("wide", &["0.0.0.0:80", "127.0.0.1:81"], 64, 20000, 128)],
            vec![
                route("a", &["0.0.0.0:80"], 4, 20000, 4),
                route("b", &["127.0.0.1:8080", "0.0.0.0:8443"], 64, 21000, 0),
                route("c", &["192.0.2.7:25"], 1, 22000, 1),
            ],
            // An app removed; the others keep their rules.
            vec![route("a", &["0.0.0.0:80"], 4, 20000, 4), route("c", &["192.0.2.7:25"], 1, 22000, 1)],
            // A cutover of one app to new ports.
            vec![route("a", &["0.0.0.0:80"], 4, 20008, 8), route("c", &["192.0.2.7:25"], 1, 22000, 1)],
            // Guarded ports in no order, with duplicates and gaps (several multiport rules).
            vec![AppRoute {
                guarded: (0..100u16).map(|i| 30000 + (i * 37) % 400).chain([30000, 65535, 1024]).collect(),
                ..route("scatter", &["0.0.0.0:80"], 2, 20000, 0)
            }],
            // Every app gone.
            vec![],
        ];
        for routes in &shapes {
            settle(router, routes).await;
        }
        // After the last app nothing of ours is left: no chain, no jump, in either table.
        let current = router.current().await.unwrap();
        assert!(current.v4.is_empty(), "{current:?}");
        assert!(!save().contains("IPC"), "{}", save());
    });
}

#[test]
#[ignore = "needs root: cargo xtask test runs it as root with --run-ignored"]
fn every_shape_of_ipv6_route_is_up_to_date_after_apply() {
    in_netns("every_shape_of_ipv6_route_is_up_to_date_after_apply", async |router| {
        let shapes: Vec<Vec<AppRoute>> = vec![
            // The wildcard, one band: both families, no -s, no -d.
            vec![route("one", &["[::]:80"], 1, 20000, 0)],
            // A specific address, two bands.
            vec![route("addr", &["[2001:db8::1]:443"], 2, 20000, 2)],
            // 64 bands: the mask ::3f.
            vec![route("wide", &["[::]:80", "[fd00::5]:81"], 64, 20000, 128)],
            // Several entries of both families, and an IPv4-mapped one (IPv4's).
            vec![route(
                "mixed",
                &["0.0.0.0:80", "[::]:8080", "[2001:db8::1]:443", "192.0.2.1:8443", "[::ffff:192.0.2.2]:25"],
                4,
                20000,
                4,
            )],
            // Apps of each family side by side.
            vec![
                route("four", &["0.0.0.0:80"], 4, 20000, 4),
                route("six", &["[2001:db8::7]:80", "[2001:db8::8]:80"], 2, 21000, 0),
                route("both", &["[::]:8443"], 8, 22000, 8),
            ],
            // The IPv6-only app removed: its chain goes, the others stay.
            vec![route("four", &["0.0.0.0:80"], 4, 20000, 4), route("both", &["[::]:8443"], 8, 22000, 8)],
            // A cutover of the dual-stack app to new ports.
            vec![route("four", &["0.0.0.0:80"], 4, 20000, 4), route("both", &["[::]:8443"], 8, 22008, 16)],
            // Only IPv4 left: our chains leave the IPv6 nat table, the guard stays.
            vec![route("four", &["0.0.0.0:80"], 4, 20000, 4)],
            vec![],
        ];
        for (i, routes) in shapes.iter().enumerate() {
            settle(router, routes).await;
            if i == shapes.len() - 2 {
                let nat6 = router.current().await.unwrap().v6.unwrap().nat;
                assert!(nat6.chains.is_empty() && nat6.hooks.is_empty(), "{nat6:?}");
            }
        }
        // Nothing of ours is left in either IPv6 table.
        let v6 = save_of("ip6tables-save");
        assert!(!v6.contains("IPC"), "{v6}");
    });
}

/// What ip6tables-save prints for the IPv6 rules: the band as `-s ::b/::mask`, a specific
/// address as `/128`, each rule where it belongs, in the band's order.
#[test]
#[ignore = "needs root: cargo xtask test runs it as root with --run-ignored"]
fn ipv6_rules_are_what_the_docs_say() {
    in_netns("ipv6_rules_are_what_the_docs_say", async |router| {
        let routes = [
            route("web", &["[::]:80", "[2001:db8::1]:443", "10.0.0.1:8443"], 4, 20000, 0),
            route("four", &["0.0.0.0:81"], 2, 21000, 0),
        ];
        settle(router, &routes).await;
        let nat = ip6tables(&["-t", "nat", "-S"]);
        let app: Vec<&str> = nat.lines().filter(|l| l.starts_with("-A IPC-web ")).collect();
        assert_eq!(
            app,
            [
                "-A IPC-web -s ::/::3 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 20000",
                "-A IPC-web -s ::1/::3 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 20003",
                "-A IPC-web -s ::2/::3 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 20006",
                "-A IPC-web -s ::3/::3 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 20009",
                "-A IPC-web -s ::/::3 -d 2001:db8::1/128 -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 20001",
                "-A IPC-web -s ::1/::3 -d 2001:db8::1/128 -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 20004",
                "-A IPC-web -s ::2/::3 -d 2001:db8::1/128 -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 20007",
                "-A IPC-web -s ::3/::3 -d 2001:db8::1/128 -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 20010",
            ],
            "{nat}"
        );
        assert!(nat.contains("-A IPCLUSTER -j IPC-web\n") && !nat.contains("IPC-four"), "{nat}");
        assert!(nat.contains("-A PREROUTING -m addrtype --dst-type LOCAL -j IPCLUSTER"), "{nat}");
        assert!(nat.contains("-A OUTPUT -m addrtype --dst-type LOCAL -j IPCLUSTER"), "{nat}");
        let filter = ip6tables(&["-S"]);
        assert!(
            filter.contains("-A INPUT ! -i lo -p tcp -m conntrack --ctstate NEW -m conntrack ! --ctstate DNAT -j IPCLUSTER"),
            "{filter}"
        );
        assert!(
            filter.contains("-A IPCLUSTER -p tcp -m multiport --dports 20000:20011,21000:21001 -j DROP"),
            "{filter}"
        );
        // IPv4: the wildcard and the IPv4 entry, not the IPv6 address.
        let v4 = iptables(&["-t", "nat", "-S", "IPC-web"]);
        assert_eq!(v4.matches("REDIRECT").count(), 8, "{v4}");
        assert!(!v4.contains("--dport 443 "), "{v4}");
        let current = router.current().await.unwrap();
        let six = current.v6.as_ref().unwrap();
        assert_eq!(six.routed_ports(), [20000, 20001, 20003, 20004, 20006, 20007, 20009, 20010].into());
    });
}

#[test]
#[ignore = "needs root: cargo xtask test runs it as root with --run-ignored"]
fn other_tools_ipv6_rules_are_left_alone_and_a_flush_is_repaired() {
    in_netns("other_tools_ipv6_rules_are_left_alone_and_a_flush_is_repaired", async |router| {
        ip6tables(&["-t", "nat", "-N", "IPC-backup"]);
        ip6tables(&["-t", "nat", "-A", "IPC-backup", "-p", "tcp", "--dport", "9", "-j", "RETURN"]);
        ip6tables(&["-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", "9", "-j", "IPC-backup"]);
        ip6tables(&["-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"]);
        let foreign: Vec<String> =
            save_of("ip6tables-save").lines().filter(|l| l.starts_with("-A ")).map(str::to_owned).collect();
        let both =
            [route("web", &["[::]:80"], 4, 20000, 4), route("api", &["[2001:db8::1]:81"], 2, 21000, 0)];
        settle(router, &both).await;
        settle(router, &both[..1]).await;
        settle(router, &[]).await;
        let after = save_of("ip6tables-save");
        for line in &foreign {
            assert!(after.lines().any(|l| l == line), "lost {line}:\n{after}");
        }
        let e = router.apply(&[route("backup", &["[::]:80"], 1, 20000, 0)]).await.unwrap_err();
        assert!(e.0.contains("ip6tables nat chain IPC-backup") && e.0.contains("not ipclusterd's"), "{e}");
        assert!(!save_of("iptables-save").contains("IPC-backup"), "nothing changed in IPv4 either");

        settle(router, &both).await;
        ip6tables(&["-t", "nat", "-F"]);
        ip6tables(&["-F"]);
        assert!(!routing::up_to_date(&router.current().await.unwrap(), &both));
        assert_eq!(router.apply(&both).await.unwrap(), Applied::Changed);
        assert!(routing::up_to_date(&router.current().await.unwrap(), &both), "{}", save());
    });
}

/// One family's transaction fails while the other's succeeds (a real iptables or ip6tables for
/// one, a restore that fails for the other): the other's nat table is taken back by a second
/// real restore, and routing is as it was in both families. Then the real router applies
/// normally again.
#[test]
#[ignore = "needs root: cargo xtask test runs it as root with --run-ignored"]
fn a_failed_change_in_one_family_takes_the_other_back() {
    in_netns("a_failed_change_in_one_family_takes_the_other_back", async |router| {
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("iptables-undo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let failing = dir.join("failing-restore");
        std::fs::write(&failing, "#!/bin/sh\ncat > /dev/null\necho 'restore: line 9 failed' >&2\nexit 1\n")
            .unwrap();
        std::fs::set_permissions(&failing, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let real = |family| Tools::find(family).unwrap();
        let broken4 = Iptables::with_tools(
            Tools { restore: failing.clone(), ..real(routing::Family::V4) },
            Ipv6::detect(),
            TIMEOUT,
        );
        let broken6 = Iptables::with_tools(
            real(routing::Family::V4),
            Ipv6::Present(Ok(Tools { restore: failing, ..real(routing::Family::V6) })),
            TIMEOUT,
        );

        // IPv4 fails, from nothing: every chain and jump the IPv6 change made in nat is gone
        // again (the IPv6 guard, in filter, describes held ports and stays).
        let gen1 =
            [route("web", &["[::]:80"], 4, 20000, 0), route("api", &["[2001:db8::1]:81"], 2, 21000, 0)];
        let e = broken4.apply(&gen1).await.unwrap_err();
        assert!(e.0.contains("line 9 failed"), "{e}");
        let now = router.current().await.unwrap();
        assert_eq!(now.v6.as_ref().unwrap().nat, routing::Table::default(), "{}", save());
        assert!(now.v6.unwrap().filter.hooks.contains("INPUT"), "the IPv6 guard stays");
        assert_eq!(now.v4, routing::Tables::default(), "{}", save());

        // IPv4 fails at a cutover: the new ports in IPv6 are undone to the old ones, rule for rule.
        settle(router, &gen1).await;
        let (nat4, nat6) = (iptables(&["-t", "nat", "-S"]), ip6tables(&["-t", "nat", "-S"]));
        let gen2 = [route("web", &["[::]:80"], 4, 20016, 16), route("other", &["[::]:82"], 1, 22000, 0)];
        assert!(broken4.apply(&gen2).await.unwrap_err().0.contains("line 9 failed"));
        assert_eq!(ip6tables(&["-t", "nat", "-S"]), nat6, "the IPv6 nat table as it was");
        assert_eq!(iptables(&["-t", "nat", "-S"]), nat4, "the IPv4 nat table as it was");

        // IPv6 fails at the same cutover: the IPv4 nat table is taken back.
        let e = broken6.apply(&gen2).await.unwrap_err();
        assert!(
            e.0.starts_with("cannot route [::]:80 of app web over IPv6") && e.0.contains("line 9"),
            "{e}"
        );
        assert_eq!(iptables(&["-t", "nat", "-S"]), nat4, "the IPv4 nat table as it was");
        assert_eq!(ip6tables(&["-t", "nat", "-S"]), nat6, "the IPv6 nat table as it was");
        let now = router.current().await.unwrap();
        assert_eq!(now.routed_ports(), routing::Existing::after(&gen1).routed_ports());
        // For an IPv4-only app, IPv6 holds only the guard: its failure does not stop IPv4.
        let four = [route("four", &["0.0.0.0:80"], 2, 23000, 0)];
        assert_eq!(broken6.apply(&four).await, Ok(Applied::Changed));
        assert!(routing::family_up_to_date(routing::Family::V4, &router.current().await.unwrap().v4, &four));

        settle(router, &gen2).await;
        std::fs::remove_dir_all(&dir).unwrap();
    });
}

#[test]
#[ignore = "needs root: cargo xtask test runs it as root with --run-ignored"]
fn other_tools_rules_and_chains_are_left_alone_and_a_flush_is_repaired() {
    in_netns("other_tools_rules_and_chains_are_left_alone_and_a_flush_is_repaired", async |router| {
        // Another tool's rules, and a chain that only looks like ours.
        iptables(&["-t", "nat", "-N", "IPC-backup"]);
        iptables(&["-t", "nat", "-A", "IPC-backup", "-p", "tcp", "--dport", "9", "-j", "RETURN"]);
        iptables(&["-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", "9", "-j", "IPC-backup"]);
        iptables(&["-N", "IPC-filter"]);
        iptables(&["-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"]);
        let foreign: Vec<String> =
            save().lines().filter(|l| l.starts_with("-A ")).map(str::to_owned).collect();

        let both = [route("web", &["0.0.0.0:80"], 4, 20000, 4), route("api", &["127.0.0.1:81"], 2, 21000, 0)];
        settle(router, &both).await;
        settle(router, &both[..1]).await;
        settle(router, &[]).await;
        let after = save();
        for line in &foreign {
            assert!(after.lines().any(|l| l == line), "lost {line}:\n{after}");
        }
        assert!(after.contains(":IPC-backup") && after.contains(":IPC-filter"), "{after}");

        // An app whose chain name another tool holds, with rules in it, is refused.
        let e = router.apply(&[route("backup", &["0.0.0.0:80"], 1, 20000, 0)]).await.unwrap_err();
        assert!(e.0.contains("IPC-backup") && e.0.contains("not ipclusterd's"), "{e}");

        // `iptables -t nat -F` and `iptables -F` (a firewall reload): repaired.
        settle(router, &both).await;
        iptables(&["-t", "nat", "-F"]);
        iptables(&["-F"]);
        assert!(!routing::up_to_date(&router.current().await.unwrap(), &both));
        assert_eq!(router.apply(&both).await.unwrap(), Applied::Changed);
        assert!(routing::up_to_date(&router.current().await.unwrap(), &both), "{}", save());
    });
}

/// The numbers the docs quote: rule counts, the size of the restore inputs, and how long an
/// apply (one iptables-save and one iptables-restore, and the same of ip6tables where IPv6 is
/// in play) takes at 256 and 1024 workers, for an IPv4-only app with a router that leaves
/// IPv6 alone (as on a host without it) and with one that guards IPv6 too, and for a
/// dual-stack app. A deploy's steps: the first generation; the new workers' ports joining the
/// guard (filter only, as the supervisor refreshes it when workers start); the cutover (nat
/// only); then a scattered guard (every other port: the worst case for batching).
#[test]
#[ignore = "needs root: cargo xtask test runs it as root with --run-ignored"]
fn large_clusters_apply_in_one_input() {
    in_netns("large_clusters_apply_in_one_input", async |router| {
        let v4_only = Iptables::with_tools(
            Tools::find(routing::Family::V4).unwrap(),
            Ipv6::Absent("measuring IPv4 alone".into()),
            TIMEOUT,
        );
        let mut report = String::new();
        for workers in [256usize, 1024] {
            for (public, r, what) in [
                ("0.0.0.0:80", &v4_only, "IPv4 only"),
                ("0.0.0.0:80", router, "IPv4 app, IPv6 guarded"),
                ("[::]:80", router, "dual-stack"),
            ] {
                let n = workers as u16;
                // A live generation and a retired one of the same size, ports in one block.
                let gen1 = route("big", &[public], workers, 20000, n);
                let fresh = settle(r, std::slice::from_ref(&gen1)).await;
                // The next deploy's workers start: their ports are guarded.
                let started = AppRoute { guarded: (20000..20000 + 3 * n).collect(), ..gen1.clone() };
                let guard = settle(r, std::slice::from_ref(&started)).await;
                // Cutover: every band to the new ports.
                let gen2 = AppRoute {
                    bands: gen1.bands.iter().map(|b| vec![b[0] + 2 * n]).collect(),
                    ..started.clone()
                };
                let existing = r.current().await.unwrap();
                let inputs: Vec<String> = routing::Family::ALL
                    .iter()
                    .filter_map(|f| Some((f, existing.family(*f)?)))
                    .map(|(f, t)| routing::render(*f, t, std::slice::from_ref(&gen2)).unwrap())
                    .filter(|t| !t.is_empty())
                    .map(|t| shape(&t))
                    .collect();
                let cutover = settle(r, std::slice::from_ref(&gen2)).await;
                let rules = |t: &str, chain: &str| {
                    t.lines().filter(|l| l.starts_with(&format!("-A {chain}"))).count()
                };
                let families = if public.starts_with('[') { 2 } else { 1 };
                assert_eq!(rules(&save(), "IPC-big"), families * workers);
                let scattered = AppRoute { guarded: (0..n).map(|i| 30000 + 2 * i).collect(), ..gen2.clone() };
                let now = r.current().await.unwrap();
                let scattered_text =
                    routing::render(routing::Family::V4, &now.v4, std::slice::from_ref(&scattered)).unwrap();
                let scattered_took = settle(r, std::slice::from_ref(&scattered)).await;
                let _ = writeln!(
                    report,
                    "{workers} workers, {what} ({public}): first {fresh:.1?}; guard {guard:.1?}; cutover {cutover:.1?} ({}); scattered guard {scattered_took:.1?} ({})",
                    inputs.join(" + "),
                    shape(&scattered_text),
                );
                settle(r, &[]).await;
            }
        }
        let _ = write!(std::io::stderr(), "{report}");
    });
}

use std::fmt::Write as _;

/// What a restore input holds: its size and the rule lines of each table.
fn shape(text: &str) -> String {
    let (filter, nat) = text.split_once("*nat\n").unwrap_or((text, ""));
    let rules = |t: &str| t.lines().filter(|l| l.starts_with("-A ") || l.starts_with("-I ")).count();
    format!("{} bytes: {} filter rules, {} nat rules", text.len(), rules(filter), rules(nat))
}
