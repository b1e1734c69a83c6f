//! Data path: each cell is a mode and its control, measured in rounds in the same run, keep-alive
//! and a new connection per request; in a round the two take turns (A B B A …, who goes first
//! alternating between rounds: [`ipcluster_load::interleaved`]) of [`turn_length`]. Then each
//! front's latency at a constant rate, 50 % and 80 % of its measured capacity. The cells
//! themselves are in [`super::cells`].
//!
//! **The controls are the modes' own workers.** NAT mode's physical limit is the same
//! sandbox, the same workers, reached through conntrack and one REDIRECT rule per worker
//! (client → band as the rules map it). Socket mode's control is a second, identical
//! ipclusterd sandbox whose reuseport group has had its steering program detached once its
//! daemon was stopped (which would attach it again): the same workers under the same
//! confinement in a plain `SO_REUSEPORT` group, picked by the kernel's hash (its keep-alive
//! connections spread evenly over the workers, as socket mode's are). HAProxy and PM2 are the
//! alternatives, run as services of the sandbox.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::Instant,
};

use anyhow::{Context, Result, bail};
use ipcluster_load::{Arm, Cpu, Stats, closed_loop, interleaved, loopback_sources, open_loop};
use ipcluster_sandbox::Sandbox;

pub use super::cells::{CELLS, Cell, Front, Metric, Program};
use super::{
    Plan, background,
    report::SPREAD_LIMIT,
    sandbox,
    stats::{self, Spread},
    system, wait_port,
};

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
    /// Rounds run (the planned ones, or more: [`rounds_wanted`]).
    pub rounds: usize,
    /// The steering program's own run time per call (new connection), ns: one value per
    /// window of new connections between rounds.
    pub program_ns: Option<Spread>,
    /// conntrack's drops in the cell's sandboxes during the rounds: packets dropped, entries
    /// evicted early and inserts that failed (a full table: new
    /// connections wait for a SYN retransmit, so a round's rate would measure the table).
    pub conntrack_drops: u64,
    /// The length of a turn, keep-alive and new connections ([`turn_length`]).
    pub turns: [std::time::Duration; 2],
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
    /// Keep-alive connections to spread evenly over this many workers (a plain reuseport
    /// group: the kernel's hash does not).
    balance: Option<usize>,
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
            Endpoint { sb, targets, steering, balance: None }
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
            Endpoint { sb: mode.sb, targets, steering: None, balance: None }
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
            Endpoint { sb, targets, steering: None, balance: Some(cell.bands as usize) }
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
            Endpoint { sb: sbs.len() - 1, targets: public(&srcs), steering: None, balance: None }
        }
        Front::Pm2 => {
            let sb = sandbox(None)?;
            start_pm2(&sb, pm2, cell.bands)?;
            sbs.push(sb);
            Endpoint { sb: sbs.len() - 1, targets: public(&srcs), steering: None, balance: None }
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
    closed_loop(sb, plan.clients, plan.run, keepalive, &ep.targets, cpu, ep.balance)
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

/// ns per run of the steering program over a closed-loop run of new connections (a quarter of
/// a front's share of a round), with the kernel's BPF statistics on for that run only.
fn program_cost(plan: &Plan, sb: &Sandbox, ep: &Endpoint, cpu: Cpu) -> Result<f64> {
    let mut window = *plan;
    window.run = plan.run / 4;
    let on = system::bpf_stats()?;
    let (ns0, cnt0) = system::program_runs()?;
    let _ = closed(&window, sb, ep, false, cpu);
    let (ns1, cnt1) = system::program_runs()?;
    drop(on);
    anyhow::ensure!(cnt1 > cnt0, "the steering program did not run during a run of new connections");
    Ok((ns1 - ns0) as f64 / (cnt1 - cnt0) as f64)
}

/// Requests each client makes in a turn, about: a turn begins with every client's request at
/// once and ends waiting for the last ones, so a turn of a few requests a client measures its
/// edges (Node.js at 64 bands, ~6 000 requests a second over 64 connections, gave 60–64 of its
/// 64 workers a request in 50 ms turns, and ±5 % between rounds).
const TURN_REQUESTS: f64 = 10.0;

/// A turn's length for a front pair whose slower rate is `rate`: long enough for
/// [`TURN_REQUESTS`] requests per client, at least `plan.slice` and at most 4 × that (the CPU's
/// speed phases last from a quarter of a second to seconds: 400 ms turns gave Node.js at 8
/// bands ±14 % between rounds).
fn turn_length(plan: &Plan, rate: f64) -> std::time::Duration {
    let want = plan.clients as f64 * TURN_REQUESTS / rate.max(1.0);
    std::time::Duration::from_secs_f64(want.clamp(plan.slice.as_secs_f64(), 4.0 * plan.slice.as_secs_f64()))
}

/// How many rounds a cell runs in all, decided once, after the planned ones: those when both
/// kinds' medians are known within [`SPREAD_LIMIT`]; else as many as the wider interval says it
/// takes to narrow to it (a median's interval narrows as 1/√rounds), a fifth more as margin,
/// rounded up to an even count (each front first as often), at most `plan.max_rounds`. Decided
/// once, not by looking again after every pair: stopping at the first look that happens to be
/// narrow would make the verdict and the interval look better than they are. (The width is
/// relative to the median, which moves it by a fraction of a percent.)
fn rounds_wanted(plan: &Plan, control: &Side, mode: &Side) -> usize {
    let width = |m: &[f64], c: &[f64]| stats::spread(&stats::paired_ratios(m, c)).ci_half_range();
    let w = width(&mode.keepalive, &control.keepalive).max(width(&mode.newconn, &control.newconn));
    if !w.is_finite() || w <= SPREAD_LIMIT {
        // Known well enough, or a front that answered nothing: more rounds would not help.
        return plan.rounds;
    }
    let n = (plan.rounds as f64 * (w / SPREAD_LIMIT).powi(2) * 1.2).ceil() as usize;
    (n + n % 2).clamp(plan.rounds, plan.max_rounds)
}

/// Measures one cell: both fronts set up, a warm-up each, then `plan.rounds` rounds of turns
/// (or more: [`rounds_wanted`]) with the program's windows between them, then each front's
/// constant-rate latency.
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
    // A warm-up of each front, then a short run of each whose rates set the turns' length: the
    // slower front's, per kind. (Not the warm-up's own rate: a Node.js worker's first second,
    // before V8 has compiled its code, runs at a fraction of its speed.)
    let mut warm = *plan;
    warm.run = plan.warmup;
    let mut calibrate = *plan;
    calibrate.run = 4 * plan.slice;
    let mut warm_rates = [f64::INFINITY; 2];
    for ep in [&control, &mode] {
        for (i, keepalive) in [true, false].into_iter().enumerate() {
            let _ = closed(&warm, &sbs[ep.sb], ep, keepalive, client_cpu);
            let rate = closed(&calibrate, &sbs[ep.sb], ep, keepalive, client_cpu).rate();
            warm_rates[i] = warm_rates[i].min(rate);
        }
    }
    let turns = warm_rates.map(|r| turn_length(plan, r));
    let drops0 = conntrack_drops(&sbs);
    let arms = [&control, &mode].map(|ep| Arm { sb: &sbs[ep.sb], targets: &ep.targets, balance: ep.balance });
    let mut program_windows = Vec::new();
    let mut program_error = None;
    let (mut round, mut rounds) = (0, plan.rounds);
    while round < rounds {
        // Who goes first alternates: whatever a turn leaves behind (TIME_WAIT sockets, conntrack
        // entries, a warmer cache) falls on each side as often.
        let first = round % 2;
        let run = |keepalive: bool| {
            let turn = turns[usize::from(!keepalive)];
            let n = (plan.run.as_secs_f64() / turn.as_secs_f64()).round().max(1.0) as usize;
            interleaved(arms, plan.clients, keepalive, turn, n, first, client_cpu)
        };
        let [c_ka, m_ka] = run(true);
        let [c_nc, m_nc] = run(false);
        record(&mut c_side, &c_ka, &c_nc);
        record(&mut m_side, &m_ka, &m_nc);
        merged_nc[0].extend(&c_nc.latencies_us);
        merged_nc[1].extend(&m_nc.latencies_us);
        // The program's own cost, from the kernel's statistics: in a window of new connections
        // of its own after half the rounds (the statistics add their own clock reads to every
        // run of the program, so never during a turn), spread over the cell as the rounds are:
        // a run time is a time, and this machine's speed moves for seconds at a time. After
        // rounds 1, 2, 5, 6, …: the window's leftovers (TIME_WAIT sockets, a busy CPU) precede
        // a round where the control goes first as often as one where the mode does.
        if mode.steering.is_some() && matches!(round % 4, 1 | 2) && program_error.is_none() {
            match program_cost(plan, &sbs[mode.sb], &mode, client_cpu) {
                Ok(ns) => program_windows.push(ns),
                Err(e) => program_error = Some(e),
            }
        }
        round += 1;
        if round == plan.rounds {
            rounds = rounds_wanted(plan, &c_side, &m_side);
        }
    }
    if let Some(e) = &program_error {
        eprintln!("   !! the steering program's run time is not measured: {e:#}");
    }
    let conntrack_drops = conntrack_drops(&sbs).saturating_sub(drops0);
    if conntrack_drops > 0 {
        eprintln!("   !! conntrack: {conntrack_drops} drops during the rounds (its table was full)");
    }
    let program_ns =
        (program_error.is_none() && !program_windows.is_empty()).then(|| stats::spread(&program_windows));
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
        rounds,
        program_ns,
        conntrack_drops,
        turns,
        load: (load0, system::load1()),
        seconds: started.elapsed().as_secs_f64(),
    };
    eprintln!(
        "   {} vs {}{}: keep-alive {} (median ±{:.1} %, rounds ±{:.1} %; on {:?} / {:?} workers), new conn {} (median ±{:.1} %, rounds ±{:.1} %), failed {}/{} (open loop {}/{}){}; turns {:?}; {:.0} s, load {:.1}",
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
        m.program_ns.map_or(String::new(), |ns| format!(
            ", program {:.0} [{:.0}–{:.0}] ns/connection (windows: {})",
            ns.median, ns.min, ns.max, ns.rounds
        )),
        m.turns,
        m.seconds,
        m.load.1
    );
    drop(sbs);
    Ok(m)
}

