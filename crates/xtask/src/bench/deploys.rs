//! Deploys under load: an open-loop load (fixed rate, new connections from many source
//! addresses, latency counted from when each request was due) plus long-lived keep-alive
//! connections, while ipclusterd deploys, loses workers to `kill -9` and restarts — each kind
//! in a window of its own, so that each kind's p99.9 rests on its own samples — and the same
//! load while `pm2 reload` replaces PM2's workers.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use ipcluster_load::{Failure, Record, connect, loopback_sources, open_loop, request};
use ipcluster_sandbox::Sandbox;

use super::{Plan, datapath::start_pm2, sandbox, stats, system, wait_port};

/// What happened during one run.
#[derive(Debug)]
pub struct Run {
    pub name: String,
    pub records: Vec<Record>,
    /// (start, end) of each operation (deploy, restart, reload), since the load started.
    pub events: Vec<(Duration, Duration, &'static str)>,
    pub long_lived_ok: u64,
    pub long_lived_failed: u64,
    /// [`Run::summary`], computed once (its intervals resample thousands of times).
    pub summary: std::sync::OnceLock<Summary>,
}

/// Around each operation, this much before its start and after its end is its window.
pub const WINDOW: Duration = Duration::from_millis(500);
/// Failed requests listed one by one in a run's report (the rest are counted).
pub const LISTED: usize = 20;
/// The load's first second (its client threads starting) counts failures but no latency.
pub const WARMUP: Duration = Duration::from_secs(1);

/// Outcome counts and latency percentiles of a run.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub requests: usize,
    pub refused: usize,
    pub reset: usize,
    pub timeout: usize,
    pub other: usize,
    /// p50, p99, p99.9 (µs) of the requests outside every operation's window.
    pub steady_us: [u64; 3],
    pub steady_samples: usize,
    /// Per kind of operation: (kind, operations, samples in its windows, p50/p99/p99.9 µs).
    pub kinds: Vec<(&'static str, usize, usize, [u64; 3])>,
    /// Failed requests by the window they were due in ("steady" outside every window); only
    /// windows with a failure.
    pub failed_in: Vec<(&'static str, usize)>,
    /// Per kind: an approximate 95 % interval of its p99.9 ratio, whole windows and whole
    /// blocks of steady samples resampled ([`stats::bootstrap_p999_ratio_ci`]).
    pub p999_ci: Vec<(&'static str, (f64, f64))>,
}

impl Summary {
    /// A kind's p99.9 over the steady p99.9.
    pub fn p999_ratio(&self, kind: &str) -> Option<f64> {
        let k = self.kinds.iter().find(|k| k.0 == kind)?;
        (self.steady_us[2] > 0).then(|| k.3[2] as f64 / self.steady_us[2] as f64)
    }

    /// A kind's p99.9 ratio's 95 % interval.
    pub fn p999_ratio_ci(&self, kind: &str) -> Option<(f64, f64)> {
        self.p999_ci.iter().find(|c| c.0 == kind).map(|c| c.1)
    }

    /// That interval as the report shows it: `0.91–1.34`, or `–`.
    pub fn p999_ci_text(&self, kind: &str) -> String {
        self.p999_ratio_ci(kind).map_or("–".into(), |(lo, hi)| format!("{lo:.2}–{hi:.2}"))
    }
}

impl Run {
    /// The index of the operation whose window (±[`WINDOW`]) holds `r`'s due time.
    fn window_of(&self, r: &Record) -> Option<usize> {
        self.events.iter().position(|(a, b, _)| r.due + WINDOW >= *a && r.due <= *b + WINDOW)
    }

    /// The run's counts, percentiles and intervals.
    pub fn summary(&self) -> &Summary {
        self.summary.get_or_init(|| self.summarize())
    }

    fn summarize(&self) -> Summary {
        let mut s = Summary { requests: self.records.len(), ..Summary::default() };
        // Latencies by operation window, and the steady ones in the order they were due.
        let mut windows: Vec<Vec<u64>> = vec![Vec::new(); self.events.len()];
        let mut steady_in_order = Vec::new();
        for r in &self.records {
            let window = self.window_of(r);
            if r.outcome.is_err() {
                let kind = window.map_or("steady", |i| self.events[i].2);
                match s.failed_in.iter_mut().find(|f| f.0 == kind) {
                    Some(f) => f.1 += 1,
                    None => s.failed_in.push((kind, 1)),
                }
            }
            match &r.outcome {
                Ok(_) if r.due < WARMUP => {}
                Ok(_) => {
                    let us = r.latency.as_micros().min(u64::MAX as u128) as u64;
                    match window {
                        Some(i) => windows[i].push(us),
                        None => steady_in_order.push(us),
                    }
                }
                Err(Failure::Refused) => s.refused += 1,
                Err(Failure::Reset) => s.reset += 1,
                Err(Failure::Timeout) => s.timeout += 1,
                Err(Failure::Other(_)) => s.other += 1,
            }
        }
        // For the intervals, the steady samples are cut into consecutive blocks as large as an
        // operation's window is on average: blocks of one size, so that no single one (the long
        // stretch after the last operation) weighs more than the others in a resample.
        let nonempty: Vec<usize> = windows.iter().map(Vec::len).filter(|&n| n > 0).collect();
        let block = (nonempty.iter().sum::<usize>() / nonempty.len().max(1)).max(1);
        let blocks: Vec<Vec<u64>> = steady_in_order.chunks(block).map(<[u64]>::to_vec).collect();
        let mut steady = steady_in_order;
        steady.sort_unstable();
        s.steady_us = stats::tail(&steady);
        s.steady_samples = steady.len();
        let mut kinds: Vec<&'static str> = Vec::new();
        for e in &self.events {
            if !kinds.contains(&e.2) {
                kinds.push(e.2);
            }
        }
        for kind in kinds {
            let of_kind: Vec<Vec<u64>> = self
                .events
                .iter()
                .zip(&windows)
                .filter(|(e, _)| e.2 == kind)
                .map(|(_, w)| w.clone())
                .collect();
            let mut v = of_kind.concat();
            v.sort_unstable();
            s.kinds.push((kind, of_kind.len(), v.len(), stats::tail(&v)));
            if let Some(ci) = stats::bootstrap_p999_ratio_ci(&of_kind, &blocks, 1000, 0x0e7e_5eed) {
                s.p999_ci.push((kind, ci));
            }
        }
        s
    }

    /// Each failed request (the first [`LISTED`]; the rest counted by window and kind of
    /// failure): how it failed, whether the handshake had completed (the kernel had queued the
    /// connection; a worker may or may not have accepted it), and when it failed relative to
    /// the start of the operation whose window it was due in (a worker's `kill -9` resets what
    /// that worker held at once; a connection lost to a rule change fails later).
    pub fn failure_times(&self) -> Vec<String> {
        let ms = |d: f64| d * 1000.0;
        let phase = |r: &Record| if r.connected { "after the handshake" } else { "at connect" };
        let failed: Vec<&Record> = self.records.iter().filter(|r| r.outcome.is_err()).collect();
        let how = |r: &Record| r.outcome.as_ref().err().map(ToString::to_string).unwrap_or_default();
        let mut out: Vec<String> = failed
            .iter()
            .take(LISTED)
            .map(|r| {
                let ended = (r.due + r.latency).as_secs_f64();
                match self.window_of(r).map(|i| self.events[i]) {
                    Some((a, b, kind)) => format!(
                        "{} {}, {:+.1} ms from a {kind}'s start (it took {:.1} ms)",
                        how(r),
                        phase(r),
                        ms(ended - a.as_secs_f64()),
                        ms((b - a).as_secs_f64())
                    ),
                    None => {
                        format!("{} {}, {ended:.3} s into the run, outside every window", how(r), phase(r))
                    }
                }
            })
            .collect();
        let mut rest: Vec<(String, usize)> = Vec::new();
        for r in failed.iter().skip(LISTED) {
            let key = format!(
                "{} {} in {}",
                how(r),
                phase(r),
                self.window_of(r).map_or("steady", |i| self.events[i].2)
            );
            match rest.iter_mut().find(|(k, _)| *k == key) {
                Some((_, n)) => *n += 1,
                None => rest.push((key, 1)),
            }
        }
        if !rest.is_empty() {
            let rest: Vec<String> = rest.into_iter().map(|(k, n)| format!("{n} × {k}")).collect();
            out.push(format!("and {} more: {}", failed.len() - LISTED, rest.join(", ")));
        }
        out
    }

    pub fn failures(&self) -> usize {
        let s = self.summary();
        s.refused + s.reset + s.timeout + s.other + self.long_lived_failed as usize
    }
}

#[derive(Debug)]
pub struct Deploys {
    /// NAT mode.
    pub ipclusterd: Run,
    /// Socket mode.
    pub socket: Run,
    /// Not in a quick run.
    pub pm2: Option<Run>,
}

impl Deploys {
    /// NAT, socket mode, then PM2 when it ran.
    pub fn runs(&self) -> impl Iterator<Item = &Run> {
        [Some(&self.ipclusterd), Some(&self.socket), self.pm2.as_ref()].into_iter().flatten()
    }
}

/// The PID of a live worker of the bench app (from `ipclusterctl workers`).
fn a_live_worker(sb: &Sandbox, nth: usize) -> Result<u32> {
    let out = sb.check(["ipclusterctl", "workers", "bench"])?;
    let live: Vec<u32> = out
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"live")).then(|| f.get(4)?.parse().ok()).flatten()
        })
        .collect();
    anyhow::ensure!(!live.is_empty(), "no live worker: {out}");
    Ok(live[nth % live.len()])
}

