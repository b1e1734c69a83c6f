//! What the program costs per connection on each of its paths, from the kernel's own
//! statistics (`run_time_ns / run_cnt`, on while `enable_run_time_stats`' descriptor is open):
//! printed, not asserted (speed targets belong to `cargo xtask bench`); what is asserted is that
//! the kernel counted one run per connection. Needs root: ignored unless asked for.

mod common;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::OwnedFd,
    time::Duration,
};

use common::*;
use ipcluster_steer::*;

const N: u32 = 2000;

/// Connects from each source in turn and accepts each connection.
fn connections(listeners: &[OwnedFd], addr: SocketAddr, sources: impl Iterator<Item = IpAddr>) -> u64 {
    let all: Vec<&OwnedFd> = listeners.iter().collect();
    let mut n = 0;
    for src in sources {
        let c = connect(src, addr).unwrap_or_else(|e| panic!("connect from {src}: {e}"));
        accepted_by(&all, &c);
        n += 1;
    }
    n
}

fn per_run(before: ProgramStats, after: ProgramStats, n: u64) -> f64 {
    let runs = after.run_cnt - before.run_cnt;
    assert!(runs >= n && runs <= n + n / 100, "{runs} runs for {n} connections");
    (after.run_time_ns - before.run_time_ns) as f64 / runs as f64
}

/// Distinct loopback sources 127.1.0.1, 127.1.0.2, …
fn fresh(from: u32) -> impl Iterator<Item = IpAddr> {
    (from..from + N).map(|k| IpAddr::V4(Ipv4Addr::from(0x7f01_0000 + k)))
}

#[test]
#[ignore = "needs root: cargo xtask test runs it as root with --run-ignored"]
fn the_programs_cost_per_connection() {
    raise_nofile();
    run("the_programs_cost_per_connection", |ns| {
        let _stats = enable_run_time_stats().unwrap();
        let mut lines = Vec::new();

        // The first version, 8 bands.
        let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 9000);
        let legacy = Legacy::pin(&ns.bpffs, "v1").unwrap();
        let table = SockArray::new().unwrap();
        let socks: Vec<OwnedFd> = (0..8)
            .map(|band| {
                let s = bind_reuseport(addr, 4096).unwrap();
                nonblocking(&s);
                table.insert(band, &s).unwrap();
                s
            })
            .collect();
        legacy.attach(&socks[0]).unwrap();
        legacy.switch_to(0, &table).unwrap();
        let before = legacy.program_stats().unwrap();
        let n = connections(&socks, addr, fresh(1));
        lines.push(("first version, 8 bands", per_run(before, legacy.program_stats().unwrap(), n)));

        for (i, bands) in [8u32, 64, 1024].into_iter().enumerate() {
            let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 9001 + i as u16);
            let st = Steering::load(&ns.bpffs, &format!("v2-{bands}")).unwrap();
            let table = SockArray::new().unwrap();
            let socks: Vec<OwnedFd> = (0..bands)
                .map(|band| {
                    let s = st.listen(addr, 4096).unwrap();
                    nonblocking(&s);
                    table.insert(band, &s).unwrap();
                    s
                })
                .collect();
            st.put(0, &table, bands).unwrap();
            st.set_live(0, bands).unwrap();
            let stats = || st.program_stats().unwrap().expect("attached by this handle");
            let mut measure = |what: &'static str, sources: &mut dyn Iterator<Item = IpAddr>| {
                let before = stats();
                let n = connections(&socks, addr, sources);
                lines.push((what, per_run(before, stats(), n)));
            };
            let tag = |s: &'static str| -> &'static str {
                Box::leak(format!("{s}, {bands} bands").into_boxed_str())
            };
            measure(tag("sessions off"), &mut fresh(1));
            st.set_session_timeout(Duration::from_secs(3600)).unwrap();
            measure(tag("sessions on, new clients (a record written)"), &mut fresh(1));
            measure(tag("sessions on, returning clients (a record refreshed)"), &mut fresh(1));
            measure(tag("a probe"), &mut (0..N).map(|k| IpAddr::V4(probe_source(0, k % bands).unwrap())));
            assert_eq!(st.session_counts().unwrap()[0], N, "one record per new client, no probe");
        }
        for (what, ns) in &lines {
            eprintln!("steering program cost: {ns:>6.0} ns per run: {what}");
        }
    });
}
