//! The second version's slots against the running kernel: a random walk held to
//! `model::Model`, bad arguments, and the sessions map's size. Each test runs in fresh network
//! and mount namespaces (see `common`) and needs root: ignored unless asked for (`cargo xtask
//! test` asks, as root, with `--run-ignored all`).

mod common;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use common::*;
use ipcluster_core::routing::band_of_ip;
use ipcluster_steer::{
    model::{Choice, Model},
    *,
};

/// A random walk of puts, clears, cutovers, overrides, dying workers and timeouts over the
/// eight slots, each step followed by connections from 24 clients: the kernel chooses what the
/// model chooses every time.
#[test]
#[ignore = "needs root: cargo xtask test runs it as root with --run-ignored"]
fn the_kernel_follows_the_model_through_a_random_walk() {
    raise_nofile();
    run("the_kernel_follows_the_model_through_a_random_walk", |ns| {
        let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 8600);
        let st = Steering::load(&ns.bpffs, "walk").unwrap();
        let mut model = Model::default();
        let mut gens: Vec<(u32, Gen)> = Vec::new();
        let sources: Vec<IpAddr> = (0..24u32).map(|k| v4(1 + k * 37).into()).collect();
        // A small deterministic generator (splitmix64): the walk is the same on every run.
        let mut x: u64 = 0;
        let mut next = |n: u32| {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) % u64::from(n)) as u32
        };
        // It starts with a live generation and sessions on.
        let first = Gen::new(&st, addr, 4);
        st.put(0, &first.table, 4).unwrap();
        st.set_live(0, 4).unwrap();
        st.set_session_timeout(HOUR).unwrap();
        model.put(0, first.filled(), 4);
        model.live = Some((0, 4));
        model.timeout_ns = HOUR.as_nanos() as u64;
        gens.push((0, first));
        // Refused, new on the live slot, new on an override's, sessions.
        let mut seen = [0u32; 4];
        for step in 0..80 {
            match next(10) {
                0..=2 => {
                    let slot = next(SLOTS);
                    let bands = 1 << next(4);
                    let filled: Vec<u32> = (0..bands).filter(|_| next(8) != 0).collect();
                    let g = Gen::with_bands(&st, addr, filled);
                    st.put(slot, &g.table, bands).unwrap();
                    model.put(slot, g.filled(), bands);
                    gens.retain(|(s, _)| *s != slot);
                    gens.push((slot, g));
                }
                3 => {
                    let slot = next(SLOTS);
                    match st.clear_slot(slot) {
                        Err(SteerError::SlotLive(s)) => assert_eq!(Some(s), model.live.map(|l| l.0)),
                        r => {
                            assert_eq!(r.unwrap(), model.slots[slot as usize].filled.is_some());
                            model.clear_slot(slot);
                            gens.retain(|(s, _)| *s != slot);
                        }
                    }
                }
                4 | 5 => {
                    let pick = next(gens.len().max(1) as u32) as usize;
                    if let Some(&(slot, _)) = gens.get(pick) {
                        let bands = model.slots[slot as usize].bands;
                        st.set_live(slot, bands).unwrap();
                        model.live = Some((slot, bands));
                    }
                }
                6 | 7 => {
                    let (band, slot) = (next(8), next(SLOTS + 1));
                    let slot = (slot < SLOTS).then_some(slot);
                    st.set_override(band, slot).unwrap();
                    match slot {
                        Some(s) => model.overrides.insert(band, s),
                        None => model.overrides.remove(&band),
                    };
                }
                8 => {
                    let pick = next(gens.len().max(1) as u32) as usize;
                    if let Some((slot, g)) = gens.get_mut(pick) {
                        let alive: Vec<u32> =
                            (0..g.socks.len() as u32).filter(|&b| g.socks[b as usize].is_some()).collect();
                        if let Some(&b) = alive.get(next(alive.len().max(1) as u32) as usize) {
                            g.kill(b);
                            model.slots[*slot as usize].filled.as_mut().unwrap().remove(&b);
                        }
                    }
                }
                _ => {
                    let timeout = [Duration::ZERO, HOUR, HOUR][next(3) as usize];
                    st.set_session_timeout(timeout).unwrap();
                    model.timeout_ns = timeout.as_nanos() as u64;
                }
            }
            let refs: Vec<(u32, &Gen)> = gens.iter().map(|(s, g)| (*s, g)).collect();
            let t = targets(&refs);
            let sample: Vec<IpAddr> = sources.iter().copied().filter(|_| next(3) != 0).collect();
            for &src in &sample {
                let want = model.connect(src, now_ns());
                assert_eq!(
                    land(&t, src, addr),
                    want.map(Choice::target),
                    "step {step}, client {src}: {want:?}"
                );
                seen[match want {
                    None => 0,
                    Some(Choice::New { slot, .. }) if Some(slot) == model.live.map(|l| l.0) => 1,
                    Some(Choice::New { .. }) => 2,
                    Some(Choice::Session { .. }) => 3,
                    Some(Choice::Probe { .. }) => unreachable!("no probe sources here"),
                }] += 1;
            }
            assert_eq!(st.live().unwrap(), model.live);
            assert_eq!(st.session_counts().unwrap(), model.session_counts(now_ns()), "step {step}");
        }
        eprintln!("refused, new on the live slot, new by an override, sessions: {seen:?}");
        assert!(seen.iter().all(|&n| n > 0), "the walk took every path: {seen:?}");
    });
}

