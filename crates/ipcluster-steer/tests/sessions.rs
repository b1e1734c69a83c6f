//! The program's second version against the running kernel: sessions, overrides and probes,
//! held to `model::Model` (`slots.rs`: the slots themselves). Each test runs in fresh network and
//! mount namespaces (see `common`) and needs root: ignored unless asked for (`cargo xtask test`
//! asks, as root, with `--run-ignored all`).

mod common;

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use common::*;
use ipcluster_core::routing::band_of_ip;
use ipcluster_steer::{
    model::{Choice, Model},
    *,
};

/// Sessions stick across a cutover to another slot, are refreshed by each connection, expire
/// after the timeout, stop counting when their slot gets a new table, and a client whose
/// draining band's socket is gone goes to the live generation, its record with it;
/// `session_counts` is exact (with and without batch lookups) throughout.
#[test]
#[ignore = "needs root: cargo xtask test runs it as root with --run-ignored"]
fn sessions_stick_across_a_cutover_and_end_as_they_should() {
    run("sessions_stick_across_a_cutover_and_end_as_they_should", |ns| {
        let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 8000);
        let st = Steering::load(&ns.bpffs, "sessions").unwrap();
        assert_eq!(st.sessions_capacity(), DEFAULT_SESSIONS);
        assert_eq!(st.session_timeout().unwrap(), Duration::ZERO, "off until set");
        let mut a = Gen::new(&st, addr, 4);
        st.put(0, &a.table, 4).unwrap();
        st.set_live(0, 4).unwrap();
        st.set_session_timeout(HOUR).unwrap();
        let mut model = Model { timeout_ns: HOUR.as_nanos() as u64, live: Some((0, 4)), ..Model::default() };
        model.put(0, a.filled(), 4);
        let epoch0 = st.slots().unwrap()[0].epoch;
        assert_eq!(model.slots[0].epoch, epoch0, "a fresh slot's first epoch");

        let old = lo_sources(1..33);
        let counts = |st: &Steering| {
            let c = st.session_counts().unwrap();
            assert_eq!(c, st.session_counts_by_key().unwrap(), "batch and key-by-key walks agree");
            c
        };
        {
            let t = targets(&[(0, &a)]);
            for choice in agree(&mut model, &t, addr, &old) {
                assert!(matches!(choice, Some(Choice::New { slot: 0, .. })));
            }
        }
        assert_eq!(counts(&st), [32, 0, 0, 0, 0, 0, 0, 0]);
        let s = st.session(v4(6).into()).unwrap().expect("recorded");
        assert_eq!((s.slot, s.epoch), (0, epoch0));

        // The cutover: B (8 bands) in slot 1, live. Old clients stay on A; new ones go to B.
        let b = Gen::new(&st, addr, 8);
        st.put(1, &b.table, 8).unwrap();
        st.set_live(1, 8).unwrap();
        assert_eq!(st.live().unwrap(), Some((1, 8)));
        model.put(1, b.filled(), 8);
        model.live = Some((1, 8));
        let new = lo_sources(100..116);
        {
            let t = targets(&[(0, &a), (1, &b)]);
            for (choice, src) in agree(&mut model, &t, addr, &old).into_iter().zip(&old) {
                assert_eq!(choice, Some(Choice::Session { slot: 0, band: band_of_ip(*src, 4) }));
            }
            for (choice, src) in agree(&mut model, &t, addr, &new).into_iter().zip(&new) {
                assert_eq!(choice, Some(Choice::New { slot: 1, band: band_of_ip(*src, 8) }));
            }
        }
        assert_eq!(counts(&st), [32, 16, 0, 0, 0, 0, 0, 0]);
        assert_eq!(counts(&st), model.session_counts(now_ns()));

        // Each connection refreshes its record.
        let before = st.session(v4(6).into()).unwrap().unwrap().last_seen;
        std::thread::sleep(Duration::from_millis(5));
        {
            let t = targets(&[(0, &a), (1, &b)]);
            agree(&mut model, &t, addr, &[v4(6).into()]);
        }
        let after = st.session(v4(6).into()).unwrap().unwrap().last_seen;
        assert!(after > before, "refreshed: {before:?} -> {after:?}");
        assert!(monotonic_now() >= after, "on CLOCK_MONOTONIC");

        // A short timeout: every record is idle for longer; none counts, and a returning client
        // is a new one (recorded on the live slot).
        st.set_session_timeout(Duration::from_millis(50)).unwrap();
        model.timeout_ns = 50_000_000;
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(counts(&st), [0; 8]);
        {
            let t = targets(&[(0, &a), (1, &b)]);
            let choice = agree(&mut model, &t, addr, &[v4(7).into()]);
            assert_eq!(choice, [Some(Choice::New { slot: 1, band: 7 })], "expired: band 7 of B");
        }
        st.set_session_timeout(HOUR).unwrap();
        model.timeout_ns = HOUR.as_nanos() as u64;
        assert_eq!(st.session(v4(7).into()).unwrap().unwrap().slot, 1);
        assert_eq!(counts(&st), [31, 17, 0, 0, 0, 0, 0, 0], "an hour again: the older records count again");

        // A's band-2 worker dies: its clients go to B, their records move to slot 1.
        a.kill(2);
        model.slots[0].filled.as_mut().unwrap().remove(&2);
        let band2: Vec<IpAddr> = old.iter().copied().filter(|s| band_of_ip(*s, 4) == 2).collect();
        {
            let t = targets(&[(0, &a), (1, &b)]);
            for (choice, src) in agree(&mut model, &t, addr, &band2).into_iter().zip(&band2) {
                assert_eq!(choice, Some(Choice::New { slot: 1, band: band_of_ip(*src, 8) }));
                assert_eq!(st.session(*src).unwrap().unwrap().slot, 1, "{src}'s record moved");
            }
        }
        assert_eq!(counts(&st), [23, 25, 0, 0, 0, 0, 0, 0]);

        // A new table in slot 0: the records of A stop counting at once; their clients go to B.
        let a2 = Gen::new(&st, addr, 4);
        st.put(0, &a2.table, 4).unwrap();
        model.put(0, a2.filled(), 4);
        assert_ne!(st.slots().unwrap()[0].epoch, epoch0);
        assert_eq!(counts(&st), [0, 25, 0, 0, 0, 0, 0, 0]);
        {
            let t = targets(&[(0, &a), (0, &a2), (1, &b)]);
            for choice in agree(&mut model, &t, addr, &old[..8]) {
                let slot = choice.map(|c| c.target().0);
                assert_eq!(slot, Some(1), "{choice:?}: new clients of B, or B's sessions");
            }
        }
        // Putting the same table again changes nothing (idempotent: the epoch stays).
        let epoch = st.slots().unwrap()[0].epoch;
        st.put(0, &a2.table, 4).unwrap();
        assert_eq!(st.slots().unwrap()[0].epoch, epoch);
        // Forgetting a session.
        assert!(st.forget_session(v4(1).into()).unwrap());
        assert!(!st.forget_session(v4(1).into()).unwrap());
        assert_eq!(st.session(v4(1).into()).unwrap(), None);

        // Turned off: no lookup, no record; clients go by the live generation's bands.
        st.set_session_timeout(Duration::ZERO).unwrap();
        model.timeout_ns = 0;
        let before = st.sessions().unwrap().len();
        {
            let t = targets(&[(0, &a2), (1, &b)]);
            for (choice, src) in agree(&mut model, &t, addr, &old).into_iter().zip(&old) {
                assert_eq!(choice, Some(Choice::New { slot: 1, band: band_of_ip(*src, 8) }));
            }
        }
        assert_eq!(st.sessions().unwrap().len(), before, "nothing recorded");
        assert_eq!(st.session_counts().unwrap(), [0; 8]);
    });
}