/// Under one load: a steady window, then `plan.events` deploys, then as many `kill -9` of live
/// workers, then as many daemon restarts, each kind in its own window (they never overlap).
fn ipclusterd_run(plan: &Plan, name: &str, routing: &str) -> Result<Run> {
    let app = format!(
        "command = [\"/usr/local/bin/ipcluster-demo\"]\nworkers = 8\nlisten = [\"0.0.0.0:80\"]\nstop_timeout = \"2s\"\nrouting = \"{routing}\"\n"
    );
    let sb = sandbox(Some(&app))?;
    wait_port(&sb, 80)?;
    let cpu = pin(&sb)?;
    let n = f64::from(plan.events);
    let duration = Duration::from_secs_f64(4.0 + n * (DEPLOY_GAP + KILL_GAP + RESTART_GAP + 0.6));
    under_load(plan, &sb, name, duration, cpu, |start| {
        let mut events = Vec::new();
        std::thread::sleep(Duration::from_millis(2000));
        for _ in 0..plan.events {
            events.push(timed(start, "deploy", || {
                sb.check([
                    "busctl",
                    "call",
                    "org.ipcluster1",
                    "/org/ipcluster1",
                    "org.ipcluster1.Manager",
                    "Deploy",
                    "sa{sv}",
                    "bench",
                    "0",
                ])?;
                Ok(())
            })?);
            // Retired generations are left running (no KillRetired): the long-lived connections
            // stay on the workers they started on, as they would in production.
            std::thread::sleep(Duration::from_secs_f64(DEPLOY_GAP));
        }
        // A crash: the band's clients go to a neighbour until its replacement is ready.
        for i in 0..plan.events as usize {
            let pid = a_live_worker(&sb, i * 3)?;
            events.push(timed(start, "kill -9", || {
                sb.check(["kill", "-KILL", &pid.to_string()])?;
                Ok(())
            })?);
            std::thread::sleep(Duration::from_secs_f64(KILL_GAP));
        }
        for _ in 0..plan.events {
            events.push(timed(start, "restart", || {
                sb.check(["systemctl", "restart", "ipclusterd"])?;
                Ok(())
            })?);
            std::thread::sleep(Duration::from_secs_f64(RESTART_GAP));
        }
        Ok(events)
    })
}