/// Bad arguments get a clear error and change nothing.
#[test]
#[ignore = "needs root: cargo xtask test runs it as root with --run-ignored"]
fn bad_slots_and_band_counts_are_refused_and_change_nothing() {
    run("bad_slots_and_band_counts_are_refused_and_change_nothing", |ns| {
        let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 8700);
        let st = Steering::load(&ns.bpffs, "bad").unwrap();
        let a = Gen::new(&st, addr, 4);
        assert!(matches!(st.put(8, &a.table, 4), Err(SteerError::SlotOutOfRange(8))));
        assert!(matches!(st.put(0, &a.table, 3), Err(SteerError::InvalidBands(3))));
        assert!(matches!(st.put(0, &a.table, 2048), Err(SteerError::InvalidBands(2048))));
        assert!(matches!(st.set_live(0, 4), Err(SteerError::EmptySlot(0))));
        assert_eq!(st.live().unwrap(), None);
        st.put(0, &a.table, 4).unwrap();
        let e = st.set_live(0, 8).unwrap_err();
        assert!(matches!(e, SteerError::BandsMismatch { slot: 0, has: 4, asked: 8 }), "{e}");
        assert!(e.to_string().contains("put it again with 8"), "{e}");
        assert_eq!(st.live().unwrap(), None);
        st.set_live(0, 4).unwrap();
        assert!(matches!(st.clear_slot(0), Err(SteerError::SlotLive(0))));
        assert_eq!(st.slots().unwrap()[0].table, Some(a.table.id()));
        assert!(matches!(st.set_override(1024, Some(0)), Err(SteerError::BandOutOfRange(1024))));
        assert!(matches!(st.set_override(0, Some(8)), Err(SteerError::SlotOutOfRange(8))));
        assert_eq!(st.overrides().unwrap(), vec![]);
        assert!(matches!(st.slot_table(9), Err(SteerError::SlotOutOfRange(9))));
        let e = st.set_session_timeout(Duration::MAX).unwrap_err();
        assert!(matches!(e, SteerError::InvalidTimeout(_)), "{e}");
        assert_eq!(st.session_timeout().unwrap(), Duration::ZERO);
        let e = Steering::open(&ns.bpffs, "bad2", &Options { sessions: 0 }).unwrap_err();
        assert!(matches!(e, SteerError::InvalidSessions(0)), "{e}");
        assert!(!ns.bpffs.join("bad2").exists(), "nothing created");
        // The legacy calls over the new slots.
        let b = Gen::new(&st, addr, 8);
        st.switch_to(&b.table).unwrap();
        assert_eq!(st.live().unwrap(), Some((1, 1024)), "staged beside the live slot, first-version bands");
        assert_eq!(st.standby().unwrap().unwrap().id(), a.table.id());
        assert_eq!(st.find(&b.table).unwrap(), Some(1));
        assert!(st.clear().unwrap());
        assert_eq!(st.live().unwrap(), None);
        assert!(st.slots().unwrap().iter().all(|s| s.table.is_none()));
    });
}

