//! Data path: each cell is a mode and its control, measured in interleaved rounds (control,
//! mode, then mode, control, …) in the same run, keep-alive and a new connection per request; then
//! each front's latency at a constant rate, 50 % and 80 % of its measured capacity.
//!
//! **The controls are the modes' own workers.** NAT mode's physical limit is the same
//! sandbox, the same workers, reached through conntrack and one REDIRECT rule per worker
//! (client → band as the rules map it). Socket mode's control is a second, identical
//! ipclusterd sandbox whose reuseport group has had its steering program detached once its
//! daemon was stopped (which would attach it again): the same workers under the same
//! confinement in a plain `SO_REUSEPORT` group, picked by the kernel's hash. HAProxy and PM2 are the alternatives, run as services of the sandbox.
//!
//! **Adding a cell** is one entry of [`CELLS`]: a mode and a control, each a [`Front`]; an
//! ipclusterd front takes extra app settings, so on/off comparisons of a setting (e.g. the
//! cost of `session_affinity` on new connections) are two ipclusterd fronts that differ in
//! `extra`.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::Instant,
};

use anyhow::{Context, Result, bail};
use ipcluster_load::{Cpu, Stats, closed_loop, loopback_sources, open_loop};
use ipcluster_sandbox::Sandbox;

use super::{
    Plan, background, sandbox,
    stats::{self, Spread},
    system, wait_port,
};

/// The worker program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    /// `ipcluster-demo` (Rust, a thread per connection).
    Demo,
    /// A minimal Node.js `http` server ([`super::NODE_WORKER`]).
    Node,
}

impl Program {
    fn command(self) -> &'static str {
        match self {
            Program::Demo => "[\"/usr/local/bin/ipcluster-demo\"]",
            Program::Node => "[\"/usr/bin/node\", \"/var/lib/ipcluster-bench/worker.js\"]",
        }
    }
    fn argv(self) -> &'static [&'static str] {
        match self {
            Program::Demo => &["/usr/local/bin/ipcluster-demo"],
            Program::Node => &["/usr/bin/node", super::WORKER_JS],
        }
    }
}

/// One side of a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Front {
    /// ipclusterd with `routing` (`nat` or `socket`) and `extra` lines of app settings.
    Ipclusterd { routing: &'static str, extra: &'static str },
    /// The mode's own sandbox and workers (an ipclusterd NAT front), reached through conntrack
    /// and one REDIRECT rule per worker: NAT's physical limit.
    NatLimit,
    /// An ipclusterd socket-mode sandbox with its steering program detached: a plain
    /// `SO_REUSEPORT` group of the same workers.
    Reuseport,
    /// HAProxy (2 threads) in front of as many workers, sticky by source address.
    Haproxy,
    /// PM2 cluster mode with as many Node.js processes.
    Pm2,
}

pub const NAT: Front = Front::Ipclusterd { routing: "nat", extra: "" };
pub const SOCKET: Front = Front::Ipclusterd { routing: "socket", extra: "" };
/// The same fronts with session affinity on (every client recorded, refreshed on each new
/// connection).
pub const NAT_STICKY: Front = Front::Ipclusterd { routing: "nat", extra: "session_affinity = \"90s\"\n" };
pub const SOCKET_STICKY: Front =
    Front::Ipclusterd { routing: "socket", extra: "session_affinity = \"90s\"\n" };

