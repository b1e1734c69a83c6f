//! The real [`Iptables`] router against the kernel's netfilter, each test in a fresh network
//! namespace of its own thread (children spawned from that thread, iptables-save and
//! iptables-restore, inherit it): apply → current → up to date, for every shape of route, and
//! what the rules do with other tools' chains. Needs root; as another user every test says
//! loudly that it did not run.

use std::{
    io::Write,
    process::Command,
    time::{Duration, Instant},
};

use ipcluster_core::{
    name::AppName,
    routing::{self, AppRoute},
};
use ipclusterd::netfilter::{Applied, Iptables, Router};

/// Runs `f` with a router on a thread in a fresh network namespace; `None` (with a loud message
/// on stderr) when not root.
fn in_netns<R: Send + 'static>(
    test: &str,
    f: impl AsyncFnOnce(&Iptables) -> R + Send + 'static,
) -> Option<R> {
    if !nix::unistd::Uid::effective().is_root() {
        // Straight to fd 2: libtest captures eprintln! of passing tests, and this must be seen.
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED: {test} needs root (a network namespace, real iptables); it did not run ***"
        );
        return None;
    }
    let out = std::thread::spawn(move || {
        // Acts on this thread only; the host's rules are never in reach.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        let router = Iptables::new();
        router.check().expect("iptables is installed (cargo xtask test installs it)");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(f(&router))
    })
    .join();
    match out {
        Ok(r) => Some(r),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Runs the iptables command line (in the calling thread's namespace).
fn iptables(args: &[&str]) -> String {
    let out = Command::new("/usr/sbin/iptables").args(args).output().unwrap();
    assert!(out.status.success(), "iptables {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn save() -> String {
    let out = Command::new("/usr/sbin/iptables-save").output().unwrap();
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
        // After the last app: our chains are empty, no app chain is left.
        let current = router.current().await.unwrap();
        assert_eq!(current.nat.chains.iter().collect::<Vec<_>>(), ["IPCLUSTER"]);
        assert!(!save().contains("IPC-"), "{}", save());
    });
}

#[test]
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

/// The numbers the docs quote: rule counts, the size of the restore input, and how long an
/// apply (one iptables-save, one iptables-restore) takes at 256 and 1024 workers.
#[test]
fn large_clusters_apply_in_one_input() {
    in_netns("large_clusters_apply_in_one_input", async |router| {
        let mut report = String::new();
        for workers in [256usize, 1024] {
            // A live generation and a retired one of the same size, ports in one block.
            let gen1 = route("big", &["0.0.0.0:80"], workers, 20000, workers as u16);
            let fresh = settle(router, std::slice::from_ref(&gen1)).await;
            // The next deploy: every band to new ports, the old ones still guarded.
            let gen2 = AppRoute {
                bands: gen1.bands.iter().map(|b| vec![b[0] + workers as u16]).collect(),
                guarded: (20000..20000 + 3 * workers as u16).collect(),
                ..gen1.clone()
            };
            let existing = router.current().await.unwrap();
            let text = routing::render(&existing, std::slice::from_ref(&gen2)).unwrap();
            let cutover = settle(router, std::slice::from_ref(&gen2)).await;
            let rules =
                |t: &str, chain: &str| t.lines().filter(|l| l.starts_with(&format!("-A {chain}"))).count();
            let saved = save();
            assert_eq!(rules(&saved, "IPC-big"), workers);
            // Scattered guard: every other port, the worst case for batching.
            let scattered =
                AppRoute { guarded: (0..workers as u16).map(|i| 30000 + 2 * i).collect(), ..gen2.clone() };
            let now = router.current().await.unwrap();
            let scattered_text = routing::render(&now, std::slice::from_ref(&scattered)).unwrap();
            let scattered_took = settle(router, std::slice::from_ref(&scattered)).await;
            let _ = writeln!(
                report,
                "{workers} workers: fresh apply {fresh:?}; cutover {cutover:?} ({}); scattered guard {scattered_took:?} ({})",
                shape(&text),
                shape(&scattered_text),
            );
            settle(router, &[]).await;
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