/// A sessions map of another size: created with it; re-opened with another, resized with its
/// most recent records; and what reading 65,536 records costs (printed, not asserted: speed targets belong to `cargo xtask bench`). The map
/// holds twice as many, so that the LRU evicts none while they are written (an LRU map may
/// evict a little before it is full: free entries wait in per-CPU lists).
#[test]
#[ignore = "needs root: cargo xtask test runs it as root with --run-ignored"]
fn session_counts_of_a_full_map() {
    run("session_counts_of_a_full_map", |ns| {
        let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 8800);
        let default = Steering::load(&ns.bpffs, "default").unwrap();
        assert_eq!(default.sessions_capacity(), 65_536);
        let st = Steering::open(&ns.bpffs, "full", &Options { sessions: 131_072 }).unwrap();
        let a = Gen::new(&st, addr, 4);
        st.put(3, &a.table, 4).unwrap();
        // Idle is measured on CLOCK_MONOTONIC, which starts at boot: a record idle for longer
        // than the machine has been up cannot be written (a CI machine may be minutes old, and
        // then a record "two hours" idle was seen at boot, within an hour's timeout).
        let timeout = Duration::from_secs(60);
        st.set_session_timeout(timeout).unwrap();
        let epoch = st.slots().unwrap()[3].epoch;
        let now = monotonic_now();
        assert!(now > 2 * timeout, "up for {now:?}: too short to hold a record idle for {:?}", 2 * timeout);
        let n = 65_536u32;
        let t = Instant::now();
        for i in 0..n {
            let client = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, (i >> 16) as u16, i as u16));
            // Every fourth record is of an older epoch, every eighth idle for twice the timeout.
            let (e, seen) = match i % 8 {
                0 => (epoch, now - 2 * timeout),
                1 | 5 => (epoch.wrapping_sub(1), now),
                _ => (epoch, now),
            };
            st.insert_session(client, Session { slot: 3, epoch: e, last_seen: seen }).unwrap();
        }
        let fill = t.elapsed();
        let t = Instant::now();
        let counts = st.session_counts().unwrap();
        let batch = t.elapsed();
        let t = Instant::now();
        let by_key = st.session_counts_by_key().unwrap();
        let walk = t.elapsed();
        let valid = (0..n).filter(|i| ![0, 1, 5].contains(&(i % 8))).count() as u32;
        assert_eq!(counts, [0, 0, 0, valid, 0, 0, 0, 0]);
        assert_eq!(by_key, counts);
        let memlock = std::fs::read_dir(format!("/proc/{}/fdinfo", std::process::id()))
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok())
            .filter(|s| s.contains("map_type:\t9\n") && s.contains("max_entries:\t65536\n"))
            .find_map(|s| s.lines().find_map(|l| l.strip_prefix("memlock:\t").map(|v| v.trim().to_owned())));
        eprintln!(
            "session_counts of {n} records: {batch:?} with BPF_MAP_LOOKUP_BATCH, {walk:?} key by key; \
             filling them from user space: {fill:?}; a 65,536-record map's memlock: {} bytes",
            memlock.as_deref().unwrap_or("?")
        );
        // Re-opened with another size: the most recent records move to a map of that size, and
        // the program that names it is replaced.
        drop(st);
        let st = Steering::open(&ns.bpffs, "full", &Options { sessions: 1024 }).unwrap();
        assert_eq!(st.sessions_capacity(), 1024);
        assert!(st.program_replaced());
        let kept = st.sessions().unwrap();
        // (An LRU map may evict a little before it is full: free entries wait in per-CPU lists.)
        assert!(kept.len() <= 1024 && kept.len() >= 1024 - 256, "{} records kept", kept.len());
        assert!(kept.iter().all(|(_, s)| s.last_seen == now), "the most recently seen are kept");
        let st = Steering::open(&ns.bpffs, "full", &Options { sessions: 131_072 }).unwrap();
        assert_eq!(st.sessions_capacity(), 131_072);
        assert_eq!(st.sessions().unwrap().len(), kept.len(), "all of them move to a larger map");
        let again = Steering::open(&ns.bpffs, "full", &Options { sessions: 131_072 }).unwrap();
        assert!(!again.program_replaced(), "the same size: nothing replaced");
        assert!(!ns.bpffs.join("full").join("sessions_new").exists());
    });
}

/// A group serving sessions is re-opened with a larger sessions map and attached again: the
/// records come along and every client keeps its session.
#[test]
#[ignore = "needs root: cargo xtask test runs it as root with --run-ignored"]
fn resizing_the_sessions_map_keeps_the_sessions() {
    run("resizing_the_sessions_map_keeps_the_sessions", |ns| {
        let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 8810);
        let st = Steering::open(&ns.bpffs, "resize", &Options { sessions: 64 }).unwrap();
        st.set_session_timeout(HOUR).unwrap();
        let a = Gen::new(&st, addr, 4);
        let b = Gen::new(&st, addr, 8);
        st.put(0, &a.table, 4).unwrap();
        st.set_live(0, 4).unwrap();
        let t = targets(&[(0, &a), (1, &b)]);
        let sources = lo_sources(1..33);
        for &src in &sources {
            assert_eq!(land(&t, src, addr), Some((0, band_of_ip(src, 4))));
        }
        st.put(1, &b.table, 8).unwrap();
        st.set_live(1, 8).unwrap();
        drop(st);
        let st = Steering::open(&ns.bpffs, "resize", &Options { sessions: 4096 }).unwrap();
        assert!(st.program_replaced());
        let socket = a.socks[0].as_ref().unwrap();
        st.attach(socket).unwrap();
        assert_eq!(st.session_counts().unwrap(), [32, 0, 0, 0, 0, 0, 0, 0]);
        for &src in &sources {
            assert_eq!(land(&t, src, addr), Some((0, band_of_ip(src, 4))), "{src} kept its session");
        }
        assert_eq!(land(&t, v4(40).into(), addr), Some((1, 0)), "a new client goes to the live slot");
        assert_eq!(st.session(v4(40).into()).unwrap().unwrap().slot, 1, "recorded in the new map");
    });
}