impl Front {
    pub fn label(self, program: Program, bands: u32) -> String {
        let p = if program == Program::Node { "node " } else { "" };
        match self {
            Front::Ipclusterd { routing, extra } => {
                let mode = if routing == "nat" { "NAT" } else { "socket" };
                let extra = if extra.is_empty() { String::new() } else { format!(" ({})", extra.trim()) };
                format!("{p}{mode} {bands} bands{extra}")
            }
            Front::NatLimit => format!("{p}{bands} workers via conntrack + REDIRECT"),
            Front::Reuseport => format!("{p}{bands} workers, plain reuseport group"),
            Front::Haproxy => format!("{p}HAProxy, {bands} workers"),
            Front::Pm2 => format!("{p}PM2 cluster, {bands} processes"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    KeepAlive,
    NewConn,
}

/// A target on a cell's ratio (mode / control), judged on the median.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub metric: Metric,
    pub min: f64,
}

/// A comparison measured in interleaved rounds.
#[derive(Debug, Clone, Copy)]
pub struct Cell {
    pub program: Program,
    pub bands: u32,
    pub mode: Front,
    pub control: Front,
    /// Clients on one CPU, servers on the other; `false` for the one row that shows what
    /// pinning changes.
    pub pinned: bool,
    /// Part of `--quick` (the headline cells).
    pub quick: bool,
    pub targets: &'static [Target],
}

const SOCKET_TARGETS: &[Target] =
    &[Target { metric: Metric::KeepAlive, min: 0.98 }, Target { metric: Metric::NewConn, min: 0.98 }];
const NAT_TARGETS: &[Target] =
    &[Target { metric: Metric::KeepAlive, min: 0.97 }, Target { metric: Metric::NewConn, min: 0.97 }];
const VS_ALTERNATIVE: &[Target] = &[Target { metric: Metric::NewConn, min: 1.5 }];
/// `session_affinity`'s cost on new connections (issue 23): at most 8 % in NAT mode (a set
/// lookup and a set update per new connection), at most 3 % in socket mode (a map lookup and
/// update in the program).
const AFFINITY_NAT: &[Target] = &[Target { metric: Metric::NewConn, min: 0.92 }];
const AFFINITY_SOCKET: &[Target] = &[Target { metric: Metric::NewConn, min: 0.97 }];

const fn cell(program: Program, bands: u32, mode: Front, control: Front, targets: &'static [Target]) -> Cell {
    Cell { program, bands, mode, control, pinned: true, quick: false, targets }
}

/// Every cell of the full run, in order.
pub const CELLS: &[Cell] = &[
    cell(Program::Demo, 8, NAT, Front::NatLimit, NAT_TARGETS),
    Cell { quick: true, ..cell(Program::Demo, 64, NAT, Front::NatLimit, NAT_TARGETS) },
    Cell { quick: true, ..cell(Program::Demo, 8, SOCKET, Front::Reuseport, SOCKET_TARGETS) },
    Cell { quick: true, ..cell(Program::Demo, 64, SOCKET, Front::Reuseport, SOCKET_TARGETS) },
    cell(Program::Node, 8, SOCKET, Front::Reuseport, SOCKET_TARGETS),
    cell(Program::Node, 64, SOCKET, Front::Reuseport, SOCKET_TARGETS),
    cell(Program::Demo, 8, NAT, Front::Haproxy, VS_ALTERNATIVE),
    cell(Program::Node, 8, NAT, Front::Pm2, VS_ALTERNATIVE),
    // The same as the third, unpinned: what pinning changes.
    Cell { pinned: false, ..cell(Program::Demo, 8, SOCKET, Front::Reuseport, &[]) },
    // session_affinity on against off, the same app otherwise.
    cell(Program::Demo, 8, NAT_STICKY, NAT, AFFINITY_NAT),
    cell(Program::Demo, 8, SOCKET_STICKY, SOCKET, AFFINITY_SOCKET),
];

/// A front's constant-rate latency at a share of its capacity.
#[derive(Debug, Clone, Default)]
pub struct OpenLatency {
    /// Share of the measured capacity (0.5, 0.8).
    pub load: f64,
    pub rate: u32,
    pub requests: usize,
    pub failed: usize,
    /// p50, p99, p99.9 in µs, counted from when each request was due.
    pub tail_us: [u64; 3],
}

/// One front's rounds.
#[derive(Debug, Clone, Default)]
pub struct Side {
    pub label: String,
    /// Requests/s of each round (successful requests only).
    pub keepalive: Vec<f64>,
    pub newconn: Vec<f64>,
    /// Failed requests over all rounds.
    pub failed_keepalive: u64,
    pub failed_newconn: u64,
    /// With keep-alive: how many workers answered in each round (the clients' one connection
    /// each landed on that many of the cell's workers).
    pub keepalive_workers: Vec<usize>,
    /// Closed-loop p50 / p99 (µs) of new connections, all rounds merged.
    pub closed_tail_us: [u64; 2],
    pub open: Vec<OpenLatency>,
}

/// A cell's outcome.
#[derive(Debug, Clone)]
pub struct Measured {
    pub cell: Cell,
    pub control: Side,
    pub mode: Side,
    pub keepalive: Spread,
    pub newconn: Spread,
    /// The steering program's own run time per call (new connection), ns.
    pub program_ns: Option<f64>,
    /// conntrack's drops in the cell's sandboxes during the rounds: packets dropped, entries
    /// evicted early and inserts that failed (a full table: new
    /// connections wait for a SYN retransmit, so a round's rate would measure the table).
    pub conntrack_drops: u64,
    /// 1-minute load average when the cell started and ended.
    pub load: (f64, f64),
    pub seconds: f64,
}

impl Measured {
    pub fn ratio(&self, m: Metric) -> &Spread {
        match m {
            Metric::KeepAlive => &self.keepalive,
            Metric::NewConn => &self.newconn,
        }
    }
}

/// Where a front is reached.
struct Endpoint {
    sb: usize,
    targets: Vec<(Ipv4Addr, SocketAddrV4)>,
    /// The daemon's PID inside, for the program's statistics (socket mode).
    steering: Option<u32>,
}

fn app(program: Program, bands: u32, routing: &str, extra: &str) -> String {
    format!(
        "command = {}\nworkers = {bands}\nlisten = [\"0.0.0.0:80\"]\nrouting = \"{routing}\"\nready_timeout = \"2min\"\n{extra}",
        program.command()
    )
}

/// 64 client addresses: every band of up to 64 has clients.
fn sources() -> Vec<Ipv4Addr> {
    loopback_sources(64)
}

fn public(sources: &[Ipv4Addr]) -> Vec<(Ipv4Addr, SocketAddrV4)> {
    sources.iter().map(|s| (*s, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 80))).collect()
}

/// Live workers of the bench app: (band, pid, first worker port if any), from `ipclusterctl`.
fn live_workers(sb: &Sandbox) -> Result<Vec<(u32, u32, Option<u16>)>> {
    let out = sb.check(["ipclusterctl", "workers", "bench"])?;
    let live: Vec<(u32, u32, Option<u16>)> = out
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.get(2) != Some(&"live") {
                return None;
            }
            let port = f.get(5).and_then(|p| p.split_once("->")).and_then(|(_, q)| q.parse().ok());
            Some((f.get(3)?.parse().ok()?, f.get(4)?.parse().ok()?, port))
        })
        .collect();
    anyhow::ensure!(!live.is_empty(), "no live worker: {out}");
    Ok(live)
}