/// Seconds between two operations of a kind (their windows, ±0.5 s, never overlap).
const DEPLOY_GAP: f64 = 1.2;
const KILL_GAP: f64 = 1.2;
const RESTART_GAP: f64 = 1.2;

/// Pins the sandbox's processes to the servers' CPU; the clients' CPU.
fn pin(sb: &Sandbox) -> Result<ipcluster_load::Cpu> {
    Ok(match system::cpus() {
        Some((client, server)) => {
            system::pin_sandbox(sb, &[server])?;
            Some(client)
        }
        None => None,
    })
}

/// Long-lived keep-alive connections, one request each every 50 ms, until stopped.
fn long_lived(
    sb: &Sandbox,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) -> Result<std::thread::JoinHandle<()>> {
    sb.spawn_in_netns(move || {
        let dst = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 80);
        let mut conns: Vec<_> =
            (100..108u8).filter_map(|i| connect(Ipv4Addr::new(127, 0, 0, i), dst).ok()).collect();
        failed.fetch_add(8 - conns.len() as u64, Ordering::Relaxed);
        while !stop.load(Ordering::Relaxed) {
            conns.retain_mut(|c| match request(c) {
                Ok(_) => {
                    ok.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err(_) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    false
                }
            });
            std::thread::sleep(Duration::from_millis(50));
        }
    })
}

