//! `cargo xtask bench [--quick]`: ipclusterd against the alternatives, measured in the same run.
//!
//! 1. data path ([`datapath`]): cells of a mode and its control (NAT against its own physical
//!    limit, socket mode against a plain reuseport group of the same workers, ipclusterd
//!    against HAProxy and PM2), each measured in interleaved rounds, keep-alive and new
//!    connections, clients and servers pinned to separate CPUs; then latency at a constant
//!    rate, 50 % and 80 % of each front's capacity;
//! 2. deploys under load ([`deploys`]): an open-loop load during deploys, worker `kill -9` and
//!    daemon restarts, each kind in its own window, vs. `pm2 reload`;
//! 3. footprint and scale ([`footprint`]): the daemon's CPU with its children, idle, NAT and
//!    socket, and how long its operations take.
//!
//! The statistics are [`stats`]' pure functions. Every front runs in a sandbox of its own (its
//! own network namespace). Results are compared as ratios of paired rounds within the run;
//! [`report`] writes docs/bench/REPORT.md with SVG charts and the README's headline table.

mod cells;
mod charts;
mod datapath;
mod deploys;
mod footprint;
mod report;
pub mod stats;
pub mod system;

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{Context, Result, bail};
use ipcluster_sandbox::Sandbox;

/// How long and how big: the full run or `--quick`.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub quick: bool,
    /// Interleaved rounds per cell (control, mode, then mode, control, …: as many of each
    /// order when even).
    pub rounds: usize,
    /// The most rounds a cell runs: more than `rounds` when a ratio's median is then known less
    /// well than the report's ±3 %, as many as decided once after them (`datapath::rounds_wanted`).
    pub max_rounds: usize,
    /// Each front's share of a round, per kind (keep-alive, new connections): its turns added up.
    pub run: Duration,
    /// The shortest turn: in a round the two fronts alternate in turns of this to 4 × this, by
    /// their rate (`datapath::turn_length`).
    pub slice: Duration,
    /// Each front's warm-up before its cell's first round.
    pub warmup: Duration,
    /// Duration of each constant-rate latency measurement.
    pub latency_run: Duration,
    pub clients: usize,
    /// Operations of each kind (deploy, worker kill -9, restart) under load.
    pub events: u32,
    pub rate: u32,
    pub scales: &'static [u32],
    pub idle: Duration,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Plan {
                quick,
                rounds: 3,
                max_rounds: 3,
                run: Duration::from_millis(800),
                slice: Duration::from_millis(50),
                warmup: Duration::from_millis(300),
                latency_run: Duration::from_millis(800),
                clients: 64,
                events: 5,
                rate: 300,
                scales: &[256],
                idle: Duration::from_secs(4),
            }
        } else {
            Plan {
                quick,
                rounds: 16,
                max_rounds: 48,
                run: Duration::from_secs(2),
                slice: Duration::from_millis(50),
                warmup: Duration::from_secs(1),
                latency_run: Duration::from_secs(4),
                clients: 64,
                events: 20,
                rate: 300,
                scales: &[16, 256, 1024],
                idle: Duration::from_secs(20),
            }
        }
    }
}

/// The sections of a run (`--only` picks some; the report is written only by a whole run).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    Datapath,
    Events,
    Footprint,
}

pub fn run(quick: bool, only: &[Section], cells: &[String]) -> Result<()> {
    if let Some(why) = ipcluster_sandbox::unavailable_reason() {
        bail!("the benchmarks boot sandboxed systemd hosts: {why}");
    }
    let plan = Plan::new(quick);
    let machine = system::machine();
    crate::packages::ensure(&[crate::packages::RUNTIME, crate::packages::SANDBOX, crate::packages::BENCH])?;
    let pm2 = ensure_pm2()?;
    crate::demo::build()?;
    // The run's own duration, without the build.
    let started = std::time::Instant::now();
    let (stat0, load0) = (system::proc_stat(), system::load1());
    let wants = |s: Section| only.is_empty() || only.contains(&s);
    let dp = if wants(Section::Datapath) {
        eprintln!("== data path ({} rounds of {:?} per front and kind)", plan.rounds, plan.run);
        Some(datapath::run(&plan, &pm2, cells)?)
    } else {
        None
    };
    let dl = if wants(Section::Events) {
        eprintln!("== deploys, kill -9 and restarts under load ({} of each)", plan.events);
        Some(deploys::run(&plan, &pm2)?)
    } else {
        None
    };
    let fp = if wants(Section::Footprint) {
        eprintln!("== footprint and scale");
        Some(footprint::run(&plan)?)
    } else {
        None
    };
    let took = started.elapsed();
    let env = report::Env {
        machine,
        steal: stats::steal_share(&stat0, &system::proc_stat()),
        load: (load0, system::load1()),
        took,
        pinned: system::cpus(),
    };
    eprintln!("took {:.0} s", took.as_secs_f64());
    match (dp, dl, fp) {
        (Some(dp), Some(dl), Some(fp)) if cells.is_empty() => report::write(&plan, &env, &dp, &dl, &fp),
        _ => {
            eprintln!("(a partial run: no report written)");
            Ok(())
        }
    }
}

