//! The npm packages the end-to-end tests use: Socket.IO's own server and client (the session
//! tests run real long-polling clients against real Socket.IO workers). Installed from the npm
//! registry into the target directory (never the checkout, the host's /usr or a home), at the
//! versions below, once; the tests get the directory as `$IPCLUSTER_NODE_MODULES` and show it
//! inside their sandboxes.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};

/// The packages, pinned.
pub const PACKAGES: [&str; 2] = ["socket.io@4.8.4", "socket.io-client@4.8.4"];

/// Where they go: `<target>/npm`.
pub fn dir() -> PathBuf {
    crate::target().join("npm")
}

/// Installs [`PACKAGES`] under [`dir`] unless they are there at those versions; returns the
/// `node_modules` directory.
pub fn ensure() -> Result<PathBuf> {
    let dir = dir();
    let modules = dir.join("node_modules");
    let installed = PACKAGES.iter().all(|p| {
        let (name, version) = p.rsplit_once('@').expect("name@version");
        std::fs::read_to_string(modules.join(name).join("package.json"))
            .is_ok_and(|j| j.contains(&format!("\"version\": \"{version}\"")))
    });
    if installed {
        return Ok(modules);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut cmd = Command::new("npm");
    cmd.args(["install", "--no-audit", "--no-fund", "--no-save", "--prefix"]).arg(&dir).args(PACKAGES);
    crate::sh(&mut cmd)?;
    if !modules.join("socket.io").is_dir() {
        bail!("npm install left no {}", modules.join("socket.io").display());
    }
    Ok(modules)
}