/// Runs the load while `act` performs the operations; returns the run.
fn under_load(
    plan: &Plan,
    sb: &Sandbox,
    name: &str,
    duration: Duration,
    cpu: ipcluster_load::Cpu,
    act: impl FnOnce(Instant) -> Result<Vec<(Duration, Duration, &'static str)>>,
) -> Result<Run> {
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let lived = long_lived(sb, stop.clone(), ok.clone(), failed.clone())?;
    let start = Instant::now();
    let records = std::thread::scope(|s| {
        let load = s.spawn(|| {
            let dst = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 80);
            let targets: Vec<_> = loopback_sources(64).into_iter().map(|s| (s, dst)).collect();
            open_loop(sb, start, plan.rate, duration, &targets, 64, cpu)
        });
        let events = act(start);
        let records = load.join().unwrap_or_default();
        events.map(|e| (records, e))
    })?;
    stop.store(true, Ordering::Relaxed);
    let _ = lived.join();
    let (records, events) = records;
    let run = Run {
        name: name.to_owned(),
        records,
        events,
        long_lived_ok: ok.load(Ordering::Relaxed),
        long_lived_failed: failed.load(Ordering::Relaxed),
        summary: Default::default(),
    };
    let s = run.summary();
    let kinds: Vec<String> =
        s.kinds.iter().map(|(k, ops, n, t)| format!("{k} ×{ops}: p99.9 {} µs ({n} samples)", t[2])).collect();
    eprintln!(
        "   {name}: {} requests, {} refused, {} reset, {} timeout, {} other; long-lived {} ok {} failed; steady p99.9 {} µs ({} samples); {}",
        s.requests,
        s.refused,
        s.reset,
        s.timeout,
        s.other,
        run.long_lived_ok,
        run.long_lived_failed,
        s.steady_us[2],
        s.steady_samples,
        kinds.join("; ")
    );
    for f in run.failure_times() {
        eprintln!("     failed: {f}");
    }
    Ok(run)
}

fn timed(
    start: Instant,
    what: &'static str,
    f: impl FnOnce() -> Result<()>,
) -> Result<(Duration, Duration, &'static str)> {
    let a = start.elapsed();
    f()?;
    Ok((a, start.elapsed(), what))
}

