//! Footprint and scale: the daemon's memory and CPU with many workers, and how long its
//! operations take (Deploy, cutover, ListWorkers, adoption after a restart).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ipcluster_sandbox::Sandbox;

use super::{Plan, sandbox};

/// Idle daemon footprint with `workers` workers.
#[derive(Debug, Clone)]
pub struct Idle {
    pub workers: u32,
    pub rss_kib: u64,
    pub cpu_percent: f64,
    /// ListWorkers latency (median, max of 20 calls), ms.
    pub list_ms: (f64, f64),
    /// `systemctl restart ipclusterd` until READY=1 (adoption), ms.
    pub adopt_ms: f64,
}

/// Deploy latency at `bands` bands.
#[derive(Debug, Clone)]
pub struct DeployTime {
    /// `nat` or `socket`.
    pub routing: &'static str,
    pub bands: u32,
    /// Deploy call → return, ms (median of 3).
    pub deploy_ms: f64,
    /// The cutover transaction, ms (as the daemon logs it; median of 3).
    pub cutover_ms: f64,
    /// An instant rollback's transaction (the same workers live again), ms (median of 3).
    pub rollback_ms: f64,
}

#[derive(Debug, Clone)]
pub struct Footprint {
    pub idle: Vec<Idle>,
    pub deploys: Vec<DeployTime>,
}

fn app(workers: u32, autostart: bool) -> String {
    format!(
        "command = [\"/usr/local/bin/ipcluster-demo\"]\nworkers = {workers}\nlisten = [\"0.0.0.0:80\"]\nautostart = {autostart}\nready_timeout = \"2min\"\n"
    )
}

fn cpu_ticks(sb: &Sandbox, pid: u32) -> Result<u64> {
    let stat = sb.read_file(format!("/proc/{pid}/stat"))?;
    let f: Vec<u64> = stat
        .rsplit_once(')')
        .context("stat")?
        .1
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    Ok(f.iter().sum())
}

fn rss_kib(sb: &Sandbox, pid: u32) -> Result<u64> {
    let status = sb.read_file(format!("/proc/{pid}/status"))?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn busctl(sb: &Sandbox, args: &[&str]) -> Result<String> {
    let mut argv = vec!["busctl", "call", "org.ipcluster1", "/org/ipcluster1", "org.ipcluster1.Manager"];
    argv.extend_from_slice(args);
    sb.check(argv)
}

pub fn run(plan: &Plan) -> Result<Footprint> {
    let mut idle = Vec::new();
    for &n in plan.scales {
        let sb = sandbox(Some(&app(n, true)))?;
        let pid = sb.main_pid("ipclusterd")?;
        std::thread::sleep(Duration::from_secs(2));
        let (c0, t0) = (cpu_ticks(&sb, pid)?, Instant::now());
        std::thread::sleep(plan.idle);
        let cpu_percent = (cpu_ticks(&sb, pid)? - c0) as f64 * 10.0 / ms(t0.elapsed()) * 100.0;
        let rss = rss_kib(&sb, pid)?;
        let mut calls = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            busctl(&sb, &["ListWorkers", "s", ""])?;
            calls.push(ms(t.elapsed()));
        }
        // busctl's own start-up is part of that; measure it alone and subtract it.
        let mut base = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            sb.check([
                "busctl",
                "get-property",
                "org.ipcluster1",
                "/org/ipcluster1",
                "org.ipcluster1.Manager",
                "Version",
            ])?;
            base.push(ms(t.elapsed()));
        }
        let b = median(base);
        let max = calls.iter().copied().fold(0.0, f64::max) - b;
        let list_ms = ((median(calls) - b).max(0.0), max.max(0.0));
        let t = Instant::now();
        sb.check(["systemctl", "restart", "ipclusterd"])?;
        let adopt_ms = ms(t.elapsed());
        eprintln!(
            "   {n:>5} workers: daemon RSS {rss} KiB, CPU {cpu_percent:.2} %, ListWorkers {:.1} ms (max {:.1}), restart+adopt {adopt_ms:.0} ms",
            list_ms.0, list_ms.1
        );
        idle.push(Idle { workers: n, rss_kib: rss, cpu_percent, list_ms, adopt_ms });
    }
    let mut deploys = Vec::new();
    for (routing, bands) in
        [("nat", 8u32), ("nat", 64), ("nat", 256), ("socket", 8), ("socket", 64), ("socket", 256)]
    {
        let sb = sandbox(Some(&format!("{}routing = \"{routing}\"\n", app(bands, false))))?;
        let mut times = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            busctl(&sb, &["Deploy", "sa{sv}", "bench", "0"])?;
            times.push(ms(t.elapsed()));
            busctl(&sb, &["KillRetired", "s", "bench"])?;
        }
        // Instant rollbacks: each goes back to the generation the previous one retired.
        busctl(&sb, &["Deploy", "sa{sv}", "bench", "0"])?;
        for _ in 0..3 {
            busctl(&sb, &["Rollback", "st", "bench", "0"])?;
        }
        let journal = sb.check(["journalctl", "-u", "ipclusterd", "-o", "cat", "--no-pager"])?;
        let cutovers: Vec<f64> = journal
            .lines()
            .filter(|l| l.contains(": cutover to generation "))
            .filter_map(|l| l.split(" in ").last()?.strip_suffix(" ms")?.parse().ok())
            .collect();
        let rollbacks: Vec<f64> = journal
            .lines()
            .filter(|l| l.contains(": rolled back to generation "))
            .filter_map(|l| l.split(" in ").last()?.split(" ms").next()?.parse().ok())
            .collect();
        let d = DeployTime {
            routing,
            bands,
            deploy_ms: median(times),
            cutover_ms: median(cutovers),
            rollback_ms: median(rollbacks),
        };
        eprintln!(
            "   deploy {bands:>4} bands ({routing}): {:.0} ms, cutover {:.3} ms, rollback {:.3} ms",
            d.deploy_ms, d.cutover_ms, d.rollback_ms
        );
        deploys.push(d);
    }
    Ok(Footprint { idle, deploys })
}