fn ipclusterd_front(
    cell: &Cell,
    routing: &str,
    extra: &str,
    sbs: &mut Vec<Sandbox>,
) -> Result<(usize, Vec<(Ipv4Addr, SocketAddrV4)>)> {
    let sb = sandbox(Some(&app(cell.program, cell.bands, routing, extra)))?;
    wait_port(&sb, 80)?;
    sbs.push(sb);
    Ok((sbs.len() - 1, public(&sources())))
}

/// Boots (or reuses) what `front` needs.
fn setup(
    front: Front,
    cell: &Cell,
    sbs: &mut Vec<Sandbox>,
    mode: Option<&Endpoint>,
    pm2: &Path,
) -> Result<Endpoint> {
    let srcs = sources();
    Ok(match front {
        Front::Ipclusterd { routing, extra } => {
            let (sb, targets) = ipclusterd_front(cell, routing, extra, sbs)?;
            let steering = (routing == "socket").then(|| sbs[sb].main_pid("ipclusterd")).transpose()?;
            Endpoint { sb, targets, steering }
        }
        Front::NatLimit => {
            let mode = mode.context("NAT's limit is measured on the mode's own sandbox")?;
            let sb = &sbs[mode.sb];
            let mut by_band = std::collections::BTreeMap::new();
            for (band, _, port) in live_workers(sb)? {
                by_band.insert(band, port.context("a NAT worker without a port")?);
            }
            anyhow::ensure!(
                by_band.len() == cell.bands as usize,
                "{} live bands of {}",
                by_band.len(),
                cell.bands
            );
            // One transaction (one program run) for every rule.
            let mut rules = String::from("*nat\n");
            for (band, port) in &by_band {
                rules.push_str(&format!(
                    "-A OUTPUT -p tcp -d 127.0.0.1 --dport {} -j REDIRECT --to-ports {port}\n",
                    30000 + band
                ));
            }
            rules.push_str("COMMIT\n");
            sb.write_file("/var/lib/ipcluster-bench/limit.rules", rules, 0o644)?;
            sb.check(["iptables-restore", "--noflush", "/var/lib/ipcluster-bench/limit.rules"])?;
            // A client reaches its band's worker, as NAT mode's rules map it (address & (N-1)).
            let targets = srcs
                .iter()
                .map(|s| {
                    let band = u32::from(*s) & (cell.bands - 1);
                    (*s, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 30000 + band as u16))
                })
                .collect();
            Endpoint { sb: mode.sb, targets, steering: None }
        }
        Front::Reuseport => {
            let (sb, targets) = ipclusterd_front(cell, "socket", "", sbs)?;
            let xtask = sbs[sb].inside(&sbs[sb].build()?.xtask)?;
            let (_, pid, _) = live_workers(&sbs[sb])?[0];
            // The daemon guards its groups' steering: a program detached through a worker's
            // socket is attached again within 2 s (`ipcluster_steering_restored_total`), which
            // made this control socket mode itself. Stopped (and masked, so no bus call starts it
            // again), it leaves its workers running in their own scope, their group as it is.
            sbs[sb].check(["systemctl", "stop", "ipclusterd"])?;
            sbs[sb].check(["systemctl", "mask", "--runtime", "ipclusterd"])?;
            sbs[sb].check([xtask.to_string_lossy().as_ref(), "bench-detach", &pid.to_string()])?;
            Endpoint { sb, targets, steering: None }
        }
        Front::Haproxy => {
            let sb = sandbox(None)?;
            let mut servers = String::new();
            for i in 0..cell.bands as u16 {
                let port = (20000 + i).to_string();
                background(&sb, cell.program.argv(), &[("PORT", &port)])?;
                wait_port(&sb, 20000 + i)?;
                servers.push_str(&format!("  server w{i} 127.0.0.1:{port}\n"));
            }
            let cfg = format!(
                "global\n  maxconn 8000\n  nbthread 2\ndefaults\n  mode http\n  option http-keep-alive\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\nfrontend f\n  bind 0.0.0.0:80\n  default_backend b\nbackend b\n  balance source\n{servers}"
            );
            sb.write_file("/var/lib/ipcluster-bench/haproxy.cfg", cfg, 0o644)?;
            background(&sb, &["/usr/sbin/haproxy", "-f", "/var/lib/ipcluster-bench/haproxy.cfg"], &[])?;
            wait_port(&sb, 80)?;
            sbs.push(sb);
            Endpoint { sb: sbs.len() - 1, targets: public(&srcs), steering: None }
        }
        Front::Pm2 => {
            let sb = sandbox(None)?;
            start_pm2(&sb, pm2, cell.bands)?;
            sbs.push(sb);
            Endpoint { sb: sbs.len() - 1, targets: public(&srcs), steering: None }
        }
    })
}

