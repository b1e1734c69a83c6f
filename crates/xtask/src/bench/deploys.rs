//! Deploys under load: an open-loop load (fixed rate, new connections from many source
//! addresses) plus long-lived keep-alive connections, while ipclusterd deploys and restarts —
//! and the same load while `pm2 reload` replaces PM2's workers.

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
use ipcluster_load::{Failure, Record, connect, loopback_sources, open_loop, percentile, request};
use ipcluster_sandbox::Sandbox;

use super::{Plan, datapath::start_pm2, sandbox, wait_port};

/// What happened during one run.
#[derive(Debug)]
pub struct Run {
    pub name: String,
    pub records: Vec<Record>,
    /// (start, end) of each operation (deploy, restart, reload), since the load started.
    pub events: Vec<(Duration, Duration, &'static str)>,
    pub long_lived_ok: u64,
    pub long_lived_failed: u64,
}

/// Outcome counts and latency percentiles of a run.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub requests: usize,
    pub refused: usize,
    pub reset: usize,
    pub timeout: usize,
    pub other: usize,
    pub steady_p99_us: u32,
    pub steady_p999_us: u32,
    pub cutover_p99_us: u32,
    pub cutover_p999_us: u32,
}

impl Run {
    pub fn summary(&self) -> Summary {
        let mut s = Summary { requests: self.records.len(), ..Summary::default() };
        let in_window = |r: &Record| {
            self.events.iter().any(|(a, b, _)| {
                r.due + Duration::from_millis(500) >= *a && r.due <= *b + Duration::from_millis(500)
            })
        };
        let (mut steady, mut cutover) = (Vec::new(), Vec::new());
        for r in &self.records {
            match &r.outcome {
                Ok(_) => {
                    let us = r.latency.as_micros().min(u32::MAX as u128) as u32;
                    if in_window(r) { cutover.push(us) } else { steady.push(us) }
                }
                Err(Failure::Refused) => s.refused += 1,
                Err(Failure::Reset) => s.reset += 1,
                Err(Failure::Timeout) => s.timeout += 1,
                Err(Failure::Other(_)) => s.other += 1,
            }
        }
        steady.sort_unstable();
        cutover.sort_unstable();
        s.steady_p99_us = percentile(&steady, 99.0);
        s.steady_p999_us = percentile(&steady, 99.9);
        s.cutover_p99_us = percentile(&cutover, 99.0);
        s.cutover_p999_us = percentile(&cutover, 99.9);
        s
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
    pub pm2: Run,
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

/// Deploys, then `kill -9` of live workers, then daemon restarts, under load.
fn ipclusterd_run(plan: &Plan, name: &str, routing: &str) -> Result<Run> {
    let app = format!(
        "command = [\"/usr/local/bin/ipcluster-demo\"]\nworkers = 8\nlisten = [\"0.0.0.0:80\"]\nstop_timeout = \"2s\"\nrouting = \"{routing}\"\n"
    );
    let sb = sandbox(Some(&app))?;
    wait_port(&sb, 80)?;
    let duration = Duration::from_secs_f64(
        3.0 + f64::from(plan.deploys) * 0.7 + f64::from(plan.kills) * 1.2 + f64::from(plan.restarts) * 1.5,
    );
    under_load(plan, &sb, name, duration, |start| {
        let mut events = Vec::new();
        std::thread::sleep(Duration::from_millis(1500));
        for _ in 0..plan.deploys {
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
            std::thread::sleep(Duration::from_millis(400));
        }
        // A crash: the band's clients go to a neighbour until its replacement is ready.
        for i in 0..plan.kills as usize {
            let pid = a_live_worker(&sb, i * 3)?;
            events.push(timed(start, "kill -9", || {
                sb.check(["kill", "-KILL", &pid.to_string()])?;
                Ok(())
            })?);
            std::thread::sleep(Duration::from_millis(1000));
        }
        for _ in 0..plan.restarts {
            events.push(timed(start, "restart", || {
                sb.check(["systemctl", "restart", "ipclusterd"])?;
                Ok(())
            })?);
            std::thread::sleep(Duration::from_millis(1000));
        }
        Ok(events)
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
    act: impl FnOnce(Instant) -> Result<Vec<(Duration, Duration, &'static str)>>,
) -> Result<Run> {
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let lived = long_lived(sb, stop.clone(), ok.clone(), failed.clone())?;
    let start = Instant::now();
    let records = std::thread::scope(|s| {
        let load = s.spawn(|| {
            open_loop(
                sb,
                start,
                plan.rate,
                duration,
                &loopback_sources(64),
                SocketAddrV4::new(Ipv4Addr::LOCALHOST, 80),
                64,
            )
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
    };
    let s = run.summary();
    eprintln!(
        "   {name}: {} requests, {} refused, {} reset, {} timeout, {} other; long-lived {} ok {} failed; p99.9 steady {} µs, at cutover {} µs",
        s.requests,
        s.refused,
        s.reset,
        s.timeout,
        s.other,
        run.long_lived_ok,
        run.long_lived_failed,
        s.steady_p999_us,
        s.cutover_p999_us
    );
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

    let sb = sandbox(None)?;
    start_pm2(&sb, pm2)?;
    let pm2_bin = sb.inside(pm2)?.to_string_lossy().into_owned();
    let duration = Duration::from_secs_f64(3.0 + f64::from(plan.deploys) * 3.0);
    let pm2_run = under_load(plan, &sb, "pm2", duration, |start| {
        let mut events = Vec::new();
        std::thread::sleep(Duration::from_millis(1500));
        for _ in 0..plan.deploys {
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
            std::thread::sleep(Duration::from_millis(300));
        }
        Ok(events)
    })?;
    Ok(Deploys { ipclusterd, socket, pm2: pm2_run })
}
