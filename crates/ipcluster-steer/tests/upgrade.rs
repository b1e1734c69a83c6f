//! A group pinned by the first version of the program (two slots: `outer`, `active`) upgraded by
//! this one while clients keep connecting. Needs root: ignored unless asked for (`cargo xtask
//! test` asks, as root, with `--run-ignored all`).

mod common;

use std::{
    collections::BTreeSet,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::OwnedFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use common::*;
use ipcluster_core::routing::band_of_ip;
use ipcluster_steer::*;

/// A generation bound without any program of this version: the first version's sockets.
fn generation(addr: SocketAddr, n: u32) -> (SockArray, Vec<OwnedFd>) {
    let table = SockArray::new().unwrap();
    let socks = (0..n)
        .map(|band| {
            let s = bind_reuseport(addr, 4096).unwrap();
            nonblocking(&s);
            table.insert(band, &s).unwrap();
            s
        })
        .collect();
    (table, socks)
}

fn pins(dir: &std::path::Path) -> BTreeSet<String> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect()
}

#[derive(Default)]
struct Traffic {
    connected: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
    accepted: AtomicU64,
    misrouted: AtomicU64,
}

/// The first version's group — A (4 bands) in force in slot 0, B (8 bands) staged in slot 1,
/// its program attached — is opened by this version while 32 clients keep connecting and an
/// acceptor checks that each connection lands on its band's socket of A: none refused, none
/// elsewhere, through `open` (the old program still attached), a second `open` (a daemon that
/// died before attaching), `attach` (the program replaced; the old pins go), and the daemon
/// giving the real band counts. Then B is made live by one update, and sessions work.
#[test]
#[ignore = "needs root: cargo xtask test runs it as root with --run-ignored"]
fn a_group_pinned_by_the_first_version_is_upgraded_without_a_refused_connection() {
    run("a_group_pinned_by_the_first_version_is_upgraded_without_a_refused_connection", |ns| {
        let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 8900);
        let legacy = Legacy::pin(&ns.bpffs, "up").unwrap();
        let (a, a_socks) = generation(addr, 4);
        legacy.attach(&a_socks[0]).unwrap();
        let (b, b_socks) = generation(addr, 8);
        legacy.switch_to(0, &a).unwrap();
        legacy.stage(1, &b).unwrap();
        let dir = ns.bpffs.join("up");
        assert_eq!(pins(&dir), ["active", "outer", "prog"].map(String::from).into());

        let socks: Arc<Vec<OwnedFd>> = Arc::new(a_socks.into_iter().chain(b_socks).collect());
        let sources: Vec<IpAddr> = (0..32).map(|k| v4(1 + 7 * k).into()).collect();
        let traffic = Arc::new(Traffic::default());
        let stop = Arc::new(AtomicBool::new(false));
        // Set once the connector has ended: then the acceptor knows every connection made.
        let connector_done = Arc::new(AtomicBool::new(false));
        let connector = {
            let (traffic, stop, sources) = (traffic.clone(), stop.clone(), sources.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for &src in &sources {
                        match connect(src, addr) {
                            Ok(_) => traffic.connected.fetch_add(1, Ordering::Relaxed),
                            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                                traffic.refused.fetch_add(1, Ordering::Relaxed)
                            }
                            Err(e) => {
                                eprintln!("connect from {src}: {e}");
                                traffic.failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                }
            })
        };
        let acceptor = {
            let (traffic, done, socks) = (traffic.clone(), connector_done.clone(), socks.clone());
            std::thread::spawn(move || {
                let mut idle = 0;
                // Until the connector ended and every connection made is accepted (or 5 s of
                // nothing).
                while !(done.load(Ordering::Relaxed)
                    && traffic.accepted.load(Ordering::Relaxed) >= traffic.connected.load(Ordering::Relaxed))
                    && idle < 5000
                {
                    let mut got = false;
                    for (i, l) in socks.iter().enumerate() {
                        while let Some((_, peer)) = accept_within(l, Duration::ZERO) {
                            got = true;
                            traffic.accepted.fetch_add(1, Ordering::Relaxed);
                            if i >= 4 || band_of_ip(peer.ip(), 4) as usize != i {
                                eprintln!("{} landed on listener {i}", peer.ip());
                                traffic.misrouted.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    if got {
                        idle = 0;
                    } else {
                        idle += 1;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            })
        };
        let mut phases = Vec::new();
        let mut phase = |name: &'static str| {
            let before = traffic.connected.load(Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(150));
            phases.push((name, traffic.connected.load(Ordering::Relaxed) - before));
        };
        phase("the first version");

        let st = Steering::load(&ns.bpffs, "up").unwrap();
        assert!(st.upgrade_pending() && st.program_replaced());
        assert_eq!(
            st.live().unwrap(),
            Some((0, 1024)),
            "the table in force, live, as the first version selected"
        );
        let slots = st.slots().unwrap();
        assert_eq!((slots[0].table, slots[1].table), (Some(a.id()), Some(b.id())));
        assert_eq!((slots[0].bands, slots[1].bands), (1024, 1024));
        assert!(slots[2..].iter().all(|s| s.table.is_none()));
        phase("opened, the old program still attached");

        drop(st);
        let st = Steering::load(&ns.bpffs, "up").unwrap();
        assert!(st.upgrade_pending() && st.program_replaced(), "not attached yet: upgraded again");
        assert_eq!(st.live().unwrap(), Some((0, 1024)));
        phase("opened again");

        st.attach(&socks[0]).unwrap();
        assert!(!st.upgrade_pending());
        let want = ["config", "control", "overrides", "prog", "sessions", "slot_info", "slots"];
        assert_eq!(pins(&dir), want.map(String::from).into(), "the old pins are gone");
        phase("attached");

        st.put(0, &a, 4).unwrap();
        st.set_live(0, 4).unwrap();
        st.put(1, &b, 8).unwrap();
        assert_eq!(st.slots().unwrap()[1].table, Some(b.id()));
        phase("given the band counts");

        stop.store(true, Ordering::Relaxed);
        connector.join().unwrap();
        connector_done.store(true, Ordering::Relaxed);
        acceptor.join().unwrap();
        let t = &traffic;
        let (connected, accepted) = (t.connected.load(Ordering::Relaxed), t.accepted.load(Ordering::Relaxed));
        eprintln!("connections per phase: {phases:?}; {connected} in all, {accepted} accepted");
        assert_eq!(t.refused.load(Ordering::Relaxed), 0, "refused connections");
        assert_eq!(t.failed.load(Ordering::Relaxed), 0, "failed connections");
        assert_eq!(t.misrouted.load(Ordering::Relaxed), 0, "connections off their band");
        assert_eq!(accepted, connected, "every connection reached a listener");
        for (name, n) in &phases {
            assert!(*n > 0, "no connection during {name:?}: the test saw nothing");
        }

        // The upgraded group works as any: B live by one update, sessions on.
        let all: Vec<&OwnedFd> = socks.iter().collect();
        let check = |want: &dyn Fn(IpAddr) -> usize| {
            for &src in &sources {
                let c = connect(src, addr).unwrap();
                assert_eq!(accepted_by(&all, &c), want(src), "{src}");
            }
        };
        st.set_session_timeout(Duration::from_secs(3600)).unwrap();
        check(&|src| band_of_ip(src, 4) as usize);
        st.set_live(1, 8).unwrap();
        check(&|src| band_of_ip(src, 4) as usize); // their sessions are on A
        st.set_session_timeout(Duration::ZERO).unwrap();
        check(&|src| 4 + band_of_ip(src, 8) as usize);
        let st = Steering::load(&ns.bpffs, "up").unwrap();
        assert!(!st.program_replaced() && !st.upgrade_pending(), "nothing left to upgrade");
    });
}

/// The first version's other states: the generation in force in slot 1 (slot 0 empty), and a
/// cleared group (nothing in force): live slot 1, and nothing live.
#[test]
#[ignore = "needs root: cargo xtask test runs it as root with --run-ignored"]
fn the_first_versions_slot_1_and_cleared_states_upgrade_too() {
    run("the_first_versions_slot_1_and_cleared_states_upgrade_too", |ns| {
        let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 8910);
        let legacy = Legacy::pin(&ns.bpffs, "one").unwrap();
        let (a, a_socks) = generation(addr, 2);
        legacy.attach(&a_socks[0]).unwrap();
        legacy.switch_to(1, &a).unwrap();
        let st = Steering::load(&ns.bpffs, "one").unwrap();
        assert_eq!(st.live().unwrap(), Some((1, 1024)));
        assert_eq!(st.current().unwrap().unwrap().id(), a.id());
        assert!(st.slots().unwrap()[0].table.is_none());
        st.attach(&a_socks[1]).unwrap();
        let all: Vec<&OwnedFd> = a_socks.iter().collect();
        for k in 1..9 {
            let c = connect(v4(k).into(), addr).unwrap();
            assert_eq!(accepted_by(&all, &c), (k & 1) as usize);
        }
        drop(st);

        let _legacy = Legacy::pin(&ns.bpffs, "cleared").unwrap();
        let st = Steering::load(&ns.bpffs, "cleared").unwrap();
        assert!(st.upgrade_pending());
        assert_eq!(st.live().unwrap(), None, "nothing was in force");
        assert!(st.slots().unwrap().iter().all(|s| s.table.is_none()));
    });
}