/// An override sends its band's new clients to another slot (a canary's, which fills only that
/// band) while clients with a session stay where it is, with and without sessions; clearing it
/// or emptying the slot sends the band's new clients back to the live generation.
#[test]
#[ignore = "needs root: cargo xtask test runs it as root with --run-ignored"]
fn an_override_takes_a_bands_new_clients_and_leaves_sessions() {
    run("an_override_takes_a_bands_new_clients_and_leaves_sessions", |ns| {
        let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 8100);
        let st = Steering::load(&ns.bpffs, "canary").unwrap();
        let a = Gen::new(&st, addr, 8);
        st.put(0, &a.table, 8).unwrap();
        st.set_live(0, 8).unwrap();
        let c = Gen::with_bands(&st, addr, [1, 6]);
        st.put(5, &c.table, 8).unwrap();
        let mut model = Model { live: Some((0, 8)), ..Model::default() };
        model.put(0, a.filled(), 8);
        model.put(5, c.filled(), 8);
        let t = targets(&[(0, &a), (5, &c)]);
        let sources = lo_sources(1..33);

        // Without sessions.
        st.set_override(1, Some(5)).unwrap();
        st.set_override(6, Some(5)).unwrap();
        assert_eq!(st.overrides().unwrap(), vec![(1, 5), (6, 5)]);
        model.overrides.extend([(1, 5), (6, 5)]);
        for (choice, src) in agree(&mut model, &t, addr, &sources).into_iter().zip(&sources) {
            let band = band_of_ip(*src, 8);
            let slot = if band == 1 || band == 6 { 5 } else { 0 };
            assert_eq!(choice, Some(Choice::New { slot, band }));
        }
        st.clear_overrides().unwrap();
        assert_eq!(st.overrides().unwrap(), vec![]);
        model.overrides.clear();
        agree(&mut model, &t, addr, &sources);

        // With sessions: clients of band 1 seen before the override keep their session on A.
        st.set_session_timeout(HOUR).unwrap();
        model.timeout_ns = HOUR.as_nanos() as u64;
        let early = lo_sources(1..17);
        agree(&mut model, &t, addr, &early);
        st.set_override(1, Some(5)).unwrap();
        model.overrides.insert(1, 5);
        for (choice, src) in agree(&mut model, &t, addr, &sources).into_iter().zip(&sources) {
            let band = band_of_ip(*src, 8);
            match choice.unwrap() {
                Choice::Session { slot: 0, band: b } if early.contains(src) => assert_eq!(b, band),
                Choice::New { slot: 5, band: 1 } => assert!(band == 1 && !early.contains(src)),
                Choice::New { slot: 0, band: b } => assert!(b == band && b != 1 && !early.contains(src)),
                other => panic!("{src}: {other:?}"),
            }
        }
        assert_eq!(st.session_counts().unwrap(), model.session_counts(now_ns()));
        assert_eq!(st.session_counts().unwrap()[5], 2, "127.0.0.17 and .25 are the canary's");

        // The canary rolled back: overrides cleared, then its slot emptied (its sessions end).
        st.clear_overrides().unwrap();
        model.overrides.clear();
        agree(&mut model, &t, addr, &[v4(17).into(), v4(33).into()]); // a session; a new client
        assert_eq!(st.session(v4(17).into()).unwrap().unwrap().slot, 5);
        assert_eq!(st.session(v4(33).into()).unwrap().unwrap().slot, 0);
        assert!(st.clear_slot(5).unwrap());
        assert!(!st.clear_slot(5).unwrap(), "idempotent");
        model.clear_slot(5);
        agree(&mut model, &t, addr, &sources);
        assert_eq!(st.session_counts().unwrap(), [33, 0, 0, 0, 0, 0, 0, 0], "127.0.0.1 to .33");
        assert_eq!(st.session_counts().unwrap(), model.session_counts(now_ns()));

        // An override to an empty slot: the live one.
        st.set_override(3, Some(7)).unwrap();
        model.overrides.insert(3, 7);
        assert_eq!(land(&t, v4(200 * 8 + 3).into(), addr), Some((0, 3)));
    });
}

