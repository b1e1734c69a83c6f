//! Where things are: the workspace, cargo's target directory, the sandboxes' work directories,
//! and the built artifacts a sandbox installs.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use super::FALLBACK_BASE;

/// Where sandbox work directories live: `$IPCLUSTER_SANDBOX_DIR`, else `sandbox/` in the
/// [`target_dir`], unless that is under /etc, /usr or /var: an overlay's upper layer inside its
/// own lower layer would show itself inside the sandbox (and /var/tmp is cleaned there), so such a
/// build's sandboxes live in /run/ipcluster-sandboxes.
pub fn base_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("IPCLUSTER_SANDBOX_DIR") {
        return PathBuf::from(dir);
    }
    let target = target_dir();
    if ["/etc", "/usr", "/var"].iter().any(|d| target.starts_with(d)) {
        return PathBuf::from(FALLBACK_BASE);
    }
    target.join("sandbox")
}

/// Names the target directory for the processes an xtask command starts (tests), so that they
/// need not ask cargo again.
pub const TARGET_DIR_VAR: &str = "IPCLUSTER_TARGET_DIR";

/// The workspace's target directory, where cargo builds: `cargo metadata`'s `target_directory`
/// (which follows `CARGO_TARGET_DIR` and `build.target-dir`), asked once per process; or
/// `$IPCLUSTER_TARGET_DIR` when a parent already asked. Where cargo cannot say (it is not
/// installed), `<workspace>/target`, with a warning.
pub fn target_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os(TARGET_DIR_VAR) {
            return PathBuf::from(dir);
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        cargo_target_dir(Command::new(cargo)).unwrap_or_else(|e| {
            let fallback = workspace_dir().join("target");
            eprintln!("warning: {e:#}; using {}", fallback.display());
            fallback
        })
    })
    .clone()
}

/// `target_directory` from `cargo metadata` of this workspace, run as `cargo` (a command
/// without arguments yet).
pub(crate) fn cargo_target_dir(mut cargo: Command) -> Result<PathBuf> {
    let manifest = workspace_dir().join("Cargo.toml");
    cargo
        .args(["metadata", "--no-deps", "--offline", "--format-version", "1", "--manifest-path"])
        .arg(&manifest)
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    let out = cargo.output().context("cannot run cargo metadata to find the target directory")?;
    if !out.status.success() {
        bail!("cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("cargo metadata's output is not JSON")?;
    let dir = meta["target_directory"].as_str().context("cargo metadata names no target_directory")?;
    Ok(PathBuf::from(dir))
}

/// The workspace root (this crate lives in `<root>/crates/ipcluster-sandbox`).
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

/// A built artifact: `$<env>` if set, else `<default>` in the [`target_dir`].
pub fn artifact(env: &str, default: &str) -> Result<PathBuf> {
    let path = std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| target_dir().join(default));
    if !path.exists() {
        bail!("{} not found: build first (`cargo xtask test` does), or set {env}", path.display());
    }
    Ok(path)
}

/// Directory of the release binaries to install: `$IPCLUSTER_BIN_DIR`, else `release` in the
/// [`target_dir`].
pub fn bin_dir() -> Result<PathBuf> {
    let dir = artifact("IPCLUSTER_BIN_DIR", "release")?;
    if !dir.join("ipclusterd").exists() {
        bail!("{}/ipclusterd not found: run `cargo build --release` first", dir.display());
    }
    Ok(dir)
}
