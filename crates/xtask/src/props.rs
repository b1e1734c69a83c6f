//! `cargo xtask props [--cases N] [--seed S]`: random exploration of every property test.
//!
//! `cargo xtask test` runs the property tests from one fixed seed at small case counts, so that
//! a landing never fails on an input unrelated to its change
//! ([`ipcluster_core::prop_config`]). This command runs the same properties, and only them,
//! from a seed of its own (random unless given, and printed first) with `N` cases each, so
//! that what it finds can be replayed exactly: the same `--cases` and `--seed`. A failing
//! input it finds is then kept as a named `#[test]` beside its property.

use std::process::Command;

use anyhow::{Result, bail};
use ipcluster_core::prop_config::{CASES_VAR, SEED_VAR};

/// Every property test lives in a module named `props` (crate-level or a test module's).
const FILTER: &str = "test(/(^|::)props::/)";

#[derive(Debug, clap::Args)]
pub struct PropsArgs {
    /// Cases per property test.
    #[arg(long, default_value_t = 10_000)]
    cases: u32,
    /// The seed (decimal); a random one when not given.
    #[arg(long)]
    seed: Option<u64>,
}

pub fn run(args: &PropsArgs) -> Result<()> {
    let seed = args.seed.unwrap_or_else(random_seed);
    let replay = format!("cargo xtask props --cases {} --seed {seed}", args.cases);
    eprintln!("props: seed {seed}, {} cases per property (replay: {replay})", args.cases);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    // Optimized: ten thousand cases of the rule round trip are minutes in a debug build.
    cmd.args(["nextest", "run", "--locked", "--workspace", "--release", "--no-fail-fast"])
        .args(["--exclude", "ipcluster-e2e", "-E", FILTER])
        .env(SEED_VAR, seed.to_string())
        .env(CASES_VAR, args.cases.to_string());
    let started = std::time::Instant::now();
    if let Err(e) = crate::sh(&mut cmd) {
        bail!(
            "{e}\nprops: a property failed from seed {seed}; replay with `{replay}`, and keep the \
             minimal input proptest printed as a named #[test] beside its property"
        );
    }
    eprintln!(
        "props: every property passed {} cases from seed {seed} in {:.0?}",
        args.cases,
        started.elapsed()
    );
    Ok(())
}

/// A seed from the kernel's random pool.
fn random_seed() -> u64 {
    use std::io::Read;
    let mut b = [0u8; 8];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)) {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    }
}