/// A probe source reaches exactly one slot's band, live or not, on any address of the group
/// (IPv4, dual-stack, a non-loopback one), is refused when that socket is missing (no
/// fallback), and is never recorded as a session.
#[test]
#[ignore = "needs root: cargo xtask test runs it as root with --run-ignored"]
fn a_probe_reaches_exactly_its_slot_and_band_and_records_nothing() {
    run("a_probe_reaches_exactly_its_slot_and_band_and_records_nothing", |ns| {
        let public = Ipv4Addr::new(10, 99, 0, 1);
        add_v4(public).unwrap();
        for (i, (listen, dst)) in [
            (IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V4(Ipv4Addr::LOCALHOST)),
            (IpAddr::V6(Ipv6Addr::UNSPECIFIED), IpAddr::V4(Ipv4Addr::LOCALHOST)),
            (IpAddr::V4(public), IpAddr::V4(public)),
        ]
        .into_iter()
        .enumerate()
        {
            let port = 8200 + i as u16;
            let (listen, addr) = (SocketAddr::new(listen, port), SocketAddr::new(dst, port));
            let st = Steering::load(&ns.bpffs, &format!("probe{i}")).unwrap();
            st.set_session_timeout(HOUR).unwrap();
            let a = Gen::new(&st, listen, 4);
            let mut b = Gen::new(&st, listen, 8);
            st.put(0, &a.table, 4).unwrap();
            st.set_live(0, 4).unwrap();
            st.put(3, &b.table, 8).unwrap(); // starting: not live
            let t = targets(&[(0, &a), (3, &b)]);
            let probe = |slot, band| IpAddr::V4(probe_source(slot, band).unwrap());
            for band in 0..8 {
                assert_eq!(land(&t, probe(3, band), addr), Some((3, band)), "{listen}: slot 3 band {band}");
            }
            for band in 0..4 {
                assert_eq!(land(&t, probe(0, band), addr), Some((0, band)));
            }
            assert_eq!(land(&t, probe(0, 5), addr), None, "slot 0 has no band 5: refused, no fallback");
            assert_eq!(land(&t, probe(6, 0), addr), None, "an empty slot: refused");
            b.kill(5);
            let t = targets(&[(0, &a), (3, &b)]);
            assert_eq!(land(&t, probe(3, 5), addr), None, "a gone socket: refused, no neighbour");
            assert_eq!(land(&t, probe(3, 4), addr), Some((3, 4)));
            assert_eq!(st.sessions().unwrap(), vec![], "{listen}: no probe recorded");
            // Ordinary clients still go to the live generation.
            assert_eq!(land(&t, v4(6).into(), addr), Some((0, 2)));
        }
        assert_eq!(probe_source(7, 1023).unwrap(), Ipv4Addr::new(127, 253, 31, 255));
        assert!(matches!(probe_source(8, 0), Err(SteerError::SlotOutOfRange(8))));
        assert!(matches!(probe_source(0, 1024), Err(SteerError::BandOutOfRange(1024))));
    });
}