/// conntrack's drops in `sbs`' network namespaces (packets in `drop`, entries in `early_drop`,
/// `insert_failed` of /proc/net/stat/nf_conntrack, every CPU's row); 0 where it cannot be read.
fn conntrack_drops(sbs: &[Sandbox]) -> u64 {
    sbs.iter()
        .filter_map(|sb| sb.run(["cat", "/proc/net/stat/nf_conntrack"]).ok())
        .map(|out| system::conntrack_drops(&String::from_utf8_lossy(&out.stdout)))
        .sum()
}

/// One closed-loop measurement.
fn closed(plan: &Plan, sb: &Sandbox, ep: &Endpoint, keepalive: bool, cpu: Cpu) -> Stats {
    closed_loop(sb, plan.clients, plan.run, keepalive, &ep.targets, cpu)
}

fn record(side: &mut Side, ka: &Stats, nc: &Stats) {
    side.keepalive.push(ka.rate());
    side.keepalive_workers.push(ka.served_by.len());
    side.newconn.push(nc.rate());
    side.failed_keepalive += ka.failed;
    side.failed_newconn += nc.failed;
}

/// Latency at a constant rate: `load` × `capacity` new connections per second.
fn open(plan: &Plan, sb: &Sandbox, ep: &Endpoint, capacity: f64, load: f64, cpu: Cpu) -> OpenLatency {
    let rate = (capacity * load).max(1.0) as u32;
    let records = open_loop(sb, Instant::now(), rate, plan.latency_run, &ep.targets, 64, cpu);
    let mut ok: Vec<u64> = records
        .iter()
        .filter(|r| r.outcome.is_ok())
        .map(|r| r.latency.as_micros().min(u64::MAX as u128) as u64)
        .collect();
    ok.sort_unstable();
    OpenLatency {
        load,
        rate,
        requests: records.len(),
        failed: records.len() - ok.len(),
        tail_us: stats::tail(&ok),
    }
}

