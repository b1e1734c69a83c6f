//! Footprint and scale: the daemon's memory and CPU with many workers, and how long its
//! operations take (Deploy, cutover, ListWorkers, adoption after a restart).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ipcluster_sandbox::Sandbox;

use super::{Plan, sandbox};

/// Idle daemon footprint with `workers` workers.
#[derive(Debug, Clone)]
pub struct Idle {
    /// `nat` or `socket`.
    pub routing: &'static str,
    pub workers: u32,
    pub rss_kib: u64,
    /// The daemon process alone (% of a core).
    pub cpu_percent: f64,
    /// The whole `ipclusterd.service` cgroup: the daemon and every program it runs (% of a core).
    pub service_cpu_percent: f64,
    /// ListWorkers latency (median, max of 20 calls), ms, as a client in this process sees it:
    /// the call's bytes out, the daemon's answer, the reply's bytes in (not printed).
    pub list_ms: (f64, f64),
    /// The same with `busctl` (its start-up subtracted; it also parses and prints every row).
    pub list_busctl_ms: (f64, f64),
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

/// A restart with session records in the kernel (issue 23): how long the new daemon takes to
/// adopt the workers and count the records again.
#[derive(Debug, Clone)]
pub struct SessionAdoption {
    /// `nat` or `socket`.
    pub routing: &'static str,
    pub workers: u32,
    /// Live records before the restart (ipset entries, or the steering program's map).
    pub records: u32,
    /// `systemctl restart ipclusterd` until READY=1 (adoption), ms.
    pub ready_ms: f64,
    /// Until `ListSessions` counts every record again, ms.
    pub counted_ms: f64,
}

#[derive(Debug, Clone)]
pub struct Footprint {
    pub idle: Vec<Idle>,
    pub deploys: Vec<DeployTime>,
    /// From `iptables -t nat -F` to the rules being back (NAT, the largest scale), ms.
    pub flush_repaired_ms: Option<f64>,
    pub sessions: Vec<SessionAdoption>,
}

/// The records a session-affinity restart is measured with: a full set (ipset's default
/// `maxelem`) and as many in the steering program's map.
pub const RECORDS: u32 = 65_536;

/// The live records `ListSessions` counts for the bench app.
fn sessions_counted(sb: &Sandbox) -> Result<u64> {
    // `a(stu) N "bench" G R ...`
    let out = busctl(sb, &["ListSessions", "s", "bench"])?;
    let words: Vec<&str> = out.split_whitespace().skip(2).collect();
    Ok(words.chunks(3).filter_map(|c| c.get(2)?.parse::<u64>().ok()).sum())
}

fn adopt_with_sessions(routing: &'static str, workers: u32) -> Result<SessionAdoption> {
    let sb = sandbox(Some(&format!(
        "{}routing = \"{routing}\"\nsession_affinity = \"1h\"\n",
        app(workers, true)
    )))?;
    if let Some((_, server)) = super::system::cpus() {
        super::system::pin_sandbox(&sb, &[server])?;
    }
    if routing == "nat" {
        let sets = sb.check(["ipset", "list", "-n"])?;
        let set = sets.lines().find(|l| l.starts_with("ipc4-bench-")).context("no session set")?.to_owned();
        let mut input = String::new();
        for i in 0..RECORDS {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
            input.push_str(&format!("add {set} {ip} timeout 3600\n"));
        }
        sb.write_file("/var/lib/ipcluster-bench/sessions.ipset", input, 0o644)?;
        sb.check(["ipset", "-exist", "restore", "-file", "/var/lib/ipcluster-bench/sessions.ipset"])?;
    } else {
        let xtask = sb.inside(&sb.build()?.xtask)?;
        sb.check([
            xtask.to_string_lossy().as_ref(),
            "bench-sessions",
            "bench",
            "0.0.0.0:80",
            &RECORDS.to_string(),
        ])?;
    }
    let all = u64::from(RECORDS);
    let t = Instant::now();
    while sessions_counted(&sb)? < all {
        anyhow::ensure!(t.elapsed() < Duration::from_secs(30), "the daemon never counted {all} records");
        std::thread::sleep(Duration::from_millis(100));
    }
    let t = Instant::now();
    sb.check(["systemctl", "restart", "ipclusterd"])?;
    let ready_ms = ms(t.elapsed());
    while sessions_counted(&sb).unwrap_or(0) < all {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(60),
            "the restarted daemon never counted {all} records"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let counted_ms = ms(t.elapsed());
    eprintln!(
        "   {workers:>5} workers ({routing}) with {RECORDS} session records: restart+adopt {ready_ms:.0} ms, every record counted after {counted_ms:.0} ms"
    );
    Ok(SessionAdoption { routing, workers, records: RECORDS, ready_ms, counted_ms })
}

/// CPU time (µs) of the whole `ipclusterd.service` cgroup so far (`usage_usec` of its
/// cpu.stat, there without the cpu controller).
fn service_usec(sb: &Sandbox) -> Result<u64> {
    let cg = sb.check(["systemctl", "show", "-p", "ControlGroup", "--value", "ipclusterd.service"])?;
    let stat = sb.read_file(format!("/sys/fs/cgroup{}/cpu.stat", cg.trim()))?;
    stat.lines()
        .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse().ok())
        .context("usage_usec in cpu.stat")
}

/// Flushes the nat table as another tool would and waits until the daemon has put its rules
/// back (PREROUTING's jump to its chain is there again); the time it took, ms.
fn flush_repair(sb: &Sandbox) -> Result<f64> {
    let ours = || -> Result<bool> {
        Ok(sb.check(["iptables", "-t", "nat", "-S", "PREROUTING"])?.contains("-j IPCLUSTER"))
    };
    anyhow::ensure!(ours()?, "no rule of ours to flush");
    let t = Instant::now();
    sb.check(["iptables", "-t", "nat", "-F"])?;
    while t.elapsed() < Duration::from_secs(15) {
        if ours()? {
            return Ok(ms(t.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("the rules were not repaired within 15 s of a flush")
}

fn app(workers: u32, autostart: bool) -> String {
    format!(
        "command = [\"/usr/local/bin/ipcluster-demo\"]\nworkers = {workers}\nlisten = [\"0.0.0.0:80\"]\nautostart = {autostart}\nready_timeout = \"5min\"\n"
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

/// ListWorkers of every worker, 20 times, from a client in this process (the soak's, through the
/// sandbox's bus socket): median and max, ms. The reply is received whole but not decoded (this
/// is an unoptimized build; decoding 1,024 rows is the client's cost, not the daemon's).
fn list_in_process(sb: &Sandbox) -> Result<(f64, f64)> {
    let bus = crate::soak::bus::Bus::connect(&sb.system_bus_address())?;
    let call = || {
        bus.call_any("ListWorkers", &("",), Duration::from_secs(5))
            .map_err(|e| anyhow::anyhow!("ListWorkers: {e}"))
    };
    call()?; // the connection's first call (name lookup, buffers) is not one of the 20
    let mut calls = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        call()?;
        calls.push(ms(t.elapsed()));
    }
    let max = calls.iter().copied().fold(0.0, f64::max);
    Ok((median(calls), max))
}

/// The same with `busctl`, whose start-up (measured with a property read) is subtracted; it
/// still parses and prints every row, so this is what a user of busctl waits, not the daemon.
fn list_with_busctl(sb: &Sandbox) -> Result<(f64, f64)> {
    let mut calls = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        busctl(sb, &["ListWorkers", "s", ""])?;
        calls.push(ms(t.elapsed()));
    }
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
    Ok(((median(calls) - b).max(0.0), max.max(0.0)))
}

pub fn run(plan: &Plan) -> Result<Footprint> {
    let mut idle = Vec::new();
    let mut flush_repaired_ms = None;
    let largest = plan.scales.iter().copied().max().unwrap_or(0);
    let cases = plan.scales.iter().map(|&n| ("nat", n)).chain([("socket", largest)]);
    for (routing, n) in cases {
        let sb = sandbox(Some(&format!("{}routing = \"{routing}\"\n", app(n, true))))?;
        if let Some((_, server)) = super::system::cpus() {
            super::system::pin_sandbox(&sb, &[server])?;
        }
        let pid = sb.main_pid("ipclusterd")?;
        // Past the start-up: every worker ready, the first sampling rounds done.
        std::thread::sleep(Duration::from_secs(3));
        let (c0, s0, t0) = (cpu_ticks(&sb, pid)?, service_usec(&sb)?, Instant::now());
        std::thread::sleep(plan.idle);
        let elapsed = ms(t0.elapsed());
        let cpu_percent = (cpu_ticks(&sb, pid)? - c0) as f64 * 10.0 / elapsed * 100.0;
        let service_cpu_percent = (service_usec(&sb)? - s0) as f64 / 1000.0 / elapsed * 100.0;
        let rss = rss_kib(&sb, pid)?;
        let flush = if routing == "nat" && n == largest { Some(flush_repair(&sb)?) } else { None };
        flush_repaired_ms = flush_repaired_ms.or(flush);
        let list_busctl_ms = list_with_busctl(&sb)?;
        let list_ms = list_in_process(&sb)?;
        let t = Instant::now();
        sb.check(["systemctl", "restart", "ipclusterd"])?;
        let adopt_ms = ms(t.elapsed());
        eprintln!(
            "   {n:>5} workers ({routing}): daemon RSS {rss} KiB, CPU {cpu_percent:.2} % alone, {service_cpu_percent:.2} % with its children, ListWorkers {:.1} ms (max {:.1}; busctl {:.1}), restart+adopt {adopt_ms:.0} ms{}",
            list_ms.0,
            list_ms.1,
            list_busctl_ms.0,
            flush.map_or(String::new(), |f| format!(", a flush repaired in {f:.0} ms"))
        );
        idle.push(Idle {
            routing,
            workers: n,
            rss_kib: rss,
            cpu_percent,
            service_cpu_percent,
            list_ms,
            list_busctl_ms,
            adopt_ms,
        });
    }
    let mut deploys = Vec::new();
    let sizes: &[u32] = if plan.quick { &[256] } else { &[8, 64, 256] };
    let cases = ["nat", "socket"].into_iter().flat_map(|r| sizes.iter().map(move |&b| (r, b)));
    for (routing, bands) in cases {
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
    let mut sessions = Vec::new();
    for routing in ["nat", "socket"] {
        sessions.push(adopt_with_sessions(routing, largest)?);
    }
    Ok(Footprint { idle, deploys, flush_repaired_ms, sessions })
}