pub fn run(plan: &Plan, pm2: &Path) -> Result<Deploys> {
    let ipclusterd = ipclusterd_run(plan, "ipclusterd", "nat")?;
    let socket = ipclusterd_run(plan, "ipclusterd socket", "socket")?;
    if plan.quick {
        // PM2 is the full run's comparison.
        return Ok(Deploys { ipclusterd, socket, pm2: None });
    }

    let sb = sandbox(None)?;
    start_pm2(&sb, pm2, 8)?;
    let cpu = pin(&sb)?;
    let pm2_bin = sb.inside(pm2)?.to_string_lossy().into_owned();
    let duration = Duration::from_secs_f64(4.0 + f64::from(plan.events) * 3.0);
    let pm2_run = under_load(plan, &sb, "pm2", duration, cpu, |start| {
        let mut events = Vec::new();
        std::thread::sleep(Duration::from_millis(2000));
        for _ in 0..plan.events {
            events.push(timed(start, "reload", || {
                let out = sb
                    .command(["/usr/bin/node", &pm2_bin, "reload", "bench"])
                    .env("PM2_HOME", "/tmp/pm2")
                    .env("HOME", "/tmp")
                    .output()?;
                anyhow::ensure!(
                    out.status.success(),
                    "pm2 reload failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                Ok(())
            })?);
            std::thread::sleep(Duration::from_millis(1100));
        }
        Ok(events)
    })?;
    Ok(Deploys { ipclusterd, socket, pm2: Some(pm2_run) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(due_ms: u64, latency_us: u64) -> Record {
        Record {
            due: Duration::from_millis(due_ms),
            latency: Duration::from_micros(latency_us),
            outcome: Ok(1),
            connected: true,
        }
    }

    fn run(records: Vec<Record>, events: Vec<(Duration, Duration, &'static str)>) -> Run {
        Run {
            name: "t".into(),
            records,
            events,
            long_lived_ok: 0,
            long_lived_failed: 0,
            summary: Default::default(),
        }
    }

    /// The steady samples are resampled in blocks as large as a window: ten slow ones in one
    /// block make the steady p99.9 300 µs when that block is drawn and 100 µs when it is not,
    /// so the deploy's ratio (900 µs) lies between 3 and 9; and past [`LISTED`] failures are
    /// counted, not listed.
    #[test]
    fn the_interval_draws_steady_blocks_and_failures_are_bounded() {
        let mut records: Vec<Record> = (0..10_000).map(|i| rec(i, 100)).collect();
        for i in [2_000, 2_001] {
            records[i] = rec(i as u64, 900);
        }
        for (i, r) in records.iter_mut().enumerate().skip(8_000).take(10) {
            *r = rec(i as u64, 300);
        }
        for i in 0..30 {
            records.push(Record {
                due: Duration::from_millis(2_100 + i),
                latency: Duration::ZERO,
                outcome: Err(if i % 2 == 0 { Failure::Reset } else { Failure::Refused }),
                connected: i % 2 == 0,
            });
        }
        records.sort_by_key(|r| r.due);
        let r = run(records, vec![(Duration::from_millis(2_000), Duration::from_millis(2_100), "deploy")]);
        let s = r.summary();
        assert_eq!(s.steady_us[2], 300, "the slow block is in the steady samples");
        assert_eq!(s.p999_ratio("deploy"), Some(3.0));
        assert_eq!(s.p999_ratio_ci("deploy"), Some((3.0, 9.0)), "with and without the slow block");
        let failed = r.failure_times();
        assert_eq!(failed.len(), LISTED + 1);
        assert_eq!(
            failed[LISTED],
            "and 10 more: 5 × reset after the handshake in deploy, 5 × refused at connect in deploy"
        );
    }

    /// Each request counts for the kind of the operation whose window (±0.5 s) holds it, or
    /// as steady; a kind's p99.9 is divided by the steady one.
    #[test]
    fn requests_are_split_by_the_window_they_fall_in() {
        let mut records: Vec<Record> = (0..10_000).map(|i| rec(i, 100)).collect();
        // The load's first second: its latencies are not counted.
        records[10] = rec(10, 1_000_000);
        // Two slow requests in the deploy's window, two slower in the kill's: each window's
        // p99.9 (nearest rank of ~1,100 samples) is its second slowest.
        for (i, us) in [(2_000, 900), (2_001, 900), (6_200, 5_000), (6_201, 5_000)] {
            records[i] = rec(i as u64, us);
        }
        records.push(Record {
            due: Duration::from_millis(9_000),
            latency: Duration::ZERO,
            outcome: Err(Failure::Reset),
            connected: false,
        });
        // A request in flight at the kill: reset, and said to be the kill's.
        records.push(Record {
            due: Duration::from_millis(6_010),
            latency: Duration::from_millis(2),
            outcome: Err(Failure::Reset),
            connected: true,
        });
        let run = run(
            records,
            vec![
                (Duration::from_millis(2_000), Duration::from_millis(2_100), "deploy"),
                (Duration::from_millis(6_000), Duration::from_millis(6_050), "kill -9"),
            ],
        );
        let s = run.summary();
        assert_eq!(s.reset, 2);
        assert_eq!(s.failed_in, [("steady", 1), ("kill -9", 1)], "each failure in the window it was due in");
        assert_eq!(s.steady_us, [100, 100, 100]);
        let deploy = s.kinds.iter().find(|k| k.0 == "deploy").unwrap();
        assert_eq!((deploy.1, deploy.2), (1, 1101), "1.1 s of window, one request a ms");
        assert_eq!(deploy.3[2], 900);
        assert_eq!(s.p999_ratio("deploy"), Some(9.0));
        assert_eq!(s.p999_ratio("kill -9"), Some(50.0));
        assert_eq!(s.p999_ratio("restart"), None);
        // Every resample holds the one deploy window and steady stretches of 100 µs alone.
        assert_eq!(s.p999_ratio_ci("deploy"), Some((9.0, 9.0)));
        assert_eq!(s.p999_ratio_ci("kill -9"), Some((50.0, 50.0)));
        assert_eq!(s.p999_ratio_ci("restart"), None);
        assert_eq!(s.steady_samples, 10_000 - 1000 - 1101 - 1051);
        assert_eq!(run.failures(), 2);
        assert_eq!(
            run.failure_times(),
            [
                "reset at connect, 9.000 s into the run, outside every window",
                "reset after the handshake, +12.0 ms from a kill -9's start (it took 50.0 ms)",
            ]
        );
    }
}