/// ns per run of the steering program over one closed-loop run of new connections, with the
/// kernel's BPF statistics on for that run only.
fn program_cost(plan: &Plan, sb: &Sandbox, ep: &Endpoint, cpu: Cpu) -> Result<f64> {
    let on = system::bpf_stats()?;
    let (ns0, cnt0) = system::program_runs()?;
    let _ = closed(plan, sb, ep, false, cpu);
    let (ns1, cnt1) = system::program_runs()?;
    drop(on);
    anyhow::ensure!(cnt1 > cnt0, "the steering program did not run during a run of new connections");
    Ok((ns1 - ns0) as f64 / (cnt1 - cnt0) as f64)
}

/// Measures one cell: both fronts set up, a warm-up each, then `plan.rounds` interleaved
/// rounds, then each front's constant-rate latency.
pub fn measure(plan: &Plan, cell: &Cell, pm2: &Path) -> Result<Measured> {
    let started = Instant::now();
    let load0 = system::load1();
    let mut sbs = Vec::new();
    let mode = setup(cell.mode, cell, &mut sbs, None, pm2)?;
    let control = setup(cell.control, cell, &mut sbs, Some(&mode), pm2)?;
    let cpus = if cell.pinned { system::cpus() } else { None };
    let (client_cpu, server_cpu) = match cpus {
        Some((c, s)) => (Some(c), Some(s)),
        None => (None, None),
    };
    let all: Vec<usize> = (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
    for sb in &sbs {
        match server_cpu {
            Some(s) => system::pin_sandbox(sb, &[s])?,
            None => system::pin_sandbox(sb, &all)?,
        };
    }
    let (mut c_side, mut m_side) = (Side::default(), Side::default());
    c_side.label = cell.control.label(cell.program, cell.bands);
    m_side.label = cell.mode.label(cell.program, cell.bands);
    let mut merged_nc: [Vec<u32>; 2] = [Vec::new(), Vec::new()];
    for ep in [&control, &mode] {
        let mut warm = *plan;
        warm.run = plan.warmup;
        let _ = closed(&warm, &sbs[ep.sb], ep, true, client_cpu);
        let _ = closed(&warm, &sbs[ep.sb], ep, false, client_cpu);
    }
    let drops0 = conntrack_drops(&sbs);
    for round in 0..plan.rounds {
        // Who goes first alternates: whatever a run leaves behind (TIME_WAIT sockets, conntrack
        // entries, a warmer cache) falls on each side as often.
        let mut order = [(0, &control, &mut c_side), (1, &mode, &mut m_side)];
        if round % 2 == 1 {
            order.reverse();
        }
        for (i, ep, side) in order {
            let ka = closed(plan, &sbs[ep.sb], ep, true, client_cpu);
            let nc = closed(plan, &sbs[ep.sb], ep, false, client_cpu);
            record(side, &ka, &nc);
            merged_nc[i].extend(&nc.latencies_us);
        }
    }
    let conntrack_drops = conntrack_drops(&sbs).saturating_sub(drops0);
    if conntrack_drops > 0 {
        eprintln!("   !! conntrack: {conntrack_drops} drops during the rounds (its table was full)");
    }
    // The program's own cost, from the kernel's statistics, in a run of its own after the
    // rounds (the statistics add their own clock reads to every run of the program).
    let program_ns = mode.steering.and_then(|_| {
        program_cost(plan, &sbs[mode.sb], &mode, client_cpu)
            .inspect_err(|e| eprintln!("   !! the steering program's run time is not measured: {e:#}"))
            .ok()
    });
    let [c_lat, m_lat] = &mut merged_nc;
    for (side, lat) in [(&mut c_side, c_lat), (&mut m_side, m_lat)] {
        // Corrected as wrk2 does, for the interval each client's requests were due at at the
        // measured rate.
        let interval = (plan.clients as f64 * 1e6 / stats::median(&side.newconn).max(1.0)) as u64;
        let l: Vec<u64> = lat.iter().map(|&x| u64::from(x)).collect();
        let l = stats::co_correct(&l, interval);
        side.closed_tail_us = [stats::percentile(&l, 50.0), stats::percentile(&l, 99.0)];
    }
    for (ep, side) in [(&control, &mut c_side), (&mode, &mut m_side)] {
        let capacity = stats::median(&side.newconn);
        for load in [0.5, 0.8] {
            side.open.push(open(plan, &sbs[ep.sb], ep, capacity, load, client_cpu));
        }
    }
    let m = Measured {
        cell: *cell,
        keepalive: stats::spread(&stats::paired_ratios(&m_side.keepalive, &c_side.keepalive)),
        newconn: stats::spread(&stats::paired_ratios(&m_side.newconn, &c_side.newconn)),
        control: c_side,
        mode: m_side,
        program_ns,
        conntrack_drops,
        load: (load0, system::load1()),
        seconds: started.elapsed().as_secs_f64(),
    };
    eprintln!(
        "   {} vs {}{}: keep-alive {} (median ±{:.1} %, rounds ±{:.1} %; on {:?} / {:?} workers), new conn {} (median ±{:.1} %, rounds ±{:.1} %), failed {}/{} (open loop {}/{}){}; {:.0} s, load {:.1}",
        m.mode.label,
        m.control.label,
        if cell.pinned { "" } else { " (unpinned)" },
        m.keepalive.show(),
        m.keepalive.ci_half_range() * 100.0,
        m.keepalive.half_range() * 100.0,
        m.mode.keepalive_workers,
        m.control.keepalive_workers,
        m.newconn.show(),
        m.newconn.ci_half_range() * 100.0,
        m.newconn.half_range() * 100.0,
        m.mode.failed_keepalive + m.mode.failed_newconn,
        m.control.failed_keepalive + m.control.failed_newconn,
        m.mode.open.iter().map(|o| o.failed).sum::<usize>(),
        m.control.open.iter().map(|o| o.failed).sum::<usize>(),
        m.program_ns.map_or(String::new(), |ns| format!(", program {ns:.0} ns/connection")),
        m.seconds,
        m.load.1
    );
    drop(sbs);
    Ok(m)
}

pub fn run(plan: &Plan, pm2: &Path) -> Result<Vec<Measured>> {
    if system::cpus().is_none() {
        eprintln!("   !! one CPU: nothing is pinned (clients and servers share it)");
    }
    let mut out = Vec::new();
    for cell in CELLS.iter().filter(|c| c.quick || !plan.quick) {
        out.push(measure(plan, cell, pm2).with_context(|| {
            format!(
                "cell {} vs {}",
                cell.mode.label(cell.program, cell.bands),
                cell.control.label(cell.program, cell.bands)
            )
        })?);
    }
    if out.is_empty() {
        bail!("no data-path cell ran");
    }
    Ok(out)
}

/// PM2 cluster mode with `n` instances of the Node worker on port 80.
pub fn start_pm2(sb: &Sandbox, pm2: &Path, n: u32) -> Result<()> {
    let pm2 = sb.inside(pm2)?.to_string_lossy().into_owned();
    // In a scope of the sandbox's systemd (see `background`): PM2's daemon, which `pm2 start`
    // forks, stays in it.
    let out = sb
        .command([
            "systemd-run",
            "--quiet",
            "--scope",
            "--unit=pm2-bench",
            "--",
            "/usr/bin/node",
            &pm2,
            "start",
            super::WORKER_JS,
            "-i",
            &n.to_string(),
            "--name",
            "bench",
        ])
        .env("PM2_HOME", "/tmp/pm2")
        .env("HOME", "/tmp")
        .env("PORT", "80")
        .output()?;
    anyhow::ensure!(out.status.success(), "pm2 start failed: {}", String::from_utf8_lossy(&out.stderr));
    wait_port(sb, 80)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cell_compares_like_with_like() {
        for c in CELLS {
            assert!(c.bands.is_power_of_two());
            match c.control {
                Front::NatLimit => assert_eq!(c.mode, NAT, "NAT's limit is NAT's own sandbox"),
                Front::Reuseport => assert!(matches!(c.mode, Front::Ipclusterd { routing: "socket", .. })),
                Front::Pm2 => assert_eq!(c.program, Program::Node),
                _ => {}
            }
            assert!(!matches!(c.mode, Front::NatLimit | Front::Reuseport), "a control is never a mode");
        }
        assert!(CELLS.iter().any(|c| !c.pinned), "one unpinned row");
        assert!(CELLS.iter().filter(|c| c.quick).count() >= 2);
    }

    #[test]
    fn labels_name_the_front_and_its_workers() {
        assert_eq!(SOCKET.label(Program::Node, 8), "node socket 8 bands");
        assert_eq!(Front::NatLimit.label(Program::Demo, 64), "64 workers via conntrack + REDIRECT");
        assert_eq!(NAT_STICKY.label(Program::Demo, 8), "NAT 8 bands (session_affinity = \"90s\")");
        let sticky: Vec<&Cell> =
            CELLS.iter().filter(|c| c.mode == NAT_STICKY || c.mode == SOCKET_STICKY).collect();
        assert_eq!(sticky.len(), 2, "one on/off cell per mode");
        assert!(sticky.iter().all(|c| c.control == NAT || c.control == SOCKET));
    }
}