/// IPv6 clients by their full address, and IPv4 clients of a dual-stack socket as
/// `::ffff:a.b.c.d` (the same client as over IPv4), keep their sessions across a cutover.
#[test]
#[ignore = "needs root: cargo xtask test runs it as root with --run-ignored"]
fn ipv6_and_dual_stack_clients_keep_their_sessions() {
    run("ipv6_and_dual_stack_clients_keep_their_sessions", |ns| {
        let port = 8300;
        let listen = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port);
        let (to6, to4) = (
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port),
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port),
        );
        let st = Steering::load(&ns.bpffs, "dual").unwrap();
        st.set_session_timeout(HOUR).unwrap();
        let a = Gen::new(&st, listen, 4);
        st.put(2, &a.table, 4).unwrap();
        st.set_live(2, 4).unwrap();
        let mut model = Model { live: Some((2, 4)), timeout_ns: HOUR.as_nanos() as u64, ..Model::default() };
        model.put(2, a.filled(), 4);
        let v6s: Vec<IpAddr> = (1..=16).map(|k| v6(k).into()).collect();
        let v4s = lo_sources(1..17);
        let b = Gen::new(&st, listen, 8);
        let t = targets(&[(2, &a), (4, &b)]);
        agree(&mut model, &t, to6, &v6s);
        agree(&mut model, &t, to4, &v4s);
        let recorded: BTreeSet<IpAddr> = st.sessions().unwrap().into_iter().map(|(c, _)| c).collect();
        assert_eq!(recorded, v6s.iter().chain(&v4s).copied().collect(), "IPv4 clients listed as IPv4");
        st.put(4, &b.table, 8).unwrap();
        st.set_live(4, 8).unwrap();
        model.put(4, b.filled(), 8);
        model.live = Some((4, 8));
        for choice in agree(&mut model, &t, to6, &v6s).into_iter().chain(agree(&mut model, &t, to4, &v4s)) {
            assert!(matches!(choice, Some(Choice::Session { slot: 2, .. })), "{choice:?}");
        }
        // An IPv6 address whose last word is an IPv4 client's is another client.
        let twin: IpAddr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0x7f00, 1).into();
        assert_eq!(st.session(twin).unwrap(), None);
        assert_eq!(st.session_counts().unwrap(), [0, 0, 32, 0, 0, 0, 0, 0]);
    });
}