/// PM2 from the npm registry, installed under target/bench (the sandboxes see it there).
fn ensure_pm2() -> Result<PathBuf> {
    let prefix = crate::target().join("bench/pm2");
    let bin = prefix.join("node_modules/pm2/bin/pm2");
    if !bin.exists() {
        std::fs::create_dir_all(&prefix)?;
        crate::sh(
            Command::new("npm")
                .args(["install", "--no-audit", "--no-fund", "--prefix"])
                .arg(&prefix)
                .arg("pm2@5"),
        )?;
    }
    Ok(bin)
}

/// Where the sandboxes get the Node.js worker: in the sandbox's overlaid /var (its /srv is the
/// host's own directory).
pub const WORKER_JS: &str = "/var/lib/ipcluster-bench/worker.js";

/// The Node.js worker (same answer as ipcluster-demo): on `$PORT`, or in socket mode on the
/// socket it is handed at fd 3 (then `READY=1` through systemd-notify: Node has no Unix datagram
/// sockets); PM2 hears `ready` over its IPC channel.
pub const NODE_WORKER: &str = r#"const http = require('http');
const id = `app=node generation=${process.env.IPCLUSTER_GENERATION || 0} band=${process.env.IPCLUSTER_BAND || 0} pid=${process.pid}`;
const server = http.createServer((req, res) => {
  res.setHeader('Content-Type', 'text/plain');
  res.end(`${id} peer=${req.socket.remoteAddress}\n`);
});
const ready = () => {
  if (process.send) process.send('ready');
  if (process.env.NOTIFY_SOCKET) require('child_process').spawn('systemd-notify', ['--ready'], { stdio: 'ignore' });
};
if (process.env.LISTEN_FDS) server.listen({ fd: 3 }, ready);
else server.listen(+(process.env.PORT || 3000), '0.0.0.0', ready);
"#;

/// A sandbox with the build installed and, optionally, ipclusterd running `app` (a TOML body).
pub fn sandbox(app: Option<&str>) -> Result<Sandbox> {
    // PM2 (under target/bench) is run from the host's build, like ipclusterd itself.
    let share = vec![crate::target().join("bench")];
    let sb = Sandbox::boot_with(ipcluster_sandbox::Options { share, ..Default::default() })?;
    sb.install()?;
    // conntrack keeps a closed connection's entry for `nf_conntrack_tcp_timeout_time_wait`
    // (120 s): at the 20 000–28 000 new connections a second of a round, a sandbox's table
    // (262 144 entries on this machine) was full within 15 s, and conntrack dropped SYNs (the
    // kernel's "nf_conntrack: table full" lines): both NAT mode and its limit then measured
    // the table, one round at 0 requests a second. 2 s holds a round's entries well under it,
    // the same for every front (a host that takes this rate needs the same, or a larger table:
    // docs/config.md). The sysctl is the sandbox's own network namespace's.
    sb.check(["sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_timeout_time_wait=2"])?;
    sb.write_file(WORKER_JS, NODE_WORKER, 0o644)?;
    if let Some(app) = app {
        sb.write_file("/etc/ipcluster/apps/bench.toml", app, 0o644)?;
        sb.check(["systemctl", "start", "ipclusterd"])?;
    }
    Ok(sb)
}

/// Waits until `port` accepts inside the sandbox.
pub fn wait_port(sb: &Sandbox, port: u16) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        let ok = sb
            .in_netns(move || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
            .context("netns")?;
        if ok {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on port {port}")
}

/// Starts `argv` in the background inside the sandbox, as a transient service of the sandbox's
/// systemd (it dies with the sandbox). A process started by `nsenter` alone would stay in the
/// benchmark's own cgroup, next to the load generator, where the CPU is shared thread by thread;
/// ipclusterd's workers live in the sandbox's cgroups, which the scheduler weighs against the
/// load generator's as a group. Every front and every control runs where a service would, so
/// only the routing differs between modes.
pub fn background(sb: &Sandbox, argv: &[&str], env: &[(&str, &str)]) -> Result<()> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let unit = format!("bench-{}", NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let mut run: Vec<String> =
        ["systemd-run", "--quiet", "--collect", "--unit", &unit].iter().map(|s| (*s).to_owned()).collect();
    for (k, v) in env {
        run.push(format!("--setenv={k}={v}"));
    }
    run.push("--".into());
    run.extend(argv.iter().map(|s| (*s).to_owned()));
    sb.check(run)?;
    Ok(())
}
