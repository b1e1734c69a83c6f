//! `cargo xtask demo`: ipclusterd in a throwaway systemd host, doing its main job.
//!
//! Boots a sandbox, installs with `cargo xtask install`, starts ipclusterd with a 4-worker app of
//! the demo HTTP worker, shows stickiness from several client addresses, redeploys while a client
//! keeps sending requests, reaps the retired generation, and prints a summary.

use std::{
    collections::BTreeMap,
    io::Read,
    net::{Ipv4Addr, SocketAddrV4},
    process::Command,
    time::Duration,
};

use anyhow::{Result, bail};
use ipcluster_load::{Load, get, loopback_sources};
use ipcluster_sandbox::Sandbox;

const APP: &str = r#"# /etc/ipcluster/apps/demo.toml
command = ["/usr/local/bin/ipcluster-demo"]
workers = 4
listen = ["0.0.0.0:80"]
ready = "notify"
stop_timeout = "2s"
"#;

const PUBLIC: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 80);

pub fn run() -> Result<()> {
    crate::packages::ensure(&[crate::packages::RUNTIME, crate::packages::SANDBOX])?;
    if let Some(why) = ipcluster_sandbox::unavailable_reason() {
        bail!("the demo boots a sandboxed systemd host: {why}");
    }
    build()?;
    println!("== booting a throwaway systemd host");
    let sandbox = Sandbox::boot()?;
    println!("   sandbox {} (its systemd is host pid {})", sandbox.name(), sandbox.init_pid());
    println!("== cargo xtask install (inside the sandbox)");
    sandbox.install()?;
    println!("\n== the app file\n{APP}");
    sandbox.write_file("/etc/ipcluster/apps/demo.toml", APP, 0o644)?;
    step(&sandbox, &["systemctl", "start", "ipclusterd"])?;
    step(&sandbox, &["systemctl", "status", "--no-pager", "--lines=0", "ipclusterd"])?;
    step(
        &sandbox,
        &["busctl", "get-property", "org.ipcluster1", "/org/ipcluster1", "org.ipcluster1.Manager", "Version"],
    )?;
    step(&sandbox, &["ipclusterctl", "workers", "demo"])?;
    step(&sandbox, &["iptables", "-t", "nat", "-S", "IPC-demo"])?;

    println!("\n== stickiness: 8 client addresses, 3 requests each, to 127.0.0.1:80");
    let answers = sandbox.in_netns(|| {
        loopback_sources(8)
            .into_iter()
            .map(|src| (src, (0..3).map(|_| get(src, PUBLIC)).collect::<Vec<_>>()))
            .collect::<Vec<_>>()
    })?;
    for (src, results) in &answers {
        let shown: Vec<String> = results
            .iter()
            .map(|r| match r {
                Ok(a) => format!("band {} pid {}", a.band, a.pid),
                Err(e) => format!("{e:?}"),
            })
            .collect();
        println!("   {src:<11} (band {}) -> {}", u32::from(*src) & 3, shown.join(" | "));
    }

    println!("\n== redeploy while a client sends requests over new connections from 16 addresses");
    let load = Load::start(&sandbox, loopback_sources(16), PUBLIC);
    std::thread::sleep(Duration::from_millis(500));
    step(&sandbox, &["ipclusterctl", "deploy", "demo"])?;
    std::thread::sleep(Duration::from_millis(500));
    let outcomes = load.finish();
    let mut by_generation: BTreeMap<u64, usize> = BTreeMap::new();
    let mut errors = Vec::new();
    for (src, r) in &outcomes {
        match r {
            Ok(a) => *by_generation.entry(a.generation).or_default() += 1,
            Err(e) => errors.push(format!("{src}: {e:?}")),
        }
    }
    step(&sandbox, &["ipclusterctl", "generations", "demo"])?;
    step(&sandbox, &["ipclusterctl", "workers", "demo"])?;

    println!("\n== reap the retired generation");
    step(&sandbox, &["systemctl", "kill", "-s", "USR1", "ipclusterd"])?;
    std::thread::sleep(Duration::from_millis(500));
    step(&sandbox, &["ipclusterctl", "generations", "demo"])?;
    step(&sandbox, &["journalctl", "-u", "ipclusterd", "-o", "cat", "--no-pager", "-n", "12"])?;

    println!("\n== summary");
    println!("   requests during the redeploy: {}", outcomes.len());
    for (g, n) in &by_generation {
        println!("   answered by generation {g}: {n}");
    }
    println!("   errors: {}", errors.len());
    for e in errors.iter().take(5) {
        println!("     {e}");
    }
    println!("== tearing down");
    sandbox.teardown()?;
    if !errors.is_empty() {
        bail!("{} requests failed during the redeploy", errors.len());
    }
    Ok(())
}

/// Builds what the sandbox installs (it has no network and no cargo of its own).
pub fn build() -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    crate::sh(Command::new(&cargo).args(["build", "--release", "--locked", "--bins"]))?;
    crate::sh(Command::new(&cargo).args(["build", "--locked", "-p", "xtask"]))
}

/// Runs `argv` in the sandbox and shows its output as a terminal would: stdout and stderr share
/// one pipe, so lines appear in the order the command wrote them (ipclusterctl deploy's progress
/// on stderr, then its result on stdout).
fn step(sandbox: &Sandbox, argv: &[&str]) -> Result<()> {
    println!("\n$ {}", argv.join(" "));
    let (read, write) = nix::unistd::pipe()?;
    let mut cmd = sandbox.command(argv);
    cmd.stdout(std::process::Stdio::from(write.try_clone()?)).stderr(std::process::Stdio::from(write));
    let mut child = cmd.spawn()?;
    // The command holds the pipe's write ends: without this drop, the read never sees EOF.
    drop(cmd);
    let mut output = String::new();
    std::fs::File::from(read).read_to_string(&mut output)?;
    let status = child.wait()?;
    print!("{output}");
    if !status.success() {
        bail!("{} failed ({status})", argv.join(" "));
    }
    Ok(())
}
