//! Data path: the same worker program behind each front, keep-alive and new connections.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use anyhow::Result;
use ipcluster_load::{Stats, closed_loop, loopback_sources};
use ipcluster_sandbox::Sandbox;

use super::{Plan, background, sandbox, wait_port};

/// One front's numbers.
#[derive(Debug)]
pub struct Mode {
    pub name: String,
    /// What it is compared with ("direct" or "node direct").
    pub baseline: &'static str,
    pub keepalive: Stats,
    pub newconn: Stats,
}

#[derive(Debug)]
pub struct DataPath {
    pub modes: Vec<Mode>,
}

impl DataPath {
    pub fn get(&self, name: &str) -> Option<&Mode> {
        self.modes.iter().find(|m| m.name == name)
    }
}

fn app(command: &str, workers: u32) -> String {
    format!("command = {command}\nworkers = {workers}\nlisten = [\"0.0.0.0:80\"]\n")
}

/// The same app in socket mode.
fn socket_app(command: &str, workers: u32) -> String {
    format!("{}routing = \"socket\"\nready_timeout = \"2min\"\n", app(command, workers))
}

/// The control a mode with `n` workers is compared with: the same program, `n` processes,
/// reached directly on their own ports (on 2 cores, 64 processes cost throughput by themselves).
fn direct_name(node: bool, n: u32) -> &'static str {
    match (node, n) {
        (false, 1) => "direct",
        (false, 8) => "direct 8 workers",
        (false, _) => "direct 64 workers",
        (true, 1) => "node direct",
        (true, 8) => "node direct 8 workers",
        (true, _) => "node direct 64 workers",
    }
}