/// A cell's name: `MODE vs CONTROL`.
fn name(cell: &Cell) -> String {
    format!(
        "{} vs {}",
        cell.mode.label(cell.program, cell.bands),
        cell.control.label(cell.program, cell.bands)
    )
}

/// The cells of this run: the quick ones with `--quick`, and only those whose name contains
/// one of `only` when any is given.
fn chosen(plan: &Plan, only: &[String]) -> Vec<&'static Cell> {
    CELLS
        .iter()
        .filter(|c| c.quick || !plan.quick)
        .filter(|c| only.is_empty() || only.iter().any(|o| name(c).contains(o.as_str())))
        .collect()
}

pub fn run(plan: &Plan, pm2: &Path, only: &[String]) -> Result<Vec<Measured>> {
    if system::cpus().is_none() {
        eprintln!("   !! one CPU: nothing is pinned (clients and servers share it)");
    }
    let mut out = Vec::new();
    for cell in chosen(plan, only) {
        out.push(measure(plan, cell, pm2).with_context(|| format!("cell {}", name(cell)))?);
    }
    if out.is_empty() {
        bail!("no data-path cell ran (none is named by --cell {only:?})");
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
    fn turns_hold_enough_requests_within_bounds() {
        let plan = Plan::new(false);
        let ms = |rate| turn_length(&plan, rate).as_millis();
        assert_eq!(ms(50_000.0), plan.slice.as_millis(), "fast fronts: the shortest turn");
        assert_eq!(ms(6_400.0), 100, "64 clients × 10 requests at 6 400/s");
        assert_eq!(ms(10.0), 4 * plan.slice.as_millis(), "a stalled front: the longest");
        assert_eq!(ms(0.0), 4 * plan.slice.as_millis());
    }

    /// Tight after the planned rounds: no more. Looser: as many as narrowing to ±3 % takes at
    /// 1/√rounds, plus a fifth, even, capped. A front that answered nothing: no more.
    #[test]
    fn more_rounds_only_for_a_loose_median_decided_once() {
        let plan = Plan::new(false);
        let side =
            |ka: &[f64], nc: &[f64]| Side { keepalive: ka.to_vec(), newconn: nc.to_vec(), ..Side::default() };
        let steady = vec![100.0; 16];
        let c = side(&steady, &steady);
        assert_eq!(rounds_wanted(&plan, &c, &c), 16);
        // Mode rounds alternating ±6 %: the median's interval is about ±6 %: (6/3)² × 16 × 1.2.
        let six: Vec<f64> = (0..16).map(|i| if i % 2 == 0 { 94.0 } else { 106.0 }).collect();
        let w = stats::spread(&stats::paired_ratios(&six, &steady)).ci_half_range();
        let want = (16.0 * (w / SPREAD_LIMIT).powi(2) * 1.2).ceil() as usize;
        let n = rounds_wanted(&plan, &c, &side(&steady, &six));
        assert_eq!(n, (want + want % 2).min(plan.max_rounds), "interval ±{:.1} %", w * 100.0);
        assert!(n.is_multiple_of(2) && n > 16);
        let wild: Vec<f64> = (0..16).map(|i| if i % 2 == 0 { 50.0 } else { 150.0 }).collect();
        assert_eq!(rounds_wanted(&plan, &c, &side(&wild, &steady)), plan.max_rounds, "capped");
        assert_eq!(rounds_wanted(&plan, &side(&[0.0; 16], &[0.0; 16]), &c), 16, "nothing answered");
        let quick = Plan::new(true);
        let q = side(&steady[..3], &steady[..3]);
        assert_eq!(rounds_wanted(&quick, &q, &side(&wild[..3], &wild[..3])), 3, "--quick never adds rounds");
        assert_eq!((plan.max_rounds - plan.rounds) % 2, 0, "the cap keeps rounds in pairs");
    }

    #[test]
    fn cell_picks_cells_by_name() {
        let full = Plan::new(false);
        assert_eq!(chosen(&full, &[]).len(), CELLS.len());
        let node64 = chosen(&full, &["node socket 64".into()]);
        assert_eq!(node64.len(), 1);
        assert_eq!(name(node64[0]), "node socket 64 bands vs node 64 workers, plain reuseport group");
        // The pinned cell and its unpinned twin share a name.
        assert_eq!(chosen(&full, &["socket 8 bands vs 8 workers".into()]).len(), 2);
        assert!(chosen(&full, &["no such cell".into()]).is_empty());
        let quick = Plan::new(true);
        assert!(chosen(&quick, &["node".into()]).is_empty(), "--quick keeps to its own cells");
    }
}