/// Connections queued on a draining generation's socket when it closes migrate to the live
/// generation's socket of their band (read from the migrating socket), and their clients'
/// records move with them: IPv4, IPv6 and IPv4-on-dual-stack.
#[test]
#[ignore = "needs root: cargo xtask test runs it as root with --run-ignored"]
fn queued_connections_of_a_draining_socket_migrate_with_their_sessions() {
    run("queued_connections_of_a_draining_socket_migrate_with_their_sessions", |ns| {
        enable_migration().unwrap();
        let lo4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let (any6, lo6) = (IpAddr::V6(Ipv6Addr::UNSPECIFIED), IpAddr::V6(Ipv6Addr::LOCALHOST));
        let band1_v4: Vec<IpAddr> = (0..5).map(|k| v4(1 + 4 * k).into()).collect();
        let band1_v6: Vec<IpAddr> = (0..5).map(|k| v6(1 + 4 * k).into()).collect();
        for (i, (listen, dst, sources)) in
            [(lo4, lo4, &band1_v4), (any6, lo6, &band1_v6), (any6, lo4, &band1_v4)].into_iter().enumerate()
        {
            let port = 8400 + i as u16;
            let (listen, addr) = (SocketAddr::new(listen, port), SocketAddr::new(dst, port));
            let st = Steering::load(&ns.bpffs, &format!("mig{i}")).unwrap();
            st.set_session_timeout(HOUR).unwrap();
            let mut a = Gen::new(&st, listen, 4);
            let b = Gen::new(&st, listen, 8);
            st.put(0, &a.table, 4).unwrap();
            st.set_live(0, 4).unwrap();
            let clients: Vec<_> = sources.iter().map(|&src| connect(src, addr).unwrap()).collect();
            wait_queued(a.socks[1].as_ref().unwrap(), sources.len() as u32);
            st.put(1, &b.table, 8).unwrap();
            st.set_live(1, 8).unwrap();
            for src in sources.iter() {
                assert_eq!(st.session(*src).unwrap().unwrap().slot, 0, "{src} drains on A");
            }
            a.kill(1); // A's band-1 worker exits with 5 connections queued
            for (c, &src) in clients.iter().zip(sources.iter()) {
                let band = band_of_ip(src, 8) as usize;
                let (server, peer) = accept_within(b.socks[band].as_ref().unwrap(), Duration::from_secs(2))
                    .unwrap_or_else(|| panic!("{listen}: {src}'s connection is not on B's band {band}"));
                talk(clients.iter().find(|c| local(c) == peer).unwrap_or(c), &server);
                assert_eq!(st.session(src).unwrap().unwrap().slot, 1, "{listen}: {src}'s record moved");
            }
        }
    });
}

/// 1,024 bands: clients by the low ten bits, their sessions kept when a 2-band generation goes
/// live, and a probe to band 1,000.
#[test]
#[ignore = "needs root: cargo xtask test runs it as root with --run-ignored"]
fn a_1024_band_generation_with_sessions_and_probes() {
    raise_nofile();
    run("a_1024_band_generation_with_sessions_and_probes", |ns| {
        let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 8500);
        let st = Steering::load(&ns.bpffs, "wide").unwrap();
        st.set_session_timeout(HOUR).unwrap();
        let a = Gen::new(&st, addr, 1024);
        st.put(0, &a.table, 1024).unwrap();
        st.set_live(0, 1024).unwrap();
        let b = Gen::new(&st, addr, 2);
        st.put(1, &b.table, 2).unwrap();
        let mut model =
            Model { live: Some((0, 1024)), timeout_ns: HOUR.as_nanos() as u64, ..Model::default() };
        model.put(0, a.filled(), 1024);
        model.put(1, b.filled(), 2);
        let t = targets(&[(0, &a), (1, &b)]);
        let sources: Vec<IpAddr> =
            [1u32, 0x105, 0x2ff, 0x3aa, 0x400 + 9].iter().map(|&k| v4(k).into()).collect();
        for (choice, src) in agree(&mut model, &t, addr, &sources).into_iter().zip(&sources) {
            assert_eq!(choice, Some(Choice::New { slot: 0, band: band_of_ip(*src, 1024) }));
        }
        st.set_live(1, 2).unwrap();
        model.live = Some((1, 2));
        for choice in agree(&mut model, &t, addr, &sources) {
            assert!(matches!(choice, Some(Choice::Session { slot: 0, .. })));
        }
        let p = IpAddr::V4(probe_source(0, 1000).unwrap());
        assert_eq!(land(&t, p, addr), Some((0, 1000)));
    });
}
