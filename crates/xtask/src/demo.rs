//! `cargo xtask demo`: ipclusterd in a throwaway systemd host.

use std::process::Command;

use anyhow::{Result, bail};
use ipcluster_sandbox::Sandbox;

pub fn run() -> Result<()> {
    if let Some(why) = ipcluster_sandbox::unavailable_reason() {
        bail!("the demo boots a sandboxed systemd host: {why}");
    }
    build()?;
    println!("== booting a throwaway systemd host");
    let sandbox = Sandbox::boot()?;
    println!("   sandbox {} (its systemd is host pid {})", sandbox.name(), sandbox.init_pid());
    println!("== cargo xtask install (inside the sandbox)");
    sandbox.install()?;
    step(&sandbox, &["systemctl", "start", "ipclusterd"])?;
    step(&sandbox, &["systemctl", "status", "--no-pager", "--lines=5", "ipclusterd"])?;
    step(
        &sandbox,
        &["busctl", "get-property", "org.ipcluster1", "/org/ipcluster1", "org.ipcluster1.Manager", "Version"],
    )?;
    step(&sandbox, &["ipclusterctl", "version"])?;
    println!("== tearing down");
    sandbox.teardown()?;
    Ok(())
}

/// Builds what the sandbox installs (it has no network and no cargo of its own).
pub fn build() -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    crate::sh(Command::new(&cargo).args(["build", "--release", "--locked", "--bins"]))?;
    crate::sh(Command::new(&cargo).args(["build", "--locked", "-p", "xtask"]))
}

fn step(sandbox: &Sandbox, argv: &[&str]) -> Result<()> {
    println!("\n$ {}", argv.join(" "));
    let out = sandbox.run(argv)?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    // `systemctl status` exits 3 for inactive units; anything else non-zero is a failure.
    if !out.status.success() {
        bail!("{} failed ({})", argv.join(" "), out.status);
    }
    Ok(())
}