/// `n` processes of `argv` on ports 20000.., reached directly: client `c` on worker `c % n`.
fn direct(plan: &Plan, argv: &[&str], n: u32, name: &'static str, sources: &[Ipv4Addr]) -> Result<Mode> {
    let sb = sandbox(None)?;
    let mut dsts = Vec::new();
    for i in 0..n {
        let port = 20000 + u16::try_from(i)?;
        background(&sb, argv, &[("PORT", &port.to_string())])?;
        dsts.push(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    }
    for d in &dsts {
        wait_port(&sb, d.port())?;
    }
    Ok(measure_many(plan, &sb, name, name, &dsts, sources))
}

const DEMO: &str = "[\"/usr/local/bin/ipcluster-demo\"]";
const NODE: &str = "[\"/usr/bin/node\", \"/var/lib/ipcluster-bench/worker.js\"]";

fn measure(
    plan: &Plan,
    sb: &Sandbox,
    name: &str,
    baseline: &'static str,
    dst: SocketAddrV4,
    sources: &[Ipv4Addr],
) -> Mode {
    measure_many(plan, sb, name, baseline, &[dst], sources)
}

fn measure_many(
    plan: &Plan,
    sb: &Sandbox,
    name: &str,
    baseline: &'static str,
    dsts: &[SocketAddrV4],
    sources: &[Ipv4Addr],
) -> Mode {
    // A short warm-up so that every mode starts from the same state.
    let _ = closed_loop(sb, plan.clients, plan.run / 5, true, sources, dsts);
    let keepalive = closed_loop(sb, plan.clients, plan.run, true, sources, dsts);
    let newconn = closed_loop(sb, plan.clients, plan.run, false, sources, dsts);
    eprintln!(
        "   {name:<22} keep-alive {:>8.0} req/s p50 {:>5} µs p99 {:>6} µs | new conn {:>7.0} req/s p50 {:>5} µs p99 {:>6} µs ({} failed)",
        keepalive.rate(),
        keepalive.percentile(50.0),
        keepalive.percentile(99.0),
        newconn.rate(),
        newconn.percentile(50.0),
        newconn.percentile(99.0),
        keepalive.failed + newconn.failed
    );
    Mode { name: name.to_owned(), baseline, keepalive, newconn }
}

pub fn run(plan: &Plan, pm2: &Path) -> Result<DataPath> {
    let public = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 80);
    let worker = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 20000);
    // Every mode cycles through the same 64 client addresses: with a single source address,
    // tens of thousands of new connections a second run out of ephemeral ports (TIME_WAIT) and
    // measure that instead of the server.
    let many = loopback_sources(64);
    let mut modes = Vec::new();

    let demo = ["/usr/local/bin/ipcluster-demo"];
    let node = ["/usr/bin/node", super::WORKER_JS];
    // Direct: one worker, the physical limit.
    modes.push(direct(plan, &demo, 1, "direct", &many)?);
    // The same, with connection tracking and NAT active in the namespace (a rule that matches
    // nothing we send): what conntrack alone costs.
    {
        let sb = sandbox(None)?;
        sb.check([
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "--dport",
            "9",
            "-j",
            "REDIRECT",
            "--to-ports",
            "9",
        ])?;
        background(&sb, &["/usr/local/bin/ipcluster-demo"], &[("PORT", "20000")])?;
        wait_port(&sb, 20000)?;
        modes.push(measure(plan, &sb, "direct + conntrack", "direct", worker, &many));
    }
    // 8 and 64 workers reached directly (each client on one of them): what spreading the same
    // load over that many processes costs, without any front. Each mode below is compared with
    // the control of its own worker count.
    modes.push(direct(plan, &demo, 8, "direct 8 workers", &many)?);
    modes.push(direct(plan, &demo, 64, "direct 64 workers", &many)?);
    for bands in [1u32, 8, 64] {
        let sb = sandbox(Some(&app(DEMO, bands)))?;
        wait_port(&sb, 80)?;
        let name = format!("ipclusterd {bands} bands");
        modes.push(measure(plan, &sb, &name, direct_name(false, bands), public, &many));
    }
    for bands in [1u32, 8, 64] {
        let sb = sandbox(Some(&socket_app(DEMO, bands)))?;
        wait_port(&sb, 80)?;
        let name = format!("socket {bands} bands");
        modes.push(measure(plan, &sb, &name, direct_name(false, bands), public, &many));
    }
    // HAProxy in front of 8 of the same workers, sticky by source address like ipclusterd.
    {
        let sb = sandbox(None)?;
        let mut servers = String::new();
        for i in 0..8u16 {
            let port = (20000 + i).to_string();
            background(&sb, &["/usr/local/bin/ipcluster-demo"], &[("PORT", &port)])?;
            wait_port(&sb, 20000 + i)?;
            servers.push_str(&format!("  server w{i} 127.0.0.1:{port}\n"));
        }
        let cfg = format!(
            "global\n  maxconn 8000\n  nbthread 2\ndefaults\n  mode http\n  option http-keep-alive\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\nfrontend f\n  bind 0.0.0.0:80\n  default_backend b\nbackend b\n  balance source\n{servers}"
        );
        sb.write_file("/var/lib/ipcluster-bench/haproxy.cfg", cfg, 0o644)?;
        background(&sb, &["/usr/sbin/haproxy", "-f", "/var/lib/ipcluster-bench/haproxy.cfg"], &[])?;
        wait_port(&sb, 80)?;
        modes.push(measure(plan, &sb, "haproxy 8 workers", "direct 8 workers", public, &many));
    }
    // Node.js: direct, under ipclusterd in both modes, and PM2 cluster mode.
    for n in [1u32, 8, 64] {
        modes.push(direct(plan, &node, n, direct_name(true, n), &many)?);
    }
    {
        let sb = sandbox(Some(&app(NODE, 8)))?;
        wait_port(&sb, 80)?;
        modes.push(measure(plan, &sb, "node ipclusterd 8 bands", "node direct 8 workers", public, &many));
    }
    for bands in [1u32, 8, 64] {
        let sb = sandbox(Some(&socket_app(NODE, bands)))?;
        wait_port(&sb, 80)?;
        let name = format!("node socket {bands} bands");
        modes.push(measure(plan, &sb, &name, direct_name(true, bands), public, &many));
    }
    {
        let sb = sandbox(None)?;
        start_pm2(&sb, pm2)?;
        modes.push(measure(plan, &sb, "node pm2 cluster 8", "node direct 8 workers", public, &many));
    }
    Ok(DataPath { modes })
}

/// PM2 cluster mode with 8 instances of the Node worker on port 80.
pub fn start_pm2(sb: &Sandbox, pm2: &Path) -> Result<()> {
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
            "8",
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
